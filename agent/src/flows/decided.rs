//! Decided connections, kept compact. Once a connection's verdict is final, its sides counted
//! and its recent-connections entry written, all that is left to do is to count its bytes and
//! its end: the classifier, the verdict and the addresses go, and what stays is one 48-byte
//! [`Decided`] under a 16-byte [`DecidedKey`] (addresses interned, the server and the security
//! shared through one interned identity). A 100k-connection node holds them in a few MiB.
use hashbrown::HashMap;
use std::{
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use super::{ConnKey, Output, REJECT_WITHIN_NS, intern::Interner};
use crate::{
    capture::events::{Event, FlowId},
    classify::{Security, Sides},
};

/// A [`ConnKey`] with its addresses interned: an opened connection's client address and port
/// and its ISN, or a mid-stream connection's two endpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(super) struct DecidedKey {
    /// Interned addresses: `[client, NO_IP]` or `[lo, hi]`.
    ip: [u32; 2],
    port: [u16; 2],
    isn: u32,
}

/// Marks an opened connection's key (`ip[1]`): interned ids never reach it.
const NO_IP: u32 = u32::MAX;

// `Decided::flags`.
/// The connection was seen under the 4-tuple that names the address that served it, and (for a
/// call through a DNAT) under the one that names the dialled address; `<< 2`: closed there.
const VIEW_SERVER: u16 = 1 << 0;
const VIEW_DIALLED: u16 = 1 << 1;
const CLOSED_SHIFT: u16 = 2;
const LOCAL_CLIENT: u16 = 1 << 4;
const LOCAL_SERVER: u16 = 1 << 5;
const SERVER_DATA: u16 = 1 << 6;
const CLOSING: u16 = 1 << 7;
const REJECTED: u16 = 1 << 8;

/// What a decided connection needs to count its bytes and its end.
#[derive(Debug)]
pub(super) struct Decided {
    /// Payload bytes client → server, server → client (maximum over views).
    bytes: [u64; 2],
    bytes_reported: u64,
    /// Kernel time of the client's first payload (0: none yet), for telling a rejection.
    first_client_ns: u64,
    /// Interned (server address, security).
    ident: u32,
    /// Milliseconds since the tracker's epoch (wrapping; differences are what count, and the
    /// sweep looks at every entry far more often than every 49 days).
    last_ms: u32,
    closing_ms: u32,
    flags: u16,
}

pub(super) struct DecidedTable {
    map: HashMap<DecidedKey, Decided>,
    ips: Interner<IpAddr>,
    idents: Interner<(SocketAddr, Security)>,
}

/// Why a decided connection is due in a sweep.
pub(super) struct Due {
    pub close_grace: Duration,
    pub idle: Duration,
}

