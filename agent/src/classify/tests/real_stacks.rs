//! Real TLS stacks: `openssl s_server` and `openssl s_client` (OpenSSL 3) talk through an in-test
//! TCP relay on 127.0.0.1 that records both byte streams with the chunk boundaries it read. The
//! recordings are fed to the classifier as recorded, re-chunked into 500- and 1400-byte segments,
//! and scrambled (duplicated, overlapping, shuffled); every variant must give the same verdict.
//!
//! Certificates come from a throwaway CA made with the `openssl` CLI in a temporary directory; the
//! client certificate carries `spiffe://cluster.local/ns/shop/sa/web`. Without `openssl` these
//! tests fail: they never skip.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use super::*;

const TIMEOUT: Duration = Duration::from_secs(30);
const CLIENT_SPIFFE: &str = "spiffe://cluster.local/ns/shop/sa/web";
const SERVER_SPIFFE: &str = "spiffe://cluster.local/ns/shop/sa/api";

/// A byte stream as the relay read it: direction and chunk, in order of reading.
type Chunks = Vec<(Direction, Vec<u8>)>;

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("cannot run the openssl CLI (these tests need it): {e}"));
    assert!(
        out.status.success(),
        "openssl {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A throwaway CA with a server and a client certificate.
struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    fn new() -> Pki {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let ec = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
        ];
        let mut args = vec!["req", "-x509"];
        args.extend(ec);
        args.extend([
            "-keyout",
            "ca.key",
            "-out",
            "ca.crt",
            "-subj",
            "/CN=test-ca",
            "-days",
            "2",
        ]);
        openssl(d, &args);
        std::fs::write(
            d.join("server.ext"),
            format!("subjectAltName=DNS:server.local,URI:{SERVER_SPIFFE}\n"),
        )
        .unwrap();
        std::fs::write(
            d.join("client.ext"),
            format!("subjectAltName=URI:{CLIENT_SPIFFE}\nextendedKeyUsage=clientAuth\n"),
        )
        .unwrap();
        for name in ["server", "client"] {
            let (key, csr, crt, ext) = (
                format!("{name}.key"),
                format!("{name}.csr"),
                format!("{name}.crt"),
                format!("{name}.ext"),
            );
            let subj = format!("/CN={name}");
            let mut args = vec!["req"];
            args.extend(ec);
            args.extend(["-keyout", &key, "-out", &csr, "-subj", &subj]);
            openssl(d, &args);
            openssl(
                d,
                &[
                    "x509",
                    "-req",
                    "-in",
                    &csr,
                    "-CA",
                    "ca.crt",
                    "-CAkey",
                    "ca.key",
                    "-CAcreateserial",
                    "-out",
                    &crt,
                    "-days",
                    "2",
                    "-extfile",
                    &ext,
                ],
            );
        }
        Pki { dir }
    }

    fn path(&self, name: &str) -> String {
        self.dir.path().join(name).to_string_lossy().into_owned()
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Drain a child's output in the background so it never blocks on a full pipe; lines go to `tx`.
fn drain(out: impl Read + Send + 'static, tx: Option<mpsc::Sender<String>>) {
    thread::spawn(move || {
        for line in BufReader::new(out).lines() {
            let Ok(line) = line else { break };
            if let Some(tx) = &tx {
                let _ = tx.send(line);
            }
        }
    });
}

fn wait_with_timeout(child: &mut Child, what: &str) {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        if child.try_wait().unwrap().is_some() {
            return;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what} did not finish in time");
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// `openssl s_server`, accepting `naccept` connections. Its stdin stays open (EOF would end it).
struct Server {
    child: Child,
    port: u16,
    _stdin: ChildStdin,
}

impl Server {
    fn start(pki: &Pki, extra: &[&str], naccept: u32) -> Server {
        // The port is free when picked but could be taken before s_server binds it: retry.
        for _ in 0..5 {
            if let Some(server) = Server::try_start(pki, extra, naccept) {
                return server;
            }
        }
        panic!("s_server did not start");
    }

    fn try_start(pki: &Pki, extra: &[&str], naccept: u32) -> Option<Server> {
        let port = free_port();
        let accept = format!("127.0.0.1:{port}");
        let naccept = naccept.to_string();
        let (cert, key, ca) = (
            pki.path("server.crt"),
            pki.path("server.key"),
            pki.path("ca.crt"),
        );
        let mut child = Command::new("openssl")
            .args(["s_server", "-accept", &accept, "-cert", &cert, "-key", &key])
            .args(["-CAfile", &ca, "-naccept", &naccept])
            .args(extra)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run openssl s_server: {e}"));
        let stdin = child.stdin.take().unwrap();
        let (tx, rx) = mpsc::channel();
        drain(child.stdout.take().unwrap(), Some(tx));
        drain(child.stderr.take().unwrap(), None);
        let deadline = Instant::now() + TIMEOUT;
        loop {
            match rx.recv_timeout(Duration::from_millis(100)) {
                Ok(line) if line.contains("ACCEPT") => break,
                Ok(_) | Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return None;
                }
            }
            assert!(Instant::now() < deadline, "s_server did not start in time");
        }
        // Keep draining stdout after ACCEPT.
        thread::spawn(move || while rx.recv().is_ok() {});
        Some(Server {
            child,
            port,
            _stdin: stdin,
        })
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Run `openssl s_client` to `port`: send a line, close stdin (which ends the connection) and
/// wait for it to exit. With `-sess_out FILE` among the arguments, stdin stays open until the
/// session is in FILE (TLS 1.3 tickets arrive after the handshake).
fn client(pki: &Pki, port: u16, extra: &[&str]) {
    let connect = format!("127.0.0.1:{port}");
    let ca = pki.path("ca.crt");
    let mut child = Command::new("openssl")
        .args(["s_client", "-connect", &connect, "-CAfile", &ca])
        .args(extra)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run openssl s_client: {e}"));
    drain(child.stdout.take().unwrap(), None);
    drain(child.stderr.take().unwrap(), None);
    let mut stdin = child.stdin.take().unwrap();
    let _ = stdin.write_all(b"hello from the client\n");
    if let Some(i) = extra.iter().position(|a| *a == "-sess_out") {
        let file = extra.get(i + 1).expect("-sess_out FILE");
        let deadline = Instant::now() + TIMEOUT;
        while !std::fs::read_to_string(file).is_ok_and(|s| s.contains("END SSL SESSION PARAMETERS"))
        {
            assert!(Instant::now() < deadline, "s_client wrote no session");
            thread::sleep(Duration::from_millis(20));
        }
    }
    thread::sleep(Duration::from_millis(100));
    drop(stdin);
    wait_with_timeout(&mut child, "s_client");
}

/// Copy `from` to `to`, logging each chunk read (before forwarding it, so the log keeps causality).
fn pump(mut from: TcpStream, mut to: TcpStream, dir: Direction, log: Arc<Mutex<Chunks>>) {
    let mut buf = vec![0u8; 65536];
    loop {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                log.lock().unwrap().push((dir, buf[..n].to_vec()));
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        }
    }
    let _ = to.shutdown(Shutdown::Write);
}

/// A relay on 127.0.0.1 that forwards `conns` connections, one after the other, to `upstream`
/// and returns the recording of each.
struct Relay {
    port: u16,
    handle: JoinHandle<Vec<Chunks>>,
}

impl Relay {
    fn start(upstream: u16, conns: usize) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        listener.set_nonblocking(true).unwrap();
        let upstream = SocketAddr::from(([127, 0, 0, 1], upstream));
        let handle =
            thread::spawn(move || (0..conns).map(|_| relay_one(&listener, upstream)).collect());
        Relay { port, handle }
    }

    fn recordings(self) -> Vec<Chunks> {
        self.handle.join().expect("relay thread panicked")
    }
}

fn relay_one(listener: &TcpListener, upstream: SocketAddr) -> Chunks {
    let deadline = Instant::now() + TIMEOUT;
    let downstream = loop {
        match listener.accept() {
            Ok((s, _)) => break s,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                assert!(Instant::now() < deadline, "no client reached the relay");
                thread::sleep(Duration::from_millis(10));
            }
            Err(e) => panic!("accept: {e}"),
        }
    };
    downstream.set_nonblocking(false).unwrap();
    let upstream = TcpStream::connect(upstream).unwrap();
    for s in [&downstream, &upstream] {
        s.set_read_timeout(Some(TIMEOUT)).unwrap();
        s.set_nodelay(true).unwrap();
    }
    let log = Arc::new(Mutex::new(Vec::new()));
    let up = {
        let (from, to, log) = (
            downstream.try_clone().unwrap(),
            upstream.try_clone().unwrap(),
            log.clone(),
        );
        thread::spawn(move || pump(from, to, C2S, log))
    };
    let down = {
        let log = log.clone();
        thread::spawn(move || pump(upstream, downstream, S2C, log))
    };
    up.join().unwrap();
    down.join().unwrap();
    std::mem::take(&mut *log.lock().unwrap())
}

