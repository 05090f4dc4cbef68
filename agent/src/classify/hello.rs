//! Handshake message contents: ClientHello, ServerHello, Certificate, parsed with `tls-parser`,
//! and SPIFFE IDs from certificates with `x509-parser`.
//!
//! Extensions are walked one by one (type, length, data) and each is handed to `tls-parser`
//! separately, so one odd extension (GREASE, an unknown or malformed one) cannot hide the ALPN or
//! SNI that follow it.

use tls_parser::{TlsExtension, TlsMessageHandshake};

use super::records::array;
use x509_parser::extensions::GeneralName;

/// Extensions looked at per hello: a ClientHello that fits our buffer has at most ~4k.
const MAX_EXTENSIONS: usize = 4096;
/// ALPN values kept in a verdict.
const MAX_ALPN: usize = 64;
/// SPIFFE IDs kept per certificate.
const MAX_SPIFFE: usize = 8;

/// The random of a HelloRetryRequest (RFC 8446 4.1.3): SHA-256("HelloRetryRequest").
const HRR_RANDOM: [u8; 32] = [
    0xcf, 0x21, 0xad, 0x74, 0xe5, 0x9a, 0x61, 0x11, 0xbe, 0x1d, 0x8c, 0x02, 0x1e, 0x65, 0xb8, 0x91,
    0xc2, 0xa2, 0x11, 0x16, 0x7a, 0xbb, 0x8c, 0x5e, 0x07, 0x9e, 0x09, 0xe2, 0xc8, 0xa8, 0x33, 0x9c,
];

const EXT_SERVER_NAME: u16 = 0;
const EXT_ALPN: u16 = 16;
const EXT_SESSION_TICKET: u16 = 35;
const EXT_PRE_SHARED_KEY: u16 = 41;
const EXT_EARLY_DATA: u16 = 42;
const EXT_SUPPORTED_VERSIONS: u16 = 43;

pub(crate) const TLS13: u16 = 0x0304;

/// What the classifier needs from a ClientHello.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct ClientHelloInfo {
    pub(crate) session_id: Vec<u8>,
    pub(crate) sni: Option<String>,
    pub(crate) alpn: Vec<String>,
    pub(crate) versions: Vec<u16>,
    /// Offers 0-RTT data (TLS 1.3).
    pub(crate) early_data: bool,
    /// Offers a PSK (TLS 1.3 resumption).
    pub(crate) psk: bool,
}

/// What the classifier needs from a ServerHello.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct ServerHelloInfo {
    /// Negotiated version (supported_versions when present, else legacy_version).
    pub(crate) version: u16,
    pub(crate) session_id: Vec<u8>,
    pub(crate) cipher: u16,
    /// Accepted a PSK: TLS 1.3 resumption.
    pub(crate) psk: bool,
    /// This is a HelloRetryRequest, not a real ServerHello.
    pub(crate) hrr: bool,
}

/// Calls `f(type, whole extension bytes)` for each well-framed extension.
fn for_each_extension(mut ext: &[u8], mut f: impl FnMut(u16, &[u8])) {
    for _ in 0..MAX_EXTENSIONS {
        let (Some(t), Some(l)) = (array(ext, 0), array(ext, 2)) else {
            return;
        };
        let typ = u16::from_be_bytes(t);
        let len = usize::from(u16::from_be_bytes(l));
        let Some(whole) = ext.get(..4 + len) else {
            return;
        };
        f(typ, whole);
        ext = ext.get(4 + len..).unwrap_or_default();
    }
}

