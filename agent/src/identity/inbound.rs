//! What a server pod's Istio data plane leaves alone on an inbound port, so that readiness exempts
//! exactly what STRICT does not touch (DESIGN.md "Readiness for STRICT") and nothing by source:
//!
//! - ports the sidecar does not capture (`traffic.sidecar.istio.io/excludeInboundPorts`, ports
//!   outside `traffic.sidecar.istio.io/includeInboundPorts`; in inventory mode a per-workload
//!   list): no sidecar sees them, so no PeerAuthentication applies;
//! - in ambient mode, the node's own connections (kubelet probes): istio-cni lets them through;
//! - and, to name a blocker from the node: the ports of kubelet probes Istio did not rewrite.
//!   Istio rewrites HTTP, TCP and gRPC probes to the sidecar agent on 15020 (a port STRICT does
//!   not guard), because the kubelet has no Istio certificate; a probe left on an app port is
//!   rejected under STRICT.
use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr},
};

use k8s_openapi::{
    api::core::v1::{Container, Pod, Probe},
    apimachinery::pkg::util::intstr::IntOrString,
};

/// Istio ambient's istio-cni SNATs the kubelet's probes of ambient pods to this link-local
/// address, so that the in-pod redirection can let them through: a probe source like the node's
/// own addresses.
pub const AMBIENT_PROBE_SOURCE: IpAddr = IpAddr::V4(Ipv4Addr::new(169, 254, 7, 127));

const EXCLUDE_INBOUND: &str = "traffic.sidecar.istio.io/excludeInboundPorts";
const INCLUDE_INBOUND: &str = "traffic.sidecar.istio.io/includeInboundPorts";
const REWRITE_PROBES: &str = "sidecar.istio.io/rewriteAppHTTPProbers";
/// Set by Istio's injector on every pod it injected.
const INJECTED: &str = "sidecar.istio.io/status";
/// Pod or namespace label: `ambient` enrols in ambient mode, `none` (on a pod) opts out.
pub const DATAPLANE_MODE: &str = "istio.io/dataplane-mode";

/// How the server's data plane treats one inbound port, as far as STRICT goes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct InboundPort {
    /// The sidecar does not capture the port: STRICT never sees its connections.
    pub excluded: bool,
    /// The pod is in ambient mode (ztunnel, no sidecar): the node's probes pass untouched.
    pub ambient: bool,
    /// The pod spec has an HTTP/TCP/gRPC probe on the port that Istio did not rewrite.
    pub unrewritten_probe: bool,
}

/// A pod's inbound capture settings and unrewritten probe ports, from its annotations and spec.
/// Most pods have none (the default); the store keeps one shared copy per distinct value.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct InboundCapture {
    /// `excludeInboundPorts`, sorted.
    pub exclude: Box<[u16]>,
    /// `includeInboundPorts` unless it is `*` (the default); sorted. Empty: nothing captured.
    pub include: Option<Box<[u16]>>,
    /// Ports of the app containers' probes, when Istio left them unrewritten; sorted.
    pub probe_ports: Box<[u16]>,
}

impl InboundCapture {
    pub fn is_default(&self) -> bool {
        *self == Self::default()
    }

    /// Whether the sidecar captures (and so judges) inbound connections to `port`.
    pub fn captures(&self, port: u16) -> bool {
        self.exclude.binary_search(&port).is_err()
            && self
                .include
                .as_ref()
                .is_none_or(|i| i.binary_search(&port).is_ok())
    }

    pub fn probe_on(&self, port: u16) -> bool {
        self.probe_ports.binary_search(&port).is_ok()
    }

    /// Reads the capture annotations and the probes of a Pod object.
    ///
    /// A probe counts as unrewritten when the pod says `rewriteAppHTTPProbers: "false"`, or when
    /// Istio's injector ran on the pod (`sidecar.istio.io/status`) and still left a probe on an
    /// app port: with rewriting on (the default) the injector points every HTTP/TCP/gRPC probe
    /// at 15020, so an app port there means rewriting was off, by annotation or mesh-wide.
    pub fn from_pod(pod: &Pod) -> Self {
        let empty = BTreeMap::new();
        let ann = pod.metadata.annotations.as_ref().unwrap_or(&empty);
        let exclude = ann
            .get(EXCLUDE_INBOUND)
            .map(|v| port_list(v))
            .unwrap_or_default();
        let include = ann
            .get(INCLUDE_INBOUND)
            .filter(|v| v.trim() != "*")
            .map(|v| port_list(v));
        let unrewritten = ann
            .get(REWRITE_PROBES)
            .is_some_and(|v| v.trim().eq_ignore_ascii_case("false"))
            || ann.contains_key(INJECTED);
        let mut probe_ports: Vec<u16> = Vec::new();
        if unrewritten && let Some(spec) = &pod.spec {
            for c in spec.containers.iter().filter(|c| c.name != "istio-proxy") {
                for p in [&c.liveness_probe, &c.readiness_probe, &c.startup_probe]
                    .into_iter()
                    .flatten()
                {
                    probe_ports.extend(probe_port(c, p));
                }
            }
        }
        probe_ports.sort_unstable();
        probe_ports.dedup();
        Self {
            exclude,
            include,
            probe_ports: probe_ports.into(),
        }
    }
}

