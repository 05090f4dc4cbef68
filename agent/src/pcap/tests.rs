//! `classify --pcap` reading: capture files written here byte by byte (pcap and pcapng, every
//! supported link type, IPv4 and IPv6), with handshakes from the classifier's fixtures.

use std::net::{IpAddr, SocketAddr};

use etherparse::PacketBuilder;

use super::*;
use crate::classify::tests::fixtures::*;
use crate::classify::{Protocol, Security};

const CLIENT4: &str = "198.18.0.20:40001";
const SERVER4: &str = "198.18.0.10:8443";
const CLIENT6: &str = "[2001:db8::20]:40002";
const SERVER6: &str = "[2001:db8::10]:8443";

/// One TCP packet of a test conversation.
#[derive(Clone)]
struct Pkt {
    from_client: bool,
    syn: bool,
    ack: bool,
    fin: bool,
    rst: bool,
    seq: u32,
    payload: Vec<u8>,
    /// Interface id (pcapng) the packet was captured on.
    iface: u32,
}

/// A conversation: builds packets with running sequence numbers.
struct Conv {
    client: SocketAddr,
    server: SocketAddr,
    cseq: u32,
    sseq: u32,
    pkts: Vec<Pkt>,
}

impl Conv {
    fn new(client: &str, server: &str, cisn: u32, sisn: u32) -> Conv {
        Conv {
            client: client.parse().unwrap(),
            server: server.parse().unwrap(),
            cseq: cisn,
            sseq: sisn,
            pkts: Vec::new(),
        }
    }

    fn pkt(&self, from_client: bool, seq: u32, payload: &[u8]) -> Pkt {
        Pkt {
            from_client,
            syn: false,
            ack: true,
            fin: false,
            rst: false,
            seq,
            payload: payload.to_vec(),
            iface: 0,
        }
    }

    fn handshake(mut self) -> Conv {
        let mut syn = self.pkt(true, self.cseq, &[]);
        syn.syn = true;
        syn.ack = false;
        let mut synack = self.pkt(false, self.sseq, &[]);
        synack.syn = true;
        self.pkts.push(syn);
        self.pkts.push(synack);
        self.cseq = self.cseq.wrapping_add(1);
        self.sseq = self.sseq.wrapping_add(1);
        self
    }

    /// A flight cut into segments of at most `mss` bytes.
    fn send(mut self, from_client: bool, data: &[u8], mss: usize) -> Conv {
        for piece in data.chunks(mss) {
            let seq = if from_client { self.cseq } else { self.sseq };
            self.pkts.push(self.pkt(from_client, seq, piece));
            let n = u32::try_from(piece.len()).unwrap();
            if from_client {
                self.cseq = self.cseq.wrapping_add(n);
            } else {
                self.sseq = self.sseq.wrapping_add(n);
            }
        }
        self
    }

    fn close(mut self) -> Conv {
        for from_client in [true, false] {
            let seq = if from_client { self.cseq } else { self.sseq };
            let mut p = self.pkt(from_client, seq, &[]);
            p.fin = true;
            self.pkts.push(p);
        }
        self
    }

    /// The IP packets (no link header).
    fn ip_packets(&self) -> Vec<(u32, Vec<u8>)> {
        self.pkts.iter().map(|p| (p.iface, self.ip(p))).collect()
    }

    fn ip(&self, p: &Pkt) -> Vec<u8> {
        let (src, dst) = if p.from_client {
            (self.client, self.server)
        } else {
            (self.server, self.client)
        };
        let builder = match (src.ip(), dst.ip()) {
            (IpAddr::V4(s), IpAddr::V4(d)) => PacketBuilder::ipv4(s.octets(), d.octets(), 64),
            (IpAddr::V6(s), IpAddr::V6(d)) => PacketBuilder::ipv6(s.octets(), d.octets(), 64),
            _ => unreachable!(),
        };
        let mut b = builder.tcp(src.port(), dst.port(), p.seq, 65535);
        if p.syn {
            b = b.syn();
        }
        if p.ack {
            b = b.ack(1);
        }
        if p.fin {
            b = b.fin();
        }
        if p.rst {
            b = b.rst();
        }
        let mut out = Vec::new();
        b.write(&mut out, &p.payload).unwrap();
        out
    }
}

