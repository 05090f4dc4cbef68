//! Plaintext: sub-protocols, when the decision is made, and preambles that lead to TLS.

use super::fixtures::*;
use super::*;

fn plain(list: &[(Direction, Vec<u8>)]) -> Outcome {
    classify(meta(8080), list)
}

fn tls_exchange_13(first_record: usize) -> (Vec<u8>, Vec<u8>, Vec<u8>) {
    let ch = record(22, &client_hello(&Ch::alpn(&["postgresql"]).tls13()));
    let mut sh = record(22, &server_hello(&Sh::tls13()));
    sh.extend(ccs());
    sh.extend(app(900));
    let mut flight = ccs();
    flight.extend(app(first_record));
    flight.extend(app(53)); // Finished (after a CertificateVerify, when there is a certificate)
    (ch, sh, flight)
}

#[test]
fn http1_request_is_decided_on_the_first_bytes() {
    let o = plain(&[(C2S, b"GET /healthz HTTP/1.1\r\nHost: api\r\n\r\n".to_vec())]);
    assert!(o.decided_early);
    assert_eq!(o.verdict.security, Security::Plaintext);
    assert_eq!(o.verdict.protocol, Some(Protocol::Http1));
    assert_eq!(o.verdict.evidence, Evidence::PlaintextFirstBytes);
    assert_eq!(o.verdict.mesh, Mesh::None);
    assert_eq!(o.verdict.tls_version, None);

    // A method and the start of a target are enough, even split over segments.
    let segs = segmented(&[(C2S, b"POST /v1/orders HTTP/1.1\r\n".to_vec())], 6);
    let o = feed(meta(8080), &segs[..1], &mut ResumptionCache::new(1));
    assert_eq!(o.verdict.protocol, Some(Protocol::Http1));
}

#[test]
fn h2c_preface_is_h2c() {
    let o = plain(&[(
        C2S,
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x12\x04".to_vec(),
    )]);
    assert!(o.decided_early);
    assert_eq!(o.verdict.protocol, Some(Protocol::H2c));
}

#[test]
fn postgres_startup_is_postgres() {
    let mut startup = 0u32.to_be_bytes().to_vec();
    startup.extend_from_slice(&196_608u32.to_be_bytes());
    startup.extend_from_slice(b"user\0app\0database\0shop\0\0");
    let len = u32::try_from(startup.len()).unwrap().to_be_bytes();
    startup[..4].copy_from_slice(&len);
    let o = plain(&[(C2S, startup)]);
    assert!(o.decided_early);
    assert_eq!(o.verdict.protocol, Some(Protocol::Postgres));
}

const SSL_REQUEST: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];

#[test]
fn postgres_ssl_request_then_tls_is_tls() {
    let (ch, sh, flight) = tls_exchange_13(500);
    let mut server = b"S".to_vec();
    server.extend(sh);
    let list = [
        (C2S, SSL_REQUEST.to_vec()),
        (S2C, server[..1].to_vec()),
        (C2S, ch),
        (S2C, server[1..].to_vec()),
        (C2S, flight),
    ];
    let o = classify(meta(5432), &list);
    assert!(o.decided_early);
    assert_eq!(o.verdict.security, Security::Mtls);
    assert_eq!(o.verdict.alpn, vec!["postgresql"]);

    // The SSLRequest alone is not plaintext.
    let o = classify(meta(5432), &list[..1]);
    assert!(!o.decided_early);
    assert_eq!(o.verdict.security, Security::Unknown);
}

#[test]
fn postgres_ssl_refused_then_startup_is_plaintext_postgres() {
    let mut startup = 41u32.to_be_bytes().to_vec();
    startup.extend_from_slice(&196_608u32.to_be_bytes());
    startup.extend_from_slice(b"user\0app\0database\0shop\0\0");
    startup.resize(41, 0);
    let o = classify(
        meta(5432),
        &[
            (C2S, SSL_REQUEST.to_vec()),
            (S2C, b"N".to_vec()),
            (C2S, startup),
        ],
    );
    assert_eq!(o.verdict.security, Security::Plaintext);
    assert_eq!(o.verdict.protocol, Some(Protocol::Postgres));
}

fn mysql_greeting() -> Vec<u8> {
    let mut payload = vec![10];
    payload.extend_from_slice(b"8.0.36\0");
    payload.extend_from_slice(&[1, 0, 0, 0]);
    payload.extend_from_slice(&[0x41; 8]);
    payload.push(0);
    payload.extend_from_slice(&[0xff, 0xff, 0x21, 0x02, 0, 0xff, 0xc1, 0x15]);
    payload.extend_from_slice(&[0; 10]);
    payload.extend_from_slice(&[0x42; 13]);
    payload.extend_from_slice(b"caching_sha2_password\0");
    let len = u32::try_from(payload.len()).unwrap().to_le_bytes();
    let mut out = vec![len[0], len[1], len[2], 0];
    out.extend(payload);
    out
}

