//! Decoding ring-buffer records into typed events. The kernel writes `repr(C)` structs from the
//! common crate; here they are read back with length checks, so a short or unknown record is
//! reported instead of being trusted.
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use mtls_agent_common::{
    CHUNK_BYTES, CLIENT_HI, CLIENT_LO, DIR_LO_TO_HI, EVENT_BYTES, EVENT_CLOSED, EVENT_DATA,
    EVENT_ONE_WAY, EventHeader, FAMILY_V4, FLOW_ISN_HI, FLOW_ISN_LO, FLOW_LOCAL_HI, FLOW_LOCAL_LO,
    FLOW_RST, FLOW2_LOST, FLOW2_ONE_WAY, FlowKey, FlowState,
};

/// A connection's two endpoints in canonical order (`lo` < `hi`), without the interface: the
/// identity under which the events of every interface of one connection meet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FlowId {
    pub lo: SocketAddr,
    pub hi: SocketAddr,
}

impl FlowId {
    /// The canonical pair of two endpoints, in either order.
    pub fn new(a: SocketAddr, b: SocketAddr) -> Self {
        if (a.ip(), a.port()) <= (b.ip(), b.port()) {
            Self { lo: a, hi: b }
        } else {
            Self { lo: b, hi: a }
        }
    }

    pub fn from_key(key: &FlowKey) -> Self {
        let ip = |raw: [u8; 16]| -> IpAddr {
            if key.family == FAMILY_V4 {
                IpAddr::V4(Ipv4Addr::new(raw[12], raw[13], raw[14], raw[15]))
            } else {
                IpAddr::V6(Ipv6Addr::from(raw))
            }
        };
        Self {
            lo: SocketAddr::new(ip(key.addr_lo), key.port_lo),
            hi: SocketAddr::new(ip(key.addr_hi), key.port_hi),
        }
    }
}

/// Which endpoint opened the connection, when the SYN was seen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Opener {
    Lo,
    Hi,
    Unknown,
}

/// Fields common to every event.
#[derive(Debug, Clone, Copy)]
pub struct EventMeta {
    pub flow: FlowId,
    /// The interface whose hook sent the event.
    pub ifindex: u32,
    pub opener: Opener,
    /// Initial sequence numbers of `lo` and `hi`, when their SYN was seen.
    pub isn: [Option<u32>; 2],
    pub ts_ns: u64,
    /// Payload bytes of `lo → hi` and `hi → lo` so far.
    pub bytes: [u64; 2],
    /// Data events the kernel sent for this connection, per direction (saturating at 255).
    pub events: [u8; 2],
    /// An RST was seen on this flow.
    pub rst: bool,
    /// An event of this connection could not be written (ring buffer full).
    pub lost: bool,
    /// This node sees the connection in one direction only: the kernel saw a packet acknowledge
    /// or answer traffic of the other direction that no hook here saw (`FLOW2_ONE_WAY`).
    pub one_way: bool,
    /// Which endpoint (`lo`, `hi`) lives behind this interface, as the hook that saw the packet
    /// tells (ingress: the sender, egress: the receiver).
    pub local: [bool; 2],
}

/// The fields of an event header (or a flow-table entry) that make an [`EventMeta`].
struct Header {
    ifindex: u32,
    client: u8,
    flags: u8,
    flags2: u8,
    isn: [u32; 2],
    ts_ns: u64,
    bytes: [u64; 2],
    events: [u8; 2],
}

impl EventMeta {
    fn new(key: &FlowKey, h: Header) -> EventMeta {
        EventMeta {
            flow: FlowId::from_key(key),
            ifindex: h.ifindex,
            opener: match h.client {
                CLIENT_LO => Opener::Lo,
                CLIENT_HI => Opener::Hi,
                _ => Opener::Unknown,
            },
            isn: [
                (h.flags & FLOW_ISN_LO != 0).then_some(h.isn[0]),
                (h.flags & FLOW_ISN_HI != 0).then_some(h.isn[1]),
            ],
            ts_ns: h.ts_ns,
            bytes: h.bytes,
            events: h.events,
            rst: h.flags & FLOW_RST != 0,
            lost: h.flags2 & FLOW2_LOST != 0,
            one_way: h.flags2 & FLOW2_ONE_WAY != 0,
            local: [h.flags & FLOW_LOCAL_LO != 0, h.flags & FLOW_LOCAL_HI != 0],
        }
    }

    /// What a flow-table entry says about its connection: for a closed connection whose closed
    /// event the ring buffer could not take (capture/gc.rs finds it). Marked lost.
    pub fn from_entry(key: &FlowKey, st: &FlowState) -> EventMeta {
        let bytes = |d: usize| (u64::from(st.dir[d].wraps) << 32) | u64::from(st.dir[d].hi);
        let mut meta = EventMeta::new(
            key,
            Header {
                ifindex: st.ifindex,
                client: st.client,
                flags: st.all_flags(),
                flags2: st.flags2,
                isn: st.isn,
                ts_ns: st.last_seen_ns,
                bytes: [bytes(0), bytes(1)],
                events: [st.dir[0].events, st.dir[1].events],
            },
        );
        meta.lost = true;
        meta
    }

    /// The client's initial sequence number: with the 4-tuple, the identity of one connection
    /// (a reused 4-tuple gets a new ISN).
    pub fn client_isn(&self) -> Option<u32> {
        match self.opener {
            Opener::Lo => self.isn[0],
            Opener::Hi => self.isn[1],
            Opener::Unknown => None,
        }
    }
}

