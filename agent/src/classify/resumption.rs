//! Client-authentication outcome of recent full handshakes, for resumed sessions to inherit.
//!
//! A resumed session (TLS 1.2 session id / ticket, TLS 1.3 PSK) does not show the client
//! certificate again: the peers reuse what the full handshake established. So the outcome of each
//! full handshake is remembered per (client IP, server IP, server port) and a later resumed
//! connection between the same pair inherits it (DESIGN.md "resumption"). Client ports are left out
//! on purpose: every new connection has a new one. The cache is bounded; the least recently used
//! pair is forgotten first.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};

use hashbrown::HashMap;

use super::Security;

type Key = (IpAddr, IpAddr, u16);

#[derive(Debug, Clone, Copy)]
struct Entry {
    security: Security,
    server: SocketAddr,
    stamp: u64,
}

/// Bounded LRU map of full-handshake outcomes (see the module doc).
#[derive(Debug)]
pub struct ResumptionCache {
    capacity: usize,
    map: HashMap<Key, Entry>,
    /// Recency order: stamp -> key, oldest first.
    order: BTreeMap<u64, Key>,
    clock: u64,
}

impl ResumptionCache {
    /// A cache remembering at most `capacity` client/server pairs (0 remembers nothing).
    pub fn new(capacity: usize) -> Self {
        ResumptionCache {
            capacity,
            map: HashMap::new(),
            order: BTreeMap::new(),
            clock: 0,
        }
    }

    /// Number of pairs remembered.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Remember the outcome of a full handshake (`Mtls` or `Tls`; anything else is ignored).
    pub fn record(&mut self, client: IpAddr, server: SocketAddr, security: Security) {
        if self.capacity == 0 || !matches!(security, Security::Mtls | Security::Tls) {
            return;
        }
        let key = (client, server.ip(), server.port());
        self.clock += 1;
        let stamp = self.clock;
        if let Some(old) = self.map.insert(
            key,
            Entry {
                security,
                server,
                stamp,
            },
        ) {
            self.order.remove(&old.stamp);
        }
        self.order.insert(stamp, key);
        while self.map.len() > self.capacity {
            let Some((_, oldest)) = self.order.pop_first() else {
                break;
            };
            self.map.remove(&oldest);
        }
    }

    /// The outcome of the last full handshake between `client` and `server`, and the server
    /// address it was seen with. Refreshes the pair's recency.
    pub fn lookup(&mut self, client: IpAddr, server: SocketAddr) -> Option<(Security, SocketAddr)> {
        let key = (client, server.ip(), server.port());
        self.clock += 1;
        let stamp = self.clock;
        let entry = self.map.get_mut(&key)?;
        self.order.remove(&entry.stamp);
        entry.stamp = stamp;
        self.order.insert(stamp, key);
        Some((entry.security, entry.server))
    }
}
