//! The Kubernetes identity store: pods (address → namespace, pod, workload, service account,
//! sidecar), namespaces (injection labels), nodes (their addresses) and Istio
//! PeerAuthentications (the effective mTLS mode per workload and port).
//!
//! Pure data: no I/O. `kubernetes_watch.rs` feeds it from the API's list/watch streams; tests feed
//! it objects directly. It is built to stay small with every pod of a large cluster in it: one
//! compact record per pod in a slab, names of namespaces, service accounts and label sets
//! interned (`Arc<str>`), workloads shared (`Arc<Workload>`), and two index tables that hold only
//! slab positions.
//!
//! Relists follow the watcher's `Init` / `InitApply` / `InitDone` protocol: every object carries
//! the epoch of the list or event that last touched it, and `InitDone` drops what the new list
//! did not contain. Until then, and while the API is unreachable, the last known identities stay.
use std::{
    collections::{BTreeMap, HashMap, HashSet},
    hash::{BuildHasher, RandomState},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    sync::Arc,
};

use hashbrown::HashTable;
use k8s_openapi::api::core::v1::{Namespace, Node, Pod};
use serde::{Deserialize, Serialize};

use super::{
    Workload,
    inbound::{self, InboundCapture, InboundPort},
};

/// Default SPIFFE trust domain (`--trust-domain`).
pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";
/// Default Istio root namespace (`--istio-root-namespace`): mesh-wide policies live there.
pub const DEFAULT_ROOT_NAMESPACE: &str = crate::policy::DEFAULT_ROOT_NAMESPACE;

use crate::policy::Rule;
pub use crate::policy::{EffectiveMode, Mode, ModeSource};

/// How a namespace is enrolled in the mesh, from its labels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum InjectionState {
    /// `istio-injection=enabled` or an `istio.io/rev` label: new pods get a sidecar.
    Sidecar,
    /// `istio.io/dataplane-mode=ambient` (and no sidecar injection): ztunnel handles mTLS.
    Ambient,
    /// `istio-injection=disabled`.
    Disabled,
    /// No injection label.
    None,
}

/// A namespace's injection labels and what they mean.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Injection {
    pub state: InjectionState,
    /// Value of the `istio-injection` label.
    pub istio_injection: Option<String>,
    /// Value of the `istio.io/rev` label (revision-based injection).
    pub revision: Option<String>,
    /// Value of the `istio.io/dataplane-mode` label.
    pub dataplane_mode: Option<String>,
}

impl Injection {
    pub fn from_labels(labels: Option<&BTreeMap<String, String>>) -> Injection {
        let get = |k: &str| labels.and_then(|l| l.get(k)).cloned();
        let istio_injection = get("istio-injection");
        let revision = get("istio.io/rev");
        let dataplane_mode = get("istio.io/dataplane-mode");
        let state = match istio_injection.as_deref() {
            Some("disabled") => InjectionState::Disabled,
            Some("enabled") => InjectionState::Sidecar,
            _ if revision.is_some() => InjectionState::Sidecar,
            _ if dataplane_mode.as_deref() == Some("ambient") => InjectionState::Ambient,
            _ => InjectionState::None,
        };
        Injection {
            state,
            istio_injection,
            revision,
            dataplane_mode,
        }
    }
}

/// What owns a pod, as far as the workload name goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum WorkloadKind {
    Deployment,
    ReplicaSet,
    StatefulSet,
    DaemonSet,
    CronJob,
    Job,
    /// Another controller (its kind is not kept), named by the owner reference.
    Other,
    /// A pod without controller: the workload is the pod.
    Pod,
}

/// Everything known about the pod behind an address.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodIdentity {
    pub namespace: String,
    pub pod: String,
    pub workload: String,
    pub workload_kind: WorkloadKind,
    pub service_account: String,
    /// `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.
    pub spiffe_id: String,
    pub sidecar: bool,
    /// Runs on this agent's node.
    pub local: bool,
}

/// The resources the store follows; the label value of the Kubernetes metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Resource {
    Pods,
    Namespaces,
    Nodes,
    PeerAuthentications,
}

