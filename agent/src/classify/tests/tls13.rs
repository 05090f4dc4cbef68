//! TLS 1.3 rules: size of the client's first encrypted record, PSK resumption, HelloRetryRequest,
//! early data, and ClientHellos split over records and segments.

use super::fixtures::*;
use super::*;

fn ch13(alpn: &[&str]) -> Vec<u8> {
    record(22, &client_hello(&Ch::alpn(alpn).tls13()))
}

fn sh13() -> Vec<u8> {
    let mut out = record(22, &server_hello(&Sh::tls13()));
    out.extend(ccs());
    out.extend(app(1200)); // EncryptedExtensions .. Finished
    out
}

/// The client's second flight: compatibility CCS, then its first encrypted record of `len`.
fn flight(first_record: usize) -> Vec<u8> {
    let mut out = ccs();
    out.extend(app(first_record));
    out.extend(app(53)); // Finished after a Certificate
    out
}

#[test]
fn large_first_record_is_mtls() {
    let o = classify(
        meta(15006),
        &[
            (C2S, ch13(&["istio-peer-exchange", "istio"])),
            (S2C, sh13()),
            (C2S, flight(465)),
        ],
    );
    assert!(o.decided_early);
    let v = o.verdict;
    assert_eq!(v.security, Security::Mtls);
    assert_eq!(v.evidence, Evidence::ClientFirstRecordLen(465));
    assert_eq!(v.evidence.to_string(), "client_first_record_len=465");
    assert_eq!(v.evidence.kind(), "client_first_record_len");
    assert_eq!(v.tls_version, Some("1.3"));
    assert_eq!(v.cipher.as_deref(), Some("TLS_AES_128_GCM_SHA256"));
    assert_eq!(v.mesh, Mesh::Istio);
    assert_eq!(v.alpn, vec!["istio-peer-exchange", "istio"]);
}

#[test]
fn finished_sized_first_record_is_tls() {
    for len in [53, 69, 99, 127] {
        let o = classify(
            meta(443),
            &[(C2S, ch13(&["h2"])), (S2C, sh13()), (C2S, flight(len))],
        );
        assert_eq!(o.verdict.security, Security::Tls, "record of {len}");
        assert_eq!(o.verdict.mesh, Mesh::None);
    }
    let o = classify(
        meta(443),
        &[(C2S, ch13(&[])), (S2C, sh13()), (C2S, flight(128))],
    );
    assert_eq!(o.verdict.security, Security::Mtls);
    // The smallest records are encrypted alerts: the client gave up, no flight at all.
    let o = classify(
        meta(443),
        &[(C2S, ch13(&[])), (S2C, sh13()), (C2S, flight(19))],
    );
    assert!(o.decided_early);
    assert_eq!(o.verdict.security, Security::Unknown);
    assert_eq!(o.verdict.evidence, Evidence::HandshakeAlert);
    // An empty Certificate in its own record (25 bytes) is a flight: one-way TLS.
    let o = classify(
        meta(443),
        &[(C2S, ch13(&[])), (S2C, sh13()), (C2S, flight(25))],
    );
    assert_eq!(o.verdict.security, Security::Tls);
}

#[test]
fn hbone_port_mtls_is_istio_but_tls_is_not() {
    let o = classify(
        meta(15008),
        &[(C2S, ch13(&["h2"])), (S2C, sh13()), (C2S, flight(700))],
    );
    assert_eq!(o.verdict.mesh, Mesh::Istio);
    let o = classify(
        meta(15008),
        &[(C2S, ch13(&["h2"])), (S2C, sh13()), (C2S, flight(69))],
    );
    assert_eq!(o.verdict.mesh, Mesh::None);
}