fn ethernet(ip: &[u8]) -> Vec<u8> {
    let mut f = vec![2, 0, 0, 0, 0, 1, 2, 0, 0, 0, 0, 2];
    f.extend_from_slice(if ip[0] >> 4 == 6 {
        &[0x86, 0xdd]
    } else {
        &[0x08, 0x00]
    });
    f.extend_from_slice(ip);
    f
}

fn sll(ip: &[u8]) -> Vec<u8> {
    let mut f = vec![0, 0, 0, 1, 0, 6, 2, 0, 0, 0, 0, 1, 0, 0];
    f.extend_from_slice(if ip[0] >> 4 == 6 {
        &[0x86, 0xdd]
    } else {
        &[0x08, 0x00]
    });
    f.extend_from_slice(ip);
    f
}

fn sll2(ip: &[u8]) -> Vec<u8> {
    let mut f = if ip[0] >> 4 == 6 {
        vec![0x86, 0xdd]
    } else {
        vec![0x08, 0x00]
    };
    f.extend_from_slice(&[0, 0, 0, 0, 0, 3, 0, 1, 0, 6, 2, 0, 0, 0, 0, 1, 0, 0]);
    f.extend_from_slice(ip);
    f
}

/// A classic pcap file (little-endian, microseconds).
fn pcap(link: u32, snaplen: u32, frames: &[(u32, Vec<u8>)]) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&0xa1b2_c3d4u32.to_le_bytes());
    out.extend_from_slice(&2u16.to_le_bytes());
    out.extend_from_slice(&4u16.to_le_bytes());
    out.extend_from_slice(&[0; 8]);
    out.extend_from_slice(&snaplen.to_le_bytes());
    out.extend_from_slice(&link.to_le_bytes());
    for (i, (orig, f)) in frames.iter().enumerate() {
        let cap = f.len().min(snaplen as usize);
        out.extend_from_slice(&1_700_000_000u32.to_le_bytes());
        out.extend_from_slice(&(u32::try_from(i).unwrap() * 1000).to_le_bytes());
        out.extend_from_slice(&u32::try_from(cap).unwrap().to_le_bytes());
        out.extend_from_slice(&(*orig).max(u32::try_from(f.len()).unwrap()).to_le_bytes());
        out.extend_from_slice(&f[..cap]);
    }
    out
}

fn block(typ: u32, body: &[u8]) -> Vec<u8> {
    let pad = (4 - body.len() % 4) % 4;
    let len = u32::try_from(12 + body.len() + pad).unwrap();
    let mut out = typ.to_le_bytes().to_vec();
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(body);
    out.extend(std::iter::repeat_n(0, pad));
    out.extend_from_slice(&len.to_le_bytes());
    out
}

/// A pcapng file (little-endian) with one interface per entry of `links`.
fn pcapng(links: &[u32], frames: &[(u32, Vec<u8>)]) -> Vec<u8> {
    let mut shb = 0x1a2b_3c4du32.to_le_bytes().to_vec();
    shb.extend_from_slice(&1u16.to_le_bytes());
    shb.extend_from_slice(&0u16.to_le_bytes());
    shb.extend_from_slice(&u64::MAX.to_le_bytes());
    let mut out = block(0x0a0d_0d0a, &shb);
    for &link in links {
        let mut idb = u16::try_from(link).unwrap().to_le_bytes().to_vec();
        idb.extend_from_slice(&[0, 0]);
        idb.extend_from_slice(&262_144u32.to_le_bytes());
        out.extend(block(1, &idb));
    }
    for (i, (iface, f)) in frames.iter().enumerate() {
        let ts = 1_700_000_000_000_000u64 + u64::try_from(i).unwrap() * 1000;
        let mut epb = iface.to_le_bytes().to_vec();
        epb.extend_from_slice(&u32::try_from(ts >> 32).unwrap().to_le_bytes());
        epb.extend_from_slice(&u32::try_from(ts & 0xffff_ffff).unwrap().to_le_bytes());
        let len = u32::try_from(f.len()).unwrap().to_le_bytes();
        epb.extend_from_slice(&len);
        epb.extend_from_slice(&len);
        epb.extend_from_slice(f);
        epb.extend(std::iter::repeat_n(0, (4 - f.len() % 4) % 4));
        out.extend(block(6, &epb));
    }
    out
}

