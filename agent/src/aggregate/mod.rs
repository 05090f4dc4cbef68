//! aggregate: classified connections → per-namespace/workload counts, blockers and readiness
//! (DESIGN.md "Readiness for STRICT"), kept in step with the Prometheus series.
pub mod report;

use std::{
    collections::{BTreeSet, HashMap, HashSet},
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::{Instant, SystemTime},
};

use crate::{
    classify::{Mesh, Security, Verdict},
    export::metrics::Metrics,
    identity::{Resolver, Workload},
};
pub use report::{Blocker, ClientRef, Inbound, Readiness, Report, ServerRef, WorkloadReport};

/// Istio's own ports, which STRICT leaves alone: 15020 (merged metrics), 15021 (health),
/// 15090 (Envoy stats).
pub const DEFAULT_EXEMPT_PORTS: [u16; 3] = [15020, 15021, 15090];

#[derive(Debug, Clone)]
pub struct AggregateConfig {
    pub exempt_ports: BTreeSet<u16>,
    /// Accept any mTLS as compliant, not only Istio's (for other meshes).
    pub generic_mesh: bool,
    /// Distinct (client_namespace, client_workload) label sets per server workload on the
    /// blocking counter before the rest is folded into "other".
    pub max_blocking_clients: usize,
}

impl Default for AggregateConfig {
    fn default() -> Self {
        Self {
            exempt_ports: DEFAULT_EXEMPT_PORTS.into_iter().collect(),
            generic_mesh: false,
            max_blocking_clients: 20,
        }
    }
}

/// One classified connection, as the tracker hands it over.
#[derive(Debug, Clone)]
pub struct ConnRecord {
    pub client: SocketAddr,
    pub server: SocketAddr,
    pub verdict: Verdict,
    pub at: SystemTime,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct BlockerKey {
    server_workload: String,
    port: u16,
    client_namespace: Option<String>,
    client_workload: Option<String>,
    /// Only for clients without identity: then the address is what identifies them.
    client_address: Option<IpAddr>,
    security: Security,
}

#[derive(Debug, Clone)]
struct BlockerAcc {
    connections: u64,
    last_seen: SystemTime,
    last_address: IpAddr,
    evidence: String,
    mesh: Mesh,
    protocol: Option<&'static str>,
}

#[derive(Debug, Default)]
struct WorkloadStats {
    inbound: Inbound,
    compliant: u64,
    blockers: HashMap<BlockerKey, BlockerAcc>,
    /// Client label sets already used on the blocking counter for this server workload.
    blocking_labels: HashSet<(String, String)>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ReportError {
    #[error("namespace {0:?} is not known to this agent (no inventory entry and no traffic)")]
    UnknownNamespace(String),
    #[error("workload {1:?} is not known in namespace {0:?}")]
    UnknownWorkload(String, String),
}

pub struct Aggregator {
    cfg: AggregateConfig,
    resolver: Resolver,
    metrics: Metrics,
    started: Instant,
    workloads: HashMap<Arc<Workload>, WorkloadStats>,
}

impl Aggregator {
    pub fn new(cfg: AggregateConfig, resolver: Resolver, metrics: Metrics) -> Self {
        let agg = Self {
            cfg,
            resolver,
            metrics,
            started: Instant::now(),
            workloads: HashMap::new(),
        };
        // Every known namespace has its gauges from the start (no_data → not ready).
        for ns in agg.resolver.namespaces() {
            agg.metrics.strict_ready.with_label_values(&[ns]).set(0);
        }
        agg
    }

    pub fn resolver(&self) -> &Resolver {
        &self.resolver
    }

    pub fn resolver_mut(&mut self) -> &mut Resolver {
        &mut self.resolver
    }