#[test]
fn mysql_greeting_then_login_is_plaintext_mysql() {
    let mut login = vec![60, 0, 0, 1];
    login.extend_from_slice(&0x000f_a685u32.to_le_bytes()); // no CLIENT_SSL
    login.resize(64, 0);
    let o = classify(meta(3306), &[(S2C, mysql_greeting()), (C2S, login)]);
    assert!(o.decided_early);
    assert_eq!(o.verdict.security, Security::Plaintext);
    assert_eq!(o.verdict.protocol, Some(Protocol::Mysql));

    // Only the greeting seen: the server's bytes are plaintext MySQL.
    let o = classify(meta(3306), &[(S2C, mysql_greeting())]);
    assert!(!o.decided_early);
    assert_eq!(o.verdict.protocol, Some(Protocol::Mysql));
    assert_eq!(o.verdict.evidence, Evidence::ServerBanner);
}

#[test]
fn mysql_ssl_request_then_tls_is_tls() {
    let mut ssl_request = vec![32, 0, 0, 1];
    ssl_request.extend_from_slice(&0x000f_ae85u32.to_le_bytes()); // CLIENT_SSL set
    ssl_request.resize(36, 0);
    let (ch, sh, flight) = tls_exchange_13(69);
    let mut client = ssl_request;
    client.extend(ch);
    let o = classify(
        meta(3306),
        &[
            (S2C, mysql_greeting()),
            (C2S, client),
            (S2C, sh),
            (C2S, flight),
        ],
    );
    assert!(o.decided_early);
    assert_eq!(o.verdict.security, Security::Tls);
    assert_eq!(o.verdict.tls_version, Some("1.3"));
}

#[test]
fn redis_resp_and_inline_ping() {
    let o = plain(&[(C2S, b"*1\r\n$4\r\nPING\r\n".to_vec())]);
    assert_eq!(o.verdict.protocol, Some(Protocol::Redis));
    let o = plain(&[(C2S, b"PING\r\n".to_vec())]);
    assert_eq!(o.verdict.protocol, Some(Protocol::Redis));
}

#[test]
fn unrecognised_bytes_are_other() {
    let o = plain(&[(C2S, b"\x01\x02hello there, binary protocol".to_vec())]);
    assert!(o.decided_early);
    assert_eq!(o.verdict.security, Security::Plaintext);
    assert_eq!(o.verdict.protocol, Some(Protocol::Other));
    // Redis inline GET is not HTTP.
    let o = plain(&[(C2S, b"GET session:42\r\n".to_vec())]);
    assert_eq!(o.verdict.protocol, Some(Protocol::Other));
}

#[test]
fn short_first_segment_decides_only_when_complete() {
    // 3 bytes captured of a 40-byte segment: not enough to decide before the end.
    let seg = Seg {
        dir: C2S,
        off: 0,
        data: b"XYZ".to_vec(),
        wire_len: 40,
    };
    let o = feed(meta(8080), &[seg], &mut ResumptionCache::new(1));
    assert!(!o.decided_early);
    // At the end, three bytes that cannot start a TLS record are not TLS.
    assert_eq!(o.verdict.security, Security::Plaintext);

    // A complete 3-byte first segment decides at once.
    let o = plain(&[(C2S, b"XYZ".to_vec())]);
    assert!(o.decided_early);
    assert_eq!(o.verdict.protocol, Some(Protocol::Other));
}

#[test]
fn tls_prefix_is_never_plaintext() {
    for prefix in [&[0x16][..], &[0x16, 0x03], &[0x16, 0x03, 0x01]] {
        let o = plain(&[(C2S, prefix.to_vec())]);
        assert_eq!(o.verdict.security, Security::Unknown, "{prefix:?}");
        assert_eq!(o.verdict.evidence, Evidence::HandshakeIncomplete);
    }
}

#[test]
fn server_banner_first_is_plaintext() {
    let o = classify(meta(22), &[(S2C, b"SSH-2.0-OpenSSH_9.6\r\n".to_vec())]);
    assert!(o.decided_early);
    assert_eq!(o.verdict.security, Security::Plaintext);
    assert_eq!(o.verdict.protocol, Some(Protocol::Other));
    assert_eq!(o.verdict.evidence, Evidence::ServerBanner);

    // Unrecognised server-first bytes are not guessed.
    let o = classify(meta(9000), &[(S2C, b"\x00\x07hello".to_vec())]);
    assert_eq!(o.verdict.security, Security::Unknown);
}

#[test]
fn nothing_seen_is_no_data() {
    let o = classify(meta(80), &[]);
    assert_eq!(o.verdict.security, Security::Unknown);
    assert_eq!(o.verdict.evidence, Evidence::NoData);
    // Bytes on the wire but none captured at offset 0: incomplete, not "no data".
    let seg = Seg {
        dir: C2S,
        off: 0,
        data: Vec::new(),
        wire_len: 100,
    };
    let o = feed(meta(80), &[seg], &mut ResumptionCache::new(1));
    assert_eq!(o.verdict.evidence, Evidence::HandshakeIncomplete);
}
