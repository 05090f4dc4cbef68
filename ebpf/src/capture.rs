//! Capture: copy exactly the bytes of a direction that the verdict rules read, each once.
//!
//! The budget is in stream offsets, not segments: a retransmitted or duplicated range, or the
//! same segment seen on a second veth, is below `done_to` (or inside the one early range kept)
//! and is not copied again; a segment that arrives early is copied once and placed by the agent's
//! reassembly. What is wanted ([`DirState::lim`]) follows the first bytes:
//!
//! - **plaintext** (no TLS record at offset 0): the first segment, up to `--capture-bytes`. Of the
//!   next few segments only one that starts a TLS handshake record is copied (an upgrade:
//!   PostgreSQL's SSLRequest, MySQL's SSL request, STARTTLS), and the direction continues as TLS
//!   from there;
//! - **TLS**: the program walks the record headers. Handshake, alert and ChangeCipherSpec records
//!   are copied whole (the ClientHello however many segments it spans, a TLS 1.2 server flight up
//!   to its CertificateRequest). The server direction ends at its first encrypted record (TLS 1.3)
//!   or after the record that follows its ChangeCipherSpec (TLS 1.2). The client's: in TLS 1.2
//!   after its encrypted Finished; in TLS 1.3 at its first ApplicationData record after the
//!   ServerHello when that is shorter than a certificate (128 bytes: a Finished), else that record
//!   whole and the next record's header (which tells a certificate from a padded Finished);
//!   0-RTT records sent before the ServerHello are copied and not counted;
//! - **mid-stream** connections (no SYN seen): the first three segments as they come;
//! - the walk losing its place (a header split over two segments, reordering, a gap) falls back
//!   to copying the window ([`CAPTURE_WINDOW`] bytes): more bytes, never a wrong verdict.
//!
//! Nothing beyond [`CAPTURE_WINDOW`] and no more than `--max-segments` events per direction are
//! ever copied. Records are sized to their payload (a per-CPU scratch slot, then the used length
//! to the ring buffer).
use aya_ebpf::{
    helpers::{bpf_ktime_get_ns, bpf_skb_load_bytes},
    programs::TcContext,
};
use mtls_agent_common::{
    CAP_BULK, CAP_DONE, CAP_FIRST, CAP_MID, CAP_TLS, CAP_WATCH, CAPTURE_WINDOW, CHUNK_BYTES,
    CLIENT_HI, CLIENT_LO, DirState, EVENT_DATA, EVENT_HEADER_LEN, FLOW2_LOST, FlowState,
    MAX_CHUNKS_PER_SEGMENT, TLS_APPDATA_SHIFT, TLS_CCS, TLS_HELLO, TLS_WALKED, stats,
};

use crate::{
    CAPTURE_BYTES, EVENTS, MAX_SEGMENTS, SCRATCH, add_stat, count, flow::fill_header, parse::Packet,
};

/// Segments a plaintext direction is watched for an upgrade to TLS.
const WATCH_SEGMENTS: u8 = 8;
/// Segments copied of a direction picked up mid-stream.
const MID_SEGMENTS: u8 = 3;
/// Record headers read per packet (a TLS 1.2 server flight is five records in one segment).
const WALK_PER_PACKET: usize = 8;
/// A first client ApplicationData record at least this long may carry a certificate (a Finished
/// is 53 or 69 bytes); the classifier's `CERTIFICATE_RECORD_MIN`.
const CERTIFICATE_RECORD_MIN: u32 = 128;
/// A first encrypted client record copied whole only up to this length.
const WHOLE_RECORD_MAX: u32 = 4096;
/// TLS records are at most 2^14 + 2048 bytes.
const MAX_RECORD_LEN: u32 = 16384 + 2048;
/// A clear handshake record after this direction's first one (a TLS <= 1.2 flight).
const TLS_CLEAR_FLIGHT: u8 = 1 << 3;

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
fn min(a: u32, b: u32) -> u32 {
    if a < b { a } else { b }
}

