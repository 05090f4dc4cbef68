//! `cargo xtask fuzz [--seconds N] [--target segments,pcap]`: runs each cargo-fuzz target of
//! `fuzz/` (its own workspace) for a bounded time and reports the executions.
//!
//! - `segments`: arbitrary segments into `ConnClassifier`, the daemon's segment-to-verdict path;
//! - `pcap`: arbitrary bytes into `classify --pcap`'s reader (seeded with real captures from
//!   `fuzz/seeds/pcap`, cut from the corpus test's capture).
//!
//! A crash stops the run with the artifact's path: turn it into a unit test next to the code.
use std::process::Command;

use anyhow::{Context as _, bail};

use crate::{setup, workspace_root};

pub const TARGETS: [(&str, usize); 2] = [("segments", 20_000), ("pcap", 100_000)];

pub fn fuzz(seconds: u64, only: &[String]) -> anyhow::Result<()> {
    for t in only {
        if !TARGETS.iter().any(|(n, _)| n == t) {
            bail!("--target {t}: no such fuzz target (segments, pcap)");
        }
    }
    setup::setup()?;
    setup::ensure_cargo_fuzz()?;
    let dir = workspace_root().join("fuzz");
    let mut report = Vec::new();
    for (name, max_len) in TARGETS {
        if !only.is_empty() && !only.iter().any(|t| t == name) {
            continue;
        }
        let corpus = dir.join("corpus").join(name);
        let seeds = dir.join("seeds").join(name);
        std::fs::create_dir_all(&corpus)
            .with_context(|| format!("creating {}", corpus.display()))?;
        std::fs::create_dir_all(&seeds).with_context(|| format!("creating {}", seeds.display()))?;
        eprintln!("xtask: fuzzing {name} for {seconds} s");
        let out = Command::new("cargo")
            .args([
                "+nightly",
                "fuzz",
                "run",
                name,
                "--sanitizer",
                "none",
                "--release",
            ])
            .arg(&corpus)
            .arg(&seeds)
            .args([
                "--",
                &format!("-max_total_time={seconds}"),
                &format!("-max_len={max_len}"),
                "-rss_limit_mb=2048",
                "-print_final_stats=1",
            ])
            // The fuzz targets need the agent's library, not its eBPF object.
            .env("AYA_BUILD_SKIP", "1")
            .current_dir(&dir)
            .output()
            .context("running cargo fuzz")?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        if !out.status.success() {
            let tail: Vec<&str> = stderr.lines().rev().take(40).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            bail!(
                "fuzz target {name} failed ({}): crash artifacts are in fuzz/artifacts/{name}/\n{}",
                out.status,
                tail.join("\n")
            );
        }
        let runs = stderr
            .lines()
            .find_map(|l| {
                l.strip_prefix("Done ")
                    .and_then(|r| r.split_whitespace().next())
            })
            .unwrap_or("?")
            .to_owned();
        report.push(format!(
            "{name}: {runs} executions in {seconds} s, no crash"
        ));
    }
    for line in &report {
        eprintln!("xtask: fuzz {line}");
    }
    Ok(())
}