    /// Counts one classified connection for each side that is a known workload.
    pub fn record(&mut self, rec: &ConnRecord) {
        let sec = rec.verdict.security;
        let client_wl = self.resolver.lookup(rec.client.ip()).cloned();
        let server_wl = self.resolver.lookup(rec.server.ip()).cloned();
        self.metrics
            .evidence
            .with_label_values(&[sec.as_str(), rec.verdict.evidence.kind()])
            .inc();
        if let Some(c) = &client_wl {
            self.metrics
                .connections
                .with_label_values(&[&c.namespace, &c.name, "outbound", sec.as_str()])
                .inc();
        }
        let Some(server) = server_wl else {
            if client_wl.is_none() {
                self.metrics.unattributed.with_label_values(&[sec.as_str()]).inc();
            }
            return;
        };
        self.metrics
            .connections
            .with_label_values(&[&server.namespace, &server.name, "inbound", sec.as_str()])
            .inc();

        let exempt = self.cfg.exempt_ports.contains(&rec.server.port())
            || self.resolver.is_node(rec.client.ip());
        let compliant = sec == Security::Mtls
            && (rec.verdict.mesh == Mesh::Istio || self.cfg.generic_mesh);
        let max_labels = self.cfg.max_blocking_clients;
        let stats = self.workloads.entry(server.clone()).or_default();
        if exempt {
            stats.inbound.exempt += 1;
        } else {
            match sec {
                Security::Mtls => stats.inbound.mtls += 1,
                Security::Tls => stats.inbound.tls += 1,
                Security::Plaintext => stats.inbound.plaintext += 1,
                Security::Unknown => stats.inbound.unknown += 1,
            }
            if compliant {
                stats.compliant += 1;
            } else {
                let key = BlockerKey {
                    server_workload: server.name.clone(),
                    port: rec.server.port(),
                    client_namespace: client_wl.as_ref().map(|c| c.namespace.clone()),
                    client_workload: client_wl.as_ref().map(|c| c.name.clone()),
                    client_address: client_wl.is_none().then(|| rec.client.ip()),
                    security: sec,
                };
                let acc = stats.blockers.entry(key).or_insert(BlockerAcc {
                    connections: 0,
                    last_seen: rec.at,
                    last_address: rec.client.ip(),
                    evidence: String::new(),
                    mesh: rec.verdict.mesh,
                    protocol: None,
                });
                acc.connections += 1;
                acc.last_seen = acc.last_seen.max(rec.at);
                acc.last_address = rec.client.ip();
                acc.evidence = rec.verdict.evidence.to_string();
                acc.mesh = rec.verdict.mesh;
                acc.protocol = rec.verdict.protocol.map(|p| p.as_str());

                let labels = match &client_wl {
                    Some(c) => (c.namespace.clone(), c.name.clone()),
                    None => ("unknown".to_owned(), "unknown".to_owned()),
                };
                let labels = if stats.blocking_labels.contains(&labels)
                    || stats.blocking_labels.len() < max_labels
                {
                    stats.blocking_labels.insert(labels.clone());
                    labels
                } else {
                    self.metrics
                        .blocking_overflow
                        .with_label_values(&[&server.namespace, &server.name])
                        .inc();
                    ("other".to_owned(), "other".to_owned())
                };
                self.metrics
                    .blocking
                    .with_label_values(&[
                        &server.namespace,
                        &server.name,
                        &rec.server.port().to_string(),
                        &labels.0,
                        &labels.1,
                        sec.as_str(),
                    ])
                    .inc();
            }
        }
        self.update_namespace_gauges(&server.namespace);
    }

    /// Adds the bytes of an ended connection to both sides.
    pub fn record_bytes(&mut self, client: SocketAddr, server: SocketAddr, security: Security, bytes: u64) {
        if bytes == 0 {
            return;
        }
        for (ip, dir) in [(client.ip(), "outbound"), (server.ip(), "inbound")] {
            if let Some(w) = self.resolver.lookup(ip) {
                self.metrics
                    .bytes
                    .with_label_values(&[&w.namespace, &w.name, dir, security.as_str()])
                    .inc_by(bytes);
            }
        }
    }

