//! The public API's fixed strings and the resumption cache's bounds.

use std::net::{IpAddr, SocketAddr};

use super::*;

#[test]
fn labels() {
    let names: Vec<&str> = Security::ALL.iter().map(|s| s.as_str()).collect();
    assert_eq!(names, ["mtls", "tls", "plaintext", "unknown"]);
    assert_eq!(Mesh::Istio.as_str(), "istio");
    assert_eq!(Mesh::None.as_str(), "none");
    let protos = [
        Protocol::Http1,
        Protocol::H2c,
        Protocol::Postgres,
        Protocol::Mysql,
        Protocol::Redis,
        Protocol::Other,
    ];
    let names: Vec<&str> = protos.iter().map(|p| p.as_str()).collect();
    assert_eq!(
        names,
        ["http1", "h2c", "postgres", "mysql", "redis", "other"]
    );
}

#[test]
fn evidence_kinds_are_bounded_snake_case() {
    let all = [
        Evidence::CertRequest,
        Evidence::ClientCertificate,
        Evidence::ClientCertificateEmpty,
        Evidence::NoClientCertificate,
        Evidence::ClientFirstRecordLen(465),
        Evidence::ResumedFrom("1.2.3.4:443".parse().unwrap()),
        Evidence::ResumedUnknown,
        Evidence::PlaintextFirstBytes,
        Evidence::ServerBanner,
        Evidence::MidstreamRecordHeader,
        Evidence::MidstreamHttp,
        Evidence::MidstreamNoBoundary,
        Evidence::NoData,
        Evidence::HandshakeIncomplete,
        Evidence::HandshakeAlert,
        Evidence::ServerNotTls,
        Evidence::Malformed,
        Evidence::ClientRecordsPadded(528, 528),
        Evidence::ClientFirstRecordAlone(465),
    ];
    for e in &all {
        let k = e.kind();
        assert!(k.chars().all(|c| c.is_ascii_lowercase() || c == '_'), "{k}");
        assert!(e.to_string().starts_with(k));
    }
    assert_eq!(all[4].to_string(), "client_first_record_len=465");
    assert_eq!(all[5].to_string(), "resumed_from=1.2.3.4:443");
    assert_eq!(all[5].kind(), "resumed_from");
    assert_eq!(Evidence::NoData.to_string(), "no_data");
    assert_eq!(all[17].to_string(), "client_records_padded=528,528");
    assert_eq!(all[18].to_string(), "client_first_record_alone=465");
}

fn ip(i: u8) -> IpAddr {
    IpAddr::from([198, 18, 0, i])
}

#[test]
fn resumption_cache_is_lru_bounded() {
    let server: SocketAddr = "198.18.1.20:443".parse().unwrap();
    let mut cache = ResumptionCache::new(3);
    for i in 0..3 {
        cache.record(ip(i), server, Security::Mtls);
    }
    // Touch 0, so 1 is the least recently used when 3 arrives.
    assert!(cache.lookup(ip(0), server).is_some());
    cache.record(ip(3), server, Security::Tls);
    assert_eq!(cache.len(), 3);
    assert!(cache.lookup(ip(1), server).is_none());
    assert_eq!(cache.lookup(ip(0), server), Some((Security::Mtls, server)));
    assert_eq!(cache.lookup(ip(3), server), Some((Security::Tls, server)));
    // Updating a pair replaces its outcome without growing.
    cache.record(ip(3), server, Security::Mtls);
    assert_eq!(cache.len(), 3);
    assert_eq!(cache.lookup(ip(3), server), Some((Security::Mtls, server)));
    // Only TLS outcomes are remembered; capacity 0 remembers nothing.
    cache.record(ip(9), server, Security::Plaintext);
    assert!(cache.lookup(ip(9), server).is_none());
    let mut none = ResumptionCache::new(0);
    none.record(ip(1), server, Security::Mtls);
    assert!(none.is_empty());
    for i in 0..=255 {
        cache.record(ip(i), server, Security::Tls);
    }
    assert_eq!(cache.len(), 3);
}

#[test]
fn buffers_are_released_after_the_verdict() {
    let mut c = ConnClassifier::new(meta(80));
    let mut cache = ResumptionCache::new(1);
    let seq = CLIENT_ISN.wrapping_add(1);
    assert!(c.on_segment(C2S, seq, b"GET / HTTP/1.1\r\n\r\n", 18, &mut cache));
    assert_eq!(c.client.contiguous_len(), 0);
    assert!(!c.on_segment(C2S, seq, b"GET / HTTP/1.1\r\n\r\n", 18, &mut cache));
    assert_eq!(c.meta().server.port(), 80);
    assert_eq!(c.verdict().map(|v| v.security), Some(Security::Plaintext));
}
