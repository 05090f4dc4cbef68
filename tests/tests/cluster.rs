//! Counting as a cluster (issue 15): each side of a connection is counted once, by the node that
//! hosts it, so sums over agents are exact.
//!
//! The reference node's pods are split over two "nodes": one agent watches the veths of node-a's
//! pods, another those of node-b's, and a third agent watches every veth (what one node hosting
//! every pod would count). Every security class crosses nodes and also stays on one node; the
//! node probes its pods. The sum of the two node agents must equal the single agent, series by
//! series, in inventory mode and in Kubernetes mode (pods placed on the nodes through the API
//! double), and `report --prometheus` over a real Prometheus scraping the two node agents must
//! give the single agent's reports; so must `report` with only a kubeconfig, asking the two agents
//! through the API double's `pods/proxy` (issue 14), also as `kubectl-mtls`, and say which node is
//! missing when one is down. A Service call through a kube-proxy-style DNAT in the node
//! namespace is one connection on each side. Issue 19: the same holds behind a Cilium-like CNI
//! that redirects pod-to-pod packets past the host-side veths (`bpf_redirect_peer`, `bpf_redirect`,
//! through TCX or a clsact filter at priority 1), because the agents attach on the pods' ends.
//! Needs root; fails, never skips.
use std::{path::Path, time::Duration};

use anyhow::{Context as _, Result};
use mtls_agent_testbed::{
    rtnl::{Redirect, Redirector},
    scenario::*,
    *,
};
use serde_json::{Value, json};

/// Pods of node-a; the other pods of the reference node are on node-b.
const NODE_A: [&str; 5] = ["api", "worker", "web", "auditlog", "status"];
const NODE_B: [&str; 3] = ["reports", "batch", "ledger"];

/// Series whose sum over the node agents must equal the single agent's.
const SUMMED: [&str; 6] = [
    "mtls_agent_connections_total",
    "mtls_agent_inbound_connections_total",
    "mtls_agent_blocking_connections_total",
    "mtls_agent_verdict_evidence_total",
    "mtls_agent_rejected_connections_total",
    "mtls_agent_bytes_total",
];

const NAMESPACES: [&str; 6] = ["payments", "shop", "billing", "legacy", "audit", "ops"];

fn refs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

fn host_ifs(node: &ReferenceNode, names: &[&str]) -> Vec<String> {
    names
        .iter()
        .map(|n| {
            node.tb
                .pod(n)
                .expect("pod of the reference node")
                .host_if
                .clone()
        })
        .collect()
}

/// Starts one agent: (node name, empty for every node; interface globs, extra flags, interfaces
/// to wait for).
type StartAgent<'a> = &'a dyn Fn(&str, &[&str], &[&str], usize) -> Result<Agent>;

/// The three agents: node-a, node-b, and one on every veth.
struct Agents {
    a: Agent,
    b: Agent,
    all: Agent,
}

impl Agents {
    /// The agent on every veth first, then the node agents with `node_flags`. (An agent
    /// starting on clsact removes filters named like ours that it finds, taking them for a
    /// killed agent's: the node agents, which share no interface, start last.)
    fn start_with(
        node: &ReferenceNode,
        identity: StartAgent<'_>,
        node_flags: &[&str],
    ) -> Result<Agents> {
        let a_ifs = host_ifs(node, &NODE_A);
        let b_ifs = host_ifs(node, &NODE_B);
        let all = identity(
            "",
            &["vp*"],
            &["--listen", "127.0.0.1:9483"],
            node.tb.pods().len(),
        )?;
        let with = |listen: &'static str| [&["--listen", listen][..], node_flags].concat();
        let a = identity(
            "node-a",
            &refs(&a_ifs),
            &with("127.0.0.1:9481"),
            NODE_A.len(),
        )?;
        let b = identity(
            "node-b",
            &refs(&b_ifs),
            &with("127.0.0.1:9482"),
            NODE_B.len(),
        )?;
        Ok(Agents { a, b, all })
    }
}

