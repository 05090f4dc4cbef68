//! Attaching the TC programs to every pod-facing interface (and/or those whose names match the
//! configured globs), first in each hook's chain, and detaching what we attached (only that) when
//! interfaces go away or the agent stops.
use std::{
    collections::{BTreeMap, BTreeSet},
    time::{Duration, Instant},
};

use aya::programs::{
    LinkOrder, SchedClassifier, TcAttachType,
    tc::{self, NlOptions, SchedClassifierLinkId, TcAttachOptions, TcHandle},
};
use mtls_agent_common::names;
use tracing::{debug, info, warn};

pub use super::links::{Interface, list_interfaces};
use super::{
    AttachSide, TcMode,
    podns::{self, PodNs},
    reaper::Reaper,
    tcnl,
};

/// Which end of a pod's veth one interface's programs went on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Side {
    /// The host-side interface, in the node's namespace.
    Host,
    /// Its peer, the pod's end, entered through the pod's namespace.
    Pod,
}

impl Side {
    pub fn as_str(self) -> &'static str {
        match self {
            Side::Host => "host",
            Side::Pod => "pod",
        }
    }

    /// The hooks of [`names::PROG_INGRESS`] (the packet's sender is local) and
    /// [`names::PROG_EGRESS`] (its receiver is local). The program's role is fixed by its entry
    /// point, so the hot path does no lookup: on the host side the pod's packets arrive on
    /// ingress, on the pod side they leave on egress.
    fn hooks(self) -> [TcAttachType; 2] {
        match self {
            Side::Host => [TcAttachType::Ingress, TcAttachType::Egress],
            Side::Pod => [TcAttachType::Egress, TcAttachType::Ingress],
        }
    }

    /// Our program ids by hook [ingress, egress], from ids by program [ingress, egress].
    fn ids_by_hook(self, ids: [u32; 2]) -> [u32; 2] {
        match self {
            Side::Host => ids,
            Side::Pod => [ids[1], ids[0]],
        }
    }
}

/// Where one interface's programs go: the host-side interface itself, or its peer in the pod's
/// namespace.
#[derive(Debug, Clone)]
struct Target {
    side: Side,
    /// The interface's name and ifindex in its own namespace.
    name: String,
    ifindex: u32,
    /// The pod's namespace (pod side only).
    ns: Option<PodNs>,
}

impl Target {
    /// Runs `f` in the target's namespace (here for the host side).
    fn enter<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T, String> {
        match &self.ns {
            None => Ok(f()),
            Some(ns) => ns
                .run(f)
                .map_err(|e| format!("entering {}: {e}", ns.path.display())),
        }
    }
}

/// The name of `ifindex` in the calling thread's namespace.
fn name_of(ifindex: u32) -> Option<String> {
    let mut buf = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: if_indextoname writes at most IF_NAMESIZE bytes into buf.
    let p = unsafe { libc::if_indextoname(ifindex, buf.as_mut_ptr()) };
    if p.is_null() {
        return None;
    }
    // SAFETY: on success buf holds a NUL-terminated name.
    let c = unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) };
    Some(c.to_string_lossy().into_owned())
}

/// One interface we attached to.
#[derive(Debug)]
struct Attached {
    /// The host-side interface's ifindex (what the link dump lists).
    ifindex: u32,
    /// Where the programs are.
    target: Target,
    ingress: SchedClassifierLinkId,
    egress: SchedClassifierLinkId,
    /// We created the interface's clsact qdisc (legacy path): remove it again when done.
    created_qdisc: bool,
    /// Attached through TCX (else clsact).
    tcx: bool,
    /// Our place on [ingress, egress] at the last check (`None`: not listed, going away).
    order: [Option<HookOrder>; 2],
}

/// Outcome of one [`Attacher::sync`].
#[derive(Debug, Default, PartialEq, Eq)]
pub struct SyncReport {
    pub attached: Vec<String>,
    pub detached: Vec<String>,
    pub failed: Vec<(String, String)>,
    /// Matching interfaces left for the next call (see [`Attacher::sync`]'s `limit`).
    pub pending: usize,
    /// Selected interfaces the programs cannot read, by reason (all of them, not only new ones).
    pub unsupported: BTreeMap<&'static str, usize>,
}

