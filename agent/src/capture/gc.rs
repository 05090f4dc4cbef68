//! Garbage collection of the kernel flow table.
//!
//! Why: the program never deletes entries itself. An LRU map hands a deleted element to the
//! next insert at once, and another CPU may still be writing through its pointer to it (a late
//! packet of the same flow), which would corrupt a new flow. So entries are deleted from here,
//! once nothing can be in flight for them: closed connections idle for a second, entries of
//! interfaces that were deleted (a pod went away mid-connection; the entry holds the ifindex of
//! the hook that created it), and connection attempts nobody answered. A closed connection whose
//! closed event found the ring buffer full is handed to the daemon loop ([`Collected::unreported`])
//! so that it is still counted, once, as `unknown` with evidence `events_lost`. Left alone, a busy node would fill the table with
//! them, the LRU would start evicting, and `flow_table_full` would report pressure that costs
//! nothing. What the LRU evicts despite this is real pressure.
//!
//! It runs on its own thread, so walking a large table (one syscall pair per entry) never delays
//! the ring-buffer reader. While the table is more than half full it walks it more often.
use std::{
    collections::BTreeSet,
    hash::BuildHasher as _,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use aya::maps::{HashMap, MapData};
use hashbrown::{DefaultHashBuilder, HashSet};
use mtls_agent_common::{
    CLIENT_UNKNOWN, FLOW_CLOSED_SENT, FLOW_ISN_HI, FLOW_ISN_LO, FlowKey, FlowState, flow_ended,
};
use tracing::{debug, warn};

use crate::{capture::events::FlowId, export::metrics::Metrics};

/// A handshake not completed after this long never will be: Linux gives up on a SYN after about
/// 127 s (6 retries), and on a SYN-ACK sooner.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(180);
/// A closed connection's entry is deleted once it has been idle this long: its last packets
/// (the final ACK, a retransmitted FIN) are through by then.
pub const CLOSED_LINGER: Duration = Duration::from_secs(1);

/// Why an entry is garbage, if it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Garbage {
    InterfaceGone,
    HandshakeTimeout,
    Closed,
    /// Closed, but the closed event was lost (ring buffer full): reported, then deleted.
    Unreported,
}

impl Garbage {
    pub fn label(self) -> &'static str {
        match self {
            Garbage::InterfaceGone => "interface_gone",
            Garbage::HandshakeTimeout => "handshake_timeout",
            Garbage::Closed => "closed",
            Garbage::Unreported => "closed_unreported",
        }
    }
}

/// The rule, apart from the map so it can be tested: `now_ns` is CLOCK_MONOTONIC, the clock of
/// `bpf_ktime_get_ns`.
pub fn garbage(st: &FlowState, attached: &BTreeSet<u32>, now_ns: u64) -> Option<Garbage> {
    let idle = now_ns.saturating_sub(st.last_seen_ns) >= CLOSED_LINGER.as_nanos() as u64;
    let flags = st.all_flags();
    let ended = flow_ended(flags, st.flags2);
    if ended && flags & FLOW_CLOSED_SENT == 0 && idle {
        return Some(Garbage::Unreported);
    }
    if !attached.contains(&st.ifindex) {
        return Some(Garbage::InterfaceGone);
    }
    if flags & FLOW_CLOSED_SENT != 0 && idle {
        return Some(Garbage::Closed);
    }
    let both_isns = FLOW_ISN_LO | FLOW_ISN_HI;
    let handshake_open = st.client != CLIENT_UNKNOWN
        && flags & both_isns != both_isns
        && st.dir[0].hi == 0
        && st.dir[1].hi == 0;
    if handshake_open
        && now_ns.saturating_sub(st.first_seen_ns) > HANDSHAKE_TIMEOUT.as_nanos() as u64
    {
        return Some(Garbage::HandshakeTimeout);
    }
    None
}

fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime with a valid timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// What the collector shares with the daemon loop.
#[derive(Clone, Default)]
pub struct GcShared {
    /// Interfaces we are attached to, by ifindex (kept current by the daemon loop).
    pub attached: Arc<Mutex<BTreeSet<u32>>>,
    /// Entries deleted so far, for the eviction estimate (`flow_table_full`).
    pub deleted: Arc<AtomicU64>,
    /// What the last passes found for the daemon loop: closed connections whose closed event
    /// was lost, and the entries left. One lock for both, so the loop never sees a pass's
    /// entries before the closes it found.
    pub collected: Arc<Mutex<Collected>>,
    stop: Arc<AtomicBool>,
}

