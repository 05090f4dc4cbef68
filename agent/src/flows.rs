//! flows: turns per-interface capture events into one stream per TCP connection and drives the
//! classifier. Sits between `capture` and `classify`:
//!
//! - a same-node connection crosses two pod veths, so every segment arrives twice; events of all
//!   interfaces meet under one [`ConnKey`] (the client's endpoint and ISN, which a kube-proxy DNAT
//!   leaves alone: a call to a Service is one connection, seen as `client → ClusterIP:port` on the
//!   client's veth and `client → pod:port` on the server's) and the classifier's reassembly drops
//!   the duplicates;
//! - each side of a connection is counted only by the node that hosts it: an interface's hook
//!   tells which endpoint lives behind it (capture's `local` flags), and a side is counted once,
//!   as soon as the verdict is final and that side was seen local (long-lived connections are not
//!   held back until they close) or, without a verdict, when the connection ends;
//! - it ends when every interface that saw it reported the close, or after a short grace period
//!   (a late close from the other interface lands on a tombstone, not on a new connection);
//! - a connection this node sees in one direction only (the kernel proved that the other
//!   direction passes unseen: `EventMeta::one_way`) is counted as `unknown` with evidence
//!   `one_direction`, never classified from its half;
//! - once its verdict is final, its sides counted and its recent entry written, it moves to a
//!   compact table ([`decided`]) that only counts its bytes and its end.
mod decided;
mod intern;

// hashbrown's default hasher (foldhash), not SipHash: hashing 68-byte keys with SipHash was the
// top user-space symbol of the agent in a `perf` profile of TCP churn.
use hashbrown::HashMap;
use std::{
    net::SocketAddr,
    time::{Duration, Instant, SystemTime},
};

use crate::{
    aggregate::ConnRecord,
    capture::{
        events::{Event, EventMeta, FlowId, Opener},
        gc::LiveFlows,
    },
    classify::{
        ConnClassifier, ConnMeta, Direction, Evidence, ResumptionCache, Security, Sides, Verdict,
    },
};

#[derive(Debug, Clone)]
pub struct TrackerConfig {
    /// Wait this long after the first interface reported the close for the others.
    pub close_grace: Duration,
    /// A connection without a verdict and without events for this long is ended as it is.
    pub idle_undecided: Duration,
    /// A decided connection without events for this long is forgotten (bytes counted).
    pub idle_decided: Duration,
    /// How long the key of a connection that ended before every interface reported its close
    /// (grace or idle ran out) swallows late events. The close the ring buffer could not take
    /// is reported by the flow-table collector (capture/gc.rs) once it walks the table: this
    /// must cover its interval plus `CLOSED_LINGER`, or that close would count the connection
    /// a second time.
    pub tombstone: Duration,
    /// The same for a connection whose every interface reported its close: only a duplicate
    /// close can follow (two CPUs closing one entry at once), a moment later in the same ring
    /// buffer. A new connection on the 4-tuple has a new ISN, so a new key; a late payload
    /// packet after the collector deleted the entry would be mid-stream, so another key too.
    pub tombstone_closed: Duration,
    /// Upper bound on tracked connections (the daemon: the kernel flow table's size, as each
    /// connection it reports holds an entry there); beyond it new ones are not tracked. The
    /// decided table starts sized for an eighth of it ([`DECIDED_PRESIZE`]).
    pub max_connections: usize,
    /// Recent full handshakes remembered for resumed sessions.
    pub resumption_capacity: usize,
    /// After a verdict, how long the recent-connections entry waits for the connection's other
    /// interface (the server's address behind a DNAT) before it is written as it is.
    pub sides_grace: Duration,
}

impl Default for TrackerConfig {
    fn default() -> Self {
        Self {
            close_grace: Duration::from_secs(1),
            idle_undecided: Duration::from_secs(120),
            idle_decided: Duration::from_secs(3600),
            tombstone: tombstone_for(Duration::from_secs(60)),
            tombstone_closed: Duration::from_secs(1),
            max_connections: mtls_agent_common::DEFAULT_FLOW_TABLE_SIZE as usize,
            resumption_capacity: 65_536,
            sides_grace: Duration::from_millis(250),
        }
    }
}

/// [`TrackerConfig::tombstone`] for a flow-table collector that walks the table every
/// `gc_interval` (a second more for the walk itself).
pub fn tombstone_for(gc_interval: Duration) -> Duration {
    gc_interval + crate::capture::gc::CLOSED_LINGER + Duration::from_secs(1)
}

/// One connection, as every interface that carries it names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ConnKey {
    /// The handshake was seen (a SYN, or a SYN-ACK whose acknowledgement names the client's
    /// ISN): the client's address, port and ISN. They survive a DNAT of the server's address, and
    /// a reused 4-tuple gets a new ISN.
    Opened { client: SocketAddr, isn: u32 },
    /// Picked up mid-stream: the 4-tuple is all there is.
    Midstream(FlowId),
}

impl ConnKey {
    pub fn of(meta: &EventMeta) -> ConnKey {
        match (meta.opener, meta.client_isn()) {
            (Opener::Lo, Some(isn)) => ConnKey::Opened {
                client: meta.flow.lo,
                isn,
            },
            (Opener::Hi, Some(isn)) => ConnKey::Opened {
                client: meta.flow.hi,
                isn,
            },
            _ => ConnKey::Midstream(meta.flow),
        }
    }
}

/// What the tracker hands to `aggregate`.
#[derive(Debug, Clone)]
pub enum Output {
    /// A connection got its verdict: counted for the sides in `rec.sides` (each side once).
    Classified(ConnRecord),
    /// A connection's record for `GET /api/v1/connections`, once per connection, with every
    /// address this node saw for it.
    Recent(ConnRecord),
    /// Payload bytes of a counted connection (both directions) since the last report: a
    /// long-lived connection reports them every 64 MiB of a direction, not only at its end.
    Bytes {
        client: SocketAddr,
        server: SocketAddr,
        security: Security,
        bytes: u64,
        sides: Sides,
    },
    /// A counted connection ended; its payload bytes not reported yet, both directions.
    Ended {
        client: SocketAddr,
        server: SocketAddr,
        security: Security,
        bytes: u64,
        /// The server sent nothing and the connection ended right after the client's first bytes:
        /// what a sidecar in STRICT does to plaintext (and any non-Istio client).
        rejected: bool,
        /// The sides this node hosts: bytes and rejections are counted for these only.
        sides: Sides,
    },
}

/// The decided table starts with room for this fraction of `max_connections`, and grows from
/// there. Not all of it: entries land all over a hash table, so a table sized for the whole
/// 262,144-entry flow table had every one of its 33 MiB of pages resident after a few seconds
/// of churn with only a few thousand connections alive (`cargo xtask bench`, TCP churn: peak
/// RSS 67 MiB against 39 MiB).
const DECIDED_PRESIZE: usize = 8;

/// "Right after the first client bytes": a rejection closes within this time.
const REJECT_WITHIN_NS: u64 = 2_000_000_000;