/// Whether the segment's payload starts with a TLS handshake record header (22, 3, 0..=4).
#[inline(always)]
fn tls_start(ctx: &TcContext, pkt: &Packet) -> bool {
    if pkt.payload_len < 5 {
        return false;
    }
    let mut b = [0u8; 3];
    // SAFETY: 3 bytes into a 3-byte stack buffer.
    let ret = unsafe {
        bpf_skb_load_bytes(
            ctx.skb.skb.cast(),
            pkt.payload_off,
            b.as_mut_ptr().cast(),
            3,
        )
    };
    ret == 0 && b[0] == 22 && b[1] == 3 && b[2] <= 4
}

/// Where a segment lies in its direction's stream (BPF functions take at most five arguments).
struct Seg {
    d: usize,
    off: u32,
    end: u32,
    client_dir: bool,
    /// The other direction (the server, for the client's) sent its first handshake record.
    peer_hello: bool,
}

/// Handles one payload segment of direction `d` at stream offset `off`.
#[inline(never)]
pub fn segment(ctx: &TcContext, pkt: &Packet, st: &mut FlowState, d: usize, off: u32) {
    let d = d & 1;
    let seg = Seg {
        d,
        off,
        end: off.wrapping_add(pkt.payload_len),
        client_dir: (st.client == CLIENT_LO && d == 0) || (st.client == CLIENT_HI && d == 1),
        peer_hello: st.dir[d ^ 1].tls & TLS_HELLO != 0,
    };
    let end = seg.end;
    let ds = &mut st.dir[d];
    if ds.events as u32 >= max_segments() || off >= CAPTURE_WINDOW {
        // Past the window (or a retransmission from before this direction's first byte, which
        // wraps to a huge offset): nothing more will be wanted.
        if off >= CAPTURE_WINDOW && (off as i32) > 0 || ds.events as u32 >= max_segments() {
            ds.mode = CAP_DONE;
        }
        return;
    }
    let upto = match ds.mode {
        CAP_FIRST if off == 0 => {
            if tls_start(ctx, pkt) {
                ds.mode = CAP_TLS;
                walk(ctx, pkt, ds, &seg);
                min(end, ds.lim)
            } else {
                ds.mode = CAP_WATCH;
                ds.lim = min(end, capture_bytes());
                ds.lim
            }
        }
        // Ahead of offset 0 (the first segment lost before this hook, or reordered): copied
        // now, placed by the agent.
        CAP_FIRST => min(end, CAPTURE_WINDOW),
        CAP_WATCH => {
            ds.watched = ds.watched.saturating_add(1);
            if ds.watched > WATCH_SEGMENTS {
                ds.mode = CAP_DONE;
                return;
            }
            if off < ds.lim || !tls_start(ctx, pkt) {
                return;
            }
            // An upgrade to TLS: copy from here, as a TLS stream.
            ds.mode = CAP_TLS;
            ds.hdr = off;
            ds.lim = off;
            ds.done_to = off;
            ds.ooo_start = 0;
            ds.ooo_end = 0;
            walk(ctx, pkt, ds, &seg);
            min(end, ds.lim)
        }
        CAP_TLS => {
            if ds.tls & TLS_WALKED == 0 {
                if off > ds.hdr {
                    // The next header is in a segment not seen yet or seen out of order: the
                    // walk cannot go on; copy the window instead.
                    ds.mode = CAP_BULK;
                    ds.lim = CAPTURE_WINDOW;
                } else {
                    walk(ctx, pkt, ds, &seg);
                }
            }
            min(end, ds.lim)
        }
        CAP_BULK => min(end, ds.lim),
        CAP_MID => {
            if ds.events >= MID_SEGMENTS {
                ds.mode = CAP_DONE;
                return;
            }
            min(end, CAPTURE_WINDOW)
        }
        _ => return,
    };
    copy(ctx, pkt, st, &seg, upto);
    let ds = &mut st.dir[d];
    let complete = match ds.mode {
        CAP_TLS => ds.tls & TLS_WALKED != 0 && ds.done_to >= ds.lim,
        CAP_BULK => ds.done_to >= ds.lim,
        CAP_MID => ds.events >= MID_SEGMENTS,
        _ => false,
    };
    if complete {
        ds.mode = CAP_DONE;
    }
}

