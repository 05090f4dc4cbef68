//! TLS verdict rules (DESIGN.md "Verdicts").
//!
//! * TLS <= 1.2: the client's second flight is plaintext. A Certificate with at least one
//!   certificate is mTLS; an empty one (answering a CertificateRequest) or a flight that starts with
//!   ClientKeyExchange is one-way TLS.
//! * TLS 1.3: everything after the ServerHello is encrypted, but record sizes are not. The client's
//!   first ApplicationData record after its (last) ClientHello, skipping ChangeCipherSpec, carries
//!   either its Certificate (hundreds of bytes: OpenSSL sends 465 with DESIGN.md's certificate,
//!   529-853 with the test PKI's) or only a Finished (53 bytes with SHA-256 suites, 69 with
//!   SHA-384; an empty Certificate plus Finished stays under 100). 128 is the threshold.
//! * TLS 1.3 record padding (RFC 8446 §5.4): a client may pad every record to a multiple of a
//!   block (OpenSSL `-record_padding N`: inner plaintext plus its content-type byte rounded up to
//!   a multiple of N, so each record is `k*N + 16`). A padded Finished is then as large as a
//!   Certificate, so a first record of 128 or more proves nothing alone. The second client record
//!   tells: with `a = first - 16`, `b = second - 16` and `g = gcd(a, b)`, a client padding to a
//!   block that fits both records pads by less than `g`, so the first record holds at least
//!   `a - g + 1` bytes of content. More than [`NO_CERT_CONTENT_MAX`] (61: an empty Certificate and
//!   a SHA-384 Finished plus the content type) is a certificate: `mtls`. Otherwise the first
//!   record may be a padded Finished: `unknown`, evidence `client_records_padded`. An unpadded
//!   client's second record is its CertificateVerify, its Finished (53/69: `g` is 1, 37 or 53)
//!   or application data, and `g` that large needs `b` to be a multiple of `a` (for a first
//!   record of 138 or more), so unpadded stacks keep the first-record verdict. A client padding
//!   by amounts that are not a block multiple (random padding) cannot be told from the sizes.
//!
//!   Bytes read, and when the verdict is final: only the 5-byte headers (type 23, length) of at
//!   most the first two ApplicationData records the client sends after its ClientHello
//!   (ChangeCipherSpec and, with early data offered, records captured before the ServerHello
//!   skipped). Final after the first when it is under 128 bytes (`tls`, or `unknown` /
//!   `handshake_alert` at 19 or less); otherwise final after the second (`mtls` or `unknown` /
//!   `client_records_padded`). A connection that ends with only one record of 128 or more is
//!   `unknown` / `client_first_record_alone`. Stacks that send Certificate, CertificateVerify and
//!   Finished as separate records (OpenSSL, Node.js, Java, rustls) have both headers in the same
//!   flight; a stack that packs the whole flight into one record has its second record in the
//!   client's first application-data flight.
//! * Resumption (TLS 1.2 session id echo or abbreviated server flight, TLS 1.3 accepted PSK): the
//!   client certificate is not sent again, so the outcome is inherited from the last full handshake
//!   between the same client and server ([`ResumptionCache`]).
//! * TLS 1.3 early data: ApplicationData records the client sends before the ServerHello arrives
//!   are 0-RTT data, not its handshake flight. Their end cannot be known exactly (the acceptance is
//!   in the encrypted EncryptedExtensions), so when the ClientHello offered early_data the records
//!   whose first byte was captured before the ServerHello's last byte are skipped (capture order:
//!   the segments' arrival order). When the PSK was accepted, early data is irrelevant: the session
//!   is resumed and inherits.
//! * A fatal plaintext alert (or, in TLS 1.3, a first encrypted record too small to be anything
//!   but an alert) ends the handshake: `unknown` with `handshake_alert`, not one-way TLS.
//!
//! Decisions are final as soon as the deciding bytes are there. Without a ServerHello (the server
//! direction was not captured) nothing is final before the connection ends; then the client's
//! flight alone is used where it is unambiguous.

use super::hello::{
    self, ClientHelloInfo, ServerHelloInfo, TLS13, certificate_list_len, leaf_spiffe,
    parse_client_hello, parse_server_hello,
};
use super::reassembly::{STREAM_CAP, Stream};
use super::records::{
    CT_ALERT, CT_HANDSHAKE, HS_CERTIFICATE, HS_CERTIFICATE_REQUEST, HS_CLIENT_HELLO,
    HS_CLIENT_KEY_EXCHANGE, HS_NEW_SESSION_TICKET, HS_SERVER_HELLO, Item, Prefix, itemize,
    record_start,
};
use super::{ConnMeta, Evidence, ResumptionCache, Security, Verdict, mesh_of};

