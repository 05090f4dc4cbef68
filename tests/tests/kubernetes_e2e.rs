//! End-to-end in `--kubernetes` mode: the same node, pods, traffic and exact counts as
//! `e2e.rs`, but the agent learns who is who from the Kubernetes API double (`kube-double`,
//! running in the node namespace next to the agent) instead of an inventory file: workloads
//! from the pods' owner chains, sidecars from their containers/annotations, PeerAuthentication
//! modes per workload and port, and identity changes pushed while the agent runs.
//! Needs root; fails (never skips) without it.
use std::time::Duration;

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
fn namespaces_get_exact_counts_and_verdicts_in_kubernetes_mode() -> Result<()> {
    ensure_root()?;
    let bin = agent_bin()?;
    let mut tb = Testbed::new("mtk8s")?;
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
    // audit/log: a pod in the fixtures (198.18.0.50) that receives nothing.
    let _auditlog = tb.add_pod(PodSpec::new("auditlog", "198.18.0.50".parse()?))?;

    let pki = Pki::new(tb.workdir().join("pki"))?;
    let api_cert = pki.issue("api", &[San::spiffe("payments", "api")])?;
    let reports_cert = pki.issue("reports", &[San::spiffe("payments", "reports")])?;
    let worker_cert = pki.issue("worker", &[San::spiffe("payments", "worker")])?;
    let ledger_cert = pki.issue("ledger", &[San::spiffe("billing", "ledger")])?;
    // The API double in the node namespace: the fixtures are these pods as the API returns
    // them (pod IPs, owners, service accounts, sidecars), plus namespaces, nodes and
    // PeerAuthentications.
    let api_addr: std::net::SocketAddr = "127.0.0.1:6443".parse()?;
    let double = KubeDoubleProc::start(&tb, tb.node_netns(), api_addr, &kube_fixtures_dir())?;

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

    let agent = KubeAgent::start(
        &tb,
        &bin,
        double.kubeconfig(),
        "node-a",
        &["vp*"],
        &[],
        tb.pods().len(),
    )?;

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

    // The PeerAuthentication modes reach the report (namespace, workload, port).
    assert_eq!(payments["peer_authentication"], "STRICT", "{payments:#}");
    assert_eq!(wl(&payments, "api")["mode"], "STRICT");
    assert_eq!(
        wl(&payments, "api")["ports"],
        json!([{"port": 8443, "connections": 3, "mode": "STRICT"}]),
        "{payments:#}"
    );
    assert_eq!(
        shop["peer_authentication"], "PERMISSIVE",
        "mesh-wide: {shop:#}"
    );
    assert_eq!(wl(&shop, "web")["mode"], "PERMISSIVE");
    assert_eq!(legacy["peer_authentication"], "PERMISSIVE");

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

    // --- What only Kubernetes mode knows: pods, service accounts, SPIFFE IDs, modes. ---
    let id = agent.identity(&tb, "ip=198.18.0.10&port=8443")?;
    assert_eq!(
        id["workload"],
        json!({"namespace": "payments", "name": "api", "sidecar": true})
    );
    assert_eq!(id["pod"]["pod"], "api-6d8f7b9c4-x7k2p", "{id:#}");
    assert_eq!(id["pod"]["workload_kind"], "Deployment");
    assert_eq!(
        id["pod"]["spiffe_id"],
        "spiffe://cluster.local/ns/payments/sa/api"
    );
    assert_eq!(id["mode"]["mode"], "STRICT", "{id:#}");
    assert_eq!(id["mode"]["source"], "namespace");
    assert_eq!(id["injection"]["state"], "sidecar");
    let batch_id = agent.identity(&tb, "ip=198.18.0.30")?;
    assert_eq!(batch_id["pod"]["workload_kind"], "CronJob", "{batch_id:#}");
    assert_eq!(batch_id["workload"]["sidecar"], false);
    assert_eq!(batch_id["injection"]["state"], "disabled");
    let node_id = agent.identity(&tb, "ip=198.18.0.1")?;
    assert_eq!(
        node_id["workload"],
        Value::Null,
        "hostNetwork pods resolve to the node"
    );
    assert_eq!(node_id["node"], true);
    assert_eq!(node_id["node_name"], "node-a");
    let reports_port = agent.identity(&tb, "namespace=payments&workload=reports&port=9090")?;
    assert_eq!(reports_port["mode"]["mode"], "DISABLE", "{reports_port:#}");
    assert_eq!(reports_port["mode"]["source"], "workload_port");
    let web_mode = agent.identity(&tb, "namespace=shop&workload=web&port=8080")?;
    assert_eq!(web_mode["mode"]["mode"], "PERMISSIVE");
    assert_eq!(web_mode["injection"]["revision"], "1-24-2");
    let legacy_mode = agent.identity(&tb, "namespace=legacy&workload=batch&port=8080")?;
    assert_eq!(
        legacy_mode["mode"]["source"], "mesh",
        "UNSET inherits the mesh"
    );
    for res in ["pods", "namespaces", "nodes", "peerauthentications"] {
        let t = metric_value(
            &m,
            "mtls_agent_kubernetes_last_sync_timestamp_seconds",
            &[("resource", res)],
        )
        .unwrap_or(0.0);
        assert!(t > 1.7e9, "{res}: last sync {t}\n{m}");
    }

    // Changes pushed through the watch reach the running agent: the mesh goes STRICT, ...
    double.apply(
        &tb,
        KubeResource::PeerAuthentications,
        &json!({
            "apiVersion": "security.istio.io/v1",
            "kind": "PeerAuthentication",
            "metadata": {"name": "default", "namespace": "istio-system",
                         "creationTimestamp": "2026-11-02T08:10:00Z"},
            "spec": {"mtls": {"mode": "STRICT"}}
        }),
    )?;
    wait_for(
        &agent,
        &tb,
        "namespace=billing&workload=ledger&port=9443",
        |v| v["mode"]["mode"] == "STRICT" && v["mode"]["source"] == "mesh",
    )?;
    // ... and web's address is reused by a new pod (web's deletion not seen yet): the next
    // connection to that address counts for the new workload at once.
    let mut reuse = pod_json(
        "shop",
        "frontend-0",
        Some(("StatefulSet", "frontend")),
        &[("app", "frontend")],
        "frontend",
        "node-a",
        &["198.18.0.20", "2001:db8::20"],
        true,
    );
    reuse["metadata"]["creationTimestamp"] = json!("2026-11-24T00:00:00Z");
    double.apply(&tb, KubeResource::Pods, &reuse)?;
    wait_for(&agent, &tb, "ip=198.18.0.20", |v| {
        v["workload"]["name"] == "frontend"
    })?;
    http_get(&tb, &batch.netns, &http_url(web.v4(8080)))?;
    let m = agent.settle(&tb, Duration::from_secs(15))?;
    assert_eq!(
        conns(&m, "shop", "frontend", "inbound", "plaintext"),
        1.0,
        "{m}"
    );
    assert_eq!(conns(&m, "shop", "web", "inbound", "plaintext"), 4.0, "{m}");
    double.delete(
        &tb,
        KubeResource::Pods,
        Some("shop"),
        "web-7b9d5f6c8d-q4wz9",
    )?;
    // 410 Gone: the history is compacted, the agent relists and keeps its identities.
    double.expire_history(&tb)?;
    std::thread::sleep(Duration::from_secs(2));
    wait_for(&agent, &tb, "ip=198.18.0.20", |v| {
        v["workload"]["name"] == "frontend"
    })?;
    let reqs = double.requests(&tb)?;
    let pod_lists = reqs
        .iter()
        .filter(|q| q.starts_with("GET /api/v1/pods?") && !q.contains("watch=true"))
        .count();
    assert!(pod_lists >= 2, "relisted after 410: {reqs:#?}");

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
    for pod in tb.pods() {
        let progs = tcx_programs(&tb, TCX_QUERY, tb.node_netns(), &pod.host_if)?;
        assert_eq!(progs, (vec![], vec![]), "{} after stop", pod.host_if);
    }
    drop(double);
    tb.destroy()?;
    Ok(())
}

