//! The corpus test's stacks beyond OpenSSL's command-line tools and rustls: Java (SunJSSE),
//! Node.js (`tls`), an SMTP-style server-first protocol with STARTTLS. The programs are small
//! sources next to this file, run as real processes in the test bed's pods; each one checks its
//! own outcome (negotiated version, whether the server saw a client certificate).
use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context as _, Result, ensure};
use mtls_agent_testbed::*;

const NODE_SERVER: &str = include_str!("node_server.js");
const NODE_CLIENT: &str = include_str!("node_client.js");
const JAVA_SOURCE: &str = include_str!("CorpusTls.java");
const SMTP: &str = include_str!("smtp.py");

/// Client-authentication policy of a server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policy {
    /// The handshake fails without a client certificate.
    Required,
    /// A certificate is requested, none is accepted (Node `requestCert` without
    /// `rejectUnauthorized`, Java `setWantClientAuth`).
    Wanted,
    /// No certificate is requested.
    None,
}

impl Policy {
    pub fn label(self) -> &'static str {
        match self {
            Policy::Required => "client auth required",
            Policy::Wanted => "client auth wanted",
            Policy::None => "no client auth",
        }
    }
}

/// One server port of a stack: `(port, TLS version "1.2"/"1.3", policy)`.
pub type Listener = (u16, &'static str, Policy);

fn protocol_name(version: &str) -> String {
    format!("TLSv{version}")
}

fn path_str(p: &Path) -> Result<&str> {
    p.to_str().context("non-UTF-8 path")
}

/// Writes `text` to `dir/name` and returns the path.
fn write_source(dir: &Path, name: &str, text: &str) -> Result<PathBuf> {
    let path = dir.join(name);
    std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

/// The client's printed outcome must name the version and whether the server saw a certificate.
fn check_outcome(who: &str, out: &std::process::Output, version: &str, seen: bool) -> Result<()> {
    let text = String::from_utf8_lossy(&out.stdout);
    let want = format!("client-cert={}", if seen { "yes" } else { "no" });
    ensure!(
        out.status.success() && text.contains(&protocol_name(version)) && text.contains(&want),
        "{who}: expected {} and {want}, got {text:?} (stderr {})",
        protocol_name(version),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// `port:TLSv1.x:policy` arguments, with the stack's names for required / wanted / none.
fn listener_specs(listeners: &[Listener], names: [&str; 3]) -> Vec<String> {
    listeners
        .iter()
        .map(|(port, v, policy)| {
            let p = match policy {
                Policy::Required => names[0],
                Policy::Wanted => names[1],
                Policy::None => names[2],
            };
            format!("{port}:{}:{p}", protocol_name(v))
        })
        .collect()
}

/// Waits for every listener of a server process (a JVM takes a few seconds).
fn wait_listening(
    tb: &Testbed,
    ns: &str,
    listeners: &[Listener],
    p: &Proc,
    who: &str,
) -> Result<()> {
    for (port, ..) in listeners {
        tb.wait_tcp_listening(
            ns,
            SocketAddr::from(([0, 0, 0, 0], *port)),
            Duration::from_secs(30),
        )
        .with_context(|| format!("{who}: {}", p.stderr_tail()))?;
    }
    Ok(())
}

/// The PEM files a TLS peer needs.
pub struct Pem<'a> {
    pub ca: &'a Path,
    pub cert: &'a CertPaths,
}

/// Node.js: one process serving every listener, writing its TLS key log to `keylog`.
pub fn node_servers(
    tb: &Testbed,
    ns: &str,
    pem: &Pem<'_>,
    keylog: &Path,
    listeners: &[Listener],
) -> Result<Proc> {
    let dir = tb.scratch_dir("node")?;
    let script = write_source(&dir, "server.js", NODE_SERVER)?;
    let specs = listener_specs(listeners, ["required", "wanted", "none"]);
    let mut args = vec![
        "node",
        path_str(&script)?,
        path_str(&pem.cert.cert)?,
        path_str(&pem.cert.key)?,
        path_str(pem.ca)?,
        path_str(keylog)?,
    ];
    args.extend(specs.iter().map(String::as_str));
    let p = tb.spawn(ns, &args)?;
    wait_listening(tb, ns, listeners, &p, "node server")?;
    Ok(p)
}

/// Whom a client offers its certificate and what the server must report.
#[derive(Debug, Clone, Copy)]
pub struct ClientCert {
    /// The client has a certificate to present.
    pub offered: bool,
    /// The server reports having received one (offered, and asked for).
    pub seen: bool,
}

/// One Node.js client connection, checked.
pub fn node_client(
    tb: &Testbed,
    ns: &str,
    server: SocketAddr,
    version: &str,
    pem: &Pem<'_>,
    cert: ClientCert,
    keylog: &Path,
) -> Result<()> {
    let script = tb.workdir().join("node-client.js");
    if !script.exists() {
        std::fs::write(&script, NODE_CLIENT)?;
    }
    let (host, port) = (server.ip().to_string(), server.port().to_string());
    let v = protocol_name(version);
    let mut args = vec![
        "node",
        path_str(&script)?,
        &host,
        &port,
        &v,
        path_str(pem.ca)?,
        path_str(keylog)?,
    ];
    if cert.offered {
        args.extend([path_str(&pem.cert.cert)?, path_str(&pem.cert.key)?]);
    }
    let out = tb.output(ns, &args, None, Duration::from_secs(20))?;
    check_outcome(
        &format!("node client to {server}"),
        &out,
        version,
        cert.seen,
    )
}

/// Compiles the Java program once into the test bed's work directory; returns the class path.
pub fn java_classes(tb: &Testbed) -> Result<PathBuf> {
    let dir = tb.workdir().join("java");
    std::fs::create_dir_all(&dir)?;
    let src = write_source(&dir, "CorpusTls.java", JAVA_SOURCE)?;
    let out = std::process::Command::new("javac")
        .args(["-d", path_str(&dir)?, path_str(&src)?])
        .output()
        .context("javac (openjdk-17-jdk-headless) is not installed")?;
    ensure!(
        out.status.success(),
        "javac failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(dir)
}

/// SunJSSE: one JVM serving every listener (SunJSSE cannot write a key log: the clients do).
pub fn java_servers(
    tb: &Testbed,
    ns: &str,
    classes: &Path,
    pem: &Pem<'_>,
    listeners: &[Listener],
) -> Result<Proc> {
    let specs = listener_specs(listeners, ["need", "want", "none"]);
    let mut args = vec![
        "java",
        "-cp",
        path_str(classes)?,
        "CorpusTls",
        "server",
        path_str(&pem.cert.cert)?,
        path_str(&pem.cert.key)?,
        path_str(pem.ca)?,
    ];
    args.extend(specs.iter().map(String::as_str));
    let p = tb.spawn(ns, &args)?;
    wait_listening(tb, ns, listeners, &p, "java server")?;
    Ok(p)
}

/// One SunJSSE client connection, checked (its server writes the key log).
pub fn java_client(
    tb: &Testbed,
    ns: &str,
    classes: &Path,
    server: SocketAddr,
    version: &str,
    pem: &Pem<'_>,
    cert: ClientCert,
) -> Result<()> {
    let (host, port) = (server.ip().to_string(), server.port().to_string());
    let v = protocol_name(version);
    let mut args = vec![
        "java",
        "-cp",
        path_str(classes)?,
        "CorpusTls",
        "client",
        &host,
        &port,
        &v,
        path_str(pem.ca)?,
    ];
    if cert.offered {
        args.extend([path_str(&pem.cert.cert)?, path_str(&pem.cert.key)?]);
    }
    let out = tb.output(ns, &args, None, Duration::from_secs(30))?;
    check_outcome(
        &format!("java client to {server}"),
        &out,
        version,
        cert.seen,
    )
}

/// An SMTP-style server: greets first, offers STARTTLS (Python `ssl`, key log to `keylog`).
pub fn smtp_server(
    tb: &Testbed,
    ns: &str,
    port: u16,
    pem: &Pem<'_>,
    keylog: &Path,
) -> Result<Proc> {
    let script = write_source(&tb.scratch_dir("smtp")?, "smtp.py", SMTP)?;
    let port_s = port.to_string();
    let p = tb.spawn(
        ns,
        &[
            "/usr/bin/python3",
            "-u",
            path_str(&script)?,
            "server",
            "0.0.0.0",
            &port_s,
            path_str(&pem.cert.cert)?,
            path_str(&pem.cert.key)?,
            path_str(keylog)?,
        ],
    )?;
    tb.wait_tcp_listening(
        ns,
        SocketAddr::from(([0, 0, 0, 0], port)),
        Duration::from_secs(10),
    )?;
    Ok(p)
}

/// One SMTP-style session: greeting, EHLO, then QUIT in plaintext or after STARTTLS.
pub fn smtp_client(
    tb: &Testbed,
    ns: &str,
    server: SocketAddr,
    pem: &Pem<'_>,
    starttls: bool,
    keylog: &Path,
) -> Result<()> {
    let script = tb.workdir().join("smtp-client.py");
    if !script.exists() {
        std::fs::write(&script, SMTP)?;
    }
    let (host, port) = (server.ip().to_string(), server.port().to_string());
    let out = tb.output(
        ns,
        &[
            "/usr/bin/python3",
            path_str(&script)?,
            "client",
            &host,
            &port,
            path_str(pem.ca)?,
            path_str(keylog)?,
            if starttls { "starttls" } else { "plain" },
        ],
        None,
        Duration::from_secs(10),
    )?;
    let text = String::from_utf8_lossy(&out.stdout);
    let want = if starttls { "221 tls bye" } else { "221 bye" };
    ensure!(
        out.status.success() && text.contains(want),
        "smtp client to {server}: {text:?} (stderr {})",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

const GRPC: &str = include_str!("grpc_peer.py");

/// The ports of the gRPC server: mTLS (client certificate required), one-way TLS, h2c.
pub struct GrpcPorts {
    pub mtls: u16,
    pub tls: u16,
    pub plain: u16,
}

/// A Python grpcio server (BoringSSL) on the three ports (`python3` with grpcio from PyPI:
/// `cargo xtask setup` installs it).
pub fn grpc_server(tb: &Testbed, ns: &str, ports: &GrpcPorts, pem: &Pem<'_>) -> Result<Proc> {
    let script = write_source(&tb.scratch_dir("grpc")?, "grpc_peer.py", GRPC)?;
    let p = [ports.mtls, ports.tls, ports.plain].map(|p| p.to_string());
    let proc = tb.spawn(
        ns,
        &[
            "python3",
            "-u",
            path_str(&script)?,
            "server",
            "0.0.0.0",
            &p[0],
            &p[1],
            &p[2],
            path_str(&pem.cert.cert)?,
            path_str(&pem.cert.key)?,
            path_str(pem.ca)?,
        ],
    )?;
    for port in [ports.mtls, ports.tls, ports.plain] {
        tb.wait_tcp_listening(
            ns,
            SocketAddr::from(([0, 0, 0, 0], port)),
            Duration::from_secs(20),
        )
        .with_context(|| format!("grpc server: {}", proc.stderr_tail()))?;
    }
    Ok(proc)
}

/// How a gRPC client connects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GrpcMode {
    /// TLS with the client certificate.
    Mtls,
    /// TLS without a client certificate.
    Tls,
    /// h2c.
    Plain,
}

/// One unary gRPC call over a fresh channel, checked against whether the server saw a client
/// certificate.
pub fn grpc_client(
    tb: &Testbed,
    ns: &str,
    server: SocketAddr,
    mode: GrpcMode,
    pem: &Pem<'_>,
) -> Result<()> {
    let script = tb.workdir().join("grpc-client.py");
    if !script.exists() {
        std::fs::write(&script, GRPC)?;
    }
    let target = server.to_string();
    let m = match mode {
        GrpcMode::Mtls => "mtls",
        GrpcMode::Tls => "tls",
        GrpcMode::Plain => "plain",
    };
    let mut args = vec![
        "python3",
        path_str(&script)?,
        "client",
        &target,
        m,
        path_str(pem.ca)?,
    ];
    if mode == GrpcMode::Mtls {
        args.extend([path_str(&pem.cert.cert)?, path_str(&pem.cert.key)?]);
    }
    let out = tb.output(ns, &args, None, Duration::from_secs(20))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let want = if mode == GrpcMode::Mtls {
        "client-cert=yes"
    } else {
        "client-cert=no"
    };
    ensure!(
        out.status.success() && text.contains(want),
        "grpc client ({m}) to {server}: {text:?} (stderr {})",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// MariaDB (Debian): one data directory initialised once, served by two instances on `listen`:
/// port 3306 with TLS (pinned to 1.2: the client cannot write a key log, and in TLS 1.2 tshark
/// sees the client Certificate in clear) and `require_secure_transport`, port 3307 without TLS.
/// Users: `cert` (REQUIRE X509: a client certificate or no login) and `tls` (REQUIRE SSL).
pub fn mariadb_servers(
    tb: &Testbed,
    ns: &str,
    listen: std::net::IpAddr,
    pem: &Pem<'_>,
) -> Result<Vec<Proc>> {
    let dir = tb.scratch_dir("mariadb")?;
    let data = dir.join("data");
    tb.run_timeout(
        ns,
        &[
            "mariadb-install-db",
            "--no-defaults",
            "--user=root",
            "--auth-root-authentication-method=socket",
            "--skip-test-db",
            &format!("--datadir={}", path_str(&data)?),
        ],
        Duration::from_secs(120),
    )
    .context("mariadb-install-db (apt-get install mariadb-server)")?;
    let plain_data = dir.join("data-plain");
    tb.run(ns, &["cp", "-a", path_str(&data)?, path_str(&plain_data)?])?;
    let mut procs = Vec::new();
    for (port, data, tls) in [(3306u16, &data, true), (3307, &plain_data, false)] {
        let d = path_str(&dir)?;
        let mut args = vec![
            "mariadbd".to_owned(),
            "--no-defaults".into(),
            "--user=root".into(),
            format!("--datadir={}", path_str(data)?),
            format!("--socket={d}/mysqld-{port}.sock"),
            format!("--pid-file={d}/mysqld-{port}.pid"),
            format!("--bind-address={listen}"),
            format!("--port={port}"),
            "--skip-name-resolve".into(),
            "--innodb-buffer-pool-size=16M".into(),
            "--skip-log-bin".into(),
        ];
        if tls {
            args.extend([
                format!("--ssl-cert={}", path_str(&pem.cert.cert)?),
                format!("--ssl-key={}", path_str(&pem.cert.key)?),
                format!("--ssl-ca={}", path_str(pem.ca)?),
                "--tls-version=TLSv1.2".into(),
                "--require-secure-transport=ON".into(),
            ]);
        } else {
            args.push("--skip-ssl".into());
        }
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let p = tb.spawn(ns, &refs)?;
        tb.wait_tcp_listening(ns, SocketAddr::new(listen, port), Duration::from_secs(60))
            .with_context(|| format!("mariadbd: {}", p.stderr_tail()))?;
        let sock = format!("--socket={d}/mysqld-{port}.sock");
        tb.run(
            ns,
            &[
                "mariadb",
                "--no-defaults",
                &sock,
                "-uroot",
                "-e",
                "CREATE USER cert@'%' REQUIRE X509; CREATE USER tls@'%' REQUIRE SSL; \
                 CREATE USER plain@'%'; GRANT USAGE ON *.* TO cert@'%', tls@'%', plain@'%';",
            ],
        )?;
        procs.push(p);
    }
    Ok(procs)
}

/// How a MariaDB client connects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MariadbMode {
    /// TLS with the client certificate (user `cert`, REQUIRE X509).
    ClientCert,
    /// TLS without one (user `tls`).
    Tls,
    /// No TLS (user `plain`, to the instance without TLS).
    Plain,
}

/// One `mariadb` client session, checked: prints the session's TLS version (empty without TLS).
pub fn mariadb_client(
    tb: &Testbed,
    ns: &str,
    server: SocketAddr,
    mode: MariadbMode,
    pem: &Pem<'_>,
) -> Result<()> {
    let host = format!("--host={}", server.ip());
    let port = format!("--port={}", server.port());
    let user = match mode {
        MariadbMode::ClientCert => "--user=cert",
        MariadbMode::Tls => "--user=tls",
        MariadbMode::Plain => "--user=plain",
    };
    let ca = format!("--ssl-ca={}", path_str(pem.ca)?);
    let cert = format!("--ssl-cert={}", path_str(&pem.cert.cert)?);
    let key = format!("--ssl-key={}", path_str(&pem.cert.key)?);
    let mut args = vec![
        "mariadb",
        "--no-defaults",
        &host,
        &port,
        user,
        "--connect-timeout=5",
        "-N",
        "-B",
        "-e",
        "SHOW SESSION STATUS LIKE 'Ssl_version'",
    ];
    match mode {
        MariadbMode::ClientCert => args.extend(["--ssl", &ca, &cert, &key]),
        MariadbMode::Tls => args.extend(["--ssl", &ca]),
        MariadbMode::Plain => args.push("--skip-ssl"),
    }
    let out = tb.output(ns, &args, None, Duration::from_secs(20))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let tls = text.contains("TLSv1.2");
    ensure!(
        out.status.success() && tls == (mode != MariadbMode::Plain),
        "mariadb client ({mode:?}) to {server}: {text:?} (stderr {})",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}