/// Traffic beyond the reference node's, so that every class also stays on one node:
/// audit/log → shop/web plaintext (both on node-a), legacy/batch → billing/ledger one-way TLS
/// (both on node-b). Cross-node already: worker → reports (mTLS), batch → web (plaintext),
/// web → ledger (TLS).
fn same_node_traffic(node: &ReferenceNode) -> Result<()> {
    let tb = &node.tb;
    for _ in 0..2 {
        http_get(tb, &node.auditlog.netns, &http_url(node.web.v4(8080)))?;
        openssl_client(
            tb,
            &node.batch.netns,
            &TlsClient::new(node.ledger.v4(9443), node.pki.ca_cert()),
        )?;
    }
    Ok(())
}

/// Every connection the test made, beyond the reference node's own table (scenario.rs).
fn assert_same_node_traffic_counted(m: &str) {
    for (ns, wl, dir, sec, want) in [
        ("shop", "web", "inbound", "plaintext", 6.0),
        ("audit", "log", "outbound", "plaintext", 2.0),
        ("billing", "ledger", "inbound", "tls", 4.0),
        ("legacy", "batch", "outbound", "tls", 2.0),
        ("legacy", "batch", "outbound", "plaintext", 4.0),
        ("payments", "worker", "outbound", "mtls", 5.0),
    ] {
        assert_eq!(
            conns(m, ns, wl, dir, sec),
            want,
            "{ns}/{wl} {dir} {sec}\n{m}"
        );
    }
}

/// Sum of the node agents == the single agent, for every series that counts connections.
fn assert_sums(a: &str, b: &str, all: &str) {
    for name in SUMMED {
        let mut sum = samples(a, name);
        for (k, v) in samples(b, name) {
            *sum.entry(k).or_insert(0.0) += v;
        }
        sum.retain(|_, v| *v != 0.0);
        let mut want = samples(all, name);
        want.retain(|_, v| *v != 0.0);
        assert_eq!(
            sum, want,
            "{name}: node-a + node-b vs one agent on every veth"
        );
    }
    // The example: node-a (no reports pod) does not count payments/reports' inbound.
    assert_eq!(conns(a, "payments", "reports", "inbound", "mtls"), 0.0);
    assert_eq!(conns(b, "payments", "reports", "inbound", "mtls"), 2.0);
    assert_eq!(conns(a, "shop", "web", "inbound", "plaintext"), 6.0);
    assert_eq!(conns(b, "shop", "web", "inbound", "plaintext"), 0.0);
    assert_eq!(conns(a, "legacy", "batch", "outbound", "plaintext"), 0.0);
    assert_eq!(conns(b, "legacy", "batch", "outbound", "plaintext"), 4.0);
}

/// The parts of a report that a cluster-wide answer must reproduce exactly.
fn essentials(r: &Value) -> Value {
    let blockers: Vec<Value> = r["blockers"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|b| {
            json!([
                b["client"]["namespace"],
                b["client"]["workload"],
                b["client"]["kind"],
                b["client"]["description"],
                b["advice"],
                b["server"],
                b["security"],
                b["connections"]
            ])
        })
        .collect();
    let workloads: Vec<Value> = r["workloads"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|w| json!([w["name"], w["verdict"], w["inbound"], w["sidecar"]]))
        .collect();
    json!({
        "verdict": r["verdict"],
        "inbound": r["inbound"],
        "mtls_ratio": r["mtls_ratio"],
        "compliant": r["compliant"],
        "blockers": blockers,
        "workloads": workloads,
    })
}

/// Runs the reference traffic and the same-node traffic, then checks the sums.
fn run_cluster(node: &ReferenceNode, agents: &Agents) -> Result<()> {
    node.send_traffic()?;
    // The single agent first gives the reference node's exact table (scenario.rs).
    node.check(&agents.all)?;
    same_node_traffic(node)?;
    let tb = &node.tb;
    let all = agents.all.settle(tb, Duration::from_secs(15))?;
    let a = agents.a.settle(tb, Duration::from_secs(15))?;
    let b = agents.b.settle(tb, Duration::from_secs(15))?;
    assert_same_node_traffic_counted(&all);
    assert_sums(&a, &b, &all);
    Ok(())
}

