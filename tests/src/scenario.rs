//! The reference node of the end-to-end tests: eight pods in six namespaces, real servers,
//! and a fixed set of connections whose exact counts and verdicts the agent must report. Shared by
//! the inventory-mode test (`e2e.rs`) and the Kubernetes-mode test (`kubernetes_e2e.rs`, whose
//! API fixtures describe these very pods), so both prove the same numbers.
//!
//! | namespace | workloads                  | inbound traffic                                       | verdict   |
//! |-----------|----------------------------|-------------------------------------------------------|-----------|
//! | payments  | api, reports, worker       | 3 × TLS 1.3 mTLS Istio ALPN (1 over IPv6), 2 × TLS 1.2 mTLS; 2 node probes to 15021 (exempt) | ready |
//! | shop      | web                        | 3 × plaintext HTTP from legacy/batch (1 over IPv6); 1 plaintext from the node to 8080 (a blocker: a probe Istio did not rewrite) | not_ready |
//! | billing   | ledger                     | 2 × one-way TLS 1.3 from shop/web; 1 plaintext from legacy/batch to 9000, excluded from inbound capture (exempt) | not_ready |
//! | legacy    | batch (no sidecar)         | none                                                  | no_data   |
//! | audit     | log (ambient)              | 1 plaintext from the node to 8080 (exempt: ambient lets the node's probes through) | no_data |
//! | ops       | status                     | 1 plaintext from the node to 8080 (a blocker)         | not_ready |
use std::time::Duration;

use anyhow::{Context as _, Result};
use serde_json::{Value, json};

use crate::{
    Agent, CertPaths, Pki, Pod, PodSpec, Proc, San, TlsClient, TlsServer, TlsVersion, Workload,
    http_get, http_server, http_url, metric_value,
    netns::{NODE_IPV4, Testbed},
    openssl_client, openssl_server,
};

pub const ISTIO_ALPN: &str = "istio-peer-exchange,istio";

