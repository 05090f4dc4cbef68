//! The eBPF program's capture bookkeeping, run by the kernel itself (`BPF_PROG_TEST_RUN`) on
//! crafted packets: which bytes of a connection are copied to the ring buffer, and that each is
//! copied once whatever duplicates, overlaps, reordering or a second hook bring (issues 11, 18).
//! Needs root; fails, never skips.
use std::net::Ipv4Addr;

use anyhow::{Context as _, Result};
use mtls_agent::capture::{
    AttachSide, Capture, CaptureConfig, TcMode,
    events::{Event, decode},
};
use mtls_agent_common::{EVENT_HEADER_LEN, stats};
use mtls_agent_testbed::ensure_root;

const CLIENT: Ipv4Addr = Ipv4Addr::new(198, 18, 5, 2);
const SERVER: Ipv4Addr = Ipv4Addr::new(198, 18, 5, 3);
const CPORT: u16 = 40000;
const SPORT: u16 = 8443;
const CISN: u32 = 1_000_000;
const SISN: u32 = 7_000_000;

const SYN: u8 = 0x02;
const ACK: u8 = 0x10;
const PSH_ACK: u8 = 0x18;
const FIN_ACK: u8 = 0x11;

/// Ethernet + IPv4 + TCP (no options) + payload.
fn packet(to_server: bool, seq: u32, ack: u32, flags: u8, payload: &[u8]) -> Vec<u8> {
    let (src, dst, sport, dport) = if to_server {
        (CLIENT, SERVER, CPORT, SPORT)
    } else {
        (SERVER, CLIENT, SPORT, CPORT)
    };
    let mut p = vec![0u8; 12];
    p.extend_from_slice(&0x0800u16.to_be_bytes());
    let total = (20 + 20 + payload.len()) as u16;
    p.extend_from_slice(&[0x45, 0]);
    p.extend_from_slice(&total.to_be_bytes());
    p.extend_from_slice(&[0, 0, 0x40, 0, 64, 6, 0, 0]);
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    p.extend_from_slice(&sport.to_be_bytes());
    p.extend_from_slice(&dport.to_be_bytes());
    p.extend_from_slice(&seq.to_be_bytes());
    p.extend_from_slice(&ack.to_be_bytes());
    p.extend_from_slice(&[0x50, flags, 0xff, 0xff, 0, 0, 0, 0]);
    p.extend_from_slice(payload);
    p
}

/// A TLS record: type, version 3.3, length, body.
fn record(typ: u8, body_len: usize) -> Vec<u8> {
    let mut r = vec![typ, 3, 3];
    r.extend_from_slice(&(body_len as u16).to_be_bytes());
    r.extend((0..body_len).map(|i| (i % 251) as u8));
    r
}

/// One data event as the agent receives it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Data {
    to_server: bool,
    /// Stream offset of the first byte.
    off: u32,
    len: usize,
    /// Length of the ring-buffer record.
    record: usize,
}

struct Kernel {
    capture: Capture,
    ring: aya::maps::RingBuf<aya::maps::MapData>,
    /// The loader registers the program's log buffer with the tokio reactor.
    _rt: tokio::runtime::Runtime,
}

impl Kernel {
    fn load() -> Result<Kernel> {
        ensure_root()?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let _guard = rt.enter();
        let mut capture = Capture::load(&CaptureConfig {
            // Nothing is attached: the programs only run through BPF_PROG_TEST_RUN.
            interfaces: vec![],
            interface_auto: false,
            flow_table_size: 1024,
            max_segments: mtls_agent_common::DEFAULT_MAX_SEGMENTS,
            capture_bytes: mtls_agent_common::DEFAULT_CAPTURE_BYTES,
            ring_buffer_bytes: 1 << 20,
            tc_mode: TcMode::Auto,
            attach_side: AttachSide::Auto,
        })?;
        let ring = capture.take_ring()?;
        Ok(Kernel {
            capture,
            ring,
            _rt: rt,
        })
    }

    /// Runs a packet through the ingress hook of the client's veth (packets from the client) or
    /// the egress hook (packets to it).
    fn run(&mut self, ingress: bool, p: &[u8]) -> Result<()> {
        let ret = self
            .capture
            .test_run(ingress, p)
            .context("BPF_PROG_TEST_RUN")?;
        // TC_ACT_UNSPEC (-1, what TCX_NEXT is on the clsact path): the packet goes on unchanged.
        anyhow::ensure!(
            ret as i32 == -1,
            "the program returned {ret}, not TC_ACT_UNSPEC"
        );
        Ok(())
    }

