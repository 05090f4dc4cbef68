//! identity: who an address is — namespace, workload, sidecar — which addresses are the node
//! itself, and how a server pod's Istio data plane treats an inbound port (`inbound.rs`). Lookups
//! happen once per connection, not per packet.
//!
//! Two sources: the static inventory file (`inventory.rs`) or the Kubernetes API
//! (`kubernetes.rs`, the store, fed by `kubernetes_watch.rs`), which also knows the Istio
//! PeerAuthentication mode of every workload and port and the namespaces' injection labels.
pub mod coverage;
pub mod inbound;
pub mod inventory;
pub mod kubernetes;
pub mod kubernetes_watch;
pub mod node;

use std::{
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

use hashbrown::HashMap;
use ipnet::IpNet;

pub use inbound::InboundPort;
pub use inventory::{Inventory, InventoryError};
pub use kubernetes::{
    EffectiveMode, Injection, InjectionState, KubeConfig, KubeStore, Mode, ModeSource, PodIdentity,
    WorkloadKind,
};

/// A workload as the rest of the pipeline sees it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Workload {
    pub namespace: String,
    pub name: String,
    pub sidecar: bool,
}

/// Address → workload, by longest prefix.
#[derive(Debug, Default)]
pub struct Resolver {
    /// (network, workload), sorted by prefix length, longest first, so the first match wins.
    entries: Vec<(IpNet, Arc<Workload>)>,
    workloads: Vec<Arc<Workload>>,
    node: Vec<IpNet>,
    /// Inventory mode: workloads with excluded inbound ports or in ambient mode.
    inbound: HashMap<Arc<Workload>, (Box<[u16]>, bool)>,
    /// Inventory mode: `labels:` per (namespace, workload).
    labels: std::collections::HashMap<(String, String), std::collections::BTreeMap<String, String>>,
    /// Kubernetes mode: the API's pods, namespaces, nodes and PeerAuthentications.
    kube: Option<Box<KubeStore>>,
}

impl Resolver {
    pub fn from_inventory(inv: &Inventory) -> Self {
        let mut entries = Vec::new();
        let mut workloads = Vec::new();
        let mut inbound = HashMap::new();
        let mut labels = std::collections::HashMap::new();
        for w in &inv.workloads {
            if !w.labels.is_empty() {
                labels.insert((w.namespace.clone(), w.name.clone()), w.labels.clone());
            }
            let wl = Arc::new(Workload {
                namespace: w.namespace.clone(),
                name: w.name.clone(),
                sidecar: w.sidecar,
            });
            if !w.exclude_inbound_ports.is_empty() || w.ambient {
                inbound.insert(
                    wl.clone(),
                    (w.exclude_inbound_ports.clone().into(), w.ambient),
                );
            }
            for net in &w.networks {
                entries.push((*net, wl.clone()));
            }
            workloads.push(wl);
        }
        entries.sort_by_key(|(net, _)| std::cmp::Reverse(net.prefix_len()));
        Self {
            entries,
            workloads,
            node: inv.node_networks.clone(),
            inbound,
            labels,
            kube: None,
        }
    }

    /// Kubernetes mode: identities from a store the API watchers fill (see
    /// `kubernetes_watch::KubeWatch`).
    pub fn from_kube(store: KubeStore) -> Self {
        Self {
            kube: Some(Box::new(store)),
            ..Self::default()
        }
    }

    /// The labels a PeerAuthentication selector for the workload matches: its pods' common
    /// labels (Kubernetes mode) or the inventory's `labels:`. `None` when unknown.
    pub fn labels(
        &self,
        namespace: &str,
        workload: &str,
    ) -> Option<std::collections::BTreeMap<String, String>> {
        match &self.kube {
            Some(k) => k.selector_labels(namespace, workload),
            None => self
                .labels
                .get(&(namespace.to_owned(), workload.to_owned()))
                .cloned(),
        }
    }

    /// The Kubernetes store, in Kubernetes mode.
    pub fn kube(&self) -> Option<&KubeStore> {
        self.kube.as_deref()
    }

    pub fn kube_mut(&mut self) -> Option<&mut KubeStore> {
        self.kube.as_deref_mut()
    }

    pub fn lookup(&self, ip: IpAddr) -> Option<&Arc<Workload>> {
        let ip = canonical(ip);
        if let Some(w) = self.kube.as_ref().and_then(|k| k.lookup(ip)) {
            return Some(w);
        }
        self.entries
            .iter()
            .find(|(net, _)| net.contains(&ip))
            .map(|(_, w)| w)
    }

    /// Every workload known, for reports that list workloads without traffic. In Kubernetes
    /// mode: the workloads with a pod on this node.
    pub fn workloads(&self) -> &[Arc<Workload>] {
        match &self.kube {
            Some(k) => k.local_workloads(),
            None => &self.workloads,
        }
    }

    /// Namespaces with a known workload; in Kubernetes mode also every Namespace object.
    pub fn namespaces(&self) -> std::collections::BTreeSet<&str> {
        let mut out: std::collections::BTreeSet<&str> = self
            .workloads()
            .iter()
            .map(|w| w.namespace.as_str())
            .collect();
        if let Some(k) = &self.kube {
            out.extend(k.namespace_names());
        }
        out
    }

    /// The effective Istio PeerAuthentication mode of `workload` in `namespace` for server
    /// `port` (workload port-level → workload → namespace → mesh → PERMISSIVE; never `Unset`).
    /// `None` outside Kubernetes mode or for an unknown namespace.
    pub fn mode(&self, namespace: &str, workload: &str, port: u16) -> Option<Mode> {
        self.kube()?
            .effective_mode(namespace, Some(workload), Some(port))
            .map(|m| m.mode)
    }

