//! Offline classification of a capture file (`mtls-agent classify --pcap`): pcap and pcapng
//! (`pcap-file`), link types Ethernet, Linux cooked (SLL, SLL2), raw IP and BSD loopback, IPv4
//! and IPv6 (`etherparse`), TCP only.
//!
//! Packets are turned into per-connection segment streams and fed to the very same
//! [`ConnClassifier`] the daemon uses, so a capture and the live agent agree on the same traffic:
//!
//! - the SYN gives the client and its ISN, the SYN-ACK the server's ISN; a SYN with a new ISN on
//!   a known 4-tuple starts a new connection; a connection first seen without its SYN is
//!   mid-stream ([`ConnMeta::midstream`]) and oriented by its ports;
//! - segments go to the classifier as they are (duplicates from a second interface,
//!   retransmissions, out-of-order: its reassembly sorts them out); bytes cut off by the snap
//!   length are reported as such (`wire_len`);
//! - FIN from both sides or RST ends a connection; its key then swallows late packets (a copy
//!   on another interface) for a while, as the daemon's tombstones do;
//! - a SYN answered by RST, with no payload, is not a connection (as in the daemon).
//!
//! A file cut short (a capture still being written, a partial download) yields what was read,
//! with [`Summary::truncated`] saying so; anything else that is not a readable capture is an error.
use std::{
    collections::HashMap,
    io::{BufRead, BufReader, Read},
    net::{IpAddr, SocketAddr},
    time::{Duration, SystemTime},
};

use etherparse::{EtherType, LaxNetSlice, LaxSlicedPacket, TransportSlice};
use pcap_file::{
    DataLink, PcapError as FileError,
    pcap::PcapReader,
    pcapng::{Block, PcapNgReader},
};

use crate::classify::{ConnClassifier, ConnMeta, ConnectionRecord, Direction, ResumptionCache};