impl Resource {
    pub const ALL: [Resource; 4] = [
        Resource::Pods,
        Resource::Namespaces,
        Resource::Nodes,
        Resource::PeerAuthentications,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Resource::Pods => "pods",
            Resource::Namespaces => "namespaces",
            Resource::Nodes => "nodes",
            Resource::PeerAuthentications => "peerauthentications",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Settings of the store.
#[derive(Debug, Clone)]
pub struct KubeConfig {
    /// This agent's node (`--node-name` / `NODE_NAME`): its addresses are probe sources and its
    /// pods' workloads are the ones reports list. `None`: every workload is listed.
    pub node_name: Option<String>,
    pub trust_domain: String,
    pub root_namespace: String,
}

impl Default for KubeConfig {
    fn default() -> Self {
        Self {
            node_name: None,
            trust_domain: DEFAULT_TRUST_DOMAIN.into(),
            root_namespace: DEFAULT_ROOT_NAMESPACE.into(),
        }
    }
}

/// Sorted (key, value) pairs, interned: pods of one ReplicaSet share one.
type LabelSet = Box<[(Arc<str>, Arc<str>)]>;

/// StatefulSet pods carry their own name and ordinal as labels. Kept as flags (the values
/// follow from the pod name), so that the pods of a StatefulSet share one label set.
const POD_NAME_LABEL: &str = "statefulset.kubernetes.io/pod-name";
const POD_INDEX_LABEL: &str = "apps.kubernetes.io/pod-index";

const F_LOCAL: u8 = 1;
const F_HOST_NETWORK: u8 = 2;
/// Running or pending with an address; Succeeded/Failed pods have released theirs.
const F_LIVE: u8 = 4;
const F_SIDECAR: u8 = 8;
/// Has `statefulset.kubernetes.io/pod-name` = its name.
const F_POD_NAME_LABEL: u8 = 16;
/// Has `apps.kubernetes.io/pod-index` = the ordinal at the end of its name.
const F_POD_INDEX_LABEL: u8 = 32;

/// One pod: 80 bytes plus its name. The namespace is the workload's.
#[derive(Debug)]
struct PodRec {
    name: Box<str>,
    service_account: Arc<str>,
    workload: Arc<Workload>,
    labels: Arc<LabelSet>,
    created: u32,
    epoch: u32,
    v4: Option<Ipv4Addr>,
    v6: Option<Ipv6Addr>,
    kind: WorkloadKind,
    flags: u8,
}

impl PodRec {
    fn namespace(&self) -> &str {
        &self.workload.namespace
    }
    fn ips(&self) -> impl Iterator<Item = IpAddr> + '_ {
        self.v4
            .map(IpAddr::V4)
            .into_iter()
            .chain(self.v6.map(IpAddr::V6))
    }
    fn has(&self, f: u8) -> bool {
        self.flags & f != 0
    }
}

/// Pods in fixed-size chunks: growing never copies or doubles the whole table.
#[derive(Debug, Default)]
struct Slab {
    chunks: Vec<Box<[Option<PodRec>]>>,
    used: usize,
    free: Vec<u32>,
}

const CHUNK: usize = 1024;

impl Slab {
    fn get(&self, i: u32) -> Option<&PodRec> {
        let i = i as usize;
        self.chunks.get(i / CHUNK)?[i % CHUNK].as_ref()
    }
    fn take(&mut self, i: u32) -> Option<PodRec> {
        let i = i as usize;
        let rec = self.chunks.get_mut(i / CHUNK)?[i % CHUNK].take();
        if rec.is_some() {
            self.free.push(i as u32);
        }
        rec
    }
    fn insert(&mut self, rec: PodRec) -> u32 {
        let i = match self.free.pop() {
            Some(i) => i as usize,
            None => {
                if self.used == self.chunks.len() * CHUNK {
                    self.chunks.push(
                        (0..CHUNK)
                            .map(|_| None)
                            .collect::<Vec<_>>()
                            .into_boxed_slice(),
                    );
                }
                self.used += 1;
                self.used - 1
            }
        };
        self.chunks[i / CHUNK][i % CHUNK] = Some(rec);
        i as u32
    }
    fn len(&self) -> usize {
        self.used - self.free.len()
    }
    fn iter(&self) -> impl Iterator<Item = (u32, &PodRec)> {
        self.chunks
            .iter()
            .flat_map(|c| c.iter())
            .enumerate()
            .filter_map(|(i, p)| p.as_ref().map(|p| (i as u32, p)))
    }
}

/// Address → slab index, IPv4 and IPv6 apart (8- and 20-byte entries instead of 24).
#[derive(Debug, Default)]
struct AddressIndex {
    v4: HashMap<u32, u32>,
    v6: HashMap<[u8; 16], u32>,
}

impl AddressIndex {
    fn get(&self, ip: &IpAddr) -> Option<u32> {
        match ip {
            IpAddr::V4(a) => self.v4.get(&a.to_bits()).copied(),
            IpAddr::V6(a) => self.v6.get(&a.octets()).copied(),
        }
    }
    fn insert(&mut self, ip: IpAddr, idx: u32) {
        match ip {
            IpAddr::V4(a) => self.v4.insert(a.to_bits(), idx),
            IpAddr::V6(a) => self.v6.insert(a.octets(), idx),
        };
    }
    fn remove(&mut self, ip: &IpAddr) {
        match ip {
            IpAddr::V4(a) => self.v4.remove(&a.to_bits()),
            IpAddr::V6(a) => self.v6.remove(&a.octets()),
        };
    }
    fn len(&self) -> usize {
        self.v4.len() + self.v6.len()
    }
}

/// A PeerAuthentication as the policy module evaluates it, with the relist epoch.
#[derive(Debug)]
struct PolicyRec {
    rule: Rule,
    epoch: u32,
}

#[derive(Debug)]
struct NamespaceRec {
    injection: Injection,
    epoch: u32,
}

#[derive(Debug)]
struct NodeRec {
    addresses: Vec<IpAddr>,
    epoch: u32,
}

/// The parts of a pod the store keeps, extracted from the API object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodSummary {
    pub namespace: String,
    pub name: String,
    pub workload: String,
    pub kind: WorkloadKind,
    pub service_account: String,
    pub labels: Vec<(String, String)>,
    pub node_name: Option<String>,
    pub host_network: bool,
    pub live: bool,
    pub sidecar: bool,
    pub ips: Vec<IpAddr>,
    pub created: u32,
    /// Inbound capture annotations and unrewritten probe ports (see `inbound.rs`).
    pub inbound: InboundCapture,
}

