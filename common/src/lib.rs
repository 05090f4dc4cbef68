//! Types shared by the eBPF program (`ebpf/`) and the agent (`agent/`).
//!
//! Everything here is `#[repr(C)]`, `Copy` and free of padding surprises, because the same bytes are
//! written by the kernel side and read back by the agent: a map key, a map value and the events on
//! the ring buffer. Changing a layout here changes both sides at once, which is the point of keeping
//! them in one crate.
#![no_std]

/// Most payload bytes one data event carries. A segment with more wanted bytes than this is
/// reported as consecutive events (at most [`MAX_CHUNKS_PER_SEGMENT`]). Events are sized to their
/// payload: a 16-byte segment takes a 16-byte event body, not this.
pub const CHUNK_BYTES: usize = 4096;

/// Upper bound on the events one segment may produce: 16 KiB, a whole post-quantum ClientHello
/// or a TLS 1.2 server flight with its certificate chain in one GSO-sized skb.
pub const MAX_CHUNKS_PER_SEGMENT: u32 = 4;

/// Stream bytes of a direction the program may copy from: the classifier's reassembly window.
/// Nothing at a larger stream offset is ever copied.
pub const CAPTURE_WINDOW: u32 = 16 * 1024;

/// Default bound on data events per direction of a connection (`--max-segments`): the rules
/// copy a handful of segments; this bounds what loss, reordering or a hostile peer can cost.
pub const DEFAULT_MAX_SEGMENTS: u32 = 24;

/// Default bytes copied from the first segment of a plaintext direction (`--capture-bytes`).
pub const DEFAULT_CAPTURE_BYTES: u32 = 4096;

/// Default size of the kernel flow table (LRU hash, preallocated: about 190 bytes of kernel
/// memory per entry, ~48 MiB). One entry per connection, so 262,144 holds a node's burst of
/// 100k open connections (issue 11) with room for those closed within one collection sweep.
pub const DEFAULT_FLOW_TABLE_SIZE: u32 = 262_144;

/// Name of the eBPF maps and programs, shared so the agent cannot drift from the object file.
pub mod names {
    pub const FLOWS: &str = "FLOWS";
    pub const EVENTS: &str = "EVENTS";
    pub const STATS: &str = "STATS";
    pub const PROG_INGRESS: &str = "mtls_ingress";
    pub const PROG_EGRESS: &str = "mtls_egress";
    /// Parse-only reference programs (observer R of `cargo xtask bench`); 15 characters at
    /// most, the kernel's limit for a program name.
    pub const PROG_REF_INGRESS: &str = "mtlsref_ingress";
    pub const PROG_REF_EGRESS: &str = "mtlsref_egress";
    pub const SCRATCH: &str = "SCRATCH";
    pub const GLOBAL_MAX_SEGMENTS: &str = "MAX_SEGMENTS";
    pub const GLOBAL_CAPTURE_BYTES: &str = "CAPTURE_BYTES";
}

/// Address family of a [`FlowKey`].
pub const FAMILY_V4: u8 = 4;
pub const FAMILY_V6: u8 = 6;

/// Key of the kernel flow table: one entry per connection on this node.
///
/// Both directions of a connection meet in one entry: endpoint `lo` is the smaller of the two
/// (address, port) pairs, `hi` the larger. There is no interface in the key: a same-node
/// connection crosses two pod veths, and both hooks use one entry, so each byte is copied once
/// (the capture budget is in stream offsets, which both veths share).
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

/// Bits of [`FlowState::flags`] (and of [`EventHeader::flags`]). The close bits
/// (`FLOW_FIN_*`, [`FLOW_RST`], [`FLOW_CLOSED_SENT`]) are kept in [`FlowState::ends`] by the
/// program and read through [`FlowState::all_flags`]; events carry them in `flags` as before.
pub const FLOW_FIN_LO: u8 = 1 << 0;
pub const FLOW_FIN_HI: u8 = 1 << 1;
pub const FLOW_RST: u8 = 1 << 2;
pub const FLOW_CLOSED_SENT: u8 = 1 << 3;
pub const FLOW_ISN_LO: u8 = 1 << 4;
pub const FLOW_ISN_HI: u8 = 1 << 5;
/// The endpoint that lives behind an interface that carried this connection: on a pod's
/// host-side veth the ingress hook sees packets *from* the pod (their sender is local) and the
/// egress hook packets *to* it (their receiver is local). Exact from any packet, SYN or not, and
/// what lets each node count only its own side of a connection (docs/metrics.md, "counted once
/// per side"). Both bits are set for a connection between two pods of this node.
pub const FLOW_LOCAL_LO: u8 = 1 << 6;
pub const FLOW_LOCAL_HI: u8 = 1 << 7;

