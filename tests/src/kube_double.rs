//! A local double of the Kubernetes API server for mtls-agent's `--kubernetes` mode: plain
//! std TCP, HTTP/1.1, one thread per connection. It serves pods, namespaces, nodes and Istio
//! PeerAuthentications over the real list/watch protocol:
//!
//! - list: `GET /api/v1/pods?...` → `{"kind":"PodList","apiVersion":"v1","metadata":
//!   {"resourceVersion":"N"},"items":[...]}` (items without kind/apiVersion, as the API server
//!   sends them for built-in types; with them for custom resources);
//! - watch: `GET ...?watch=true&resourceVersion=N&allowWatchBookmarks=true&timeoutSeconds=T` →
//!   a chunked stream of `{"type":"ADDED|MODIFIED|DELETED|BOOKMARK|ERROR","object":{...}}`
//!   lines: every change after N, then live changes, bookmarks when idle;
//! - a watch from a resourceVersion older than the compacted history gets an `ERROR` event with
//!   a `Status` of code 410 (Expired), as etcd compaction produces;
//! - `GET /api/v1/namespaces/NS/pods?labelSelector=k=v,...`: the pods of one namespace that
//!   match (equality selectors), as `kubectl get pods -n NS -l ...` asks;
//! - `pods/proxy`: `GET /api/v1/namespaces/NS/pods/NAME[:PORT]/proxy/PATH?Q` is forwarded over
//!   HTTP to the pod's `status.podIP` and PORT, as the API server does: the caller's
//!   `Authorization` is consumed (not forwarded), other headers are; the pod's answer comes back
//!   as it is; a pod without an IP gets 503 and an unreachable one 503 with the dial error;
//! - anything else: 404 with a `Status` body.
//!
//! Tests drive it in-process (`KubeDouble::apply`, `delete`, `disconnect_watches`,
//! `expire_history`, `set_unavailable`) or, for the `kube-double` binary that runs inside a
//! test bed's node namespace, over `POST /_double/...` admin requests (`KubeDoubleClient`).
//! Fixtures are real API JSON: `tests/fixtures/kube/{pods,namespaces,nodes,peerauthentications}.json`.
use std::{
    collections::{BTreeMap, HashMap},
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    sync::{
        Arc, Condvar, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use serde_json::{Value, json};

/// The resources the double serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum KubeResource {
    Pods,
    Namespaces,
    Nodes,
    PeerAuthentications,
}

impl KubeResource {
    pub const ALL: [KubeResource; 4] = [
        KubeResource::Pods,
        KubeResource::Namespaces,
        KubeResource::Nodes,
        KubeResource::PeerAuthentications,
    ];

    pub fn plural(self) -> &'static str {
        match self {
            KubeResource::Pods => "pods",
            KubeResource::Namespaces => "namespaces",
            KubeResource::Nodes => "nodes",
            KubeResource::PeerAuthentications => "peerauthentications",
        }
    }

    pub fn from_plural(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|r| r.plural() == s)
    }

    fn kind(self) -> &'static str {
        match self {
            KubeResource::Pods => "Pod",
            KubeResource::Namespaces => "Namespace",
            KubeResource::Nodes => "Node",
            KubeResource::PeerAuthentications => "PeerAuthentication",
        }
    }

    fn namespaced(self) -> bool {
        matches!(self, KubeResource::Pods | KubeResource::PeerAuthentications)
    }

    /// The fixture file of this resource.
    pub fn fixture(self) -> &'static str {
        match self {
            KubeResource::Pods => "pods.json",
            KubeResource::Namespaces => "namespaces.json",
            KubeResource::Nodes => "nodes.json",
            KubeResource::PeerAuthentications => "peerauthentications.json",
        }
    }
}

/// `tests/fixtures/kube` of this crate.
pub fn kube_fixtures_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/kube")
}

