//! A real Prometheus (Debian's package) scraping a real agent on real traffic: the dashboards,
//! recording rules and alerts are checked against what the agent really exports, and
//! `report --prometheus` must agree with `report --agent`. Needs root; fails, never skips.
use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use mtls_agent_testbed::{prometheus::PROM, *};
use serde_json::Value;

const ISTIO_ALPN: &str = "istio-peer-exchange,istio";

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .canonicalize()
        .unwrap()
}

/// Every PromQL expression of a Grafana dashboard, with its variables filled in.
fn dashboard_exprs(path: &Path, namespace: &str) -> Result<Vec<String>> {
    let d: Value = serde_json::from_str(&std::fs::read_to_string(path)?)?;
    let mut out = Vec::new();
    for p in d["panels"].as_array().context("panels")? {
        for t in p["targets"].as_array().into_iter().flatten() {
            let e = t["expr"].as_str().context("expr")?;
            out.push(
                e.replace("$namespace", namespace)
                    .replace("$workload", ".*")
                    .replace("$__range", "10m")
                    .replace("$__rate_interval", "1m")
                    .replace("$__interval", "1s"),
            );
        }
    }
    Ok(out)
}

/// Metric names an expression refers to (mtls-agent series, recording rules, up).
fn metric_names(expr: &str) -> Vec<String> {
    let mut names = Vec::new();
    let bytes = expr.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let c = bytes[i] as char;
        if c.is_ascii_alphabetic() || c == '_' || c == ':' {
            let start = i;
            while i < bytes.len()
                && ((bytes[i] as char).is_ascii_alphanumeric()
                    || bytes[i] == b'_'
                    || bytes[i] == b':')
            {
                i += 1;
            }
            let w = &expr[start..i];
            if w.starts_with("mtls_agent_") || w.contains(":mtls_agent_") || w == "up" {
                names.push(w.to_owned());
            }
        } else {
            i += 1;
        }
    }
    names.sort();
    names.dedup();
    names
}

/// Each rule's health and last error, from Prometheus's rules API (for failure messages).
fn rule_states(tb: &Testbed) -> String {
    let out = tb.output(
        tb.node_netns(),
        &[
            "curl",
            "-sS",
            "--max-time",
            "5",
            "--noproxy",
            "*",
            &format!("http://{PROM}/api/v1/rules"),
        ],
        None,
        Duration::from_secs(8),
    );
    let Ok(out) = out else {
        return "unavailable".into();
    };
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    let mut s = String::new();
    for g in v["data"]["groups"].as_array().into_iter().flatten() {
        for r in g["rules"].as_array().into_iter().flatten() {
            s += &format!("\n  {} {} {}", r["name"], r["health"], r["lastError"]);
        }
    }
    s
}

fn promtool(args: &[&str], stdin: Option<&[u8]>) -> Result<String> {
    use std::io::Write as _;
    let mut child = std::process::Command::new("promtool")
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .context("promtool (Debian package prometheus) is required")?;
    if let Some(input) = stdin {
        child.stdin.take().unwrap().write_all(input)?;
    }
    drop(child.stdin.take());
    let out = child.wait_with_output()?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if !out.status.success() {
        bail!("promtool {args:?} failed: {text}");
    }
    Ok(text)
}

#[test]
fn promtool_checks_rules_and_alert_unit_tests() -> Result<()> {
    let dir = repo().join("dashboards/prometheus");
    let out = promtool(
        &["check", "rules", dir.join("rules.yaml").to_str().unwrap()],
        None,
    )?;
    assert!(out.contains("SUCCESS"), "{out}");
    let out = promtool(
        &[
            "test",
            "rules",
            dir.join("rules_test.yaml").to_str().unwrap(),
        ],
        None,
    )?;
    assert!(out.contains("SUCCESS"), "{out}");
    // Every alert of rules.yaml has a unit test.
    let rules = std::fs::read_to_string(dir.join("rules.yaml"))?;
    let tests = std::fs::read_to_string(dir.join("rules_test.yaml"))?;
    for line in rules
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- alert: "))
    {
        assert!(
            tests.contains(&format!("alertname: {line}")),
            "no promtool test for alert {line}"
        );
    }
    Ok(())
}

