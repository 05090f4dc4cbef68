//! The readiness report: the JSON contract of DESIGN.md, served by the agent and rendered by
//! `mtls-agent report`. Both directions use these types, so the CLI cannot drift from the API.
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Readiness {
    Ready,
    NotReady,
    NoData,
}

impl Readiness {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ready => "ready",
            Self::NotReady => "not_ready",
            Self::NoData => "no_data",
        }
    }
}

/// Inbound connection counts. `exempt` connections are counted there only, not under their
/// security class, so the five add up to all inbound connections.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Inbound {
    pub mtls: u64,
    pub tls: u64,
    pub plaintext: u64,
    pub unknown: u64,
    pub exempt: u64,
}

impl Inbound {
    pub fn judged(&self) -> u64 {
        self.mtls + self.tls + self.plaintext + self.unknown
    }

    pub fn add(&mut self, other: &Inbound) {
        self.mtls += other.mtls;
        self.tls += other.tls;
        self.plaintext += other.plaintext;
        self.unknown += other.unknown;
        self.exempt += other.exempt;
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientRef {
    pub namespace: Option<String>,
    pub workload: Option<String>,
    pub address: String,
    /// `node` when the client is the node's own address; absent for every other client.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<ClientKind>,
    /// Who that is, in words (for the node: a kubelet probe Istio did not rewrite, or the node
    /// or a hostNetwork pod).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

impl ClientRef {
    /// A client at the node's address.
    pub fn node(address: String, who: NodeClient) -> Self {
        Self {
            namespace: None,
            workload: None,
            address,
            kind: Some(ClientKind::Node),
            description: Some(who.description().to_owned()),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClientKind {
    /// The node's own address: the kubelet, or a hostNetwork pod.
    Node,
}

/// Which client at the node's address sent a blocking connection. Under STRICT both break:
/// the kubelet has no Istio certificate, and Istio only spares its probes by rewriting them to
/// the sidecar agent on 15020.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum NodeClient {
    /// The pod spec has an HTTP/TCP/gRPC probe on the port and Istio did not rewrite it.
    KubeletProbe,
    /// Anything else from the node's address.
    NodeOrHostNetwork,
}

impl NodeClient {
    pub fn description(self) -> &'static str {
        match self {
            Self::KubeletProbe => "kubelet probe (rewriting disabled)",
            Self::NodeOrHostNetwork => "the node or a hostNetwork pod",
        }
    }

    /// What to do about it, for a connection to `port`.
    pub fn advice(self, port: u16) -> String {
        match self {
            Self::KubeletProbe => "enable Istio's probe rewriting (remove sidecar.istio.io/rewriteAppHTTPProbers: \"false\", or turn it on mesh-wide): the kubelet then probes the sidecar agent on 15020".to_owned(),
            Self::NodeOrHostNetwork => format!(
                "exclude port {port} from inbound capture (traffic.sidecar.istio.io/excludeInboundPorts) or move the client into the mesh"
            ),
        }
    }

    /// Value of `client_workload` on the blocking counter (with `client_namespace="node"`).
    pub fn label(self) -> &'static str {
        match self {
            Self::KubeletProbe => "kubelet-probe",
            Self::NodeOrHostNetwork => "node",
        }
    }

    pub fn from_label(label: &str) -> Self {
        match label {
            "kubelet-probe" => Self::KubeletProbe,
            _ => Self::NodeOrHostNetwork,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerRef {
    pub workload: String,
    pub port: u16,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Blocker {
    pub client: ClientRef,
    pub server: ServerRef,
    pub security: String,
    pub connections: u64,
    /// RFC 3339, UTC.
    pub last_seen: String,
    /// The rule that decided the last such connection (e.g. `plaintext_first_bytes`).
    #[serde(default)]
    pub evidence: String,
    /// `istio` when the client offered an Istio ALPN but still is not compliant.
    #[serde(default)]
    pub mesh: String,
    /// Plaintext sub-protocol, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<String>,
    /// What to do, where the agent knows better than the generic advice (clients at the node's
    /// address).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub advice: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkloadReport {
    pub name: String,
    pub verdict: Readiness,
    pub inbound: Inbound,
    pub sidecar: bool,
    /// Istio-mTLS share of the judged inbound connections; null without any.
    pub mtls_ratio: Option<f64>,
    /// Inbound connections STRICT accepts (Istio mTLS, or any mTLS with --generic-mesh).
    #[serde(default)]
    pub compliant: u64,
    /// Inbound connections the server reset or closed right after the client's first bytes
    /// (what a sidecar in STRICT does to plaintext): already breaking, not only would-break.
    #[serde(default)]
    pub rejected: u64,
    /// Inbound connections seen in one direction only (counted as `unknown`, or `exempt`).
    #[serde(default)]
    pub one_direction: u64,
    /// Effective PeerAuthentication mode of the workload (Kubernetes mode; null otherwise).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<String>,
    /// Server ports that received judged inbound connections, with their effective mode.
    #[serde(default)]
    pub ports: Vec<PortReport>,
    /// The labels all of the workload's pods have (Kubernetes mode; `labels:` of the inventory),
    /// which a PeerAuthentication selector for it uses. Absent when unknown.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub labels: Option<std::collections::BTreeMap<String, String>>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortReport {
    pub port: u16,
    pub connections: u64,
    /// Effective PeerAuthentication mode for this port (`portLevelMtls` included); null without
    /// Kubernetes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    pub namespace: String,
    /// Set when the report was asked for one workload.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workload: Option<String>,
    pub window_seconds: u64,
    pub verdict: Readiness,
    pub inbound: Inbound,
    /// Istio-mTLS share of the judged (non-exempt) inbound connections; null without any.
    pub mtls_ratio: Option<f64>,
    #[serde(default)]
    pub compliant: u64,
    /// Inbound connections rejected right after the client's first bytes (see WorkloadReport).
    #[serde(default)]
    pub rejected: u64,
    /// Inbound connections the agents saw in one direction only: counted as `unknown` (or
    /// `exempt`) with evidence `one_direction`, never classified from their half.
    #[serde(default)]
    pub one_direction: u64,
    /// What the reader must know before trusting the verdict (`report` fills it, see
    /// [`warnings`]): e.g. that it rests on connections seen in one direction only.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
    /// The namespace's PeerAuthentication mode (Kubernetes mode; absent otherwise).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer_authentication: Option<String>,
    pub blockers: Vec<Blocker>,
    pub workloads: Vec<WorkloadReport>,
    /// The PeerAuthentications that can apply to the namespace: its own and the root
    /// namespace's (Kubernetes mode; absent otherwise). `report --assume-policy` adds to them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub peer_authentications: Vec<crate::policy::Rule>,
    /// `report --assume-policy`: what the assumed policies would reject.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub what_if: Option<crate::policy::whatif::WhatIf>,
    /// Cluster mode (`report` through the API server): which agent pods answered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nodes: Option<crate::cli::cluster::Nodes>,
}

/// The verdict rule of DESIGN.md: ready when judged inbound traffic was seen and none of it
/// would be rejected; traffic STRICT does not touch (exempt) alone is not evidence either way.
pub fn readiness(inbound: &Inbound, compliant: u64) -> Readiness {
    if inbound.judged() == 0 {
        Readiness::NoData
    } else if compliant >= inbound.judged() {
        Readiness::Ready
    } else {
        Readiness::NotReady
    }
}

/// Most connections first; ties by server, then client, so output is stable.
pub fn sort_blockers(blockers: &mut [Blocker]) {
    blockers.sort_by(|a, b| {
        b.connections
            .cmp(&a.connections)
            .then_with(|| a.server.workload.cmp(&b.server.workload))
            .then_with(|| a.server.port.cmp(&b.server.port))
            .then_with(|| a.client.namespace.cmp(&b.client.namespace))
            .then_with(|| a.client.workload.cmp(&b.client.workload))
            .then_with(|| a.client.address.cmp(&b.client.address))
            .then_with(|| a.security.cmp(&b.security))
    });
}

/// The warnings a report carries, from its counts (so every source, agent, Prometheus or the
/// cluster merge, gets the same): a verdict that rests on connections seen in one direction only
/// is not proof either way, since the missing half may hold what decides them.
pub fn warnings(r: &Report) -> Vec<String> {
    let mut w = Vec::new();
    if r.one_direction > 0 {
        let whom: Vec<&str> = r
            .workloads
            .iter()
            .filter(|w| w.one_direction > 0)
            .map(|w| w.name.as_str())
            .collect();
        w.push(format!(
            "partial sight: {} of {} inbound connections{} were seen in one direction only (counted as unknown, evidence one_direction): the verdict rests on one-direction data; make the agent see both directions (a CNI that redirects into pods past the host-side veth, e.g. Cilium's bpf_redirect_peer, hides one)",
            r.one_direction,
            r.inbound.judged() + r.inbound.exempt,
            if whom.is_empty() {
                String::new()
            } else {
                format!(" (to {})", whom.join(", "))
            },
        ));
    }
    w
}

pub fn ratio(inbound: &Inbound, compliant: u64) -> Option<f64> {
    let judged = inbound.judged();
    (judged > 0).then(|| compliant as f64 / judged as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verdict_rules() {
        let none = Inbound::default();
        assert_eq!(readiness(&none, 0), Readiness::NoData);
        let exempt_only = Inbound { exempt: 4, ..none };
        assert_eq!(readiness(&exempt_only, 0), Readiness::NoData);
        let good = Inbound {
            mtls: 3,
            exempt: 1,
            ..none
        };
        assert_eq!(readiness(&good, 3), Readiness::Ready);
        assert_eq!(ratio(&good, 3), Some(1.0));
        let non_istio_mtls = Inbound { mtls: 3, ..none };
        assert_eq!(readiness(&non_istio_mtls, 2), Readiness::NotReady);
        let mixed = Inbound {
            mtls: 1,
            plaintext: 1,
            ..none
        };
        assert_eq!(readiness(&mixed, 1), Readiness::NotReady);
        assert_eq!(ratio(&mixed, 1), Some(0.5));
        assert_eq!(ratio(&none, 0), None);
    }

    #[test]
    fn json_shape_is_the_contract() {
        let r = Report {
            namespace: "shop".into(),
            workload: None,
            window_seconds: 60,
            verdict: Readiness::NotReady,
            inbound: Inbound {
                plaintext: 2,
                ..Default::default()
            },
            mtls_ratio: Some(0.0),
            compliant: 0,
            rejected: 0,
            one_direction: 0,
            warnings: Vec::new(),
            peer_authentication: None,
            blockers: vec![Blocker {
                client: ClientRef {
                    namespace: None,
                    workload: None,
                    address: "198.18.0.9".into(),
                    kind: None,
                    description: None,
                },
                server: ServerRef {
                    workload: "web".into(),
                    port: 8080,
                },
                security: "plaintext".into(),
                connections: 2,
                last_seen: "2026-11-24T01:00:00Z".into(),
                evidence: "plaintext_first_bytes".into(),
                mesh: "none".into(),
                protocol: Some("http1".into()),
                advice: None,
            }],
            workloads: vec![],
            peer_authentications: vec![],
            what_if: None,
            nodes: None,
        };
        let v = serde_json::to_value(&r).unwrap();
        assert_eq!(v["verdict"], "not_ready");
        assert_eq!(v["inbound"]["plaintext"], 2);
        assert!(v["blockers"][0]["client"]["namespace"].is_null());
        assert_eq!(v["blockers"][0]["server"]["port"], 8080);
        assert!(v["blockers"][0]["client"].get("kind").is_none());
        assert!(v["blockers"][0].get("advice").is_none());
        let back: Report = serde_json::from_value(v).unwrap();
        assert_eq!(back, r);
        // A client at the node's address: the contract fields, plus who it is.
        let mut r = r;
        r.blockers[0].client = ClientRef::node("198.18.0.1".into(), NodeClient::KubeletProbe);
        r.blockers[0].advice = Some(NodeClient::KubeletProbe.advice(8080));
        let v = serde_json::to_value(&r).unwrap();
        let c = &v["blockers"][0]["client"];
        assert!(c["namespace"].is_null() && c["workload"].is_null());
        assert_eq!(c["address"], "198.18.0.1");
        assert_eq!(c["kind"], "node");
        assert_eq!(c["description"], "kubelet probe (rewriting disabled)");
        assert!(
            v["blockers"][0]["advice"]
                .as_str()
                .unwrap()
                .contains("rewriteAppHTTPProbers")
        );
        assert_eq!(serde_json::from_value::<Report>(v).unwrap(), r);
    }
}