#[derive(Debug)]
pub enum Event<'a> {
    Data {
        meta: EventMeta,
        /// true when the segment travelled from `lo` to `hi`.
        lo_to_hi: bool,
        seq: u32,
        wire_len: u32,
        payload: &'a [u8],
    },
    Closed {
        meta: EventMeta,
    },
    /// A long-lived connection's byte counts (every 64 MiB of a direction).
    Bytes {
        meta: EventMeta,
    },
    /// The kernel found that this node sees the connection in one direction only (once per
    /// connection; `meta.one_way` is set).
    OneWay {
        meta: EventMeta,
    },
}

impl Event<'_> {
    pub fn meta(&self) -> &EventMeta {
        match self {
            Event::Data { meta, .. }
            | Event::Closed { meta }
            | Event::Bytes { meta }
            | Event::OneWay { meta } => meta,
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("record of {0} bytes is shorter than an event header")]
    Short(usize),
    #[error("unknown event kind {0}")]
    UnknownKind(u8),
    #[error("data event claims {claimed} payload bytes, record holds {held}")]
    BadLength { claimed: usize, held: usize },
}

const HEADER: usize = std::mem::size_of::<EventHeader>();

/// Decodes one ring-buffer record.
pub fn decode(record: &[u8]) -> Result<Event<'_>, DecodeError> {
    if record.len() < HEADER {
        return Err(DecodeError::Short(record.len()));
    }
    // SAFETY: EventHeader is plain old data; the record holds at least HEADER bytes and may be
    // unaligned, hence read_unaligned.
    let h: EventHeader = unsafe { std::ptr::read_unaligned(record.as_ptr().cast()) };
    let meta = EventMeta::new(
        &h.key,
        Header {
            ifindex: h.ifindex,
            client: h.client,
            flags: h.flags,
            flags2: h.flags2,
            isn: h.isn,
            ts_ns: h.ts_ns,
            bytes: h.bytes,
            events: h.events,
        },
    );
    match h.kind {
        EVENT_DATA => {
            let len = h.data_len as usize;
            let held = record.len() - HEADER;
            if len > CHUNK_BYTES || len > held {
                return Err(DecodeError::BadLength { claimed: len, held });
            }
            Ok(Event::Data {
                meta,
                lo_to_hi: h.dir == DIR_LO_TO_HI,
                seq: h.seq,
                wire_len: len as u32,
                payload: &record[HEADER..HEADER + len],
            })
        }
        EVENT_CLOSED => Ok(Event::Closed { meta }),
        EVENT_BYTES => Ok(Event::Bytes { meta }),
        EVENT_ONE_WAY => Ok(Event::OneWay { meta }),
        other => Err(DecodeError::UnknownKind(other)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mtls_agent_common::{DataEvent, FAMILY_V6};

    fn header(kind: u8) -> EventHeader {
        let mut lo = [0u8; 16];
        lo[10] = 0xff;
        lo[11] = 0xff;
        lo[12..].copy_from_slice(&[198, 18, 0, 2]);
        let mut hi = lo;
        hi[15] = 3;
        EventHeader {
            kind,
            dir: DIR_LO_TO_HI,
            client: CLIENT_LO,
            flags: FLOW_ISN_LO,
            flags2: 0,
            _pad: 0,
            data_len: 5,
            events: [1, 0],
            _pad2: [0; 2],
            ifindex: 7,
            seq: 1001,
            isn: [1000, 0],
            ts_ns: 1,
            bytes: [60, 0],
            key: FlowKey {
                addr_lo: lo,
                addr_hi: hi,
                port_lo: 40000,
                port_hi: 443,
                family: FAMILY_V4,
                _pad: [0; 3],
            },
        }
    }

    fn bytes_of<T>(v: &T) -> Vec<u8> {
        // SAFETY: test helper over repr(C) POD values.
        unsafe {
            std::slice::from_raw_parts((v as *const T).cast::<u8>(), std::mem::size_of::<T>())
        }
        .to_vec()
    }

    #[test]
    fn decodes_data_event() {
        let mut ev = DataEvent {
            header: header(EVENT_DATA),
            data: [0; CHUNK_BYTES],
        };
        ev.data[..5].copy_from_slice(b"hello");
        let raw = bytes_of(&ev);
        let Event::Data {
            meta,
            lo_to_hi,
            seq,
            payload,
            ..
        } = decode(&raw).unwrap()
        else {
            panic!("not data")
        };
        assert!(lo_to_hi);
        assert_eq!(seq, 1001);
        assert_eq!(payload, b"hello");
        assert_eq!(meta.flow.lo, "198.18.0.2:40000".parse().unwrap());
        assert_eq!(meta.flow.hi, "198.18.0.3:443".parse().unwrap());
        assert_eq!(meta.client_isn(), Some(1000));
        assert_eq!(meta.isn[1], None);
    }

    #[test]
    fn decodes_ipv6_closed_event() {
        let mut h = header(EVENT_CLOSED);
        h.key.family = FAMILY_V6;
        h.key.addr_lo = "2001:db8::2".parse::<Ipv6Addr>().unwrap().octets();
        let raw = bytes_of(&h);
        let Event::Closed { meta } = decode(&raw).unwrap() else {
            panic!("not closed")
        };
        assert_eq!(meta.flow.lo.ip(), "2001:db8::2".parse::<IpAddr>().unwrap());
    }

    #[test]
    fn rejects_short_and_lying_records() {
        assert_eq!(decode(&[0u8; 10]).unwrap_err(), DecodeError::Short(10));
        let mut h = header(EVENT_DATA);
        h.data_len = 4000;
        let raw = bytes_of(&h);
        assert!(matches!(
            decode(&raw).unwrap_err(),
            DecodeError::BadLength { claimed: 4000, .. }
        ));
        let h = header(9);
        assert_eq!(
            decode(&bytes_of(&h)).unwrap_err(),
            DecodeError::UnknownKind(9)
        );
    }
}