/// At most this many interfaces are attached per [`Attacher::sync`] call. Each TCX attach ends
/// in an RCU grace period under the kernel's rtnl lock (about 25 ms on a small VM, and
/// attaches cannot overlap), so a burst of new pods is taken in slices: the daemon loop reads
/// the ring buffer between them instead of stalling for the whole burst.
pub const ATTACH_SLICE: usize = 8;

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

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// Which interfaces to watch (`--interface`, `--interface-auto`).
#[derive(Debug, Clone)]
pub struct Selection {
    /// Every pod-facing interface (veth/netkit with its peer in another netns), whatever its
    /// name; `globs`, when given, narrow it.
    pub auto: bool,
    /// Interface-name globs: a filter on top of `auto`, or the whole rule without it.
    pub globs: Globs,
}

/// What [`Selection::judge`] says about one interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Watch,
    /// Selected, but the programs cannot read it (the reason, for logs and metrics).
    Unsupported(&'static str),
    Ignore,
}

/// `mtls_agent_interfaces_unsupported{reason}`: a pod-facing interface without Ethernet headers
/// (netkit in L3 mode, Cilium's default for netkit): the TC programs parse from an Ethernet
/// header, so they are not attached there.
pub const NO_ETHERNET: &str = "no_ethernet_header";

impl Selection {
    pub fn judge(&self, i: &Interface) -> Verdict {
        let by_name = self.globs.is_empty() || self.globs.matches(&i.name);
        let selected = if self.auto {
            i.pod_facing() && by_name
        } else {
            !self.globs.is_empty() && self.globs.matches(&i.name)
        };
        match (selected, i.ethernet) {
            (false, _) => Verdict::Ignore,
            (true, true) => Verdict::Watch,
            // Only said of interfaces the user can expect us on: pod-facing or named by a glob.
            (true, false) => Verdict::Unsupported(NO_ETHERNET),
        }
    }
}

/// Where our program runs in one hook's chain of an interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Position {
    /// Before every other program: what they do (redirects) cannot hide packets from us.
    First,
    /// Sharing our clsact priority with another filter: the kernel's order between the two is
    /// not ours to rely on.
    Tied,
    /// After another program, which may end packets (`TC_ACT_REDIRECT`) before we see them.
    Later,
}

impl Position {
    pub fn as_str(self) -> &'static str {
        match self {
            Position::First => "first",
            Position::Tied => "tied",
            Position::Later => "later",
        }
    }
}

/// Our place on one hook of one interface, and how many other programs share the hook.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HookOrder {
    pub position: Position,
    pub others: usize,
}

/// Our clsact priority: the lowest number, run before every other filter that does not also
/// hold it (TCX programs, when present, run before all clsact filters).
pub const CLSACT_PRIORITY: u16 = 1;

/// How often the order of our programs is checked again (another product may attach in front
/// of us later, e.g. a CNI agent restarting).
const ORDER_RECHECK: Duration = Duration::from_secs(5);

/// Our place in the chains of the hook `t` of an interface. `tcx`: we attached through TCX.
/// `None` when the kernel does not list our program there: the interface is going away (pods
/// come and go), which is no order to warn about.
fn hook_order(
    iface: &str,
    ifindex: u32,
    t: TcAttachType,
    tcx: bool,
    ours: u32,
) -> Option<HookOrder> {
    // A kernel without TCX, or an interface gone meanwhile: no TCX programs.
    let tcx_ids: Vec<u32> = SchedClassifier::query_tcx(iface, t)
        .map(|(_, progs)| progs.iter().map(|p| p.id()).collect())
        .unwrap_or_default();
    let hook = match t {
        TcAttachType::Ingress => tcnl::Hook::Ingress,
        _ => tcnl::Hook::Egress,
    };
    let filters = tcnl::filters(ifindex, hook).unwrap_or_default();
    let others = tcx_ids.iter().filter(|&&id| id != ours).count()
        + filters.iter().filter(|f| f.bpf_id != Some(ours)).count();
    let position = if tcx {
        // TCX runs before every clsact filter; within TCX, the kernel's order is the query's.
        match tcx_ids.iter().position(|&id| id == ours)? {
            0 => Position::First,
            _ => Position::Later,
        }
    } else {
        let p = filters
            .iter()
            .find(|f| f.bpf_id == Some(ours))
            .map(tcnl::Filter::priority)?;
        let mut others = filters.iter().filter(|f| f.bpf_id != Some(ours));
        if !tcx_ids.is_empty() || others.clone().any(|f| f.priority() < p) {
            Position::Later
        } else if others.any(|f| f.priority() == p) {
            Position::Tied
        } else {
            Position::First
        }
    };
    Some(HookOrder { position, others })
}

