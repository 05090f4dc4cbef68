//! Tests of the test bed itself. They need root and FAIL (never skip) without it: a test bed
//! that silently does nothing would make every end-to-end test meaningless.

use std::time::Duration;

use anyhow::Result;
use mtls_agent_testbed::*;

const FAMILY: &str = "mtt";

fn two_pods(tb: &mut Testbed) -> Result<(Pod, Pod)> {
    let server =
        tb.add_pod(PodSpec::new("server", "198.18.0.10".parse()?).ipv6("2001:db8::10".parse()?))?;
    let client =
        tb.add_pod(PodSpec::new("client", "198.18.0.20".parse()?).ipv6("2001:db8::20".parse()?))?;
    Ok((server, client))
}

fn leftovers(prefix: &str) -> Vec<String> {
    list_netns()
        .unwrap()
        .into_iter()
        .filter(|n| n.starts_with(&format!("{prefix}-")))
        .collect()
}

#[test]
fn runs_as_root() {
    ensure_root().expect("these tests must run as root");
}

#[test]
fn topology_reachability_and_cleanup() -> Result<()> {
    let mut tb = Testbed::new(FAMILY)?;
    let prefix = tb.prefix().to_string();
    let (server, client) = two_pods(&mut tb)?;
    assert_eq!(server.host_if, "vpserver");
    assert_eq!(client.host_if, "vpclient");
    assert_eq!(tb.node_netns(), format!("{prefix}-node"));
    assert_eq!(server.netns, format!("{prefix}-server"));
    assert_eq!(leftovers(&prefix).len(), 3);

    // The host-side veths and the bridge live in the node namespace, nowhere else.
    let links = tb.run(tb.node_netns(), &["ip", "-br", "link"])?;
    let links = String::from_utf8_lossy(&links.stdout);
    for name in [BRIDGE, "vpserver", "vpclient"] {
        assert!(
            links.contains(name),
            "{name} missing in node netns: {links}"
        );
    }
    let own = std::process::Command::new("ip")
        .args(["-br", "link"])
        .output()?;
    assert!(!String::from_utf8_lossy(&own.stdout).contains("vpserver"));

    // Bridge traffic must not be filtered by br_netfilter.
    let nf = tb.run(
        tb.node_netns(),
        &[
            "sh",
            "-c",
            "cat /proc/sys/net/bridge/bridge-nf-call-iptables 2>/dev/null || echo 0",
        ],
    )?;
    assert_eq!(String::from_utf8_lossy(&nf.stdout).trim(), "0");

    // Reachability pod->pod and node->pod, IPv4 and IPv6, over real TCP.
    let _http = http_server(&tb, &server.netns, 8080, true)?;
    assert_eq!(
        http_get(&tb, &client.netns, &http_url(server.v4(8080)))?,
        "ok\n"
    );
    assert_eq!(
        http_get(&tb, &client.netns, &http_url(server.v6(8080)))?,
        "ok\n"
    );
    assert_eq!(
        http_get(&tb, tb.node_netns(), &http_url(server.v4(8080)))?,
        "ok\n"
    );
    assert_eq!(
        http_get(&tb, tb.node_netns(), &http_url(server.v6(8080)))?,
        "ok\n"
    );
    // The source address of node traffic is the bridge address ("kubelet probe" source).
    let log = _http.stderr();
    assert!(
        log.contains(&tb.node_ipv4().to_string()),
        "python log: {log}"
    );
    assert!(log.contains(&client.ipv4.to_string()), "python log: {log}");

    tb.destroy()?;
    assert!(
        leftovers(&prefix).is_empty(),
        "left: {:?}",
        leftovers(&prefix)
    );
    Ok(())
}

