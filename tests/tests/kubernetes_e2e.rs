//! End-to-end in `--kubernetes` mode: the same node, pods, traffic and exact counts as
//! `e2e.rs`, but the agent learns who is who from the Kubernetes API double (`kube-double`,
//! running in the node namespace next to the agent) instead of an inventory file: workloads
//! from the pods' owner chains, sidecars from their containers/annotations, PeerAuthentication
//! modes per workload and port, and identity changes pushed while the agent runs.
//! Needs root; fails (never skips) without it.
use std::time::Duration;

use anyhow::{Context as _, Result};
use mtls_agent_testbed::{scenario::*, *};
use serde_json::{Value, json};

const TCX_QUERY: &str = env!("CARGO_BIN_EXE_tcx-query");

#[test]
fn namespaces_get_exact_counts_and_verdicts_in_kubernetes_mode() -> Result<()> {
    ensure_root()?;
    let bin = agent_bin()?;
    let node = ReferenceNode::new("mtk8s")?;
    let tb = &node.tb;
    let (web, batch) = (&node.web, &node.batch);
    // The API double in the node namespace: the fixtures are the reference node's pods as the
    // API returns them (pod IPs, owners, service accounts, sidecars), plus namespaces, nodes and
    // PeerAuthentications.
    let api_addr: std::net::SocketAddr = "127.0.0.1:6443".parse()?;
    let double = KubeDoubleProc::start(tb, tb.node_netns(), api_addr, &kube_fixtures_dir())?;

    let agent = Agent::start_kubernetes(
        tb,
        &bin,
        double.kubeconfig(),
        "node-a",
        &["vp*"],
        &[],
        tb.pods().len(),
    )?;

    // The same connections, counts and verdicts as in inventory mode.
    node.send_traffic()?;
    let checked = node.check(&agent)?;
    // web's pod spec has a readiness probe on 8080 and says rewriteAppHTTPProbers: "false": the
    // node's request there is a kubelet probe Istio did not rewrite.
    checked.assert_shop_node_blocker(
        "kubelet probe (rewriting disabled)",
        &["rewriteAppHTTPProbers", "15020"],
    );
    assert_eq!(
        metric_value(
            &checked.metrics,
            "mtls_agent_blocking_connections_total",
            &[
                ("namespace", "shop"),
                ("workload", "web"),
                ("client_namespace", "node"),
                ("client_workload", "kubelet-probe"),
            ]
        ),
        Some(1.0),
        "{}",
        checked.metrics
    );
    let Checked {
        metrics: m,
        payments,
        shop,
    } = checked;
    let legacy = agent.report_json(tb, "legacy", None)?;

    // The PeerAuthentication modes reach the report (namespace, workload, port).
    assert_eq!(payments["peer_authentication"], "STRICT", "{payments:#}");
    assert_eq!(workload_of(&payments, "api")["mode"], "STRICT");
    assert_eq!(
        workload_of(&payments, "api")["ports"],
        json!([{"port": 8443, "connections": 3, "mode": "STRICT"}]),
        "{payments:#}"
    );
    assert_eq!(
        shop["peer_authentication"], "PERMISSIVE",
        "mesh-wide: {shop:#}"
    );
    assert_eq!(workload_of(&shop, "web")["mode"], "PERMISSIVE");
    assert_eq!(legacy["peer_authentication"], "PERMISSIVE");

    // The table for people, and the exit codes of report.
    let (status, table, _) = agent.report(tb, &["--namespace", "shop"])?;
    assert!(status.success());
    assert!(
        table.contains("NOT READY")
            && table.contains("legacy/batch")
            && table.contains("node: kubelet probe (rewriting disabled)"),
        "{table}"
    );
    let (status, _, err) = agent.report(tb, &["--namespace", "nope"])?;
    assert_eq!(status.code(), Some(2), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("nope"), "{err}");

    // --- What only Kubernetes mode knows: pods, service accounts, SPIFFE IDs, modes. ---
    let id = agent.identity(tb, "ip=198.18.0.10&port=8443")?;
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
    let batch_id = agent.identity(tb, "ip=198.18.0.30")?;
    assert_eq!(batch_id["pod"]["workload_kind"], "CronJob", "{batch_id:#}");
    assert_eq!(batch_id["workload"]["sidecar"], false);
    assert_eq!(batch_id["injection"]["state"], "disabled");
    let node_id = agent.identity(tb, "ip=198.18.0.1")?;
    assert_eq!(
        node_id["workload"],
        Value::Null,
        "hostNetwork pods resolve to the node"
    );
    assert_eq!(node_id["node"], true);
    assert_eq!(node_id["node_name"], "node-a");
    // What decides the exemptions, per pod and port.
    let ledger_9000 = agent.identity(tb, "ip=198.18.0.40&port=9000")?;
    assert_eq!(
        ledger_9000["inbound"],
        json!({"excluded": true, "ambient": false, "unrewritten_probe": false}),
        "{ledger_9000:#}"
    );
    let log_8080 = agent.identity(tb, "ip=198.18.0.50&port=8080")?;
    assert_eq!(log_8080["inbound"]["ambient"], true, "{log_8080:#}");
    let web_8080 = agent.identity(tb, "ip=198.18.0.20&port=8080")?;
    assert_eq!(
        web_8080["inbound"]["unrewritten_probe"], true,
        "{web_8080:#}"
    );
    let reports_port = agent.identity(tb, "namespace=payments&workload=reports&port=9090")?;
    assert_eq!(reports_port["mode"]["mode"], "DISABLE", "{reports_port:#}");
    assert_eq!(reports_port["mode"]["source"], "workload_port");
    let web_mode = agent.identity(tb, "namespace=shop&workload=web&port=8080")?;
    assert_eq!(web_mode["mode"]["mode"], "PERMISSIVE");
    assert_eq!(web_mode["injection"]["revision"], "1-24-2");
    let legacy_mode = agent.identity(tb, "namespace=legacy&workload=batch&port=8080")?;
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
        tb,
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
        tb,
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
    double.apply(tb, KubeResource::Pods, &reuse)?;
    wait_for(&agent, tb, "ip=198.18.0.20", |v| {
        v["workload"]["name"] == "frontend"
    })?;
    http_get(tb, &batch.netns, &http_url(web.v4(8080)))?;
    let m = agent.settle(tb, Duration::from_secs(15))?;
    assert_eq!(
        conns(&m, "shop", "frontend", "inbound", "plaintext"),
        1.0,
        "{m}"
    );
    assert_eq!(conns(&m, "shop", "web", "inbound", "plaintext"), 4.0, "{m}");
    double.delete(tb, KubeResource::Pods, Some("shop"), "web-7b9d5f6c8d-q4wz9")?;
    // 410 Gone: the history is compacted, the agent relists and keeps its identities.
    double.expire_history(tb)?;
    std::thread::sleep(Duration::from_secs(2));
    wait_for(&agent, tb, "ip=198.18.0.20", |v| {
        v["workload"]["name"] == "frontend"
    })?;
    let reqs = double.requests(tb)?;
    let pod_lists = reqs
        .iter()
        .filter(|q| q.starts_with("GET /api/v1/pods?") && !q.contains("watch=true"))
        .count();
    assert!(pod_lists >= 2, "relisted after 410: {reqs:#?}");

    // Attached while running, nothing left after stop (as the kernel reports it).
    assert_attached_then_detached(tb, TCX_QUERY, agent)?;
    drop(double);
    node.destroy()?;
    Ok(())
}

/// Polls `/api/v1/identity?<query>` until `cond` holds (10 s).
fn wait_for(agent: &Agent, tb: &Testbed, query: &str, cond: impl Fn(&Value) -> bool) -> Result<()> {
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
