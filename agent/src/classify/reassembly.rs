//! Reassembly of the first bytes of one direction of a TCP stream.
//!
//! Captured segments come duplicated (one skb seen on two interfaces), retransmitted, overlapping,
//! out of order, and cut by the capture length. The parsers only ever look at the contiguous prefix
//! from stream offset 0, so this keeps the bytes by offset, first copy wins, and reports how far the
//! prefix reaches. Everything is bounded: [`STREAM_CAP`] bytes, [`MAX_RANGES`] disjoint ranges and
//! [`MAX_SEGS`] remembered segments, whatever the input.

/// Bytes buffered per direction. A post-quantum ClientHello is ~2 KB and a TLS 1.2 server flight
/// with a certificate chain a few KB; nothing beyond the first flights is needed.
pub(crate) const STREAM_CAP: usize = 16 * 1024;
/// Disjoint filled ranges kept (hostile input: thousands of tiny segments); when full, the range
/// farthest from the start gives way to a nearer one.
const MAX_RANGES: usize = 64;
/// Segments remembered for arrival order and "first segment complete".
const MAX_SEGS: usize = 64;

/// One captured segment, in stream offsets.
#[derive(Debug, Clone, Copy)]
struct Seg {
    start: usize,
    /// End of the captured bytes.
    cap_end: usize,
    /// End of the segment on the wire (> cap_end when the capture was cut).
    wire_end: usize,
    /// Arrival order (the classifier's call counter).
    tick: u64,
}

/// One direction of a connection.
#[derive(Debug, Default)]
pub(crate) struct Stream {
    /// Sequence number of stream offset 0.
    base: Option<u32>,
    /// `base` came from the SYN (isn + 1): bytes before it are not ours. Without it, `base` is the
    /// lowest sequence number seen so far and moves down when an earlier segment shows up; a
    /// decision taken before that earlier segment arrived (its successor read as the stream start)
    /// cannot be undone, so callers should pass the ISNs whenever the handshake was seen.
    isn_known: bool,
    buf: Vec<u8>,
    /// Filled byte ranges of `buf`, sorted, disjoint, not adjacent.
    ranges: Vec<(usize, usize)>,
    segs: Vec<Seg>,
    seen: bool,
}

impl Stream {
    pub(crate) fn new(isn: Option<u32>) -> Self {
        Stream {
            base: isn.map(|i| i.wrapping_add(1)),
            isn_known: isn.is_some(),
            ..Stream::default()
        }
    }

    /// Any payload (captured or not) was seen in this direction.
    pub(crate) fn seen(&self) -> bool {
        self.seen
    }

    /// Add a segment: `payload` starts at sequence number `seq`; `wire_len` is its length on the
    /// wire (bytes past `payload.len()` were not captured).
    pub(crate) fn insert(&mut self, seq: u32, payload: &[u8], wire_len: u32, tick: u64) {
        let wire_len = usize::try_from(wire_len)
            .unwrap_or(usize::MAX)
            .max(payload.len());
        if wire_len == 0 {
            return;
        }
        self.seen = true;
        let base = *self.base.get_or_insert(seq);
        // Signed distance with wrap-around: sequence numbers are modulo 2^32.
        let rel = seq.wrapping_sub(base) as i32;
        let (offset, payload, wire_len) = if rel >= 0 {
            (rel as usize, payload, wire_len)
        } else {
            let back = rel.unsigned_abs() as usize;
            if self.isn_known {
                // Starts before the first payload byte (data on a SYN, a bogus keepalive): trim.
                if back >= wire_len {
                    return;
                }
                (0, payload.get(back..).unwrap_or_default(), wire_len - back)
            } else {
                self.rebase(back);
                self.base = Some(seq);
                (0, payload, wire_len)
            }
        };
        if self.segs.len() < MAX_SEGS {
            self.segs.push(Seg {
                start: offset,
                cap_end: offset.saturating_add(payload.len()),
                wire_end: offset.saturating_add(wire_len),
                tick,
            });
        }
        self.fill(offset, payload);
    }

