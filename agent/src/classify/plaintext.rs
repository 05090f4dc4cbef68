//! Plaintext recognition: is the start of a stream TLS, a preamble that leads to TLS (PostgreSQL
//! SSLRequest, MySQL SSL request), or a plaintext protocol, and which one.
//!
//! Each detector answers `Found`, `Maybe` (a prefix of it, too short to say) or `No`, so the
//! classifier can decide as soon as the bytes allow and wait otherwise.

use super::Protocol;
pub(crate) use super::records::Prefix;
use super::records::{CT_HANDSHAKE, array, record_start};

/// Result of one detector.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Detect<T> {
    Found(T),
    Maybe,
    No,
}

/// A client stream starts a TLS connection: `0x16 0x03 0x00..=0x04`.
pub(crate) fn tls_client_start(b: &[u8]) -> Prefix {
    record_start(b, &[CT_HANDSHAKE])
}

/// Compare `b` with `pattern`: Found when `b` starts with it, Maybe when `b` is a shorter prefix.
fn literal(b: &[u8], pattern: &[u8]) -> Detect<()> {
    if b.starts_with(pattern) {
        Detect::Found(())
    } else if !b.is_empty() && pattern.starts_with(b) {
        Detect::Maybe
    } else {
        Detect::No
    }
}

/// PostgreSQL requests sent before the StartupMessage, each answered by one server byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Preamble {
    None,
    NeedMore,
    /// SSLRequest (80877103): 'S' then TLS, 'N' then plaintext.
    Ssl,
    /// GSSENCRequest (80877104): 'G' then GSSAPI encryption, 'N' then plaintext.
    Gss,
}

const PG_SSL_REQUEST: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];
const PG_GSSENC_REQUEST: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x30];

pub(crate) fn pg_preamble(b: &[u8]) -> Preamble {
    match (literal(b, &PG_SSL_REQUEST), literal(b, &PG_GSSENC_REQUEST)) {
        (Detect::Found(()), _) => Preamble::Ssl,
        (_, Detect::Found(())) => Preamble::Gss,
        (Detect::Maybe, _) | (_, Detect::Maybe) => Preamble::NeedMore,
        _ => Preamble::None,
    }
}

const H2C_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// HTTP/2 prior-knowledge preface (h2c, plaintext gRPC). Eight bytes of it are unambiguous.
fn h2c(b: &[u8]) -> Detect<Protocol> {
    let n = b.len().min(H2C_PREFACE.len());
    let head = b.get(..n).unwrap_or_default();
    if n == 0 || !H2C_PREFACE.starts_with(head) {
        Detect::No
    } else if n >= 8 {
        Detect::Found(Protocol::H2c)
    } else {
        Detect::Maybe
    }
}

pub(crate) const HTTP_METHODS: [&str; 19] = [
    "GET",
    "POST",
    "PUT",
    "DELETE",
    "HEAD",
    "OPTIONS",
    "PATCH",
    "CONNECT",
    "TRACE",
    "PROPFIND",
    "PROPPATCH",
    "MKCOL",
    "COPY",
    "MOVE",
    "LOCK",
    "UNLOCK",
    "REPORT",
    "SEARCH",
    "PURGE",
];

/// Length of the HTTP method + space at the start of `b`, if any.
pub(crate) fn http_method_len(b: &[u8]) -> Option<usize> {
    HTTP_METHODS.iter().find_map(|m| {
        let m = m.as_bytes();
        (b.starts_with(m) && b.get(m.len()) == Some(&b' ')).then_some(m.len() + 1)
    })
}

/// An HTTP/1 request: a method, a space, and a request target ("/", "*", "http://", or an
/// authority for CONNECT). The target's first byte tells a Redis inline "GET key" apart.
fn http1(b: &[u8]) -> Detect<Protocol> {
    if let Some(n) = http_method_len(b) {
        let connect = b.starts_with(b"CONNECT ");
        return match b.get(n) {
            None => Detect::Maybe,
            Some(b'/' | b'*') => Detect::Found(Protocol::Http1),
            Some(c) if c.is_ascii_alphanumeric() && connect => Detect::Found(Protocol::Http1),
            Some(b'h' | b'H') => match literal(b.get(n..).unwrap_or_default(), b"http") {
                Detect::No => Detect::No,
                Detect::Maybe => Detect::Maybe,
                Detect::Found(()) => Detect::Found(Protocol::Http1),
            },
            Some(_) => Detect::No,
        };
    }
    let maybe = HTTP_METHODS.iter().any(|m| {
        let mut tok = m.as_bytes().to_vec();
        tok.push(b' ');
        !b.is_empty() && b.len() < tok.len() && tok.starts_with(b)
    });
    if maybe { Detect::Maybe } else { Detect::No }
}

/// PostgreSQL StartupMessage (length + protocol 3.x) or CancelRequest.
fn postgres(b: &[u8]) -> Detect<Protocol> {
    let (Some(len), Some(code)) = (array(b, 0), array(b, 4)) else {
        return if b.first() == Some(&0) {
            Detect::Maybe
        } else {
            Detect::No
        };
    };
    let len = u32::from_be_bytes(len);
    let code = u32::from_be_bytes(code);
    let startup = code >> 16 == 3 && code & 0xffff < 16 && (9..=10_000).contains(&len);
    let cancel = code == 80_877_102 && len == 16;
    if startup || cancel {
        Detect::Found(Protocol::Postgres)
    } else {
        Detect::No
    }
}

