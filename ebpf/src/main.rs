//! TC programs of mtls-agent: watch TCP handshakes on pod veths, never touch a packet.
//!
//! Per packet: parse Ethernet (802.1Q/802.1ad), IPv4/IPv6 and TCP, update the flow table entry
//! (one entry per connection and interface, both directions in it), and for the first few
//! payload-carrying segments of each direction copy the payload into the ring buffer. FIN from both
//! sides or an RST sends a closed event with the counters. Every path returns `TC_ACT_UNSPEC`
//! (`TCX_NEXT`): the packet continues unchanged to the next program and the stack.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::TC_ACT_UNSPEC,
    helpers::{bpf_ktime_get_ns, bpf_skb_load_bytes},
    macros::{classifier, map},
    maps::{LruHashMap, PerCpuArray, RingBuf},
    programs::TcContext,
};
use aya_log_ebpf::debug;
use mtls_agent_common::{
    CHUNK_BYTES, CLIENT_HI, CLIENT_LO, CLIENT_UNKNOWN, DEFAULT_CAPTURE_BYTES,
    DEFAULT_FLOW_TABLE_SIZE, DEFAULT_MAX_SEGMENTS, DIR_HI_TO_LO, DIR_LO_TO_HI, DataEvent,
    EVENT_CLOSED, EVENT_DATA, EventHeader, FAMILY_V4, FAMILY_V6, FLOW_CLOSED_SENT, FLOW_FIN_HI,
    FLOW_FIN_LO, FLOW_ISN_HI, FLOW_ISN_LO, FLOW_LOCAL_HI, FLOW_LOCAL_LO, FLOW_RST, FlowKey,
    FlowState, MAX_CHUNKS_PER_SEGMENT, stats,
};

/// Flow table; the agent sets its size at load time.
#[map]
static FLOWS: LruHashMap<FlowKey, FlowState> =
    LruHashMap::with_max_entries(DEFAULT_FLOW_TABLE_SIZE, 0);

/// Events to the agent; the agent sets its size at load time.
#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(8 * 1024 * 1024, 0);

/// What could not be reported, and totals; per CPU so counting never contends.
#[map]
static STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(stats::COUNT, 0);

/// Payload segments reported per direction of a flow (set by the agent).
#[unsafe(no_mangle)]
static MAX_SEGMENTS: u32 = DEFAULT_MAX_SEGMENTS;

/// Payload bytes captured from one segment (set by the agent, at most
/// `CHUNK_BYTES * MAX_CHUNKS_PER_SEGMENT`).
#[unsafe(no_mangle)]
static CAPTURE_BYTES: u32 = DEFAULT_CAPTURE_BYTES;

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;
const IPPROTO_TCP: u8 = 6;

const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;

/// Ingress of a pod's host-side interface: packets the pod sent.
#[classifier]
pub fn mtls_ingress(ctx: TcContext) -> i32 {
    let _ = try_observe(&ctx, true);
    TC_ACT_UNSPEC
}

/// Egress of a pod's host-side interface: packets on their way into the pod.
#[classifier]
pub fn mtls_egress(ctx: TcContext) -> i32 {
    let _ = try_observe(&ctx, false);
    TC_ACT_UNSPEC
}

/// What one packet told us, after parsing. 8-byte aligned so that [`zeroed_packet`] can clear it
/// with 64-bit stores.
#[repr(C, align(8))]
struct Packet {
    key: FlowKey,
    dir: u8,
    seq: u32,
    /// Acknowledgement number (read for SYN-ACKs: it names the client's ISN).
    ack: u32,
    flags: u8,
    payload_off: u32,
    payload_len: u32,
    wire_len: u64,
}

