//! identity: who an address is — namespace, workload, sidecar — and which addresses are the node
//! itself (kubelet probes). Lookups happen once per connection, not per packet.
pub mod inventory;
pub mod node;

use std::{net::IpAddr, sync::Arc};

use ipnet::IpNet;

pub use inventory::{Inventory, InventoryError};

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
}

impl Resolver {
    pub fn from_inventory(inv: &Inventory) -> Self {
        let mut entries = Vec::new();
        let mut workloads = Vec::new();
        for w in &inv.workloads {
            let wl = Arc::new(Workload {
                namespace: w.namespace.clone(),
                name: w.name.clone(),
                sidecar: w.sidecar,
            });
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
        }
    }

    pub fn lookup(&self, ip: IpAddr) -> Option<&Arc<Workload>> {
        let ip = canonical(ip);
        self.entries
            .iter()
            .find(|(net, _)| net.contains(&ip))
            .map(|(_, w)| w)
    }

    /// Every workload known, for reports that list workloads without traffic.
    pub fn workloads(&self) -> &[Arc<Workload>] {
        &self.workloads
    }

    pub fn namespaces(&self) -> std::collections::BTreeSet<&str> {
        self.workloads.iter().map(|w| w.namespace.as_str()).collect()
    }

    /// Sets the node's own addresses (detected plus configured).
    pub fn set_node_networks(&mut self, nets: Vec<IpNet>) {
        self.node = nets;
    }

    pub fn is_node(&self, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        self.node.iter().any(|n| n.contains(&ip))
    }
}

/// IPv4-mapped IPv6 addresses are IPv4 for lookup purposes.
fn canonical(ip: IpAddr) -> IpAddr {
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
        assert_eq!(r.lookup("198.18.1.7".parse().unwrap()).unwrap().name, "narrow");
        assert_eq!(r.lookup("198.18.1.8".parse().unwrap()).unwrap().name, "wide");
        assert_eq!(r.lookup("::ffff:198.18.1.7".parse().unwrap()).unwrap().name, "narrow");
        assert_eq!(r.lookup("2001:db8::7".parse().unwrap()).unwrap().namespace, "b");
        assert!(r.lookup("203.0.113.1".parse().unwrap()).is_none());
        assert!(r.is_node("198.18.0.1".parse().unwrap()));
        assert!(!r.is_node("198.18.0.2".parse().unwrap()));
        assert_eq!(r.namespaces().into_iter().collect::<Vec<_>>(), ["a", "b"]);
    }
}
