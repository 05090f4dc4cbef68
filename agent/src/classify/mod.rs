//! Per-connection classification: mTLS, one-way TLS, plaintext or unknown (DESIGN.md "Verdicts").
//!
//! The classifier is fed the first payload segments of each direction of one TCP connection, as the
//! eBPF program or a pcap reader saw them: duplicated (the same skb seen on two interfaces),
//! retransmitted, out of order, cut by the capture length, split over several segments. It
//! reassembles each direction from its first byte (`reassembly`), then decides:
//!
//! * TLS (`tls`): parse the ClientHello/ServerHello with `tls-parser` and apply the client-auth
//!   rules (TLS <= 1.2: the client's Certificate message is visible; TLS 1.3: the size of the
//!   client's first encrypted record tells a Certificate from a bare Finished, and the size of its
//!   second tells whether record padding could explain the first — then `unknown`; only the
//!   5-byte headers of those two records are read, see `tls` for exactly which bytes and when the
//!   verdict is final), inheriting the outcome of resumed sessions from a [`ResumptionCache`];
//! * plaintext (`plaintext`): the first client bytes are not a TLS record, with the sub-protocol
//!   where recognisable; preambles that wrap TLS (PostgreSQL SSLRequest, MySQL SSL request) are
//!   unwrapped first;
//! * mid-stream connections (`midstream`): only positive evidence, never plaintext on a guess.
//!
//! Nothing here touches the kernel or does I/O, so the same code serves live capture and pcap files.

mod hello;
mod midstream;
mod plaintext;
mod reassembly;
mod record;
mod records;
mod resumption;
mod tls;

#[cfg(test)]
pub(crate) mod tests;

use std::fmt;
use std::net::SocketAddr;

pub use record::{ConnectionRecord, RecentConnections, RecentSnapshot, Sides};
pub use resumption::ResumptionCache;

use reassembly::Stream;

/// Security of one connection, the axis STRICT readiness is computed on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Security {
    /// TLS where the client presented a certificate too.
    Mtls,
    /// TLS with server authentication only (or an empty client Certificate).
    Tls,
    /// The first client bytes are not TLS.
    Plaintext,
    /// Not enough was seen to say.
    Unknown,
}

impl Security {
    /// Every value, in a stable order (for metrics initialisation and tables).
    pub const ALL: [Security; 4] = [
        Security::Mtls,
        Security::Tls,
        Security::Plaintext,
        Security::Unknown,
    ];

    /// The lowercase label used in JSON and Prometheus.
    pub fn as_str(self) -> &'static str {
        match self {
            Security::Mtls => "mtls",
            Security::Tls => "tls",
            Security::Plaintext => "plaintext",
            Security::Unknown => "unknown",
        }
    }
}

impl fmt::Display for Security {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Whether the connection is mesh (Istio) traffic, judged from the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mesh {
    /// The ClientHello offers an Istio ALPN, or mTLS to the ambient HBONE port 15008.
    Istio,
    /// Anything else.
    None,
}

impl Mesh {
    /// The lowercase label used in JSON and Prometheus.
    pub fn as_str(self) -> &'static str {
        match self {
            Mesh::Istio => "istio",
            Mesh::None => "none",
        }
    }
}

impl fmt::Display for Mesh {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Plaintext sub-protocol, where recognisable (h2c includes plaintext gRPC).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Http1,
    H2c,
    Postgres,
    Mysql,
    Redis,
    Other,
}