/// One handshake between s_client and s_server through the relay.
fn handshake(pki: &Pki, server_args: &[&str], client_args: &[&str]) -> Chunks {
    let server = Server::start(pki, server_args, 1);
    let relay = Relay::start(server.port, 1);
    client(pki, relay.port, client_args);
    relay.recordings().pop().unwrap()
}

/// The recorded chunks as segments.
fn as_segments(chunks: &Chunks) -> Vec<Seg> {
    let mut segs = Vec::new();
    let (mut c, mut s) = (0usize, 0usize);
    for (dir, data) in chunks {
        let off = if *dir == C2S { &mut c } else { &mut s };
        segs.push(Seg::new(*dir, *off, data));
        *off += data.len();
    }
    segs
}

/// Each chunk cut into segments of at most `size` (TCP segmentation after a NIC).
fn rechunk(chunks: &Chunks, size: usize) -> Vec<Seg> {
    let list: Vec<(Direction, Vec<u8>)> = chunks.clone();
    segmented(&list, size)
}

/// The ways a capture can deliver the same connection. `ordered` says whether arrival order is
/// preserved (it matters only for TLS 1.3 early data).
fn variants(chunks: &Chunks, ordered_only: bool) -> Vec<(String, ConnMeta, Vec<Seg>)> {
    let port = 8443;
    let m = meta(port);
    let mut no_isn = m;
    no_isn.client_isn = None;
    no_isn.server_isn = None;
    let mut out = vec![
        ("as recorded".to_string(), m, as_segments(chunks)),
        (
            "as recorded, ISNs unknown".to_string(),
            no_isn,
            as_segments(chunks),
        ),
        ("500-byte segments".to_string(), m, rechunk(chunks, 500)),
        ("1400-byte segments".to_string(), m, rechunk(chunks, 1400)),
    ];
    if !ordered_only {
        for seed in 1..=5 {
            out.push((
                format!("500-byte segments scrambled #{seed}"),
                m,
                scramble(&rechunk(chunks, 500), seed),
            ));
        }
    }
    out
}

