//! `mtls-agent report`: asks an agent for a namespace's readiness and prints it for people (table)
//! or scripts (JSON, the DESIGN.md contract). Exit 0 for every verdict, `not_ready` included.
use std::{io::Write as _, time::Duration};

use anyhow::Context as _;
use comfy_table::{ContentArrangement, Table, presets::UTF8_BORDERS_ONLY};
use owo_colors::{OwoColorize as _, Stream};

use super::{Output, ReportArgs, prometheus::Prometheus, usage};
use crate::{
    aggregate::{Blocker, ClientKind, NodeClient, Readiness, Report},
    export::http::{ApiError, NamespaceSummary},
};

/// Bearer token for the agent's JSON API (`--token-file`, issue 7), set once per process.
static TOKEN: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// TLS settings for the agent and Prometheus clients (`--ca-file`), set once per process.
static TLS: std::sync::OnceLock<ureq::tls::TlsConfig> = std::sync::OnceLock::new();

/// An HTTP(S) client with the given timeout and the `--ca-file` trust, if given.
pub fn http_client(timeout: Duration) -> ureq::Agent {
    let mut cfg = ureq::Agent::config_builder()
        .timeout_global(Some(timeout))
        .http_status_as_error(false);
    if let Some(tls) = TLS.get() {
        cfg = cfg.tls_config(tls.clone());
    }
    cfg.build().into()
}

/// Reads the CA certificates of `--ca-file`.
fn load_ca(path: &std::path::Path) -> anyhow::Result<ureq::tls::TlsConfig> {
    use ureq::tls::{PemItem, RootCerts, TlsConfig};
    let pem =
        std::fs::read(path).map_err(|e| usage(format!("--ca-file {}: {e}", path.display())))?;
    let mut certs = Vec::new();
    for item in ureq::tls::parse_pem(&pem) {
        match item {
            Ok(PemItem::Certificate(c)) => certs.push(c),
            Ok(_) => {}
            Err(e) => return Err(usage(format!("--ca-file {}: {e}", path.display()))),
        }
    }
    if certs.is_empty() {
        return Err(usage(format!(
            "--ca-file {}: no PEM certificate in it",
            path.display()
        )));
    }
    Ok(TlsConfig::builder()
        .root_certs(RootCerts::new_with_certs(&certs))
        .build())
}

pub fn report(args: ReportArgs) -> anyhow::Result<()> {
    if let Some(path) = &args.token_file {
        let _ =
            TOKEN.set(crate::export::http::read_token_file("--token-file", path).map_err(usage)?);
    }
    if let Some(path) = &args.ca_file {
        let _ = TLS.set(load_ca(path)?);
    }
    let window = args.window.map(Duration::from);
    let mut stdout = std::io::stdout().lock();
    if args.all_namespaces {
        let list = match &args.prometheus {
            Some(url) => {
                let prom = Prometheus::new(url)?;
                let window = window.unwrap_or(crate::aggregate::DEFAULT_WINDOW);
                let mut list = Vec::new();
                for ns in prom.namespaces(window)? {
                    list.push(NamespaceSummary::from_report(
                        &prom.report(&ns, None, window)?,
                    ));
                }
                list
            }
            None => get_json(&args.agent, "/api/v1/namespaces", &window_query(window))?,
        };
        match args.output {
            Output::Json => {
                serde_json::to_writer_pretty(&mut stdout, &list).context("writing JSON")?;
                writeln!(stdout)?;
            }
            Output::Table => write!(stdout, "{}", render_namespaces(&list))?,
        }
        return Ok(());
    }
    let namespace = args
        .namespace
        .as_deref()
        .ok_or_else(|| usage("--namespace or --all-namespaces is required"))?;
    let report: Report = match &args.prometheus {
        Some(url) => Prometheus::new(url)?.report(
            namespace,
            args.workload.as_deref(),
            window.unwrap_or(crate::aggregate::DEFAULT_WINDOW),
        )?,
        None => {
            let mut q = vec![("namespace", namespace.to_owned())];
            if let Some(w) = &args.workload {
                q.push(("workload", w.clone()));
            }
            q.extend(window_query(window));
            get_json(&args.agent, "/api/v1/report", &q)?
        }
    };
    match args.output {
        Output::Json => {
            serde_json::to_writer_pretty(&mut stdout, &report).context("writing JSON")?;
            writeln!(stdout)?;
        }
        Output::Table => write!(stdout, "{}", render_table(&report))?,
    }
    Ok(())
}

