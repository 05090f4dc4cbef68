//! Issue 11: observer R of `cargo xtask bench`. The hidden `mtls-agent bench-reference` attaches
//! the parse-only reference programs, and only those, at TCX ingress and egress of the matching
//! veths (first in the chain, where `run` attaches its own), keeps traffic flowing, and detaches
//! on SIGTERM. Needs root; fails (never skips) without it.
use std::time::{Duration, Instant};

use anyhow::{Result, ensure};
use mtls_agent_testbed::*;

const TCX_QUERY: &str = env!("CARGO_BIN_EXE_tcx-query");

#[test]
fn bench_reference_attaches_only_the_parse_only_programs_and_detaches_on_sigterm() -> Result<()> {
    ensure_root()?;
    let bin = agent_bin()?;
    let mut tb = Testbed::new("mtref")?;
    let srv = tb.add_pod(PodSpec::new("srv", "198.18.0.10".parse()?))?;
    let cli = tb.add_pod(PodSpec::new("cli", "198.18.0.20".parse()?))?;
    let node = tb.node_netns().to_owned();
    let bin = bin.to_str().unwrap_or_default().to_owned();
    let mut proc = tb.spawn(&node, &[&bin, "bench-reference", "--interface", "vp*"])?;
    let deadline = Instant::now() + Duration::from_secs(20);
    while !proc.stdout().lines().any(|l| l == "attached 2") {
        proc.ensure_running()?;
        ensure!(
            Instant::now() < deadline,
            "not attached within 20s: {}",
            proc.stderr_tail()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    for iface in [&srv.host_if, &cli.host_if] {
        let (i, e) = tcx_programs(&tb, TCX_QUERY, &node, iface)?;
        ensure!(
            i == ["mtlsref_ingress"] && e == ["mtlsref_egress"],
            "{iface}: ingress {i:?}, egress {e:?}"
        );
    }
    // TCP across both veths, through all four hooks: the program never stops a packet.
    let _http = http_server(&tb, &srv.netns, 8080, false)?;
    let body = http_get(&tb, &cli.netns, "http://198.18.0.10:8080/")?;
    ensure!(body.trim() == "ok", "unexpected body {body:?}");
    let status = proc.stop_with_grace(Duration::from_secs(10));
    ensure!(
        status.is_some_and(|s| s.success()),
        "bench-reference exited with {status:?}: {}",
        proc.stderr_tail()
    );
    for iface in [&srv.host_if, &cli.host_if] {
        let (i, e) = tcx_programs(&tb, TCX_QUERY, &node, iface)?;
        ensure!(
            i.is_empty() && e.is_empty(),
            "{iface} after SIGTERM: ingress {i:?}, egress {e:?}"
        );
    }
    Ok(())
}
