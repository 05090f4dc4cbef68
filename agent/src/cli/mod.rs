//! cli: the `mtls-agent` command line — `run` (the daemon), `report` and `classify`.
//!
//! Exit codes (DESIGN.md): 0 success, 1 runtime failure, 2 bad usage or bad input, each failure
//! as one line on stderr naming the flag or file and what is wrong; 3 only for
//! `report --assume-policy … --check` when the assumed policies would reject traffic.
pub mod classify;
pub mod cluster;
pub mod policy;
pub mod prometheus;
pub mod report;
pub mod run;
pub mod source;
pub mod width;

use std::{net::SocketAddr, path::PathBuf};

use clap::{Args, Parser, Subcommand, ValueEnum};

/// An error the user can fix by changing the command or its input: exit code 2.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

pub fn usage(msg: impl Into<String>) -> anyhow::Error {
    UsageError(msg.into()).into()
}

const RUN_EXAMPLES: &str = "\
Examples:
  # Watch every pod's interface (found by kind, any CNI), identities from a file, metrics on :9477
  mtls-agent run --inventory inventory.yaml

  # Only the pod interfaces named cali* or lxc*, another port
  mtls-agent run --interface 'cali*' --interface 'lxc*' --inventory inv.yaml --listen 0.0.0.0:9100

  # Names only, no discovery (any interface whose name matches)
  mtls-agent run --interface-auto=false --interface 'vp*' --inventory inv.yaml

  # On Kubernetes (a DaemonSet): identities and PeerAuthentication modes from the API
  mtls-agent run --kubernetes --node-name \"$NODE_NAME\"";

const REPORT_EXAMPLES: &str = "\
Examples:
  # Would STRICT break anything in namespace shop?
  mtls-agent report --namespace shop --agent http://10.0.0.5:9477

  # One workload over the last hour, as JSON for scripts
  mtls-agent report --namespace shop --workload api --window 1h --output json

  # Every namespace, cluster-wide, from the Prometheus that scrapes all agents
  mtls-agent report --all-namespaces --prometheus http://prometheus:9090

  # An agent serving HTTPS (--tls-cert) with a bearer token (--api-token-file)
  mtls-agent report --namespace shop --agent https://node1:9477 --ca-file ca.pem --token-file token

  # What would a namespace-wide STRICT reject? Exit 3 if anything (a GitOps gate)
  mtls-agent report --namespace shop --assume-policy strict.yaml --check";

const POLICY_EXAMPLES: &str = "\
Examples:
  # The PeerAuthentications the last hour of traffic proves safe, applied at once
  mtls-agent policy --namespace shop --window 1h | kubectl apply -f -

  # Cluster-wide, from the Prometheus that scrapes all agents, for one workload
  mtls-agent policy --namespace shop --workload api --prometheus http://prometheus:9090

  # Check the result (or any proposed policy) against the same traffic before applying it
  mtls-agent policy --namespace shop > pa.yaml
  mtls-agent report --namespace shop --assume-policy pa.yaml --check";

const CLASSIFY_EXAMPLES: &str = "\
Examples:
  # Capture a pod's traffic, then classify every TCP connection in it
  tshark -i cali1234 -w pod.pcapng   # or: tcpdump -i cali1234 -w pod.pcap
  mtls-agent classify --pcap pod.pcapng

  # The same as JSON records (client, server, security, mesh, tls_version, alpn, sni, evidence, protocol)
  mtls-agent classify --pcap pod.pcapng --output json";

