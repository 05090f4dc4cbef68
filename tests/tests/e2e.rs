//! End-to-end: the real agent binary, the real kernel (TC programs on veths in namespaces this
//! test creates), real OpenSSL/curl/python traffic; exact counts in /metrics and the report.
//! Needs root; fails (never skips) without it.
use std::{path::PathBuf, time::Duration};

use anyhow::Result;
use mtls_agent_testbed::{scenario::*, *};

const TCX_QUERY: &str = env!("CARGO_BIN_EXE_tcx-query");

#[test]
fn namespaces_get_exact_counts_and_verdicts() -> Result<()> {
    ensure_root()?;
    let bin = agent_bin()?;
    let node = ReferenceNode::new("mte2e")?;
    let tb = &node.tb;
    let inventory = tb.workdir().join("inventory.yaml");
    write_inventory(&inventory, &node.workloads())?;
    let agent = Agent::start(tb, &bin, &inventory, &["vp*"], &[], tb.pods().len())?;
    node.send_traffic()?;
    let checked = node.check(&agent)?;
    // The inventory knows no pod spec: the node's request to web:8080 is from "the node or a
    // hostNetwork pod".
    checked.assert_shop_node_blocker("the node or a hostNetwork pod", &["exclude port 8080"]);

    // The table for people, and the exit codes of report.
    let (status, table, _) = agent.report(tb, &["--namespace", "shop"])?;
    assert!(status.success());
    assert!(
        table.contains("NOT READY")
            && table.contains("legacy/batch")
            && table.contains("node: the node or a hostNetwork pod"),
        "{table}"
    );
    let (status, _, err) = agent.report(tb, &["--namespace", "nope"])?;
    assert_eq!(status.code(), Some(2), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("nope"), "{err}");

    // Attached while running, nothing left after stop (as the kernel reports it).
    assert_attached_then_detached(tb, TCX_QUERY, agent)?;
    node.destroy()?;
    Ok(())
}

fn write(dir: &std::path::Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

/// Bad input is a one-line error naming what is wrong, exit code 2, before anything is attached.
#[test]
fn bad_inventory_and_flags_exit_2_with_one_line() -> Result<()> {
    let bin = agent_bin()?;
    let dir = tempfile::tempdir()?;
    let bad_addr = write(
        dir.path(),
        "bad.yaml",
        "workloads:\n  - namespace: shop\n    name: web\n    addresses: [\"198.18.0.999\"]\n",
    );
    let typo = write(
        dir.path(),
        "typo.yaml",
        "workloads:\n  - namespace: shop\n    name: web\n    adresses: [\"198.18.0.9\"]\n",
    );
    let not_yaml = write(dir.path(), "x.yaml", "workloads: [\n");
    let missing = dir.path().join("missing.yaml");
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            vec![
                "run".into(),
                "--inventory".into(),
                bad_addr.display().to_string(),
            ],
            "workloads[0].addresses[0]",
        ),
        (
            vec![
                "run".into(),
                "--inventory".into(),
                typo.display().to_string(),
            ],
            "adresses",
        ),
        (
            vec![
                "run".into(),
                "--inventory".into(),
                not_yaml.display().to_string(),
            ],
            "x.yaml",
        ),
        (
            vec![
                "run".into(),
                "--inventory".into(),
                missing.display().to_string(),
            ],
            "missing.yaml",
        ),
        (
            vec![
                "run".into(),
                "--inventory".into(),
                "i".into(),
                "--listen".into(),
                "nowhere".into(),
            ],
            "--listen",
        ),
        (
            vec![
                "run".into(),
                "--inventory".into(),
                typo.display().to_string(),
                "--interface".into(),
                "cali[".into(),
            ],
            "",
        ),
        (vec!["run".into(), "--bogus".into()], "--bogus"),
        (
            vec![
                "report".into(),
                "--namespace".into(),
                "a".into(),
                "--output".into(),
                "xml".into(),
            ],
            "xml",
        ),
        (vec!["report".into()], "--namespace"),
        (
            vec![
                "report".into(),
                "--namespace".into(),
                "a".into(),
                "--agent".into(),
                "ftp://x".into(),
            ],
            "--agent",
        ),
        (vec!["frobnicate".into()], "frobnicate"),
    ];
    for (args, needle) in cases {
        let out = std::process::Command::new(&bin).args(&args).output()?;
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert_eq!(
            err.trim().lines().count(),
            1,
            "{args:?}: one line, got {err:?}"
        );
        assert!(
            err.contains(needle),
            "{args:?}: {err:?} should name {needle:?}"
        );
        assert!(!err.contains("panicked"), "{err}");
    }
    // A glob error is reported for the glob, even with a valid inventory.
    let good = write(
        dir.path(),
        "good.yaml",
        "workloads:\n  - {namespace: a, name: b, addresses: [198.18.0.9]}\n",
    );
    let out = std::process::Command::new(&bin)
        .args([
            "run",
            "--inventory",
            good.to_str().unwrap(),
            "--interface",
            "cali[",
        ])
        .output()?;
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--interface"));
    // An unreachable agent is a runtime failure: exit 1, one line.
    let out = std::process::Command::new(&bin)
        .args([
            "report",
            "--namespace",
            "a",
            "--agent",
            "http://127.0.0.1:9",
        ])
        .output()?;
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr).trim().lines().count(),
        1
    );
    // --help has examples and exits 0.
    let out = std::process::Command::new(&bin)
        .args(["report", "--help"])
        .output()?;
    assert_eq!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stdout).contains("Examples:"));
    Ok(())
}

