//! The node daemon's loop (`mtls-agent run` after its flags are checked): one task owns the
//! capture and the flow tracker and reads the ring buffer; the aggregator sits behind a mutex
//! shared with the HTTP handlers. `cli::run` parses and validates the flags, then hands over here.
use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime},
};

use anyhow::Context as _;
use mtls_agent_common::stats;
use tokio::signal::unix::{SignalKind, signal};
use tracing::{debug, info, warn};

use crate::{
    aggregate::{AggregateConfig, Aggregator, DEFAULT_EXEMPT_PORTS},
    capture::{self, Capture, CaptureConfig, KernelStats, events, netlink::LinkWatch},
    classify::RecentConnections,
    cli::{RunArgs, usage},
    export::{
        http::{self, AppState},
        metrics::{Metrics, mirror},
    },
    flows::{self, Output, Tracker, TrackerConfig},
    identity::{
        Inventory, KubeConfig, KubeStore, Resolver,
        coverage::Coverage,
        kubernetes_watch::{self, KubeWatch},
        node,
    },
};

/// Ring-buffer records handled per wake-up before other work gets a turn.
const BATCH: usize = 4096;
/// Pause after draining the ring buffer (see the reader loop): bounds wake-ups under load.
const RING_COALESCE: Duration = Duration::from_millis(2);
/// The pause grows to this while wake-ups find few records.
const RING_COALESCE_MAX: Duration = Duration::from_millis(20);
/// A wake-up that finds fewer records than this doubles the pause; one that finds more sets it
/// back to [`RING_COALESCE`].
const RING_FEW: usize = 64;
const TICK: Duration = Duration::from_millis(250);
/// Rescan interfaces now and then even without a netlink notification (lost notifications).
const RESCAN: Duration = Duration::from_secs(5);

/// Reads up to `limit` ring-buffer records into the tracker; returns how many it read.
fn read_ring(
    rb: &mut aya::maps::RingBuf<aya::maps::MapData>,
    limit: usize,
    tracker: &mut Tracker,
    metrics: &Metrics,
    out: &mut Vec<Output>,
) -> usize {
    let now = Instant::now();
    let wall = SystemTime::now();
    let mut n = 0;
    while n < limit {
        let Some(item) = rb.next() else { break };
        n += 1;
        metrics.events.inc();
        match events::decode(&item) {
            Ok(ev) => tracker.on_event(&ev, now, wall, out),
            Err(e) => {
                metrics.decode_errors.inc();
                metrics
                    .events_lost
                    .with_label_values(&["decode_error"])
                    .inc();
                debug!(error = %e, "undecodable ring-buffer record");
            }
        }
    }
    n
}

fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "unknown".into())
}