    fn namespace_totals(&self, ns: &str) -> (Inbound, u64) {
        let mut inbound = Inbound::default();
        let mut compliant = 0;
        for (w, s) in &self.workloads {
            if w.namespace == ns {
                inbound.add(&s.inbound);
                compliant += s.compliant;
            }
        }
        (inbound, compliant)
    }

    fn update_namespace_gauges(&self, ns: &str) {
        let (inbound, compliant) = self.namespace_totals(ns);
        let ready = report::readiness(&inbound, compliant) == Readiness::Ready;
        self.metrics.strict_ready.with_label_values(&[ns]).set(ready as i64);
        if let Some(r) = report::ratio(&inbound, compliant) {
            self.metrics.mtls_ratio.with_label_values(&[ns]).set(r);
        }
    }

    /// Namespaces known from the inventory or from traffic.
    pub fn namespaces(&self) -> BTreeSet<String> {
        let mut out: BTreeSet<String> =
            self.resolver.namespaces().into_iter().map(str::to_owned).collect();
        out.extend(self.workloads.keys().map(|w| w.namespace.clone()));
        out
    }

    pub fn report(&self, namespace: &str, workload: Option<&str>) -> Result<Report, ReportError> {
        if !self.namespaces().contains(namespace) {
            return Err(ReportError::UnknownNamespace(namespace.to_owned()));
        }
        let mut known: Vec<&Arc<Workload>> = self
            .resolver
            .workloads()
            .iter()
            .filter(|w| w.namespace == namespace)
            .collect();
        for w in self.workloads.keys() {
            if w.namespace == namespace && !known.iter().any(|k| k == &w) {
                known.push(w);
            }
        }
        known.sort_by(|a, b| a.name.cmp(&b.name));
        if let Some(name) = workload
            && !known.iter().any(|w| w.name == name)
        {
            return Err(ReportError::UnknownWorkload(namespace.to_owned(), name.to_owned()));
        }
        let empty = WorkloadStats::default();
        let mut inbound = Inbound::default();
        let mut compliant = 0;
        let mut workloads = Vec::new();
        let mut blockers = Vec::new();
        for w in known {
            if workload.is_some_and(|n| n != w.name) {
                continue;
            }
            let s = self.workloads.get(w).unwrap_or(&empty);
            inbound.add(&s.inbound);
            compliant += s.compliant;
            workloads.push(WorkloadReport {
                name: w.name.clone(),
                verdict: report::readiness(&s.inbound, s.compliant),
                inbound: s.inbound,
                sidecar: w.sidecar,
                mtls_ratio: report::ratio(&s.inbound, s.compliant),
                compliant: s.compliant,
            });
            for (k, acc) in &s.blockers {
                blockers.push(Blocker {
                    client: ClientRef {
                        namespace: k.client_namespace.clone(),
                        workload: k.client_workload.clone(),
                        address: acc.last_address.to_string(),
                    },
                    server: ServerRef {
                        workload: k.server_workload.clone(),
                        port: k.port,
                    },
                    security: k.security.as_str().to_owned(),
                    connections: acc.connections,
                    last_seen: humantime::format_rfc3339_seconds(acc.last_seen).to_string(),
                    evidence: acc.evidence.clone(),
                    mesh: acc.mesh.as_str().to_owned(),
                    protocol: acc.protocol.map(str::to_owned),
                });
            }
        }
        blockers.sort_by(|a, b| {
            b.connections
                .cmp(&a.connections)
                .then_with(|| a.server.workload.cmp(&b.server.workload))
                .then_with(|| a.client.address.cmp(&b.client.address))
        });
        Ok(Report {
            namespace: namespace.to_owned(),
            workload: workload.map(str::to_owned),
            window_seconds: self.started.elapsed().as_secs(),
            verdict: report::readiness(&inbound, compliant),
            inbound,
            mtls_ratio: report::ratio(&inbound, compliant),
            compliant,
            blockers,
            workloads,
        })
    }
}
