//! Byte builders for TLS records and handshake messages, so unit tests state exactly what is on
//! the wire.

/// A record of `typ` with legacy version 3.3.
pub(crate) fn record(typ: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![typ, 3, 3];
    out.extend_from_slice(&u16::try_from(body.len()).unwrap().to_be_bytes());
    out.extend_from_slice(body);
    out
}

/// `body` cut into handshake records of at most `frag` bytes (a message spanning records).
pub(crate) fn handshake_records(body: &[u8], frag: usize) -> Vec<u8> {
    body.chunks(frag).flat_map(|c| record(22, c)).collect()
}

/// A handshake message: type, u24 length, body.
pub(crate) fn hs(typ: u8, body: &[u8]) -> Vec<u8> {
    let len = u32::try_from(body.len()).unwrap().to_be_bytes();
    let mut out = vec![typ, len[1], len[2], len[3]];
    out.extend_from_slice(body);
    out
}

fn ext(typ: u16, data: &[u8]) -> Vec<u8> {
    let mut out = typ.to_be_bytes().to_vec();
    out.extend_from_slice(&u16::try_from(data.len()).unwrap().to_be_bytes());
    out.extend_from_slice(data);
    out
}

fn vec8(data: &[u8]) -> Vec<u8> {
    let mut out = vec![u8::try_from(data.len()).unwrap()];
    out.extend_from_slice(data);
    out
}

fn vec16(data: &[u8]) -> Vec<u8> {
    let mut out = u16::try_from(data.len()).unwrap().to_be_bytes().to_vec();
    out.extend_from_slice(data);
    out
}

/// What a test ClientHello offers.
#[derive(Debug, Clone, Default)]
pub(crate) struct Ch {
    pub(crate) session_id: Vec<u8>,
    pub(crate) alpn: Vec<String>,
    pub(crate) sni: Option<String>,
    pub(crate) tls13: bool,
    pub(crate) early_data: bool,
    pub(crate) psk: bool,
    /// Bytes of an unknown extension placed before ALPN and SNI (pushes them past the first KB).
    pub(crate) padding: usize,
    /// Extra empty unknown extensions (hostile: thousands).
    pub(crate) empty_extensions: usize,
}

impl Ch {
    pub(crate) fn alpn(protos: &[&str]) -> Ch {
        Ch {
            alpn: protos.iter().map(|p| p.to_string()).collect(),
            ..Ch::default()
        }
    }

    pub(crate) fn tls13(mut self) -> Ch {
        self.tls13 = true;
        self
    }
}

/// A ClientHello handshake message (with its 4-byte header).
pub(crate) fn client_hello(ch: &Ch) -> Vec<u8> {
    let mut body = vec![3, 3];
    body.extend_from_slice(&[0x11; 32]);
    body.extend(vec8(&ch.session_id));
    body.extend(vec16(&[0x13, 0x01, 0xc0, 0x2f]));
    body.extend(vec8(&[0]));
    let mut exts = Vec::new();
    // A GREASE extension first, as browsers send.
    exts.extend(ext(0x0a0a, &[]));
    if ch.padding > 0 {
        exts.extend(ext(0xfe42, &vec![0x42; ch.padding]));
    }
    for _ in 0..ch.empty_extensions {
        exts.extend(ext(0xfe43, &[]));
    }
    if let Some(sni) = &ch.sni {
        let mut entry = vec![0];
        entry.extend(vec16(sni.as_bytes()));
        exts.extend(ext(0, &vec16(&entry)));
    }
    if !ch.alpn.is_empty() {
        let list: Vec<u8> = ch.alpn.iter().flat_map(|p| vec8(p.as_bytes())).collect();
        exts.extend(ext(16, &vec16(&list)));
    }
    if ch.tls13 {
        exts.extend(ext(43, &vec8(&[0x03, 0x04, 0x03, 0x03])));
        exts.extend(ext(
            51,
            &vec16(
                &[0, 29, 0, 32]
                    .iter()
                    .copied()
                    .chain([7; 32])
                    .collect::<Vec<_>>(),
            ),
        ));
    }
    if ch.early_data {
        exts.extend(ext(42, &[]));
    }
    if ch.psk {
        // identities<7..>: one identity of 4 bytes + u32 age; binders<33..>: one 32-byte binder.
        let mut ids = vec16(&[1, 2, 3, 4]);
        ids.extend_from_slice(&[0, 0, 0, 0]);
        let mut psk = vec16(&ids);
        psk.extend(vec16(&vec8(&[9; 32])));
        exts.extend(ext(41, &psk));
    }
    body.extend(vec16(&exts));
    hs(1, &body)
}