impl PodSummary {
    /// Extracts what the store needs from a Pod object.
    pub fn from_pod(pod: &Pod) -> Option<PodSummary> {
        let meta = &pod.metadata;
        let namespace = meta.namespace.clone()?;
        let name = meta.name.clone()?;
        let labels = meta.labels.as_ref();
        let (workload, kind) = workload_of(pod);
        let spec = pod.spec.as_ref();
        let status = pod.status.as_ref();
        let phase = status.and_then(|s| s.phase.as_deref());
        let live = !matches!(phase, Some("Succeeded" | "Failed"));
        let mut ips: Vec<IpAddr> = Vec::new();
        if let Some(st) = status {
            for p in st.pod_ips.iter().flatten() {
                if let Ok(ip) = p.ip.parse::<IpAddr>() {
                    ips.push(super::canonical(ip));
                }
            }
            if ips.is_empty()
                && let Some(ip) = st.pod_ip.as_deref().and_then(|s| s.parse::<IpAddr>().ok())
            {
                ips.push(super::canonical(ip));
            }
        }
        let sidecar = spec.is_some_and(|s| {
            s.containers.iter().any(|c| c.name == "istio-proxy")
                || s.init_containers.iter().flatten().any(|c| {
                    c.name == "istio-proxy" && c.restart_policy.as_deref() == Some("Always")
                })
        }) || meta
            .annotations
            .as_ref()
            .is_some_and(|a| a.contains_key("sidecar.istio.io/status"));
        Some(PodSummary {
            namespace,
            name,
            workload,
            kind,
            service_account: spec
                .and_then(|s| {
                    s.service_account_name
                        .clone()
                        .or_else(|| s.service_account.clone())
                })
                .unwrap_or_else(|| "default".into()),
            labels: labels
                .map(|l| l.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
                .unwrap_or_default(),
            node_name: spec.and_then(|s| s.node_name.clone()),
            host_network: spec.and_then(|s| s.host_network).unwrap_or(false),
            live,
            sidecar,
            ips,
            created: meta
                .creation_timestamp
                .as_ref()
                .map(|t| t.0.as_second().clamp(0, u32::MAX as i64) as u32)
                .unwrap_or(0),
            inbound: InboundCapture::from_pod(pod),
        })
    }
}

/// The workload a pod belongs to, from its controller owner reference, without reading the
/// owners: a ReplicaSet named `<deployment>-<pod-template-hash>` belongs to that Deployment (the
/// hash is the pod's `pod-template-hash` label); a Job named `<cronjob>-<minutes>` (8+ digits,
/// the CronJob controller's naming of scheduled runs) belongs to that CronJob.
pub fn workload_of(pod: &Pod) -> (String, WorkloadKind) {
    let meta = &pod.metadata;
    let owner = meta
        .owner_references
        .iter()
        .flatten()
        .find(|o| o.controller == Some(true))
        .or_else(|| meta.owner_references.iter().flatten().next());
    let Some(owner) = owner else {
        return (meta.name.clone().unwrap_or_default(), WorkloadKind::Pod);
    };
    let label = |k: &str| meta.labels.as_ref().and_then(|l| l.get(k));
    match owner.kind.as_str() {
        "ReplicaSet" => match label("pod-template-hash")
            .and_then(|h| owner.name.strip_suffix(h.as_str()))
            .and_then(|s| s.strip_suffix('-'))
            .filter(|s| !s.is_empty())
        {
            Some(deploy) => (deploy.to_owned(), WorkloadKind::Deployment),
            None => (owner.name.clone(), WorkloadKind::ReplicaSet),
        },
        "StatefulSet" => (owner.name.clone(), WorkloadKind::StatefulSet),
        "DaemonSet" => (owner.name.clone(), WorkloadKind::DaemonSet),
        "Job" => match cronjob_of(&owner.name) {
            Some(cj) => (cj.to_owned(), WorkloadKind::CronJob),
            None => (owner.name.clone(), WorkloadKind::Job),
        },
        _ => (owner.name.clone(), WorkloadKind::Other),
    }
}

/// `backup-29012345` → `backup`: the CronJob controller names each Job after the scheduled time
/// in minutes since the epoch.
fn cronjob_of(job: &str) -> Option<&str> {
    let (prefix, suffix) = job.rsplit_once('-')?;
    (suffix.len() >= 8 && suffix.bytes().all(|b| b.is_ascii_digit()) && !prefix.is_empty())
        .then_some(prefix)
}

/// Workload name → the label sets of its pods, with pod counts.
type WorkloadLabels = HashMap<Arc<str>, Vec<(Arc<LabelSet>, u32)>>;

/// The store. See the module documentation.
#[derive(Debug)]
pub struct KubeStore {
    cfg: KubeConfig,
    hasher: RandomState,
    strings: HashSet<Arc<str>>,
    label_sets: HashSet<Arc<LabelSet>>,
    workload_arcs: HashSet<Arc<Workload>>,
    pods: Slab,
    by_name: HashTable<u32>,
    ips: AddressIndex,
    /// Workloads with pods on this node (or everywhere without a node name): pod counts.
    local: HashMap<Arc<Workload>, u32>,
    local_list: Vec<Arc<Workload>>,
    /// namespace → workload name → label sets of its pods, with pod counts (for `mode`).
    workload_labels: HashMap<Arc<str>, WorkloadLabels>,
    namespaces: HashMap<Arc<str>, NamespaceRec>,
    nodes: HashMap<Arc<str>, NodeRec>,
    /// Addresses of every node → node name.
    node_ips: HashMap<IpAddr, Arc<str>>,
    policies: HashMap<Arc<str>, Vec<PolicyRec>>,
    /// Slab index → the pod's inbound capture, only for pods that have one other than the
    /// default (few do), so the common pod costs nothing here; values shared.
    inbound: HashMap<u32, Arc<InboundCapture>>,
    inbound_sets: HashSet<Arc<InboundCapture>>,
    epochs: [u32; 4],
    synced: [bool; 4],
}

impl KubeStore {
    pub fn new(cfg: KubeConfig) -> Self {
        Self {
            cfg,
            hasher: RandomState::new(),
            strings: HashSet::new(),
            label_sets: HashSet::new(),
            workload_arcs: HashSet::new(),
            pods: Slab::default(),
            by_name: HashTable::new(),
            ips: AddressIndex::default(),
            local: HashMap::new(),
            local_list: Vec::new(),
            workload_labels: HashMap::new(),
            namespaces: HashMap::new(),
            nodes: HashMap::new(),
            node_ips: HashMap::new(),
            policies: HashMap::new(),
            inbound: HashMap::new(),
            inbound_sets: HashSet::new(),
            epochs: [1; 4],
            synced: [false; 4],
        }
    }

    pub fn config(&self) -> &KubeConfig {
        &self.cfg
    }

    fn intern(&mut self, s: &str) -> Arc<str> {
        if let Some(a) = self.strings.get(s) {
            return a.clone();
        }
        let a: Arc<str> = Arc::from(s);
        self.strings.insert(a.clone());
        a
    }

    fn intern_labels(&mut self, labels: &[(&str, &str)]) -> Arc<LabelSet> {
        let mut v: Vec<(Arc<str>, Arc<str>)> = labels
            .iter()
            .map(|(k, v)| (self.intern(k), self.intern(v)))
            .collect();
        v.sort();
        let set: Arc<LabelSet> = Arc::new(v.into_boxed_slice());
        if let Some(a) = self.label_sets.get(&set) {
            return a.clone();
        }
        self.label_sets.insert(set.clone());
        set
    }

    fn intern_workload(&mut self, namespace: &str, name: &str, sidecar: bool) -> Arc<Workload> {
        let w = Workload {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            sidecar,
        };
        if let Some(a) = self.workload_arcs.get(&w) {
            return a.clone();
        }
        let a = Arc::new(w);
        self.workload_arcs.insert(a.clone());
        a
    }

    // ---------------------------------------------------------------- relists

    /// A relist of `res` starts (`Init`): what it does not list again is dropped at `InitDone`.
    pub fn begin_relist(&mut self, res: Resource) {
        self.epochs[res.index()] = self.epochs[res.index()].wrapping_add(1);
    }