/// Wants bytes up to `x` (within the window).
#[inline(always)]
fn want(ds: &mut DirState, x: u32) {
    let x = min(x, CAPTURE_WINDOW);
    if x > ds.lim {
        ds.lim = x;
    }
}

/// Reads the record headers that lie in this segment and extends what is wanted.
#[inline(never)]
fn walk(ctx: &TcContext, pkt: &Packet, ds: &mut DirState, seg: &Seg) {
    let (off, end, client_dir, peer_hello) = (seg.off, seg.end, seg.client_dir, seg.peer_hello);
    for _ in 0..WALK_PER_PACKET {
        let h = ds.hdr;
        if ds.tls & TLS_WALKED != 0 || h < off || h >= end {
            return;
        }
        if h >= CAPTURE_WINDOW {
            ds.tls |= TLS_WALKED;
            return;
        }
        if end - h < 5 {
            // The header continues in the next segment.
            ds.mode = CAP_BULK;
            ds.lim = CAPTURE_WINDOW;
            return;
        }
        let mut b = [0u8; 5];
        // SAFETY: 5 bytes into a 5-byte stack buffer; the helper checks the skb bounds.
        let ret = unsafe {
            bpf_skb_load_bytes(
                ctx.skb.skb.cast(),
                pkt.payload_off.wrapping_add(h - off),
                b.as_mut_ptr().cast(),
                5,
            )
        };
        if ret != 0 {
            ds.mode = CAP_BULK;
            ds.lim = CAPTURE_WINDOW;
            return;
        }
        let typ = b[0];
        let len = u16::from_be_bytes([b[3], b[4]]) as u32;
        if b[1] != 3 || !(20..=23).contains(&typ) || len > MAX_RECORD_LEN {
            // Not TLS (any more): the header is enough for the classifier to say so.
            want(ds, h + 5);
            ds.tls |= TLS_WALKED;
            return;
        }
        let rec_end = h + 5 + len;
        let after_ccs = ds.tls & TLS_CCS != 0;
        if after_ccs {
            if typ == 23 {
                // TLS 1.3 (ChangeCipherSpec for middlebox compatibility): the client's encrypted
                // flight; the server's flight is known.
                if client_dir && ds.tls & TLS_CLEAR_FLIGHT == 0 {
                    appdata(ds, h, len, peer_hello);
                } else {
                    ds.tls |= TLS_WALKED;
                }
            } else {
                // TLS <= 1.2's encrypted Finished (done after it), or TLS 1.3's second
                // ClientHello or ServerHello after a HelloRetryRequest.
                want(ds, rec_end);
                if ds.tls & TLS_CLEAR_FLIGHT != 0 || (!client_dir && typ == 22) {
                    ds.tls |= TLS_WALKED;
                }
            }
        } else {
            match typ {
                23 if !client_dir => {
                    // The server's first encrypted record (TLS 1.3): its flight is known.
                    ds.tls |= TLS_WALKED;
                }
                23 => appdata(ds, h, len, peer_hello),
                20 => {
                    want(ds, rec_end);
                    ds.tls |= TLS_CCS;
                }
                _ => {
                    want(ds, rec_end);
                    if typ == 22 {
                        if ds.tls & TLS_HELLO != 0 {
                            ds.tls |= TLS_CLEAR_FLIGHT;
                        }
                        ds.tls |= TLS_HELLO;
                    }
                }
            }
        }
        ds.hdr = rec_end;
    }
}

