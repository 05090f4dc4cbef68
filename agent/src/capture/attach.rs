//! Attaching the TC programs to every interface whose name matches the configured globs, and
//! detaching what we attached (only that) when interfaces go away or the agent stops.
use std::collections::BTreeMap;

use aya::programs::{
    LinkOrder, SchedClassifier, TcAttachType,
    tc::{self, NlOptions, SchedClassifierLinkId, TcAttachOptions},
};
use mtls_agent_common::names;
use tracing::{debug, info, warn};

use super::{TcMode, reaper::Reaper, tcnl};

/// One interface we attached to.
#[derive(Debug)]
struct Attached {
    ifindex: u32,
    ingress: SchedClassifierLinkId,
    egress: SchedClassifierLinkId,
    /// We created the interface's clsact qdisc (legacy path): remove it again when done.
    created_qdisc: bool,
}

/// Outcome of one [`Attacher::sync`].
#[derive(Debug, Default, PartialEq, Eq)]
pub struct SyncReport {
    pub attached: Vec<String>,
    pub detached: Vec<String>,
    pub failed: Vec<(String, String)>,
    /// Matching interfaces left for the next call (see [`Attacher::sync`]'s `limit`).
    pub pending: usize,
}

/// At most this many interfaces are attached per [`Attacher::sync`] call. Each TCX attach ends
/// in an RCU grace period under the kernel's rtnl lock (about 25 ms on a small VM, and
/// attaches cannot overlap), so a burst of new pods is taken in slices: the daemon loop reads
/// the ring buffer between them instead of stalling for the whole burst.
pub const ATTACH_SLICE: usize = 8;

/// A network interface present on the node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Interface {
    pub name: String,
    pub ifindex: u32,
}

/// Lists the interfaces of this network namespace from sysfs.
pub fn list_interfaces() -> std::io::Result<Vec<Interface>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/sys/class/net")? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let Ok(idx) = std::fs::read_to_string(entry.path().join("ifindex")) else {
            continue; // vanished meanwhile
        };
        if let Ok(ifindex) = idx.trim().parse() {
            out.push(Interface { name, ifindex });
        }
    }
    Ok(out)
}

/// Interface-name globs, e.g. `cali*`, `vp*`.
#[derive(Debug, Clone)]
pub struct Globs(Vec<glob::Pattern>);

impl Globs {
    pub fn new(globs: &[String]) -> Result<Self, glob::PatternError> {
        Ok(Self(
            globs
                .iter()
                .map(|g| glob::Pattern::new(g))
                .collect::<Result<_, _>>()?,
        ))
    }

    pub fn matches(&self, name: &str) -> bool {
        self.0.iter().any(|p| p.matches(name))
    }
}

pub struct Attacher {
    globs: Globs,
    attached: BTreeMap<String, Attached>,
    /// TCX was refused once (old kernel), or `--tc-mode clsact`: use clsact from then on.
    legacy: bool,
    mode: TcMode,
    /// Ids of our two loaded programs, for the reaper.
    prog_ids: Vec<u32>,
    /// Started with the first clsact filter: removes our filters if this process dies.
    reaper: Option<Reaper>,
    /// Starting the reaper failed once: said so, not retried for every interface.
    reaper_failed: bool,
    /// Interfaces (name, ifindex) whose last attach attempt failed.
    failed: std::collections::BTreeSet<(String, u32)>,
}

impl Attacher {
    pub fn new(globs: Globs, mode: TcMode, prog_ids: Vec<u32>) -> Self {
        Self {
            globs,
            attached: BTreeMap::new(),
            legacy: mode == TcMode::Clsact,
            mode,
            prog_ids,
            reaper: None,
            reaper_failed: false,
            failed: Default::default(),
        }
    }

    pub fn attached_count(&self) -> usize {
        self.attached.len()
    }

    pub fn attached_ifindexes(&self) -> std::collections::BTreeSet<u32> {
        self.attached.values().map(|a| a.ifindex).collect()
    }

    pub fn attached_names(&self) -> impl Iterator<Item = &str> {
        self.attached.keys().map(String::as_str)
    }

