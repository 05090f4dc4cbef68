//! Issue 7, kernel portability: the program degrades cleanly where a kernel feature is missing.
//! Here: no TCX (before 6.6), simulated on this kernel by failing `BPF_LINK_CREATE` the way an
//! older kernel does; `--tc-mode auto` falls back to clsact and everything works. (No BTF, the
//! other degradation, is tested in security.rs: one clear line, exit 1.) Needs root; fails
//! (never skips) without it.
use std::time::Duration;

use anyhow::Result;
use mtls_agent_testbed::*;

mod faults_util;
use faults_util::*;

#[test]
fn without_tcx_auto_mode_falls_back_to_clsact() -> Result<()> {
    ensure_root()?;
    let bin = agent_bin()?;
    let (tb, server, client, inv) = two_pod_bed("mtport")?;
    let _http = http_server(&tb, &server.netns, 8080, false)?;
    let agent = Agent::start_wrapped(
        &tb,
        &[env!("CARGO_BIN_EXE_no-bpf-links")],
        &bin,
        &inv,
        &["vp*"],
        &["--attach-side", "host"],
        2,
    )?;
    let log = agent.proc().stderr();
    assert!(
        log.contains("TCX not available, falling back to clsact"),
        "{log}"
    );
    assert_eq!(
        bpf_objects(agent.proc().pid())?
            .links
            .iter()
            .filter(|l| l.1 == "tcx")
            .count(),
        0,
        "no TCX link could be made"
    );
    for pod in [&server, &client] {
        let f =
            tc_filters(&tb, &pod.host_if, "ingress")? + &tc_filters(&tb, &pod.host_if, "egress")?;
        assert_eq!(our_filters(&f), 2, "{}: {f}", pod.host_if);
    }
    http_get(&tb, &client.netns, &http_url(server.v4(8080)))?;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while conns(&agent.metrics(&tb)?, "shop", "web", "inbound", "plaintext") < 1.0 {
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "the connection was never classified through clsact"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let m = agent.settle(&tb, Duration::from_secs(10))?;
    assert_eq!(conns(&m, "shop", "web", "inbound", "plaintext"), 1.0, "{m}");
    assert_eq!(
        metric_value(&m, "mtls_agent_attach_failures_total", &[]),
        Some(0.0)
    );
    assert!(agent.stop()?.success());
    for pod in [&server, &client] {
        let f =
            tc_filters(&tb, &pod.host_if, "ingress")? + &tc_filters(&tb, &pod.host_if, "egress")?;
        assert_eq!(our_filters(&f), 0, "clean stop removes them: {f}");
    }
    tb.destroy()
}
