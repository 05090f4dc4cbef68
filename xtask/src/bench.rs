//! `cargo xtask bench`: what the agent costs, side by side with no program and with a packet
//! capture that answers the same question.
//!
//! One node namespace with a bridge and two pods (`srv`, `cli`) from the test bed. Every scenario
//! is run with four observers, interleaved (A, R, B, C, then the next repetition in a rotated
//! order), and the medians are compared:
//!
//! - A: nothing attached (the physical limit of this machine);
//! - R: a parse-only reference TC program (`mtls-agent bench-reference`, ebpf/src/reference.rs)
//!   at the same hooks as B: the floor of a TC program on this kernel and VM, so that B's eBPF
//!   cost is stated as a ratio to it;
//! - B: `mtls-agent run` in the node namespace, attached to both pod veths;
//! - C: `tshark` on the server pod's veth, keeping TLS handshakes ([`TSHARK_ARGS`]).
//!
//! Scenarios: bulk TCP (iperf3), small messages (iperf3 `-l 128 -N -P 4`), TLS connection churn
//! (mTLS handshakes per second: parallel `openssl s_time -new` against nginx), plain TCP
//! connection churn (`mtls-bench churn`, new connections per second, for the agent's capacity),
//! and many idle flows then bulk (`mtls-bench hold` opens them first).
//!
//! Figures come from the kernel and /proc ([`probe`]) and from the agent's own metrics; the
//! report ([`report`]) is printed and written as Markdown.
mod probe;
mod report;

use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};
use mtls_agent_testbed::*;

pub use report::Sample;

/// Server pod address.
const SRV: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 10);
/// Client pod addresses: the first is its eth0 address, the others are added for churn and idle
/// flows (more source addresses, more 4-tuples).
const CLI: [Ipv4Addr; 4] = [
    Ipv4Addr::new(198, 18, 0, 20),
    Ipv4Addr::new(198, 18, 0, 21),
    Ipv4Addr::new(198, 18, 0, 22),
    Ipv4Addr::new(198, 18, 0, 23),
];
const IPERF_PORT: u16 = 5201;
const TLS_PORT: u16 = 443;
const REPLY_PORT: u16 = 8080;
const HOLD_PORT: u16 = 9000;
const AGENT_LISTEN: &str = "127.0.0.1:9477";
/// The capture a user would run to see the same handshakes: every TCP packet cut to the first
/// 4 KiB (what the agent copies per segment), TLS handshake messages printed with the record
/// lengths (TLS 1.3 client certificates are encrypted; their record length is the evidence).
/// The interface is appended by the runner.
pub const TSHARK_ARGS: &[&str] = &[
    "tshark",
    "-n",
    "-l",
    "-s",
    "4096",
    "-f",
    "tcp",
    "-Y",
    "tls.handshake",
    "-T",
    "fields",
    "-e",
    "frame.time_epoch",
    "-e",
    "ip.src",
    "-e",
    "tcp.srcport",
    "-e",
    "ip.dst",
    "-e",
    "tcp.dstport",
    "-e",
    "tls.handshake.type",
    "-e",
    "tls.record.length",
];

#[derive(Debug, Clone)]
pub struct Opts {
    pub quick: bool,
    pub reps: Option<usize>,
    pub seconds: Option<u64>,
    pub idle_flows: Option<usize>,
    pub output: Option<PathBuf>,
    pub scenarios: Vec<String>,
    pub observers: Vec<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Variant {
    Bare,
    Reference,
    Agent,
    Capture,
}

impl Variant {
    pub const ALL: [Variant; 4] = [
        Variant::Bare,
        Variant::Reference,
        Variant::Agent,
        Variant::Capture,
    ];
    pub fn label(self) -> &'static str {
        match self {
            Variant::Bare => "A: no program",
            Variant::Reference => "R: parse-only",
            Variant::Agent => "B: mtls-agent",
            Variant::Capture => "C: tshark",
        }
    }
    /// The letter `--observer` takes.
    fn letter(self) -> &'static str {
        &self.label()[..1]
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Scenario {
    Bulk,
    Small,
    TlsChurn,
    TcpChurn,
    Idle,
}

impl Scenario {
    pub const ALL: [Scenario; 5] = [
        Scenario::Bulk,
        Scenario::Small,
        Scenario::TlsChurn,
        Scenario::TcpChurn,
        Scenario::Idle,
    ];
    pub fn name(self) -> &'static str {
        match self {
            Scenario::Bulk => "bulk",
            Scenario::Small => "small",
            Scenario::TlsChurn => "tls-churn",
            Scenario::TcpChurn => "tcp-churn",
            Scenario::Idle => "idle",
        }
    }
    /// Unit of the main figure.
    pub fn unit(self) -> &'static str {
        match self {
            Scenario::Bulk | Scenario::Idle => "Gbit/s",
            Scenario::Small => "Mbit/s",
            Scenario::TlsChurn => "handshakes/s",
            Scenario::TcpChurn => "connections/s",
        }
    }
    /// Security class every connection of the scenario must get, for completeness.
    fn expected_security(self) -> Option<&'static str> {
        match self {
            Scenario::TlsChurn => Some("mtls"),
            Scenario::TcpChurn => Some("plaintext"),
            _ => None,
        }
    }
}