#[derive(Debug, Parser)]
#[command(
    name = "mtls-agent",
    version,
    about = "Which connections would break if you set Istio PeerAuthentication to STRICT now?",
    long_about = "mtls-agent watches the TCP handshakes of every pod on a node with eBPF, classifies each \
connection as mTLS, one-way TLS or plaintext, and reports per namespace and workload whether \
switching Istio PeerAuthentication from PERMISSIVE to STRICT would break any of them, and who sends \
the connections that would break.",
    after_help = "Run `mtls-agent <command> --help` for the options and examples of each command."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the node agent: attach to pod interfaces, classify, serve /metrics and the report API.
    #[command(after_help = RUN_EXAMPLES)]
    Run(Box<RunArgs>),
    /// Print the STRICT readiness of a namespace (or one workload) from a running agent.
    #[command(after_help = REPORT_EXAMPLES)]
    Report(ReportArgs),
    /// Print the PeerAuthentications (YAML) that the observed traffic proves safe now.
    #[command(after_help = POLICY_EXAMPLES)]
    Policy(PolicyArgs),
    /// Classify every TCP connection of a capture file (pcap/pcapng) offline, with the daemon's
    /// classifier.
    #[command(after_help = CLASSIFY_EXAMPLES)]
    Classify(ClassifyArgs),
    /// Internal: started by `run` on the clsact path; removes the agent's filters when it dies.
    #[command(name = "clsact-reaper", hide = true)]
    ClsactReaper(ReaperArgs),
    /// Internal: observer R of `cargo xtask bench`; attaches the parse-only reference programs
    /// until SIGTERM.
    #[command(name = "bench-reference", hide = true)]
    BenchReference(BenchReferenceArgs),
}

#[derive(Debug, Args)]
pub struct BenchReferenceArgs {
    /// Interface-name glob (repeatable): attach at TCX ingress and egress of every match.
    #[arg(long = "interface", value_name = "GLOB", required = true)]
    pub interfaces: Vec<String>,
}

#[derive(Debug, Args)]
pub struct ReaperArgs {
    /// Program ids whose clsact filters to remove once stdin closes.
    #[arg(long = "prog-id", value_name = "ID", required = true)]
    pub prog_ids: Vec<u32>,
}

