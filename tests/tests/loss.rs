//! Verdicts survive packet loss (issue 18). Random drops inside both pods, before the agent's
//! hook (what a pod sends is lost on its way out: the agent sees gaps and reordering) and after
//! it (what reaches a pod is lost there: the agent sees the retransmitted copies too), with the
//! client at MTU 1280 and no offloads sending a ~2.9 KB ClientHello with the Istio ALPN last, so
//! the ClientHello spans three segments. Every connection whose handshake completed at the
//! client must be counted with its true class, live (`/api/v1/connections`) and by
//! `classify --pcap` on a capture of the same veths. Needs root; fails, never skips.
use std::{
    collections::BTreeMap,
    sync::Mutex,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, ensure};
use mtls_agent_testbed::*;
use serde_json::Value;

const ISTIO_ALPN: &str = "istio-peer-exchange,istio";
/// Connections per class.
const PER_CLASS: usize = 50;
/// Clients at a time (a multiple of 3: each worker makes connections of one class).
const WORKERS: usize = 15;
/// Drop probability at each of the four places (client out, client in, server out, server in).
const LOSS: &str = "0.1";
/// `openssl s_server` serves one connection at a time: five of each TLS class, one per client
/// worker of that class, so the retransmission waits of one connection do not hold up others.
const MTLS_PORTS: [u16; 5] = [8443, 8444, 8445, 8446, 8447];
const TLS_PORTS: [u16; 5] = [9443, 9444, 9445, 9446, 9447];
const HTTP_PORT: u16 = 8080;

/// The class every connection to `port` has.
fn class_of(port: u16) -> &'static str {
    if MTLS_PORTS.contains(&port) {
        "mtls"
    } else if TLS_PORTS.contains(&port) {
        "tls"
    } else {
        "plaintext"
    }
}