#[test]
fn drop_cleans_up_even_on_panic() {
    let prefix = std::sync::Mutex::new(String::new());
    let r = std::panic::catch_unwind(|| {
        let mut tb = Testbed::new(FAMILY).unwrap();
        *prefix.lock().unwrap() = tb.prefix().to_string();
        let pod = tb
            .add_pod(PodSpec::new("p", "198.18.0.30".parse().unwrap()))
            .unwrap();
        // A server left running must not keep the namespace alive.
        let server = tb.spawn(&pod.netns, &["sleep", "300"]).unwrap();
        std::mem::forget(server);
        panic!("boom");
    });
    assert!(r.is_err());
    let prefix = prefix.into_inner().unwrap();
    assert!(!prefix.is_empty());
    assert!(
        leftovers(&prefix).is_empty(),
        "left: {:?}",
        leftovers(&prefix)
    );
}

#[test]
fn stale_namespaces_of_dead_runs_are_removed() -> Result<()> {
    ensure_root()?;
    // A family of its own: other tests' Testbed::new would clean up FAMILY concurrently.
    const FAMILY: &str = "mttstale";
    // Pid 0x7fff_fff0 cannot exist (above pid_max), so this looks like a crashed run.
    // Our pid in the sequence field keeps concurrent runs of this test apart.
    let stale = format!("{FAMILY}-{}-{}-node", 0x7fff_fff0u32, std::process::id());
    let live = format!("{FAMILY}-{}-9999-node", std::process::id());
    for ns in [&stale, &live] {
        let st = std::process::Command::new("ip")
            .args(["netns", "add", ns])
            .status()?;
        assert!(st.success());
    }
    let stale_dir = std::env::temp_dir().join(format!("mtls-testbed-{stale}-x"));
    std::fs::create_dir_all(stale_dir.join("logs"))?;
    let removed = Testbed::cleanup_stale(FAMILY);
    let still: Vec<String> = list_netns()?;
    for ns in [&live, &stale] {
        // The stale one is normally gone already; only make sure nothing is left behind.
        if still.contains(ns) {
            let _ = std::process::Command::new("ip")
                .args(["netns", "delete", ns])
                .status();
        }
    }
    let removed = removed?;
    // (A concurrent run of this test may have removed it first: only require that it is gone.)
    assert!(
        !removed.contains(&live),
        "removed a live run's namespace: {removed:?}"
    );
    assert!(still.contains(&live));
    assert!(!still.contains(&stale));
    assert!(!stale_dir.exists(), "stale work directory kept");
    Ok(())
}