#[test]
fn psk_resumption_inherits() {
    let mut cache = ResumptionCache::new(8);
    let full = feed(
        meta(443),
        &flights(&[(C2S, ch13(&[])), (S2C, sh13()), (C2S, flight(465))]),
        &mut cache,
    );
    assert_eq!(full.verdict.security, Security::Mtls);

    let ch = Ch {
        psk: true,
        ..Ch::default().tls13()
    };
    let mut server = record(
        22,
        &server_hello(&Sh {
            psk: true,
            ..Sh::tls13()
        }),
    );
    server.extend(app(300));
    // The resumed client's first record is a bare Finished: size must not matter.
    let list = [
        (C2S, record(22, &client_hello(&ch))),
        (S2C, server),
        (C2S, flight(53)),
    ];
    let o = feed(meta(443), &flights(&list), &mut cache);
    assert!(o.verdict.resumed);
    assert_eq!(o.verdict.security, Security::Mtls);
    assert!(matches!(o.verdict.evidence, Evidence::ResumedFrom(_)));

    let o = feed(meta(443), &flights(&list), &mut ResumptionCache::new(8));
    assert_eq!(o.verdict.security, Security::Unknown);
    assert_eq!(o.verdict.evidence, Evidence::ResumedUnknown);
}

#[test]
fn hello_retry_request_uses_the_record_after_the_second_client_hello() {
    let hrr = Sh {
        hrr: true,
        ..Sh::tls13()
    };
    let mut server1 = record(22, &server_hello(&hrr));
    server1.extend(ccs());
    // The first ClientHello offered 0-RTT and sent 300 bytes of it: the HelloRetryRequest
    // rejects them, so they are not the client's flight even though no timing says so.
    let ch1 = Ch {
        early_data: true,
        psk: true,
        ..Ch::alpn(&["istio"]).tls13()
    };
    let mut client1 = record(22, &client_hello(&ch1));
    client1.extend(app(300));
    let mut client2 = ccs();
    client2.extend(ch13(&["istio"]));
    for (flight_len, security) in [(600, Security::Mtls), (69, Security::Tls)] {
        let list = [
            (C2S, client1.clone()),
            (S2C, server1.clone()),
            (C2S, client2.clone()),
            (S2C, sh13()),
            (C2S, [app(flight_len), app(53)].concat()),
        ];
        // Scrambled too: after a HelloRetryRequest the answer does not depend on arrival order.
        let mut all = vec![flights(&list)];
        all.extend((1..6).map(|seed| scramble(&segmented(&list, 200), seed)));
        for segs in all {
            let o = feed(meta(443), &segs, &mut ResumptionCache::new(4));
            assert!(o.decided_early);
            assert_eq!(o.verdict.security, security);
            assert_eq!(
                o.verdict.evidence,
                Evidence::ClientFirstRecordLen(flight_len as u16)
            );
        }
        // Not decided on the HelloRetryRequest alone.
        let o = classify(meta(443), &list[..3]);
        assert!(!o.decided_early);
        assert_eq!(o.verdict.security, Security::Unknown);
    }
}

/// 0-RTT records sent with the ClientHello, before the ServerHello arrived, are not the flight.
#[test]
fn early_data_before_server_hello_is_skipped() {
    let ch = Ch {
        early_data: true,
        psk: true,
        ..Ch::default().tls13()
    };
    let mut first = record(22, &client_hello(&ch));
    first.extend(app(300)); // early data, bigger than any Finished
    let list = [
        (C2S, first.clone()),
        (S2C, sh13()), // no pre_shared_key: full handshake, early data rejected
        (C2S, flight(69)),
    ];
    for segs in [flights(&list), segmented(&list, 100)] {
        let o = feed(meta(443), &segs, &mut ResumptionCache::new(4));
        assert_eq!(o.verdict.security, Security::Tls);
        assert_eq!(o.verdict.evidence, Evidence::ClientFirstRecordLen(69));
    }

    // Without early_data offered, the same first record is the client's flight.
    let ch = Ch {
        early_data: false,
        ..ch
    };
    let mut first = record(22, &client_hello(&ch));
    first.extend(app(300));
    let o = classify(meta(443), &[(C2S, first), (S2C, sh13()), (C2S, flight(69))]);
    assert_eq!(o.verdict.evidence, Evidence::ClientFirstRecordLen(300));
}

