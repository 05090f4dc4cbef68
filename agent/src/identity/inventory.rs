//! The static inventory file: which addresses belong to which namespace/workload, and whether the
//! workload has a sidecar. Validated completely at load, so a typo is a one-line error naming the
//! file and the entry, never a silently unattributed workload.
use std::{net::IpAddr, path::Path};

use ipnet::IpNet;
use serde::Deserialize;

#[derive(Debug, thiserror::Error)]
pub enum InventoryError {
    #[error("inventory {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("inventory {path}: {message}")]
    Invalid { path: String, message: String },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawInventory {
    #[serde(default)]
    workloads: Vec<RawWorkload>,
    /// Extra addresses of the node itself; the agent also detects its own.
    #[serde(default)]
    node_addresses: Vec<String>,
    /// Namespaces in Istio ambient mode (every workload in them is `ambient: true`).
    #[serde(default)]
    ambient_namespaces: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWorkload {
    namespace: String,
    name: String,
    addresses: Vec<String>,
    /// Default: true, except in ambient mode (ambient pods have no sidecar).
    #[serde(default)]
    sidecar: Option<bool>,
    /// Ports the sidecar does not capture (`traffic.sidecar.istio.io/excludeInboundPorts`).
    #[serde(default)]
    exclude_inbound_ports: Vec<u16>,
    /// Istio ambient mode (ztunnel): the node's own connections (kubelet probes) pass.
    #[serde(default)]
    ambient: bool,
}

/// One workload of the inventory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkloadSpec {
    pub namespace: String,
    pub name: String,
    pub networks: Vec<IpNet>,
    pub sidecar: bool,
    /// Inbound ports STRICT does not see (not captured by the sidecar), sorted.
    pub exclude_inbound_ports: Vec<u16>,
    /// In ambient mode, by its own flag or its namespace's.
    pub ambient: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Inventory {
    pub workloads: Vec<WorkloadSpec>,
    pub node_networks: Vec<IpNet>,
}

/// An address or CIDR; a bare address is a host prefix.
fn parse_net(s: &str) -> Option<IpNet> {
    let s = s.trim();
    if let Ok(net) = s.parse::<IpNet>() {
        return Some(net);
    }
    s.parse::<IpAddr>().ok().map(IpNet::from)
}

/// Kubernetes-style names: what a namespace or workload label may hold.
fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && s.as_bytes()[0].is_ascii_alphanumeric()
}

impl Inventory {
    pub fn load(path: &Path) -> Result<Self, InventoryError> {
        let display = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| InventoryError::Read {
            path: display.clone(),
            source,
        })?;
        Self::parse(&text).map_err(|message| InventoryError::Invalid {
            path: display,
            message,
        })
    }

    /// Parses and validates; the error is one line.
    pub fn parse(text: &str) -> Result<Self, String> {
        let raw: RawInventory = if text.trim().is_empty() {
            return Err("file is empty (expected a `workloads:` list)".into());
        } else {
            serde_yaml::from_str(text).map_err(|e| one_line(&e.to_string()))?
        };
        for (j, ns) in raw.ambient_namespaces.iter().enumerate() {
            if !valid_name(ns) {
                return Err(format!(
                    "ambient_namespaces[{j}]: {ns:?} is not a valid Kubernetes name"
                ));
            }
        }
        let mut workloads = Vec::with_capacity(raw.workloads.len());
        let mut seen = std::collections::HashSet::new();
        for (i, w) in raw.workloads.into_iter().enumerate() {
            let at = format!("workloads[{i}]");
            if !valid_name(&w.namespace) {
                return Err(format!(
                    "{at}.namespace: {:?} is not a valid Kubernetes name",
                    w.namespace
                ));
            }
            if !valid_name(&w.name) {
                return Err(format!(
                    "{at}.name: {:?} is not a valid Kubernetes name",
                    w.name
                ));
            }
            if !seen.insert((w.namespace.clone(), w.name.clone())) {
                return Err(format!(
                    "{at}: workload {}/{} is listed twice",
                    w.namespace, w.name
                ));
            }
            if w.addresses.is_empty() {
                return Err(format!("{at}.addresses: empty"));
            }
            let mut networks = Vec::with_capacity(w.addresses.len());
            for (j, a) in w.addresses.iter().enumerate() {
                let net = parse_net(a).ok_or_else(|| {
                    format!("{at}.addresses[{j}]: {a:?} is not an IP address or CIDR")
                })?;
                networks.push(net.trunc());
            }
            let mut exclude_inbound_ports = w.exclude_inbound_ports;
            if exclude_inbound_ports.contains(&0) {
                return Err(format!("{at}.exclude_inbound_ports: 0 is not a port"));
            }
            exclude_inbound_ports.sort_unstable();
            exclude_inbound_ports.dedup();
            // As Istio decides: a workload with a sidecar is not in ambient mode, also in an
            // ambient namespace; asking for both on one workload is a contradiction.
            if w.ambient && w.sidecar == Some(true) {
                return Err(format!(
                    "{at}: ambient: true and sidecar: true (an ambient workload has no sidecar)"
                ));
            }
            let in_ambient_ns = raw.ambient_namespaces.contains(&w.namespace);
            let sidecar = w.sidecar.unwrap_or(!(w.ambient || in_ambient_ns));
            let ambient = w.ambient || (in_ambient_ns && !sidecar);
            workloads.push(WorkloadSpec {
                namespace: w.namespace,
                name: w.name,
                networks,
                sidecar,
                exclude_inbound_ports,
                ambient,
            });
        }
        let mut node_networks = Vec::new();
        for (j, a) in raw.node_addresses.iter().enumerate() {
            node_networks.push(parse_net(a).ok_or_else(|| {
                format!("node_addresses[{j}]: {a:?} is not an IP address or CIDR")
            })?);
        }
        Ok(Self {
            workloads,
            node_networks,
        })
    }
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_design_example() {
        let inv = Inventory::parse(
            r#"
workloads:
  - namespace: shop
    name: web
    addresses: ["198.18.1.2", "2001:db8:1::2"]
    sidecar: true
  - namespace: legacy
    name: batch
    addresses: ["198.18.2.0/24"]
    sidecar: false
  - namespace: shop
    name: api
    addresses: ["198.18.1.3"]
node_addresses: ["198.18.0.1"]
"#,
        )
        .unwrap();
        assert_eq!(inv.workloads.len(), 3);
        assert_eq!(inv.workloads[0].networks[0].to_string(), "198.18.1.2/32");
        assert_eq!(
            inv.workloads[0].networks[1].to_string(),
            "2001:db8:1::2/128"
        );
        assert!(!inv.workloads[1].sidecar);
        assert!(inv.workloads[2].sidecar, "sidecar defaults to true");
        assert!(inv.workloads.iter().all(|w| !w.ambient));
        assert_eq!(inv.node_networks.len(), 1);
    }