/// Bits of [`FlowState::flags2`].
/// An event of this connection could not be written (ring buffer full): its capture is
/// incomplete, and the agent says `events_lost` instead of guessing.
pub const FLOW2_LOST: u8 = 1 << 0;
/// This node sees the connection in one direction only: a packet acknowledged (or, from the
/// endpoint that sent the SYN, answered) what the other direction sent although none of it
/// passed any hook here. Where a CNI hands packets into a pod past the host-side veth (Cilium's
/// `bpf_redirect_peer`), the client's node sees only what the client sends and the server's
/// node only what the server sends. The agent counts such a connection as `unknown` with
/// evidence `one_direction` instead of guessing; the capture stops (nothing more decides it)
/// and one FIN closes the entry (the other FIN would never be seen).
pub const FLOW2_ONE_WAY: u8 = 1 << 1;

/// TCP header flags (the program's parser and the rules below read them).
pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// The [`FLOW2_ONE_WAY`] rule, apart from the program so it can be tested on the host: whether a
/// packet of canonical direction `dir` with TCP `flags` and acknowledgement number `ack`,
/// checked against the entry *before* the packet is accounted, proves that the other direction
/// carried packets no hook of this node saw. Proof, never a guess:
///
/// - it acknowledges bytes of the other direction beyond those seen (its payload, and its FIN
///   when seen): the sender received them, and on a pod's veth they would have passed a hook
///   here first;
/// - or it comes from the endpoint that sent the SYN, is not a SYN or RST, carries ACK, and the
///   SYN-ACK was never seen: that endpoint completed a handshake this node did not see.
///
/// A SYN nobody answers, a SYN answered by RST (which acknowledges the SYN only), a server that
/// never answers, and a connection picked up mid-stream (no ISN known) never qualify.
#[inline(always)]
pub fn proves_one_way(st: &FlowState, dir: u8, flags: u8, ack: u32) -> bool {
    if flags & TCP_ACK == 0 || flags & TCP_SYN != 0 {
        return false;
    }
    let own = dir as usize & 1;
    let peer = own ^ 1;
    let isn_bit = |d: usize| if d == 0 { FLOW_ISN_LO } else { FLOW_ISN_HI };
    let fin_bit = |d: usize| if d == 0 { FLOW_FIN_LO } else { FLOW_FIN_HI };
    let st_flags = st.all_flags();
    if st_flags & isn_bit(peer) == 0 {
        return st_flags & isn_bit(own) != 0 && flags & TCP_RST == 0;
    }
    // Offset just past the peer's last acknowledged byte, and past what was seen of it.
    let acked = ack.wrapping_sub(st.isn[peer]).wrapping_sub(1);
    let seen = st.dir[peer]
        .hi
        .wrapping_add((st_flags & fin_bit(peer) != 0) as u32);
    (acked.wrapping_sub(seen) as i32) > 0
}

/// Whether a flow-table entry's connection is over: an RST, FINs from both sides, or, for a
/// connection seen in one direction only ([`FLOW2_ONE_WAY`]), a FIN from the side that is seen.
/// The program sends the closed event and the agent's garbage collection deletes the entry by
/// the same rule.
#[inline(always)]
pub const fn flow_ended(flags: u8, flags2: u8) -> bool {
    let both_fins = FLOW_FIN_LO | FLOW_FIN_HI;
    flags & FLOW_RST != 0
        || flags & both_fins == both_fins
        || (flags2 & FLOW2_ONE_WAY != 0 && flags & both_fins != 0)
}

/// Capture modes of one direction ([`DirState::mode`]).
/// Nothing seen yet at stream offset 0: the first segment decides between TLS and the rest.
/// Segments that arrive before it (reordering, loss before the hook) are copied provisionally.
pub const CAP_FIRST: u8 = 0;
/// Not TLS at offset 0 (plaintext, or a prelude such as PostgreSQL's SSLRequest): the first
/// segment was copied; of the next few, only one that starts a TLS handshake record (an upgrade
/// to TLS) is copied, and the direction switches to [`CAP_TLS`] there.
pub const CAP_WATCH: u8 = 1;
/// TLS: the program walks record headers and copies what the verdict rules read (handshake
/// records whole, ChangeCipherSpec, the client's first encrypted records), then stops.
pub const CAP_TLS: u8 = 2;
/// The walk lost its place (a header across segments, reordering): copy the window's bytes.
pub const CAP_BULK: u8 = 3;
/// Picked up mid-stream (no SYN seen): the first few segments are copied as they come.
pub const CAP_MID: u8 = 4;
/// Nothing more is copied from this direction.
pub const CAP_DONE: u8 = 5;

