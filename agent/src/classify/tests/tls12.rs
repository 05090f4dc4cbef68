//! TLS <= 1.2 rules: the client's Certificate, an empty one, ClientKeyExchange first, resumption.

use super::fixtures::*;
use super::*;

fn ch12(alpn: &[&str]) -> Vec<u8> {
    record(22, &client_hello(&Ch::alpn(alpn)))
}

/// ServerHello .. ServerHelloDone in one record (several messages in one record).
fn server_flight(request_cert: bool) -> Vec<u8> {
    let mut msgs = server_hello(&Sh {
        session_id: vec![0xaa; 32],
        ..Sh::tls12()
    });
    msgs.extend(certificate(&[b"server-cert-der"]));
    msgs.extend(server_key_exchange());
    if request_cert {
        msgs.extend(certificate_request());
    }
    msgs.extend(server_hello_done());
    record(22, &msgs)
}

fn client_flight(cert: Option<&[&[u8]]>) -> Vec<u8> {
    let mut msgs = Vec::new();
    if let Some(certs) = cert {
        msgs.extend(certificate(certs));
    }
    msgs.extend(client_key_exchange());
    let mut out = record(22, &msgs);
    out.extend(ccs());
    out.extend(encrypted_finished());
    out
}

#[test]
fn client_certificate_is_mtls() {
    let o = classify(
        meta(8443),
        &[
            (C2S, ch12(&["h2", "http/1.1"])),
            (S2C, server_flight(true)),
            (C2S, client_flight(Some(&[b"client-cert", b"intermediate"]))),
        ],
    );
    assert!(o.decided_early);
    let v = o.verdict;
    assert_eq!(v.security, Security::Mtls);
    assert_eq!(v.evidence, Evidence::ClientCertificate);
    assert_eq!(v.tls_version, Some("1.2"));
    assert_eq!(
        v.cipher.as_deref(),
        Some("TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256")
    );
    assert_eq!(v.alpn, vec!["h2", "http/1.1"]);
    assert_eq!(v.mesh, Mesh::None);
    assert!(!v.resumed);
    // Not DER: no SPIFFE IDs, and no panic either (real certificates: real_stacks).
    assert!(v.client_spiffe.is_empty());
}

#[test]
fn empty_client_certificate_is_tls() {
    let o = classify(
        meta(8443),
        &[
            (C2S, ch12(&[])),
            (S2C, server_flight(true)),
            (C2S, client_flight(Some(&[]))),
        ],
    );
    assert_eq!(o.verdict.security, Security::Tls);
    assert_eq!(o.verdict.evidence, Evidence::ClientCertificateEmpty);
}

#[test]
fn key_exchange_first_is_tls() {
    let o = classify(
        meta(8443),
        &[
            (C2S, ch12(&[])),
            (S2C, server_flight(false)),
            (C2S, client_flight(None)),
        ],
    );
    assert!(o.decided_early);
    assert_eq!(o.verdict.security, Security::Tls);
    assert_eq!(o.verdict.evidence, Evidence::NoClientCertificate);
}

#[test]
fn istio_alpn_makes_mesh_istio() {
    let o = classify(
        meta(8443),
        &[
            (C2S, ch12(&["istio-peer-exchange", "istio"])),
            (S2C, server_flight(true)),
            (C2S, client_flight(Some(&[b"c"]))),
        ],
    );
    assert_eq!(o.verdict.security, Security::Mtls);
    assert_eq!(o.verdict.mesh, Mesh::Istio);
}

#[test]
fn unanswered_certificate_request_is_unknown_cert_request() {
    let o = classify(meta(8443), &[(C2S, ch12(&[])), (S2C, server_flight(true))]);
    assert!(!o.decided_early);
    assert_eq!(o.verdict.security, Security::Unknown);
    assert_eq!(o.verdict.evidence, Evidence::CertRequest);
    assert_eq!(o.verdict.tls_version, Some("1.2"));
}

#[test]
fn client_certificate_spanning_records_and_segments() {
    let big_cert = vec![0x30; 3000];
    let mut msgs = certificate(&[&big_cert]);
    msgs.extend(client_key_exchange());
    let mut flight = handshake_records(&msgs, 700);
    flight.extend(ccs());
    let list = [(C2S, ch12(&[])), (S2C, server_flight(true)), (C2S, flight)];
    for size in [1, 7, 500, 1400] {
        let o = feed(
            meta(8443),
            &segmented(&list, size),
            &mut ResumptionCache::new(4),
        );
        assert_eq!(o.verdict.security, Security::Mtls, "segments of {size}");
        // Byte-sized segments may exhaust the parse budget and be decided only at the end.
        assert!(o.decided_early || size < 100, "segments of {size}");
    }
}

