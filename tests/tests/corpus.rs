//! The classifier against real stacks (issue 3): a corpus of real connections made in network
//! namespaces — OpenSSL s_client/s_server, curl against nginx, Python's `ssl`, PostgreSQL, plain
//! HTTP/1 and h2c, hostile raw TCP — captured with tshark on the pods' host-side veths while
//! the live agent runs on the same interfaces.
//!
//! Every connection is judged four ways and all four must agree, connection by connection:
//!
//! 1. ground truth: how the test made it (which client, which certificate, which server policy);
//! 2. `mtls-agent classify --pcap` on the capture;
//! 3. the live agent (`GET /api/v1/connections`, matched by client and server address);
//! 4. tshark's own dissection of the same capture, with the clients' TLS key logs so that it
//!    sees the encrypted TLS 1.3 client Certificate (not for the hostile inputs, which are not
//!    handshakes tshark can judge: there the classifier's answer is checked against the truth).
//!
//! The accuracy table is printed and written to `target/corpus/accuracy.md` (docs/accuracy.md
//! holds the table of a real run). Needs root; fails, never skips, without it or a tool.
use std::{
    collections::{BTreeMap, HashMap},
    fmt::Write as _,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use mtls_agent_testbed::*;
use serde_json::Value;

mod corpus_stacks;
use corpus_stacks::{ClientCert, GrpcMode, GrpcPorts, Listener, MariadbMode, Pem, Policy};

const ISTIO_ALPN: &str = "istio-peer-exchange,istio";
/// What grpcio's client offers.
const GRPC_ALPN: [&str; 1] = ["h2"];
const ISTIO: [&str; 5] = [
    "istio",
    "istio-peer-exchange",
    "istio-http/1.0",
    "istio-http/1.1",
    "istio-h2",
];

/// How one connection was made, and what every judge must say about it.
#[derive(Debug, Clone)]
struct Truth {
    /// Row of the accuracy table.
    group: &'static str,
    case: String,
    client_ip: IpAddr,
    server: SocketAddr,
    security: &'static str,
    /// Another answer the classifier may give (a padded client with a certificate: `mtls`, or
    /// `unknown` where the sizes cannot tell a certificate from padding).
    also: Option<&'static str>,
    /// What tshark, which decrypts, must say when the classifier must not decide (padding).
    shark_security: Option<&'static str>,
    tls_version: Option<&'static str>,
    /// ALPN offered by the client, in order.
    alpn: Vec<String>,
    protocol: Option<&'static str>,
    resumed: bool,
    /// Evidence kind expected, where the case pins it.
    evidence: Option<&'static str>,
    /// Whether tshark's dissection is part of the agreement (false for hostile inputs).
    tshark: bool,
}

impl Truth {
    fn tls(
        group: &'static str,
        case: &str,
        client: IpAddr,
        server: SocketAddr,
        mtls: bool,
        version: &'static str,
        alpn: &[&str],
    ) -> Truth {
        Truth {
            group,
            case: case.to_owned(),
            client_ip: client,
            server,
            security: if mtls { "mtls" } else { "tls" },
            also: None,
            shark_security: None,
            tls_version: Some(version),
            alpn: alpn.iter().map(|s| s.to_string()).collect(),
            protocol: None,
            resumed: false,
            evidence: match (version, mtls) {
                ("1.3", _) => Some("client_first_record_len"),
                (_, true) => Some("client_certificate"),
                (_, false) => None,
            },
            tshark: true,
        }
    }

    fn plaintext(
        group: &'static str,
        case: &str,
        client: IpAddr,
        server: SocketAddr,
        protocol: &'static str,
    ) -> Truth {
        Truth {
            group,
            case: case.to_owned(),
            client_ip: client,
            server,
            security: "plaintext",
            also: None,
            shark_security: None,
            tls_version: None,
            alpn: Vec::new(),
            protocol: Some(protocol),
            resumed: false,
            evidence: Some("plaintext_first_bytes"),
            tshark: true,
        }
    }

    fn mesh(&self) -> &'static str {
        if self.alpn.iter().any(|a| ISTIO.contains(&a.as_str())) {
            "istio"
        } else {
            "none"
        }
    }

    fn resumed(mut self) -> Truth {
        self.resumed = true;
        self.evidence = Some("resumed_from");
        self
    }

    fn evidence(mut self, e: &'static str) -> Truth {
        self.evidence = Some(e);
        self
    }

    /// A client that pads its TLS 1.3 records: the classifier must say `unknown` (evidence
    /// `client_records_padded`) without a certificate, `mtls` or `unknown` with one; tshark, which
    /// decrypts, sees what really happened.
    fn padded(mut self) -> Truth {
        self.shark_security = Some(self.security);
        if self.security == "mtls" {
            self.also = Some("unknown");
            self.evidence = None;
        } else {
            self.security = "unknown";
            self.evidence = Some("client_records_padded");
        }
        self
    }
}

fn alpn_list(s: &str) -> Vec<&str> {
    s.split(',').collect()
}

/// `openssl s_client` with a key log (so tshark can decrypt TLS 1.3), one connection, checked.
#[allow(clippy::too_many_arguments)]
fn s_client(
    tb: &Testbed,
    ns: &str,
    server: SocketAddr,
    ca: &Path,
    cert: Option<&CertPaths>,
    alpn: Option<&str>,
    version: Option<&str>,
    sess_out: Option<&Path>,
    sess_in: Option<&Path>,
    keylog: &Path,
    extra: &[&str],
) -> Result<String> {
    let connect = server.to_string();
    let mut args = vec![
        "openssl",
        "s_client",
        "-connect",
        &connect,
        "-CAfile",
        ca.to_str().context("path")?,
        "-verify_return_error",
        "-ign_eof",
        "-noservername",
        "-keylogfile",
        keylog.to_str().context("path")?,
    ];
    if let Some(c) = cert {
        args.extend([
            "-cert",
            c.cert.to_str().context("path")?,
            "-key",
            c.key.to_str().context("path")?,
        ]);
    }
    if let Some(a) = alpn {
        args.extend(["-alpn", a]);
    }
    args.extend(version);
    if let Some(f) = sess_out {
        args.extend(["-sess_out", f.to_str().context("path")?]);
    }
    if let Some(f) = sess_in {
        args.extend(["-sess_in", f.to_str().context("path")?]);
    }
    args.extend_from_slice(extra);
    let out = tb.output(ns, &args, Some(HTTP_REQUEST), Duration::from_secs(10))?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    ensure!(
        out.status.success() && stdout.contains("HTTP/1.0 200"),
        "s_client to {server} failed: {}; {}",
        String::from_utf8_lossy(&out.stderr),
        stdout.lines().rev().take(5).collect::<Vec<_>>().join(" / ")
    );
    Ok(stdout)
}

const PY_CLIENT: &str = r#"
import socket, ssl, sys
host, port, ca, cert, key, keylog, alpn = sys.argv[1:8]
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
ctx.load_verify_locations(ca)
ctx.check_hostname = False
ctx.keylog_filename = keylog
if cert != "-":
    ctx.load_cert_chain(cert, key)
if alpn != "-":
    ctx.set_alpn_protocols(alpn.split(","))
with socket.create_connection((host, int(port)), timeout=5) as s:
    with ctx.wrap_socket(s) as t:
        t.sendall(b"GET / HTTP/1.0\r\nHost: corpus\r\n\r\n")
        data = b""
        while True:
            d = t.recv(65536)
            if not d:
                break
            data += d
        print(t.version(), data.decode(errors="replace").splitlines()[0])
"#;

const PY_SERVER: &str = r#"
import socket, ssl, sys
host, port, cert, key, ca, keylog = sys.argv[1:7]
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(cert, key)
ctx.load_verify_locations(ca)
ctx.verify_mode = ssl.CERT_REQUIRED
ctx.keylog_filename = keylog
ctx.set_alpn_protocols(["h2", "http/1.1"])
s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((host, int(port)))
s.listen(16)
while True:
    c, _ = s.accept()
    try:
        with ctx.wrap_socket(c, server_side=True) as t:
            t.recv(65536)
            who = t.getpeercert()["subject"] if t.getpeercert() else "none"
            t.sendall(b"HTTP/1.0 200 OK\r\n\r\nclient " + str(who).encode() + b"\n")
    except Exception as e:
        print("handshake failed:", e, flush=True)
