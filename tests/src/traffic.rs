//! Real servers and clients for the traffic the agent must classify.
//!
//! Everything uses stock tools (openssl, nginx, curl, python3) rather than in-process TLS, so
//! that the bytes on the wire are what real peers send (OpenSSL 3 ClientHellos, real client
//! Certificate flights). Servers keep serving sequential connections until their [`Proc`] is
//! dropped; clients make exactly one connection and are bounded by a timeout so nothing hangs.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};

use crate::netns::Testbed;
use crate::pki::CertPaths;
use crate::proc::{Proc, describe_status, tail, wait_tcp_listening_proc};

/// How long a server may take to start listening.
pub const SERVER_START_TIMEOUT: Duration = Duration::from_secs(15);
/// Upper bound for one client connection (handshake, request, response, close).
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(10);

/// The request clients send: small, one application record, recognisable as HTTP/1.
pub const HTTP_REQUEST: &[u8] = b"GET / HTTP/1.0\r\nHost: testbed\r\n\r\n";

/// Which TLS versions an endpoint allows.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum TlsVersion {
    /// Whatever OpenSSL negotiates (TLS 1.3 between two OpenSSL 3 peers).
    #[default]
    Any,
    /// TLS 1.2 only: certificates are visible on the wire.
    Tls12,
    /// TLS 1.3 only: certificates are encrypted.
    Tls13,
}

impl TlsVersion {
    fn openssl_flag(self) -> Option<&'static str> {
        match self {
            TlsVersion::Any => None,
            TlsVersion::Tls12 => Some("-tls1_2"),
            TlsVersion::Tls13 => Some("-tls1_3"),
        }
    }
}

fn p(path: &Path) -> Result<&str> {
    path.to_str()
        .with_context(|| format!("non-UTF-8 path {}", path.display()))
}

/// Listen address as openssl/nginx/python spell it and as [`wait_tcp_listening_proc`] checks
/// it: `ipv6` means a dual-stack wildcard socket (serves IPv4 and IPv6), otherwise IPv4 only.
fn wildcard(port: u16, ipv6: bool) -> SocketAddr {
    if ipv6 {
        SocketAddr::from(([0u16; 8], port))
    } else {
        SocketAddr::from(([0u8; 4], port))
    }
}

/// An `openssl s_server` configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsServer {
    /// TCP port.
    pub port: u16,
    /// Server certificate (PEM).
    pub cert: PathBuf,
    /// Server key (PEM).
    pub key: PathBuf,
    /// CA used to verify client certificates.
    pub ca: PathBuf,
    /// Abort handshakes without a valid client certificate (mTLS, what STRICT does).
    pub require_client_cert: bool,
    /// Ask for a client certificate but accept clients without one (mTLS or one-way TLS
    /// depending on the client, like PERMISSIVE-era servers).
    pub request_client_cert: bool,
    /// ALPN protocols the server accepts, comma-separated (e.g. `istio-peer-exchange,istio`).
    pub alpn: Option<String>,
    /// Allowed TLS versions.
    pub tls_version: TlsVersion,
    /// Listen dual-stack (`[::]`, serves IPv4 too) instead of IPv4 only.
    pub ipv6: bool,
}

impl TlsServer {
    /// A dual-stack one-way TLS server with the given identity; adjust the public fields or use
    /// the builder methods for mTLS, ALPN and versions.
    pub fn new(port: u16, cert: &CertPaths, ca: &Path) -> Self {
        TlsServer {
            port,
            cert: cert.cert.clone(),
            key: cert.key.clone(),
            ca: ca.to_path_buf(),
            require_client_cert: false,
            request_client_cert: false,
            alpn: None,
            tls_version: TlsVersion::Any,
            ipv6: true,
        }
    }

    /// Requires a client certificate (mTLS only).
    pub fn require_client_cert(mut self) -> Self {
        self.require_client_cert = true;
        self
    }

    /// Requests but does not require a client certificate.
    pub fn request_client_cert(mut self) -> Self {
        self.request_client_cert = true;
        self
    }

    /// Sets the accepted ALPN protocols (comma-separated).
    pub fn alpn(mut self, alpn: &str) -> Self {
        self.alpn = Some(alpn.to_string());
        self
    }

