//! A rustls TLS client or server for the corpus test (issue 3): a third TLS implementation next
//! to OpenSSL and Python's ssl, with the ring provider. Writes TLS secrets to `$SSLKEYLOGFILE`
//! (so tshark can decrypt the TLS 1.3 client Certificate).
//!
//! ```text
//! rustls-peer server --listen ADDR --cert PEM --key PEM [--client-ca PEM [--optional-client-auth]]
//!                    [--alpn a,b] [--tls12]
//! rustls-peer client --connect ADDR --ca PEM [--cert PEM --key PEM] [--alpn a,b] [--tls12]
//! ```
//! The server answers every request with `HTTP/1.0 200 OK` and `client-cert=yes|no`; the client
//! sends one request, prints the negotiated version and the response, and exits 0 on a 200.
use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    sync::Arc,
    time::Duration,
};

use anyhow::{Context, Result, bail};
use rustls::{
    ClientConfig, ClientConnection, KeyLogFile, RootCertStore, ServerConfig, ServerConnection,
    StreamOwned,
    crypto::ring::default_provider,
    pki_types::{CertificateDer, PrivateKeyDer, ServerName, pem::PemObject},
    server::WebPkiClientVerifier,
    version::{TLS12, TLS13},
};

struct Args {
    mode: String,
    addr: Option<SocketAddr>,
    cert: Option<String>,
    key: Option<String>,
    ca: Option<String>,
    optional_client_auth: bool,
    alpn: Vec<Vec<u8>>,
    tls12: bool,
}

fn parse() -> Result<Args> {
    let mut it = std::env::args().skip(1);
    let mode = it.next().context("usage: rustls-peer client|server ...")?;
    let mut a = Args {
        mode,
        addr: None,
        cert: None,
        key: None,
        ca: None,
        optional_client_auth: false,
        alpn: Vec::new(),
        tls12: false,
    };
    while let Some(flag) = it.next() {
        let mut value = || it.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--listen" | "--connect" => a.addr = Some(value()?.parse()?),
            "--cert" => a.cert = Some(value()?),
            "--key" => a.key = Some(value()?),
            "--ca" | "--client-ca" => a.ca = Some(value()?),
            "--alpn" => a.alpn = value()?.split(',').map(|s| s.as_bytes().to_vec()).collect(),
            "--optional-client-auth" => a.optional_client_auth = true,
            "--tls12" => a.tls12 = true,
            other => bail!("unknown flag {other}"),
        }
    }
    Ok(a)
}

fn certs(path: &str) -> Result<Vec<CertificateDer<'static>>> {
    CertificateDer::pem_file_iter(path)
        .with_context(|| format!("reading {path}"))?
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("parsing {path}"))
}

fn key(path: &str) -> Result<PrivateKeyDer<'static>> {
    PrivateKeyDer::from_pem_file(path).with_context(|| format!("reading key {path}"))
}

fn roots(path: &str) -> Result<RootCertStore> {
    let mut r = RootCertStore::empty();
    for c in certs(path)? {
        r.add(c)?;
    }
    Ok(r)
}

fn main() -> Result<()> {
    let a = parse()?;
    let versions: &[&'static rustls::SupportedProtocolVersion] = if a.tls12 {
        &[&TLS12]
    } else {
        &[&TLS13, &TLS12]
    };
    let provider = Arc::new(default_provider());
    let addr = a.addr.context("--listen/--connect is required")?;
    match a.mode.as_str() {
        "server" => {
            let builder = ServerConfig::builder_with_provider(provider.clone())
                .with_protocol_versions(versions)?;
            let builder = match &a.ca {
                Some(ca) => {
                    let v = WebPkiClientVerifier::builder_with_provider(
                        Arc::new(roots(ca)?),
                        provider.clone(),
                    );
                    let v = if a.optional_client_auth {
                        v.allow_unauthenticated()
                    } else {
                        v
                    };
                    builder.with_client_cert_verifier(v.build()?)
                }
                None => builder.with_no_client_auth(),
            };
            let mut cfg = builder.with_single_cert(
                certs(a.cert.as_deref().context("--cert")?)?,
                key(a.key.as_deref().context("--key")?)?,
            )?;
            cfg.alpn_protocols = a.alpn.clone();
            cfg.key_log = Arc::new(KeyLogFile::new());
            let cfg = Arc::new(cfg);
            let listener = TcpListener::bind(addr)?;
            for sock in listener.incoming() {
                let Ok(sock) = sock else { continue };
                let cfg = cfg.clone();
                std::thread::spawn(move || {
                    if let Err(e) = serve(cfg, sock) {
                        eprintln!("connection failed: {e:#}");
                    }
                });
            }
            Ok(())
        }
        "client" => {
            let builder = ClientConfig::builder_with_provider(provider)
                .with_protocol_versions(versions)?
                .with_root_certificates(roots(a.ca.as_deref().context("--ca")?)?);
            let mut cfg = match (&a.cert, &a.key) {
                (Some(c), Some(k)) => builder.with_client_auth_cert(certs(c)?, key(k)?)?,
                _ => builder.with_no_client_auth(),
            };
            cfg.alpn_protocols = a.alpn.clone();
            cfg.key_log = Arc::new(KeyLogFile::new());
            // No resumption: every run is a full handshake.
            cfg.resumption = rustls::client::Resumption::disabled();
            let name = ServerName::IpAddress(addr.ip().into());
            let conn = ClientConnection::new(Arc::new(cfg), name)?;
            let sock = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
            sock.set_read_timeout(Some(Duration::from_secs(5)))?;
            let mut tls = StreamOwned::new(conn, sock);
            tls.write_all(b"GET / HTTP/1.0\r\nHost: corpus\r\n\r\n")?;
            let mut resp = Vec::new();
            match tls.read_to_end(&mut resp) {
                Ok(_) => {}
                // Servers that close without close_notify.
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof && !resp.is_empty() => {}
                Err(e) => return Err(e.into()),
            }
            let version = tls.conn.protocol_version();
            let text = String::from_utf8_lossy(&resp);
            println!("{version:?}\n{text}");
            if !text.starts_with("HTTP/1.0 200") {
                bail!("no 200 from the server");
            }
            Ok(())
        }
        other => bail!("unknown mode {other} (client or server)"),
    }
}

fn serve(cfg: Arc<ServerConfig>, sock: TcpStream) -> Result<()> {
    sock.set_read_timeout(Some(Duration::from_secs(5)))?;
    let conn = ServerConnection::new(cfg)?;
    let mut tls = StreamOwned::new(conn, sock);
    let mut req = Vec::new();
    let mut buf = [0u8; 4096];
    while !req.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = tls.read(&mut buf)?;
        if n == 0 {
            break;
        }
        req.extend_from_slice(&buf[..n]);
    }
    let has_cert = tls.conn.peer_certificates().is_some_and(|c| !c.is_empty());
    let body = format!(
        "HTTP/1.0 200 OK\r\n\r\nrustls client-cert={}\n",
        if has_cert { "yes" } else { "no" }
    );
    tls.write_all(body.as_bytes())?;
    tls.conn.send_close_notify();
    tls.flush()?;
    let _ = tls.sock.shutdown(std::net::Shutdown::Write);
    // Drain until the client closes, so closing does not turn into a reset.
    let _ = tls.sock.read(&mut buf);
    Ok(())
}