"#;

/// nginx with plain HTTP/1 on `http` and h2c (HTTP/2 with prior knowledge) on `h2c`.
fn nginx_plain(tb: &Testbed, ns: &str, http: u16, h2c: u16) -> Result<Proc> {
    let dir = tb.scratch_dir("nginx-plain")?;
    let d = dir.to_str().context("path")?;
    let conf = format!(
        "user root root;\nworker_processes 1;\ndaemon off;\npid {d}/nginx.pid;\n\
         error_log {d}/error.log info;\nevents {{ worker_connections 64; }}\nhttp {{\n\
         access_log {d}/access.log;\nclient_body_temp_path {d}/body;\nproxy_temp_path {d}/proxy;\n\
         fastcgi_temp_path {d}/fastcgi;\nuwsgi_temp_path {d}/uwsgi;\nscgi_temp_path {d}/scgi;\n\
         server {{ listen 0.0.0.0:{http}; listen 0.0.0.0:{h2c} http2;\n\
         location / {{ default_type text/plain; return 200 \"ok\\n\"; }} }}\n}}\n"
    );
    let path = dir.join("nginx.conf");
    std::fs::write(&path, conf)?;
    let p = tb.spawn(
        ns,
        &[
            "nginx",
            "-e",
            &format!("{d}/error.log"),
            "-p",
            d,
            "-c",
            path.to_str().context("path")?,
        ],
    )?;
    for port in [http, h2c] {
        tb.wait_tcp_listening(
            ns,
            SocketAddr::from(([0, 0, 0, 0], port)),
            Duration::from_secs(10),
        )?;
    }
    Ok(p)
}

/// A PostgreSQL server with TLS 1.2 (so the client Certificate is visible to tshark: libpq 15
/// cannot write a key log) that asks for client certificates (`ssl_ca_file`).
fn postgres(tb: &Testbed, ns: &str, listen: IpAddr, cert: &CertPaths, ca: &Path) -> Result<Proc> {
    let dir = tb.scratch_dir("postgres")?;
    let bin = Path::new("/usr/lib/postgresql")
        .read_dir()
        .context("PostgreSQL is not installed (apt-get install postgresql)")?
        .filter_map(|e| e.ok())
        .map(|e| e.path().join("bin"))
        .find(|p| p.join("postgres").is_file())
        .context("no PostgreSQL server binary under /usr/lib/postgresql")?;
    let data = dir.join("data");
    let d = dir.to_str().context("path")?;
    for (src, name) in [
        (&cert.cert, "server.crt"),
        (&cert.key, "server.key"),
        (&ca.to_path_buf(), "ca.crt"),
    ] {
        std::fs::copy(src, dir.join(name))?;
    }
    tb.run(ns, &["chmod", "0600", &format!("{d}/server.key")])?;
    tb.run(ns, &["chown", "-R", "postgres:postgres", d])?;
    let initdb = bin.join("initdb");
    tb.run_timeout(
        ns,
        &[
            "runuser",
            "-u",
            "postgres",
            "--",
            initdb.to_str().context("path")?,
            "-D",
            data.to_str().context("path")?,
            "-A",
            "trust",
            "-U",
            "postgres",
            "--no-sync",
        ],
        Duration::from_secs(60),
    )?;
    let conf = format!(
        "listen_addresses = '{listen}'\nport = 5432\nunix_socket_directories = '{d}'\n\
         ssl = on\nssl_cert_file = '{d}/server.crt'\nssl_key_file = '{d}/server.key'\n\
         ssl_ca_file = '{d}/ca.crt'\nssl_min_protocol_version = 'TLSv1.2'\n\
         ssl_max_protocol_version = 'TLSv1.2'\nfsync = off\n"
    );
    let mut pc = std::fs::read_to_string(data.join("postgresql.conf"))?;
    pc.push_str(&conf);
    std::fs::write(data.join("postgresql.conf"), pc)?;
    std::fs::write(
        data.join("pg_hba.conf"),
        "local all all trust\nhost all all 0.0.0.0/0 trust\nhost all all ::/0 trust\n",
    )?;
    let postgres = bin.join("postgres");
    let p = tb.spawn(
        ns,
        &[
            "runuser",
            "-u",
            "postgres",
            "--",
            postgres.to_str().context("path")?,
            "-D",
            data.to_str().context("path")?,
        ],
    )?;
    tb.wait_tcp_listening(ns, SocketAddr::new(listen, 5432), Duration::from_secs(20))
        .with_context(|| format!("postgres: {}", p.stderr_tail()))?;
    Ok(p)
}

/// One `psql` connection: `SELECT 1` with the given sslmode (and client certificate).
fn psql(
    tb: &Testbed,
    ns: &str,
    host: IpAddr,
    sslmode: &str,
    cert: Option<(&Path, &Path)>,
) -> Result<()> {
    let mut conn = format!(
        "host={host} port=5432 user=postgres dbname=postgres sslmode={sslmode} gssencmode=disable connect_timeout=5"
    );
    if let Some((c, k)) = cert {
        let _ = write!(conn, " sslcert={} sslkey={}", c.display(), k.display());
    } else {
        // No client certificate at all (not even ~/.postgresql/postgresql.crt).
        conn.push_str(" sslcert=/nonexistent sslkey=/nonexistent");
    }
    let out = tb.output(
        ns,
        &["psql", &conn, "-Atc", "select 1"],
        None,
        Duration::from_secs(10),
    )?;
    ensure!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).trim() == "1",
        "psql ({sslmode}) failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// A ClientHello record (or records) with `extensions` empty unknown extensions.
fn hello_with_extensions(extensions: usize) -> Vec<u8> {
    let mut body = vec![3, 3];
    body.extend_from_slice(&[0x11; 32]);
    body.push(0);
    body.extend_from_slice(&[0, 2, 0x13, 0x01, 1, 0]);
    let mut exts = Vec::new();
    for _ in 0..extensions {
        exts.extend_from_slice(&[0xfe, 0x43, 0, 0]);
    }
    let len = u16::try_from(exts.len()).unwrap_or(u16::MAX);
    body.extend_from_slice(&len.to_be_bytes());
    body.extend(exts);
    let mut hs = vec![1];
    hs.extend_from_slice(&u32::try_from(body.len()).unwrap().to_be_bytes()[1..]);
    hs.extend(body);
    let mut out = Vec::new();
    for chunk in hs.chunks(16_384) {
        out.extend_from_slice(&[22, 3, 1]);
        out.extend_from_slice(&u16::try_from(chunk.len()).unwrap().to_be_bytes());
        out.extend_from_slice(chunk);
    }
    out
}

/// Deterministic pseudo-random bytes.
fn noise(n: usize, mut seed: u64) -> Vec<u8> {
    (0..n)
        .map(|_| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed >> 24) as u8
        })
        .collect()
}

/// What one judge said about one connection.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Judged {
    security: String,
    mesh: String,
    tls_version: Option<String>,
    alpn: Vec<String>,
    protocol: Option<String>,
    evidence: String,
    resumed: bool,
}