#[test]
fn openssl_mtls_one_way_and_rejection() -> Result<()> {
    let mut tb = Testbed::new(FAMILY)?;
    let (server, client) = two_pods(&mut tb)?;
    let pki = Pki::new(tb.workdir().join("pki"))?;
    let server_cert = pki.issue(
        "server",
        &[
            San::spiffe("shop", "server"),
            San::Dns("server.shop".into()),
            San::Ip(server.ipv4.into()),
        ],
    )?;
    let client_cert = pki.issue("client", &[San::spiffe("shop", "client")])?;

    // STRICT-like server: mTLS with Istio ALPN, TLS 1.3, over IPv6.
    let _strict = openssl_server(
        &tb,
        &server.netns,
        &TlsServer::new(8443, &server_cert, pki.ca_cert())
            .require_client_cert()
            .alpn("istio-peer-exchange,istio"),
    )?;
    let s = openssl_client(
        &tb,
        &client.netns,
        &TlsClient::new(server.v6(8443), pki.ca_cert())
            .cert(&client_cert)
            .alpn("istio-peer-exchange,istio")
            .servername("outbound_.8443_._.server.shop.svc.cluster.local"),
    )?;
    assert_eq!(s.protocol, "TLSv1.3");
    assert_eq!(s.alpn.as_deref(), Some("istio-peer-exchange"));
    assert_eq!(s.server_saw_client_cert, Some(true));
    // The same server keeps serving: several sequential connections over IPv4.
    openssl_client_repeat(
        &tb,
        &client.netns,
        &TlsClient::new(server.v4(8443), pki.ca_cert()).cert(&client_cert),
        3,
    )?;
    // A ~2 KB ClientHello with the Istio ALPN past the first kilobyte still works.
    let big = openssl_client(
        &tb,
        &client.netns,
        &TlsClient::new(server.v4(8443), pki.ca_cert())
            .cert(&client_cert)
            .alpn(&padded_alpn(1600, "istio-peer-exchange,istio")),
    )?;
    assert_eq!(big.alpn.as_deref(), Some("istio-peer-exchange"));
    // Resumption: the second connection reuses the first one's ticket.
    let ticket = tb.workdir().join("client.session");
    let first = openssl_client(
        &tb,
        &client.netns,
        &TlsClient::new(server.v4(8443), pki.ca_cert())
            .cert(&client_cert)
            .session_out(&ticket),
    )?;
    assert!(!first.reused);
    let resumed = openssl_client(
        &tb,
        &client.netns,
        &TlsClient::new(server.v4(8443), pki.ca_cert())
            .cert(&client_cert)
            .session_in(&ticket),
    )?;
    assert!(resumed.reused, "not resumed: {resumed:?}");
    // Without a client certificate the strict server rejects the client.
    let err = openssl_client(
        &tb,
        &client.netns,
        &TlsClient::new(server.v4(8443), pki.ca_cert()),
    )
    .expect_err("client without certificate must be rejected");
    assert!(format!("{err:#}").contains("failed"), "{err:#}");

    // PERMISSIVE-like server on TLS 1.2: asks for a certificate, accepts one-way clients.
    let _permissive = openssl_server(
        &tb,
        &server.netns,
        &TlsServer::new(9443, &server_cert, pki.ca_cert())
            .request_client_cert()
            .tls_version(TlsVersion::Tls12)
            .ipv6(false),
    )?;
    let one_way = openssl_client(
        &tb,
        &client.netns,
        &TlsClient::new(server.v4(9443), pki.ca_cert()).servername("server.shop"),
    )?;
    assert_eq!(one_way.protocol, "TLSv1.2");
    assert_eq!(one_way.server_saw_client_cert, Some(false));
    let mtls = openssl_client(
        &tb,
        &client.netns,
        &TlsClient::new(server.v4(9443), pki.ca_cert())
            .cert(&client_cert)
            .tls_version(TlsVersion::Tls12),
    )?;
    assert_eq!(mtls.protocol, "TLSv1.2");
    assert_eq!(mtls.server_saw_client_cert, Some(true));
    Ok(())
}

#[test]
fn nginx_curl_and_raw_tcp() -> Result<()> {
    let mut tb = Testbed::new(FAMILY)?;
    let (server, client) = two_pods(&mut tb)?;
    let pki = Pki::new(tb.workdir().join("pki"))?;
    let server_cert = pki.issue(
        "server",
        &[
            San::Ip(server.ipv4.into()),
            San::Ip(server.ipv6.unwrap().into()),
        ],
    )?;
    let client_cert = pki.issue("client", &[San::spiffe("shop", "client")])?;
    let ca = pki.ca_cert().to_str().unwrap().to_string();

    let _nginx = nginx_server(
        &tb,
        &server.netns,
        &NginxServer {
            port: 8443,
            ipv6: true,
            tls: Some(NginxTls {
                cert: server_cert.clone(),
                ca: pki.ca_cert().to_path_buf(),
                verify_client: VerifyClient::On,
                tls_version: TlsVersion::Any,
            }),
        },
    )?;
    let body = curl(
        &tb,
        &client.netns,
        &[
            "--cacert",
            &ca,
            "--cert",
            client_cert.cert.to_str().unwrap(),
            "--key",
            client_cert.key.to_str().unwrap(),
            &https_url(server.v6(8443)),
        ],
    )?;
    assert_eq!(body.trim(), "ok SUCCESS");
    // No certificate: nginx answers 400, which curl --fail turns into an error.
    assert!(
        curl(
            &tb,
            &client.netns,
            &["--cacert", &ca, &https_url(server.v4(8443))]
        )
        .is_err()
    );
    // openssl client against nginx too (HTTP/1.1 ALPN: s_client speaks HTTP/1.0 text).
    let s = openssl_client(
        &tb,
        &client.netns,
        &TlsClient::new(server.v4(8443), pki.ca_cert())
            .cert(&client_cert)
            .alpn("http/1.1"),
    )?;
    assert_eq!(s.alpn.as_deref(), Some("http/1.1"));
    assert!(s.response.contains("ok SUCCESS"), "{}", s.response);

    let _plain = nginx_server(
        &tb,
        &server.netns,
        &NginxServer {
            port: 8081,
            ipv6: false,
            tls: None,
        },
    )?;
    assert_eq!(
        http_get(&tb, &client.netns, &http_url(server.v4(8081)))?.trim(),
        "ok"
    );

    let _redis = tcp_reply_server(&tb, &server.netns, 6379, true, b"+PONG\r\n")?;
    let reply = tcp_exchange(&tb, &client.netns, server.v6(6379), b"*1\r\n$4\r\nPING\r\n")?;
    assert_eq!(reply, b"+PONG\r\n");
    let reply = tcp_exchange(&tb, &client.netns, server.v4(6379), b"*1\r\n$4\r\nPING\r\n")?;
    assert_eq!(reply, b"+PONG\r\n");
    Ok(())
}