    /// The relist of `res` is complete (`InitDone`).
    pub fn end_relist(&mut self, res: Resource) {
        let epoch = self.epochs[res.index()];
        match res {
            Resource::Pods => {
                let stale: Vec<u32> = self
                    .pods
                    .iter()
                    .filter(|(_, p)| p.epoch != epoch)
                    .map(|(i, _)| i)
                    .collect();
                for i in stale {
                    self.remove_pod_at(i);
                }
                // Interned values nobody uses any more (e.g. the pod-template-hash of a finished
                // rollout): a relist is a cheap moment to let them go.
                self.label_sets.retain(|s| Arc::strong_count(s) > 1);
                self.workload_arcs.retain(|w| Arc::strong_count(w) > 1);
                self.strings.retain(|s| Arc::strong_count(s) > 1);
                self.inbound_sets.retain(|s| Arc::strong_count(s) > 1);
            }
            Resource::Namespaces => self.namespaces.retain(|_, n| n.epoch == epoch),
            Resource::Nodes => {
                self.nodes.retain(|_, n| n.epoch == epoch);
                self.rebuild_node_ips();
            }
            Resource::PeerAuthentications => {
                for list in self.policies.values_mut() {
                    list.retain(|p| p.epoch == epoch);
                }
                self.policies.retain(|_, l| !l.is_empty());
            }
        }
        self.synced[res.index()] = true;
    }

    /// Marks a resource as listed without objects (e.g. PeerAuthentication when Istio's CRDs
    /// are not installed): everything of it is dropped.
    pub fn set_empty(&mut self, res: Resource) {
        self.begin_relist(res);
        self.end_relist(res);
    }

    /// Whether the first complete list of `res` has been applied.
    pub fn is_synced(&self, res: Resource) -> bool {
        self.synced[res.index()]
    }

    // ---------------------------------------------------------------- pods

    fn pod_hash(&self, namespace: &str, name: &str) -> u64 {
        self.hasher.hash_one((namespace, name))
    }

    fn find_pod(&self, namespace: &str, name: &str) -> Option<u32> {
        let h = self.pod_hash(namespace, name);
        self.by_name
            .find(h, |&i| {
                self.pods
                    .get(i)
                    .is_some_and(|p| p.namespace() == namespace && &*p.name == name)
            })
            .copied()
    }

    pub fn apply_pod(&mut self, pod: &Pod) {
        if let Some(s) = PodSummary::from_pod(pod) {
            self.apply_pod_summary(&s);
        }
    }

    pub fn delete_pod(&mut self, pod: &Pod) {
        if let (Some(ns), Some(name)) = (&pod.metadata.namespace, &pod.metadata.name) {
            self.delete_pod_named(ns, name);
        }
    }

    pub fn delete_pod_named(&mut self, namespace: &str, name: &str) {
        if let Some(i) = self.find_pod(namespace, name) {
            self.remove_pod_at(i);
        }
    }

    /// Adds or replaces a pod. Its addresses point to it at once, also when another pod still
    /// holds them (an address reused by a new pod, the old pod's deletion not seen yet), unless
    /// that pod is live and newer.
    pub fn apply_pod_summary(&mut self, s: &PodSummary) {
        if let Some(i) = self.find_pod(&s.namespace, &s.name) {
            self.remove_pod_at(i);
        }
        let local = match &self.cfg.node_name {
            Some(n) => s.node_name.as_deref() == Some(n.as_str()),
            None => true,
        };
        let namespace = self.intern(&s.namespace);
        let workload = self.intern_workload(&s.namespace, &s.workload, s.sidecar);
        let index = s.name.rsplit_once('-').map(|(_, i)| i);
        let mut extra = 0;
        let kept: Vec<(&str, &str)> = s
            .labels
            .iter()
            .filter(|(k, v)| {
                if k == POD_NAME_LABEL && *v == s.name {
                    extra |= F_POD_NAME_LABEL;
                    false
                } else if k == POD_INDEX_LABEL && Some(v.as_str()) == index {
                    extra |= F_POD_INDEX_LABEL;
                    false
                } else {
                    true
                }
            })
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let labels = self.intern_labels(&kept);
        let service_account = self.intern(&s.service_account);
        let (mut v4, mut v6) = (None, None);
        for ip in &s.ips {
            match ip {
                IpAddr::V4(a) if v4.is_none() => v4 = Some(*a),
                IpAddr::V6(a) if v6.is_none() => v6 = Some(*a),
                _ => {}
            }
        }
        let mut flags = extra;
        for (on, f) in [
            (local, F_LOCAL),
            (s.host_network, F_HOST_NETWORK),
            (s.live, F_LIVE),
            (s.sidecar, F_SIDECAR),
        ] {
            if on {
                flags |= f;
            }
        }
        let rec = PodRec {
            name: s.name.as_str().into(),
            service_account,
            workload: workload.clone(),
            labels: labels.clone(),
            created: s.created,
            epoch: self.epochs[Resource::Pods.index()],
            v4,
            v6,
            kind: s.kind,
            flags,
        };
        let idx = self.pods.insert(rec);
        if !s.inbound.is_default() {
            let shared = match self.inbound_sets.get(&s.inbound) {
                Some(a) => a.clone(),
                None => {
                    let a = Arc::new(s.inbound.clone());
                    self.inbound_sets.insert(a.clone());
                    a
                }
            };
            self.inbound.insert(idx, shared);
        }
        let h = self.pod_hash(&s.namespace, &s.name);
        let pods = &self.pods;
        let hasher = &self.hasher;
        self.by_name.insert_unique(h, idx, |&i| {
            let p = pods.get(i).expect("indexed pods exist");
            hasher.hash_one((p.namespace(), &*p.name))
        });
        // Addresses: hostNetwork pods have the node's address, which stays the node's.
        if s.live && !s.host_network {
            let ips: Vec<IpAddr> = self.pods.get(idx).expect("just inserted").ips().collect();
            for ip in ips {
                let claim = match self.ips.get(&ip) {
                    None => true,
                    Some(other) => match self.pods.get(other) {
                        Some(o) => !(o.has(F_LIVE) && o.created > s.created),
                        None => true,
                    },
                };
                if claim {
                    self.ips.insert(ip, idx);
                }
            }
        }
        if local {
            self.local_add(&workload);
        }
        let wl_name = self.intern(&s.workload);
        let sets = self
            .workload_labels
            .entry(namespace)
            .or_default()
            .entry(wl_name)
            .or_default();
        match sets.iter_mut().find(|(l, _)| Arc::ptr_eq(l, &labels)) {
            Some((_, n)) => *n += 1,
            None => sets.push((labels, 1)),
        }
    }

