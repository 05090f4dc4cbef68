//! Where `report` and `policy` get their data: one trait, one implementation per way of asking
//! (`--agent`: one node's JSON API; `--prometheus`: every agent's counters through PromQL), so
//! every command works every way; `cluster`: every agent pod through the Kubernetes API's
//! `pods/proxy`, merged).
//!
//! Which one (DESIGN.md): `--agent` if given, else `--prometheus`, else the cluster when a
//! kubeconfig is found (`--kubeconfig`, `KUBECONFIG`, `~/.kube/config`, in-cluster), else the
//! local agent at http://127.0.0.1:9477.
use std::time::Duration;

use clap::Args;

use super::{prometheus::Prometheus, report::get_json, usage};
use crate::{aggregate::Report, export::http::NamespaceSummary};

/// The report data of a namespace, however it is obtained.
pub trait Source {
    /// The report of `namespace` (or one `workload` of it) over `window` (`None`: the source's
    /// default), with the per-workload detail `policy` needs: blockers with server port and last
    /// seen, judged connections per port, sidecar, selector labels, and the PeerAuthentications
    /// the source knows. An unknown namespace or workload is a usage error (exit 2).
    fn report(
        &self,
        namespace: &str,
        workload: Option<&str>,
        window: Option<Duration>,
    ) -> anyhow::Result<Report>;

    /// One summary per namespace the source knows.
    fn namespaces(&self, window: Option<Duration>) -> anyhow::Result<Vec<NamespaceSummary>>;
}

/// The flags that choose the source, shared by every command that asks one.
#[derive(Debug, Args)]
pub struct SourceArgs {
    /// Base URL of a running agent (one node). Default: every agent of the cluster through the
    /// API server when a kubeconfig is found, else http://127.0.0.1:9477.
    #[arg(long, value_name = "URL")]
    pub agent: Option<String>,
    /// Base URL of a Prometheus that scrapes every agent (cluster-wide).
    #[arg(long, value_name = "URL", conflicts_with = "agent")]
    pub prometheus: Option<String>,
    /// Send the first line of FILE as a bearer token to an agent run with --api-token-file.
    #[arg(long, value_name = "FILE", conflicts_with = "prometheus")]
    pub token_file: Option<std::path::PathBuf>,
    /// For https:// URLs (--agent or --prometheus): trust the CA certificates in FILE (PEM)
    /// instead of the public web roots, e.g. the CA that signed the agent's --tls-cert.
    #[arg(long, value_name = "FILE")]
    pub ca_file: Option<std::path::PathBuf>,
    /// Kubeconfig for asking every agent through the API server (default: KUBECONFIG,
    /// ~/.kube/config, then in-cluster).
    #[arg(long, value_name = "FILE", conflicts_with_all = ["agent", "prometheus"])]
    pub kubeconfig: Option<std::path::PathBuf>,
    /// Kubeconfig context to use (default: the current context).
    #[arg(long, value_name = "NAME", conflicts_with_all = ["agent", "prometheus"])]
    pub context: Option<String>,
    /// Namespace of the agent pods (cluster mode).
    #[arg(long, value_name = "NS", default_value = super::cluster::DEFAULT_AGENT_NAMESPACE)]
    pub agent_namespace: String,
    /// Label selector of the agent pods (cluster mode).
    #[arg(long, value_name = "SELECTOR", default_value = super::cluster::DEFAULT_AGENT_SELECTOR)]
    pub agent_selector: String,
    /// How long each agent may take to answer (cluster mode); slower ones are reported missing.
    #[arg(long, value_name = "DURATION", default_value = "10s")]
    pub agent_timeout: humantime::Duration,
}

impl SourceArgs {
    /// The source these flags name (after reading the token and CA files).
    pub fn open(&self) -> anyhow::Result<Box<dyn Source>> {
        super::report::init_client(self.token_file.as_deref(), self.ca_file.as_deref())?;
        let kube = super::cluster::KubeArgs {
            kubeconfig: self.kubeconfig.as_deref(),
            context: self.context.as_deref(),
        };
        Ok(match (&self.agent, &self.prometheus) {
            (Some(url), _) => Box::new(AgentApi { url: url.clone() }),
            (None, Some(url)) => Box::new(Prometheus::new(url)?),
            (None, None) if super::cluster::kubeconfig_found(&kube) => {
                let token = match &self.token_file {
                    Some(p) => Some(
                        crate::export::http::read_token_file("--token-file", p).map_err(usage)?,
                    ),
                    None => None,
                };
                Box::new(super::cluster::Cluster::new(
                    &kube,
                    &self.agent_namespace,
                    &self.agent_selector,
                    self.agent_timeout.into(),
                    token,
                )?)
            }
            (None, None) => Box::new(AgentApi {
                url: "http://127.0.0.1:9477".into(),
            }),
        })
    }
}

/// One agent's JSON API (`/api/v1/report`, `/api/v1/namespaces`).
pub struct AgentApi {
    pub url: String,
}

pub(super) fn window_query(window: Option<Duration>) -> Vec<(&'static str, String)> {
    window
        .map(|w| vec![("window", w.as_secs().to_string())])
        .unwrap_or_default()
}

/// The query of the agent API's `/api/v1/report`.
pub(super) fn report_query(
    namespace: &str,
    workload: Option<&str>,
    window: Option<Duration>,
) -> Vec<(&'static str, String)> {
    let mut q = vec![("namespace", namespace.to_owned())];
    if let Some(w) = workload {
        q.push(("workload", w.to_owned()));
    }
    q.extend(window_query(window));
    q
}

impl Source for AgentApi {
    fn report(
        &self,
        namespace: &str,
        workload: Option<&str>,
        window: Option<Duration>,
    ) -> anyhow::Result<Report> {
        get_json(
            &self.url,
            "/api/v1/report",
            &report_query(namespace, workload, window),
        )
    }

    fn namespaces(&self, window: Option<Duration>) -> anyhow::Result<Vec<NamespaceSummary>> {
        get_json(&self.url, "/api/v1/namespaces", &window_query(window))
    }
}

impl Source for Prometheus {
    fn report(
        &self,
        namespace: &str,
        workload: Option<&str>,
        window: Option<Duration>,
    ) -> anyhow::Result<Report> {
        Prometheus::report(
            self,
            namespace,
            workload,
            window.unwrap_or(crate::aggregate::DEFAULT_WINDOW),
        )
    }

    fn namespaces(&self, window: Option<Duration>) -> anyhow::Result<Vec<NamespaceSummary>> {
        let window = window.unwrap_or(crate::aggregate::DEFAULT_WINDOW);
        let mut list = Vec::new();
        for ns in Prometheus::namespaces(self, window)? {
            list.push(NamespaceSummary::from_report(&Prometheus::report(
                self, &ns, None, window,
            )?));
        }
        Ok(list)
    }
}