/// Polls `/api/v1/identity?<query>` until `cond` holds (10 s).
fn wait_for(
    agent: &KubeAgent,
    tb: &Testbed,
    query: &str,
    cond: impl Fn(&Value) -> bool,
) -> Result<()> {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let v = agent.identity(tb, query)?;
        if cond(&v) {
            return Ok(());
        }
        if std::time::Instant::now() > deadline {
            return Err(anyhow::anyhow!("identity {query} never matched: {v:#}"))
                .context(agent.proc().stderr_tail());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Usage errors of the Kubernetes flags: one line, exit code 2, before anything is attached.
#[test]
fn kubernetes_flags_exit_2_with_one_line() -> Result<()> {
    let bin = agent_bin()?;
    let dir = tempfile::tempdir()?;
    let inv = dir.path().join("inv.yaml");
    std::fs::write(
        &inv,
        "workloads:\n  - {namespace: a, name: b, addresses: [198.18.0.9]}\n",
    )?;
    let missing = dir.path().join("missing-kubeconfig");
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            vec!["run".into()],
            "exactly one of --inventory FILE and --kubernetes",
        ),
        (
            vec![
                "run".into(),
                "--kubernetes".into(),
                "--inventory".into(),
                inv.display().to_string(),
            ],
            "exactly one of --inventory FILE and --kubernetes",
        ),
        (
            vec![
                "run".into(),
                "--kubernetes".into(),
                "--kubeconfig".into(),
                missing.display().to_string(),
            ],
            "--kubeconfig",
        ),
        (
            vec![
                "run".into(),
                "--inventory".into(),
                inv.display().to_string(),
                "--kubeconfig".into(),
                "x".into(),
            ],
            "--kubernetes",
        ),
    ];
    for (args, needle) in cases {
        let out = std::process::Command::new(&bin)
            .args(&args)
            .env_remove("KUBECONFIG")
            .output()?;
        let err = String::from_utf8_lossy(&out.stderr);
        let last = err.trim().lines().last().unwrap_or_default().to_owned();
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(
            last.starts_with("mtls-agent: ") && last.contains(needle),
            "{args:?}: {err:?} should name {needle:?}"
        );
        assert!(!err.contains("panicked"), "{err}");
    }
    Ok(())
}
