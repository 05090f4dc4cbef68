//! End-to-end: the real agent binary, the real kernel (TC programs on veths in namespaces this
//! test creates), real OpenSSL/curl/python traffic; exact counts in /metrics and the report.
//! Needs root; fails (never skips) without it.
use std::{path::PathBuf, time::Duration};

use anyhow::{Context as _, Result};
use mtls_agent_testbed::*;
use serde_json::{Value, json};

const ISTIO_ALPN: &str = "istio-peer-exchange,istio";
const TCX_QUERY: &str = env!("CARGO_BIN_EXE_tcx-query");

fn conns(m: &str, ns: &str, wl: &str, dir: &str, sec: &str) -> f64 {
    metric_value(
        m,
        "mtls_agent_connections_total",
        &[
            ("namespace", ns),
            ("workload", wl),
            ("direction", dir),
            ("security", sec),
        ],
    )
    .unwrap_or(0.0)
}

fn inbound(r: &Value) -> Value {
    r["inbound"].clone()
}

#[test]
fn namespaces_get_exact_counts_and_verdicts() -> Result<()> {
    ensure_root()?;
    let bin = agent_bin()?;
    let mut tb = Testbed::new("mte2e")?;
    let api =
        tb.add_pod(PodSpec::new("api", "198.18.0.10".parse()?).ipv6("2001:db8::10".parse()?))?;
    let reports = tb.add_pod(PodSpec::new("reports", "198.18.0.12".parse()?))?;
    let worker =
        tb.add_pod(PodSpec::new("worker", "198.18.0.11".parse()?).ipv6("2001:db8::11".parse()?))?;
    let web =
        tb.add_pod(PodSpec::new("web", "198.18.0.20".parse()?).ipv6("2001:db8::20".parse()?))?;
    let batch =
        tb.add_pod(PodSpec::new("batch", "198.18.0.30".parse()?).ipv6("2001:db8::30".parse()?))?;
    let ledger = tb.add_pod(PodSpec::new("ledger", "198.18.0.40".parse()?))?;
    let auditlog = tb.add_pod(PodSpec::new("auditlog", "198.18.0.50".parse()?))?;

    let pki = Pki::new(tb.workdir().join("pki"))?;
    let api_cert = pki.issue("api", &[San::spiffe("payments", "api")])?;
    let reports_cert = pki.issue("reports", &[San::spiffe("payments", "reports")])?;
    let worker_cert = pki.issue("worker", &[San::spiffe("payments", "worker")])?;
    let ledger_cert = pki.issue("ledger", &[San::spiffe("billing", "ledger")])?;
    let inventory = tb.workdir().join("inventory.yaml");
    write_inventory(
        &inventory,
        &[
            Workload::new("payments", "api", &[&api]),
            Workload::new("payments", "reports", &[&reports]),
            Workload::new("payments", "worker", &[&worker]),
            Workload::new("shop", "web", &[&web]),
            Workload::new("legacy", "batch", &[&batch]).without_sidecar(),
            Workload::new("billing", "ledger", &[&ledger]),
            Workload::new("audit", "log", &[&auditlog]),
        ],
    )?;

    let _s1 = openssl_server(
        &tb,
        &api.netns,
        &TlsServer::new(8443, &api_cert, pki.ca_cert())
            .require_client_cert()
            .alpn(ISTIO_ALPN)
            .tls_version(TlsVersion::Tls13),
    )?;
    let _s2 = openssl_server(
        &tb,
        &reports.netns,
        &TlsServer::new(8444, &reports_cert, pki.ca_cert())
            .require_client_cert()
            .alpn(ISTIO_ALPN)
            .tls_version(TlsVersion::Tls12),
    )?;
    let _s3 = http_server(&tb, &api.netns, 15021, false)?;
    let _s4 = http_server(&tb, &web.netns, 8080, true)?;
    let _s5 = openssl_server(
        &tb,
        &ledger.netns,
        &TlsServer::new(9443, &ledger_cert, pki.ca_cert()).tls_version(TlsVersion::Tls13),
    )?;
    for (ns, addr) in [
        (&api.netns, api.v4(8443)),
        (&reports.netns, reports.v4(8444)),
        (&api.netns, api.v4(15021)),
        (&web.netns, web.v4(8080)),
        (&ledger.netns, ledger.v4(9443)),
    ] {
        tb.wait_tcp_listening(ns, addr, Duration::from_secs(10))?;
    }

    let agent = Agent::start(&tb, &bin, &inventory, &["vp*"], &[], tb.pods().len())?;

    // payments: 3 × TLS 1.3 mTLS with Istio ALPN (2 over IPv4, 1 over IPv6), 2 × TLS 1.2 mTLS.
    let mtls13 = |addr| {
        TlsClient::new(addr, pki.ca_cert())
            .cert(&worker_cert)
            .alpn(ISTIO_ALPN)
            .tls_version(TlsVersion::Tls13)
    };
    for addr in [api.v4(8443), api.v4(8443), api.v6(8443)] {
        let s = openssl_client(&tb, &worker.netns, &mtls13(addr))?;
        assert_eq!(s.server_saw_client_cert, Some(true));
    }
    let mtls12 = TlsClient::new(reports.v4(8444), pki.ca_cert())
        .cert(&worker_cert)
        .alpn(ISTIO_ALPN)
        .tls_version(TlsVersion::Tls12);
    for _ in 0..2 {
        let s = openssl_client(&tb, &worker.netns, &mtls12)?;
        assert!(s.protocol.contains("1.2"), "{}", s.protocol);
    }
    // Exempt: the node probing api's health port (twice) and web's app port (once).
    for _ in 0..2 {
        http_get(&tb, tb.node_netns(), &http_url(api.v4(15021)))?;
    }
    http_get(&tb, tb.node_netns(), &http_url(web.v4(8080)))?;
    // shop: plaintext HTTP from legacy/batch (no sidecar), 2 × IPv4 + 1 × IPv6.
    for addr in [web.v4(8080), web.v4(8080), web.v6(8080)] {
        http_get(&tb, &batch.netns, &http_url(addr))?;
    }
    // billing: one-way TLS 1.3 from shop/web.
    for _ in 0..2 {
        openssl_client(
            &tb,
            &web.netns,
            &TlsClient::new(ledger.v4(9443), pki.ca_cert()),
        )?;
    }

    let m = agent.settle(&tb, Duration::from_secs(15))?;
    let log = || agent.proc().stderr_tail();

    // Per workload and direction, every security class, exactly.
    let expect = [
        ("payments", "api", "inbound", "mtls", 3.0),
        ("payments", "api", "inbound", "plaintext", 2.0), // the exempt probes
        ("payments", "reports", "inbound", "mtls", 2.0),
        ("payments", "worker", "outbound", "mtls", 5.0),
        ("shop", "web", "inbound", "plaintext", 4.0), // 3 from batch + 1 probe
        ("shop", "web", "outbound", "tls", 2.0),
        ("legacy", "batch", "outbound", "plaintext", 3.0),
        ("billing", "ledger", "inbound", "tls", 2.0),
    ];
    for (ns, wl, dir, sec, want) in expect {
        assert_eq!(
            conns(&m, ns, wl, dir, sec),
            want,
            "{ns}/{wl} {dir} {sec}\n{m}\n{}",
            log()
        );
    }
    for (ns, wl, dir) in [
        ("payments", "api", "inbound"),
        ("payments", "reports", "inbound"),
        ("payments", "worker", "outbound"),
        ("shop", "web", "inbound"),
        ("legacy", "batch", "outbound"),
        ("billing", "ledger", "inbound"),
    ] {
        let total: f64 = ["mtls", "tls", "plaintext", "unknown"]
            .iter()
            .map(|s| conns(&m, ns, wl, dir, s))
            .sum();
        let listed: f64 = expect
            .iter()
            .filter(|e| e.0 == ns && e.1 == wl && e.2 == dir)
            .map(|e| e.4)
            .sum();
        assert_eq!(
            total, listed,
            "no unexpected class for {ns}/{wl} {dir}\n{m}"
        );
    }
    assert_eq!(
        metric_value(
            &m,
            "mtls_agent_namespace_strict_ready",
            &[("namespace", "payments")]
        ),
        Some(1.0)
    );
    assert_eq!(
        metric_value(
            &m,
            "mtls_agent_namespace_strict_ready",
            &[("namespace", "shop")]
        ),
        Some(0.0)
    );
    assert_eq!(
        metric_value(
            &m,
            "mtls_agent_namespace_mtls_ratio",
            &[("namespace", "payments")]
        ),
        Some(1.0)
    );
    assert_eq!(
        metric_value(
            &m,
            "mtls_agent_blocking_connections_total",
            &[
                ("namespace", "shop"),
                ("workload", "web"),
                ("port", "8080"),
                ("client_namespace", "legacy"),
                ("client_workload", "batch"),
                ("security", "plaintext")
            ]
        ),
        Some(3.0)
    );
    assert!(
        metric_value(
            &m,
            "mtls_agent_bytes_total",
            &[
                ("namespace", "payments"),
                ("workload", "api"),
                ("direction", "inbound"),
                ("security", "mtls")
            ]
        )
        .unwrap_or(0.0)
            > 3000.0
    );
    assert_eq!(
        metric_value(&m, "mtls_agent_interfaces_attached", &[]),
        Some(tb.pods().len() as f64)
    );
    assert_eq!(
        metric_value(&m, "mtls_agent_events_lost_total", &[]),
        Some(0.0)
    );
    assert_eq!(metric_value(&m, "mtls_agent_build_info", &[]), Some(1.0));

    // The report, as JSON.
    let payments = agent.report_json(&tb, "payments", None)?;
    assert_eq!(payments["verdict"], "ready", "{payments:#}");
    assert_eq!(
        inbound(&payments),
        json!({"mtls": 5, "tls": 0, "plaintext": 0, "unknown": 0, "exempt": 2})
    );
    assert_eq!(payments["mtls_ratio"], 1.0);
    assert_eq!(payments["blockers"], json!([]));
    let wl = |r: &Value, name: &str| -> Value {
        r["workloads"]
            .as_array()
            .and_then(|a| a.iter().find(|w| w["name"] == name).cloned())
            .unwrap_or(Value::Null)
    };
    assert_eq!(
        wl(&payments, "reports")["inbound"]["mtls"],
        2,
        "TLS 1.2 mTLS"
    );
    assert_eq!(wl(&payments, "worker")["verdict"], "no_data");
    assert!(payments["window_seconds"].as_u64().is_some());

    let shop = agent.report_json(&tb, "shop", None)?;
    assert_eq!(shop["verdict"], "not_ready", "{shop:#}");
    assert_eq!(
        inbound(&shop),
        json!({"mtls": 0, "tls": 0, "plaintext": 3, "unknown": 0, "exempt": 1})
    );
    assert_eq!(shop["mtls_ratio"], 0.0);
    let blockers = shop["blockers"].as_array().context("blockers")?;
    assert_eq!(blockers.len(), 1, "{shop:#}");
    let b = &blockers[0];
    assert_eq!(b["client"]["namespace"], "legacy");
    assert_eq!(b["client"]["workload"], "batch");
    assert_eq!(b["server"], json!({"workload": "web", "port": 8080}));
    assert_eq!(b["security"], "plaintext");
    assert_eq!(b["connections"], 3);
    assert!(b["last_seen"].as_str().is_some_and(|s| s.ends_with('Z')));

    let billing = agent.report_json(&tb, "billing", None)?;
    assert_eq!(billing["verdict"], "not_ready");
    assert_eq!(billing["blockers"][0]["security"], "tls");
    assert_eq!(billing["blockers"][0]["client"]["workload"], "web");
    assert_eq!(billing["blockers"][0]["connections"], 2);

    let audit = agent.report_json(&tb, "audit", None)?;
    assert_eq!(audit["verdict"], "no_data");
    assert_eq!(audit["mtls_ratio"], Value::Null);
    let legacy = agent.report_json(&tb, "legacy", None)?;
    assert_eq!(legacy["verdict"], "no_data");
    assert_eq!(wl(&legacy, "batch")["sidecar"], false);

    let one = agent.report_json(&tb, "payments", Some("api"))?;
    assert_eq!(one["verdict"], "ready");
    assert_eq!(
        inbound(&one),
        json!({"mtls": 3, "tls": 0, "plaintext": 0, "unknown": 0, "exempt": 2})
    );

    // The table for people, and the exit codes of report.
    let (status, table, _) = agent.report(&tb, &["--namespace", "shop"])?;
    assert!(status.success());
    assert!(
        table.contains("NOT READY") && table.contains("legacy/batch"),
        "{table}"
    );
    let (status, _, err) = agent.report(&tb, &["--namespace", "nope"])?;
    assert_eq!(status.code(), Some(2), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("nope"), "{err}");

    // While running, our two programs are on every pod veth (as the kernel reports it)...
    for pod in tb.pods() {
        let progs = tcx_programs(&tb, TCX_QUERY, tb.node_netns(), &pod.host_if)?;
        assert_eq!(
            progs,
            (
                vec!["mtls_ingress".to_owned()],
                vec!["mtls_egress".to_owned()]
            ),
            "{}",
            pod.host_if
        );
    }
    // ...and stopping detaches everything: no TCX link, no tc filter, no clsact qdisc left.
    let status = agent.stop()?;
    assert!(status.success(), "agent exit: {status}");
    let net = tb.run(tb.node_netns(), &["bpftool", "-j", "net", "show"])?;
    let net: Value = serde_json::from_slice(&net.stdout)?;
    let leftovers: Vec<&Value> = net
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|o| ["tc", "tcx", "xdp"].map(|k| &o[k]))
        .filter_map(Value::as_array)
        .flatten()
        .collect();
    assert!(
        leftovers.is_empty(),
        "programs left attached: {leftovers:?}"
    );
    for pod in tb.pods() {
        let q = tb.run(
            tb.node_netns(),
            &["tc", "qdisc", "show", "dev", &pod.host_if],
        )?;
        let q = String::from_utf8_lossy(&q.stdout);
        assert!(!q.contains("clsact"), "{}: {q}", pod.host_if);
    }
    tb.destroy()?;
    Ok(())
}