/// Clears `slot` with nine volatile 64-bit stores and returns it as an all-zero [`Packet`] (the
/// flow key is hashed whole, padding included). In place and volatile on purpose: LLVM turns
/// any other zeroing (or a copy of a zeroed value) into a call to the byte-wise `memset` that
/// bpf-linker provides, which was a tenth of an established packet's cost.
#[inline(always)]
fn zeroed_packet(slot: &mut core::mem::MaybeUninit<Packet>) -> &mut Packet {
    const WORDS: usize = core::mem::size_of::<Packet>() / 8;
    const _: () = assert!(core::mem::size_of::<Packet>().is_multiple_of(8));
    let words = slot.as_mut_ptr().cast::<u64>();
    for i in 0..WORDS {
        // SAFETY: `words` covers the whole 8-aligned Packet, WORDS × 8 bytes.
        unsafe { core::ptr::write_volatile(words.add(i), 0) };
    }
    // SAFETY: every byte was written; all-zero is a valid Packet (integers and byte arrays).
    unsafe { slot.assume_init_mut() }
}

#[inline(always)]
fn count(index: u32) {
    if let Some(slot) = STATS.get_ptr_mut(index) {
        // SAFETY: per-CPU slot, only this CPU writes it while the program runs.
        unsafe { *slot += 1 };
    }
}

/// Adds to a flow counter. Plain (not atomic) on purpose: core has no atomic RMW for the BPF
/// target, and each direction's counter is written by the path carrying that direction, so the
/// only race is two CPUs carrying the same direction of one flow at once (rare on veths; worst case
/// a lost increment in the byte statistics, never in the connection verdicts).
#[inline(always)]
fn add(counter: &mut u64, value: u64) {
    *counter = counter.wrapping_add(value);
}

fn try_observe(ctx: &TcContext, ingress: bool) -> Result<(), ()> {
    let mut slot = core::mem::MaybeUninit::<Packet>::uninit();
    let pkt = zeroed_packet(&mut slot);
    // Headers in the skb's linear area (nearly always on a veth) are read in place; the
    // helper-based parser is the fallback for anything else.
    let tcp = match parse_direct(ctx, pkt) {
        Some(tcp) => tcp,
        None => parse(ctx, pkt)?,
    };
    if !tcp {
        return Ok(());
    }
    let pkt = &*pkt;
    count(stats::TCP_PACKETS);
    let syn = pkt.flags & TCP_SYN != 0;
    let ack = pkt.flags & TCP_ACK != 0;

    // By reference on purpose (here and in `new_flow`): by value, the 44-byte key is copied to
    // the stack on every packet first.
    #[allow(clippy::needless_borrows_for_generic_args)]
    let state = match FLOWS.get_ptr_mut(&pkt.key) {
        // A SYN on an entry whose connection ended (or carried data) is a new connection reusing
        // the 4-tuple: start afresh.
        Some(st) if syn && !ack && unsafe { is_reusable(&*st) } => new_flow(ctx, pkt, ingress)?,
        Some(st) => st,
        // Neither a SYN nor data, of a connection not in the table: a late ACK or RST of a
        // connection whose entry was collected, keep-alives of a connection older than the
        // agent. An entry for it would never see a close; skip it.
        None if !syn && pkt.payload_len == 0 => return Ok(()),
        None => {
            let st = new_flow(ctx, pkt, ingress)?;
            count(stats::FLOWS_CREATED);
            st
        }
    };
    // SAFETY: `state` points into the flow table's value for this key.
    let st = unsafe { &mut *state };
    let d = pkt.dir as usize & 1;
    add(&mut st.packets[d], 1);
    add(&mut st.bytes[d], pkt.wire_len);
    // Reading the clock costs as much as the rest of an established packet's path (a
    // paravirtual clock in a VM), so it is read only where a timestamp is reported (events,
    // new flows) and otherwise every 64th packet of a direction: nothing needs `last_seen_ns`
    // more precisely (the agent takes its timestamps from events).
    if st.packets[d] & 63 == 1 {
        st.last_seen_ns = unsafe { bpf_ktime_get_ns() };
    }
    if syn {
        remember_syn(st, pkt);
    }

    if pkt.payload_len > 0 && st.segments[d] < max_segments() {
        st.segments[d] += 1;
        send_data(ctx, pkt, st);
    }

    if pkt.flags & TCP_RST != 0 {
        st.flags |= FLOW_RST;
    } else if pkt.flags & TCP_FIN != 0 {
        st.flags |= if pkt.dir == DIR_LO_TO_HI {
            FLOW_FIN_LO
        } else {
            FLOW_FIN_HI
        };
    }
    let both_fins = FLOW_FIN_LO | FLOW_FIN_HI;
    if st.flags & FLOW_CLOSED_SENT == 0
        && (st.flags & FLOW_RST != 0 || st.flags & both_fins == both_fins)
    {
        st.flags |= FLOW_CLOSED_SENT;
        send_closed(pkt, st);
        // The entry is not deleted here: an LRU map hands a deleted element to the next insert
        // at once, while another CPU may still be writing through its pointer to it (a late
        // packet of this flow), corrupting a new flow. The agent deletes closed entries once
        // they have been idle for a second (capture/gc.rs).
    }
    Ok(())
}

