//! `cargo xtask demo`: a small node of network namespaces with real traffic, the agent on it, and
//! every namespace's STRICT readiness printed — the whole product in one command.
//!
//! | namespace | workloads                | traffic                                               | expected  |
//! |-----------|--------------------------|-------------------------------------------------------|-----------|
//! | payments  | api, worker (sidecars)   | worker → api: TLS 1.3 mTLS, Istio ALPN, SPIFFE certs; | ready     |
//! |           |                          | node → api:15021 health probe (exempt)                |           |
//! | shop      | web (sidecar)            | legacy/batch (no sidecar) → web:8080 plaintext HTTP   | not_ready |
//! | billing   | ledger (sidecar)         | shop/web → ledger:9443 one-way TLS (no client cert)   | not_ready |
//! | legacy    | batch (no sidecar)       | nothing inbound                                       | no_data   |
use std::{
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use mtls_agent_testbed::*;

pub fn demo(bin: &Path, seconds: u64) -> anyhow::Result<()> {
    ensure_root()?;
    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = stop.clone();
        ctrlc::set_handler(move || {
            eprintln!("\ndemo: interrupted, cleaning up");
            stop.store(true, Ordering::SeqCst);
        })
        .context("installing the Ctrl-C handler")?;
    }
    // Everything below lives in `tb`; dropping it (on return, error or Ctrl-C) kills every
    // process and deletes every namespace it created.
    let mut tb = Testbed::new("mtlsdemo")?;
    eprintln!("demo: building the node ({})", tb.node_netns());
    let api =
        tb.add_pod(PodSpec::new("api", "198.18.0.10".parse()?).ipv6("2001:db8::10".parse()?))?;
    let worker =
        tb.add_pod(PodSpec::new("worker", "198.18.0.11".parse()?).ipv6("2001:db8::11".parse()?))?;
    let web =
        tb.add_pod(PodSpec::new("web", "198.18.0.20".parse()?).ipv6("2001:db8::20".parse()?))?;
    let batch = tb.add_pod(PodSpec::new("batch", "198.18.0.30".parse()?))?;
    let ledger = tb.add_pod(PodSpec::new("ledger", "198.18.0.40".parse()?))?;

    let pki = Pki::new(tb.workdir().join("pki"))?;
    let api_cert = pki.issue(
        "api",
        &[San::spiffe("payments", "api"), San::Ip(api.ipv4.into())],
    )?;
    let worker_cert = pki.issue("worker", &[San::spiffe("payments", "worker")])?;
    let ledger_cert = pki.issue(
        "ledger",
        &[
            San::spiffe("billing", "ledger"),
            San::Ip(ledger.ipv4.into()),
        ],
    )?;

    let inventory = tb.workdir().join("inventory.yaml");
    write_inventory(
        &inventory,
        &[
            Workload::new("payments", "api", &[&api]),
            Workload::new("payments", "worker", &[&worker]),
            Workload::new("shop", "web", &[&web]),
            Workload::new("legacy", "batch", &[&batch]).without_sidecar(),
            Workload::new("billing", "ledger", &[&ledger]),
        ],
    )?;

    let istio_alpn = "istio-peer-exchange,istio";
    let _api_srv = openssl_server(
        &tb,
        &api.netns,
        &TlsServer::new(8443, &api_cert, pki.ca_cert())
            .require_client_cert()
            .alpn(istio_alpn)
            .tls_version(TlsVersion::Tls13),
    )?;
    let _api_health = http_server(&tb, &api.netns, 15021, false)?;
    let _web_srv = http_server(&tb, &web.netns, 8080, true)?;
    let _ledger_srv = openssl_server(
        &tb,
        &ledger.netns,
        &TlsServer::new(9443, &ledger_cert, pki.ca_cert()),
    )?;
    for (ns, addr) in [
        (&api.netns, api.v4(8443)),
        (&api.netns, api.v4(15021)),
        (&web.netns, web.v4(8080)),
        (&ledger.netns, ledger.v4(9443)),
    ] {
        tb.wait_tcp_listening(ns, addr, Duration::from_secs(10))?;
    }

    let pods = tb.pods().len();
    let agent = Agent::start(&tb, bin, &inventory, &["vp*"], &[], pods)?;
    eprintln!("demo: agent attached to {pods} pod interfaces; sending traffic for {seconds}s");

    let mtls_client = TlsClient::new(api.v4(8443), pki.ca_cert())
        .cert(&worker_cert)
        .alpn(istio_alpn)
        .tls_version(TlsVersion::Tls13);
    let mtls_client_v6 = TlsClient::new(api.v6(8443), pki.ca_cert())
        .cert(&worker_cert)
        .alpn(istio_alpn);
    let one_way = TlsClient::new(ledger.v4(9443), pki.ca_cert());
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let mut rounds = 0;
    while Instant::now() < deadline && !stop.load(Ordering::SeqCst) {
        openssl_client(&tb, &worker.netns, &mtls_client)?;
        openssl_client(&tb, &worker.netns, &mtls_client_v6)?;
        http_get(&tb, tb.node_netns(), &http_url(api.v4(15021)))?;
        http_get(&tb, &batch.netns, &http_url(web.v4(8080)))?;
        openssl_client(&tb, &web.netns, &one_way)?;
        rounds += 1;
        std::thread::sleep(Duration::from_millis(300));
    }
    if stop.load(Ordering::SeqCst) {
        bail!("interrupted");
    }
    eprintln!("demo: {rounds} rounds sent; waiting for the agent to count every connection");
    agent.settle(&tb, Duration::from_secs(10))?;

    for ns in ["payments", "shop", "billing", "legacy"] {
        let (status, out, err) = agent.report(&tb, &["--namespace", ns])?;
        if !status.success() {
            bail!("mtls-agent report --namespace {ns} failed: {err}");
        }
        println!("$ mtls-agent report --namespace {ns}\n{out}");
    }
    let status = agent.stop()?;
    eprintln!("demo: agent stopped ({status}); removing the demo node");
    tb.destroy()?;
    Ok(())
}