    /// Brings attachments in line with the interfaces present now: attach to new matches,
    /// forget interfaces that vanished (their links died with them) or were recreated under the
    /// same name (new ifindex).
    pub fn sync(
        &mut self,
        ingress: &mut SchedClassifier,
        egress: &mut SchedClassifier,
        present: &[Interface],
    ) -> SyncReport {
        let mut report = SyncReport::default();
        let gone: Vec<String> = self
            .attached
            .iter()
            .filter(|(name, a)| {
                !present
                    .iter()
                    .any(|i| &i.name == *name && i.ifindex == a.ifindex)
            })
            .map(|(name, _)| name.clone())
            .collect();
        for name in gone {
            if let Some(a) = self.attached.remove(&name) {
                // The interface is gone: detaching can fail harmlessly; it releases our handles.
                let _ = ingress.detach(a.ingress);
                let _ = egress.detach(a.egress);
                debug!(interface = %name, "interface removed");
                report.detached.push(name);
            }
        }
        let mut tried = 0;
        // Interfaces whose last attach failed go last, so they cannot starve new ones.
        let (retry, fresh): (Vec<&Interface>, Vec<&Interface>) = present
            .iter()
            .filter(|i| !self.attached.contains_key(&i.name) && self.globs.matches(&i.name))
            .partition(|i| self.failed.contains(&(i.name.clone(), i.ifindex)));
        self.failed
            .retain(|(n, idx)| present.iter().any(|i| &i.name == n && i.ifindex == *idx));
        for iface in fresh.into_iter().chain(retry) {
            if tried == ATTACH_SLICE {
                report.pending += 1;
                continue;
            }
            tried += 1;
            match self.attach_one(ingress, egress, iface) {
                Ok(a) => {
                    self.failed.remove(&(iface.name.clone(), iface.ifindex));
                    info!(interface = %iface.name, ifindex = iface.ifindex, "attached");
                    self.attached.insert(iface.name.clone(), a);
                    report.attached.push(iface.name.clone());
                }
                // Pods come and go: an interface deleted between listing and attaching is normal.
                Err(e) if !still_present(iface) || e.contains("No such device") => {
                    debug!(interface = %iface.name, error = %e, "interface vanished while attaching");
                }
                Err(e) => {
                    self.failed.insert((iface.name.clone(), iface.ifindex));
                    warn!(interface = %iface.name, error = %e, "attach failed");
                    report.failed.push((iface.name.clone(), e));
                }
            }
        }
        report
    }

    fn attach_one(
        &mut self,
        ingress: &mut SchedClassifier,
        egress: &mut SchedClassifier,
        iface: &Interface,
    ) -> Result<Attached, String> {
        remove_stale_filters(&iface.name);
        if !self.legacy {
            let tcx = |p: &mut SchedClassifier, t| {
                p.attach_with_options(
                    &iface.name,
                    t,
                    TcAttachOptions::TcxOrder(LinkOrder::default()),
                )
            };
            match tcx(ingress, TcAttachType::Ingress) {
                Ok(i) => match tcx(egress, TcAttachType::Egress) {
                    Ok(e) => {
                        return Ok(Attached {
                            ifindex: iface.ifindex,
                            ingress: i,
                            egress: e,
                            created_qdisc: false,
                        });
                    }
                    Err(err) => {
                        let _ = ingress.detach(i);
                        return Err(format!("TCX egress: {err}"));
                    }
                },
                Err(err) if self.mode == TcMode::Auto && tcx_unsupported(&err) => {
                    info!(error = %err, "TCX not available, falling back to clsact");
                    self.legacy = true;
                }
                Err(err) => return Err(format!("TCX ingress: {err}")),
            }
        }
        if self.reaper.is_none() && !self.reaper_failed {
            match Reaper::spawn(&self.prog_ids) {
                Ok(r) => self.reaper = Some(r),
                Err(e) => {
                    warn!(error = %e, "could not start the clsact reaper: if this process is killed, its filters stay until the next agent starts");
                    self.reaper_failed = true;
                }
            }
        }
        let created_qdisc = match tc::qdisc_add_clsact(&iface.name) {
            Ok(()) => true,
            Err(tc::TcError::NetlinkError(e)) if e.raw_os_error() == Some(libc::EEXIST) => false,
            Err(e) => return Err(format!("adding clsact qdisc: {e}")),
        };
        let nl = |p: &mut SchedClassifier, t| {
            p.attach_with_options(
                &iface.name,
                t,
                TcAttachOptions::Netlink(NlOptions::default()),
            )
        };
        let i = nl(ingress, TcAttachType::Ingress).map_err(|e| format!("clsact ingress: {e}"))?;
        let e = match nl(egress, TcAttachType::Egress) {
            Ok(e) => e,
            Err(err) => {
                let _ = ingress.detach(i);
                return Err(format!("clsact egress: {err}"));
            }
        };
        if created_qdisc && let Some(r) = &mut self.reaper {
            r.created_qdisc(iface.ifindex);
        }
        Ok(Attached {
            ifindex: iface.ifindex,
            ingress: i,
            egress: e,
            created_qdisc,
        })
    }