fn window_query(window: Option<Duration>) -> Vec<(&'static str, String)> {
    window
        .map(|w| vec![("window", w.as_secs().to_string())])
        .unwrap_or_default()
}

/// GET a JSON document from the agent's API; 400/404 answers are the user's to fix (exit 2).
fn get_json<T: serde::de::DeserializeOwned>(
    agent_url: &str,
    path: &str,
    query: &[(&str, String)],
) -> anyhow::Result<T> {
    let base = agent_url.trim_end_matches('/');
    if !(base.starts_with("http://") || base.starts_with("https://")) {
        return Err(usage(format!(
            "--agent: {agent_url:?} is not an http:// or https:// URL"
        )));
    }
    let agent = http_client(Duration::from_secs(10));
    let mut req = agent.get(format!("{base}{path}"));
    if let Some(token) = TOKEN.get() {
        req = req.header("Authorization", format!("Bearer {token}"));
    }
    for (k, v) in query {
        req = req.query(*k, v);
    }
    let mut resp = req
        .call()
        .map_err(|e| anyhow::anyhow!("cannot reach the agent at {base}: {e}"))?;
    let status = resp.status();
    let body = resp
        .body_mut()
        .read_to_string()
        .with_context(|| format!("reading the answer of {base}"))?;
    if status.is_success() {
        return serde_json::from_str(&body)
            .with_context(|| format!("{base} answered with something that is not a report"));
    }
    let msg = serde_json::from_str::<ApiError>(&body)
        .map(|e| e.error)
        .unwrap_or_else(|_| body.trim().chars().take(200).collect());
    if status.as_u16() == 404 || status.as_u16() == 400 {
        Err(usage(msg))
    } else {
        Err(anyhow::anyhow!(
            "the agent at {base} answered {status}: {msg}"
        ))
    }
}

/// `report --all-namespaces` for people.
pub fn render_namespaces(list: &[NamespaceSummary]) -> String {
    let mut t = Table::new();
    t.load_preset(UTF8_BORDERS_ONLY)
        .set_content_arrangement(ContentArrangement::Dynamic)
        .set_header([
            "NAMESPACE",
            "VERDICT",
            "MTLS RATIO",
            "INBOUND",
            "BLOCKING CONNS",
            "BLOCKERS",
            "SIDECARS",
        ]);
    for n in list {
        t.add_row([
            n.namespace.clone(),
            verdict_text(n.verdict),
            pct(n.mtls_ratio),
            (n.inbound.judged() + n.inbound.exempt).to_string(),
            n.blocking_connections.to_string(),
            n.blockers.to_string(),
            format!("{}/{}", n.workloads_with_sidecar, n.workloads),
        ]);
    }
    let ready = list
        .iter()
        .filter(|n| n.verdict == Readiness::Ready)
        .count();
    let window = list.first().map(|n| n.window_seconds).unwrap_or(0);
    format!(
        "{t}
{ready} of {} namespaces ready for STRICT (window {})
",
        list.len(),
        humantime::format_duration(Duration::from_secs(window))
    )
}

fn pct(r: Option<f64>) -> String {
    r.map(|r| format!("{:.1}%", r * 100.0))
        .unwrap_or_else(|| "n/a".into())
}

fn verdict_text(v: Readiness) -> String {
    match v {
        Readiness::Ready => "READY"
            .if_supports_color(Stream::Stdout, |t| t.green().bold().to_string())
            .to_string(),
        Readiness::NotReady => "NOT READY"
            .if_supports_color(Stream::Stdout, |t| t.red().bold().to_string())
            .to_string(),
        Readiness::NoData => "NO DATA"
            .if_supports_color(Stream::Stdout, |t| t.yellow().bold().to_string())
            .to_string(),
    }
}

fn client_name(b: &Blocker) -> String {
    match (&b.client.namespace, &b.client.workload, &b.client.kind) {
        (Some(ns), Some(w), _) => format!("{ns}/{w}"),
        (_, _, Some(ClientKind::Node)) => format!(
            "node: {}",
            b.client
                .description
                .as_deref()
                .unwrap_or(NodeClient::NodeOrHostNetwork.description())
        ),
        _ => "(unknown)".into(),
    }
}