    fn remove_pod_at(&mut self, idx: u32) {
        let Some(rec) = self.pods.take(idx) else {
            return;
        };
        self.inbound.remove(&idx);
        let h = self.pod_hash(rec.namespace(), &rec.name);
        if let Ok(e) = self.by_name.find_entry(h, |&i| i == idx) {
            e.remove();
        }
        for ip in rec.ips() {
            if self.ips.get(&ip) == Some(idx) {
                self.ips.remove(&ip);
            }
        }
        if rec.has(F_LOCAL) {
            self.local_remove(&rec.workload);
        }
        if let Some(by_wl) = self.workload_labels.get_mut(rec.namespace()) {
            if let Some(sets) = by_wl.get_mut(rec.workload.name.as_str()) {
                if let Some(pos) = sets.iter().position(|(l, _)| Arc::ptr_eq(l, &rec.labels)) {
                    sets[pos].1 -= 1;
                    if sets[pos].1 == 0 {
                        sets.swap_remove(pos);
                    }
                }
                if sets.is_empty() {
                    by_wl.remove(rec.workload.name.as_str());
                }
            }
            if by_wl.is_empty() {
                self.workload_labels.remove(rec.namespace());
            }
        }
    }

    fn local_add(&mut self, w: &Arc<Workload>) {
        let n = self.local.entry(w.clone()).or_insert(0);
        *n += 1;
        if *n == 1 {
            self.rebuild_local_list();
        }
    }

    fn local_remove(&mut self, w: &Arc<Workload>) {
        if let Some(n) = self.local.get_mut(w) {
            *n -= 1;
            if *n == 0 {
                self.local.remove(w);
                self.rebuild_local_list();
            }
        }
    }

    fn rebuild_local_list(&mut self) {
        self.local_list = self.local.keys().cloned().collect();
        self.local_list.sort();
    }

    // ---------------------------------------------------------------- namespaces, nodes

    pub fn apply_namespace(&mut self, ns: &Namespace) {
        let Some(name) = ns.metadata.name.as_deref() else {
            return;
        };
        let name = self.intern(name);
        let rec = NamespaceRec {
            injection: Injection::from_labels(ns.metadata.labels.as_ref()),
            epoch: self.epochs[Resource::Namespaces.index()],
        };
        self.namespaces.insert(name, rec);
    }

    pub fn delete_namespace(&mut self, ns: &Namespace) {
        if let Some(name) = ns.metadata.name.as_deref() {
            self.namespaces.remove(name);
        }
    }

    pub fn apply_node(&mut self, node: &Node) {
        let Some(name) = node.metadata.name.as_deref() else {
            return;
        };
        let name = self.intern(name);
        let addresses: Vec<IpAddr> = node
            .status
            .as_ref()
            .and_then(|s| s.addresses.as_ref())
            .into_iter()
            .flatten()
            .filter(|a| a.type_ == "InternalIP" || a.type_ == "ExternalIP")
            .filter_map(|a| a.address.parse::<IpAddr>().ok())
            .map(super::canonical)
            .collect();
        let rec = NodeRec {
            addresses,
            epoch: self.epochs[Resource::Nodes.index()],
        };
        self.nodes.insert(name, rec);
        self.rebuild_node_ips();
    }

    pub fn delete_node(&mut self, node: &Node) {
        if let Some(name) = node.metadata.name.as_deref() {
            self.nodes.remove(name);
            self.rebuild_node_ips();
        }
    }

    fn rebuild_node_ips(&mut self) {
        self.node_ips.clear();
        for (name, n) in &self.nodes {
            for ip in &n.addresses {
                self.node_ips.insert(*ip, name.clone());
            }
        }
    }

    // ---------------------------------------------------------------- PeerAuthentications

    /// Adds or replaces a PeerAuthentication given as the API's JSON object (any version).
    pub fn apply_peer_authentication(&mut self, obj: &serde_json::Value) {
        let Some((ns, rec)) = parse_policy(obj, self.epochs[Resource::PeerAuthentications.index()])
        else {
            return;
        };
        let ns = self.intern(&ns);
        let list = self.policies.entry(ns).or_default();
        list.retain(|p| p.rule.name != rec.rule.name);
        list.push(rec);
    }

    pub fn delete_peer_authentication(&mut self, obj: &serde_json::Value) {
        let meta = &obj["metadata"];
        if let (Some(ns), Some(name)) = (meta["namespace"].as_str(), meta["name"].as_str())
            && let Some(list) = self.policies.get_mut(ns)
        {
            list.retain(|p| p.rule.name != name);
            if list.is_empty() {
                self.policies.remove(ns);
            }
        }
    }

    /// The effective mode for a pod with `labels` in `namespace` on `port`, by Istio's
    /// precedence (see [`crate::policy::effective`]).
    fn effective<'a>(
        &'a self,
        namespace: &str,
        labels: impl Fn(&str, &str) -> bool + 'a,
        port: Option<u16>,
    ) -> EffectiveMode {
        crate::policy::effective(
            &self.cfg.root_namespace,
            namespace,
            |ns| self.policies.get(ns).into_iter().flatten().map(|p| &p.rule),
            labels,
            port,
        )
    }

    /// The PeerAuthentications that can apply in `namespace`: its own and the root namespace's.
    pub fn rules_for(&self, namespace: &str) -> Vec<Rule> {
        let mut out: Vec<Rule> = [namespace, self.cfg.root_namespace.as_str()]
            .iter()
            .flat_map(|ns| self.policies.get(*ns).into_iter().flatten())
            .map(|p| p.rule.clone())
            .collect();
        out.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        out.dedup_by(|a, b| a.namespace == b.namespace && a.name == b.name);
        out
    }