#[inline(always)]
fn is_reusable(st: &FlowState) -> bool {
    st.flags & (FLOW_CLOSED_SENT | FLOW_FIN_LO | FLOW_FIN_HI | FLOW_RST) != 0
        || st.segments[0] != 0
        || st.segments[1] != 0
}

/// Creates the entry for a connection seen for the first time on this interface. The client is
/// whoever sent the SYN; a connection picked up mid-stream has no known client. The endpoint
/// behind this interface is the packet's sender on ingress and its receiver on egress.
#[inline(never)]
#[allow(clippy::needless_borrows_for_generic_args)]
fn new_flow(ctx: &TcContext, pkt: &Packet, ingress: bool) -> Result<*mut FlowState, ()> {
    let now = unsafe { bpf_ktime_get_ns() };
    let syn = pkt.flags & TCP_SYN != 0;
    let ack = pkt.flags & TCP_ACK != 0;
    let sender_is_lo = pkt.dir == DIR_LO_TO_HI;
    let client = match (syn, ack) {
        (true, false) if sender_is_lo => CLIENT_LO,
        (true, false) => CLIENT_HI,
        (true, true) if sender_is_lo => CLIENT_HI,
        (true, true) => CLIENT_LO,
        _ => CLIENT_UNKNOWN,
    };
    let local = if ingress == sender_is_lo {
        FLOW_LOCAL_LO
    } else {
        FLOW_LOCAL_HI
    };
    let fresh = FlowState {
        first_seen_ns: now,
        last_seen_ns: now,
        client,
        flags: local,
        ..FlowState::default()
    };
    if FLOWS.insert(&pkt.key, &fresh, 0).is_err() {
        count(stats::FLOW_INSERT_FAILED);
        debug!(
            ctx,
            "flow table insert failed (ifindex {})", pkt.key.ifindex
        );
        return Err(());
    }
    FLOWS.get_ptr_mut(&pkt.key).ok_or(())
}

/// Records the sender's ISN from a SYN or SYN-ACK. A SYN-ACK also names the client's ISN (its
/// acknowledgement number minus one): where a CNI steers the client's packets past this hook
/// (Cilium's `bpf_redirect_peer`), the SYN-ACK is all this interface sees of the handshake, and
/// the client's ISN is what joins this interface's view to the client's (flows.rs `ConnKey`).
#[inline(always)]
fn remember_syn(st: &mut FlowState, pkt: &Packet) {
    let (own, own_bit, peer, peer_bit) = if pkt.dir == DIR_LO_TO_HI {
        (0, FLOW_ISN_LO, 1, FLOW_ISN_HI)
    } else {
        (1, FLOW_ISN_HI, 0, FLOW_ISN_LO)
    };
    st.isn[own] = pkt.seq;
    st.flags |= own_bit;
    if pkt.flags & TCP_ACK != 0 && st.flags & peer_bit == 0 {
        st.isn[peer] = pkt.ack.wrapping_sub(1);
        st.flags |= peer_bit;
    }
}