/// A 2 KB ClientHello with ALPN and SNI past the first kilobyte, split over three records and
/// over segments of every size, in and out of order.
#[test]
fn big_client_hello_spanning_records_and_segments() {
    let ch = Ch {
        alpn: vec!["istio-http/1.1".into(), "istio".into()],
        sni: Some("outbound_.8080_._.web.shop.svc.cluster.local".into()),
        padding: 1300,
        ..Ch::default().tls13()
    };
    let hello = client_hello(&ch);
    assert!(hello.len() > 1400);
    let list = [
        (C2S, handshake_records(&hello, 700)),
        (S2C, sh13()),
        (C2S, flight(465)),
    ];
    let mut all = vec![flights(&list)];
    for size in [1, 100, 500, 1400] {
        all.push(segmented(&list, size));
    }
    for seed in 1..20 {
        all.push(scramble(&segmented(&list, 500), seed));
    }
    for segs in all {
        let tiny = segs.iter().all(|s| s.data.len() <= 1);
        let o = feed(meta(443), &segs, &mut ResumptionCache::new(4));
        let v = o.verdict;
        // Byte-sized segments may exhaust the parse budget and be decided only at the end.
        assert!(o.decided_early || tiny);
        assert_eq!(v.security, Security::Mtls);
        assert_eq!(v.mesh, Mesh::Istio);
        assert_eq!(v.alpn, vec!["istio-http/1.1", "istio"]);
        assert_eq!(
            v.sni.as_deref(),
            Some("outbound_.8080_._.web.shop.svc.cluster.local")
        );
    }
}

#[test]
fn no_server_direction_uses_the_client_flight_at_finish() {
    let o = classify(meta(443), &[(C2S, ch13(&[])), (C2S, flight(465))]);
    assert!(!o.decided_early);
    assert_eq!(o.verdict.security, Security::Mtls);
    assert_eq!(o.verdict.tls_version, None);

    // Offering a PSK, the client's first record could be a resumed Finished: unknown.
    let ch = Ch {
        psk: true,
        ..Ch::default().tls13()
    };
    let o = classify(
        meta(443),
        &[(C2S, record(22, &client_hello(&ch))), (C2S, flight(53))],
    );
    assert_eq!(o.verdict.security, Security::Unknown);
}

#[test]
fn handshake_incomplete_at_finish() {
    let o = classify(meta(443), &[(C2S, ch13(&["h2"])), (S2C, sh13())]);
    assert!(!o.decided_early);
    assert_eq!(o.verdict.security, Security::Unknown);
    assert_eq!(o.verdict.evidence, Evidence::HandshakeIncomplete);
    // What was seen is kept.
    assert_eq!(o.verdict.alpn, vec!["h2"]);
    assert_eq!(o.verdict.tls_version, Some("1.3"));

    let hello = ch13(&[]);
    let o = classify(meta(443), &[(C2S, hello[..40].to_vec())]);
    assert_eq!(o.verdict.evidence, Evidence::HandshakeIncomplete);
}

/// The records a client padding to `block` sends for inner plaintexts (content plus type byte) of
/// `contents` bytes, as OpenSSL's `-record_padding` does.
fn padded(block: usize, contents: &[usize]) -> Vec<u8> {
    let mut out = ccs();
    for &c in contents {
        out.extend(app(c.div_ceil(block) * block + 16));
    }
    out
}

/// Inner plaintexts of an OpenSSL TLS 1.3 client's flight and first request: Certificate (with the
/// test PKI's chain), CertificateVerify (RSA-2048), Finished (SHA-256), an HTTP GET.
const CERT: usize = 801;
const CERT_VERIFY: usize = 265;
const FINISHED: usize = 37;
const EMPTY_CERT: usize = 9;
const GET: usize = 80;

fn padded_verdict(records: Vec<u8>) -> Outcome {
    classify(
        meta(443),
        &[(C2S, ch13(&["h2"])), (S2C, sh13()), (C2S, records)],
    )
}

#[test]
fn padded_finished_is_unknown_not_mtls() {
    for block in [128, 200, 256, 512, 1024, 4096] {
        // Not requested: Finished then the request; requested, none: empty Certificate first.
        for flight in [vec![FINISHED, GET], vec![EMPTY_CERT, FINISHED, GET]] {
            let o = padded_verdict(padded(block, &flight));
            assert!(o.decided_early, "block {block}");
            assert_eq!(o.verdict.security, Security::Unknown, "block {block}");
            assert_eq!(
                o.verdict.evidence.kind(),
                "client_records_padded",
                "block {block}"
            );
            assert_eq!(o.verdict.tls_version, Some("1.3"));
        }
    }
    let o = padded_verdict(padded(512, &[FINISHED, GET]));
    assert_eq!(
        o.verdict.evidence.to_string(),
        "client_records_padded=528,528"
    );
}