struct Conn {
    /// Dropped once the verdict is final: a decided connection costs a few dozen bytes.
    classifier: Option<Box<ConnClassifier>>,
    client: SocketAddr,
    /// The address that served the connection (the pod's, from the server's interface when this
    /// node hosts it).
    server: SocketAddr,
    /// The address the client dialled when a DNAT rewrote it (a Service's ClusterIP:port).
    dialled: Option<SocketAddr>,
    /// The 4-tuples this connection was seen under (two behind a DNAT), and those whose close
    /// was reported: one flow-table entry each.
    views: Vec<FlowId>,
    closed_views: Vec<FlowId>,
    /// Payload bytes, client → server and server → client (maximum over views), and how many
    /// of them were reported already.
    bytes: [u64; 2],
    bytes_reported: u64,
    /// The sides this node hosts, as the hooks told.
    local: Sides,
    /// Sides already counted.
    counted: Sides,
    /// The final verdict, kept while a side may still be counted or the recent entry written.
    verdict: Option<Box<Verdict>>,
    /// Set when the verdict was reached.
    security: Option<Security>,
    /// When the verdict was reached, until the recent-connections entry is written.
    recent_due: Option<(Instant, SystemTime)>,
    /// Some data event arrived.
    saw_data: bool,
    /// The kernel could not hand over some of this connection's events (ring buffer full).
    lost_data: bool,
    /// The server answered the SYN: a connection, not a refused attempt.
    established: bool,
    /// Kernel time of the client's first payload, and of the first close report.
    first_client_data_ns: Option<u64>,
    closed_ns: Option<u64>,
    /// The server sent payload.
    server_data: bool,
    /// This node sees the connection in one direction only (the kernel's proof, `meta.one_way`).
    one_way: bool,
    midstream: bool,
    last_activity: Instant,
    closing_since: Option<Instant>,
}

impl Conn {
    /// Whether the client is the `lo` endpoint of this event's 4-tuple (interfaces on the two
    /// sides of a DNAT order their 4-tuples differently).
    fn client_is_lo(&self, meta: &EventMeta) -> bool {
        meta.flow.lo == self.client
    }
}

pub struct Tracker {
    cfg: TrackerConfig,
    /// Connections being classified, or decided but not settled yet (a side or the recent
    /// entry still to write, or closing).
    conns: HashMap<ConnKey, Conn>,
    decided: decided::DecidedTable,
    /// Ended connections' keys, until when they swallow late events.
    tombstones: HashMap<ConnKey, Instant>,
    cache: ResumptionCache,
    /// Origin of the decided table's millisecond clock.
    epoch: Instant,
}

/// Chooses the server of a connection whose SYN was not seen: the well-known (lower, or
/// non-ephemeral) port. Only orientation for reporting; the verdict of such a connection is never
/// guessed (DESIGN.md: mid-stream connections are classified positively or `unknown`).
fn guess_client_is_lo(flow: &FlowId) -> bool {
    const EPHEMERAL: u16 = 32768;
    let (lo, hi) = (flow.lo.port(), flow.hi.port());
    match (lo >= EPHEMERAL, hi >= EPHEMERAL) {
        (true, false) => true,
        (false, true) => false,
        _ => lo > hi,
    }
}

impl Tracker {
    pub fn new(cfg: TrackerConfig) -> Self {
        let cache = ResumptionCache::new(cfg.resumption_capacity);
        Self {
            decided: decided::DecidedTable::with_capacity(cfg.max_connections / DECIDED_PRESIZE),
            cfg,
            conns: HashMap::new(),
            tombstones: HashMap::new(),
            cache,
            epoch: Instant::now(),
        }
    }

