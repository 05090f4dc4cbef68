//! The flow table: one entry per connection on this node, shared by every hook that carries it
//! (both veths of a same-node connection). What an entry learns from a packet: who opened the
//! connection and the ISNs (SYN, SYN-ACK), which endpoints live behind the hooks that saw it
//! (`FLOW_LOCAL_*`), the payload bytes per direction (from sequence numbers, so a packet seen on
//! two veths or retransmitted counts once), and the close.
use core::intrinsics::{AtomicOrdering, atomic_xadd};

use aya_ebpf::{helpers::bpf_ktime_get_ns, programs::TcContext};
use aya_log_ebpf::debug;
use mtls_agent_common::{
    BYTES_EVENT_SHIFT, CAP_DONE, CAP_MID, CLIENT_HI, CLIENT_LO, CLIENT_UNKNOWN, DIR_LO_TO_HI,
    ENDS_CLOSED, ENDS_FIN_HI, ENDS_FIN_LO, ENDS_RST, EVENT_BYTES, EVENT_CLOSED, EVENT_ONE_WAY,
    EventHeader, FLOW_ISN_HI, FLOW_ISN_LO, FLOW_LOCAL_HI, FLOW_LOCAL_LO, FLOW2_LOST, FLOW2_ONE_WAY,
    FlowState, ends_flags, flow_ended, proves_one_way, stats,
};