/// Redis RESP array (`*<n>\r\n$...`) or an inline PING / AUTH / HELLO.
fn redis(b: &[u8]) -> Detect<Protocol> {
    if let Some(rest) = b.strip_prefix(b"*") {
        let digits = rest.iter().take_while(|c| c.is_ascii_digit()).count();
        let after = rest.get(digits..).unwrap_or_default();
        if digits > 6 {
            return Detect::No;
        }
        if digits == 0 {
            return if after.is_empty() {
                Detect::Maybe
            } else {
                Detect::No
            };
        }
        return match literal(after, b"\r\n$") {
            Detect::Found(()) => Detect::Found(Protocol::Redis),
            Detect::Maybe => Detect::Maybe,
            Detect::No if after.is_empty() => Detect::Maybe,
            Detect::No => Detect::No,
        };
    }
    let upper: Vec<u8> = b.iter().take(8).map(u8::to_ascii_uppercase).collect();
    let mut maybe = false;
    for cmd in [&b"PING\r\n"[..], b"PING\n", b"PING ", b"AUTH ", b"HELLO "] {
        match literal(&upper, cmd) {
            Detect::Found(()) => return Detect::Found(Protocol::Redis),
            Detect::Maybe => maybe = true,
            Detect::No => {}
        }
    }
    if maybe { Detect::Maybe } else { Detect::No }
}

/// Sub-protocol of a client stream that is known not to be TLS, once decidable: a detector
/// matched, or none can match any more and at least 8 bytes are there, or 64 bytes, or the
/// client's first segment is complete, or the connection ended.
pub(crate) fn classify_client(
    b: &[u8],
    first_segment_complete: bool,
    finishing: bool,
) -> Option<Protocol> {
    let detections = [h2c(b), http1(b), postgres(b), redis(b)];
    if let Some(p) = detections.iter().find_map(|d| match d {
        Detect::Found(p) => Some(*p),
        _ => None,
    }) {
        return Some(p);
    }
    let maybe = detections.contains(&Detect::Maybe);
    let enough = (!maybe && b.len() >= 8) || b.len() >= 64;
    (enough || first_segment_complete || finishing).then_some(Protocol::Other)
}

/// A MySQL server greeting (HandshakeV10): 3-byte length, sequence 0, protocol 10, a
/// NUL-terminated printable version string. Found carries the packet length with its header,
/// i.e. where the server's next bytes (TLS after an SSL request) start.
pub(crate) fn mysql_greeting_len(s: &[u8]) -> Detect<usize> {
    let (Some([l0, l1, l2]), Some(&seq), Some(&proto)) = (array(s, 0), s.get(3), s.get(4)) else {
        let consistent = s.get(3).is_none_or(|&q| q == 0);
        return if !s.is_empty() && consistent {
            Detect::Maybe
        } else {
            Detect::No
        };
    };
    let len = usize::from(l0) | usize::from(l1) << 8 | usize::from(l2) << 16;
    if seq != 0 || proto != 10 || !(20..=1024).contains(&len) {
        return Detect::No;
    }
    let version = s.get(5..(4 + len).min(5 + 64)).unwrap_or_default();
    match version.iter().position(|&c| c == 0) {
        Some(0) => Detect::No,
        Some(n)
            if version
                .get(..n)
                .is_some_and(|v| v.iter().all(|c| c.is_ascii_graphic())) =>
        {
            Detect::Found(4 + len)
        }
        Some(_) => Detect::No,
        None if version.iter().all(|c| c.is_ascii_graphic()) && version.len() < 64 => Detect::Maybe,
        None => Detect::No,
    }
}

/// A MySQL client SSL request: a 32-byte HandshakeResponse prefix, sequence 1, with the CLIENT_SSL
/// capability. Found carries where the client's TLS starts.
pub(crate) fn mysql_ssl_request(c: &[u8]) -> Detect<usize> {
    const CLIENT_SSL: u32 = 0x0800;
    let (Some([l0, l1, l2]), Some(&seq), Some(caps)) = (array(c, 0), c.get(3), array(c, 4)) else {
        return Detect::Maybe;
    };
    let len = usize::from(l0) | usize::from(l1) << 8 | usize::from(l2) << 16;
    let caps = u32::from_le_bytes(caps);
    if seq == 1 && len == 32 && caps & CLIENT_SSL != 0 {
        Detect::Found(4 + len)
    } else {
        Detect::No
    }
}

/// A server that speaks first with a recognised plaintext greeting.
pub(crate) fn server_banner(s: &[u8]) -> Detect<Protocol> {
    let mut maybe = false;
    match mysql_greeting_len(s) {
        Detect::Found(_) => return Detect::Found(Protocol::Mysql),
        Detect::Maybe => maybe = true,
        Detect::No => {}
    }
    // SSH, SMTP/FTP, POP3, IMAP greetings.
    for banner in [&b"SSH-"[..], b"220 ", b"220-", b"+OK", b"* OK"] {
        match literal(s, banner) {
            Detect::Found(()) => return Detect::Found(Protocol::Other),
            Detect::Maybe => maybe = true,
            Detect::No => {}
        }
    }
    if maybe { Detect::Maybe } else { Detect::No }
}