    pub fn len(&self) -> usize {
        self.conns.len() + self.decided.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// `now` on the decided table's clock.
    fn ms(&self, now: Instant) -> u32 {
        now.saturating_duration_since(self.epoch).as_millis() as u32
    }

    /// Moves a connection to the decided table once nothing but its bytes and end is left to
    /// count: verdict final, sides counted and the recent entry written, not closing. A side
    /// that only shows up later (an interface first heard from after `sides_grace`) is not
    /// counted any more.
    fn settle(&mut self, key: ConnKey, now: Instant) {
        let now_ms = self.ms(now);
        let Some(c) = self.conns.get(&key) else {
            return;
        };
        let Some(security) = c.security else {
            return;
        };
        if c.recent_due.is_some() || c.closing_since.is_some() {
            return;
        }
        if let Some(c) = self.conns.remove(&key) {
            self.decided.insert(&key, &c, security, now_ms);
        }
    }

    fn tombstone(&mut self, key: ConnKey, closed_everywhere: bool, now: Instant) {
        let ttl = if closed_everywhere && matches!(key, ConnKey::Opened { .. }) {
            self.cfg.tombstone_closed
        } else {
            self.cfg.tombstone
        };
        self.tombstones.insert(key, now + ttl);
    }

    /// Handles one capture event; what it produces is appended to `out`.
    pub fn on_event(
        &mut self,
        ev: &Event<'_>,
        now: Instant,
        wall: SystemTime,
        out: &mut Vec<Output>,
    ) {
        let meta = ev.meta();
        let key = ConnKey::of(meta);
        if let Some(dk) = self.decided.key_of(&key)
            && self.decided.contains(&dk)
        {
            let now_ms = self.ms(now);
            if self.decided.on_event(&dk, ev, now_ms, out) == Some(true)
                && let Some((key, closed)) = self.decided.finish(&dk, out)
            {
                self.tombstone(key, closed, now);
            }
            return;
        }
        let max = self.cfg.max_connections.saturating_sub(self.decided.len());
        let Some(conn) = conn_entry(&mut self.conns, &self.tombstones, max, key, meta, now) else {
            return;
        };
        let ended = on_conn_event(conn, ev, now, wall, &mut self.cache);
        count_sides(conn, out);
        if matches!(ev, Event::Bytes { .. }) {
            report_bytes(conn, out);
        }
        if ended {
            self.finish(key, true, now, wall, out);
        } else {
            self.settle(key, now);
        }
    }

    /// Ends a connection: counts it if it never got a verdict, reports its bytes, leaves a
    /// tombstone for late events (`closed_everywhere`: every interface that saw it reported
    /// its close).
    fn finish(
        &mut self,
        key: ConnKey,
        closed_everywhere: bool,
        now: Instant,
        wall: SystemTime,
        out: &mut Vec<Output>,
    ) {
        let Some(mut conn) = self.conns.remove(&key) else {
            return;
        };
        self.tombstone(key, closed_everywhere, now);
        if conn.security.is_none() {
            // A SYN answered by RST (nothing listening) is not a connection; one whose events
            // were lost may have been one, and is counted as such.
            if !conn.established && !conn.saw_data && !conn.lost_data {
                return;
            }
            let Some(mut c) = conn.classifier.take() else {
                return;
            };
            let mut v = c.finish(&mut self.cache);
            if conn.lost_data && v.security == Security::Unknown {
                v.evidence = Evidence::EventsLost;
            }
            decide(&mut conn, v, wall);
            count_sides(&mut conn, out);
        }
        write_recent(&mut conn, out);
        if let Some(security) = conn.security {
            // Seen in one direction only, the server's answer may have passed unseen.
            let rejected = !conn.server_data
                && !conn.one_way
                && match (conn.first_client_data_ns, conn.closed_ns) {
                    (Some(first), Some(closed)) => closed.saturating_sub(first) <= REJECT_WITHIN_NS,
                    _ => false,
                };
            let total = conn.bytes[0] + conn.bytes[1];
            out.push(Output::Ended {
                client: conn.client,
                server: conn.server,
                security,
                bytes: total.saturating_sub(conn.bytes_reported),
                rejected,
                sides: conn.local,
            });
        }
    }

    /// Ends connections whose close grace, or idle time, ran out; writes recent entries whose
    /// wait for another interface is over; forgets old tombstones.
    pub fn sweep(&mut self, now: Instant, wall: SystemTime, out: &mut Vec<Output>) {
        let cfg = &self.cfg;
        let mut due = Vec::new();
        let mut written = Vec::new();
        for (k, c) in self.conns.iter_mut() {
            let idle = now.saturating_duration_since(c.last_activity);
            if c.closing_since
                .is_some_and(|t| now.saturating_duration_since(t) >= cfg.close_grace)
                || (c.security.is_none() && idle >= cfg.idle_undecided)
                || idle >= cfg.idle_decided
            {
                due.push(*k);
            } else if c
                .recent_due
                .is_some_and(|(t, _)| now.saturating_duration_since(t) >= cfg.sides_grace)
            {
                write_recent(c, out);
                written.push(*k);
            }
        }
        for key in due {
            self.finish(key, false, now, wall, out);
        }
        for key in written {
            self.settle(key, now);
        }
        let due = decided::Due {
            close_grace: self.cfg.close_grace,
            idle: self.cfg.idle_decided,
        };
        for dk in self.decided.due(self.ms(now), &due) {
            if let Some((key, closed)) = self.decided.finish(&dk, out) {
                self.tombstone(key, closed, now);
            }
        }
        self.tombstones.retain(|_, until| *until > now);
    }

    /// Ends the connections whose kernel flow-table entries are gone: no event since before the
    /// collector's walk began, and none of the 4-tuples they were seen under left in the table
    /// (`capture::gc::LiveFlows`). Their close can no longer be reported (the entry was deleted
    /// with its interface, evicted by the LRU, or collected just as a SYN reused its 4-tuple),
    /// so without this they would stay tracked until the idle timeout, an hour once decided.
    /// They end as on a timeout: counted if never counted, bytes reported, the long tombstone.
    /// Returns how many ended.
    pub fn reconcile(
        &mut self,
        live: &LiveFlows,
        now: Instant,
        wall: SystemTime,
        out: &mut Vec<Output>,
    ) -> usize {
        let gone: Vec<ConnKey> = self
            .conns
            .iter()
            .filter(|(_, c)| {
                c.last_activity < live.since
                    && !c.views.is_empty()
                    && !c.views.iter().any(|v| live.contains(v))
            })
            .map(|(k, _)| *k)
            .collect();
        let mut n = gone.len();
        for key in gone {
            self.finish(key, false, now, wall, out);
        }
        let since_ms = self.ms(live.since);
        for dk in self
            .decided
            .gone(self.ms(now), since_ms, |f| live.contains(f))
        {
            if let Some((key, _)) = self.decided.finish(&dk, out) {
                self.tombstone(key, false, now);
                n += 1;
            }
        }
        n
    }

    /// Ends every connection (agent shutdown), so nothing seen goes uncounted.
    pub fn drain(&mut self, now: Instant, wall: SystemTime, out: &mut Vec<Output>) {
        let keys: Vec<ConnKey> = self.conns.keys().copied().collect();
        for key in keys {
            self.finish(key, false, now, wall, out);
        }
        for dk in self.decided.keys() {
            self.decided.finish(&dk, out);
        }
    }
}

/// The connection an event belongs to, created on first sight; `None` for a tombstoned key or
/// when the table is full.
fn conn_entry<'a>(
    conns: &'a mut HashMap<ConnKey, Conn>,
    tombstones: &HashMap<ConnKey, Instant>,
    max: usize,
    key: ConnKey,
    meta: &EventMeta,
    now: Instant,
) -> Option<&'a mut Conn> {
    if tombstones.contains_key(&key) {
        return None;
    }
    if !conns.contains_key(&key) && conns.len() >= max {
        return None;
    }
    Some(conns.entry(key).or_insert_with(|| {
        let client_is_lo = match meta.opener {
            Opener::Lo => true,
            Opener::Hi => false,
            Opener::Unknown => guess_client_is_lo(&meta.flow),
        };
        let (client, server) = if client_is_lo {
            (meta.flow.lo, meta.flow.hi)
        } else {
            (meta.flow.hi, meta.flow.lo)
        };
        let (ci, si) = if client_is_lo { (0, 1) } else { (1, 0) };
        let midstream = meta.opener == Opener::Unknown;
        let cmeta = ConnMeta {
            client,
            server,
            client_isn: meta.isn[ci],
            server_isn: meta.isn[si],
            midstream,
        };
        Conn {
            classifier: Some(Box::new(ConnClassifier::new(cmeta))),
            client,
            server,
            dialled: None,
            views: Vec::with_capacity(1),
            closed_views: Vec::new(),
            bytes: [0; 2],
            bytes_reported: 0,
            local: Sides::default(),
            counted: Sides::default(),
            verdict: None,
            security: None,
            recent_due: None,
            saw_data: false,
            lost_data: false,
            established: false,
            first_client_data_ns: None,
            closed_ns: None,
            server_data: false,
            one_way: false,
            midstream,
            last_activity: now,
            closing_since: None,
        }
    }))
}

/// Applies one event to its connection; true when the connection has ended on every interface.
fn on_conn_event(
    conn: &mut Conn,
    ev: &Event<'_>,
    now: Instant,
    wall: SystemTime,
    cache: &mut ResumptionCache,
) -> bool {
    let meta = ev.meta();
    conn.last_activity = now;
    if !conn.views.contains(&meta.flow) {
        conn.views.push(meta.flow);
    }
    conn.lost_data |= meta.lost;
    // The other side answered (unseen): a connection, not a refused attempt.
    conn.one_way |= meta.one_way;
    conn.established |= meta.one_way;
    let client_is_lo = conn.client_is_lo(meta);
    let (ci, si) = if client_is_lo { (0, 1) } else { (1, 0) };
    let server_here = if client_is_lo {
        meta.flow.hi
    } else {
        meta.flow.lo
    };
    if server_here != conn.server {
        if meta.local[si] {
            // The server's own interface names the address that really served it.
            conn.dialled.get_or_insert(conn.server);
            conn.server = server_here;
        } else {
            conn.dialled.get_or_insert(server_here);
        }
    }
    conn.local.client |= meta.local[ci];
    conn.local.server |= meta.local[si];
    conn.bytes[0] = conn.bytes[0].max(meta.bytes[ci]);
    conn.bytes[1] = conn.bytes[1].max(meta.bytes[si]);
    conn.established |= meta.isn[si].is_some() || meta.opener == Opener::Unknown;
    let ended = match ev {
        Event::Data {
            lo_to_hi,
            seq,
            wire_len,
            payload,
            ..
        } => {
            conn.saw_data = true;
            let to_server = *lo_to_hi == client_is_lo;
            if to_server {
                conn.first_client_data_ns.get_or_insert(meta.ts_ns);
            } else {
                conn.server_data = true;
            }
            if conn.security.is_none()
                && let Some(c) = conn.classifier.as_mut()
            {
                let dir = if to_server {
                    Direction::ToServer
                } else {
                    Direction::ToClient
                };
                if c.on_segment(dir, *seq, payload, *wire_len, cache)
                    && !conn.one_way
                    && let Some(v) = c.verdict().cloned()
                {
                    decide(conn, v, wall);
                }
            }
            false
        }
        Event::Bytes { .. } | Event::OneWay { .. } => false,
        Event::Closed { meta } => {
            conn.closed_ns.get_or_insert(meta.ts_ns);
            if !conn.closed_views.contains(&meta.flow) {
                conn.closed_views.push(meta.flow);
            }
            conn.closing_since.get_or_insert(now);
            conn.views.iter().all(|v| conn.closed_views.contains(v))
        }
    };
    if conn.one_way {
        decide_one_way(conn, wall);
    }
    ended
}

