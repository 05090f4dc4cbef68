//! The clsact reaper: on the clsact path, a small child process removes this agent's filters
//! when the agent dies, even when it is `kill -9`ed.
//!
//! Why a process: clsact filters are netlink objects that hold a reference to the program and
//! outlive the process that attached them (TCX links, the default on 6.6+, die with their last
//! fd instead). A killed agent cannot run cleanup code, so the agent starts this helper (the
//! same binary, hidden subcommand `clsact-reaper`) with the ids of its two programs and keeps
//! the write end of a pipe to its stdin. The kernel closes that pipe whenever the agent dies,
//! for whatever reason; the reaper then deletes exactly the filters whose program id is one of
//! those (never another process's, even one with the same program names), removes the clsact
//! qdiscs the agent created if nothing else is on them, and exits.
//!
//! Pod-side filters (`--attach-side`, see podns.rs) live in the pods' namespaces: the agent
//! names each namespace (`netns PATH`) before it attaches there, and the reaper sweeps those
//! too (a namespace gone meanwhile took its filters with it).
//!
//! What it cannot cover: a reaper killed together with the agent (a container kill takes the
//! whole PID namespace). The next agent to start removes filters by our program names before it
//! attaches (`attach::remove_stale_filters`), so the cost lasts until the DaemonSet restarts it.
use std::{
    collections::{BTreeMap, BTreeSet},
    io::{BufRead as _, Write as _},
    path::Path,
    process::{Child, ChildStdin, Command, Stdio},
};

use tracing::{debug, info, warn};

use super::{
    attach::list_interfaces,
    podns::PodNs,
    tcnl::{self, Hook},
};

/// The hidden subcommand that runs [`run`].
pub const SUBCOMMAND: &str = "clsact-reaper";

/// The agent's handle on its reaper. Dropping it (clean stop) closes the pipe and waits for the
/// reaper's final sweep, which then finds nothing of ours left.
pub struct Reaper {
    child: Child,
    stdin: Option<ChildStdin>,
}

impl Reaper {
    /// Starts the reaper for the programs with these ids.
    pub fn spawn(prog_ids: &[u32]) -> std::io::Result<Self> {
        // /proc/self/exe: the running binary even if an upgrade replaced the file on disk.
        let mut cmd = Command::new("/proc/self/exe");
        cmd.arg(SUBCOMMAND);
        for id in prog_ids {
            cmd.arg("--prog-id").arg(id.to_string());
        }
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()?;
        let stdin = child.stdin.take();
        debug!(pid = child.id(), ?prog_ids, "clsact reaper started");
        Ok(Self { child, stdin })
    }

    /// Tells the reaper that this agent created the clsact qdisc of `ifindex` (in the pod
    /// namespace at `netns`, else in ours).
    pub fn created_qdisc(&mut self, ifindex: u32, netns: Option<&Path>) {
        match netns {
            Some(p) => self.say(&format!("qdisc {ifindex} {}", p.display())),
            None => self.say(&format!("qdisc {ifindex}")),
        }
    }

    /// Tells the reaper that this agent attaches filters in the namespace at `path`.
    pub fn netns(&mut self, path: &Path) {
        self.say(&format!("netns {}", path.display()));
    }

    fn say(&mut self, line: &str) {
        if let Some(stdin) = &mut self.stdin
            && let Err(e) = writeln!(stdin, "{line}")
        {
            warn!(error = %e, "clsact reaper gone; a killed agent's filters stay until the next start");
        }
    }
}

impl Drop for Reaper {
    fn drop(&mut self) {
        drop(self.stdin.take());
        if let Err(e) = self.child.wait() {
            debug!(error = %e, "waiting for the clsact reaper");
        }
    }
}

/// The reaper process: waits until the agent's end of the pipe closes, then removes the
/// agent's filters (by program id) and the qdiscs it created if they are empty.
pub fn run(prog_ids: &[u32]) -> anyhow::Result<()> {
    // A Ctrl-C or SIGTERM sent to the whole process group must not stop the reaper before the
    // agent is gone; it ends on its own once the pipe closes.
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: setting a signal disposition to SIG_IGN.
        unsafe { libc::signal(sig, libc::SIG_IGN) };
    }
    // Namespace path ("" = ours) -> qdiscs the agent created there.
    let mut spaces: BTreeMap<String, BTreeSet<u32>> =
        BTreeMap::from([(String::new(), BTreeSet::new())]);
    for line in std::io::stdin().lock().lines() {
        let Ok(line) = line else { break };
        if let Some(rest) = line.strip_prefix("qdisc ") {
            let (idx, ns) = rest.split_once(' ').unwrap_or((rest, ""));
            if let Ok(idx) = idx.parse::<u32>() {
                spaces.entry(ns.to_owned()).or_default().insert(idx);
            }
        } else if let Some(ns) = line.strip_prefix("netns ") {
            spaces.entry(ns.to_owned()).or_default();
        }
    }
    let ids: BTreeSet<u32> = prog_ids.iter().copied().collect();
    let (mut removed, mut qdiscs_removed) = (0, 0);
    for (ns, qdiscs) in &spaces {
        let swept = if ns.is_empty() {
            sweep(&ids, qdiscs)
        } else {
            match PodNs::at(Path::new(ns)) {
                Ok(pod) => pod
                    .run(|| sweep(&ids, qdiscs))
                    .unwrap_or_else(|e| Err(e.into())),
                // Gone with the pod, and its filters with it.
                Err(_) => Ok((0, 0)),
            }
        };
        match swept {
            Ok((r, q)) => {
                removed += r;
                qdiscs_removed += q;
            }
            Err(e) => warn!(netns = %ns, error = %e, "sweeping a namespace"),
        }
    }
    if removed > 0 {
        info!(
            filters = removed,
            qdiscs = qdiscs_removed,
            "agent ended without detaching: removed its clsact filters"
        );
    }
    Ok(())
}

/// Removes every clsact filter running one of `ids`, then the listed qdiscs if empty.
fn sweep(ids: &BTreeSet<u32>, qdiscs: &BTreeSet<u32>) -> anyhow::Result<(usize, usize)> {
    let mut removed = 0;
    for iface in list_interfaces()? {
        for hook in [Hook::Ingress, Hook::Egress] {
            let filters = match tcnl::filters(iface.ifindex, hook) {
                Ok(f) => f,
                Err(e) => {
                    debug!(interface = %iface.name, error = %e, "listing filters");
                    continue;
                }
            };
            for f in filters
                .iter()
                .filter(|f| f.bpf_id.is_some_and(|id| ids.contains(&id)))
            {
                match tcnl::delete_filter(iface.ifindex, hook, f) {
                    Ok(()) => removed += 1,
                    Err(e) => warn!(interface = %iface.name, error = %e, "removing a filter"),
                }
            }
        }
    }
    let mut qdiscs_removed = 0;
    for &ifindex in qdiscs {
        // Gone with its interface, or still carrying someone else's filters: left alone.
        if let Ok(true) = tcnl::delete_clsact_if_empty(ifindex) {
            qdiscs_removed += 1;
        }
    }
    Ok((removed, qdiscs_removed))
}
