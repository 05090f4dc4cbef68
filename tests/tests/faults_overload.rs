//! Issue 7, overload: a ring buffer far too small for the traffic, and a million flows through
//! the default flow table. Both are counted and exported (the series the MtlsAgentEventsLost and
//! MtlsAgentFlowTableFull alerts use), /metrics keeps answering fast while it happens, and a
//! connection whose handshake bytes were lost is `unknown`, never `plaintext`.
//! Needs root; fails (never skips) without it.
use std::{
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use mtls_agent_testbed::*;

mod faults_util;
use faults_util::*;

fn bed(family: &str) -> Result<(Testbed, Pod, Pod, std::path::PathBuf)> {
    two_pod_bed(family)
}

/// A well-formed TLS 1.2/1.3 ClientHello of about 1.5 KB (padding extension), so its first
/// flight takes two ring-buffer chunks.
pub fn client_hello() -> Vec<u8> {
    let mut body = vec![0x03, 0x03];
    body.extend([0x42; 32]); // random
    body.push(0); // session id
    body.extend([0x00, 0x04, 0x13, 0x01, 0x13, 0x02]); // cipher suites
    body.extend([0x01, 0x00]); // compression: null
    let pad = 1400usize;
    let mut ext = vec![0x00, 0x15];
    ext.extend((pad as u16).to_be_bytes());
    ext.extend(vec![0u8; pad]);
    body.extend((ext.len() as u16).to_be_bytes());
    body.extend(ext);
    let mut hs = vec![0x01];
    hs.extend(&(body.len() as u32).to_be_bytes()[1..]);
    hs.extend(body);
    let mut rec = vec![0x16, 0x03, 0x01];
    rec.extend((hs.len() as u16).to_be_bytes());
    rec.extend(hs);
    rec
}

/// A server on `pod`'s IPv4 address that reads and never answers, listening when this returns.
fn silent_sink(tb: &Testbed, pod: &Pod, port: u16) -> Result<Proc> {
    let p = port.to_string();
    let sink = tb.spawn(&pod.netns, &["python3", "-c", SINK_SERVER_PY, &p, ""])?;
    tb.wait_tcp_listening(&pod.netns, pod.v4(port), Duration::from_secs(10))?;
    Ok(sink)
}

/// An agent on both pods' veths with a 4 KiB ring buffer (three 1 KiB chunks) and the flow-table
/// collector every second.
fn small_ring_agent(tb: &Testbed, bin: &std::path::Path, inv: &std::path::Path) -> Result<Agent> {
    Agent::start(
        tb,
        bin,
        inv,
        &["vp*"],
        &["--ring-buffer-size", "4096", "--flow-gc-interval", "1s"],
        2,
    )
}

/// Runs `f` while a second thread scrapes /metrics every 50 ms; returns f's result and the
/// scrape times (curl's time_total).
fn with_scrapes<T>(
    tb: &Testbed,
    agent: &Agent,
    f: impl FnOnce() -> Result<T>,
) -> Result<(T, Vec<Duration>)> {
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        let h = s.spawn(|| -> Result<Vec<Duration>> {
            let mut times = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                times.push(scrape_timed(tb, agent)?.1);
                std::thread::sleep(Duration::from_millis(50));
            }
            Ok(times)
        });
        let r = f();
        stop.store(true, Ordering::Relaxed);
        let times = h.join().expect("scraper thread")?;
        Ok((r?, times))
    })
}

fn summary(times: &mut [Duration]) -> (Duration, Duration, Duration) {
    times.sort();
    let p = |q: f64| times[((times.len() - 1) as f64 * q) as usize];
    (p(0.5), p(0.95), *times.last().unwrap())
}