/// A client ApplicationData record (TLS 1.3: its encrypted handshake flight).
#[inline(always)]
fn appdata(ds: &mut DirState, h: u32, len: u32, peer_hello: bool) {
    if !peer_hello {
        // 0-RTT data, sent before the ServerHello: copied, not counted.
        want(ds, h + 5 + len);
        return;
    }
    let n = ((ds.tls >> TLS_APPDATA_SHIFT) & 3) + 1;
    ds.tls = (ds.tls & 0x0f) | ((n & 3) << TLS_APPDATA_SHIFT);
    if n == 1 && (CERTIFICATE_RECORD_MIN..=WHOLE_RECORD_MAX).contains(&len) {
        // Long enough for a certificate: whole, and the next header.
        want(ds, h + 5 + len);
    } else {
        want(ds, h + 5);
        ds.tls |= TLS_WALKED;
    }
}

/// Copies the wanted bytes `[off, upto)` of this segment that were not copied before.
#[inline(never)]
fn copy(ctx: &TcContext, pkt: &Packet, st: &mut FlowState, seg: &Seg, upto: u32) {
    let (d, off) = (seg.d & 1, seg.off);
    let mut a = off;
    {
        let ds = &st.dir[d];
        if a < ds.done_to {
            a = ds.done_to;
        }
        if upto <= a {
            return;
        }
        if ds.ooo_end > ds.ooo_start && a >= ds.ooo_start && upto <= ds.ooo_end {
            return;
        }
    }
    let start = a;
    let now = unsafe { bpf_ktime_get_ns() };
    for _ in 0..MAX_CHUNKS_PER_SEGMENT {
        if a >= upto {
            break;
        }
        if st.dir[d].events == u8::MAX {
            break;
        }
        let n = min(upto - a, CHUNK_BYTES as u32);
        if !emit(ctx, pkt, st, a - off, n, now) {
            st.flags2 |= FLOW2_LOST;
            st.dir[d].mode = CAP_DONE;
            break;
        }
        st.dir[d].events += 1;
        a += n;
    }
    let ds = &mut st.dir[d];
    if start == ds.done_to {
        ds.done_to = a;
        if ds.ooo_end > ds.ooo_start && ds.ooo_start <= a {
            if ds.ooo_end > a {
                ds.done_to = ds.ooo_end;
            }
            ds.ooo_start = 0;
            ds.ooo_end = 0;
        }
    } else if ds.ooo_end <= ds.ooo_start {
        ds.ooo_start = start;
        ds.ooo_end = a;
    } else if start == ds.ooo_end {
        ds.ooo_end = a;
    } else if a == ds.ooo_start {
        ds.ooo_start = start;
    }
}

/// One data event: `n` (1..=CHUNK_BYTES) payload bytes from `rel` past the segment's start.
#[inline(always)]
fn emit(ctx: &TcContext, pkt: &Packet, st: &FlowState, rel: u32, n: u32, now: u64) -> bool {
    let Some(ev) = SCRATCH.get_ptr_mut(0) else {
        return false;
    };
    // SAFETY: the per-CPU scratch slot is this program run's alone.
    let ev = unsafe { &mut *ev };
    fill_header(ctx, &mut ev.header, EVENT_DATA, pkt, st, now);
    ev.header.seq = pkt.seq.wrapping_add(rel);
    // The verifier needs a length it can prove non-zero and within the slot.
    let len = ((n.wrapping_sub(1)) & (CHUNK_BYTES as u32 - 1)) + 1;
    ev.header.data_len = len as u16;
    let ret = unsafe {
        bpf_skb_load_bytes(
            ctx.skb.skb.cast(),
            pkt.payload_off.wrapping_add(rel),
            ev.data.as_mut_ptr().cast(),
            len,
        )
    };
    if ret != 0 {
        count(stats::LOAD_BYTES_FAILED);
        return false;
    }
    let total = EVENT_HEADER_LEN + len as usize;
    // SAFETY: `total` <= size_of::<DataEvent>(): the header and `len` bytes of the slot.
    let bytes = unsafe {
        core::slice::from_raw_parts(
            (ev as *const mtls_agent_common::DataEvent).cast::<u8>(),
            total,
        )
    };
    if EVENTS.output::<[u8]>(bytes, 0).is_err() {
        count(stats::RINGBUF_FULL);
        return false;
    }
    count(stats::EVENTS_SENT);
    add_stat(stats::BYTES_COPIED, len as u64);
    true
}
