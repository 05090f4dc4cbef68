//! Feeding the Kubernetes store from the API: one `kube::runtime::watcher` per resource (pods,
//! namespaces, nodes, Istio PeerAuthentications), each list+watch with kube's default backoff.
//! Watch errors, 410 Gone and dropped connections make the watcher re-watch or relist; the
//! store keeps the last known identities meanwhile (`KubeStore` relist epochs), so the agent
//! keeps classifying while the API is unreachable.
//!
//! Every watcher runs in its own task and sends its events into one channel; `KubeWatch::run`
//! applies them in batches under whatever lock owns the store (in the daemon: the aggregator's).
use std::{
    path::Path,
    time::{Duration, SystemTime},
};

use anyhow::Context as _;
use futures::StreamExt as _;
use k8s_openapi::api::core::v1::{Namespace, Node, Pod};
use kube::{
    Api, Client, Config,
    api::ListParams,
    config::{KubeConfigOptions, Kubeconfig},
    core::{ApiResource, DynamicObject},
    runtime::{
        WatchStreamExt as _,
        watcher::{self, Event},
    },
};
use tokio::{sync::mpsc, task::JoinHandle};
use tracing::{debug, info, warn};

use super::kubernetes::{KubeStore, Resource};
use crate::export::metrics::Metrics;

/// PeerAuthentication versions tried, newest first (v1 since Istio 1.22; v1beta1 before).
pub const PEER_AUTHENTICATION_VERSIONS: [&str; 2] = ["v1", "v1beta1"];
/// How often the agent looks again for the PeerAuthentication API when Istio is not installed.
const POLICY_REDISCOVERY: Duration = Duration::from_secs(60);
/// Events applied per lock of the store.
const BATCH: usize = 512;

/// A Kubernetes client from `--kubeconfig`, else the usual inference (`KUBECONFIG`,
/// `~/.kube/config`, then the in-cluster service account).
pub async fn client(kubeconfig: Option<&Path>) -> anyhow::Result<Client> {
    let config = match kubeconfig {
        Some(p) => {
            let kc = Kubeconfig::read_from(p)
                .with_context(|| format!("--kubeconfig {}", p.display()))?;
            Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
                .await
                .with_context(|| format!("--kubeconfig {}", p.display()))?
        }
        None => Config::infer()
            .await
            .context("no Kubernetes configuration (in-cluster or KUBECONFIG); use --kubeconfig")?,
    };
    Client::try_from(config).context("building the Kubernetes client")
}

/// An object of one of the watched resources.
#[derive(Debug)]
pub enum Object {
    Pod(Box<Pod>),
    Namespace(Box<Namespace>),
    Node(Box<Node>),
    PeerAuthentication(Box<DynamicObject>),
}

fn map_event<K, T>(e: Event<K>, f: impl Fn(K) -> T) -> Event<T> {
    match e {
        Event::Apply(o) => Event::Apply(f(o)),
        Event::Delete(o) => Event::Delete(f(o)),
        Event::Init => Event::Init,
        Event::InitApply(o) => Event::InitApply(f(o)),
        Event::InitDone => Event::InitDone,
    }
}

/// Applies one watcher event to the store.
pub fn apply(store: &mut KubeStore, res: Resource, ev: Event<Object>) {
    let (obj, delete) = match ev {
        Event::Init => return store.begin_relist(res),
        Event::InitDone => return store.end_relist(res),
        Event::InitApply(o) | Event::Apply(o) => (o, false),
        Event::Delete(o) => (o, true),
    };
    match (obj, delete) {
        (Object::Pod(p), false) => store.apply_pod(&p),
        (Object::Pod(p), true) => store.delete_pod(&p),
        (Object::Namespace(n), false) => store.apply_namespace(&n),
        (Object::Namespace(n), true) => store.delete_namespace(&n),
        (Object::Node(n), false) => store.apply_node(&n),
        (Object::Node(n), true) => store.delete_node(&n),
        (Object::PeerAuthentication(d), del) => match serde_json::to_value(&*d) {
            Ok(v) if del => store.delete_peer_authentication(&v),
            Ok(v) => store.apply_peer_authentication(&v),
            Err(e) => warn!(error = %e, "unreadable PeerAuthentication"),
        },
    }
}

type Item = (Resource, Event<Object>);

/// The running watchers.
pub struct KubeWatch {
    rx: mpsc::Receiver<Item>,
    tasks: Vec<JoinHandle<()>>,
    metrics: Metrics,
}