fn judged(v: &Value) -> Judged {
    let s = |k: &str| v[k].as_str().map(str::to_owned);
    Judged {
        security: s("security").unwrap_or_default(),
        mesh: s("mesh").unwrap_or_default(),
        tls_version: s("tls_version"),
        alpn: v["alpn"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|x| x.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default(),
        protocol: s("protocol"),
        evidence: s("evidence").unwrap_or_default(),
        resumed: v["resumed"].as_bool().unwrap_or(false),
    }
}

/// Differences between the truth and a judge (empty: agreement). tshark's evidence is not
/// the classifier's, and it decrypts what the classifier only sizes.
fn disagreements(t: &Truth, j: &Judged, tshark: bool) -> Vec<String> {
    let mut d = Vec::new();
    let security_ok = if tshark {
        j.security == t.shark_security.unwrap_or(t.security)
    } else {
        j.security == t.security || Some(j.security.as_str()) == t.also
    };
    if !security_ok {
        d.push(format!("security {} (truth {})", j.security, t.security));
    }
    if j.mesh != t.mesh() {
        d.push(format!("mesh {} (truth {})", j.mesh, t.mesh()));
    }
    if j.tls_version.as_deref() != t.tls_version {
        d.push(format!(
            "tls_version {:?} (truth {:?})",
            j.tls_version, t.tls_version
        ));
    }
    if j.alpn != t.alpn {
        d.push(format!("alpn {:?} (truth {:?})", j.alpn, t.alpn));
    }
    if j.protocol.as_deref() != t.protocol {
        d.push(format!(
            "protocol {:?} (truth {:?})",
            j.protocol, t.protocol
        ));
    }
    if j.resumed != t.resumed {
        d.push(format!("resumed {} (truth {})", j.resumed, t.resumed));
    }
    if !tshark
        && let Some(e) = t.evidence
        && j.evidence.split('=').next() != Some(e)
    {
        d.push(format!("evidence {} (truth {e})", j.evidence));
    }
    d
}

/// tshark's verdict per (client, server), with the client's data segment lengths.
type SharkVerdicts = HashMap<(SocketAddr, SocketAddr), (Judged, Vec<u64>)>;

/// tshark's view of one TCP stream.
#[derive(Debug, Default)]
struct Stream {
    client: Option<SocketAddr>,
    server: Option<SocketAddr>,
    client_hello: bool,
    server_hello: bool,
    server_certificate: bool,
    client_cert_lens: Vec<u64>,
    version: Option<String>,
    alpn: Vec<String>,
    protocols: String,
    malformed: bool,
    h2_magic: bool,
    client_data_segments: Vec<u64>,
}

/// Runs tshark over the capture and derives a verdict per connection from its dissection alone.
/// `decode_as`: ports whose protocol tshark does not guess (h2c, MySQL and SMTP off their
/// well-known ports), as (port, dissector).
fn tshark_verdicts(pcap: &Path, keylog: &Path, decode_as: &[(u16, &str)]) -> Result<SharkVerdicts> {
    let fields = [
        "frame.number",
        "tcp.stream",
        "ip.src",
        "ipv6.src",
        "tcp.srcport",
        "ip.dst",
        "ipv6.dst",
        "tcp.dstport",
        "tcp.flags.syn",
        "tcp.flags.ack",
        "tls.handshake.type",
        "tls.handshake.extensions_alpn_str",
        "tls.handshake.extensions.supported_version",
        "tls.handshake.version",
        "tls.handshake.certificates_length",
        "frame.protocols",
        "http2.magic",
        "tcp.len",
    ];
    let mut args: Vec<String> = vec![
        "tshark".into(),
        "-n".into(),
        "-r".into(),
        pcap.display().to_string(),
        "-o".into(),
        format!("tls.keylog_file:{}", keylog.display()),
        "-T".into(),
        "fields".into(),
        "-E".into(),
        "separator=/t".into(),
        "-E".into(),
        "occurrence=a".into(),
        "-E".into(),
        "aggregator=|".into(),
    ];
    for (port, dissector) in decode_as {
        args.push("-d".into());
        args.push(format!("tcp.port=={port},{dissector}"));
    }
    for f in fields {
        args.push("-e".into());
        args.push(f.into());
    }
    let out = std::process::Command::new(&args[0])
        .args(&args[1..])
        .output()
        .context("running tshark")?;
    ensure!(
        out.status.success(),
        "tshark failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let mut streams: BTreeMap<u64, Stream> = BTreeMap::new();
    for line in text.lines() {
        let f: Vec<&str> = line.split('\t').collect();
        if f.len() < fields.len() || f[1].is_empty() {
            continue;
        }
        let id: u64 = f[1].parse()?;
        let ip = |a: &str, b: &str| -> Option<IpAddr> { a.parse().ok().or_else(|| b.parse().ok()) };
        let (Some(sip), Some(dip)) = (ip(f[2], f[3]), ip(f[5], f[6])) else {
            continue;
        };
        let src = SocketAddr::new(sip, f[4].parse()?);
        let dst = SocketAddr::new(dip, f[7].parse()?);
        let st = streams.entry(id).or_default();
        let syn = f[8] == "1" || f[8] == "True";
        let ack = f[9] == "1" || f[9] == "True";
        if syn && !ack {
            st.client = Some(src);
            st.server = Some(dst);
        }
        let from_client = st.client == Some(src);
        let types: Vec<&str> = f[10].split('|').filter(|s| !s.is_empty()).collect();
        if from_client {
            if types.contains(&"1") {
                st.client_hello = true;
                st.alpn = f[11]
                    .split('|')
                    .filter(|s| !s.is_empty())
                    .map(str::to_owned)
                    .collect();
            }
            if types.contains(&"11") {
                st.client_cert_lens
                    .extend(f[14].split('|').filter_map(|s| s.parse::<u64>().ok()));
            }
            if let Ok(n) = f[17].parse::<u64>()
                && n > 0
            {
                st.client_data_segments.push(n);
            }
        } else {
            if types.contains(&"2") {
                st.server_hello = true;
                let sv = f[12];
                st.version = Some(
                    if sv.contains("0x0304") {
                        "1.3"
                    } else if f[13].contains("0x0303") {
                        "1.2"
                    } else {
                        "other"
                    }
                    .to_owned(),
                );
            }
            if types.contains(&"11") {
                st.server_certificate = true;
            }
        }
        if from_client && f[17] != "0" && !f[17].is_empty() && st.protocols.is_empty() {
            st.protocols = f[15].to_owned();
        }
        if f[15].contains("_ws.malformed") {
            st.malformed = true;
        }
        if !f[16].is_empty() {
            st.h2_magic = true;
        }
    }
    // Resumed sessions inherit the client authentication of the pair's last full handshake.
    let mut full: HashMap<(IpAddr, SocketAddr), String> = HashMap::new();
    let mut out = HashMap::new();
    for st in streams.values() {
        let (Some(client), Some(server)) = (st.client, st.server) else {
            continue;
        };
        let mut j = Judged {
            security: "unknown".into(),
            mesh: "none".into(),
            tls_version: None,
            alpn: st.alpn.clone(),
            protocol: None,
            evidence: String::new(),
            resumed: false,
        };
        if j.alpn.iter().any(|a| ISTIO.contains(&a.as_str())) {
            j.mesh = "istio".into();
        }
        // A server-first protocol upgraded with STARTTLS: the client's first bytes are
        // plaintext, whatever TLS follows (DESIGN.md: security is judged on the first bytes).
        let starttls = st.protocols.contains(":smtp");
        if st.client_hello && !starttls {
            if st.server_hello && !st.malformed {
                j.tls_version = st.version.clone();
                if st.server_certificate {
                    j.security = if st.client_cert_lens.iter().any(|&l| l > 0) {
                        "mtls"
                    } else {
                        "tls"
                    }
                    .into();
                    full.insert((client.ip(), server), j.security.clone());
                } else {
                    j.resumed = true;
                    j.security = full
                        .get(&(client.ip(), server))
                        .cloned()
                        .unwrap_or_else(|| "unknown".into());
                }
            }
        } else if !st.protocols.is_empty() && !st.malformed {
            j.security = "plaintext".into();
            let p = &st.protocols;
            j.protocol = Some(
                if st.h2_magic || p.contains(":http2") {
                    "h2c"
                } else if p.contains(":pgsql") {
                    "postgres"
                } else if p.contains(":mysql") {
                    "mysql"
                } else if p.contains(":http") {
                    "http1"
                } else {
                    "other"
                }
                .into(),
            );
        }
        out.insert((client, server), (j, st.client_data_segments.clone()));
    }
    Ok(out)
}

#[test]
fn corpus_agrees_with_truth_tshark_and_the_live_agent() -> Result<()> {
    ensure_root()?;
    let started = Instant::now();
    let bin = agent_bin()?;
    for tool in [
        "tshark", "openssl", "curl", "nginx", "psql", "runuser", "java", "javac", "node",
        "mariadbd", "mariadb",
    ] {
        let ok = std::process::Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false);
        ensure!(
            ok,
            "{tool} is not installed (cargo xtask setup installs it)"
        );
    }
    let mut tb = Testbed::new("mtcorp")?;
    let srv =
        tb.add_pod(PodSpec::new("srv", "198.18.0.10".parse()?).ipv6("2001:db8::10".parse()?))?;
    let cli =
        tb.add_pod(PodSpec::new("cli", "198.18.0.20".parse()?).ipv6("2001:db8::20".parse()?))?;
    // A pod behind a small MTU with offloads off: its large first flights cross the veth as
    // several MTU-sized segments, as after a real NIC.
    let small = tb.add_pod(
        PodSpec::new("small", "198.18.0.30".parse()?)
            .mtu(1280)
            .disable_offloads(),
    )?;
    let work = tb.workdir().to_path_buf();
    let keys = work.join("keys");
    std::fs::create_dir_all(&keys)?;
    let pki = Pki::new(work.join("pki"))?;
    let ca = pki.ca_cert().to_path_buf();
    let srv_cert = pki.issue(
        "srv",
        &[
            San::spiffe("corpus", "srv"),
            San::Ip(IpAddr::V4(srv.ipv4)),
            San::Ip(srv.v6(0).ip()),
        ],
    )?;
    let cli_cert = pki.issue("cli", &[San::spiffe("corpus", "cli")])?;
    // libpq insists on a private key only its owner can read.
    let pg_key = work.join("pg-client.key");
    std::fs::copy(&cli_cert.key, &pg_key)?;
    std::fs::set_permissions(&pg_key, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;

    // --- servers (all in srv) ---
    let mut procs: Vec<Proc> = Vec::new();
    let s = |port: u16| TlsServer::new(port, &srv_cert, &ca);
    for cfg in [
        s(8401)
            .require_client_cert()
            .alpn(ISTIO_ALPN)
            .tls_version(TlsVersion::Tls13),
        s(8402).tls_version(TlsVersion::Tls13),
        s(8403)
            .require_client_cert()
            .alpn(ISTIO_ALPN)
            .tls_version(TlsVersion::Tls12),
        s(8404).tls_version(TlsVersion::Tls12),
        s(8405).request_client_cert().tls_version(TlsVersion::Tls13),
        s(8406).request_client_cert().tls_version(TlsVersion::Tls12),
        s(8408).require_client_cert().tls_version(TlsVersion::Tls13),
        s(8409).tls_version(TlsVersion::Tls12),
        s(8410)
            .require_client_cert()
            .alpn(ISTIO_ALPN)
            .tls_version(TlsVersion::Tls13),
        s(8447).tls_version(TlsVersion::Tls13),
    ] {
        procs.push(openssl_server(&tb, &srv.netns, &cfg)?);
    }
    let ngx = |port: u16, verify: VerifyClient, v: TlsVersion| NginxServer {
        port,
        ipv6: false,
        tls: Some(NginxTls {
            cert: srv_cert.clone(),
            ca: ca.clone(),
            verify_client: verify,
            tls_version: v,
        }),
    };
    procs.push(nginx_server(
        &tb,
        &srv.netns,
        &ngx(8443, VerifyClient::On, TlsVersion::Any),
    )?);
    procs.push(nginx_server(
        &tb,
        &srv.netns,
        &ngx(8444, VerifyClient::Off, TlsVersion::Any),
    )?);
    procs.push(nginx_server(
        &tb,
        &srv.netns,
        &ngx(8445, VerifyClient::On, TlsVersion::Tls12),
    )?);
    procs.push(nginx_plain(&tb, &srv.netns, 8080, 8081)?);
    let srv_keylog = keys.join("py-server.log");
    procs.push(tb.spawn(
        &srv.netns,
        &[
            "/usr/bin/python3",
            "-u",
            "-c",
            PY_SERVER,
            "0.0.0.0",
            "8446",
            srv_cert.cert.to_str().context("path")?,
            srv_cert.key.to_str().context("path")?,
            ca.to_str().context("path")?,
            srv_keylog.to_str().context("path")?,
        ],
    )?);
    tb.wait_tcp_listening(&srv.netns, "0.0.0.0:8446".parse()?, Duration::from_secs(10))?;
    procs.push(postgres(
        &tb,
        &srv.netns,
        IpAddr::V4(srv.ipv4),
        &srv_cert,
        &ca,
    )?);
    // HelloRetryRequest: the server only accepts P-256, the client's first key share is X25519.
    let hrr = TlsServer::new(8411, &srv_cert, &ca)
        .require_client_cert()
        .alpn(ISTIO_ALPN)
        .tls_version(TlsVersion::Tls13);
    let (srv_c, srv_k, ca_p) = (
        hrr.cert.display().to_string(),
        hrr.key.display().to_string(),
        ca.display().to_string(),
    );
    procs.push(tb.spawn(
        &srv.netns,
        &[
            "openssl",
            "s_server",
            "-accept",
            "0.0.0.0:8411",
            "-cert",
            &srv_c,
            "-key",
            &srv_k,
            "-CAfile",
            &ca_p,
            "-www",
            "-tls1_3",
            "-Verify",
            "1",
            "-alpn",
            ISTIO_ALPN,
            "-groups",
            "P-256",
        ],
    )?);
    tb.wait_tcp_listening(&srv.netns, "0.0.0.0:8411".parse()?, Duration::from_secs(10))?;
    let rustls_bin = env!("CARGO_BIN_EXE_rustls-peer");
    for (port, client_auth, tls12) in [
        (8448u16, true, false),
        (8450, true, true),
        (8449, false, true),
    ] {
        let listen = format!("0.0.0.0:{port}");
        let kl = format!(
            "SSLKEYLOGFILE={}",
            keys.join(format!("rustls-server-{port}.log")).display()
        );
        let mut args = vec![
            "env",
            kl.as_str(),
            rustls_bin,
            "server",
            "--listen",
            listen.as_str(),
            "--cert",
            srv_cert.cert.to_str().context("path")?,
            "--key",
            srv_cert.key.to_str().context("path")?,
            "--alpn",
            "h2,http/1.1",
        ];
        if client_auth {
            args.extend(["--client-ca", ca.to_str().context("path")?]);
        }
        if tls12 {
            args.push("--tls12");
        }
        procs.push(tb.spawn(&srv.netns, &args)?);
        tb.wait_tcp_listening(&srv.netns, listen.parse()?, Duration::from_secs(10))?;
    }
    procs.push(tcp_reply_server(
        &tb,
        &srv.netns,
        9000,
        false,
        b"not tls\n",
    )?);
    // Node.js and Java servers, one process each for every version and client-auth policy:
    // Java clients talk to the Node servers (which write the key log), Node clients to the Java
    // servers (SunJSSE cannot write one; the Node clients do).
    let pem = Pem {
        ca: &ca,
        cert: &srv_cert,
    };
    let stack_matrix = |base: u16| -> Vec<Listener> {
        let mut v = Vec::new();
        for (i, version) in ["1.2", "1.3"].into_iter().enumerate() {
            for (j, policy) in [Policy::Required, Policy::Wanted, Policy::None]
                .into_iter()
                .enumerate()
            {
                v.push((base + 3 * i as u16 + j as u16, version, policy));
            }
        }
        v
    };
    let node_listeners = stack_matrix(8460);
    let java_listeners = stack_matrix(8470);
    procs.push(corpus_stacks::node_servers(
        &tb,
        &srv.netns,
        &pem,
        &keys.join("node-server.log"),
        &node_listeners,
    )?);
    let java = corpus_stacks::java_classes(&tb)?;
    procs.push(corpus_stacks::java_servers(
        &tb,
        &srv.netns,
        &java,
        &pem,
        &java_listeners,
    )?);
    let grpc_ports = GrpcPorts {
        mtls: 50051,
        tls: 50053,
        plain: 50052,
    };
    procs.push(corpus_stacks::grpc_server(
        &tb,
        &srv.netns,
        &grpc_ports,
        &pem,
    )?);
    procs.extend(corpus_stacks::mariadb_servers(
        &tb,
        &srv.netns,
        IpAddr::V4(srv.ipv4),
        &pem,
    )?);
    procs.push(corpus_stacks::smtp_server(
        &tb,
        &srv.netns,
        2525,
        &pem,
        &keys.join("smtp-server.log"),
    )?);

    // --- the live agent and the capture, on the same interfaces ---
    let inventory = work.join("inventory.yaml");
    write_inventory(
        &inventory,
        &[
            Workload::new("corpus", "srv", &[&srv]),
            Workload::new("corpus", "cli", &[&cli]),
            Workload::new("corpus", "small", &[&small]),
        ],
    )?;
    let agent = Agent::start(
        &tb,
        &bin,
        &inventory,
        &["vp*"],
        &["--recent-connections", "1000"],
        3,
    )?;
    let pcap = work.join("corpus.pcapng");
    let mut cap_args = vec!["tshark".to_owned(), "-n".into(), "-q".into()];
    for p in [&srv, &cli, &small] {
        cap_args.push("-i".into());
        cap_args.push(p.host_if.clone());
    }
    cap_args.extend(["-w".into(), pcap.display().to_string()]);
    let cap_refs: Vec<&str> = cap_args.iter().map(String::as_str).collect();
    let mut capture = tb.spawn(tb.node_netns(), &cap_refs)?;
    let deadline = Instant::now() + Duration::from_secs(20);
    while !capture.stderr().contains("Capturing on") {
        capture.ensure_running().context("tshark exited")?;
        ensure!(
            Instant::now() < deadline,
            "tshark did not start: {}",
            capture.stderr_tail()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(500));

    // --- traffic, with its ground truth ---
    let mut truth: Vec<Truth> = Vec::new();
    let c4 = IpAddr::V4(cli.ipv4);
    let c6 = cli.v6(0).ip();
    let sm = IpAddr::V4(small.ipv4);
    let mut nkey = 0;
    let mut keylog = || {
        nkey += 1;
        keys.join(format!("client-{nkey}.log"))
    };
    let istio = alpn_list(ISTIO_ALPN);
    // (case, port, client cert, ALPN, version flag, mTLS, version)
    type Case<'a> = (&'a str, u16, bool, Option<&'a str>, &'a str, bool, &'a str);
    let openssl_cases: [Case; 8] = [
        (
            "TLS 1.3 mTLS, Istio ALPN",
            8401,
            true,
            Some(ISTIO_ALPN),
            "-tls1_3",
            true,
            "1.3",
        ),
        (
            "TLS 1.3 one-way",
            8402,
            false,
            None,
            "-tls1_3",
            false,
            "1.3",
        ),
        (
            "TLS 1.2 mTLS, Istio ALPN",
            8403,
            true,
            Some(ISTIO_ALPN),
            "-tls1_2",
            true,
            "1.2",
        ),
        (
            "TLS 1.2 one-way",
            8404,
            false,
            None,
            "-tls1_2",
            false,
            "1.2",
        ),
        (
            "TLS 1.3, cert requested, none sent",
            8405,
            false,
            None,
            "-tls1_3",
            false,
            "1.3",
        ),
        (
            "TLS 1.2, cert requested, none sent",
            8406,
            false,
            None,
            "-tls1_2",
            false,
            "1.2",
        ),
        (
            "TLS 1.3 mTLS, with cert, no ALPN",
            8408,
            true,
            None,
            "-tls1_3",
            true,
            "1.3",
        ),
        (
            "TLS 1.2 mTLS offered to a requesting server",
            8406,
            true,
            Some("h2,http/1.1"),
            "-tls1_2",
            true,
            "1.2",
        ),
    ];
    for (case, port, cert, alpn, flag, mtls, v) in openssl_cases {
        for _ in 0..2 {
            s_client(
                &tb,
                &cli.netns,
                srv.v4(port),
                &ca,
                cert.then_some(&cli_cert),
                alpn,
                Some(flag),
                None,
                None,
                &keylog(),
                &[],
            )?;
            let mut t = Truth::tls(
                "openssl s_client/s_server",
                case,
                c4,
                srv.v4(port),
                mtls,
                v,
                &alpn.map(alpn_list).unwrap_or_default(),
            );
            if v == "1.2" && !mtls {
                // s_server on 8406 asks for a certificate: the client answers with an empty one.
                t = t.evidence(if port == 8406 {
                    "client_certificate_empty"
                } else {
                    "no_client_certificate"
                });
            }
            truth.push(t);
        }
    }
    // IPv6.
    s_client(
        &tb,
        &cli.netns,
        srv.v6(8401),
        &ca,
        Some(&cli_cert),
        Some(ISTIO_ALPN),
        Some("-tls1_3"),
        None,
        None,
        &keylog(),
        &[],
    )?;
    truth.push(Truth::tls(
        "openssl s_client/s_server",
        "TLS 1.3 mTLS over IPv6",
        c6,
        srv.v6(8401),
        true,
        "1.3",
        &istio,
    ));
    // Resumption: a full handshake saves the session, the next connections resume it.
    for (port, flag, cert, v) in [
        (8408u16, "-tls1_3", true, "1.3"),
        (8409, "-tls1_2", false, "1.2"),
    ] {
        let sess = work.join(format!("session-{port}.pem"));
        s_client(
            &tb,
            &cli.netns,
            srv.v4(port),
            &ca,
            cert.then_some(&cli_cert),
            None,
            Some(flag),
            Some(&sess),
            None,
            &keylog(),
            &[],
        )?;
        truth.push(Truth::tls(
            "openssl resumed sessions",
            &format!("TLS {v} full handshake"),
            c4,
            srv.v4(port),
            cert,
            v,
            &[],
        ));
        for _ in 0..2 {
            let out = s_client(
                &tb,
                &cli.netns,
                srv.v4(port),
                &ca,
                cert.then_some(&cli_cert),
                None,
                Some(flag),
                None,
                Some(&sess),
                &keylog(),
                &[],
            )?;
            ensure!(
                out.contains("Reused, TLSv"),
                "session to {port} was not resumed"
            );
            truth.push(
                Truth::tls(
                    "openssl resumed sessions",
                    &format!("TLS {v} resumed"),
                    c4,
                    srv.v4(port),
                    cert,
                    v,
                    &[],
                )
                .resumed(),
            );
        }
    }
    // A 2.8 KB ClientHello from the small-MTU pod: several segments on the wire.
    let padded = padded_alpn(2800, ISTIO_ALPN);
    for _ in 0..2 {
        s_client(
            &tb,
            &small.netns,
            srv.v4(8410),
            &ca,
            Some(&cli_cert),
            Some(&padded),
            Some("-tls1_3"),
            None,
            None,
            &keylog(),
            &[],
        )?;
        truth.push(Truth::tls(
            "segmented 2.8 KB ClientHello (MTU 1280, offloads off)",
            "TLS 1.3 mTLS, padded Istio ALPN",
            sm,
            srv.v4(8410),
            true,
            "1.3",
            &alpn_list(&padded),
        ));
    }

    // HelloRetryRequest, then the client certificate.
    for _ in 0..2 {
        s_client(
            &tb,
            &cli.netns,
            srv.v4(8411),
            &ca,
            Some(&cli_cert),
            Some(ISTIO_ALPN),
            Some("-tls1_3"),
            None,
            None,
            &keylog(),
            &["-groups", "X25519:P-256"],
        )?;
        truth.push(Truth::tls(
            "openssl HelloRetryRequest",
            "TLS 1.3 mTLS after a HelloRetryRequest",
            c4,
            srv.v4(8411),
            true,
            "1.3",
            &istio,
        ));
    }
    // TLS 1.3 record padding (`s_client -record_padding N`): every client record is a multiple
    // of N plus the tag. From 112 on a padded Finished is as large as a Certificate.
    let padding_cases: [(&str, u16, bool, &str); 7] = [
        (
            "64",
            8402,
            false,
            "one-way, pads to 64 (too small to matter)",
        ),
        ("128", 8402, false, "one-way, pads to 128"),
        ("512", 8402, false, "one-way, pads to 512"),
        ("4096", 8402, false, "one-way, pads to 4096"),
        ("256", 8405, false, "cert requested, none sent, pads to 256"),
        ("256", 8408, true, "mTLS, pads to 256"),
        ("4096", 8408, true, "mTLS, pads to 4096"),
    ];
    for (block, port, cert, case) in padding_cases {
        s_client(
            &tb,
            &cli.netns,
            srv.v4(port),
            &ca,
            cert.then_some(&cli_cert),
            None,
            Some("-tls1_3"),
            None,
            None,
            &keylog(),
            &["-record_padding", block],
        )?;
        let t = Truth::tls(
            "openssl record padding (TLS 1.3)",
            case,
            c4,
            srv.v4(port),
            cert,
            "1.3",
            &[],
        );
        truth.push(if block == "64" { t } else { t.padded() });
    }

    // Java (SunJSSE) clients to the Node.js servers, Node.js clients to the Java servers:
    // TLS 1.2 and 1.3, client auth required / wanted / none, with and without a certificate
    // (a client without one is not sent to a server that requires one).
    let client_pem = Pem {
        ca: &ca,
        cert: &cli_cert,
    };
    for (group, listeners, java_client) in [
        ("java client (SunJSSE) → node server", &node_listeners, true),
        (
            "node client → java server (SunJSSE)",
            &java_listeners,
            false,
        ),
    ] {
        for &(port, version, policy) in listeners {
            for cert in [true, false] {
                if policy == Policy::Required && !cert {
                    continue;
                }
                let mtls = cert && policy != Policy::None;
                let cc = ClientCert {
                    offered: cert,
                    seen: mtls,
                };
                if java_client {
                    corpus_stacks::java_client(
                        &tb,
                        &cli.netns,
                        &java,
                        srv.v4(port),
                        version,
                        &client_pem,
                        cc,
                    )?;
                } else {
                    corpus_stacks::node_client(
                        &tb,
                        &cli.netns,
                        srv.v4(port),
                        version,
                        &client_pem,
                        cc,
                        &keylog(),
                    )?;
                }
                let case = format!(
                    "TLS {version}, {}, {}",
                    policy.label(),
                    if cert {
                        "client cert"
                    } else {
                        "no client cert"
                    }
                );
                let mut t = Truth::tls(group, &case, c4, srv.v4(port), mtls, version, &[]);
                if version == "1.2" && !mtls {
                    t = t.evidence(if policy == Policy::Wanted {
                        "client_certificate_empty"
                    } else {
                        "no_client_certificate"
                    });
                }
                truth.push(t);
            }
        }
    }

    // gRPC (Python grpcio, BoringSSL): mTLS and one-way TLS with ALPN h2, and h2c. grpcio
    // cannot write a TLS key log, so tshark cannot see the TLS 1.3 handshake's encrypted part.
    for (mode, port, case) in [
        (
            GrpcMode::Mtls,
            grpc_ports.mtls,
            "mTLS (client certificate required)",
        ),
        (GrpcMode::Tls, grpc_ports.tls, "one-way TLS"),
        (GrpcMode::Plain, grpc_ports.plain, "plaintext h2c"),
    ] {
        for _ in 0..2 {
            corpus_stacks::grpc_client(&tb, &cli.netns, srv.v4(port), mode, &client_pem)?;
            truth.push(if mode == GrpcMode::Plain {
                Truth::plaintext("grpc (python grpcio)", case, c4, srv.v4(port), "h2c")
            } else {
                let mut t = Truth::tls(
                    "grpc (python grpcio)",
                    case,
                    c4,
                    srv.v4(port),
                    mode == GrpcMode::Mtls,
                    "1.3",
                    &GRPC_ALPN,
                );
                t.tshark = false;
                t
            });
        }
    }

    // MariaDB: TLS inside the MySQL protocol (the client's SSL request after the server's
    // greeting), with and without a client certificate, and a session without TLS.
    for (mode, port, case) in [
        (
            MariadbMode::ClientCert,
            3306,
            "require_secure_transport, client cert (TLS 1.2)",
        ),
        (
            MariadbMode::Tls,
            3306,
            "require_secure_transport, no client cert (TLS 1.2)",
        ),
        (MariadbMode::Plain, 3307, "without TLS"),
    ] {
        for _ in 0..2 {
            corpus_stacks::mariadb_client(&tb, &cli.netns, srv.v4(port), mode, &client_pem)?;
            truth.push(match mode {
                MariadbMode::Plain => Truth::plaintext("mariadb", case, c4, srv.v4(port), "mysql"),
                MariadbMode::ClientCert => {
                    Truth::tls("mariadb", case, c4, srv.v4(port), true, "1.2", &[])
                }
                MariadbMode::Tls => {
                    Truth::tls("mariadb", case, c4, srv.v4(port), false, "1.2", &[])
                        .evidence("client_certificate_empty")
                }
            });
        }
    }

    // SMTP-style: the server greets first; STARTTLS upgrades after plaintext commands, so the
    // connection is plaintext for STRICT (its first client bytes are not TLS).
    for starttls in [false, true] {
        for _ in 0..2 {
            corpus_stacks::smtp_client(
                &tb,
                &cli.netns,
                srv.v4(2525),
                &client_pem,
                starttls,
                &keylog(),
            )?;
            truth.push(
                Truth::plaintext(
                    "smtp-style (server speaks first)",
                    if starttls {
                        "STARTTLS after EHLO"
                    } else {
                        "plaintext session"
                    },
                    c4,
                    srv.v4(2525),
                    "other",
                )
                .evidence("server_banner"),
            );
        }
    }

    // curl against nginx.
    let curl_keys = keylog();
    let curl_env = format!("SSLKEYLOGFILE={}", curl_keys.display());
    let curl_tls = |url: String, cert: bool| -> Result<String> {
        let ca_s = ca.to_str().unwrap_or_default().to_owned();
        let (c, k) = (
            cli_cert.cert.display().to_string(),
            cli_cert.key.display().to_string(),
        );
        let mut args = vec![
            "env",
            curl_env.as_str(),
            "curl",
            "-sS",
            "--fail",
            "--noproxy",
            "*",
            "--max-time",
            "5",
            "--cacert",
            ca_s.as_str(),
        ];
        if cert {
            args.extend(["--cert", c.as_str(), "--key", k.as_str()]);
        }
        args.push(url.as_str());
        let out = tb.run_timeout(&cli.netns, &args, Duration::from_secs(10))?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let h2_h1 = ["h2", "http/1.1"];
    for _ in 0..2 {
        let body = curl_tls(https_url(srv.v4(8443)), true)?;
        ensure!(
            body.contains("SUCCESS"),
            "nginx did not verify the client: {body}"
        );
        truth.push(Truth::tls(
            "curl + nginx",
            "ssl_verify_client on, client cert",
            c4,
            srv.v4(8443),
            true,
            "1.3",
            &h2_h1,
        ));
        let body = curl_tls(https_url(srv.v4(8444)), false)?;
        ensure!(body.contains("NONE"), "{body}");
        truth.push(Truth::tls(
            "curl + nginx",
            "ssl_verify_client off",
            c4,
            srv.v4(8444),
            false,
            "1.3",
            &h2_h1,
        ));
        let body = curl_tls(https_url(srv.v4(8445)), true)?;
        ensure!(body.contains("SUCCESS"), "{body}");
        truth.push(Truth::tls(
            "curl + nginx",
            "TLS 1.2, ssl_verify_client on, client cert",
            c4,
            srv.v4(8445),
            true,
            "1.2",
            &h2_h1,
        ));
    }

    // Python's ssl: client with a certificate to a Python server that requires one; client
    // without one to s_server.
    for (port, cert, mtls) in [(8446u16, true, true), (8447, false, false)] {
        for _ in 0..2 {
            let kl = keylog();
            let (c, k) = if cert {
                (
                    cli_cert.cert.display().to_string(),
                    cli_cert.key.display().to_string(),
                )
            } else {
                ("-".to_owned(), "-".to_owned())
            };
            let out = tb.run_timeout(
                &cli.netns,
                &[
                    "/usr/bin/python3",
                    "-c",
                    PY_CLIENT,
                    &srv.ipv4.to_string(),
                    &port.to_string(),
                    ca.to_str().context("path")?,
                    &c,
                    &k,
                    kl.to_str().context("path")?,
                    "h2,http/1.1",
                ],
                Duration::from_secs(10),
            )?;
            let text = String::from_utf8_lossy(&out.stdout);
            ensure!(
                text.contains("TLSv1.3") && text.contains("200"),
                "python client: {text}"
            );
            truth.push(Truth::tls(
                "python ssl",
                if mtls {
                    "client cert to a server requiring one"
                } else {
                    "no client cert"
                },
                c4,
                srv.v4(port),
                mtls,
                "1.3",
                &h2_h1,
            ));
        }
    }

    // rustls client and server (ring provider): mTLS 1.3 and 1.2, one-way 1.2.
    let rustls_bin = env!("CARGO_BIN_EXE_rustls-peer");
    let (cc, ck) = (
        cli_cert.cert.display().to_string(),
        cli_cert.key.display().to_string(),
    );
    let ca_s = ca.display().to_string();
    for (port, mtls, tls12, v) in [
        (8448u16, true, false, "1.3"),
        (8450, true, true, "1.2"),
        (8449, false, true, "1.2"),
    ] {
        for _ in 0..2 {
            let kl = format!("SSLKEYLOGFILE={}", keylog().display());
            let connect = srv.v4(port).to_string();
            let mut args = vec![
                "env",
                kl.as_str(),
                rustls_bin,
                "client",
                "--connect",
                connect.as_str(),
                "--ca",
                ca_s.as_str(),
                "--alpn",
                "h2,http/1.1",
            ];
            if mtls {
                args.extend(["--cert", cc.as_str(), "--key", ck.as_str()]);
            }
            if tls12 {
                args.push("--tls12");
            }
            let out = tb.run_timeout(&cli.netns, &args, Duration::from_secs(10))?;
            let text = String::from_utf8_lossy(&out.stdout);
            ensure!(
                text.contains(if mtls {
                    "client-cert=yes"
                } else {
                    "client-cert=no"
                }),
                "rustls client: {text}"
            );
            truth.push(Truth::tls(
                "rustls client + server",
                match (mtls, tls12) {
                    (true, false) => "TLS 1.3 mTLS",
                    (true, true) => "TLS 1.2 mTLS",
                    _ => "TLS 1.2 one-way",
                },
                c4,
                srv.v4(port),
                mtls,
                v,
                &h2_h1,
            ));
        }
    }

    // Plaintext: HTTP/1 and h2c.
    for _ in 0..2 {
        curl(&tb, &cli.netns, &[&http_url(srv.v4(8080))])?;
        truth.push(Truth::plaintext(
            "plaintext",
            "HTTP/1.1 (curl → nginx)",
            c4,
            srv.v4(8080),
            "http1",
        ));
        curl(
            &tb,
            &cli.netns,
            &["--http2-prior-knowledge", &http_url(srv.v4(8081))],
        )?;
        truth.push(Truth::plaintext(
            "plaintext",
            "h2c prior knowledge (curl → nginx)",
            c4,
            srv.v4(8081),
            "h2c",
        ));
    }

    // PostgreSQL: plaintext, TLS without and with a client certificate.
    let pg = srv.v4(5432);
    let pg_cert = (cli_cert.cert.as_path(), pg_key.as_path());
    for _ in 0..2 {
        psql(&tb, &cli.netns, pg.ip(), "disable", None)?;
        truth.push(Truth::plaintext(
            "postgresql",
            "sslmode=disable",
            c4,
            pg,
            "postgres",
        ));
        psql(&tb, &cli.netns, pg.ip(), "require", None)?;
        truth.push(
            Truth::tls(
                "postgresql",
                "sslmode=require, no client cert (TLS 1.2)",
                c4,
                pg,
                false,
                "1.2",
                &[],
            )
            .evidence("client_certificate_empty"),
        );
        psql(&tb, &cli.netns, pg.ip(), "require", Some(pg_cert))?;
        truth.push(Truth::tls(
            "postgresql",
            "sslmode=require, client cert (TLS 1.2)",
            c4,
            pg,
            true,
            "1.2",
            &[],
        ));
    }

    // Hostile inputs through the real kernel path.
    let hostile = |case: &str| Truth {
        group: "hostile (raw TCP)",
        case: case.to_owned(),
        client_ip: c4,
        server: srv.v4(9000),
        security: "unknown",
        also: None,
        shark_security: None,
        tls_version: None,
        alpn: Vec::new(),
        protocol: None,
        resumed: false,
        evidence: Some("malformed"),
        tshark: false,
    };
    let mut garbage = vec![22, 3, 1, 1, 0];
    garbage.extend(noise(256, 7));
    garbage[5] = 0x63; // not a ClientHello
    let huge = vec![22, 3, 1, 0x40, 0, 1, 0xff, 0xff, 0xff, 3, 3, 0, 0];
    for (case, payload) in [
        ("random bytes after a TLS record header", garbage),
        ("16 MiB handshake length", huge),
        (
            "ClientHello with 10,000 extensions",
            hello_with_extensions(10_000),
        ),
    ] {
        tcp_exchange(&tb, &cli.netns, srv.v4(9000), &payload)?;
        truth.push(hostile(case));
    }

    // Memory stays bounded after the hostile inputs (the classifier caps what it buffers).
    let status = std::fs::read_to_string(format!("/proc/{}/status", agent.proc().pid()))?;
    let rss_kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .context("VmRSS of the agent")?;
    ensure!(
        rss_kib < 256 * 1024,
        "agent resident memory {rss_kib} KiB after the corpus"
    );

    // --- stop the capture, let the agent count everything ---
    std::thread::sleep(Duration::from_millis(1500));
    capture.stop_with_grace(Duration::from_secs(10));
    let metrics = agent.settle(&tb, Duration::from_secs(20))?;
    let api = tb.output(
        tb.node_netns(),
        &[
            "curl",
            "-sS",
            "--fail",
            "--noproxy",
            "*",
            &format!("{}/api/v1/connections", agent.url()),
        ],
        None,
        Duration::from_secs(10),
    )?;
    ensure!(api.status.success(), "GET /api/v1/connections failed");
    let live: Value = serde_json::from_slice(&api.stdout)?;
    let live_conns = live["connections"]
        .as_array()
        .context("connections")?
        .clone();

    // --- classify --pcap ---
    let out = std::process::Command::new(&bin)
        .args([
            "classify",
            "--pcap",
            pcap.to_str().context("path")?,
            "--output",
            "json",
        ])
        .output()?;
    ensure!(
        out.status.success(),
        "classify --pcap failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(
        out.stderr.is_empty(),
        "classify --pcap warned: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let offline: Vec<Value> = serde_json::from_slice(&out.stdout)?;
    let table = std::process::Command::new(&bin)
        .env("NO_COLOR", "1")
        .args(["classify", "--pcap", pcap.to_str().context("path")?])
        .output()?;
    ensure!(table.status.success());

    // --- tshark ---
    let all_keys = work.join("all-keys.log");
    let mut key_text = String::new();
    for e in std::fs::read_dir(&keys)? {
        key_text.push_str(&std::fs::read_to_string(e?.path())?);
    }
    std::fs::write(&all_keys, key_text)?;
    let shark = tshark_verdicts(
        &pcap,
        &all_keys,
        &[
            (8081, "http2"),
            (grpc_ports.plain, "http2"),
            (3307, "mysql"),
            (2525, "smtp"),
        ],
    )?;

    // --- compare, connection by connection ---
    // The i-th connection made to a server address is the i-th one each judge saw there.
    let mut offline_by_server: BTreeMap<String, Vec<&Value>> = BTreeMap::new();
    for r in &offline {
        offline_by_server
            .entry(r["server"].as_str().unwrap_or_default().to_owned())
            .or_default()
            .push(r);
    }
    ensure!(
        offline.len() == truth.len(),
        "classify --pcap found {} connections, {} were made:\n{}",
        offline.len(),
        truth.len(),
        String::from_utf8_lossy(&table.stdout)
    );
    let mut used: HashMap<String, usize> = HashMap::new();
    let mut failures = Vec::new();
    // group -> [connections, pcap ok, live ok, tshark ok, tshark judged]
    let mut rows: BTreeMap<(&str, String), [usize; 5]> = BTreeMap::new();
    for t in &truth {
        let key = t.server.to_string();
        let i = used.entry(key.clone()).or_default();
        let Some(rec) = offline_by_server.get(&key).and_then(|v| v.get(*i)) else {
            failures.push(format!(
                "{}: no record for connection {} to {key}",
                t.case,
                *i + 1
            ));
            *i += 1;
            continue;
        };
        *i += 1;
        let row = rows.entry((t.group, t.case.clone())).or_default();
        row[0] += 1;
        let client: SocketAddr = rec["client"].as_str().unwrap_or_default().parse()?;
        if client.ip() != t.client_ip {
            failures.push(format!(
                "{}: client {client}, made from {}",
                t.case, t.client_ip
            ));
        }
        let off = judged(rec);
        let d = disagreements(t, &off, false);
        if d.is_empty() {
            row[1] += 1;
        } else {
            failures.push(format!(
                "{} {client}->{}: classify --pcap: {}",
                t.case,
                t.server,
                d.join(", ")
            ));
        }
        match live_conns
            .iter()
            .find(|c| c["client"] == rec["client"] && c["server"] == rec["server"])
        {
            Some(l) => {
                let lj = judged(l);
                let d = disagreements(t, &lj, false);
                if !l["sni"].is_null() {
                    failures.push(format!(
                        "{}: live record exposes SNI without --expose-handshake-details",
                        t.case
                    ));
                }
                if d.is_empty() && lj.evidence == off.evidence {
                    row[2] += 1;
                } else {
                    failures.push(format!(
                        "{} {client}->{}: live agent: {} (evidence {} vs pcap {})",
                        t.case,
                        t.server,
                        d.join(", "),
                        lj.evidence,
                        off.evidence
                    ));
                }
            }
            None => failures.push(format!(
                "{} {client}->{}: not in the live agent's records",
                t.case, t.server
            )),
        }
        if t.tshark {
            row[4] += 1;
            match shark.get(&(client, t.server)) {
                Some((j, _)) => {
                    let d = disagreements(t, j, true);
                    if d.is_empty() {
                        row[3] += 1;
                    } else {
                        failures.push(format!(
                            "{} {client}->{}: tshark: {}",
                            t.case,
                            t.server,
                            d.join(", ")
                        ));
                    }
                }
                None => failures.push(format!(
                    "{} {client}->{}: tshark saw no such stream",
                    t.case, t.server
                )),
            }
        }
    }

    // The HelloRetryRequest really happened (its ServerHello random is the RFC 8446 constant).
    let hrr = std::process::Command::new("tshark")
        .args(["-n", "-r", pcap.to_str().context("path")?, "-Y"])
        .arg("tcp.srcport == 8411 && tls.handshake.type == 2 && tls.handshake.random[0:4] == cf:21:ad:74")
        .args(["-T", "fields", "-e", "tcp.dstport"])
        .output()?;
    let mut hrr_clients: Vec<String> = String::from_utf8_lossy(&hrr.stdout)
        .lines()
        .map(str::to_owned)
        .collect();
    hrr_clients.sort();
    hrr_clients.dedup();
    ensure!(
        hrr_clients.len() == 2,
        "expected a HelloRetryRequest on both connections to 8411: {hrr_clients:?}"
    );

    // The padded ClientHello really crossed the wire as several segments.
    for (k, (_, segs)) in &shark {
        if k.1 == srv.v4(8410) {
            let small_segments = segs.iter().filter(|&&n| n <= 1280).count();
            ensure!(
                small_segments >= 3 && segs.iter().all(|&n| n <= 1280),
                "the ClientHello from the small-MTU pod was not segmented: {segs:?}"
            );
        }
    }

    // Evidence as a bounded label on the Prometheus counter, equal to the live records.
    let mut by_evidence: BTreeMap<(String, String), f64> = BTreeMap::new();
    for c in &live_conns {
        *by_evidence
            .entry((
                c["security"].as_str().unwrap_or_default().to_owned(),
                c["evidence_kind"].as_str().unwrap_or_default().to_owned(),
            ))
            .or_default() += 1.0;
    }
    for ((sec, ev), n) in &by_evidence {
        let m = metric_value(
            &metrics,
            "mtls_agent_verdict_evidence_total",
            &[("security", sec), ("evidence", ev)],
        );
        if m != Some(*n) {
            failures.push(format!("mtls_agent_verdict_evidence_total{{security={sec},evidence={ev}}} = {m:?}, records say {n}"));
        }
    }
    ensure!(
        by_evidence.get(&("unknown".into(), "malformed".into())) == Some(&3.0),
        "expected 3 malformed connections, records: {by_evidence:?}"
    );
    ensure!(live["total"].as_u64() == Some(live_conns.len() as u64));

    // --- the accuracy table ---
    let mut md = String::from(
        "| traffic | case | connections | classify --pcap | live agent | tshark |\n|---|---|---:|---:|---:|---:|\n",
    );
    let mut tot = [0usize; 5];
    for ((group, case), r) in &rows {
        let shark_cell = if r[4] == 0 {
            "n/a".to_owned()
        } else {
            format!("{}/{}", r[3], r[4])
        };
        let _ = writeln!(
            md,
            "| {group} | {case} | {} | {}/{} | {}/{} | {shark_cell} |",
            r[0], r[1], r[0], r[2], r[0]
        );
        for (t, v) in tot.iter_mut().zip(r) {
            *t += v;
        }
    }
    let pct = |a: usize, b: usize| {
        if b == 0 {
            100.0
        } else {
            100.0 * a as f64 / b as f64
        }
    };
    let _ = writeln!(
        md,
        "| **total** | | **{}** | **{}/{} ({:.1}%)** | **{}/{} ({:.1}%)** | **{}/{} ({:.1}%)** |",
        tot[0],
        tot[1],
        tot[0],
        pct(tot[1], tot[0]),
        tot[2],
        tot[0],
        pct(tot[2], tot[0]),
        tot[3],
        tot[4],
        pct(tot[3], tot[4])
    );
    let _ = writeln!(
        md,
        "\n`classify --pcap` summary: {} (captured with tshark on the 3 pods' host-side veths, so \
         every pod-to-pod segment is in the file twice); live agent resident memory after the \
         corpus {} MiB; corpus run took {:.0} s.",
        String::from_utf8_lossy(&table.stdout)
            .lines()
            .last()
            .unwrap_or_default(),
        rss_kib / 1024,
        started.elapsed().as_secs_f64()
    );
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/corpus");
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("accuracy.md"), &md)?;
    let _ = std::fs::copy(&pcap, dir.join("corpus.pcapng"));
    let _ = std::fs::copy(&all_keys, dir.join("corpus-keys.log"));
    println!("{md}");
    println!("{}", String::from_utf8_lossy(&table.stdout));
    if !failures.is_empty() {
        bail!(
            "{} disagreements:\n{}\n\n{md}",
            failures.len(),
            failures.join("\n")
        );
    }
    let status = agent.stop()?;
    ensure!(status.success(), "agent exited with {status}");
    drop(procs);
    tb.destroy()?;
    Ok(())
}
