//! aggregate: classified connections → per-namespace/workload counts, blockers and readiness
//! (DESIGN.md "Readiness for STRICT"), kept in step with the Prometheus series.
mod exemption;
pub mod report;

use std::{
    collections::BTreeSet,
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

// hashbrown's default hasher (foldhash): these maps are hit per connection, SipHash showed in
// the TCP-churn profile.
use hashbrown::{HashMap, HashSet};

use crate::{
    classify::{Evidence, Mesh, Security, Sides, Verdict},
    export::metrics::Metrics,
    identity::{Resolver, Workload},
};
pub use exemption::Exemption;
pub use report::{
    Blocker, ClientKind, ClientRef, Inbound, NodeClient, PortReport, Readiness, Report, ServerRef,
    WorkloadReport,
};

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
    /// How far back the agent remembers (the longest `report --window`), and the window the
    /// readiness gauges follow.
    pub window: Duration,
}

impl Default for AggregateConfig {
    fn default() -> Self {
        Self {
            exempt_ports: DEFAULT_EXEMPT_PORTS.into_iter().collect(),
            generic_mesh: false,
            max_blocking_clients: 20,
            window: DEFAULT_WINDOW,
        }
    }
}

/// `--window` default.
pub const DEFAULT_WINDOW: Duration = Duration::from_secs(15 * 60);

/// Distinct blockers remembered per workload and bucket; more are folded into one entry per
/// (port, security) with an unknown client, so memory stays bounded under a scan.
const MAX_BLOCKERS_PER_BUCKET: usize = 256;

/// Width of one time bucket for a window: about 60 buckets, between 1 s and 60 s wide.
fn bucket_width(window: Duration) -> u64 {
    (window.as_secs() / 60).clamp(1, 60)
}

fn epoch_secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// One classified connection, as the tracker hands it over.
#[derive(Debug, Clone)]
pub struct ConnRecord {
    pub client: SocketAddr,
    /// The address that served it (behind a DNAT: the pod's).
    pub server: SocketAddr,
    /// The address the client dialled, where a DNAT rewrote it (a Service's ClusterIP:port).
    pub dialled: Option<SocketAddr>,
    /// The sides this record counts: the client's outbound, the server's inbound. Each side is
    /// counted by the node that hosts it, once (flows.rs).
    pub sides: Sides,
    pub midstream: bool,
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
    /// Set when the client is the node's own address.
    node: Option<NodeClient>,
}

/// What one workload received during one time bucket.
#[derive(Debug, Default, Clone)]
struct Bucket {
    /// Start of the bucket, seconds since the epoch, a multiple of the bucket width.
    start: u64,
    inbound: Inbound,
    compliant: u64,
    blockers: HashMap<BlockerKey, BlockerAcc>,
    /// Judged inbound connections per server port (for the per-port PeerAuthentication modes).
    ports: HashMap<u16, u64>,
    /// Connections the server reset or closed right after the client's first bytes.
    rejected: u64,
    /// Inbound connections seen in one direction only (evidence `one_direction`).
    one_direction: u64,
}

#[derive(Debug, Default)]
struct WorkloadStats {
    /// Oldest first; a bounded ring: buckets older than the window are dropped.
    buckets: std::collections::VecDeque<Bucket>,
    /// Client label sets already used on the blocking counter for this server workload.
    blocking_labels: HashSet<(String, String, String)>,
    /// Ports already used on `mtls_agent_inbound_port_connections_total` for this workload.
    port_labels: HashSet<u16>,
}

/// Distinct `port` values per workload on `mtls_agent_inbound_port_connections_total`; the rest
/// is counted as `port="other"`.
pub const MAX_PORT_LABELS: usize = 16;

/// Sums of the buckets inside a window.
#[derive(Debug, Default)]
struct Totals {
    inbound: Inbound,
    compliant: u64,
    blockers: HashMap<BlockerKey, BlockerAcc>,
    ports: HashMap<u16, u64>,
    rejected: u64,
    one_direction: u64,
}

