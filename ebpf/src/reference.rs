//! Observer R of `cargo xtask bench`: a parse-only reference program, the floor of this kernel
//! and VM for a TC program that reads Ethernet/IP/TCP headers (`mtls-agent bench-reference`
//! attaches it where `run` attaches [`crate::mtls_ingress`]/[`crate::mtls_egress`]). It runs the
//! same parser ([`parse`]) and nothing else: no flow table, no statistics, no events. The agent's
//! eBPF cost is stated as a ratio to this program's, measured on the same packets.
use aya_ebpf::{bindings::TC_ACT_UNSPEC, macros::classifier, programs::TcContext};

use crate::parse;

/// Parse-only reference at TC ingress.
#[classifier]
pub fn mtlsref_ingress(ctx: TcContext) -> i32 {
    parse_only(&ctx);
    TC_ACT_UNSPEC
}

/// Parse-only reference at TC egress.
#[classifier]
pub fn mtlsref_egress(ctx: TcContext) -> i32 {
    parse_only(&ctx);
    TC_ACT_UNSPEC
}

/// The agent's header parsing, with its result read back so the compiler keeps every header
/// load (a result nobody reads would let LLVM drop most of the parse).
#[inline(always)]
fn parse_only(ctx: &TcContext) {
    let mut slot = core::mem::MaybeUninit::<parse::Packet>::uninit();
    let pkt = parse::zeroed_packet(&mut slot);
    let tcp = match parse::parse_direct(ctx, pkt) {
        Some(tcp) => tcp,
        None => parse::parse(ctx, pkt).unwrap_or(false),
    };
    if tcp {
        const WORDS: usize = core::mem::size_of::<parse::Packet>() / 8;
        let words = (pkt as *const parse::Packet).cast::<u64>();
        for i in 0..WORDS {
            // SAFETY: `words` covers the whole 8-aligned, initialised Packet.
            let _ = unsafe { core::ptr::read_volatile(words.add(i)) };
        }
    }
}