/// Smallest first client record (TLS 1.3) taken as carrying a Certificate.
pub(crate) const CERTIFICATE_RECORD_MIN: usize = 128;
/// Largest TLS 1.3 record that is an encrypted alert rather than a handshake flight.
const ENCRYPTED_ALERT_MAX: usize = 19;
/// AEAD expansion of a TLS 1.3 record: the 16-byte tag of every suite in use.
const AEAD_TAG: usize = 16;
/// Most content (with the inner content-type byte) a TLS 1.3 client's first encrypted record can
/// have without a certificate: an empty Certificate (8) and a SHA-384 Finished (4 + 48), plus 1.
pub(crate) const NO_CERT_CONTENT_MAX: usize = 61;

/// Server handshake message types that only a full TLS <= 1.2 handshake has.
const HS_SERVER_KEY_EXCHANGE: u8 = 12;
const HS_SERVER_HELLO_DONE: u8 = 14;
const HS_CERTIFICATE_STATUS: u8 = 22;

/// A decision, or what to answer if the connection ended now.
enum Step {
    Final(Verdict),
    Pending(Verdict),
}

/// Decide a connection whose client stream, from `coff` on, starts with a TLS handshake record
/// (and whose server stream's TLS starts at `soff`).
pub(crate) fn decide(
    meta: &ConnMeta,
    client: &Stream,
    coff: usize,
    server: &Stream,
    soff: usize,
    cache: &mut ResumptionCache,
    finishing: bool,
) -> Option<Verdict> {
    let ctx = Ctx {
        meta,
        client,
        coff,
        server,
        soff,
    };
    match ctx.step(cache) {
        Step::Final(v) => Some(v),
        Step::Pending(v) => finishing.then_some(v),
    }
}

struct Ctx<'a> {
    meta: &'a ConnMeta,
    client: &'a Stream,
    coff: usize,
    server: &'a Stream,
    soff: usize,
}

/// Whether a TLS <= 1.2 server flight after the ServerHello is a full or an abbreviated handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Flow {
    Unknown,
    /// Certificate / ServerKeyExchange / CertificateRequest / ServerHelloDone seen.
    Full,
    /// ServerHello, optional NewSessionTicket, ChangeCipherSpec: resumption.
    Abbreviated,
}

#[derive(Debug, PartialEq, Eq)]
enum ServerState {
    Waiting,
    NotTls,
    Malformed,
    Alert,
    Hello,
}

/// What the server stream says.
struct ServerView {
    state: ServerState,
    /// The final ServerHello (after a HelloRetryRequest, the second one).
    hello: Option<ServerHelloInfo>,
    hrr: bool,
    /// Arrival order of the end of the ServerHello.
    hello_tick: Option<u64>,
    flow: Flow,
    cert_request: bool,
    spiffe: Vec<String>,
}

impl ServerView {
    fn new(state: ServerState) -> Self {
        ServerView {
            state,
            hello: None,
            hrr: false,
            hello_tick: None,
            flow: Flow::Unknown,
            cert_request: false,
            spiffe: Vec::new(),
        }
    }
}

/// The declared length of a handshake message can never fit the buffer.
fn too_big(stream_off: usize, declared: Option<usize>) -> bool {
    declared.is_some_and(|d| stream_off.saturating_add(9).saturating_add(d) > STREAM_CAP)
}