/// A connection seen in one direction only is `unknown` with evidence `one_direction`, final at
/// once: half of the rules' input is missing, and what a half looks like is not a class (a
/// client's plaintext request answered by a TLS-terminating proxy, a ClientHello whose answer
/// asked for a certificate). The attributes its half shows (SNI, ALPN, mesh) are kept; the
/// classifier runs on a throw-away resumption cache so a half handshake teaches nothing.
fn decide_one_way(conn: &mut Conn, wall: SystemTime) {
    if conn.security.is_some() {
        return;
    }
    let Some(mut c) = conn.classifier.take() else {
        return;
    };
    let mut v = c.finish(&mut ResumptionCache::new(0));
    v.security = Security::Unknown;
    v.evidence = Evidence::OneDirection;
    v.protocol = None;
    v.resumed = false;
    decide(conn, v, wall);
}

/// Reports the payload bytes of a counted connection not reported yet.
fn report_bytes(conn: &mut Conn, out: &mut Vec<Output>) {
    let Some(security) = conn.security else {
        return;
    };
    let total = conn.bytes[0] + conn.bytes[1];
    if total > conn.bytes_reported {
        out.push(Output::Bytes {
            client: conn.client,
            server: conn.server,
            security,
            bytes: total - conn.bytes_reported,
            sides: conn.local,
        });
        conn.bytes_reported = total;
    }
}

/// The verdict is final: drop the classifier, keep the verdict for the sides still to count.
fn decide(conn: &mut Conn, verdict: Verdict, wall: SystemTime) {
    conn.security = Some(verdict.security);
    conn.classifier = None;
    conn.verdict = Some(Box::new(verdict));
    conn.recent_due = Some((Instant::now(), wall));
}

/// Counts the sides this node hosts that are not counted yet, once the verdict is known.
fn count_sides(conn: &mut Conn, out: &mut Vec<Output>) {
    let Some(v) = conn.verdict.as_deref() else {
        return;
    };
    let sides = Sides {
        client: conn.local.client && !conn.counted.client,
        server: conn.local.server && !conn.counted.server,
    };
    if !sides.any() {
        return;
    }
    conn.counted.client |= sides.client;
    conn.counted.server |= sides.server;
    let at = conn.recent_due.map_or_else(SystemTime::now, |(_, w)| w);
    out.push(Output::Classified(record(conn, v, sides, at)));
    if conn.counted == Sides::BOTH {
        write_recent(conn, out);
    }
}

/// Writes the connection's recent-connections entry (once), and lets the verdict go when no
/// side can be counted any more.
fn write_recent(conn: &mut Conn, out: &mut Vec<Output>) {
    if let (Some((_, at)), Some(v)) = (conn.recent_due.take(), conn.verdict.as_deref()) {
        out.push(Output::Recent(record(conn, v, conn.local, at)));
    }
    if conn.counted == Sides::BOTH {
        conn.verdict = None;
    }
}