pub async fn daemon(
    args: RunArgs,
    inventory: Inventory,
    interfaces: Vec<String>,
) -> anyhow::Result<()> {
    let metrics = Metrics::new();
    metrics
        .build_info
        .with_label_values(&[env!("CARGO_PKG_VERSION"), &kernel_release()])
        .set(1);

    // --- Kubernetes mode (issue 4): identities from the API instead of the inventory. ---
    let mut kube_watch = None;
    let mut resolver = if args.kubernetes {
        let (resolver, watch) = kubernetes_identity(&args, &metrics).await?;
        kube_watch = Some(watch);
        resolver
    } else {
        Resolver::from_inventory(&inventory)
    };
    // --- end Kubernetes mode ---
    if !args.kubernetes {
        metrics.identity_last_sync.set(unix_now());
    }
    let configured_node = inventory.node_networks.clone();
    let refresh_node = |resolver: &mut Resolver| {
        let mut nets = configured_node.clone();
        match node::local_addresses() {
            Ok(local) => nets.extend(local),
            Err(e) => warn!(error = %e, "reading the node's addresses failed"),
        }
        resolver.set_node_networks(nets);
    };
    refresh_node(&mut resolver);

    let exempt_ports = if args.exempt_ports.is_empty() {
        DEFAULT_EXEMPT_PORTS.into_iter().collect()
    } else {
        args.exempt_ports.iter().copied().collect()
    };
    let aggregator = Arc::new(Mutex::new(Aggregator::new(
        AggregateConfig {
            exempt_ports,
            generic_mesh: args.generic_mesh,
            max_blocking_clients: args.max_blocking_clients,
            window: args.window.into(),
        },
        resolver,
        metrics.clone(),
    )));

    // --- Kubernetes mode (issue 4): keep the identities in step with the API. ---
    if let Some(watch) = kube_watch {
        let agg = aggregator.clone();
        tokio::spawn(watch.run(move |apply| {
            let mut agg = agg.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(store) = agg.resolver_mut().kube_mut() {
                apply(store);
            }
        }));
    }
    // --- end Kubernetes mode ---

    // --- Access control and TLS (issue 7): bad files are usage errors, before anything runs. ---
    let api_token = match &args.api_token_file {
        Some(p) => Some(http::read_token_file("--api-token-file", p).map_err(usage)?),
        None => None,
    };
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(c), Some(k)) => Some(http::load_tls(c, k).map_err(usage)?),
        _ => None,
    };
    // --- end access control and TLS ---
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("--listen {}: cannot listen", args.listen))?;

    let mut capture = Capture::load(&CaptureConfig {
        interfaces: interfaces.clone(),
        interface_auto: args.interface_auto,
        flow_table_size: args.flow_table_size,
        max_segments: args.max_segments,
        capture_bytes: args.capture_bytes,
        ring_buffer_bytes: args.ring_buffer_size,
        tc_mode: args.tc_mode,
        attach_side: args.attach_side,
    })?;
    let ring = capture.take_ring()?;
    let gc_shared = capture::gc::GcShared::default();
    let gc_thread = capture::gc::spawn(
        capture.take_flows()?,
        gc_shared.clone(),
        metrics.clone(),
        *args.flow_gc_interval,
        args.flow_table_size,
    )
    .ok();
    let mut ring = capture::readable_fd(ring).context("registering the ring buffer")?;
    let mut links = match LinkWatch::new() {
        Ok(l) => Some(l),
        Err(e) => {
            warn!(error = %e, "no link notifications; new interfaces are found by periodic rescans");
            None
        }
    };
    // At start-up everything is attached before the agent says it runs.
    // (Until none are left, or a round leaves as many as before: those keep failing.)
    let mut left = usize::MAX;
    loop {
        let now_left = sync_interfaces(&mut capture, &metrics, &gc_shared);
        if now_left == 0 || now_left >= left {
            break;
        }
        left = now_left;
    }
    info!(
        listen = %args.listen,
        interface_auto = args.interface_auto,
        interfaces = ?interfaces,
        attached = capture.attached_count(),
        sides = %side_summary(&capture),
        chain = %chain_summary(&capture.chain_order()),
        "mtls-agent running"
    );
    // Kubernetes mode: pods of this node never seen on a watched interface.
    let mut coverage = args
        .kubernetes
        .then(|| Coverage::new(*args.pod_unseen_after));

    let (stop_http, http_stopped) = tokio::sync::oneshot::channel::<()>();
    // --- Recent connections (issue 3): a bounded ring for GET /api/v1/connections. ---
    let recent = Arc::new(Mutex::new(RecentConnections::new(
        args.recent_connections as usize,
        args.expose_handshake_details,
    )));
    let app = http::router(AppState {
        aggregator: aggregator.clone(),
        metrics: metrics.clone(),
    })
    .merge(http::connections_router(recent.clone()));
    // --- end recent connections ---
    // --- Access control and TLS (issue 7) ---
    let app = http::with_api_token(app, api_token);
    let server = tokio::spawn(async move {
        let stopped = async {
            let _ = http_stopped.await;
        };
        match tls {
            Some(tls) => http::serve_tls(listener, app, tls, stopped).await,
            None => {
                axum::serve(listener, app)
                    .with_graceful_shutdown(stopped)
                    .await
            }
        }
    });
    // --- end access control and TLS ---

    let mut sigint = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
    let mut sigterm = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let mut tracker = Tracker::new(TrackerConfig {
        max_connections: args.flow_table_size as usize,
        tombstone: flows::tombstone_for(*args.flow_gc_interval),
        ..TrackerConfig::default()
    });
    let mut out = Vec::new();
    let mut pause = RING_COALESCE;
    let mut tick = tokio::time::interval(TICK);
    let mut last_rescan = Instant::now();
    let mut last_expire = Instant::now();
    let mut seen = KernelSeen {
        flow_table_size: u64::from(args.flow_table_size),
        ..KernelSeen::default()
    };
    let started = Instant::now();
    // Matching interfaces not attached yet after the last slice.
    let mut pending_attach = 0usize;

    loop {
        tokio::select! {
            guard = ring.readable_mut() => {
                let mut guard = guard.context("waiting on the ring buffer")?;
                let n = read_ring(guard.get_inner_mut(), BATCH, &mut tracker, &metrics, &mut out);
                metrics.flows_tracked.set(tracker.len() as i64);
                let drained = n < BATCH;
                if drained {
                    guard.clear_ready();
                }
                drop(guard);
                apply(&aggregator, &recent, &mut coverage, &mut out);
                // Let records pile up a little before the next wake-up. The kernel wakes the
                // reader only for the first record after it caught up, so this bounds wake-ups
                // (each costs a self-IPI in the kernel and a scheduler round trip here) to a few
                // hundred per second at any event rate, instead of one per event. At a few
                // hundred connections per second a wake-up still found only a handful of
                // records, and the wake-ups were most of the agent's CPU (BENCHMARKS.md, TLS
                // churn: `finish_task_switch` the top symbol), so while wake-ups find few records
                // the pause doubles, up to 20 ms, and a busy one sets it back. Classification
                // is delayed by at most the pause; the ring buffer holds far more than that.
                if drained {
                    pause = if n >= RING_FEW {
                        RING_COALESCE
                    } else {
                        (pause * 2).min(RING_COALESCE_MAX)
                    };
                    tokio::time::sleep(pause).await;
                }
            }
            changed = async { links.as_mut().expect("guarded").changed().await }, if links.is_some() => {
                if let Err(e) = changed {
                    warn!(error = %e, "link notifications failed; falling back to periodic rescans");
                    links = None;
                }
                pending_attach = sync_interfaces(&mut capture, &metrics, &gc_shared);
                refresh_node(aggregator.lock().unwrap_or_else(|p| p.into_inner()).resolver_mut());
                last_rescan = Instant::now();
            }
            // A burst of new interfaces is attached a slice at a time, the ring buffer read
            // between slices (attach::ATTACH_SLICE).
            _ = std::future::ready(()), if pending_attach > 0 => {
                let left = sync_interfaces(&mut capture, &metrics, &gc_shared);
                // No progress: what is left keeps failing; the next link change or rescan
                // tries again.
                pending_attach = if left < pending_attach { left } else { 0 };
            }
            _ = tick.tick() => {
                // What arrived during the reader's pause first: the state this tick sweeps and
                // exports (`flows_tracked`) includes every record already in the ring.
                // Applied a batch at a time, as the reader does: in a burst the ring holds tens
                // of thousands of records, and their outputs held at once (and the capacity `out`
                // keeps) doubled the agent's peak RSS.
                loop {
                    let n = read_ring(ring.get_mut(), BATCH, &mut tracker, &metrics, &mut out);
                    apply(&aggregator, &recent, &mut coverage, &mut out);
                    if n < BATCH {
                        break;
                    }
                }
                let collected = std::mem::take(
                    &mut *gc_shared.collected.lock().unwrap_or_else(|p| p.into_inner()),
                );
                for (key, st) in collected.unreported {
                    let meta = capture::events::EventMeta::from_entry(&key, &st);
                    let ev = capture::events::Event::Closed { meta };
                    tracker.on_event(&ev, Instant::now(), SystemTime::now(), &mut out);
                }
                // After the closes that pass found: those connections end counted as closed.
                if let Some(live) = collected.live {
                    let n = tracker.reconcile(&live, Instant::now(), SystemTime::now(), &mut out);
                    if n > 0 {
                        metrics.flows_ended_unseen.inc_by(n as u64);
                        debug!(connections = n, "ended connections whose flow-table entry went without a close");
                    }
                }
                tracker.sweep(Instant::now(), SystemTime::now(), &mut out);
                apply(&aggregator, &recent, &mut coverage, &mut out);
                if args.kubernetes
                    && let Some(t) = oldest_kubernetes_sync(&metrics)
                {
                    metrics.identity_last_sync.set(t);
                }
                if let Some(c) = &mut coverage
                    && c.due(Instant::now())
                {
                    let agg = aggregator.lock().unwrap_or_else(|p| p.into_inner());
                    if let Some(store) = agg.resolver().kube() {
                        metrics.pods_unseen.set(c.check(store, Instant::now()).len() as i64);
                    }
                }
                if last_expire.elapsed() >= Duration::from_secs(1) {
                    aggregator.lock().unwrap_or_else(|p| p.into_inner()).expire(SystemTime::now());
                    last_expire = Instant::now();
                }
                metrics.flows_tracked.set(tracker.len() as i64);
                metrics.uptime.set(started.elapsed().as_secs_f64());
                match capture.kernel_stats() {
                    Ok(s) => seen.mirror(
                        &metrics,
                        &s,
                        gc_shared.deleted.load(std::sync::atomic::Ordering::Relaxed),
                    ),
                    Err(e) => warn!(error = %e, "reading kernel statistics failed"),
                }
                if last_rescan.elapsed() >= RESCAN {
                    pending_attach = sync_interfaces(&mut capture, &metrics, &gc_shared);
                    last_rescan = Instant::now();
                }
            }
            _ = sigint.recv() => { info!("SIGINT: stopping"); break; }
            _ = sigterm.recv() => { info!("SIGTERM: stopping"); break; }
        }
    }

    let attached = capture.attached_count();
    gc_shared.stop();
    if let Some(t) = gc_thread {
        let _ = t.join();
    }
    capture.detach_all();
    metrics.interfaces_attached.set(0);
    info!(interfaces = attached, "detached");
    tracker.drain(Instant::now(), SystemTime::now(), &mut out);
    apply(&aggregator, &recent, &mut coverage, &mut out);
    let _ = stop_http.send(());
    match tokio::time::timeout(Duration::from_secs(2), server).await {
        Ok(Ok(Err(e))) => warn!(error = %e, "HTTP server ended with an error"),
        Err(_) => warn!("HTTP server did not stop within 2s"),
        _ => {}
    }
    Ok(())
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// The oldest of the Kubernetes watches' last syncs: identities are only as fresh as that.
fn oldest_kubernetes_sync(metrics: &Metrics) -> Option<f64> {
    use prometheus::core::Collector as _;
    metrics
        .kubernetes_last_sync
        .collect()
        .iter()
        .flat_map(|f| f.get_metric())
        .map(|m| m.get_gauge().get_value())
        .filter(|v| *v > 0.0)
        .reduce(f64::min)
}

