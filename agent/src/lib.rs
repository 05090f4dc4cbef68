//! mtls-agent: the data path of DESIGN.md, one module per stage.
//!
//! capture (kernel, ring buffer) → flows (events to per-connection segment streams) → classify
//! (verdicts) → identity (who is who) → aggregate (namespaces, workloads, readiness) → export
//! (Prometheus, JSON); daemon runs the loop that drives them on a node; cli ties them together.
pub mod aggregate;
pub mod capture;
pub mod classify;
pub mod cli;
pub mod daemon;
pub mod export;
pub mod flows;
pub mod identity;
pub mod pcap;
pub mod policy;
