//! How much the agent's Kubernetes identity store costs per pod: 100,000 synthetic pods of a
//! large cluster (names, labels, owners, service accounts, dual-stack addresses as real
//! clusters have them), the store's heap measured by a counting global allocator in this test
//! binary, and the RSS delta for comparison. The figure is written in docs/kubernetes.md.
use std::{
    alloc::{GlobalAlloc, Layout, System},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    sync::atomic::{AtomicIsize, Ordering},
    time::Instant,
};

use mtls_agent::identity::{
    KubeConfig, KubeStore, WorkloadKind,
    inbound::InboundCapture,
    kubernetes::{PodSummary, Resource},
};

struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);

// SAFETY: forwards to the system allocator; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        LIVE.fetch_add(l.size() as isize, Ordering::Relaxed);
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        LIVE.fetch_sub(l.size() as isize, Ordering::Relaxed);
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        LIVE.fetch_add(new as isize - l.size() as isize, Ordering::Relaxed);
        unsafe { System.realloc(p, l, new) }
    }
}

#[global_allocator]
static A: Counting = Counting;

fn rss_kib() -> i64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

const PODS: usize = 100_000;

/// Pod `i` of a cluster with 250 namespaces, 5,000 workloads (20 pods each), 100 nodes: 85%
/// Deployment pods, 10% StatefulSet pods (per-pod labels), 5% DaemonSet pods; every pod has
/// IPv4, half of them IPv6 too.
fn synthetic(i: usize) -> PodSummary {
    let wl = i / 20;
    let ns = format!("team-{:03}-{}", wl % 250, ["prod", "staging"][wl % 2]);
    let base = format!(
        "{}-{}",
        ["checkout", "payments", "catalog", "search", "ledger"][wl % 5],
        ["api", "worker", "frontend", "service"][(wl / 5) % 4]
    );
    let workload = format!("{base}-{wl}");
    let hash = format!(
        "{:010x}",
        (wl as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 24
    )[..10]
        .to_owned();
    let (kind, name, mut labels) = match i % 20 {
        0 | 1 => (
            WorkloadKind::StatefulSet,
            format!("{workload}-{}", i % 20),
            vec![
                (
                    "statefulset.kubernetes.io/pod-name".to_owned(),
                    format!("{workload}-{}", i % 20),
                ),
                (
                    "apps.kubernetes.io/pod-index".to_owned(),
                    (i % 20).to_string(),
                ),
                (
                    "controller-revision-hash".to_owned(),
                    format!("{workload}-{hash}"),
                ),
            ],
        ),
        2 => (
            WorkloadKind::DaemonSet,
            format!("{workload}-{:05x}", i & 0xfffff),
            vec![("controller-revision-hash".to_owned(), hash.clone())],
        ),
        _ => (
            WorkloadKind::Deployment,
            format!("{workload}-{hash}-{:05x}", (i * 7919) & 0xfffff),
            vec![("pod-template-hash".to_owned(), hash.clone())],
        ),
    };
    labels.extend([
        ("app".to_owned(), workload.clone()),
        ("app.kubernetes.io/name".to_owned(), base.clone()),
        ("version".to_owned(), "v2".to_owned()),
        ("security.istio.io/tlsMode".to_owned(), "istio".to_owned()),
        (
            "service.istio.io/canonical-name".to_owned(),
            workload.clone(),
        ),
        (
            "service.istio.io/canonical-revision".to_owned(),
            "v2".to_owned(),
        ),
    ]);
    let v4 = IpAddr::V4(Ipv4Addr::from(0x0a00_0000u32 + i as u32));
    let mut ips = vec![v4];
    if i.is_multiple_of(2) {
        ips.push(IpAddr::V6(Ipv6Addr::from(
            0xfd00_0000_0000_0000_0000_0000_0000_0000u128 + i as u128,
        )));
    }
    PodSummary {
        namespace: ns,
        name,
        workload,
        kind,
        service_account: base,
        labels,
        node_name: Some(format!("node-{}", i % 100)),
        host_network: false,
        live: true,
        sidecar: !i.is_multiple_of(10),
        ips,
        created: 1_790_000_000 + i as u32,
        // One pod in ten excludes a port from its sidecar's inbound capture (an annotation
        // the pods of a workload share).
        inbound: if i % 10 == 5 {
            InboundCapture {
                exclude: Box::new([9000]),
                ..InboundCapture::default()
            }
        } else {
            InboundCapture::default()
        },
    }
}

#[test]
fn hundred_thousand_pods_fit_in_a_few_hundred_bytes_each() {
    let mut store = KubeStore::new(KubeConfig {
        node_name: Some("node-0".into()),
        ..KubeConfig::default()
    });
    // Warm up: the allocator's and the test harness's own first allocations.
    store.apply_pod_summary(&synthetic(PODS + 1));
    store.delete_pod_named(&synthetic(PODS + 1).namespace, &synthetic(PODS + 1).name);
    let heap0 = LIVE.load(Ordering::SeqCst);
    let rss0 = rss_kib();
    let t = Instant::now();
    store.begin_relist(Resource::Pods);
    for i in 0..PODS {
        let p = synthetic(i);
        store.apply_pod_summary(&p);
    }
    store.end_relist(Resource::Pods);
    let took = t.elapsed();
    let heap = LIVE.load(Ordering::SeqCst) - heap0;
    let rss = (rss_kib() - rss0) * 1024;
    let per_pod = heap as f64 / PODS as f64;
    println!(
        "kubernetes store: {PODS} pods, {} addresses: heap {heap} bytes = {per_pod:.0} bytes/pod; RSS delta {rss} bytes = {:.0} bytes/pod; applied in {took:?}",
        store.address_count(),
        rss as f64 / PODS as f64
    );
    assert_eq!(store.pod_count(), PODS);
    assert_eq!(store.address_count(), PODS + PODS / 2);
    // The answers are right at that size.
    let p = synthetic(12_345);
    let w = store.lookup(p.ips[0]).expect("pod 12345");
    assert_eq!(
        (w.namespace.as_str(), w.name.as_str()),
        (p.namespace.as_str(), p.workload.as_str())
    );
    assert_eq!(store.pod(p.ips[0]).unwrap().pod, p.name);
    // Pod i runs on node i % 100: node-0 has one pod of every fifth workload.
    assert_eq!(store.local_workloads().len(), 1_000);
    assert!(
        per_pod <= 300.0,
        "{per_pod:.0} bytes per pod is over the 300-byte budget"
    );

    // A full relist of the same pods costs no more.
    let t = Instant::now();
    store.begin_relist(Resource::Pods);
    for i in 0..PODS {
        store.apply_pod_summary(&synthetic(i));
    }
    store.end_relist(Resource::Pods);
    let heap2 = LIVE.load(Ordering::SeqCst) - heap0;
    println!(
        "after a relist: heap {heap2} bytes = {:.0} bytes/pod, relist applied in {:?}",
        heap2 as f64 / PODS as f64,
        t.elapsed()
    );
    assert!((heap2 as f64) < heap as f64 * 1.1, "{heap2} vs {heap}");
}