/// Durations and sizes of one benchmark run.
#[derive(Debug, Clone)]
pub struct Plan {
    pub quick: bool,
    pub reps: usize,
    pub secs: u64,
    pub idle_flows: usize,
    pub tls_clients: usize,
    pub churn_threads: usize,
    pub scenarios: Vec<Scenario>,
    /// Observers in the order of the first repetition (a subset of [`Variant::ALL`]).
    pub observers: Vec<Variant>,
}

impl Plan {
    fn new(o: &Opts) -> anyhow::Result<Plan> {
        let scenarios = if o.scenarios.is_empty() {
            Scenario::ALL.to_vec()
        } else {
            o.scenarios
                .iter()
                .map(|s| {
                    Scenario::ALL
                        .into_iter()
                        .find(|x| x.name() == s)
                        .with_context(|| {
                            format!("--scenario {s:?}: not one of bulk, small, tls-churn, tcp-churn, idle")
                        })
                })
                .collect::<anyhow::Result<_>>()?
        };
        let observers = if o.observers.is_empty() {
            Variant::ALL.to_vec()
        } else {
            let picked: Vec<Variant> = o
                .observers
                .iter()
                .map(|x| {
                    Variant::ALL
                        .into_iter()
                        .find(|v| v.letter().eq_ignore_ascii_case(x))
                        .with_context(|| format!("--observer {x:?}: not one of A, R, B, C"))
                })
                .collect::<anyhow::Result<_>>()?;
            Variant::ALL
                .into_iter()
                .filter(|v| picked.contains(v))
                .collect()
        };
        Ok(Plan {
            quick: o.quick,
            reps: o.reps.unwrap_or(if o.quick { 1 } else { 5 }).max(1),
            secs: o.seconds.unwrap_or(if o.quick { 2 } else { 10 }).max(1),
            idle_flows: o
                .idle_flows
                .unwrap_or(if o.quick { 20_000 } else { 100_000 }),
            tls_clients: 4,
            churn_threads: 8,
            scenarios,
            observers,
        })
    }
}

/// The node, its two pods, the servers that live for the whole run, and the binaries.
struct Bed {
    tb: Testbed,
    srv: Pod,
    cli: Pod,
    inventory: PathBuf,
    agent: PathBuf,
    tool: PathBuf,
    ca: PathBuf,
    client_cert: CertPaths,
    servers: Vec<Proc>,
}

fn s(p: &Path) -> anyhow::Result<&str> {
    p.to_str()
        .with_context(|| format!("non-UTF-8 path {}", p.display()))
}

impl Bed {
    fn new(agent: &Path, tool: &Path) -> anyhow::Result<Bed> {
        let mut tb = Testbed::new("mtbench")?;
        let srv = tb.add_pod(PodSpec::new("srv", SRV))?;
        let cli = tb.add_pod(PodSpec::new("cli", CLI[0]))?;
        for a in &CLI[1..] {
            tb.run(
                &cli.netns,
                &["ip", "addr", "add", &format!("{a}/24"), "dev", "eth0"],
            )?;
        }
        // Room for 100k connections and fast churn: all ports, TIME_WAIT reuse, deep backlogs.
        for ns in [&srv.netns, &cli.netns] {
            tb.run(
                ns,
                &[
                    "sysctl",
                    "-q",
                    "-w",
                    "net.ipv4.ip_local_port_range=1024 65535",
                    "net.ipv4.tcp_tw_reuse=1",
                    "net.core.somaxconn=65535",
                    "net.ipv4.tcp_max_syn_backlog=65535",
                ],
            )?;
        }
        let pki = Pki::new(tb.workdir().join("pki"))?;
        let server_cert = pki.issue(
            "srv",
            &[
                San::spiffe("bench", "srv"),
                San::Ip(std::net::IpAddr::V4(SRV)),
            ],
        )?;
        let client_cert = pki.issue("cli", &[San::spiffe("bench", "cli")])?;
        let inventory = tb.workdir().join("inventory.yaml");
        let mut cli_w = Workload::new("bench", "cli", &[&cli]);
        cli_w.addresses = CLI.iter().map(|a| a.to_string()).collect();
        write_inventory(&inventory, &[Workload::new("bench", "srv", &[&srv]), cli_w])?;
        let mut bed = Bed {
            tb,
            srv,
            cli,
            inventory,
            agent: agent.to_path_buf(),
            tool: tool.to_path_buf(),
            ca: pki.ca_cert().to_path_buf(),
            client_cert,
            servers: Vec::new(),
        };
        bed.start_servers(&server_cert)?;
        Ok(bed)
    }