/// Host-side pod veth names of common CNIs (the selection with `--interface-auto=false`): Calico, Cilium, Flannel/bridge, AWS VPC CNI, GKE, Azure.
pub const DEFAULT_INTERFACE_GLOBS: [&str; 6] = ["cali*", "lxc*", "veth*", "eni*", "gke*", "azv*"];

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Interface-name glob (repeatable). With --interface-auto (the default) it narrows the
    /// pod-facing interfaces to those whose names match; with --interface-auto=false it alone
    /// selects (default then: cali*, lxc*, veth*, eni*, gke*, azv*).
    #[arg(long = "interface", value_name = "GLOB")]
    pub interfaces: Vec<String>,
    /// Watch every pod-facing interface, whatever its name: a veth or netkit whose peer is in
    /// another network namespace (never uplinks, bridges, tunnels or node-local veth pairs).
    /// `--interface-auto=false`: names matching --interface only.
    #[arg(long, value_name = "BOOL", default_value_t = true, action = clap::ArgAction::Set,
          num_args = 0..=1, default_missing_value = "true")]
    pub interface_auto: bool,
    /// Kubernetes mode: name this node's pods whose addresses no watched interface has shown
    /// once they have been known this long (log line and mtls_agent_pods_unseen).
    #[arg(long, value_name = "DURATION", default_value = "5m", value_parser = parse_window)]
    pub pod_unseen_after: humantime::Duration,
    /// Inventory file (YAML) mapping addresses to namespaces and workloads. Exactly one of
    /// --inventory and --kubernetes is required.
    #[arg(long, value_name = "FILE")]
    pub inventory: Option<PathBuf>,
    /// Identities and Istio PeerAuthentication modes from the Kubernetes API (in-cluster config,
    /// or --kubeconfig) instead of an inventory file.
    #[arg(long)]
    pub kubernetes: bool,
    /// Kubeconfig file for --kubernetes (default: KUBECONFIG, ~/.kube/config, then in-cluster).
    #[arg(long, value_name = "FILE", requires = "kubernetes")]
    pub kubeconfig: Option<PathBuf>,
    /// This node's name (--kubernetes): its addresses are probe sources, its pods' workloads are
    /// the ones reported.
    #[arg(long, value_name = "NAME", env = "NODE_NAME")]
    pub node_name: Option<String>,
    /// SPIFFE trust domain of the mesh (--kubernetes).
    #[arg(long, value_name = "DOMAIN", default_value = crate::identity::kubernetes::DEFAULT_TRUST_DOMAIN)]
    pub trust_domain: String,
    /// Istio root namespace, where mesh-wide PeerAuthentications live (--kubernetes).
    #[arg(long, value_name = "NS", default_value = crate::identity::kubernetes::DEFAULT_ROOT_NAMESPACE)]
    pub istio_root_namespace: String,
    /// Address for /metrics, /healthz and the report API.
    #[arg(long, value_name = "ADDR:PORT", default_value = "0.0.0.0:9477")]
    pub listen: SocketAddr,
    /// Server port STRICT leaves alone (repeatable). Default: Istio's 15020, 15021, 15090.
    #[arg(long = "exempt-port", value_name = "PORT")]
    pub exempt_ports: Vec<u16>,
    /// Count any mTLS as compliant, not only Istio's (for other meshes).
    #[arg(long)]
    pub generic_mesh: bool,
    /// Kernel flow-table entries (LRU).
    #[arg(long, value_name = "N", default_value_t = mtls_agent_common::DEFAULT_FLOW_TABLE_SIZE,
          value_parser = clap::value_parser!(u32).range(1024..=16_777_216))]
    pub flow_table_size: u32,
    /// How often the flow table is swept: closed connections, entries of deleted interfaces and
    /// connection attempts never answered (older than 3 minutes) are deleted. While the table is
    /// more than half full it is swept 8 times as often (at most once a second).
    #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = parse_gc_interval)]
    pub flow_gc_interval: humantime::Duration,
    /// Payload-carrying segments captured per direction of a connection.
    #[arg(long, value_name = "N", default_value_t = mtls_agent_common::DEFAULT_MAX_SEGMENTS,
          value_parser = clap::value_parser!(u32).range(1..=64))]
    pub max_segments: u32,
    /// Payload bytes captured per segment (at most 8192).
    #[arg(long, value_name = "BYTES", default_value_t = mtls_agent_common::DEFAULT_CAPTURE_BYTES,
          value_parser = clap::value_parser!(u32).range(1..=8192))]
    pub capture_bytes: u32,
    /// Ring-buffer size in bytes (a power of two).
    #[arg(long, value_name = "BYTES", default_value_t = 8 * 1024 * 1024)]
    pub ring_buffer_size: u32,
    /// Distinct client label sets per server workload on the blocking counter before folding
    /// the rest into client_workload="other".
    #[arg(long, value_name = "N", default_value_t = 20)]
    pub max_blocking_clients: usize,
    /// How far back readiness is judged: the readiness gauges follow it, and `report --window`
    /// can ask for any window up to it (e.g. 15m, 1h).
    #[arg(long, value_name = "DURATION", default_value = "15m", value_parser = parse_window)]
    pub window: humantime::Duration,
    /// Log level or filter (also RUST_LOG), e.g. `info`, `mtls_agent=debug`.
    #[arg(long, value_name = "FILTER", default_value = "info")]
    pub log: String,
    /// Classified connections kept in memory for `GET /api/v1/connections` (0: none).
    #[arg(long, value_name = "N", default_value_t = 1000,
          value_parser = clap::value_parser!(u32).range(0..=1_000_000))]
    pub recent_connections: u32,
    /// Include SNI and certificate identities in `/api/v1/connections` (off: only addresses,
    /// security, mesh, TLS version, ALPN and evidence).
    #[arg(long)]
    pub expose_handshake_details: bool,
    // --- Robustness and security (issue 7) ---
    /// How the TC programs are attached: `tcx` (kernel 6.6+), `clsact` (a clsact qdisc with
    /// named filters, any kernel), or `auto` (TCX, falling back to clsact where it is missing).
    #[arg(long, value_enum, value_name = "MODE", default_value = "auto")]
    pub tc_mode: crate::capture::TcMode,
    /// Which end of each pod's veth the TC programs go on: `pod` (the pod's end, entered through
    /// its network namespace: both directions even when the CNI delivers packets into the pod
    /// with bpf_redirect_peer, as Cilium does), `host` (the host-side interface), or `auto` (the
    /// pod's end where its namespace is found in /var/run/netns or /proc, else the host side).
    #[arg(long, value_enum, value_name = "SIDE", default_value = "auto")]
    pub attach_side: crate::capture::AttachSide,
    /// Serve /metrics, /healthz and the API over HTTPS with this certificate chain (PEM).
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// Private key (PEM) for --tls-cert.
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Require `Authorization: Bearer <token>` on the JSON API (/api/...), the token being the
    /// first line of FILE. /metrics and /healthz stay open.
    #[arg(long, value_name = "FILE")]
    pub api_token_file: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct ClassifyArgs {
    /// Capture file: pcap or pcapng; Ethernet, Linux cooked (SLL/SLL2) or raw IP; IPv4 and IPv6.
    #[arg(long, value_name = "FILE")]
    pub pcap: PathBuf,
    /// Output format.
    #[arg(long, value_enum, default_value = "table")]
    pub output: Output,
}