fn write(dir: &std::path::Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

/// Bad input is a one-line error naming what is wrong, exit code 2, before anything is attached.
#[test]
fn bad_inventory_and_flags_exit_2_with_one_line() -> Result<()> {
    let bin = agent_bin()?;
    let dir = tempfile::tempdir()?;
    let bad_addr = write(
        dir.path(),
        "bad.yaml",
        "workloads:\n  - namespace: shop\n    name: web\n    addresses: [\"198.18.0.999\"]\n",
    );
    let typo = write(
        dir.path(),
        "typo.yaml",
        "workloads:\n  - namespace: shop\n    name: web\n    adresses: [\"198.18.0.9\"]\n",
    );
    let not_yaml = write(dir.path(), "x.yaml", "workloads: [\n");
    let missing = dir.path().join("missing.yaml");
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            vec![
                "run".into(),
                "--inventory".into(),
                bad_addr.display().to_string(),
            ],
            "workloads[0].addresses[0]",
        ),
        (
            vec![
                "run".into(),
                "--inventory".into(),
                typo.display().to_string(),
            ],
            "adresses",
        ),
        (
            vec![
                "run".into(),
                "--inventory".into(),
                not_yaml.display().to_string(),
            ],
            "x.yaml",
        ),
        (
            vec![
                "run".into(),
                "--inventory".into(),
                missing.display().to_string(),
            ],
            "missing.yaml",
        ),
        (
            vec![
                "run".into(),
                "--inventory".into(),
                "i".into(),
                "--listen".into(),
                "nowhere".into(),
            ],
            "--listen",
        ),
        (
            vec![
                "run".into(),
                "--inventory".into(),
                typo.display().to_string(),
                "--interface".into(),
                "cali[".into(),
            ],
            "",
        ),
        (vec!["run".into(), "--bogus".into()], "--bogus"),
        (
            vec![
                "report".into(),
                "--namespace".into(),
                "a".into(),
                "--output".into(),
                "xml".into(),
            ],
            "xml",
        ),
        (vec!["report".into()], "--namespace"),
        (
            vec![
                "report".into(),
                "--namespace".into(),
                "a".into(),
                "--agent".into(),
                "ftp://x".into(),
            ],
            "--agent",
        ),
        (vec!["frobnicate".into()], "frobnicate"),
    ];
    for (args, needle) in cases {
        let out = std::process::Command::new(&bin).args(&args).output()?;
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert_eq!(
            err.trim().lines().count(),
            1,
            "{args:?}: one line, got {err:?}"
        );
        assert!(
            err.contains(needle),
            "{args:?}: {err:?} should name {needle:?}"
        );
        assert!(!err.contains("panicked"), "{err}");
    }
    // A glob error is reported for the glob, even with a valid inventory.
    let good = write(
        dir.path(),
        "good.yaml",
        "workloads:\n  - {namespace: a, name: b, addresses: [198.18.0.9]}\n",
    );
    let out = std::process::Command::new(&bin)
        .args([
            "run",
            "--inventory",
            good.to_str().unwrap(),
            "--interface",
            "cali[",
        ])
        .output()?;
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--interface"));
    // An unreachable agent is a runtime failure: exit 1, one line.
    let out = std::process::Command::new(&bin)
        .args([
            "report",
            "--namespace",
            "a",
            "--agent",
            "http://127.0.0.1:9",
        ])
        .output()?;
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr).trim().lines().count(),
        1
    );
    // --help has examples and exits 0.
    let out = std::process::Command::new(&bin)
        .args(["report", "--help"])
        .output()?;
    assert_eq!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stdout).contains("Examples:"));
    Ok(())
}

