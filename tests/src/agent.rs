//! Running the real `mtls-agent` binary inside a test bed's node namespace, and reading what it
//! says the way a user would: `/metrics` over HTTP and `mtls-agent report`.
use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::ExitStatus,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use crate::{netns::Testbed, proc::Proc};

/// The agent binary under test: `$MTLS_AGENT_BIN` (set by `cargo xtask test`), else the
/// workspace's `target/release/mtls-agent`. A missing binary is an error, never a skip.
pub fn agent_bin() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("MTLS_AGENT_BIN") {
        let p = PathBuf::from(p);
        if p.is_file() {
            return Ok(p);
        }
        bail!("MTLS_AGENT_BIN={} does not exist", p.display());
    }
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/release/mtls-agent");
    if p.is_file() {
        return Ok(p.canonicalize()?);
    }
    bail!(
        "agent binary not found at {}: run `cargo xtask build` (or `cargo xtask test`) first",
        p.display()
    )
}

/// A running agent in the node namespace.
pub struct Agent {
    proc: Proc,
    bin: PathBuf,
    ns: String,
    listen: SocketAddr,
}

impl Agent {
    /// Starts `mtls-agent run --inventory FILE` in the node namespace and waits until it answers
    /// and has attached to `expect_interfaces` interfaces.
    pub fn start(
        tb: &Testbed,
        bin: &Path,
        inventory: &Path,
        globs: &[&str],
        extra: &[&str],
        expect_interfaces: usize,
    ) -> Result<Agent> {
        Self::start_wrapped(tb, &[], bin, inventory, globs, extra, expect_interfaces)
    }

    /// [`Agent::start`] with the agent's command line prefixed by `wrapper` (e.g. a launcher
    /// that restricts syscalls).
    pub fn start_wrapped(
        tb: &Testbed,
        wrapper: &[&str],
        bin: &Path,
        inventory: &Path,
        globs: &[&str],
        extra: &[&str],
        expect_interfaces: usize,
    ) -> Result<Agent> {
        let inv = inventory.to_str().context("inventory path is not UTF-8")?;
        Self::start_with(
            tb,
            wrapper,
            bin,
            &["--inventory", inv],
            globs,
            extra,
            expect_interfaces,
        )
    }

    /// Starts `mtls-agent run --kubernetes --kubeconfig K --node-name N` (identities from the
    /// API double), likewise; an empty `node_name` leaves `--node-name` out.
    pub fn start_kubernetes(
        tb: &Testbed,
        bin: &Path,
        kubeconfig: &Path,
        node_name: &str,
        globs: &[&str],
        extra: &[&str],
        expect_interfaces: usize,
    ) -> Result<Agent> {
        let k = kubeconfig
            .to_str()
            .context("kubeconfig path is not UTF-8")?;
        let mut identity = vec!["--kubernetes", "--kubeconfig", k];
        if !node_name.is_empty() {
            identity.extend(["--node-name", node_name]);
        }
        Self::start_with(tb, &[], bin, &identity, globs, extra, expect_interfaces)
    }

    /// [`Agent::start_kubernetes`] without `--node-name`: every pod counts as this node's (one
    /// agent standing for a node that hosts every pod).
    pub fn start_kubernetes_all_nodes(
        tb: &Testbed,
        bin: &Path,
        kubeconfig: &Path,
        globs: &[&str],
        extra: &[&str],
        expect_interfaces: usize,
    ) -> Result<Agent> {
        Self::start_kubernetes(tb, bin, kubeconfig, "", globs, extra, expect_interfaces)
    }