use crate::{
    EVENTS, FLOWS, count,
    parse::{Packet, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
};

/// `FLOW_ISN_*` bit of a direction.
#[inline(always)]
fn isn_bit(d: usize) -> u8 {
    if d == 0 { FLOW_ISN_LO } else { FLOW_ISN_HI }
}

/// The entry of the packet's connection, created for a SYN or a payload-carrying packet (a late
/// ACK or RST of a connection whose entry was collected, or keep-alives of a connection older
/// than the agent, would never see a close). `Err` when there is none.
#[inline(always)]
#[allow(clippy::needless_borrows_for_generic_args)]
pub fn entry(ctx: &TcContext, pkt: &Packet, ingress: bool) -> Result<*mut FlowState, ()> {
    let syn = pkt.flags & TCP_SYN != 0;
    let ack = pkt.flags & TCP_ACK != 0;
    // By reference on purpose: by value, the key is copied to the stack on every packet first.
    let state = match FLOWS.get_ptr_mut(&pkt.key) {
        // A SYN on an entry whose connection ended (or carried data) is a new connection reusing
        // the 4-tuple: start afresh. The same SYN seen on the second veth finds a fresh entry.
        Some(st) if syn && !ack && unsafe { is_reusable(&*st) } => new_flow(ctx, pkt)?,
        Some(st) => st,
        None if !syn && pkt.payload_len == 0 => return Err(()),
        None => {
            let st = new_flow(ctx, pkt)?;
            count(stats::FLOWS_CREATED);
            st
        }
    };
    // SAFETY: `state` points into the flow table's value for this key.
    let st = unsafe { &mut *state };
    // The endpoint behind this hook: the sender on ingress, the receiver on egress.
    let local = if ingress == (pkt.dir == DIR_LO_TO_HI) {
        FLOW_LOCAL_LO
    } else {
        FLOW_LOCAL_HI
    };
    if st.flags & local == 0 {
        st.flags |= local;
    }
    if syn {
        remember_syn(st, pkt);
    }
    Ok(state)
}

#[inline(always)]
fn is_reusable(st: &FlowState) -> bool {
    ends_now(st) != 0 || st.dir[0].hi != 0 || st.dir[1].hi != 0
}

/// Adds `v` to the entry's `ends` word ([`FlowState::ends`]) atomically. The result is unused
/// on purpose: that compiles to `BPF_XADD` (`lock add`), which every supported kernel verifies;
/// a fetching add needs Linux 5.12.
#[inline(always)]
fn add_ends(st: &mut FlowState, v: u32) {
    // SAFETY: the field is a valid, aligned u32 for the program's run.
    unsafe {
        atomic_xadd::<u32, u32, { AtomicOrdering::Relaxed }>(&mut st.ends, v);
    }
}

/// The entry's `ends` word as it is now (a volatile read: other CPUs add to it).
#[inline(always)]
pub fn ends_now(st: &FlowState) -> u32 {
    // SAFETY: a valid, aligned u32 for the program's run.
    unsafe { core::ptr::read_volatile(&st.ends) }
}

/// The `ENDS_*` byte of a direction's FIN.
#[inline(always)]
fn fin_fact(d: usize) -> u32 {
    if d == 0 { ENDS_FIN_LO } else { ENDS_FIN_HI }
}

/// Marks the connection seen in one direction only ([`FLOW2_ONE_WAY`]) when this packet proves
/// that the other direction passes this node unseen (`proves_one_way`, in the common crate so
/// it is tested on the host); true the first time.
#[inline(always)]
pub fn one_way(st: &mut FlowState, pkt: &Packet) -> bool {
    if st.flags2 & FLOW2_ONE_WAY != 0 || !proves_one_way(st, pkt.dir, pkt.flags, pkt.ack) {
        return false;
    }
    st.flags2 |= FLOW2_ONE_WAY;
    true
}

/// After [`one_way`]: nothing more decides this connection's class, so both directions stop
/// copying (a client direction would otherwise wait for a ServerHello it never sees), and the
/// agent is told at once.
#[inline(always)]
pub fn stop_one_way(ctx: &TcContext, pkt: &Packet, st: &mut FlowState) {
    st.dir[0].mode = CAP_DONE;
    st.dir[1].mode = CAP_DONE;
    st.last_seen_ns = unsafe { bpf_ktime_get_ns() };
    send_header(ctx, pkt, st, EVENT_ONE_WAY);
}

/// Creates the entry for a connection seen for the first time on this node. The client is
/// whoever sent the SYN; a connection picked up mid-stream has no known client.
#[inline(never)]
#[allow(clippy::needless_borrows_for_generic_args)]
fn new_flow(ctx: &TcContext, pkt: &Packet) -> Result<*mut FlowState, ()> {
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
    let fresh = FlowState {
        first_seen_ns: now,
        last_seen_ns: now,
        client,
        // SAFETY: the skb pointer is valid for the program's run.
        ifindex: unsafe { (*ctx.skb.skb).ifindex },
        ..FlowState::default()
    };
    if FLOWS.insert(&pkt.key, &fresh, 0).is_err() {
        count(stats::FLOW_INSERT_FAILED);
        debug!(ctx, "flow table insert failed");
        return Err(());
    }
    FLOWS.get_ptr_mut(&pkt.key).ok_or(())
}

/// Records the sender's ISN from a SYN or SYN-ACK. A SYN-ACK also names the client's ISN (its
/// acknowledgement number minus one): where a CNI steers the client's packets past this hook
/// (Cilium's `bpf_redirect_peer`), the SYN-ACK is all this node sees of the handshake, and the
/// client's ISN is what joins the views of one connection (flows.rs `ConnKey`).
#[inline(always)]
fn remember_syn(st: &mut FlowState, pkt: &Packet) {
    let own = pkt.dir as usize & 1;
    let peer = own ^ 1;
    st.isn[own] = pkt.seq;
    st.flags |= isn_bit(own);
    if pkt.flags & TCP_ACK != 0 && st.flags & isn_bit(peer) == 0 {
        st.isn[peer] = pkt.ack.wrapping_sub(1);
        st.flags |= isn_bit(peer);
    }
}

/// Stream offset of the packet's first payload byte in direction `d`. A direction whose ISN was
/// not seen (picked up mid-stream) counts from its first payload byte seen and is captured as
/// [`CAP_MID`].
#[inline(always)]
pub fn payload_offset(st: &mut FlowState, pkt: &Packet, d: usize) -> u32 {
    if st.flags & isn_bit(d) == 0 && st.dir[d].hi == 0 && st.dir[d].wraps == 0 {
        let ds = &mut st.dir[d];
        if ds.mode != CAP_MID && ds.mode != CAP_DONE && ds.events == 0 {
            st.isn[d] = pkt.seq.wrapping_sub(1);
            ds.mode = CAP_MID;
        }
    }
    pkt.seq.wrapping_sub(st.isn[d]).wrapping_sub(1)
}

/// Payload bytes of direction `d`: the highest end offset seen (a retransmission or the copy on
/// a second veth changes nothing). A long-lived connection reports its counts each time a
/// direction crosses another 64 MiB, so its bytes show before it closes.
#[inline(always)]
pub fn account(ctx: &TcContext, pkt: &Packet, st: &mut FlowState, d: usize, off: u32) {
    let end = off.wrapping_add(pkt.payload_len);
    let ds = &mut st.dir[d];
    // Ahead of what was seen, in sequence space (a retransmission is behind).
    if (end.wrapping_sub(ds.hi) as i32) <= 0 {
        return;
    }
    let old = ds.hi;
    if end < old {
        ds.wraps = ds.wraps.wrapping_add(1);
    }
    ds.hi = end;
    if (old ^ end) >> BYTES_EVENT_SHIFT != 0 {
        st.last_seen_ns = unsafe { bpf_ktime_get_ns() };
        send_header(ctx, pkt, st, EVENT_BYTES);
    }
}

/// FIN from both sides or an RST (or one FIN of a connection seen in one direction only): the
/// closed event. The facts go into [`FlowState::ends`] by atomic adds, so two FINs handled at
/// once on two CPUs are both kept, and whichever CPU adds last sees the connection ended.
/// Without a fetching add (Linux 5.12) two CPUs can both claim the event in the same instant;
/// the agent takes the second closed event of a connection as a no-op.
#[inline(always)]
pub fn close(ctx: &TcContext, pkt: &Packet, st: &mut FlowState) {
    let fact = if pkt.flags & TCP_RST != 0 {
        ENDS_RST
    } else if pkt.flags & TCP_FIN != 0 {
        fin_fact(pkt.dir as usize & 1)
    } else {
        return;
    };
    let mut now = ends_now(st);
    // A byte is added to only while it reads zero (a retransmitted FIN, or the same FIN on the
    // second veth of a same-node connection, adds nothing), so it cannot overflow.
    if now & (fact * 0xff) == 0 {
        add_ends(st, fact);
        // After our own add, in the word's order of changes: at least as new as it.
        now = ends_now(st);
    }
    if now & (ENDS_CLOSED * 0xff) != 0 || !flow_ended(ends_flags(now), st.flags2) {
        return;
    }
    add_ends(st, ENDS_CLOSED);
    st.last_seen_ns = unsafe { bpf_ktime_get_ns() };
    send_header(ctx, pkt, st, EVENT_CLOSED);
    // The entry is not deleted here: an LRU map hands a deleted element to the next insert at
    // once, while another CPU may still be writing through its pointer to it (a late packet of
    // this flow), corrupting a new flow. The agent deletes closed entries once they have been
    // idle for a second (capture/gc.rs).
}

/// Fills the header of an event about this flow.
#[inline(always)]
pub fn fill_header(
    ctx: &TcContext,
    h: &mut EventHeader,
    kind: u8,
    pkt: &Packet,
    st: &FlowState,
    now: u64,
) {
    h.kind = kind;
    h.dir = pkt.dir;
    h.client = st.client;
    h.flags = st.flags | ends_flags(ends_now(st));
    h.flags2 = st.flags2;
    h._pad = 0;
    h.data_len = 0;
    h.events = [st.dir[0].events, st.dir[1].events];
    h._pad2 = [0; 2];
    // SAFETY: the skb pointer is valid for the program's run.
    h.ifindex = unsafe { (*ctx.skb.skb).ifindex };
    h.seq = 0;
    h.isn = st.isn;
    h.ts_ns = now;
    h.bytes = [
        ((st.dir[0].wraps as u64) << 32) | st.dir[0].hi as u64,
        ((st.dir[1].wraps as u64) << 32) | st.dir[1].hi as u64,
    ];
    h.key = pkt.key;
}

/// Sends a header-only event (closed, bytes). A full ring marks the flow lost: the agent then
/// finds it when it sweeps the table.
#[inline(never)]
fn send_header(ctx: &TcContext, pkt: &Packet, st: &mut FlowState, kind: u8) {
    let Some(mut entry) = EVENTS.reserve::<EventHeader>(0) else {
        count(stats::RINGBUF_FULL);
        st.flags2 |= FLOW2_LOST;
        if kind == EVENT_CLOSED {
            // Not reported: give the claim back, so the agent's sweep finds the closed entry
            // and counts it.
            add_ends(st, ENDS_CLOSED.wrapping_neg());
        }
        return;
    };
    // SAFETY: reserved slot of size_of::<EventHeader>().
    let h = unsafe { &mut *entry.as_mut_ptr() };
    fill_header(ctx, h, kind, pkt, st, st.last_seen_ns);
    entry.submit(0);
    count(stats::EVENTS_SENT);
}
