//! The agent's HTTP surface (axum): `/metrics`, `/healthz`, `/api/v1/report`,
//! `/api/v1/namespaces`, `/api/v1/connections`. Handlers hold the pipeline lock only to copy out what they answer.
use std::{
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use axum::{
    Json, Router,
    extract::{Query, State},
    http::{StatusCode, header},
    response::{IntoResponse, Response},
    routing::get,
};
use serde::{Deserialize, Serialize};

use crate::{
    aggregate::{Aggregator, ReportError},
    export::metrics::Metrics,
};

#[derive(Clone)]
pub struct AppState {
    pub aggregator: Arc<Mutex<Aggregator>>,
    pub metrics: Metrics,
}

pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/api/v1/report", get(report))
        .route("/api/v1/namespaces", get(namespaces))
        .route("/api/v1/identity", get(identity))
        .with_state(state)
}

async fn metrics(State(s): State<AppState>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        s.metrics.render(),
    )
        .into_response()
}

#[derive(Debug, Deserialize)]
pub struct ReportQuery {
    pub namespace: Option<String>,
    pub workload: Option<String>,
    /// Seconds; default the agent's `--window`.
    pub window: Option<u64>,
}

#[derive(Debug, Deserialize)]
pub struct WindowQuery {
    pub window: Option<u64>,
}

/// Error body of the JSON API: `{"error": "..."}`.
#[derive(Debug, Serialize, Deserialize)]
pub struct ApiError {
    pub error: String,
}

fn error(status: StatusCode, msg: String) -> Response {
    (status, Json(ApiError { error: msg })).into_response()
}

async fn report(State(s): State<AppState>, Query(q): Query<ReportQuery>) -> Response {
    let Some(ns) = q.namespace.filter(|n| !n.is_empty()) else {
        return error(
            StatusCode::BAD_REQUEST,
            "query parameter `namespace` is required".into(),
        );
    };
    let result = {
        let agg = s.aggregator.lock().unwrap_or_else(|p| p.into_inner());
        agg.report_window(
            &ns,
            q.workload.as_deref(),
            q.window.map(Duration::from_secs),
            SystemTime::now(),
        )
    };
    match result {
        Ok(r) => Json(r).into_response(),
        Err(e @ (ReportError::UnknownNamespace(_) | ReportError::UnknownWorkload(..))) => {
            error(StatusCode::NOT_FOUND, e.to_string())
        }
        Err(e @ (ReportError::WindowTooLong { .. } | ReportError::WindowZero)) => {
            error(StatusCode::BAD_REQUEST, e.to_string())
        }
    }
}

/// One line of `report --all-namespaces`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NamespaceSummary {
    pub namespace: String,
    pub window_seconds: u64,
    pub verdict: crate::aggregate::Readiness,
    pub mtls_ratio: Option<f64>,
    pub inbound: crate::aggregate::Inbound,
    /// Distinct blockers (client × server port × security).
    pub blockers: usize,
    /// Blocking connections in the window.
    pub blocking_connections: u64,
    pub workloads: usize,
    pub workloads_with_sidecar: usize,
}

impl NamespaceSummary {
    pub fn from_report(r: &crate::aggregate::Report) -> Self {
        Self {
            namespace: r.namespace.clone(),
            window_seconds: r.window_seconds,
            verdict: r.verdict,
            mtls_ratio: r.mtls_ratio,
            inbound: r.inbound,
            blockers: r.blockers.len(),
            blocking_connections: r.blockers.iter().map(|b| b.connections).sum(),
            workloads: r.workloads.len(),
            workloads_with_sidecar: r.workloads.iter().filter(|w| w.sidecar).count(),
        }
    }
}

async fn namespaces(State(s): State<AppState>, Query(q): Query<WindowQuery>) -> Response {
    let agg = s.aggregator.lock().unwrap_or_else(|p| p.into_inner());
    let now = SystemTime::now();
    let window = q.window.map(Duration::from_secs);
    let mut list = Vec::new();
    for ns in agg.namespaces() {
        match agg.report_window(&ns, None, window, now) {
            Ok(r) => list.push(NamespaceSummary::from_report(&r)),
            Err(e) => return error(StatusCode::BAD_REQUEST, e.to_string()),
        }
    }
    Json(list).into_response()
}