impl Protocol {
    /// The lowercase label used in JSON and Prometheus.
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Http1 => "http1",
            Protocol::H2c => "h2c",
            Protocol::Postgres => "postgres",
            Protocol::Mysql => "mysql",
            Protocol::Redis => "redis",
            Protocol::Other => "other",
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Which rule decided a verdict.
///
/// `Display` gives the detailed text used in JSON (`client_first_record_len=465`,
/// `resumed_from=1.2.3.4:443`); [`Evidence::kind`] gives a bounded label for Prometheus.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Evidence {
    /// TLS <= 1.2: the server sent a CertificateRequest but the client's answer was not seen.
    CertRequest,
    /// TLS <= 1.2: the client sent a Certificate message with at least one certificate.
    ClientCertificate,
    /// TLS <= 1.2: the client answered a CertificateRequest with an empty Certificate.
    ClientCertificateEmpty,
    /// TLS <= 1.2: the client's second flight starts with ClientKeyExchange (no Certificate).
    NoClientCertificate,
    /// TLS 1.3: length of the client's first encrypted record (>= 128 and the second record
    /// shows no padding that could explain it: a Certificate; 20..128: none).
    ClientFirstRecordLen(u16),
    /// TLS 1.3: the client pads its records (RFC 8446 §5.4): the lengths of its first two
    /// encrypted records share a block so large that the first could be a padded Finished.
    ClientRecordsPadded(u16, u16),
    /// TLS 1.3: the connection ended after a single large client record; without a second one
    /// padding cannot be ruled out.
    ClientFirstRecordAlone(u16),
    /// Resumed session; client authentication inherited from the full handshake with this server.
    ResumedFrom(SocketAddr),
    /// Resumed session whose full handshake was not seen.
    ResumedUnknown,
    /// The first client bytes are not a TLS record.
    PlaintextFirstBytes,
    /// The server spoke first with a recognised plaintext greeting (MySQL, SSH, SMTP, ...).
    ServerBanner,
    /// Mid-stream connection: a TLS record header at the start of a segment.
    MidstreamRecordHeader,
    /// Mid-stream connection: an HTTP/1 request or status line at the start of a segment.
    MidstreamHttp,
    /// Mid-stream connection with no recognisable boundary: never guessed.
    MidstreamNoBoundary,
    /// No payload at all was seen.
    NoData,
    /// Payload was seen but the deciding part of the handshake was not.
    HandshakeIncomplete,
    /// The kernel could not hand over some of the connection's bytes (its ring buffer was full):
    /// the capture is incomplete, so nothing is guessed.
    EventsLost,
    /// A plaintext TLS alert ended the handshake before the deciding message.
    HandshakeAlert,
    /// This node saw the connection in one direction only (the kernel saw one side acknowledge
    /// or answer traffic of the other that never passed a hook here, e.g. behind a CNI's
    /// `bpf_redirect_peer`): the rules need both, so nothing is guessed.
    OneDirection,
    /// The client spoke TLS but the server answered with something that is not TLS.
    ServerNotTls,
    /// The bytes claim to be TLS but cannot be parsed (or are too large to hold).
    Malformed,
}

impl Evidence {
    /// A bounded, snake_case label (no per-connection values) for Prometheus.
    pub fn kind(&self) -> &'static str {
        match self {
            Evidence::CertRequest => "cert_request",
            Evidence::ClientCertificate => "client_certificate",
            Evidence::ClientCertificateEmpty => "client_certificate_empty",
            Evidence::NoClientCertificate => "no_client_certificate",
            Evidence::ClientFirstRecordLen(_) => "client_first_record_len",
            Evidence::ClientRecordsPadded(..) => "client_records_padded",
            Evidence::ClientFirstRecordAlone(_) => "client_first_record_alone",
            Evidence::ResumedFrom(_) => "resumed_from",
            Evidence::ResumedUnknown => "resumed_unknown",
            Evidence::PlaintextFirstBytes => "plaintext_first_bytes",
            Evidence::ServerBanner => "server_banner",
            Evidence::MidstreamRecordHeader => "midstream_record_header",
            Evidence::MidstreamHttp => "midstream_http",
            Evidence::MidstreamNoBoundary => "midstream_no_boundary",
            Evidence::NoData => "no_data",
            Evidence::HandshakeIncomplete => "handshake_incomplete",
            Evidence::EventsLost => "events_lost",
            Evidence::HandshakeAlert => "handshake_alert",
            Evidence::OneDirection => "one_direction",
            Evidence::ServerNotTls => "server_not_tls",
            Evidence::Malformed => "malformed",
        }
    }
}

impl fmt::Display for Evidence {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Evidence::ClientFirstRecordLen(len) => write!(f, "client_first_record_len={len}"),
            Evidence::ClientRecordsPadded(first, second) => {
                write!(f, "client_records_padded={first},{second}")
            }
            Evidence::ClientFirstRecordAlone(len) => write!(f, "client_first_record_alone={len}"),
            Evidence::ResumedFrom(addr) => write!(f, "resumed_from={addr}"),
            other => f.write_str(other.kind()),
        }
    }
}