#[inline(always)]
fn max_segments() -> u32 {
    // SAFETY: read-only global patched by the loader; volatile so the compiler keeps the load.
    unsafe { core::ptr::read_volatile(&MAX_SEGMENTS) }
}

#[inline(always)]
fn capture_bytes() -> u32 {
    // SAFETY: as for `max_segments`.
    let v = unsafe { core::ptr::read_volatile(&CAPTURE_BYTES) };
    let cap = CHUNK_BYTES as u32 * MAX_CHUNKS_PER_SEGMENT;
    if v > cap { cap } else { v }
}

#[inline(always)]
fn sat16(v: u32) -> u16 {
    if v > u16::MAX as u32 {
        u16::MAX
    } else {
        v as u16
    }
}

#[inline(always)]
fn fill_header(h: &mut EventHeader, kind: u8, pkt: &Packet, st: &FlowState, now: u64) {
    h.kind = kind;
    h.dir = pkt.dir;
    h.client = st.client;
    h.flags = st.flags;
    h.data_len = 0;
    h.ts_ns = now;
    h.seq = 0;
    h.wire_len = 0;
    h.isn = st.isn;
    h.packets = st.packets;
    h.bytes = st.bytes;
    h.key = pkt.key;
    h.segments = [sat16(st.segments[0]), sat16(st.segments[1])];
}

/// Sends the segment's payload (up to the capture limit) as consecutive chunk events.
#[inline(never)]
fn send_data(ctx: &TcContext, pkt: &Packet, st: &mut FlowState) {
    let now = unsafe { bpf_ktime_get_ns() };
    st.last_seen_ns = now;
    let cap = capture_bytes();
    let total = if pkt.payload_len < cap {
        pkt.payload_len
    } else {
        cap
    };
    let mut done: u32 = 0;
    for _ in 0..MAX_CHUNKS_PER_SEGMENT {
        if done >= total {
            break;
        }
        let remaining = total - done;
        let Some(mut entry) = EVENTS.reserve::<DataEvent>(0) else {
            count(stats::RINGBUF_FULL);
            debug!(ctx, "ring buffer full, payload event lost");
            return;
        };
        let ev = entry.as_mut_ptr();
        // SAFETY: `ev` is a reserved, exclusively owned ring-buffer slot of the right size.
        let (h, data) = unsafe { (&mut (*ev).header, (*ev).data.as_mut_ptr()) };
        fill_header(h, EVENT_DATA, pkt, st, now);
        h.seq = pkt.seq.wrapping_add(done);
        h.wire_len = pkt.payload_len - done;
        let off = pkt.payload_off + done;
        // The verifier needs a length it can prove non-zero and within the chunk: a full chunk
        // is a constant; a partial one is masked into 1..=CHUNK_BYTES.
        let len = if remaining >= CHUNK_BYTES as u32 {
            CHUNK_BYTES as u32
        } else {
            ((remaining.wrapping_sub(1)) & (CHUNK_BYTES as u32 - 1)) + 1
        };
        let ret = unsafe { bpf_skb_load_bytes(ctx.skb.skb.cast(), off, data.cast(), len) };
        if ret != 0 {
            count(stats::LOAD_BYTES_FAILED);
            entry.discard(0);
            return;
        }
        h.data_len = len;
        entry.submit(0);
        count(stats::EVENTS_SENT);
        done += len;
    }
}

#[inline(never)]
fn send_closed(pkt: &Packet, st: &mut FlowState) {
    let now = unsafe { bpf_ktime_get_ns() };
    st.last_seen_ns = now;
    let Some(mut entry) = EVENTS.reserve::<EventHeader>(0) else {
        count(stats::RINGBUF_FULL);
        return;
    };
    // SAFETY: reserved slot of size_of::<EventHeader>().
    let h = unsafe { &mut *entry.as_mut_ptr() };
    fill_header(h, EVENT_CLOSED, pkt, st, now);
    entry.submit(0);
    count(stats::EVENTS_SENT);
}

