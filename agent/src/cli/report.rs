//! `mtls-agent report`: asks an agent for a namespace's readiness and prints it for people (table)
//! or scripts (JSON, the DESIGN.md contract). Exit 0 for every verdict, `not_ready` included.
use std::{io::Write as _, time::Duration};

use anyhow::Context as _;
use comfy_table::{ContentArrangement, Table, presets::UTF8_BORDERS_ONLY};
use owo_colors::{OwoColorize as _, Stream};

use super::{Output, ReportArgs, usage};
use crate::{
    aggregate::{Blocker, ClientKind, NodeClient, Readiness, Report},
    export::http::{ApiError, NamespaceSummary},
    policy::{PolicySet, whatif},
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

/// Reads `--token-file` and `--ca-file` once for the HTTP clients of this process.
pub fn init_client(
    token_file: Option<&std::path::Path>,
    ca_file: Option<&std::path::Path>,
) -> anyhow::Result<()> {
    if let Some(path) = token_file {
        let _ =
            TOKEN.set(crate::export::http::read_token_file("--token-file", path).map_err(usage)?);
    }
    if let Some(path) = ca_file {
        let _ = TLS.set(load_ca(path)?);
    }
    Ok(())
}

pub fn report(args: ReportArgs) -> anyhow::Result<()> {
    // Policy files first: a typo there is the user's to fix before any network call.
    let assumed = read_assumed(&args.assume_policy)?;
    let source = args.source.open()?;
    let window = args.window.map(Duration::from);
    let width = super::width::table_width();
    let mut stdout = std::io::stdout().lock();
    if args.all_namespaces {
        let list = source.namespaces(window)?;
        match args.output {
            Output::Json => {
                serde_json::to_writer_pretty(&mut stdout, &list).context("writing JSON")?;
                writeln!(stdout)?;
            }
            Output::Table => write!(stdout, "{}", render_namespaces(&list, width))?,
        }
        return Ok(());
    }
    let namespace = args
        .namespace
        .as_deref()
        .ok_or_else(|| usage("--namespace or --all-namespaces is required"))?;
    let mut report = source.report(namespace, args.workload.as_deref(), window)?;
    report.warnings = crate::aggregate::report::warnings(&report);
    if !assumed.is_empty() {
        let mut set = PolicySet::new(&args.istio_root_namespace);
        for r in &report.peer_authentications {
            set.apply(r.clone());
        }
        let mut ids = Vec::new();
        for (i, pa) in assumed.iter().enumerate() {
            // Not applied yet: newer than every known policy, unless it replaces one of the
            // same name (an update keeps the object's creation time).
            let mut rule = pa.to_rule(namespace, i64::MAX / 2 + i as i64);
            if let Some(old) = set
                .rules
                .iter()
                .find(|r| r.namespace == rule.namespace && r.name == rule.name)
            {
                rule.created = old.created;
            }
            ids.push(rule.id());
            set.apply(rule);
        }
        report.what_if = Some(whatif::judge(&report, &set, &ids));
    }
    match args.output {
        Output::Json => {
            serde_json::to_writer_pretty(&mut stdout, &report).context("writing JSON")?;
            writeln!(stdout)?;
        }
        Output::Table => {
            write!(stdout, "{}", render_table(&report, width))?;
            if let Some(w) = &report.what_if {
                write!(stdout, "{}", render_what_if(w, width))?;
            }
            if let Some(n) = &report.nodes {
                writeln!(stdout, "\n{}", n.summary())?;
            }
        }
    }
    stdout.flush()?;
    if args.check
        && let Some(w) = &report.what_if
        && w.rejects_anything()
    {
        return Err(WouldReject(w.rejected_connections).into());
    }
    Ok(())
}

/// `report --check`: the assumed policies would reject traffic (exit code 3).
#[derive(Debug, thiserror::Error)]
#[error(
    "the assumed PeerAuthentications would reject {0} connections seen in the window (--check)"
)]
pub struct WouldReject(pub u64);

/// Every document of every `--assume-policy` file (`-`: stdin, once).
fn read_assumed(
    paths: &[std::path::PathBuf],
) -> anyhow::Result<Vec<crate::policy::file::PeerAuthentication>> {
    let mut out = Vec::new();
    let mut stdin_used = false;
    for path in paths {
        let (name, text) = if path.as_os_str() == "-" {
            if stdin_used {
                return Err(usage("--assume-policy -: stdin can be read only once"));
            }
            stdin_used = true;
            let mut text = String::new();
            std::io::Read::read_to_string(&mut std::io::stdin(), &mut text)
                .map_err(|e| usage(format!("--assume-policy -: {e}")))?;
            ("-".to_owned(), text)
        } else {
            let name = path.display().to_string();
            let text = std::fs::read_to_string(path)
                .map_err(|e| usage(format!("--assume-policy {name}: {e}")))?;
            (name, text)
        };
        out.extend(
            crate::policy::file::parse(&name, &text)
                .map_err(|e| usage(format!("--assume-policy {e}")))?,
        );
    }
    Ok(out)
}