pub struct Attacher {
    selection: Selection,
    side: AttachSide,
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
    /// Unsupported interfaces (name, ifindex) already logged.
    said_unsupported: std::collections::BTreeSet<(String, u32)>,
    last_order_check: Instant,
    /// Pods' namespaces found so far, by the id this namespace gave them (checked before use:
    /// an id is freed when its namespace goes and may be given to another).
    pod_namespaces: BTreeMap<i32, PodNs>,
}

impl Attacher {
    pub fn new(selection: Selection, mode: TcMode, side: AttachSide, prog_ids: Vec<u32>) -> Self {
        Self {
            selection,
            side,
            attached: BTreeMap::new(),
            legacy: mode == TcMode::Clsact,
            mode,
            prog_ids,
            reaper: None,
            reaper_failed: false,
            failed: Default::default(),
            said_unsupported: Default::default(),
            last_order_check: Instant::now(),
            pod_namespaces: BTreeMap::new(),
        }
    }

    /// Our place in each hook's chain: (hook, position) -> interfaces, and per hook the number of
    /// interfaces where other programs share it.
    pub fn chain_order(&self) -> ChainOrder {
        let mut out = ChainOrder::default();
        for a in self.attached.values() {
            for (h, o) in a.order.iter().enumerate() {
                let Some(o) = o else { continue };
                *out.positions.entry((HOOKS[h], o.position)).or_default() += 1;
                if o.others > 0 {
                    *out.shared.entry(HOOKS[h]).or_default() += 1;
                }
            }
        }
        out
    }

    /// Attached interfaces by the side their programs went on.
    pub fn sides(&self) -> BTreeMap<Side, usize> {
        let mut out = BTreeMap::from([(Side::Host, 0), (Side::Pod, 0)]);
        for a in self.attached.values() {
            *out.entry(a.target.side).or_default() += 1;
        }
        out
    }

    /// Checks our place again on every attached interface (at most every few seconds) and
    /// says so when it changed.
    fn recheck_order(&mut self) {
        if self.last_order_check.elapsed() < ORDER_RECHECK {
            return;
        }
        self.last_order_check = Instant::now();
        let ids = [self.prog_ids[0], self.prog_ids[1]];
        for (name, a) in &mut self.attached {
            let t = &a.target;
            let tcx = a.tcx;
            let Ok(now) = t.enter(|| orders(&t.name, t.ifindex, tcx, t.side.ids_by_hook(ids)))
            else {
                // The pod's namespace is gone: the interface goes at the next sync.
                continue;
            };
            if now != a.order {
                log_order(name, a.tcx, &now);
                a.order = now;
            }
        }
    }

    pub fn attached_count(&self) -> usize {
        self.attached.len()
    }