/// Classify one recording every way; all variants must agree on what the capture order cannot
/// change. Returns the verdict of the as-recorded variant.
fn classify_every_way(chunks: &Chunks, ordered_only: bool) -> Verdict {
    assert!(!chunks.is_empty(), "the relay recorded nothing");
    let mut first: Option<Verdict> = None;
    for (name, m, segs) in variants(chunks, ordered_only) {
        let o = feed(m, &segs, &mut ResumptionCache::new(16));
        assert!(
            o.decided_early,
            "{name}: not decided before the end: {:?}",
            o.verdict
        );
        let v = o.verdict;
        if let Some(f) = &first {
            assert_eq!(v.security, f.security, "{name}");
            assert_eq!(v.evidence, f.evidence, "{name}");
            assert_eq!(v.mesh, f.mesh, "{name}");
            assert_eq!(v.alpn, f.alpn, "{name}");
            assert_eq!(v.sni, f.sni, "{name}");
            assert_eq!(v.tls_version, f.tls_version, "{name}");
            assert_eq!(v.client_spiffe, f.client_spiffe, "{name}");
        } else {
            first = Some(v);
        }
    }
    first.unwrap()
}

fn first_record_len(v: &Verdict) -> u16 {
    match v.evidence {
        Evidence::ClientFirstRecordLen(n) => n,
        ref other => panic!("expected client_first_record_len, got {other}"),
    }
}