impl Drop for KubeWatch {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

fn now_secs() -> f64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

impl KubeWatch {
    /// Starts the watchers (inside a tokio runtime).
    pub fn start(client: Client, metrics: Metrics) -> Self {
        let (tx, rx) = mpsc::channel(1024);
        let tasks = vec![
            tokio::spawn(watch(
                Api::<Pod>::all(client.clone()),
                Resource::Pods,
                |p| Object::Pod(Box::new(p)),
                tx.clone(),
                metrics.clone(),
            )),
            tokio::spawn(watch(
                Api::<Namespace>::all(client.clone()),
                Resource::Namespaces,
                |n| Object::Namespace(Box::new(n)),
                tx.clone(),
                metrics.clone(),
            )),
            tokio::spawn(watch(
                Api::<Node>::all(client.clone()),
                Resource::Nodes,
                |n| Object::Node(Box::new(n)),
                tx.clone(),
                metrics.clone(),
            )),
            tokio::spawn(watch_policies(client, tx, metrics.clone())),
        ];
        Self { rx, tasks, metrics }
    }

    /// Applies events straight to `store` until every resource has been listed once, or until
    /// `timeout`. Returns the resources not listed yet (their watchers keep trying).
    pub async fn initial_sync(
        &mut self,
        store: &mut KubeStore,
        timeout: Duration,
    ) -> Vec<Resource> {
        let deadline = tokio::time::Instant::now() + timeout;
        while !Resource::ALL.iter().all(|r| store.is_synced(*r)) {
            match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                Ok(Some((res, ev))) => apply(store, res, ev),
                Ok(None) | Err(_) => break,
            }
        }
        Resource::ALL
            .into_iter()
            .filter(|r| !store.is_synced(*r))
            .collect()
    }

    /// Applies events for ever, in batches, each batch inside one call of `with_store` (which
    /// takes the lock that owns the store and calls the closure with it).
    pub async fn run<F>(mut self, with_store: F)
    where
        F: Fn(&mut dyn FnMut(&mut KubeStore)) + Send,
    {
        let mut batch: Vec<Item> = Vec::with_capacity(BATCH);
        let metrics = self.metrics.clone();
        with_store(&mut |store: &mut KubeStore| export_namespace_modes(store, &metrics));
        while self.rx.recv_many(&mut batch, BATCH).await > 0 {
            let modes_changed = batch.iter().any(|(res, _)| {
                matches!(res, Resource::Namespaces | Resource::PeerAuthentications)
            });
            with_store(&mut |store: &mut KubeStore| {
                for (res, ev) in batch.drain(..) {
                    apply(store, res, ev);
                }
                if modes_changed {
                    export_namespace_modes(store, &metrics);
                }
            });
            batch.clear();
        }
    }
}

/// Lists in pages of 500 objects, like client-go's informers: with every pod of a large
/// cluster, one unpaged list would be deserialised whole (about 10 KB per pod) before the first
/// object reaches the store; pages keep that transient memory to one page. (API servers from
/// 1.31 serve these consistent paged lists from their watch cache.)
fn list_config() -> watcher::Config {
    watcher::Config::default().page_size(500)
}

/// Sets `mtls_agent_namespace_peer_authentication_mode` for every namespace (1 for its mode,
/// 0 for the others) and drops the series of namespaces that are gone.
pub fn export_namespace_modes(store: &KubeStore, metrics: &Metrics) {
    use super::kubernetes::Mode;
    let gauge = &metrics.namespace_peer_authentication_mode;
    gauge.reset();
    let names: std::collections::BTreeSet<&str> = store.namespace_names().collect();
    for ns in names {
        let Some(m) = store.effective_mode(ns, None, None) else {
            continue;
        };
        for mode in [Mode::Strict, Mode::Permissive, Mode::Disable] {
            gauge
                .with_label_values(&[ns, mode.as_str()])
                .set((m.mode == mode) as i64);
        }
    }
}

async fn watch<K>(
    api: Api<K>,
    res: Resource,
    wrap: fn(K) -> Object,
    tx: mpsc::Sender<Item>,
    metrics: Metrics,
) where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + 'static,
{
    let mut stream = watcher::watcher(api, list_config())
        .default_backoff()
        .boxed();
    forward(&mut stream, res, wrap, &tx, &metrics).await;
}

/// While a watch is established without errors, its last-sync gauge is refreshed this often
/// (watches of quiet resources carry no events for hours).
const HEARTBEAT: Duration = Duration::from_secs(15);