#[test]
fn two_nodes_sum_to_one_agent_on_every_veth_in_inventory_mode() -> Result<()> {
    ensure_root()?;
    let bin = agent_bin()?;
    let node = ReferenceNode::new("mtclus")?;
    let inventory = node.tb.workdir().join("inventory.yaml");
    write_inventory(&inventory, &node.workloads())?;
    let agents = Agents::start_with(
        &node,
        &|_, globs, extra, n| Agent::start(&node.tb, &bin, &inventory, globs, extra, n),
        &[],
    )?;
    run_cluster(&node, &agents)?;

    // A real Prometheus scraping the two node agents answers like the single agent.
    let tb = &node.tb;
    let prom = prometheus_over_nodes(tb, &agents)?;
    for ns in NAMESPACES {
        let want = agents.all.report_json(tb, ns, None)?;
        let got = prometheus_report(tb, &agents, &prom, ns)?;
        assert_eq!(
            essentials(&got),
            essentials(&want),
            "{ns}: prometheus over two nodes vs one agent"
        );
    }
    drop(prom);
    for agent in [agents.a, agents.b, agents.all] {
        agent.stop()?;
    }
    node.destroy()
}

/// A real Prometheus scraping the two node agents, once it has scraped every connection.
fn prometheus_over_nodes(tb: &Testbed, agents: &Agents) -> Result<Prometheus> {
    let prom = Prometheus::start(
        tb,
        &[
            agents.a.url().trim_start_matches("http://").to_owned(),
            agents.b.url().trim_start_matches("http://").to_owned(),
        ],
        None,
    )?;
    let total: f64 = samples(
        &agents.all.metrics(tb)?,
        "mtls_agent_inbound_connections_total",
    )
    .values()
    .sum();
    wait_for(tb, "both agents scraped", Duration::from_secs(30), || {
        Ok(prom
            .scalar(tb, "sum(mtls_agent_inbound_connections_total)")?
            .and_then(|v| v.parse::<f64>().ok())
            == Some(total))
    })?;
    Ok(prom)
}

/// `report --namespace NS --output json --prometheus URL`.
fn prometheus_report(tb: &Testbed, agents: &Agents, prom: &Prometheus, ns: &str) -> Result<Value> {
    let (status, out, err) = agents.all.report_with(
        tb,
        &[
            "--namespace",
            ns,
            "--output",
            "json",
            "--prometheus",
            &prom.url(),
        ],
    )?;
    assert!(status.success(), "report --prometheus {ns}: {err}");
    Ok(serde_json::from_str(&out)?)
}

