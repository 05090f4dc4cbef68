//! `report --prometheus`: the same report, cluster-wide, with Prometheus as the engine that sums
//! the counters of every node's agent. The agent invents no aggregation of its own here.
//!
//! Counts over a window W use `(M - M offset W) or M`: the exact difference of the counter for
//! series that existed W ago, and the whole value for series born inside the window (where
//! `increase()` would miss the first increments and extrapolate fractions). A counter reset
//! (agent restart) inside the window is clamped to zero for that series.
use std::{collections::BTreeMap, time::Duration};

use anyhow::{Context as _, anyhow};
use serde::Deserialize;

use super::usage;
use crate::aggregate::{
    Blocker, ClientRef, Inbound, NodeClient, PortReport, Report, ServerRef, WorkloadReport,
    report::{ratio, readiness, sort_blockers},
};

pub struct Prometheus {
    base: String,
    agent: ureq::Agent,
}

#[derive(Debug, Deserialize)]
struct Answer {
    status: String,
    #[serde(default)]
    data: Option<Data>,
    #[serde(default)]
    error: Option<String>,
}

#[derive(Debug, Deserialize)]
struct Data {
    #[serde(rename = "resultType")]
    result_type: String,
    result: Vec<Sample>,
}

#[derive(Debug, Deserialize)]
struct Sample {
    metric: BTreeMap<String, String>,
    value: (f64, String),
}

