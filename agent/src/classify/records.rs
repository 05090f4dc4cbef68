//! TLS record layer: split a reassembled byte stream into records and handshake messages.
//!
//! A record can hold several handshake messages and a handshake message can span several records
//! (a 2 KB ClientHello with `max_fragment` 512, a 5 KB certificate chain), so handshake record
//! bodies are concatenated before messages are cut out of them. What the decision needs from the
//! rest is only the record structure: ChangeCipherSpec, the length of ApplicationData records,
//! alerts. Records whose body is not there yet still surface their header (an ApplicationData
//! length is known from its 5-byte header) or the part of a handshake message seen so far.

/// Largest record body accepted: 2^14 plaintext plus the 2048 bytes of expansion TLS 1.2 allows
/// (TLS 1.3 allows 256). Anything longer is not TLS.
pub(crate) const MAX_RECORD_LEN: usize = 16384 + 2048;
/// Records walked per stream: bounds work on hostile input (thousands of tiny records).
const MAX_RECORDS: usize = 256;

pub(crate) const CT_CHANGE_CIPHER_SPEC: u8 = 20;
pub(crate) const CT_ALERT: u8 = 21;
pub(crate) const CT_HANDSHAKE: u8 = 22;
pub(crate) const CT_APPLICATION_DATA: u8 = 23;
pub(crate) const CT_HEARTBEAT: u8 = 24;

pub(crate) const HS_CLIENT_HELLO: u8 = 1;
pub(crate) const HS_SERVER_HELLO: u8 = 2;
pub(crate) const HS_NEW_SESSION_TICKET: u8 = 4;
pub(crate) const HS_CERTIFICATE: u8 = 11;
pub(crate) const HS_CERTIFICATE_REQUEST: u8 = 13;
pub(crate) const HS_CLIENT_KEY_EXCHANGE: u8 = 16;

/// One item of a stream, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Item<'a> {
    /// A complete plaintext handshake message (`body` without the 4-byte header).
    Handshake {
        typ: u8,
        body: Vec<u8>,
        /// Stream offset just past the record that completed the message.
        end: usize,
    },
    /// The last, incomplete handshake message: its type, declared length if the 4-byte header is
    /// there, and the body bytes seen so far.
    PartialHandshake {
        typ: u8,
        declared: Option<usize>,
        body: Vec<u8>,
    },
    ChangeCipherSpec,
    /// A plaintext alert; `fatal` when its level byte is 2 (a fatal alert ends the connection).
    Alert {
        fatal: bool,
    },
    /// An ApplicationData record: offset of its header in the stream and its body length.
    AppData {
        offset: usize,
        len: usize,
    },
    /// A handshake record after ChangeCipherSpec in TLS <= 1.2 (the encrypted Finished).
    Encrypted {
        body: Option<&'a [u8]>,
    },
}

/// The items of a stream prefix.
#[derive(Debug, Default)]
pub(crate) struct Items<'a> {
    pub(crate) items: Vec<Item<'a>>,
    /// The stream stopped being TLS (bad header, interleaved handshake message).
    pub(crate) malformed: bool,
}

/// How much of a stream start looks like a record header of the allowed content types.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Prefix {
    Yes,
    /// Too short to tell, consistent so far.
    Maybe,
    No,
}

/// Does `b` start with `type 0x03 0x00..=0x04` for one of `types`?
pub(crate) fn record_start(b: &[u8], types: &[u8]) -> Prefix {
    let checks = [
        b.first().map(|t| types.contains(t)),
        b.get(1).map(|&v| v == 3),
        b.get(2).map(|&v| v <= 4),
    ];
    if checks.contains(&Some(false)) {
        Prefix::No
    } else if checks.contains(&None) {
        Prefix::Maybe
    } else {
        Prefix::Yes
    }
}

enum Header {
    Ok { typ: u8, len: usize },
    Incomplete,
    Bad,
}

