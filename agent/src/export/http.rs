//! The agent's HTTP surface (axum): `/metrics`, `/healthz`, `/api/v1/report`,
//! `/api/v1/namespaces`. Handlers hold the pipeline lock only to copy out what they answer.
use std::sync::{Arc, Mutex};

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
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
        s.metrics.render(),
    )
        .into_response()
}

#[derive(Debug, Deserialize)]
pub struct ReportQuery {
    pub namespace: Option<String>,
    pub workload: Option<String>,
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
        return error(StatusCode::BAD_REQUEST, "query parameter `namespace` is required".into());
    };
    let result = {
        let agg = s.aggregator.lock().unwrap_or_else(|p| p.into_inner());
        agg.report(&ns, q.workload.as_deref())
    };
    match result {
        Ok(r) => Json(r).into_response(),
        Err(e @ (ReportError::UnknownNamespace(_) | ReportError::UnknownWorkload(..))) => {
            error(StatusCode::NOT_FOUND, e.to_string())
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
pub struct NamespaceSummary {
    pub namespace: String,
    pub verdict: crate::aggregate::Readiness,
    pub mtls_ratio: Option<f64>,
    pub blockers: usize,
}

async fn namespaces(State(s): State<AppState>) -> Response {
    let agg = s.aggregator.lock().unwrap_or_else(|p| p.into_inner());
    let list: Vec<NamespaceSummary> = agg
        .namespaces()
        .into_iter()
        .filter_map(|ns| agg.report(&ns, None).ok())
        .map(|r| NamespaceSummary {
            namespace: r.namespace,
            verdict: r.verdict,
            mtls_ratio: r.mtls_ratio,
            blockers: r.blockers.len(),
        })
        .collect();
    Json(list).into_response()
}