/// What the collector hands to the daemon loop; taken with [`std::mem::take`].
#[derive(Default)]
pub struct Collected {
    /// Closed connections whose closed event was lost, to be counted.
    pub unreported: Vec<(FlowKey, FlowState)>,
    /// The entries the newest pass left in the table.
    pub live: Option<LiveFlows>,
}

/// The connections that have an entry in the flow table, as one pass saw them, and when its walk
/// began. The agent ends a connection it tracks whose entry is not there and that had no event
/// since before the walk (`flows::Tracker::reconcile`): its close can no longer be seen. Entries
/// go without a close when an interface is deleted mid-connection, when the LRU evicts, or when
/// a pass deletes a closed entry just as a SYN reuses its 4-tuple for a new connection.
/// Held as 8-byte hashes (a collision keeps a connection tracked, never ends one early): the
/// set of a full 262,144-entry table is about 2 MiB.
pub struct LiveFlows {
    pub since: Instant,
    hasher: DefaultHashBuilder,
    flows: HashSet<u64>,
}

impl LiveFlows {
    fn new(since: Instant) -> Self {
        Self {
            since,
            hasher: DefaultHashBuilder::default(),
            flows: HashSet::new(),
        }
    }

    fn hash(&self, flow: &FlowId) -> u64 {
        self.hasher.hash_one(flow)
    }

    /// Whether `flow` had an entry when the pass ended.
    pub fn contains(&self, flow: &FlowId) -> bool {
        self.flows.contains(&self.hash(flow))
    }

    /// A set with exactly these flows (for tests).
    #[cfg(test)]
    pub fn of(since: Instant, flows: &[FlowId]) -> Self {
        let mut l = Self::new(since);
        for f in flows {
            l.flows.insert(l.hash(f));
        }
        l
    }
}

