//! flows: turns per-interface capture events into one stream per TCP connection and drives the
//! classifier. Sits between `capture` and `classify`:
//!
//! - a same-node connection crosses two pod veths, so every segment arrives twice; events of all
//!   interfaces meet under one [`ConnKey`] (4-tuple + client ISN) and the classifier's reassembly
//!   drops the duplicates;
//! - a connection is counted exactly once, when its verdict becomes final (long-lived connections
//!   are not held back until they close) or, if it never does, when it ends;
//! - it ends when every interface that saw it reported the close, or after a short grace period
//!   (a late close from the other interface lands on a tombstone, not on a new connection).
use std::{
    collections::HashMap,
    net::SocketAddr,
    time::{Duration, Instant, SystemTime},
};

use crate::{
    aggregate::ConnRecord,
    capture::events::{Event, EventMeta, FlowId, Opener},
    classify::{ConnClassifier, ConnMeta, Direction, ResumptionCache, Security, Verdict},
};

#[derive(Debug, Clone)]
pub struct TrackerConfig {
    /// Wait this long after the first interface reported the close for the others.
    pub close_grace: Duration,
    /// A connection without a verdict and without events for this long is ended as it is.
    pub idle_undecided: Duration,
    /// A decided connection without events for this long is forgotten (bytes counted).
    pub idle_decided: Duration,
    /// How long an ended connection's key swallows late events.
    pub tombstone: Duration,
    /// Upper bound on tracked connections; beyond it the oldest undecided ones are ended.
    pub max_connections: usize,
    /// Recent full handshakes remembered for resumed sessions.
    pub resumption_capacity: usize,
}

impl Default for TrackerConfig {
    fn default() -> Self {
        Self {
            close_grace: Duration::from_secs(1),
            idle_undecided: Duration::from_secs(120),
            idle_decided: Duration::from_secs(3600),
            tombstone: Duration::from_secs(30),
            max_connections: 262_144,
            resumption_capacity: 65_536,
        }
    }
}

/// One connection: its 4-tuple and the client's initial sequence number (a reused 4-tuple is a
/// new connection with a new ISN).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ConnKey {
    pub flow: FlowId,
    pub client_isn: Option<u32>,
}

/// What the tracker hands to `aggregate`.
#[derive(Debug, Clone)]
pub enum Output {
    /// A connection got its verdict (once per connection).
    Classified(ConnRecord),
    /// A counted connection ended; its bytes on the wire, both directions.
    Ended {
        client: SocketAddr,
        server: SocketAddr,
        security: Security,
        bytes: u64,
        /// The server sent nothing and the connection ended right after the client's first bytes:
        /// what a sidecar in STRICT does to plaintext (and any non-Istio client).
        rejected: bool,
    },
}

/// "Right after the first client bytes": a rejection closes within this time.
const REJECT_WITHIN_NS: u64 = 2_000_000_000;

struct Conn {
    /// Dropped once the verdict is final: a decided connection costs a few dozen bytes.
    classifier: Option<Box<ConnClassifier>>,
    client: SocketAddr,
    server: SocketAddr,
    client_is_lo: bool,
    ifaces: Vec<u32>,
    closed_ifaces: Vec<u32>,
    bytes: [u64; 2],
    /// Set when counted.
    security: Option<Security>,
    /// Some data event arrived.
    saw_data: bool,
    /// The kernel reported payload segments we never received (ring buffer overflow).
    lost_data: bool,
    /// The server answered the SYN: a connection, not a refused attempt.
    established: bool,
    /// Kernel time of the client's first payload, and of the first close report.
    first_client_data_ns: Option<u64>,
    closed_ns: Option<u64>,
    /// The server sent payload.
    server_data: bool,
    last_activity: Instant,
    closing_since: Option<Instant>,
}