/// A server that reads the client's first bytes and resets the connection (SO_LINGER 0), as a
/// sidecar in STRICT does to plaintext: those connections are counted as rejected, apart from
/// plaintext that was answered.
#[test]
fn plaintext_rejected_right_after_first_bytes_is_counted_apart() -> Result<()> {
    ensure_root()?;
    let bin = agent_bin()?;
    let mut tb = Testbed::new("mtrej")?;
    let api = tb.add_pod(PodSpec::new("api", "198.18.0.10".parse()?))?;
    let batch = tb.add_pod(PodSpec::new("batch", "198.18.0.30".parse()?))?;
    let inventory = tb.workdir().join("inventory.yaml");
    write_inventory(
        &inventory,
        &[
            Workload::new("shop", "api", &[&api]),
            Workload::new("legacy", "batch", &[&batch]).without_sidecar(),
        ],
    )?;
    let reject = [
        "import socket, struct",
        "s = socket.socket()",
        "s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)",
        "s.bind(('0.0.0.0', 9090)); s.listen(16)",
        "while True:",
        "    c, _ = s.accept(); c.recv(100)",
        "    c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack('ii', 1, 0)); c.close()",
    ]
    .join("\n");
    let reject = reject.as_str();
    let _rejecting = tb.spawn(&api.netns, &["python3", "-c", reject])?;
    let _answering = http_server(&tb, &api.netns, 8080, false)?;
    tb.wait_tcp_listening(&api.netns, api.v4(9090), Duration::from_secs(30))?;
    tb.wait_tcp_listening(&api.netns, api.v4(8080), Duration::from_secs(30))?;
    let agent = Agent::start(&tb, &bin, &inventory, &["vp*"], &[], tb.pods().len())?;

    for _ in 0..3 {
        // curl fails (connection reset): that is the point.
        let out = tb.output(
            &batch.netns,
            &[
                "curl",
                "-sS",
                "--noproxy",
                "*",
                "--max-time",
                "3",
                &http_url(api.v4(9090)),
            ],
            None,
            Duration::from_secs(6),
        )?;
        assert!(!out.status.success(), "the rejecting server must reset");
    }
    http_get(&tb, &batch.netns, &http_url(api.v4(8080)))?;
    let m = agent.settle(&tb, Duration::from_secs(15))?;
    assert_eq!(conns(&m, "shop", "api", "inbound", "plaintext"), 4.0, "{m}");
    assert_eq!(
        metric_value(
            &m,
            "mtls_agent_rejected_connections_total",
            &[
                ("namespace", "shop"),
                ("workload", "api"),
                ("security", "plaintext")
            ]
        ),
        Some(3.0),
        "{m}"
    );
    let r = agent.report_json(&tb, "shop", None)?;
    assert_eq!(r["rejected"], 3, "{r:#}");
    assert_eq!(r["inbound"]["plaintext"], 4);
    let ports: Vec<(u64, u64)> = r["workloads"][0]["ports"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|p| {
            (
                p["port"].as_u64().unwrap_or(0),
                p["connections"].as_u64().unwrap_or(0),
            )
        })
        .collect();
    assert_eq!(ports, vec![(8080, 1), (9090, 3)]);
    let (_, table, _) = agent.report(&tb, &["--namespace", "shop"])?;
    assert!(table.contains("rejected: 3 inbound"), "{table}");
    agent.stop()?;
    tb.destroy()?;
    Ok(())
}