fn run(bytes: &[u8]) -> Result<Summary, PcapError> {
    classify_pcap(bytes, &mut |_| {})
}

/// A TLS 1.3 mTLS exchange with an Istio ALPN and SNI: (client flight 1, server flight,
/// client flight 2).
fn tls13_mtls() -> [Vec<u8>; 3] {
    let ch = Ch {
        sni: Some("api.shop".into()),
        ..Ch::alpn(&["istio-peer-exchange", "istio"]).tls13()
    };
    let hello = record(22, &client_hello(&ch));
    let mut server = record(22, &server_hello(&Sh::tls13()));
    server.extend(ccs());
    server.extend(app(1500));
    let mut second = ccs();
    second.extend(app(465));
    second.extend(app(53)); // Finished
    [hello, server, second]
}

fn tls13_conv(client: &str, server: &str, mss: usize) -> Conv {
    let [a, b, c] = tls13_mtls();
    Conv::new(client, server, 0xffff_fff0, 7)
        .handshake()
        .send(true, &a, mss)
        .send(false, &b, mss)
        .send(true, &c, mss)
        .send(true, &app(40), mss)
        .close()
}

fn assert_mtls(s: &Summary, client: &str, server: &str) {
    assert_eq!(s.connections.len(), 1, "{:?}", s.connections);
    let r = &s.connections[0];
    assert_eq!(r.client, client.parse::<SocketAddr>().unwrap());
    assert_eq!(r.server, server.parse::<SocketAddr>().unwrap());
    assert_eq!(r.security, Security::Mtls, "{r:?}");
    assert_eq!(r.mesh, crate::classify::Mesh::Istio);
    assert_eq!(r.tls_version, Some("1.3"));
    assert_eq!(r.alpn, ["istio-peer-exchange", "istio"]);
    assert_eq!(r.sni.as_deref(), Some("api.shop"));
    assert_eq!(r.evidence, "client_first_record_len=465");
    assert!(!r.midstream);
}

#[test]
fn every_link_type_and_both_formats() {
    for (client, server) in [(CLIENT4, SERVER4), (CLIENT6, SERVER6)] {
        let conv = tls13_conv(client, server, 1448);
        let ip = conv.ip_packets();
        let with = |f: fn(&[u8]) -> Vec<u8>| -> Vec<(u32, Vec<u8>)> {
            ip.iter().map(|(_, p)| (0, f(p))).collect()
        };
        let raw: Vec<(u32, Vec<u8>)> = ip.iter().map(|(_, p)| (0, p.clone())).collect();
        for (link, frames) in [
            (LINK_ETHERNET, with(ethernet)),
            (LINK_LINUX_SLL, with(sll)),
            (LINK_LINUX_SLL2, with(sll2)),
            (LINK_RAW, raw.clone()),
        ] {
            let s = run(&pcap(link, 262_144, &frames)).unwrap();
            assert_mtls(&s, client, server);
            assert!(s.truncated.is_none());
            let ifaced: Vec<(u32, Vec<u8>)> = frames.iter().map(|(_, f)| (0, f.clone())).collect();
            let s = run(&pcapng(&[link], &ifaced)).unwrap();
            assert_mtls(&s, client, server);
        }
    }
}

