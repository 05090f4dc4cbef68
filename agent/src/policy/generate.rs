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
//! than the evidence's own. Names: `default` and the workload's name, or, in Kubernetes mode, the
//! name of the known policy the resource replaces (the known namespace-wide policy; a known
//! workload policy selecting that workload alone), because of several matching policies Istio
//! honours the oldest: a new one beside them would have no effect.
use std::{
    collections::{BTreeMap, BTreeSet},
    time::Duration,
};

use super::{
    Mode, Rule,
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

/// The oldest known policy of `rules` (Istio lets the oldest of several matching ones win).
fn oldest<'a>(rules: impl Iterator<Item = &'a Rule>) -> Option<&'a Rule> {
    rules.min_by(|a, b| a.created.cmp(&b.created).then_with(|| a.name.cmp(&b.name)))
}

/// The name of the namespace-wide resource: the known namespace-wide policy's (Kubernetes
/// mode), so that applying replaces it; a second one would lose to it in Istio, being newer.
fn namespace_policy_name(report: &Report) -> String {
    oldest(
        report
            .peer_authentications
            .iter()
            .filter(|r| r.namespace == report.namespace && r.selector.is_none()),
    )
    .map(|r| r.name.clone())
    .unwrap_or_else(|| "default".into())
}

/// Whether `rule`'s selector matches a workload with `labels`.
fn selects(rule: &Rule, labels: Option<&BTreeMap<String, String>>) -> bool {
    rule.selector
        .as_ref()
        .is_some_and(|sel| labels.is_some_and(|l| sel.iter().all(|(k, v)| l.get(k) == Some(v))))
}

