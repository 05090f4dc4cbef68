//! Kubernetes mode: this node's pods whose addresses no watched interface has shown.
//!
//! Why: the agent finds pod interfaces by what they are (capture/links.rs), but a CNI with an
//! unusual layout (a device kind we do not know, packets steered past the host side) would leave
//! its pods unseen, and an unseen namespace looks exactly like a quiet one (`no_data`). The API
//! says which pods run here; a pod none of whose addresses appeared in any connection the agent
//! classified, once it has been known for `--pod-unseen-after`, is named in a log line and counted
//! in `mtls_agent_pods_unseen`. A pod that simply had no TCP traffic in that time is listed too:
//! the list is where to look, not a verdict.
use std::{
    collections::BTreeSet,
    net::IpAddr,
    time::{Duration, Instant},
};

use hashbrown::{HashMap, HashSet};

use tracing::{info, warn};

use super::kubernetes::KubeStore;

/// At most this many pod names in one log line (the metric has the count).
const NAMES_LOGGED: usize = 20;

pub struct Coverage {
    after: Duration,
    /// Addresses seen in classified connections since the last check (pruned to local pods).
    seen: HashSet<IpAddr>,
    /// Local pods ("namespace/name") -> when first listed, and whether seen since.
    pods: HashMap<String, (Instant, bool)>,
    /// The unseen pods of the last check, to log only changes.
    reported: BTreeSet<String>,
    last_check: Option<Instant>,
}

impl Coverage {
    pub fn new(after: Duration) -> Self {
        Self {
            after,
            seen: HashSet::new(),
            pods: HashMap::new(),
            reported: BTreeSet::new(),
            last_check: None,
        }
    }

    /// An address that appeared in a connection on a watched interface.
    pub fn saw(&mut self, ip: IpAddr) {
        self.seen.insert(super::canonical(ip));
    }

    /// Whether [`Coverage::check`] is due (a fifth of the grace period, 1 to 30 s).
    pub fn due(&self, now: Instant) -> bool {
        let every = (self.after / 5).clamp(Duration::from_secs(1), Duration::from_secs(30));
        self.last_check
            .is_none_or(|t| now.duration_since(t) >= every)
    }

    /// Updates the pods of this node from the store; returns the unseen ones (sorted), logging
    /// when that list changed.
    pub fn check(&mut self, store: &KubeStore, now: Instant) -> &BTreeSet<String> {
        self.last_check = Some(now);
        let mut present = HashMap::with_capacity(self.pods.len());
        for (ns, name, mut ips) in store.local_pods() {
            let key = format!("{ns}/{name}");
            let hit = ips.any(|ip| self.seen.contains(&super::canonical(ip)));
            let (since, seen) = self.pods.get(&key).copied().unwrap_or((now, false));
            present.insert(key, (since, seen || hit));
        }
        self.pods = present;
        self.seen.clear();
        let unseen: BTreeSet<String> = self
            .pods
            .iter()
            .filter(|(_, (since, seen))| !seen && now.duration_since(*since) >= self.after)
            .map(|(k, _)| k.clone())
            .collect();
        if unseen != self.reported {
            if unseen.is_empty() {
                info!("every pod of this node has been seen on a watched interface");
            } else {
                let names: Vec<&str> = unseen
                    .iter()
                    .take(NAMES_LOGGED)
                    .map(String::as_str)
                    .collect();
                warn!(
                    count = unseen.len(),
                    pods = ?names,
                    after = ?self.after,
                    "pods of this node never seen on a watched interface: their interfaces may not be found, or they had no TCP traffic (docs/kubernetes.md, interface discovery)"
                );
            }
            self.reported = unseen;
        }
        &self.reported
    }
}
