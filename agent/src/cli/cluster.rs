//! The cluster source: every agent pod, asked through the Kubernetes API server's `pods/proxy`
//! with the user's own kubeconfig credentials, in parallel with a per-agent timeout, and the
//! answers merged exactly (`merge`). No new listener on the agents: the API server reaches the
//! agent's existing HTTP port, and the agent's `--api-token-file` token travels in
//! `X-Mtls-Agent-Authorization` (the API server consumes the `Authorization` header itself).
use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context as _, anyhow};
use k8s_openapi::api::core::v1::Pod;
use kube::{
    Api, Client, Config,
    api::ListParams,
    config::{KubeConfigOptions, Kubeconfig},
};
use serde::{Serialize, de::DeserializeOwned};

use super::usage;
use crate::{
    aggregate::{
        Blocker, Inbound, PortReport, Report, WorkloadReport,
        report::{ratio, readiness, sort_blockers},
    },
    export::http::{ApiError, NamespaceSummary},
};

/// Namespace and label of the agent pods in deploy/ (the DaemonSet's selector).
pub const DEFAULT_AGENT_NAMESPACE: &str = "mtls-agent";
pub const DEFAULT_AGENT_SELECTOR: &str = "app.kubernetes.io/name=mtls-agent";
/// The agent's port when its pod names none `metrics` (deploy/ names it so).
const DEFAULT_AGENT_PORT: i32 = 9477;

/// Which agents answered one question: the `nodes` field of the JSON report.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Nodes {
    /// Agent pods found.
    pub asked: usize,
    pub answered: usize,
    pub missing: Vec<Missing>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Missing {
    pub pod: String,
    pub node: String,
    /// `not ready`, `timeout`, or `proxy error: ...`.
    pub reason: String,
}

impl Nodes {
    /// `1 of 2 nodes answered; missing: mtls-agent-x (node-b): timeout`.
    pub fn summary(&self) -> String {
        let mut s = format!("{} of {} nodes answered", self.answered, self.asked);
        if !self.missing.is_empty() {
            let names: Vec<String> = self
                .missing
                .iter()
                .map(|m| format!("{} (node {}): {}", m.pod, m.node, m.reason))
                .collect();
            s += &format!("; missing: {}", names.join(", "));
        }
        s
    }
}

/// Kubeconfig flags shared by every command that can ask the cluster.
pub struct KubeArgs<'a> {
    pub kubeconfig: Option<&'a Path>,
    pub context: Option<&'a str>,
}

/// Whether a cluster can be asked: `--kubeconfig`, `KUBECONFIG`, `~/.kube/config`, or in-cluster.
pub fn kubeconfig_found(args: &KubeArgs<'_>) -> bool {
    args.kubeconfig.is_some()
        || std::env::var_os("KUBECONFIG").is_some_and(|v| !v.is_empty())
        || std::env::var_os("HOME")
            .map(|h| PathBuf::from(h).join(".kube/config").is_file())
            .unwrap_or(false)
        || std::env::var_os("KUBERNETES_SERVICE_HOST").is_some()
}

pub struct Cluster {
    rt: tokio::runtime::Runtime,
    client: Client,
    namespace: String,
    selector: String,
    timeout: Duration,
    token: Option<String>,
}

/// One agent's answer.
enum Answer<T> {
    Ok(T),
    /// The agent answered 400/404 (e.g. a namespace with no pod on its node).
    Unknown(String),
    Missing(Missing),
}