/// Drops TCP at random in `ns`, on the way out (before the veth's hook) and in (after it).
fn add_loss(tb: &Testbed, ns: &str) -> Result<()> {
    for chain in ["OUTPUT", "INPUT"] {
        let args = [
            "iptables",
            "-A",
            chain,
            "-p",
            "tcp",
            "-m",
            "statistic",
            "--mode",
            "random",
            "--probability",
            LOSS,
            "-j",
            "DROP",
        ];
        let out = tb.run(ns, &args)?;
        ensure!(
            out.status.success(),
            "iptables in {ns} (is iptables installed? `cargo xtask setup`): {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

#[derive(Debug, Default)]
struct Made {
    /// Connections whose handshake (and request) completed at the client, per true class.
    completed: BTreeMap<&'static str, usize>,
    failed: BTreeMap<&'static str, usize>,
}

/// Per true class (by server port): how many records of each security class.
fn classes(records: &[Value]) -> BTreeMap<&'static str, BTreeMap<String, usize>> {
    let mut out: BTreeMap<&'static str, BTreeMap<String, usize>> = BTreeMap::new();
    for r in records {
        let port = r["server"]
            .as_str()
            .and_then(|s| s.rsplit_once(':'))
            .and_then(|(_, p)| p.parse().ok())
            .unwrap_or(0);
        let sec = r["security"].as_str().unwrap_or("?").to_owned();
        *out.entry(class_of(port))
            .or_default()
            .entry(sec)
            .or_default() += 1;
    }
    out
}

/// Every completed connection has its true class; a failed one may be that class or unknown,
/// nothing else.
fn assert_true_classes(judge: &str, made: &Made, records: &[Value]) {
    let by_class = classes(records);
    for class in ["mtls", "tls", "plaintext"] {
        let seen = by_class.get(class).cloned().unwrap_or_default();
        let right = seen.get(class).copied().unwrap_or(0);
        let unknown = seen.get("unknown").copied().unwrap_or(0);
        let completed = made.completed.get(class).copied().unwrap_or(0);
        let failed = made.failed.get(class).copied().unwrap_or(0);
        let others: usize = seen
            .iter()
            .filter(|(k, _)| *k != class && *k != "unknown")
            .map(|(_, v)| v)
            .sum();
        assert_eq!(
            others, 0,
            "{judge}: {class} connections judged otherwise: {seen:?}"
        );
        let unknowns: Vec<String> = records
            .iter()
            .filter(|r| r["security"] == "unknown")
            .map(|r| format!("{} -> {}: {}", r["client"], r["server"], r["evidence"]))
            .collect();
        assert!(
            right >= completed && right + unknown <= completed + failed,
            "{judge}: {right} {class} and {unknown} unknown for {completed} completed and {failed} failed connections: {seen:?}; unknown: {unknowns:?}"
        );
    }
}

#[test]
fn verdicts_survive_loss_retransmissions_and_reordering() -> Result<()> {
    ensure_root()?;
    let bin = agent_bin()?;
    let mut tb = Testbed::new("mtloss")?;
    let server = tb.add_pod(PodSpec::new("server", "198.18.0.10".parse()?))?;
    let client = tb.add_pod(
        PodSpec::new("client", "198.18.0.20".parse()?)
            .mtu(1280)
            .disable_offloads(),
    )?;
    let inventory = tb.workdir().join("inventory.yaml");
    write_inventory(
        &inventory,
        &[
            Workload::new("shop", "server", &[&server]),
            Workload::new("shop", "client", &[&client]),
        ],
    )?;
    let pki = Pki::new(tb.workdir().join("pki"))?;
    let server_cert = pki.issue("server", &[San::spiffe("shop", "server")])?;
    let client_cert = pki.issue("client", &[San::spiffe("shop", "client")])?;
    let mut servers = Vec::new();
    for port in MTLS_PORTS {
        servers.push(openssl_server(
            &tb,
            &server.netns,
            &TlsServer::new(port, &server_cert, pki.ca_cert())
                .require_client_cert()
                .alpn(ISTIO_ALPN)
                .tls_version(TlsVersion::Tls13),
        )?);
    }
    for port in TLS_PORTS {
        servers.push(openssl_server(
            &tb,
            &server.netns,
            &TlsServer::new(port, &server_cert, pki.ca_cert()).tls_version(TlsVersion::Tls13),
        )?);
    }
    servers.push(http_server(&tb, &server.netns, HTTP_PORT, false)?);
    for port in MTLS_PORTS.into_iter().chain(TLS_PORTS).chain([HTTP_PORT]) {
        tb.wait_tcp_listening(&server.netns, server.v4(port), Duration::from_secs(10))?;
    }
    let agent = Agent::start(&tb, &bin, &inventory, &["vp*"], &[], 2)?;
    let pcap = tb.workdir().join("loss.pcapng");
    let mut capture = tb.spawn(
        tb.node_netns(),
        &[
            "tshark",
            "-n",
            "-q",
            "-i",
            &server.host_if,
            "-i",
            &client.host_if,
            "-w",
            pcap.to_str().context("path")?,
        ],
    )?;
    let deadline = Instant::now() + Duration::from_secs(20);
    while !capture.stderr().contains("Capturing on") {
        capture.ensure_running().context("tshark exited")?;
        ensure!(Instant::now() < deadline, "tshark did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(500));
    add_loss(&tb, &client.netns)?;
    add_loss(&tb, &server.netns)?;

    // A ClientHello of ~2.9 KB: three segments at MTU 1280, the Istio ALPN past the first 2 KB.
    let alpn = padded_alpn(2600, ISTIO_ALPN);
    let other_alpn = padded_alpn(2600, "h2,http/1.1");
    let client_for = |port: u16| {
        let mut c = TlsClient::new(server.v4(port), pki.ca_cert()).tls_version(TlsVersion::Tls13);
        c = if MTLS_PORTS.contains(&port) {
            c.cert(&client_cert).alpn(&alpn)
        } else {
            c.alpn(&other_alpn)
        };
        c.timeout = Duration::from_secs(40);
        c
    };
    let made = Mutex::new(Made::default());
    let note = |class: &'static str, ok: bool| {
        let mut m = made.lock().unwrap();
        let map = if ok { &mut m.completed } else { &mut m.failed };
        *map.entry(class).or_default() += 1;
    };
    // Fifteen clients at a time, five per class; each connection waits out its own
    // retransmissions.
    std::thread::scope(|s| {
        for worker in 0..WORKERS {
            let (tb, client, note, client_for) = (&tb, &client, &note, &client_for);
            let url = http_url(server.v4(HTTP_PORT));
            s.spawn(move || {
                for i in (worker..PER_CLASS * 3).step_by(WORKERS) {
                    let k = i / 3;
                    match i % 3 {
                        0 => {
                            let c = client_for(MTLS_PORTS[k % MTLS_PORTS.len()]);
                            note("mtls", openssl_client(tb, &client.netns, &c).is_ok());
                        }
                        1 => {
                            let c = client_for(TLS_PORTS[k % TLS_PORTS.len()]);
                            note("tls", openssl_client(tb, &client.netns, &c).is_ok());
                        }
                        _ => note(
                            "plaintext",
                            curl(tb, &client.netns, &["--max-time", "30", &url]).is_ok(),
                        ),
                    }
                }
            });
        }
    });
    let made = made.into_inner().unwrap();
    eprintln!("connections made under loss: {made:?}");
    for class in ["mtls", "tls", "plaintext"] {
        ensure!(
            made.completed.get(class).copied().unwrap_or(0) >= PER_CLASS * 4 / 5,
            "too few connections completed under loss to judge anything: {made:?}"
        );
    }

    let m = agent.settle(&tb, Duration::from_secs(60))?;
    capture.stop_with_grace(Duration::from_secs(10));
    // dumpcap reports packets the capture socket dropped: then the offline judge lacks bytes.
    eprintln!("tshark: {}", capture.stderr_tail());
    let live: Value = serde_json::from_str(&agent.get(&tb, "/api/v1/connections")?)?;
    let live = live["connections"].as_array().cloned().unwrap_or_default();
    assert_true_classes("live agent", &made, &live);
    assert_eq!(
        metric_value(&m, "mtls_agent_events_lost_total", &[]),
        Some(0.0),
        "{m}"
    );

    let out = std::process::Command::new(&bin)
        .args([
            "classify",
            "--pcap",
            pcap.to_str().context("path")?,
            "--output",
            "json",
        ])
        .output()?;
    ensure!(
        out.status.success(),
        "classify --pcap: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let offline: Vec<Value> = serde_json::from_slice(&out.stdout)?;
    assert_true_classes("classify --pcap", &made, &offline);
    agent.stop()?;
    drop(servers);
    tb.destroy()
}