/// deploy/'s PrometheusRule carries exactly the groups of dashboards/prometheus/rules.yaml.
#[test]
fn prometheus_rule_in_deploy_equals_the_rules_file() -> Result<()> {
    let rules: serde_yaml::Value = serde_yaml::from_str(&std::fs::read_to_string(
        repo().join("dashboards/prometheus/rules.yaml"),
    )?)?;
    let cr: serde_yaml::Value = serde_yaml::from_str(&std::fs::read_to_string(
        repo().join("deploy/base/prometheusrule.yaml"),
    )?)?;
    assert_eq!(cr["kind"], serde_yaml::Value::from("PrometheusRule"));
    assert_eq!(
        cr["spec"]["groups"], rules["groups"],
        "regenerate deploy/base/prometheusrule.yaml from dashboards/prometheus/rules.yaml"
    );
    Ok(())
}

/// What `report --prometheus` and `report --agent` both know of a blocker (not the evidence,
/// nor a known client's address: per-connection facts that are no metric labels).
fn blocker_key(b: &Value) -> Vec<Value> {
    vec![
        b["client"]["namespace"].clone(),
        b["client"]["workload"].clone(),
        b["server"].clone(),
        b["security"].clone(),
        b["connections"].clone(),
    ]
}

/// Prometheus with the project's rules (evaluated every second here instead of every 30 s),
/// scraping `agent` every second.
fn start_prometheus(tb: &Testbed, agent: &Agent) -> Result<Prometheus> {
    Prometheus::start(
        tb,
        &[agent.url().trim_start_matches("http://").to_owned()],
        Some(&repo().join("dashboards/prometheus/rules.yaml")),
    )
}

/// Issue 12 cluster-wide: `policy` and `report --assume-policy` through `--prometheus` give the
/// same YAML and the same what-if as through `--agent` (per-port counts and selector labels
/// reach Prometheus as series).
#[test]
fn policy_and_what_if_through_prometheus_equal_the_agent() -> Result<()> {
    ensure_root()?;
    let bin = agent_bin()?;
    let node = scenario::PolicyNode::new("mtpolprom")?;
    let tb = &node.tb;
    let inventory = tb.workdir().join("inventory.yaml");
    write_inventory(&inventory, &node.workloads())?;
    let agent = Agent::start(tb, &bin, &inventory, &["vp*"], &[], tb.pods().len())?;
    let prom = start_prometheus(tb, &agent)?;
    node.send_traffic()?;
    let m = agent.settle(tb, Duration::from_secs(15))?;
    let total = metric_value(&m, "mtls_agent_inbound_connections_total", &[]).unwrap_or(0.0);
    assert_eq!(total, 6.0, "{m}");
    wait_for(tb, "the final scrape", Duration::from_secs(30), || {
        Ok(prom
            .query(tb, "sum(mtls_agent_inbound_port_connections_total)")?
            .first()
            .and_then(|s| s["value"][1].as_str())
            == Some("6"))
    })?;
    let url = agent.url();
    let prom_url = prom.url();
    let from_agent = node.check_policy(&agent, &["--agent", &url])?;
    let from_prom = node.check_policy(&agent, &["--prometheus", &prom_url])?;
    // The same YAML but for the window each source judged over (the agent's is its uptime).
    let window = |yaml: &str| -> String {
        yaml.lines()
            .next()
            .and_then(|l| l.split_once("of the last "))
            .and_then(|(_, r)| r.split_once(" proves"))
            .map(|(w, _)| w.to_owned())
            .unwrap_or_default()
    };
    let normal = |yaml: &str| yaml.replace(&window(yaml), "WINDOW");
    assert_eq!(normal(&from_prom.yaml), normal(&from_agent.yaml));
    // The same what-if: policies, counts and rejected connections (client, server, port,
    // security, count, last seen).
    let what_if = |v: &Value| -> Value {
        let w = &v["what_if"];
        let policies: Vec<Value> = w["policies"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|p| {
                let rejects: Vec<Value> = p["rejects"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|b| {
                        let mut key = blocker_key(b);
                        key.push(b["last_seen"].clone());
                        Value::Array(key)
                    })
                    .collect();
                serde_json::json!([p["policy"], p["assumed"], p["connections"], rejects])
            })
            .collect();
        serde_json::json!([w["assumed"], w["rejected_connections"], policies])
    };
    assert_eq!(
        what_if(&from_prom.what_if_strict),
        what_if(&from_agent.what_if_strict)
    );
    assert_eq!(
        what_if(&from_prom.what_if_generated),
        what_if(&from_agent.what_if_generated)
    );
    agent.stop()?;
    node.destroy()?;
    Ok(())
}