/// `mtls_agent_connections_total` for one workload, direction and security (0 when absent).
pub fn conns(m: &str, ns: &str, wl: &str, dir: &str, sec: &str) -> f64 {
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

/// The `inbound` object of a JSON report.
pub fn inbound(r: &Value) -> Value {
    r["inbound"].clone()
}

/// A workload's entry of a JSON report (Null when absent).
pub fn workload_of(r: &Value, name: &str) -> Value {
    r["workloads"]
        .as_array()
        .and_then(|a| a.iter().find(|w| w["name"] == name).cloned())
        .unwrap_or(Value::Null)
}

/// What [`ReferenceNode::check`] read, for mode-specific assertions.
pub struct Checked {
    pub metrics: String,
    pub payments: Value,
    pub shop: Value,
}

impl Checked {
    /// shop's blocker from the node (web:8080) says who it is (`description`, which depends on
    /// what the mode knows of web's pod) and what to do (an advice containing every `advice`).
    pub fn assert_shop_node_blocker(&self, description: &str, advice: &[&str]) {
        let b = self.shop["blockers"]
            .as_array()
            .and_then(|a| a.iter().find(|b| b["client"]["kind"] == "node").cloned())
            .unwrap_or(Value::Null);
        assert_eq!(b["client"]["description"], description, "{b:#}");
        assert!(
            b["advice"]
                .as_str()
                .is_some_and(|a| advice.iter().all(|n| a.contains(n))),
            "{b:#}"
        );
    }
}

pub struct ReferenceNode {
    // Servers first: they are stopped before the namespaces go away.
    _servers: Vec<Proc>,
    pub pki: Pki,
    pub worker_cert: CertPaths,
    pub api: Pod,
    pub reports: Pod,
    pub worker: Pod,
    pub web: Pod,
    pub batch: Pod,
    pub ledger: Pod,
    pub auditlog: Pod,
    pub status: Pod,
    pub tb: Testbed,
}

impl ReferenceNode {
    /// Builds the node (testbed family `family`), issues certificates and starts the servers.
    pub fn new(family: &str) -> Result<Self> {
        let mut tb = Testbed::new(family)?;
        let api =
            tb.add_pod(PodSpec::new("api", "198.18.0.10".parse()?).ipv6("2001:db8::10".parse()?))?;
        let reports = tb.add_pod(PodSpec::new("reports", "198.18.0.12".parse()?))?;
        let worker = tb.add_pod(
            PodSpec::new("worker", "198.18.0.11".parse()?).ipv6("2001:db8::11".parse()?),
        )?;
        let web =
            tb.add_pod(PodSpec::new("web", "198.18.0.20".parse()?).ipv6("2001:db8::20".parse()?))?;
        let batch = tb
            .add_pod(PodSpec::new("batch", "198.18.0.30".parse()?).ipv6("2001:db8::30".parse()?))?;
        let ledger = tb.add_pod(PodSpec::new("ledger", "198.18.0.40".parse()?))?;
        let auditlog = tb.add_pod(PodSpec::new("auditlog", "198.18.0.50".parse()?))?;
        let status = tb.add_pod(PodSpec::new("status", "198.18.0.90".parse()?))?;

        let pki = Pki::new(tb.workdir().join("pki"))?;
        let api_cert = pki.issue("api", &[San::spiffe("payments", "api")])?;
        let reports_cert = pki.issue("reports", &[San::spiffe("payments", "reports")])?;
        let worker_cert = pki.issue("worker", &[San::spiffe("payments", "worker")])?;
        let ledger_cert = pki.issue("ledger", &[San::spiffe("billing", "ledger")])?;
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
        let _s6 = http_server(&tb, &ledger.netns, 9000, false)?;
        let _s7 = http_server(&tb, &auditlog.netns, 8080, false)?;
        let _s8 = http_server(&tb, &status.netns, 8080, false)?;
        for (ns, addr) in [
            (&api.netns, api.v4(8443)),
            (&reports.netns, reports.v4(8444)),
            (&api.netns, api.v4(15021)),
            (&web.netns, web.v4(8080)),
            (&ledger.netns, ledger.v4(9443)),
            (&ledger.netns, ledger.v4(9000)),
            (&auditlog.netns, auditlog.v4(8080)),
            (&status.netns, status.v4(8080)),
        ] {
            tb.wait_tcp_listening(ns, addr, Duration::from_secs(10))?;
        }
        Ok(Self {
            _servers: vec![_s1, _s2, _s3, _s4, _s5, _s6, _s7, _s8],
            pki,
            worker_cert,
            api,
            reports,
            worker,
            web,
            batch,
            ledger,
            auditlog,
            status,
            tb,
        })
    }

    /// The workloads as an inventory (inventory mode).
    pub fn workloads(&self) -> Vec<Workload> {
        vec![
            Workload::new("payments", "api", &[&self.api]),
            Workload::new("payments", "reports", &[&self.reports]),
            Workload::new("payments", "worker", &[&self.worker]),
            Workload::new("shop", "web", &[&self.web]),
            Workload::new("legacy", "batch", &[&self.batch]).without_sidecar(),
            Workload::new("billing", "ledger", &[&self.ledger]).exclude_inbound_ports(&[9000]),
            Workload::new("audit", "log", &[&self.auditlog]).ambient(),
            Workload::new("ops", "status", &[&self.status]),
        ]
    }

    /// Makes every connection of the table above, each checked on the client side.
    pub fn send_traffic(&self) -> Result<()> {
        let (tb, pki, worker_cert) = (&self.tb, &self.pki, &self.worker_cert);
        let (api, reports, worker, web, batch, ledger) = (
            &self.api,
            &self.reports,
            &self.worker,
            &self.web,
            &self.batch,
            &self.ledger,
        );
        // payments: 3 × TLS 1.3 mTLS with Istio ALPN (2 over IPv4, 1 over IPv6), 2 × TLS 1.2 mTLS.
        let mtls13 = |addr| {
            TlsClient::new(addr, pki.ca_cert())
                .cert(worker_cert)
                .alpn(ISTIO_ALPN)
                .tls_version(TlsVersion::Tls13)
        };
        for addr in [api.v4(8443), api.v4(8443), api.v6(8443)] {
            let s = openssl_client(tb, &worker.netns, &mtls13(addr))?;
            assert_eq!(s.server_saw_client_cert, Some(true));
        }
        let mtls12 = TlsClient::new(reports.v4(8444), pki.ca_cert())
            .cert(worker_cert)
            .alpn(ISTIO_ALPN)
            .tls_version(TlsVersion::Tls12);
        for _ in 0..2 {
            let s = openssl_client(tb, &worker.netns, &mtls12)?;
            assert!(s.protocol.contains("1.2"), "{}", s.protocol);
        }
        // Exempt: the node probing api's health port (twice), and audit/log's app port (ambient).
        for _ in 0..2 {
            http_get(tb, tb.node_netns(), &http_url(api.v4(15021)))?;
        }
        http_get(tb, tb.node_netns(), &http_url(self.auditlog.v4(8080)))?;
        // Blockers from the node: plaintext to web's and ops/status's app ports.
        http_get(tb, tb.node_netns(), &http_url(web.v4(8080)))?;
        http_get(tb, tb.node_netns(), &http_url(self.status.v4(8080)))?;
        // Exempt: a port ledger's sidecar does not capture.
        http_get(tb, &batch.netns, &http_url(ledger.v4(9000)))?;
        // shop: plaintext HTTP from legacy/batch (no sidecar), 2 × IPv4 + 1 × IPv6.
        for addr in [web.v4(8080), web.v4(8080), web.v6(8080)] {
            http_get(tb, &batch.netns, &http_url(addr))?;
        }
        // billing: one-way TLS 1.3 from shop/web.
        for _ in 0..2 {
            openssl_client(
                tb,
                &web.netns,
                &TlsClient::new(ledger.v4(9443), pki.ca_cert()),
            )?;
        }

        Ok(())
    }

    /// Waits until the agent counted everything, then checks the exact counts in /metrics and
    /// the JSON reports of every namespace.
    pub fn check(&self, agent: &Agent) -> Result<Checked> {
        let tb = &self.tb;
        let m = agent.settle(tb, Duration::from_secs(15))?;
        let log = || agent.proc().stderr_tail();
        let node_ip = NODE_IPV4.to_string();

        // Per workload and direction, every security class, exactly.
        let expect = [
            ("payments", "api", "inbound", "mtls", 3.0),
            ("payments", "api", "inbound", "plaintext", 2.0), // the exempt probes
            ("payments", "reports", "inbound", "mtls", 2.0),
            ("payments", "worker", "outbound", "mtls", 5.0),
            ("shop", "web", "inbound", "plaintext", 4.0), // 3 from batch + 1 from the node
            ("shop", "web", "outbound", "tls", 2.0),
            ("legacy", "batch", "outbound", "plaintext", 4.0),
            ("billing", "ledger", "inbound", "tls", 2.0),
            ("billing", "ledger", "inbound", "plaintext", 1.0), // to the excluded port
            ("audit", "log", "inbound", "plaintext", 1.0),      // the node, ambient
            ("ops", "status", "inbound", "plaintext", 1.0),     // the node
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
            ("audit", "log", "inbound"),
            ("ops", "status", "inbound"),
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
                "mtls_agent_namespace_strict_ready",
                &[("namespace", "ops")]
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
        // STRICT treatment, per workload: only the cases Istio does not enforce are exempt.
        for (ns, wl, sec, strict, want) in [
            ("payments", "api", "plaintext", "exempt", 2.0),
            ("shop", "web", "plaintext", "blocking", 4.0),
            ("billing", "ledger", "plaintext", "exempt", 1.0),
            ("audit", "log", "plaintext", "exempt", 1.0),
            ("ops", "status", "plaintext", "blocking", 1.0),
        ] {
            assert_eq!(
                metric_value(
                    &m,
                    "mtls_agent_inbound_connections_total",
                    &[
                        ("namespace", ns),
                        ("workload", wl),
                        ("security", sec),
                        ("strict", strict)
                    ]
                ),
                Some(want),
                "{ns}/{wl} {sec} {strict}\n{m}"
            );
        }
        assert_eq!(
            metric_value(
                &m,
                "mtls_agent_blocking_connections_total",
                &[
                    ("namespace", "ops"),
                    ("workload", "status"),
                    ("port", "8080"),
                    ("client_namespace", "node"),
                    ("client_workload", "node"),
                    ("client_address", &node_ip),
                    ("security", "plaintext")
                ]
            ),
            Some(1.0),
            "{m}"
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
        let payments = agent.report_json(tb, "payments", None)?;
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

        let shop = agent.report_json(tb, "shop", None)?;
        assert_eq!(shop["verdict"], "not_ready", "{shop:#}");
        assert_eq!(
            inbound(&shop),
            json!({"mtls": 0, "tls": 0, "plaintext": 4, "unknown": 0, "exempt": 0})
        );
        assert_eq!(shop["mtls_ratio"], 0.0);
        let blockers = shop["blockers"].as_array().context("blockers")?;
        assert_eq!(blockers.len(), 2, "{shop:#}");
        // The node's request is a blocker of its own, named as the node (who exactly depends on
        // what the mode knows: see the tests).
        let node_blocker = &blockers[1];
        assert_eq!(node_blocker["client"]["kind"], "node", "{shop:#}");
        assert_eq!(node_blocker["client"]["address"], node_ip.as_str());
        assert_eq!(node_blocker["client"]["namespace"], Value::Null);
        assert_eq!(node_blocker["client"]["workload"], Value::Null);
        assert_eq!(
            node_blocker["server"],
            json!({"workload": "web", "port": 8080})
        );
        assert_eq!(node_blocker["security"], "plaintext");
        assert_eq!(node_blocker["connections"], 1);
        let b = &blockers[0];
        assert_eq!(b["client"]["namespace"], "legacy");
        assert_eq!(b["client"]["workload"], "batch");
        assert_eq!(b["server"], json!({"workload": "web", "port": 8080}));
        assert_eq!(b["security"], "plaintext");
        assert_eq!(b["connections"], 3);
        assert!(b["last_seen"].as_str().is_some_and(|s| s.ends_with('Z')));

        let billing = agent.report_json(tb, "billing", None)?;
        assert_eq!(billing["verdict"], "not_ready");
        assert_eq!(
            inbound(&billing),
            json!({"mtls": 0, "tls": 2, "plaintext": 0, "unknown": 0, "exempt": 1}),
            "the excluded port is exempt: {billing:#}"
        );
        assert_eq!(billing["blockers"].as_array().map(Vec::len), Some(1));
        assert_eq!(billing["blockers"][0]["security"], "tls");
        assert_eq!(billing["blockers"][0]["client"]["workload"], "web");
        assert_eq!(billing["blockers"][0]["connections"], 2);

        let audit = agent.report_json(tb, "audit", None)?;
        assert_eq!(audit["verdict"], "no_data", "{audit:#}");
        assert_eq!(
            inbound(&audit),
            json!({"mtls": 0, "tls": 0, "plaintext": 0, "unknown": 0, "exempt": 1}),
            "ambient lets the node's probe through: {audit:#}"
        );
        assert_eq!(audit["mtls_ratio"], Value::Null);
        assert_eq!(audit["blockers"], json!([]));

        // The node to an app port, and nothing else: not ready, because STRICT rejects it.
        let ops = agent.report_json(tb, "ops", None)?;
        assert_eq!(ops["verdict"], "not_ready", "{ops:#}");
        assert_eq!(
            inbound(&ops),
            json!({"mtls": 0, "tls": 0, "plaintext": 1, "unknown": 0, "exempt": 0})
        );
        assert_eq!(
            ops["blockers"],
            json!([{
                "client": {"namespace": null, "workload": null, "address": node_ip,
                           "kind": "node", "description": "the node or a hostNetwork pod"},
                "server": {"workload": "status", "port": 8080},
                "security": "plaintext",
                "connections": 1,
                "last_seen": ops["blockers"][0]["last_seen"],
                "evidence": ops["blockers"][0]["evidence"],
                "mesh": "none",
                "protocol": "http1",
                "advice": "exclude port 8080 from inbound capture (traffic.sidecar.istio.io/excludeInboundPorts) or move the client into the mesh"
            }]),
            "{ops:#}"
        );
        let (status, table, _) = agent.report(tb, &["--namespace", "ops"])?;
        assert!(status.success());
        assert!(
            table.contains("NOT READY") && table.contains("node: the node or a hostNetwork pod"),
            "{table}"
        );
        let legacy = agent.report_json(tb, "legacy", None)?;
        assert_eq!(legacy["verdict"], "no_data");
        assert_eq!(wl(&legacy, "batch")["sidecar"], false);

        let one = agent.report_json(tb, "payments", Some("api"))?;
        assert_eq!(one["verdict"], "ready");
        assert_eq!(
            inbound(&one),
            json!({"mtls": 3, "tls": 0, "plaintext": 0, "unknown": 0, "exempt": 2})
        );

        Ok(Checked {
            metrics: m,
            payments,
            shop,
        })
    }

    /// Stops the servers and removes the node.
    pub fn destroy(self) -> Result<()> {
        let ReferenceNode { _servers, tb, .. } = self;
        drop(_servers);
        tb.destroy()
    }
}

/// While the agent runs (`--attach-side auto`, the default), exactly our two programs are on the
/// pod's end of every pod veth, their roles swapped (what the pod sends leaves on egress there),
/// and none on the host side; after it stops, no TCX program, tc filter or clsact qdisc is left
/// on either end.
pub fn assert_attached_then_detached(tb: &Testbed, tcx_query: &str, agent: Agent) -> Result<()> {
    let pod_side = (
        vec!["mtls_egress".to_owned()],
        vec!["mtls_ingress".to_owned()],
    );
    for pod in tb.pods() {
        let progs = crate::tcx_programs(tb, tcx_query, &pod.netns, &pod.pod_if)?;
        assert_eq!(progs, pod_side, "{} in {}", pod.pod_if, pod.netns);
        let progs = crate::tcx_programs(tb, tcx_query, tb.node_netns(), &pod.host_if)?;
        assert_eq!(progs, (vec![], vec![]), "{}", pod.host_if);
    }
    let status = agent.stop()?;
    assert!(status.success(), "agent exit: {status}");
    for pod in tb.pods() {
        for (ns, dev) in [
            (tb.node_netns(), pod.host_if.as_str()),
            (pod.netns.as_str(), pod.pod_if.as_str()),
        ] {
            let progs = crate::tcx_programs(tb, tcx_query, ns, dev)?;
            assert_eq!(
                progs,
                (vec![], vec![]),
                "TCX programs left on {dev} in {ns}"
            );
            let q = tb.run(ns, &["tc", "qdisc", "show", "dev", dev])?;
            let q = String::from_utf8_lossy(&q.stdout);
            assert!(!q.contains("clsact"), "{dev} in {ns}: {q}");
            let f = tb.run(ns, &["tc", "filter", "show", "dev", dev, "ingress"])?;
            assert!(
                f.stdout.is_empty(),
                "{dev} in {ns}: {}",
                String::from_utf8_lossy(&f.stdout)
            );
        }
    }
    Ok(())
}

/// The node of the `policy` / `--assume-policy` end-to-end tests: one namespace, `store`, with
/// each case the generator must tell apart, and a client namespace, `edge`.
///
/// | workload        | sidecar | inbound traffic                                              | expected policy                      |
/// |-----------------|---------|--------------------------------------------------------------|--------------------------------------|
/// | store/catalog   | yes     | 2 × Istio mTLS (TLS 1.3) on 8443 from edge/gateway           | STRICT                               |
/// | store/orders    | yes     | 2 × Istio mTLS on 8443 from edge/gateway, 2 × plaintext HTTP on 8080 from store/cron | STRICT, 8080 PERMISSIVE |
/// | store/idle      | yes     | none                                                         | none: no data                        |
/// | store/cron      | no      | none (it is the plaintext client)                            | none: no sidecar                     |
pub struct PolicyNode {
    _servers: Vec<Proc>,
    pub catalog: Pod,
    pub orders: Pod,
    pub idle: Pod,
    pub cron: Pod,
    pub gateway: Pod,
    pub pki: Pki,
    pub gateway_cert: CertPaths,
    pub tb: Testbed,
}

/// The pods' labels (inventory `labels:`, and the API double's pods).
pub const POLICY_LABELS: [(&str, &str); 5] = [
    ("catalog", "catalog"),
    ("orders", "orders"),
    ("idle", "idle"),
    ("cron", "cron"),
    ("gateway", "gateway"),
];

/// What [`PolicyNode::check_policy`] saw, for comparing ways of asking (agent, Prometheus).
pub struct PolicyAnswers {
    pub yaml: String,
    pub what_if_generated: Value,
    pub what_if_strict: Value,
}

/// A namespace-wide STRICT for `store`: the policy every migration wants to apply first.
pub const NAMESPACE_STRICT: &str = "apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata:
  name: default
  namespace: store
spec:
  mtls:
    mode: STRICT
";

impl PolicyNode {
    pub fn new(family: &str) -> Result<Self> {
        let mut tb = Testbed::new(family)?;
        let catalog = tb.add_pod(PodSpec::new("catalog", "198.18.0.60".parse()?))?;
        let orders = tb.add_pod(PodSpec::new("orders", "198.18.0.61".parse()?))?;
        let idle = tb.add_pod(PodSpec::new("idle", "198.18.0.62".parse()?))?;
        let cron = tb.add_pod(PodSpec::new("cron", "198.18.0.63".parse()?))?;
        let gateway = tb.add_pod(PodSpec::new("gateway", "198.18.0.64".parse()?))?;
        let pki = Pki::new(tb.workdir().join("pki"))?;
        let catalog_cert = pki.issue("catalog", &[San::spiffe("store", "catalog")])?;
        let orders_cert = pki.issue("orders", &[San::spiffe("store", "orders")])?;
        let gateway_cert = pki.issue("gateway", &[San::spiffe("edge", "gateway")])?;
        let mtls_server = |port, cert| {
            TlsServer::new(port, cert, pki.ca_cert())
                .require_client_cert()
                .alpn(ISTIO_ALPN)
                .tls_version(TlsVersion::Tls13)
        };
        let s1 = openssl_server(&tb, &catalog.netns, &mtls_server(8443, &catalog_cert))?;
        let s2 = openssl_server(&tb, &orders.netns, &mtls_server(8443, &orders_cert))?;
        let s3 = http_server(&tb, &orders.netns, 8080, false)?;
        for (ns, addr) in [
            (&catalog.netns, catalog.v4(8443)),
            (&orders.netns, orders.v4(8443)),
            (&orders.netns, orders.v4(8080)),
        ] {
            tb.wait_tcp_listening(ns, addr, Duration::from_secs(10))?;
        }
        Ok(Self {
            _servers: vec![s1, s2, s3],
            catalog,
            orders,
            idle,
            cron,
            gateway,
            pki,
            gateway_cert,
            tb,
        })
    }

    /// The workloads as an inventory, with `labels:` (inventory mode).
    pub fn workloads(&self) -> Vec<Workload> {
        let w = |ns: &str, name: &str, pod: &Pod| {
            Workload::new(ns, name, &[pod]).labels(&[("app", name)])
        };
        vec![
            w("store", "catalog", &self.catalog),
            w("store", "orders", &self.orders),
            w("store", "idle", &self.idle),
            w("store", "cron", &self.cron).without_sidecar(),
            w("edge", "gateway", &self.gateway),
        ]
    }

    /// The same pods as the API returns them (Kubernetes mode), on node `node`.
    pub fn pods_json(&self, node: &str) -> Vec<Value> {
        let pods = [
            ("store", "catalog", &self.catalog, true),
            ("store", "orders", &self.orders, true),
            ("store", "idle", &self.idle, true),
            ("store", "cron", &self.cron, false),
            ("edge", "gateway", &self.gateway, true),
        ];
        pods.iter()
            .map(|(ns, name, pod, sidecar)| {
                let rs = format!("{name}-5f7c9d8b6");
                crate::pod_json(
                    ns,
                    &format!("{rs}-x{}", &name[..3]),
                    Some(("ReplicaSet", &rs)),
                    &[("app", name)],
                    name,
                    node,
                    &[&pod.v4(0).ip().to_string()],
                    *sidecar,
                )
            })
            .collect()
    }

    /// Makes every connection of the table above, each checked on the client side.
    pub fn send_traffic(&self) -> Result<()> {
        let tb = &self.tb;
        let mtls = |addr| {
            TlsClient::new(addr, self.pki.ca_cert())
                .cert(&self.gateway_cert)
                .alpn(ISTIO_ALPN)
                .tls_version(TlsVersion::Tls13)
        };
        for addr in [
            self.catalog.v4(8443),
            self.catalog.v4(8443),
            self.orders.v4(8443),
            self.orders.v4(8443),
        ] {
            let s = openssl_client(tb, &self.gateway.netns, &mtls(addr))?;
            assert_eq!(s.server_saw_client_cert, Some(true));
        }
        for _ in 0..2 {
            http_get(tb, &self.cron.netns, &http_url(self.orders.v4(8080)))?;
        }
        Ok(())
    }

    /// Runs `mtls-agent ARGS --source…` and returns (exit code, stdout, stderr).
    fn run(&self, agent: &Agent, args: &[&str], source: &[&str]) -> Result<(i32, String, String)> {
        let mut argv = args.to_vec();
        argv.extend_from_slice(source);
        let (status, out, err) = agent.cli(&self.tb, &argv)?;
        Ok((status.code().unwrap_or(-1), out, err))
    }

    /// `report --namespace store --assume-policy FILE --check --output json`.
    fn check(
        &self,
        agent: &Agent,
        file: &std::path::Path,
        source: &[&str],
    ) -> Result<(i32, String, String)> {
        let file = file.to_str().context("path is not UTF-8")?;
        self.run(
            agent,
            &[
                "report",
                "--namespace",
                "store",
                "--assume-policy",
                file,
                "--check",
                "--output",
                "json",
            ],
            source,
        )
    }

    /// The acceptance of issue 12 through one way of asking (`source`: `--agent URL` or
    /// `--prometheus URL`): the exact YAML of `policy`, valid against the PeerAuthentication
    /// schema; that YAML judged on the same traffic rejects nothing (`--check` exits 0); a
    /// namespace-wide STRICT rejects exactly the blockers `report` lists (`--check` exits 3).
    pub fn check_policy(&self, agent: &Agent, source: &[&str]) -> Result<PolicyAnswers> {
        let log = || agent.proc().stderr_tail();
        let (code, out, err) = self.run(
            agent,
            &["report", "--namespace", "store", "--output", "json"],
            source,
        )?;
        assert_eq!(code, 0, "{err}");
        let report: Value = serde_json::from_str(&out)?;
        let blockers = report["blockers"].clone();
        assert_eq!(
            blockers.as_array().map(Vec::len),
            Some(1),
            "{report:#}\n{}",
            log()
        );
        let b = &blockers[0];
        assert_eq!(b["client"]["namespace"], "store", "{report:#}");
        assert_eq!(b["client"]["workload"], "cron", "{report:#}");
        assert_eq!(b["server"], json!({"workload": "orders", "port": 8080}));
        assert_eq!(b["security"], "plaintext");
        assert_eq!(b["connections"], 2);
        let last = b["last_seen"].as_str().context("last_seen")?.to_owned();

        // policy: exactly the expected YAML.
        let (code, yaml, err) = self.run(agent, &["policy", "--namespace", "store"], source)?;
        assert_eq!(code, 0, "{err}");
        let window = yaml
            .lines()
            .next()
            .and_then(|l| l.split_once("of the last "))
            .and_then(|(_, r)| r.split_once(" proves"))
            .map(|(w, _)| w.to_owned())
            .with_context(|| format!("no window in the header:\n{yaml}"))?;
        let expected = format!(
            "# PeerAuthentications for namespace store that the traffic of the last {window} proves safe (mtls-agent policy).
# cron: no policy — no sidecar: STRICT would not protect it until it is injected
# idle: no policy — no inbound connection in {window} (no evidence is not readiness)
---
# catalog: 2 connections judged in {window}, all accepted by STRICT; last blocker seen: none in the window
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata:
  name: catalog
  namespace: store
spec:
  selector:
    matchLabels:
      app: catalog
  mtls:
    mode: STRICT
---
# orders: 4 connections judged in {window}; STRICT except port 8080 (PERMISSIVE: blockers seen, last {last}); port 8443 clean
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata:
  name: orders
  namespace: store
spec:
  selector:
    matchLabels:
      app: orders
  mtls:
    mode: STRICT
  portLevelMtls:
    '8080':
      mode: PERMISSIVE
"
        );
        assert_eq!(yaml, expected);
        validate_peer_authentications(&yaml)?;

        // Fed back: nothing rejected, exit 0.
        let generated = self.tb.workdir().join("generated.yaml");
        std::fs::write(&generated, &yaml)?;
        let (code, out, err) = self.check(agent, &generated, source)?;
        assert_eq!(code, 0, "{err}\n{out}");
        let what_if_generated: Value = serde_json::from_str(&out)?;
        let w = &what_if_generated["what_if"];
        assert_eq!(w["rejected_connections"], 0, "{w:#}");
        assert_eq!(
            w["assumed"],
            json!(["store/catalog", "store/orders"]),
            "{w:#}"
        );

        // Namespace-wide STRICT: exit 3, rejecting exactly the blockers report lists.
        let strict = self.tb.workdir().join("strict.yaml");
        std::fs::write(&strict, NAMESPACE_STRICT)?;
        let (code, out, err) = self.check(agent, &strict, source)?;
        let strict = strict.to_str().context("path")?;
        assert_eq!(code, 3, "{err}\n{out}");
        assert_eq!(err.trim().lines().count(), 1, "{err}");
        let what_if_strict: Value = serde_json::from_str(&out)?;
        let w = &what_if_strict["what_if"];
        assert_eq!(w["rejected_connections"], 2, "{w:#}");
        let policies = w["policies"].as_array().context("policies")?;
        assert_eq!(policies.len(), 1, "{w:#}");
        assert_eq!(policies[0]["policy"], "store/default");
        assert_eq!(policies[0]["rejects"], blockers, "{w:#}");
        // The table names the policy and the client, within the default width (not a TTY).
        let (code, table, err) = self.run(
            agent,
            &["report", "--namespace", "store", "--assume-policy", strict],
            source,
        )?;
        assert_eq!(code, 0, "without --check: {err}");
        assert!(
            table.contains("assumed store/default: rejects 2 connections"),
            "{table}"
        );
        assert!(table.contains("store/cron"), "{table}");
        assert!(table.lines().all(|l| l.chars().count() <= 120), "{table}");

        // The same policy from stdin (`-`), as a pipeline would pass it.
        let mut argv = vec![
            "report",
            "--namespace",
            "store",
            "--assume-policy",
            "-",
            "--check",
        ];
        argv.extend_from_slice(source);
        let (status, _, err) =
            agent.cli_stdin(&self.tb, &argv, Some(NAMESPACE_STRICT.as_bytes()))?;
        assert_eq!(status.code(), Some(3), "stdin: {err}");

        // A bad policy file: one line naming the file, the document and the field; exit 2.
        let bad = self.tb.workdir().join("bad.yaml");
        std::fs::write(
            &bad,
            format!(
                "{NAMESPACE_STRICT}---\n{}",
                NAMESPACE_STRICT.replace("mode: STRICT", "mode: STRICT\n    strict: true")
            ),
        )?;
        let (code, _, err) = self.check(agent, &bad, source)?;
        let bad_s = bad.to_str().context("path")?;
        assert_eq!(code, 2, "{err}");
        assert_eq!(err.trim().lines().count(), 1, "{err}");
        assert!(
            err.contains(&format!(
                "{bad_s}: document 2: spec.mtls.strict: unknown field"
            )),
            "{err}"
        );
        Ok(PolicyAnswers {
            yaml,
            what_if_generated,
            what_if_strict,
        })
    }

    pub fn destroy(self) -> Result<()> {
        let PolicyNode { _servers, tb, .. } = self;
        drop(_servers);
        tb.destroy()
    }
}

/// Validates every document of `yaml` against the JSON Schema of `security.istio.io/v1`
/// PeerAuthentication in the fixtures (Python's jsonschema; PyYAML reads the YAML), and
/// checks that the schema itself rejects what Istio rejects, so that a pass means something.
pub fn validate_peer_authentications(yaml: &str) -> Result<()> {
    const SCRIPT: &str = r#"
import json, sys, yaml, jsonschema
schema = json.load(open(sys.argv[1]))
jsonschema.Draft202012Validator.check_schema(schema)
v = jsonschema.Draft202012Validator(schema)
docs = [d for d in yaml.safe_load_all(sys.stdin) if d]
assert docs, "no document"
for i, d in enumerate(docs):
    errs = list(v.iter_errors(d))
    if errs:
        sys.exit("document %d: %s" % (i + 1, "; ".join(e.message for e in errs)))
bad = [
    {"apiVersion": "security.istio.io/v1", "kind": "PeerAuthentication", "metadata": {"name": "a"},
     "spec": {"portLevelMtls": {"8080": {"mode": "DISABLE"}}}},
    {"apiVersion": "security.istio.io/v1", "kind": "PeerAuthentication", "metadata": {"name": "a"},
     "spec": {"mtls": {"mode": "STRIKT"}}},
    {"apiVersion": "security.istio.io/v1", "kind": "PeerAuthentication", "metadata": {"name": "a"},
     "spec": {"mtls": {"mode": "STRICT"}, "extra": 1}},
    {"apiVersion": "security.istio.io/v1", "kind": "PeerAuthentication", "metadata": {"name": "a"},
     "spec": {"selector": {"matchLabels": {"app": "a"}}, "portLevelMtls": {"70000": {"mode": "DISABLE"}}}},
]
for b in bad:
    if v.is_valid(b):
        sys.exit("the schema accepts an invalid PeerAuthentication: %s" % json.dumps(b))
print(len(docs))
"#;
    let schema = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures/istio/peerauthentication.schema.json");
    let mut child = std::process::Command::new("python3")
        .args(["-c", SCRIPT])
        .arg(&schema)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .context("python3 (with PyYAML and jsonschema)")?;
    {
        use std::io::Write as _;
        let mut stdin = child.stdin.take().context("stdin")?;
        stdin.write_all(yaml.as_bytes())?;
    }
    let out = child.wait_with_output()?;
    anyhow::ensure!(
        out.status.success(),
        "PeerAuthentication schema validation failed: {}{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    Ok(())
}