/// What to do about one blocker, in words: the agent's advice where it has one.
pub fn advice(b: &Blocker, report: &Report) -> String {
    if let Some(a) = &b.advice {
        return a.clone();
    }
    let client = client_name(b);
    let client_has_no_sidecar = b.client.namespace.as_deref() == Some(report.namespace.as_str())
        && report
            .workloads
            .iter()
            .any(|w| Some(&w.name) == b.client.workload.as_ref() && !w.sidecar);
    match b.security.as_str() {
        "plaintext" if b.client.workload.is_none() => format!(
            "client {} is outside the mesh: move it behind a sidecar, or exempt port {}?",
            b.client.address, b.server.port
        ),
        "plaintext" | "tls" | "mtls" if client_has_no_sidecar || b.mesh != "istio" => {
            if b.security == "plaintext" {
                format!("inject a sidecar into {client}")
            } else {
                format!(
                    "{client} speaks non-Istio TLS: inject a sidecar or exempt port {}?",
                    b.server.port
                )
            }
        }
        "unknown" => {
            "handshake not seen (started before the agent, or events lost): watch again".into()
        }
        _ => format!("{client} does not present an Istio client certificate"),
    }
}

pub fn render_table(r: &Report) -> String {
    let mut s = String::new();
    let subject = match &r.workload {
        Some(w) => format!("workload {}/{}", r.namespace, w),
        None => format!("namespace {}", r.namespace),
    };
    s += &format!(
        "STRICT readiness of {subject}: {} (window {})\n",
        verdict_text(r.verdict),
        humantime::format_duration(Duration::from_secs(r.window_seconds))
    );
    let judged = r.inbound.mtls + r.inbound.tls + r.inbound.plaintext + r.inbound.unknown;
    s += &format!(
        "mTLS ratio {} — {} of {} judged inbound connections are Istio mTLS; {} exempt (Istio ports, ports not captured, ambient probes)\n",
        pct(r.mtls_ratio),
        r.compliant,
        judged,
        r.inbound.exempt
    );
    s += &format!(
        "inbound: mtls {} · tls {} · plaintext {} · unknown {} · exempt {}\n",
        r.inbound.mtls, r.inbound.tls, r.inbound.plaintext, r.inbound.unknown, r.inbound.exempt
    );
    if let Some(mode) = &r.peer_authentication {
        s += &format!("PeerAuthentication (namespace-wide): {mode}\n");
    }
    if r.rejected > 0 {
        s += &format!(
            "rejected: {} inbound connections were reset or closed right after the client's first bytes — these already break (STRICT enforcing?)\n",
            r.rejected
        );
    }
    if !r.blockers.is_empty() {
        s += "\nBlockers — these connections would break under STRICT:\n";
        let mut t = Table::new();
        t.load_preset(UTF8_BORDERS_ONLY)
            .set_content_arrangement(ContentArrangement::Dynamic)
            .set_header([
                "CLIENT",
                "ADDRESS",
                "SERVER",
                "PORT",
                "SECURITY",
                "CONNS",
                "LAST SEEN",
                "EVIDENCE",
                "WHAT TO DO",
            ]);
        for b in &r.blockers {
            let security = match &b.protocol {
                Some(p) => format!("{} ({p})", b.security),
                None => b.security.clone(),
            };
            t.add_row([
                client_name(b),
                b.client.address.clone(),
                b.server.workload.clone(),
                b.server.port.to_string(),
                security,
                b.connections.to_string(),
                b.last_seen.clone(),
                b.evidence.clone(),
                advice(b, r),
            ]);
        }
        s += &format!("{t}\n");
    }
    if !r.workloads.is_empty() {
        s += "\nWorkloads:\n";
        let with_modes = r.workloads.iter().any(|w| w.mode.is_some());
        let mut header = vec![
            "WORKLOAD",
            "VERDICT",
            "SIDECAR",
            "MTLS",
            "TLS",
            "PLAINTEXT",
            "UNKNOWN",
            "EXEMPT",
            "MTLS RATIO",
            "PORTS",
        ];
        if with_modes {
            header.push("MODE");
        }
        let mut t = Table::new();
        t.load_preset(UTF8_BORDERS_ONLY)
            .set_content_arrangement(ContentArrangement::Dynamic)
            .set_header(header);
        for w in &r.workloads {
            let ports = w
                .ports
                .iter()
                .map(|p| match &p.mode {
                    Some(m) => format!("{} ({m})", p.port),
                    None => p.port.to_string(),
                })
                .collect::<Vec<_>>()
                .join(", ");
            let mut row = vec![
                w.name.clone(),
                w.verdict.as_str().to_owned(),
                if w.sidecar { "yes".into() } else { "NO".into() },
                w.inbound.mtls.to_string(),
                w.inbound.tls.to_string(),
                w.inbound.plaintext.to_string(),
                w.inbound.unknown.to_string(),
                w.inbound.exempt.to_string(),
                pct(w.mtls_ratio),
                ports,
            ];
            if with_modes {
                row.push(w.mode.clone().unwrap_or_else(|| "-".into()));
            }
            t.add_row(row);
        }
        s += &format!("{t}\n");
        let missing: Vec<&str> = r
            .workloads
            .iter()
            .filter(|w| !w.sidecar)
            .map(|w| w.name.as_str())
            .collect();
        if !missing.is_empty() {
            s += &format!(
                "Without sidecar (STRICT does not protect them until injected): {}\n",
                missing.join(", ")
            );
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::aggregate::{ClientRef, Inbound, ServerRef, WorkloadReport};

    fn sample() -> Report {
        Report {
            namespace: "shop".into(),
            workload: None,
            window_seconds: 125,
            verdict: Readiness::NotReady,
            inbound: Inbound {
                mtls: 1,
                plaintext: 2,
                exempt: 1,
                ..Default::default()
            },
            mtls_ratio: Some(1.0 / 3.0),
            compliant: 1,
            rejected: 2,
            peer_authentication: Some("STRICT".into()),
            blockers: vec![Blocker {
                client: ClientRef {
                    namespace: Some("legacy".into()),
                    workload: Some("batch".into()),
                    address: "198.18.0.4".into(),
                    kind: None,
                    description: None,
                },
                server: ServerRef {
                    workload: "web".into(),
                    port: 8080,
                },
                security: "plaintext".into(),
                connections: 2,
                last_seen: "2026-11-24T01:00:00Z".into(),
                evidence: "plaintext_first_bytes".into(),
                mesh: "none".into(),
                protocol: Some("http1".into()),
                advice: None,
            }],
            workloads: vec![WorkloadReport {
                name: "web".into(),
                verdict: Readiness::NotReady,
                inbound: Inbound {
                    mtls: 1,
                    plaintext: 2,
                    exempt: 1,
                    ..Default::default()
                },
                sidecar: true,
                mtls_ratio: Some(1.0 / 3.0),
                compliant: 1,
                rejected: 2,
                mode: Some("STRICT".into()),
                ports: vec![crate::aggregate::PortReport {
                    port: 8080,
                    connections: 3,
                    mode: Some("STRICT".into()),
                }],
            }],
        }
    }

    #[test]
    fn table_names_verdict_blockers_and_advice() {
        let t = render_table(&sample());
        assert!(t.contains("NOT READY"), "{t}");
        assert!(t.contains("33.3%"), "{t}");
        assert!(t.contains("legacy/batch"), "{t}");
        assert!(t.contains("plaintext (http1)"), "{t}");
        assert!(t.contains("inject a sidecar into legacy/batch"), "{t}");
        assert!(t.contains("2m 5s"), "{t}");
        assert!(
            t.contains("PeerAuthentication (namespace-wide): STRICT"),
            "{t}"
        );
        assert!(t.contains("rejected: 2 inbound"), "{t}");
        assert!(t.contains("8080 (STRICT)"), "{t}");
    }

    #[test]
    fn table_names_the_node_and_its_advice() {
        let mut r = sample();
        let mut b = r.blockers[0].clone();
        b.client = ClientRef::node("198.18.0.1".into(), NodeClient::NodeOrHostNetwork);
        b.advice = Some(NodeClient::NodeOrHostNetwork.advice(8080));
        r.blockers.push(b);
        let t = render_table(&r);
        assert!(t.contains("node: the node or a hostNetwork pod"), "{t}");
        assert!(t.contains("excludeInboundPorts"), "{t}");
        assert!(t.contains("inject a sidecar into legacy/batch"), "{t}");
    }
}