/// Bits of [`DirState::tls`].
/// The walk is over: `lim` is final.
pub const TLS_WALKED: u8 = 1 << 0;
/// This direction sent ChangeCipherSpec.
pub const TLS_CCS: u8 = 1 << 1;
/// This direction sent its first handshake record (the server: its ServerHello).
pub const TLS_HELLO: u8 = 1 << 2;
/// ApplicationData records of the client counted so far, in bits 4..6.
pub const TLS_APPDATA_SHIFT: u8 = 4;

/// Capture state of one direction of a connection. Offsets are relative to the direction's
/// first payload byte (ISN + 1; for a mid-stream connection, the first byte seen).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DirState {
    /// `CAP_*`.
    pub mode: u8,
    /// Data events sent for this direction (saturating).
    pub events: u8,
    /// Payload segments seen while in [`CAP_WATCH`].
    pub watched: u8,
    /// `TLS_*` bits.
    pub tls: u8,
    /// Offset of the next TLS record header to read.
    pub hdr: u32,
    /// Bytes below this offset are wanted.
    pub lim: u32,
    /// Bytes below this offset, from the first wanted one, were copied without a gap.
    pub done_to: u32,
    /// One range copied ahead of `done_to` (a segment that arrived early).
    pub ooo_start: u32,
    pub ooo_end: u32,
    /// End offset of the highest payload byte seen: payload bytes of this direction, modulo
    /// 2^32 (`wraps` counts the wraps).
    pub hi: u32,
    pub wraps: u32,
}

/// Value of the kernel flow table. Array fields are indexed by canonical direction
/// ([`DIR_LO_TO_HI`], [`DIR_HI_TO_LO`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowState {
    pub first_seen_ns: u64,
    pub last_seen_ns: u64,
    /// Initial sequence number of each side, valid when the matching `FLOW_ISN_*` bit is set;
    /// for a direction picked up mid-stream, its first payload byte's sequence number minus one.
    pub isn: [u32; 2],
    pub dir: [DirState; 2],
    /// The interface whose hook created the entry (the agent frees entries of deleted ones).
    pub ifindex: u32,
    pub client: u8,
    pub flags: u8,
    pub flags2: u8,
    pub _pad: u8,
    /// How the connection ends, one byte per fact (`ENDS_*`), changed only by atomic adds.
    ///
    /// Why not bits of `flags`: the client's FIN (on one hook) and the server's FIN (on the
    /// other) are often handled at the same moment on two CPUs, and `flags |= bit` is a load and
    /// a store: one FIN overwrote the other, and the connection never closed (1 in ~4,000
    /// node-to-pod probes on the pods' ends). Atomic adds to one word are ordered: whichever
    /// CPU adds second reads both FINs. Atomic add (`BPF_XADD`) is what every supported kernel
    /// has; atomic OR needs 5.12. A byte is only added to while it reads zero, so it stays
    /// tiny (at most the number of CPUs racing on the same fact).
    pub ends: u32,
    pub _pad2: u32,
}

/// Bytes of [`FlowState::ends`]: a FIN seen in each direction, an RST, and the closed event
/// claimed (sent, or being sent).
pub const ENDS_FIN_LO: u32 = 1;
pub const ENDS_FIN_HI: u32 = 1 << 8;
pub const ENDS_RST: u32 = 1 << 16;
pub const ENDS_CLOSED: u32 = 1 << 24;

/// The `FLOW_*` close bits that an [`FlowState::ends`] word says.
#[inline(always)]
pub const fn ends_flags(ends: u32) -> u8 {
    let mut f = 0;
    if ends & 0xff != 0 {
        f |= FLOW_FIN_LO;
    }
    if ends & 0xff00 != 0 {
        f |= FLOW_FIN_HI;
    }
    if ends & 0xff_0000 != 0 {
        f |= FLOW_RST;
    }
    if ends & 0xff00_0000 != 0 {
        f |= FLOW_CLOSED_SENT;
    }
    f
}