impl GcShared {
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// One pass: deletes the garbage; returns how many entries were left.
pub fn pass(
    map: &mut HashMap<MapData, FlowKey, FlowState>,
    shared: &GcShared,
    metrics: &Metrics,
) -> usize {
    let now = monotonic_ns();
    let mut live = LiveFlows::new(Instant::now());
    let mut entries = 0usize;
    let mut candidates = Vec::new();
    for item in map.iter() {
        let Ok((key, st)) = item else { continue };
        entries += 1;
        live.flows.insert(live.hash(&FlowId::from_key(&key)));
        candidates.push((key, st));
    }
    // The attached set is read after the walk: an interface attached meanwhile is in it, so its
    // new entries are never taken for an interface that is gone.
    let attached = shared
        .attached
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    let mut deleted = 0usize;
    let mut unreported = Vec::new();
    for (key, st) in candidates {
        let Some(why) = garbage(&st, &attached, now) else {
            continue;
        };
        // The walk's copy may be stale: a SYN that reuses the 4-tuple of a closed connection
        // starts a fresh entry under the same key (flow.rs `is_reusable`), and deleting that
        // would lose the new connection's close. Look again right before deleting; the window
        // left is two syscalls wide instead of the whole walk, and the tracker's reconciliation
        // covers what still slips through.
        let st = match map.get(&key, 0) {
            Ok(cur)
                if cur.first_seen_ns == st.first_seen_ns
                    && garbage(&cur, &attached, monotonic_ns()) == Some(why) =>
            {
                cur
            }
            _ => continue,
        };
        match map.remove(&key) {
            Ok(()) => {
                live.flows.remove(&live.hash(&FlowId::from_key(&key)));
                if why == Garbage::Unreported {
                    unreported.push((key, st));
                }
                deleted += 1;
                metrics
                    .flow_table_gc
                    .with_label_values(&[why.label()])
                    .inc();
                shared.deleted.fetch_add(1, Ordering::Relaxed);
            }
            // Evicted or closed meanwhile.
            Err(e) => debug!(error = %e, "flow entry already gone"),
        }
    }
    {
        let mut c = shared.collected.lock().unwrap_or_else(|p| p.into_inner());
        c.unreported.append(&mut unreported);
        c.live = Some(live);
    }
    let left = entries - deleted;
    metrics.flow_table_entries.set(left as i64);
    debug!(entries, deleted, "flow table garbage collected");
    left
}

/// Starts the collector thread; it ends when [`GcShared::stop`] is called.
pub fn spawn(
    mut map: HashMap<MapData, FlowKey, FlowState>,
    shared: GcShared,
    metrics: Metrics,
    interval: Duration,
    table_size: u32,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("flow-gc".into())
        .spawn(move || {
            let tick = Duration::from_millis(100).min(interval);
            let busy = (interval / 8).max(Duration::from_secs(1)).min(interval);
            let mut wait = interval;
            let mut waited = Duration::ZERO;
            while !shared.stop.load(Ordering::Relaxed) {
                std::thread::sleep(tick);
                waited += tick;
                if waited >= wait {
                    waited = Duration::ZERO;
                    let left = pass(&mut map, &shared, &metrics);
                    wait = if left as u64 * 2 > u64::from(table_size) {
                        busy
                    } else {
                        interval
                    };
                }
            }
        })
        .inspect_err(|e| warn!(error = %e, "flow table garbage collector not started"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use mtls_agent_common::{CLIENT_LO, FLOW_FIN_HI, FLOW_FIN_LO, FLOW_RST, FLOW2_ONE_WAY};

    const S: u64 = 1_000_000_000;

    #[test]
    fn entries_of_unattached_interfaces_are_garbage() {
        let attached = BTreeSet::from([7]);
        let st = FlowState {
            ifindex: 8,
            ..FlowState::default()
        };
        assert_eq!(garbage(&st, &attached, 0), Some(Garbage::InterfaceGone));
        let st = FlowState { ifindex: 7, ..st };
        assert_eq!(garbage(&st, &attached, 0), None);
    }

    #[test]
    fn a_close_the_ring_could_not_take_is_reported() {
        let attached = BTreeSet::from([7]);
        let st = FlowState {
            ifindex: 7,
            flags: FLOW_RST | FLOW_ISN_LO | FLOW_ISN_HI,
            last_seen_ns: 20 * S,
            ..FlowState::default()
        };
        assert_eq!(garbage(&st, &attached, 20 * S), None, "not while in flight");
        assert_eq!(garbage(&st, &attached, 22 * S), Some(Garbage::Unreported));
        let reported = FlowState {
            flags: st.flags | FLOW_CLOSED_SENT,
            ..st
        };
        assert_eq!(garbage(&reported, &attached, 22 * S), Some(Garbage::Closed));
    }

    #[test]
    fn one_fin_ends_a_connection_seen_in_one_direction_only() {
        let attached = BTreeSet::from([7]);
        // The client's node under bpf_redirect_peer: the client's FIN, never the server's.
        let half = FlowState {
            ifindex: 7,
            client: CLIENT_LO,
            flags: FLOW_ISN_LO | FLOW_FIN_LO,
            last_seen_ns: 20 * S,
            ..FlowState::default()
        };
        assert_eq!(
            garbage(&half, &attached, 30 * S),
            None,
            "both directions seen"
        );
        let one_way = FlowState {
            flags2: FLOW2_ONE_WAY,
            ..half
        };
        assert_eq!(
            garbage(&one_way, &attached, 30 * S),
            Some(Garbage::Unreported)
        );
        let both = FlowState {
            flags: half.flags | FLOW_FIN_HI,
            ..half
        };
        assert!(flow_ended(both.flags, both.flags2));
    }

    #[test]
    fn unanswered_syns_are_garbage_after_the_timeout_only() {
        let attached = BTreeSet::from([7]);
        let syn = FlowState {
            ifindex: 7,
            first_seen_ns: 10 * S,
            client: CLIENT_LO,
            flags: FLOW_ISN_LO,
            ..FlowState::default()
        };
        assert_eq!(garbage(&syn, &attached, 100 * S), None);
        assert_eq!(
            garbage(&syn, &attached, 191 * S),
            Some(Garbage::HandshakeTimeout)
        );
        // Answered, or carrying data, or picked up mid-stream: a live connection, kept for ever.
        let answered = FlowState {
            flags: FLOW_ISN_LO | FLOW_ISN_HI,
            ..syn
        };
        let mut data = syn;
        data.dir[0].hi = 100;
        let midstream = FlowState {
            client: CLIENT_UNKNOWN,
            flags: 0,
            ..syn
        };
        for st in [answered, data, midstream] {
            assert_eq!(garbage(&st, &attached, 10_000 * S), None, "{st:?}");
        }
        // Closed: collected once idle for CLOSED_LINGER, not while its last packets may pass.
        let closed = FlowState {
            flags: FLOW_CLOSED_SENT | FLOW_FIN_LO,
            last_seen_ns: 20 * S,
            ..answered
        };
        assert_eq!(garbage(&closed, &attached, 20 * S + S / 2), None);
        assert_eq!(garbage(&closed, &attached, 21 * S), Some(Garbage::Closed));
    }
}