    fn handshake(&mut self) -> Result<()> {
        self.run(true, &packet(true, CISN, 0, SYN, &[]))?;
        self.run(false, &packet(false, SISN, CISN + 1, SYN | ACK, &[]))?;
        self.run(true, &packet(true, CISN + 1, SISN + 1, ACK, &[]))
    }

    /// Client payload at stream offset `off`, through the client's ingress hook.
    fn client(&mut self, off: u32, payload: &[u8]) -> Result<()> {
        self.run(
            true,
            &packet(true, CISN + 1 + off, SISN + 1, PSH_ACK, payload),
        )
    }

    fn server(&mut self, off: u32, payload: &[u8]) -> Result<()> {
        self.run(
            false,
            &packet(false, SISN + 1 + off, CISN + 1, PSH_ACK, payload),
        )
    }

    /// Data events written since the last call.
    fn data(&mut self) -> Result<Vec<Data>> {
        let mut out = Vec::new();
        while let Some(item) = self.ring.next() {
            let ev = decode(&item)?;
            if let Event::Data {
                meta,
                lo_to_hi,
                seq,
                payload,
                ..
            } = ev
            {
                // CLIENT (198.18.5.2) is `lo`.
                let to_server = lo_to_hi;
                let isn = if to_server { CISN } else { SISN };
                assert_eq!(meta.isn[if to_server { 0 } else { 1 }], Some(isn));
                out.push(Data {
                    to_server,
                    off: seq.wrapping_sub(isn + 1),
                    len: payload.len(),
                    record: item.len(),
                });
            }
        }
        Ok(out)
    }

    fn stat(&self, index: u32) -> Result<u64> {
        Ok(self.capture.kernel_stats()?[index as usize])
    }
}

/// The bytes covered by the events of one direction, as (offset, len), sorted.
fn ranges(events: &[Data], to_server: bool) -> Vec<(u32, usize)> {
    let mut r: Vec<_> = events
        .iter()
        .filter(|e| e.to_server == to_server)
        .map(|e| (e.off, e.len))
        .collect();
    r.sort();
    r
}

#[test]
fn plaintext_copies_the_first_segment_of_each_direction_sized_to_it() -> Result<()> {
    let mut k = Kernel::load()?;
    k.handshake()?;
    let request = b"GET /healthz HTTP/1.1\r\nHost: web\r\n\r\n";
    k.client(0, request)?;
    let reply = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
    k.server(0, reply)?;
    // Keep-alive: the next request and reply are not copied.
    let off = request.len() as u32;
    k.client(off, request)?;
    k.server(reply.len() as u32, reply)?;
    let ev = k.data()?;
    assert_eq!(ranges(&ev, true), [(0, request.len())], "{ev:?}");
    assert_eq!(ranges(&ev, false), [(0, reply.len())], "{ev:?}");
    // Records are sized to their payload: the header and the bytes, nothing more.
    for e in &ev {
        assert!(
            e.record >= EVENT_HEADER_LEN + e.len && e.record < EVENT_HEADER_LEN + e.len + 8,
            "{e:?}"
        );
    }
    assert_eq!(
        k.stat(stats::BYTES_COPIED)?,
        (request.len() + reply.len()) as u64
    );
    Ok(())
}

#[test]
fn a_segment_seen_on_two_hooks_or_retransmitted_is_copied_once() -> Result<()> {
    let mut k = Kernel::load()?;
    k.handshake()?;
    let request = b"POST /v1/pay HTTP/1.1\r\nHost: api\r\nContent-Length: 0\r\n\r\n";
    let p = packet(true, CISN + 1, SISN + 1, PSH_ACK, request);
    // The client's veth (ingress), the server's veth (egress), and a retransmission.
    k.run(true, &p)?;
    k.run(false, &p)?;
    k.run(true, &p)?;
    let ev = k.data()?;
    assert_eq!(ranges(&ev, true), [(0, request.len())], "{ev:?}");
    Ok(())
}

/// A ClientHello of 1,300 bytes (a post-quantum key share) in three MTU-sized segments.
fn client_hello() -> Vec<u8> {
    let mut ch = record(22, 1295);
    ch[5] = 1; // handshake type ClientHello
    ch
}

