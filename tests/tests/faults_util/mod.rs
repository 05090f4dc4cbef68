//! Helpers shared by the fault, soak and security tests (issue 7): process figures (fds, RSS),
//! what the kernel has attached in the node namespace, timed scrapes, and log checks.
#![allow(dead_code)]

use std::{
    collections::BTreeMap,
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use mtls_agent_testbed::{
    rtnl::{Redirect, Redirector},
    *,
};
use serde_json::Value;

/// The two-pod bed most fault tests use: `server` (shop/web, 198.18.0.10, with a sidecar) and
/// `client` (legacy/batch, 198.18.0.20, without), and the inventory that says so.
pub fn two_pod_bed(family: &str) -> Result<(Testbed, Pod, Pod, std::path::PathBuf)> {
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

/// Runs BURST_CLIENT_PY in `ns`: `n` connections to `to`, `threads` at a time, each sending
/// `data`; returns how many completed.
pub fn burst(
    tb: &Testbed,
    ns: &str,
    to: std::net::SocketAddr,
    n: usize,
    threads: usize,
    data: &[u8],
) -> Result<usize> {
    burst_until(tb, ns, to, n, threads, data, None)
}

/// [`burst`]; with `until`, each client closes as soon as the answer ends with those bytes,
/// while the server closes too: the two FINs cross.
pub fn burst_until(
    tb: &Testbed,
    ns: &str,
    to: std::net::SocketAddr,
    n: usize,
    threads: usize,
    data: &[u8],
    until: Option<&[u8]>,
) -> Result<usize> {
    let (ip, port, n, threads, data) = (
        to.ip().to_string(),
        to.port().to_string(),
        n.to_string(),
        threads.to_string(),
        hex(data),
    );
    let until = until.map(hex);
    let mut args = vec![
        "python3",
        "-c",
        BURST_CLIENT_PY,
        &ip,
        &port,
        &n,
        &threads,
        &data,
    ];
    args.extend(until.as_deref());
    let out = tb.run_timeout(ns, &args, Duration::from_secs(300))?;
    Ok(String::from_utf8_lossy(&out.stdout).trim().parse()?)
}

/// Open file descriptors of a process.
pub fn fd_count(pid: u32) -> Result<usize> {
    Ok(std::fs::read_dir(format!("/proc/{pid}/fd"))
        .with_context(|| format!("/proc/{pid}/fd"))?
        .count())
}

/// Resident set size of a process, in KiB.
pub fn rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmRSS")
}

/// `kill -9` of the agent, then waits until it is gone (reaped by its Proc later).
pub fn kill9(agent: &Agent) -> Result<()> {
    let pid = agent.proc().pid() as i32;
    // SAFETY: plain syscall on a process this test started.
    let rc = unsafe { libc::kill(pid, libc::SIGKILL) };
    anyhow::ensure!(rc == 0, "kill -9 {pid} failed");
    let deadline = Instant::now() + Duration::from_secs(5);
    while agent.proc().is_running() {
        if Instant::now() > deadline {
            bail!("agent {pid} still running 5 s after SIGKILL");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

/// `bpftool -j net show` in the node namespace.
pub fn net_show(tb: &Testbed) -> Result<Value> {
    let out = tb.run(tb.node_netns(), &["bpftool", "-j", "net", "show"])?;
    Ok(serde_json::from_slice(&out.stdout)?)
}

/// Every TC/TCX/XDP attachment in the node namespace: (device, kind, program name, program id).
pub fn attachments(tb: &Testbed) -> Result<Vec<(String, String, String, u64)>> {
    let net = net_show(tb)?;
    let mut out = Vec::new();
    for o in net.as_array().into_iter().flatten() {
        for k in ["tc", "tcx", "xdp"] {
            for a in o[k].as_array().into_iter().flatten() {
                out.push((
                    a["devname"].as_str().unwrap_or("").to_owned(),
                    a["kind"]
                        .as_str()
                        .map(str::to_owned)
                        .unwrap_or_else(|| k.to_owned()),
                    a["name"].as_str().unwrap_or("").to_owned(),
                    a["prog_id"]
                        .as_u64()
                        .or_else(|| a["id"].as_u64())
                        .unwrap_or(0),
                ));
            }
        }
    }
    Ok(out)
}

/// Ids of every BPF program loaded on the machine (`bpftool -j prog show`).
pub fn loaded_prog_ids() -> Result<Vec<u64>> {
    let out = std::process::Command::new("bpftool")
        .args(["-j", "prog", "show"])
        .output()?;
    anyhow::ensure!(out.status.success(), "bpftool prog show failed");
    let v: Value = serde_json::from_slice(&out.stdout)?;
    Ok(v.as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| p["id"].as_u64())
        .collect())
}

/// Ids of every BPF link on the machine (`bpftool -j link show`; TCX links are type 11, which
/// this bpftool does not name, and `bpftool net show` does not list them at all).
pub fn loaded_link_ids() -> Result<Vec<u64>> {
    let out = std::process::Command::new("bpftool")
        .args(["-j", "link", "show"])
        .output()?;
    anyhow::ensure!(out.status.success(), "bpftool link show failed");
    let v: Value = serde_json::from_slice(&out.stdout)?;
    Ok(v.as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| p["id"].as_u64())
        .collect())
}

/// BPF objects a process holds, from /proc/PID/fdinfo: (program ids, (link id, link type,
/// ifindex) of each link, map ids).
#[derive(Debug, Default)]
pub struct BpfObjects {
    pub progs: Vec<u64>,
    pub links: Vec<(u64, String, u64)>,
    pub maps: Vec<u64>,
}

pub fn bpf_objects(pid: u32) -> Result<BpfObjects> {
    let mut out = BpfObjects::default();
    for e in std::fs::read_dir(format!("/proc/{pid}/fdinfo"))? {
        let Ok(text) = std::fs::read_to_string(e?.path()) else {
            continue;
        };
        let field = |k: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(k))
                .map(|v| v.trim().to_owned())
        };
        let num = |k: &str| field(k).and_then(|v| v.parse::<u64>().ok());
        if let Some(id) = num("link_id:") {
            out.links.push((
                id,
                field("link_type:").unwrap_or_default(),
                num("ifindex:").unwrap_or(0),
            ));
        } else if let Some(id) = num("map_id:") {
            out.maps.push(id);
        } else if field("prog_type:").is_some()
            && let Some(id) = num("prog_id:")
        {
            out.progs.push(id);
        }
    }
    out.progs.sort();
    out.progs.dedup();
    Ok(out)
}