#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum Output {
    Table,
    Json,
}

#[derive(Debug, Args)]
pub struct ReportArgs {
    /// Namespace to judge.
    #[arg(
        long,
        short = 'n',
        value_name = "NS",
        required_unless_present = "all_namespaces",
        conflicts_with = "all_namespaces"
    )]
    pub namespace: Option<String>,
    /// Only this workload of the namespace (workload-by-workload migration).
    #[arg(long, value_name = "W", requires = "namespace")]
    pub workload: Option<String>,
    /// One line per namespace: verdict, mTLS ratio, blockers, sidecar coverage.
    #[arg(long, short = 'A')]
    pub all_namespaces: bool,
    /// Judge over this window (e.g. 5m, 1h). Default: the agent's --window; 15m with --prometheus.
    #[arg(long, value_name = "DURATION", value_parser = parse_window)]
    pub window: Option<humantime::Duration>,
    /// Output format.
    #[arg(long, value_enum, default_value = "table")]
    pub output: Output,
    #[command(flatten)]
    pub source: source::SourceArgs,
    /// Judge the traffic as if the PeerAuthentications in FILE (YAML, one or more documents;
    /// `-`: stdin) were applied on top of those the agent knows; list what each would reject.
    #[arg(long, value_name = "FILE", requires = "namespace")]
    pub assume_policy: Vec<PathBuf>,
    /// With --assume-policy: exit 3 when the assumed policies would reject any connection.
    #[arg(long, requires = "assume_policy")]
    pub check: bool,
    /// Istio root namespace, where mesh-wide PeerAuthentications live (--assume-policy).
    #[arg(long, value_name = "NS", default_value = crate::policy::DEFAULT_ROOT_NAMESPACE)]
    pub istio_root_namespace: String,
}

#[derive(Debug, Args)]
pub struct PolicyArgs {
    /// Namespace to write PeerAuthentications for.
    #[arg(long, short = 'n', value_name = "NS")]
    pub namespace: String,
    /// Only this workload of the namespace.
    #[arg(long, value_name = "W")]
    pub workload: Option<String>,
    /// Evidence window (e.g. 15m, 1h). Default: the agent's --window; 15m with --prometheus.
    #[arg(long, value_name = "DURATION", value_parser = parse_window)]
    pub window: Option<humantime::Duration>,
    #[command(flatten)]
    pub source: source::SourceArgs,
}

/// A window: a humantime duration (`90s`, `15m`, `1h`) of at least 1 s and at most 7 days.
fn parse_window(s: &str) -> Result<humantime::Duration, String> {
    let d: humantime::Duration = s
        .parse()
        .map_err(|e| format!("{e} (expected e.g. 90s, 15m, 1h)"))?;
    let secs = std::time::Duration::from(d).as_secs();
    if secs < 1 {
        return Err("must be at least 1s".into());
    }
    if secs > 7 * 24 * 3600 {
        return Err("must be at most 7d".into());
    }
    Ok(d)
}