/// The random of a HelloRetryRequest.
const HRR_RANDOM: [u8; 32] = [
    0xcf, 0x21, 0xad, 0x74, 0xe5, 0x9a, 0x61, 0x11, 0xbe, 0x1d, 0x8c, 0x02, 0x1e, 0x65, 0xb8, 0x91,
    0xc2, 0xa2, 0x11, 0x16, 0x7a, 0xbb, 0x8c, 0x5e, 0x07, 0x9e, 0x09, 0xe2, 0xc8, 0xa8, 0x33, 0x9c,
];

/// What a test ServerHello says.
#[derive(Debug, Clone, Default)]
pub(crate) struct Sh {
    pub(crate) session_id: Vec<u8>,
    pub(crate) cipher: u16,
    pub(crate) tls13: bool,
    pub(crate) psk: bool,
    pub(crate) hrr: bool,
}

impl Sh {
    /// TLS 1.2 with ECDHE-RSA-AES128-GCM-SHA256.
    pub(crate) fn tls12() -> Sh {
        Sh {
            cipher: 0xc02f,
            ..Sh::default()
        }
    }

    /// TLS 1.3 with TLS_AES_128_GCM_SHA256.
    pub(crate) fn tls13() -> Sh {
        Sh {
            cipher: 0x1301,
            tls13: true,
            ..Sh::default()
        }
    }
}

/// A ServerHello (or HelloRetryRequest) handshake message.
pub(crate) fn server_hello(sh: &Sh) -> Vec<u8> {
    let mut body = vec![3, 3];
    body.extend_from_slice(if sh.hrr { &HRR_RANDOM } else { &[0x22; 32] });
    body.extend(vec8(&sh.session_id));
    body.extend_from_slice(&sh.cipher.to_be_bytes());
    body.push(0);
    let mut exts = Vec::new();
    if sh.tls13 {
        exts.extend(ext(43, &[3, 4]));
        if sh.hrr {
            exts.extend(ext(51, &[0, 29]));
        } else {
            exts.extend(ext(
                51,
                &[0, 29, 0, 32]
                    .iter()
                    .copied()
                    .chain([8; 32])
                    .collect::<Vec<_>>(),
            ));
        }
    }
    if sh.psk {
        exts.extend(ext(41, &[0, 0]));
    }
    body.extend(vec16(&exts));
    hs(2, &body)
}

/// A TLS <= 1.2 Certificate message carrying `certs` (opaque DER blobs).
pub(crate) fn certificate(certs: &[&[u8]]) -> Vec<u8> {
    let mut list = Vec::new();
    for c in certs {
        let len = u32::try_from(c.len()).unwrap().to_be_bytes();
        list.extend_from_slice(&len[1..]);
        list.extend_from_slice(c);
    }
    let len = u32::try_from(list.len()).unwrap().to_be_bytes();
    let mut body = len[1..].to_vec();
    body.extend(list);
    hs(11, &body)
}

pub(crate) fn certificate_request() -> Vec<u8> {
    // cert types: ecdsa_sign; sig algs: one; CAs: none.
    hs(13, &[1, 64, 0, 2, 4, 3, 0, 0])
}

pub(crate) fn server_key_exchange() -> Vec<u8> {
    hs(
        12,
        &[3, 0, 29, 32]
            .iter()
            .copied()
            .chain([5; 32])
            .collect::<Vec<_>>(),
    )
}

pub(crate) fn server_hello_done() -> Vec<u8> {
    hs(14, &[])
}

pub(crate) fn client_key_exchange() -> Vec<u8> {
    hs(16, &vec8(&[6; 32]))
}

pub(crate) fn new_session_ticket() -> Vec<u8> {
    hs(4, &[0, 0, 0, 60, 0, 4, 1, 2, 3, 4])
}

pub(crate) fn ccs() -> Vec<u8> {
    record(20, &[1])
}

/// An ApplicationData record with a body of `len` bytes.
pub(crate) fn app(len: usize) -> Vec<u8> {
    record(23, &vec![0x5a; len])
}

/// An encrypted TLS 1.2 Finished (a handshake record after ChangeCipherSpec).
pub(crate) fn encrypted_finished() -> Vec<u8> {
    record(22, &[0; 40])
}

pub(crate) fn alert() -> Vec<u8> {
    record(21, &[2, 40]) // fatal handshake_failure
}