/// Forwards a watcher's events; returns when the receiver is gone or the stream ends.
/// `mtls_agent_kubernetes_last_sync_timestamp_seconds{resource}` is the last time the resource
/// was known in sync: a complete list, an event, or a heartbeat while the watch runs without
/// error since its last complete list.
async fn forward<K, S>(
    stream: &mut S,
    res: Resource,
    wrap: impl Fn(K) -> Object,
    tx: &mpsc::Sender<Item>,
    metrics: &Metrics,
) where
    S: futures::Stream<Item = Result<Event<K>, watcher::Error>> + Unpin,
{
    let label = [res.as_str()];
    let synced = || {
        metrics
            .kubernetes_last_sync
            .with_label_values(&label)
            .set(now_secs())
    };
    // Listed completely since the last Init, and when the last error was: kube re-watches after
    // an error without telling, so a watch counts as running again once no error came for a
    // while (longer than kube's largest backoff, 30 s).
    let mut listed = false;
    let mut last_error: Option<std::time::Instant> = None;
    let quiet = Duration::from_secs(60);
    let mut heartbeat = tokio::time::interval(HEARTBEAT);
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let item = tokio::select! {
            item = stream.next() => item,
            _ = heartbeat.tick() => {
                if listed && last_error.is_none_or(|t| t.elapsed() >= quiet) {
                    synced();
                }
                continue;
            }
        };
        let Some(item) = item else { return };
        match item {
            Ok(ev) => {
                match ev {
                    Event::Init => listed = false,
                    Event::InitDone => {
                        listed = true;
                        last_error = None;
                        debug!(resource = res.as_str(), "listed");
                    }
                    Event::Apply(_) | Event::Delete(_) => last_error = None,
                    Event::InitApply(_) => {}
                }
                if listed {
                    synced();
                }
                if tx.send((res, map_event(ev, &wrap))).await.is_err() {
                    return;
                }
            }
            Err(e) => {
                last_error = Some(std::time::Instant::now());
                metrics
                    .kubernetes_api_errors
                    .with_label_values(&label)
                    .inc();
                warn!(resource = res.as_str(), error = %e, "Kubernetes API watch failed; retrying with backoff");
            }
        }
    }
}

/// The PeerAuthentication API resource of a version.
pub fn peer_authentication_resource(version: &str) -> ApiResource {
    ApiResource {
        group: "security.istio.io".into(),
        version: version.into(),
        api_version: format!("security.istio.io/{version}"),
        kind: "PeerAuthentication".into(),
        plural: "peerauthentications".into(),
    }
}

enum Discovery {
    Found(ApiResource),
    /// Neither version is served: Istio's CRDs are not installed.
    Missing,
    Failed(kube::Error),
}

async fn discover(client: &Client) -> Discovery {
    for v in PEER_AUTHENTICATION_VERSIONS {
        let ar = peer_authentication_resource(v);
        let api: Api<DynamicObject> = Api::all_with(client.clone(), &ar);
        match api.list(&ListParams::default().limit(1)).await {
            Ok(_) => return Discovery::Found(ar),
            Err(kube::Error::Api(s)) if s.code == 404 => continue,
            Err(e) => return Discovery::Failed(e),
        }
    }
    Discovery::Missing
}

/// PeerAuthentications as dynamic objects, in the newest version the API serves. Without
/// Istio's CRDs the store gets an empty list (every mode is the default) and the agent looks
/// again every minute.
async fn watch_policies(client: Client, tx: mpsc::Sender<Item>, metrics: Metrics) {
    let res = Resource::PeerAuthentications;
    let label = [res.as_str()];
    let mut failures = 0u32;
    let mut reported_missing = false;
    loop {
        match discover(&client).await {
            Discovery::Found(ar) => {
                info!(version = %ar.api_version, "watching PeerAuthentications");
                let api: Api<DynamicObject> = Api::all_with(client.clone(), &ar);
                let mut stream = watcher::watcher(api, list_config())
                    .default_backoff()
                    .boxed();
                forward(
                    &mut stream,
                    res,
                    |d| Object::PeerAuthentication(Box::new(d)),
                    &tx,
                    &metrics,
                )
                .await;
                return;
            }
            Discovery::Missing => {
                failures = 0;
                if !reported_missing {
                    info!(
                        "no PeerAuthentication API (Istio not installed?): every mode is PERMISSIVE"
                    );
                    reported_missing = true;
                }
                metrics
                    .kubernetes_last_sync
                    .with_label_values(&label)
                    .set(now_secs());
                for ev in [Event::Init, Event::InitDone] {
                    if tx.send((res, ev)).await.is_err() {
                        return;
                    }
                }
                tokio::time::sleep(POLICY_REDISCOVERY).await;
            }
            Discovery::Failed(e) => {
                metrics
                    .kubernetes_api_errors
                    .with_label_values(&label)
                    .inc();
                warn!(error = %e, "looking up the PeerAuthentication API failed; retrying");
                failures = failures.saturating_add(1);
                let backoff = Duration::from_millis(800 * 2u64.pow(failures.min(6)));
                tokio::time::sleep(backoff.min(Duration::from_secs(30))).await;
            }
        }
    }
}