    /// The labels every pod of a workload has, for a PeerAuthentication selector: without the
    /// ones that change with each rollout or pod (`pod-template-hash`, …), so the selector keeps
    /// matching. `None` for a workload without known pods.
    pub fn selector_labels(
        &self,
        namespace: &str,
        workload: &str,
    ) -> Option<BTreeMap<String, String>> {
        const VOLATILE: [&str; 5] = [
            "pod-template-hash",
            "controller-revision-hash",
            "pod-template-generation",
            "batch.kubernetes.io/controller-uid",
            "controller-uid",
        ];
        let sets = self.workload_labels.get(namespace)?.get(workload)?;
        let (first, rest) = sets.split_first()?;
        Some(
            first
                .0
                .iter()
                .filter(|(k, v)| {
                    !VOLATILE.contains(&&**k)
                        && rest
                            .iter()
                            .all(|(set, _)| set.iter().any(|(kk, vv)| kk == k && vv == v))
                })
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        )
    }

    fn namespace_known(&self, namespace: &str) -> bool {
        self.namespaces.contains_key(namespace) || self.workload_labels.contains_key(namespace)
    }

    /// The effective mode of `workload` in `namespace` on `port` (`None`: any port). Evaluated
    /// on the labels most of the workload's pods have; a workload without known pods gets the
    /// namespace/mesh mode. `None` when the namespace is unknown.
    pub fn effective_mode(
        &self,
        namespace: &str,
        workload: Option<&str>,
        port: Option<u16>,
    ) -> Option<EffectiveMode> {
        if !self.namespace_known(namespace) {
            return None;
        }
        let set: Option<&Arc<LabelSet>> = workload.and_then(|w| {
            self.workload_labels
                .get(namespace)
                .and_then(|m| m.get(w))
                .and_then(|sets| sets.iter().max_by_key(|(_, n)| *n))
                .map(|(l, _)| l)
        });
        Some(match set {
            Some(set) => self.effective(namespace, label_matcher(set, "", 0), port),
            None => self.effective(namespace, |_, _| false, port),
        })
    }

    /// The effective mode for the pod behind `ip` on `port`, from that pod's own labels.
    pub fn effective_mode_for_ip(&self, ip: IpAddr, port: u16) -> Option<EffectiveMode> {
        let p = self.pods.get(self.ips.get(&super::canonical(ip))?)?;
        Some(self.effective(
            p.namespace(),
            label_matcher(&p.labels, &p.name, p.flags),
            Some(port),
        ))
    }

    // ---------------------------------------------------------------- lookups

    pub fn lookup(&self, ip: IpAddr) -> Option<&Arc<Workload>> {
        self.pods
            .get(self.ips.get(&super::canonical(ip))?)
            .map(|p| &p.workload)
    }

    pub fn pod(&self, ip: IpAddr) -> Option<PodIdentity> {
        let p = self.pods.get(self.ips.get(&super::canonical(ip))?)?;
        Some(PodIdentity {
            namespace: p.namespace().to_owned(),
            pod: p.name.to_string(),
            workload: p.workload.name.clone(),
            workload_kind: p.kind,
            service_account: p.service_account.to_string(),
            spiffe_id: format!(
                "spiffe://{}/ns/{}/sa/{}",
                self.cfg.trust_domain,
                p.namespace(),
                p.service_account
            ),
            sidecar: p.has(F_SIDECAR),
            local: p.has(F_LOCAL),
        })
    }

    /// Live pods of this node with their own addresses (not hostNetwork): `(namespace, pod,
    /// addresses)`. For the coverage check (`identity::coverage`).
    pub fn local_pods(
        &self,
    ) -> impl Iterator<Item = (&str, &str, impl Iterator<Item = IpAddr> + '_)> {
        self.pods
            .iter()
            .map(|(_, p)| p)
            .filter(|p| p.has(F_LOCAL) && p.has(F_LIVE) && !p.has(F_HOST_NETWORK))
            .map(|p| (p.namespace(), &*p.name, p.ips()))
    }

    /// How the pod behind `ip` treats inbound `port`: capture annotations, ambient mode (pod
    /// label, else namespace label; not with a sidecar), unrewritten probes. `None`: not a pod.
    pub fn inbound_port(&self, ip: IpAddr, port: u16) -> Option<InboundPort> {
        let idx = self.ips.get(&super::canonical(ip))?;
        let p = self.pods.get(idx)?;
        let capture = self.inbound.get(&idx);
        let pod_mode = p
            .labels
            .binary_search_by(|(k, _)| (**k).cmp(inbound::DATAPLANE_MODE))
            .ok()
            .map(|i| &*p.labels[i].1);
        let ns_mode = self
            .namespaces
            .get(p.namespace())
            .and_then(|n| n.injection.dataplane_mode.as_deref());
        Some(InboundPort {
            excluded: capture.is_some_and(|c| !c.captures(port)),
            ambient: inbound::ambient(p.has(F_SIDECAR), pod_mode, ns_mode),
            unrewritten_probe: capture.is_some_and(|c| c.probe_on(port)),
        })
    }

    /// The node that has `ip` as an InternalIP/ExternalIP (hostNetwork pods resolve here).
    pub fn node_of(&self, ip: IpAddr) -> Option<&str> {
        self.node_ips.get(&super::canonical(ip)).map(|n| &**n)
    }

    /// Whether `ip` is an address of this agent's node (a kubelet probe source).
    pub fn is_local_node(&self, ip: IpAddr) -> bool {
        match (
            &self.cfg.node_name,
            self.node_ips.get(&super::canonical(ip)),
        ) {
            (Some(me), Some(n)) => **n == **me,
            _ => false,
        }
    }

    /// Workloads with a pod on this node, sorted.
    pub fn local_workloads(&self) -> &[Arc<Workload>] {
        &self.local_list
    }

    /// Namespaces known from the Namespace objects and from pods.
    pub fn namespace_names(&self) -> impl Iterator<Item = &str> {
        self.namespaces
            .keys()
            .chain(self.workload_labels.keys())
            .map(|s| &**s)
    }

    pub fn injection(&self, namespace: &str) -> Option<&Injection> {
        self.namespaces.get(namespace).map(|n| &n.injection)
    }

    /// Pods in the store.
    pub fn pod_count(&self) -> usize {
        self.pods.len()
    }

    /// Addresses that resolve to a pod.
    pub fn address_count(&self) -> usize {
        self.ips.len()
    }
}

