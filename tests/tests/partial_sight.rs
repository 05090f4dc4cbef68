//! Issue 19, item 3 (say when sight is partial): with a Cilium-like `bpf_redirect_peer`
//! redirector on the host-side veths, a hook on the client pod's veth sees only what the client
//! sends and one on the server pod's veth only what the server sends. Across two "nodes" (one
//! agent on each pod's veth, as in cluster.rs), every connection is then seen in one direction
//! by each node: each node counts its side as `unknown` with evidence `one_direction` (never
//! guessed into a class), the one-direction counter counts it once per side, the flow-table
//! entries are still freed (one FIN ends a one-way entry), and `report` warns in the table and
//! in JSON, from one agent and from a real Prometheus scraping both nodes. An agent on both
//! veths (one node hosting both pods) sees both directions through the redirector and classifies the same traffic as usual, with no warning. Needs root; fails,
//! never skips.
use std::time::{Duration, Instant};

use anyhow::{Result, ensure};
use mtls_agent_testbed::{rtnl::Redirect, *};
use serde_json::Value;

mod faults_util;
use faults_util::*;

/// Flags of every agent here besides `--listen`. The default `--attach-side auto` puts the hooks
/// on the pods' ends, which see both directions behind the redirector (cluster.rs proves it);
/// these tests pin the host side, which sees one direction only there: partial sight on demand.
const SIGHT_ARGS: &[&str] = &["--flow-gc-interval", "1s", "--attach-side", "host"];

/// One agent watching `ifs` (a "node" hosting those pods), answering on `listen`.
fn node_agent(
    tb: &Testbed,
    bin: &std::path::Path,
    inv: &std::path::Path,
    ifs: &[&str],
    listen: &str,
) -> Result<Agent> {
    let mut extra = vec!["--listen", listen];
    extra.extend_from_slice(SIGHT_ARGS);
    Agent::start(tb, bin, inv, ifs, &extra, ifs.len())
}

/// Connections of each kind the test makes.
const N: usize = 2;

fn one_direction(m: &str, ns: &str, wl: &str, dir: &str) -> f64 {
    metric_value(
        m,
        "mtls_agent_one_direction_connections_total",
        &[("namespace", ns), ("workload", wl), ("direction", dir)],
    )
    .unwrap_or(0.0)
}

fn evidence(m: &str, sec: &str, ev: &str) -> f64 {
    metric_value(
        m,
        "mtls_agent_verdict_evidence_total",
        &[("security", sec), ("evidence", ev)],
    )
    .unwrap_or(0.0)
}