impl DecidedTable {
    /// Room for `capacity` connections from the start: a burst up to it never rehashes.
    pub fn with_capacity(capacity: usize) -> Self {
        Self {
            map: HashMap::with_capacity(capacity),
            ips: Interner::new(),
            idents: Interner::new(),
        }
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// The compact key of `key`, if some decided connection could have it.
    pub fn key_of(&self, key: &ConnKey) -> Option<DecidedKey> {
        match key {
            ConnKey::Opened { client, isn } => Some(DecidedKey {
                ip: [self.ips.id(&client.ip())?, NO_IP],
                port: [client.port(), 0],
                isn: *isn,
            }),
            ConnKey::Midstream(f) => Some(DecidedKey {
                ip: [self.ips.id(&f.lo.ip())?, self.ips.id(&f.hi.ip())?],
                port: [f.lo.port(), f.hi.port()],
                isn: 0,
            }),
        }
    }

    pub fn contains(&self, dk: &DecidedKey) -> bool {
        self.map.contains_key(dk)
    }

    /// The full key back (for a tombstone).
    pub fn conn_key(&self, dk: &DecidedKey) -> ConnKey {
        let addr = |i: usize| SocketAddr::new(*self.ips.get(dk.ip[i]), dk.port[i]);
        if dk.ip[1] == NO_IP {
            ConnKey::Opened {
                client: addr(0),
                isn: dk.isn,
            }
        } else {
            ConnKey::Midstream(FlowId {
                lo: addr(0),
                hi: addr(1),
            })
        }
    }

    /// Takes over a connection whose verdict is final, counted and written.
    pub fn insert(&mut self, key: &ConnKey, conn: &super::Conn, security: Security, now_ms: u32) {
        let dk = match key {
            ConnKey::Opened { client, isn } => DecidedKey {
                ip: [self.ips.acquire(&client.ip()), NO_IP],
                port: [client.port(), 0],
                isn: *isn,
            },
            ConnKey::Midstream(f) => DecidedKey {
                ip: [self.ips.acquire(&f.lo.ip()), self.ips.acquire(&f.hi.ip())],
                port: [f.lo.port(), f.hi.port()],
                isn: 0,
            },
        };
        let mut flags = 0;
        for v in &conn.views {
            let bit = view_bit(v, conn.client, conn.server);
            flags |= bit;
            if conn.closed_views.contains(v) {
                flags |= bit << CLOSED_SHIFT;
            }
        }
        if conn.local.client {
            flags |= LOCAL_CLIENT;
        }
        if conn.local.server {
            flags |= LOCAL_SERVER;
        }
        if conn.server_data {
            flags |= SERVER_DATA;
        }
        let d = Decided {
            bytes: conn.bytes,
            bytes_reported: conn.bytes_reported,
            first_client_ns: conn.first_client_data_ns.unwrap_or(0),
            ident: self.idents.acquire(&(conn.server, security)),
            last_ms: now_ms,
            closing_ms: 0,
            flags,
        };
        if let Some(old) = self.map.insert(dk, d) {
            // Not expected (the caller looked first); keep the reference counts true.
            self.release(&dk, &old);
        }
    }

    fn release(&mut self, dk: &DecidedKey, d: &Decided) {
        self.idents.release(d.ident);
        self.ips.release(dk.ip[0]);
        if dk.ip[1] != NO_IP {
            self.ips.release(dk.ip[1]);
        }
    }

    /// The connection's client, server and security.
    fn endpoints(&self, dk: &DecidedKey, d: &Decided) -> (SocketAddr, SocketAddr, Security) {
        let (server, security) = *self.idents.get(d.ident);
        let addr = |i: usize| SocketAddr::new(*self.ips.get(dk.ip[i]), dk.port[i]);
        let client = if dk.ip[1] == NO_IP || addr(1) == server {
            addr(0)
        } else {
            addr(1)
        };
        (client, server, security)
    }

    /// Applies one event; `Some(true)` when the connection has ended on every interface,
    /// `None` when `dk` is not here.
    pub fn on_event(
        &mut self,
        dk: &DecidedKey,
        ev: &Event<'_>,
        now_ms: u32,
        out: &mut Vec<Output>,
    ) -> Option<bool> {
        let d = self.map.get(dk)?;
        let (client, server, security) = self.endpoints(dk, d);
        let d = self.map.get_mut(dk)?;
        let meta = ev.meta();
        d.last_ms = now_ms;
        let view = view_bit(&meta.flow, client, server);
        d.flags |= view;
        let client_is_lo = meta.flow.lo == client;
        let (ci, si) = if client_is_lo { (0, 1) } else { (1, 0) };
        d.bytes[0] = d.bytes[0].max(meta.bytes[ci]);
        d.bytes[1] = d.bytes[1].max(meta.bytes[si]);
        match ev {
            Event::Data { lo_to_hi, .. } => {
                if *lo_to_hi == client_is_lo {
                    if d.first_client_ns == 0 {
                        d.first_client_ns = meta.ts_ns;
                    }
                } else {
                    d.flags |= SERVER_DATA;
                }
                Some(false)
            }
            // The verdict was final before the other direction was proved unseen (a server's
            // plaintext banner): it stands, and the kernel ends the entry on one FIN from now.
            Event::OneWay { .. } => Some(false),
            Event::Bytes { .. } => {
                let total = d.bytes[0] + d.bytes[1];
                if total > d.bytes_reported {
                    out.push(Output::Bytes {
                        client,
                        server,
                        security,
                        bytes: total - d.bytes_reported,
                        sides: sides(d.flags),
                    });
                    d.bytes_reported = total;
                }
                Some(false)
            }
            Event::Closed { meta } => {
                if d.flags & CLOSING == 0 {
                    d.flags |= CLOSING;
                    d.closing_ms = now_ms;
                    if d.flags & SERVER_DATA == 0
                        && d.first_client_ns != 0
                        && meta.ts_ns.saturating_sub(d.first_client_ns) <= REJECT_WITHIN_NS
                    {
                        d.flags |= REJECTED;
                    }
                }
                d.flags |= view << CLOSED_SHIFT;
                Some(all_closed(d.flags))
            }
        }
    }

    /// Ends a connection: reports its end and bytes not reported yet. Returns its full key
    /// and whether every interface that saw it reported the close.
    pub fn finish(&mut self, dk: &DecidedKey, out: &mut Vec<Output>) -> Option<(ConnKey, bool)> {
        let key = self.conn_key(dk);
        let d = self.map.remove(dk)?;
        let (client, server, security) = self.endpoints(dk, &d);
        self.release(dk, &d);
        out.push(Output::Ended {
            client,
            server,
            security,
            bytes: (d.bytes[0] + d.bytes[1]).saturating_sub(d.bytes_reported),
            rejected: d.flags & REJECTED != 0,
            sides: sides(d.flags),
        });
        Some((key, all_closed(d.flags)))
    }

    /// Connections whose close grace or idle time ran out.
    pub fn due(&self, now_ms: u32, due: &Due) -> Vec<DecidedKey> {
        let grace = due.close_grace.as_millis().min(u128::from(u32::MAX)) as u32;
        let idle = due.idle.as_millis().min(u128::from(u32::MAX)) as u32;
        self.map
            .iter()
            .filter(|(_, d)| {
                (d.flags & CLOSING != 0 && now_ms.wrapping_sub(d.closing_ms) >= grace)
                    || now_ms.wrapping_sub(d.last_ms) >= idle
            })
            .map(|(k, _)| *k)
            .collect()
    }

    /// Connections without an event since `since_ms` whose 4-tuple naming the server (which
    /// every decided connection was seen under) `live` says has no entry any more.
    pub fn gone(
        &self,
        now_ms: u32,
        since_ms: u32,
        live: impl Fn(&FlowId) -> bool,
    ) -> Vec<DecidedKey> {
        let before = now_ms.wrapping_sub(since_ms);
        self.map
            .iter()
            .filter(|(dk, d)| {
                now_ms.wrapping_sub(d.last_ms) > before && {
                    let (client, server, _) = self.endpoints(dk, d);
                    !live(&FlowId::new(client, server))
                }
            })
            .map(|(k, _)| *k)
            .collect()
    }

    pub fn keys(&self) -> Vec<DecidedKey> {
        self.map.keys().copied().collect()
    }

    /// Interned addresses and identities in use (for tests).
    #[cfg(test)]
    pub fn interned(&self) -> (usize, usize) {
        (self.ips.len(), self.idents.len())
    }
}

/// Which of the connection's 4-tuples `flow` is: the one naming the server, or another (the
/// dialled address behind a DNAT).
fn view_bit(flow: &FlowId, client: SocketAddr, server: SocketAddr) -> u16 {
    let server_here = if flow.lo == client { flow.hi } else { flow.lo };
    if server_here == server {
        VIEW_SERVER
    } else {
        VIEW_DIALLED
    }
}

fn all_closed(flags: u16) -> bool {
    let seen = flags & (VIEW_SERVER | VIEW_DIALLED);
    (flags >> CLOSED_SHIFT) & seen == seen
}

fn sides(flags: u16) -> Sides {
    Sides {
        client: flags & LOCAL_CLIENT != 0,
        server: flags & LOCAL_SERVER != 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// hashbrown's table: one control byte per bucket, at most 7 of 8 buckets full (right after
    /// it doubles, half of that).
    fn per_connection_bytes() -> usize {
        let slot = std::mem::size_of::<DecidedKey>() + std::mem::size_of::<Decided>() + 1;
        slot * 8 / 7
    }

    #[test]
    fn a_decided_connection_costs_well_under_100_bytes() {
        assert_eq!(std::mem::size_of::<DecidedKey>(), 16);
        assert_eq!(std::mem::size_of::<Decided>(), 48);
        let n = per_connection_bytes();
        assert!(n < 100, "{n} bytes per decided connection");
    }
}