/// Attaches a slice of new interfaces; returns how many matching ones are still waiting.
fn sync_interfaces(capture: &mut Capture, metrics: &Metrics, gc: &capture::gc::GcShared) -> usize {
    let pending = match capture.sync_interfaces() {
        Ok(r) => {
            if !r.failed.is_empty() {
                metrics.attach_failures.inc_by(r.failed.len() as u64);
            }
            metrics.interfaces_unsupported.reset();
            for (reason, n) in &r.unsupported {
                metrics
                    .interfaces_unsupported
                    .with_label_values(&[reason])
                    .set(*n as i64);
            }
            r.pending
        }
        Err(e) => {
            warn!(error = %e, "listing interfaces failed");
            0
        }
    };
    metrics
        .interfaces_attached
        .set(capture.attached_count() as i64);
    for (side, n) in capture.attach_sides() {
        metrics
            .interfaces_attached_side
            .with_label_values(&[side.as_str()])
            .set(n as i64);
    }
    let order = capture.chain_order();
    for hook in ["ingress", "egress"] {
        for pos in [
            capture::Position::First,
            capture::Position::Tied,
            capture::Position::Later,
        ] {
            let n = order.positions.get(&(hook, pos)).copied().unwrap_or(0);
            metrics
                .tc_chain_position
                .with_label_values(&[hook, pos.as_str()])
                .set(n as i64);
        }
        let shared = order.shared.get(hook).copied().unwrap_or(0);
        metrics
            .tc_chain_shared
            .with_label_values(&[hook])
            .set(shared as i64);
    }
    *gc.attached.lock().unwrap_or_else(|p| p.into_inner()) = capture.attached_ifindexes();
    pending
}