impl WorkloadStats {
    fn bucket_mut(&mut self, start: u64) -> &mut Bucket {
        match self.buckets.iter().rposition(|b| b.start == start) {
            Some(i) => &mut self.buckets[i],
            None => {
                // Records arrive in time order; a late one (clock step) goes into the newest.
                if self.buckets.back().is_some_and(|b| b.start > start) {
                    return self.buckets.back_mut().expect("checked non-empty");
                }
                self.buckets.push_back(Bucket {
                    start,
                    ..Bucket::default()
                });
                self.buckets.back_mut().expect("just pushed")
            }
        }
    }

    fn expire(&mut self, oldest: u64) {
        while self.buckets.front().is_some_and(|b| b.start < oldest) {
            self.buckets.pop_front();
        }
    }

    fn totals(&self, since: u64) -> Totals {
        let mut t = Totals::default();
        for b in self.buckets.iter().filter(|b| b.start >= since) {
            t.inbound.add(&b.inbound);
            t.compliant += b.compliant;
            t.rejected += b.rejected;
            t.one_direction += b.one_direction;
            for (p, n) in &b.ports {
                *t.ports.entry(*p).or_default() += n;
            }
            for (k, acc) in &b.blockers {
                match t.blockers.get_mut(k) {
                    Some(a) => {
                        a.connections += acc.connections;
                        if acc.last_seen >= a.last_seen {
                            a.last_seen = acc.last_seen;
                            a.last_address = acc.last_address;
                            a.evidence.clone_from(&acc.evidence);
                            a.mesh = acc.mesh;
                            a.protocol = acc.protocol;
                            a.node = acc.node;
                        }
                    }
                    None => {
                        t.blockers.insert(k.clone(), acc.clone());
                    }
                }
            }
        }
        t
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ReportError {
    #[error("namespace {0:?} is not known to this agent (no inventory entry and no traffic)")]
    UnknownNamespace(String),
    #[error("workload {1:?} is not known in namespace {0:?}")]
    UnknownWorkload(String, String),
    #[error("window {asked}s is longer than this agent keeps ({kept}s, its --window)")]
    WindowTooLong { asked: u64, kept: u64 },
    #[error("window must be at least 1s")]
    WindowZero,
}

pub struct Aggregator {
    cfg: AggregateConfig,
    resolver: Resolver,
    metrics: Metrics,
    started: Instant,
    width: u64,
    workloads: HashMap<Arc<Workload>, WorkloadStats>,
}

/// How a judged inbound connection fares under STRICT (label `strict` of
/// `mtls_agent_inbound_connections_total`).
fn strict_label(exempt: bool, compliant: bool) -> &'static str {
    if exempt {
        "exempt"
    } else if compliant {
        "compliant"
    } else {
        "blocking"
    }
}

impl Aggregator {
    pub fn new(cfg: AggregateConfig, resolver: Resolver, metrics: Metrics) -> Self {
        let width = bucket_width(cfg.window);
        let agg = Self {
            cfg,
            resolver,
            metrics,
            started: Instant::now(),
            width,
            workloads: HashMap::new(),
        };
        agg.publish_inventory();
        agg
    }

    pub fn resolver(&self) -> &Resolver {
        &self.resolver
    }

    pub fn resolver_mut(&mut self) -> &mut Resolver {
        &mut self.resolver
    }

    pub fn window(&self) -> Duration {
        self.cfg.window
    }

    /// Known workloads as `mtls_agent_workload_info` (sidecar or not), and every known namespace's
    /// readiness gauge from the start (no data: not ready). Call again when identities change.
    pub fn publish_inventory(&self) {
        self.publish_modes();
        for w in self.resolver.workloads() {
            self.metrics
                .workload_info
                .with_label_values(&[
                    w.namespace.as_str(),
                    w.name.as_str(),
                    if w.sidecar { "true" } else { "false" },
                ])
                .set(1);
            if let Some(labels) = self.resolver.labels(&w.namespace, &w.name)
                && !labels.is_empty()
            {
                let selector = labels
                    .iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect::<Vec<_>>()
                    .join(",");
                self.metrics
                    .workload_selector
                    .with_label_values(&[w.namespace.as_str(), w.name.as_str(), &selector])
                    .set(1);
            }
        }
        for ns in self.resolver.namespaces() {
            self.metrics.strict_ready.with_label_values(&[ns]).set(0);
        }
    }