    /// Restricts the TLS version.
    pub fn tls_version(mut self, v: TlsVersion) -> Self {
        self.tls_version = v;
        self
    }

    /// Chooses dual-stack (true) or IPv4-only (false) listening.
    pub fn ipv6(mut self, ipv6: bool) -> Self {
        self.ipv6 = ipv6;
        self
    }
}

/// Starts `openssl s_server -www` in `ns` and waits until it listens. It answers every
/// `GET /` with a status page and keeps accepting connections one after the other.
pub fn openssl_server(tb: &Testbed, ns: &str, cfg: &TlsServer) -> Result<Proc> {
    let port = cfg.port.to_string();
    // `-accept PORT` makes OpenSSL open a dual-stack socket; `[::]:PORT` would be IPv6-only.
    let accept = if cfg.ipv6 {
        port.clone()
    } else {
        format!("0.0.0.0:{port}")
    };
    let mut args = vec![
        "openssl",
        "s_server",
        "-accept",
        &accept,
        "-cert",
        p(&cfg.cert)?,
        "-key",
        p(&cfg.key)?,
        "-CAfile",
        p(&cfg.ca)?,
        "-www",
    ];
    if cfg.require_client_cert {
        args.extend(["-Verify", "1"]);
    } else if cfg.request_client_cert {
        args.extend(["-verify", "1"]);
    }
    if let Some(alpn) = &cfg.alpn {
        args.extend(["-alpn", alpn]);
    }
    args.extend(cfg.tls_version.openssl_flag());
    let proc = tb.spawn(ns, &args)?;
    wait_tcp_listening_proc(
        ns,
        wildcard(cfg.port, cfg.ipv6),
        SERVER_START_TIMEOUT,
        Some(&proc),
    )?;
    Ok(proc)
}

/// An `openssl s_client` connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsClient {
    /// Where to connect.
    pub server: SocketAddr,
    /// Client certificate and key to present when the server asks (None: one-way TLS).
    pub cert: Option<CertPaths>,
    /// CA that must have signed the server certificate (verification failures are errors).
    pub ca: PathBuf,
    /// ALPN protocols to offer, comma-separated; `istio-peer-exchange,istio` makes the
    /// ClientHello look like an Istio sidecar's.
    pub alpn: Option<String>,
    /// Allowed TLS versions.
    pub tls_version: TlsVersion,
    /// SNI to send (None: send no SNI at all).
    pub servername: Option<String>,
    /// Upper bound for the whole connection.
    pub timeout: Duration,
    /// Save the session (ticket) here, for a later resumption with `session_in`.
    pub session_out: Option<PathBuf>,
    /// Resume the session saved in this file (an abbreviated handshake: no certificates).
    pub session_in: Option<PathBuf>,
}

impl TlsClient {
    /// A one-way TLS client without SNI or ALPN.
    pub fn new(server: SocketAddr, ca: &Path) -> Self {
        TlsClient {
            server,
            cert: None,
            ca: ca.to_path_buf(),
            alpn: None,
            tls_version: TlsVersion::Any,
            servername: None,
            timeout: CLIENT_TIMEOUT,
            session_out: None,
            session_in: None,
        }
    }

    /// Saves the session for resumption (see [`TlsClient::session_out`]).
    pub fn session_out(mut self, path: &Path) -> Self {
        self.session_out = Some(path.to_path_buf());
        self
    }

    /// Resumes a saved session (see [`TlsClient::session_in`]).
    pub fn session_in(mut self, path: &Path) -> Self {
        self.session_in = Some(path.to_path_buf());
        self
    }

    /// Presents this client certificate (mTLS).
    pub fn cert(mut self, cert: &CertPaths) -> Self {
        self.cert = Some(cert.clone());
        self
    }

    /// Offers these ALPN protocols (comma-separated).
    pub fn alpn(mut self, alpn: &str) -> Self {
        self.alpn = Some(alpn.to_string());
        self
    }

    /// Restricts the TLS version.
    pub fn tls_version(mut self, v: TlsVersion) -> Self {
        self.tls_version = v;
        self
    }

    /// Sends this SNI.
    pub fn servername(mut self, name: &str) -> Self {
        self.servername = Some(name.to_string());
        self
    }
}