/// Why a file could not be classified.
#[derive(Debug, thiserror::Error)]
pub enum PcapError {
    /// Not a capture this reader supports (bad input: exit code 2).
    #[error("{0}")]
    Unsupported(String),
    /// A capture whose structure is broken (bad input: exit code 2).
    #[error("{0}")]
    Corrupt(String),
    /// Reading failed (exit code 1).
    #[error("read failed: {0}")]
    Io(#[source] std::io::Error),
}

/// What a capture held.
#[derive(Debug, Default)]
pub struct Summary {
    /// One record per TCP connection, in the order the connections started.
    pub connections: Vec<ConnectionRecord>,
    /// Packets read.
    pub packets: u64,
    /// TCP packets among them.
    pub tcp_packets: u64,
    /// Packets of link types this reader does not decode (other interfaces of a pcapng).
    pub unsupported_link_packets: u64,
    /// SYNs that never became a connection (answered by RST, or unanswered, without payload).
    pub refused: u64,
    /// Set when the file ended in the middle of a packet or block: what was read is reported.
    pub truncated: Option<String>,
}

const PCAP_MAGICS: [[u8; 4]; 4] = [
    [0xa1, 0xb2, 0xc3, 0xd4],
    [0xd4, 0xc3, 0xb2, 0xa1],
    [0xa1, 0xb2, 0x3c, 0x4d],
    [0x4d, 0x3c, 0xb2, 0xa1],
];
const PCAPNG_MAGIC: [u8; 4] = [0x0a, 0x0d, 0x0d, 0x0a];

/// Link types decoded here (numbers from the tcpdump.org registry).
const LINK_NULL: u32 = 0;
const LINK_ETHERNET: u32 = 1;
const LINK_RAW: u32 = 101;
const LINK_RAW_OPENBSD: u32 = 12;
const LINK_RAW_ALT: u32 = 14;
const LINK_LOOP: u32 = 108;
const LINK_LINUX_SLL: u32 = 113;
const LINK_IPV4: u32 = 228;
const LINK_IPV6: u32 = 229;
const LINK_LINUX_SLL2: u32 = 276;

fn supported(link: u32) -> bool {
    matches!(
        link,
        LINK_NULL
            | LINK_ETHERNET
            | LINK_RAW
            | LINK_RAW_OPENBSD
            | LINK_RAW_ALT
            | LINK_LOOP
            | LINK_LINUX_SLL
            | LINK_IPV4
            | LINK_IPV6
            | LINK_LINUX_SLL2
    )
}

fn link_name(link: u32) -> String {
    format!("{:?} ({link})", DataLink::from(link))
}

/// A capture time after the epoch, as a wall-clock time.
fn wall(ts: Duration) -> SystemTime {
    SystemTime::UNIX_EPOCH
        .checked_add(ts)
        .unwrap_or(SystemTime::UNIX_EPOCH)
}

/// Is this error the file ending in the middle of something?
fn is_eof(e: &FileError) -> bool {
    match e {
        FileError::IncompleteBuffer => true,
        FileError::IoError(io) => io.kind() == std::io::ErrorKind::UnexpectedEof,
        _ => false,
    }
}

fn file_error(e: FileError) -> PcapError {
    match e {
        FileError::IoError(io) if io.kind() != std::io::ErrorKind::UnexpectedEof => {
            PcapError::Io(io)
        }
        other => PcapError::Corrupt(other.to_string()),
    }
}

/// Classifies every TCP connection of a pcap or pcapng stream. `progress` is called now and
/// then with the number of packets read so far (for a progress bar).
pub fn classify_pcap<R: Read>(
    reader: R,
    progress: &mut dyn FnMut(u64),
) -> Result<Summary, PcapError> {
    let mut reader = BufReader::with_capacity(64 * 1024, reader);
    let head = reader.fill_buf().map_err(PcapError::Io)?;
    if head.is_empty() {
        return Err(PcapError::Unsupported("empty file".into()));
    }
    if head.len() < 4 {
        return Err(PcapError::Unsupported(
            "too short to be a pcap or pcapng file".into(),
        ));
    }
    let magic = [head[0], head[1], head[2], head[3]];
    let mut t = Offline::default();
    if PCAP_MAGICS.contains(&magic) {
        read_pcap(reader, &mut t, progress)?;
    } else if magic == PCAPNG_MAGIC {
        read_pcapng(reader, &mut t, progress)?;
    } else {
        return Err(PcapError::Unsupported(format!(
            "not a pcap or pcapng file (starts with {:02x}{:02x}{:02x}{:02x})",
            magic[0], magic[1], magic[2], magic[3]
        )));
    }
    Ok(t.finish())
}

fn read_pcap<R: Read>(
    reader: R,
    t: &mut Offline,
    progress: &mut dyn FnMut(u64),
) -> Result<(), PcapError> {
    let mut r = match PcapReader::new(reader) {
        Ok(r) => r,
        Err(e) if is_eof(&e) => {
            return Err(PcapError::Corrupt("file header is cut short".into()));
        }
        Err(e) => return Err(file_error(e)),
    };
    let header = r.header();
    let link = u32::from(header.datalink);
    if !supported(link) {
        return Err(PcapError::Unsupported(format!(
            "unsupported link type {} (supported: Ethernet, Linux cooked SLL/SLL2, raw IP, loopback)",
            link_name(link)
        )));
    }
    let nanos = header.ts_resolution == pcap_file::TsResolution::NanoSecond;
    while let Some(p) = r.next_raw_packet() {
        let p = match p {
            Ok(p) => p,
            Err(e) if is_eof(&e) => {
                t.summary.truncated = Some(format!(
                    "file ends in the middle of packet {}; classified what was read",
                    t.summary.packets + 1
                ));
                break;
            }
            Err(e) => return Err(file_error(e)),
        };
        // Raw packets: pcap-file's validation rejects an original length above the snap length,
        // which is normal for a capture cut at the snap length.
        let frac = if nanos {
            p.ts_frac.min(999_999_999)
        } else {
            p.ts_frac.min(999_999).saturating_mul(1000)
        };
        let ts = Duration::new(u64::from(p.ts_sec), frac);
        t.packet(link, ts, p.orig_len, &p.data);
        if t.summary.packets.is_multiple_of(4096) {
            progress(t.summary.packets);
        }
    }
    Ok(())
}

fn read_pcapng<R: Read>(
    reader: R,
    t: &mut Offline,
    progress: &mut dyn FnMut(u64),
) -> Result<(), PcapError> {
    let mut r = match PcapNgReader::new(reader) {
        Ok(r) => r,
        Err(e) if is_eof(&e) => {
            return Err(PcapError::Corrupt("section header is cut short".into()));
        }
        Err(e) => return Err(file_error(e)),
    };
    // Link types of the interfaces of the current section, by interface id.
    let mut links: Vec<u32> = Vec::new();
    let mut unsupported: Vec<u32> = Vec::new();
    while let Some(block) = r.next_block() {
        let block = match block {
            Ok(b) => b,
            Err(e) if is_eof(&e) => {
                t.summary.truncated = Some(format!(
                    "file ends in the middle of a block after {} packets; classified what was read",
                    t.summary.packets
                ));
                break;
            }
            Err(e) => return Err(file_error(e)),
        };
        let (iface, ts, orig_len, data) = match &block {
            Block::SectionHeader(_) => {
                links.clear();
                continue;
            }
            Block::InterfaceDescription(idb) => {
                let link = u32::from(idb.linktype);
                if !supported(link) && !unsupported.contains(&link) {
                    unsupported.push(link);
                }
                links.push(link);
                continue;
            }
            Block::EnhancedPacket(p) => (p.interface_id, p.timestamp, p.original_len, &p.data),
            Block::SimplePacket(p) => (0, Duration::ZERO, p.original_len, &p.data),
            Block::Packet(p) => (
                u32::from(p.interface_id),
                Duration::from_micros(p.timestamp),
                p.original_len,
                &p.data,
            ),
            _ => continue,
        };
        let Some(&link) = links.get(iface as usize) else {
            return Err(PcapError::Corrupt(format!(
                "packet {} names interface {iface}, which was never described",
                t.summary.packets + 1
            )));
        };
        if supported(link) {
            t.packet(link, ts, orig_len, data);
        } else {
            t.summary.packets += 1;
            t.summary.unsupported_link_packets += 1;
        }
        if t.summary.packets.is_multiple_of(4096) {
            progress(t.summary.packets);
        }
    }
    if t.summary.packets > 0 && t.summary.unsupported_link_packets == t.summary.packets {
        let names: Vec<String> = unsupported.iter().map(|&l| link_name(l)).collect();
        return Err(PcapError::Unsupported(format!(
            "unsupported link type {} (supported: Ethernet, Linux cooked SLL/SLL2, raw IP, loopback)",
            names.join(", ")
        )));
    }
    Ok(())
}

/// Decodes one frame of link type `link` down to its IP layer.
fn decode(link: u32, data: &[u8]) -> Option<LaxSlicedPacket<'_>> {
    match link {
        LINK_ETHERNET => LaxSlicedPacket::from_ethernet(data).ok(),
        LINK_LINUX_SLL => {
            let proto = u16::from_be_bytes([*data.get(14)?, *data.get(15)?]);
            Some(LaxSlicedPacket::from_ether_type(
                EtherType(proto),
                data.get(16..)?,
            ))
        }
        LINK_LINUX_SLL2 => {
            let proto = u16::from_be_bytes([*data.first()?, *data.get(1)?]);
            Some(LaxSlicedPacket::from_ether_type(
                EtherType(proto),
                data.get(20..)?,
            ))
        }
        LINK_NULL | LINK_LOOP => LaxSlicedPacket::from_ip(data.get(4..)?).ok(),
        _ => LaxSlicedPacket::from_ip(data).ok(),
    }
}