    /// `mtls_agent_namespace_strict_intended` for every known namespace, from the
    /// PeerAuthentication modes the identity layer knows (none in inventory mode).
    fn publish_modes(&self) {
        for ns in self.resolver.namespaces() {
            let strict = self.resolver.namespace_mode(ns) == Some(crate::identity::Mode::Strict);
            self.metrics
                .strict_intended
                .with_label_values(&[ns])
                .set(strict as i64);
        }
    }

    /// Counts the sides of one classified connection that `rec.sides` names (the sides this node
    /// hosts), each for its workload when it is a known one.
    pub fn record(&mut self, rec: &ConnRecord) {
        let sec = rec.verdict.security;
        let client_wl = self.resolver.lookup(rec.client.ip()).cloned();
        let server_wl = self.resolver.lookup(rec.server.ip()).cloned();
        // Per-connection series are counted once in the cluster: by the server's node when the
        // server is a workload, else by the client's.
        let per_connection = match (&server_wl, &client_wl) {
            (Some(_), _) => rec.sides.server,
            (None, Some(_)) => rec.sides.client,
            (None, None) => rec.sides.server || rec.sides.client,
        };
        if per_connection {
            self.metrics
                .evidence
                .with_label_values(&[sec.as_str(), rec.verdict.evidence.kind()])
                .inc();
            if server_wl.is_none() && client_wl.is_none() {
                self.metrics
                    .unattributed
                    .with_label_values(&[sec.as_str()])
                    .inc();
            }
        }
        let one_direction = rec.verdict.evidence == Evidence::OneDirection;
        if rec.sides.client
            && let Some(c) = &client_wl
        {
            self.metrics
                .connections
                .with_label_values(&[&c.namespace, &c.name, "outbound", sec.as_str()])
                .inc();
            if one_direction {
                self.metrics
                    .one_direction
                    .with_label_values(&[&c.namespace, &c.name, "outbound"])
                    .inc();
            }
        }
        if !rec.sides.server {
            return;
        }
        let Some(server) = server_wl else {
            return;
        };
        self.metrics
            .connections
            .with_label_values(&[&server.namespace, &server.name, "inbound", sec.as_str()])
            .inc();
        if one_direction {
            self.metrics
                .one_direction
                .with_label_values(&[&server.namespace, &server.name, "inbound"])
                .inc();
        }

        let exempt = exemption::exemption(
            &self.cfg.exempt_ports,
            &self.resolver,
            rec.client,
            rec.server,
        )
        .is_some();
        let compliant =
            sec == Security::Mtls && (rec.verdict.mesh == Mesh::Istio || self.cfg.generic_mesh);
        self.metrics
            .inbound
            .with_label_values(&[
                &server.namespace,
                &server.name,
                sec.as_str(),
                strict_label(exempt, compliant),
            ])
            .inc();
        let start = epoch_secs(rec.at) / self.width * self.width;
        let max_labels = self.cfg.max_blocking_clients;
        let stats = self.workloads.entry(server.clone()).or_default();
        let bucket = stats.bucket_mut(start);
        bucket.one_direction += one_direction as u64;
        if exempt {
            bucket.inbound.exempt += 1;
        } else {
            match sec {
                Security::Mtls => bucket.inbound.mtls += 1,
                Security::Tls => bucket.inbound.tls += 1,
                Security::Plaintext => bucket.inbound.plaintext += 1,
                Security::Unknown => bucket.inbound.unknown += 1,
            }
            *bucket.ports.entry(rec.server.port()).or_default() += 1;
            let port = rec.server.port();
            let port_label =
                if stats.port_labels.contains(&port) || stats.port_labels.len() < MAX_PORT_LABELS {
                    stats.port_labels.insert(port);
                    port.to_string()
                } else {
                    "other".to_owned()
                };
            self.metrics
                .inbound_port
                .with_label_values(&[&server.namespace, &server.name, &port_label])
                .inc();
            let bucket = stats.bucket_mut(start);
            if compliant {
                bucket.compliant += 1;
            } else {
                let mut key = BlockerKey {
                    server_workload: server.name.clone(),
                    port: rec.server.port(),
                    client_namespace: client_wl.as_ref().map(|c| c.namespace.clone()),
                    client_workload: client_wl.as_ref().map(|c| c.name.clone()),
                    client_address: client_wl.is_none().then(|| rec.client.ip()),
                    security: sec,
                };
                if !bucket.blockers.contains_key(&key)
                    && bucket.blockers.len() >= MAX_BLOCKERS_PER_BUCKET
                {
                    key.client_namespace = None;
                    key.client_workload = None;
                    key.client_address = None;
                }
                let node = client_wl
                    .is_none()
                    .then(|| exemption::node_client(&self.resolver, rec.client, rec.server))
                    .flatten();
                // A folded entry has no client to name.
                let addressed = key.client_address.is_some();
                let acc = bucket.blockers.entry(key).or_insert(BlockerAcc {
                    connections: 0,
                    last_seen: rec.at,
                    last_address: rec.client.ip(),
                    evidence: String::new(),
                    mesh: rec.verdict.mesh,
                    protocol: None,
                    node: None,
                });
                acc.connections += 1;
                acc.last_seen = acc.last_seen.max(rec.at);
                acc.last_address = rec.client.ip();
                acc.evidence = rec.verdict.evidence.to_string();
                acc.mesh = rec.verdict.mesh;
                acc.protocol = rec.verdict.protocol.map(|p| p.as_str());
                acc.node = node.filter(|_| addressed);

                // Unknown clients are told apart by address; every distinct label set counts
                // against the per-server cap. The node's address is named as such.
                let labels = match (&client_wl, node) {
                    (Some(c), _) => (c.namespace.clone(), c.name.clone(), String::new()),
                    (None, Some(n)) => (
                        "node".to_owned(),
                        n.label().to_owned(),
                        rec.client.ip().to_string(),
                    ),
                    (None, None) => (
                        "unknown".to_owned(),
                        "unknown".to_owned(),
                        rec.client.ip().to_string(),
                    ),
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
                    ("other".to_owned(), "other".to_owned(), String::new())
                };
                let values = [
                    server.namespace.as_str(),
                    server.name.as_str(),
                    &rec.server.port().to_string(),
                    &labels.0,
                    &labels.1,
                    &labels.2,
                    sec.as_str(),
                ];
                self.metrics.blocking.with_label_values(&values).inc();
                self.metrics
                    .blocking_last_seen
                    .with_label_values(&values)
                    .set(epoch_secs(rec.at) as f64);
            }
        }
        self.update_namespace_gauges(&server.namespace, SystemTime::now());
    }