/// The name of a workload's resource: the known workload policy that selects it and no other
/// workload of the report (so applying replaces it), else the workload's name.
fn workload_policy_name(report: &Report, w: &WorkloadReport) -> String {
    oldest(report.peer_authentications.iter().filter(|r| {
        r.namespace == report.namespace
            && selects(r, w.labels.as_ref())
            && report
                .workloads
                .iter()
                .filter(|o| selects(r, o.labels.as_ref()))
                .count()
                == 1
    }))
    .map(|r| r.name.clone())
    .unwrap_or_else(|| w.name.clone())
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
            resource: PeerAuthentication::new(
                &report.namespace,
                &namespace_policy_name(report),
                None,
                Mode::Strict,
                &[],
            ),
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
                    &workload_policy_name(report, w),
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
                        &workload_policy_name(report, w),
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

#[cfg(test)]
pub(crate) mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::aggregate::{Blocker, ClientRef, Inbound, PortReport, ServerRef, report};

    pub(crate) fn workload(
        name: &str,
        sidecar: bool,
        ports: &[(u16, u64, u64)],
        labels: bool,
    ) -> WorkloadReport {
        // (port, judged, of which compliant)
        let judged: u64 = ports.iter().map(|p| p.1).sum();
        let compliant: u64 = ports.iter().map(|p| p.2).sum();
        let inbound = Inbound {
            mtls: compliant,
            plaintext: judged - compliant,
            ..Default::default()
        };
        WorkloadReport {
            name: name.into(),
            verdict: report::readiness(&inbound, compliant),
            inbound,
            sidecar,
            mtls_ratio: report::ratio(&inbound, compliant),
            compliant,
            rejected: 0,
            one_direction: 0,
            mode: None,
            ports: ports
                .iter()
                .map(|(p, n, _)| PortReport {
                    port: *p,
                    connections: *n,
                    mode: None,
                })
                .collect(),
            labels: labels.then(|| BTreeMap::from([("app".to_string(), name.to_string())])),
        }
    }

    pub(crate) fn blocker(server: &str, port: u16, n: u64, last: &str) -> Blocker {
        Blocker {
            client: ClientRef {
                namespace: None,
                workload: None,
                address: "198.18.9.9".into(),
                kind: None,
                description: None,
            },
            server: ServerRef {
                workload: server.into(),
                port,
            },
            security: "plaintext".into(),
            connections: n,
            last_seen: last.into(),
            evidence: String::new(),
            mesh: "none".into(),
            protocol: None,
            advice: None,
        }
    }

    pub(crate) fn report_of(workloads: Vec<WorkloadReport>, blockers: Vec<Blocker>) -> Report {
        let mut inbound = Inbound::default();
        let mut compliant = 0;
        for w in &workloads {
            inbound.add(&w.inbound);
            compliant += w.compliant;
        }
        Report {
            namespace: "shop".into(),
            workload: None,
            window_seconds: 900,
            verdict: report::readiness(&inbound, compliant),
            inbound,
            mtls_ratio: report::ratio(&inbound, compliant),
            compliant,
            rejected: 0,
            one_direction: 0,
            warnings: Vec::new(),
            peer_authentication: None,
            blockers,
            workloads,
            peer_authentications: vec![],
            what_if: None,
            nodes: None,
        }
    }

    fn names(p: &Plan) -> Vec<&str> {
        p.proposals
            .iter()
            .map(|p| p.resource.metadata.name.as_str())
            .collect()
    }

    #[test]
    fn whole_namespace_ready_is_one_namespace_wide_strict() {
        let r = report_of(
            vec![
                workload("web", true, &[(8080, 3, 3)], true),
                workload("db", true, &[(5432, 1, 1)], false),
                workload("job", false, &[], true),
            ],
            vec![],
        );
        let p = plan(&r);
        assert_eq!(names(&p), ["default"]);
        assert!(p.proposals[0].resource.spec.selector.is_none());
        assert!(
            p.proposals[0]
                .evidence
                .contains("4 connections judged in 15m")
        );
        assert_eq!(p.skipped.len(), 1, "the workload without sidecar is named");
    }

    #[test]
    fn known_policies_are_replaced_by_name() {
        let rule = |name: &str, app: Option<&str>| Rule {
            namespace: "shop".into(),
            name: name.into(),
            selector: app.map(|a| vec![("app".to_string(), a.to_string())]),
            mode: Mode::Permissive,
            ports: vec![],
            created: 5,
        };
        let ready = vec![
            workload("web", true, &[(8080, 3, 3)], true),
            workload("db", true, &[(5432, 1, 1)], true),
        ];
        let mut r = report_of(ready.clone(), vec![]);
        r.peer_authentications = vec![
            rule("shop-wide", None),
            crate::policy::Rule {
                namespace: "other".into(),
                ..rule("elsewhere", None)
            },
        ];
        assert_eq!(names(&plan(&r)), ["shop-wide"]);
        // Per workload: a known policy selecting web alone is replaced; one selecting both
        // workloads is not reused.
        let mut r = report_of(
            vec![
                ready[0].clone(),
                workload("db", true, &[(5432, 1, 0)], true),
            ],
            vec![blocker("db", 5432, 1, "t")],
        );
        let mut both = rule("both", Some("web"));
        both.selector = Some(vec![]);
        r.peer_authentications = vec![rule("web-permissive", Some("web")), both];
        assert_eq!(names(&plan(&r)), ["web-permissive"]);
    }

    #[test]
    fn never_strict_where_a_blocker_was_seen() {
        let r = report_of(
            vec![
                workload("web", true, &[(8080, 3, 3)], true),
                // Blockers on one of two ports: STRICT with that port PERMISSIVE.
                workload("api", true, &[(8080, 2, 0), (9090, 2, 2)], true),
                // Blockers on its only port: nothing.
                workload("db", true, &[(5432, 2, 1)], true),
                // Ready but no labels to select it: nothing.
                workload("nolabels", true, &[(80, 1, 1)], false),
                workload("idle", true, &[], true),
            ],
            vec![
                blocker("api", 8080, 2, "2026-12-01T00:00:02Z"),
                blocker("db", 5432, 1, "2026-12-01T00:00:01Z"),
            ],
        );
        let p = plan(&r);
        assert_eq!(names(&p), ["api", "web"]);
        let api = &p.proposals[0].resource.spec;
        assert_eq!(
            api.port_level_mtls
                .as_ref()
                .unwrap()
                .keys()
                .collect::<Vec<_>>(),
            ["8080"]
        );
        assert!(
            p.proposals[0]
                .evidence
                .contains("last 2026-12-01T00:00:02Z"),
            "{}",
            p.proposals[0].evidence
        );
        let skipped: Vec<&str> = p.skipped.iter().map(|(w, _)| w.as_str()).collect();
        assert_eq!(skipped, ["db", "idle", "nolabels"]);
        let yaml = p.to_yaml();
        assert!(
            yaml.contains("# db: no policy — not ready: blockers on every port"),
            "{yaml}"
        );
        assert!(yaml.contains("no evidence is not readiness"), "{yaml}");
        // Deterministic: the same report gives the same text.
        assert_eq!(plan(&r).to_yaml(), yaml);
        // Every resource parses back with the strict model.
        let back = crate::policy::file::parse("gen", &yaml).unwrap();
        assert_eq!(back.len(), 2);
    }
}
