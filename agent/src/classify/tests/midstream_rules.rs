//! Mid-stream connections: positive evidence only, never plaintext on a guess.

use super::fixtures::*;
use super::*;

fn midstream_meta() -> ConnMeta {
    ConnMeta {
        client_isn: None,
        server_isn: None,
        midstream: true,
        ..meta(8443)
    }
}

fn run(segs: &[Seg]) -> Outcome {
    feed(midstream_meta(), segs, &mut ResumptionCache::new(4))
}

#[test]
fn record_header_at_segment_start_is_tls() {
    // Two back-to-back ApplicationData records in one segment, in the server direction.
    let mut data = app(100);
    data.extend(app(40));
    let o = run(&[Seg::new(S2C, 0, &data)]);
    assert!(o.decided_early);
    assert_eq!(o.verdict.security, Security::Tls);
    assert_eq!(o.verdict.evidence, Evidence::MidstreamRecordHeader);
    assert_eq!(o.verdict.protocol, None);

    // A header whose record continues past the segment.
    let o = run(&[Seg::new(C2S, 0, &app(3000)[..1400])]);
    assert_eq!(o.verdict.security, Security::Tls);
}

#[test]
fn record_header_followed_by_garbage_is_not_tls() {
    let mut data = app(10);
    data.extend_from_slice(b"garbage that is not a record");
    let o = run(&[Seg::new(C2S, 0, &data)]);
    assert!(!o.decided_early);
    assert_eq!(o.verdict.security, Security::Unknown);
    assert_eq!(o.verdict.evidence, Evidence::MidstreamNoBoundary);
}

#[test]
fn http_lines_are_plaintext_http1() {
    let o = run(&[
        Seg::new(C2S, 0, b"\x00\x01 body bytes of something"),
        Seg::new(S2C, 0, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"),
    ]);
    assert!(o.decided_early);
    assert_eq!(o.verdict.security, Security::Plaintext);
    assert_eq!(o.verdict.protocol, Some(Protocol::Http1));
    assert_eq!(o.verdict.evidence, Evidence::MidstreamHttp);

    let o = run(&[Seg::new(
        C2S,
        9000,
        b"GET /api/v1/items?id=3 HTTP/1.1\r\nHost: x\r\n",
    )]);
    assert_eq!(o.verdict.protocol, Some(Protocol::Http1));
}

#[test]
fn anything_else_is_unknown_never_plaintext() {
    let mut rng = Rng::new(42);
    let segs: Vec<Seg> = (0..20)
        .map(|i| {
            let mut data = rng.bytes(600);
            data[0] = b'a'; // not a record type
            Seg::new(if i % 2 == 0 { C2S } else { S2C }, i * 600, &data)
        })
        .collect();
    let o = run(&segs);
    assert_eq!(o.verdict.security, Security::Unknown);
    assert_eq!(o.verdict.evidence, Evidence::MidstreamNoBoundary);
    // Text that is not an HTTP request line either.
    let o = run(&[Seg::new(C2S, 0, b"hello world, this is not HTTP/1.1")]);
    assert_eq!(o.verdict.security, Security::Unknown);

    let o = run(&[]);
    assert_eq!(o.verdict.evidence, Evidence::NoData);
}