impl Cluster {
    pub fn new(
        kube: &KubeArgs<'_>,
        namespace: &str,
        selector: &str,
        timeout: Duration,
        token: Option<String>,
    ) -> anyhow::Result<Self> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let options = KubeConfigOptions {
            context: kube.context.map(str::to_owned),
            ..Default::default()
        };
        let client = rt.block_on(async {
            let config = match kube.kubeconfig {
                Some(p) => {
                    let kc = Kubeconfig::read_from(p)
                        .map_err(|e| usage(format!("--kubeconfig {}: {e}", p.display())))?;
                    Config::from_custom_kubeconfig(kc, &options)
                        .await
                        .map_err(|e| usage(format!("--kubeconfig {}: {e}", p.display())))?
                }
                None => match Config::from_kubeconfig(&options).await {
                    Ok(c) => c,
                    Err(e) if kube.context.is_some() => {
                        return Err(usage(format!("--context: {e}")));
                    }
                    Err(e) => {
                        Config::incluster().map_err(|_| anyhow!("reading the kubeconfig: {e}"))?
                    }
                },
            };
            // An agent the proxy cannot reach answers 503 at once: say so, do not retry it
            // into a timeout.
            let mut config = config;
            config.default_retry = false;
            Client::try_from(config).context("Kubernetes client")
        })?;
        Ok(Self {
            rt,
            client,
            namespace: namespace.to_owned(),
            selector: selector.to_owned(),
            timeout,
            token,
        })
    }

    /// Asks every agent pod for `path?query` in parallel; the answers and who was missing.
    fn ask_all<T: DeserializeOwned>(
        &self,
        path: &str,
        query: &[(&str, String)],
    ) -> anyhow::Result<(Vec<T>, Vec<String>, Nodes)> {
        let query = query
            .iter()
            .map(|(k, v)| format!("{k}={}", encode(v)))
            .collect::<Vec<_>>()
            .join("&");
        self.rt.block_on(async {
            let pods: Api<Pod> = Api::namespaced(self.client.clone(), &self.namespace);
            let list = pods
                .list(&ListParams::default().labels(&self.selector))
                .await
                .map_err(|e| {
                    anyhow!(
                        "listing the agent pods ({}) in namespace {}: {e}",
                        self.selector,
                        self.namespace
                    )
                })?;
            if list.items.is_empty() {
                return Err(anyhow!(
                    "no agent pod matches {} in namespace {} (--agent-namespace, --agent-selector)",
                    self.selector,
                    self.namespace
                ));
            }
            let asks = list
                .items
                .iter()
                .map(|pod| self.ask_one::<T>(pod, path, &query));
            let answers = futures::future::join_all(asks).await;
            let mut nodes = Nodes {
                asked: answers.len(),
                ..Default::default()
            };
            let (mut ok, mut unknown) = (Vec::new(), Vec::new());
            for a in answers {
                match a {
                    Answer::Ok(v) => {
                        nodes.answered += 1;
                        ok.push(v);
                    }
                    Answer::Unknown(msg) => {
                        nodes.answered += 1;
                        unknown.push(msg);
                    }
                    Answer::Missing(m) => nodes.missing.push(m),
                }
            }
            if nodes.answered == 0 {
                return Err(anyhow!("no agent answered: {}", nodes.summary()));
            }
            if !nodes.missing.is_empty() {
                eprintln!("mtls-agent: warning: {}", nodes.summary());
            }
            Ok((ok, unknown, nodes))
        })
    }

    async fn ask_one<T: DeserializeOwned>(&self, pod: &Pod, path: &str, query: &str) -> Answer<T> {
        let name = pod.metadata.name.clone().unwrap_or_default();
        let spec = pod.spec.as_ref();
        let node = spec
            .and_then(|s| s.node_name.clone())
            .unwrap_or_else(|| "(unscheduled)".into());
        let missing = |reason: String| {
            Answer::Missing(Missing {
                pod: name.clone(),
                node: node.clone(),
                reason,
            })
        };
        let ready = pod
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
        if !ready {
            return missing("not ready".into());
        }
        let port = spec
            .into_iter()
            .flat_map(|s| &s.containers)
            .flat_map(|c| c.ports.iter().flatten())
            .find(|p| p.name.as_deref() == Some("metrics"))
            .map(|p| p.container_port)
            .unwrap_or(DEFAULT_AGENT_PORT);
        let uri = format!(
            "/api/v1/namespaces/{}/pods/{name}:{port}/proxy{path}?{query}",
            self.namespace
        );
        let mut req = axum::http::Request::get(uri);
        if let Some(t) = &self.token {
            req = req.header(
                crate::export::http::PROXIED_TOKEN_HEADER,
                format!("Bearer {t}"),
            );
        }
        let Ok(req) = req.body(kube::client::Body::from(Vec::new())) else {
            return missing("proxy error: bad request".into());
        };
        let call = async {
            let resp = self.client.send(req).await?;
            let status = resp.status();
            let body = resp.into_body().collect_bytes().await?;
            Ok::<_, kube::Error>((status, body))
        };
        let (status, body) = match tokio::time::timeout(self.timeout, call).await {
            Err(_) => return missing(format!("timeout ({}s)", self.timeout.as_secs())),
            Ok(Err(e)) => return missing(format!("proxy error: {e}")),
            Ok(Ok(a)) => a,
        };
        let text = String::from_utf8_lossy(&body);
        if status.is_success() {
            return match serde_json::from_slice(&body) {
                Ok(v) => Answer::Ok(v),
                Err(_) => missing("proxy error: the answer is not a report".into()),
            };
        }
        // The agent's own errors are `{"error": ...}`; the API server's are a `Status`.
        if let Ok(e) = serde_json::from_slice::<ApiError>(&body) {
            if status.as_u16() == 400 || status.as_u16() == 404 {
                return Answer::Unknown(e.error);
            }
            return missing(format!("agent answered {status}: {}", e.error));
        }
        let msg = serde_json::from_str::<serde_json::Value>(&text)
            .ok()
            .and_then(|v| v["message"].as_str().map(str::to_owned))
            .unwrap_or_else(|| text.trim().chars().take(160).collect());
        missing(format!("proxy error: {status} {msg}"))
    }
}