/// What a successful [`openssl_client`] connection negotiated, so tests can check that the
/// traffic really is what they meant to generate before blaming the classifier.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TlsSession {
    /// e.g. `TLSv1.3`.
    pub protocol: String,
    /// e.g. `TLS_AES_256_GCM_SHA384`.
    pub cipher: String,
    /// Negotiated ALPN protocol, if any.
    pub alpn: Option<String>,
    /// Whether the session was resumed (PSK / session id) rather than fully negotiated.
    pub reused: bool,
    /// The HTTP response the server sent.
    pub response: String,
    /// Whether the server reported a client certificate: `Some` only for `openssl s_server
    /// -www`, whose status page says so; lets a test confirm it generated mTLS and not one-way
    /// TLS before it expects a verdict.
    pub server_saw_client_cert: Option<bool>,
}

/// Parses the session summary `s_client` prints before the response (`New, TLSv1.3, Cipher is
/// ...`, `ALPN protocol: ...`) and splits off the HTTP response.
fn parse_session(stdout: &str) -> TlsSession {
    let mut s = TlsSession::default();
    let (head, response) = match stdout.find("HTTP/1.") {
        Some(i) => stdout.split_at(i),
        None => (stdout, ""),
    };
    s.response = response.to_string();
    s.server_saw_client_cert = if response.contains("\nno client certificate available") {
        Some(false)
    } else if response.contains("\nClient certificate\n") {
        Some(true)
    } else {
        None
    };
    for line in head.lines() {
        let line = line.trim();
        if let Some(rest) = line
            .strip_prefix("New, ")
            .or_else(|| line.strip_prefix("Reused, "))
        {
            if let Some((proto, cipher)) = rest.split_once(", Cipher is ") {
                s.protocol = proto.trim().to_string();
                s.cipher = cipher.trim().to_string();
                s.reused = line.starts_with("Reused, ");
            }
        } else if let Some(v) = line.strip_prefix("ALPN protocol: ") {
            s.alpn = Some(v.trim().to_string());
        }
    }
    s
}

/// Makes ONE full TLS handshake to `cfg.server` from `ns` (sending the client certificate
/// flight when the server asks and one is configured), sends [`HTTP_REQUEST`] as an
/// application record, reads the response and closes. Errors unless the server answered
/// `HTTP/1.x 200`, which also catches a server that rejected the client after the handshake
/// (TLS 1.3 reports a missing client certificate only then).
pub fn openssl_client(tb: &Testbed, ns: &str, cfg: &TlsClient) -> Result<TlsSession> {
    let connect = cfg.server.to_string();
    let mut args = vec![
        "openssl",
        "s_client",
        "-connect",
        &connect,
        "-CAfile",
        p(&cfg.ca)?,
        "-verify_return_error",
        // Keep reading after stdin ends until the server closes, so the whole response is
        // received. (No -quiet/-brief: they hide the negotiated ALPN.)
        "-ign_eof",
    ];
    if let Some(c) = &cfg.cert {
        args.extend(["-cert", p(&c.cert)?, "-key", p(&c.key)?]);
    }
    if let Some(alpn) = &cfg.alpn {
        args.extend(["-alpn", alpn]);
    }
    match &cfg.servername {
        Some(sni) => args.extend(["-servername", sni]),
        None => args.push("-noservername"),
    }
    if let Some(f) = &cfg.session_out {
        args.extend(["-sess_out", p(f)?]);
    }
    if let Some(f) = &cfg.session_in {
        args.extend(["-sess_in", p(f)?]);
    }
    args.extend(cfg.tls_version.openssl_flag());
    let out = tb
        .output(ns, &args, Some(HTTP_REQUEST), cfg.timeout)
        .with_context(|| format!("TLS client in {ns} to {}", cfg.server))?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let session = parse_session(&stdout);
    if !out.status.success()
        || !(session.response.starts_with("HTTP/1.0 200")
            || session.response.starts_with("HTTP/1.1 200"))
    {
        bail!(
            "TLS client in {ns} to {} failed ({}): stderr: {}; stdout: {}",
            cfg.server,
            describe_status(out.status),
            tail(stderr.as_bytes()),
            tail(stdout.as_bytes())
        );
    }
    Ok(session)
}

