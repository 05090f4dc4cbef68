//! export: what leaves the agent — Prometheus `/metrics`, `/healthz`, and the JSON report API.
pub mod http;
pub mod metrics;