/// A server that reads the client's first bytes and resets the connection (SO_LINGER 0), as a
/// sidecar in STRICT does to plaintext: those connections are counted as rejected, apart from
/// plaintext that was answered.
#[test]
fn plaintext_rejected_right_after_first_bytes_is_counted_apart() -> Result<()> {
    ensure_root()?;
    let bin = agent_bin()?;
    let mut tb = Testbed::new("mtrej")?;
    let api = tb.add_pod(PodSpec::new("api", "198.18.0.10".parse()?))?;
    let batch = tb.add_pod(PodSpec::new("batch", "198.18.0.30".parse()?))?;
    let inventory = tb.workdir().join("inventory.yaml");
    write_inventory(
        &inventory,
        &[
            Workload::new("shop", "api", &[&api]),
            Workload::new("legacy", "batch", &[&batch]).without_sidecar(),
        ],
    )?;
    let reject = [
        "import socket, struct",
        "s = socket.socket()",
        "s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)",
        "s.bind(('0.0.0.0', 9090)); s.listen(16)",
        "while True:",
        "    c, _ = s.accept(); c.recv(100)",
        "    c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack('ii', 1, 0)); c.close()",
    ]
    .join("\n");
    let reject = reject.as_str();
    let _rejecting = tb.spawn(&api.netns, &["python3", "-c", reject])?;
    let _answering = http_server(&tb, &api.netns, 8080, false)?;
    tb.wait_tcp_listening(&api.netns, api.v4(9090), Duration::from_secs(10))?;
    tb.wait_tcp_listening(&api.netns, api.v4(8080), Duration::from_secs(10))?;
    let agent = Agent::start(&tb, &bin, &inventory, &["vp*"], &[], tb.pods().len())?;

    for _ in 0..3 {
        // curl fails (connection reset): that is the point.
        let out = tb.output(
            &batch.netns,
            &[
                "curl",
                "-sS",
                "--noproxy",
                "*",
                "--max-time",
                "3",
                &http_url(api.v4(9090)),
            ],
            None,
            Duration::from_secs(6),
        )?;
        assert!(!out.status.success(), "the rejecting server must reset");
    }
    http_get(&tb, &batch.netns, &http_url(api.v4(8080)))?;
    let m = agent.settle(&tb, Duration::from_secs(15))?;
    assert_eq!(conns(&m, "shop", "api", "inbound", "plaintext"), 4.0, "{m}");
    assert_eq!(
        metric_value(
            &m,
            "mtls_agent_rejected_connections_total",
            &[
                ("namespace", "shop"),
                ("workload", "api"),
                ("security", "plaintext")
            ]
        ),
        Some(3.0),
        "{m}"
    );
    let r = agent.report_json(&tb, "shop", None)?;
    assert_eq!(r["rejected"], 3, "{r:#}");
    assert_eq!(r["inbound"]["plaintext"], 4);
    let ports: Vec<(u64, u64)> = r["workloads"][0]["ports"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|p| {
            (
                p["port"].as_u64().unwrap_or(0),
                p["connections"].as_u64().unwrap_or(0),
            )
        })
        .collect();
    assert_eq!(ports, vec![(8080, 1), (9090, 3)]);
    let (_, table, _) = agent.report(&tb, &["--namespace", "shop"])?;
    assert!(table.contains("rejected: 3 inbound"), "{table}");
    agent.stop()?;
    tb.destroy()?;
    Ok(())
}