    fn start_servers(&mut self, cert: &CertPaths) -> anyhow::Result<()> {
        let ns = self.srv.netns.clone();
        let port = IPERF_PORT.to_string();
        self.servers
            .push(self.tb.spawn(&ns, &["iperf3", "-s", "-p", &port])?);
        let tool = s(&self.tool)?.to_string();
        let reply = format!("0.0.0.0:{REPLY_PORT}");
        self.servers.push(self.tb.spawn(
            &ns,
            &[
                &tool,
                "serve",
                "--listen",
                &reply,
                "--mode",
                "reply",
                "--threads",
                "2",
            ],
        )?);
        self.servers.push(self.nginx(cert)?);
        for port in [IPERF_PORT, REPLY_PORT, TLS_PORT] {
            self.tb.wait_tcp_listening(
                &ns,
                std::net::SocketAddr::from(([0, 0, 0, 0], port)),
                Duration::from_secs(15),
            )?;
        }
        Ok(())
    }

    /// nginx with mTLS required, two workers, no session resumption: every connection is a
    /// full handshake.
    fn nginx(&self, cert: &CertPaths) -> anyhow::Result<Proc> {
        let dir = self.tb.scratch_dir("nginx")?;
        let d = s(&dir)?;
        let conf = format!(
            "user root root;\nworker_processes 2;\ndaemon off;\npid {d}/nginx.pid;\n\
             error_log {d}/error.log warn;\nevents {{ worker_connections 8192; }}\nhttp {{\n\
             access_log off;\nclient_body_temp_path {d}/body;\nproxy_temp_path {d}/proxy;\n\
             fastcgi_temp_path {d}/fastcgi;\nuwsgi_temp_path {d}/uwsgi;\nscgi_temp_path {d}/scgi;\n\
             keepalive_timeout 0;\nserver {{\nlisten 0.0.0.0:{TLS_PORT} ssl reuseport;\n\
             ssl_certificate {};\nssl_certificate_key {};\nssl_protocols TLSv1.3;\n\
             ssl_client_certificate {};\nssl_verify_client on;\nssl_session_cache off;\n\
             ssl_session_tickets off;\n\
             location / {{ default_type text/plain; return 200 \"ok\\n\"; }}\n}}\n}}\n",
            s(&cert.cert)?,
            s(&cert.key)?,
            s(&self.ca)?
        );
        let path = dir.join("nginx.conf");
        std::fs::write(&path, conf).with_context(|| format!("writing {}", path.display()))?;
        let err = format!("{d}/error.log");
        self.tb.spawn(
            &self.srv.netns,
            &["nginx", "-e", &err, "-p", d, "-c", s(&path)?],
        )
    }

    fn node(&self) -> &str {
        self.tb.node_netns()
    }

    fn sources(&self) -> String {
        CLI.iter()
            .map(|a| a.to_string())
            .collect::<Vec<_>>()
            .join(",")
    }

