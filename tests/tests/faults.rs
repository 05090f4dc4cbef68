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
/// (`bpftool net show` of this bpftool does not list TCX links, so the agent's own links and
/// programs are taken from its /proc/PID/fdinfo and looked up in `bpftool link/prog show`.)
#[test]
fn kill9_on_tcx_leaves_no_link_and_no_program() -> Result<()> {
    ensure_root()?;
    let bin = agent_bin()?;
    let (tb, server, client, inv) = bed("mtfkill")?;
    add_foreign_filters(&tb, &server.host_if)?;

    let agent = Agent::start(&tb, &bin, &inv, &["vp*"], &["--tc-mode", "tcx"], 2)?;
    let objs = bpf_objects(agent.proc().pid())?;
    let tcx: Vec<&(u64, String, u64)> = objs.links.iter().filter(|l| l.1 == "tcx").collect();
    assert_eq!(
        tcx.len(),
        4,
        "2 interfaces x ingress/egress as TCX links: {objs:?}"
    );
    assert_eq!(objs.progs.len(), 2, "{objs:?}");
    let (links, progs) = (loaded_link_ids()?, loaded_prog_ids()?);
    assert!(
        tcx.iter().all(|l| links.contains(&l.0)),
        "{objs:?} {links:?}"
    );
    assert!(objs.progs.iter().all(|p| progs.contains(p)), "{objs:?}");
    assert!(
        ours(&tb)?.is_empty(),
        "no clsact filter of ours in TCX mode"
    );
    assert!(foreign_present(&tb, &server.host_if)?);

    kill9(&agent)?;
    // Links die with their last fd; the programs are freed right after (RCU).
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (links, progs) = (loaded_link_ids()?, loaded_prog_ids()?);
        let left_links: Vec<_> = tcx.iter().filter(|l| links.contains(&l.0)).collect();
        let left_progs: Vec<_> = objs.progs.iter().filter(|p| progs.contains(p)).collect();
        if left_links.is_empty() && left_progs.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "after kill -9: links {left_links:?} and programs {left_progs:?} still exist"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        ours(&tb)?.is_empty(),
        "bpftool net show: {}",
        net_show(&tb)?
    );
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
    let objs2 = bpf_objects(agent.proc().pid())?;
    assert_eq!(
        objs2.links.iter().filter(|l| l.1 == "tcx").count(),
        4,
        "{objs2:?}"
    );
    let status = agent.stop()?;
    assert!(status.success(), "{status}");
    let links = loaded_link_ids()?;
    assert!(
        objs2.links.iter().all(|l| !links.contains(&l.0)),
        "clean stop detaches"
    );
    assert!(
        foreign_present(&tb, &server.host_if)?,
        "foreign filters survive a clean stop"
    );
    tb.destroy()
}

/// Our clsact filters (name, program id) on one device, from `bpftool net show`.
fn our_clsact(tb: &Testbed, dev: &str) -> Result<Vec<(String, String, u64)>> {
    Ok(ours(tb)?
        .into_iter()
        .filter(|a| a.0 == dev)
        .map(|a| (a.1, a.2, a.3))
        .collect())
}