/// An ALPN list of at least `min_len` bytes on the wire: filler protocol names followed by
/// `real` (comma-separated). OpenSSL 3.0 cannot send a post-quantum key share, so this is how
/// a test makes a 1.5-2 KB ClientHello whose interesting ALPN entries sit past the first
/// kilobyte (the server still picks from `real` by its own preference).
pub fn padded_alpn(min_len: usize, real: &str) -> String {
    let mut names: Vec<String> = Vec::new();
    let mut len: usize = real.split(',').map(|n| n.len() + 1).sum();
    let mut i = 0;
    while len < min_len {
        // 200-byte names: at most 255 allowed per protocol name.
        let name = format!("x-filler-{i:03}-{}", "f".repeat(187));
        len += name.len() + 1;
        names.push(name);
        i += 1;
    }
    names.push(real.to_string());
    names.join(",")
}

/// [`openssl_client`] `n` times in a row (each a new connection and full handshake).
pub fn openssl_client_repeat(tb: &Testbed, ns: &str, cfg: &TlsClient, n: usize) -> Result<()> {
    for i in 0..n {
        openssl_client(tb, ns, cfg).with_context(|| format!("connection {} of {n}", i + 1))?;
    }
    Ok(())
}

/// Starts a plain HTTP/1 server (python3 http.server, serving a one-file directory) in `ns`;
/// `ipv6` makes it dual-stack.
pub fn http_server(tb: &Testbed, ns: &str, port: u16, ipv6: bool) -> Result<Proc> {
    let dir = tb.scratch_dir("http")?;
    std::fs::write(dir.join("index.html"), "ok\n")
        .with_context(|| format!("writing {}", dir.display()))?;
    let port_s = port.to_string();
    let python = python3();
    let args = [
        python,
        "-u",
        "-m",
        "http.server",
        "--bind",
        if ipv6 { "::" } else { "0.0.0.0" },
        "--directory",
        p(&dir)?,
        &port_s,
    ];
    let proc = tb.spawn(ns, &args)?;
    wait_tcp_listening_proc(ns, wildcard(port, ipv6), SERVER_START_TIMEOUT, Some(&proc))?;
    Ok(proc)
}

/// The python interpreter: the system one when present (independent of user shims).
fn python3() -> &'static str {
    if Path::new("/usr/bin/python3").exists() {
        "/usr/bin/python3"
    } else {
        "python3"
    }
}

/// `http://ip:port/` or `http://[ip6]:port/` for an address (curl needs the brackets).
pub fn http_url(addr: SocketAddr) -> String {
    format!("http://{addr}/")
}

/// `https://...` like [`http_url`].
pub fn https_url(addr: SocketAddr) -> String {
    format!("https://{addr}/")
}

/// Fetches `url` with curl from `ns` (one connection, 5 s limit, no proxy) and returns the body;
/// an HTTP error status is an error. Run it in the node namespace to play a kubelet probe.
pub fn http_get(tb: &Testbed, ns: &str, url: &str) -> Result<String> {
    curl(tb, ns, &[url])
}

/// curl with extra arguments (e.g. `--cacert`, `--cert`, `--key`, `--http2`), same rules as
/// [`http_get`]; the last argument should be the URL.
pub fn curl(tb: &Testbed, ns: &str, extra: &[&str]) -> Result<String> {
    let mut args = vec!["curl", "-sS", "--fail", "--noproxy", "*", "--max-time", "5"];
    args.extend_from_slice(extra);
    let out = tb
        .run_timeout(ns, &args, CLIENT_TIMEOUT)
        .with_context(|| format!("HTTP client in {ns}"))?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// How nginx treats client certificates (`ssl_verify_client`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum VerifyClient {
    /// Do not ask (one-way TLS).
    #[default]
    Off,
    /// Ask, accept clients without one.
    Optional,
    /// Require a valid one (mTLS).
    On,
}

/// An nginx server: plain HTTP when `tls` is None.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NginxServer {
    /// TCP port.
    pub port: u16,
    /// Dual-stack (true) or IPv4-only.
    pub ipv6: bool,
    /// TLS settings; None for plaintext HTTP.
    pub tls: Option<NginxTls>,
}