/// A full mTLS handshake, then a resumption by session id echo.
#[test]
fn session_id_resumption_inherits_from_the_cache() {
    let mut cache = ResumptionCache::new(16);
    let full = feed(
        meta(8443),
        &flights(&[
            (C2S, ch12(&[])),
            (S2C, server_flight(true)),
            (C2S, client_flight(Some(&[b"c"]))),
        ]),
        &mut cache,
    );
    assert_eq!(full.verdict.security, Security::Mtls);

    let sid = vec![0xaa; 32];
    let resumed_ch = Ch {
        session_id: sid.clone(),
        ..Ch::default()
    };
    let mut server = server_hello(&Sh {
        session_id: sid,
        ..Sh::tls12()
    });
    server = record(22, &server);
    server.extend(ccs());
    server.extend(encrypted_finished());
    let list = [(C2S, record(22, &client_hello(&resumed_ch))), (S2C, server)];
    let mut other_client = meta(8443);
    other_client.client.set_port(40001);
    let o = feed(other_client, &flights(&list), &mut cache);
    assert!(o.decided_early);
    let v = o.verdict;
    assert!(v.resumed);
    assert_eq!(v.security, Security::Mtls);
    assert_eq!(
        v.evidence,
        Evidence::ResumedFrom("198.18.1.20:8443".parse().unwrap())
    );
    assert_eq!(v.evidence.to_string(), "resumed_from=198.18.1.20:8443");
    assert_eq!(v.evidence.kind(), "resumed_from");

    // The same resumption with nothing remembered: unknown, never a guess.
    let o = feed(meta(8443), &flights(&list), &mut ResumptionCache::new(16));
    assert!(o.verdict.resumed);
    assert_eq!(o.verdict.security, Security::Unknown);
    assert_eq!(o.verdict.evidence, Evidence::ResumedUnknown);

    // Another server port is another pair.
    let o = feed(meta(9443), &flights(&list), &mut cache);
    assert_eq!(o.verdict.evidence, Evidence::ResumedUnknown);
}

/// Ticket resumption with an empty session id: ServerHello, NewSessionTicket, ChangeCipherSpec.
#[test]
fn abbreviated_server_flight_is_resumed() {
    let mut cache = ResumptionCache::new(16);
    cache.record(
        CLIENT_ADDR.parse::<SocketAddr>().unwrap().ip(),
        meta(8443).server,
        Security::Tls,
    );
    let mut msgs = server_hello(&Sh::tls12());
    msgs.extend(new_session_ticket());
    let mut server = record(22, &msgs);
    server.extend(ccs());
    server.extend(encrypted_finished());
    let o = feed(
        meta(8443),
        &flights(&[(C2S, ch12(&[])), (S2C, server)]),
        &mut cache,
    );
    assert!(o.verdict.resumed);
    assert_eq!(o.verdict.security, Security::Tls);
}

#[test]
fn resumed_outcomes_are_not_cached_and_full_ones_are() {
    let mut cache = ResumptionCache::new(16);
    let sid = vec![0xaa; 32];
    let ch = record(
        22,
        &client_hello(&Ch {
            session_id: sid.clone(),
            ..Ch::default()
        }),
    );
    let mut server = record(
        22,
        &server_hello(&Sh {
            session_id: sid,
            ..Sh::tls12()
        }),
    );
    server.extend(ccs());
    feed(
        meta(8443),
        &flights(&[(C2S, ch), (S2C, server)]),
        &mut cache,
    );
    assert!(cache.is_empty());
    feed(
        meta(8443),
        &flights(&[
            (C2S, ch12(&[])),
            (S2C, server_flight(false)),
            (C2S, client_flight(None)),
        ]),
        &mut cache,
    );
    assert_eq!(cache.len(), 1);
}

/// Without the server direction, the client's flight alone decides at the end.
#[test]
fn client_only_capture_decides_at_finish() {
    let o = classify(
        meta(8443),
        &[(C2S, ch12(&[])), (C2S, client_flight(Some(&[b"c"])))],
    );
    assert!(!o.decided_early);
    assert_eq!(o.verdict.security, Security::Mtls);
    assert_eq!(o.verdict.tls_version, None);
}

#[test]
fn alert_before_client_flight() {
    let mut server = server_flight(false);
    server.extend(alert());
    let o = classify(
        meta(8443),
        &[(C2S, ch12(&[])), (S2C, server), (C2S, alert())],
    );
    // A fatal alert ends the handshake: final at once.
    assert!(o.decided_early);
    assert_eq!(o.verdict.security, Security::Unknown);
    assert_eq!(o.verdict.evidence, Evidence::HandshakeAlert);

    // A warning alert does not: the flight after it decides.
    let mut flight = record(21, &[1, 90]); // warning user_canceled
    flight.extend(client_flight(None));
    let o = classify(
        meta(8443),
        &[(C2S, ch12(&[])), (S2C, server_flight(false)), (C2S, flight)],
    );
    assert_eq!(o.verdict.evidence, Evidence::NoClientCertificate);
}

#[test]
fn server_answering_plaintext_is_server_not_tls() {
    let o = classify(
        meta(443),
        &[
            (C2S, ch12(&[])),
            (S2C, b"HTTP/1.1 400 Bad Request\r\n\r\n".to_vec()),
        ],
    );
    assert!(o.decided_early);
    assert_eq!(o.verdict.security, Security::Unknown);
    assert_eq!(o.verdict.evidence, Evidence::ServerNotTls);
}

/// The ServerHello echoing the client's session id is enough: no need to see the rest.
#[test]
fn session_id_echo_alone_decides_resumption() {
    let sid = vec![0x5c; 32];
    let ch = Ch {
        session_id: sid.clone(),
        ..Ch::default()
    };
    let sh = Sh {
        session_id: sid,
        ..Sh::tls12()
    };
    let list = [
        (C2S, record(22, &client_hello(&ch))),
        (S2C, record(22, &server_hello(&sh))),
    ];
    let o = classify(meta(8443), &list);
    assert!(o.decided_early);
    assert!(o.verdict.resumed);
    assert_eq!(o.verdict.evidence, Evidence::ResumedUnknown);

    // A different session id from the server: a full handshake, still undecided.
    let sh = Sh {
        session_id: vec![0x77; 32],
        ..Sh::tls12()
    };
    let o = classify(
        meta(8443),
        &[list[0].clone(), (S2C, record(22, &server_hello(&sh)))],
    );
    assert!(!o.decided_early);
    assert!(!o.verdict.resumed);
}