#[derive(Default)]
struct Collection {
    objects: BTreeMap<(String, String), Value>,
    /// (resourceVersion, type, object) of every change since the last compaction.
    log: Vec<(u64, &'static str, Value)>,
}

struct State {
    rv: u64,
    /// Watches from a resourceVersion below this get 410 Gone.
    horizon: u64,
    colls: HashMap<KubeResource, Collection>,
    /// PeerAuthentication versions served (`v1`, `v1beta1`); the same objects under each.
    pa_versions: Vec<String>,
    /// Bumped to end every open watch stream.
    watch_generation: u64,
    unavailable: bool,
    requests: Vec<String>,
}

struct Shared {
    state: Mutex<State>,
    changed: Condvar,
    stop: AtomicBool,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The running double.
pub struct KubeDouble {
    addr: SocketAddr,
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl Drop for KubeDouble {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.shared.changed.notify_all();
        // Wake the accept loop.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_millis(200));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl KubeDouble {
    /// Listens on `bind` (e.g. `127.0.0.1:0`) with empty collections.
    pub fn start(bind: SocketAddr) -> Result<Self> {
        let listener = TcpListener::bind(bind).with_context(|| format!("binding {bind}"))?;
        let addr = listener.local_addr()?;
        let mut colls = HashMap::new();
        for r in KubeResource::ALL {
            colls.insert(r, Collection::default());
        }
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                rv: 1000,
                horizon: 0,
                colls,
                pa_versions: vec!["v1".into(), "v1beta1".into()],
                watch_generation: 0,
                unavailable: false,
                requests: Vec::new(),
            }),
            changed: Condvar::new(),
            stop: AtomicBool::new(false),
        });
        let s = shared.clone();
        let thread = std::thread::spawn(move || {
            for conn in listener.incoming() {
                if s.stop.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(conn) = conn else { continue };
                let s = s.clone();
                std::thread::spawn(move || {
                    let _ = serve(&s, conn);
                });
            }
        });
        Ok(Self {
            addr,
            shared,
            thread: Some(thread),
        })
    }

    /// Starts and loads every fixture of `dir` (see `KubeResource::fixture`).
    pub fn with_fixtures(bind: SocketAddr, dir: &Path) -> Result<Self> {
        let d = Self::start(bind)?;
        d.load_fixtures(dir)?;
        Ok(d)
    }

    /// Loads `<dir>/<resource>.json` (a `...List`) for every resource whose file exists.
    pub fn load_fixtures(&self, dir: &Path) -> Result<()> {
        for r in KubeResource::ALL {
            let p = dir.join(r.fixture());
            if !p.exists() {
                continue;
            }
            let text =
                std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?;
            let list: Value =
                serde_json::from_str(&text).with_context(|| format!("parsing {}", p.display()))?;
            for item in list["items"].as_array().into_iter().flatten() {
                self.apply(r, item.clone());
            }
        }
        Ok(())
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Writes a kubeconfig that points at the double.
    pub fn write_kubeconfig(&self, path: &Path) -> Result<()> {
        write_kubeconfig(path, &self.url())
    }

    /// Which PeerAuthentication versions are served (default `v1` and `v1beta1`).
    pub fn set_peer_authentication_versions(&self, versions: &[&str]) {
        self.shared.lock().pa_versions = versions.iter().map(|s| s.to_string()).collect();
    }

    /// Adds (ADDED) or replaces (MODIFIED) an object; returns its new resourceVersion.
    pub fn apply(&self, res: KubeResource, obj: Value) -> u64 {
        let rv = apply(&mut self.shared.lock(), res, obj);
        self.shared.changed.notify_all();
        rv
    }

    /// Deletes an object (DELETED); false when it did not exist.
    pub fn delete(&self, res: KubeResource, namespace: Option<&str>, name: &str) -> bool {
        let done = delete(&mut self.shared.lock(), res, namespace, name);
        self.shared.changed.notify_all();
        done
    }

    /// The stored object, with its current resourceVersion.
    pub fn get(&self, res: KubeResource, namespace: Option<&str>, name: &str) -> Option<Value> {
        let st = self.shared.lock();
        st.colls[&res]
            .objects
            .get(&(namespace.unwrap_or("").to_owned(), name.to_owned()))
            .cloned()
    }

    /// Ends every open watch stream (a dropped connection); clients re-watch from their last
    /// resourceVersion.
    pub fn disconnect_watches(&self) {
        self.shared.lock().watch_generation += 1;
        self.shared.changed.notify_all();
    }

    /// Compacts the history (like etcd compaction) and ends every watch: re-watching from any
    /// earlier resourceVersion now gets 410 Gone, so clients must relist.
    pub fn expire_history(&self) {
        {
            let mut st = self.shared.lock();
            st.rv += 1;
            st.horizon = st.rv;
            for c in st.colls.values_mut() {
                c.log.clear();
            }
            st.watch_generation += 1;
        }
        self.shared.changed.notify_all();
    }

    /// While on, every request gets 503 and open watches end (an unreachable API server).
    pub fn set_unavailable(&self, on: bool) {
        {
            let mut st = self.shared.lock();
            st.unavailable = on;
            st.watch_generation += 1;
        }
        self.shared.changed.notify_all();
    }

    /// Request lines received so far (`GET /api/v1/pods?...`).
    pub fn requests(&self) -> Vec<String> {
        self.shared.lock().requests.clone()
    }
}

/// Writes a kubeconfig for `server` (an `http://` URL: the double speaks plain HTTP).
pub fn write_kubeconfig(path: &Path, server: &str) -> Result<()> {
    let text = format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: double\n  cluster:\n    server: {server}\n\
         contexts:\n- name: double\n  context:\n    cluster: double\n    user: agent\n\
         current-context: double\nusers:\n- name: agent\n  user:\n    token: test-token\npreferences: {{}}\n"
    );
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

