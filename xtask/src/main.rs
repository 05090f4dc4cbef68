//! Workflows of mtls-agent, as `cargo xtask <command>` (see .cargo/config.toml).
mod bench;
mod demo;
mod fuzz;
mod setup;
mod soak;

use std::{path::PathBuf, process::Command};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "xtask", about = "mtls-agent workflows")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what the build needs (nightly rust-src, LLVM 22, bpf-linker, test tools). Idempotent.
    Setup,
    /// Build the release binary (target/release/mtls-agent), eBPF program included.
    Build,
    /// Setup, then fmt/clippy checks and every test (unit, eBPF end-to-end as root).
    Test {
        /// Extra arguments for cargo nextest (e.g. a test name filter).
        #[arg(trailing_var_arg = true)]
        args: Vec<String>,
    },
    /// Setup, build, then run the agent on a demo node of network namespaces with real mTLS,
    /// TLS and plaintext traffic and print each namespace's STRICT readiness.
    Demo {
        /// Seconds of traffic before the reports.
        #[arg(long, default_value_t = 6)]
        seconds: u64,
    },
    /// Run each cargo-fuzz target (classifier segments, pcap reader) for a bounded time; needs
    /// nightly (installed by setup) and cargo-fuzz (installed on first use).
    Fuzz {
        /// Seconds per target.
        #[arg(long, default_value_t = 60)]
        seconds: u64,
        /// Only these targets (segments, pcap), comma-separated.
        #[arg(long = "target", value_delimiter = ',')]
        targets: Vec<String>,
    },
    /// Setup, build, then measure the agent's cost against no program and a tshark capture on
    /// a namespace pair (bulk, small messages, TLS/TCP churn, idle flows); writes BENCHMARKS.md.
    Bench {
        /// Short run (1 repetition, 2 s per run, 20k idle flows; under 2 minutes) writing
        /// target/bench/BENCHMARKS.quick.md instead of BENCHMARKS.md.
        #[arg(long)]
        quick: bool,
        /// Repetitions of every scenario and observer (default 5, quick 1).
        #[arg(long)]
        reps: Option<usize>,
        /// Seconds of traffic per run (default 10, quick 2).
        #[arg(long)]
        seconds: Option<u64>,
        /// Idle flows to open in the idle scenario (default 100000, quick 20000).
        #[arg(long)]
        idle_flows: Option<usize>,
        /// Only these scenarios (bulk, small, tls-churn, tcp-churn, idle), comma-separated.
        #[arg(long = "scenario", value_delimiter = ',')]
        scenarios: Vec<String>,
        /// Only these observers (A: none, R: parse-only reference, B: mtls-agent, C: tshark),
        /// comma-separated; ratios need A in the run.
        #[arg(long = "observer", value_delimiter = ',')]
        observers: Vec<String>,
        /// Where to write the report.
        #[arg(long)]
        output: Option<PathBuf>,
    },
    /// Build, then run the soak test (mixed traffic; RSS, fds and classification counts sampled
    /// over time) for N minutes, writing docs/soak.md. CI runs a ~75 s version as a normal test.
    Soak {
        /// Minutes of traffic.
        #[arg(long, default_value_t = 60)]
        minutes: u64,
    },
}

pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

pub fn cargo(args: &[&str]) -> anyhow::Result<()> {
    eprintln!("xtask: cargo {}", args.join(" "));
    let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(args)
        .current_dir(workspace_root())
        .status()
        .context("running cargo")?;
    if !status.success() {
        bail!("cargo {} failed ({status})", args.join(" "));
    }
    Ok(())
}

pub fn build_release() -> anyhow::Result<PathBuf> {
    cargo(&["build", "--release", "-p", "mtls-agent"])?;
    Ok(workspace_root().join("target/release/mtls-agent"))
}

/// Builds the agent and the benchmark's load generator (release), honouring CARGO_TARGET_DIR.
fn build_bench() -> anyhow::Result<(PathBuf, PathBuf)> {
    cargo(&[
        "build",
        "--release",
        "-p",
        "mtls-agent",
        "-p",
        "mtls-agent-bench",
    ])?;
    let release = target_dir().join("release");
    Ok((release.join("mtls-agent"), release.join("mtls-bench")))
}

/// Where cargo puts what it builds (honours CARGO_TARGET_DIR).
fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"))
}

/// Lints the eBPF crate for its real target (it does not build for the host).
fn clippy_ebpf() -> anyhow::Result<()> {
    eprintln!("xtask: clippy on ebpf/ for bpfel-unknown-none");
    let target_dir = workspace_root().join("target/ebpf-clippy");
    let status = Command::new("rustup")
        .args(["run", "nightly", "cargo", "clippy", "--release"])
        .args(["--target", "bpfel-unknown-none", "-Z", "build-std=core"])
        .arg("--target-dir")
        .arg(&target_dir)
        .args(["--", "-D", "warnings"])
        .current_dir(workspace_root().join("ebpf"))
        .env_remove("RUSTC")
        .env_remove("RUSTC_WORKSPACE_WRAPPER")
        .status()
        .context("running clippy for the eBPF crate")?;
    if !status.success() {
        bail!("clippy on ebpf/ failed ({status})");
    }
    Ok(())
}

fn test(extra: &[String]) -> anyhow::Result<()> {
    setup::setup()?;
    cargo(&["fmt", "--all", "--", "--check"])?;
    // The default members: everything but ebpf/, which only builds for BPF and is linted on its
    // own target below. In the release profile, so that its build scripts (the eBPF object too)
    // and proc macros are the ones the build below uses.
    cargo(&[
        "clippy",
        "--release",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ])?;
    clippy_ebpf()?;
    // The agent built with the same selection as the test run below (the default members'
    // libraries, binaries and tests): cargo unifies dependency features over what it builds, so
    // `build -p mtls-agent` alone resolved them differently and the test run compiled the
    // dependencies, the eBPF object and the agent a second time (3.5 of 15 minutes on CI).
    cargo(&["build", "--release", "--lib", "--bins", "--tests"])?;
    let bin = target_dir().join("release/mtls-agent");
    // SAFETY: single-threaded at this point; the tests find the agent binary through this.
    unsafe { std::env::set_var("MTLS_AGENT_BIN", &bin) };
    let mut args = vec!["nextest", "run", "--release", "--no-fail-fast"];
    args.extend(extra.iter().map(String::as_str));
    cargo(&args)
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match cli.cmd {
        Cmd::Setup => setup::setup(),
        Cmd::Fuzz { seconds, targets } => fuzz::fuzz(seconds, &targets),
        Cmd::Build => setup::setup().and_then(|_| build_release().map(|_| ())),
        Cmd::Test { args } => test(&args),
        Cmd::Soak { minutes } => setup::setup().and_then(|_| soak::soak(minutes)),
        Cmd::Demo { seconds } => setup::setup()
            .and_then(|_| build_release())
            .and_then(|bin| demo::demo(&bin, seconds)),
        Cmd::Bench {
            quick,
            reps,
            seconds,
            idle_flows,
            scenarios,
            observers,
            output,
        } => setup::setup().and_then(|_| {
            let (agent, tool) = build_bench()?;
            bench::bench(
                &agent,
                &tool,
                &bench::Opts {
                    quick,
                    reps,
                    seconds,
                    idle_flows,
                    output,
                    scenarios,
                    observers,
                },
            )
        }),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
