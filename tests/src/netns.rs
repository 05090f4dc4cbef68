//! The simulated Kubernetes node: one "node" network namespace with a bridge, and one namespace
//! per pod joined to it by a veth pair, like a CNI plugin would do.
//!
//! The agent under test runs in the node namespace and attaches to the host-side veths (`vp*`),
//! exactly where it attaches on a real node. Nothing here touches the machine's own interfaces:
//! every link is created inside namespaces this code created, and only documentation/benchmark
//! address ranges (198.18.0.0/15, 2001:db8::/32) are used.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail, ensure};

use crate::proc::{self, DEFAULT_TIMEOUT, Proc};

/// Name of the bridge inside the node namespace (the "cni0" of this node).
pub const BRIDGE: &str = "mtbr0";
/// The node's IPv4 address on the bridge: pods' default gateway and the source address of
/// node-originated traffic such as kubelet probes.
pub const NODE_IPV4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
/// The node's IPv6 address on the bridge (gateway and probe source, like [`NODE_IPV4`]).
pub const NODE_IPV6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1);
/// Prefix length of the pod IPv4 subnet (198.18.0.0/24).
pub const IPV4_PREFIX_LEN: u8 = 24;
/// Prefix length of the pod IPv6 subnet (2001:db8::/64).
pub const IPV6_PREFIX_LEN: u8 = 64;
/// Fixed bridge MAC: a Linux bridge otherwise takes the lowest port MAC, which changes as pods
/// are added and would leave pods with a stale gateway neighbour entry.
const BRIDGE_MAC: &str = "02:00:c6:12:00:01";
/// Start of work directory names under the temp dir, so stale cleanup only ever considers
/// directories this crate made.
const WORKDIR_MARK: &str = "mtls-testbed-";
/// Where `ip netns` keeps its namespace handles.
const NETNS_DIR: &str = "/run/netns";

/// What a pod looks like on the network.
///
/// Addresses must lie in the node's pod subnets (198.18.0.0/24, 2001:db8::/64), because pods
/// reach each other over the bridge as on a real node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodSpec {
    /// Pod name: lower-case letters, digits and '-', used in the namespace and interface names.
    pub name: String,
    /// The pod's IPv4 address (/24 on eth0).
    pub ipv4: Ipv4Addr,
    /// The pod's IPv6 address (/64 on eth0), if the pod is dual-stack.
    pub ipv6: Option<Ipv6Addr>,
    /// MTU of the pod's eth0. A small MTU makes the pod's TCP announce a small MSS, so peers send
    /// it small segments too; combine with `disable_offloads` to make the pod's own sends
    /// MTU-sized (as after a real NIC) instead of one GSO-sized skb.
    pub mtu: Option<u32>,
    /// Turn off TSO/GSO/GRO on the pod's eth0 (and GRO on the host-side veth), so that a large
    /// first flight (a post-quantum ClientHello) crosses the veth as several segments.
    pub disable_offloads: bool,
    /// The host-side interface's name (default `vp<name>`): CNIs name them in their own ways,
    /// e.g. OVN-Kubernetes after the first 15 characters of the container id.
    pub host_if: Option<String>,
    /// What joins the pod to the node.
    pub link: PodLink,
}

/// The device pair between a pod and the node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum PodLink {
    /// A veth pair, as most CNIs make.
    #[default]
    Veth,
    /// A netkit pair (Cilium's alternative, kernel 6.7+), created through rtnetlink: in L2 mode
    /// (Ethernet headers, a bridge port like a veth) or in L3 mode (no Ethernet header; not
    /// bridged, so the pod has no connectivity: for discovery tests only).
    Netkit { l2: bool },
}

impl PodSpec {
    /// A single-stack IPv4 pod with default MTU and offloads.
    pub fn new(name: &str, ipv4: Ipv4Addr) -> Self {
        PodSpec {
            name: name.to_string(),
            ipv4,
            ipv6: None,
            mtu: None,
            disable_offloads: false,
            host_if: None,
            link: PodLink::Veth,
        }
    }

    /// Names the host-side interface (at most 15 characters).
    pub fn host_if(mut self, name: &str) -> Self {
        self.host_if = Some(name.to_owned());
        self
    }