fn record(conn: &Conn, v: &Verdict, sides: Sides, at: SystemTime) -> ConnRecord {
    ConnRecord {
        client: conn.client,
        server: conn.server,
        dialled: conn.dialled,
        sides,
        midstream: conn.midstream,
        verdict: v.clone(),
        at,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CLIENT: &str = "198.18.0.30:40000";
    const SERVER: &str = "198.18.0.20:8080";

    fn flow() -> FlowId {
        // 198.18.0.20:8080 < 198.18.0.30:40000: the server is `lo`.
        FlowId {
            lo: SERVER.parse().unwrap(),
            hi: CLIENT.parse().unwrap(),
        }
    }

    fn meta(ifindex: u32, client_isn: u32, server_isn: Option<u32>, ts: u64) -> EventMeta {
        EventMeta {
            flow: flow(),
            ifindex,
            opener: Opener::Hi,
            isn: [server_isn, Some(client_isn)],
            ts_ns: ts,
            bytes: [500, 400],
            events: [0, 1],
            rst: false,
            lost: false,
            one_way: false,
            // The server is `lo`: interface 7 is the client's veth, every other the server's.
            local: [ifindex != 7, ifindex == 7],
        }
    }

    fn data<'a>(m: EventMeta, to_server: bool, seq: u32, payload: &'a [u8]) -> Event<'a> {
        Event::Data {
            meta: m,
            lo_to_hi: !to_server,
            seq,
            wire_len: payload.len() as u32,
            payload,
        }
    }

    const VIP: &str = "198.18.21.80:80";

    /// The client's veth of a call through a ClusterIP: client → VIP:80, the client `lo`.
    fn through_vip(ts: u64) -> EventMeta {
        EventMeta {
            flow: FlowId {
                lo: CLIENT.parse().unwrap(),
                hi: VIP.parse().unwrap(),
            },
            opener: Opener::Lo,
            isn: [Some(1000), Some(5000)],
            local: [true, false],
            ..meta(7, 1000, Some(5000), ts)
        }
    }

    fn classified(out: &[Output]) -> Vec<&ConnRecord> {
        out.iter()
            .filter_map(|o| match o {
                Output::Classified(r) => Some(r),
                _ => None,
            })
            .collect()
    }

    const GET: &[u8] = b"GET / HTTP/1.1\r\nHost: web\r\n\r\n";

    #[test]
    fn a_same_node_connection_is_counted_once_across_interfaces() {
        let mut t = Tracker::new(TrackerConfig::default());
        let now = Instant::now();
        let wall = SystemTime::now();
        let mut out = Vec::new();
        for ifindex in [7, 9] {
            t.on_event(
                &data(meta(ifindex, 1000, Some(5000), 1), true, 1001, GET),
                now,
                wall,
                &mut out,
            );
        }
        // One record per side: the client's veth counts the outbound side, the server's the
        // inbound side; one entry for the recent-connections list.
        let recs = classified(&out);
        assert_eq!(recs.len(), 2, "{out:?}");
        assert_eq!(
            recs[0].sides,
            Sides {
                client: true,
                server: false
            }
        );
        assert_eq!(
            recs[1].sides,
            Sides {
                client: false,
                server: true
            }
        );
        assert_eq!(recs[0].verdict.security, Security::Plaintext);
        assert_eq!(recs[0].client, CLIENT.parse().unwrap());
        assert_eq!(recs[0].server, SERVER.parse().unwrap());
        assert_eq!(recent(&out).len(), 1);
        assert_eq!(recent(&out)[0].sides, Sides::BOTH);
        // The server's answer, also seen on both interfaces.
        for ifindex in [7, 9] {
            t.on_event(
                &data(
                    meta(ifindex, 1000, Some(5000), 2),
                    false,
                    5001,
                    b"HTTP/1.1 200 OK\r\n\r\n",
                ),
                now,
                wall,
                &mut out,
            );
        }
        assert_eq!(classified(&out).len(), 2);
        out.clear();
        // One flow-table entry for both veths: one close ends it, both sides.
        t.on_event(
            &Event::Closed {
                meta: meta(9, 1000, Some(5000), 2),
            },
            now,
            wall,
            &mut out,
        );
        assert!(classified(&out).is_empty(), "not counted twice");
        assert!(
            matches!(
                out.as_slice(),
                [Output::Ended {
                    security: Security::Plaintext,
                    bytes: 900,
                    rejected: false,
                    sides: Sides::BOTH,
                    ..
                }]
            ),
            "{out:?}"
        );
        assert!(t.is_empty());
        // A late event of the ended connection lands on the tombstone: a second closed event
        // too (two CPUs can both send it, ebpf/src/flow.rs `close`).
        out.clear();
        t.on_event(
            &Event::Closed {
                meta: meta(11, 1000, Some(5000), 3),
            },
            now,
            wall,
            &mut out,
        );
        assert!(out.is_empty() && t.is_empty());
        // The same 4-tuple with a new ISN is a new connection.
        t.on_event(
            &data(meta(7, 77, Some(88), 4), true, 78, GET),
            now,
            wall,
            &mut out,
        );
        assert_eq!(classified(&out).len(), 1);
    }

    #[test]
    fn a_settled_connection_is_kept_compact_and_forgotten_whole() {
        let cfg = TrackerConfig {
            max_connections: 1024,
            ..TrackerConfig::default()
        };
        let mut t = Tracker::new(cfg);
        let (now, wall) = (Instant::now(), SystemTime::now());
        let mut out = Vec::new();
        // Many short connections from one client to one server, each decided, then closed.
        for i in 0..100u32 {
            let isn = 10_000 + i * 100;
            // Both pods on this node.
            let m = |ts| EventMeta {
                local: [true, true],
                bytes: [0, GET.len() as u64],
                ..meta(9, isn, Some(5000 + i), ts)
            };
            t.on_event(&data(m(1), true, isn + 1, GET), now, wall, &mut out);
            assert_eq!(t.conns.len(), 0, "settled at once: both sides counted");
            assert_eq!(t.decided.len(), i as usize + 1);
        }
        // The client's address and one (server, security) identity, shared by all of them.
        assert_eq!(t.decided.interned(), (1, 1));
        out.clear();
        for i in 0..100u32 {
            let isn = 10_000 + i * 100;
            let m = EventMeta {
                local: [true, true],
                bytes: [0, 50],
                ..meta(9, isn, Some(5000 + i), 2)
            };
            t.on_event(&Event::Bytes { meta: m }, now, wall, &mut out);
            t.on_event(&Event::Closed { meta: m }, now, wall, &mut out);
        }
        assert!(t.is_empty());
        assert_eq!(
            t.decided.interned(),
            (0, 0),
            "nothing interned outlives its users"
        );
        let bytes: u64 = out
            .iter()
            .map(|o| match o {
                Output::Bytes { bytes, .. } | Output::Ended { bytes, .. } => *bytes,
                _ => 0,
            })
            .sum();
        assert_eq!(bytes, 100 * 50);
        let ended = out
            .iter()
            .filter(|o| {
                matches!(
                    o,
                    Output::Ended {
                        security: Security::Plaintext,
                        rejected: true,
                        sides: Sides::BOTH,
                        ..
                    }
                )
            })
            .count();
        // The server sent nothing and the close came right after the request.
        assert_eq!(ended, 100, "{out:?}");
        // Closed on every interface: tombstones last a second only.
        assert_eq!(t.tombstones.len(), 100);
        t.sweep(now + Duration::from_millis(1500), wall, &mut out);
        assert!(t.tombstones.is_empty());
    }

    #[test]
    fn a_connection_ended_before_every_close_keeps_its_tombstone_past_the_collector() {
        let cfg = TrackerConfig {
            close_grace: Duration::from_millis(100),
            tombstone: tombstone_for(Duration::from_secs(10)),
            ..TrackerConfig::default()
        };
        let mut t = Tracker::new(cfg);
        let (now, wall) = (Instant::now(), SystemTime::now());
        let mut out = Vec::new();
        let dialled = through_vip;
        // The client is `lo` of this 4-tuple: its request travels lo → hi.
        t.on_event(&data(dialled(1), false, 1001, GET), now, wall, &mut out);
        t.on_event(
            &data(meta(9, 1000, Some(5000), 1), true, 1001, GET),
            now,
            wall,
            &mut out,
        );
        t.sweep(now + Duration::from_millis(300), wall, &mut out);
        assert_eq!((t.conns.len(), t.decided.len()), (0, 1), "settled");
        // One 4-tuple's close arrives; the other's was lost and the grace runs out.
        t.on_event(&Event::Closed { meta: dialled(2) }, now, wall, &mut out);
        t.sweep(now + Duration::from_millis(500), wall, &mut out);
        assert!(t.is_empty());
        out.clear();
        // The collector reports the lost close (marked lost) 9 s later: swallowed.
        let mut late = meta(9, 1000, Some(5000), 3);
        late.lost = true;
        let later = now + Duration::from_secs(9);
        t.sweep(later, wall, &mut out);
        t.on_event(&Event::Closed { meta: late }, later, wall, &mut out);
        assert!(out.is_empty() && t.is_empty(), "{out:?}");
        t.sweep(now + Duration::from_secs(13), wall, &mut out);
        assert!(t.tombstones.is_empty());
    }

    #[test]
    fn a_connection_whose_entry_went_without_a_close_is_ended_once() {
        let mut t = Tracker::new(TrackerConfig::default());
        let (now, wall) = (Instant::now(), SystemTime::now());
        let mut out = Vec::new();
        // A decided connection (both pods here) and one still undecided (a midstream server
        // banner waits for more).
        let decided = |ts| EventMeta {
            local: [true, true],
            ..meta(9, 1000, Some(5000), ts)
        };
        t.on_event(&data(decided(1), true, 1001, GET), now, wall, &mut out);
        let other = FlowId {
            lo: "198.18.0.20:5432".parse().unwrap(),
            hi: "198.18.0.31:40001".parse().unwrap(),
        };
        let mid = EventMeta {
            flow: other,
            opener: Opener::Unknown,
            isn: [None, None],
            ..decided(1)
        };
        t.on_event(&Event::Bytes { meta: mid }, now, wall, &mut out);
        assert_eq!((t.conns.len(), t.decided.len()), (1, 1));
        out.clear();
        let later = now + Duration::from_secs(5);
        // Entries there: nothing ends.
        let live = LiveFlows::of(later, &[flow(), other]);
        assert_eq!(t.reconcile(&live, later, wall, &mut out), 0);
        // Entries gone, but an event came after the walk began: nothing ends yet.
        let live = LiveFlows::of(now, &[]);
        assert_eq!(t.reconcile(&live, later, wall, &mut out), 0);
        assert!(out.is_empty(), "{out:?}");
        // Entries gone, no event since before the walk: both end.
        let live = LiveFlows::of(later, &[]);
        assert_eq!(t.reconcile(&live, later, wall, &mut out), 2);
        assert!(t.is_empty());
        let ended: Vec<_> = out
            .iter()
            .filter_map(|o| match o {
                Output::Ended {
                    security, bytes, ..
                } => Some((*security, *bytes)),
                _ => None,
            })
            .collect();
        assert!(ended.contains(&(Security::Plaintext, 900)), "{out:?}");
        // Picked up mid-stream and never classified: counted as it was, unknown.
        assert!(ended.contains(&(Security::Unknown, 900)), "{out:?}");
        assert_eq!(ended.len(), 2, "{out:?}");
        // Its close, should it still come (the collector's lost-close report): swallowed.
        out.clear();
        t.on_event(&Event::Closed { meta: decided(2) }, later, wall, &mut out);
        assert!(out.is_empty() && t.is_empty(), "{out:?}");
    }

    fn recent(out: &[Output]) -> Vec<&ConnRecord> {
        out.iter()
            .filter_map(|o| match o {
                Output::Recent(r) => Some(r),
                _ => None,
            })
            .collect()
    }

    fn ended_sides(out: &[Output]) -> Vec<Sides> {
        out.iter()
            .filter_map(|o| match o {
                Output::Ended { sides, .. } => Some(*sides),
                _ => None,
            })
            .collect()
    }

    /// Runs a whole plaintext exchange seen on one interface only, whose hook saw `local`
    /// (`[lo, hi]`; the server is `lo`), and returns what the tracker produced.
    fn one_interface(local: [bool; 2], opener: Opener) -> Vec<Output> {
        let mut t = Tracker::new(TrackerConfig::default());
        let (now, wall) = (Instant::now(), SystemTime::now());
        let mut out = Vec::new();
        let m = |ts| EventMeta {
            local,
            opener,
            isn: if opener == Opener::Unknown {
                [None, None]
            } else {
                [Some(5000), Some(1000)]
            },
            ..meta(3, 1000, Some(5000), ts)
        };
        t.on_event(&data(m(1), true, 1001, GET), now, wall, &mut out);
        t.on_event(&Event::Closed { meta: m(2) }, now, wall, &mut out);
        t.sweep(now + Duration::from_secs(2), wall, &mut out);
        out
    }

    #[test]
    fn ingress_from_the_client_pod_counts_the_client_side_only() {
        // The client's veth: its ingress hook saw the client's packets (sender local).
        let out = one_interface([false, true], Opener::Hi);
        let recs = classified(&out);
        assert_eq!(recs.len(), 1, "{out:?}");
        assert_eq!(
            recs[0].sides,
            Sides {
                client: true,
                server: false
            }
        );
        assert_eq!(
            ended_sides(&out),
            [Sides {
                client: true,
                server: false
            }]
        );
        assert_eq!(recent(&out).len(), 1);
    }

    #[test]
    fn egress_towards_the_server_pod_counts_the_server_side_only() {
        // The server's veth: its egress hook saw the client's packets (receiver local).
        let out = one_interface([true, false], Opener::Hi);
        let recs = classified(&out);
        assert_eq!(recs.len(), 1, "{out:?}");
        assert_eq!(
            recs[0].sides,
            Sides {
                client: false,
                server: true
            }
        );
        assert_eq!(
            ended_sides(&out),
            [Sides {
                client: false,
                server: true
            }]
        );
    }

    #[test]
    fn a_midstream_connection_is_attributed_by_its_hook_never_both() {
        for local in [[true, false], [false, true]] {
            let out = one_interface(local, Opener::Unknown);
            let recs = classified(&out);
            assert_eq!(recs.len(), 1, "{out:?}");
            assert_ne!(recs[0].sides, Sides::BOTH);
            assert!(recs[0].sides.any());
            assert!(recs[0].midstream);
        }
        // No hook evidence at all: counted for neither side.
        let out = one_interface([false, false], Opener::Hi);
        assert!(classified(&out).is_empty(), "{out:?}");
    }

    #[test]
    fn a_call_through_a_dnat_is_one_connection_with_both_addresses() {
        let mut t = Tracker::new(TrackerConfig::default());
        let (now, wall) = (Instant::now(), SystemTime::now());
        let mut out = Vec::new();
        let vip: SocketAddr = VIP.parse().unwrap();
        // The client's veth sees client → ClusterIP:80 (client is `lo` there: 198.18.0.30 <
        // 198.18.21.80); the server's veth sees client → pod:8080 (the server is `lo`).
        let on_client_veth = through_vip;
        let on_server_veth = |ts| EventMeta {
            local: [true, false],
            ..meta(9, 1000, Some(5000), ts)
        };
        let get = |m: EventMeta, client_is_lo: bool| Event::Data {
            meta: m,
            lo_to_hi: client_is_lo,
            seq: 1001,
            wire_len: GET.len() as u32,
            payload: GET,
        };
        t.on_event(&get(on_client_veth(1), true), now, wall, &mut out);
        t.on_event(&get(on_server_veth(1), false), now, wall, &mut out);
        assert_eq!(t.len(), 1, "one connection");
        let recs = classified(&out);
        assert_eq!(recs.len(), 2, "{out:?}");
        assert_eq!(
            recs[0].sides,
            Sides {
                client: true,
                server: false
            }
        );
        assert_eq!(
            recs[1].sides,
            Sides {
                client: false,
                server: true
            }
        );
        // The inbound side is counted for the pod that served it.
        assert_eq!(recs[1].server, SERVER.parse().unwrap());
        assert_eq!(recs[1].dialled, Some(vip));
        let rec = recent(&out);
        assert_eq!(rec.len(), 1, "{out:?}");
        assert_eq!(rec[0].server, SERVER.parse().unwrap());
        assert_eq!(rec[0].dialled, Some(vip));
        assert_eq!(rec[0].sides, Sides::BOTH);
        // Both interfaces close: one end, both sides.
        out.clear();
        t.on_event(
            &Event::Closed {
                meta: on_client_veth(2),
            },
            now,
            wall,
            &mut out,
        );
        t.on_event(
            &Event::Closed {
                meta: on_server_veth(2),
            },
            now,
            wall,
            &mut out,
        );
        assert_eq!(ended_sides(&out), [Sides::BOTH]);
        assert!(t.is_empty());
    }

    #[test]
    fn the_recent_entry_waits_briefly_for_the_other_interface() {
        let mut t = Tracker::new(TrackerConfig::default());
        let (now, wall) = (Instant::now(), SystemTime::now());
        let mut out = Vec::new();
        // Cross-node: only the client's veth is on this node.
        let m = EventMeta {
            local: [false, true],
            ..meta(7, 1000, Some(5000), 1)
        };
        t.on_event(&data(m, true, 1001, GET), now, wall, &mut out);
        assert_eq!(classified(&out).len(), 1);
        assert!(recent(&out).is_empty());
        t.sweep(now + Duration::from_millis(100), wall, &mut out);
        assert!(recent(&out).is_empty());
        t.sweep(now + Duration::from_secs(1), wall, &mut out);
        assert_eq!(recent(&out).len(), 1);
        assert_eq!(
            recent(&out)[0].sides,
            Sides {
                client: true,
                server: false
            }
        );
    }

    #[test]
    fn refused_connections_are_not_connections() {
        let mut t = Tracker::new(TrackerConfig::default());
        let mut out = Vec::new();
        // SYN answered by RST: no server ISN, no data.
        let mut m = meta(7, 1000, None, 1);
        m.events = [0, 0];
        m.rst = true;
        t.on_event(
            &Event::Closed { meta: m },
            Instant::now(),
            SystemTime::now(),
            &mut out,
        );
        assert!(out.is_empty(), "{out:?}");
    }

    #[test]
    fn an_established_connection_without_data_is_unknown() {
        let mut t = Tracker::new(TrackerConfig::default());
        let mut out = Vec::new();
        let mut m = meta(7, 1000, Some(5000), 1);
        m.events = [0, 0];
        t.on_event(
            &Event::Closed { meta: m },
            Instant::now(),
            SystemTime::now(),
            &mut out,
        );
        let recs = classified(&out);
        assert_eq!(recs.len(), 1);
        assert_eq!(recs[0].verdict.security, Security::Unknown);
        assert_eq!(recs[0].verdict.evidence.kind(), "no_data");
    }

    #[test]
    fn lost_handshake_events_make_unknown_not_plaintext() {
        let mut t = Tracker::new(TrackerConfig::default());
        let mut out = Vec::new();
        // The kernel could not hand over the connection's events (ring buffer full).
        let mut m = meta(7, 1000, Some(5000), 1);
        m.lost = true;
        t.on_event(
            &Event::Closed { meta: m },
            Instant::now(),
            SystemTime::now(),
            &mut out,
        );
        let recs = classified(&out);
        assert_eq!(recs.len(), 1);
        assert_eq!(recs[0].verdict.security, Security::Unknown);
        assert_eq!(
            recs[0].verdict.evidence,
            crate::classify::Evidence::EventsLost
        );
    }

    #[test]
    fn a_reset_right_after_the_first_bytes_is_a_rejection() {
        let mut t = Tracker::new(TrackerConfig::default());
        let now = Instant::now();
        let wall = SystemTime::now();
        let mut out = Vec::new();
        t.on_event(
            &data(meta(7, 1000, Some(5000), 1_000), true, 1001, GET),
            now,
            wall,
            &mut out,
        );
        let mut closed = meta(7, 1000, Some(5000), 1_000 + 1_000_000);
        closed.rst = true;
        t.on_event(&Event::Closed { meta: closed }, now, wall, &mut out);
        assert!(
            out.iter()
                .any(|o| matches!(o, Output::Ended { rejected: true, .. })),
            "{out:?}"
        );
        // Answered, then closed: not a rejection.
        let mut t = Tracker::new(TrackerConfig::default());
        out.clear();
        t.on_event(
            &data(meta(7, 1, Some(2), 1_000), true, 2, GET),
            now,
            wall,
            &mut out,
        );
        t.on_event(
            &data(
                meta(7, 1, Some(2), 2_000),
                false,
                3,
                b"HTTP/1.1 200 OK\r\n\r\n",
            ),
            now,
            wall,
            &mut out,
        );
        t.on_event(
            &Event::Closed {
                meta: meta(7, 1, Some(2), 3_000),
            },
            now,
            wall,
            &mut out,
        );
        assert!(
            out.iter().any(|o| matches!(
                o,
                Output::Ended {
                    rejected: false,
                    ..
                }
            )),
            "{out:?}"
        );
    }

    #[test]
    fn grace_and_idle_end_connections() {
        let cfg = TrackerConfig {
            close_grace: Duration::from_millis(100),
            idle_undecided: Duration::from_secs(5),
            ..TrackerConfig::default()
        };
        let mut t = Tracker::new(cfg);
        let now = Instant::now();
        let wall = SystemTime::now();
        let mut out = Vec::new();
        // Seen under two 4-tuples (a DNAT: two flow-table entries), closed under one only:
        // ended after the grace period.
        let vip: SocketAddr = "198.18.21.80:80".parse().unwrap();
        let client: SocketAddr = CLIENT.parse().unwrap();
        let dialled = |ts| EventMeta {
            flow: FlowId {
                lo: client,
                hi: vip,
            },
            opener: Opener::Lo,
            isn: [Some(1000), Some(5000)],
            ..meta(7, 1000, Some(5000), ts)
        };
        t.on_event(
            &data(meta(9, 1000, Some(5000), 1), true, 1001, GET),
            now,
            wall,
            &mut out,
        );
        let get = Event::Data {
            meta: dialled(1),
            lo_to_hi: true,
            seq: 1001,
            wire_len: GET.len() as u32,
            payload: GET,
        };
        t.on_event(&get, now, wall, &mut out);
        assert_eq!(t.len(), 1);
        t.on_event(&Event::Closed { meta: dialled(2) }, now, wall, &mut out);
        out.clear();
        t.sweep(now + Duration::from_millis(50), wall, &mut out);
        assert_eq!(t.len(), 1);
        t.sweep(now + Duration::from_millis(150), wall, &mut out);
        assert!(t.is_empty());
        assert_eq!(
            out.iter()
                .filter(|o| matches!(o, Output::Ended { .. }))
                .count(),
            1,
            "{out:?}"
        );
        // Undecided and idle: counted as it is (a TLS record header alone decides nothing).
        out.clear();
        t.on_event(
            &data(meta(7, 5, Some(6), 1), true, 6, &[0x16, 0x03]),
            now,
            wall,
            &mut out,
        );
        assert!(classified(&out).is_empty());
        t.sweep(now + Duration::from_secs(6), wall, &mut out);
        let recs = classified(&out);
        assert_eq!(recs.len(), 1);
        assert_ne!(recs[0].verdict.security, Security::Plaintext);
    }

    /// The kernel's bookkeeping that the one-way rule reads (ebpf/src/flow.rs: ISNs from SYN and
    /// SYN-ACK, payload bytes from sequence numbers, FINs), with the rule checked before each
    /// packet is accounted, as the program does. Pure ACKs never reach the program.
    #[derive(Default)]
    struct Wire {
        st: mtls_agent_common::FlowState,
    }

    /// Packets of the client (`hi` in [`flow`]) and of the server (`lo`).
    const C: u8 = mtls_agent_common::DIR_HI_TO_LO;
    const S: u8 = mtls_agent_common::DIR_LO_TO_HI;

    impl Wire {
        /// Returns whether this packet marked the connection one-way.
        fn pkt(&mut self, dir: u8, flags: u8, seq: u32, ack: u32, len: u32) -> bool {
            use mtls_agent_common::*;
            if len == 0 && flags & (TCP_SYN | TCP_FIN | TCP_RST) == 0 {
                return false;
            }
            let st = &mut self.st;
            let newly = st.flags2 & FLOW2_ONE_WAY == 0 && proves_one_way(st, dir, flags, ack);
            if newly {
                st.flags2 |= FLOW2_ONE_WAY;
            }
            let d = dir as usize;
            let bit = |d: usize| if d == 0 { FLOW_ISN_LO } else { FLOW_ISN_HI };
            if flags & TCP_SYN != 0 {
                st.isn[d] = seq;
                st.flags |= bit(d);
                if flags & TCP_ACK != 0 && st.flags & bit(d ^ 1) == 0 {
                    st.isn[d ^ 1] = ack.wrapping_sub(1);
                    st.flags |= bit(d ^ 1);
                }
            }
            if len > 0 {
                if st.flags & bit(d) == 0 && st.dir[d].hi == 0 {
                    st.isn[d] = seq.wrapping_sub(1);
                }
                let end = seq
                    .wrapping_sub(st.isn[d])
                    .wrapping_sub(1)
                    .wrapping_add(len);
                st.dir[d].hi = st.dir[d].hi.max(end);
            }
            if flags & TCP_FIN != 0 {
                st.ends |= if d == 0 { ENDS_FIN_LO } else { ENDS_FIN_HI };
            }
            newly
        }

        fn one_way(&self) -> bool {
            self.st.flags2 & mtls_agent_common::FLOW2_ONE_WAY != 0
        }
    }

    const SYN: u8 = mtls_agent_common::TCP_SYN;
    const ACK: u8 = mtls_agent_common::TCP_ACK;
    const FIN: u8 = mtls_agent_common::TCP_FIN | ACK;
    const RST: u8 = mtls_agent_common::TCP_RST;

    #[test]
    fn one_direction_is_proved_by_what_the_other_side_answered() {
        // The client's node behind bpf_redirect_peer: the client's SYN and request, never the
        // SYN-ACK. The request carries ACK: the handshake completed unseen.
        let mut w = Wire::default();
        assert!(!w.pkt(C, SYN, 1000, 0, 0));
        assert!(
            w.pkt(C, ACK, 1001, 5001, 300),
            "request after an unseen SYN-ACK"
        );
        // No data at all: the client's FIN proves it as well.
        let mut w = Wire::default();
        w.pkt(C, SYN, 1000, 0, 0);
        assert!(w.pkt(C, FIN, 1001, 5001, 0));
        // The server's node: the SYN-ACK (which names the client's ISN) and the answer, which
        // acknowledges 300 request bytes never seen.
        let mut w = Wire::default();
        assert!(!w.pkt(S, SYN | ACK, 5000, 1001, 0));
        assert!(w.pkt(S, ACK, 5001, 1301, 1000));
        // A server that speaks first: its greeting acknowledges the SYN only; its FIN then
        // acknowledges the client's unseen FIN.
        let mut w = Wire::default();
        w.pkt(S, SYN | ACK, 5000, 1001, 0);
        assert!(!w.pkt(S, ACK, 5001, 1001, 80));
        assert!(w.pkt(S, FIN, 5081, 1002, 0));
        // An RST that acknowledges unseen bytes (a sidecar refusing the request).
        let mut w = Wire::default();
        w.pkt(S, SYN | ACK, 5000, 1001, 0);
        assert!(w.pkt(S, RST | ACK, 5001, 1301, 0));
    }

    #[test]
    fn one_direction_is_never_claimed_for_one_sided_connections() {
        // Closed port: SYN, RST-ACK of the SYN (seen, or not seen at all).
        let mut w = Wire::default();
        w.pkt(C, SYN, 1000, 0, 0);
        w.pkt(S, RST | ACK, 0, 1001, 0);
        assert!(!w.one_way());
        let mut w = Wire::default();
        for _ in 0..3 {
            w.pkt(C, SYN, 1000, 0, 0);
        }
        assert!(
            !w.one_way(),
            "unanswered SYNs (timeout, or an RST this node missed)"
        );
        // A server that never answers: the client's request and FIN, nothing back but ACKs.
        let mut w = Wire::default();
        w.pkt(C, SYN, 1000, 0, 0);
        w.pkt(S, SYN | ACK, 5000, 1001, 0);
        w.pkt(C, ACK, 1001, 5001, 300);
        w.pkt(C, ACK, 1301, 5001, 300);
        w.pkt(C, FIN, 1601, 5001, 0);
        w.pkt(S, FIN, 5001, 1602, 0);
        assert!(!w.one_way());
        // A whole exchange seen both ways, retransmission and half-close included.
        let mut w = Wire::default();
        w.pkt(C, SYN, 1000, 0, 0);
        w.pkt(S, SYN | ACK, 5000, 1001, 0);
        w.pkt(C, ACK, 1001, 5001, 517);
        w.pkt(S, ACK, 5001, 1518, 1400);
        w.pkt(S, ACK, 5001, 1518, 1400);
        w.pkt(C, ACK, 1518, 6401, 80);
        w.pkt(C, FIN, 1598, 6401, 0);
        w.pkt(S, ACK, 6401, 1599, 200);
        w.pkt(S, FIN, 6601, 1599, 0);
        assert!(!w.one_way());
        // Picked up mid-stream (no ISN): acknowledgement numbers cannot be placed.
        let mut w = Wire::default();
        w.pkt(C, ACK, 77_000, 99_000, 100);
        w.pkt(S, ACK, 99_000, 77_100, 100);
        w.pkt(S, ACK, 99_100, 80_000, 100);
        w.pkt(C, FIN, 77_100, 99_200, 0);
        assert!(!w.one_way());
    }

    #[test]
    fn a_connection_seen_in_one_direction_is_unknown_with_its_evidence() {
        let (now, wall) = (Instant::now(), SystemTime::now());
        let one_way = |local: [bool; 2], server_isn: Option<u32>, ts| EventMeta {
            local,
            one_way: true,
            ..meta(3, 1000, server_isn, ts)
        };
        // The client's node: the plaintext request would decide `plaintext`; seen one way, it
        // is `unknown`, counted once for the client's side, final at once.
        let mut t = Tracker::new(TrackerConfig::default());
        let mut out = Vec::new();
        let client_node = |ts| one_way([false, true], None, ts);
        t.on_event(&data(client_node(1), true, 1001, GET), now, wall, &mut out);
        t.on_event(
            &Event::OneWay {
                meta: client_node(1),
            },
            now,
            wall,
            &mut out,
        );
        let recs = classified(&out);
        assert_eq!(recs.len(), 1, "{out:?}");
        assert_eq!(recs[0].verdict.security, Security::Unknown);
        assert_eq!(recs[0].verdict.evidence, Evidence::OneDirection);
        assert_eq!(recs[0].verdict.protocol, None);
        assert_eq!(
            recs[0].sides,
            Sides {
                client: true,
                server: false
            }
        );
        // One FIN closes it (the kernel's rule for one-way entries); not a rejection.
        out.clear();
        t.on_event(
            &Event::Closed {
                meta: client_node(2),
            },
            now,
            wall,
            &mut out,
        );
        assert!(classified(&out).is_empty(), "counted once");
        assert!(
            matches!(
                out.as_slice(),
                [
                    ..,
                    Output::Ended {
                        security: Security::Unknown,
                        rejected: false,
                        ..
                    }
                ]
            ),
            "{out:?}"
        );
        // The server's node, told by the header-only event before any data event: the
        // inbound side, not dropped as a refused attempt although no payload was seen.
        let mut t = Tracker::new(TrackerConfig::default());
        let mut out = Vec::new();
        let server_node = |ts| EventMeta {
            events: [0, 0],
            ..one_way([true, false], Some(5000), ts)
        };
        t.on_event(
            &Event::OneWay {
                meta: server_node(1),
            },
            now,
            wall,
            &mut out,
        );
        t.on_event(
            &Event::Closed {
                meta: server_node(2),
            },
            now,
            wall,
            &mut out,
        );
        let recs = classified(&out);
        assert_eq!(recs.len(), 1, "{out:?}");
        assert_eq!(recs[0].verdict.evidence.kind(), "one_direction");
        assert_eq!(
            recs[0].sides,
            Sides {
                client: false,
                server: true
            }
        );
        // The same request seen both ways stays `plaintext`.
        let out = one_interface([false, true], Opener::Hi);
        assert_eq!(classified(&out)[0].verdict.security, Security::Plaintext);
    }
}
