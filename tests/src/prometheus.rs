//! A real Prometheus (Debian's package) in a test bed's node namespace, scraping agents there
//! every second, with the project's recording rules evaluated every second too.
use std::{
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use serde_json::Value;

use crate::{Proc, netns::Testbed};

/// Where the test Prometheus listens, inside the node namespace.
pub const PROM: &str = "127.0.0.1:9090";

pub struct Prometheus {
    _proc: Proc,
}

impl Prometheus {
    /// Starts Prometheus scraping `targets` (`host:port`) with `rules` (a rules file, its
    /// `interval: 30s` made 1 s), and waits until it listens.
    pub fn start(tb: &Testbed, targets: &[String], rules: Option<&Path>) -> Result<Prometheus> {
        let dir = tb.scratch_dir("prometheus")?;
        let mut config =
            String::from("global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n");
        if let Some(rules) = rules {
            let text = std::fs::read_to_string(rules)
                .with_context(|| format!("reading {}", rules.display()))?
                .replace("interval: 30s", "interval: 1s");
            std::fs::write(dir.join("rules.yaml"), text)?;
            config.push_str(&format!(
                "rule_files:\n  - {}\n",
                dir.join("rules.yaml").display()
            ));
        }
        let list = targets
            .iter()
            .map(|t| format!("'{t}'"))
            .collect::<Vec<_>>()
            .join(", ");
        config.push_str(&format!(
            "scrape_configs:\n  - job_name: mtls-agent\n    static_configs:\n      - targets: [{list}]\n"
        ));
        std::fs::write(dir.join("prometheus.yml"), config)?;
        let proc = tb.spawn(
            tb.node_netns(),
            &[
                "prometheus",
                &format!("--config.file={}", dir.join("prometheus.yml").display()),
                &format!("--storage.tsdb.path={}", dir.join("data").display()),
                &format!("--web.listen-address={PROM}"),
                "--log.level=warn",
            ],
        )?;
        tb.wait_tcp_listening(tb.node_netns(), PROM.parse()?, Duration::from_secs(30))?;
        Ok(Prometheus { _proc: proc })
    }

    pub fn url(&self) -> String {
        format!("http://{PROM}")
    }

    /// Instant query through curl inside the node netns (Prometheus listens on its loopback).
    pub fn query(&self, tb: &Testbed, q: &str) -> Result<Vec<Value>> {
        let out = tb.output(
            tb.node_netns(),
            &[
                "curl",
                "-sS",
                "--fail-with-body",
                "--max-time",
                "10",
                "--noproxy",
                "*",
                "-G",
                &format!("http://{PROM}/api/v1/query"),
                "--data-urlencode",
                &format!("query={q}"),
            ],
            None,
            Duration::from_secs(15),
        )?;
        let body: Value = serde_json::from_slice(&out.stdout)
            .with_context(|| format!("query {q}: {}", String::from_utf8_lossy(&out.stdout)))?;
        if body["status"] != "success" {
            bail!("query {q} failed: {body}");
        }
        Ok(body["data"]["result"]
            .as_array()
            .cloned()
            .unwrap_or_default())
    }

    /// The value of a query that returns one sample, as Prometheus prints it.
    pub fn scalar(&self, tb: &Testbed, q: &str) -> Result<Option<String>> {
        Ok(self
            .query(tb, q)?
            .first()
            .and_then(|s| s["value"][1].as_str())
            .map(str::to_owned))
    }
}

/// Polls `ok` every half second until it holds, or fails after `timeout`.
pub fn wait_for(
    tb: &Testbed,
    what: &str,
    timeout: Duration,
    mut ok: impl FnMut() -> Result<bool>,
) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if ok()? {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("timed out waiting for {what} (node {})", tb.node_netns());
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}