/// A connection's endpoints in canonical order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct FlowKey {
    lo: SocketAddr,
    hi: SocketAddr,
}

impl FlowKey {
    fn new(a: SocketAddr, b: SocketAddr) -> Self {
        if a <= b {
            FlowKey { lo: a, hi: b }
        } else {
            FlowKey { lo: b, hi: a }
        }
    }
}

/// How long (capture time) a connection that ended keeps taking late copies of its packets
/// before it is classified and its key becomes a tombstone, and how long tombstones last.
const CLOSE_GRACE: Duration = Duration::from_secs(2);
const TOMBSTONE: Duration = Duration::from_secs(30);

struct Conn {
    order: u64,
    client: SocketAddr,
    server: SocketAddr,
    client_isn: Option<u32>,
    server_isn: Option<u32>,
    midstream: bool,
    /// The server answered the SYN (or the connection was picked up mid-stream).
    established: bool,
    saw_payload: bool,
    classifier: Option<Box<ConnClassifier>>,
    record: Option<ConnectionRecord>,
    fin: [bool; 2],
    closed_at: Option<Duration>,
    /// Capture time of the connection's last packet.
    last: Duration,
}

impl Conn {
    fn new(order: u64, client: SocketAddr, server: SocketAddr, midstream: bool) -> Self {
        Conn {
            order,
            client,
            server,
            client_isn: None,
            server_isn: None,
            midstream,
            established: midstream,
            saw_payload: false,
            classifier: None,
            record: None,
            fin: [false; 2],
            closed_at: None,
            last: Duration::ZERO,
        }
    }

