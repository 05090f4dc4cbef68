//! Workflows of mtls-agent, as `cargo xtask <command>` (see .cargo/config.toml).
mod demo;
mod setup;

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

fn test(extra: &[String]) -> anyhow::Result<()> {
    setup::setup()?;
    cargo(&["fmt", "--all", "--", "--check"])?;
    cargo(&["clippy", "--workspace", "--all-targets", "--", "-D", "warnings"])?;
    let bin = build_release()?;
    // SAFETY: single-threaded at this point; the tests find the agent binary through this.
    unsafe { std::env::set_var("MTLS_AGENT_BIN", &bin) };
    let mut args = vec!["nextest", "run", "--workspace", "--release", "--no-fail-fast"];
    args.extend(extra.iter().map(String::as_str));
    cargo(&args)
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match cli.cmd {
        Cmd::Setup => setup::setup(),
        Cmd::Build => setup::setup().and_then(|_| build_release().map(|_| ())),
        Cmd::Test { args } => test(&args),
        Cmd::Demo { seconds } => setup::setup()
            .and_then(|_| build_release())
            .and_then(|bin| demo::demo(&bin, seconds)),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
