//! `report --assume-policy`: the report's blockers judged under a set of PeerAuthentications.
//!
//! A blocker is a connection STRICT would not accept (not Istio mTLS, or not mTLS at all with
//! `--generic-mesh` off), so it is rejected exactly where the effective mode for its server
//! workload and port is STRICT. PERMISSIVE and DISABLE accept it (DISABLE: the sidecar passes
//! plaintext). A workload without a sidecar enforces nothing, whatever the policy says.
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::PolicySet;
use crate::aggregate::{Blocker, Report};

/// What one policy would reject.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PolicyRejections {
    /// `namespace/name`.
    pub policy: String,
    /// Whether it is one of the assumed (not yet applied) policies.
    pub assumed: bool,
    /// Connections it would reject in the window.
    pub connections: u64,
    pub rejects: Vec<Blocker>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WhatIf {
    /// The assumed policies, `namespace/name`, in the order given.
    pub assumed: Vec<String>,
    /// Connections rejected under the assumed policies.
    pub rejected_connections: u64,
    /// Per deciding policy: every assumed one (also when it rejects nothing), and known ones
    /// that would reject something.
    pub policies: Vec<PolicyRejections>,
    /// Blockers to workloads without a sidecar: no policy reaches them.
    #[serde(default)]
    pub not_enforced: Vec<Blocker>,
}

/// Judges `report`'s blockers under `set`; `assumed` are the ids of the assumed policies.
pub fn judge(report: &Report, set: &PolicySet, assumed: &[String]) -> WhatIf {
    let mut by_policy: BTreeMap<String, PolicyRejections> = assumed
        .iter()
        .map(|id| {
            (
                id.clone(),
                PolicyRejections {
                    policy: id.clone(),
                    assumed: true,
                    connections: 0,
                    rejects: Vec::new(),
                },
            )
        })
        .collect();
    let mut not_enforced = Vec::new();
    let empty = BTreeMap::new();
    for b in &report.blockers {
        let w = report
            .workloads
            .iter()
            .find(|w| w.name == b.server.workload);
        if w.is_some_and(|w| !w.sidecar) {
            not_enforced.push(b.clone());
            continue;
        }
        let labels = w.and_then(|w| w.labels.as_ref()).unwrap_or(&empty);
        let e = set.effective(&report.namespace, labels, Some(b.server.port));
        if e.mode != super::Mode::Strict {
            continue;
        }
        let id = e.policy.unwrap_or_default();
        let entry = by_policy
            .entry(id.clone())
            .or_insert_with(|| PolicyRejections {
                policy: id,
                assumed: false,
                connections: 0,
                rejects: Vec::new(),
            });
        entry.connections += b.connections;
        entry.rejects.push(b.clone());
    }
    let mut policies: Vec<PolicyRejections> = by_policy.into_values().collect();
    policies.sort_by_key(|p| {
        (
            !p.assumed,
            assumed.iter().position(|a| *a == p.policy),
            p.policy.clone(),
        )
    });
    WhatIf {
        assumed: assumed.to_vec(),
        rejected_connections: policies.iter().map(|p| p.connections).sum(),
        policies,
        not_enforced,
    }
}

impl WhatIf {
    pub fn rejects_anything(&self) -> bool {
        self.rejected_connections > 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{
        Mode, PolicySet, Rule,
        generate::tests::{blocker, report_of, workload},
    };

    fn rule(ns: &str, name: &str, app: Option<&str>, mode: Mode, ports: Vec<(u32, Mode)>) -> Rule {
        Rule {
            namespace: ns.into(),
            name: name.into(),
            selector: app.map(|a| vec![("app".to_string(), a.to_string())]),
            mode,
            ports,
            created: 0,
        }
    }

    #[test]
    fn lists_per_policy_what_it_would_reject() {
        let r = report_of(
            vec![
                workload("api", true, &[(8080, 2, 0), (9090, 2, 2)], true),
                workload("db", true, &[(5432, 1, 0)], true),
                workload("legacy", false, &[(80, 1, 0)], true),
            ],
            vec![
                blocker("api", 8080, 2, "t2"),
                blocker("db", 5432, 1, "t1"),
                blocker("legacy", 80, 1, "t3"),
            ],
        );
        // Known: mesh-wide STRICT. Assumed: namespace PERMISSIVE, and api STRICT but 8080 DISABLE.
        let mut set = PolicySet::new("istio-system");
        set.apply(rule("istio-system", "default", None, Mode::Strict, vec![]));
        let w = judge(&r, &set, &[]);
        assert_eq!(w.rejected_connections, 3, "{w:#?}");
        assert_eq!(w.policies[0].policy, "istio-system/default");
        assert!(!w.policies[0].assumed);
        assert_eq!(w.not_enforced.len(), 1, "no sidecar, nothing enforced");

        set.apply(rule("shop", "default", None, Mode::Permissive, vec![]));
        set.apply(rule(
            "shop",
            "api",
            Some("api"),
            Mode::Strict,
            vec![(8080, Mode::Disable)],
        ));
        let assumed = vec!["shop/default".to_string(), "shop/api".to_string()];
        let w = judge(&r, &set, &assumed);
        assert!(!w.rejects_anything(), "{w:#?}");
        // Every assumed policy is listed, also when it rejects nothing.
        assert_eq!(
            w.policies
                .iter()
                .map(|p| p.policy.as_str())
                .collect::<Vec<_>>(),
            ["shop/default", "shop/api"]
        );
        // Port-level UNSET inherits the workload's STRICT: 8080 is rejected, under shop/api.
        set.apply(rule(
            "shop",
            "api",
            Some("api"),
            Mode::Strict,
            vec![(8080, Mode::Unset)],
        ));
        let w = judge(&r, &set, &assumed);
        assert_eq!(w.rejected_connections, 2);
        assert_eq!(w.policies[1].policy, "shop/api");
        assert_eq!(w.policies[1].rejects[0].server.port, 8080);
    }
}
