//! The agent's static inventory file (see "Contracts" in the design brief), generated from the
//! test bed's pods so that tests and the demo cannot drift from the addresses they really use.

use std::fmt::Write as _;
use std::net::IpAddr;
use std::path::Path;

use anyhow::{Context, Result};

use crate::netns::Pod;

/// One workload of the inventory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Workload {
    /// Kubernetes namespace, e.g. `shop`.
    pub namespace: String,
    /// Workload name, e.g. `web`.
    pub name: String,
    /// Addresses (or CIDRs) of all its pods.
    pub addresses: Vec<String>,
    /// Whether its pods have an Istio sidecar.
    pub sidecar: bool,
    /// Ports its sidecar does not capture (`exclude_inbound_ports`).
    pub exclude_inbound_ports: Vec<u16>,
    /// In Istio ambient mode (`ambient: true`).
    pub ambient: bool,
}

impl Workload {
    /// A workload made of the given pods, with a sidecar.
    pub fn new(namespace: &str, name: &str, pods: &[&Pod]) -> Self {
        Workload {
            namespace: namespace.to_string(),
            name: name.to_string(),
            addresses: pods
                .iter()
                .flat_map(|p| p.addresses())
                .map(|a: IpAddr| a.to_string())
                .collect(),
            sidecar: true,
            exclude_inbound_ports: Vec::new(),
            ambient: false,
        }
    }

    /// Marks the workload as running without a sidecar.
    pub fn without_sidecar(mut self) -> Self {
        self.sidecar = false;
        self
    }

    /// Excludes `ports` from the sidecar's inbound capture.
    pub fn exclude_inbound_ports(mut self, ports: &[u16]) -> Self {
        self.exclude_inbound_ports = ports.to_vec();
        self
    }

    /// Puts the workload in ambient mode (ztunnel, no sidecar).
    pub fn ambient(mut self) -> Self {
        self.sidecar = false;
        self.ambient = true;
        self
    }
}

/// Renders the inventory YAML.
pub fn inventory_yaml(workloads: &[Workload]) -> String {
    let mut y = String::from("workloads:\n");
    for w in workloads {
        let addrs: Vec<String> = w.addresses.iter().map(|a| format!("\"{a}\"")).collect();
        let _ = write!(
            y,
            "  - namespace: {}\n    name: {}\n    addresses: [{}]\n    sidecar: {}\n",
            w.namespace,
            w.name,
            addrs.join(", "),
            w.sidecar
        );
        if !w.exclude_inbound_ports.is_empty() {
            let ports: Vec<String> = w.exclude_inbound_ports.iter().map(u16::to_string).collect();
            let _ = writeln!(y, "    exclude_inbound_ports: [{}]", ports.join(", "));
        }
        if w.ambient {
            y.push_str("    ambient: true\n");
        }
    }
    y
}

/// Writes the inventory YAML to `path`.
pub fn write_inventory(path: &Path, workloads: &[Workload]) -> Result<()> {
    std::fs::write(path, inventory_yaml(workloads))
        .with_context(|| format!("writing inventory {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_design_format() {
        let w = Workload {
            namespace: "shop".into(),
            name: "web".into(),
            addresses: vec!["198.18.0.2".into(), "2001:db8::2".into()],
            sidecar: true,
            exclude_inbound_ports: Vec::new(),
            ambient: false,
        };
        let legacy = Workload {
            namespace: "legacy".into(),
            name: "batch".into(),
            addresses: vec!["198.18.0.3".into()],
            sidecar: false,
            exclude_inbound_ports: vec![9000, 9001],
            ambient: true,
        };
        assert_eq!(
            inventory_yaml(&[w, legacy]),
            "workloads:\n  - namespace: shop\n    name: web\n    addresses: [\"198.18.0.2\", \
             \"2001:db8::2\"]\n    sidecar: true\n  - namespace: legacy\n    name: batch\n    \
             addresses: [\"198.18.0.3\"]\n    sidecar: false\n    exclude_inbound_ports: [9000, \
             9001]\n    ambient: true\n"
        );
    }
}
