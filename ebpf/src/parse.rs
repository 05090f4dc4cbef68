//! Parsing: Ethernet (802.1Q/802.1ad), IPv4/IPv6 and TCP headers into a [`Packet`]. Headers in
//! the skb's linear area are read in place ([`parse_direct`]); [`parse`] with
//! `bpf_skb_load_bytes` is the fallback for anything else.
use aya_ebpf::{helpers::bpf_skb_load_bytes, programs::TcContext};
use mtls_agent_common::{DIR_HI_TO_LO, DIR_LO_TO_HI, FAMILY_V4, FAMILY_V6, FlowKey, stats};

use crate::count;

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;
const IPPROTO_TCP: u8 = 6;

pub use mtls_agent_common::{TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN};

/// What one packet told us, after parsing. 8-byte aligned so that [`zeroed_packet`] can clear it
/// with 64-bit stores.
#[repr(C, align(8))]
pub struct Packet {
    pub key: FlowKey,
    pub dir: u8,
    pub seq: u32,
    /// Acknowledgement number: a SYN-ACK's names the client's ISN; any packet's tells what the
    /// sender received of the other direction (`flow::one_way`).
    pub ack: u32,
    pub flags: u8,
    pub payload_off: u32,
    pub payload_len: u32,
}

/// Clears `slot` with nine volatile 64-bit stores and returns it as an all-zero [`Packet`] (the
/// flow key is hashed whole, padding included). In place and volatile on purpose: LLVM turns
/// any other zeroing (or a copy of a zeroed value) into a call to the byte-wise `memset` that
/// bpf-linker provides, which was a tenth of an established packet's cost.
#[inline(always)]
pub fn zeroed_packet(slot: &mut core::mem::MaybeUninit<Packet>) -> &mut Packet {
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
pub fn parse(ctx: &TcContext, pkt: &mut Packet) -> Result<bool, ()> {
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
pub fn parse_direct(ctx: &TcContext, pkt: &mut Packet) -> Option<bool> {
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