    fn classifier(&mut self) -> &mut ConnClassifier {
        let meta = ConnMeta {
            client: self.client,
            server: self.server,
            client_isn: self.client_isn,
            server_isn: self.server_isn,
            midstream: self.midstream,
        };
        self.classifier
            .get_or_insert_with(|| Box::new(ConnClassifier::new(meta)))
    }

    fn segment(
        &mut self,
        dir: Direction,
        seq: u32,
        payload: &[u8],
        wire_len: u32,
        ts: Duration,
        cache: &mut ResumptionCache,
    ) {
        self.saw_payload = true;
        if self.record.is_some() {
            return;
        }
        let (client, server, midstream) = (self.client, self.server, self.midstream);
        let c = self.classifier();
        if c.on_segment(dir, seq, payload, wire_len, cache)
            && let Some(v) = c.verdict()
        {
            let rec = ConnectionRecord::new(client, server, v, midstream, wall(ts), true);
            self.record = Some(rec);
            self.classifier = None;
        }
    }
}

/// Orientation of a connection whose SYN was not seen: the well-known (lower, or
/// non-ephemeral) port is the server's. Only orientation: the verdict is never guessed.
fn guess_client(a: SocketAddr, b: SocketAddr) -> (SocketAddr, SocketAddr) {
    const EPHEMERAL: u16 = 32768;
    let a_is_client = match (a.port() >= EPHEMERAL, b.port() >= EPHEMERAL) {
        (true, false) => true,
        (false, true) => false,
        _ => a.port() > b.port(),
    };
    if a_is_client { (a, b) } else { (b, a) }
}

#[derive(Default)]
struct Offline {
    conns: HashMap<FlowKey, Conn>,
    tombstones: HashMap<FlowKey, (Option<u32>, Duration)>,
    done: Vec<(u64, ConnectionRecord)>,
    cache: Option<ResumptionCache>,
    next_order: u64,
    last_sweep: Duration,
    summary: Summary,
}

impl Offline {
    fn cache(&mut self) -> &mut ResumptionCache {
        self.cache
            .get_or_insert_with(|| ResumptionCache::new(65_536))
    }

    fn packet(&mut self, link: u32, ts: Duration, orig_len: u32, data: &[u8]) {
        self.summary.packets += 1;
        let Some(pkt) = decode(link, data) else {
            return;
        };
        let (src, dst) = match &pkt.net {
            Some(LaxNetSlice::Ipv4(ip)) => {
                let h = ip.header();
                (
                    IpAddr::V4(h.source_addr()),
                    IpAddr::V4(h.destination_addr()),
                )
            }
            Some(LaxNetSlice::Ipv6(ip)) => {
                let h = ip.header();
                (
                    IpAddr::V6(h.source_addr()),
                    IpAddr::V6(h.destination_addr()),
                )
            }
            _ => return,
        };
        let Some(TransportSlice::Tcp(tcp)) = &pkt.transport else {
            return;
        };
        self.summary.tcp_packets += 1;
        // Bytes of this frame beyond the snap length belong to the TCP payload.
        let cut = orig_len.saturating_sub(u32::try_from(data.len()).unwrap_or(u32::MAX));
        let payload = tcp.payload();
        let wire_len = u32::try_from(payload.len())
            .unwrap_or(u32::MAX)
            .saturating_add(cut);
        self.tcp(
            SocketAddr::new(src, tcp.source_port()),
            SocketAddr::new(dst, tcp.destination_port()),
            tcp,
            payload,
            wire_len,
            ts,
        );
        if ts.saturating_sub(self.last_sweep) >= Duration::from_secs(1) {
            self.sweep(ts);
            self.last_sweep = ts;
        }
    }

