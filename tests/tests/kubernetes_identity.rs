//! The agent's Kubernetes identity store, fed by its real watchers (kube-runtime) from the API
//! double over HTTP: fixtures as the API returns them, then pod add/update/delete, address reuse,
//! PeerAuthentication and namespace changes, dropped watches, 410 Gone and an unreachable API.
//! No root needed.
use std::{
    net::IpAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Result, bail};
use mtls_agent::{
    export::metrics::Metrics,
    identity::{
        InjectionState, KubeConfig, KubeStore, Mode, ModeSource, Resolver, WorkloadKind,
        kubernetes::Resource,
        kubernetes_watch::{self, KubeWatch},
    },
};
use mtls_agent_testbed::{KubeDouble, KubeResource, kube_fixtures_dir, pod_json};
use serde_json::json;

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

struct Running {
    double: KubeDouble,
    store: Arc<Mutex<KubeStore>>,
    metrics: Metrics,
    _dir: tempfile::TempDir,
}

/// The double with the fixtures, the agent's watchers, the initial sync done, and the watch
/// loop applying events to a shared store.
async fn start(configure: impl FnOnce(&KubeDouble)) -> Result<Running> {
    let double = KubeDouble::start("127.0.0.1:0".parse()?)?;
    configure(&double);
    double.load_fixtures(&kube_fixtures_dir())?;
    let dir = tempfile::tempdir()?;
    let kubeconfig = dir.path().join("kubeconfig");
    double.write_kubeconfig(&kubeconfig)?;
    let client = kubernetes_watch::client(Some(&kubeconfig)).await?;
    let metrics = Metrics::new();
    let mut store = KubeStore::new(KubeConfig {
        node_name: Some("node-a".into()),
        ..KubeConfig::default()
    });
    let mut watch = KubeWatch::start(client, metrics.clone());
    let missing = watch
        .initial_sync(&mut store, Duration::from_secs(20))
        .await;
    if !missing.is_empty() {
        bail!(
            "not listed: {missing:?}; requests: {:#?}",
            double.requests()
        );
    }
    let store = Arc::new(Mutex::new(store));
    let s = store.clone();
    tokio::spawn(watch.run(move |apply| apply(&mut s.lock().unwrap())));
    Ok(Running {
        double,
        store,
        metrics,
        _dir: dir,
    })
}