#[test]
fn reordered_duplicated_and_overlapping_segments_are_copied_once_each() -> Result<()> {
    let mut k = Kernel::load()?;
    k.handshake()?;
    let ch = client_hello();
    let parts = [(0usize, 500usize), (500, 1000), (1000, ch.len())];
    // The first segment is lost before the hook: the others arrive first, then its
    // retransmission, then duplicates of everything and an overlapping retransmission.
    k.client(500, &ch[500..1000])?;
    k.client(1000, &ch[1000..])?;
    k.client(0, &ch[..500])?;
    for (a, b) in parts {
        k.client(a as u32, &ch[a..b])?;
    }
    k.client(250, &ch[250..750])?;
    let ev = k.data()?;
    assert_eq!(
        ranges(&ev, true),
        [(0, 500), (500, 500), (1000, ch.len() - 1000)],
        "each byte once: {ev:?}"
    );
    Ok(())
}

#[test]
fn tls13_copies_the_handshake_and_nothing_after_it() -> Result<()> {
    let mut k = Kernel::load()?;
    k.handshake()?;
    let ch = client_hello();
    k.client(0, &ch)?;
    // ServerHello, ChangeCipherSpec and the encrypted rest of the server's flight: the
    // program stops at its first encrypted record.
    let mut sh = record(22, 118);
    sh[5] = 2;
    let mut flight = sh.clone();
    flight.extend(record(20, 1));
    flight.extend(record(23, 2400));
    flight.extend(record(23, 300));
    k.server(0, &flight)?;
    // The client's flight: CCS, Certificate (600), CertificateVerify (120), Finished (53).
    let mut second = record(20, 1);
    second.extend(record(23, 600));
    second.extend(record(23, 120));
    second.extend(record(23, 53));
    let off = ch.len() as u32;
    k.client(off, &second)?;
    // Application data afterwards, both ways: nothing.
    let off2 = off + second.len() as u32;
    k.client(off2, &record(23, 700))?;
    k.server(flight.len() as u32, &record(23, 900))?;
    let ev = k.data()?;
    // Client: the whole ClientHello, then CCS, the certificate-sized record whole and the next
    // record's header (it tells a certificate from a padded Finished).
    let wanted = 6 + (5 + 600) + 5;
    assert_eq!(ranges(&ev, true), [(0, ch.len()), (off, wanted)], "{ev:?}");
    // Server: ServerHello and ChangeCipherSpec.
    assert_eq!(ranges(&ev, false), [(0, sh.len() + 6)], "{ev:?}");
    Ok(())
}

#[test]
fn a_finished_sized_first_record_ends_the_client_capture() -> Result<()> {
    let mut k = Kernel::load()?;
    k.handshake()?;
    let ch = client_hello();
    k.client(0, &ch)?;
    let mut sh = record(22, 90);
    sh[5] = 2;
    k.server(0, &sh)?;
    let mut second = record(20, 1);
    second.extend(record(23, 53));
    k.client(ch.len() as u32, &second)?;
    k.client((ch.len() + second.len()) as u32, &record(23, 400))?;
    let ev = k.data()?;
    assert_eq!(
        ranges(&ev, true),
        [(0, ch.len()), (ch.len() as u32, 6 + 5)],
        "{ev:?}"
    );
    Ok(())
}

#[test]
fn an_upgrade_to_tls_after_a_prelude_is_followed() -> Result<()> {
    let mut k = Kernel::load()?;
    k.handshake()?;
    // PostgreSQL: SSLRequest, 'S', then TLS from offset 8 (client) and 1 (server).
    let ssl_request = [0, 0, 0, 8, 4, 0xd2, 0x16, 0x2f];
    k.client(0, &ssl_request)?;
    k.server(0, b"S")?;
    let ch = client_hello();
    k.client(8, &ch)?;
    let mut sh = record(22, 90);
    sh[5] = 2;
    k.server(1, &sh)?;
    let ev = k.data()?;
    assert_eq!(ranges(&ev, true), [(0, 8), (8, ch.len())], "{ev:?}");
    assert_eq!(ranges(&ev, false), [(0, 1), (1, sh.len())], "{ev:?}");
    // And the end of the connection is reported once, with payload bytes from sequence
    // numbers.
    k.run(
        true,
        &packet(true, CISN + 1 + 8 + ch.len() as u32, SISN + 2, FIN_ACK, &[]),
    )?;
    k.run(
        false,
        &packet(
            false,
            SISN + 1 + 1 + sh.len() as u32,
            CISN + 2,
            FIN_ACK,
            &[],
        ),
    )?;
    let mut closed = Vec::new();
    while let Some(item) = k.ring.next() {
        if let Event::Closed { meta } = decode(&item)? {
            closed.push(meta.bytes);
        }
    }
    assert_eq!(closed, [[(8 + ch.len()) as u64, (1 + sh.len()) as u64]]);
    Ok(())
}
