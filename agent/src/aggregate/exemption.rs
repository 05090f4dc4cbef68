//! Which inbound connections STRICT leaves alone (DESIGN.md "Readiness for STRICT"): judged by
//! what Istio does not enforce, never by who the client is. A connection from the node to an
//! app port is judged like any other (Istio rewrites kubelet probes to 15020 precisely because a
//! probe to an app port fails under STRICT); when it blocks, [`node_client`] says who it is.
use std::{collections::BTreeSet, net::SocketAddr};

use super::report::NodeClient;
use crate::identity::Resolver;

/// Why STRICT does not touch an inbound connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exemption {
    /// One of Istio's own ports (15020, 15021, 15090) or an `--exempt-port`.
    IstioPort,
    /// The server's sidecar does not capture the port (`excludeInboundPorts`,
    /// `includeInboundPorts`, or the inventory's `exclude_inbound_ports`).
    NotCaptured,
    /// The node probing an ambient-mode pod: ambient lets the kubelet's probes through.
    AmbientNodeProbe,
}

/// The exemption of a connection from `client` to `server`, if it has one.
pub fn exemption(
    exempt_ports: &BTreeSet<u16>,
    resolver: &Resolver,
    client: SocketAddr,
    server: SocketAddr,
) -> Option<Exemption> {
    if exempt_ports.contains(&server.port()) {
        return Some(Exemption::IstioPort);
    }
    let port = resolver.inbound_port(server);
    if port.excluded {
        Some(Exemption::NotCaptured)
    } else if port.ambient && resolver.is_node(client.ip()) {
        Some(Exemption::AmbientNodeProbe)
    } else {
        None
    }
}