    /// Joins the pod with a netkit pair instead of a veth pair.
    pub fn netkit(mut self, l2: bool) -> Self {
        self.link = PodLink::Netkit { l2 };
        self
    }

    /// Makes the pod dual-stack.
    pub fn ipv6(mut self, ipv6: Ipv6Addr) -> Self {
        self.ipv6 = Some(ipv6);
        self
    }

    /// Sets the MTU of the pod's eth0.
    pub fn mtu(mut self, mtu: u32) -> Self {
        self.mtu = Some(mtu);
        self
    }

    /// Turns off segmentation/receive offloads (see [`PodSpec::disable_offloads`]).
    pub fn disable_offloads(mut self) -> Self {
        self.disable_offloads = true;
        self
    }
}

/// A pod that exists on the test node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pod {
    /// Pod name as given in the [`PodSpec`].
    pub name: String,
    /// The pod's network namespace (run its servers and clients there).
    pub netns: String,
    /// The host-side veth in the node namespace: where the agent attaches for this pod.
    pub host_if: String,
    /// The pod-side interface name (always `eth0`).
    pub pod_if: String,
    /// The pod's IPv4 address.
    pub ipv4: Ipv4Addr,
    /// The pod's IPv6 address, if dual-stack.
    pub ipv6: Option<Ipv6Addr>,
    /// The MTU set on the pod's eth0, if any.
    pub mtu: Option<u32>,
    /// Whether offloads were turned off.
    pub offloads_disabled: bool,
}

impl Pod {
    /// The pod's IPv4 socket address for `port`.
    pub fn v4(&self, port: u16) -> SocketAddr {
        SocketAddr::new(IpAddr::V4(self.ipv4), port)
    }

    /// The pod's IPv6 socket address for `port`; panics on a single-stack pod because that is a
    /// mistake in the test itself.
    pub fn v6(&self, port: u16) -> SocketAddr {
        let ip = self
            .ipv6
            .unwrap_or_else(|| panic!("pod {} has no IPv6 address", self.name));
        SocketAddr::new(IpAddr::V6(ip), port)
    }

    /// All addresses of the pod (for inventory files).
    pub fn addresses(&self) -> Vec<IpAddr> {
        let mut v = vec![IpAddr::V4(self.ipv4)];
        v.extend(self.ipv6.map(IpAddr::V6));
        v
    }
}

/// A simulated Kubernetes node with pods, torn down on drop.
///
/// Namespace names are `<family>-<pid>-<n>-node` and `<family>-<pid>-<n>-<pod>`: the creator's
/// pid lets a later run remove what a crashed run left behind ([`Testbed::cleanup_stale`]) without
/// touching the namespaces of a run that is still going, and `n` keeps several test beds of one
/// process (parallel `#[test]`s) apart.
#[derive(Debug)]
pub struct Testbed {
    family: String,
    prefix: String,
    node_ns: String,
    /// Every namespace created so far, in creation order (node first).
    created: Vec<String>,
    pods: Vec<Pod>,
    workdir: Option<tempfile::TempDir>,
    workdir_path: PathBuf,
    seq: AtomicU64,
}

static BED_SEQ: AtomicU32 = AtomicU32::new(0);