/// New pod interfaces are attached within a second (netlink), removed ones are forgotten.
#[test]
fn new_and_removed_interfaces_are_followed_within_a_second() -> Result<()> {
    ensure_root()?;
    let bin = agent_bin()?;
    let mut tb = Testbed::new("mtlink")?;
    let first = tb.add_pod(PodSpec::new("first", "198.18.0.10".parse()?))?;
    let inventory = tb.workdir().join("inventory.yaml");
    write_inventory(&inventory, &[Workload::new("shop", "first", &[&first])])?;
    let agent = Agent::start(
        &tb,
        &bin,
        &inventory,
        &["vp*"],
        &["--attach-side", "host"],
        1,
    )?;
    let attached = |tb: &Testbed| -> Result<f64> {
        Ok(
            metric_value(&agent.metrics(tb)?, "mtls_agent_interfaces_attached", &[])
                .unwrap_or(-1.0),
        )
    };
    assert_eq!(attached(&tb)?, 1.0);
    for (i, name) in ["second", "third"].iter().enumerate() {
        let pod = tb.add_pod(PodSpec::new(name, format!("198.18.0.{}", 20 + i).parse()?))?;
        let created = std::time::Instant::now();
        loop {
            // The agent's own view, and the kernel's: our TCX programs on the new veth.
            let progs = tcx_programs(&tb, TCX_QUERY, tb.node_netns(), &pod.host_if)?;
            if attached(&tb)? == (i + 2) as f64
                && progs
                    == (
                        vec!["mtls_ingress".to_owned()],
                        vec!["mtls_egress".to_owned()],
                    )
            {
                break;
            }
            assert!(
                created.elapsed() < Duration::from_secs(1),
                "{} not attached within 1s: {progs:?}",
                pod.host_if
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    // Removing a pod's veth is noticed too.
    tb.run(tb.node_netns(), &["ip", "link", "del", "vpsecond"])?;
    let deadline = std::time::Instant::now() + Duration::from_secs(1);
    while attached(&tb)? != 2.0 {
        assert!(
            std::time::Instant::now() < deadline,
            "removal not noticed within 1s"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let status = agent.stop()?;
    assert!(status.success());
    tb.destroy()?;
    Ok(())
}

/// Issue 12 in inventory mode: `policy` writes exactly the PeerAuthentications the traffic
/// proves safe, and `report --assume-policy --check` judges them and a namespace-wide STRICT.
#[test]
fn policy_from_traffic_and_what_if_in_inventory_mode() -> Result<()> {
    ensure_root()?;
    let bin = agent_bin()?;
    let node = PolicyNode::new("mtpol")?;
    let tb = &node.tb;
    let inventory = tb.workdir().join("inventory.yaml");
    write_inventory(&inventory, &node.workloads())?;
    let agent = Agent::start(tb, &bin, &inventory, &["vp*"], &[], tb.pods().len())?;
    node.send_traffic()?;
    agent.settle(tb, Duration::from_secs(15))?;
    let url = agent.url();
    node.check_policy(&agent, &["--agent", &url])?;
    agent.stop()?;
    node.destroy()?;
    Ok(())
}
