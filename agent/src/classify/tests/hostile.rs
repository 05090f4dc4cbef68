//! Hostile input: never a panic, bounded memory, Unknown/Malformed or a sane verdict.

use super::fixtures::*;
use super::*;

fn malformed(list: &[(Direction, Vec<u8>)]) {
    let o = classify(meta(443), list);
    assert!(
        o.decided_early,
        "decided as soon as it is known to be malformed"
    );
    assert_eq!(o.verdict.security, Security::Unknown);
    assert_eq!(o.verdict.evidence, Evidence::Malformed);
}

#[test]
fn random_bytes_after_a_record_header() {
    let mut rng = Rng::new(3);
    let mut body = rng.bytes(300);
    body[0] = 0x63; // not a ClientHello
    malformed(&[(C2S, record(22, &body))]);

    // A ClientHello header followed by garbage of the declared length.
    let mut body = hs(1, &rng.bytes(200));
    body[4] = 0x7f; // legacy_version nonsense, session id length > 32 somewhere
    body[38] = 200;
    malformed(&[(C2S, record(22, &body))]);
}

#[test]
fn sixteen_mib_handshake_length() {
    // Declares a 16 MiB ClientHello: it can never fit, so it is rejected at once.
    malformed(&[(C2S, record(22, &[1, 0xff, 0xff, 0xff, 3, 3, 0, 0]))]);
}

#[test]
fn oversized_record_length() {
    malformed(&[(C2S, vec![22, 3, 1, 0xff, 0xff, 1, 0, 0, 0])]);
}

#[test]
fn ten_thousand_extensions() {
    // 40 KB of extensions: more than the buffer holds, in records of 16 KB.
    let ch = Ch {
        empty_extensions: 10_000,
        ..Ch::alpn(&["istio"]).tls13()
    };
    let hello = client_hello(&ch);
    malformed(&[(C2S, handshake_records(&hello, 16_384))]);

    // 3,000 extensions still fit: parsed, ALPN found after them.
    let ch = Ch {
        empty_extensions: 3_000,
        ..Ch::alpn(&["istio"]).tls13()
    };
    let hello = client_hello(&ch);
    let mut sh = record(22, &server_hello(&Sh::tls13()));
    sh.extend(ccs());
    let mut flight = ccs();
    flight.extend(app(69));
    let o = classify(
        meta(443),
        &[
            (C2S, handshake_records(&hello, 16_000)),
            (S2C, sh),
            (C2S, flight),
        ],
    );
    assert_eq!(o.verdict.security, Security::Tls);
    assert_eq!(o.verdict.mesh, Mesh::Istio);
}

#[test]
fn handshake_message_interrupted_by_another_record() {
    let hello = client_hello(&Ch::default().tls13());
    let mut data = record(22, &hello[..50]);
    data.extend(app(20));
    malformed(&[(C2S, data)]);
}

#[test]
fn server_garbage_after_client_hello() {
    let ch = record(22, &client_hello(&Ch::default().tls13()));
    let o = classify(
        meta(443),
        &[(C2S, ch.clone()), (S2C, record(22, &[2, 0, 0, 3, 1, 2, 3]))],
    );
    assert_eq!(o.verdict.evidence, Evidence::Malformed);
    let o = classify(meta(443), &[(C2S, ch), (S2C, vec![22, 3, 3, 0, 0])]);
    assert_eq!(o.verdict.evidence, Evidence::Malformed);
}

/// Random streams, random valid-looking prefixes with mutations, random segmentation: no panic,
/// the invariants of `feed` hold.
#[test]
fn fuzz_does_not_panic() {
    let mut rng = Rng::new(0xfeed);
    let ch = record(22, &client_hello(&Ch::alpn(&["h2"]).tls13()));
    let mut sh = record(22, &server_hello(&Sh::tls13()));
    sh.extend(ccs());
    sh.extend(app(100));
    let mut flight = ccs();
    flight.extend(app(465));
    for round in 0..400 {
        let mut client = [ch.clone(), flight.clone()].concat();
        let mut server = sh.clone();
        match round % 4 {
            0 => {
                let (n, m) = (1 + rng.below(3000), rng.below(3000));
                client = rng.bytes(n);
                server = rng.bytes(m);
            }
            1 => {
                client[0] = 22;
                let n = rng.below(client.len());
                client.truncate(n.max(1));
            }
            _ => {
                for _ in 0..1 + rng.below(8) {
                    let i = rng.below(client.len());
                    client[i] = rng.next() as u8;
                    let j = rng.below(server.len());
                    server[j] = rng.next() as u8;
                }
            }
        }
        let list = [(C2S, client), (S2C, server)];
        let size = 1 + rng.below(1500);
        let segs = scramble(&segmented(&list, size), round);
        let mut m = meta(443);
        m.midstream = round % 10 == 0;
        if round % 7 == 0 {
            m.client_isn = None;
        }
        let _ = feed(m, &segs, &mut ResumptionCache::new(4));
    }
}

/// One byte per segment: re-parsing is throttled (bounded work) and the verdict is still right.
#[test]
fn byte_trickle_is_bounded_work() {
    let hello = client_hello(&Ch {
        padding: 12_000,
        ..Ch::alpn(&["istio"]).tls13()
    });
    let mut client = handshake_records(&hello, 16_000);
    client.extend(ccs());
    client.extend(app(465));
    client.extend(app(53));
    let mut server = record(22, &server_hello(&Sh::tls13()));
    server.extend(ccs());
    let segs = segmented(&[(S2C, server), (C2S, client)], 1);
    let mut c = ConnClassifier::new(meta(443));
    let mut cache = ResumptionCache::new(1);
    for s in &segs {
        let isn = if s.dir == C2S { CLIENT_ISN } else { SERVER_ISN };
        let seq = isn.wrapping_add(1).wrapping_add(s.off as u32);
        c.on_segment(s.dir, seq, &s.data, 1, &mut cache);
    }
    // Without the throttle this would be ~13k parses of ~7 KB on average (~90 MB).
    assert!(c.parsed_total < 4 << 20, "parsed {} bytes", c.parsed_total);
    let v = c.finish(&mut cache);
    assert_eq!(v.security, Security::Mtls);
    assert_eq!(v.mesh, Mesh::Istio);
}

#[test]
fn other_tls_record_types_first_are_malformed_not_plaintext() {
    // An alert, application data, ChangeCipherSpec or heartbeat record where the ClientHello
    // should be: TLS-looking junk is never called plaintext.
    for typ in [20u8, 21, 23, 24] {
        malformed(&[(C2S, record(typ, &[2, 40, 0, 0, 0, 0, 0, 0]))]);
    }
    // Plaintext that merely starts with such a byte is still plaintext (no 0x03 version byte).
    let o = classify(meta(80), &[(C2S, b"\x17hello plaintext protocol".to_vec())]);
    assert_eq!(o.verdict.security, Security::Plaintext);
}