// --- Kubernetes mode (issue 4): who an address is, and which PeerAuthentication mode applies. ---

#[derive(Debug, Deserialize)]
pub struct IdentityQuery {
    /// An address: its workload, pod, service account, SPIFFE ID, node.
    pub ip: Option<String>,
    /// Or a namespace (with optional workload): its injection labels and mode.
    pub namespace: Option<String>,
    pub workload: Option<String>,
    /// Server port for the mode (workload `portLevelMtls`).
    pub port: Option<u16>,
}

/// `GET /api/v1/identity?ip=A[&port=P]` or `?namespace=NS[&workload=W][&port=P]`.
async fn identity(State(s): State<AppState>, Query(q): Query<IdentityQuery>) -> Response {
    use crate::identity::Workload;
    let agg = s.aggregator.lock().unwrap_or_else(|p| p.into_inner());
    let r = agg.resolver();
    if let Some(ip) = q.ip.as_deref() {
        let Ok(ip) = ip.parse::<std::net::IpAddr>() else {
            return error(
                StatusCode::BAD_REQUEST,
                format!("ip: {ip:?} is not an address"),
            );
        };
        let workload = r.lookup(ip).map(|w: &std::sync::Arc<Workload>| {
            serde_json::json!({"namespace": w.namespace, "name": w.name, "sidecar": w.sidecar})
        });
        let kube = r.kube();
        let mode = match (kube, q.port) {
            (Some(k), Some(port)) => k.effective_mode_for_ip(ip, port),
            _ => None,
        };
        let namespace = r.lookup(ip).map(|w| w.namespace.clone());
        return Json(serde_json::json!({
            "ip": ip.to_string(),
            "workload": workload,
            "pod": r.pod(ip),
            "node": r.is_node(ip),
            "node_name": kube.and_then(|k| k.node_of(ip)),
            "mode": mode,
            "injection": namespace.as_deref().and_then(|ns| r.injection(ns)),
            // What decides an exemption on that port (capture, ambient, unrewritten probe).
            "inbound": q.port.map(|p| r.inbound_port(std::net::SocketAddr::new(ip, p))),
        }))
        .into_response();
    }
    let Some(ns) = q.namespace.filter(|n| !n.is_empty()) else {
        return error(
            StatusCode::BAD_REQUEST,
            "query parameter `ip` or `namespace` is required".into(),
        );
    };
    Json(serde_json::json!({
        "namespace": ns,
        "workload": q.workload,
        "port": q.port,
        "mode": r.effective_mode(&ns, q.workload.as_deref(), q.port),
        "injection": r.injection(&ns),
    }))
    .into_response()
}

// --- Recent connections (issue 3) ---

/// `GET /api/v1/connections`: the ring of recently classified connections, oldest first
/// (`--recent-connections`, `--expose-handshake-details`).
pub fn connections_router(recent: Arc<Mutex<crate::classify::RecentConnections>>) -> Router {
    Router::new()
        .route("/api/v1/connections", get(connections))
        .with_state(recent)
}

async fn connections(
    State(recent): State<Arc<Mutex<crate::classify::RecentConnections>>>,
) -> Response {
    let snapshot = recent.lock().unwrap_or_else(|p| p.into_inner()).snapshot();
    Json(snapshot).into_response()
}

// --- Access control and TLS (issue 7) ---

/// Paths that stay open when `--api-token-file` is set: what Prometheus and the kubelet need.
const OPEN_PATHS: [&str; 2] = ["/metrics", "/healthz"];

