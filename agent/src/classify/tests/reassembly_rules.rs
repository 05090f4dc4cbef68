//! Reassembly: duplicates, overlaps, reordering, wrap-around, capture gaps, bounds.

use super::super::reassembly::{STREAM_CAP, Stream};
use super::Rng;

fn bytes(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i % 251) as u8).collect()
}

#[test]
fn in_order_segments_form_the_prefix() {
    let data = bytes(3000);
    let mut s = Stream::new(Some(100));
    for (i, piece) in data.chunks(500).enumerate() {
        s.insert(101 + (i as u32) * 500, piece, piece.len() as u32, i as u64);
        assert_eq!(s.contiguous_len(), (i + 1) * 500);
    }
    assert_eq!(s.contiguous(), &data[..]);
}

#[test]
fn out_of_order_duplicates_and_overlaps_reassemble() {
    let data = bytes(4000);
    let isn = 0xffff_fff0u32; // the sequence numbers wrap after 15 bytes
    let seq = |off: usize| isn.wrapping_add(1).wrapping_add(off as u32);
    let mut s = Stream::new(Some(isn));
    let mut pieces: Vec<(usize, usize)> = (0..8).map(|i| (i * 500, i * 500 + 500)).collect();
    pieces.reverse();
    pieces.push((250, 1250)); // overlaps two segments
    pieces.push((3500, 4000)); // duplicate
    for (tick, (a, b)) in pieces.into_iter().enumerate() {
        s.insert(seq(a), &data[a..b], (b - a) as u32, tick as u64);
    }
    assert_eq!(s.contiguous(), &data[..]);
}

#[test]
fn first_copy_wins_on_conflicting_overlap() {
    let mut s = Stream::new(Some(0));
    s.insert(1, b"abcdef", 6, 0);
    s.insert(3, b"XXXXgh", 6, 1);
    assert_eq!(s.contiguous(), b"abcdefgh");
}

#[test]
fn unknown_isn_rebases_on_an_earlier_segment() {
    let data = bytes(1200);
    let mut s = Stream::new(None);
    let base = 0xffff_fe00u32;
    s.insert(base.wrapping_add(600), &data[600..1200], 600, 0);
    // Without the SYN, the lowest sequence number seen is offset 0 for now.
    assert_eq!(s.contiguous(), &data[600..1200]);
    s.insert(base, &data[..600], 600, 1);
    assert_eq!(s.contiguous(), &data[..]);
    assert_eq!(s.tick_of(0), Some(1));
    assert_eq!(s.tick_of(700), Some(0));
}

#[test]
fn bytes_before_the_isn_are_trimmed() {
    let mut s = Stream::new(Some(1000));
    // A segment starting 2 bytes before the first payload byte (data on the SYN's sequence number).
    s.insert(999, b"xxhello", 7, 0);
    assert_eq!(s.contiguous(), b"hello");
    s.insert(900, b"old", 3, 1);
    assert_eq!(s.contiguous(), b"hello");
}

#[test]
fn capture_cap_leaves_a_gap() {
    let mut s = Stream::new(Some(0));
    // 100 bytes on the wire, 40 captured: the prefix stops at 40 until a retransmission fills it.
    s.insert(1, &bytes(40), 100, 0);
    assert_eq!(s.contiguous_len(), 40);
    assert!(!s.first_segment_complete());
    s.insert(1, &bytes(100), 100, 1);
    assert_eq!(s.contiguous_len(), 100);
    assert!(s.first_segment_complete());
}

#[test]
fn buffer_is_capped() {
    let mut s = Stream::new(Some(0));
    let data = bytes(3 * STREAM_CAP);
    for (i, piece) in data.chunks(1400).enumerate() {
        s.insert(1 + (i * 1400) as u32, piece, piece.len() as u32, i as u64);
    }
    assert_eq!(s.contiguous_len(), STREAM_CAP);
    assert_eq!(s.contiguous(), &data[..STREAM_CAP]);
}

#[test]
fn many_disjoint_tiny_segments_stay_bounded() {
    let mut s = Stream::new(Some(0));
    let mut rng = Rng::new(7);
    for i in 0..10_000u64 {
        let off = 2 + 2 * rng.below(STREAM_CAP);
        s.insert(1 + off as u32, b"z", 1, i);
    }
    assert_eq!(s.contiguous_len(), 0);
    // Offset 0 arrives last and still forms a prefix.
    s.insert(1, b"ab", 2, 10_001);
    assert!(s.contiguous_len() >= 2);
}

#[test]
fn unknown_isn_far_rebase_drops_old_data() {
    let mut s = Stream::new(None);
    s.insert(1_000_000, b"late", 4, 0);
    s.insert(1_000_000 - 2 * STREAM_CAP as u32, b"early", 5, 1);
    assert_eq!(s.contiguous(), b"early");
}