impl Running {
    /// Waits until `cond` holds on the store.
    async fn until(&self, what: &str, cond: impl Fn(&KubeStore) -> bool) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if cond(&self.store.lock().unwrap()) {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "timed out waiting for: {what}; requests: {:#?}",
                    self.double.requests()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn workload(&self, addr: &str) -> Option<(String, String, bool)> {
        self.store
            .lock()
            .unwrap()
            .lookup(ip(addr))
            .map(|w| (w.namespace.clone(), w.name.clone(), w.sidecar))
    }

    fn mode(&self, ns: &str, wl: &str, port: u16) -> Option<Mode> {
        self.store
            .lock()
            .unwrap()
            .effective_mode(ns, Some(wl), Some(port))
            .map(|m| m.mode)
    }
}

fn wl(ns: &str, name: &str, sidecar: bool) -> Option<(String, String, bool)> {
    Some((ns.into(), name.into(), sidecar))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fixtures_resolve_identities_owner_chains_and_modes() -> Result<()> {
    let r = start(|_| {}).await?;
    // Owner chains without reading the owners, and sidecar detection three ways.
    assert_eq!(r.workload("198.18.0.10"), wl("payments", "api", true));
    assert_eq!(r.workload("2001:db8::10"), wl("payments", "api", true));
    assert_eq!(
        r.workload("::ffff:198.18.0.10"),
        wl("payments", "api", true)
    );
    assert_eq!(r.workload("198.18.0.11"), wl("payments", "worker", true));
    assert_eq!(r.workload("198.18.0.12"), wl("payments", "reports", true));
    assert_eq!(r.workload("198.18.0.20"), wl("shop", "web", true));
    assert_eq!(r.workload("198.18.0.120"), wl("shop", "web", true));
    assert_eq!(r.workload("198.18.0.30"), wl("legacy", "batch", false));
    assert_eq!(r.workload("198.18.0.40"), wl("billing", "ledger", true));
    assert_eq!(
        r.workload("198.18.0.50"),
        wl("audit", "log", false),
        "ambient: no sidecar"
    );
    assert_eq!(r.workload("198.18.0.90"), wl("ops", "status", true));
    // The hostNetwork pod does not take the node's address.
    assert_eq!(r.workload("198.18.0.1"), None);
    {
        let s = r.store.lock().unwrap();
        let kinds = [
            (
                "198.18.0.10",
                WorkloadKind::Deployment,
                "api-6d8f7b9c4-x7k2p",
                "api",
            ),
            (
                "198.18.0.11",
                WorkloadKind::DaemonSet,
                "worker-8xk2n",
                "worker",
            ),
            (
                "198.18.0.12",
                WorkloadKind::StatefulSet,
                "reports-0",
                "reports",
            ),
            (
                "198.18.0.30",
                WorkloadKind::CronJob,
                "batch-29399820-4wq8z",
                "default",
            ),
            ("198.18.0.40", WorkloadKind::Pod, "ledger", "ledger"),
        ];
        for (addr, kind, pod, sa) in kinds {
            let p = s.pod(ip(addr)).expect(addr);
            assert_eq!((p.workload_kind, p.pod.as_str()), (kind, pod), "{addr}");
            assert_eq!(p.service_account, sa);
            assert_eq!(
                p.spiffe_id,
                format!("spiffe://cluster.local/ns/{}/sa/{sa}", p.namespace)
            );
        }
        assert!(s.pod(ip("198.18.0.10")).unwrap().local);
        assert!(!s.pod(ip("198.18.0.120")).unwrap().local, "runs on node-b");
        // Nodes: probe sources are this node's addresses only.
        assert_eq!(s.node_of(ip("198.18.0.1")), Some("node-a"));
        assert_eq!(s.node_of(ip("198.18.0.250")), Some("node-b"));
        assert!(s.is_local_node(ip("198.18.0.1")) && s.is_local_node(ip("2001:db8::1")));
        assert!(!s.is_local_node(ip("198.18.0.250")));
        // Injection state from the namespace labels.
        let inj = |ns: &str| s.injection(ns).map(|i| i.state);
        assert_eq!(inj("payments"), Some(InjectionState::Sidecar));
        assert_eq!(inj("shop"), Some(InjectionState::Sidecar), "istio.io/rev");
        assert_eq!(
            s.injection("shop").unwrap().revision.as_deref(),
            Some("1-24-2")
        );
        assert_eq!(inj("legacy"), Some(InjectionState::Disabled));
        assert_eq!(inj("audit"), Some(InjectionState::Ambient));
        assert_eq!(inj("default"), Some(InjectionState::None));
        assert_eq!(inj("nope"), None);
        // Workloads with a pod on node-a, for the reports.
        let local: Vec<String> = s
            .local_workloads()
            .iter()
            .map(|w| format!("{}/{}", w.namespace, w.name))
            .collect();
        assert_eq!(
            local,
            [
                "audit/log",
                "billing/ledger",
                "kube-system/kube-proxy",
                "legacy/batch",
                "ops/status",
                "payments/api",
                "payments/reports",
                "payments/worker",
                "shop/web"
            ]
        );
        // The mode and where it comes from.
        let m = s
            .effective_mode("payments", Some("reports"), Some(9090))
            .unwrap();
        assert_eq!(
            (m.mode, m.source, m.policy.as_deref()),
            (
                Mode::Disable,
                ModeSource::WorkloadPort,
                Some("payments/reports-metrics")
            )
        );
        let m = s
            .effective_mode("legacy", Some("batch"), Some(8080))
            .unwrap();
        assert_eq!(
            (m.mode, m.source, m.policy.as_deref()),
            (
                Mode::Permissive,
                ModeSource::Mesh,
                Some("istio-system/default")
            ),
            "UNSET in the namespace inherits the mesh"
        );
    }
    // Modes: workload port → workload → namespace → mesh → default.
    assert_eq!(r.mode("payments", "api", 8443), Some(Mode::Strict));
    assert_eq!(r.mode("payments", "reports", 9090), Some(Mode::Disable));
    assert_eq!(r.mode("payments", "reports", 8444), Some(Mode::Strict));
    assert_eq!(r.mode("shop", "web", 8080), Some(Mode::Permissive));
    assert_eq!(r.mode("shop", "web", 8443), Some(Mode::Strict));
    assert_eq!(r.mode("billing", "ledger", 9443), Some(Mode::Permissive));
    assert_eq!(r.mode("nope", "x", 1), None);

    // The same through the Resolver, as the aggregator sees it.
    let store = std::mem::replace(
        &mut *r.store.lock().unwrap(),
        KubeStore::new(KubeConfig::default()),
    );
    let resolver = Resolver::from_kube(store);
    assert_eq!(
        resolver
            .lookup(ip("::ffff:198.18.0.10"))
            .map(|w| w.name.as_str()),
        Some("api")
    );
    assert_eq!(
        resolver.mode("payments", "reports", 9090),
        Some(Mode::Disable)
    );
    assert_eq!(resolver.namespace_mode("payments"), Some(Mode::Strict));
    assert_eq!(resolver.namespace_mode("shop"), Some(Mode::Permissive));
    assert_eq!(
        resolver.mode_for("198.18.0.12:9090".parse()?),
        Some(Mode::Disable)
    );
    assert_eq!(
        resolver.injection("audit").map(|i| i.state),
        Some(InjectionState::Ambient)
    );
    assert!(resolver.is_node(ip("198.18.0.1")));
    assert!(!resolver.is_node(ip("198.18.0.250")));
    assert!(resolver.namespaces().contains("istio-system"));
    assert_eq!(resolver.workloads().len(), 9);
    assert_eq!(serde_json::to_value(Mode::Strict)?, json!("STRICT"));
    assert_eq!(
        serde_json::from_value::<Mode>(json!("permissive"))?,
        Mode::Permissive
    );
    // The watchers asked the way a real client does: paged lists, then watches from the
    // list's resourceVersion with bookmarks.
    for (what, pred) in [
        (
            "paged pod list",
            (|q: &str| q.starts_with("GET /api/v1/pods?") && q.contains("limit=500"))
                as fn(&str) -> bool,
        ),
        ("pod watch with bookmarks", |q: &str| {
            q.starts_with("GET /api/v1/pods?")
                && q.contains("watch=true")
                && q.contains("allowWatchBookmarks=true")
                && q.contains("resourceVersion=")
        }),
        ("PeerAuthentication v1", |q: &str| {
            q.starts_with("GET /apis/security.istio.io/v1/peerauthentications?")
        }),
    ] {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !r.double.requests().iter().any(|q| pred(q)) {
            assert!(
                Instant::now() < deadline,
                "{what}: {:#?}",
                r.double.requests()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pod_changes_and_address_reuse_switch_identity_at_once() -> Result<()> {
    let r = start(|_| {}).await?;
    // A new pod.
    r.double.apply(
        KubeResource::Pods,
        pod_json(
            "shop",
            "cart-5f6d7c8b9a-abcde",
            Some(("ReplicaSet", "cart-5f6d7c8b9a")),
            &[("app", "cart")],
            "cart",
            "node-a",
            &["198.18.0.60"],
            true,
        ),
    );
    r.until("cart appears", |s| {
        s.lookup(ip("198.18.0.60"))
            .is_some_and(|w| w.name == "cart")
    })
    .await?;

    // Address reuse: a new pod gets ledger's address before ledger's deletion is seen.
    let mut reuse = pod_json(
        "shop",
        "search-0",
        Some(("StatefulSet", "search")),
        &[("app", "search")],
        "search",
        "node-a",
        &["198.18.0.40"],
        false,
    );
    reuse["metadata"]["creationTimestamp"] = json!("2026-11-24T00:00:00Z");
    r.double.apply(KubeResource::Pods, reuse);
    r.until("198.18.0.40 is shop/search", |s| {
        s.lookup(ip("198.18.0.40"))
            .is_some_and(|w| w.namespace == "shop" && w.name == "search" && !w.sidecar)
    })
    .await?;
    // The old pod's deletion does not take the address away from the new one.
    assert!(
        r.double
            .delete(KubeResource::Pods, Some("billing"), "ledger")
    );
    r.until("ledger gone", |s| {
        s.pod(ip("198.18.0.40"))
            .is_some_and(|p| p.pod == "search-0")
            && !s.local_workloads().iter().any(|w| w.name == "ledger")
    })
    .await?;

    // An update: the pod loses its sidecar (MODIFIED) and its address changes.
    let moved = pod_json(
        "shop",
        "cart-5f6d7c8b9a-abcde",
        Some(("ReplicaSet", "cart-5f6d7c8b9a")),
        &[("app", "cart")],
        "cart",
        "node-a",
        &["198.18.0.61"],
        false,
    );
    r.double.apply(KubeResource::Pods, moved);
    r.until("cart moved to .61 without sidecar", |s| {
        s.lookup(ip("198.18.0.61"))
            .is_some_and(|w| w.name == "cart" && !w.sidecar)
            && s.lookup(ip("198.18.0.60")).is_none()
    })
    .await?;

    // A pod that finished releases its address.
    let mut done = pod_json(
        "shop",
        "cart-5f6d7c8b9a-abcde",
        Some(("ReplicaSet", "cart-5f6d7c8b9a")),
        &[("app", "cart")],
        "cart",
        "node-a",
        &["198.18.0.61"],
        false,
    );
    done["status"]["phase"] = json!("Failed");
    r.double.apply(KubeResource::Pods, done);
    r.until("failed pod released .61", |s| {
        s.lookup(ip("198.18.0.61")).is_none()
    })
    .await?;

    // Deletion.
    assert!(
        r.double
            .delete(KubeResource::Pods, Some("shop"), "search-0")
    );
    r.until("search gone", |s| s.lookup(ip("198.18.0.40")).is_none())
        .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peer_authentication_and_namespace_changes_change_modes() -> Result<()> {
    let r = start(|_| {}).await?;
    assert_eq!(r.mode("billing", "ledger", 9443), Some(Mode::Permissive));
    // Mesh-wide STRICT.
    let mut mesh = r
        .double
        .get(
            KubeResource::PeerAuthentications,
            Some("istio-system"),
            "default",
        )
        .unwrap();
    mesh["spec"]["mtls"]["mode"] = json!("STRICT");
    r.double.apply(KubeResource::PeerAuthentications, mesh);
    r.until("mesh STRICT", |s| {
        s.effective_mode("billing", Some("ledger"), Some(9443))
            .is_some_and(|m| m.mode == Mode::Strict && m.source == ModeSource::Mesh)
    })
    .await?;
    // legacy's namespace policy is UNSET: it inherits the mesh.
    assert_eq!(r.mode("legacy", "batch", 8080), Some(Mode::Strict));
    // A workload policy with a port exception.
    r.double.apply(
        KubeResource::PeerAuthentications,
        json!({
            "apiVersion": "security.istio.io/v1",
            "kind": "PeerAuthentication",
            "metadata": {"name": "ledger", "namespace": "billing", "creationTimestamp": "2026-11-24T00:00:00Z"},
            "spec": {
                "selector": {"matchLabels": {"app": "ledger"}},
                "mtls": {"mode": "PERMISSIVE"},
                "portLevelMtls": {"9443": {"mode": "STRICT"}, "8080": {"mode": "DISABLE"}}
            }
        }),
    );
    r.until("ledger workload policy", |s| {
        s.effective_mode("billing", Some("ledger"), Some(8080))
            .is_some_and(|m| m.mode == Mode::Disable)
    })
    .await?;
    assert_eq!(r.mode("billing", "ledger", 9443), Some(Mode::Strict));
    assert_eq!(r.mode("billing", "ledger", 7000), Some(Mode::Permissive));
    // Deleting it falls back to the mesh.
    r.double
        .delete(KubeResource::PeerAuthentications, Some("billing"), "ledger");
    r.until("ledger policy gone", |s| {
        s.effective_mode("billing", Some("ledger"), Some(8080))
            .is_some_and(|m| m.mode == Mode::Strict && m.source == ModeSource::Mesh)
    })
    .await?;
    // A pod's labels decide which workload policy applies: reports without app=reports
    // loses its port exception.
    let mut reports = r
        .double
        .get(KubeResource::Pods, Some("payments"), "reports-0")
        .unwrap();
    reports["metadata"]["labels"]["app"] = json!("reports-v2");
    r.double.apply(KubeResource::Pods, reports);
    r.until("reports relabelled", |s| {
        s.effective_mode_for_ip(ip("198.18.0.12"), 9090)
            .is_some_and(|m| m.mode == Mode::Strict)
    })
    .await?;
    // Namespace labels: legacy opts into injection.
    let mut legacy = r
        .double
        .get(KubeResource::Namespaces, None, "legacy")
        .unwrap();
    legacy["metadata"]["labels"]["istio-injection"] = json!("enabled");
    r.double.apply(KubeResource::Namespaces, legacy);
    r.until("legacy injected", |s| {
        s.injection("legacy")
            .is_some_and(|i| i.state == InjectionState::Sidecar)
    })
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_watches_410_and_outages_keep_then_resync_identities() -> Result<()> {
    let r = start(|_| {}).await?;
    // A dropped watch: the watcher re-watches from its resourceVersion, nothing is lost.
    r.double.disconnect_watches();
    r.double.apply(
        KubeResource::Pods,
        pod_json(
            "shop",
            "cart-1",
            None,
            &[("app", "cart")],
            "cart",
            "node-a",
            &["198.18.0.70"],
            true,
        ),
    );
    r.until("cart-1 after reconnect", |s| {
        s.lookup(ip("198.18.0.70")).is_some()
    })
    .await?;

    // The API goes away: identities stay.
    r.double.set_unavailable(true);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(r.workload("198.18.0.10"), wl("payments", "api", true));
    assert_eq!(r.workload("198.18.0.70"), wl("shop", "cart-1", true));
    // Meanwhile pods change and the history is compacted: the watchers' resourceVersions
    // are now too old (410 Gone) and only a relist can tell that cart-1 was deleted.
    r.double.delete(KubeResource::Pods, Some("shop"), "cart-1");
    r.double.apply(
        KubeResource::Pods,
        pod_json(
            "shop",
            "cart-2",
            None,
            &[("app", "cart")],
            "cart",
            "node-a",
            &["198.18.0.71"],
            true,
        ),
    );
    r.double.expire_history();
    r.double.set_unavailable(false);
    r.until("relisted: cart-1 gone, cart-2 there", |s| {
        s.lookup(ip("198.18.0.70")).is_none() && s.lookup(ip("198.18.0.71")).is_some()
    })
    .await?;
    assert_eq!(r.workload("198.18.0.10"), wl("payments", "api", true));
    let text = r.metrics.render();
    let errors: f64 = text
        .lines()
        .filter(|l| l.starts_with("mtls_agent_kubernetes_api_errors_total{resource=\"pods\"}"))
        .filter_map(|l| l.rsplit_once(" ")?.1.parse::<f64>().ok())
        .sum();
    assert!(errors >= 1.0, "API errors counted:\n{text}");
    for res in Resource::ALL {
        let line = text
            .lines()
            .find(|l| {
                l.starts_with(&format!(
                    "mtls_agent_kubernetes_last_sync_timestamp_seconds{{resource=\"{}\"}}",
                    res.as_str()
                ))
            })
            .unwrap_or_else(|| panic!("last sync of {}:\n{text}", res.as_str()));
        let v: f64 = line.rsplit_once(' ').unwrap().1.parse()?;
        assert!(v > 1.7e9, "{line}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peer_authentication_v1beta1_and_no_istio() -> Result<()> {
    let r = start(|d| d.set_peer_authentication_versions(&["v1beta1"])).await?;
    assert_eq!(r.mode("payments", "api", 8443), Some(Mode::Strict));
    let deadline = Instant::now() + Duration::from_secs(10);
    while !r.double.requests().iter().any(|q| {
        q.contains("/apis/security.istio.io/v1beta1/peerauthentications")
            && q.contains("watch=true")
    }) {
        assert!(Instant::now() < deadline, "{:#?}", r.double.requests());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(r);
    let r = start(|d| d.set_peer_authentication_versions(&[])).await?;
    assert!(
        r.store
            .lock()
            .unwrap()
            .is_synced(Resource::PeerAuthentications)
    );
    assert_eq!(r.mode("payments", "api", 8443), Some(Mode::Permissive));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_lists_come_in_pages() -> Result<()> {
    let r = start(|d| {
        for i in 0..1200u32 {
            let addr = format!("198.18.{}.{}", 10 + i / 250, 1 + i % 250);
            d.apply(
                KubeResource::Pods,
                pod_json(
                    "bulk",
                    &format!("filler-5d8c7b6a9f-{i:05}"),
                    Some(("ReplicaSet", "filler-5d8c7b6a9f")),
                    &[("app", "filler")],
                    "filler",
                    "node-b",
                    &[&addr],
                    true,
                ),
            );
        }
    })
    .await?;
    {
        let s = r.store.lock().unwrap();
        assert_eq!(s.pod_count(), 1200 + 11, "every page applied");
        assert_eq!(
            s.lookup(ip("198.18.14.200")).map(|w| w.name.as_str()),
            Some("filler")
        );
    }
    let reqs = r.double.requests();
    let pages = reqs
        .iter()
        .filter(|q| q.starts_with("GET /api/v1/pods?") && q.contains("continue="))
        .count();
    assert_eq!(pages, 2, "1,210 pods in pages of 500: {reqs:#?}");
    Ok(())
}

fn last_sync(metrics: &Metrics, res: &str) -> f64 {
    metrics
        .render()
        .lines()
        .find(|l| {
            l.starts_with(&format!(
                "mtls_agent_kubernetes_last_sync_timestamp_seconds{{resource=\"{res}\"}}"
            ))
        })
        .and_then(|l| l.rsplit_once(' ')?.1.parse().ok())
        .unwrap_or(0.0)
}

/// Nodes change rarely: their watch carries no event for a long time, yet a running watch
/// keeps its last-sync time fresh (heartbeat), so staleness alerts mean a broken watch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quiet_watches_keep_their_sync_time_fresh() -> Result<()> {
    let r = start(|_| {}).await?;
    let first = last_sync(&r.metrics, "nodes");
    assert!(first > 1.7e9, "{first}");
    let deadline = Instant::now() + Duration::from_secs(25);
    while last_sync(&r.metrics, "nodes") <= first + 1.0 {
        assert!(
            Instant::now() < deadline,
            "nodes last sync stuck at {first}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    Ok(())
}