/// Runs ARGV in the node namespace: (exit status, stdout, stderr).
fn run_in_node(tb: &Testbed, argv: &[&str]) -> Result<(std::process::ExitStatus, String, String)> {
    let out = tb.output(tb.node_netns(), argv, None, Duration::from_secs(30))?;
    Ok((
        out.status,
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

/// The reference fixtures with the pods of node-b placed there.
fn fixtures_on_two_nodes(node: &ReferenceNode) -> Result<std::path::PathBuf> {
    let dir = node.tb.scratch_dir("kube-fixtures")?;
    let src = kube_fixtures_dir();
    let b_ips: Vec<String> = NODE_B
        .iter()
        .map(|n| node.tb.pod(n).map(|p| p.ipv4.to_string()))
        .collect::<Option<_>>()
        .context("node-b pods")?;
    for entry in std::fs::read_dir(&src)? {
        let path = entry?.path();
        let name = path.file_name().context("fixture name")?;
        let text = std::fs::read_to_string(&path)?;
        if name == "pods.json" {
            let mut pods: Value = serde_json::from_str(&text)?;
            let items = pods["items"].as_array_mut().context("pods.json items")?;
            for pod in items {
                let ip = pod["status"]["podIP"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned();
                if b_ips.contains(&ip) {
                    pod["spec"]["nodeName"] = json!("node-b");
                }
            }
            std::fs::write(dir.join(name), serde_json::to_string_pretty(&pods)?)?;
        } else {
            std::fs::write(dir.join(name), text)?;
        }
    }
    Ok(dir)
}

#[test]
fn two_nodes_sum_to_one_agent_on_every_veth_in_kubernetes_mode() -> Result<()> {
    ensure_root()?;
    let bin = agent_bin()?;
    let node = ReferenceNode::new("mtclk8")?;
    let tb = &node.tb;
    let fixtures = fixtures_on_two_nodes(&node)?;
    let api_addr: std::net::SocketAddr = "127.0.0.1:6443".parse()?;
    let double = KubeDoubleProc::start(tb, tb.node_netns(), api_addr, &fixtures)?;
    let kubeconfig: &Path = double.kubeconfig();
    let agents = Agents::start_with(
        &node,
        &|name, globs, extra, n| match name {
            "" => Agent::start_kubernetes_all_nodes(tb, &bin, kubeconfig, globs, extra, n),
            name => Agent::start_kubernetes(tb, &bin, kubeconfig, name, globs, extra, n),
        },
        &[],
    )?;
    run_cluster(&node, &agents)?;

    // Cluster mode (issue 14): with only a kubeconfig, `report` finds the two node agents through
    // the API and asks each through `pods/proxy`; the merge is the single agent's answer and
    // Prometheus's.
    for (pod, name, agent) in [
        ("mtls-agent-a", "node-a", &agents.a),
        ("mtls-agent-b", "node-b", &agents.b),
    ] {
        double.apply(
            tb,
            KubeResource::Pods,
            &agent_pod_json(pod, name, &agent.url())?,
        )?;
    }
    let kc = kubeconfig.to_str().context("kubeconfig path")?;
    let prom = prometheus_over_nodes(tb, &agents)?;
    // The same binary under the kubectl plugin's name, as `kubectl mtls` runs it.
    let plugin_dir = tb.scratch_dir("plugin")?;
    let plugin = plugin_dir.join("kubectl-mtls");
    std::os::unix::fs::symlink(&bin, &plugin)?;
    let plugin = plugin.to_str().context("plugin path")?;
    let kubeconfig_env = format!("KUBECONFIG={kc}");
    for ns in NAMESPACES {
        let want = agents.all.report_json(tb, ns, None)?;
        let (status, out, err) = agents.all.report_with(
            tb,
            &["--namespace", ns, "--output", "json", "--kubeconfig", kc],
        )?;
        assert!(status.success(), "report {ns} through the API: {err}");
        assert!(err.is_empty(), "no warning when every node answers: {err}");
        let got: Value = serde_json::from_str(&out)?;
        assert_eq!(
            essentials(&got),
            essentials(&want),
            "{ns}: two nodes through pods/proxy vs one agent on every veth"
        );
        assert_eq!(
            got["nodes"],
            json!({"asked": 2, "answered": 2, "missing": []}),
            "{ns}"
        );
        let from_prom = prometheus_report(tb, &agents, &prom, ns)?;
        assert_eq!(
            essentials(&got),
            essentials(&from_prom),
            "{ns}: through pods/proxy vs --prometheus"
        );
        // `kubectl mtls report -n NS` (KUBECONFIG from the environment) prints the same table.
        let (status, table, err) = agents
            .all
            .report_with(tb, &["--namespace", ns, "--kubeconfig", kc])?;
        assert!(status.success(), "{err}");
        assert!(table.contains("2 of 2 nodes answered"), "{table}");
        let (status, via_plugin, err) =
            run_in_node(tb, &["env", &kubeconfig_env, plugin, "report", "-n", ns])?;
        assert!(status.success(), "kubectl-mtls report -n {ns}: {err}");
        // All but the window, which each agent clips to its uptime (a second may pass).
        let unwindowed = |t: &str| {
            t.replace(
                t.split(" (window")
                    .nth(1)
                    .and_then(|r| r.split(')').next())
                    .unwrap_or(""),
                "",
            )
        };
        assert_eq!(
            unwindowed(&via_plugin),
            unwindowed(&table),
            "kubectl-mtls report -n {ns}"
        );
    }
    // `policy` through the API writes what it writes from the single agent.
    let (status, merged, err) = run_in_node(
        tb,
        &["env", &kubeconfig_env, plugin, "policy", "-n", "shop"],
    )?;
    assert!(status.success(), "kubectl-mtls policy -n shop: {err}");
    let (_, single, _) = agents.all.cli(
        tb,
        &[
            "policy",
            "--namespace",
            "shop",
            "--agent",
            &agents.all.url(),
        ],
    )?;
    // The first line names the window, which each agent clips to its own uptime.
    let body = |s: &str| s.lines().skip(1).collect::<Vec<_>>().join("\n");
    assert!(
        merged.starts_with("# PeerAuthentications for namespace shop"),
        "{merged}"
    );
    assert_eq!(
        body(&merged),
        body(&single),
        "policy through pods/proxy vs one agent"
    );
    drop(prom);

    // One node down: the answer says so, names it, and still exits 0.
    let Agents { a, b, all } = agents;
    b.stop()?;
    let (status, out, err) = all.report_with(
        tb,
        &[
            "--namespace",
            "shop",
            "--output",
            "json",
            "--kubeconfig",
            kc,
        ],
    )?;
    assert!(status.success(), "one node missing is not a failure: {err}");
    let got: Value = serde_json::from_str(&out)?;
    assert_eq!(got["nodes"]["asked"], 2, "{out}");
    assert_eq!(got["nodes"]["answered"], 1, "{out}");
    assert_eq!(got["nodes"]["missing"][0]["pod"], "mtls-agent-b", "{out}");
    assert_eq!(got["nodes"]["missing"][0]["node"], "node-b", "{out}");
    let reason = got["nodes"]["missing"][0]["reason"].as_str().unwrap_or("");
    assert!(reason.starts_with("proxy error"), "{reason}");
    assert_eq!(err.lines().count(), 1, "one warning line: {err}");
    assert!(
        err.contains("1 of 2 nodes answered") && err.contains("mtls-agent-b"),
        "{err}"
    );
    let (status, table, _) = all.report_with(tb, &["-n", "shop", "--kubeconfig", kc])?;
    assert!(status.success());
    assert!(
        table.contains("1 of 2 nodes answered; missing: mtls-agent-b (node node-b): proxy error"),
        "{table}"
    );
    // No node: exit 1, one line.
    a.stop()?;
    let (status, out, err) = all.report_with(tb, &["-n", "shop", "--kubeconfig", kc])?;
    assert_eq!(status.code(), Some(1), "{out}{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("0 of 2 nodes answered"), "{err}");
    all.stop()?;
    drop(double);
    node.destroy()
}

/// The ClusterIP of the test Service, and the port it listens on.
const CLUSTER_IP: &str = "198.18.21.80";

/// kube-proxy's iptables mode in miniature: DNAT of ClusterIP:80 to web's 8080 in the node
/// namespace, with bridged traffic through netfilter (br_netfilter) so the reply is un-NATed, as
/// on a node with a bridge CNI.
fn add_service(tb: &Testbed, pod_ip: &str) -> Result<()> {
    let ns = tb.node_netns();
    for args in [
        vec!["sysctl", "-qw", "net.ipv4.ip_forward=1"],
        vec!["sysctl", "-qw", "net.bridge.bridge-nf-call-iptables=1"],
    ] {
        let out = tb.run(ns, &args)?;
        anyhow::ensure!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let to = format!("{pod_ip}:8080");
    let args = [
        "iptables",
        "-t",
        "nat",
        "-A",
        "PREROUTING",
        "-d",
        CLUSTER_IP,
        "-p",
        "tcp",
        "--dport",
        "80",
        "-j",
        "DNAT",
        "--to-destination",
        &to,
    ];
    let out = tb.run(ns, &args)?;
    anyhow::ensure!(
        out.status.success(),
        "iptables DNAT (is iptables installed? `cargo xtask setup`): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

#[test]
fn a_service_call_through_a_dnat_is_one_connection_on_each_side() -> Result<()> {
    ensure_root()?;
    let bin = agent_bin()?;
    let mut tb = Testbed::new("mtdnat")?;
    let web = tb.add_pod(PodSpec::new("web", "198.18.0.20".parse()?))?;
    let batch = tb.add_pod(PodSpec::new("batch", "198.18.0.30".parse()?))?;
    let inventory = tb.workdir().join("inventory.yaml");
    write_inventory(
        &inventory,
        &[
            Workload::new("shop", "web", &[&web]),
            Workload::new("legacy", "batch", &[&batch]).without_sidecar(),
        ],
    )?;
    let _server = http_server(&tb, &web.netns, 8080, false)?;
    tb.wait_tcp_listening(&web.netns, web.v4(8080), Duration::from_secs(10))?;
    add_service(&tb, "198.18.0.20")?;
    let agent = Agent::start(&tb, &bin, &inventory, &["vp*"], &[], 2)?;

    let vip: std::net::SocketAddr = format!("{CLUSTER_IP}:80").parse()?;
    for _ in 0..3 {
        http_get(&tb, &batch.netns, &http_url(vip))?;
    }
    // And twice directly: the blockers must be the same connections, counted alike.
    for _ in 0..2 {
        http_get(&tb, &batch.netns, &http_url(web.v4(8080)))?;
    }
    let m = agent.settle(&tb, Duration::from_secs(15))?;
    assert_eq!(
        conns(&m, "legacy", "batch", "outbound", "plaintext"),
        5.0,
        "{m}"
    );
    assert_eq!(conns(&m, "shop", "web", "inbound", "plaintext"), 5.0, "{m}");
    let shop = agent.report_json(&tb, "shop", None)?;
    let blockers = shop["blockers"].as_array().context("blockers")?;
    assert_eq!(blockers.len(), 1, "{shop:#}");
    assert_eq!(blockers[0]["client"]["workload"], "batch");
    assert_eq!(
        blockers[0]["server"],
        json!({"workload": "web", "port": 8080})
    );
    assert_eq!(blockers[0]["connections"], 5);

    // Once in the recent list each, the Service calls with both addresses.
    let recent: Value = serde_json::from_str(&agent.get(&tb, "/api/v1/connections")?)?;
    let list = recent["connections"].as_array().context("connections")?;
    assert_eq!(list.len(), 5, "{recent:#}");
    let via_service: Vec<&Value> = list
        .iter()
        .filter(|c| c["dialled"] == json!(vip.to_string()))
        .collect();
    assert_eq!(via_service.len(), 3, "{recent:#}");
    for c in via_service {
        assert_eq!(c["server"], "198.18.0.20:8080", "{c:#}");
        assert_eq!(c["local"], json!({"client": true, "server": true}), "{c:#}");
    }
    agent.stop()?;
    tb.destroy()
}

/// Where the Cilium-like redirector sits on the host-side veths.
#[derive(Clone, Copy)]
enum CniHook {
    Tcx,
    /// A direct-action clsact filter at priority 1.
    Clsact,
}

/// Issue 19: a Cilium-like CNI on every host-side veth, attached before any agent, hands each
/// packet from a pod to another pod straight to that pod (by destination address, with
/// `bpf_redirect_peer` or `bpf_redirect`) and ends it with `TC_ACT_REDIRECT`. The bridge
/// isolates the pods' ports and the pods know each other's MAC addresses, so pod-to-pod
/// traffic has no other way: every connection that succeeds was redirected. The node still
/// reaches the pods through the bridge (probes).
fn cni_redirects(node: &ReferenceNode, how: Redirect, hook: CniHook) -> Result<Redirector> {
    let tb = &node.tb;
    let ns = tb.node_netns();
    let pods = tb.pods();
    for p in pods {
        tb.run(
            ns,
            &["bridge", "link", "set", "dev", &p.host_if, "isolated", "on"],
        )?;
    }
    let mac = |p: &Pod| -> Result<String> {
        let out = tb.run(&p.netns, &["cat", "/sys/class/net/eth0/address"])?;
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    };
    let macs = pods.iter().map(mac).collect::<Result<Vec<_>>>()?;
    for p in pods {
        for (q, m) in pods.iter().zip(&macs) {
            if q.name == p.name {
                continue;
            }
            for a in q.addresses() {
                let a = a.to_string();
                tb.run(
                    &p.netns,
                    &[
                        "ip",
                        "neigh",
                        "replace",
                        &a,
                        "lladdr",
                        m,
                        "dev",
                        "eth0",
                        "nud",
                        "permanent",
                    ],
                )?;
            }
        }
    }
    let routes: Vec<(std::net::IpAddr, &str)> = pods
        .iter()
        .flat_map(|p| {
            p.addresses()
                .into_iter()
                .map(move |a| (a, p.host_if.as_str()))
        })
        .collect();
    let from: Vec<&str> = pods.iter().map(|p| p.host_if.as_str()).collect();
    match hook {
        CniHook::Tcx => Redirector::routed(ns, &from, &routes, how, None),
        CniHook::Clsact => {
            for f in &from {
                tb.run(ns, &["tc", "qdisc", "add", "dev", f, "clsact"])?;
            }
            Redirector::routed(ns, &from, &routes, how, Some(1))
        }
    }
}

fn attached_on(m: &str, side: &str) -> f64 {
    metric_value(m, "mtls_agent_interfaces_attached_side", &[("side", side)]).unwrap_or(-1.0)
}

/// The reference traffic through the redirector: the agent on every veth counts the reference
/// table exactly (scenario.rs, what the agent counts without a redirector), and the two node
/// agents sum to it, because each attached on its pods' ends (`--attach-side auto`). With
/// `bpf_redirect_peer`, a node-b agent on the host side (today's hooks) does not. `flags`: for
/// the node agents.
fn two_nodes_behind_a_cni(
    family: &str,
    how: Redirect,
    hook: CniHook,
    flags: &[&str],
) -> Result<()> {
    ensure_root()?;
    let bin = agent_bin()?;
    let node = ReferenceNode::new(family)?;
    let _cni = cni_redirects(&node, how, hook)?;
    let inventory = node.tb.workdir().join("inventory.yaml");
    write_inventory(&inventory, &node.workloads())?;
    let tb = &node.tb;
    let agents = Agents::start_with(
        &node,
        &|_, globs, extra, n| Agent::start(tb, &bin, &inventory, globs, extra, n),
        flags,
    )?;
    let b_ifs = host_ifs(&node, &NODE_B);
    let host_side_b = Agent::start(
        tb,
        &bin,
        &inventory,
        &refs(&b_ifs),
        &[
            &["--listen", "127.0.0.1:9484", "--attach-side", "host"][..],
            flags,
        ]
        .concat(),
        NODE_B.len(),
    )?;
    for (agent, n) in [
        (&agents.a, NODE_A.len()),
        (&agents.b, NODE_B.len()),
        (&agents.all, tb.pods().len()),
    ] {
        let m = agent.metrics(tb)?;
        assert_eq!(attached_on(&m, "pod"), n as f64, "{m}");
        assert_eq!(attached_on(&m, "host"), 0.0, "{m}");
    }
    run_cluster(&node, &agents)?;
    let b = agents.b.settle(tb, Duration::from_secs(5))?;
    // Not settled: connections it saw one way stay tracked (issue 19, item 3).
    let host_b = host_side_b.metrics(tb)?;
    assert_eq!(
        attached_on(&host_b, "host"),
        NODE_B.len() as f64,
        "{host_b}"
    );
    let inbound = |m: &str| samples(m, "mtls_agent_inbound_connections_total");
    if how == Redirect::Peer {
        // What the fix is for: packets into node-b's pods skip their host-side egress hook.
        assert_ne!(
            inbound(&host_b),
            inbound(&b),
            "the host side saw every inbound connection: was anything redirected?"
        );
    } else {
        // bpf_redirect leaves through the target's host side, whose egress hook runs.
        assert_eq!(inbound(&host_b), inbound(&b));
    }
    for agent in [agents.a, agents.b, agents.all, host_side_b] {
        agent.stop()?;
    }
    node.destroy()
}

#[test]
fn two_nodes_count_exactly_behind_a_tcx_redirect_peer_cni() -> Result<()> {
    two_nodes_behind_a_cni("mtclrp", Redirect::Peer, CniHook::Tcx, &[])
}

#[test]
fn two_nodes_count_exactly_behind_a_tcx_redirect_cni() -> Result<()> {
    two_nodes_behind_a_cni("mtclrd", Redirect::Plain, CniHook::Tcx, &[])
}

/// The CNI as a clsact filter at priority 1, and the node agents on clsact too (kernels before
/// 6.6): their filters on the pods' ends.
#[test]
fn two_nodes_count_exactly_behind_a_clsact_redirect_peer_cni_on_clsact() -> Result<()> {
    two_nodes_behind_a_cni(
        "mtclrc",
        Redirect::Peer,
        CniHook::Clsact,
        &["--tc-mode", "clsact"],
    )
}