#[test]
fn split_hello_duplicates_on_two_interfaces_and_disorder() {
    // A 2 KB ClientHello (ALPN past the first KB) in 536-byte segments, every segment captured
    // on two interfaces, one segment retransmitted, two swapped.
    let ch = Ch {
        padding: 1900,
        sni: Some("api.shop".into()),
        ..Ch::alpn(&["istio-peer-exchange", "istio"]).tls13()
    };
    let hello = record(22, &client_hello(&ch));
    assert!(hello.len() > 1900);
    let [_, server, second] = tls13_mtls();
    let conv = Conv::new(CLIENT4, SERVER4, 1000, 2000)
        .handshake()
        .send(true, &hello, 536)
        .send(false, &server, 536)
        .send(true, &second, 536)
        .close();
    let mut pkts = conv.pkts.clone();
    pkts.swap(3, 4); // hello segments 2 and 3 out of order
    let retrans = pkts[2].clone();
    pkts.insert(6, retrans);
    let mut twice = Vec::new();
    for p in pkts {
        let mut q = p.clone();
        q.iface = 1;
        twice.push(p);
        twice.push(q);
    }
    let frames: Vec<(u32, Vec<u8>)> = twice
        .iter()
        .map(|p| (p.iface, ethernet(&conv.ip(p))))
        .collect();
    let s = run(&pcapng(&[LINK_ETHERNET, LINK_ETHERNET], &frames)).unwrap();
    assert_mtls(&s, CLIENT4, SERVER4);
}

#[test]
fn plaintext_midstream_reuse_and_refused() {
    let http = Conv::new("198.18.0.30:40010", "198.18.0.20:8080", 5, 9)
        .handshake()
        .send(true, b"GET / HTTP/1.1\r\nHost: web\r\n\r\n", 1448)
        .send(false, b"HTTP/1.1 200 OK\r\n\r\n", 1448)
        .close();
    // The same 4-tuple again with a new ISN: a second connection, h2c this time.
    let h2c = Conv::new("198.18.0.30:40010", "198.18.0.20:8080", 77_777, 9)
        .handshake()
        .send(
            true,
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0",
            1448,
        )
        .close();
    // Picked up mid-stream: TLS application records, no SYN.
    let mid = Conv::new("198.18.0.30:40011", "198.18.0.10:8443", 100, 200)
        .send(true, &app(300), 1448)
        .send(false, &app(300), 1448);
    // A SYN answered by RST: not a connection.
    let mut refused = Conv::new("198.18.0.30:40012", "198.18.0.10:9999", 1, 1).handshake();
    refused.pkts[1].syn = false;
    refused.pkts[1].rst = true;
    let mut frames = Vec::new();
    for c in [&http, &h2c, &mid, &refused] {
        frames.extend(c.ip_packets().into_iter().map(|(_, p)| (0, ethernet(&p))));
    }
    let s = run(&pcap(LINK_ETHERNET, 65535, &frames)).unwrap();
    assert_eq!(s.refused, 1);
    let got: Vec<(Security, Option<Protocol>, bool, &str)> = s
        .connections
        .iter()
        .map(|r| (r.security, r.protocol, r.midstream, r.evidence_kind))
        .collect();
    assert_eq!(
        got,
        [
            (
                Security::Plaintext,
                Some(Protocol::Http1),
                false,
                "plaintext_first_bytes"
            ),
            (
                Security::Plaintext,
                Some(Protocol::H2c),
                false,
                "plaintext_first_bytes"
            ),
            (Security::Tls, None, true, "midstream_record_header"),
        ],
        "{:#?}",
        s.connections
    );
    assert_eq!(
        s.connections[2].client,
        "198.18.0.30:40011".parse::<SocketAddr>().unwrap()
    );
}

