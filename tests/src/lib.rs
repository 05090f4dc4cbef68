//! Test bed for mtls-agent: a simulated Kubernetes node built from network namespaces, a
//! throw-away PKI and real TLS/HTTP servers and clients.
//!
//! The agent has to be tested against real kernel traffic (TC hooks on veths, GSO-sized and
//! MTU-sized segments, real OpenSSL handshakes), but without touching the machine it runs on.
//! So everything here lives in network namespaces this crate creates and removes: a "node"
//! namespace with a bridge, one namespace per pod joined by a veth pair, addresses only from
//! 198.18.0.0/15 and 2001:db8::/32. The same API serves the end-to-end `#[test]`s and
//! `cargo xtask demo`; nothing depends on the test harness.
//!
//! ```no_run
//! use mtls_agent_testbed::*;
//! # fn main() -> anyhow::Result<()> {
//! let mut tb = Testbed::new("demo")?; // needs root
//! let web = tb.add_pod(PodSpec::new("web", "198.18.0.10".parse()?).ipv6("2001:db8::10".parse()?))?;
//! let cli = tb.add_pod(PodSpec::new("client", "198.18.0.20".parse()?))?;
//! let pki = Pki::new(tb.workdir().join("pki"))?;
//! let server_cert = pki.issue("web", &[San::spiffe("shop", "web"), San::Ip(web.ipv4.into())])?;
//! let client_cert = pki.issue("client", &[San::spiffe("shop", "client")])?;
//! let _server = openssl_server(
//!     &tb,
//!     &web.netns,
//!     &TlsServer::new(8443, &server_cert, pki.ca_cert()).require_client_cert().alpn("istio"),
//! )?;
//! let session = openssl_client(
//!     &tb,
//!     &cli.netns,
//!     &TlsClient::new(web.v4(8443), pki.ca_cert()).cert(&client_cert).alpn("istio"),
//! )?;
//! assert_eq!(session.alpn.as_deref(), Some("istio"));
//! # Ok(()) }
//! ```

pub mod agent;
pub mod inventory;
pub mod kube_double;
pub mod netns;
pub mod pki;
pub mod proc;
pub mod prometheus;
pub mod rtnl;
pub mod scenario;
pub mod traffic;

pub use agent::{Agent, agent_bin, metric_value, samples, tcx_programs};
pub use inventory::{Workload, inventory_yaml, write_inventory};
pub use kube_double::{
    KubeDouble, KubeDoubleClient, KubeDoubleProc, KubeResource, agent_pod_json, kube_fixtures_dir,
    pod_json, write_kubeconfig,
};
pub use netns::{
    BRIDGE, IPV4_PREFIX_LEN, IPV6_PREFIX_LEN, NODE_IPV4, NODE_IPV6, Pod, PodLink, PodSpec, Testbed,
    ensure_root, list_netns,
};
pub use pki::{CertPaths, Pki, San};
pub use proc::{Proc, wait_tcp_listening};
pub use prometheus::{Prometheus, wait_for};
pub use traffic::{
    HTTP_REQUEST, NginxServer, NginxTls, TlsClient, TlsServer, TlsSession, TlsVersion,
    VerifyClient, curl, http_get, http_server, http_url, https_url, nginx_server, openssl_client,
    openssl_client_repeat, openssl_server, padded_alpn, tcp_exchange, tcp_reply_server,
};