/// Serialised as its `Display` text, the form the JSON outputs use.
impl serde::Serialize for Evidence {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

/// The classification of one connection.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Verdict {
    pub security: Security,
    pub mesh: Mesh,
    /// Negotiated version: "1.0" "1.1" "1.2" "1.3" (None when the ServerHello was not seen).
    pub tls_version: Option<&'static str>,
    /// ALPN protocols offered by the client, in order.
    pub alpn: Vec<String>,
    pub sni: Option<String>,
    /// IANA name of the cipher suite chosen in the ServerHello, if known.
    pub cipher: Option<String>,
    /// Plaintext sub-protocol (Some only for plaintext).
    pub protocol: Option<Protocol>,
    pub evidence: Evidence,
    pub resumed: bool,
    /// spiffe:// SAN URIs of the client certificate (visible in TLS <= 1.2 only).
    pub client_spiffe: Vec<String>,
    /// spiffe:// SAN URIs of the server certificate (visible in TLS <= 1.2 only).
    pub server_spiffe: Vec<String>,
}

impl Verdict {
    /// A verdict with nothing known but the security and the evidence.
    pub fn new(security: Security, evidence: Evidence) -> Self {
        Verdict {
            security,
            mesh: Mesh::None,
            tls_version: None,
            alpn: Vec::new(),
            sni: None,
            cipher: None,
            protocol: None,
            evidence,
            resumed: false,
            client_spiffe: Vec::new(),
            server_spiffe: Vec::new(),
        }
    }

    /// `Unknown` with the given evidence.
    pub fn unknown(evidence: Evidence) -> Self {
        Verdict::new(Security::Unknown, evidence)
    }

    /// `Plaintext` with a sub-protocol.
    pub fn plaintext(protocol: Protocol, evidence: Evidence) -> Self {
        let mut v = Verdict::new(Security::Plaintext, evidence);
        v.protocol = Some(protocol);
        v
    }
}

/// Direction of a segment relative to the connection's client (the side that sent the SYN).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    ToServer,
    ToClient,
}

/// What is known about a connection before its payload.
#[derive(Debug, Clone, Copy)]
pub struct ConnMeta {
    pub client: SocketAddr,
    pub server: SocketAddr,
    /// Initial sequence numbers from the SYN / SYN-ACK when seen (the first payload byte then has seq isn+1).
    pub client_isn: Option<u32>,
    pub server_isn: Option<u32>,
    /// true when the handshake (SYN) was not seen: connection open before capture started.
    pub midstream: bool,
}

/// Classifies one TCP connection from its first payload segments.
///
/// Memory per connection is bounded: each direction buffers at most
/// `reassembly::STREAM_CAP` (16 KiB) bytes, and both buffers are released once the verdict is final.
#[derive(Debug)]
pub struct ConnClassifier {
    meta: ConnMeta,
    client: Stream,
    server: Stream,
    /// Counts `on_segment` calls: the arrival order of segments, used to tell TLS 1.3 early data
    /// (sent before the ServerHello arrived) from the client's handshake flight.
    tick: u64,
    /// Any payload seen at all (also mid-stream, where nothing is buffered).
    seen_payload: bool,
    /// Bytes parsed so far without a decision, and the buffered length at the last parse (see
    /// [`Self::worth_deciding`]).
    parsed_total: usize,
    parsed_len: usize,
    verdict: Option<Verdict>,
}

impl ConnClassifier {
    pub fn new(meta: ConnMeta) -> Self {
        ConnClassifier {
            client: Stream::new(meta.client_isn),
            server: Stream::new(meta.server_isn),
            meta,
            tick: 0,
            seen_payload: false,
            parsed_total: 0,
            parsed_len: 0,
            verdict: None,
        }
    }

    pub fn meta(&self) -> &ConnMeta {
        &self.meta
    }