impl Ctx<'_> {
    fn client_bytes(&self) -> &[u8] {
        self.client
            .contiguous()
            .get(self.coff..)
            .unwrap_or_default()
    }

    fn server_bytes(&self) -> &[u8] {
        self.server
            .contiguous()
            .get(self.soff..)
            .unwrap_or_default()
    }

    fn step(&self, cache: &mut ResumptionCache) -> Step {
        let c = self.client_bytes();
        let first = itemize(c, false);
        let ch_body = match first.items.first() {
            Some(Item::Handshake {
                typ: HS_CLIENT_HELLO,
                body,
                ..
            }) => body,
            Some(Item::PartialHandshake {
                typ: HS_CLIENT_HELLO,
                declared,
                ..
            }) => {
                // A ClientHello that can never fit the buffer is hostile or not TLS.
                if too_big(self.coff, *declared) {
                    return Step::Final(Verdict::unknown(Evidence::Malformed));
                }
                return Step::Pending(Verdict::unknown(Evidence::HandshakeIncomplete));
            }
            Some(_) => return Step::Final(Verdict::unknown(Evidence::Malformed)),
            None if first.malformed => return Step::Final(Verdict::unknown(Evidence::Malformed)),
            None => return Step::Pending(Verdict::unknown(Evidence::HandshakeIncomplete)),
        };
        let Some(ch) = parse_client_hello(ch_body) else {
            return Step::Final(Verdict::unknown(Evidence::Malformed));
        };

        let sv = self.server_view();
        let mut base = Verdict::unknown(Evidence::HandshakeIncomplete);
        base.alpn = ch.alpn.clone();
        base.sni = ch.sni.clone();
        base.server_spiffe = sv.spiffe.clone();
        let step = match (&sv.state, &sv.hello) {
            (ServerState::NotTls, _) => Step::Final(with(base, Evidence::ServerNotTls)),
            (ServerState::Malformed, _) => Step::Final(with(base, Evidence::Malformed)),
            (ServerState::Alert, _) => Step::Final(with(base, Evidence::HandshakeAlert)),
            (ServerState::Hello, Some(sh)) => {
                base.tls_version = hello::version_str(sh.version);
                base.cipher = hello::cipher_name(sh.cipher);
                self.with_server_hello(base, &ch, sh, &sv, cache)
            }
            // No ServerHello (yet): only the client's flight, and never final before the end.
            _ => match self.client_only(base, &ch, cache) {
                Step::Final(v) | Step::Pending(v) => Step::Pending(v),
            },
        };
        match step {
            Step::Final(v) => Step::Final(self.with_mesh(v)),
            Step::Pending(v) => Step::Pending(self.with_mesh(v)),
        }
    }

    fn with_mesh(&self, mut v: Verdict) -> Verdict {
        v.mesh = mesh_of(&v.alpn, v.security, self.meta.server.port());
        v
    }

    fn server_view(&self) -> ServerView {
        let s = self.server_bytes();
        if s.is_empty() {
            return ServerView::new(ServerState::Waiting);
        }
        match record_start(s, &[CT_HANDSHAKE, CT_ALERT]) {
            Prefix::No => return ServerView::new(ServerState::NotTls),
            Prefix::Maybe => return ServerView::new(ServerState::Waiting),
            Prefix::Yes => {}
        }
        let mut items = itemize(s, false);
        let mut view = ServerView::new(ServerState::Waiting);
        let (first_sh, end) = match items.items.first() {
            Some(Item::Handshake {
                typ: HS_SERVER_HELLO,
                body,
                end,
            }) => match parse_server_hello(body) {
                Some(sh) => (sh, *end),
                None => return ServerView::new(ServerState::Malformed),
            },
            Some(Item::PartialHandshake {
                typ: HS_SERVER_HELLO,
                declared,
                ..
            }) if !too_big(self.soff, *declared) => return view,
            Some(Item::Alert { .. }) => return ServerView::new(ServerState::Alert),
            Some(_) => return ServerView::new(ServerState::Malformed),
            None if items.malformed => return ServerView::new(ServerState::Malformed),
            None => return view,
        };
        let mut hello_idx = 0;
        let mut hello_end = end;
        let mut sh = first_sh;
        if sh.hrr {
            // HelloRetryRequest, [ChangeCipherSpec], then the real ServerHello in plaintext.
            view.hrr = true;
            items = itemize(s, true);
            let mut found = None;
            for (i, item) in items.items.iter().enumerate().skip(1) {
                match item {
                    Item::ChangeCipherSpec => continue,
                    Item::Handshake {
                        typ: HS_SERVER_HELLO,
                        body,
                        end,
                    } => {
                        found = Some((i, parse_server_hello(body), *end));
                        break;
                    }
                    Item::Alert { .. } => return ServerView::new(ServerState::Alert),
                    Item::PartialHandshake { .. } => break,
                    _ => return ServerView::new(ServerState::Malformed),
                }
            }
            match found {
                None => return view,
                Some((i, Some(second), end)) if !second.hrr => {
                    hello_idx = i;
                    hello_end = end;
                    sh = second;
                }
                Some(_) => return ServerView::new(ServerState::Malformed),
            }
        }
        view.state = ServerState::Hello;
        view.hello_tick = self
            .server
            .tick_of((self.soff + hello_end).saturating_sub(1));
        if sh.version < TLS13 {
            let after = items.items.get(hello_idx + 1..).unwrap_or_default();
            self.scan_server_flight(after, &mut view);
        }
        view.hello = Some(sh);
        view
    }

    /// TLS <= 1.2: what follows the ServerHello tells full from abbreviated handshakes.
    fn scan_server_flight(&self, items: &[Item<'_>], view: &mut ServerView) {
        for item in items {
            match item {
                Item::Handshake {
                    typ: HS_CERTIFICATE,
                    body,
                    ..
                } => {
                    view.flow = Flow::Full;
                    view.spiffe = leaf_spiffe(body);
                }
                Item::Handshake { typ, .. } | Item::PartialHandshake { typ, .. }
                    if matches!(
                        *typ,
                        HS_CERTIFICATE
                            | HS_SERVER_KEY_EXCHANGE
                            | HS_CERTIFICATE_REQUEST
                            | HS_SERVER_HELLO_DONE
                            | HS_CERTIFICATE_STATUS
                    ) =>
                {
                    view.flow = Flow::Full;
                    if *typ == HS_CERTIFICATE_REQUEST {
                        view.cert_request = true;
                    }
                }
                Item::Handshake {
                    typ: HS_NEW_SESSION_TICKET,
                    ..
                } => {}
                Item::ChangeCipherSpec => {
                    if view.flow == Flow::Unknown {
                        view.flow = Flow::Abbreviated;
                    }
                    return;
                }
                _ => return,
            }
        }
    }

    fn with_server_hello(
        &self,
        base: Verdict,
        ch: &ClientHelloInfo,
        sh: &ServerHelloInfo,
        sv: &ServerView,
        cache: &mut ResumptionCache,
    ) -> Step {
        if sh.version >= TLS13 {
            if sh.psk {
                return Step::Final(self.resumed(base, cache));
            }
            return self.tls13_flight(base, ch, sv);
        }
        let sid_echo = !ch.session_id.is_empty() && sh.session_id == ch.session_id;
        if sid_echo || sv.flow == Flow::Abbreviated {
            return Step::Final(self.resumed(base, cache));
        }
        self.tls12_flight(base, sv, cache)
    }

    /// Inherit client authentication from the last full handshake with this server.
    fn resumed(&self, mut v: Verdict, cache: &mut ResumptionCache) -> Verdict {
        v.resumed = true;
        match cache.lookup(self.meta.client.ip(), self.meta.server) {
            Some((security, from)) => {
                v.security = security;
                v.evidence = Evidence::ResumedFrom(from);
            }
            None => {
                v.security = Security::Unknown;
                v.evidence = Evidence::ResumedUnknown;
            }
        }
        v
    }

    /// TLS 1.3 full handshake: size of the client's first encrypted record.
    fn tls13_flight(&self, base: Verdict, ch: &ClientHelloInfo, sv: &ServerView) -> Step {
        let items = itemize(self.client_bytes(), true);
        let mut rest = items.items.iter().skip(1);
        if sv.hrr {
            // Skip to the second ClientHello; anything before it (early data) is rejected.
            loop {
                match rest.next() {
                    Some(Item::Handshake {
                        typ: HS_CLIENT_HELLO,
                        ..
                    }) => break,
                    Some(Item::Alert { fatal: true }) => {
                        return Step::Final(with(base, Evidence::HandshakeAlert));
                    }
                    None | Some(Item::PartialHandshake { .. }) => {
                        return self.incomplete(base, items.malformed);
                    }
                    Some(_) => continue,
                }
            }
        }
        let skip_early = ch.early_data && !sv.hrr;
        let mut first = None;
        for item in rest {
            match item {
                Item::ChangeCipherSpec | Item::Handshake { .. } | Item::Encrypted { .. } => {}
                Item::AppData { offset, len } => {
                    if skip_early && self.before_server_hello(*offset, sv) {
                        continue;
                    }
                    match first {
                        None => match first_record_verdict(base.clone(), *len) {
                            Some(v) => return Step::Final(v),
                            None => first = Some(*len),
                        },
                        Some(f) => return Step::Final(two_records_verdict(base, f, *len)),
                    }
                }
                Item::Alert { fatal: true } if first.is_none() => {
                    return Step::Final(with(base, Evidence::HandshakeAlert));
                }
                Item::Alert { .. } => {}
                Item::PartialHandshake { .. } => break,
            }
        }
        match first {
            Some(f) => Step::Pending(one_record_verdict(base, f)),
            None => self.incomplete(base, items.malformed),
        }
    }

    /// The client record at `offset` was captured before the end of the ServerHello.
    fn before_server_hello(&self, offset: usize, sv: &ServerView) -> bool {
        match (self.client.tick_of(self.coff + offset), sv.hello_tick) {
            (Some(record), Some(hello)) => record < hello,
            _ => false,
        }
    }

    fn incomplete(&self, base: Verdict, malformed: bool) -> Step {
        if malformed {
            Step::Final(with(base, Evidence::Malformed))
        } else {
            Step::Pending(with(base, Evidence::HandshakeIncomplete))
        }
    }

    /// TLS <= 1.2 full handshake: the client's second flight.
    fn tls12_flight(&self, base: Verdict, sv: &ServerView, cache: &mut ResumptionCache) -> Step {
        let items = itemize(self.client_bytes(), false);
        for item in items.items.iter().skip(1) {
            if let Some(step) = self.tls12_rule(base.clone(), item) {
                return step;
            }
            return match item {
                Item::Alert { fatal: false } => continue,
                Item::Alert { fatal: true } => Step::Final(with(base, Evidence::HandshakeAlert)),
                Item::ChangeCipherSpec if sv.flow != Flow::Full => {
                    Step::Final(self.resumed(base, cache))
                }
                _ => Step::Final(with(base, Evidence::Malformed)),
            };
        }
        if items.malformed {
            return Step::Final(with(base, Evidence::Malformed));
        }
        Step::Pending(with(
            base,
            if sv.cert_request {
                Evidence::CertRequest
            } else {
                Evidence::HandshakeIncomplete
            },
        ))
    }

    /// The client-certificate rules of TLS <= 1.2 for the first message after the ClientHello.
    fn tls12_rule(&self, mut v: Verdict, item: &Item<'_>) -> Option<Step> {
        match item {
            Item::Handshake {
                typ: HS_CERTIFICATE,
                body,
                ..
            } => Some(Step::Final(match certificate_list_len(body) {
                Some(n) if n > 0 => {
                    v.client_spiffe = leaf_spiffe(body);
                    with_security(v, Security::Mtls, Evidence::ClientCertificate)
                }
                _ => with_security(v, Security::Tls, Evidence::ClientCertificateEmpty),
            })),
            Item::PartialHandshake {
                typ: HS_CERTIFICATE,
                declared,
                body,
            } => match certificate_list_len(body) {
                Some(0) => Some(Step::Final(with_security(
                    v,
                    Security::Tls,
                    Evidence::ClientCertificateEmpty,
                ))),
                // At least one certificate: mTLS. Wait for the whole message for the SPIFFE IDs,
                // unless it can never fit the buffer.
                Some(_) => {
                    let v = with_security(v, Security::Mtls, Evidence::ClientCertificate);
                    Some(if too_big(self.coff, *declared) {
                        Step::Final(v)
                    } else {
                        Step::Pending(v)
                    })
                }
                None => Some(Step::Pending(v)),
            },
            Item::Handshake {
                typ: HS_CLIENT_KEY_EXCHANGE,
                ..
            }
            | Item::PartialHandshake {
                typ: HS_CLIENT_KEY_EXCHANGE,
                ..
            } => Some(Step::Final(with_security(
                v,
                Security::Tls,
                Evidence::NoClientCertificate,
            ))),
            _ => None,
        }
    }

    /// No ServerHello: judge from the client's flight where it is unambiguous.
    fn client_only(
        &self,
        base: Verdict,
        ch: &ClientHelloInfo,
        cache: &mut ResumptionCache,
    ) -> Step {
        let items = itemize(self.client_bytes(), false);
        let mut hrr = false;
        let mut first = None;
        for item in items.items.iter().skip(1) {
            if let Some(f) = first {
                // TLS 1.3 only: the second encrypted record settles a large first one.
                match item {
                    Item::AppData { len, .. } => {
                        return Step::Final(two_records_verdict(base, f, *len));
                    }
                    Item::Alert { .. } => continue,
                    _ => break,
                }
            }
            if let Some(step) = self.tls12_rule(base.clone(), item) {
                return step;
            }
            match item {
                Item::Handshake {
                    typ: HS_CLIENT_HELLO,
                    ..
                } => hrr = true,
                Item::ChangeCipherSpec => {}
                Item::Encrypted { body } => {
                    if body.is_some_and(looks_like_client_hello) {
                        // TLS 1.3: the second ClientHello after ChangeCipherSpec.
                        hrr = true;
                    } else {
                        // TLS <= 1.2: ChangeCipherSpec then the encrypted Finished, no key
                        // exchange: an abbreviated handshake.
                        return Step::Final(self.resumed(base, cache));
                    }
                }
                Item::AppData { len, .. } => {
                    // Early data cannot be told from the flight without the ServerHello's timing,
                    // except after a HelloRetryRequest, which rejects it.
                    let no_early_data = !ch.early_data || hrr;
                    if ch.versions.contains(&TLS13) && !ch.psk && no_early_data {
                        match first_record_verdict(base.clone(), *len) {
                            Some(v) => return Step::Final(v),
                            None => first = Some(*len),
                        }
                        continue;
                    }
                    break;
                }
                Item::Alert { fatal: true } => {
                    return Step::Pending(with(base, Evidence::HandshakeAlert));
                }
                Item::Alert { fatal: false } => {}
                _ => break,
            }
        }
        match first {
            Some(f) => Step::Pending(one_record_verdict(base, f)),
            None => Step::Pending(base),
        }
    }
}