/// `tc filter show dev DEV DIR` in the node namespace.
pub fn tc_filters(tb: &Testbed, dev: &str, dir: &str) -> Result<String> {
    let out = tb.run(tb.node_netns(), &["tc", "filter", "show", "dev", dev, dir])?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Filters of ours (`bpf ... name mtls_ingress|mtls_egress`) in a `tc filter show` text.
pub fn our_filters(text: &str) -> usize {
    text.lines()
        .filter(|l| {
            l.contains(" bpf ") && (l.contains("mtls_ingress") || l.contains("mtls_egress"))
        })
        .count()
}

/// GET /metrics once from the node namespace; returns the body and curl's own total time.
pub fn scrape_timed(tb: &Testbed, agent: &Agent) -> Result<(String, Duration)> {
    let dir = tempfile::tempdir()?;
    let body = dir.path().join("m");
    let out = tb.output(
        tb.node_netns(),
        &[
            "curl",
            "-sS",
            "--fail",
            "--noproxy",
            "*",
            "--max-time",
            "5",
            "-o",
            body.to_str().context("utf-8")?,
            "-w",
            "%{time_total}",
            &format!("{}/metrics", agent.url()),
        ],
        None,
        Duration::from_secs(8),
    )?;
    if !out.status.success() {
        bail!(
            "GET /metrics failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let secs: f64 = String::from_utf8_lossy(&out.stdout).trim().parse()?;
    Ok((
        std::fs::read_to_string(&body)?,
        Duration::from_secs_f64(secs),
    ))
}

/// Lines of the agent's stderr at WARN or ERROR level.
pub fn warn_error_lines(stderr: &str) -> Vec<String> {
    stderr
        .lines()
        .filter(|l| l.contains(" WARN ") || l.contains(" ERROR "))
        .map(str::to_owned)
        .collect()
}

/// Every sample of every counter family (`# TYPE x counter`), keyed by the full series text.
pub fn counters(text: &str) -> BTreeMap<String, f64> {
    let mut families = Vec::new();
    for l in text.lines() {
        if let Some(rest) = l.strip_prefix("# TYPE ") {
            let mut it = rest.split_whitespace();
            if let (Some(n), Some("counter")) = (it.next(), it.next()) {
                families.push(n.to_owned());
            }
        }
    }
    let mut out = BTreeMap::new();
    for l in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((series, v)) = l.rsplit_once(' ') else {
            continue;
        };
        let name = series.split('{').next().unwrap_or(series);
        if families.iter().any(|f| f == name)
            && let Ok(v) = v.parse::<f64>()
        {
            out.insert(series.to_owned(), v);
        }
    }
    out
}

/// Writes a file and returns its path as a String.
pub fn write_file(dir: &Path, name: &str, text: &str) -> Result<String> {
    let p = dir.join(name);
    std::fs::write(&p, text)?;
    Ok(p.to_str().context("utf-8")?.to_owned())
}

/// Python: a TCP server that reads until the client is done (or 2 s), answers `reply` when
/// non-empty, and closes; threaded, so hundreds of clients can be in flight.
pub const SINK_SERVER_PY: &str = r#"
import socket, sys, threading
port, reply = int(sys.argv[1]), bytes.fromhex(sys.argv[2])
s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", port)); s.listen(4096)
def serve(c):
    try:
        c.settimeout(2)
        try:
            while c.recv(65536):
                if reply: c.sendall(reply); break
        except Exception: pass
    finally:
        c.close()
while True:
    c, _ = s.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"#;

/// Python: `N` connections to HOST:PORT, `THREADS` at a time, each sending the hex payload,
/// half-closing and reading until the server closes. With a sixth argument (hex), each reads
/// until its answer ends with those bytes and closes at once instead, without waiting for the
/// server's FIN: a server that closes after answering and the client then close together.
/// Prints how many completed.
pub const BURST_CLIENT_PY: &str = r#"
import socket, sys, threading
host, port, n, threads, data = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), bytes.fromhex(sys.argv[5])
until = bytes.fromhex(sys.argv[6]) if len(sys.argv) > 6 else None
lock = threading.Lock(); left = [n]; ok = [0]
def worker():
    while True:
        with lock:
            if left[0] == 0: return
            left[0] -= 1
        try:
            c = socket.create_connection((host, port), timeout=5)
            if data: c.sendall(data)
            if until is None:
                c.shutdown(socket.SHUT_WR)
                while c.recv(65536): pass
            else:
                buf = b""
                while not buf.endswith(until):
                    d = c.recv(65536)
                    if not d: raise EOFError
                    buf += d
            c.close()
            with lock: ok[0] += 1
        except Exception as e:
            pass
ts = [threading.Thread(target=worker) for _ in range(threads)]
[t.start() for t in ts]; [t.join() for t in ts]
print(ok[0])
"#;

pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Sum of `mtls_agent_connections_total` for one workload, direction and security.
pub fn conns(m: &str, ns: &str, wl: &str, dir: &str, sec: &str) -> f64 {
    metric_value(
        m,
        "mtls_agent_connections_total",
        &[
            ("namespace", ns),
            ("workload", wl),
            ("direction", dir),
            ("security", sec),
        ],
    )
    .unwrap_or(0.0)
}

/// Where the redirector sits.
#[derive(Clone, Copy)]
pub enum Hook {
    Tcx,
    /// A direct-action clsact filter at priority 1.
    Clsact,
}

/// Two pods ([`two_pod_bed`]) whose host veths are off the bridge, joined only by a Cilium-like
/// redirector on both host veths' ingress, attached before any agent starts (issue 19). With
/// [`Redirect::Peer`] (`bpf_redirect_peer`) no host-side egress hook sees a packet, so a hook on
/// one pod's host veth sees only what that pod sends. Returns the bed, server, client, inventory
/// and the redirector (keep it alive).
pub fn redirected_bed(
    family: &str,
    how: Redirect,
    hook: Hook,
) -> Result<(Testbed, Pod, Pod, std::path::PathBuf, Redirector)> {
    let (tb, server, client, inv) = two_pod_bed(family)?;
    let node = tb.node_netns().to_owned();
    for p in [&server, &client] {
        tb.run(&node, &["ip", "link", "set", &p.host_if, "nomaster"])?;
    }
    let pairs = [
        (client.host_if.as_str(), server.host_if.as_str()),
        (server.host_if.as_str(), client.host_if.as_str()),
    ];
    let r = match hook {
        Hook::Tcx => Redirector::tcx(&node, &pairs, how)?,
        Hook::Clsact => {
            for p in [&server, &client] {
                tb.run(&node, &["tc", "qdisc", "add", "dev", &p.host_if, "clsact"])?;
            }
            Redirector::clsact(&node, &pairs, how, 1)?
        }
    };
    Ok((tb, server, client, inv, r))
}