/// GET a JSON document from the agent's API; 400/404 answers are the user's to fix (exit 2).
pub(crate) fn get_json<T: serde::de::DeserializeOwned>(
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
pub fn render_namespaces(list: &[NamespaceSummary], width: u16) -> String {
    let mut t = table(width);
    t.set_header([
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

/// The columns every table of connections has (blockers, what-if rejections).
const BLOCKER_HEADER: [&str; 7] = [
    "CLIENT",
    "ADDRESS",
    "SERVER",
    "PORT",
    "SECURITY",
    "CONNS",
    "LAST SEEN",
];

fn blocker_cells(b: &Blocker) -> [String; 7] {
    let security = match &b.protocol {
        Some(p) => format!("{} ({p})", b.security),
        None => b.security.clone(),
    };
    [
        client_name(b),
        b.client.address.clone(),
        b.server.workload.clone(),
        b.server.port.to_string(),
        security,
        b.connections.to_string(),
        b.last_seen.clone(),
    ]
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

/// A table that wraps its cells to fit `width` columns.
fn table(width: u16) -> Table {
    let mut t = Table::new();
    t.load_preset(UTF8_BORDERS_ONLY)
        .set_content_arrangement(ContentArrangement::Dynamic)
        .set_width(width);
    t
}

pub fn render_table(r: &Report, width: u16) -> String {
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
        "mTLS ratio {} — {} of {} judged inbound connections are Istio mTLS; {} exempt (not enforced by STRICT)\n",
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
    for w in &r.warnings {
        s += &format!(
            "{} {w}\n",
            "warning:".if_supports_color(Stream::Stdout, |t| t.yellow())
        );
    }
    if !r.blockers.is_empty() {
        s += "\nBlockers — these connections would break under STRICT:\n";
        let mut t = table(width);
        let mut header = BLOCKER_HEADER.to_vec();
        header.extend(["EVIDENCE", "WHAT TO DO"]);
        t.set_header(header);
        for b in &r.blockers {
            let mut row = blocker_cells(b).to_vec();
            row.extend([b.evidence.clone(), advice(b, r)]);
            t.add_row(row);
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
        let mut t = table(width);
        t.set_header(header);
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

/// The what-if of `--assume-policy`: per policy, the connections it would reject.
pub fn render_what_if(w: &whatif::WhatIf, width: u16) -> String {
    let mut s = format!(
        "\nWhat-if — as if these PeerAuthentications were applied: {}\n",
        w.assumed.join(", ")
    );
    if !w.rejects_anything() {
        s += "They would reject none of the connections seen in the window.\n";
    }
    for p in &w.policies {
        s += &format!(
            "{} {}: rejects {} connections\n",
            if p.assumed { "assumed" } else { "in force" },
            p.policy,
            p.connections
        );
        if p.rejects.is_empty() {
            continue;
        }
        let mut t = table(width);
        t.set_header(BLOCKER_HEADER);
        for b in &p.rejects {
            t.add_row(blocker_cells(b));
        }
        s += &format!("{t}\n");
    }
    if !w.not_enforced.is_empty() {
        s += &format!(
            "Not enforced: {} blockers reach workloads without a sidecar, which no PeerAuthentication protects.\n",
            w.not_enforced.len()
        );
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
            one_direction: 2,
            warnings: Vec::new(),
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
                one_direction: 2,
                mode: Some("STRICT".into()),
                ports: vec![crate::aggregate::PortReport {
                    port: 8080,
                    connections: 3,
                    mode: Some("STRICT".into()),
                }],
                labels: None,
            }],
            peer_authentications: vec![],
            what_if: None,
            nodes: None,
        }
    }

    #[test]
    fn table_names_verdict_blockers_and_advice() {
        let t = render_table(&sample(), 400);
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
        assert!(
            !t.contains("partial sight"),
            "warnings are filled by `report`: {t}"
        );
        let mut warned = sample();
        warned.warnings = crate::aggregate::report::warnings(&warned);
        let t = render_table(&warned, 200);
        assert!(
            t.contains("warning: partial sight: 2 of 4 inbound connections (to web) were seen in one direction only"),
            "{t}"
        );
        assert!(t.contains("8080 (STRICT)"), "{t}");
    }

    #[test]
    fn table_names_the_node_and_its_advice() {
        let mut r = sample();
        let mut b = r.blockers[0].clone();
        b.client = ClientRef::node("198.18.0.1".into(), NodeClient::NodeOrHostNetwork);
        b.advice = Some(NodeClient::NodeOrHostNetwork.advice(8080));
        r.blockers.push(b);
        let t = render_table(&r, 240);
        assert!(t.contains("node: the node or a hostNetwork pod"), "{t}");
        assert!(t.contains("excludeInboundPorts"), "{t}");
        assert!(t.contains("inject a sidecar into legacy/batch"), "{t}");
    }

    #[test]
    fn tables_fit_the_width() {
        for width in [60, 80, 120] {
            let t = render_table(&sample(), width);
            for line in t
                .lines()
                .filter(|l| l.starts_with(['│', '┌', '└', '╞', '├']))
            {
                assert!(
                    line.chars().count() <= width as usize,
                    "{width}: {line}\n{t}"
                );
            }
        }
    }
}