fn lossy(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Parse a ClientHello body (after the 4-byte handshake header). None when it is not one.
pub(crate) fn parse_client_hello(body: &[u8]) -> Option<ClientHelloInfo> {
    let (_, ch) = tls_parser::parse_tls_handshake_client_hello(body).ok()?;
    let mut info = ClientHelloInfo {
        session_id: ch.session_id.unwrap_or_default().to_vec(),
        ..ClientHelloInfo::default()
    };
    for_each_extension(ch.ext.unwrap_or_default(), |typ, whole| {
        if !matches!(
            typ,
            EXT_SERVER_NAME
                | EXT_ALPN
                | EXT_SESSION_TICKET
                | EXT_PRE_SHARED_KEY
                | EXT_EARLY_DATA
                | EXT_SUPPORTED_VERSIONS
        ) {
            return;
        }
        match tls_parser::parse_tls_client_hello_extension(whole) {
            Ok((_, TlsExtension::SNI(names))) if info.sni.is_none() => {
                info.sni = names
                    .iter()
                    .find(|(t, _)| t.0 == 0)
                    .map(|(_, name)| lossy(name));
            }
            Ok((_, TlsExtension::ALPN(protos))) => {
                info.alpn = protos.iter().take(MAX_ALPN).map(|p| lossy(p)).collect();
            }
            Ok((_, TlsExtension::SupportedVersions(v))) => {
                info.versions = v.iter().map(|v| v.0).collect();
            }
            Ok((_, TlsExtension::EarlyData(_))) => info.early_data = true,
            Ok((_, TlsExtension::PreSharedKey(_))) => info.psk = true,
            _ => {}
        }
    });
    Some(info)
}

/// Parse a ServerHello (or HelloRetryRequest) body. None when it is not one.
pub(crate) fn parse_server_hello(body: &[u8]) -> Option<ServerHelloInfo> {
    let (_, sh) = tls_parser::parse_tls_handshake_server_hello(body).ok()?;
    let mut info = ServerHelloInfo {
        version: sh.version.0,
        session_id: sh.session_id.unwrap_or_default().to_vec(),
        cipher: sh.cipher.0,
        psk: false,
        hrr: sh.random == HRR_RANDOM,
    };
    for_each_extension(sh.ext.unwrap_or_default(), |typ, whole| {
        if !matches!(typ, EXT_PRE_SHARED_KEY | EXT_SUPPORTED_VERSIONS) {
            return;
        }
        match tls_parser::parse_tls_server_hello_extension(whole) {
            Ok((_, TlsExtension::SupportedVersions(v))) => {
                if let Some(v) = v.first() {
                    info.version = v.0;
                }
            }
            Ok((_, TlsExtension::PreSharedKey(_))) => info.psk = true,
            _ => {}
        }
    });
    Some(info)
}

/// "1.0" .. "1.3" for a negotiated version.
pub(crate) fn version_str(v: u16) -> Option<&'static str> {
    match v {
        0x0301 => Some("1.0"),
        0x0302 => Some("1.1"),
        0x0303 => Some("1.2"),
        TLS13 => Some("1.3"),
        _ => None,
    }
}

/// IANA name of a cipher suite, when tls-parser knows it.
pub(crate) fn cipher_name(id: u16) -> Option<String> {
    tls_parser::TlsCipherSuiteID(id)
        .get_ciphersuite()
        .map(|c| c.name.to_string())
}

/// Length of the certificate_list of a TLS <= 1.2 Certificate body (from its first 3 bytes, so
/// it is known before the whole message is).
pub(crate) fn certificate_list_len(body: &[u8]) -> Option<usize> {
    match body {
        [a, b, c, ..] => Some((usize::from(*a) << 16) | (usize::from(*b) << 8) | usize::from(*c)),
        _ => None,
    }
}

/// SPIFFE IDs of the leaf certificate of a complete TLS <= 1.2 Certificate body.
pub(crate) fn leaf_spiffe(body: &[u8]) -> Vec<String> {
    match tls_parser::parse_tls_handshake_msg_certificate(body) {
        Ok((_, TlsMessageHandshake::Certificate(c))) => c
            .cert_chain
            .first()
            .map(|leaf| spiffe_ids(leaf.data))
            .unwrap_or_default(),
        _ => Vec::new(),
    }
}

/// spiffe:// URIs in the subjectAltName of a DER certificate.
pub(crate) fn spiffe_ids(der: &[u8]) -> Vec<String> {
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(der) else {
        return Vec::new();
    };
    let Ok(Some(san)) = cert.subject_alternative_name() else {
        return Vec::new();
    };
    san.value
        .general_names
        .iter()
        .filter_map(|name| match name {
            GeneralName::URI(uri) if uri.starts_with("spiffe://") => Some((*uri).to_string()),
            _ => None,
        })
        .take(MAX_SPIFFE)
        .collect()
}