/// A plaintext-looking ClientHello inside a record read as encrypted.
fn looks_like_client_hello(body: &[u8]) -> bool {
    match body {
        [HS_CLIENT_HELLO, a, b, c, ..] => {
            let len = (usize::from(*a) << 16) | (usize::from(*b) << 8) | usize::from(*c);
            len + 4 == body.len() && parse_client_hello(body.get(4..).unwrap_or_default()).is_some()
        }
        _ => false,
    }
}

/// TLS 1.3 rule on the client's first encrypted record, when it decides alone. The smallest
/// records are encrypted alerts (2 bytes + content type + 16-byte tag = 19): the client gave up on
/// the handshake (e.g. it rejected the server certificate). Any flight is larger: an empty
/// Certificate alone is 25. (CCM_8 suites, with an 8-byte tag, would make an empty Certificate 17;
/// nobody uses them.) Under 128 there is no certificate, padded or not (padding only adds).
/// None: 128 or more, which the second record must confirm (see the module doc on padding).
fn first_record_verdict(v: Verdict, len: usize) -> Option<Verdict> {
    if len <= ENCRYPTED_ALERT_MAX {
        return Some(with(v, Evidence::HandshakeAlert));
    }
    (len < CERTIFICATE_RECORD_MIN)
        .then(|| with_security(v, Security::Tls, Evidence::ClientFirstRecordLen(len16(len))))
}

