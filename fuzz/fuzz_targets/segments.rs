//! Arbitrary segments into the classifier (the segment-to-verdict pipeline of the daemon and of
//! `classify --pcap`): no panic, one decision, `finish` agrees with it.
//!
//! Input: byte 0 picks the connection shape (mid-stream, which ISNs were seen, server port),
//! then segments `[dir|flags:1][seq offset:2][wire extra:1][len:2][bytes...]`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mtls_agent::classify::{ConnClassifier, ConnMeta, Direction, ResumptionCache, Security};

const CLIENT_ISN: u32 = 0xffff_ff00;
const SERVER_ISN: u32 = 0x1234_5678;

fuzz_target!(|data: &[u8]| {
    let Some((&shape, mut rest)) = data.split_first() else {
        return;
    };
    let port = match shape >> 4 {
        0 => 15008,
        1 => 5432,
        2 => 3306,
        _ => 8443,
    };
    let meta = ConnMeta {
        client: "198.18.0.20:40000".parse().unwrap(),
        server: std::net::SocketAddr::new("198.18.0.10".parse().unwrap(), port),
        client_isn: (shape & 1 != 0).then_some(CLIENT_ISN),
        server_isn: (shape & 2 != 0).then_some(SERVER_ISN),
        midstream: shape & 4 != 0,
    };
    let mut cache = ResumptionCache::new(16);
    // A full handshake remembered for this pair, so resumed sessions are exercised too.
    if shape & 8 != 0 {
        cache.record(meta.client.ip(), meta.server, Security::Mtls);
    }
    let mut c = ConnClassifier::new(meta);
    let mut decided = None;
    while rest.len() >= 6 {
        let (head, tail) = rest.split_at(6);
        let dir = if head[0] & 1 == 0 {
            Direction::ToServer
        } else {
            Direction::ToClient
        };
        let off = u32::from(u16::from_be_bytes([head[1], head[2]]));
        let len = usize::from(u16::from_be_bytes([head[4], head[5]])).min(tail.len());
        let (payload, tail) = tail.split_at(len);
        let base = match dir {
            Direction::ToServer => CLIENT_ISN,
            Direction::ToClient => SERVER_ISN,
        };
        // Mostly near the stream start; the high bit of the flags byte scatters far away.
        let seq = if head[0] & 0x80 != 0 {
            base.wrapping_add(off << 16)
        } else {
            base.wrapping_add(1).wrapping_add(off)
        };
        let wire_len = u32::try_from(payload.len()).unwrap() + u32::from(head[3] & 0x0f);
        if c.on_segment(dir, seq, payload, wire_len, &mut cache) {
            assert!(decided.is_none(), "decided twice");
            decided = c.verdict().cloned();
            assert!(decided.is_some());
        }
        rest = tail;
    }
    let v = c.finish(&mut cache);
    if let Some(d) = decided {
        assert_eq!(d, v, "finish disagrees with the earlier decision");
    }
    // Evidence labels stay bounded.
    assert!(!v.evidence.kind().is_empty());
});
