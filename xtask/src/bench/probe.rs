//! What a run cost, read from the kernel: process CPU time and peak memory from /proc, and the
//! eBPF programs' own run time from the kernel's BPF statistics (`kernel.bpf_stats_enabled`).
use std::{collections::BTreeSet, process::Command};

use anyhow::{Context as _, bail};

fn clk_tck() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as f64 } else { 100.0 }
}

/// Fields of /proc/PID/stat after the command name (which may contain spaces and parens).
fn stat_fields(pid: u32) -> Option<Vec<u64>> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &s[s.rfind(')')? + 2..];
    // Field 3 (state) is a letter; keep positions by mapping it to 0.
    Some(
        rest.split_whitespace()
            .map(|f| f.parse().unwrap_or(0))
            .collect(),
    )
}

/// utime + stime of a process (all its threads), plus the reaped children's times when
/// `children` is set, in seconds. Also works on a zombie that was not reaped yet.
pub fn cpu_seconds(pid: u32, children: bool) -> Option<f64> {
    let f = stat_fields(pid)?;
    // stat fields 14..17 (utime, stime, cutime, cstime) are at 11..14 after the name.
    let mut ticks = f.get(11)? + f.get(12)?;
    if children {
        ticks += f.get(13)? + f.get(14)?;
    }
    Some(ticks as f64 / clk_tck())
}

/// CPU seconds of every live process of a process group (a tool and the helpers it started).
pub fn group_cpu_seconds(pgid: u32) -> f64 {
    let mut total = 0.0;
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return 0.0;
    };
    for e in dir.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        if let Some(f) = stat_fields(pid)
            && f.get(2).copied() == Some(pgid as u64)
        {
            total += (f[11] + f[12]) as f64 / clk_tck();
        }
    }
    total
}

/// Pids of the live processes of a process group.
pub fn group_pids(pgid: u32) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()))
        .filter(|&pid| stat_fields(pid).is_some_and(|f| f.get(2).copied() == Some(pgid as u64)))
        .collect()
}