/// TLS settings of an [`NginxServer`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NginxTls {
    /// Server certificate and key.
    pub cert: CertPaths,
    /// CA for client certificates.
    pub ca: PathBuf,
    /// Client certificate policy.
    pub verify_client: VerifyClient,
    /// Allowed versions.
    pub tls_version: TlsVersion,
}

/// Starts nginx (foreground, private prefix/pid/logs under the bed's work directory) in `ns`.
/// A second TLS implementation next to OpenSSL's s_server, with real HTTP/1.1 keep-alive and
/// h2 via ALPN. Every response body is `ok <$ssl_client_verify>`.
pub fn nginx_server(tb: &Testbed, ns: &str, cfg: &NginxServer) -> Result<Proc> {
    let dir = tb.scratch_dir("nginx")?;
    let d = p(&dir)?;
    let mut conf = String::new();
    let listen = if cfg.ipv6 {
        format!("[::]:{} ipv6only=off", cfg.port)
    } else {
        format!("0.0.0.0:{}", cfg.port)
    };
    let _ = writeln!(
        conf,
        "user root root;\nworker_processes 1;\ndaemon off;\npid {d}/nginx.pid;\n\
         error_log {d}/error.log info;\nevents {{ worker_connections 256; }}\nhttp {{\n\
         access_log {d}/access.log;\nclient_body_temp_path {d}/body;\nproxy_temp_path {d}/proxy;\n\
         fastcgi_temp_path {d}/fastcgi;\nuwsgi_temp_path {d}/uwsgi;\nscgi_temp_path {d}/scgi;\n\
         server {{"
    );
    match &cfg.tls {
        None => {
            let _ = writeln!(conf, "listen {listen};");
        }
        Some(tls) => {
            let protocols = match tls.tls_version {
                TlsVersion::Any => "TLSv1.2 TLSv1.3",
                TlsVersion::Tls12 => "TLSv1.2",
                TlsVersion::Tls13 => "TLSv1.3",
            };
            let verify = match tls.verify_client {
                VerifyClient::Off => "off",
                VerifyClient::Optional => "optional",
                VerifyClient::On => "on",
            };
            let _ = writeln!(
                conf,
                "listen {listen} ssl http2;\nssl_certificate {};\nssl_certificate_key {};\n\
                 ssl_protocols {protocols};\nssl_client_certificate {};\nssl_verify_client {verify};",
                p(&tls.cert.cert)?,
                p(&tls.cert.key)?,
                p(&tls.ca)?
            );
        }
    }
    let _ = writeln!(
        conf,
        "location / {{ default_type text/plain; return 200 \"ok $ssl_client_verify\\n\"; }}\n}}\n}}"
    );
    let conf_path = dir.join("nginx.conf");
    std::fs::write(&conf_path, &conf)
        .with_context(|| format!("writing {}", conf_path.display()))?;
    let args = [
        "nginx",
        "-e",
        &format!("{d}/error.log"),
        "-p",
        d,
        "-c",
        p(&conf_path)?,
    ];
    let proc = tb.spawn(ns, &args)?;
    wait_tcp_listening_proc(
        ns,
        wildcard(cfg.port, cfg.ipv6),
        SERVER_START_TIMEOUT,
        Some(&proc),
    )
    .with_context(|| {
        format!(
            "nginx error.log: {}",
            tail(&std::fs::read(dir.join("error.log")).unwrap_or_default())
        )
    })?;
    Ok(proc)
}

