//! Tests of the classifier: one file per family of rules with byte fixtures, and `real_stacks`
//! against OpenSSL's s_server / s_client through a recording relay.
//!
//! Every feed goes through [`feed`], which also checks the invariants that hold for any input:
//! `on_segment` reports the decision once, `finish` agrees with an earlier decision, and the
//! buffers stay within [`STREAM_CAP`].

mod api;
pub(crate) mod fixtures;
mod hostile;
mod midstream_rules;
mod plaintext_rules;
mod real_stacks;
mod reassembly_rules;
mod tls12;
mod tls13;

use std::net::SocketAddr;

use super::reassembly::STREAM_CAP;
use super::*;

/// Client ISN close to 2^32: the client stream's sequence numbers wrap within its first bytes.
pub(crate) const CLIENT_ISN: u32 = 0xffff_ff00;
pub(crate) const SERVER_ISN: u32 = 0x1234_5678;

pub(crate) const CLIENT_ADDR: &str = "198.18.0.10:40000";
pub(crate) const SERVER_IP: &str = "198.18.1.20";

/// Metadata of a connection to `SERVER_IP:server_port` whose SYN and SYN-ACK were seen.
pub(crate) fn meta(server_port: u16) -> ConnMeta {
    ConnMeta {
        client: CLIENT_ADDR.parse().unwrap(),
        server: SocketAddr::new(SERVER_IP.parse().unwrap(), server_port),
        client_isn: Some(CLIENT_ISN),
        server_isn: Some(SERVER_ISN),
        midstream: false,
    }
}

/// A captured segment: direction, offset in its stream, captured bytes, length on the wire.
#[derive(Debug, Clone)]
pub(crate) struct Seg {
    pub(crate) dir: Direction,
    pub(crate) off: usize,
    pub(crate) data: Vec<u8>,
    pub(crate) wire_len: u32,
}

impl Seg {
    pub(crate) fn new(dir: Direction, off: usize, data: &[u8]) -> Seg {
        Seg {
            dir,
            off,
            data: data.to_vec(),
            wire_len: u32::try_from(data.len()).unwrap(),
        }
    }
}

pub(crate) use Direction::{ToClient as S2C, ToServer as C2S};

/// Flights in time order, each cut into segments of at most `size` bytes.
pub(crate) fn segmented(list: &[(Direction, Vec<u8>)], size: usize) -> Vec<Seg> {
    let (mut c, mut s) = (0usize, 0usize);
    let mut out = Vec::new();
    for (dir, bytes) in list {
        let off = if *dir == C2S { &mut c } else { &mut s };
        for piece in bytes.chunks(size.max(1)) {
            out.push(Seg::new(*dir, *off, piece));
            *off += piece.len();
        }
    }
    out
}

/// Flights in time order, one segment each.
pub(crate) fn flights(list: &[(Direction, Vec<u8>)]) -> Vec<Seg> {
    segmented(list, usize::MAX)
}

/// The bytes of one direction, rebuilt from segments.
pub(crate) fn stream_bytes(segs: &[Seg], dir: Direction) -> Vec<u8> {
    let mut out = Vec::new();
    for s in segs.iter().filter(|s| s.dir == dir) {
        if out.len() < s.off + s.data.len() {
            out.resize(s.off + s.data.len(), 0);
        }
        out[s.off..s.off + s.data.len()].copy_from_slice(&s.data);
    }
    out
}

/// Small deterministic PRNG (xorshift64*), so failures reproduce.
pub(crate) struct Rng(u64);

impl Rng {
    pub(crate) fn new(seed: u64) -> Rng {
        Rng(seed.max(1))
    }

    pub(crate) fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    pub(crate) fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }

    pub(crate) fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

/// The same bytes as `segs`, as a bad capture delivers them: every segment, a third of them
/// twice, overlapping re-sends with other boundaries, all in random order.
pub(crate) fn scramble(segs: &[Seg], seed: u64) -> Vec<Seg> {
    let mut rng = Rng::new(seed);
    let mut out: Vec<Seg> = segs.to_vec();
    for s in segs {
        if rng.below(3) == 0 {
            out.push(s.clone());
        }
    }
    for dir in [C2S, S2C] {
        let bytes = stream_bytes(segs, dir);
        for _ in 0..bytes.len() / 400 {
            let start = rng.below(bytes.len());
            let len = 1 + rng.below(700);
            let end = (start + len).min(bytes.len());
            out.push(Seg::new(dir, start, &bytes[start..end]));
        }
    }
    for i in (1..out.len()).rev() {
        let j = rng.below(i + 1);
        out.swap(i, j);
    }
    out
}

/// The result of feeding a connection.
#[derive(Debug, Clone)]
pub(crate) struct Outcome {
    pub(crate) verdict: Verdict,
    /// `on_segment` made the verdict final (before `finish`).
    pub(crate) decided_early: bool,
}

/// Sequence number bases used when the metadata has no ISN (the classifier does not know them).
const UNKNOWN_CLIENT_BASE: u32 = 0x7fff_fff0;
const UNKNOWN_SERVER_BASE: u32 = 0x0000_0100;

/// Feed `segs` to a new classifier, then finish it, checking the invariants on the way.
pub(crate) fn feed(meta: ConnMeta, segs: &[Seg], cache: &mut ResumptionCache) -> Outcome {
    let mut c = ConnClassifier::new(meta);
    let mut decided = false;
    for s in segs {
        let isn = match s.dir {
            C2S => meta.client_isn.unwrap_or(UNKNOWN_CLIENT_BASE),
            S2C => meta.server_isn.unwrap_or(UNKNOWN_SERVER_BASE),
        };
        let seq = isn.wrapping_add(1).wrapping_add(s.off as u32);
        if c.on_segment(s.dir, seq, &s.data, s.wire_len, cache) {
            assert!(!decided, "on_segment reported a decision twice");
            decided = true;
        }
        assert_eq!(decided, c.verdict().is_some());
        assert!(c.client.contiguous_len() <= STREAM_CAP);
        assert!(c.server.contiguous_len() <= STREAM_CAP);
    }
    let before = c.verdict().cloned();
    let verdict = c.finish(cache);
    if let Some(before) = before {
        assert_eq!(before, verdict, "finish changed a final verdict");
    }
    assert_eq!(c.verdict(), Some(&verdict));
    Outcome {
        verdict,
        decided_early: decided,
    }
}

/// Feed flights (one segment each) with a fresh cache.
pub(crate) fn classify(meta: ConnMeta, list: &[(Direction, Vec<u8>)]) -> Outcome {
    feed(meta, &flights(list), &mut ResumptionCache::new(16))
}