/// For a judged connection: which kind of client at the node's address sent it, or `None` when
/// the client is not the node.
pub fn node_client(
    resolver: &Resolver,
    client: SocketAddr,
    server: SocketAddr,
) -> Option<NodeClient> {
    resolver.is_node(client.ip()).then(|| {
        if resolver.inbound_port(server).unrewritten_probe {
            NodeClient::KubeletProbe
        } else {
            NodeClient::NodeOrHostNetwork
        }
    })
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::{
        aggregate::DEFAULT_EXEMPT_PORTS,
        identity::{Inventory, KubeConfig, KubeStore},
    };

    fn ports() -> BTreeSet<u16> {
        DEFAULT_EXEMPT_PORTS.into_iter().chain([9999]).collect()
    }

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn inventory_sources() {
        let inv = Inventory::parse(
            "workloads:\n  - {namespace: a, name: web, addresses: [198.18.0.20], exclude_inbound_ports: [9000]}\n  - {namespace: amb, name: log, addresses: [198.18.0.50]}\nambient_namespaces: [amb]\nnode_addresses: [198.18.0.1]\n",
        )
        .unwrap();
        let r = Resolver::from_inventory(&inv);
        let (node, pod) = (sa("198.18.0.1:40000"), sa("198.18.0.30:40000"));
        let ex = |c, s: &str| exemption(&ports(), &r, c, sa(s));
        // Istio's ports and --exempt-port, from anyone.
        assert_eq!(ex(node, "198.18.0.20:15021"), Some(Exemption::IstioPort));
        assert_eq!(ex(pod, "198.18.0.20:15090"), Some(Exemption::IstioPort));
        assert_eq!(ex(pod, "198.18.0.20:9999"), Some(Exemption::IstioPort));
        // A port the sidecar does not capture, from anyone.
        assert_eq!(ex(pod, "198.18.0.20:9000"), Some(Exemption::NotCaptured));
        // The node to an app port: judged, and named when it blocks.
        assert_eq!(ex(node, "198.18.0.20:8080"), None);
        assert_eq!(
            node_client(&r, node, sa("198.18.0.20:8080")),
            Some(NodeClient::NodeOrHostNetwork)
        );
        assert_eq!(node_client(&r, pod, sa("198.18.0.20:8080")), None);
        // Ambient: the node's probes pass (also from ambient's SNAT source), pods are judged.
        assert_eq!(
            ex(node, "198.18.0.50:8080"),
            Some(Exemption::AmbientNodeProbe)
        );
        assert_eq!(
            ex(sa("169.254.7.127:40000"), "198.18.0.50:8080"),
            Some(Exemption::AmbientNodeProbe)
        );
        assert_eq!(ex(pod, "198.18.0.50:8080"), None);
    }

    #[test]
    fn kubernetes_sources() {
        let mut store = KubeStore::new(KubeConfig {
            node_name: Some("node-a".into()),
            ..KubeConfig::default()
        });
        store.apply_node(
            &serde_json::from_value(json!({"metadata": {"name": "node-a"},
                "status": {"addresses": [{"type": "InternalIP", "address": "198.18.0.1"}]}}))
            .unwrap(),
        );
        store.apply_namespace(
            &serde_json::from_value(json!({"metadata": {"name": "amb",
                "labels": {"istio.io/dataplane-mode": "ambient"}}}))
            .unwrap(),
        );
        let pod = |ns: &str, name: &str, ip: &str, ann: serde_json::Value, labels, sidecar| {
            let mut containers = vec![json!({"name": "app",
                "readinessProbe": {"httpGet": {"port": 8080, "path": "/ready"}}})];
            if sidecar {
                containers.push(json!({"name": "istio-proxy"}));
            }
            serde_json::from_value(json!({
                "metadata": {"namespace": ns, "name": name, "annotations": ann, "labels": labels},
                "spec": {"nodeName": "node-a", "containers": containers},
                "status": {"podIP": ip, "phase": "Running"}
            }))
            .unwrap()
        };
        let none = json!({});
        store.apply_pod(&pod(
            "shop",
            "web",
            "198.18.0.20",
            json!({"sidecar.istio.io/rewriteAppHTTPProbers": "false",
                   "traffic.sidecar.istio.io/excludeInboundPorts": "9000"}),
            none.clone(),
            true,
        ));
        store.apply_pod(&pod(
            "shop",
            "api",
            "198.18.0.21",
            json!({"traffic.sidecar.istio.io/includeInboundPorts": "8443,8080",
                   "sidecar.istio.io/status": "{}"}),
            none.clone(),
            true,
        ));
        store.apply_pod(&pod(
            "amb",
            "log",
            "198.18.0.50",
            none.clone(),
            none.clone(),
            false,
        ));
        // An ambient namespace, but the pod opted out; and one with a sidecar.
        store.apply_pod(&pod(
            "amb",
            "out",
            "198.18.0.51",
            none.clone(),
            json!({"istio.io/dataplane-mode": "none"}),
            false,
        ));
        store.apply_pod(&pod(
            "amb",
            "sc",
            "198.18.0.52",
            none.clone(),
            none.clone(),
            true,
        ));
        // Ambient by the pod's own label.
        store.apply_pod(&pod(
            "shop",
            "zt",
            "198.18.0.60",
            none.clone(),
            json!({"istio.io/dataplane-mode": "ambient"}),
            false,
        ));
        let r = Resolver::from_kube(store);
        let (node, pod) = (sa("198.18.0.1:40000"), sa("198.18.0.30:40000"));
        let ex = |c, s: &str| exemption(&ports(), &r, c, sa(s));
        assert_eq!(ex(node, "198.18.0.20:15021"), Some(Exemption::IstioPort));
        assert_eq!(ex(pod, "198.18.0.20:9000"), Some(Exemption::NotCaptured));
        assert_eq!(ex(pod, "198.18.0.21:9090"), Some(Exemption::NotCaptured));
        assert_eq!(ex(pod, "198.18.0.21:8443"), None);
        assert_eq!(ex(node, "198.18.0.20:8080"), None);
        assert_eq!(
            node_client(&r, node, sa("198.18.0.20:8080")),
            Some(NodeClient::KubeletProbe),
            "a probe on 8080 with rewriting off"
        );
        assert_eq!(
            node_client(&r, node, sa("198.18.0.20:8081")),
            Some(NodeClient::NodeOrHostNetwork)
        );
        assert_eq!(
            node_client(&r, node, sa("198.18.0.21:8080")),
            Some(NodeClient::KubeletProbe),
            "injected, and the probe was left on an app port"
        );
        assert_eq!(
            ex(node, "198.18.0.50:8080"),
            Some(Exemption::AmbientNodeProbe)
        );
        assert_eq!(ex(pod, "198.18.0.50:8080"), None);
        assert_eq!(ex(node, "198.18.0.51:8080"), None, "opted out of ambient");
        assert_eq!(ex(node, "198.18.0.52:8080"), None, "the sidecar enforces");
        assert_eq!(
            ex(node, "198.18.0.60:8080"),
            Some(Exemption::AmbientNodeProbe)
        );
    }
}