/// Reads a bearer token: the first line of the file, trimmed. `flag` names the option in errors.
pub fn read_token_file(flag: &str, path: &std::path::Path) -> Result<String, String> {
    let text =
        std::fs::read_to_string(path).map_err(|e| format!("{flag} {}: {e}", path.display()))?;
    let token = text.lines().next().unwrap_or("").trim();
    if token.is_empty() {
        return Err(format!(
            "{flag} {}: the first line is empty",
            path.display()
        ));
    }
    if !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(format!(
            "{flag} {}: the token must be printable ASCII without spaces",
            path.display()
        ));
    }
    Ok(token.to_owned())
}

/// The header that carries the API token through the Kubernetes API server's `pods/proxy`,
/// which consumes `Authorization` for its own authentication (`report` in cluster mode).
pub const PROXIED_TOKEN_HEADER: &str = "x-mtls-agent-authorization";

/// With `Some(token)`, every path except /metrics and /healthz answers 401 unless the request
/// carries `Authorization: Bearer <token>`.
pub fn with_api_token(app: Router, token: Option<String>) -> Router {
    match token {
        None => app,
        Some(t) => app.layer(axum::middleware::from_fn_with_state(
            Arc::<[u8]>::from(t.into_bytes()),
            require_token,
        )),
    }
}

async fn require_token(
    State(token): State<Arc<[u8]>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    if OPEN_PATHS.contains(&req.uri().path()) {
        return next.run(req).await;
    }
    let ok = [header::AUTHORIZATION.as_str(), PROXIED_TOKEN_HEADER]
        .into_iter()
        .any(|name| {
            req.headers()
                .get(name)
                .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "))
                .is_some_and(|g| constant_time_eq(g, &token))
        });
    if ok {
        return next.run(req).await;
    }
    let mut r = error(
        StatusCode::UNAUTHORIZED,
        "this agent requires a bearer token (report --token-file)".into(),
    );
    r.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        axum::http::HeaderValue::from_static("Bearer"),
    );
    r
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Loads `--tls-cert` (PEM chain) and `--tls-key` (PEM private key) into a server config.
pub fn load_tls(
    cert: &std::path::Path,
    key: &std::path::Path,
) -> Result<Arc<rustls::ServerConfig>, String> {
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject as _};
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .and_then(|it| it.collect::<Result<_, _>>())
        .map_err(|e| format!("--tls-cert {}: {e}", cert.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "--tls-cert {}: no certificate in the file",
            cert.display()
        ));
    }
    let key = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| format!("--tls-key {}: {e}", key.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS: {e}"))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| format!("--tls-cert/--tls-key: {e}"))?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

/// Serves `app` over TLS (HTTP/1.1) until `shutdown` completes. A client that does not finish
/// its handshake within 10 s is dropped.
pub async fn serve_tls(
    listener: tokio::net::TcpListener,
    app: Router,
    tls: Arc<rustls::ServerConfig>,
    shutdown: impl std::future::Future<Output = ()>,
) -> std::io::Result<()> {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    tokio::pin!(shutdown);
    loop {
        let tcp = tokio::select! {
            _ = &mut shutdown => return Ok(()),
            r = listener.accept() => match r {
                Ok((tcp, _)) => tcp,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::debug!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let acceptor = acceptor.clone();
        let app = app.clone();
        tokio::spawn(async move {
            let Ok(Ok(tls)) =
                tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await
            else {
                return;
            };
            let svc = hyper_util::service::TowerToHyperService::new(app);
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(tls), svc)
                .await;
        });
    }
}

#[cfg(test)]
mod access_tests {
    use super::*;

    #[test]
    fn token_comparison() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"abcd"));
    }

    #[test]
    fn token_file_first_line() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t");
        std::fs::write(&p, "s3cr3t\nignored\n").unwrap();
        assert_eq!(read_token_file("--x", &p).unwrap(), "s3cr3t");
        std::fs::write(&p, "\n").unwrap();
        assert!(read_token_file("--x", &p).unwrap_err().contains("--x"));
        std::fs::write(&p, "a b\n").unwrap();
        assert!(read_token_file("--x", &p).is_err());
    }
}