impl FlowState {
    /// `flags` with the close bits of [`FlowState::ends`].
    #[inline(always)]
    pub const fn all_flags(&self) -> u8 {
        self.flags | ends_flags(self.ends)
    }
}

/// Kinds of ring-buffer events ([`EventHeader::kind`]).
pub const EVENT_DATA: u8 = 1;
pub const EVENT_CLOSED: u8 = 2;
/// A long-lived connection's byte counts crossed another 64 MiB in one direction.
pub const EVENT_BYTES: u8 = 3;
/// The connection was found to be seen in one direction only ([`FLOW2_ONE_WAY`]): sent once,
/// header only, so the agent learns it even when no data event follows.
pub const EVENT_ONE_WAY: u8 = 4;

/// Progress events are sent each time a direction's payload crosses a multiple of 2^this.
pub const BYTES_EVENT_SHIFT: u32 = 26;

/// Header of every ring-buffer event. Closed and bytes events are just this header; a data event
/// is this header followed by exactly `data_len` payload bytes (records are sized to their
/// payload).
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
    /// `FLOW2_*` bits.
    pub flags2: u8,
    pub _pad: u8,
    /// Bytes of payload that follow the header (data events).
    pub data_len: u16,
    /// Data events sent so far per direction (saturating at 255): on a closed event, tells the
    /// agent whether data events existed that it never received.
    pub events: [u8; 2],
    pub _pad2: [u8; 2],
    /// The interface whose hook sent the event.
    pub ifindex: u32,
    /// TCP sequence number of the first payload byte (data events).
    pub seq: u32,
    /// Initial sequence numbers, valid per `FLOW_ISN_*` in `flags`.
    pub isn: [u32; 2],
    pub ts_ns: u64,
    /// Payload bytes per direction so far (from sequence numbers; a direction picked up
    /// mid-stream counts from its first byte seen).
    pub bytes: [u64; 2],
    pub key: FlowKey,
}

/// Size of [`EventHeader`] as written to the ring buffer.
pub const EVENT_HEADER_LEN: usize = core::mem::size_of::<EventHeader>();

/// A data event as the program assembles it (in a per-CPU scratch slot) before copying the
/// header and the `data_len` bytes in use to the ring buffer.
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
    /// Payload bytes copied to the ring buffer (data events' bodies).
    pub const BYTES_COPIED: u32 = 8;
    /// Number of slots.
    pub const COUNT: u32 = 9;
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
        assert_eq!(size_of::<FlowKey>(), 40);
        assert_eq!(size_of::<DirState>(), 32);
        assert_eq!(size_of::<FlowState>(), 104);
        assert_eq!(size_of::<EventHeader>(), 96);
        assert_eq!(size_of::<DataEvent>(), 96 + CHUNK_BYTES);
    }

    /// Each fact of `ends` is a byte that may have been added to by more than one CPU.
    #[test]
    fn ends_say_the_close_bits() {
        assert_eq!(ends_flags(0), 0);
        assert_eq!(ends_flags(ENDS_FIN_LO), FLOW_FIN_LO);
        assert_eq!(ends_flags(2 * ENDS_FIN_HI), FLOW_FIN_HI);
        assert_eq!(ends_flags(ENDS_RST), FLOW_RST);
        let both = ENDS_FIN_LO + 2 * ENDS_FIN_HI + ENDS_CLOSED;
        assert_eq!(
            ends_flags(both),
            FLOW_FIN_LO | FLOW_FIN_HI | FLOW_CLOSED_SENT
        );
        assert!(flow_ended(ends_flags(ENDS_FIN_LO + ENDS_FIN_HI), 0));
        assert!(!flow_ended(ends_flags(2 * ENDS_FIN_LO), 0));
        // Two claims of the closed event, one given back after a full ring: still claimed.
        let given_back = (both + ENDS_CLOSED).wrapping_add(ENDS_CLOSED.wrapping_neg());
        assert_eq!(given_back, both);
        // The last claim given back: the sweep sees it unreported.
        let none = both.wrapping_add(ENDS_CLOSED.wrapping_neg());
        assert_eq!(ends_flags(none) & FLOW_CLOSED_SENT, 0);
        let st = FlowState {
            flags: FLOW_ISN_LO,
            ends: ENDS_RST,
            ..FlowState::default()
        };
        assert_eq!(st.all_flags(), FLOW_ISN_LO | FLOW_RST);
    }
}