/// The name under which the binary is a kubectl plugin (`kubectl mtls ...`).
pub const PLUGIN_NAME: &str = "kubectl-mtls";

/// Parses the command line and runs it; returns the process exit code.
pub fn main() -> u8 {
    // Installed as `kubectl-mtls`, kubectl runs it as `kubectl mtls ...` (a kubectl plugin).
    let plugin = std::env::args_os()
        .next()
        .and_then(|a| {
            std::path::Path::new(&a)
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
        })
        .is_some_and(|n| n.starts_with(PLUGIN_NAME));
    let parsed = if plugin {
        use clap::{CommandFactory as _, FromArgMatches as _};
        Cli::command()
            .bin_name("kubectl mtls")
            .try_get_matches()
            .and_then(|m| Cli::from_arg_matches(&m))
    } else {
        Cli::try_parse()
    };
    let cli = match parsed {
        Ok(cli) => cli,
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(
                e.kind(),
                ErrorKind::DisplayHelp
                    | ErrorKind::DisplayVersion
                    | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
            ) {
                let _ = e.print();
                return if e.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand {
                    2
                } else {
                    0
                };
            }
            eprintln!("mtls-agent: {} (see --help)", clap_one_line(&e));
            return 2;
        }
    };
    let result = match cli.command {
        Command::Run(args) => run::run(*args),
        Command::Report(args) => report::report(args),
        Command::Policy(args) => policy::policy(args),
        Command::Classify(args) => classify::classify(args),
        Command::ClsactReaper(args) => {
            run::init_logging("info");
            crate::capture::reaper::run(&args.prog_ids)
        }
        Command::BenchReference(args) => {
            run::init_logging("info");
            crate::capture::reference::run(&args.interfaces).map_err(|e| match e {
                crate::capture::reference::ReferenceError::Glob(_)
                | crate::capture::reference::ReferenceError::NoInterface(_) => usage(e.to_string()),
                e => e.into(),
            })
        }
    };
    match result {
        Ok(()) => 0,
        Err(e) => {
            let code = if e.downcast_ref::<UsageError>().is_some() {
                2
            } else if e.downcast_ref::<report::WouldReject>().is_some() {
                3
            } else {
                1
            };
            eprintln!("mtls-agent: {}", one_line(&format!("{e:#}")));
            code
        }
    }
}

/// clap's first error line without its "error: " prefix, with the offending value.
fn parse_gc_interval(s: &str) -> Result<humantime::Duration, String> {
    let d: humantime::Duration = s.parse().map_err(|e| format!("{e}"))?;
    if d.as_millis() < 100 || d.as_secs() > 3600 {
        return Err("must be between 100ms and 1h".into());
    }
    Ok(d)
}

fn clap_one_line(e: &clap::Error) -> String {
    let rendered = e.render().to_string();
    // The first paragraph; clap lists missing arguments on indented lines below the first.
    let para: Vec<&str> = rendered
        .lines()
        .take_while(|l| !l.trim().is_empty())
        .map(str::trim)
        .collect();
    let line = para.join(" ");
    let line = line.trim_start_matches("error: ").trim();
    if line.is_empty() {
        "invalid arguments".to_owned()
    } else {
        line.to_owned()
    }
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn bad_flags_are_one_line() {
        for argv in [
            vec!["mtls-agent", "run", "--inventory", "x", "--listen", "nope"],
            vec!["mtls-agent", "run", "--bogus"],
            vec!["mtls-agent", "report"],
            vec![
                "mtls-agent",
                "report",
                "--namespace",
                "a",
                "--output",
                "xml",
            ],
        ] {
            let e = Cli::try_parse_from(&argv).unwrap_err();
            let line = clap_one_line(&e);
            assert!(
                !line.is_empty() && !line.contains('\n'),
                "{argv:?}: {line:?}"
            );
        }
    }
}