    /// The namespace-level mode (namespace → mesh → PERMISSIVE), ignoring workload policies.
    pub fn namespace_mode(&self, namespace: &str) -> Option<Mode> {
        self.kube()?
            .effective_mode(namespace, None, None)
            .map(|m| m.mode)
    }

    /// The mode that applies to a connection to `server` (the pod's own labels select the
    /// workload policy). `None` outside Kubernetes mode or when the address is not a pod.
    pub fn mode_for(&self, server: std::net::SocketAddr) -> Option<Mode> {
        self.kube()?
            .effective_mode_for_ip(server.ip(), server.port())
            .map(|m| m.mode)
    }

    /// The full answer: mode, deciding level and policy name.
    pub fn effective_mode(
        &self,
        namespace: &str,
        workload: Option<&str>,
        port: Option<u16>,
    ) -> Option<EffectiveMode> {
        self.kube()?.effective_mode(namespace, workload, port)
    }

    /// The namespace's injection labels (`istio-injection`, `istio.io/rev`,
    /// `istio.io/dataplane-mode`). `None` outside Kubernetes mode or for an unknown namespace.
    pub fn injection(&self, namespace: &str) -> Option<&Injection> {
        self.kube()?.injection(namespace)
    }

    /// Pod, service account and SPIFFE ID behind an address (Kubernetes mode).
    pub fn pod(&self, ip: IpAddr) -> Option<PodIdentity> {
        self.kube()?.pod(ip)
    }

    /// Sets the node's own addresses (detected plus configured).
    pub fn set_node_networks(&mut self, nets: Vec<IpNet>) {
        self.node = nets;
    }

    /// Whether `ip` is this node (its addresses, or the source ambient gives its probes).
    pub fn is_node(&self, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        ip == inbound::AMBIENT_PROBE_SOURCE
            || self.node.iter().any(|n| n.contains(&ip))
            || self.kube.as_ref().is_some_and(|k| k.is_local_node(ip))
    }

    /// How the server behind `server` treats its inbound port (Kubernetes: the pod's
    /// annotations, labels and spec; inventory: `exclude_inbound_ports` and `ambient`).
    /// The default (everything captured, sidecar mode) for unknown servers.
    pub fn inbound_port(&self, server: SocketAddr) -> InboundPort {
        if let Some(p) = self
            .kube
            .as_ref()
            .and_then(|k| k.inbound_port(server.ip(), server.port()))
        {
            return p;
        }
        match self.lookup(server.ip()).and_then(|w| self.inbound.get(w)) {
            Some((excluded, ambient)) => InboundPort {
                excluded: excluded.contains(&server.port()),
                ambient: *ambient,
                unrewritten_probe: false,
            },
            None => InboundPort::default(),
        }
    }
}

/// IPv4-mapped IPv6 addresses are IPv4 for lookup purposes.
pub(crate) fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn longest_prefix_wins_and_node_is_known() {
        let inv = Inventory::parse(
            "workloads:\n  - {namespace: a, name: wide, addresses: [198.18.0.0/16]}\n  - {namespace: b, name: narrow, addresses: [198.18.1.7, \"2001:db8::7\"]}\nnode_addresses: [198.18.0.1]\n",
        )
        .unwrap();
        let r = Resolver::from_inventory(&inv);
        assert_eq!(
            r.lookup("198.18.1.7".parse().unwrap()).unwrap().name,
            "narrow"
        );
        assert_eq!(
            r.lookup("198.18.1.8".parse().unwrap()).unwrap().name,
            "wide"
        );
        assert_eq!(
            r.lookup("::ffff:198.18.1.7".parse().unwrap()).unwrap().name,
            "narrow"
        );
        assert_eq!(
            r.lookup("2001:db8::7".parse().unwrap()).unwrap().namespace,
            "b"
        );
        assert!(r.lookup("203.0.113.1".parse().unwrap()).is_none());
        assert!(r.is_node("198.18.0.1".parse().unwrap()));
        assert!(!r.is_node("198.18.0.2".parse().unwrap()));
        assert!(
            r.is_node("169.254.7.127".parse().unwrap()),
            "ambient's probe source"
        );
        assert_eq!(r.namespaces().into_iter().collect::<Vec<_>>(), ["a", "b"]);
    }

    #[test]
    fn inventory_exclusions_and_ambient() {
        let inv = Inventory::parse(
            "workloads:\n  - {namespace: a, name: x, addresses: [198.18.1.1], exclude_inbound_ports: [9000]}\n  - {namespace: a, name: y, addresses: [198.18.1.2], ambient: true}\n  - {namespace: b, name: z, addresses: [198.18.1.3]}\nambient_namespaces: [b]\n",
        )
        .unwrap();
        let r = Resolver::from_inventory(&inv);
        let at = |s: &str| r.inbound_port(s.parse().unwrap());
        assert!(at("198.18.1.1:9000").excluded && !at("198.18.1.1:9000").ambient);
        assert!(!at("198.18.1.1:8080").excluded);
        assert!(at("198.18.1.2:8080").ambient && !at("198.18.1.2:8080").excluded);
        assert!(at("198.18.1.3:8080").ambient, "namespace-wide");
        assert_eq!(at("203.0.113.1:80"), InboundPort::default());
    }
}