/// New pod interfaces are attached within a second (netlink), removed ones are forgotten.
#[test]
fn new_and_removed_interfaces_are_followed_within_a_second() -> Result<()> {
    ensure_root()?;
    let bin = agent_bin()?;
    let mut tb = Testbed::new("mtlink")?;
    let first = tb.add_pod(PodSpec::new("first", "198.18.0.10".parse()?))?;
    let inventory = tb.workdir().join("inventory.yaml");
    write_inventory(&inventory, &[Workload::new("shop", "first", &[&first])])?;
    let agent = Agent::start(&tb, &bin, &inventory, &["vp*"], &[], 1)?;
    let attached = |tb: &Testbed| -> Result<f64> {
        Ok(
            metric_value(&agent.metrics(tb)?, "mtls_agent_interfaces_attached", &[])
                .unwrap_or(-1.0),
        )
    };
    assert_eq!(attached(&tb)?, 1.0);
    for (i, name) in ["second", "third"].iter().enumerate() {
        let pod = tb.add_pod(PodSpec::new(name, format!("198.18.0.{}", 20 + i).parse()?))?;
        let created = std::time::Instant::now();
        loop {
            // The agent's own view, and the kernel's: our TCX programs on the new veth.
            let progs = tcx_programs(&tb, TCX_QUERY, tb.node_netns(), &pod.host_if)?;
            if attached(&tb)? == (i + 2) as f64
                && progs
                    == (
                        vec!["mtls_ingress".to_owned()],
                        vec!["mtls_egress".to_owned()],
                    )
            {
                break;
            }
            assert!(
                created.elapsed() < Duration::from_secs(1),
                "{} not attached within 1s: {progs:?}",
                pod.host_if
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    // Removing a pod's veth is noticed too.
    tb.run(tb.node_netns(), &["ip", "link", "del", "vpsecond"])?;
    let deadline = std::time::Instant::now() + Duration::from_secs(1);
    while attached(&tb)? != 2.0 {
        assert!(
            std::time::Instant::now() < deadline,
            "removal not noticed within 1s"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let status = agent.stop()?;
    assert!(status.success());
    tb.destroy()?;
    Ok(())
}
