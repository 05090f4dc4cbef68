//! Issue 7, soak: mixed traffic (Istio-style mTLS, one-way TLS, plaintext HTTP, probes from the
//! node) against one agent for a while, sampling its RSS, fds and classification counts. CI runs
//! it for ~75 s; `cargo xtask soak --minutes 60` runs it for an hour (MTLS_SOAK_SECS) and writes
//! the samples to docs/soak.md (MTLS_SOAK_OUT). Needs root; fails (never skips) without it.
use std::{
    fmt::Write as _,
    sync::atomic::{AtomicBool, AtomicU64, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use mtls_agent_testbed::*;

mod faults_util;
use faults_util::*;

const ISTIO_ALPN: &str = "istio-peer-exchange,istio";

struct Sample {
    at: Duration,
    rss_kib: u64,
    fds: usize,
    mtls: f64,
    tls: f64,
    plaintext: f64,
    unknown: f64,
    tracked: f64,
    lost: f64,
    /// Inbound connections so far, all classes (each same-node connection used a flow-table
    /// entry on both veths, probes one).
    conns: f64,
    /// Entries at the last garbage-collection pass.
    entries: f64,
    table_full: f64,
    /// Connections ended because their entry went without a close (`flows_ended_unseen`).
    unseen: f64,
    scrape: Duration,
}

#[test]
fn soak_mixed_traffic_keeps_memory_and_fds_flat() -> Result<()> {
    ensure_root()?;
    let bin = agent_bin()?;
    let secs: u64 = std::env::var("MTLS_SOAK_SECS")
        .ok()
        .map(|s| s.parse())
        .transpose()
        .context("MTLS_SOAK_SECS")?
        .unwrap_or(75);
    let every = Duration::from_secs((secs / 15).clamp(5, 60));
    let mut tb = Testbed::new("mtsoak")?;
    let api = tb.add_pod(PodSpec::new("api", "198.18.0.10".parse()?))?;
    let worker = tb.add_pod(PodSpec::new("worker", "198.18.0.11".parse()?))?;
    let web = tb.add_pod(PodSpec::new("web", "198.18.0.20".parse()?))?;
    let batch = tb.add_pod(PodSpec::new("batch", "198.18.0.30".parse()?))?;
    let ledger = tb.add_pod(PodSpec::new("ledger", "198.18.0.40".parse()?))?;
    let inv = tb.workdir().join("inventory.yaml");
    write_inventory(
        &inv,
        &[
            Workload::new("payments", "api", &[&api]),
            Workload::new("payments", "worker", &[&worker]),
            Workload::new("shop", "web", &[&web]),
            Workload::new("legacy", "batch", &[&batch]).without_sidecar(),
            Workload::new("billing", "ledger", &[&ledger]),
        ],
    )?;
    let pki = Pki::new(tb.workdir().join("pki"))?;
    let api_cert = pki.issue("api", &[San::spiffe("payments", "api")])?;
    let worker_cert = pki.issue("worker", &[San::spiffe("payments", "worker")])?;
    let ledger_cert = pki.issue("ledger", &[San::spiffe("billing", "ledger")])?;
    let _s1 = openssl_server(
        &tb,
        &api.netns,
        &TlsServer::new(8443, &api_cert, pki.ca_cert())
            .require_client_cert()
            .alpn(ISTIO_ALPN),
    )?;
    let _s2 = http_server(&tb, &web.netns, 8080, false)?;
    let _s3 = openssl_server(
        &tb,
        &ledger.netns,
        &TlsServer::new(9443, &ledger_cert, pki.ca_cert()),
    )?;
    let agent = Agent::start(&tb, &bin, &inv, &["vp*"], &[], 5)?;
    let pid = agent.proc().pid();

    let stop = AtomicBool::new(false);
    let errors = AtomicU64::new(0);
    let started = Instant::now();
    let mut samples = Vec::new();
    std::thread::scope(|s| -> Result<()> {
        let run = |f: &(dyn Fn() -> Result<()> + Sync)| {
            while !stop.load(Ordering::Relaxed) {
                if f().is_err() {
                    errors.fetch_add(1, Ordering::Relaxed);
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        };
        let mtls = || {
            openssl_client(
                &tb,
                &worker.netns,
                &TlsClient::new(api.v4(8443), pki.ca_cert())
                    .cert(&worker_cert)
                    .alpn(ISTIO_ALPN),
            )
            .map(drop)
        };
        let tls = || {
            openssl_client(
                &tb,
                &web.netns,
                &TlsClient::new(ledger.v4(9443), pki.ca_cert()),
            )
            .map(drop)
        };
        let plain = || http_get(&tb, &batch.netns, &http_url(web.v4(8080))).map(drop);
        let probe = || http_get(&tb, tb.node_netns(), &http_url(web.v4(8080))).map(drop);
        s.spawn(move || run(&mtls));
        s.spawn(move || run(&tls));
        s.spawn(move || run(&plain));
        s.spawn(move || run(&probe));
        let result = (|| -> Result<()> {
            while started.elapsed() < Duration::from_secs(secs) {
                std::thread::sleep(
                    every.min(Duration::from_secs(secs).saturating_sub(started.elapsed())),
                );
                agent.proc().ensure_running()?;
                let (m, scrape) = scrape_timed(&tb, &agent)?;
                let total = |sec| {
                    metric_value(
                        &m,
                        "mtls_agent_connections_total",
                        &[("direction", "inbound"), ("security", sec)],
                    )
                    .unwrap_or(0.0)
                };
                samples.push(Sample {
                    at: started.elapsed(),
                    rss_kib: rss_kib(pid)?,
                    fds: fd_count(pid)?,
                    mtls: total("mtls"),
                    tls: total("tls"),
                    plaintext: total("plaintext"),
                    unknown: total("unknown"),
                    tracked: metric_value(&m, "mtls_agent_flows_tracked", &[]).unwrap_or(0.0),
                    lost: metric_value(&m, "mtls_agent_events_lost_total", &[]).unwrap_or(0.0),
                    conns: total("mtls") + total("tls") + total("plaintext") + total("unknown"),
                    entries: metric_value(&m, "mtls_agent_flow_table_entries", &[]).unwrap_or(0.0),
                    table_full: metric_value(
                        &m,
                        "mtls_agent_kernel_errors_total",
                        &[("reason", "flow_table_full")],
                    )
                    .unwrap_or(0.0),
                    unseen: metric_value(&m, "mtls_agent_flows_ended_unseen_total", &[])
                        .unwrap_or(0.0),
                    scrape,
                });
            }
            Ok(())
        })();
        stop.store(true, Ordering::Relaxed);
        result
    })?;

    // Once the traffic stops every connection ends: at its close, or at the collector's next
    // pass (60 s) if its entry went without one. Written with the samples, then judged.
    let quiet = Instant::now();
    let (drained_ok, drained) = loop {
        let m = agent.metrics(&tb)?;
        let tracked = metric_value(&m, "mtls_agent_flows_tracked", &[]).unwrap_or(f64::MAX);
        if tracked == 0.0 {
            break (
                true,
                format!(
                    "No connection was tracked any more {:.1} s after the traffic stopped.",
                    quiet.elapsed().as_secs_f64()
                ),
            );
        }
        if quiet.elapsed() >= Duration::from_secs(if secs > 120 { 150 } else { 75 }) {
            break (
                false,
                format!(
                    "{tracked} connections were still tracked {} s after the traffic stopped.",
                    quiet.elapsed().as_secs()
                ),
            );
        }
        std::thread::sleep(Duration::from_millis(250));
    };

    let mut md = String::new();
    writeln!(
        md,
        "| t (s) | RSS (KiB) | fds | inbound mtls | tls | plaintext | unknown | tracked | events lost | inbound total | flow-table entries | flow_table_full | ended unseen | /metrics |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
    )?;
    for s in &samples {
        writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {:.1} ms |",
            s.at.as_secs(),
            s.rss_kib,
            s.fds,
            s.mtls,
            s.tls,
            s.plaintext,
            s.unknown,
            s.tracked,
            s.lost,
            s.conns,
            s.entries,
            s.table_full,
            s.unseen,
            s.scrape.as_secs_f64() * 1000.0
        )?;
    }
    let errs = errors.load(Ordering::Relaxed);
    eprintln!("soak: {secs} s, client errors {errs}. {drained}\n{md}");
    let target = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/soak-samples.md");
    std::fs::write(&target, &md)?;
    if let Some(out) = std::env::var_os("MTLS_SOAK_OUT") {
        let doc = format!(
            "# Soak run\n\n`cargo xtask soak --minutes {}` ({}) on {} (kernel {}): mixed traffic (Istio mTLS \
             worker→api, one-way TLS web→ledger, plaintext batch→web, probes node→web), sampled every \
             {} s. Client errors: {errs}. {drained}\n\n{md}",
            secs / 60,
            std::env::var("MTLS_SOAK_REV")
                .map(|r| format!("agent built from commit {r}"))
                .unwrap_or_else(|_| "agent from the working tree".into()),
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .unwrap_or_default()
                .trim(),
            std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .unwrap_or_default()
                .trim(),
            every.as_secs(),
        );
        std::fs::write(out, doc)?;
    }

    assert!(samples.len() >= 5, "sampled over time: {}", samples.len());
    assert!(drained_ok, "{drained}\n{md}");
    let first = &samples[samples.len() / 4];
    let last = samples.last().context("samples")?;
    for (what, a, b) in [
        ("mtls", first.mtls, last.mtls),
        ("tls", first.tls, last.tls),
        ("plaintext", first.plaintext, last.plaintext),
    ] {
        assert!(b > a, "{what} kept being counted: {a} -> {b}");
    }
    assert_eq!(
        last.unknown, 0.0,
        "no unknown verdicts in clean traffic\n{md}"
    );
    assert_eq!(last.lost, 0.0, "{md}");
    // A healthy node is not reported as table pressure, however many connections it has seen.
    assert_eq!(last.table_full, 0.0, "{md}");
    assert!(
        last.fds <= first.fds + 2,
        "fds {} -> {}\n{md}",
        first.fds,
        last.fds
    );
    assert!(
        last.rss_kib <= first.rss_kib + 16 * 1024,
        "RSS {} -> {} KiB\n{md}",
        first.rss_kib,
        last.rss_kib
    );
    assert!(
        errs * 20 < last.mtls as u64 + last.plaintext as u64,
        "client errors {errs}"
    );
    let noisy = warn_error_lines(&agent.proc().stderr());
    assert!(noisy.is_empty(), "{noisy:#?}");
    assert!(agent.stop()?.success());
    tb.destroy()
}