#[test]
fn padding_too_small_to_matter_keeps_the_verdict() {
    // Blocks up to 111 leave a padded Finished under 128: one-way TLS from the first record.
    for block in [16, 32, 64, 100, 111] {
        let o = padded_verdict(padded(block, &[FINISHED, GET]));
        assert!(o.decided_early);
        assert_eq!(o.verdict.security, Security::Tls, "block {block}");
    }
}

#[test]
fn padded_certificate_is_mtls_or_unknown_never_tls() {
    for block in [16, 64, 128, 256, 512] {
        let o = padded_verdict(padded(block, &[CERT, CERT_VERIFY, FINISHED]));
        assert_eq!(o.verdict.security, Security::Mtls, "block {block}");
        assert_eq!(o.verdict.evidence.kind(), "client_first_record_len");
    }
    // A block as large as the certificate: the sizes cannot tell it from a padded Finished.
    for block in [1024, 4096] {
        let o = padded_verdict(padded(block, &[CERT, CERT_VERIFY, FINISHED]));
        assert_eq!(o.verdict.security, Security::Unknown, "block {block}");
        assert_eq!(o.verdict.evidence.kind(), "client_records_padded");
    }
}

/// Every block size and every content a certificate-less first record can have (an empty
/// Certificate with a SHA-384 Finished at most): if the padded record reaches 128, whatever
/// padded record follows, the rule says padding, never a certificate.
#[test]
fn no_block_size_makes_a_padded_finished_a_certificate() {
    use crate::classify::tls::{CERTIFICATE_RECORD_MIN, first_record_may_be_padding};
    for block in 1..=4096usize {
        for content in 1..=61usize {
            let first = content.div_ceil(block) * block + 16;
            if first < CERTIFICATE_RECORD_MIN {
                continue;
            }
            for blocks in 1..=8 {
                assert!(
                    first_record_may_be_padding(first, blocks * block + 16),
                    "block {block} content {content} second {blocks} blocks"
                );
            }
        }
    }
}

#[test]
fn unpadded_stacks_keep_the_first_record_verdict() {
    // OpenSSL-style separate records, and a stack packing its flight into one record followed
    // by application data of any size.
    for (first, second) in [(465, 281), (465, 53), (853, 69), (1034, 97), (2100, 40)] {
        let mut records = ccs();
        records.extend(app(first));
        records.extend(app(second));
        let o = padded_verdict(records);
        assert!(o.decided_early);
        assert_eq!(o.verdict.security, Security::Mtls, "{first},{second}");
        assert_eq!(
            o.verdict.evidence,
            Evidence::ClientFirstRecordLen(u16::try_from(first).unwrap())
        );
    }
}

#[test]
fn one_large_record_then_the_end_is_unknown() {
    let mut records = ccs();
    records.extend(app(528));
    let o = padded_verdict(records);
    assert!(!o.decided_early);
    assert_eq!(o.verdict.security, Security::Unknown);
    assert_eq!(
        o.verdict.evidence.to_string(),
        "client_first_record_alone=528"
    );
    // Only the second record's header is needed: its body may be cut off.
    let mut records = ccs();
    records.extend(app(528));
    records.extend(&app(528)[..5]);
    let o = padded_verdict(records);
    assert!(o.decided_early);
    assert_eq!(o.verdict.evidence.kind(), "client_records_padded");
}

#[test]
fn padded_flight_without_server_direction_is_unknown() {
    let o = classify(
        meta(443),
        &[(C2S, ch13(&[])), (C2S, padded(512, &[FINISHED, GET]))],
    );
    assert!(!o.decided_early);
    assert_eq!(o.verdict.security, Security::Unknown);
    assert_eq!(o.verdict.evidence.kind(), "client_records_padded");
}
