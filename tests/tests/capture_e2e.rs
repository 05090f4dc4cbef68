//! Issue 11, end to end: what the capture sends the agent for real connections between two pods
//! of one node (both veths watched by one agent), counted by the agent itself
//! (`mtls_agent_events_total`: every ring-buffer record it read). capture_kernel.rs proves the
//! same rules on crafted packets; this proves them on the kernel's own TCP and TLS traffic:
//! a plaintext connection costs one data event per direction that carried payload and one close,
//! although every packet crosses two veths and four hooks; a TLS connection costs nothing after
//! its verdict, however much it sends. Needs root; fails (never skips) without it.
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use mtls_agent_testbed::*;

mod faults_util;
use faults_util::*;

fn events(m: &str) -> Result<f64> {
    metric_value(m, "mtls_agent_events_total", &[]).context("mtls_agent_events_total")
}

fn lost(m: &str) -> f64 {
    metric_value(
        m,
        "mtls_agent_events_lost_total",
        &[("reason", "ring_buffer_full")],
    )
    .unwrap_or(0.0)
}

#[test]
fn plaintext_costs_one_data_event_per_direction_with_payload_and_one_copy_per_connection()
-> Result<()> {
    ensure_root()?;
    let bin = agent_bin()?;
    let (tb, server, client, inv) = two_pod_bed("mtcape2e")?;
    let agent = Agent::start(&tb, &bin, &inv, &["vp*"], &["--flow-gc-interval", "1s"], 2)?;
    let request = b"GET / HTTP/1.1\r\nHost: web\r\n\r\n";
    let reply = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n";
    // Both directions carry payload: two data events and one close per connection.
    let _answers = tb.spawn(
        &server.netns,
        &["python3", "-c", SINK_SERVER_PY, "8080", &hex(reply)],
    )?;
    // The server reads and closes without a word: one data event and one close.
    let _silent = tb.spawn(
        &server.netns,
        &["python3", "-c", SINK_SERVER_PY, "8081", ""],
    )?;
    for port in [8080, 8081] {
        tb.wait_tcp_listening(&server.netns, server.v4(port), Duration::from_secs(10))?;
    }
    let before = events(&agent.settle(&tb, Duration::from_secs(10))?)?;
    let n = 40;
    assert_eq!(
        burst(&tb, &client.netns, server.v4(8080), n, 4, request)?,
        n
    );
    assert_eq!(
        burst(&tb, &client.netns, server.v4(8081), n, 4, request)?,
        n
    );
    let m = agent.settle(&tb, Duration::from_secs(30))?;
    assert_eq!(lost(&m), 0.0, "{m}");
    assert_eq!(
        conns(&m, "shop", "web", "inbound", "plaintext"),
        (2 * n) as f64,
        "{m}"
    );
    assert_eq!(
        conns(&m, "legacy", "batch", "outbound", "plaintext"),
        (2 * n) as f64,
        "{m}"
    );
    assert_eq!(
        events(&m)? - before,
        (n * 3 + n * 2) as f64,
        "records read: 3 per answered connection, 2 per silent one\n{m}"
    );
    assert!(agent.stop()?.success());
    tb.destroy()
}

/// Python TLS echo server: PORT CERT KEY.
const TLS_ECHO_PY: &str = r#"
import socket, ssl, sys, threading
port, cert, key = int(sys.argv[1]), sys.argv[2], sys.argv[3]
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER); ctx.load_cert_chain(cert, key)
s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", port)); s.listen(16)
def serve(c):
    try:
        c = ctx.wrap_socket(c, server_side=True)
        while True:
            b = c.recv(65536)
            if not b: break
            c.sendall(b)
    except Exception: pass
    finally: c.close()
while True:
    c, _ = s.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"#;

/// Python TLS client: HOST PORT PHASE_FILE. Handshake and one echoed line, then "1" in the phase
/// file; on "go" in it, 4 MiB echoed back and forth, then "2"; on "close", closes and "3".
const TLS_PHASED_CLIENT_PY: &str = r#"
import socket, ssl, sys, time
host, port, phase = sys.argv[1], int(sys.argv[2]), sys.argv[3]
def put(s): open(phase + ".tmp", "w").write(s); __import__("os").replace(phase + ".tmp", phase)
def wait(s):
    while open(phase).read() != s: time.sleep(0.05)
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT); ctx.check_hostname = False; ctx.verify_mode = ssl.CERT_NONE
c = ctx.wrap_socket(socket.create_connection((host, port), timeout=30))
def echo(data):
    c.sendall(data); got = 0
    while got < len(data): got += len(c.recv(65536))
echo(b"hello\n"); put("1"); wait("go")
for _ in range(64): echo(b"x" * 65536)
put("2"); wait("close")
c.close(); put("3")
"#;

fn wait_phase(path: &std::path::Path, want: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    while std::fs::read_to_string(path).unwrap_or_default() != want {
        if Instant::now() > deadline {
            bail!("the TLS client did not reach phase {want}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// Waits until the agent has read every record the kernel has written so far: the count stays
/// the same over a few ticks.
fn quiet_events(tb: &Testbed, agent: &Agent) -> Result<(f64, String)> {
    let mut last = -1.0;
    loop {
        let m = agent.metrics(tb)?;
        let e = events(&m)?;
        if e == last {
            return Ok((e, m));
        }
        last = e;
        std::thread::sleep(Duration::from_millis(600));
    }
}

#[test]
fn a_tls_connection_costs_no_event_after_its_verdict() -> Result<()> {
    ensure_root()?;
    let bin = agent_bin()?;
    let (tb, server, client, inv) = two_pod_bed("mtcaptls")?;
    let pki = Pki::new(tb.workdir().join("pki"))?;
    let cert = pki.issue("web", &[San::Dns("web".into())])?;
    let agent = Agent::start(&tb, &bin, &inv, &["vp*"], &[], 2)?;
    let _server = tb.spawn(
        &server.netns,
        &[
            "python3",
            "-c",
            TLS_ECHO_PY,
            "8443",
            cert.cert.to_str().context("utf-8")?,
            cert.key.to_str().context("utf-8")?,
        ],
    )?;
    tb.wait_tcp_listening(&server.netns, server.v4(8443), Duration::from_secs(10))?;
    let (before, _) = quiet_events(&tb, &agent)?;
    let phase = tb.workdir().join("phase");
    std::fs::write(&phase, "0")?;
    let _client = tb.spawn(
        &client.netns,
        &[
            "python3",
            "-c",
            TLS_PHASED_CLIENT_PY,
            "198.18.0.10",
            "8443",
            phase.to_str().context("utf-8")?,
        ],
    )?;
    wait_phase(&phase, "1")?;
    let (decided, m) = quiet_events(&tb, &agent)?;
    assert_eq!(
        conns(&m, "shop", "web", "inbound", "tls"),
        1.0,
        "classified after the handshake\n{m}"
    );
    assert!(decided > before, "the handshake was copied\n{m}");
    std::fs::write(&phase, "go")?;
    wait_phase(&phase, "2")?;
    let (after_bulk, m) = quiet_events(&tb, &agent)?;
    assert_eq!(
        after_bulk, decided,
        "8 MiB of application data after the verdict: not one record\n{m}"
    );
    std::fs::write(&phase, "close")?;
    wait_phase(&phase, "3")?;
    let m = agent.settle(&tb, Duration::from_secs(30))?;
    assert_eq!(events(&m)? - decided, 1.0, "the close only\n{m}");
    assert_eq!(lost(&m), 0.0, "{m}");
    assert!(agent.stop()?.success());
    tb.destroy()
}