/// A PromQL string literal for a label value (namespace names are DNS labels, but be safe).
fn quote(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

/// Exact count of a counter's increments over the window, summed `by`.
fn window_sum(metric: &str, selector: &str, by: &str, w: &str) -> String {
    format!(
        "sum by ({by}) (clamp_min({metric}{{{selector}}} - {metric}{{{selector}}} offset {w}, 0) or {metric}{{{selector}}})"
    )
}

impl Prometheus {
    pub fn new(url: &str) -> anyhow::Result<Self> {
        let base = url.trim_end_matches('/').to_owned();
        if !(base.starts_with("http://") || base.starts_with("https://")) {
            return Err(usage(format!(
                "--prometheus: {url:?} is not an http:// or https:// URL"
            )));
        }
        let agent = super::report::http_client(Duration::from_secs(15));
        Ok(Self { base, agent })
    }

    fn query(&self, q: &str) -> anyhow::Result<Vec<Sample>> {
        let mut resp = self
            .agent
            .get(format!("{}/api/v1/query", self.base))
            .query("query", q)
            .call()
            .map_err(|e| anyhow!("cannot reach Prometheus at {}: {e}", self.base))?;
        let status = resp.status();
        let body = resp
            .body_mut()
            .read_to_string()
            .with_context(|| format!("reading the answer of {}", self.base))?;
        let ans: Answer = serde_json::from_str(&body).map_err(|_| {
            anyhow!(
                "{} answered {status} with something that is not the Prometheus API: {}",
                self.base,
                body.chars().take(120).collect::<String>()
            )
        })?;
        if ans.status != "success" {
            return Err(anyhow!(
                "Prometheus at {} refused the query: {}",
                self.base,
                ans.error.unwrap_or_default()
            ));
        }
        let data = ans.data.context("Prometheus answer without data")?;
        if data.result_type != "vector" {
            return Err(anyhow!(
                "Prometheus answered a {} for an instant query",
                data.result_type
            ));
        }
        Ok(data.result)
    }

    /// Namespaces any agent knows of (workloads or inbound traffic) within the window.
    pub fn namespaces(&self, window: Duration) -> anyhow::Result<Vec<String>> {
        let w = format!("{}s", window.as_secs());
        let q = format!(
            "group by (namespace) (max_over_time(mtls_agent_workload_info[{w}])) or group by (namespace) (mtls_agent_inbound_connections_total)"
        );
        let mut out: Vec<String> = self
            .query(&q)?
            .into_iter()
            .filter_map(|s| s.metric.get("namespace").cloned())
            .collect();
        out.sort();
        out.dedup();
        Ok(out)
    }

    /// The report of a namespace (or one workload) over `window`, from every agent's counters.
    pub fn report(
        &self,
        namespace: &str,
        workload: Option<&str>,
        window: Duration,
    ) -> anyhow::Result<Report> {
        let w = format!("{}s", window.as_secs());
        let mut sel = format!("namespace={}", quote(namespace));
        if let Some(wl) = workload {
            sel += &format!(",workload={}", quote(wl));
        }
        let count = |s: &Sample| {
            s.value
                .1
                .parse::<f64>()
                .map(|v| v.round().max(0.0) as u64)
                .unwrap_or(0)
        };
        let label = |s: &Sample, k: &str| s.metric.get(k).cloned().unwrap_or_default();

        // Workloads and their sidecar state.
        // (sidecar, inbound, compliant, rejected, one direction) per workload.
        let mut workloads: BTreeMap<String, (bool, Inbound, u64, u64, u64)> = BTreeMap::new();
        for s in self.query(&format!(
            "max by (workload, sidecar) (max_over_time(mtls_agent_workload_info{{{sel}}}[{w}]))"
        ))? {
            workloads.entry(label(&s, "workload")).or_default().0 = label(&s, "sidecar") == "true";
        }
        // Inbound connections by security and STRICT treatment.
        let inbound = self.query(&window_sum(
            "mtls_agent_inbound_connections_total",
            &sel,
            "workload, security, strict",
            &w,
        ))?;
        if workloads.is_empty() && inbound.is_empty() {
            return Err(usage(match workload {
                Some(wl) => format!(
                    "workload {wl:?} in namespace {namespace:?} is not known to Prometheus at {}",
                    self.base
                ),
                None => format!(
                    "namespace {namespace:?} is not known to Prometheus at {} (no agent reported it)",
                    self.base
                ),
            }));
        }
        for s in &inbound {
            let n = count(s);
            let entry = workloads.entry(label(s, "workload")).or_insert((
                true,
                Inbound::default(),
                0,
                0,
                0,
            ));
            match (label(s, "strict").as_str(), label(s, "security").as_str()) {
                ("exempt", _) => entry.1.exempt += n,
                (strict, sec) => {
                    match sec {
                        "mtls" => entry.1.mtls += n,
                        "tls" => entry.1.tls += n,
                        "plaintext" => entry.1.plaintext += n,
                        _ => entry.1.unknown += n,
                    }
                    if strict == "compliant" {
                        entry.2 += n;
                    }
                }
            }
        }

        for s in self.query(&window_sum(
            "mtls_agent_rejected_connections_total",
            &sel,
            "workload",
            &w,
        ))? {
            if let Some(e) = workloads.get_mut(&label(&s, "workload")) {
                e.3 += count(&s);
            }
        }
        // Inbound connections seen in one direction only (the report's partial-sight warning).
        for s in self.query(&window_sum(
            "mtls_agent_one_direction_connections_total",
            &format!("{sel},direction=\"inbound\""),
            "workload",
            &w,
        ))? {
            if let Some(e) = workloads.get_mut(&label(&s, "workload")) {
                e.4 += count(&s);
            }
        }

        // Blockers with their last-seen time.
        let by = "workload, port, client_namespace, client_workload, client_address, security";
        let counts = self.query(&window_sum(
            "mtls_agent_blocking_connections_total",
            &sel,
            by,
            &w,
        ))?;
        let seen: BTreeMap<Vec<String>, f64> = self
            .query(&format!(
                "max by ({by}) (max_over_time(mtls_agent_blocking_last_seen_timestamp_seconds{{{sel}}}[{w}]))"
            ))?
            .into_iter()
            .map(|s| {
                let key: Vec<String> = by.split(", ").map(|k| label(&s, k)).collect();
                (key, s.value.1.parse().unwrap_or(0.0))
            })
            .collect();
        let mut blockers = Vec::new();
        for s in &counts {
            let n = count(s);
            if n == 0 {
                continue;
            }
            let key: Vec<String> = by.split(", ").map(|k| label(s, k)).collect();
            let last = seen.get(&key).copied().unwrap_or(0.0);
            let known = |v: String| (!v.is_empty() && v != "unknown").then_some(v);
            let port = label(s, "port").parse().unwrap_or(0);
            let address = label(s, "client_address");
            // The node's address: `client_namespace="node"` (a workload never has an address).
            let node = (label(s, "client_namespace") == "node" && !address.is_empty())
                .then(|| NodeClient::from_label(&label(s, "client_workload")));
            blockers.push(Blocker {
                client: match node {
                    Some(n) => ClientRef::node(address, n),
                    None => ClientRef {
                        namespace: known(label(s, "client_namespace")),
                        workload: known(label(s, "client_workload")),
                        address,
                        kind: None,
                        description: None,
                    },
                },
                advice: node.map(|n| n.advice(port)),
                server: ServerRef {
                    workload: label(s, "workload"),
                    port,
                },
                security: label(s, "security"),
                connections: n,
                last_seen: humantime::format_rfc3339_seconds(
                    std::time::UNIX_EPOCH + Duration::from_secs(last.max(0.0) as u64),
                )
                .to_string(),
                evidence: String::new(),
                mesh: String::new(),
                protocol: None,
            });
        }
        sort_blockers(&mut blockers);

        // Per-port judged counts (ports beyond the agent's bound are `other`: not a port).
        let mut ports: BTreeMap<String, Vec<PortReport>> = BTreeMap::new();
        for s in self.query(&window_sum(
            "mtls_agent_inbound_port_connections_total",
            &sel,
            "workload, port",
            &w,
        ))? {
            let n = count(&s);
            if let (Ok(port), true) = (label(&s, "port").parse::<u16>(), n > 0) {
                ports
                    .entry(label(&s, "workload"))
                    .or_default()
                    .push(PortReport {
                        port,
                        connections: n,
                        mode: None,
                    });
            }
        }
        // Selector labels; when they changed inside the window, only those that stayed.
        let mut selectors: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
        for s in self.query(&format!(
            "max by (workload, selector) (max_over_time(mtls_agent_workload_selector_info{{{sel}}}[{w}]))"
        ))? {
            let set: BTreeMap<String, String> = label(&s, "selector")
                .split(',')
                .filter_map(|kv| kv.split_once('='))
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect();
            selectors
                .entry(label(&s, "workload"))
                .and_modify(|old| old.retain(|k, v| set.get(k) == Some(v)))
                .or_insert(set);
        }

        let mut total = Inbound::default();
        let mut compliant = 0;
        let mut rejected = 0;
        let mut one_direction = 0;
        let workloads: Vec<WorkloadReport> = workloads
            .into_iter()
            .map(|(name, (sidecar, inbound, comp, rej, w1))| {
                total.add(&inbound);
                compliant += comp;
                rejected += rej;
                one_direction += w1;
                WorkloadReport {
                    verdict: readiness(&inbound, comp),
                    inbound,
                    sidecar,
                    mtls_ratio: ratio(&inbound, comp),
                    compliant: comp,
                    rejected: rej,
                    one_direction: w1,
                    // Modes are the agent's knowledge, not metrics.
                    mode: None,
                    ports: {
                        let mut p = ports.remove(&name).unwrap_or_default();
                        p.sort_by_key(|p| p.port);
                        p
                    },
                    labels: selectors.remove(&name),
                    name,
                }
            })
            .collect();
        Ok(Report {
            namespace: namespace.to_owned(),
            workload: workload.map(str::to_owned),
            window_seconds: window.as_secs(),
            verdict: readiness(&total, compliant),
            inbound: total,
            mtls_ratio: ratio(&total, compliant),
            compliant,
            rejected,
            one_direction,
            warnings: Vec::new(),
            peer_authentication: None,
            blockers,
            workloads,
            peer_authentications: Vec::new(),
            what_if: None,
            nodes: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_sum_counts_new_series_whole() {
        let q = window_sum("m", "namespace=\"a\"", "workload", "60s");
        assert_eq!(
            q,
            "sum by (workload) (clamp_min(m{namespace=\"a\"} - m{namespace=\"a\"} offset 60s, 0) or m{namespace=\"a\"})"
        );
        assert_eq!(quote("a\"b"), "\"a\\\"b\"");
    }

    #[test]
    fn bad_url_is_usage() {
        let e = Prometheus::new("localhost:9090").err().unwrap();
        assert!(e.downcast_ref::<super::super::UsageError>().is_some());
    }
}
