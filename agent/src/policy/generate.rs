//! `mtls-agent policy`: the PeerAuthentications that a report's traffic proves safe now.
//!
//! - The whole namespace ready (traffic seen, none blocking, every workload with a sidecar has
//!   data): one namespace-wide STRICT named `default`.
//! - Otherwise one STRICT per ready workload, selected by its pods' labels and named after it;
//!   a workload whose blockers arrive on some of its ports only gets STRICT with
//!   `portLevelMtls: PERMISSIVE` on exactly those ports.
//! - Never STRICT where a blocker was seen; no policy (and a comment why) for a workload without
//!   data, without a sidecar, without known labels, or with blockers on every port.
//!
//! Output is deterministic for the same traffic: resources sorted by name, no timestamps other
//! than the evidence's own.
use std::{collections::BTreeSet, time::Duration};

use super::{
    Mode,
    file::{PeerAuthentication, to_yaml},
};
use crate::aggregate::{Readiness, Report, WorkloadReport};

/// One generated resource and the evidence for it.
#[derive(Debug, Clone, PartialEq)]
pub struct Proposal {
    pub resource: PeerAuthentication,
    pub evidence: String,
}

/// What `policy` prints: resources, and the workloads that get none with the reason.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Plan {
    pub namespace: String,
    pub window_seconds: u64,
    pub proposals: Vec<Proposal>,
    /// (workload, why no policy).
    pub skipped: Vec<(String, String)>,
}

fn window_text(secs: u64) -> String {
    humantime::format_duration(Duration::from_secs(secs)).to_string()
}

/// The latest `last_seen` of the blockers matching `f` (RFC 3339 sorts as time).
fn last_blocker(report: &Report, f: impl Fn(&crate::aggregate::Blocker) -> bool) -> String {
    report
        .blockers
        .iter()
        .filter(|b| f(b))
        .map(|b| b.last_seen.as_str())
        .max()
        .unwrap_or("none in the window")
        .to_owned()
}

pub fn plan(report: &Report) -> Plan {
    let window = window_text(report.window_seconds);
    let mut plan = Plan {
        namespace: report.namespace.clone(),
        window_seconds: report.window_seconds,
        ..Default::default()
    };
    let with_sidecar: Vec<&WorkloadReport> =
        report.workloads.iter().filter(|w| w.sidecar).collect();
    let whole_namespace = report.workload.is_none()
        && report.verdict == Readiness::Ready
        && with_sidecar.iter().all(|w| w.verdict == Readiness::Ready);
    for w in report.workloads.iter().filter(|w| !w.sidecar) {
        plan.skipped.push((
            w.name.clone(),
            "no sidecar: STRICT would not protect it until it is injected".into(),
        ));
    }
    if whole_namespace {
        plan.proposals.push(Proposal {
            resource: PeerAuthentication::new(&report.namespace, "default", None, Mode::Strict, &[]),
            evidence: format!(
                "namespace {}: {} connections judged in {window}, all accepted by STRICT; last blocker seen: {}",
                report.namespace,
                report.inbound.judged(),
                last_blocker(report, |_| true)
            ),
        });
        return plan;
    }
    for w in with_sidecar {
        let judged = w.inbound.judged();
        let blocked: BTreeSet<u16> = report
            .blockers
            .iter()
            .filter(|b| b.server.workload == w.name)
            .map(|b| b.server.port)
            .collect();
        let last = last_blocker(report, |b| b.server.workload == w.name);
        let Some(labels) = w.labels.as_ref().filter(|l| !l.is_empty()) else {
            plan.skipped.push((
                w.name.clone(),
                if judged == 0 {
                    format!("no inbound connection in {window} (no evidence is not readiness)")
                } else {
                    "no pod labels known to select it (inventory: add `labels:`)".into()
                },
            ));
            continue;
        };
        match w.verdict {
            Readiness::NoData => plan.skipped.push((
                w.name.clone(),
                format!("no inbound connection in {window} (no evidence is not readiness)"),
            )),
            Readiness::Ready => plan.proposals.push(Proposal {
                resource: PeerAuthentication::new(
                    &report.namespace,
                    &w.name,
                    Some(labels),
                    Mode::Strict,
                    &[],
                ),
                evidence: format!(
                    "{}: {judged} connections judged in {window}, all accepted by STRICT; last blocker seen: {last}",
                    w.name
                ),
            }),
            Readiness::NotReady => {
                let clean: Vec<u16> = w
                    .ports
                    .iter()
                    .map(|p| p.port)
                    .filter(|p| !blocked.contains(p))
                    .collect();
                let list = |ps: &mut dyn Iterator<Item = u16>| {
                    ps.map(|p| p.to_string()).collect::<Vec<_>>().join(", ")
                };
                if clean.is_empty() || blocked.is_empty() {
                    plan.skipped.push((
                        w.name.clone(),
                        format!(
                            "not ready: blockers on every port that received traffic ({}); last blocker seen {last}",
                            list(&mut blocked.iter().copied())
                        ),
                    ));
                    continue;
                }
                let ports: Vec<(u16, Mode)> =
                    blocked.iter().map(|p| (*p, Mode::Permissive)).collect();
                plan.proposals.push(Proposal {
                    resource: PeerAuthentication::new(
                        &report.namespace,
                        &w.name,
                        Some(labels),
                        Mode::Strict,
                        &ports,
                    ),
                    evidence: format!(
                        "{}: {judged} connections judged in {window}; STRICT except port {} (PERMISSIVE: blockers seen, last {last}); port {} clean",
                        w.name,
                        list(&mut blocked.iter().copied()),
                        list(&mut clean.into_iter()),
                    ),
                });
            }
        }
    }
    plan.proposals
        .sort_by(|a, b| a.resource.metadata.name.cmp(&b.resource.metadata.name));
    plan.skipped.sort();
    plan
}

impl Plan {
    /// YAML for `kubectl apply -f -`, each resource after a comment with its evidence.
    pub fn to_yaml(&self) -> String {
        let mut s = format!(
            "# PeerAuthentications for namespace {} that the traffic of the last {} proves safe (mtls-agent policy).\n",
            self.namespace,
            window_text(self.window_seconds)
        );
        if self.proposals.is_empty() {
            s += "# Nothing is safe to make STRICT yet.\n";
        }
        for (w, why) in &self.skipped {
            s += &format!("# {w}: no policy — {why}\n");
        }
        for p in &self.proposals {
            s += "---\n";
            s += &format!("# {}\n", p.evidence);
            s += &to_yaml(&p.resource);
        }
        s
    }
}