    fn tcp(
        &mut self,
        src: SocketAddr,
        dst: SocketAddr,
        tcp: &etherparse::TcpSlice<'_>,
        payload: &[u8],
        wire_len: u32,
        ts: Duration,
    ) {
        let key = FlowKey::new(src, dst);
        let seq = tcp.sequence_number();
        if tcp.syn() && !tcp.ack() {
            if let Some(c) = self.conns.get(&key)
                && c.client == src
                && c.client_isn == Some(seq)
            {
                return; // retransmitted, or the copy from a second interface
            }
            if self
                .tombstones
                .get(&key)
                .is_some_and(|(isn, _)| *isn == Some(seq))
            {
                return;
            }
            self.retire(key);
            self.tombstones.remove(&key);
            let order = self.new_order();
            let mut c = Conn::new(order, src, dst, false);
            c.client_isn = Some(seq);
            if wire_len > 0 {
                // TCP Fast Open: data in the SYN starts at ISN + 1.
                let cache = self
                    .cache
                    .get_or_insert_with(|| ResumptionCache::new(65_536));
                c.segment(
                    Direction::ToServer,
                    seq.wrapping_add(1),
                    payload,
                    wire_len,
                    ts,
                    cache,
                );
            }
            self.conns.insert(key, c);
            return;
        }
        if self.tombstones.contains_key(&key) && !self.conns.contains_key(&key) {
            return; // a late copy of an ended connection's packet
        }
        if tcp.syn() {
            // SYN-ACK
            match self.conns.get_mut(&key) {
                Some(c) if c.server == src && !c.midstream => {
                    c.server_isn.get_or_insert(seq);
                    c.established = true;
                }
                Some(_) => {}
                None => {
                    // Capture started between SYN and SYN-ACK.
                    let order = self.new_order();
                    let mut c = Conn::new(order, dst, src, false);
                    c.client_isn = Some(tcp.acknowledgment_number().wrapping_sub(1));
                    c.server_isn = Some(seq);
                    c.established = true;
                    self.conns.insert(key, c);
                }
            }
            return;
        }
        if !self.conns.contains_key(&key) {
            let order = self.new_order();
            let (client, server) = guess_client(src, dst);
            self.conns
                .insert(key, Conn::new(order, client, server, true));
        }
        let cache = self
            .cache
            .get_or_insert_with(|| ResumptionCache::new(65_536));
        let Some(c) = self.conns.get_mut(&key) else {
            return;
        };
        c.last = c.last.max(ts);
        let dir = if src == c.client {
            Direction::ToServer
        } else {
            Direction::ToClient
        };
        if wire_len > 0 {
            c.segment(dir, seq, payload, wire_len, ts, cache);
        }
        if tcp.rst() {
            c.closed_at.get_or_insert(ts);
        }
        if tcp.fin() {
            c.fin[dir as usize] = true;
            if c.fin[0] && c.fin[1] {
                c.closed_at.get_or_insert(ts);
            }
        }
    }

    fn new_order(&mut self) -> u64 {
        self.next_order += 1;
        self.next_order
    }

    /// Classifies connections that ended more than [`CLOSE_GRACE`] ago; forgets old tombstones.
    fn sweep(&mut self, now: Duration) {
        let mut due: Vec<(u64, FlowKey)> = self
            .conns
            .iter()
            .filter(|(_, c)| {
                c.closed_at
                    .is_some_and(|t| now.saturating_sub(t) >= CLOSE_GRACE)
            })
            .map(|(k, c)| (c.order, *k))
            .collect();
        due.sort_unstable_by_key(|(order, _)| *order);
        for (_, key) in due {
            if let Some(c) = self.conns.get(&key) {
                let isn = c.client_isn;
                self.retire(key);
                self.tombstones.insert(key, (isn, now));
            }
        }
        self.tombstones
            .retain(|_, (_, t)| now.saturating_sub(*t) < TOMBSTONE);
    }

    /// Ends a connection: its final verdict (deciding now with what was seen), unless it never
    /// was a connection.
    fn retire(&mut self, key: FlowKey) {
        let Some(mut c) = self.conns.remove(&key) else {
            return;
        };
        if c.record.is_none() {
            if !c.established && !c.saw_payload {
                self.summary.refused += 1;
                return;
            }
            let cache = self.cache();
            // A connection that carried no payload still gets its (unknown, no_data) verdict.
            let meta = ConnMeta {
                client: c.client,
                server: c.server,
                client_isn: c.client_isn,
                server_isn: c.server_isn,
                midstream: c.midstream,
            };
            let mut classifier = c
                .classifier
                .take()
                .unwrap_or_else(|| Box::new(ConnClassifier::new(meta)));
            let v = classifier.finish(cache);
            let at = wall(c.closed_at.unwrap_or(c.last));
            c.record = Some(ConnectionRecord::new(
                c.client,
                c.server,
                &v,
                c.midstream,
                at,
                true,
            ));
        }
        if let Some(rec) = c.record {
            self.done.push((c.order, rec));
        }
    }

    fn finish(mut self) -> Summary {
        let mut keys: Vec<(u64, FlowKey)> = self.conns.iter().map(|(k, c)| (c.order, *k)).collect();
        keys.sort_unstable_by_key(|(order, _)| *order);
        for (_, key) in keys {
            self.retire(key);
        }
        self.done.sort_by_key(|(order, _)| *order);
        self.summary.connections = self.done.into_iter().map(|(_, r)| r).collect();
        self.summary
    }
}

#[cfg(test)]
mod tests;
