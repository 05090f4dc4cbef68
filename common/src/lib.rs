//! Types shared by the eBPF program (`ebpf/`) and the agent (`agent/`).
//!
//! Everything here is `#[repr(C)]`, `Copy` and free of padding surprises, because the same bytes are
//! written by the kernel side and read back by the agent: a map key, a map value and the events on
//! the ring buffer. Changing a layout here changes both sides at once, which is the point of keeping
//! them in one crate.
#![no_std]

/// Bytes of payload carried by one data event. A segment with more payload than this is reported as
/// several consecutive events (chunks), up to [`MAX_CHUNKS_PER_SEGMENT`].
pub const CHUNK_BYTES: usize = 1024;

/// Upper bound on the chunks one segment may produce, so that a GSO-sized skb carrying a whole
/// post-quantum ClientHello (1.2–2 KB) or a TLS 1.2 server flight with a certificate chain is
/// captured whole. The agent chooses the effective limit (global `CAPTURE_BYTES`) up to this.
pub const MAX_CHUNKS_PER_SEGMENT: u32 = 8;

/// Default number of payload-carrying segments reported per direction of a flow.
pub const DEFAULT_MAX_SEGMENTS: u32 = 6;

/// Default bytes captured from one segment.
pub const DEFAULT_CAPTURE_BYTES: u32 = 4096;

/// Default size of the kernel flow table (LRU hash).
pub const DEFAULT_FLOW_TABLE_SIZE: u32 = 65_536;

/// Name of the eBPF maps and programs, shared so the agent cannot drift from the object file.
pub mod names {
    pub const FLOWS: &str = "FLOWS";
    pub const EVENTS: &str = "EVENTS";
    pub const STATS: &str = "STATS";
    pub const PROG_INGRESS: &str = "mtls_ingress";
    pub const PROG_EGRESS: &str = "mtls_egress";
    pub const GLOBAL_MAX_SEGMENTS: &str = "MAX_SEGMENTS";
    pub const GLOBAL_CAPTURE_BYTES: &str = "CAPTURE_BYTES";
}

/// Address family of a [`FlowKey`].
pub const FAMILY_V4: u8 = 4;
pub const FAMILY_V6: u8 = 6;

/// Key of the kernel flow table.
///
/// Both directions of a connection meet in one entry: endpoint `lo` is the smaller of the two
/// (address, port) pairs, `hi` the larger. `ifindex` is part of the key on purpose: a same-node
/// connection passes two pod veths, and keeping one entry per interface lets every interface count
/// each packet exactly once; the agent merges the interfaces of one connection.
///
/// Addresses are stored as 16 bytes in network order; IPv4 uses the IPv4-mapped IPv6 form
/// (`::ffff:a.b.c.d`) so that one layout serves both families.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub addr_lo: [u8; 16],
    pub addr_hi: [u8; 16],
    /// Ports in host byte order.
    pub port_lo: u16,
    pub port_hi: u16,
    pub ifindex: u32,
    pub family: u8,
    pub _pad: [u8; 3],
}

/// Canonical direction of a packet within a flow: from `lo` to `hi` or back.
pub const DIR_LO_TO_HI: u8 = 0;
pub const DIR_HI_TO_LO: u8 = 1;

/// Which endpoint opened the connection (sent the SYN).
pub const CLIENT_UNKNOWN: u8 = 0;
pub const CLIENT_LO: u8 = 1;
pub const CLIENT_HI: u8 = 2;

/// Bits of [`FlowState::flags`].
pub const FLOW_FIN_LO: u8 = 1 << 0;
pub const FLOW_FIN_HI: u8 = 1 << 1;
pub const FLOW_RST: u8 = 1 << 2;
pub const FLOW_CLOSED_SENT: u8 = 1 << 3;
pub const FLOW_ISN_LO: u8 = 1 << 4;
pub const FLOW_ISN_HI: u8 = 1 << 5;
/// The endpoint that lives behind the interface of this entry: on a pod's host-side veth the
/// ingress hook sees packets *from* the pod (their sender is local) and the egress hook packets
/// *to* it (their receiver is local). Exact from any packet, SYN or not, and what lets each
/// node count only its own side of a connection (docs/metrics.md, "counted once per side").
pub const FLOW_LOCAL_LO: u8 = 1 << 6;
pub const FLOW_LOCAL_HI: u8 = 1 << 7;