fn key_of(res: KubeResource, obj: &Value) -> (String, String) {
    let m = &obj["metadata"];
    let ns = if res.namespaced() {
        m["namespace"].as_str().unwrap_or("default").to_owned()
    } else {
        String::new()
    };
    (ns, m["name"].as_str().unwrap_or_default().to_owned())
}

fn apply(st: &mut State, res: KubeResource, mut obj: Value) -> u64 {
    st.rv += 1;
    let rv = st.rv;
    obj["metadata"]["resourceVersion"] = json!(rv.to_string());
    if res.namespaced() && obj["metadata"]["namespace"].is_null() {
        obj["metadata"]["namespace"] = json!("default");
    }
    let key = key_of(res, &obj);
    let c = st
        .colls
        .get_mut(&res)
        .expect("every resource has a collection");
    let ty = if c.objects.insert(key, obj.clone()).is_some() {
        "MODIFIED"
    } else {
        "ADDED"
    };
    c.log.push((rv, ty, obj));
    rv
}

fn delete(st: &mut State, res: KubeResource, namespace: Option<&str>, name: &str) -> bool {
    let key = (
        if res.namespaced() {
            namespace.unwrap_or("default").to_owned()
        } else {
            String::new()
        },
        name.to_owned(),
    );
    st.rv += 1;
    let rv = st.rv;
    let c = st
        .colls
        .get_mut(&res)
        .expect("every resource has a collection");
    let Some(mut obj) = c.objects.remove(&key) else {
        return false;
    };
    obj["metadata"]["resourceVersion"] = json!(rv.to_string());
    c.log.push((rv, "DELETED", obj));
    true
}

/// apiVersion of a resource as served on `path_version` (PeerAuthentication: the URL's).
fn api_version(res: KubeResource, path_version: &str) -> String {
    match res {
        KubeResource::PeerAuthentications => format!("security.istio.io/{path_version}"),
        _ => "v1".into(),
    }
}

fn typed(res: KubeResource, version: &str, mut obj: Value) -> Value {
    obj["apiVersion"] = json!(api_version(res, version));
    obj["kind"] = json!(res.kind());
    obj
}

struct Request {
    method: String,
    path: String,
    query: HashMap<String, String>,
    /// The query string as sent (forwarded as is by `pods/proxy`).
    raw_query: String,
    /// Every header but Content-Length, in order.
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

fn read_request(conn: &mut BufReader<TcpStream>) -> Result<Option<Request>> {
    let mut line = String::new();
    if conn.read_line(&mut line)? == 0 {
        return Ok(None);
    }
    let mut parts = line.split_whitespace();
    let method = parts.next().unwrap_or_default().to_owned();
    let target = parts.next().unwrap_or_default().to_owned();
    let mut content_length = 0usize;
    let mut headers = Vec::new();
    loop {
        let mut h = String::new();
        if conn.read_line(&mut h)? == 0 {
            break;
        }
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            if k.eq_ignore_ascii_case("content-length") {
                content_length = v.trim().parse().unwrap_or(0);
            } else {
                headers.push((k.trim().to_owned(), v.trim().to_owned()));
            }
        }
    }
    let mut body = vec![0; content_length];
    conn.read_exact(&mut body)?;
    let (path, q) = target.split_once('?').unwrap_or((&target, ""));
    let query = q
        .split('&')
        .filter(|s| !s.is_empty())
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (k.to_owned(), percent_decode(v))
        })
        .collect();
    Ok(Some(Request {
        method,
        path: path.to_owned(),
        query,
        raw_query: q.to_owned(),
        headers,
        body,
    }))
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && i + 2 < b.len()
            && let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16)
        {
            out.push(v);
            i += 3;
            continue;
        }
        out.push(if b[i] == b'+' { b' ' } else { b[i] });
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn respond(conn: &mut TcpStream, code: u16, reason: &str, body: &Value) -> Result<()> {
    let body = serde_json::to_vec(body)?;
    write!(
        conn,
        "HTTP/1.1 {code} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )?;
    conn.write_all(&body)?;
    conn.flush()?;
    Ok(())
}

fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code
    })
}

/// (resource, version) of an API path.
fn route(st: &State, path: &str) -> Option<(KubeResource, String)> {
    if let Some(rest) = path.strip_prefix("/api/v1/") {
        return KubeResource::from_plural(rest)
            .filter(|r| *r != KubeResource::PeerAuthentications)
            .map(|r| (r, "v1".to_owned()));
    }
    let rest = path.strip_prefix("/apis/security.istio.io/")?;
    let (version, plural) = rest.split_once('/')?;
    (plural == "peerauthentications" && st.pa_versions.iter().any(|v| v == version))
        .then(|| (KubeResource::PeerAuthentications, version.to_owned()))
}