    /// Payload bytes of a connection, for the sides this node hosts.
    pub fn record_bytes(
        &mut self,
        client: SocketAddr,
        server: SocketAddr,
        security: Security,
        bytes: u64,
        sides: Sides,
    ) {
        if bytes == 0 {
            return;
        }
        for (ip, dir, here) in [
            (client.ip(), "outbound", sides.client),
            (server.ip(), "inbound", sides.server),
        ] {
            if !here {
                continue;
            }
            if let Some(w) = self.resolver.lookup(ip) {
                self.metrics
                    .bytes
                    .with_label_values(&[&w.namespace, &w.name, dir, security.as_str()])
                    .inc_by(bytes);
            }
        }
    }

    /// An ended connection: its bytes for the sides this node hosts, and whether the server
    /// rejected it (reset or closed right after the client's first bytes, as a STRICT sidecar
    /// does).
    #[allow(clippy::too_many_arguments)]
    pub fn record_end(
        &mut self,
        client: SocketAddr,
        server: SocketAddr,
        security: Security,
        bytes: u64,
        rejected: bool,
        sides: Sides,
        at: SystemTime,
    ) {
        self.record_bytes(client, server, security, bytes, sides);
        if !rejected || !sides.server {
            return;
        }
        if !rejected {
            return;
        }
        let Some(w) = self.resolver.lookup(server.ip()).cloned() else {
            return;
        };
        self.metrics
            .rejected
            .with_label_values(&[&w.namespace, &w.name, security.as_str()])
            .inc();
        let start = epoch_secs(at) / self.width * self.width;
        self.workloads
            .entry(w)
            .or_default()
            .bucket_mut(start)
            .rejected += 1;
    }