impl super::source::Source for Cluster {
    fn report(
        &self,
        namespace: &str,
        workload: Option<&str>,
        window: Option<Duration>,
    ) -> anyhow::Result<Report> {
        let q = super::source::report_query(namespace, workload, window);
        let (reports, unknown, nodes) = self.ask_all::<Report>("/api/v1/report", &q)?;
        if reports.is_empty() {
            return Err(usage(unknown.into_iter().next().unwrap_or_default()));
        }
        let mut merged = merge(namespace, workload, reports);
        merged.nodes = Some(nodes);
        Ok(merged)
    }

    fn namespaces(&self, window: Option<Duration>) -> anyhow::Result<Vec<NamespaceSummary>> {
        let (lists, _, _) = self.ask_all::<Vec<NamespaceSummary>>(
            "/api/v1/namespaces",
            &super::source::window_query(window),
        )?;
        let mut names: Vec<String> = lists
            .iter()
            .flatten()
            .map(|n| n.namespace.clone())
            .collect();
        names.sort();
        names.dedup();
        let mut out = Vec::new();
        for ns in names {
            out.push(NamespaceSummary::from_report(
                &self.report(&ns, None, window)?,
            ));
        }
        Ok(out)
    }
}

/// Percent-encodes a query value (everything but RFC 3986 unreserved characters).
fn encode(v: &str) -> String {
    v.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Latest of two RFC 3339 times (the agents write them in one format; compare parsed).
fn later(a: &str, b: &str) -> bool {
    match (
        humantime::parse_rfc3339_weak(a),
        humantime::parse_rfc3339_weak(b),
    ) {
        (Ok(a), Ok(b)) => a > b,
        _ => a > b,
    }
}

/// The exact cluster-wide report from per-node reports: each side of a connection is counted
/// once, by the node hosting it (issue 15), so counts add; blockers merge by client, server
/// workload, port and security with the latest `last_seen`; verdicts and ratios are recomputed
/// from the sums with the rules of `aggregate::report`.
pub fn merge(namespace: &str, workload: Option<&str>, reports: Vec<Report>) -> Report {
    type BlockerKey = (Option<String>, Option<String>, String, String, u16, String);
    let mut total = Inbound::default();
    let (mut compliant, mut rejected, mut one_direction, mut window) = (0, 0, 0, 0);
    let mut peer_authentication = None;
    let mut pas: Vec<crate::policy::Rule> = Vec::new();
    let mut blockers: BTreeMap<BlockerKey, Blocker> = BTreeMap::new();
    let mut workloads: BTreeMap<String, WorkloadReport> = BTreeMap::new();
    for r in reports {
        total.add(&r.inbound);
        compliant += r.compliant;
        rejected += r.rejected;
        one_direction += r.one_direction;
        // Every node covers at least the shortest window (an agent clips it to its uptime).
        window = match window {
            0 => r.window_seconds,
            w => w.min(r.window_seconds),
        };
        peer_authentication = peer_authentication.or(r.peer_authentication);
        for pa in r.peer_authentications {
            if !pas.iter().any(|p| p.id() == pa.id()) {
                pas.push(pa);
            }
        }
        for b in r.blockers {
            let key = (
                b.client.namespace.clone(),
                b.client.workload.clone(),
                b.client.address.clone(),
                b.server.workload.clone(),
                b.server.port,
                b.security.clone(),
            );
            match blockers.get_mut(&key) {
                None => {
                    blockers.insert(key, b);
                }
                Some(m) => {
                    m.connections += b.connections;
                    if later(&b.last_seen, &m.last_seen) {
                        let n = m.connections;
                        *m = b;
                        m.connections = n;
                    }
                }
            }
        }
        for w in r.workloads {
            match workloads.get_mut(&w.name) {
                None => {
                    workloads.insert(w.name.clone(), w);
                }
                Some(m) => {
                    m.inbound.add(&w.inbound);
                    m.compliant += w.compliant;
                    m.rejected += w.rejected;
                    m.one_direction += w.one_direction;
                    // A workload with a pod without a sidecar is not covered.
                    m.sidecar &= w.sidecar;
                    m.mode = m.mode.take().or(w.mode);
                    for p in w.ports {
                        match m.ports.iter_mut().find(|q| q.port == p.port) {
                            Some(q) => {
                                q.connections += p.connections;
                                q.mode = q.mode.take().or(p.mode);
                            }
                            None => m.ports.push(p),
                        }
                    }
                    m.labels = match (m.labels.take(), w.labels) {
                        (Some(mut a), Some(b)) => {
                            a.retain(|k, v| b.get(k) == Some(v));
                            Some(a)
                        }
                        (a, b) => a.or(b),
                    };
                }
            }
        }
    }
    let workloads = workloads
        .into_values()
        .map(|mut w| {
            w.verdict = readiness(&w.inbound, w.compliant);
            w.mtls_ratio = ratio(&w.inbound, w.compliant);
            w.ports.sort_by_key(|p: &PortReport| p.port);
            w
        })
        .collect();
    let mut blockers: Vec<Blocker> = blockers.into_values().collect();
    sort_blockers(&mut blockers);
    Report {
        namespace: namespace.to_owned(),
        workload: workload.map(str::to_owned),
        window_seconds: window,
        verdict: readiness(&total, compliant),
        inbound: total,
        mtls_ratio: ratio(&total, compliant),
        compliant,
        rejected,
        one_direction,
        warnings: Vec::new(),
        peer_authentication,
        blockers,
        workloads,
        peer_authentications: pas,
        what_if: None,
        nodes: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::aggregate::{ClientRef, Readiness, ServerRef};

    fn blocker(conns: u64, last_seen: &str, evidence: &str) -> Blocker {
        Blocker {
            client: ClientRef {
                namespace: Some("legacy".into()),
                workload: Some("batch".into()),
                address: "198.18.0.9".into(),
                kind: None,
                description: None,
            },
            server: ServerRef {
                workload: "web".into(),
                port: 8080,
            },
            security: "plaintext".into(),
            connections: conns,
            last_seen: last_seen.into(),
            evidence: evidence.into(),
            mesh: "none".into(),
            protocol: None,
            advice: None,
        }
    }

    fn node(inbound: Inbound, compliant: u64, blockers: Vec<Blocker>, sidecar: bool) -> Report {
        Report {
            namespace: "shop".into(),
            workload: None,
            window_seconds: 900,
            verdict: readiness(&inbound, compliant),
            inbound,
            mtls_ratio: ratio(&inbound, compliant),
            compliant,
            rejected: 1,
            one_direction: inbound.unknown,
            warnings: Vec::new(),
            peer_authentication: None,
            blockers,
            workloads: vec![WorkloadReport {
                name: "web".into(),
                verdict: readiness(&inbound, compliant),
                inbound,
                sidecar,
                mtls_ratio: ratio(&inbound, compliant),
                compliant,
                rejected: 1,
                one_direction: inbound.unknown,
                mode: None,
                ports: vec![PortReport {
                    port: 8080,
                    connections: inbound.judged(),
                    mode: None,
                }],
                labels: None,
            }],
            peer_authentications: vec![],
            what_if: None,
            nodes: None,
        }
    }

    #[test]
    fn merge_sums_counts_and_blockers_and_recomputes_verdicts() {
        // Node 1 alone is ready (3 mTLS); node 2 saw 2 plaintext from the same client.
        let a = node(
            Inbound {
                mtls: 3,
                ..Default::default()
            },
            3,
            vec![],
            true,
        );
        let b = node(
            Inbound {
                plaintext: 2,
                exempt: 1,
                ..Default::default()
            },
            0,
            vec![blocker(2, "2026-12-04T05:00:00Z", "old")],
            true,
        );
        let c = node(
            Inbound {
                plaintext: 1,
                ..Default::default()
            },
            0,
            vec![blocker(1, "2026-12-04T05:10:00Z", "new")],
            false,
        );
        let m = merge("shop", None, vec![a, b, c]);
        assert_eq!(
            m.inbound,
            Inbound {
                mtls: 3,
                plaintext: 3,
                exempt: 1,
                ..Default::default()
            }
        );
        assert_eq!(m.verdict, Readiness::NotReady);
        assert_eq!(m.mtls_ratio, Some(0.5));
        assert_eq!(m.rejected, 3);
        assert_eq!(m.one_direction, 0);
        assert_eq!(m.blockers.len(), 1);
        assert_eq!(m.blockers[0].connections, 3);
        assert_eq!(m.blockers[0].last_seen, "2026-12-04T05:10:00Z");
        assert_eq!(m.blockers[0].evidence, "new");
        let w = &m.workloads[0];
        assert_eq!(w.verdict, Readiness::NotReady);
        assert_eq!(w.inbound.judged(), 6);
        assert!(!w.sidecar, "one pod without a sidecar");
        assert_eq!(w.ports[0].connections, 6);
        // Connections seen in one direction only add up like the rest.
        let one_way = Inbound {
            unknown: 2,
            ..Default::default()
        };
        let m = merge(
            "shop",
            None,
            vec![
                node(one_way, 0, vec![], true),
                node(one_way, 0, vec![], true),
            ],
        );
        assert_eq!((m.one_direction, m.workloads[0].one_direction), (4, 4));
    }

    #[test]
    fn nodes_summary_names_the_missing() {
        let n = Nodes {
            asked: 2,
            answered: 1,
            missing: vec![Missing {
                pod: "mtls-agent-b".into(),
                node: "node-b".into(),
                reason: "timeout (10s)".into(),
            }],
        };
        assert_eq!(
            n.summary(),
            "1 of 2 nodes answered; missing: mtls-agent-b (node node-b): timeout (10s)"
        );
        assert_eq!(encode("a b/c"), "a%20b%2Fc");
    }
}