    /// The ifindexes the programs see (`skb->ifindex`, what the flow table records): the
    /// pod's end for pod-side attachments.
    pub fn attached_ifindexes(&self) -> std::collections::BTreeSet<u32> {
        self.attached.values().map(|a| a.target.ifindex).collect()
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
                // The interface is gone (and with it the pod's end): detaching can fail
                // harmlessly; it releases our handles.
                let _ = ingress.detach(a.ingress);
                let _ = egress.detach(a.egress);
                debug!(interface = %name, "interface removed");
                report.detached.push(name);
            }
        }
        self.recheck_order();
        let mut tried = 0;
        let mut wanted = Vec::new();
        for i in present {
            match self.selection.judge(i) {
                Verdict::Watch => wanted.push(i),
                Verdict::Ignore => {}
                Verdict::Unsupported(reason) => {
                    *report.unsupported.entry(reason).or_default() += 1;
                    if self.said_unsupported.insert((i.name.clone(), i.ifindex)) {
                        warn!(interface = %i.name, kind = i.kind.as_deref().unwrap_or("device"), reason,
                            "pod interface not watched: its packets have no Ethernet header, which the TC programs parse (use netkit in L2 mode)");
                    }
                }
            }
        }
        self.said_unsupported
            .retain(|(n, idx)| present.iter().any(|i| &i.name == n && i.ifindex == *idx));
        // Interfaces whose last attach failed go last, so they cannot starve new ones.
        let (retry, fresh): (Vec<&Interface>, Vec<&Interface>) = wanted
            .into_iter()
            .filter(|i| !self.attached.contains_key(&i.name))
            .partition(|i| self.failed.contains(&(i.name.clone(), i.ifindex)));
        self.failed
            .retain(|(n, idx)| present.iter().any(|i| &i.name == n && i.ifindex == *idx));
        if self.side != AttachSide::Host {
            self.find_pod_namespaces(present, fresh.iter().chain(&retry).take(ATTACH_SLICE));
        }
        for iface in fresh.into_iter().chain(retry) {
            if tried == ATTACH_SLICE {
                report.pending += 1;
                continue;
            }
            tried += 1;
            let target = match self.target(iface) {
                Ok(t) => t,
                Err(e) => {
                    self.failed.insert((iface.name.clone(), iface.ifindex));
                    warn!(interface = %iface.name, error = %e, "attach failed");
                    report.failed.push((iface.name.clone(), e));
                    continue;
                }
            };
            match self.attach_one(ingress, egress, iface, target) {
                Ok(a) => {
                    self.failed.remove(&(iface.name.clone(), iface.ifindex));
                    info!(interface = %iface.name, ifindex = iface.ifindex,
                        kind = iface.kind.as_deref().unwrap_or("device"),
                        side = a.target.side.as_str(), at = %a.target.name,
                        hook = if a.tcx { "tcx" } else { "clsact" },
                        ingress = place(a.order[0]), egress = place(a.order[1]),
                        others = a.order.iter().flatten().map(|o| o.others).sum::<usize>(), "attached");
                    log_order(&a.target.name, a.tcx, &a.order);
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

    /// Keeps the cache of pods' namespaces to the ids `present` interfaces name, drops stale
    /// entries among those `next` needs, and scans for the ones missing (one scan per sync,
    /// stopping once all are found).
    fn find_pod_namespaces<'a>(
        &mut self,
        present: &[Interface],
        next: impl Iterator<Item = &'a &'a Interface>,
    ) {
        let live: BTreeSet<i32> = present.iter().filter_map(|i| i.peer_netnsid).collect();
        self.pod_namespaces.retain(|id, _| live.contains(id));
        let mut wanted = BTreeSet::new();
        for id in next.filter_map(|i| i.peer_netnsid) {
            match self.pod_namespaces.get(&id) {
                Some(ns) if ns.id_here() == Some(id) => {}
                _ => {
                    self.pod_namespaces.remove(&id);
                    wanted.insert(id);
                }
            }
        }
        if !wanted.is_empty() {
            self.pod_namespaces.extend(podns::scan_for(&wanted));
        }
    }

    /// Where `iface`'s programs go under `--attach-side`: its pod end when the pod's namespace
    /// is reachable (`auto`, `pod`), else the host side (`auto`, `host`).
    fn target(&self, iface: &Interface) -> Result<Target, String> {
        let host = Target {
            side: Side::Host,
            name: iface.name.clone(),
            ifindex: iface.ifindex,
            ns: None,
        };
        if self.side == AttachSide::Host {
            return Ok(host);
        }
        let pod = match (iface.peer_netnsid, iface.peer_ifindex) {
            (Some(id), Some(peer)) => self.pod_namespaces.get(&id).cloned().map(|ns| (ns, peer)),
            _ => None,
        };
        let found = match pod {
            Some((ns, peer)) => match ns.run(|| name_of(peer)) {
                Ok(Some(name)) => Ok(Target {
                    side: Side::Pod,
                    name,
                    ifindex: peer,
                    ns: Some(ns),
                }),
                Ok(None) => Err(format!(
                    "the pod's end (ifindex {peer}) is not in {}",
                    ns.path.display()
                )),
                // EPERM without CAP_SYS_ADMIN.
                Err(e) => Err(format!("entering {}: {e}", ns.path.display())),
            },
            None => Err(
                "the pod's network namespace was not found (not in /var/run/netns, no process of it in /proc)"
                    .to_owned(),
            ),
        };
        match (found, self.side) {
            (Ok(t), _) => Ok(t),
            (Err(why), AttachSide::Pod) => Err(format!("--attach-side pod: {why}")),
            (Err(why), _) => {
                info!(interface = %iface.name, reason = %why,
                    "attaching on the host side: packets a CNI redirects into this pod (bpf_redirect_peer) are not seen in that direction");
                Ok(host)
            }
        }
    }

    fn attach_one(
        &mut self,
        ingress: &mut SchedClassifier,
        egress: &mut SchedClassifier,
        iface: &Interface,
        target: Target,
    ) -> Result<Attached, String> {
        let ids = self.ids();
        let by_hook = target.side.ids_by_hook(ids);
        let [hook_i, hook_e] = target.side.hooks();
        let (name, ifindex) = (target.name.as_str(), target.ifindex);
        if !self.legacy {
            let tcx = target.enter(|| {
                remove_stale_filters(name);
                let tcx = |p: &mut SchedClassifier, t| {
                    p.attach_with_options(name, t, TcAttachOptions::TcxOrder(LinkOrder::first()))
                };
                let i = tcx(ingress, hook_i)?;
                match tcx(egress, hook_e) {
                    Ok(e) => Ok((i, e, orders(name, ifindex, true, by_hook))),
                    Err(err) => {
                        let _ = ingress.detach(i);
                        Err(err)
                    }
                }
            })?;
            match tcx {
                Ok((i, e, order)) => {
                    return Ok(Attached {
                        ifindex: iface.ifindex,
                        target,
                        ingress: i,
                        egress: e,
                        created_qdisc: false,
                        tcx: true,
                        order,
                    });
                }
                Err(err) if self.mode == TcMode::Auto && tcx_unsupported(&err) => {
                    info!(error = %err, "TCX not available, falling back to clsact");
                    self.legacy = true;
                }
                Err(err) => return Err(format!("TCX: {err}")),
            }
        }
        // Started from here, never from a pod's namespace (a child inherits the thread's).
        if self.reaper.is_none() && !self.reaper_failed {
            match Reaper::spawn(&self.prog_ids) {
                Ok(r) => self.reaper = Some(r),
                Err(e) => {
                    warn!(error = %e, "could not start the clsact reaper: if this process is killed, its filters stay until the next agent starts");
                    self.reaper_failed = true;
                }
            }
        }
        if let (Some(ns), Some(r)) = (&target.ns, &mut self.reaper) {
            r.netns(&ns.path);
        }
        // aya knows a filter by (ifindex, hook, priority, handle), and pods' ends often share an
        // ifindex (eth0 is 2 in each pod): kernel-chosen handles would then collide in aya's
        // table. A handle of ours, unique per program and host interface, keeps them apart.
        let handles = match target.side {
            Side::Host => [TcHandle::AUTO_ASSIGN; 2],
            Side::Pod => ids.map(|id| TcHandle::new(id as u16, iface.ifindex as u16)),
        };
        let (i, e, created_qdisc, order) = target.enter(|| {
            clsact_attach(
                ingress,
                egress,
                name,
                ifindex,
                [(hook_i, handles[0]), (hook_e, handles[1])],
                by_hook,
            )
        })??;
        if created_qdisc && let Some(r) = &mut self.reaper {
            r.created_qdisc(ifindex, target.ns.as_ref().map(|n| n.path.as_path()));
        }
        Ok(Attached {
            ifindex: iface.ifindex,
            target,
            ingress: i,
            egress: e,
            created_qdisc,
            tcx: false,
            order,
        })
    }

    fn ids(&self) -> [u32; 2] {
        [self.prog_ids[0], self.prog_ids[1]]
    }

    /// Detaches everything we attached; removes clsact qdiscs we created.
    pub fn detach_all(&mut self, ingress: &mut SchedClassifier, egress: &mut SchedClassifier) {
        for (name, a) in std::mem::take(&mut self.attached) {
            let t = &a.target;
            // clsact filters are deleted with a netlink request, which goes to the namespace of
            // the calling thread: the pod's, for pod-side filters. A pod gone meanwhile took
            // them with it; the handles are released here anyway.
            let (li, le) = (a.ingress, a.egress);
            let results = if t.ns.as_ref().is_some_and(|ns| !ns.present()) {
                Ok((ingress.detach(li), egress.detach(le)))
            } else {
                t.enter(|| (ingress.detach(li), egress.detach(le)))
            };
            match results {
                Ok((ri, re)) => {
                    for (hook, r) in [("ingress", ri), ("egress", re)] {
                        if let Err(e) = r {
                            debug!(interface = %name, hook, error = %e, "detach");
                        }
                    }
                }
                Err(e) => debug!(interface = %name, error = %e, "detach"),
            }
            if a.created_qdisc {
                let tidx = t.ifindex;
                match t
                    .enter(|| tcnl::delete_clsact_if_empty(tidx))
                    .unwrap_or(Ok(false))
                {
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

const HOOKS: [&str; 2] = ["ingress", "egress"];

/// Counts of our places in the chains (see [`Attacher::chain_order`]).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ChainOrder {
    /// (hook, position) -> interfaces.
    pub positions: BTreeMap<(&'static str, Position), usize>,
    /// hook -> interfaces where other programs are on that hook too.
    pub shared: BTreeMap<&'static str, usize>,
}

/// For logs: our position, or `unknown` while the interface goes away.
fn place(o: Option<HookOrder>) -> &'static str {
    o.map_or("unknown", |o| o.position.as_str())
}

type ClsactLinks = (
    SchedClassifierLinkId,
    SchedClassifierLinkId,
    bool,
    [Option<HookOrder>; 2],
);

/// Attaches the two programs as clsact filters at [`CLSACT_PRIORITY`] on `hooks` (by program
/// [ingress, egress]) of `name` in the calling thread's namespace; warns when another filter
/// holds that priority. Returns the links, whether we created the qdisc, and our place.
fn clsact_attach(
    ingress: &mut SchedClassifier,
    egress: &mut SchedClassifier,
    name: &str,
    ifindex: u32,
    hooks: [(TcAttachType, TcHandle); 2],
    by_hook: [u32; 2],
) -> Result<ClsactLinks, String> {
    remove_stale_filters(name);
    let created_qdisc = match tc::qdisc_add_clsact(name) {
        Ok(()) => true,
        Err(tc::TcError::NetlinkError(e)) if e.raw_os_error() == Some(libc::EEXIST) => false,
        Err(e) => return Err(format!("adding clsact qdisc: {e}")),
    };
    for (hook, t) in [
        (tcnl::Hook::Ingress, "ingress"),
        (tcnl::Hook::Egress, "egress"),
    ] {
        let held: Vec<String> = tcnl::filters(ifindex, hook)
            .unwrap_or_default()
            .into_iter()
            .filter(|f| f.priority() == CLSACT_PRIORITY)
            .map(|f| f.bpf_name.unwrap_or(f.kind))
            .collect();
        if !held.is_empty() {
            warn!(interface = %name, hook = t, priority = CLSACT_PRIORITY, other = ?held,
                "another clsact filter already holds the first priority: which of the two runs first is up to the kernel, and a filter that redirects before ours hides packets from it (use TCX, kernel 6.6+)");
        }
    }
    let nl = |p: &mut SchedClassifier, (t, handle): (TcAttachType, TcHandle)| {
        let first = NlOptions {
            priority: CLSACT_PRIORITY,
            handle,
            ..NlOptions::default()
        };
        p.attach_with_options(name, t, TcAttachOptions::Netlink(first))
            .or_else(|err| {
                // A filter of another kind or protocol at that priority: the kernel refuses
                // to share it. Take the next free one and say so.
                warn!(interface = %name, error = %err,
                    "the first clsact priority is taken by another kind of filter: attaching after it");
                let next = NlOptions {
                    handle,
                    ..NlOptions::default()
                };
                p.attach_with_options(name, t, TcAttachOptions::Netlink(next))
            })
    };
    let i = nl(ingress, hooks[0]).map_err(|e| format!("clsact (ingress program): {e}"))?;
    let e = match nl(egress, hooks[1]) {
        Ok(e) => e,
        Err(err) => {
            let _ = ingress.detach(i);
            return Err(format!("clsact (egress program): {err}"));
        }
    };
    Ok((i, e, created_qdisc, orders(name, ifindex, false, by_hook)))
}

/// [`hook_order`] for the hooks [ingress, egress]; `ids` are our programs' ids on those hooks.
fn orders(iface: &str, ifindex: u32, tcx: bool, ids: [u32; 2]) -> [Option<HookOrder>; 2] {
    [
        hook_order(iface, ifindex, TcAttachType::Ingress, tcx, ids[0]),
        hook_order(iface, ifindex, TcAttachType::Egress, tcx, ids[1]),
    ]
}

/// One warning per hook where something runs before ours.
fn log_order(iface: &str, tcx: bool, order: &[Option<HookOrder>; 2]) {
    for (h, o) in order.iter().enumerate() {
        let Some(o) = o else { continue };
        if o.position != Position::First {
            warn!(interface = %iface, hook = HOOKS[h], attach = if tcx { "tcx" } else { "clsact" },
                position = o.position.as_str(), others = o.others,
                "another program runs before ours on this hook: packets it redirects or drops are not seen");
        }
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

    fn iface(name: &str, kind: Option<&str>, peer_elsewhere: bool, ethernet: bool) -> Interface {
        Interface {
            name: name.into(),
            ifindex: 5,
            kind: kind.map(Into::into),
            peer_elsewhere,
            peer_ifindex: None,
            peer_netnsid: None,
            ethernet,
        }
    }

    #[test]
    fn auto_selection_is_by_kind_and_globs_narrow_it() {
        let ovn = iface("3f2a9c1b0d4e5f6", Some("veth"), true, true);
        let cali = iface("cali12ab", Some("veth"), true, true);
        let local = iface("cali-host", Some("veth"), false, true);
        let bridge = iface("cali-br", Some("bridge"), false, true);
        let netkit_l3 = iface("lxc9", Some("netkit"), true, false);
        let auto = Selection {
            auto: true,
            globs: Globs::new(&[]).unwrap(),
        };
        assert_eq!(auto.judge(&ovn), Verdict::Watch);
        assert_eq!(auto.judge(&cali), Verdict::Watch);
        assert_eq!(auto.judge(&local), Verdict::Ignore);
        assert_eq!(auto.judge(&bridge), Verdict::Ignore);
        assert_eq!(auto.judge(&netkit_l3), Verdict::Unsupported(NO_ETHERNET));
        let narrowed = Selection {
            auto: true,
            globs: Globs::new(&["cali*".into()]).unwrap(),
        };
        assert_eq!(narrowed.judge(&ovn), Verdict::Ignore);
        assert_eq!(narrowed.judge(&cali), Verdict::Watch);
        assert_eq!(narrowed.judge(&local), Verdict::Ignore);
        let globs_only = Selection {
            auto: false,
            globs: Globs::new(&["cali*".into()]).unwrap(),
        };
        assert_eq!(globs_only.judge(&ovn), Verdict::Ignore);
        assert_eq!(globs_only.judge(&local), Verdict::Watch);
        assert_eq!(globs_only.judge(&bridge), Verdict::Watch);
    }

    #[test]
    fn bad_glob_is_an_error() {
        assert!(Globs::new(&["cali[".into()]).is_err());
    }
}