fn header(b: &[u8]) -> Header {
    let types = [
        CT_CHANGE_CIPHER_SPEC,
        CT_ALERT,
        CT_HANDSHAKE,
        CT_APPLICATION_DATA,
        CT_HEARTBEAT,
    ];
    match record_start(b, &types) {
        Prefix::No => return Header::Bad,
        Prefix::Maybe => return Header::Incomplete,
        Prefix::Yes => {}
    }
    let (Some(&typ), Some(&hi), Some(&lo)) = (b.first(), b.get(3), b.get(4)) else {
        return Header::Incomplete;
    };
    let len = usize::from(u16::from_be_bytes([hi, lo]));
    // Empty records are only legal for ApplicationData.
    if len > MAX_RECORD_LEN || (len == 0 && typ != CT_APPLICATION_DATA) {
        return Header::Bad;
    }
    Header::Ok { typ, len }
}

/// `N` bytes of `b` from `at`, if there.
pub(crate) fn array<const N: usize>(b: &[u8], at: usize) -> Option<[u8; N]> {
    b.get(at..at.checked_add(N)?)?.try_into().ok()
}

fn u24(b: &[u8]) -> Option<usize> {
    match b {
        [a, b, c, ..] => Some((usize::from(*a) << 16) | (usize::from(*b) << 8) | usize::from(*c)),
        _ => None,
    }
}

/// Split `b` into items. Handshake records after a ChangeCipherSpec are encrypted in TLS <= 1.2
/// (`plain_after_ccs` false); in TLS 1.3 the only handshake records that can follow the
/// compatibility ChangeCipherSpec in plaintext are the second ClientHello / ServerHello around a
/// HelloRetryRequest (`plain_after_ccs` true); encrypted TLS 1.3 records are ApplicationData.
pub(crate) fn itemize(b: &[u8], plain_after_ccs: bool) -> Items<'_> {
    let mut out = Items::default();
    // Bytes of handshake messages not yet cut out, and how many of them are consumed.
    let mut pending: Vec<u8> = Vec::new();
    let mut encrypted = false;
    let mut off = 0usize;
    for _ in 0..MAX_RECORDS {
        let rest = b.get(off..).unwrap_or_default();
        if rest.is_empty() {
            break;
        }
        let (typ, len) = match header(rest) {
            Header::Ok { typ, len } => (typ, len),
            Header::Incomplete => break,
            Header::Bad => {
                out.malformed = true;
                break;
            }
        };
        let body = rest.get(5..5 + len);
        if typ != CT_HANDSHAKE && !pending.is_empty() {
            // A handshake message interrupted by another record type: not TLS.
            out.malformed = true;
            pending.clear();
            break;
        }
        match typ {
            CT_HANDSHAKE if encrypted => out.items.push(Item::Encrypted { body }),
            CT_HANDSHAKE => {
                let Some(body) = body else {
                    // Surface what there is of the message being received.
                    pending.extend_from_slice(rest.get(5..).unwrap_or_default());
                    break;
                };
                pending.extend_from_slice(body);
                let end = off + 5 + len;
                let mut used = 0usize;
                loop {
                    let msg = pending.get(used..).unwrap_or_default();
                    let (Some(&mtyp), Some(mlen)) = (msg.first(), msg.get(1..).and_then(u24))
                    else {
                        break;
                    };
                    let Some(mbody) = msg.get(4..4 + mlen) else {
                        break;
                    };
                    out.items.push(Item::Handshake {
                        typ: mtyp,
                        body: mbody.to_vec(),
                        end,
                    });
                    used += 4 + mlen;
                }
                pending.drain(..used.min(pending.len()));
            }
            CT_CHANGE_CIPHER_SPEC => {
                if body.is_none() {
                    break;
                }
                out.items.push(Item::ChangeCipherSpec);
                encrypted = !plain_after_ccs;
            }
            CT_ALERT => out.items.push(Item::Alert {
                fatal: body.and_then(|b| b.first()) == Some(&2),
            }),
            CT_APPLICATION_DATA => out.items.push(Item::AppData { offset: off, len }),
            _ => {}
        }
        if body.is_none() {
            break;
        }
        off += 5 + len;
    }
    if let Some(&typ) = pending.first() {
        let declared = pending.get(1..).and_then(u24);
        out.items.push(Item::PartialHandshake {
            typ,
            declared,
            body: pending.get(4..).unwrap_or_default().to_vec(),
        });
    }
    out
}