fn serve(shared: &Shared, conn: TcpStream) -> Result<()> {
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut conn = conn;
    let Some(req) = read_request(&mut reader)? else {
        return Ok(());
    };
    if let Some(admin) = req.path.strip_prefix("/_double/") {
        return serve_admin(shared, &mut conn, admin, &req);
    }
    let found = {
        let mut st = shared.lock();
        let q: Vec<String> = {
            let mut q: Vec<String> = req.query.iter().map(|(k, v)| format!("{k}={v}")).collect();
            q.sort();
            q
        };
        st.requests
            .push(format!("{} {}?{}", req.method, req.path, q.join("&")));
        if st.unavailable {
            drop(st);
            return respond(
                &mut conn,
                503,
                "Service Unavailable",
                &status(
                    503,
                    "ServiceUnavailable",
                    "the server is currently unable to handle the request",
                ),
            );
        }
        route(&st, &req.path)
    };
    if found.is_none()
        && req.method == "GET"
        && let Some(rest) = req.path.strip_prefix("/api/v1/namespaces/")
        && let Some((ns, rest)) = rest.split_once("/pods")
    {
        if rest.is_empty() {
            return serve_namespaced_pods(shared, &mut conn, ns, &req);
        }
        if let Some((pod, path)) = rest.strip_prefix('/').and_then(|r| r.split_once("/proxy")) {
            return serve_pod_proxy(shared, &mut conn, ns, pod, path, &req);
        }
    }
    let Some((res, version)) = found else {
        return respond(
            &mut conn,
            404,
            "Not Found",
            &status(
                404,
                "NotFound",
                "the server could not find the requested resource",
            ),
        );
    };
    if req.method != "GET" {
        return respond(
            &mut conn,
            405,
            "Method Not Allowed",
            &status(
                405,
                "MethodNotAllowed",
                "the double only serves list and watch",
            ),
        );
    }
    let watching = matches!(
        req.query.get("watch").map(String::as_str),
        Some("true" | "1")
    );
    if !watching {
        let st = shared.lock();
        // Pages: `limit` objects, then a `continue` token ("<offset>:<resourceVersion>") that
        // lists the rest as of the first page's resourceVersion, as the API server does.
        let (offset, rv) = match req.query.get("continue") {
            Some(c) => {
                let (o, r) = c.split_once(':').unwrap_or(("0", "0"));
                (o.parse().unwrap_or(0), r.parse().unwrap_or(st.rv))
            }
            None => (0usize, st.rv),
        };
        let limit = req
            .query
            .get("limit")
            .and_then(|l| l.parse::<usize>().ok())
            .filter(|l| *l > 0)
            .unwrap_or(usize::MAX);
        let all = &st.colls[&res].objects;
        let items: Vec<Value> = all
            .values()
            .skip(offset)
            .take(limit)
            .map(|o| {
                if res == KubeResource::PeerAuthentications {
                    typed(res, &version, o.clone())
                } else {
                    o.clone()
                }
            })
            .collect();
        let next = offset + items.len();
        let mut metadata = json!({"resourceVersion": rv.to_string()});
        if next < all.len() {
            metadata["continue"] = json!(format!("{next}:{rv}"));
            metadata["remainingItemCount"] = json!(all.len() - next);
        }
        let list = json!({
            "kind": format!("{}List", res.kind()),
            "apiVersion": api_version(res, &version),
            "metadata": metadata,
            "items": items,
        });
        drop(st);
        return respond(&mut conn, 200, "OK", &list);
    }
    serve_watch(shared, &mut conn, res, &version, &req)
}

/// Whether a pod's labels match an equality selector (`k=v,k2=v2`; empty matches all).
fn selector_matches(pod: &Value, selector: &str) -> bool {
    selector.split(',').filter(|t| !t.is_empty()).all(|term| {
        let (k, v) = term.split_once('=').unwrap_or((term, ""));
        let v = v.trim_start_matches('=');
        pod["metadata"]["labels"][k].as_str() == Some(v)
    })
}

/// `GET /api/v1/namespaces/NS/pods?labelSelector=...`: one namespace's matching pods, one page.
fn serve_namespaced_pods(
    shared: &Shared,
    conn: &mut TcpStream,
    ns: &str,
    req: &Request,
) -> Result<()> {
    let st = shared.lock();
    let selector = req.query.get("labelSelector").cloned().unwrap_or_default();
    let items: Vec<Value> = st.colls[&KubeResource::Pods]
        .objects
        .iter()
        .filter(|((pns, _), pod)| pns == ns && selector_matches(pod, &selector))
        .map(|(_, pod)| pod.clone())
        .collect();
    let list = json!({
        "kind": "PodList",
        "apiVersion": "v1",
        "metadata": {"resourceVersion": st.rv.to_string()},
        "items": items,
    });
    drop(st);
    respond(conn, 200, "OK", &list)
}