/// TLS 1.3: a first record of 128 or more, judged with the second record's length.
fn two_records_verdict(v: Verdict, first: usize, second: usize) -> Verdict {
    if first_record_may_be_padding(first, second) {
        with(
            v,
            Evidence::ClientRecordsPadded(len16(first), len16(second)),
        )
    } else {
        with_security(
            v,
            Security::Mtls,
            Evidence::ClientFirstRecordLen(len16(first)),
        )
    }
}

/// TLS 1.3: the connection ended after one client record of 128 or more.
fn one_record_verdict(v: Verdict, first: usize) -> Verdict {
    with(v, Evidence::ClientFirstRecordAlone(len16(first)))
}

/// Could a client padding both records to a common block have sent no certificate in `first`?
/// It pads each record by less than the block, and the block divides the gcd of both records'
/// plaintext lengths, so `first` carries at least `a - g + 1` bytes of content.
pub(crate) fn first_record_may_be_padding(first: usize, second: usize) -> bool {
    if second <= AEAD_TAG {
        // Not a record a TLS 1.3 stack can send: no block to share.
        return false;
    }
    let a = first.saturating_sub(AEAD_TAG);
    let g = gcd(a, second - AEAD_TAG);
    a.saturating_sub(g) < NO_CERT_CONTENT_MAX
}

fn gcd(mut a: usize, mut b: usize) -> usize {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

fn len16(len: usize) -> u16 {
    u16::try_from(len).unwrap_or(u16::MAX)
}

fn with(mut v: Verdict, evidence: Evidence) -> Verdict {
    v.security = Security::Unknown;
    v.evidence = evidence;
    v
}

fn with_security(mut v: Verdict, security: Security, evidence: Evidence) -> Verdict {
    v.security = security;
    v.evidence = evidence;
    v
}