    /// Shift everything up by `shift` bytes: an earlier segment became offset 0.
    fn rebase(&mut self, shift: usize) {
        if shift >= STREAM_CAP {
            self.buf.clear();
            self.ranges.clear();
            self.segs.clear();
            return;
        }
        let mut buf = vec![0u8; shift];
        buf.extend_from_slice(&self.buf);
        buf.truncate(STREAM_CAP);
        self.buf = buf;
        self.ranges = self
            .ranges
            .iter()
            .filter_map(|&(s, e)| {
                let (s, e) = (s + shift, (e + shift).min(STREAM_CAP));
                (s < e).then_some((s, e))
            })
            .collect();
        for seg in &mut self.segs {
            seg.start = seg.start.saturating_add(shift);
            seg.cap_end = seg.cap_end.saturating_add(shift);
            seg.wire_end = seg.wire_end.saturating_add(shift);
        }
    }

    /// Copy the bytes of `payload` (at `offset`) that are not filled yet; first copy wins.
    fn fill(&mut self, offset: usize, payload: &[u8]) {
        if offset >= STREAM_CAP || payload.is_empty() {
            return;
        }
        let end = offset.saturating_add(payload.len()).min(STREAM_CAP);
        let touches = self.ranges.iter().any(|&(s, e)| s <= end && offset <= e);
        if !touches && self.ranges.len() >= MAX_RANGES {
            // Full: keep the ranges nearest the start, which the prefix needs first.
            match self.ranges.last() {
                Some(&(last_start, _)) if last_start > offset => {
                    self.ranges.pop();
                }
                _ => return,
            }
        }
        if self.buf.len() < end {
            self.buf.resize(end, 0);
        }
        // Fill the gaps of [offset, end) between existing ranges.
        let mut pos = offset;
        for &(s, e) in &self.ranges {
            if e <= pos {
                continue;
            }
            if s >= end {
                break;
            }
            if s > pos {
                copy(&mut self.buf, pos, s, offset, payload);
            }
            pos = pos.max(e);
            if pos >= end {
                break;
            }
        }
        if pos < end {
            copy(&mut self.buf, pos, end, offset, payload);
        }
        self.ranges.push((offset, end));
        self.ranges.sort_unstable();
        let mut merged: Vec<(usize, usize)> = Vec::with_capacity(self.ranges.len());
        for &(s, e) in &self.ranges {
            match merged.last_mut() {
                Some(last) if s <= last.1 => last.1 = last.1.max(e),
                _ => merged.push((s, e)),
            }
        }
        self.ranges = merged;
    }

    /// Length of the contiguous prefix from offset 0.
    pub(crate) fn contiguous_len(&self) -> usize {
        match self.ranges.first() {
            Some(&(0, e)) => e,
            _ => 0,
        }
    }

    /// The contiguous prefix from offset 0.
    pub(crate) fn contiguous(&self) -> &[u8] {
        self.buf.get(..self.contiguous_len()).unwrap_or_default()
    }

    /// The segment starting at offset 0 was captured whole and is in the prefix: the sender's first
    /// write is complete, so a short plaintext request can be judged without waiting for more.
    pub(crate) fn first_segment_complete(&self) -> bool {
        let len = self.contiguous_len();
        self.segs
            .iter()
            .any(|s| s.start == 0 && s.cap_end == s.wire_end && s.wire_end <= len)
    }

    /// Arrival order of the byte at `offset` (earliest segment carrying it), if remembered.
    pub(crate) fn tick_of(&self, offset: usize) -> Option<u64> {
        self.segs
            .iter()
            .filter(|s| s.start <= offset && offset < s.cap_end)
            .map(|s| s.tick)
            .min()
    }

    /// Drop the buffers once the verdict is final.
    pub(crate) fn release(&mut self) {
        self.buf = Vec::new();
        self.ranges = Vec::new();
        self.segs = Vec::new();
    }
}

/// Copy stream bytes [from, to) of `payload` (which starts at stream offset `offset`) into `buf`.
fn copy(buf: &mut [u8], from: usize, to: usize, offset: usize, payload: &[u8]) {
    let src = payload.get(from - offset..to - offset);
    let dst = buf.get_mut(from..to);
    if let (Some(src), Some(dst)) = (src, dst) {
        dst.copy_from_slice(src);
    }
}