/// Reads a fixed-size header field; constant size keeps the verifier happy.
#[inline(always)]
fn load<T>(ctx: &TcContext, off: usize) -> Result<T, ()> {
    ctx.load::<T>(off).map_err(|_| {
        count(stats::PARSE_ERROR);
    })
}

/// Copies 4 or 16 address bytes straight into their place in the key (no stack temporaries:
/// the BPF stack is 512 bytes for the whole call chain).
#[inline(always)]
fn load_addr(ctx: &TcContext, off: usize, dst: *mut u8, len: u32) -> Result<(), ()> {
    // SAFETY: `dst` points to at least `len` writable bytes inside a FlowKey address array.
    let ret = unsafe { bpf_skb_load_bytes(ctx.skb.skb.cast(), off as u32, dst.cast(), len) };
    if ret != 0 {
        count(stats::PARSE_ERROR);
        return Err(());
    }
    Ok(())
}

/// Parses L2–L4 into `pkt`. `Ok(false)` for anything that is not TCP over IPv4/IPv6.
#[inline(never)]
fn parse(ctx: &TcContext, pkt: &mut Packet) -> Result<bool, ()> {
    let mut l3 = ETH_HLEN;
    let mut proto = u16::from_be(load::<u16>(ctx, 12)?);
    // Up to two VLAN tags (802.1Q, QinQ).
    for _ in 0..2 {
        if proto == ETH_P_8021Q || proto == ETH_P_8021AD {
            proto = u16::from_be(load::<u16>(ctx, l3 + 2)?);
            l3 += 4;
        }
    }
    let key = &mut pkt.key;
    key.ifindex = unsafe { (*ctx.skb.skb).ifindex };
    // Source goes to addr_lo and destination to addr_hi for now; swapped below if needed.
    let l4: usize;
    let l4_len: u32;
    match proto {
        ETH_P_IP => {
            let vihl: u8 = load(ctx, l3)?;
            let ihl = ((vihl & 0x0f) as usize) * 4;
            if ihl < 20 {
                count(stats::PARSE_ERROR);
                return Ok(false);
            }
            if load::<u8>(ctx, l3 + 9)? != IPPROTO_TCP {
                return Ok(false);
            }
            // Non-first fragments carry no TCP header.
            if u16::from_be(load::<u16>(ctx, l3 + 6)?) & 0x1fff != 0 {
                return Ok(false);
            }
            let tot = u16::from_be(load::<u16>(ctx, l3 + 2)?) as u32;
            key.addr_lo = [0; 16];
            key.addr_hi = [0; 16];
            key.addr_lo[10] = 0xff;
            key.addr_lo[11] = 0xff;
            key.addr_hi[10] = 0xff;
            key.addr_hi[11] = 0xff;
            load_addr(ctx, l3 + 12, key.addr_lo[12..].as_mut_ptr(), 4)?;
            load_addr(ctx, l3 + 16, key.addr_hi[12..].as_mut_ptr(), 4)?;
            key.family = FAMILY_V4;
            l4 = l3 + ihl;
            // GSO super-packets may carry 0 here; fall back to the skb's length.
            l4_len = if tot == 0 {
                ctx.len().saturating_sub(l4 as u32)
            } else {
                tot.saturating_sub(ihl as u32)
            };
        }
        ETH_P_IPV6 => {
            let next: u8 = load(ctx, l3 + 6)?;
            if next != IPPROTO_TCP {
                // Extension headers before TCP are rare on pod traffic; counted, not parsed.
                if matches!(next, 0 | 43 | 44 | 60) {
                    count(stats::IPV6_EXT_HEADERS);
                }
                return Ok(false);
            }
            let plen = u16::from_be(load::<u16>(ctx, l3 + 4)?) as u32;
            load_addr(ctx, l3 + 8, key.addr_lo.as_mut_ptr(), 16)?;
            load_addr(ctx, l3 + 24, key.addr_hi.as_mut_ptr(), 16)?;
            key.family = FAMILY_V6;
            l4 = l3 + 40;
            // BIG TCP jumbograms carry 0 here.
            l4_len = if plen == 0 {
                ctx.len().saturating_sub(l4 as u32)
            } else {
                plen
            };
        }
        _ => return Ok(false),
    }
    let sport = u16::from_be(load::<u16>(ctx, l4)?);
    let dport = u16::from_be(load::<u16>(ctx, l4 + 2)?);
    let seq = u32::from_be(load::<u32>(ctx, l4 + 4)?);
    let ack = u32::from_be(load::<u32>(ctx, l4 + 8)?);
    let doff_flags = u16::from_be(load::<u16>(ctx, l4 + 12)?);
    pkt.ack = ack;
    Ok(finish_tcp(
        ctx, pkt, l4, l4_len, sport, dport, seq, doff_flags,
    ))
}