#[test]
fn real_prometheus_agrees_with_the_agent_and_every_query_has_data() -> Result<()> {
    ensure_root()?;
    let bin = agent_bin()?;
    let mut tb = Testbed::new("mtprom")?;
    let api = tb.add_pod(PodSpec::new("api", "198.18.0.10".parse()?))?;
    let worker = tb.add_pod(PodSpec::new("worker", "198.18.0.11".parse()?))?;
    let web = tb.add_pod(PodSpec::new("web", "198.18.0.20".parse()?))?;
    let batch = tb.add_pod(PodSpec::new("batch", "198.18.0.30".parse()?))?;
    let pki = Pki::new(tb.workdir().join("pki"))?;
    let api_cert = pki.issue("api", &[San::spiffe("payments", "api")])?;
    let worker_cert = pki.issue("worker", &[San::spiffe("payments", "worker")])?;
    let inventory = tb.workdir().join("inventory.yaml");
    write_inventory(
        &inventory,
        &[
            Workload::new("payments", "api", &[&api]),
            Workload::new("payments", "worker", &[&worker]),
            Workload::new("shop", "web", &[&web]),
            Workload::new("legacy", "batch", &[&batch]).without_sidecar(),
        ],
    )?;
    let _s1 = openssl_server(
        &tb,
        &api.netns,
        &TlsServer::new(8443, &api_cert, pki.ca_cert())
            .require_client_cert()
            .alpn(ISTIO_ALPN),
    )?;
    let _s2 = http_server(&tb, &api.netns, 15021, false)?;
    let _s3 = http_server(&tb, &web.netns, 8080, false)?;
    for (ns, a) in [
        (&api.netns, api.v4(8443)),
        (&api.netns, api.v4(15021)),
        (&web.netns, web.v4(8080)),
    ] {
        tb.wait_tcp_listening(ns, a, Duration::from_secs(10))?;
    }
    let agent = Agent::start(&tb, &bin, &inventory, &["vp*"], &[], tb.pods().len())?;

    let prom = start_prometheus(&tb, &agent)?;

    // Traffic: payments all Istio mTLS (+ exempt probes), shop plaintext from legacy/batch.
    let mtls = TlsClient::new(api.v4(8443), pki.ca_cert())
        .cert(&worker_cert)
        .alpn(ISTIO_ALPN);
    for _ in 0..3 {
        openssl_client(&tb, &worker.netns, &mtls)?;
        http_get(&tb, &batch.netns, &http_url(web.v4(8080)))?;
    }
    for _ in 0..2 {
        http_get(&tb, tb.node_netns(), &http_url(api.v4(15021)))?;
    }
    let m = agent.settle(&tb, Duration::from_secs(15))?;
    let total = metric_value(&m, "mtls_agent_inbound_connections_total", &[]).unwrap_or(0.0);
    assert_eq!(total, 8.0, "{m}");
    // Prometheus has scraped the final counts, and the rules have been evaluated on them.
    wait_for(&tb, "the final scrape", Duration::from_secs(30), || {
        Ok(prom
            .query(&tb, "sum(mtls_agent_inbound_connections_total)")?
            .first()
            .and_then(|s| s["value"][1].as_str())
            == Some("8"))
    })?;
    // Rates need two samples of the (young) series: wait until every recording rule has both
    // judged namespaces.
    for rule in [
        "namespace:mtls_agent_strict_ready:bool15m",
        "namespace:mtls_agent_mtls_ratio:ratio15m",
        "namespace:mtls_agent_blocking_connections:rate5m",
    ] {
        wait_for(&tb, rule, Duration::from_secs(30), || {
            Ok(prom.query(&tb, rule)?.len() == 2)
        })?;
    }

    // promtool lints the agent's exposition.
    promtool(&["check", "metrics"], Some(m.as_bytes()))?;

    // report --prometheus agrees with report --agent: verdicts, counts, blockers.
    let prom_url = prom.url();
    for ns in ["payments", "shop", "legacy"] {
        let from_agent = agent.report_json(&tb, ns, None)?;
        let (status, out, err) = agent.report_with(
            &tb,
            &[
                "--namespace",
                ns,
                "--output",
                "json",
                "--prometheus",
                &prom_url,
            ],
        )?;
        assert!(status.success(), "report --prometheus {ns}: {err}");
        let from_prom: Value = serde_json::from_str(&out)?;
        for key in ["verdict", "inbound", "mtls_ratio", "compliant"] {
            assert_eq!(
                from_prom[key], from_agent[key],
                "{ns} {key}: prometheus {from_prom:#} vs agent {from_agent:#}"
            );
        }
        let strip = |r: &Value| -> Vec<Value> {
            r["blockers"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|b| Value::Array(blocker_key(b)))
                .collect()
        };
        assert_eq!(strip(&from_prom), strip(&from_agent), "{ns} blockers");
        let wl = |r: &Value| -> Vec<Value> {
            r["workloads"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|w| serde_json::json!([w["name"], w["verdict"], w["inbound"], w["sidecar"]]))
                .collect()
        };
        assert_eq!(wl(&from_prom), wl(&from_agent), "{ns} workloads");
    }
    let (status, out, err) = agent.report_with(
        &tb,
        &[
            "--all-namespaces",
            "--output",
            "json",
            "--prometheus",
            &prom_url,
        ],
    )?;
    assert!(status.success(), "{err}");
    let all: Value = serde_json::from_str(&out)?;
    let (status, out2, _) = agent.report(&tb, &["--all-namespaces", "--output", "json"])?;
    assert!(status.success());
    let all_agent: Value = serde_json::from_str(&out2)?;
    let verdicts = |v: &Value| -> Vec<(String, String)> {
        v.as_array()
            .into_iter()
            .flatten()
            .map(|n| {
                (
                    n["namespace"].as_str().unwrap_or("").to_owned(),
                    n["verdict"].as_str().unwrap_or("").to_owned(),
                )
            })
            .collect()
    };
    assert_eq!(verdicts(&all), verdicts(&all_agent));
    let (status, _, err) =
        agent.report_with(&tb, &["--namespace", "nope", "--prometheus", &prom_url])?;
    assert_eq!(status.code(), Some(2), "{err}");

    // Every dashboard panel's query returns data.
    for file in [
        "mtls-migration-overview.json",
        "namespace-drilldown.json",
        "agent-health.json",
    ] {
        for expr in dashboard_exprs(&repo().join("dashboards/grafana").join(file), "shop")? {
            let r = prom.query(&tb, &expr)?;
            assert!(
                !r.is_empty(),
                "{file}: no data for {expr}; rule states: {}",
                rule_states(&tb)
            );
        }
    }
    // Every recording rule has data; every series an alert refers to exists.
    let rules: Vec<String> =
        std::fs::read_to_string(repo().join("dashboards/prometheus/rules.yaml"))?
            .lines()
            .map(str::trim)
            .filter_map(|l| l.strip_prefix("- record: ").map(str::to_owned))
            .collect();
    assert_eq!(rules.len(), 4);
    for r in &rules {
        assert!(
            !prom.query(&tb, r)?.is_empty(),
            "recording rule {r} has no data"
        );
    }
    let text = std::fs::read_to_string(repo().join("dashboards/prometheus/rules.yaml"))?;
    for name in metric_names(&text) {
        // The Kubernetes watch's series exist only in --kubernetes mode (kubernetes_identity.rs
        // and kubernetes_e2e.rs check them); this agent runs on an inventory.
        if name.starts_with("mtls_agent_kubernetes_") {
            continue;
        }
        let r = prom.query(&tb, &format!("count({{__name__=\"{name}\"}})"))?;
        assert!(!r.is_empty(), "alert/rule series {name} does not exist");
    }
    // And an alert condition evaluates as expected on live data: nothing is down.
    assert!(prom.query(&tb, "up{job=\"mtls-agent\"} == 0")?.is_empty());
    assert_eq!(
        prom.query(
            &tb,
            "namespace:mtls_agent_strict_ready:bool15m{namespace=\"payments\"}"
        )?[0]["value"][1],
        "1"
    );
    assert_eq!(
        prom.query(
            &tb,
            "namespace:mtls_agent_strict_ready:bool15m{namespace=\"shop\"}"
        )?[0]["value"][1],
        "0"
    );
    agent.stop()?;
    tb.destroy()?;
    Ok(())
}
