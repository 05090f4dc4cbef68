//! Issue 7, restart and crash: `kill -9` of the agent leaves nothing that keeps costing (TCX
//! links die with it; on the clsact path its reaper removes its filters), a restarted agent
//! removes what a killed container left on the clsact path, other programs and filters are
//! never touched, and counters never go backwards (and restart from zero).
//! Needs root; fails (never skips) without it.
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use mtls_agent_testbed::*;

mod faults_util;
use faults_util::*;

fn bed(family: &str) -> Result<(Testbed, Pod, Pod, std::path::PathBuf)> {
    two_pod_bed(family)
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

    let agent = Agent::start(
        &tb,
        &bin,
        &inv,
        &["vp*"],
        &["--tc-mode", "tcx", "--attach-side", "host"],
        2,
    )?;
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
    let agent = Agent::start(&tb, &bin, &inv, &["vp*"], &["--attach-side", "host"], 2)?;
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

/// The agent's clsact reaper: its child process started with `clsact-reaper`.
fn reaper_of(agent: &Agent) -> Result<u32> {
    let pid = agent.proc().pid();
    let children = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))?;
    for c in children.split_whitespace() {
        let cmdline = std::fs::read(format!("/proc/{c}/cmdline")).unwrap_or_default();
        if String::from_utf8_lossy(&cmdline).contains("clsact-reaper") {
            return Ok(c.parse()?);
        }
    }
    anyhow::bail!("agent {pid} has no clsact reaper child (children: {children:?})")
}

fn alive(pid: u32) -> bool {
    // Reaped or a zombie (the reaper is reparented when the agent dies): not running.
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        s.rsplit_once(") ")
            .is_some_and(|(_, rest)| !rest.starts_with('Z'))
    })
}