    /// First second inside a window ending now, at bucket granularity.
    fn since(&self, window: Duration, now: SystemTime) -> u64 {
        let now = epoch_secs(now);
        // The current bucket counts whole; a window of N s covers the buckets that started in
        // the last N s.
        (now / self.width * self.width + self.width)
            .saturating_sub(window.as_secs().max(self.width))
    }

    fn namespace_totals(&self, ns: &str, since: u64) -> (Inbound, u64) {
        let mut inbound = Inbound::default();
        let mut compliant = 0;
        for (w, s) in &self.workloads {
            if w.namespace == ns {
                let t = s.totals(since);
                inbound.add(&t.inbound);
                compliant += t.compliant;
            }
        }
        (inbound, compliant)
    }

    fn update_namespace_gauges(&self, ns: &str, now: SystemTime) {
        let since = self.since(self.cfg.window, now);
        let (inbound, compliant) = self.namespace_totals(ns, since);
        let ready = report::readiness(&inbound, compliant) == Readiness::Ready;
        self.metrics
            .strict_ready
            .with_label_values(&[ns])
            .set(ready as i64);
        match report::ratio(&inbound, compliant) {
            Some(r) => self.metrics.mtls_ratio.with_label_values(&[ns]).set(r),
            None => {
                let _ = self.metrics.mtls_ratio.remove_label_values(&[ns]);
            }
        }
    }

    /// Drops buckets that left the window and refreshes every namespace's gauges, so readiness
    /// follows the window even when no traffic arrives. Called from the daemon's tick.
    pub fn expire(&mut self, now: SystemTime) {
        let oldest = self.since(self.cfg.window, now);
        for s in self.workloads.values_mut() {
            s.expire(oldest);
        }
        self.workloads.retain(|_, s| !s.buckets.is_empty());
        self.publish_modes();
        for ns in self.namespaces() {
            self.update_namespace_gauges(&ns, now);
        }
    }

    /// Namespaces known from the inventory or from traffic.
    pub fn namespaces(&self) -> BTreeSet<String> {
        let mut out: BTreeSet<String> = self
            .resolver
            .namespaces()
            .into_iter()
            .map(str::to_owned)
            .collect();
        out.extend(self.workloads.keys().map(|w| w.namespace.clone()));
        out
    }

    /// The report over the agent's whole window.
    pub fn report(&self, namespace: &str, workload: Option<&str>) -> Result<Report, ReportError> {
        self.report_window(namespace, workload, None, SystemTime::now())
    }

