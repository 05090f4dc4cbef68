//! Connections picked up mid-stream (their SYN was not seen): positive evidence only.
//!
//! There is no stream offset 0 to start from, so each segment is judged on its own. A segment
//! starting with a TLS record header (and, when the segment holds more than that record, followed by
//! another well-formed header) makes the connection TLS-family; an HTTP/1 request or status line
//! makes it plaintext HTTP. Anything else says nothing: such connections end `unknown`, never
//! plaintext on a guess (DESIGN.md "Verdicts").

use super::plaintext::http_method_len;
use super::records::{
    CT_ALERT, CT_APPLICATION_DATA, CT_CHANGE_CIPHER_SPEC, CT_HANDSHAKE, MAX_RECORD_LEN,
};
use super::{Evidence, Protocol, Security, Verdict};

/// Records checked back to back in one segment.
const MAX_CHAINED_RECORDS: usize = 4;

/// Verdict from one mid-stream segment, if it carries a boundary we recognise.
pub(crate) fn classify_segment(payload: &[u8]) -> Option<Verdict> {
    if tls_records_at_start(payload) {
        return Some(Verdict::new(Security::Tls, Evidence::MidstreamRecordHeader));
    }
    if http1_line(payload) {
        return Some(Verdict::plaintext(Protocol::Http1, Evidence::MidstreamHttp));
    }
    None
}

/// One plausible record header: type 20-23, version 3.1-3.4, a sane length for the type.
fn record_len(b: &[u8]) -> Option<usize> {
    let (&typ, &major, &minor, &hi, &lo) = (b.first()?, b.get(1)?, b.get(2)?, b.get(3)?, b.get(4)?);
    let len = usize::from(u16::from_be_bytes([hi, lo]));
    let type_ok = match typ {
        CT_CHANGE_CIPHER_SPEC => len == 1,
        CT_ALERT => len >= 2,
        CT_HANDSHAKE | CT_APPLICATION_DATA => len >= 1,
        _ => false,
    };
    (type_ok && major == 3 && (1..=4).contains(&minor) && len <= MAX_RECORD_LEN).then_some(len)
}

fn tls_records_at_start(p: &[u8]) -> bool {
    let Some(mut len) = record_len(p) else {
        return false;
    };
    let mut off = 0usize;
    for _ in 0..MAX_CHAINED_RECORDS {
        off += 5 + len;
        let rest = p.get(off..).unwrap_or_default();
        if rest.len() < 5 {
            // The segment ends inside this record, or right after it: nothing contradicts.
            return true;
        }
        match record_len(rest) {
            Some(next) => len = next,
            None => return false,
        }
    }
    true
}

/// An HTTP/1 request line (`METHOD target HTTP/1.x`) or status line (`HTTP/1.x NNN `).
fn http1_line(p: &[u8]) -> bool {
    if let Some(rest) = p
        .strip_prefix(b"HTTP/1.0 ")
        .or_else(|| p.strip_prefix(b"HTTP/1.1 "))
    {
        return rest.len() >= 4
            && rest.iter().take(3).all(u8::is_ascii_digit)
            && rest.get(3) == Some(&b' ');
    }
    let Some(n) = http_method_len(p) else {
        return false;
    };
    let rest = p.get(n..).unwrap_or_default();
    let target_len = rest.iter().take_while(|c| c.is_ascii_graphic()).count();
    if target_len == 0 {
        return false;
    }
    let tail = rest.get(target_len..).unwrap_or_default();
    tail.starts_with(b" HTTP/1.0") || tail.starts_with(b" HTTP/1.1")
}