#[test]
fn snap_length_cuts_are_gaps_not_data() {
    // Snap length 200: the ClientHello is cut, so the verdict cannot be reached.
    let frames: Vec<(u32, Vec<u8>)> = tls13_conv(CLIENT4, SERVER4, 1448)
        .ip_packets()
        .into_iter()
        .map(|(_, p)| {
            let f = ethernet(&p);
            (u32::try_from(f.len()).unwrap(), f)
        })
        .collect();
    let s = run(&pcap(LINK_ETHERNET, 200, &frames)).unwrap();
    assert_eq!(s.connections.len(), 1);
    assert_eq!(s.connections[0].security, Security::Unknown);
    assert_eq!(s.connections[0].evidence_kind, "handshake_incomplete");
}

#[test]
fn truncated_file_reports_what_was_read() {
    let a = tls13_conv(CLIENT4, SERVER4, 1448);
    let b = tls13_conv("198.18.0.21:40003", SERVER4, 1448);
    let mut frames: Vec<(u32, Vec<u8>)> = a
        .ip_packets()
        .into_iter()
        .map(|(_, p)| (0, ethernet(&p)))
        .collect();
    frames.extend(b.ip_packets().into_iter().map(|(_, p)| (0, ethernet(&p))));
    for file in [
        pcap(LINK_ETHERNET, 262_144, &frames),
        pcapng(&[LINK_ETHERNET], &frames),
    ] {
        let cut = &file[..file.len() - 30];
        let s = run(cut).unwrap();
        assert!(s.truncated.is_some());
        assert_eq!(s.connections.len(), 2);
        assert_eq!(s.connections[0].security, Security::Mtls);
        assert_eq!(s.connections[1].security, Security::Mtls);
    }
}

#[test]
fn unsupported_and_corrupt_files_are_errors() {
    let unsupported = |bytes: &[u8], what: &str| match run(bytes) {
        Err(PcapError::Unsupported(m)) => assert!(m.contains(what), "{m}"),
        other => panic!("{other:?}"),
    };
    unsupported(b"", "empty");
    unsupported(b"ab", "too short");
    unsupported(b"GET / HTTP/1.1\r\n", "not a pcap");
    // IEEE 802.11 radiotap.
    unsupported(
        &pcap(127, 65535, &[(0, vec![0; 40])]),
        "unsupported link type",
    );
    unsupported(
        &pcapng(&[127], &[(0, vec![0; 40])]),
        "unsupported link type",
    );
    let corrupt = |bytes: &[u8]| match run(bytes) {
        Err(PcapError::Corrupt(_)) => {}
        other => panic!("{other:?}"),
    };
    // A header cut short.
    corrupt(&pcap(LINK_ETHERNET, 65535, &[])[..20]);
    // A packet naming an interface that was never described.
    corrupt(&pcapng(&[LINK_ETHERNET], &[(3, vec![0; 60])]));
    // A block length that is not a multiple of 4.
    let mut bad = pcapng(&[LINK_ETHERNET], &[]);
    bad.extend_from_slice(&6u32.to_le_bytes());
    bad.extend_from_slice(&13u32.to_le_bytes());
    bad.extend_from_slice(&[0; 16]);
    corrupt(&bad);
}

#[test]
fn loopback_and_non_tcp_frames_are_handled() {
    let conv = tls13_conv(CLIENT4, SERVER4, 1448);
    let mut frames: Vec<(u32, Vec<u8>)> = conv
        .ip_packets()
        .into_iter()
        .map(|(_, p)| {
            let mut f = 2u32.to_le_bytes().to_vec();
            f.extend(p);
            (0, f)
        })
        .collect();
    // Garbage and a UDP datagram in between: skipped.
    frames.insert(1, (0, vec![2, 0, 0, 0, 0x45]));
    let mut udp = 2u32.to_le_bytes().to_vec();
    PacketBuilder::ipv4([198, 18, 0, 1], [198, 18, 0, 2], 64)
        .udp(53, 53)
        .write(&mut udp, b"dns")
        .unwrap();
    frames.insert(2, (0, udp));
    let s = run(&pcap(LINK_NULL, 65535, &frames)).unwrap();
    assert_mtls(&s, CLIENT4, SERVER4);
    assert_eq!(s.packets, u64::try_from(frames.len()).unwrap());
}