pub struct Tracker {
    cfg: TrackerConfig,
    conns: HashMap<ConnKey, Conn>,
    tombstones: HashMap<ConnKey, Instant>,
    cache: ResumptionCache,
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
            cfg,
            conns: HashMap::new(),
            tombstones: HashMap::new(),
            cache,
        }
    }

    pub fn len(&self) -> usize {
        self.conns.len()
    }

    pub fn is_empty(&self) -> bool {
        self.conns.is_empty()
    }

    /// Handles one capture event; what it produces is appended to `out`.
    pub fn on_event(
        &mut self,
        ev: &Event<'_>,
        now: Instant,
        wall: SystemTime,
        out: &mut Vec<Output>,
    ) {
        let meta = match ev {
            Event::Data { meta, .. } | Event::Closed { meta } => meta,
        };
        let key = ConnKey {
            flow: meta.flow,
            client_isn: meta.client_isn(),
        };
        let Some(conn) = conn_entry(&mut self.conns, &self.tombstones, &self.cfg, key, meta, now)
        else {
            return;
        };
        if on_conn_event(conn, ev, now, wall, &mut self.cache, out) {
            self.finish(key, now, wall, out);
        }
    }

    /// Ends a connection: counts it if it never got a verdict, reports its bytes, leaves a
    /// tombstone for late events.
    fn finish(&mut self, key: ConnKey, now: Instant, wall: SystemTime, out: &mut Vec<Output>) {
        let Some(mut conn) = self.conns.remove(&key) else {
            return;
        };
        self.tombstones.insert(key, now);
        if conn.security.is_none() {
            // A SYN answered by RST (nothing listening) is not a connection.
            if !conn.established && !conn.saw_data {
                return;
            }
            let Some(mut c) = conn.classifier.take() else {
                return;
            };
            let mut v = c.finish(&mut self.cache);
            if conn.lost_data && v.security == Security::Unknown {
                v.evidence = crate::classify::Evidence::HandshakeIncomplete;
            }
            count(&mut conn, v, wall, out);
        }
        if let Some(security) = conn.security {
            let rejected = !conn.server_data
                && match (conn.first_client_data_ns, conn.closed_ns) {
                    (Some(first), Some(closed)) => closed.saturating_sub(first) <= REJECT_WITHIN_NS,
                    _ => false,
                };
            out.push(Output::Ended {
                client: conn.client,
                server: conn.server,
                security,
                bytes: conn.bytes[0] + conn.bytes[1],
                rejected,
            });
        }
    }

    /// Ends connections whose close grace, or idle time, ran out; forgets old tombstones.
    pub fn sweep(&mut self, now: Instant, wall: SystemTime, out: &mut Vec<Output>) {
        let cfg = &self.cfg;
        let due: Vec<ConnKey> = self
            .conns
            .iter()
            .filter(|(_, c)| {
                let idle = now.saturating_duration_since(c.last_activity);
                c.closing_since
                    .is_some_and(|t| now.saturating_duration_since(t) >= cfg.close_grace)
                    || (c.security.is_none() && idle >= cfg.idle_undecided)
                    || idle >= cfg.idle_decided
            })
            .map(|(k, _)| *k)
            .collect();
        for key in due {
            self.finish(key, now, wall, out);
        }
        let ttl = self.cfg.tombstone;
        self.tombstones
            .retain(|_, t| now.saturating_duration_since(*t) < ttl);
    }

    /// Ends every connection (agent shutdown), so nothing seen goes uncounted.
    pub fn drain(&mut self, now: Instant, wall: SystemTime, out: &mut Vec<Output>) {
        let keys: Vec<ConnKey> = self.conns.keys().copied().collect();
        for key in keys {
            self.finish(key, now, wall, out);
        }
    }
}