    #[test]
    fn ambient_workloads_have_no_sidecar() {
        let inv = Inventory::parse(
            "workloads:\n  - {namespace: a, name: x, addresses: [198.18.1.1], ambient: true}\n  - {namespace: z, name: y, addresses: [198.18.1.2]}\n  - {namespace: z, name: s, addresses: [198.18.1.3], sidecar: true}\nambient_namespaces: [z]\n",
        )
        .unwrap();
        let w = |i: usize| (inv.workloads[i].ambient, inv.workloads[i].sidecar);
        assert_eq!(w(0), (true, false));
        assert_eq!(w(1), (true, false), "the namespace's mode");
        assert_eq!(
            w(2),
            (false, true),
            "a sidecar takes precedence, as in Istio"
        );
    }

    #[test]
    fn errors_name_the_entry() {
        let cases = [
            (
                "workloads:\n  - namespace: shop\n    name: web\n    addresses: [\"nope\"]\n",
                "workloads[0].addresses[0]: \"nope\" is not an IP address or CIDR",
            ),
            (
                "workloads:\n  - namespace: Shop\n    name: web\n    addresses: [\"198.18.1.1\"]\n",
                "workloads[0].namespace",
            ),
            (
                "workloads:\n  - namespace: shop\n    name: web\n    adresses: [\"198.18.1.1\"]\n",
                "unknown field `adresses`",
            ),
            (
                "workloads:\n  - namespace: shop\n    name: web\n    addresses: []\n",
                "workloads[0].addresses: empty",
            ),
            ("", "file is empty"),
            // A syntax error (a type error in the first element would be reported first).
            ("workloads: [", "did not find expected"),
            (
                "workloads:\n  - {namespace: a, name: b, addresses: [198.18.0.9]}\n  - {namespace: a, name: b, addresses: [198.18.0.8]}\n",
                "listed twice",
            ),
            (
                "workloads:\n  - {namespace: a, name: b, addresses: [198.18.0.9], exclude_inbound_ports: [70000]}\n",
                "exclude_inbound_ports",
            ),
            (
                "workloads:\n  - {namespace: a, name: b, addresses: [198.18.0.9], exclude_inbound_ports: [0]}\n",
                "workloads[0].exclude_inbound_ports: 0 is not a port",
            ),
            (
                "ambient_namespaces: [Bad]\nworkloads: []\n",
                "ambient_namespaces[0]",
            ),
            (
                "workloads:\n  - {namespace: a, name: b, addresses: [198.18.0.9], ambient: true, sidecar: true}\n",
                "workloads[0]: ambient: true and sidecar: true",
            ),
        ];
        for (text, want) in cases {
            let err = Inventory::parse(text).unwrap_err();
            assert!(err.contains(want), "{err:?} should contain {want:?}");
            assert!(!err.contains('\n'), "one line: {err:?}");
        }
    }

    #[test]
    fn load_names_the_file() {
        let err = Inventory::load(Path::new("/nonexistent/inv.yaml")).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("inventory /nonexistent/inv.yaml: ")
        );
    }
}