    /// Detaches everything we attached; removes clsact qdiscs we created.
    pub fn detach_all(&mut self, ingress: &mut SchedClassifier, egress: &mut SchedClassifier) {
        for (name, a) in std::mem::take(&mut self.attached) {
            if let Err(e) = ingress.detach(a.ingress) {
                debug!(interface = %name, error = %e, "detach ingress");
            }
            if let Err(e) = egress.detach(a.egress) {
                debug!(interface = %name, error = %e, "detach egress");
            }
            if a.created_qdisc {
                match tcnl::delete_clsact_if_empty(a.ifindex) {
                    Ok(true) => debug!(interface = %name, "removed the clsact qdisc we added"),
                    Ok(false) => {
                        debug!(interface = %name, "clsact qdisc we added has other filters now: kept")
                    }
                    Err(e) => {
                        warn!(interface = %name, error = %e, "removing the clsact qdisc we added")
                    }
                }
            }
            debug!(interface = %name, "detached");
        }
        // Closes its pipe: it sweeps once (finding nothing of ours) and exits.
        self.reaper = None;
    }
}

/// Whether the interface still exists with the same index (sysfs).
fn still_present(iface: &Interface) -> bool {
    std::fs::read_to_string(format!("/sys/class/net/{}/ifindex", iface.name))
        .is_ok_and(|s| s.trim().parse::<u32>().ok() == Some(iface.ifindex))
}

/// Removes clsact filters named like our programs that an earlier agent process left behind
/// (killed before it could detach: netlink filters, unlike TCX links, outlive their process).
/// Only filters with exactly our program names are touched; other filters and the qdisc stay.
/// Called before this process attaches to the interface, so none of them can be ours.
pub fn remove_stale_filters(name: &str) -> usize {
    let mut removed = 0;
    for (t, prog) in [
        (TcAttachType::Ingress, names::PROG_INGRESS),
        (TcAttachType::Egress, names::PROG_EGRESS),
    ] {
        match tc::qdisc_detach_program(name, t, prog) {
            Ok(()) => {
                info!(interface = %name, filter = prog, "removed a stale filter of an earlier agent");
                removed += 1;
            }
            // No clsact qdisc, or no filter of that name: nothing left behind.
            Err(e) => debug!(interface = %name, filter = prog, error = %e, "no stale filter"),
        }
    }
    removed
}

fn tcx_unsupported(err: &aya::programs::ProgramError) -> bool {
    // EINVAL/EOPNOTSUPP from BPF_LINK_CREATE with a TCX attach type: a kernel without TCX. The
    // errno is in the error's source chain (aya's message only names the call).
    let mut src: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = src {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            return matches!(io.raw_os_error(), Some(libc::EINVAL | libc::EOPNOTSUPP));
        }
        src = e.source();
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs_match_cni_names() {
        let g = Globs::new(&["cali*".into(), "lxc*".into(), "vp?eb".into()]).unwrap();
        assert!(g.matches("cali12ab"));
        assert!(g.matches("lxc_health"));
        assert!(g.matches("vpweb"));
        assert!(!g.matches("eth0"));
        assert!(!g.matches("vpwebx"));
    }

    #[test]
    fn bad_glob_is_an_error() {
        assert!(Globs::new(&["cali[".into()]).is_err());
    }

    #[test]
    fn lists_loopback() {
        let all = list_interfaces().unwrap();
        assert!(all.iter().any(|i| i.name == "lo" && i.ifindex == 1));
    }
}