/// Value of the kernel flow table. Array fields are indexed by canonical direction
/// ([`DIR_LO_TO_HI`], [`DIR_HI_TO_LO`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowState {
    pub first_seen_ns: u64,
    pub last_seen_ns: u64,
    pub packets: [u64; 2],
    pub bytes: [u64; 2],
    /// Initial sequence number of each side, valid when the matching `FLOW_ISN_*` bit is set.
    pub isn: [u32; 2],
    /// Payload-carrying segments already reported per direction.
    pub segments: [u32; 2],
    pub client: u8,
    pub flags: u8,
    pub _pad: [u8; 6],
}

/// Kinds of ring-buffer events ([`EventHeader::kind`]).
pub const EVENT_DATA: u8 = 1;
pub const EVENT_CLOSED: u8 = 2;

/// Header of every ring-buffer event. A closed event is just this header; a data event is a
/// [`DataEvent`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EventHeader {
    pub kind: u8,
    /// Canonical direction of the segment (data events).
    pub dir: u8,
    /// `CLIENT_*` as known when the event was sent.
    pub client: u8,
    /// `FLOW_*` bits as known when the event was sent.
    pub flags: u8,
    /// Bytes of `data` that are valid (data events).
    pub data_len: u32,
    pub ts_ns: u64,
    /// TCP sequence number of `data[0]` (data events).
    pub seq: u32,
    /// Payload bytes of the whole segment on the wire, from `seq` on (data events): larger than
    /// `data_len` when the segment was cut to the capture limit or split into chunks.
    pub wire_len: u32,
    /// Initial sequence numbers, valid per `FLOW_ISN_*` in `flags`.
    pub isn: [u32; 2],
    /// Counters of the flow on this interface (closed events; a snapshot on data events).
    pub packets: [u64; 2],
    pub bytes: [u64; 2],
    pub key: FlowKey,
    /// Payload segments reported so far per direction (saturating): on a closed event, tells the
    /// agent whether data events existed that it never received (lost), or none were sent.
    pub segments: [u16; 2],
}

/// A data event: header plus up to [`CHUNK_BYTES`] of payload.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct DataEvent {
    pub header: EventHeader,
    pub data: [u8; CHUNK_BYTES],
}

/// Indexes of the per-CPU statistics array (`STATS`): what the program could not report, and a
/// few totals that make those numbers readable.
pub mod stats {
    /// Ring buffer full: an event was lost.
    pub const RINGBUF_FULL: u32 = 0;
    /// The flow table refused an insert.
    pub const FLOW_INSERT_FAILED: u32 = 1;
    /// A header could not be read (truncated or malformed packet).
    pub const PARSE_ERROR: u32 = 2;
    /// IPv6 with extension headers before TCP: not parsed (counted, passed untouched).
    pub const IPV6_EXT_HEADERS: u32 = 3;
    /// Copying payload bytes failed; the event was discarded.
    pub const LOAD_BYTES_FAILED: u32 = 4;
    /// TCP packets seen.
    pub const TCP_PACKETS: u32 = 5;
    /// Events sent to the ring buffer.
    pub const EVENTS_SENT: u32 = 6;
    /// Flow-table entries created for keys that were not in the table. With the agent's
    /// deletions (closed connections and garbage, capture/gc.rs), what was created beyond what
    /// was deleted and what the table holds was pushed out by the LRU (an LRU hash never
    /// refuses an insert: a full table evicts instead).
    pub const FLOWS_CREATED: u32 = 7;
    /// Number of slots.
    pub const COUNT: u32 = 8;
}

#[cfg(feature = "user")]
mod user {
    use super::*;
    // SAFETY: plain-old-data `repr(C)` types with no pointers; any bit pattern is valid.
    unsafe impl aya::Pod for FlowKey {}
    unsafe impl aya::Pod for FlowState {}
    unsafe impl aya::Pod for EventHeader {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::size_of;

    /// The agent reads events as raw bytes; a layout change must be deliberate.
    #[test]
    fn layouts_are_stable() {
        assert_eq!(size_of::<FlowKey>(), 44);
        assert_eq!(size_of::<FlowState>(), 72);
        assert_eq!(size_of::<EventHeader>(), 112);
        assert_eq!(size_of::<DataEvent>(), 112 + CHUNK_BYTES);
    }
}