/// The part of parsing both parsers share: orders the endpoints, sets direction, flags and the
/// payload's place. `false` for a malformed TCP header.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn finish_tcp(
    ctx: &TcContext,
    pkt: &mut Packet,
    l4: usize,
    l4_len: u32,
    sport: u16,
    dport: u16,
    seq: u32,
    doff_flags: u16,
) -> bool {
    let key = &mut pkt.key;
    let doff = ((doff_flags >> 12) as u32) * 4;
    if doff < 20 {
        count(stats::PARSE_ERROR);
        return false;
    }
    if endpoint_le(&key.addr_lo, sport, &key.addr_hi, dport) {
        key.port_lo = sport;
        key.port_hi = dport;
        pkt.dir = DIR_LO_TO_HI;
    } else {
        core::mem::swap(&mut key.addr_lo, &mut key.addr_hi);
        key.port_lo = dport;
        key.port_hi = sport;
        pkt.dir = DIR_HI_TO_LO;
    }
    pkt.seq = seq;
    pkt.flags = (doff_flags & 0xff) as u8;
    pkt.payload_off = l4 as u32 + doff;
    // Never trust header lengths beyond what the skb holds.
    let in_skb = ctx.len().saturating_sub(pkt.payload_off);
    let claimed = l4_len.saturating_sub(doff);
    pkt.payload_len = if claimed < in_skb { claimed } else { in_skb };
    pkt.wire_len = ctx.len() as u64;
    true
}

/// Reads `N` bytes at `off` of the packet's linear data in place (direct packet access: one
/// bounds check the verifier understands, then plain loads). `None` past the linear area.
#[inline(always)]
fn linear<const N: usize>(ctx: &TcContext, off: usize) -> Option<[u8; N]> {
    let start = ctx.data();
    if start + off + N > ctx.data_end() {
        return None;
    }
    // SAFETY: the N bytes at start + off lie within [data, data_end), checked just above.
    Some(unsafe { core::ptr::read_unaligned((start + off) as *const [u8; N]) })
}

/// Writes the last six bytes of an IPv4-mapped address one by one (an array literal would become
/// `memset` calls).
#[inline(always)]
fn set_v4_mapped(dst: &mut [u8; 16], a: u8, b: u8, c: u8, d: u8) {
    dst[10] = 0xff;
    dst[11] = 0xff;
    dst[12] = a;
    dst[13] = b;
    dst[14] = c;
    dst[15] = d;
}