    /// Feed one captured segment. `seq` is the TCP sequence number of `payload[0]`. `payload` may be
    /// shorter than the segment on the wire (capture cap) — then `wire_len` is larger; bytes past the
    /// capture are a gap. Returns true when this call made the verdict final.
    pub fn on_segment(
        &mut self,
        dir: Direction,
        seq: u32,
        payload: &[u8],
        wire_len: u32,
        cache: &mut ResumptionCache,
    ) -> bool {
        if self.verdict.is_some() || (payload.is_empty() && wire_len == 0) {
            return false;
        }
        self.tick += 1;
        self.seen_payload = true;
        if self.meta.midstream {
            // Mid-stream there is no offset 0 to reassemble from: each segment is judged alone.
            return match midstream::classify_segment(payload) {
                Some(v) => {
                    self.settle(v, cache);
                    true
                }
                None => false,
            };
        }
        let stream = match dir {
            Direction::ToServer => &mut self.client,
            Direction::ToClient => &mut self.server,
        };
        let before = stream.contiguous_len();
        stream.insert(seq, payload, wire_len, self.tick);
        if stream.contiguous_len() == before || !self.worth_deciding() {
            return false;
        }
        match self.decide(cache, false) {
            Some(v) => {
                self.settle(v, cache);
                true
            }
            None => false,
        }
    }

    /// Each decision re-parses the buffered prefixes from the start, which is cheap for the few
    /// segments a real handshake takes. A hostile sender trickling one byte per segment would make
    /// that quadratic, so once `PARSE_BUDGET` bytes have been parsed without a decision, parse
    /// again only when `REPARSE_STEP` more bytes arrived or a buffer is full (at most
    /// 2 * STREAM_CAP / REPARSE_STEP more parses). `finish` always decides.
    fn worth_deciding(&mut self) -> bool {
        const PARSE_BUDGET: usize = 1 << 20;
        const REPARSE_STEP: usize = 512;
        let len = self.client.contiguous_len() + self.server.contiguous_len();
        let full = self.client.contiguous_len() >= reassembly::STREAM_CAP
            || self.server.contiguous_len() >= reassembly::STREAM_CAP;
        if self.parsed_total >= PARSE_BUDGET && len < self.parsed_len + REPARSE_STEP && !full {
            return false;
        }
        self.parsed_len = len;
        self.parsed_total = self.parsed_total.saturating_add(len);
        true
    }

    /// Final verdict if decided.
    pub fn verdict(&self) -> Option<&Verdict> {
        self.verdict.as_ref()
    }

    /// The connection ended (FIN/RST/idle): return the final verdict, deciding now with what was seen
    /// (never guessing plaintext: not enough bytes => Unknown with evidence NoData / HandshakeIncomplete).
    pub fn finish(&mut self, cache: &mut ResumptionCache) -> Verdict {
        if let Some(v) = &self.verdict {
            return v.clone();
        }
        let v = if self.meta.midstream {
            Verdict::unknown(if self.seen_payload {
                Evidence::MidstreamNoBoundary
            } else {
                Evidence::NoData
            })
        } else {
            self.decide(cache, true)
                .unwrap_or_else(|| Verdict::unknown(Evidence::HandshakeIncomplete))
        };
        self.settle(v.clone(), cache);
        v
    }

    /// Record a final verdict, teach the resumption cache, free the buffers.
    fn settle(&mut self, v: Verdict, cache: &mut ResumptionCache) {
        let full_handshake = matches!(
            v.evidence,
            Evidence::ClientCertificate
                | Evidence::ClientCertificateEmpty
                | Evidence::NoClientCertificate
                | Evidence::ClientFirstRecordLen(_)
        );
        if full_handshake && matches!(v.security, Security::Mtls | Security::Tls) {
            cache.record(self.meta.client.ip(), self.meta.server, v.security);
        }
        self.client.release();
        self.server.release();
        self.verdict = Some(v);
    }