#[test]
fn segmented_pod_with_small_mtu() -> Result<()> {
    let mut tb = Testbed::new(FAMILY)?;
    let server = tb.add_pod(PodSpec::new("server", "198.18.0.10".parse()?))?;
    let client = tb.add_pod(
        PodSpec::new("client-with-a-long-name", "198.18.0.21".parse()?)
            .ipv6("2001:db8::21".parse()?)
            .mtu(1280)
            .disable_offloads(),
    )?;
    assert!(
        client.host_if.len() <= 15 && client.host_if.starts_with("vp"),
        "{}",
        client.host_if
    );
    let mtu = tb.run(&client.netns, &["cat", "/sys/class/net/eth0/mtu"])?;
    assert_eq!(String::from_utf8_lossy(&mtu.stdout).trim(), "1280");
    let k = tb.run(&client.netns, &["ethtool", "-k", "eth0"])?;
    let k = String::from_utf8_lossy(&k.stdout);
    assert!(k.contains("tcp-segmentation-offload: off"), "{k}");
    assert!(k.contains("generic-segmentation-offload: off"), "{k}");

    // A large request crosses the host-side veth as MTU-sized segments, not one GSO skb:
    // 20,000 bytes at MSS 1228 are at least 17 packets (veth counters count skbs).
    let _srv = tcp_reply_server(&tb, &server.netns, 5432, false, b"ok")?;
    let rx_path = format!("/sys/class/net/{}/statistics/rx_packets", client.host_if);
    let rx = |tb: &Testbed| -> Result<u64> {
        let out = tb.run(tb.node_netns(), &["cat", &rx_path])?;
        Ok(String::from_utf8_lossy(&out.stdout).trim().parse()?)
    };
    let before = rx(&tb)?;
    let big = vec![b'x'; 20_000];
    assert_eq!(
        tcp_exchange(&tb, &client.netns, server.v4(5432), &big)?,
        b"ok"
    );
    let packets = rx(&tb)? - before;
    assert!(
        packets >= 17,
        "only {packets} packets from the segmented pod"
    );

    // Process helpers: timeouts are enforced and reported.
    let err = tb
        .run_timeout(&client.netns, &["sleep", "5"], Duration::from_millis(200))
        .expect_err("must time out");
    assert!(format!("{err:#}").contains("did not finish"), "{err:#}");
    let err = tb
        .run(&client.netns, &["sh", "-c", "echo nope >&2; exit 3"])
        .expect_err("exit 3");
    assert!(format!("{err:#}").contains("nope"), "{err:#}");
    // Namespaces of other beds are refused.
    assert!(tb.run("not-ours", &["true"]).is_err());
    Ok(())
}