/// [`parse`] without helper calls, for headers in the skb's linear area (the established-flow
/// fast path: about a dozen `bpf_skb_load_bytes` calls were most of a packet's cost). `None`
/// when some header lies beyond the linear area; the caller then uses [`parse`]. `pkt` must be
/// all-zero on entry ([`zeroed_packet`]).
#[inline(never)]
fn parse_direct(ctx: &TcContext, pkt: &mut Packet) -> Option<bool> {
    let eth = linear::<14>(ctx, 0)?;
    let mut proto = u16::from_be_bytes([eth[12], eth[13]]);
    let mut l3 = ETH_HLEN;
    for _ in 0..2 {
        if proto == ETH_P_8021Q || proto == ETH_P_8021AD {
            let tag = linear::<4>(ctx, l3)?;
            proto = u16::from_be_bytes([tag[2], tag[3]]);
            l3 += 4;
        }
    }
    let key = &mut pkt.key;
    key.ifindex = unsafe { (*ctx.skb.skb).ifindex };
    let l4: usize;
    let l4_len: u32;
    match proto {
        ETH_P_IP => {
            let ip = linear::<20>(ctx, l3)?;
            let ihl = ((ip[0] & 0x0f) as usize) * 4;
            if ihl < 20 {
                count(stats::PARSE_ERROR);
                return Some(false);
            }
            // Not TCP, or a non-first fragment (no TCP header).
            if ip[9] != IPPROTO_TCP || u16::from_be_bytes([ip[6], ip[7]]) & 0x1fff != 0 {
                return Some(false);
            }
            let tot = u16::from_be_bytes([ip[2], ip[3]]) as u32;
            // IPv4-mapped form (::ffff:a.b.c.d); the first ten bytes are already zero.
            set_v4_mapped(&mut key.addr_lo, ip[12], ip[13], ip[14], ip[15]);
            set_v4_mapped(&mut key.addr_hi, ip[16], ip[17], ip[18], ip[19]);
            key.family = FAMILY_V4;
            l4 = l3 + ihl;
            l4_len = if tot == 0 {
                ctx.len().saturating_sub(l4 as u32)
            } else {
                tot.saturating_sub(ihl as u32)
            };
        }
        ETH_P_IPV6 => {
            let ip = linear::<40>(ctx, l3)?;
            if ip[6] != IPPROTO_TCP {
                if matches!(ip[6], 0 | 43 | 44 | 60) {
                    count(stats::IPV6_EXT_HEADERS);
                }
                return Some(false);
            }
            let plen = u16::from_be_bytes([ip[4], ip[5]]) as u32;
            let mut lo = [0u8; 16];
            let mut hi = [0u8; 16];
            lo.copy_from_slice(&ip[8..24]);
            hi.copy_from_slice(&ip[24..40]);
            key.addr_lo = lo;
            key.addr_hi = hi;
            key.family = FAMILY_V6;
            l4 = l3 + 40;
            l4_len = if plen == 0 {
                ctx.len().saturating_sub(l4 as u32)
            } else {
                plen
            };
        }
        _ => return Some(false),
    }
    let tcp = linear::<14>(ctx, l4)?;
    let sport = u16::from_be_bytes([tcp[0], tcp[1]]);
    let dport = u16::from_be_bytes([tcp[2], tcp[3]]);
    let seq = u32::from_be_bytes([tcp[4], tcp[5], tcp[6], tcp[7]]);
    pkt.ack = u32::from_be_bytes([tcp[8], tcp[9], tcp[10], tcp[11]]);
    let doff_flags = u16::from_be_bytes([tcp[12], tcp[13]]);
    Some(finish_tcp(
        ctx, pkt, l4, l4_len, sport, dport, seq, doff_flags,
    ))
}

/// Total order on (address, port) without memcmp, which BPF has no symbol for.
#[inline(always)]
fn endpoint_le(a: &[u8; 16], ap: u16, b: &[u8; 16], bp: u16) -> bool {
    let a0 = u64::from_be_bytes([a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7]]);
    let b0 = u64::from_be_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]);
    if a0 != b0 {
        return a0 < b0;
    }
    let a1 = u64::from_be_bytes([a[8], a[9], a[10], a[11], a[12], a[13], a[14], a[15]]);
    let b1 = u64::from_be_bytes([b[8], b[9], b[10], b[11], b[12], b[13], b[14], b[15]]);
    if a1 != b1 {
        return a1 < b1;
    }
    ap <= bp
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