/// The connection an event belongs to, created on first sight; `None` for a tombstoned key or
/// when the table is full.
fn conn_entry<'a>(
    conns: &'a mut HashMap<ConnKey, Conn>,
    tombstones: &HashMap<ConnKey, Instant>,
    cfg: &TrackerConfig,
    key: ConnKey,
    meta: &EventMeta,
    now: Instant,
) -> Option<&'a mut Conn> {
    if tombstones.contains_key(&key) {
        return None;
    }
    if !conns.contains_key(&key) && conns.len() >= cfg.max_connections {
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
        let cmeta = ConnMeta {
            client,
            server,
            client_isn: meta.isn[ci],
            server_isn: meta.isn[si],
            midstream: meta.opener == Opener::Unknown,
        };
        Conn {
            classifier: Some(Box::new(ConnClassifier::new(cmeta))),
            client,
            server,
            client_is_lo,
            ifaces: Vec::with_capacity(2),
            closed_ifaces: Vec::new(),
            bytes: [0; 2],
            security: None,
            saw_data: false,
            lost_data: false,
            established: false,
            first_client_data_ns: None,
            closed_ns: None,
            server_data: false,
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
    out: &mut Vec<Output>,
) -> bool {
    let meta = match ev {
        Event::Data { meta, .. } | Event::Closed { meta } => meta,
    };
    conn.last_activity = now;
    if !conn.ifaces.contains(&meta.ifindex) {
        conn.ifaces.push(meta.ifindex);
    }
    for d in 0..2 {
        conn.bytes[d] = conn.bytes[d].max(meta.bytes[d]);
    }
    let server_side = if conn.client_is_lo { 1 } else { 0 };
    conn.established |= meta.isn[server_side].is_some() || meta.opener == Opener::Unknown;
    match ev {
        Event::Data {
            lo_to_hi,
            seq,
            wire_len,
            payload,
            ..
        } => {
            conn.saw_data = true;
            if *lo_to_hi == conn.client_is_lo {
                conn.first_client_data_ns.get_or_insert(meta.ts_ns);
            } else {
                conn.server_data = true;
            }
            if conn.security.is_none()
                && let Some(c) = conn.classifier.as_mut()
            {
                let dir = if *lo_to_hi == conn.client_is_lo {
                    Direction::ToServer
                } else {
                    Direction::ToClient
                };
                if c.on_segment(dir, *seq, payload, *wire_len, cache)
                    && let Some(v) = c.verdict().cloned()
                {
                    count(conn, v, wall, out);
                }
            }
            false
        }
        Event::Closed { meta } => {
            if !conn.saw_data && meta.segments.iter().any(|&s| s > 0) {
                conn.lost_data = true;
            }
            conn.closed_ns.get_or_insert(meta.ts_ns);
            if !conn.closed_ifaces.contains(&meta.ifindex) {
                conn.closed_ifaces.push(meta.ifindex);
            }
            conn.closing_since.get_or_insert(now);
            conn.ifaces.iter().all(|i| conn.closed_ifaces.contains(i))
        }
    }
}

fn count(conn: &mut Conn, verdict: Verdict, wall: SystemTime, out: &mut Vec<Output>) {
    conn.security = Some(verdict.security);
    conn.classifier = None;
    out.push(Output::Classified(ConnRecord {
        client: conn.client,
        server: conn.server,
        verdict,
        at: wall,
    }));
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
            packets: [3, 3],
            bytes: [500, 400],
            segments: [0, 1],
            rst: false,
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
        let recs = classified(&out);
        assert_eq!(recs.len(), 1, "{out:?}");
        assert_eq!(recs[0].verdict.security, Security::Plaintext);
        assert_eq!(recs[0].client, CLIENT.parse().unwrap());
        assert_eq!(recs[0].server, SERVER.parse().unwrap());
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
        assert_eq!(classified(&out).len(), 1);
        out.clear();
        // The first interface closes: the connection waits for the second (grace).
        t.on_event(
            &Event::Closed {
                meta: meta(7, 1000, Some(5000), 2),
            },
            now,
            wall,
            &mut out,
        );
        assert!(out.is_empty());
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
                    ..
                }]
            ),
            "{out:?}"
        );
        assert!(t.is_empty());
        // A late event of the ended connection lands on the tombstone.
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
    fn refused_connections_are_not_connections() {
        let mut t = Tracker::new(TrackerConfig::default());
        let mut out = Vec::new();
        // SYN answered by RST: no server ISN, no data.
        let mut m = meta(7, 1000, None, 1);
        m.segments = [0, 0];
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
        m.segments = [0, 0];
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
        // The kernel reported segments, but none of their events reached us.
        let m = meta(7, 1000, Some(5000), 1);
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
            crate::classify::Evidence::HandshakeIncomplete
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
        // Seen on two interfaces, closed on one only: ended after the grace period.
        for i in [7, 9] {
            t.on_event(
                &data(meta(i, 1000, Some(5000), 1), true, 1001, GET),
                now,
                wall,
                &mut out,
            );
        }
        t.on_event(
            &Event::Closed {
                meta: meta(7, 1000, Some(5000), 2),
            },
            now,
            wall,
            &mut out,
        );
        out.clear();
        t.sweep(now + Duration::from_millis(50), wall, &mut out);
        assert_eq!(t.len(), 1);
        t.sweep(now + Duration::from_millis(150), wall, &mut out);
        assert!(t.is_empty());
        assert!(matches!(out.as_slice(), [Output::Ended { .. }]));
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
}