/// "host: 0, pod: 3": where the programs went, for the start-up line.
fn side_summary(capture: &capture::Capture) -> String {
    capture
        .attach_sides()
        .iter()
        .map(|(s, n)| format!("{}: {n}", s.as_str()))
        .collect::<Vec<_>>()
        .join(", ")
}

/// "ingress: 3 first, egress: 3 first": our place in the chains, for the start-up line.
fn chain_summary(o: &capture::ChainOrder) -> String {
    ["ingress", "egress"]
        .iter()
        .map(|h| {
            let places: Vec<String> = o
                .positions
                .iter()
                .filter(|((hook, _), _)| hook == h)
                .map(|((_, p), n)| format!("{n} {}", p.as_str()))
                .collect();
            let shared = o.shared.get(h).copied().unwrap_or(0);
            format!(
                "{h}: {} ({shared} shared)",
                if places.is_empty() {
                    "none".into()
                } else {
                    places.join(", ")
                }
            )
        })
        .collect::<Vec<_>>()
        .join(", ")
}

fn apply(
    aggregator: &Mutex<Aggregator>,
    recent: &Mutex<RecentConnections>,
    coverage: &mut Option<Coverage>,
    out: &mut Vec<Output>,
) {
    if out.is_empty() {
        return;
    }
    let mut agg = aggregator.lock().unwrap_or_else(|p| p.into_inner());
    let mut recent = recent.lock().unwrap_or_else(|p| p.into_inner());
    for o in out.drain(..) {
        match o {
            Output::Classified(rec) => {
                if let Some(c) = coverage.as_mut() {
                    c.saw(rec.client.ip());
                    c.saw(rec.server.ip());
                }
                agg.record(&rec)
            }
            Output::Recent(rec) => recent.push_live(
                rec.client,
                rec.server,
                rec.dialled,
                rec.sides,
                &rec.verdict,
                rec.midstream,
                rec.at,
            ),
            Output::Bytes {
                client,
                server,
                security,
                bytes,
                sides,
            } => agg.record_bytes(client, server, security, bytes, sides),
            Output::Ended {
                client,
                server,
                security,
                bytes,
                rejected,
                sides,
            } => agg.record_end(
                client,
                server,
                security,
                bytes,
                rejected,
                sides,
                SystemTime::now(),
            ),
        }
    }
}