/// A 4 KiB ring buffer (three 1 KiB chunks) and 600 ClientHellos, 32 at a time: most handshake
/// bytes are lost. The loss is counted, /metrics stays fast, and not one of the connections is
/// called plaintext: those whose bytes were lost (wholly or partly) are `unknown`.
#[test]
fn ring_buffer_overflow_is_counted_and_lost_handshakes_are_unknown() -> Result<()> {
    ensure_root()?;
    let bin = agent_bin()?;
    let (tb, server, client, inv) = bed("mtfring")?;
    let _sink = silent_sink(&tb, &server, 9443)?;
    let agent = small_ring_agent(&tb, &bin, &inv)?;
    let n = 600;
    let (done, mut times) = with_scrapes(&tb, &agent, || {
        burst(&tb, &client.netns, server.v4(9443), n, 32, &client_hello())
    })?;
    assert_eq!(done, n, "every connection completed");
    // Connections whose closed event was lost are found by the collector (every second here)
    // and counted then: wait until nothing is tracked any more.
    let m = agent.settle(&tb, Duration::from_secs(30))?;
    let lost = metric_value(
        &m,
        "mtls_agent_events_lost_total",
        &[("reason", "ring_buffer_full")],
    )
    .context("events_lost")?;
    let (p50, p95, max) = summary(&mut times);
    let by = |sec| conns(&m, "shop", "web", "inbound", sec);
    let evidence = |e| {
        metric_value(&m, "mtls_agent_verdict_evidence_total", &[("evidence", e)]).unwrap_or(0.0)
    };
    eprintln!(
        "ring overflow: {n} connections, {lost} events lost; inbound mtls {} tls {} plaintext {} unknown {} \
         (events_lost {}, handshake_incomplete {}); /metrics over {} scrapes p50 {p50:?} p95 {p95:?} max {max:?}",
        by("mtls"),
        by("tls"),
        by("plaintext"),
        by("unknown"),
        evidence("events_lost"),
        evidence("handshake_incomplete"),
        times.len()
    );
    assert!(lost > 0.0, "a 4 KiB ring must overflow: {m}");
    // The sink never answers a ClientHello: every connection is unknown, and each is counted
    // exactly once, also those whose every event was lost.
    assert_eq!(
        by("plaintext"),
        0.0,
        "lost handshakes are never plaintext\n{m}"
    );
    assert_eq!(by("unknown"), n as f64, "each connection once\n{m}");
    assert!(evidence("events_lost") > 0.0, "{m}");
    assert_eq!(
        evidence("events_lost") + evidence("handshake_incomplete"),
        n as f64,
        "lost capture is named as such\n{m}"
    );
    assert!(p95 < Duration::from_millis(100), "/metrics p95 {p95:?}");
    assert!(max < Duration::from_millis(500), "/metrics max {max:?}");
    agent.proc().ensure_running()?;
    assert!(agent.stop()?.success());
    tb.destroy()
}