fn valid_label(s: &str, max: usize) -> bool {
    !s.is_empty()
        && s.len() <= max
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// Runs `ip -batch -` (optionally `-n ns`): one process for a list of `ip` commands, so that
/// setting up a pod stays fast on a busy machine.
fn ip_batch(ns: Option<&str>, cmds: &[String]) -> Result<()> {
    let script = cmds.join("\n") + "\n";
    let mut args = vec!["ip"];
    if let Some(ns) = ns {
        args.extend(["-n", ns]);
    }
    args.extend(["-batch", "-"]);
    proc::run_in(None, &args, Some(script.as_bytes()), DEFAULT_TIMEOUT)
        .with_context(|| format!("ip batch script:\n{script}"))?;
    Ok(())
}

/// Writes sysctls inside `ns`. Keys marked optional are skipped when absent (e.g. the
/// `net.bridge.*` keys exist only while br_netfilter is loaded).
fn sysctls(ns: &str, settings: &[(&str, &str, bool)]) -> Result<()> {
    let mut script = String::from("set -e\n");
    for (key, value, optional) in settings {
        let path = format!("/proc/sys/{}", key.replace('.', "/"));
        if *optional {
            script.push_str(&format!(
                "if [ -e {path} ]; then echo {value} > {path}; fi\n"
            ));
        } else {
            script.push_str(&format!("echo {value} > {path}\n"));
        }
    }
    proc::run_in(Some(ns), &["sh", "-c", &script], None, DEFAULT_TIMEOUT)
        .with_context(|| format!("setting sysctls in netns {ns}"))?;
    Ok(())
}

/// Sysctls for every namespace: no duplicate address detection, so IPv6 addresses are usable
/// the moment they are added (DAD would make the first second of every test flaky).
const NO_DAD: [(&str, &str, bool); 2] = [
    ("net.ipv6.conf.all.accept_dad", "0", false),
    ("net.ipv6.conf.default.accept_dad", "0", false),
];

/// Kills every process in `ns` (they can only be ours: the namespace has our name) and deletes
/// the namespace. Retries because a process may fork while we kill.
fn destroy_netns(ns: &str) -> Result<()> {
    for _ in 0..50 {
        let out = proc::output_in(None, &["ip", "netns", "pids", ns], None, DEFAULT_TIMEOUT)?;
        let pids: Vec<i32> = String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .filter(|&p| p > 1 && p != std::process::id() as i32)
            .collect();
        if pids.is_empty() {
            break;
        }
        for pid in pids {
            // SAFETY: plain syscall.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    match proc::run_in(None, &["ip", "netns", "delete", ns], None, DEFAULT_TIMEOUT) {
        // Someone else (a concurrent cleanup of the same stale run) was faster: fine.
        Err(_) if !list_netns()?.iter().any(|n| n == ns) => Ok(()),
        r => r.map(drop),
    }
}

/// Names of all namespaces managed by `ip netns`.
pub fn list_netns() -> Result<Vec<String>> {
    let dir = match std::fs::read_dir(NETNS_DIR) {
        Ok(d) => d,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("reading {NETNS_DIR}")),
    };
    let mut names = Vec::new();
    for entry in dir {
        let entry = entry.with_context(|| format!("reading {NETNS_DIR}"))?;
        names.push(entry.file_name().to_string_lossy().into_owned());
    }
    names.sort();
    Ok(names)
}

/// The creator pid encoded in a test namespace name of `family`, if the name is one of ours.
fn creator_pid(family: &str, name: &str) -> Option<u32> {
    let rest = name.strip_prefix(family)?.strip_prefix('-')?;
    let (pid, rest) = rest.split_once('-')?;
    let (seq, _) = rest.split_once('-')?;
    seq.parse::<u32>().ok()?;
    pid.parse().ok()
}

fn pid_alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

impl Testbed {
    /// Creates the node namespace with its bridge.
    ///
    /// `family` (lower-case letters, digits, '-'; at most 20 chars) names this kind of test bed,
    /// e.g. `"mtt"` for the crate's own tests or `"demo"`; leftovers of crashed runs of the same
    /// family are removed first.
    pub fn new(family: &str) -> Result<Testbed> {
        ensure!(
            valid_label(family, 20),
            "invalid test bed family {family:?}: use 1-20 of [a-z0-9-], not starting/ending with '-'"
        );
        ensure_root()?;
        // Leftovers never clash with the new names (those carry our pid), so a failed cleanup
        // is reported but does not stop the run.
        match Self::cleanup_stale(family) {
            Ok(removed) if !removed.is_empty() => {
                eprintln!("testbed: removed stale namespaces of crashed runs: {removed:?}")
            }
            Ok(_) => {}
            Err(e) => eprintln!("testbed: cleaning up stale namespaces failed: {e:#}"),
        }
        let seq = BED_SEQ.fetch_add(1, Ordering::Relaxed);
        let prefix = format!("{family}-{}-{seq}", std::process::id());
        let workdir = tempfile::Builder::new()
            .prefix(&format!("{WORKDIR_MARK}{prefix}-"))
            .tempdir()
            .context("creating test bed work directory")?;
        let workdir_path = workdir.path().to_path_buf();
        let mut tb = Testbed {
            family: family.to_string(),
            node_ns: format!("{prefix}-node"),
            prefix,
            created: Vec::new(),
            pods: Vec::new(),
            workdir: Some(workdir),
            workdir_path,
            seq: AtomicU64::new(0),
        };
        tb.create_node()
            .with_context(|| format!("creating node namespace {}", tb.node_ns))?;
        Ok(tb)
    }

    fn create_netns(&mut self, name: &str) -> Result<()> {
        proc::run_in(None, &["ip", "netns", "add", name], None, DEFAULT_TIMEOUT)?;
        // Recorded at once so that Drop removes it even if the rest of the setup fails.
        self.created.push(name.to_string());
        Ok(())
    }

    fn create_node(&mut self) -> Result<()> {
        let ns = self.node_ns.clone();
        self.create_netns(&ns)?;
        let mut settings = NO_DAD.to_vec();
        // br_netfilter (if loaded) would push bridged frames through the node's iptables.
        // These knobs are per namespace on current kernels.
        for key in [
            "net.bridge.bridge-nf-call-iptables",
            "net.bridge.bridge-nf-call-ip6tables",
            "net.bridge.bridge-nf-call-arptables",
        ] {
            settings.push((key, "0", true));
        }
        sysctls(&ns, &settings)?;
        ip_batch(
            Some(&ns),
            &[
                "link set lo up".into(),
                format!(
                    "link add {BRIDGE} address {BRIDGE_MAC} type bridge stp_state 0 \
                     forward_delay 0 mcast_snooping 0"
                ),
                format!("addr add {NODE_IPV4}/{IPV4_PREFIX_LEN} dev {BRIDGE}"),
                format!("addr add {NODE_IPV6}/{IPV6_PREFIX_LEN} dev {BRIDGE} nodad"),
                format!("link set {BRIDGE} up"),
            ],
        )?;
        Ok(())
    }

    fn check_spec(&self, spec: &PodSpec) -> Result<()> {
        ensure!(
            valid_label(&spec.name, 40) && spec.name != "node",
            "invalid pod name {:?}: use 1-40 of [a-z0-9-] (not \"node\")",
            spec.name
        );
        ensure!(
            self.pod(&spec.name).is_none(),
            "pod {:?} already exists",
            spec.name
        );
        let o = spec.ipv4.octets();
        ensure!(
            o[..3] == [198, 18, 0] && o[3] != 0 && o[3] != 255 && spec.ipv4 != NODE_IPV4,
            "pod {} IPv4 {} must be a host address in 198.18.0.0/24 other than {NODE_IPV4}",
            spec.name,
            spec.ipv4
        );
        if let Some(v6) = spec.ipv6 {
            ensure!(
                v6.segments()[..4] == [0x2001, 0xdb8, 0, 0]
                    && v6 != NODE_IPV6
                    && !v6.is_unspecified(),
                "pod {} IPv6 {v6} must be in 2001:db8::/64 and differ from {NODE_IPV6}",
                spec.name
            );
        }
        for p in &self.pods {
            ensure!(
                p.ipv4 != spec.ipv4,
                "IPv4 {} already used by pod {}",
                spec.ipv4,
                p.name
            );
            if let (Some(a), Some(b)) = (p.ipv6, spec.ipv6) {
                ensure!(a != b, "IPv6 {b} already used by pod {}", p.name);
            }
        }
        if let Some(mtu) = spec.mtu {
            ensure!(
                (1280..=65535).contains(&mtu),
                "pod {} MTU {mtu} out of 1280..=65535",
                spec.name
            );
        }
        Ok(())
    }

    /// Host-side interface name: `vp<name>` cut to the 15-character limit, made unique.
    fn host_if_name(&self, pod: &str) -> String {
        let base: String = format!("vp{pod}").chars().take(15).collect();
        if !self.pods.iter().any(|p| p.host_if == base) {
            return base;
        }
        (1..)
            .map(|i| {
                let suffix = i.to_string();
                let keep = 15 - suffix.len();
                format!("{}{suffix}", &base[..base.len().min(keep)])
            })
            .find(|n| !self.pods.iter().any(|p| &p.host_if == n))
            .expect("some suffix is free")
    }

    /// Adds a pod: its namespace, a veth pair (pod `eth0`, node `vp<name>` on the bridge),
    /// addresses and default routes via the node. Returns when the pod can talk over IPv4 and
    /// (if configured) IPv6.
    pub fn add_pod(&mut self, spec: PodSpec) -> Result<Pod> {
        self.check_spec(&spec)?;
        if let Some(h) = &spec.host_if {
            ensure!(
                !h.is_empty() && h.len() <= 15 && !self.pods.iter().any(|p| &p.host_if == h),
                "pod {}: host interface name {h:?} must be 1-15 characters and unused",
                spec.name
            );
        }
        let pod = Pod {
            netns: format!("{}-{}", self.prefix, spec.name),
            host_if: spec
                .host_if
                .clone()
                .unwrap_or_else(|| self.host_if_name(&spec.name)),
            pod_if: "eth0".into(),
            name: spec.name.clone(),
            ipv4: spec.ipv4,
            ipv6: spec.ipv6,
            mtu: spec.mtu,
            offloads_disabled: spec.disable_offloads,
        };
        self.setup_pod(&pod, spec.link)
            .with_context(|| format!("creating pod {}", pod.name))?;
        self.pods.push(pod.clone());
        Ok(pod)
    }

    fn setup_pod(&mut self, pod: &Pod, link: PodLink) -> Result<()> {
        let (ns, node, hif) = (
            pod.netns.as_str(),
            self.node_ns.clone(),
            pod.host_if.as_str(),
        );
        self.create_netns(ns)?;
        sysctls(ns, &NO_DAD)?;
        let mtu = pod.mtu.map(|m| format!(" mtu {m}")).unwrap_or_default();
        let mut cmds = vec!["link set lo up".to_string()];
        match link {
            PodLink::Veth => {
                cmds.push(format!(
                    "link add eth0{mtu} type veth peer name {hif} netns {node}"
                ));
            }
            PodLink::Netkit { l2 } => {
                crate::rtnl::netkit_add(&node, hif, ns, l2)?;
                if !mtu.is_empty() {
                    cmds.push(format!("link set eth0{mtu}"));
                }
            }
        }
        cmds.push(format!("addr add {}/{IPV4_PREFIX_LEN} dev eth0", pod.ipv4));
        if let Some(v6) = pod.ipv6 {
            cmds.push(format!("addr add {v6}/{IPV6_PREFIX_LEN} dev eth0 nodad"));
        }
        cmds.push("link set eth0 up".into());
        cmds.push(format!("route add default via {NODE_IPV4} dev eth0"));
        if pod.ipv6.is_some() {
            cmds.push(format!("route add default via {NODE_IPV6} dev eth0"));
        }
        ip_batch(Some(ns), &cmds)?;
        if link == (PodLink::Netkit { l2: false }) {
            // No Ethernet header: not a bridge port. Up, and that is all.
            return ip_batch(Some(&node), &[format!("link set {hif} up")]);
        }
        ip_batch(Some(&node), &[format!("link set {hif} master {BRIDGE} up")])?;
        if pod.offloads_disabled {
            proc::run_in(
                Some(ns),
                &[
                    "ethtool", "-K", "eth0", "tso", "off", "gso", "off", "gro", "off",
                ],
                None,
                DEFAULT_TIMEOUT,
            )
            .context("turning off offloads (is ethtool installed?)")?;
            proc::run_in(
                Some(&node),
                &["ethtool", "-K", hif, "gro", "off"],
                None,
                DEFAULT_TIMEOUT,
            )?;
        }
        self.wait_pod_ready(pod)
    }

    /// Polls until the veth has carrier, the bridge port forwards and no address is tentative.
    fn wait_pod_ready(&self, pod: &Pod) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let link = proc::run_in(
                Some(&pod.netns),
                &["ip", "-br", "link", "show", "dev", "eth0"],
                None,
                DEFAULT_TIMEOUT,
            )?;
            let link_up = String::from_utf8_lossy(&link.stdout).contains(" UP ");
            let port = proc::run_in(
                Some(&self.node_ns),
                &["bridge", "link", "show", "dev", &pod.host_if],
                None,
                DEFAULT_TIMEOUT,
            )?;
            let forwarding = String::from_utf8_lossy(&port.stdout).contains("state forwarding");
            let tentative = proc::run_in(
                Some(&pod.netns),
                &["ip", "-6", "addr", "show", "dev", "eth0", "tentative"],
                None,
                DEFAULT_TIMEOUT,
            )?;
            let settled = tentative.stdout.iter().all(|b| b.is_ascii_whitespace());
            if link_up && forwarding && settled {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!(
                    "pod {} not ready after 10s: eth0 up={link_up}, bridge port forwarding=\
                     {forwarding}, IPv6 settled={settled}",
                    pod.name
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Removes namespaces of `family` whose creator process is gone (a run that crashed or was
    /// killed before its Drop ran), killing whatever still runs in them. Namespaces of live
    /// runs, other families and anything not named by this crate are left alone. Their work
    /// directories under the temp dir go too. Returns the names removed.
    pub fn cleanup_stale(family: &str) -> Result<Vec<String>> {
        let mut removed = Vec::new();
        let mut names = list_netns()?;
        // Pods before their node, so that no veth peer outlives its bridge for long.
        names.sort_by_key(|n| n.ends_with("-node"));
        for name in names {
            let Some(pid) = creator_pid(family, &name) else {
                continue;
            };
            if pid_alive(pid) {
                continue;
            }
            destroy_netns(&name).with_context(|| format!("removing stale netns {name}"))?;
            removed.push(name);
        }
        // Work directories (logs, PKI) of dead runs, named like their namespaces.
        let tmp = std::env::temp_dir();
        if let Ok(entries) = std::fs::read_dir(&tmp) {
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                let Some(pid) = name
                    .strip_prefix(WORKDIR_MARK)
                    .and_then(|n| creator_pid(family, n))
                else {
                    continue;
                };
                if pid_alive(pid) || !entry.file_type().is_ok_and(|t| t.is_dir()) {
                    continue;
                }
                let path = entry.path();
                match std::fs::remove_dir_all(&path) {
                    Ok(()) => removed.push(path.display().to_string()),
                    // A concurrent cleanup got there first.
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => {
                        return Err(e).with_context(|| {
                            format!("removing stale work directory {}", path.display())
                        });
                    }
                }
            }
        }
        Ok(removed)
    }

    /// The family this bed was created with.
    pub fn family(&self) -> &str {
        &self.family
    }

    /// Common prefix of all namespace names of this bed (`<family>-<pid>-<n>`).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The node namespace: run the agent here (it sees the `vp*` veths and the bridge), and
    /// node-originated traffic such as kubelet-style probes.
    pub fn node_netns(&self) -> &str {
        &self.node_ns
    }

    /// The node's IPv4 address on the bridge (source of probes from the node).
    pub fn node_ipv4(&self) -> Ipv4Addr {
        NODE_IPV4
    }

    /// The node's IPv6 address on the bridge.
    pub fn node_ipv6(&self) -> Ipv6Addr {
        NODE_IPV6
    }

    /// The pods added so far, in order.
    pub fn pods(&self) -> &[Pod] {
        &self.pods
    }

    /// A pod by name.
    pub fn pod(&self, name: &str) -> Option<&Pod> {
        self.pods.iter().find(|p| p.name == name)
    }

    /// Every namespace this bed created (node first).
    pub fn namespaces(&self) -> &[String] {
        &self.created
    }

    /// A private scratch directory removed with the bed: process logs, PKI, configs. Set
    /// `MTLS_TESTBED_KEEP=1` to keep it for post-mortem reading (its path is then printed).
    pub fn workdir(&self) -> &Path {
        &self.workdir_path
    }

    /// Directory of the process logs.
    pub fn log_dir(&self) -> PathBuf {
        self.workdir_path.join("logs")
    }

    /// A fresh sub-directory of the work directory (for configs of one server instance).
    pub fn scratch_dir(&self, what: &str) -> Result<PathBuf> {
        let n = self.seq.fetch_add(1, Ordering::Relaxed);
        let dir = self.workdir_path.join(format!("{what}-{n}"));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(dir)
    }

    fn check_ns(&self, ns: &str) -> Result<()> {
        if self.created.iter().any(|n| n == ns) {
            Ok(())
        } else {
            Err(anyhow!(
                "{ns:?} is not a namespace of this test bed ({:?})",
                self.created
            ))
        }
    }

    /// Starts a long-running process in one of this bed's namespaces (see [`Proc`]).
    pub fn spawn(&self, ns: &str, args: &[&str]) -> Result<Proc> {
        self.spawn_env(ns, args, &[])
    }

    /// [`Testbed::spawn`] with extra environment variables (e.g. `RUST_LOG` for the agent).
    pub fn spawn_env(&self, ns: &str, args: &[&str], env: &[(&str, &str)]) -> Result<Proc> {
        self.check_ns(ns)?;
        proc::spawn_in(ns, args, env, &self.log_dir())
    }

    /// Runs a command to completion in a namespace of this bed with the default timeout (30 s);
    /// a non-zero exit is an error quoting stderr.
    pub fn run(&self, ns: &str, args: &[&str]) -> Result<Output> {
        self.run_timeout(ns, args, DEFAULT_TIMEOUT)
    }

    /// [`Testbed::run`] with an explicit time limit.
    pub fn run_timeout(&self, ns: &str, args: &[&str], timeout: Duration) -> Result<Output> {
        self.check_ns(ns)?;
        proc::run_in(Some(ns), args, None, timeout)
    }

    /// Runs a command with `stdin` as its input and returns its output whatever its exit status
    /// (for callers that inspect failures, e.g. a client expected to be rejected).
    pub fn output(
        &self,
        ns: &str,
        args: &[&str],
        stdin: Option<&[u8]>,
        timeout: Duration,
    ) -> Result<Output> {
        self.check_ns(ns)?;
        proc::output_in(Some(ns), args, stdin, timeout)
    }

    /// Waits until something in `ns` listens on `addr` (see [`proc::wait_tcp_listening`]).
    pub fn wait_tcp_listening(&self, ns: &str, addr: SocketAddr, timeout: Duration) -> Result<()> {
        self.check_ns(ns)?;
        proc::wait_tcp_listening(ns, addr, timeout)
    }

    /// Tears the bed down now and reports failures, instead of only logging them from Drop.
    pub fn destroy(mut self) -> Result<()> {
        self.teardown()
    }

    fn teardown(&mut self) -> Result<()> {
        let mut errors = Vec::new();
        // Pods first, node last.
        while let Some(ns) = self.created.pop() {
            if let Err(e) = destroy_netns(&ns) {
                errors.push(format!("{ns}: {e:#}"));
            }
        }
        let keep = std::env::var_os("MTLS_TESTBED_KEEP").is_some_and(|v| v != "0");
        match self.workdir.take() {
            Some(dir) if keep => {
                eprintln!("testbed: kept work directory {}", dir.keep().display());
            }
            dir => drop(dir), // removes it
        }
        if errors.is_empty() {
            Ok(())
        } else {
            bail!("test bed teardown failed: {}", errors.join("; "))
        }
    }
}

impl Drop for Testbed {
    fn drop(&mut self) {
        if let Err(e) = self.teardown() {
            eprintln!("testbed: {e:#}");
        }
    }
}

/// Fails unless running as root: the test bed needs CAP_NET_ADMIN and CAP_SYS_ADMIN, and tests
/// must fail loudly rather than pass by skipping.
pub fn ensure_root() -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    ensure!(
        euid == 0,
        "the test bed needs root (network namespaces), running as uid {euid}"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn creator_pid_parsing() {
        assert_eq!(creator_pid("mtt", "mtt-123-0-node"), Some(123));
        assert_eq!(creator_pid("mtt", "mtt-123-4-web-1"), Some(123));
        assert_eq!(creator_pid("mtt", "mtt-e2e-123-0-node"), None);
        assert_eq!(creator_pid("mt", "mtt-123-0-node"), None);
        assert_eq!(creator_pid("mtt", "mtt-123"), None);
        assert_eq!(creator_pid("mtt", "other"), None);
    }

    #[test]
    fn labels() {
        assert!(valid_label("web-1", 40));
        assert!(!valid_label("Web", 40));
        assert!(!valid_label("-a", 40));
        assert!(!valid_label("", 40));
        assert!(!valid_label("a_b", 40));
    }
}