    /// Decide from the contiguous prefixes of both directions. With `finishing` false, returns
    /// Some only for a final answer; with `finishing` true, always answers.
    fn decide(&self, cache: &mut ResumptionCache, finishing: bool) -> Option<Verdict> {
        let pending = |e: Evidence| finishing.then(|| Verdict::unknown(e));
        let c = self.client.contiguous();
        let s = self.server.contiguous();
        if c.is_empty() && s.is_empty() {
            let seen = self.client.seen() || self.server.seen();
            return pending(if seen {
                Evidence::HandshakeIncomplete
            } else {
                Evidence::NoData
            });
        }

        // PostgreSQL asks for TLS in plaintext first (SSLRequest, answered 'S' or 'N').
        let mut coff = 0usize;
        let mut soff = 0usize;
        for _ in 0..3 {
            let rest = c.get(coff..).unwrap_or_default();
            let ssl = match plaintext::pg_preamble(rest) {
                plaintext::Preamble::None => break,
                plaintext::Preamble::NeedMore => return pending(Evidence::HandshakeIncomplete),
                plaintext::Preamble::Ssl => true,
                plaintext::Preamble::Gss => false,
            };
            match s.get(soff) {
                None => return pending(Evidence::HandshakeIncomplete),
                Some(b'S') if ssl => {
                    return tls::decide(
                        &self.meta,
                        &self.client,
                        coff + 8,
                        &self.server,
                        soff + 1,
                        cache,
                        finishing,
                    );
                }
                Some(b'N') => {
                    coff += 8;
                    soff += 1;
                }
                // 'G' (GSSAPI encryption, not TLS) or an error: the client's bytes were not TLS.
                Some(_) => {
                    return Some(Verdict::plaintext(
                        Protocol::Postgres,
                        Evidence::PlaintextFirstBytes,
                    ));
                }
            }
        }

        let rest = c.get(coff..).unwrap_or_default();
        match plaintext::tls_client_start(rest) {
            plaintext::Prefix::Yes => {
                return tls::decide(
                    &self.meta,
                    &self.client,
                    coff,
                    &self.server,
                    soff,
                    cache,
                    finishing,
                );
            }
            plaintext::Prefix::Maybe if !rest.is_empty() => {
                return pending(Evidence::HandshakeIncomplete);
            }
            _ => {}
        }
        // A TLS record header of another type (ChangeCipherSpec, alert, application data) as the
        // client's first bytes: TLS-looking junk, never plaintext.
        if rest.len() >= 3
            && records::record_start(
                rest,
                &[
                    records::CT_CHANGE_CIPHER_SPEC,
                    records::CT_ALERT,
                    records::CT_APPLICATION_DATA,
                    records::CT_HEARTBEAT,
                ],
            ) == records::Prefix::Yes
        {
            return Some(Verdict::unknown(Evidence::Malformed));
        }

        // MySQL: the server greets first; a client SSL request switches to TLS.
        if coff == 0 {
            match plaintext::mysql_greeting_len(s) {
                plaintext::Detect::Found(glen) => {
                    if rest.is_empty() {
                        return finishing
                            .then(|| Verdict::plaintext(Protocol::Mysql, Evidence::ServerBanner));
                    }
                    return match plaintext::mysql_ssl_request(rest) {
                        plaintext::Detect::Found(n) => tls::decide(
                            &self.meta,
                            &self.client,
                            n,
                            &self.server,
                            glen,
                            cache,
                            finishing,
                        ),
                        plaintext::Detect::Maybe if !finishing => None,
                        _ => Some(Verdict::plaintext(
                            Protocol::Mysql,
                            Evidence::PlaintextFirstBytes,
                        )),
                    };
                }
                plaintext::Detect::Maybe if rest.is_empty() => {
                    return pending(Evidence::HandshakeIncomplete);
                }
                _ => {}
            }
        }

        let first_complete = coff == 0 && self.client.first_segment_complete();
        if !rest.is_empty()
            && let Some(p) = plaintext::classify_client(rest, first_complete, finishing)
        {
            return Some(Verdict::plaintext(p, Evidence::PlaintextFirstBytes));
        }
        // Client bytes undecided or absent: a recognised server greeting settles it.
        if coff == 0
            && let plaintext::Detect::Found(p) = plaintext::server_banner(s)
        {
            return Some(Verdict::plaintext(p, Evidence::ServerBanner));
        }
        pending(Evidence::HandshakeIncomplete)
    }
}

/// "istio" when the ClientHello offers an Istio ALPN, or mTLS to the ambient HBONE port.
fn mesh_of(alpn: &[String], security: Security, server_port: u16) -> Mesh {
    const ISTIO_ALPN: [&str; 5] = [
        "istio",
        "istio-peer-exchange",
        "istio-http/1.0",
        "istio-http/1.1",
        "istio-h2",
    ];
    if alpn.iter().any(|a| ISTIO_ALPN.contains(&a.as_str()))
        || (security == Security::Mtls && server_port == 15008)
    {
        Mesh::Istio
    } else {
        Mesh::None
    }
}
