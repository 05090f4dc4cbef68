//! The agent's HTTP surface (axum): `/metrics`, `/healthz`, `/api/v1/report`,
//! `/api/v1/namespaces`. Handlers hold the pipeline lock only to copy out what they answer.
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