/// Every event of these connections is lost, so each must still be counted exactly once, as
/// `unknown` with evidence `events_lost` (issue 11, item 6): the agent's reader is stopped
/// (SIGSTOP), a 4 KiB ring is filled to less than one event header by filler connections in
/// the other direction (server pod to client pod, each one data event and one close), then
/// `n` ClientHello connections are made and the reader resumes. Only the flow-table collector
/// can report them (their entries carry the kernel's lost mark).
#[test]
fn connections_whose_every_event_was_lost_are_each_one_unknown_events_lost() -> Result<()> {
    ensure_root()?;
    let bin = agent_bin()?;
    let (tb, server, client, inv) = bed("mtfallost")?;
    let _sink = silent_sink(&tb, &server, 9443)?;
    let _filler_sink = silent_sink(&tb, &client, 9444)?;
    let agent = small_ring_agent(&tb, &bin, &inv)?;
    let pid = agent.proc().pid().to_string();
    let signal = |sig: &str| -> Result<()> {
        let st = std::process::Command::new("kill")
            .args([sig, &pid])
            .status()?;
        anyhow::ensure!(st.success(), "kill {sig} {pid}");
        Ok(())
    };
    signal("-STOP")?;
    // 64 fillers of at least 208 ring bytes each (a 1-byte data event and a close) are more
    // than three times the ring: whatever space is left after them is smaller than a close
    // event (104 bytes), the smallest record there is.
    let fillers = 64;
    let filled = burst(&tb, &server.netns, client.v4(9444), fillers, 1, b"x");
    let n = 200;
    let made =
        filled.and_then(|_| burst(&tb, &client.netns, server.v4(9443), n, 8, &client_hello()));
    signal("-CONT")?;
    assert_eq!(made?, n, "every connection completed");
    // Nothing of them is tracked (no event arrived): they are counted when the collector
    // (every second here) finds their entries. Wait for that, then two more passes, so that a
    // connection counted twice would show.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let m = agent.settle(&tb, Duration::from_secs(30))?;
        let counted = conns(&m, "shop", "web", "inbound", "unknown")
            + conns(&m, "legacy", "batch", "inbound", "unknown")
            + conns(&m, "legacy", "batch", "inbound", "plaintext");
        if counted >= (n + fillers) as f64 || Instant::now() > deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    std::thread::sleep(Duration::from_millis(2500));
    let m = agent.settle(&tb, Duration::from_secs(30))?;
    let by = |ns, wl, sec| conns(&m, ns, wl, "inbound", sec);
    let evidence = |e| {
        metric_value(
            &m,
            "mtls_agent_verdict_evidence_total",
            &[("security", "unknown"), ("evidence", e)],
        )
        .unwrap_or(0.0)
    };
    let lost = metric_value(
        &m,
        "mtls_agent_events_lost_total",
        &[("reason", "ring_buffer_full")],
    )
    .unwrap_or(0.0);
    let filler_unknown = by("legacy", "batch", "unknown");
    let filler_total = filler_unknown + by("legacy", "batch", "plaintext");
    eprintln!(
        "all lost: {n} connections, {lost} events lost; shop/web inbound unknown {} plaintext {} \
         tls {}; fillers {filler_total} ({filler_unknown} unknown); evidence events_lost {}, \
         handshake_incomplete {}",
        by("shop", "web", "unknown"),
        by("shop", "web", "plaintext"),
        by("shop", "web", "tls"),
        evidence("events_lost"),
        evidence("handshake_incomplete"),
    );
    assert!(
        lost >= 2.0 * n as f64,
        "both events of every connection lost: {lost}\n{m}"
    );
    for sec in ["mtls", "tls", "plaintext"] {
        assert_eq!(by("shop", "web", sec), 0.0, "none is {sec}\n{m}");
    }
    assert_eq!(
        by("shop", "web", "unknown"),
        n as f64,
        "each connection once\n{m}"
    );
    assert_eq!(filler_total, fillers as f64, "each filler once\n{m}");
    assert_eq!(
        evidence("events_lost"),
        n as f64 + filler_unknown,
        "every connection whose events were lost is unknown/events_lost\n{m}"
    );
    agent.proc().ensure_running()?;
    assert!(agent.stop()?.success());
    tb.destroy()
}

/// A 1024-entry flow table and 4000 short connections (4000 entries over time: one per
/// connection, shared by the two veths of a same-node connection). The agent deletes closed connections' entries
/// (once idle for a second; swept every 500 ms here), so a busy but healthy node is not
/// reported as table pressure: not one eviction, and every connection classified. Before, every
/// entry stayed until the LRU evicted it, and this counted ~7000 evictions.
#[test]
fn closed_connections_free_their_entries_so_churn_is_not_pressure() -> Result<()> {
    ensure_root()?;
    let bin = agent_bin()?;
    let (tb, server, client, inv) = bed("mtfchurnft")?;
    let _sink = tb.spawn(
        &server.netns,
        &[
            "python3",
            "-c",
            SINK_SERVER_PY,
            "8080",
            &hex(b"HTTP/1.0 200 OK\r\n\r\n"),
        ],
    )?;
    tb.wait_tcp_listening(&server.netns, server.v4(8080), Duration::from_secs(10))?;
    let agent = Agent::start(
        &tb,
        &bin,
        &inv,
        &["vp*"],
        &["--flow-table-size", "1024", "--flow-gc-interval", "500ms"],
        2,
    )?;
    // Ten rounds of 400 connections (one entry each, shared by both veths; as fast as the
    // client goes), 2 s apart: the table has to hold what arrives within the linger and one
    // sweep, not everything.
    let n = 4000;
    let t0 = Instant::now();
    let mut done = 0;
    for _ in 0..10 {
        done += burst(
            &tb,
            &client.netns,
            server.v4(8080),
            n / 10,
            4,
            b"GET / HTTP/1.0\r\n\r\n",
        )?;
        std::thread::sleep(Duration::from_secs(2));
    }
    let took = t0.elapsed();
    assert_eq!(done, n);
    let m = agent.settle(&tb, Duration::from_secs(20))?;
    let full = metric_value(
        &m,
        "mtls_agent_kernel_errors_total",
        &[("reason", "flow_table_full")],
    )
    .context("kernel_errors")?;
    let plain = conns(&m, "shop", "web", "inbound", "plaintext");
    let collected = metric_value(
        &m,
        "mtls_agent_flow_table_gc_total",
        &[("reason", "closed")],
    )
    .unwrap_or(0.0);
    eprintln!(
        "churn through 1024 entries: {n} connections in {took:?}, flow_table_full {full}, \
         closed entries collected {collected}, plaintext {plain}"
    );
    assert_eq!(full, 0.0, "closed connections are not evictions\n{m}");
    assert!(
        collected >= (n - 1024) as f64,
        "closed entries collected: {collected}"
    );
    assert_eq!(plain, n as f64, "every connection classified\n{m}");
    assert!(agent.stop()?.success());
    tb.destroy()
}

