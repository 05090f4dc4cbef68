//! Issue 17: with default flags the agent finds every pod's interface by what it is (a veth or
//! netkit whose peer is in another network namespace), whatever the CNI named it, and nothing
//! else; in Kubernetes mode it names the pods of its node it never saw. Needs root; fails
//! (never skips) without it.
use std::time::{Duration, Instant};

use anyhow::{Result, ensure};
use mtls_agent_testbed::{scenario::ReferenceNode, *};

mod faults_util;
use faults_util::*;

const TCX_QUERY: &str = env!("CARGO_BIN_EXE_tcx-query");

/// Both of our programs (and only ours) on `iface`.
fn ours(tb: &Testbed, iface: &str) -> Result<bool> {
    let (i, e) = tcx_programs(tb, TCX_QUERY, tb.node_netns(), iface)?;
    Ok(i == ["mtls_ingress"] && e == ["mtls_egress"])
}

/// No TCX program at all on `iface`.
fn untouched(tb: &Testbed, iface: &str) -> Result<bool> {
    let (i, e) = tcx_programs(tb, TCX_QUERY, tb.node_netns(), iface)?;
    Ok(i.is_empty() && e.is_empty())
}

/// Waits until `n` plaintext connections to shop/web were counted.
fn wait_plaintext(tb: &Testbed, agent: &Agent, n: f64) -> Result<String> {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let m = agent.metrics(tb)?;
        if conns(&m, "shop", "web", "inbound", "plaintext") >= n {
            return agent.settle(tb, Duration::from_secs(10));
        }
        ensure!(Instant::now() < deadline, "not classified: {m}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn default_flags_find_pod_interfaces_of_any_name_and_nothing_else() -> Result<()> {
    ensure_root()?;
    let bin = agent_bin()?;
    let mut tb = Testbed::new("mtdisc")?;
    // OVN-Kubernetes: containerID[:15]; Antrea: pod name prefix + hash; Calico: cali + hash.
    let web = tb.add_pod(PodSpec::new("web", "198.18.0.10".parse()?).host_if("3f2a9c1b0d4e5f6"))?;
    let batch =
        tb.add_pod(PodSpec::new("batch", "198.18.0.20".parse()?).host_if("batch-6b8f4c"))?;
    let api = tb.add_pod(PodSpec::new("api", "198.18.0.30".parse()?).host_if("cali1a2b3c4d5e6"))?;
    // Not pods: a veth pair with both ends here (hostNetwork plumbing), an "uplink" (this
    // kernel has no dummy driver: a macvlan, and lo, which has no link kind like a NIC), a
    // VXLAN tunnel, and the bridge.
    let node = tb.node_netns().to_owned();
    let decoys = ["hostv0", "hostv1", "eth1", "vxl0", "lo", BRIDGE];
    tb.run(
        &node,
        &[
            "sh",
            "-c",
            "ip link add hostv0 type veth peer name hostv1 && \
             ip link add eth1 link hostv0 type macvlan mode bridge && \
             ip link add vxl0 type vxlan id 42 dstport 4789 local 198.18.0.1 && \
             for l in hostv0 hostv1 eth1 vxl0; do ip link set $l up; done",
        ],
    )?;
    let inv = tb.workdir().join("inventory.yaml");
    write_inventory(
        &inv,
        &[
            Workload::new("shop", "web", &[&web]),
            Workload::new("legacy", "batch", &[&batch]).without_sidecar(),
            Workload::new("shop", "api", &[&api]),
        ],
    )?;
    let _http = http_server(&tb, &web.netns, 8080, false)?;
    // No --interface at all: the defaults.
    let agent = Agent::start(&tb, &bin, &inv, &[], &["--attach-side", "host"], 3)?;
    for pod in [&web, &batch, &api] {
        assert!(ours(&tb, &pod.host_if)?, "{} not attached", pod.host_if);
    }
    for d in decoys {
        assert!(untouched(&tb, d)?, "{d} must not be attached");
    }
    http_get(&tb, &batch.netns, &http_url(web.v4(8080)))?;
    http_get(&tb, &api.netns, &http_url(web.v4(8080)))?;
    let m = wait_plaintext(&tb, &agent, 2.0)?;
    assert_eq!(conns(&m, "shop", "web", "inbound", "plaintext"), 2.0, "{m}");
    assert_eq!(
        conns(&m, "legacy", "batch", "outbound", "plaintext"),
        1.0,
        "{m}"
    );
    assert_eq!(
        conns(&m, "shop", "api", "outbound", "plaintext"),
        1.0,
        "{m}"
    );
    assert_eq!(
        metric_value(&m, "mtls_agent_interfaces_attached", &[]),
        Some(3.0)
    );

    // A pod that arrives later, under yet another naming scheme, is followed within a second.
    let late =
        tb.add_pod(PodSpec::new("late", "198.18.0.40".parse()?).host_if("0123456789abcde"))?;
    let t0 = Instant::now();
    while !ours(&tb, &late.host_if)? {
        ensure!(
            t0.elapsed() < Duration::from_secs(1),
            "late pod not attached within 1 s"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    // A node-local veth pair that arrives later is still left alone.
    tb.run(
        &node,
        &[
            "ip", "link", "add", "hostv2", "type", "veth", "peer", "name", "hostv3",
        ],
    )?;
    std::thread::sleep(Duration::from_millis(1500));
    assert!(untouched(&tb, "hostv2")? && untouched(&tb, "hostv3")?);
    let m = agent.metrics(&tb)?;
    assert_eq!(
        metric_value(&m, "mtls_agent_interfaces_attached", &[]),
        Some(4.0)
    );

    // --interface narrows the discovery; --interface-auto=false restores names only.
    assert!(agent.stop()?.success());
    let narrowed = Agent::start(&tb, &bin, &inv, &["cali*"], &["--attach-side", "host"], 1)?;
    let m = narrowed.metrics(&tb)?;
    assert_eq!(
        metric_value(&m, "mtls_agent_interfaces_attached", &[]),
        Some(1.0)
    );
    assert!(ours(&tb, &api.host_if)? && untouched(&tb, &web.host_if)?);
    assert!(narrowed.stop()?.success());
    let names_only = Agent::start(
        &tb,
        &bin,
        &inv,
        &["hostv*"],
        &["--interface-auto=false", "--attach-side", "host"],
        4,
    )?;
    assert!(ours(&tb, "hostv0")? && untouched(&tb, &web.host_if)?);
    assert!(names_only.stop()?.success());
    tb.destroy()
}

#[test]
fn kubernetes_mode_names_pods_never_seen_on_a_watched_interface() -> Result<()> {
    ensure_root()?;
    let bin = agent_bin()?;
    let node = ReferenceNode::new("mtunseen")?;
    let tb = &node.tb;
    let api_addr: std::net::SocketAddr = "127.0.0.1:6443".parse()?;
    let double = KubeDoubleProc::start(tb, tb.node_netns(), api_addr, &kube_fixtures_dir())?;
    // A pod of this node whose interface the agent cannot see (here: it has none on this node).
    double.apply(
        tb,
        KubeResource::Pods,
        &pod_json(
            "shop",
            "hidden-0",
            Some(("StatefulSet", "hidden")),
            &[("app", "hidden")],
            "hidden",
            "node-a",
            &["198.18.0.99"],
            true,
        ),
    )?;
    let agent = Agent::start_kubernetes(
        tb,
        &bin,
        double.kubeconfig(),
        "node-a",
        &[],
        &["--pod-unseen-after", "3s"],
        tb.pods().len(),
    )?;
    node.send_traffic()?;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let log = agent.proc().stderr();
        if let Some(line) = log
            .lines()
            .rfind(|l| l.contains("pods of this node never seen on a watched interface"))
            && line.contains("shop/hidden-0")
        {
            // Pods with traffic are not named.
            assert!(!line.contains("shop/web-"), "{line}");
            break;
        }
        ensure!(Instant::now() < deadline, "hidden-0 never reported: {log}");
        std::thread::sleep(Duration::from_millis(200));
    }
    let m = agent.metrics(tb)?;
    assert!(
        metric_value(&m, "mtls_agent_pods_unseen", &[]).is_some_and(|v| v >= 1.0),
        "{m}"
    );
    // The traffic above made it through: web was seen.
    assert!(
        conns(&m, "shop", "web", "inbound", "mtls")
            + conns(&m, "shop", "web", "inbound", "plaintext")
            > 0.0,
        "{m}"
    );
    assert!(agent.stop()?.success());
    Ok(())
}

/// Issue 19: `--attach-side auto` attaches on a pod's end when it finds the pod's namespace, and
/// on the host side where it cannot (here a namespace that only an open fd of this test keeps
/// alive: no bind mount, no process), saying so in the log and the metric; `--attach-side pod`
/// refuses such an interface instead.
#[test]
fn attach_side_falls_back_to_the_host_where_the_pods_namespace_is_not_found() -> Result<()> {
    ensure_root()?;
    let bin = agent_bin()?;
    let mut tb = Testbed::new("mtside")?;
    let web = tb.add_pod(PodSpec::new("web", "198.18.0.10".parse()?))?;
    let inv = tb.workdir().join("inventory.yaml");
    write_inventory(&inv, &[Workload::new("shop", "web", &[&web])])?;
    let hidden = format!("{}-hidden", tb.prefix());
    let node = tb.node_netns().to_owned();
    let ip = |args: &[&str]| -> Result<()> {
        let st = std::process::Command::new("ip").args(args).status()?;
        ensure!(st.success(), "ip {args:?}: {st}");
        Ok(())
    };
    ip(&["netns", "add", &hidden])?;
    let held = (|| -> Result<std::fs::File> {
        ip(&[
            "-n", &hidden, "link", "add", "eth0", "type", "veth", "peer", "name", "vphidden",
            "netns", &node,
        ])?;
        ip(&["-n", &node, "link", "set", "vphidden", "up"])?;
        Ok(std::fs::File::open(format!("/run/netns/{hidden}"))?)
    })();
    // The name goes whatever happened; the namespace lives on through `held` only.
    ip(&["netns", "del", &hidden])?;
    let held = held?;

    let agent = Agent::start(&tb, &bin, &inv, &["vp*"], &[], 2)?;
    let m = agent.metrics(&tb)?;
    let side =
        |m: &str, s: &str| metric_value(m, "mtls_agent_interfaces_attached_side", &[("side", s)]);
    assert_eq!(side(&m, "pod"), Some(1.0), "{m}");
    assert_eq!(side(&m, "host"), Some(1.0), "{m}");
    let log = agent.proc().stderr();
    assert!(
        log.lines()
            .any(|l| l.contains("namespace was not found") && l.contains("vphidden")),
        "{log}"
    );
    assert!(
        log.lines().any(|l| l.contains("attached")
            && l.contains("interface=vphidden")
            && l.contains("side=\"host\"")),
        "{log}"
    );
    let (i, e) = tcx_programs(&tb, TCX_QUERY, &node, "vphidden")?;
    assert_eq!(
        (i, e),
        (
            vec!["mtls_ingress".to_owned()],
            vec!["mtls_egress".to_owned()]
        )
    );
    assert!(agent.stop()?.success());

    let agent = Agent::start(&tb, &bin, &inv, &["vp*"], &["--attach-side", "pod"], 1)?;
    let m = agent.metrics(&tb)?;
    assert_eq!(side(&m, "pod"), Some(1.0), "{m}");
    assert_eq!(side(&m, "host"), Some(0.0), "{m}");
    let log = agent.proc().stderr();
    assert!(
        log.lines().any(|l| l.contains("attach failed")
            && l.contains("vphidden")
            && l.contains("--attach-side pod")),
        "{log}"
    );
    assert!(untouched(&tb, "vphidden")?);
    assert!(agent.stop()?.success());
    tb.run(&node, &["ip", "link", "del", "vphidden"])?;
    drop(held);
    tb.destroy()
}