    /// The report over `window` (default: the agent's `--window`), ending at `now`.
    pub fn report_window(
        &self,
        namespace: &str,
        workload: Option<&str>,
        window: Option<Duration>,
        now: SystemTime,
    ) -> Result<Report, ReportError> {
        let window = window.unwrap_or(self.cfg.window);
        if window.is_zero() {
            return Err(ReportError::WindowZero);
        }
        if window > self.cfg.window {
            return Err(ReportError::WindowTooLong {
                asked: window.as_secs(),
                kept: self.cfg.window.as_secs(),
            });
        }
        if !self.namespaces().contains(namespace) {
            return Err(ReportError::UnknownNamespace(namespace.to_owned()));
        }
        let since = self.since(window, now);
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
            return Err(ReportError::UnknownWorkload(
                namespace.to_owned(),
                name.to_owned(),
            ));
        }
        let mut inbound = Inbound::default();
        let mut compliant = 0;
        let mut rejected = 0;
        let mut one_direction = 0;
        let mut workloads = Vec::new();
        let mut blockers = Vec::new();
        for w in known {
            if workload.is_some_and(|n| n != w.name) {
                continue;
            }
            let t = self
                .workloads
                .get(w)
                .map(|s| s.totals(since))
                .unwrap_or_default();
            inbound.add(&t.inbound);
            compliant += t.compliant;
            rejected += t.rejected;
            one_direction += t.one_direction;
            let mut ports: Vec<PortReport> = t
                .ports
                .iter()
                .map(|(port, n)| PortReport {
                    port: *port,
                    connections: *n,
                    mode: self
                        .resolver
                        .mode(&w.namespace, &w.name, *port)
                        .map(|m| m.as_str().to_owned()),
                })
                .collect();
            ports.sort_by_key(|p| p.port);
            workloads.push(WorkloadReport {
                name: w.name.clone(),
                verdict: report::readiness(&t.inbound, t.compliant),
                inbound: t.inbound,
                sidecar: w.sidecar,
                mtls_ratio: report::ratio(&t.inbound, t.compliant),
                compliant: t.compliant,
                rejected: t.rejected,
                one_direction: t.one_direction,
                mode: self
                    .resolver
                    .mode(&w.namespace, &w.name, 0)
                    .map(|m| m.as_str().to_owned()),
                ports,
                labels: self.resolver.labels(&w.namespace, &w.name),
            });
            for (k, acc) in t.blockers {
                let address = acc.last_address.to_string();
                blockers.push(Blocker {
                    client: match acc.node {
                        Some(n) => ClientRef::node(address, n),
                        None => ClientRef {
                            namespace: k.client_namespace.clone(),
                            workload: k.client_workload.clone(),
                            address,
                            kind: None,
                            description: None,
                        },
                    },
                    advice: acc.node.map(|n| n.advice(k.port)),
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
        report::sort_blockers(&mut blockers);
        let uptime = self.started.elapsed().as_secs().max(1);
        Ok(Report {
            namespace: namespace.to_owned(),
            workload: workload.map(str::to_owned),
            window_seconds: window.as_secs().min(uptime),
            verdict: report::readiness(&inbound, compliant),
            inbound,
            mtls_ratio: report::ratio(&inbound, compliant),
            compliant,
            rejected,
            one_direction,
            warnings: Vec::new(),
            peer_authentication: self
                .resolver
                .namespace_mode(namespace)
                .map(|m| m.as_str().to_owned()),
            blockers,
            workloads,
            peer_authentications: self
                .resolver
                .kube()
                .map(|k| k.rules_for(namespace))
                .unwrap_or_default(),
            what_if: None,
            nodes: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        classify::{Evidence, Verdict},
        identity::Inventory,
    };

    fn agg(window: Duration, max_blocking: usize) -> Aggregator {
        let inv = Inventory::parse(
            "workloads:\n  - {namespace: shop, name: web, addresses: [198.18.0.20]}\n  - {namespace: shop, name: api, addresses: [198.18.0.21]}\n  - {namespace: legacy, name: batch, addresses: [198.18.0.30], sidecar: false}\n  - {namespace: mesh, name: a, addresses: [198.18.0.40]}\nnode_addresses: [198.18.0.1]\n",
        )
        .unwrap();
        Aggregator::new(
            AggregateConfig {
                window,
                max_blocking_clients: max_blocking,
                ..AggregateConfig::default()
            },
            Resolver::from_inventory(&inv),
            Metrics::new(),
        )
    }

    fn rec(client: &str, server: &str, sec: Security, mesh: Mesh, at: SystemTime) -> ConnRecord {
        let mut verdict = Verdict::new(sec, Evidence::PlaintextFirstBytes);
        verdict.mesh = mesh;
        ConnRecord {
            client: client.parse().unwrap(),
            server: server.parse().unwrap(),
            dialled: None,
            sides: Sides::BOTH,
            midstream: false,
            verdict,
            at,
        }
    }

    const T0: u64 = 1_800_000_000;

    fn at(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(T0 + secs)
    }

    #[test]
    fn readiness_exemptions_and_blockers() {
        let mut a = agg(Duration::from_secs(900), 20);
        let now = at(10);
        for _ in 0..3 {
            a.record(&rec(
                "198.18.0.30:40000",
                "198.18.0.20:8080",
                Security::Plaintext,
                Mesh::None,
                now,
            ));
        }
        a.record(&rec(
            "198.18.0.1:40000",
            "198.18.0.20:8080",
            Security::Plaintext,
            Mesh::None,
            now,
        )); // the node to an app port: a blocker, named as the node
        a.record(&rec(
            "198.18.0.30:40000",
            "198.18.0.21:15021",
            Security::Plaintext,
            Mesh::None,
            now,
        )); // exempt port
        a.record(&rec(
            "203.0.113.9:40000",
            "198.18.0.21:9000",
            Security::Tls,
            Mesh::None,
            now,
        )); // unknown client
        a.record(&rec(
            "198.18.0.40:40000",
            "198.18.0.21:9000",
            Security::Mtls,
            Mesh::Istio,
            now,
        ));
        a.record(&rec(
            "198.18.0.40:40000",
            "198.18.0.21:9000",
            Security::Mtls,
            Mesh::None,
            now,
        )); // non-Istio mTLS
        let r = a.report_window("shop", None, None, at(20)).unwrap();
        assert_eq!(r.verdict, Readiness::NotReady);
        assert_eq!(
            r.inbound,
            Inbound {
                mtls: 2,
                tls: 1,
                plaintext: 4,
                unknown: 0,
                exempt: 1
            }
        );
        assert_eq!(r.compliant, 1);
        assert_eq!(r.mtls_ratio, Some(1.0 / 7.0));
        assert_eq!(r.blockers.len(), 4);
        assert_eq!(r.blockers[0].connections, 3);
        assert_eq!(r.blockers[0].client.workload.as_deref(), Some("batch"));
        let node = r
            .blockers
            .iter()
            .find(|b| b.client.kind == Some(ClientKind::Node))
            .unwrap();
        assert_eq!(node.client.address, "198.18.0.1");
        assert!(node.client.workload.is_none() && node.client.namespace.is_none());
        assert_eq!(
            node.client.description.as_deref(),
            Some("the node or a hostNetwork pod")
        );
        assert!(node.advice.as_ref().unwrap().contains("port 8080"));
        let text = a.metrics.render();
        assert!(
            text.contains("mtls_agent_blocking_connections_total{client_address=\"198.18.0.1\",client_namespace=\"node\",client_workload=\"node\",namespace=\"shop\",port=\"8080\",security=\"plaintext\",workload=\"web\"} 1"),
            "{text}"
        );
        let unknown = r
            .blockers
            .iter()
            .find(|b| b.client.workload.is_none() && b.client.kind.is_none())
            .unwrap();
        assert_eq!(unknown.client.address, "203.0.113.9");
        assert_eq!(unknown.security, "tls");
        assert!(
            r.blockers
                .iter()
                .any(|b| b.security == "mtls" && b.client.workload.as_deref() == Some("a"))
        );
        let web = a.report_window("shop", Some("web"), None, at(20)).unwrap();
        assert_eq!(web.inbound.plaintext, 4);
        assert_eq!(web.inbound.exempt, 0);
        assert_eq!(web.workloads.len(), 1);
        let legacy = a.report_window("legacy", None, None, at(20)).unwrap();
        assert_eq!(legacy.verdict, Readiness::NoData);
        assert!(!legacy.workloads[0].sidecar);
        assert_eq!(
            a.report("nowhere", None).unwrap_err(),
            ReportError::UnknownNamespace("nowhere".into())
        );
        assert_eq!(
            a.report("shop", Some("nope")).unwrap_err(),
            ReportError::UnknownWorkload("shop".into(), "nope".into())
        );
    }

    #[test]
    fn windows_forget_old_traffic() {
        let mut a = agg(Duration::from_secs(600), 20); // 10 s buckets
        a.record(&rec(
            "198.18.0.30:1",
            "198.18.0.20:8080",
            Security::Plaintext,
            Mesh::None,
            at(0),
        ));
        a.record(&rec(
            "198.18.0.40:1",
            "198.18.0.20:8080",
            Security::Mtls,
            Mesh::Istio,
            at(500),
        ));
        // Whole window: both; last two minutes: only the mTLS one.
        let all = a.report_window("shop", None, None, at(505)).unwrap();
        assert_eq!(all.verdict, Readiness::NotReady);
        let recent = a
            .report_window("shop", None, Some(Duration::from_secs(120)), at(505))
            .unwrap();
        assert_eq!(recent.verdict, Readiness::Ready);
        assert_eq!(recent.inbound.plaintext, 0);
        // After the window has passed the plaintext connection, expiry drops it for good.
        a.expire(at(650));
        let later = a.report_window("shop", None, None, at(650)).unwrap();
        assert_eq!(later.verdict, Readiness::Ready);
        a.expire(at(1200));
        assert_eq!(
            a.report_window("shop", None, None, at(1200))
                .unwrap()
                .verdict,
            Readiness::NoData
        );
        assert_eq!(
            a.report_window("shop", None, Some(Duration::from_secs(601)), at(1200))
                .unwrap_err(),
            ReportError::WindowTooLong {
                asked: 601,
                kept: 600
            }
        );
    }

    #[test]
    fn blocking_labels_are_capped_per_server() {
        let mut a = agg(Duration::from_secs(900), 2);
        for i in 0..5 {
            a.record(&rec(
                &format!("203.0.113.{i}:1"),
                "198.18.0.20:8080",
                Security::Plaintext,
                Mesh::None,
                at(1),
            ));
        }
        let text = a.metrics.render();
        let series = text
            .lines()
            .filter(|l| l.starts_with("mtls_agent_blocking_connections_total{"))
            .count();
        assert_eq!(series, 3, "2 distinct clients + other:\n{text}");
        assert!(text.contains("client_workload=\"other\""));
        assert!(text.contains(
            "mtls_agent_blocking_clients_overflow_total{namespace=\"shop\",workload=\"web\"} 3"
        ));
        // The report still has every client (it is not a label).
        assert_eq!(
            a.report_window("shop", None, None, at(2))
                .unwrap()
                .blockers
                .len(),
            5
        );
    }

    #[test]
    fn gauges_follow_readiness() {
        let mut a = agg(Duration::from_secs(900), 20);
        a.record(&rec(
            "198.18.0.40:1",
            "198.18.0.20:8080",
            Security::Mtls,
            Mesh::Istio,
            SystemTime::now(),
        ));
        let text = a.metrics.render();
        assert!(
            text.contains("mtls_agent_namespace_strict_ready{namespace=\"shop\"} 1"),
            "{text}"
        );
        assert!(text.contains("mtls_agent_namespace_strict_ready{namespace=\"legacy\"} 0"));
        assert!(text.contains("mtls_agent_namespace_mtls_ratio{namespace=\"shop\"} 1"));
        assert!(text.contains(
            "mtls_agent_workload_info{namespace=\"legacy\",sidecar=\"false\",workload=\"batch\"} 1"
        ));
        assert!(text.contains("mtls_agent_inbound_connections_total{namespace=\"shop\",security=\"mtls\",strict=\"compliant\",workload=\"web\"} 1"));
    }

    #[test]
    fn one_direction_sides_are_counted_and_reported() {
        let mut a = agg(Duration::from_secs(900), 20);
        let now = SystemTime::now();
        // batch (legacy) → web (shop), both on this node's inventory; this node hosts the
        // server's side only, as the server's node behind bpf_redirect_peer.
        let mut r = rec(
            "198.18.0.30:40000",
            "198.18.0.20:8080",
            Security::Unknown,
            Mesh::None,
            now,
        );
        r.verdict.evidence = Evidence::OneDirection;
        r.sides = Sides {
            client: false,
            server: true,
        };
        a.record(&r);
        // An ordinary unknown is not partial sight.
        a.record(&rec(
            "198.18.0.30:40001",
            "198.18.0.20:8080",
            Security::Unknown,
            Mesh::None,
            now,
        ));
        let rep = a.report("shop", None).unwrap();
        assert_eq!(rep.verdict, Readiness::NotReady);
        assert_eq!(rep.inbound.unknown, 2);
        assert_eq!(rep.one_direction, 1);
        assert_eq!(
            rep.workloads.iter().map(|w| w.one_direction).sum::<u64>(),
            1
        );
        assert_eq!(report::warnings(&rep).len(), 1);
        let text = a.metrics.render();
        assert!(text.contains("mtls_agent_one_direction_connections_total{direction=\"inbound\",namespace=\"shop\",workload=\"web\"} 1"), "{text}");
        assert!(
            !text.contains("mtls_agent_one_direction_connections_total{direction=\"outbound\""),
            "the client's side is its own node's: {text}"
        );
        assert!(text.contains("mtls_agent_verdict_evidence_total{evidence=\"one_direction\",security=\"unknown\"} 1"), "{text}");
    }
}