/// Whether a pod's labels include `k=v`; the StatefulSet per-pod labels come from its name.
fn label_matcher<'a>(
    set: &'a LabelSet,
    name: &'a str,
    flags: u8,
) -> impl Fn(&str, &str) -> bool + 'a {
    move |k: &str, v: &str| {
        if k == POD_NAME_LABEL && flags & F_POD_NAME_LABEL != 0 {
            return v == name;
        }
        if k == POD_INDEX_LABEL && flags & F_POD_INDEX_LABEL != 0 {
            return name.rsplit_once('-').is_some_and(|(_, i)| i == v);
        }
        set.binary_search_by(|(kk, _)| (**kk).cmp(k))
            .is_ok_and(|i| &*set[i].1 == v)
    }
}

/// (namespace, policy) from a PeerAuthentication object; `None` when it has no namespace/name.
fn parse_policy(obj: &serde_json::Value, epoch: u32) -> Option<(String, PolicyRec)> {
    #[derive(Deserialize, Default)]
    #[serde(rename_all = "camelCase")]
    struct Spec {
        #[serde(default)]
        selector: Option<Selector>,
        #[serde(default)]
        mtls: Option<Mtls>,
        #[serde(default)]
        port_level_mtls: Option<BTreeMap<String, Mtls>>,
    }
    #[derive(Deserialize, Default)]
    #[serde(rename_all = "camelCase")]
    struct Selector {
        #[serde(default)]
        match_labels: Option<BTreeMap<String, String>>,
    }
    #[derive(Deserialize, Default)]
    struct Mtls {
        #[serde(default)]
        mode: Option<serde_json::Value>,
    }
    let meta = &obj["metadata"];
    let ns = meta["namespace"].as_str()?.to_owned();
    let name = meta["name"].as_str()?;
    let spec: Spec = serde_json::from_value(obj["spec"].clone()).unwrap_or_default();
    // Istio reads an unknown mode as UNSET; so does the agent (inherit).
    let mode_of = |m: &Option<Mtls>| {
        m.as_ref()
            .and_then(|m| m.mode.as_ref())
            .and_then(|v| match v {
                serde_json::Value::String(s) => Mode::parse(s),
                // The protobuf enum number, as some tools write it.
                serde_json::Value::Number(n) => match n.as_u64() {
                    Some(1) => Some(Mode::Disable),
                    Some(2) => Some(Mode::Permissive),
                    Some(3) => Some(Mode::Strict),
                    _ => Some(Mode::Unset),
                },
                _ => None,
            })
            .unwrap_or(Mode::Unset)
    };
    let selector = spec
        .selector
        .and_then(|s| s.match_labels)
        .filter(|m| !m.is_empty())
        .map(|m| m.into_iter().collect::<Vec<_>>());
    let ports = spec
        .port_level_mtls
        .unwrap_or_default()
        .into_iter()
        .filter_map(|(p, m)| Some((p.parse::<u32>().ok()?, mode_of(&Some(m)))))
        .collect();
    let created = meta["creationTimestamp"]
        .as_str()
        .and_then(|t| t.parse::<k8s_openapi::jiff::Timestamp>().ok())
        .map(|t| t.as_second())
        .unwrap_or(0);
    Some((
        ns.clone(),
        PolicyRec {
            rule: Rule {
                namespace: ns,
                name: name.into(),
                selector,
                mode: mode_of(&spec.mtls),
                ports,
                created,
            },
            epoch,
        },
    ))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn pod(v: serde_json::Value) -> Pod {
        serde_json::from_value(v).unwrap()
    }

    fn owned(name: &str, kind: &str, owner: &str, labels: serde_json::Value) -> Pod {
        pod(json!({
            "metadata": {"name": name, "namespace": "ns", "labels": labels,
                "ownerReferences": [{"apiVersion": "apps/v1", "kind": kind, "name": owner,
                                     "uid": "u", "controller": true}]},
        }))
    }

    #[test]
    fn owner_chains_without_reading_owners() {
        let cases = [
            (
                owned(
                    "web-7d9f8c6b5d-x2x9k",
                    "ReplicaSet",
                    "web-7d9f8c6b5d",
                    json!({"pod-template-hash": "7d9f8c6b5d"}),
                ),
                ("web", WorkloadKind::Deployment),
            ),
            // A ReplicaSet whose name does not end in the hash is its own workload.
            (
                owned("rs-abc", "ReplicaSet", "handmade", json!({})),
                ("handmade", WorkloadKind::ReplicaSet),
            ),
            (
                owned("db-0", "StatefulSet", "db", json!({})),
                ("db", WorkloadKind::StatefulSet),
            ),
            (
                owned("agent-x", "DaemonSet", "agent", json!({})),
                ("agent", WorkloadKind::DaemonSet),
            ),
            (
                owned("backup-29399820-4wq8z", "Job", "backup-29399820", json!({})),
                ("backup", WorkloadKind::CronJob),
            ),
            (
                owned("migrate-abcde", "Job", "migrate", json!({})),
                ("migrate", WorkloadKind::Job),
            ),
            (
                owned("r-1", "Rollout", "r", json!({})),
                ("r", WorkloadKind::Other),
            ),
            (
                pod(json!({"metadata": {"name": "bare", "namespace": "ns"}})),
                ("bare", WorkloadKind::Pod),
            ),
        ];
        for (p, (name, kind)) in cases {
            assert_eq!(
                workload_of(&p),
                (name.to_owned(), kind),
                "{:?}",
                p.metadata.name
            );
        }
        assert_eq!(
            cronjob_of("nightly-report-29399820"),
            Some("nightly-report")
        );
        assert_eq!(
            cronjob_of("job-1234567"),
            None,
            "7 digits is not a schedule"
        );
        assert_eq!(cronjob_of("-29399820"), None);
    }

    #[test]
    fn sidecar_detection_and_host_network() {
        let native = pod(json!({
            "metadata": {"name": "a", "namespace": "ns"},
            "spec": {"containers": [{"name": "app"}],
                     "initContainers": [{"name": "istio-proxy", "restartPolicy": "Always"}]},
            "status": {"podIPs": [{"ip": "10.0.0.1"}, {"ip": "fd00::1"}], "phase": "Running"}
        }));
        let s = PodSummary::from_pod(&native).unwrap();
        assert!(s.sidecar && s.live);
        assert_eq!(s.ips.len(), 2);
        assert_eq!(s.service_account, "default");
        let plain_init = pod(json!({
            "metadata": {"name": "b", "namespace": "ns"},
            "spec": {"containers": [{"name": "app"}], "initContainers": [{"name": "istio-proxy"}]}
        }));
        assert!(!PodSummary::from_pod(&plain_init).unwrap().sidecar);
        let mut store = KubeStore::new(KubeConfig::default());
        store.apply_pod(&pod(json!({
            "metadata": {"name": "kp", "namespace": "kube-system"},
            "spec": {"containers": [{"name": "kp"}], "hostNetwork": true},
            "status": {"podIP": "10.0.0.9", "phase": "Running"}
        })));
        assert!(store.lookup("10.0.0.9".parse().unwrap()).is_none());
        assert_eq!(store.pod_count(), 1);
    }

    #[test]
    fn modes_follow_istio_precedence() {
        let mut store = KubeStore::new(KubeConfig::default());
        let pa = |ns: &str, name: &str, created: &str, spec: serde_json::Value| {
            json!({"metadata": {"namespace": ns, "name": name, "creationTimestamp": created},
                   "spec": spec})
        };
        store.apply_peer_authentication(&pa(
            "istio-system",
            "mesh",
            "2026-01-01T00:00:00Z",
            json!({"mtls": {"mode": "STRICT"}}),
        ));
        store.apply_pod_summary(&PodSummary {
            namespace: "app".into(),
            name: "db-0".into(),
            workload: "db".into(),
            kind: WorkloadKind::StatefulSet,
            service_account: "db".into(),
            labels: vec![
                ("app".into(), "db".into()),
                (POD_NAME_LABEL.into(), "db-0".into()),
                (POD_INDEX_LABEL.into(), "0".into()),
            ],
            node_name: None,
            host_network: false,
            live: true,
            sidecar: true,
            ips: vec!["10.1.0.1".parse().unwrap()],
            created: 1,
            inbound: InboundCapture::default(),
        });
        let at = |s: &KubeStore, port| {
            s.effective_mode_for_ip("10.1.0.1".parse().unwrap(), port)
                .unwrap()
        };
        assert_eq!(at(&store, 5432).source, ModeSource::Mesh);
        // Two namespace-wide policies: the oldest wins.
        store.apply_peer_authentication(&pa(
            "app",
            "newer",
            "2026-03-01T00:00:00Z",
            json!({"mtls": {"mode": "DISABLE"}}),
        ));
        store.apply_peer_authentication(&pa(
            "app",
            "older",
            "2026-02-01T00:00:00Z",
            json!({"mtls": {"mode": "permissive"}}),
        ));
        assert_eq!(
            (at(&store, 5432).mode, at(&store, 5432).policy.as_deref()),
            (Mode::Permissive, Some("app/older"))
        );
        // A selector on the StatefulSet's per-pod label still matches, and port-level wins.
        store.apply_peer_authentication(&pa(
            "app",
            "db-0-only",
            "2026-04-01T00:00:00Z",
            json!({"selector": {"matchLabels": {POD_NAME_LABEL: "db-0"}},
                   "portLevelMtls": {"5432": {"mode": "STRICT"}}}),
        ));
        assert_eq!(at(&store, 5432).mode, Mode::Strict);
        assert_eq!(at(&store, 5432).source, ModeSource::WorkloadPort);
        // UNSET at workload level for other ports: the namespace decides.
        assert_eq!(at(&store, 8080).source, ModeSource::Namespace);
        store.delete_peer_authentication(&pa("app", "older", "", json!({})));
        assert_eq!(at(&store, 8080).mode, Mode::Disable);
        // Relist without the mesh policy drops it.
        store.begin_relist(Resource::PeerAuthentications);
        store.apply_peer_authentication(&pa(
            "app",
            "newer",
            "2026-03-01T00:00:00Z",
            json!({"mtls": {"mode": "UNSET"}}),
        ));
        store.end_relist(Resource::PeerAuthentications);
        assert_eq!(at(&store, 8080).source, ModeSource::Default);
        assert_eq!(at(&store, 8080).mode, Mode::Permissive);
        assert_eq!(Mode::parse("Strict"), Some(Mode::Strict));
        assert_eq!(Mode::parse("bogus"), None);
    }

    #[test]
    fn selector_labels_are_shared_and_stable() {
        let mut store = KubeStore::new(KubeConfig::default());
        let pod = |name: &str, labels: &[(&str, &str)], ip: &str| PodSummary {
            namespace: "shop".into(),
            name: name.into(),
            workload: "web".into(),
            kind: WorkloadKind::Deployment,
            service_account: "web".into(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            node_name: None,
            host_network: false,
            live: true,
            sidecar: true,
            ips: vec![ip.parse().unwrap()],
            created: 1,
            inbound: InboundCapture::default(),
        };
        store.apply_pod_summary(&pod(
            "web-a-1",
            &[
                ("app", "web"),
                ("pod-template-hash", "a"),
                ("tier", "front"),
            ],
            "10.2.0.1",
        ));
        store.apply_pod_summary(&pod(
            "web-b-1",
            &[
                ("app", "web"),
                ("pod-template-hash", "b"),
                ("version", "v2"),
            ],
            "10.2.0.2",
        ));
        // Mid-rollout: only what both pods share, never the per-rollout hash.
        let want: BTreeMap<String, String> = [("app".to_string(), "web".to_string())].into();
        assert_eq!(store.selector_labels("shop", "web"), Some(want));
        assert_eq!(store.selector_labels("shop", "nope"), None);
    }

    #[test]
    fn injection_labels() {
        let l = |pairs: &[(&str, &str)]| {
            let m: BTreeMap<String, String> = pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            Injection::from_labels(Some(&m)).state
        };
        assert_eq!(
            l(&[("istio-injection", "enabled")]),
            InjectionState::Sidecar
        );
        assert_eq!(l(&[("istio.io/rev", "canary")]), InjectionState::Sidecar);
        assert_eq!(
            l(&[("istio-injection", "disabled"), ("istio.io/rev", "canary")]),
            InjectionState::Disabled
        );
        assert_eq!(
            l(&[("istio.io/dataplane-mode", "ambient")]),
            InjectionState::Ambient
        );
        assert_eq!(l(&[]), InjectionState::None);
    }
}