    fn metrics(&self) -> anyhow::Result<String> {
        let url = format!("http://{AGENT_LISTEN}/metrics");
        let out = self.tb.output(
            self.node(),
            &[
                "curl",
                "-sS",
                "--fail",
                "--noproxy",
                "*",
                "--max-time",
                "5",
                &url,
            ],
            None,
            Duration::from_secs(8),
        )?;
        if !out.status.success() {
            bail!(
                "GET /metrics failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn check_servers(&self) -> anyhow::Result<()> {
        for p in &self.servers {
            p.ensure_running()?;
        }
        Ok(())
    }
}

/// What watches the traffic during one run.
enum Observer {
    Bare,
    Reference { proc: Proc, progs: Vec<u64> },
    Agent { proc: Proc, progs: Vec<u64> },
    Capture { proc: Proc },
}

/// Readings taken just before the measured traffic starts.
struct Baseline {
    cpu: f64,
    bpf: (u64, u64),
    metrics: Option<String>,
}

fn start_observer(bed: &Bed, v: Variant) -> anyhow::Result<Observer> {
    match v {
        Variant::Bare => Ok(Observer::Bare),
        Variant::Reference => {
            let before = probe::prog_ids(probe::REFERENCE)?;
            let proc = bed.tb.spawn_env(
                bed.node(),
                &[s(&bed.agent)?, "bench-reference", "--interface", "vp*"],
                &[("RUST_LOG", "info"), ("NO_COLOR", "1")],
            )?;
            let deadline = Instant::now() + Duration::from_secs(30);
            // `attached N` once both hooks of every matching veth have the program.
            while !proc
                .stdout()
                .lines()
                .any(|l| l.strip_prefix("attached ").is_some_and(|n| n.trim() == "2"))
            {
                proc.ensure_running()
                    .context("mtls-agent bench-reference exited during start-up")?;
                if Instant::now() > deadline {
                    bail!(
                        "mtls-agent bench-reference did not attach to both veths within 30s: {} {}",
                        proc.stdout(),
                        proc.stderr_tail()
                    );
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let progs = probe::owned_prog_ids(probe::REFERENCE, proc.pid(), &before)?;
            ensure!(
                progs.len() == 2,
                "expected the two reference programs with bpftool, found {progs:?}"
            );
            Ok(Observer::Reference { proc, progs })
        }
        Variant::Agent => {
            let before = probe::prog_ids(probe::AGENT)?;
            let proc = bed.tb.spawn_env(
                bed.node(),
                &[
                    s(&bed.agent)?,
                    "run",
                    "--interface",
                    "vp*",
                    "--inventory",
                    s(&bed.inventory)?,
                    "--listen",
                    AGENT_LISTEN,
                    // The hooks R uses (the host side of both veths). The default, `auto`,
                    // puts the same programs on the pods' ends: the same two runs per packet.
                    "--attach-side",
                    "host",
                ],
                // The agent's default log level, as a user runs it.
                &[("RUST_LOG", "info"), ("NO_COLOR", "1")],
            )?;
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                proc.ensure_running()
                    .context("mtls-agent exited during start-up")?;
                if let Ok(m) = bed.metrics()
                    && metric_value(&m, "mtls_agent_interfaces_attached", &[])
                        .is_some_and(|v| v >= 2.0)
                {
                    break;
                }
                if Instant::now() > deadline {
                    bail!(
                        "mtls-agent did not attach to both veths within 30s: {}",
                        proc.stderr_tail()
                    );
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            let progs = probe::owned_prog_ids(probe::AGENT, proc.pid(), &before)?;
            ensure!(
                !progs.is_empty(),
                "could not find the agent's eBPF programs with bpftool"
            );
            Ok(Observer::Agent { proc, progs })
        }
        Variant::Capture => {
            let mut args: Vec<&str> = TSHARK_ARGS.to_vec();
            args.extend(["-i", &bed.srv.host_if]);
            // tshark's capture child spools to a temporary file: keep it in the bed's work dir.
            let tmp = s(bed.tb.workdir())?;
            let proc = bed.tb.spawn_env(bed.node(), &args, &[("TMPDIR", tmp)])?;
            let deadline = Instant::now() + Duration::from_secs(30);
            while !proc.stderr().contains("Capturing on") {
                proc.ensure_running()
                    .context("tshark exited during start-up")?;
                if Instant::now() > deadline {
                    bail!(
                        "tshark did not start capturing within 30s: {}",
                        proc.stderr_tail()
                    );
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            // Let dumpcap's socket settle before the traffic starts.
            std::thread::sleep(Duration::from_millis(300));
            Ok(Observer::Capture { proc })
        }
    }
}

fn baseline(bed: &Bed, obs: &Observer) -> anyhow::Result<Baseline> {
    Ok(match obs {
        Observer::Bare => Baseline {
            cpu: 0.0,
            bpf: (0, 0),
            metrics: None,
        },
        Observer::Reference { proc, progs } => Baseline {
            cpu: probe::cpu_seconds(proc.pid(), false).unwrap_or(0.0),
            bpf: probe::prog_stats(progs)?,
            metrics: None,
        },
        Observer::Agent { proc, progs } => Baseline {
            cpu: probe::cpu_seconds(proc.pid(), false).unwrap_or(0.0),
            bpf: probe::prog_stats(progs)?,
            metrics: Some(bed.metrics()?),
        },
        Observer::Capture { proc } => Baseline {
            cpu: probe::group_cpu_seconds(proc.pid()),
            bpf: (0, 0),
            metrics: None,
        },
    })
}

fn counter_delta(before: &str, after: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    metric_value(after, name, labels).unwrap_or(0.0)
        - metric_value(before, name, labels).unwrap_or(0.0)
}

/// Stops the observer and fills in what it cost. `made` is the number of connections the load
/// generator completed, which the agent must all classify.
fn finish(
    bed: &Bed,
    obs: Observer,
    base: Baseline,
    scenario: Scenario,
    made: Option<u64>,
    sample: &mut Sample,
) -> anyhow::Result<()> {
    match obs {
        Observer::Bare => Ok(()),
        Observer::Reference { proc, progs } => {
            let pid = proc.pid();
            sample.cpu_s = Some(probe::cpu_seconds(pid, false).unwrap_or(0.0) - base.cpu);
            sample.rss_kib = probe::vm_hwm_kib(pid);
            kernel_figures(bed, scenario, &progs, &base, sample)?;
            stop_agent(proc, "mtls-agent bench-reference")
        }
        Observer::Agent { proc, progs } => {
            let m0 = base.metrics.as_deref().unwrap_or("");
            let inbound = [("workload", "srv"), ("direction", "inbound")];
            // Give the agent time to count every connection (closes have a 1 s grace).
            let deadline = Instant::now() + Duration::from_secs(20);
            let mut m = bed.metrics()?;
            if let Some(made) = made {
                let start = Instant::now();
                loop {
                    let counted = counter_delta(m0, &m, "mtls_agent_connections_total", &inbound);
                    let tracked = metric_value(&m, "mtls_agent_flows_tracked", &[]).unwrap_or(0.0);
                    let settled = tracked == 0.0 && start.elapsed() > Duration::from_millis(1500);
                    if counted >= made as f64 || settled || Instant::now() > deadline {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(250));
                    m = bed.metrics()?;
                }
            }
            let pid = proc.pid();
            sample.cpu_s = Some(probe::cpu_seconds(pid, false).unwrap_or(0.0) - base.cpu);
            sample.rss_kib = probe::vm_hwm_kib(pid);
            kernel_figures(bed, scenario, &progs, &base, sample)?;
            sample.lost = metric_value(&m, "mtls_agent_events_lost_total", &[]);
            sample.lost_reasons = m
                .lines()
                .filter(|l| l.starts_with("mtls_agent_events_lost_total{"))
                .filter_map(|l| {
                    let (series, v) = l.rsplit_once(' ')?;
                    let v: f64 = v.parse().ok()?;
                    (v > 0.0).then(|| {
                        format!(
                            "{} {v:.0}",
                            series.trim_start_matches("mtls_agent_events_lost_total")
                        )
                    })
                })
                .collect::<Vec<_>>()
                .join(", ");
            sample.events = Some(counter_delta(m0, &m, "mtls_agent_events_total", &[]));
            sample.copied = Some(counter_delta(m0, &m, "mtls_agent_capture_bytes_total", &[]));
            sample.classified = Some(counter_delta(
                m0,
                &m,
                "mtls_agent_connections_total",
                &inbound,
            ));
            if let Some(sec) = scenario.expected_security() {
                let mut l = inbound.to_vec();
                l.push(("security", sec));
                sample.classified_expected =
                    Some(counter_delta(m0, &m, "mtls_agent_connections_total", &l));
            }
            sample.kernel_errors = metric_value(&m, "mtls_agent_kernel_errors_total", &[]);
            if sample.tracked.is_none() {
                sample.tracked = metric_value(&m, "mtls_agent_flows_tracked", &[]);
            }
            stop_agent(proc, "mtls-agent")
        }
        Observer::Capture { proc } => {
            let pid = proc.pid();
            sample.rss_kib = probe::group_pids(pid)
                .into_iter()
                .filter_map(probe::vm_hwm_kib)
                .max();
            let live = probe::group_cpu_seconds(pid);
            // SIGINT: tshark stops dumpcap, prints its packet counts and exits.
            // SAFETY: plain syscall on our own child (not reaped, so the pid is still ours).
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGINT) };
            let deadline = Instant::now() + Duration::from_secs(120);
            while proc.is_running() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            // The zombie still has its own and its reaped children's (dumpcap's) CPU times.
            let total = probe::cpu_seconds(pid, true).unwrap_or(0.0).max(live);
            sample.cpu_s = Some(total - base.cpu);
            let exited = !proc.is_running();
            let (out, err) = proc_stop(proc);
            ensure!(exited, "tshark did not exit within 120s of SIGINT");
            // ClientHellos printed by tshark: handshake type 1 in the sixth field.
            sample.seen_hellos = Some(
                out.lines()
                    .filter(|l| {
                        l.split('\t')
                            .nth(5)
                            .is_some_and(|t| t.split(',').any(|x| x == "1"))
                    })
                    .count() as u64,
            );
            // "N packets dropped from IFACE" (kernel drops of the capture socket).
            sample.capture_dropped = err
                .lines()
                .filter(|l| l.contains("dropped"))
                .filter_map(|l| l.split_whitespace().next()?.parse::<u64>().ok())
                .max();
            Ok(())
        }
    }
}

/// Stops a capture and returns its output (stdout, stderr).
fn proc_stop(mut proc: Proc) -> (String, String) {
    proc.stop_with_grace(Duration::from_secs(5));
    (proc.stdout(), proc.stderr())
}

/// The eBPF programs' run count and time over the window, from the kernel; on bulk runs also
/// one established-flow ACK in isolation (BPF_PROG_TEST_RUN), read after the statistics so the
/// synthetic runs do not count there.
fn kernel_figures(
    bed: &Bed,
    scenario: Scenario,
    progs: &[u64],
    base: &Baseline,
    sample: &mut Sample,
) -> anyhow::Result<()> {
    let (cnt, ns) = probe::prog_stats(progs)?;
    sample.bpf_runs = Some(cnt - base.bpf.0);
    sample.bpf_ns = Some(ns - base.bpf.1);
    if scenario == Scenario::Bulk {
        match probe::test_run_ns(progs[0], bed.tb.workdir(), 1_000_000) {
            Ok(ns) => sample.test_run_ns = Some(ns),
            Err(e) => eprintln!("bench: BPF_PROG_TEST_RUN failed: {e:#}"),
        }
    }
    Ok(())
}

/// SIGTERM to the agent (or the reference), which detaches and exits 0.
fn stop_agent(mut proc: Proc, what: &str) -> anyhow::Result<()> {
    let status = proc.stop_with_grace(Duration::from_secs(10));
    if let Some(st) = status
        && !st.success()
        && st.code().is_some()
    {
        bail!("{what} exited with {st}: {}", proc.stderr_tail());
    }
    Ok(())
}

fn iperf(bed: &Bed, secs: u64, extra: &[&str]) -> anyhow::Result<f64> {
    let t = secs.to_string();
    let port = IPERF_PORT.to_string();
    let srv = SRV.to_string();
    let mut args = vec!["iperf3", "-c", &srv, "-p", &port, "-t", &t, "-J"];
    args.extend_from_slice(extra);
    let out = bed
        .tb
        .run_timeout(&bed.cli.netns, &args, Duration::from_secs(secs + 30))?;
    let v: serde_json::Value =
        serde_json::from_slice(&out.stdout).context("iperf3 -J output is not JSON")?;
    v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .with_context(|| format!("no end.sum_received.bits_per_second in iperf3 output: {v}"))
}

/// Parses `N connections in T real seconds` from `openssl s_time`.
fn s_time_connections(out: &str) -> Option<u64> {
    out.lines()
        .filter(|l| l.contains("real seconds"))
        .find_map(|l| l.split_whitespace().next()?.parse().ok())
}

/// Runs the load of one scenario; returns (main figure, connections made, errors).
fn traffic(bed: &Bed, plan: &Plan, sc: Scenario) -> anyhow::Result<(f64, Option<u64>, u64)> {
    let secs = plan.secs;
    match sc {
        Scenario::Bulk | Scenario::Idle => Ok((iperf(bed, secs, &[])? / 1e9, None, 0)),
        Scenario::Small => Ok((
            iperf(bed, secs, &["-l", "128", "-N", "-P", "4"])? / 1e6,
            None,
            0,
        )),
        Scenario::TlsChurn => {
            let t = secs.to_string();
            let connect = format!("{SRV}:{TLS_PORT}");
            let args = [
                "openssl",
                "s_time",
                "-connect",
                &connect,
                "-new",
                "-time",
                &t,
                "-cert",
                s(&bed.client_cert.cert)?,
                "-key",
                s(&bed.client_cert.key)?,
                "-CAfile",
                s(&bed.ca)?,
                "-www",
                "/",
            ];
            let mut clients = (0..plan.tls_clients)
                .map(|_| bed.tb.spawn(&bed.cli.netns, &args))
                .collect::<anyhow::Result<Vec<_>>>()?;
            let mut total = 0;
            for c in &mut clients {
                c.wait_timeout(Duration::from_secs(secs + 30))?;
                let out = c.stdout();
                total += s_time_connections(&out).with_context(|| {
                    format!(
                        "no connection count from openssl s_time: {out} {}",
                        c.stderr_tail()
                    )
                })?;
            }
            Ok((total as f64 / secs as f64, Some(total), 0))
        }
        Scenario::TcpChurn => {
            let out = bed.tb.run_timeout(
                &bed.cli.netns,
                &[
                    s(&bed.tool)?,
                    "churn",
                    "--connect",
                    &format!("{SRV}:{REPLY_PORT}"),
                    "--sources",
                    &bed.sources(),
                    "--threads",
                    &plan.churn_threads.to_string(),
                    "--seconds",
                    &secs.to_string(),
                ],
                Duration::from_secs(secs + 30),
            )?;
            let text = String::from_utf8_lossy(&out.stdout);
            let field = |k: &str| -> Option<f64> {
                text.split_whitespace()
                    .find_map(|w| w.strip_prefix(k)?.strip_prefix('=')?.parse().ok())
            };
            let n = field("connections").with_context(|| format!("mtls-bench churn: {text}"))?;
            let errors = field("errors").unwrap_or(0.0) as u64;
            let elapsed = field("seconds").unwrap_or(secs as f64);
            Ok((n / elapsed, Some(n as u64), errors))
        }
    }
}

/// Connections one `mtls-bench hold` process opens: below the hard file-descriptor limit that a
/// container may not let us raise (20000 here).
const HOLD_PER_PROCESS: usize = 15_000;
/// Ports the hold server listens on; each accept queue holds up to 65535 connections.
const HOLD_PORTS: u16 = 4;

/// Opens the idle flows: the server listens and never accepts, client processes send a few
/// bytes on each connection and keep it open. Returns the processes and the time it took.
fn open_idle(bed: &Bed, n: usize) -> anyhow::Result<(Vec<Proc>, f64)> {
    let tool = s(&bed.tool)?;
    let listen = format!("0.0.0.0:{HOLD_PORT}");
    let more: Vec<String> = (1..HOLD_PORTS)
        .map(|i| (HOLD_PORT + i).to_string())
        .collect();
    let more = more.join(",");
    let mut procs = vec![bed.tb.spawn(
        &bed.srv.netns,
        &[
            tool,
            "serve",
            "--listen",
            &listen,
            "--mode",
            "hold",
            "--more-ports",
            &more,
        ],
    )?];
    for i in 0..HOLD_PORTS {
        bed.tb.wait_tcp_listening(
            &bed.srv.netns,
            std::net::SocketAddr::from(([0, 0, 0, 0], HOLD_PORT + i)),
            Duration::from_secs(15),
        )?;
    }
    let start = Instant::now();
    let nproc = n.div_ceil(HOLD_PER_PROCESS).max(1);
    let connect = format!("{SRV}:{HOLD_PORT}");
    let sources = bed.sources();
    for k in 0..nproc {
        let count = n / nproc + usize::from(k < n % nproc);
        procs.push(bed.tb.spawn(
            &bed.cli.netns,
            &[
                tool,
                "hold",
                "--connect",
                &connect,
                "--more-ports",
                &more,
                "--sources",
                &sources,
                "--count",
                &count.to_string(),
                "--threads",
                "2",
            ],
        )?);
    }
    let deadline = start + Duration::from_secs(300);
    loop {
        let ready = procs[1..]
            .iter()
            .filter(|p| p.stdout().lines().any(|l| l.starts_with("ready")))
            .count();
        if ready == nproc {
            return Ok((procs, start.elapsed().as_secs_f64()));
        }
        for p in &procs {
            p.ensure_running()
                .context("idle-flow load generator failed")?;
        }
        if Instant::now() > deadline {
            bail!("{n} idle connections not open after 300s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn run_once(bed: &Bed, plan: &Plan, sc: Scenario, v: Variant) -> anyhow::Result<Sample> {
    bed.check_servers()?;
    let mut sample = Sample::default();
    let obs = start_observer(bed, v)?;
    let mut idle = None;
    if sc == Scenario::Idle {
        let (procs, secs) = open_idle(bed, plan.idle_flows)?;
        sample.setup_s = Some(secs);
        if let Observer::Agent { .. } = obs {
            // Wait until the agent tracks the flows it was shown (or stops making progress).
            let deadline = Instant::now() + Duration::from_secs(60);
            let mut last = -1.0;
            loop {
                std::thread::sleep(Duration::from_millis(500));
                let m = bed.metrics()?;
                let t = metric_value(&m, "mtls_agent_flows_tracked", &[]).unwrap_or(0.0);
                if t >= plan.idle_flows as f64 || t == last || Instant::now() > deadline {
                    sample.tracked = Some(t);
                    break;
                }
                last = t;
            }
        }
        idle = Some(procs);
    }
    let base = baseline(bed, &obs)?;
    let t0 = Instant::now();
    let (value, made, errors) = traffic(bed, plan, sc)?;
    sample.wall_s = t0.elapsed().as_secs_f64();
    sample.value = value;
    sample.made = made;
    sample.errors = errors;
    finish(bed, obs, base, sc, made, &mut sample)?;
    drop(idle);
    Ok(sample)
}

fn machine() -> Vec<(String, String)> {
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    let cpuinfo = read("/proc/cpuinfo");
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|l| l.trim_start_matches([' ', '\t', ':']).to_string())
        .unwrap_or_else(|| "unknown".into());
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let mem = read("/proc/meminfo")
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|k| format!("{:.1} GiB", k as f64 / 1048576.0))
        .unwrap_or_default();
    let version = |cmd: &str, arg: &str| -> String {
        std::process::Command::new(cmd)
            .arg(arg)
            .output()
            .ok()
            .map(|o| {
                let t = if o.stdout.is_empty() {
                    o.stderr
                } else {
                    o.stdout
                };
                String::from_utf8_lossy(&t)
                    .lines()
                    .next()
                    .unwrap_or("")
                    .trim()
                    .to_string()
            })
            .unwrap_or_default()
    };
    vec![
        (
            "CPU".into(),
            format!("{model} ({cpus} vCPUs, shared with other work)"),
        ),
        ("Memory".into(), mem),
        (
            "Kernel".into(),
            read("/proc/sys/kernel/osrelease").trim().to_string(),
        ),
        (
            "OS".into(),
            read("/etc/os-release")
                .lines()
                .find_map(|l| l.strip_prefix("PRETTY_NAME="))
                .unwrap_or("")
                .trim_matches('"')
                .to_string(),
        ),
        ("iperf3".into(), version("iperf3", "--version")),
        ("tshark".into(), version("tshark", "--version")),
        ("openssl".into(), version("openssl", "version")),
        ("nginx".into(), version("nginx", "-v")),
        (
            "Load average at start".into(),
            read("/proc/loadavg").trim().to_string(),
        ),
    ]
}

pub fn bench(agent: &Path, tool: &Path, opts: &Opts) -> anyhow::Result<()> {
    ensure_root()?;
    let plan = Plan::new(opts)?;
    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = stop.clone();
        ctrlc::set_handler(move || {
            eprintln!("\nbench: interrupted, finishing the current run and cleaning up");
            stop.store(true, Ordering::SeqCst);
        })
        .context("installing the Ctrl-C handler")?;
    }
    let started = Instant::now();
    let wall_start = std::time::SystemTime::now();
    let machine = machine();
    let _stats = probe::BpfStats::enable()?;
    let bed = Bed::new(agent, tool)?;
    eprintln!(
        "bench: node {} ready; {} repetition(s) of {:?} with observers {:?}, {} s each",
        bed.node(),
        plan.reps,
        plan.scenarios.iter().map(|s| s.name()).collect::<Vec<_>>(),
        plan.observers
            .iter()
            .map(|v| v.letter())
            .collect::<Vec<_>>(),
        plan.secs
    );
    let mut results: Vec<(Scenario, Variant, usize, Sample)> = Vec::new();
    let mut failures: Vec<String> = Vec::new();
    'outer: for rep in 0..plan.reps {
        for &sc in &plan.scenarios {
            let mut order = plan.observers.clone();
            let n = order.len();
            order.rotate_left(rep % n);
            for v in order {
                if stop.load(Ordering::SeqCst) {
                    break 'outer;
                }
                let t = Instant::now();
                let sample = match run_once(&bed, &plan, sc, v) {
                    Ok(s) => s,
                    Err(e) => {
                        // One failed run is reported, not fatal: the others still count.
                        let msg = format!(
                            "{} with {} (repetition {}): {e:#}",
                            sc.name(),
                            v.label(),
                            rep + 1
                        );
                        eprintln!("bench: FAILED {msg}");
                        failures.push(msg);
                        continue;
                    }
                };
                eprintln!(
                    "bench: rep {} {:<9} {:<14} {:>10.2} {:<13} ({:.1}s)",
                    rep + 1,
                    sc.name(),
                    v.label(),
                    sample.value,
                    sc.unit(),
                    t.elapsed().as_secs_f64()
                );
                results.push((sc, v, rep, sample));
            }
        }
    }
    drop(bed);
    ensure!(
        !stop.load(Ordering::SeqCst),
        "interrupted; no report written"
    );
    let elapsed = started.elapsed();
    let md = report::render(&report::Run {
        plan: &plan,
        machine: &machine,
        started: wall_start,
        elapsed,
        results: &results,
        failures: &failures,
    });
    println!("{md}");
    let path = match &opts.output {
        Some(p) => p.clone(),
        None if plan.quick => crate::workspace_root().join("target/bench/BENCHMARKS.quick.md"),
        None => crate::workspace_root().join("BENCHMARKS.md"),
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    std::fs::write(&path, md).with_context(|| format!("writing {}", path.display()))?;
    eprintln!(
        "bench: wrote {} after {:.0}s",
        path.display(),
        elapsed.as_secs_f64()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_s_time() {
        let out = "Collecting connection statistics for 3 seconds\n\
                   tttt\n\n1234 connections in 2.10s; 587.62 connections/user sec, bytes read 0\n\
                   1234 connections in 3 real seconds, 0 bytes read per connection\n";
        assert_eq!(s_time_connections(out), Some(1234));
        assert_eq!(s_time_connections("nothing"), None);
    }
}