/// `pods/proxy`: forwards the request to the pod's IP and port over HTTP and relays the answer.
fn serve_pod_proxy(
    shared: &Shared,
    conn: &mut TcpStream,
    ns: &str,
    target: &str,
    path: &str,
    req: &Request,
) -> Result<()> {
    let (name, port) = match target.rsplit_once(':') {
        Some((n, p)) => (n, p.parse::<u16>().unwrap_or(80)),
        None => (target, 80),
    };
    let pod = shared
        .lock()
        .colls
        .get(&KubeResource::Pods)
        .and_then(|c| c.objects.get(&(ns.to_owned(), name.to_owned())).cloned());
    let Some(pod) = pod else {
        let msg = format!("pods \"{name}\" not found");
        return respond(conn, 404, "Not Found", &status(404, "NotFound", &msg));
    };
    let ip = pod["status"]["podIP"].as_str().unwrap_or_default();
    if ip.is_empty() {
        let msg = format!("address not allowed: pod {name} has no IP");
        return respond(
            conn,
            503,
            "Service Unavailable",
            &status(503, "ServiceUnavailable", &msg),
        );
    }
    let addr: SocketAddr = format!("{ip}:{port}")
        .parse()
        .with_context(|| format!("pod {name} address {ip}:{port}"))?;
    let mut upstream = match TcpStream::connect_timeout(&addr, Duration::from_secs(5)) {
        Ok(u) => u,
        Err(e) => {
            let msg = format!("error trying to reach service: dial tcp {addr}: {e}");
            return respond(
                conn,
                503,
                "Service Unavailable",
                &status(503, "ServiceUnavailable", &msg),
            );
        }
    };
    let path = if path.is_empty() { "/" } else { path };
    let target = match req.raw_query.as_str() {
        "" => path.to_owned(),
        q => format!("{path}?{q}"),
    };
    let mut head = format!("GET {target} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (k, v) in &req.headers {
        // The API server authenticates the caller with Authorization and does not pass it on.
        if !["authorization", "host", "connection"].contains(&k.to_ascii_lowercase().as_str()) {
            head += &format!("{k}: {v}\r\n");
        }
    }
    head += "\r\n";
    upstream.write_all(head.as_bytes())?;
    let mut answer = Vec::new();
    upstream.read_to_end(&mut answer)?;
    conn.write_all(&answer)?;
    conn.flush()?;
    Ok(())
}

fn chunk(conn: &mut TcpStream, v: &Value) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(v).expect("JSON");
    line.push(b'\n');
    write!(conn, "{:x}\r\n", line.len())?;
    conn.write_all(&line)?;
    conn.write_all(b"\r\n")?;
    conn.flush()
}