/// Waits until the agent's kernel flow table is empty: no one-way entry waits for a FIN that
/// never passes this node.
fn flow_table_drains(tb: &Testbed, agent: &Agent) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let m = agent.metrics(tb)?;
        if metric_value(&m, "mtls_agent_flow_table_entries", &[]) == Some(0.0) {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "flow-table entries left behind:\n{m}"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

#[test]
fn connections_seen_in_one_direction_are_unknown_counted_and_warned() -> Result<()> {
    ensure_root()?;
    let bin = agent_bin()?;
    let (tb, server, client, inv, _redir) = redirected_bed("mtpartial", Redirect::Peer, Hook::Tcx)?;
    let pki = Pki::new(tb.workdir().join("pki"))?;
    let web = pki.issue("web", &[San::Dns("web.shop".into())])?;
    let batch = pki.issue("batch", &[San::Dns("batch.legacy".into())])?;
    let _http = http_server(&tb, &server.netns, 8080, false)?;
    let _tls = openssl_server(
        &tb,
        &server.netns,
        &TlsServer::new(8443, &web, pki.ca_cert()),
    )?;
    let _mtls = openssl_server(
        &tb,
        &server.netns,
        &TlsServer::new(9443, &web, pki.ca_cert()).require_client_cert(),
    )?;
    // The client's node, the server's node, and one node hosting both pods.
    let client_node = node_agent(&tb, &bin, &inv, &[&client.host_if], "127.0.0.1:9481")?;
    let server_node = node_agent(&tb, &bin, &inv, &[&server.host_if], "127.0.0.1:9482")?;
    let both = node_agent(
        &tb,
        &bin,
        &inv,
        &[&client.host_if, &server.host_if],
        "127.0.0.1:9483",
    )?;
    for _ in 0..N {
        http_get(&tb, &client.netns, &http_url(server.v4(8080)))?;
        openssl_client(
            &tb,
            &client.netns,
            &TlsClient::new(server.v4(8443), pki.ca_cert()),
        )?;
        let s = openssl_client(
            &tb,
            &client.netns,
            &TlsClient::new(server.v4(9443), pki.ca_cert()).cert(&batch),
        )?;
        ensure!(
            s.server_saw_client_cert != Some(false),
            "the mTLS server saw no client certificate: {s:?}"
        );
    }
    let a = client_node.settle(&tb, Duration::from_secs(30))?;
    let b = server_node.settle(&tb, Duration::from_secs(30))?;
    let all = both.settle(&tb, Duration::from_secs(30))?;
    let n = (3 * N) as f64;

    // Each node counts its own side, as unknown, and says why.
    for sec in ["mtls", "tls", "plaintext"] {
        assert_eq!(conns(&a, "legacy", "batch", "outbound", sec), 0.0, "{a}");
        assert_eq!(conns(&b, "shop", "web", "inbound", sec), 0.0, "{b}");
    }
    assert_eq!(
        conns(&a, "legacy", "batch", "outbound", "unknown"),
        n,
        "{a}"
    );
    assert_eq!(conns(&b, "shop", "web", "inbound", "unknown"), n, "{b}");
    assert_eq!(conns(&a, "shop", "web", "inbound", "unknown"), 0.0, "{a}");
    assert_eq!(
        conns(&b, "legacy", "batch", "outbound", "unknown"),
        0.0,
        "{b}"
    );
    assert_eq!(one_direction(&a, "legacy", "batch", "outbound"), n, "{a}");
    assert_eq!(one_direction(&b, "shop", "web", "inbound"), n, "{b}");
    assert_eq!(one_direction(&a, "shop", "web", "inbound"), 0.0, "{a}");
    assert_eq!(one_direction(&b, "legacy", "batch", "outbound"), 0.0, "{b}");
    // Per connection: once in the cluster, by the server's node.
    assert_eq!(evidence(&b, "unknown", "one_direction"), n, "{b}");
    assert_eq!(evidence(&a, "unknown", "one_direction"), 0.0, "{a}");

    // One node with both veths sees both directions through the redirector: no partial sight.
    for (sec, want) in [("plaintext", N), ("tls", N), ("mtls", N), ("unknown", 0)] {
        assert_eq!(
            conns(&all, "shop", "web", "inbound", sec),
            want as f64,
            "{sec}\n{all}"
        );
    }
    assert_eq!(evidence(&all, "unknown", "one_direction"), 0.0, "{all}");
    assert_eq!(one_direction(&all, "shop", "web", "inbound"), 0.0, "{all}");

    // One-way entries end on the FIN this node sees: nothing is left in the kernel.
    flow_table_drains(&tb, &client_node)?;
    flow_table_drains(&tb, &server_node)?;

    // `report` on the server's node: not ready (unknown blocks), and it says why.
    let j: Value = server_node.report_json(&tb, "shop", None)?;
    assert_eq!(j["verdict"], "not_ready", "{j:#}");
    assert_eq!(j["inbound"]["unknown"], 3 * N, "{j:#}");
    assert_eq!(j["one_direction"], 3 * N, "{j:#}");
    assert_eq!(j["workloads"][0]["one_direction"], 3 * N, "{j:#}");
    let warning = j["warnings"][0].as_str().unwrap_or_default();
    assert!(
        warning.starts_with("partial sight: 6 of 6 inbound connections (to web)"),
        "{j:#}"
    );
    assert!(
        j["blockers"]
            .as_array()
            .is_some_and(|b| !b.is_empty() && b.iter().all(|b| b["evidence"] == "one_direction")),
        "{j:#}"
    );
    let (status, table, err) = server_node.report(&tb, &["--namespace", "shop"])?;
    assert!(status.success(), "{err}");
    assert!(
        table.contains("warning: partial sight: 6 of 6 inbound connections"),
        "{table}"
    );
    assert!(table.contains("one_direction"), "{table}");
    // The cluster through Prometheus (scraping the two one-direction nodes): the same count and
    // the same warning, in JSON and in the table.
    let prom = Prometheus::start(
        &tb,
        &[&client_node, &server_node].map(|a| a.url().trim_start_matches("http://").to_owned()),
        None,
    )?;
    wait_for(&tb, "both nodes scraped", Duration::from_secs(30), || {
        Ok(prom
            .scalar(&tb, "sum(mtls_agent_one_direction_connections_total)")?
            .and_then(|v| v.parse::<f64>().ok())
            == Some(2.0 * n))
    })?;
    let via_prom = ["--namespace", "shop", "--prometheus", &prom.url()];
    let (status, out, err) =
        both.report_with(&tb, &[&via_prom[..], &["--output", "json"]].concat())?;
    assert!(status.success(), "{err}");
    let j: Value = serde_json::from_str(&out)?;
    assert_eq!(j["verdict"], "not_ready", "{j:#}");
    assert_eq!(j["one_direction"], 3 * N, "{j:#}");
    assert!(
        j["warnings"][0]
            .as_str()
            .is_some_and(|w| w.starts_with("partial sight: 6 of 6 inbound connections (to web)")),
        "{j:#}"
    );
    let (_, table, err) = both.report_with(&tb, &via_prom)?;
    assert!(table.contains("warning: partial sight"), "{table}{err}");
    drop(prom);

    // The node that sees both directions has nothing to warn about.
    let j = both.report_json(&tb, "shop", None)?;
    assert_eq!(j["one_direction"], 0, "{j:#}");
    assert!(j.get("warnings").is_none(), "{j:#}");
    let (_, table, _) = both.report(&tb, &["--namespace", "shop"])?;
    assert!(!table.contains("partial sight"), "{table}");

    for agent in [client_node, server_node, both] {
        assert!(agent.stop()?.success());
    }
    tb.destroy()
}