    fn start_with(
        tb: &Testbed,
        wrapper: &[&str],
        bin: &Path,
        identity: &[&str],
        globs: &[&str],
        extra: &[&str],
        expect_interfaces: usize,
    ) -> Result<Agent> {
        // `--listen` in `extra` (a second agent in the same namespace) replaces the default.
        let given = extra
            .iter()
            .position(|a| *a == "--listen")
            .and_then(|i| extra.get(i + 1));
        let listen: SocketAddr = given.copied().unwrap_or("127.0.0.1:9477").parse()?;
        let bin_s = bin.to_str().context("agent path is not UTF-8")?;
        let listen_s = listen.to_string();
        let mut args = wrapper.to_vec();
        args.extend([bin_s, "run"]);
        if given.is_none() {
            args.extend(["--listen", &listen_s]);
        }
        args.extend_from_slice(identity);
        for g in globs {
            args.push("--interface");
            args.push(g);
        }
        args.extend_from_slice(extra);
        let proc = tb.spawn_env(
            tb.node_netns(),
            &args,
            &[("RUST_LOG", "info,mtls_agent=debug"), ("NO_COLOR", "1")],
        )?;
        let agent = Agent {
            proc,
            bin: bin.to_path_buf(),
            ns: tb.node_netns().to_owned(),
            listen,
        };
        // Kubernetes mode first lists every resource from the API: give it longer.
        let deadline = Instant::now() + Duration::from_secs(40);
        loop {
            agent
                .proc
                .ensure_running()
                .context("mtls-agent exited during start-up")?;
            if let Ok(m) = agent.metrics(tb)
                && metric_value(&m, "mtls_agent_interfaces_attached", &[])
                    .is_some_and(|v| v as usize >= expect_interfaces)
            {
                return Ok(agent);
            }
            if Instant::now() > deadline {
                bail!(
                    "mtls-agent did not come up with {expect_interfaces} interfaces within 40s; stderr: {}",
                    agent.proc.stderr_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.listen)
    }

    pub fn proc(&self) -> &Proc {
        &self.proc
    }

    /// GET a path of the agent's HTTP API from inside the node namespace.
    pub fn get(&self, tb: &Testbed, path: &str) -> Result<String> {
        let url = format!("{}{path}", self.url());
        let out = tb.output(
            &self.ns,
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
                "GET {path} failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `/metrics` text.
    pub fn metrics(&self, tb: &Testbed) -> Result<String> {
        self.get(tb, "/metrics")
    }

    /// `/api/v1/identity?<query>` as JSON (Kubernetes mode).
    pub fn identity(&self, tb: &Testbed, query: &str) -> Result<serde_json::Value> {
        Ok(serde_json::from_str(
            &self.get(tb, &format!("/api/v1/identity?{query}"))?,
        )?)
    }

    /// Waits until the agent tracks no open connection any more (every connection ended and
    /// counted), so counts can be compared exactly.
    pub fn settle(&self, tb: &Testbed, timeout: Duration) -> Result<String> {
        let deadline = Instant::now() + timeout;
        let mut read_before = None;
        loop {
            self.proc.ensure_running()?;
            let m = self.metrics(tb)?;
            // Nothing tracked, and no ring-buffer record read since the last look (the reader
            // pauses up to 20 ms between reads): what is in the ring is counted too.
            let read = metric_value(&m, "mtls_agent_events_total", &[]);
            if metric_value(&m, "mtls_agent_flows_tracked", &[]) == Some(0.0)
                && read.is_some()
                && read == read_before
            {
                return Ok(m);
            }
            read_before = read;
            if Instant::now() > deadline {
                bail!("connections still tracked after {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Runs `mtls-agent report` (inside the node namespace) and returns (exit status, stdout,
    /// stderr).
    pub fn report(&self, tb: &Testbed, args: &[&str]) -> Result<(ExitStatus, String, String)> {
        let url = self.url();
        let bin = self.bin.to_str().context("agent path is not UTF-8")?;
        // Wide enough that no cell wraps: these tests read the table's words; how it fits a
        // narrow terminal is tested apart (the policy scenario, and unit tests).
        let mut argv = vec!["env", "COLUMNS=400", bin, "report", "--agent", &url];
        argv.extend_from_slice(args);
        let out = tb.output(&self.ns, &argv, None, Duration::from_secs(15))?;
        Ok((
            out.status,
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        ))
    }

    /// Runs `mtls-agent report ARGS` inside the node namespace without `--agent` (e.g. with
    /// `--prometheus`).
    pub fn report_with(&self, tb: &Testbed, args: &[&str]) -> Result<(ExitStatus, String, String)> {
        let mut argv = vec!["report"];
        argv.extend_from_slice(args);
        self.cli(tb, &argv)
    }

    /// Runs `mtls-agent ARGS` (any command, e.g. `policy`) inside the node namespace and returns
    /// (exit status, stdout, stderr).
    pub fn cli(&self, tb: &Testbed, args: &[&str]) -> Result<(ExitStatus, String, String)> {
        self.cli_stdin(tb, args, None)
    }

    /// [`Agent::cli`] with `stdin` as the command's standard input.
    pub fn cli_stdin(
        &self,
        tb: &Testbed,
        args: &[&str],
        stdin: Option<&[u8]>,
    ) -> Result<(ExitStatus, String, String)> {
        let bin = self.bin.to_str().context("agent path is not UTF-8")?;
        let mut argv = vec![bin];
        argv.extend_from_slice(args);
        let out = tb.output(&self.ns, &argv, stdin, Duration::from_secs(15))?;
        Ok((
            out.status,
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        ))
    }

    /// The JSON report of a namespace (optionally one workload).
    pub fn report_json(
        &self,
        tb: &Testbed,
        namespace: &str,
        workload: Option<&str>,
    ) -> Result<serde_json::Value> {
        let mut args = vec!["--namespace", namespace, "--output", "json"];
        if let Some(w) = workload {
            args.extend(["--workload", w]);
        }
        let (status, out, err) = self.report(tb, &args)?;
        if !status.success() {
            bail!("mtls-agent report failed ({status}): {err}");
        }
        serde_json::from_str(&out).with_context(|| format!("report is not JSON: {out}"))
    }

    /// SIGTERM and wait; returns the exit status.
    pub fn stop(mut self) -> Result<ExitStatus> {
        self.proc
            .stop_with_grace(Duration::from_secs(10))
            .context("agent was not running")
    }
}

/// Names of the TCX programs attached to `iface` in `ns`, ingress then egress, as the kernel
/// reports them, through the `tcx-query` helper binary of this crate (pass
/// `env!("CARGO_BIN_EXE_tcx-query")`): bpftool 7.1 predates TCX.
pub fn tcx_programs(
    tb: &Testbed,
    tcx_query: &str,
    ns: &str,
    iface: &str,
) -> Result<(Vec<String>, Vec<String>)> {
    let out = tb.output(ns, &[tcx_query, iface], None, Duration::from_secs(10))?;
    if !out.status.success() {
        bail!(
            "tcx-query {iface}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let names = |dir: &str| -> Vec<String> {
        v[iface][dir]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|n| n.as_str().map(str::to_owned))
            .collect()
    };
    Ok((names("ingress"), names("egress")))
}

/// Parses one sample of the Prometheus text format: the value of `name` whose labels include all
/// of `labels`. Summed when several series match.
pub fn metric_value(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let mut found = None;
    for line in text.lines() {
        if line.starts_with('#') {
            continue;
        }
        let (series, value) = match line.rsplit_once(' ') {
            Some(x) => x,
            None => continue,
        };
        let (n, lbls) = match series.split_once('{') {
            Some((n, rest)) => (n, parse_labels(rest.trim_end_matches('}'))),
            None => (series, BTreeMap::new()),
        };
        if n != name {
            continue;
        }
        if labels
            .iter()
            .all(|(k, v)| lbls.get(*k).map(String::as_str) == Some(*v))
        {
            let v: f64 = value.parse().ok()?;
            found = Some(found.unwrap_or(0.0) + v);
        }
    }
    found
}

/// Every sample of `name` in the Prometheus text format, keyed by its labels (`k="v",...`, sorted).
pub fn samples(text: &str, name: &str) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let (n, lbls) = match series.split_once('{') {
            Some((n, rest)) => (n, parse_labels(rest.trim_end_matches('}'))),
            None => (series, BTreeMap::new()),
        };
        if n != name {
            continue;
        }
        let Ok(v) = value.parse::<f64>() else {
            continue;
        };
        let key = lbls
            .iter()
            .map(|(k, v)| format!("{k}={v:?}"))
            .collect::<Vec<_>>()
            .join(",");
        *out.entry(key).or_insert(0.0) += v;
    }
    out
}

fn parse_labels(s: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut rest = s;
    while let Some((k, after)) = rest.split_once("=\"") {
        let mut val = String::new();
        let mut chars = after.char_indices();
        let mut end = after.len();
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' => {
                    if let Some((_, n)) = chars.next() {
                        val.push(n);
                    }
                }
                '"' => {
                    end = i + 1;
                    break;
                }
                c => val.push(c),
            }
        }
        out.insert(k.trim_start_matches(',').trim().to_owned(), val);
        rest = &after[end..];
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_prometheus_samples() {
        let text = "# HELP x y\nmtls_agent_connections_total{namespace=\"shop\",workload=\"web\",direction=\"inbound\",security=\"plaintext\"} 3\nmtls_agent_connections_total{namespace=\"shop\",workload=\"api\",direction=\"inbound\",security=\"plaintext\"} 2\nmtls_agent_flows_tracked 0\n";
        assert_eq!(
            metric_value(text, "mtls_agent_connections_total", &[("workload", "web")]),
            Some(3.0)
        );
        assert_eq!(
            metric_value(
                text,
                "mtls_agent_connections_total",
                &[("security", "plaintext")]
            ),
            Some(5.0)
        );
        assert_eq!(
            metric_value(text, "mtls_agent_flows_tracked", &[]),
            Some(0.0)
        );
        assert_eq!(metric_value(text, "missing", &[]), None);
        let all = samples(text, "mtls_agent_connections_total");
        assert_eq!(all.len(), 2);
        assert_eq!(
            all["direction=\"inbound\",namespace=\"shop\",security=\"plaintext\",workload=\"api\""],
            2.0
        );
        assert_eq!(
            metric_value(
                text,
                "mtls_agent_connections_total",
                &[("security", "mtls")]
            ),
            None
        );
    }
}