/// The clsact path (`--tc-mode clsact`): netlink filters outlive a killed process — the one
/// thing `kill -9` leaves behind — and the next agent removes exactly those (by name) before it
/// attaches, in clsact and in TCX mode, while other filters on the same qdisc stay.
#[test]
fn clsact_leftovers_of_a_killed_agent_are_removed_by_the_next_one() -> Result<()> {
    ensure_root()?;
    let bin = agent_bin()?;
    let (tb, server, client, inv) = bed("mtfcls")?;
    add_foreign_filters(&tb, &server.host_if)?;
    let clsact = ["--tc-mode", "clsact"];

    let a1 = Agent::start(&tb, &bin, &inv, &["vp*"], &clsact, 2)?;
    for pod in [&server, &client] {
        let f = our_clsact(&tb, &pod.host_if)?;
        assert_eq!(f.len(), 2, "{}: {f:?}", pod.host_if);
        assert!(
            f.iter()
                .any(|x| x.0 == "clsact/ingress" && x.1 == "mtls_ingress")
        );
        assert!(
            f.iter()
                .any(|x| x.0 == "clsact/egress" && x.1 == "mtls_egress")
        );
    }
    assert!(foreign_present(&tb, &server.host_if)?);
    kill9(&a1)?;
    drop(a1);
    // What kill -9 leaves on this path: the filters, and through them the programs.
    let stale: Vec<u64> = ours(&tb)?.iter().map(|a| a.3).collect();
    assert_eq!(stale.len(), 4, "netlink filters outlive the process");
    let loaded = loaded_prog_ids()?;
    assert!(stale.iter().all(|id| loaded.contains(id)));

    // A restarted agent removes them and attaches exactly once.
    let a2 = Agent::start(&tb, &bin, &inv, &["vp*"], &clsact, 2)?;
    for pod in [&server, &client] {
        let f = our_clsact(&tb, &pod.host_if)?;
        assert_eq!(f.len(), 2, "{}: stale filters removed: {f:?}", pod.host_if);
        assert!(
            f.iter().all(|x| !stale.contains(&x.2)),
            "{f:?} vs stale {stale:?}"
        );
    }
    assert!(
        foreign_present(&tb, &server.host_if)?,
        "foreign filters survive the cleanup"
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    while loaded_prog_ids()?.iter().any(|id| stale.contains(id)) {
        assert!(
            Instant::now() < deadline,
            "stale programs {stale:?} still loaded"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let log = a2.proc().stderr();
    assert!(log.contains("removed a stale filter"), "{log}");

    // Upgrading to TCX (auto) also removes what a clsact agent left.
    kill9(&a2)?;
    drop(a2);
    assert_eq!(ours(&tb)?.len(), 4);
    let a3 = Agent::start(&tb, &bin, &inv, &["vp*"], &[], 2)?;
    assert!(
        ours(&tb)?.is_empty(),
        "TCX agent removed the clsact leftovers"
    );
    assert_eq!(
        bpf_objects(a3.proc().pid())?
            .links
            .iter()
            .filter(|l| l.1 == "tcx")
            .count(),
        4
    );
    assert!(foreign_present(&tb, &server.host_if)?);
    assert!(a3.stop()?.success());

    // A clean stop in clsact mode removes our filters and nothing else.
    let a4 = Agent::start(&tb, &bin, &inv, &["vp*"], &clsact, 2)?;
    assert_eq!(ours(&tb)?.len(), 4);
    assert!(a4.stop()?.success());
    assert!(ours(&tb)?.is_empty(), "{}", net_show(&tb)?);
    assert!(foreign_present(&tb, &server.host_if)?);
    for pod in [&server, &client] {
        let f =
            tc_filters(&tb, &pod.host_if, "ingress")? + &tc_filters(&tb, &pod.host_if, "egress")?;
        assert_eq!(our_filters(&f), 0, "{}: {f}", pod.host_if);
    }
    tb.destroy()
}

/// Every counter on /metrics, scraped 40 times under traffic, never decreases; uptime grows.
/// After `kill -9` and a restart, uptime starts again near 0 and the counters from 0.
#[test]
fn counters_never_go_backwards_and_restart_from_zero() -> Result<()> {
    ensure_root()?;
    let bin = agent_bin()?;
    let (tb, server, client, inv) = bed("mtfctr")?;
    let _http = http_server(&tb, &server.netns, 8080, false)?;
    let agent = Agent::start(&tb, &bin, &inv, &["vp*"], &[], 2)?;
    let url = http_url(server.v4(8080));
    let loop_cmd = format!(
        "while :; do curl -s -o /dev/null --noproxy '*' --max-time 2 {url}; sleep 0.02; done"
    );
    let mut traffic = tb.spawn(&client.netns, &["sh", "-c", &loop_cmd])?;

    let mut prev = counters(&agent.metrics(&tb)?);
    let mut prev_up = 0.0;
    let mut checked = 0usize;
    for i in 0..40 {
        std::thread::sleep(Duration::from_millis(100));
        let m = agent.metrics(&tb)?;
        let now = counters(&m);
        for (series, v) in &prev {
            let n = now
                .get(series)
                .with_context(|| format!("scrape {i}: series {series} disappeared"))?;
            assert!(n >= v, "scrape {i}: {series} went from {v} to {n}");
            checked += 1;
        }
        let up = metric_value(&m, "mtls_agent_uptime_seconds", &[]).context("uptime")?;
        assert!(up >= prev_up, "uptime {prev_up} -> {up}");
        prev_up = up;
        prev = now;
    }
    let before = agent.metrics(&tb)?;
    let seen = metric_value(&before, "mtls_agent_connections_total", &[]).unwrap_or(0.0);
    assert!(seen >= 20.0, "traffic was counted: {seen}");
    assert!(checked >= 40 * 15, "many series compared: {checked}");
    assert!(prev_up >= 3.0, "{prev_up}");

    // Stop the traffic, kill -9, restart: everything starts from zero.
    traffic.stop();
    kill9(&agent)?;
    drop(agent);
    std::thread::sleep(Duration::from_millis(1500));
    let agent = Agent::start(&tb, &bin, &inv, &["vp*"], &[], 2)?;
    std::thread::sleep(Duration::from_millis(600));
    let m = agent.metrics(&tb)?;
    let up = metric_value(&m, "mtls_agent_uptime_seconds", &[]).context("uptime")?;
    assert!(
        up < prev_up && up < 5.0,
        "uptime restarted: {up} (before {prev_up})"
    );
    assert_eq!(
        metric_value(&m, "mtls_agent_connections_total", &[]).unwrap_or(0.0),
        0.0,
        "{m}"
    );
    assert_eq!(metric_value(&m, "mtls_agent_events_total", &[]), Some(0.0));
    http_get(&tb, &client.netns, &url)?;
    // The close may still be in the ring buffer: wait for the count, then for nothing tracked.
    let deadline = Instant::now() + Duration::from_secs(10);
    while conns(&agent.metrics(&tb)?, "shop", "web", "inbound", "plaintext") < 1.0 {
        assert!(
            Instant::now() < deadline,
            "the new connection was never counted"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let m = agent.settle(&tb, Duration::from_secs(10))?;
    assert_eq!(conns(&m, "shop", "web", "inbound", "plaintext"), 1.0, "{m}");
    assert!(agent.stop()?.success());
    tb.destroy()
}
