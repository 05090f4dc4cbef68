//! TC programs of mtls-agent: watch TCP handshakes on pod veths, never touch a packet.
//!
//! Per packet: parse the headers ([`parse`]); a packet with neither payload nor SYN/FIN/RST (a
//! pure ACK, most of an established connection's reverse traffic) stops there. Otherwise one
//! lookup in the flow table ([`flow`]: one entry per connection on this node, both directions
//! and both veths of a same-node connection in it), the payload's end sequence number for the
//! byte counts, and, while a direction is still undecided, [`capture`]: copy exactly the bytes
//! the verdict rules read, each byte once however many veths or retransmissions carry it. A
//! packet that proves the other direction passes this node unseen marks the connection one-way
//! (`flow::one_way`: the capture stops, the agent is told). FIN from both sides or an RST sends
//! a closed event. Every path returns `TC_ACT_UNSPEC`
//! (`TCX_NEXT`): the packet continues unchanged to the next program and the stack.
#![no_std]
#![no_main]
// Atomic add on a flow-table word (flow.rs `add_ends`): core has no atomic types for BPF.
#![allow(internal_features)]
#![feature(core_intrinsics)]

mod capture;
mod flow;
mod parse;
mod reference;

use aya_ebpf::{
    bindings::TC_ACT_UNSPEC,
    macros::{classifier, map},
    maps::{LruHashMap, PerCpuArray, RingBuf},
    programs::TcContext,
};
use mtls_agent_common::{
    DEFAULT_CAPTURE_BYTES, DEFAULT_FLOW_TABLE_SIZE, DEFAULT_MAX_SEGMENTS, DataEvent, FlowKey,
    FlowState, stats,
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

/// Where a data event is assembled before its used length is copied to the ring buffer (the
/// ring's reserve needs a constant size; this lets records be sized to their payload).
#[map]
static SCRATCH: PerCpuArray<DataEvent> = PerCpuArray::with_max_entries(1, 0);

/// Most data events per direction of a connection (set by the agent, `--max-segments`).
#[unsafe(no_mangle)]
static MAX_SEGMENTS: u32 = DEFAULT_MAX_SEGMENTS;

/// Most bytes copied from the first segment of a plaintext direction (set by the agent,
/// `--capture-bytes`, at most `CHUNK_BYTES * MAX_CHUNKS_PER_SEGMENT`).
#[unsafe(no_mangle)]
static CAPTURE_BYTES: u32 = DEFAULT_CAPTURE_BYTES;

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

#[inline(always)]
pub(crate) fn count(index: u32) {
    add_stat(index, 1);
}

#[inline(always)]
pub(crate) fn add_stat(index: u32, n: u64) {
    if let Some(slot) = STATS.get_ptr_mut(index) {
        // SAFETY: per-CPU slot, only this CPU writes it while the program runs.
        unsafe { *slot += n };
    }
}

fn try_observe(ctx: &TcContext, ingress: bool) -> Result<(), ()> {
    let mut slot = core::mem::MaybeUninit::<parse::Packet>::uninit();
    let pkt = parse::zeroed_packet(&mut slot);
    // Headers in the skb's linear area (nearly always on a veth) are read in place; the
    // helper-based parser is the fallback for anything else.
    let tcp = match parse::parse_direct(ctx, pkt) {
        Some(tcp) => tcp,
        None => parse::parse(ctx, pkt)?,
    };
    if !tcp {
        return Ok(());
    }
    let pkt = &*pkt;
    count(stats::TCP_PACKETS);
    // A pure ACK changes nothing the agent is told: no payload, no state change.
    const STATE: u8 = parse::TCP_SYN | parse::TCP_FIN | parse::TCP_RST;
    if pkt.payload_len == 0 && pkt.flags & STATE == 0 {
        return Ok(());
    }
    let state = flow::entry(ctx, pkt, ingress)?;
    // SAFETY: `state` points into the flow table's value for this key.
    let st = unsafe { &mut *state };
    // Before the capture, so this packet's data event already says so.
    let one_way = flow::one_way(st, pkt);
    if pkt.payload_len > 0 {
        let d = pkt.dir as usize & 1;
        let off = flow::payload_offset(st, pkt, d);
        flow::account(ctx, pkt, st, d, off);
        if st.dir[d].mode != mtls_agent_common::CAP_DONE {
            capture::segment(ctx, pkt, st, d, off);
        }
    }
    if one_way {
        flow::stop_one_way(ctx, pkt, st);
    }
    flow::close(ctx, pkt, st);
    Ok(())
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
