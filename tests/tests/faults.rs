//! Issue 7, restart and crash: `kill -9` of the agent leaves nothing that keeps costing, a
//! restarted agent removes what an earlier one left on the clsact path, other programs and
//! filters are never touched, and counters never go backwards (and restart from zero).
//! Needs root; fails (never skips) without it.
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use mtls_agent_testbed::*;

mod faults_util;
use faults_util::*;

fn bed(family: &str) -> Result<(Testbed, Pod, Pod, std::path::PathBuf)> {
    let mut tb = Testbed::new(family)?;
    let server = tb.add_pod(PodSpec::new("server", "198.18.0.10".parse()?))?;
    let client = tb.add_pod(PodSpec::new("client", "198.18.0.20".parse()?))?;
    let inv = tb.workdir().join("inventory.yaml");
    write_inventory(
        &inv,
        &[
            Workload::new("shop", "web", &[&server]),
            Workload::new("legacy", "batch", &[&client]).without_sidecar(),
        ],
    )?;
    Ok((tb, server, client, inv))
}

/// Adds filters nobody else owns to a pod veth: a classic-BPF `cls_bpf` filter ("ret 0": no
/// match, classification goes on) on ingress and a `u32` filter matching nothing on egress. They
/// stand for another product's TC programs (this kernel has no matchall/flower/gact).
fn add_foreign_filters(tb: &Testbed, dev: &str) -> Result<()> {
    let ns = tb.node_netns();
    // Our own qdisc may already exist (clsact mode): creating it is then an error we ignore.
    let _ = tb.output(
        ns,
        &["tc", "qdisc", "add", "dev", dev, "clsact"],
        None,
        Duration::from_secs(5),
    )?;
    tb.run(
        ns,
        &[
            "tc",
            "filter",
            "add",
            "dev",
            dev,
            "ingress",
            "pref",
            "7",
            "protocol",
            "all",
            "bpf",
            "bytecode",
            "1,6 0 0 0,",
        ],
    )?;
    tb.run(
        ns,
        &[
            "tc",
            "filter",
            "add",
            "dev",
            dev,
            "egress",
            "pref",
            "7",
            "protocol",
            "ip",
            "u32",
            "match",
            "u32",
            "0xdeadbeef",
            "0xffffffff",
            "at",
            "0",
        ],
    )?;
    Ok(())
}

fn foreign_present(tb: &Testbed, dev: &str) -> Result<bool> {
    let i = tc_filters(tb, dev, "ingress")?;
    let e = tc_filters(tb, dev, "egress")?;
    Ok(i.contains("pref 7 bpf") && e.contains("pref 7 u32"))
}

/// Programs named like ours attached in the node namespace, with their ids.
fn ours(tb: &Testbed) -> Result<Vec<(String, String, String, u64)>> {
    Ok(attachments(tb)?
        .into_iter()
        .filter(|a| a.2.starts_with("mtls_"))
        .collect())
}

/// TCX (the default here, kernel 6.6+): `kill -9` leaves no link and no program of ours; the
/// foreign filters survive start, kill and restart; the restarted agent attaches afresh.
#[test]
fn kill9_on_tcx_leaves_no_link_and_no_program() -> Result<()> {
    ensure_root()?;
    let bin = agent_bin()?;
    let (tb, server, client, inv) = bed("mtfkill")?;
    add_foreign_filters(&tb, &server.host_if)?;

    let agent = Agent::start(&tb, &bin, &inv, &["vp*"], &["--tc-mode", "tcx"], 2)?;
    let attached = ours(&tb)?;
    assert_eq!(
        attached.len(),
        4,
        "2 interfaces x ingress/egress: {attached:?}"
    );
    assert!(
        attached.iter().all(|a| a.1.starts_with("tcx")),
        "attached through TCX: {attached:?}"
    );
    let ids: Vec<u64> = attached.iter().map(|a| a.3).collect();
    assert!(ids.iter().all(|&id| id > 0), "{attached:?}");
    let loaded = loaded_prog_ids()?;
    assert!(ids.iter().all(|id| loaded.contains(id)), "programs loaded");
    assert!(foreign_present(&tb, &server.host_if)?);

    kill9(&agent)?;
    // Links die with their last fd; the programs are freed right after (RCU).
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let left = ours(&tb)?;
        let loaded = loaded_prog_ids()?;
        let still: Vec<&u64> = ids.iter().filter(|id| loaded.contains(id)).collect();
        if left.is_empty() && still.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "after kill -9: attached {left:?}, programs still loaded {still:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    for pod in [&server, &client] {
        let f =
            tc_filters(&tb, &pod.host_if, "ingress")? + &tc_filters(&tb, &pod.host_if, "egress")?;
        assert_eq!(our_filters(&f), 0, "{}: {f}", pod.host_if);
    }
    assert!(
        foreign_present(&tb, &server.host_if)?,
        "foreign filters survive kill -9"
    );
    drop(agent);

    // A new agent attaches afresh; stopping it leaves the foreign filters alone too.
    let agent = Agent::start(&tb, &bin, &inv, &["vp*"], &[], 2)?;
    assert_eq!(ours(&tb)?.len(), 4);
    let status = agent.stop()?;
    assert!(status.success(), "{status}");
    assert!(ours(&tb)?.is_empty());
    assert!(
        foreign_present(&tb, &server.host_if)?,
        "foreign filters survive a clean stop"
    );
    let _ = client;
    tb.destroy()
}