/// Peak resident set size (VmHWM) of a process, in KiB.
pub fn vm_hwm_kib(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

const BPF_STATS: &str = "/proc/sys/kernel/bpf_stats_enabled";

/// Turns on the kernel's per-program run-time accounting for the benchmark and puts the
/// previous setting back when dropped.
pub struct BpfStats {
    previous: String,
}

impl BpfStats {
    pub fn enable() -> anyhow::Result<Self> {
        let previous = std::fs::read_to_string(BPF_STATS)
            .with_context(|| format!("reading {BPF_STATS}"))?
            .trim()
            .to_string();
        std::fs::write(BPF_STATS, "1").with_context(|| format!("writing 1 to {BPF_STATS}"))?;
        Ok(Self { previous })
    }
}

impl Drop for BpfStats {
    fn drop(&mut self) {
        if let Err(e) = std::fs::write(BPF_STATS, &self.previous) {
            eprintln!(
                "bench: restoring {BPF_STATS} to {} failed: {e}",
                self.previous
            );
        }
    }
}

fn bpftool_progs() -> anyhow::Result<Vec<serde_json::Value>> {
    let out = Command::new("bpftool")
        .args(["-j", "prog", "show"])
        .output()
        .context("running bpftool (cargo xtask setup installs it)")?;
    if !out.status.success() {
        bail!(
            "bpftool prog show failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let v: serde_json::Value =
        serde_json::from_slice(&out.stdout).context("bpftool output is not JSON")?;
    Ok(v.as_array().cloned().unwrap_or_default())
}

/// Program names of the agent (observer B) and of the parse-only reference (observer R).
pub const AGENT: [&str; 2] = ["mtls_ingress", "mtls_egress"];
pub const REFERENCE: [&str; 2] = ["mtlsref_ingress", "mtlsref_egress"];

fn named(p: &serde_json::Value, names: [&str; 2]) -> bool {
    p["name"].as_str().is_some_and(|n| names.contains(&n))
}

/// Ids of the loaded programs with these names.
pub fn prog_ids(names: [&str; 2]) -> anyhow::Result<BTreeSet<u64>> {
    Ok(bpftool_progs()?
        .iter()
        .filter(|p| named(p, names))
        .filter_map(|p| p["id"].as_u64())
        .collect())
}

/// The programs with these names that belong to process `pid`: those bpftool attributes to it,
/// or, where bpftool cannot say who holds a program, those that appeared since `before`.
pub fn owned_prog_ids(
    names: [&str; 2],
    pid: u32,
    before: &BTreeSet<u64>,
) -> anyhow::Result<Vec<u64>> {
    let progs = bpftool_progs()?;
    let by_pid: Vec<u64> = progs
        .iter()
        .filter(|p| named(p, names))
        .filter(|p| {
            p["pids"]
                .as_array()
                .is_some_and(|a| a.iter().any(|x| x["pid"].as_u64() == Some(pid as u64)))
        })
        .filter_map(|p| p["id"].as_u64())
        .collect();
    if !by_pid.is_empty() {
        return Ok(by_pid);
    }
    Ok(progs
        .iter()
        .filter(|p| named(p, names))
        .filter_map(|p| p["id"].as_u64())
        .filter(|id| !before.contains(id))
        .collect())
}

/// Sum of (run_cnt, run_time_ns) over the given programs.
pub fn prog_stats(ids: &[u64]) -> anyhow::Result<(u64, u64)> {
    let progs = bpftool_progs()?;
    let mut cnt = 0;
    let mut ns = 0;
    for p in progs
        .iter()
        .filter(|p| p["id"].as_u64().is_some_and(|id| ids.contains(&id)))
    {
        cnt += p["run_cnt"].as_u64().unwrap_or(0);
        ns += p["run_time_ns"].as_u64().unwrap_or(0);
    }
    Ok((cnt, ns))
}

/// A 66-byte Ethernet/IPv4/TCP ACK without payload (198.18.0.20:40000 → 198.18.0.10:5201,
/// timestamps option): the most common packet of an established flow.
fn established_ack() -> Vec<u8> {
    let mut p = Vec::with_capacity(66);
    p.extend_from_slice(&[2, 0, 0, 0, 0, 1, 2, 0, 0, 0, 0, 2, 0x08, 0x00]);
    // IPv4: version/IHL, TOS, total length 52, id, DF, TTL 64, TCP, checksum 0, addresses.
    p.extend_from_slice(&[0x45, 0, 0, 52, 0, 1, 0x40, 0, 64, 6, 0, 0]);
    p.extend_from_slice(&[198, 18, 0, 20, 198, 18, 0, 10]);
    // TCP: ports, seq, ack, data offset 8 words, ACK, window, checksum, urgent, options.
    p.extend_from_slice(&[
        0x9c, 0x40, 0x14, 0x51, 0, 0, 3, 0xe8, 0, 0, 7, 0xd0, 0x80, 0x10,
    ]);
    p.extend_from_slice(&[2, 0, 0, 0, 0, 0, 1, 1, 8, 10, 0, 0, 0, 0, 0, 0, 0, 0]);
    p
}

/// Runs program `id` on [`established_ack`] `repeat` times with BPF_PROG_TEST_RUN (`bpftool
/// prog run`): the kernel's average run time in ns, for one packet of an established flow with
/// warm caches and nothing else running in between. The first run creates the flow entry.
pub fn test_run_ns(id: u64, dir: &std::path::Path, repeat: u32) -> anyhow::Result<f64> {
    let pkt = dir.join("established-ack.bin");
    std::fs::write(&pkt, established_ack())
        .with_context(|| format!("writing {}", pkt.display()))?;
    let out = Command::new("bpftool")
        .args(["prog", "run", "id", &id.to_string(), "data_in"])
        .arg(&pkt)
        .args(["repeat", &repeat.to_string()])
        .output()
        .context("running bpftool prog run")?;
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    text.lines()
        .find_map(|l| l.split("duration (average):").nth(1))
        .and_then(|v| v.trim().trim_end_matches("ns").trim().parse().ok())
        .with_context(|| format!("no duration in bpftool prog run output: {text}"))
}