fn client_cert(pki: &Pki) -> [String; 4] {
    [
        "-cert".into(),
        pki.path("client.crt"),
        "-key".into(),
        pki.path("client.key"),
    ]
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

#[test]
fn tls13_client_certificate_with_istio_alpn_is_mtls_istio() {
    let pki = Pki::new();
    let cert = client_cert(&pki);
    let mut args = strs(&cert);
    args.extend([
        "-alpn",
        "istio-peer-exchange,istio",
        "-servername",
        "api.shop",
    ]);
    let chunks = handshake(&pki, &["-Verify", "1", "-tls1_3"], &args);
    let v = classify_every_way(&chunks, false);
    assert_eq!(v.security, Security::Mtls, "{v:?}");
    assert_eq!(v.mesh, Mesh::Istio);
    assert_eq!(v.tls_version, Some("1.3"));
    assert_eq!(v.alpn, vec!["istio-peer-exchange", "istio"]);
    assert_eq!(v.sni.as_deref(), Some("api.shop"));
    assert!(
        v.cipher
            .as_deref()
            .is_some_and(|c| c.starts_with("TLS_AES"))
    );
    assert!(first_record_len(&v) >= 300, "{v:?}");
    assert!(!v.resumed);
}

#[test]
fn tls13_without_client_certificate_is_tls() {
    let pki = Pki::new();
    let chunks = handshake(&pki, &["-tls1_3"], &["-alpn", "h2"]);
    let v = classify_every_way(&chunks, false);
    assert_eq!(v.security, Security::Tls, "{v:?}");
    assert_eq!(v.mesh, Mesh::None);
    assert!(first_record_len(&v) < 100, "{v:?}");
}

#[test]
fn tls13_requested_but_no_client_certificate_is_tls() {
    // -verify 1 asks for a certificate without requiring one: empty Certificate + Finished.
    let pki = Pki::new();
    let chunks = handshake(&pki, &["-verify", "1", "-tls1_3"], &[]);
    let v = classify_every_way(&chunks, false);
    assert_eq!(v.security, Security::Tls, "{v:?}");
    assert!(first_record_len(&v) < 128, "{v:?}");
}

#[test]
fn tls12_client_certificate_is_mtls_with_spiffe() {
    let pki = Pki::new();
    let cert = client_cert(&pki);
    let mut args = strs(&cert);
    args.extend(["-tls1_2", "-alpn", "istio-h2"]);
    let chunks = handshake(&pki, &["-Verify", "1"], &args);
    let v = classify_every_way(&chunks, false);
    assert_eq!(v.security, Security::Mtls, "{v:?}");
    assert_eq!(v.evidence, Evidence::ClientCertificate);
    assert_eq!(v.tls_version, Some("1.2"));
    assert_eq!(v.mesh, Mesh::Istio);
    assert_eq!(v.client_spiffe, vec![CLIENT_SPIFFE]);
    assert_eq!(v.server_spiffe, vec![SERVER_SPIFFE]);
    assert!(v.cipher.is_some());
}

#[test]
fn tls12_requested_but_no_client_certificate_is_tls_empty() {
    let pki = Pki::new();
    let chunks = handshake(&pki, &["-verify", "1"], &["-tls1_2"]);
    let v = classify_every_way(&chunks, false);
    assert_eq!(v.security, Security::Tls, "{v:?}");
    assert_eq!(v.evidence, Evidence::ClientCertificateEmpty);
    assert!(v.client_spiffe.is_empty());
}

#[test]
fn tls12_not_requested_is_tls_no_client_certificate() {
    let pki = Pki::new();
    let chunks = handshake(&pki, &[], &["-tls1_2"]);
    let v = classify_every_way(&chunks, false);
    assert_eq!(v.security, Security::Tls, "{v:?}");
    assert_eq!(v.evidence, Evidence::NoClientCertificate);
    assert_eq!(v.server_spiffe, vec![SERVER_SPIFFE]);
}

/// The server only accepts P-256, the client's first key share is X25519: HelloRetryRequest, a
/// second ClientHello, then the client's certificate.
#[test]
fn tls13_hello_retry_request_with_client_certificate_is_mtls() {
    let pki = Pki::new();
    let cert = client_cert(&pki);
    let mut args = strs(&cert);
    args.extend(["-groups", "X25519:P-256", "-alpn", "istio"]);
    let chunks = handshake(
        &pki,
        &["-Verify", "1", "-tls1_3", "-groups", "P-256"],
        &args,
    );
    // The server's first record is a HelloRetryRequest.
    let s2c: Vec<u8> = chunks
        .iter()
        .filter(|(d, _)| *d == S2C)
        .flat_map(|(_, b)| b.clone())
        .collect();
    assert_eq!(s2c[5], 2, "ServerHello type");
    assert_eq!(
        &s2c[11..15],
        &[0xcf, 0x21, 0xad, 0x74],
        "HelloRetryRequest random"
    );
    let v = classify_every_way(&chunks, false);
    assert_eq!(v.security, Security::Mtls, "{v:?}");
    assert_eq!(v.mesh, Mesh::Istio);
    assert_eq!(v.tls_version, Some("1.3"));
}

/// The client rejects the server certificate (wrong name): its first encrypted record is an
/// alert, not a flight, so the connection is not counted as one-way TLS.
#[test]
fn tls13_client_rejecting_the_server_is_a_handshake_alert() {
    let pki = Pki::new();
    let args = [
        "-verify_return_error",
        "-verify_hostname",
        "not-the-server.local",
    ];
    let chunks = handshake(&pki, &["-tls1_3"], &args);
    let v = classify_every_way(&chunks, false);
    assert_eq!(v.security, Security::Unknown, "{v:?}");
    assert_eq!(v.evidence, Evidence::HandshakeAlert);
    assert_eq!(v.tls_version, Some("1.3"));
}

/// ~2.8 KB ClientHello (long ALPN values, the Istio one last, past the first kilobyte), sent in
/// 512-byte records (`-max_send_frag`): the message spans records and segments.
#[test]
fn big_client_hello_split_over_records_and_segments() {
    let pki = Pki::new();
    let mut protos: Vec<String> = (0..12)
        .map(|i| format!("{i:02}-{}", "x".repeat(200)))
        .collect();
    protos.push("istio-peer-exchange".into());
    let alpn = protos.join(",");
    let cert = client_cert(&pki);
    let mut args = strs(&cert);
    args.extend(["-alpn", &alpn, "-max_send_frag", "512"]);
    let chunks = handshake(&pki, &["-Verify", "1", "-tls1_3"], &args);

    // The ClientHello really is big and really spans records.
    let c2s: Vec<u8> = chunks
        .iter()
        .filter(|(d, _)| *d == C2S)
        .flat_map(|(_, b)| b.clone())
        .collect();
    let hello_len = usize::from(c2s[6]) << 16 | usize::from(c2s[7]) << 8 | usize::from(c2s[8]);
    let first_record = usize::from(u16::from_be_bytes([c2s[3], c2s[4]]));
    assert!(hello_len > 2500, "ClientHello of {hello_len} bytes");
    assert!(first_record < hello_len, "ClientHello in one record");

    let v = classify_every_way(&chunks, false);
    assert_eq!(v.security, Security::Mtls, "{v:?}");
    assert_eq!(v.mesh, Mesh::Istio);
    assert_eq!(v.alpn, protos);
}

/// A full mTLS handshake then a resumed one (TLS 1.2 and 1.3): the second inherits.
fn resumption(version: &str) {
    let pki = Pki::new();
    let sess = pki.path("session.pem");
    let server = Server::start(&pki, &["-Verify", "1", version], 2);
    let relay = Relay::start(server.port, 2);
    let cert = client_cert(&pki);
    let mut args = strs(&cert);
    args.extend([version, "-sess_out", &sess]);
    client(&pki, relay.port, &args);
    let args = [version, "-sess_in", &sess];
    client(&pki, relay.port, &args);
    let recordings = relay.recordings();
    assert_eq!(recordings.len(), 2);

    for ordered in [true, false] {
        let variants_full = variants(&recordings[0], ordered);
        let variants_resumed = variants(&recordings[1], ordered);
        for ((name, m1, full), (_, m2, resumed)) in variants_full.iter().zip(&variants_resumed) {
            let mut cache = ResumptionCache::new(16);
            let v1 = feed(*m1, full, &mut cache).verdict;
            assert_eq!(v1.security, Security::Mtls, "{version} {name}: {v1:?}");
            assert!(!v1.resumed);
            let mut m2 = *m2;
            m2.client.set_port(m1.client.port() + 1);
            let v2 = feed(m2, resumed, &mut cache).verdict;
            assert!(v2.resumed, "{version} {name}: {v2:?}");
            assert_eq!(v2.security, Security::Mtls, "{version} {name}");
            assert_eq!(v2.evidence, Evidence::ResumedFrom(m1.server));

            // Without the full handshake, the resumed one is unknown (never guessed).
            let v3 = feed(m2, resumed, &mut ResumptionCache::new(16)).verdict;
            assert_eq!(v3.security, Security::Unknown);
            assert_eq!(v3.evidence, Evidence::ResumedUnknown);
        }
    }
}

#[test]
fn tls12_resumption_inherits_mtls() {
    resumption("-tls1_2");
}

#[test]
fn tls13_resumption_inherits_mtls() {
    resumption("-tls1_3");
}

/// TLS 1.3 with 0-RTT offered but rejected (a restarted server cannot read the ticket): the
/// 300-byte early data record precedes the client's real flight, which is a bare Finished.
#[test]
fn tls13_rejected_early_data_is_not_the_client_flight() {
    let pki = Pki::new();
    let sess = pki.path("session.pem");
    let early = pki.path("early.txt");
    std::fs::write(&early, vec![b'E'; 300]).unwrap();
    {
        let first = handshake(&pki, &["-early_data"], &["-sess_out", &sess]);
        assert!(!first.is_empty());
    }
    let chunks = handshake(
        &pki,
        &["-early_data"],
        &["-sess_in", &sess, "-early_data", &early],
    );
    let v = classify_every_way(&chunks, true);
    assert!(!v.resumed, "{v:?}");
    assert_eq!(v.security, Security::Tls, "{v:?}");
    assert!(first_record_len(&v) < 100, "{v:?}");
}

/// Plain HTTP through the relay to an in-test server.
#[test]
fn plain_http_is_plaintext_http1() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let server = thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        s.set_read_timeout(Some(TIMEOUT)).unwrap();
        let mut req = Vec::new();
        let mut buf = [0u8; 1024];
        while !req.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = s.read(&mut buf).unwrap();
            assert!(n > 0, "client closed early");
            req.extend_from_slice(&buf[..n]);
        }
        s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
            .unwrap();
    });
    let relay = Relay::start(port, 1);
    let mut c = TcpStream::connect(("127.0.0.1", relay.port)).unwrap();
    c.set_read_timeout(Some(TIMEOUT)).unwrap();
    c.write_all(b"GET /orders HTTP/1.1\r\nHost: api.shop\r\nUser-Agent: test\r\n\r\n")
        .unwrap();
    let mut resp = Vec::new();
    c.read_to_end(&mut resp).unwrap();
    assert!(resp.starts_with(b"HTTP/1.1 200"));
    drop(c);
    server.join().unwrap();
    let chunks = relay.recordings().pop().unwrap();
    let v = classify_every_way(&chunks, false);
    assert_eq!(v.security, Security::Plaintext);
    assert_eq!(v.protocol, Some(Protocol::Http1));
    assert_eq!(v.evidence, Evidence::PlaintextFirstBytes);
}