fn serve_watch(
    shared: &Shared,
    conn: &mut TcpStream,
    res: KubeResource,
    version: &str,
    req: &Request,
) -> Result<()> {
    let from: u64 = req
        .query
        .get("resourceVersion")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let bookmarks = req.query.get("allowWatchBookmarks").map(String::as_str) == Some("true");
    let timeout = req
        .query
        .get("timeoutSeconds")
        .and_then(|v| v.parse().ok())
        .map(Duration::from_secs)
        .unwrap_or(Duration::from_secs(1800));
    write!(
        conn,
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    )?;
    conn.flush()?;
    let deadline = Instant::now() + timeout;
    let mut st = shared.lock();
    let generation = st.watch_generation;
    // resourceVersion=0 ("any") starts at the current state: synthetic ADDED for everything.
    let mut sent = if from == 0 {
        let objs: Vec<Value> = st.colls[&res].objects.values().cloned().collect();
        let rv = st.rv;
        drop(st);
        for o in objs {
            chunk(
                conn,
                &json!({"type": "ADDED", "object": typed(res, version, o)}),
            )?;
        }
        st = shared.lock();
        rv
    } else {
        from
    };
    if from != 0 && from < st.horizon {
        drop(st);
        chunk(
            conn,
            &json!({"type": "ERROR", "object": status(410, "Expired",
                &format!("too old resource version: {from} ({})", from + 1))}),
        )?;
        return finish(conn);
    }
    let mut last_activity = Instant::now();
    loop {
        if shared.stop.load(Ordering::SeqCst)
            || st.watch_generation != generation
            || Instant::now() >= deadline
        {
            drop(st);
            return finish(conn);
        }
        let pending: Vec<(u64, &'static str, Value)> = st.colls[&res]
            .log
            .iter()
            .filter(|(rv, _, _)| *rv > sent)
            .cloned()
            .collect();
        let current = st.rv;
        if !pending.is_empty() {
            drop(st);
            for (rv, ty, o) in pending {
                chunk(conn, &json!({"type": ty, "object": typed(res, version, o)}))?;
                sent = rv;
            }
            last_activity = Instant::now();
            st = shared.lock();
            continue;
        }
        if bookmarks && last_activity.elapsed() >= Duration::from_secs(1) && current > sent {
            drop(st);
            chunk(
                conn,
                &json!({"type": "BOOKMARK", "object": {
                    "kind": res.kind(),
                    "apiVersion": api_version(res, version),
                    "metadata": {"resourceVersion": current.to_string()}
                }}),
            )?;
            sent = current;
            last_activity = Instant::now();
            st = shared.lock();
            continue;
        }
        st = shared
            .changed
            .wait_timeout(st, Duration::from_millis(250))
            .unwrap_or_else(|p| p.into_inner())
            .0;
    }
}

fn finish(conn: &mut TcpStream) -> Result<()> {
    conn.write_all(b"0\r\n\r\n")?;
    conn.flush()?;
    let _ = conn.shutdown(std::net::Shutdown::Both);
    Ok(())
}

fn serve_admin(shared: &Shared, conn: &mut TcpStream, what: &str, req: &Request) -> Result<()> {
    let res = req
        .query
        .get("resource")
        .and_then(|r| KubeResource::from_plural(r));
    let ok = json!({"ok": true});
    match what {
        "apply" => {
            let Some(res) = res else {
                return respond(conn, 400, "Bad Request", &json!({"error": "resource"}));
            };
            let obj: Value = serde_json::from_slice(&req.body)?;
            let rv = apply(&mut shared.lock(), res, obj);
            shared.changed.notify_all();
            respond(conn, 200, "OK", &json!({"resourceVersion": rv}))
        }
        "delete" => {
            let Some(res) = res else {
                return respond(conn, 400, "Bad Request", &json!({"error": "resource"}));
            };
            let name = req.query.get("name").cloned().unwrap_or_default();
            let done = delete(
                &mut shared.lock(),
                res,
                req.query.get("namespace").map(String::as_str),
                &name,
            );
            shared.changed.notify_all();
            respond(conn, 200, "OK", &json!({"deleted": done}))
        }
        "disconnect" => {
            shared.lock().watch_generation += 1;
            shared.changed.notify_all();
            respond(conn, 200, "OK", &ok)
        }
        "expire" => {
            {
                let mut st = shared.lock();
                st.rv += 1;
                st.horizon = st.rv;
                for c in st.colls.values_mut() {
                    c.log.clear();
                }
                st.watch_generation += 1;
            }
            shared.changed.notify_all();
            respond(conn, 200, "OK", &ok)
        }
        "requests" => {
            let r = shared.lock().requests.clone();
            respond(conn, 200, "OK", &json!(r))
        }
        _ => respond(
            conn,
            404,
            "Not Found",
            &json!({"error": "unknown admin request"}),
        ),
    }
}

/// Talks to a double's admin endpoints over HTTP (for the `kube-double` binary in a netns):
/// the same operations as the in-process handle.
pub struct KubeDoubleClient {
    pub addr: SocketAddr,
}

impl KubeDoubleClient {
    fn post(&self, path_query: &str, body: &[u8]) -> Result<Value> {
        let mut c = TcpStream::connect_timeout(&self.addr, Duration::from_secs(5))
            .with_context(|| format!("connecting to the API double at {}", self.addr))?;
        c.set_read_timeout(Some(Duration::from_secs(10)))?;
        write!(
            c,
            "POST /_double/{path_query} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            self.addr,
            body.len()
        )?;
        c.write_all(body)?;
        let mut resp = String::new();
        c.read_to_string(&mut resp)?;
        let (head, body) = resp.split_once("\r\n\r\n").context("no HTTP response")?;
        if !head.starts_with("HTTP/1.1 200") {
            bail!("API double: {head}");
        }
        Ok(serde_json::from_str(body)?)
    }

    pub fn apply(&self, res: KubeResource, obj: &Value) -> Result<()> {
        self.post(
            &format!("apply?resource={}", res.plural()),
            &serde_json::to_vec(obj)?,
        )
        .map(drop)
    }

    pub fn delete(&self, res: KubeResource, namespace: Option<&str>, name: &str) -> Result<()> {
        let ns = namespace
            .map(|n| format!("&namespace={n}"))
            .unwrap_or_default();
        self.post(
            &format!("delete?resource={}&name={name}{ns}", res.plural()),
            b"",
        )
        .map(drop)
    }

    pub fn disconnect_watches(&self) -> Result<()> {
        self.post("disconnect", b"").map(drop)
    }

    pub fn expire_history(&self) -> Result<()> {
        self.post("expire", b"").map(drop)
    }

    pub fn requests(&self) -> Result<Vec<String>> {
        Ok(serde_json::from_value(self.post("requests", b"")?)?)
    }
}

/// The `kube-double` binary (built with this crate): `target/<profile>/kube-double`.
pub fn kube_double_bin() -> Result<PathBuf> {
    if let Some(p) = option_env!("CARGO_BIN_EXE_kube-double") {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe()?;
    // target/<profile>/deps/<test> → target/<profile>/kube-double
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .context("no target directory")?;
    let p = dir.join("kube-double");
    if p.is_file() {
        Ok(p)
    } else {
        bail!("{} not found: build the tests crate's bins", p.display())
    }
}

/// Waits until `addr` accepts TCP connections (from this process's network namespace).
pub fn wait_listening(addr: SocketAddr, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("nothing listens on {addr} after {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A realistic Pod object as the API returns it (Running, with podIPs), for tests that
/// create pods: `owner` is `(kind, name)` of the controller, e.g. `("ReplicaSet",
/// "web-7d9f8c6b5d")`; a ReplicaSet owner gets the matching `pod-template-hash` label.
#[allow(clippy::too_many_arguments)]
pub fn pod_json(
    namespace: &str,
    name: &str,
    owner: Option<(&str, &str)>,
    labels: &[(&str, &str)],
    service_account: &str,
    node: &str,
    ips: &[&str],
    sidecar: bool,
) -> Value {
    let mut lbl: serde_json::Map<String, Value> = labels
        .iter()
        .map(|(k, v)| (k.to_string(), json!(v)))
        .collect();
    let mut owners = Vec::new();
    if let Some((kind, oname)) = owner {
        let api = match kind {
            "Job" => "batch/v1",
            _ => "apps/v1",
        };
        owners.push(json!({
            "apiVersion": api, "kind": kind, "name": oname,
            "uid": format!("{:08x}-0000-4000-8000-000000000000", fxhash(oname)),
            "controller": true, "blockOwnerDeletion": true
        }));
        if kind == "ReplicaSet"
            && let Some((_, hash)) = oname.rsplit_once('-')
        {
            lbl.insert("pod-template-hash".into(), json!(hash));
        }
        if kind == "Job" {
            lbl.insert("batch.kubernetes.io/job-name".into(), json!(oname));
            lbl.insert("job-name".into(), json!(oname));
        }
    }
    let mut containers = vec![json!({
        "name": "app",
        "image": "registry.example/app:1.4.2",
        "ports": [{"containerPort": 8080, "protocol": "TCP"}],
        "resources": {},
        "terminationMessagePath": "/dev/termination-log",
        "terminationMessagePolicy": "File",
        "imagePullPolicy": "IfNotPresent"
    })];
    let mut annotations = json!({});
    if sidecar {
        containers.push(json!({
            "name": "istio-proxy",
            "image": "docker.io/istio/proxyv2:1.24.2",
            "args": ["proxy", "sidecar", "--domain", "$(POD_NAMESPACE).svc.cluster.local"],
            "ports": [{"containerPort": 15090, "name": "http-envoy-prom", "protocol": "TCP"}],
            "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}}
        }));
        annotations = json!({
            "sidecar.istio.io/status": "{\"initContainers\":[\"istio-init\"],\"containers\":[\"istio-proxy\"],\"volumes\":[\"istio-envoy\"],\"imagePullSecrets\":null,\"revision\":\"default\"}",
            "prometheus.io/port": "15020",
            "prometheus.io/scrape": "true"
        });
    }
    let pod_ips: Vec<Value> = ips.iter().map(|ip| json!({"ip": ip})).collect();
    json!({
        "metadata": {
            "name": name,
            "namespace": namespace,
            "uid": format!("{:08x}-1111-4000-8000-000000000000", fxhash(&format!("{namespace}/{name}"))),
            "creationTimestamp": "2026-11-20T09:14:03Z",
            "labels": lbl,
            "annotations": annotations,
            "ownerReferences": owners
        },
        "spec": {
            "containers": containers,
            "restartPolicy": "Always",
            "terminationGracePeriodSeconds": 30,
            "dnsPolicy": "ClusterFirst",
            "serviceAccountName": service_account,
            "serviceAccount": service_account,
            "nodeName": node,
            "securityContext": {},
            "schedulerName": "default-scheduler",
            "enableServiceLinks": true,
            "preemptionPolicy": "PreemptLowerPriority",
            "priority": 0
        },
        "status": {
            "phase": "Running",
            "conditions": [
                {"type": "Ready", "status": "True", "lastProbeTime": null, "lastTransitionTime": "2026-11-20T09:14:09Z"}
            ],
            "hostIP": "198.18.0.1",
            "hostIPs": [{"ip": "198.18.0.1"}],
            "podIP": ips.first().copied().unwrap_or(""),
            "podIPs": pod_ips,
            "startTime": "2026-11-20T09:14:03Z",
            "qosClass": "BestEffort"
        }
    })
}

/// An agent as a pod of the DaemonSet in deploy/ (namespace `mtls-agent`, its label,
/// host network, the port named `metrics`), so that `report` finds them through the API double
/// and reaches them through its `pods/proxy` at 127.0.0.1 and their own ports.
pub fn agent_pod_json(name: &str, node: &str, url: &str) -> Result<Value> {
    let port: u16 = url
        .rsplit_once(':')
        .and_then(|(_, p)| p.parse().ok())
        .context("agent port")?;
    let mut pod = pod_json(
        "mtls-agent",
        name,
        Some(("DaemonSet", "mtls-agent")),
        &[("app.kubernetes.io/name", "mtls-agent")],
        "mtls-agent",
        node,
        &["127.0.0.1"],
        false,
    );
    pod["spec"]["hostNetwork"] = json!(true);
    pod["spec"]["containers"] = json!([{
        "name": "agent",
        "image": "ghcr.io/example/mtls-agent:0.1.0",
        "ports": [{"name": "metrics", "containerPort": port, "protocol": "TCP"}]
    }]);
    Ok(pod)
}

fn fxhash(s: &str) -> u32 {
    s.bytes().fold(0x811c9dc5u32, |h, b| {
        (h ^ b as u32).wrapping_mul(0x01000193)
    })
}

/// The `kube-double` binary running inside a test bed namespace, with the agent's kubeconfig.
pub struct KubeDoubleProc {
    proc: crate::proc::Proc,
    ns: String,
    addr: SocketAddr,
    kubeconfig: PathBuf,
}

impl KubeDoubleProc {
    /// Starts `kube-double` in `ns` on `addr` (e.g. `127.0.0.1:6443`, the loopback of that
    /// namespace) with the fixtures of `fixtures`, and writes a kubeconfig for it into the bed's
    /// work directory.
    pub fn start(
        tb: &crate::netns::Testbed,
        ns: &str,
        addr: SocketAddr,
        fixtures: &Path,
    ) -> Result<Self> {
        let bin = kube_double_bin()?;
        let kubeconfig = tb.workdir().join("kubeconfig");
        let proc = tb.spawn(
            ns,
            &[
                bin.to_str().context("kube-double path is not UTF-8")?,
                "--listen",
                &addr.to_string(),
                "--fixtures",
                fixtures.to_str().context("fixtures path is not UTF-8")?,
                "--kubeconfig",
                kubeconfig.to_str().context("work dir is not UTF-8")?,
            ],
        )?;
        tb.wait_tcp_listening(ns, addr, Duration::from_secs(10))
            .with_context(|| format!("kube-double did not listen: {}", proc.stderr_tail()))?;
        Ok(Self {
            proc,
            ns: ns.to_owned(),
            addr,
            kubeconfig,
        })
    }

    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    pub fn proc(&self) -> &crate::proc::Proc {
        &self.proc
    }

    /// POSTs an admin request from inside the double's namespace (curl).
    fn admin(&self, tb: &crate::netns::Testbed, path_query: &str, body: &Value) -> Result<Value> {
        let url = format!("http://{}/_double/{path_query}", self.addr);
        let body = serde_json::to_string(body)?;
        let out = tb.output(
            &self.ns,
            &[
                "curl",
                "-sS",
                "--fail",
                "--noproxy",
                "*",
                "--max-time",
                "5",
                "-X",
                "POST",
                "-H",
                "Content-Type: application/json",
                "--data-binary",
                "@-",
                &url,
            ],
            Some(body.as_bytes()),
            Duration::from_secs(8),
        )?;
        if !out.status.success() {
            bail!(
                "kube-double admin {path_query}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(serde_json::from_slice(&out.stdout)?)
    }

    /// ADDED/MODIFIED `obj` in the double.
    pub fn apply(&self, tb: &crate::netns::Testbed, res: KubeResource, obj: &Value) -> Result<()> {
        self.admin(tb, &format!("apply?resource={}", res.plural()), obj)
            .map(drop)
    }

    /// DELETED.
    pub fn delete(
        &self,
        tb: &crate::netns::Testbed,
        res: KubeResource,
        namespace: Option<&str>,
        name: &str,
    ) -> Result<()> {
        let ns = namespace
            .map(|n| format!("&namespace={n}"))
            .unwrap_or_default();
        self.admin(
            tb,
            &format!("delete?resource={}&name={name}{ns}", res.plural()),
            &json!({}),
        )
        .map(drop)
    }

    /// Compacts the history and drops the watches (410 Gone on re-watch).
    pub fn expire_history(&self, tb: &crate::netns::Testbed) -> Result<()> {
        self.admin(tb, "expire", &json!({})).map(drop)
    }

    pub fn requests(&self, tb: &crate::netns::Testbed) -> Result<Vec<String>> {
        Ok(serde_json::from_value(self.admin(
            tb,
            "requests",
            &json!({}),
        )?)?)
    }
}