const TCP_SERVER_PY: &str = r#"
import socket, sys, threading
host, port, reply = sys.argv[1], int(sys.argv[2]), bytes.fromhex(sys.argv[3])
fam = socket.AF_INET6 if ":" in host else socket.AF_INET
s = socket.socket(fam, socket.SOCK_STREAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
if fam == socket.AF_INET6:
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
s.bind((host, port))
s.listen(128)
def handle(c):
    with c:
        c.settimeout(5)
        try:
            if not c.recv(65536):
                return
            # Drain the rest of the request (it may span many segments) so that closing
            # does not turn into a reset: stop once the client paused for 100 ms.
            c.settimeout(0.1)
            try:
                while c.recv(65536):
                    pass
            except socket.timeout:
                pass
            c.settimeout(5)
            c.sendall(reply)
        except OSError:
            pass
while True:
    c, _ = s.accept()
    threading.Thread(target=handle, args=(c,), daemon=True).start()
"#;

const TCP_CLIENT_PY: &str = r#"
import socket, sys
host, port, data = sys.argv[1], int(sys.argv[2]), bytes.fromhex(sys.argv[3])
c = socket.create_connection((host, port), timeout=5)
c.sendall(data)
buf = b""
while True:
    d = c.recv(65536)
    if not d:
        break
    buf += d
c.close()
sys.stdout.write(buf.hex())
"#;

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Starts a raw TCP server in `ns`: for each connection it reads the request (until the client
/// pauses for 100 ms), answers `reply` and closes. Stands in for plaintext protocols (redis, postgres, ...) whose first
/// client bytes the classifier must recognise.
pub fn tcp_reply_server(
    tb: &Testbed,
    ns: &str,
    port: u16,
    ipv6: bool,
    reply: &[u8],
) -> Result<Proc> {
    ensure!(
        !reply.is_empty(),
        "tcp_reply_server needs a non-empty reply"
    );
    let port_s = port.to_string();
    let reply_hex = hex(reply);
    let host = if ipv6 { "::" } else { "0.0.0.0" };
    let args = [
        python3(),
        "-u",
        "-c",
        TCP_SERVER_PY,
        host,
        &port_s,
        &reply_hex,
    ];
    let proc = tb.spawn(ns, &args)?;
    wait_tcp_listening_proc(ns, wildcard(port, ipv6), SERVER_START_TIMEOUT, Some(&proc))?;
    Ok(proc)
}

/// Opens one TCP connection from `ns`, sends `payload` as-is, reads until the server closes and
/// returns what it sent back.
pub fn tcp_exchange(tb: &Testbed, ns: &str, server: SocketAddr, payload: &[u8]) -> Result<Vec<u8>> {
    ensure!(
        !payload.is_empty(),
        "tcp_exchange needs a non-empty payload"
    );
    let (ip, port) = (server.ip().to_string(), server.port().to_string());
    let args = [python3(), "-c", TCP_CLIENT_PY, &ip, &port, &hex(payload)];
    let out = tb
        .run_timeout(ns, &args, CLIENT_TIMEOUT)
        .with_context(|| format!("TCP client in {ns} to {server}"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let text = text.trim();
    (0..text.len())
        .step_by(2)
        .map(|i| {
            u8::from_str_radix(text.get(i..i + 2).unwrap_or("zz"), 16)
                .with_context(|| format!("bad hex from TCP client: {text:?}"))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_parsing() {
        let s = parse_session(
            "---\nNew, TLSv1.3, Cipher is TLS_AES_256_GCM_SHA384\nServer public key is 256 bit\n\
             ALPN protocol: istio\n---\nHTTP/1.0 200 ok\r\nContent-type: text/html\r\n",
        );
        assert!(s.response.starts_with("HTTP/1.0 200 ok"));
        assert_eq!(s.server_saw_client_cert, None);
        assert_eq!(s.protocol, "TLSv1.3");
        assert_eq!(s.cipher, "TLS_AES_256_GCM_SHA384");
        assert_eq!(s.alpn.as_deref(), Some("istio"));
        let s = parse_session("HTTP/1.0 200 ok\r\n\nno client certificate available\n");
        assert_eq!(s.server_saw_client_cert, Some(false));
    }

    #[test]
    fn padding() {
        let a = padded_alpn(1500, "istio,h2");
        assert!(a.ends_with(",istio,h2"));
        let wire: usize = a.split(',').map(|n| n.len() + 1).sum();
        assert!(wire >= 1500, "{wire}");
        assert!(a.split(',').all(|n| n.len() <= 255));
        assert_eq!(padded_alpn(0, "h2"), "h2");
    }

    #[test]
    fn urls() {
        assert_eq!(
            http_url("198.18.0.2:80".parse().unwrap()),
            "http://198.18.0.2:80/"
        );
        assert_eq!(
            http_url("[2001:db8::2]:80".parse().unwrap()),
            "http://[2001:db8::2]:80/"
        );
    }
}