/// Waits up to 5 s for `cond`.
fn eventually(what: &str, mut cond: impl FnMut() -> Result<bool>) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !cond()? {
        anyhow::ensure!(Instant::now() < deadline, "not within 5 s: {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

fn clsact_qdisc(tb: &Testbed, dev: &str) -> Result<bool> {
    let out = tb.run(tb.node_netns(), &["tc", "qdisc", "show", "dev", dev])?;
    Ok(String::from_utf8_lossy(&out.stdout).contains("qdisc clsact"))
}

/// The clsact path (`--tc-mode clsact`). Netlink filters outlive the process that added them,
/// so the agent starts a reaper process: after `kill -9` of the agent, the reaper removes its
/// filters (and the qdisc it created, unless someone else's filters are on it) within moments,
/// and the programs are freed. Foreign filters are never touched.
#[test]
fn kill9_on_clsact_leaves_no_filter_and_no_program() -> Result<()> {
    ensure_root()?;
    let bin = agent_bin()?;
    let (tb, server, client, inv) = bed("mtfreap")?;
    add_foreign_filters(&tb, &server.host_if)?;
    let clsact = ["--tc-mode", "clsact", "--attach-side", "host"];
    assert!(!clsact_qdisc(&tb, &client.host_if)?);

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
    assert!(clsact_qdisc(&tb, &client.host_if)?, "the agent added it");
    let progs: Vec<u64> = ours(&tb)?.iter().map(|a| a.3).collect();
    let reaper = reaper_of(&a1)?;
    kill9(&a1)?;
    eventually("the reaper removes the killed agent's filters", || {
        Ok(ours(&tb)?.is_empty())
    })?;
    eventually("the killed agent's programs are freed", || {
        let loaded = loaded_prog_ids()?;
        Ok(progs.iter().all(|id| !loaded.contains(id)))
    })?;
    eventually("the reaper exits", || Ok(!alive(reaper)))?;
    for pod in [&server, &client] {
        let f =
            tc_filters(&tb, &pod.host_if, "ingress")? + &tc_filters(&tb, &pod.host_if, "egress")?;
        assert_eq!(our_filters(&f), 0, "{}: {f}", pod.host_if);
    }
    assert!(
        !clsact_qdisc(&tb, &client.host_if)?,
        "the qdisc the agent created is gone"
    );
    assert!(
        clsact_qdisc(&tb, &server.host_if)? && foreign_present(&tb, &server.host_if)?,
        "foreign filters and their qdisc survive"
    );
    drop(a1);

    // A clean stop: the agent detaches itself, its reaper finds nothing and exits with it.
    let a2 = Agent::start(&tb, &bin, &inv, &["vp*"], &clsact, 2)?;
    let reaper = reaper_of(&a2)?;
    assert!(a2.stop()?.success());
    assert!(!alive(reaper), "no reaper outlives a clean stop");
    assert!(ours(&tb)?.is_empty(), "{}", net_show(&tb)?);
    assert!(!clsact_qdisc(&tb, &client.host_if)?);
    assert!(foreign_present(&tb, &server.host_if)?);
    tb.destroy()
}

/// Two agents in one namespace on different interfaces use the same program names; killing
/// one makes its reaper remove exactly its own filters (by program id), not the other's.
#[test]
fn the_reaper_removes_only_its_own_agents_filters() -> Result<()> {
    ensure_root()?;
    let bin = agent_bin()?;
    let (tb, server, client, inv) = bed("mtfreap2")?;
    let a = Agent::start(
        &tb,
        &bin,
        &inv,
        &[&server.host_if],
        &["--tc-mode", "clsact", "--attach-side", "host"],
        1,
    )?;
    let b = Agent::start(
        &tb,
        &bin,
        &inv,
        &[&client.host_if],
        &[
            "--tc-mode",
            "clsact",
            "--listen",
            "127.0.0.1:9478",
            "--attach-side",
            "host",
        ],
        1,
    )?;
    let b_filters = our_clsact(&tb, &client.host_if)?;
    assert_eq!(b_filters.len(), 2, "{b_filters:?}");
    assert_eq!(our_clsact(&tb, &server.host_if)?.len(), 2);
    kill9(&a)?;
    eventually("agent a's filters removed", || {
        Ok(our_clsact(&tb, &server.host_if)?.is_empty())
    })?;
    // Give a wrong sweep every chance to show.
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        our_clsact(&tb, &client.host_if)?,
        b_filters,
        "agent b's filters (same names, other ids) untouched"
    );
    b.proc().ensure_running()?;
    drop(a);
    assert!(b.stop()?.success());
    assert!(ours(&tb)?.is_empty());
    tb.destroy()
}

/// When the reaper dies with the agent (a container kill takes the whole process group), the
/// filters stay: the next agent removes exactly those (by name) before it attaches, in clsact
/// and in TCX mode, while other filters on the same qdisc stay.
#[test]
fn clsact_leftovers_of_a_killed_container_are_removed_by_the_next_agent() -> Result<()> {
    ensure_root()?;
    let bin = agent_bin()?;
    let (tb, server, client, inv) = bed("mtfcls")?;
    add_foreign_filters(&tb, &server.host_if)?;
    let clsact = ["--tc-mode", "clsact", "--attach-side", "host"];
    // SIGKILL to the agent's process group: the agent and its reaper at once.
    let kill_all = |agent: &Agent| -> Result<()> {
        let reaper = reaper_of(agent)?;
        // SAFETY: plain syscall on a process group this test started.
        let rc = unsafe { libc::killpg(agent.proc().pid() as i32, libc::SIGKILL) };
        anyhow::ensure!(rc == 0, "killpg failed");
        eventually("agent and reaper dead", || {
            Ok(!agent.proc().is_running() && !alive(reaper))
        })
    };

    let a1 = Agent::start(&tb, &bin, &inv, &["vp*"], &clsact, 2)?;
    kill_all(&a1)?;
    drop(a1);
    // What is left then: the filters, and through them the programs.
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
    eventually("stale programs freed", || {
        let loaded = loaded_prog_ids()?;
        Ok(!loaded.iter().any(|id| stale.contains(id)))
    })?;
    let log = a2.proc().stderr();
    assert!(log.contains("removed a stale filter"), "{log}");

    // Upgrading to TCX (auto) also removes what a clsact agent left.
    kill_all(&a2)?;
    drop(a2);
    assert_eq!(ours(&tb)?.len(), 4);
    let a3 = Agent::start(&tb, &bin, &inv, &["vp*"], &["--attach-side", "host"], 2)?;
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
    let agent = Agent::start(&tb, &bin, &inv, &["vp*"], &["--attach-side", "host"], 2)?;
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
    let agent = Agent::start(&tb, &bin, &inv, &["vp*"], &["--attach-side", "host"], 2)?;
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
    assert_eq!(
        metric_value(&m, "mtls_agent_capture_bytes_total", &[]),
        Some(0.0)
    );
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
    // The kernel's copy counter, mirrored every tick: the request and the first segment of the
    // response (curl's GET with its three headers is over 64 bytes; neither needs a kilobyte).
    let deadline = Instant::now() + Duration::from_secs(5);
    let (copied, m) = loop {
        let m = agent.metrics(&tb)?;
        let c = metric_value(&m, "mtls_agent_capture_bytes_total", &[]).unwrap_or(0.0);
        if c > 0.0 || Instant::now() > deadline {
            break (c, m);
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(
        copied > 64.0 && copied < 1024.0,
        "{copied} bytes copied: {m}"
    );
    assert!(agent.stop()?.success());
    tb.destroy()
}

/// On the pods' ends (`--attach-side auto`, the default), clsact filters live in the pods'
/// namespaces: the agent tells its reaper each namespace, and the reaper removes them there
/// (with the qdiscs the agent added) when the agent is killed; a clean stop removes them too.
#[test]
fn clsact_filters_on_the_pods_ends_are_removed_after_kill9_and_a_clean_stop() -> Result<()> {
    ensure_root()?;
    let bin = agent_bin()?;
    let (tb, server, client, inv) = bed("mtfreappod")?;
    let pod_filters = |p: &Pod| -> Result<usize> {
        let mut n = 0;
        for dir in ["ingress", "egress"] {
            let out = tb.run(&p.netns, &["tc", "filter", "show", "dev", &p.pod_if, dir])?;
            n += our_filters(&String::from_utf8_lossy(&out.stdout));
        }
        Ok(n)
    };
    let pod_qdisc = |p: &Pod| -> Result<bool> {
        let out = tb.run(&p.netns, &["tc", "qdisc", "show", "dev", &p.pod_if])?;
        Ok(String::from_utf8_lossy(&out.stdout).contains("qdisc clsact"))
    };
    let clsact = ["--tc-mode", "clsact"];
    for round in ["kill -9", "clean stop"] {
        let agent = Agent::start(&tb, &bin, &inv, &["vp*"], &clsact, 2)?;
        for p in [&server, &client] {
            assert_eq!(pod_filters(p)?, 2, "{round}: {} in {}", p.pod_if, p.netns);
            assert!(pod_qdisc(p)?);
            let host =
                tc_filters(&tb, &p.host_if, "ingress")? + &tc_filters(&tb, &p.host_if, "egress")?;
            assert_eq!(our_filters(&host), 0, "{round}: {host}");
        }
        let m = agent.metrics(&tb)?;
        assert_eq!(
            metric_value(
                &m,
                "mtls_agent_interfaces_attached_side",
                &[("side", "pod")]
            ),
            Some(2.0),
            "{m}"
        );
        if round == "kill -9" {
            let reaper = reaper_of(&agent)?;
            kill9(&agent)?;
            eventually("the reaper swept the pods' namespaces", || {
                Ok(pod_filters(&server)? + pod_filters(&client)? == 0 && !alive(reaper))
            })?;
        } else {
            assert!(agent.stop()?.success());
            assert_eq!(pod_filters(&server)? + pod_filters(&client)?, 0);
        }
        for p in [&server, &client] {
            assert!(
                !pod_qdisc(p)?,
                "{round}: the qdisc the agent added in {}",
                p.netns
            );
        }
    }
    tb.destroy()
}