/// Sends `n` TCP SYNs from `src` to `dst` through a raw socket, with distinct port pairs: `n`
/// new flows, none answered (nothing routes `dst`). Prints how many were sent.
const SYN_FLOOD_PY: &str = r#"
import errno, socket, struct, sys, time
src, dst, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 22)
pkt = bytearray(struct.pack('!BBHHHBBH4s4s', 0x45, 0, 40, 0, 0x4000, 64, 6, 0,
                            socket.inet_aton(src), socket.inet_aton(dst)))
pkt += struct.pack('!HHIIBBHHH', 0, 0, 1, 0, 5 << 4, 0x02, 65535, 0, 0)
to = (dst, 0)
send, pack = s.sendto, struct.pack_into
sent = 0
for i in range(n):
    pack('!HH', pkt, 20, 1024 + i % 60000, 1 + i // 60000)
    while True:
        try:
            send(pkt, to)
            break
        except OSError as e:
            if e.errno not in (errno.ENOBUFS, errno.EAGAIN):
                raise
            time.sleep(0.0005)
    sent += 1
print(sent)
"#;

/// The issue's figure: one million flows through a 65,536-entry table (the default before issue 11) while real TLS
/// connections go on. The LRU evicts; the evictions are counted (the series the
/// MtlsAgentFlowTableFull alert watches), /metrics keeps answering fast, the TLS connections
/// are never called plaintext. When the flooding pod goes away, the garbage collector frees
/// its entries.
#[test]
fn a_million_flows_are_counted_as_table_pressure() -> Result<()> {
    ensure_root()?;
    let bin = agent_bin()?;
    let (tb, server, client, inv) = bed("mtfmillion")?;
    let pki = Pki::new(tb.workdir().join("pki"))?;
    let cert = pki.issue("web", &[San::Dns("web.shop".into())])?;
    let _tls = openssl_server(
        &tb,
        &server.netns,
        &TlsServer::new(8443, &cert, pki.ca_cert()),
    )?;
    // The host side: the flow table records the ifindex the program ran on, and the pods' ends
    // all have the same one here (eth0 is created in each pod), so on the pod side the
    // collector cannot tell that one pod's interface went (ARCHITECTURE.md, "Pod side").
    let agent = Agent::start(
        &tb,
        &bin,
        &inv,
        &["vp*"],
        &[
            "--flow-gc-interval",
            "2s",
            "--attach-side",
            "host",
            "--flow-table-size",
            "65536",
        ],
        2,
    )?;
    let n: u64 = 1_000_000;
    let stop = AtomicBool::new(false);
    let (sent, mut times) = with_scrapes(&tb, &agent, || {
        std::thread::scope(|s| {
            let tls = s.spawn(|| -> Result<usize> {
                let mut ok = 0;
                while !stop.load(Ordering::Relaxed) {
                    openssl_client(
                        &tb,
                        &client.netns,
                        &TlsClient::new(server.v4(8443), pki.ca_cert()),
                    )?;
                    ok += 1;
                }
                Ok(ok)
            });
            let out = tb.run_timeout(
                &client.netns,
                &[
                    "python3",
                    "-c",
                    SYN_FLOOD_PY,
                    &client.ipv4.to_string(),
                    "198.19.255.1",
                    &n.to_string(),
                ],
                Duration::from_secs(600),
            );
            stop.store(true, Ordering::Relaxed);
            let tls_ok = tls.join().expect("tls thread")?;
            let sent: u64 = String::from_utf8_lossy(&out?.stdout).trim().parse()?;
            anyhow::ensure!(tls_ok > 0, "TLS connections ran during the flood");
            Ok(sent)
        })
    })?;
    assert_eq!(sent, n);
    agent.settle(&tb, Duration::from_secs(30))?;
    // The agent mirrors the kernel's counters every 250 ms: wait until they stop moving.
    let mut m = agent.metrics(&tb)?;
    let seen = |m: &str| metric_value(m, "mtls_agent_tcp_packets_total", &[]);
    for _ in 0..40 {
        std::thread::sleep(Duration::from_millis(600));
        let next = agent.metrics(&tb)?;
        let stable = seen(&next) == seen(&m);
        m = next;
        if stable {
            break;
        }
    }
    let val = |name: &str, labels: &[(&str, &str)]| metric_value(&m, name, labels).unwrap_or(0.0);
    let full = val(
        "mtls_agent_kernel_errors_total",
        &[("reason", "flow_table_full")],
    );
    let packets = val("mtls_agent_tcp_packets_total", &[]);
    let (p50, p95, max) = summary(&mut times);
    let by = |sec| conns(&m, "shop", "web", "inbound", sec);
    eprintln!(
        "1M flows: {packets} TCP packets seen, flow_table_full {full}; inbound tls {} plaintext {} unknown {}; \
         /metrics over {} scrapes p50 {p50:?} p95 {p95:?} max {max:?}",
        by("tls"),
        by("plaintext"),
        by("unknown"),
        times.len()
    );
    let table = 65_536.0; // --flow-table-size above
    assert!(
        packets >= n as f64,
        "every SYN went through the program: {packets}"
    );
    // Every flood flow beyond the table's size pushed one out; the TLS connections' entries
    // are freed at their close (or evicted too: then they count as well).
    assert!(
        full >= n as f64 - table && full <= packets - table,
        "evictions counted: {full} for {packets} packets through {table} entries"
    );
    assert!(by("tls") > 0.0, "{m}");
    assert_eq!(by("plaintext"), 0.0, "TLS is never plaintext\n{m}");
    assert!(p95 < Duration::from_millis(100), "/metrics p95 {p95:?}");
    assert!(max < Duration::from_millis(500), "/metrics max {max:?}");
    assert_eq!(
        val(
            "mtls_agent_flow_table_gc_total",
            &[("reason", "interface_gone")]
        ),
        0.0,
        "nothing collected while the pod lives"
    );

    // The flooding pod goes away: its entries can never close; the collector frees them.
    tb.run(tb.node_netns(), &["ip", "link", "del", &client.host_if])?;
    let deadline = Instant::now() + Duration::from_secs(30);
    let (gone, entries) = loop {
        let m = agent.metrics(&tb)?;
        let gone = metric_value(
            &m,
            "mtls_agent_flow_table_gc_total",
            &[("reason", "interface_gone")],
        )
        .unwrap_or(0.0);
        let entries = metric_value(&m, "mtls_agent_flow_table_entries", &[]).unwrap_or(f64::MAX);
        if gone >= table * 0.9 && entries < 1000.0 {
            break (gone, entries);
        }
        assert!(
            Instant::now() < deadline,
            "entries of the deleted interface not collected: gc {gone}, entries {entries}"
        );
        std::thread::sleep(Duration::from_millis(250));
    };
    eprintln!("after the pod went away: {gone} entries collected, {entries} left");
    let m = agent.metrics(&tb)?;
    assert_eq!(
        metric_value(
            &m,
            "mtls_agent_kernel_errors_total",
            &[("reason", "flow_table_full")]
        ),
        Some(full),
        "collected entries are not evictions: the counter does not move"
    );
    agent.proc().ensure_running()?;
    assert!(agent.stop()?.success());
    tb.destroy()
}

/// The alerts exist and watch the overload series (their firing is tested by promtool in
/// dashboards/prometheus/rules_test.yaml).
#[test]
fn overload_alerts_watch_the_overload_series() -> Result<()> {
    let rules = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../dashboards/prometheus/rules.yaml"
    ))?;
    for (alert, series) in [
        ("MtlsAgentEventsLost", "mtls_agent_events_lost_total"),
        (
            "MtlsAgentFlowTableFull",
            "mtls_agent_kernel_errors_total{reason=\"flow_table_full\"}",
        ),
    ] {
        let at = rules.find(&format!("alert: {alert}")).context(alert)?;
        let expr = rules[at..].lines().nth(1).unwrap_or("");
        assert!(expr.contains(series), "{alert}: {expr}");
    }
    Ok(())
}