/// Last kernel totals mirrored into Prometheus counters.
#[derive(Default)]
struct KernelSeen {
    ring_full: u64,
    copy_failed: u64,
    flow_full: u64,
    /// `--flow-table-size`: flows created beyond it were evictions of the LRU table.
    flow_table_size: u64,
    parse: u64,
    v6ext: u64,
    packets: u64,
    copied: u64,
}

impl KernelSeen {
    fn mirror(&mut self, m: &Metrics, s: &KernelStats, gc_deleted: u64) {
        let at = |i: u32| s[i as usize];
        mirror(
            &m.events_lost.with_label_values(&["ring_buffer_full"]),
            &mut self.ring_full,
            at(stats::RINGBUF_FULL),
        );
        mirror(
            &m.events_lost.with_label_values(&["copy_failed"]),
            &mut self.copy_failed,
            at(stats::LOAD_BYTES_FAILED),
        );
        mirror(
            &m.kernel_errors.with_label_values(&["flow_table_full"]),
            &mut self.flow_full,
            // An LRU table never refuses an insert; it evicts, silently. created = deleted +
            // evicted + held, and held <= size, so created - deleted - size is a lower bound of
            // the evictions (exact while the table is full); the counter follows its high-water
            // mark. The agent deletes closed connections and garbage (gc.rs), so a busy but
            // healthy node does not count here.
            at(stats::FLOW_INSERT_FAILED)
                + at(stats::FLOWS_CREATED)
                    .saturating_sub(gc_deleted)
                    .saturating_sub(self.flow_table_size),
        );
        mirror(
            &m.kernel_errors.with_label_values(&["parse_error"]),
            &mut self.parse,
            at(stats::PARSE_ERROR),
        );
        mirror(
            &m.kernel_errors
                .with_label_values(&["ipv6_extension_headers"]),
            &mut self.v6ext,
            at(stats::IPV6_EXT_HEADERS),
        );
        mirror(&m.tcp_packets, &mut self.packets, at(stats::TCP_PACKETS));
        mirror(&m.capture_bytes, &mut self.copied, at(stats::BYTES_COPIED));
    }
}

// --- Kubernetes mode (issue 4) ---

/// How long start-up waits for the first complete list of every resource; the watchers keep
/// trying after that, and identities appear as they arrive.
const KUBE_INITIAL_SYNC: Duration = Duration::from_secs(30);

/// Connects to the API, lists pods, namespaces, nodes and PeerAuthentications once and returns
/// the resolver over that store, with the watchers that keep it current.
async fn kubernetes_identity(
    args: &RunArgs,
    metrics: &Metrics,
) -> anyhow::Result<(Resolver, KubeWatch)> {
    let client = kubernetes_watch::client(args.kubeconfig.as_deref())
        .await
        .map_err(|e| usage(format!("{e:#}")))?;
    if args.node_name.is_none() {
        warn!("no --node-name (NODE_NAME): reports list the workloads of every node");
    }
    let mut store = KubeStore::new(KubeConfig {
        node_name: args.node_name.clone(),
        trust_domain: args.trust_domain.clone(),
        root_namespace: args.istio_root_namespace.clone(),
    });
    let mut watch = KubeWatch::start(client, metrics.clone());
    let missing = watch.initial_sync(&mut store, KUBE_INITIAL_SYNC).await;
    if missing.is_empty() {
        info!(
            pods = store.pod_count(),
            addresses = store.address_count(),
            "Kubernetes identities listed"
        );
    } else {
        let missing: Vec<&str> = missing.iter().map(|r| r.as_str()).collect();
        warn!(
            ?missing,
            "Kubernetes API not fully listed yet; starting anyway, identities follow as they arrive"
        );
    }
    Ok((Resolver::from_kube(store), watch))
}
