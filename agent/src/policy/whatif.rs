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