/// `"9000, 9001"` → sorted ports; entries that are not ports are skipped (Istio's injector
/// refuses such a pod, so none reaches a running sidecar).
fn port_list(v: &str) -> Box<[u16]> {
    let mut ports: Vec<u16> = v
        .split(',')
        .filter_map(|p| p.trim().parse::<u16>().ok())
        .filter(|p| *p != 0)
        .collect();
    ports.sort_unstable();
    ports.dedup();
    ports.into()
}

/// The port an HTTP, TCP or gRPC probe targets (a named port resolved among the container's
/// ports); `None` for exec probes and names that resolve to nothing.
fn probe_port(c: &Container, p: &Probe) -> Option<u16> {
    let port = if let Some(h) = &p.http_get {
        &h.port
    } else if let Some(t) = &p.tcp_socket {
        &t.port
    } else if let Some(g) = &p.grpc {
        return u16::try_from(g.port).ok();
    } else {
        return None;
    };
    match port {
        IntOrString::Int(n) => u16::try_from(*n).ok(),
        IntOrString::String(name) => c
            .ports
            .iter()
            .flatten()
            .find(|cp| cp.name.as_deref() == Some(name.as_str()))
            .and_then(|cp| u16::try_from(cp.container_port).ok()),
    }
}

/// Ambient mode for a pod: its own `istio.io/dataplane-mode` label (`ambient`, or `none` to opt
/// out), else its namespace's; never for a pod with a sidecar (the sidecar takes precedence).
pub fn ambient(sidecar: bool, pod_label: Option<&str>, namespace_label: Option<&str>) -> bool {
    !sidecar
        && match pod_label {
            Some("ambient") => true,
            Some("none") => false,
            _ => namespace_label == Some("ambient"),
        }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn capture(v: serde_json::Value) -> InboundCapture {
        InboundCapture::from_pod(&serde_json::from_value(v).unwrap())
    }

    #[test]
    fn capture_annotations() {
        let c = capture(json!({"metadata": {"annotations": {
            EXCLUDE_INBOUND: "9000, 9100,bogus,0",
        }}}));
        assert_eq!(&*c.exclude, [9000, 9100]);
        assert!(!c.captures(9000) && !c.captures(9100) && c.captures(8080));
        let c = capture(json!({"metadata": {"annotations": {INCLUDE_INBOUND: "8080,8443"}}}));
        assert!(c.captures(8080) && c.captures(8443) && !c.captures(9090));
        let c = capture(json!({"metadata": {"annotations": {INCLUDE_INBOUND: " * "}}}));
        assert!(c.is_default() && c.captures(1));
        let c = capture(json!({"metadata": {"annotations": {INCLUDE_INBOUND: ""}}}));
        assert!(!c.captures(8080), "an empty include list captures nothing");
        assert!(capture(json!({"metadata": {}})).is_default());
    }

    fn probed(annotations: serde_json::Value) -> InboundCapture {
        capture(json!({
            "metadata": {"annotations": annotations},
            "spec": {"containers": [
                {"name": "app",
                 "ports": [{"name": "http", "containerPort": 8080}, {"containerPort": 9090}],
                 "readinessProbe": {"httpGet": {"port": "http", "path": "/ready"}},
                 "livenessProbe": {"tcpSocket": {"port": 9090}},
                 "startupProbe": {"exec": {"command": ["true"]}}},
                {"name": "rpc", "livenessProbe": {"grpc": {"port": 7070}}},
                {"name": "istio-proxy",
                 "readinessProbe": {"httpGet": {"port": 15021, "path": "/healthz/ready"}}}
            ]}
        }))
    }

    #[test]
    fn probe_rewrite_detection_from_the_pod_spec() {
        // Rewriting off by annotation: every app probe port, named ports resolved, no exec.
        let off = probed(json!({REWRITE_PROBES: "false"}));
        assert_eq!(&*off.probe_ports, [7070, 8080, 9090]);
        assert!(off.probe_on(8080) && !off.probe_on(15021));
        // Injected, and a probe still on an app port: rewriting was off mesh-wide.
        let mesh_off = probed(json!({INJECTED: "{}"}));
        assert_eq!(&*mesh_off.probe_ports, [7070, 8080, 9090]);
        // Neither: no sidecar rewrote anything, and none judges the probes.
        assert!(probed(json!({})).is_default());
        assert!(probed(json!({REWRITE_PROBES: "true"})).is_default());
        // Injected with rewriting on: the injector moved the probe to 15020, an Istio port.
        let rewritten = capture(json!({
            "metadata": {"annotations": {INJECTED: "{}"}},
            "spec": {"containers": [{"name": "app",
                "readinessProbe": {"httpGet": {"port": 15020, "path": "/app-health/app/readyz"}}}]}
        }));
        assert!(!rewritten.probe_on(8080));
    }

    #[test]
    fn ambient_mode() {
        assert!(ambient(false, None, Some("ambient")));
        assert!(ambient(false, Some("ambient"), None));
        assert!(!ambient(false, Some("none"), Some("ambient")), "opted out");
        assert!(!ambient(true, None, Some("ambient")), "the sidecar wins");
        assert!(!ambient(false, None, None));
    }
}
