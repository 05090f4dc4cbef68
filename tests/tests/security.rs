//! Issue 7, security: bearer-token auth on the JSON API (/metrics and /healthz stay open, and
//! `report --token-file` sends it), optional TLS for everything the agent serves, no SNI or
//! payload bytes on any endpoint unless asked for, labels only from validated names, and a clear
//! one-line error on a kernel without BTF. Needs root; fails (never skips) without it.
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use mtls_agent_testbed::*;

mod faults_util;
use faults_util::*;

fn bed(family: &str) -> Result<(Testbed, Pod, Pod, std::path::PathBuf)> {
    two_pod_bed(family)
}

/// HTTP status of a GET from the node namespace (extra curl args first).
fn status(tb: &Testbed, url: &str, extra: &[&str]) -> Result<u16> {
    let mut args = vec![
        "curl",
        "-s",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "--noproxy",
        "*",
        "--max-time",
        "5",
    ];
    args.extend_from_slice(extra);
    args.push(url);
    let out = tb.output(tb.node_netns(), &args, None, Duration::from_secs(8))?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or(0))
}

fn body(tb: &Testbed, url: &str, extra: &[&str]) -> Result<String> {
    let mut args = vec!["curl", "-sS", "--noproxy", "*", "--max-time", "5"];
    args.extend_from_slice(extra);
    args.push(url);
    let out = tb.output(tb.node_netns(), &args, None, Duration::from_secs(8))?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[test]
fn api_token_protects_the_json_api_but_not_metrics_or_health() -> Result<()> {
    ensure_root()?;
    let bin = agent_bin()?;
    let (tb, _server, _client, inv) = bed("mtsectok")?;
    let token = "t0k3n-For-Tests";
    let tf = write_file(tb.workdir(), "token", &format!("{token}\n"))?;
    let wrong = write_file(tb.workdir(), "wrong", "nope\n")?;
    let agent = Agent::start(&tb, &bin, &inv, &["vp*"], &["--api-token-file", &tf], 2)?;
    let u = |p: &str| format!("{}{p}", agent.url());
    let bearer = format!("Authorization: Bearer {token}");
    for p in ["/metrics", "/healthz"] {
        assert_eq!(status(&tb, &u(p), &[])?, 200, "{p} stays open");
    }
    for p in [
        "/api/v1/namespaces",
        "/api/v1/report?namespace=shop",
        "/api/v1/connections",
        "/api/v1/identity?ip=198.18.0.10",
        "/nope",
    ] {
        assert_eq!(status(&tb, &u(p), &[])?, 401, "{p} without a token");
        assert_eq!(
            status(&tb, &u(p), &["-H", "Authorization: Bearer nope"])?,
            401,
            "{p} with a wrong token"
        );
        assert_eq!(
            status(
                &tb,
                &u(p),
                &["-H", &format!("Authorization: Basic {token}")]
            )?,
            401,
            "{p} with another scheme"
        );
    }
    for p in [
        "/api/v1/namespaces",
        "/api/v1/report?namespace=shop",
        "/api/v1/connections",
    ] {
        assert_eq!(
            status(&tb, &u(p), &["-H", &bearer])?,
            200,
            "{p} with the token"
        );
    }
    // The CLI sends the token; without it, a one-line runtime error.
    let (st, out, err) = agent.report(&tb, &["--namespace", "shop", "--token-file", &tf])?;
    assert!(st.success(), "{err}");
    assert!(out.contains("shop"), "{out}");
    let (st, _, err) = agent.report(&tb, &["--namespace", "shop"])?;
    assert_eq!(st.code(), Some(1), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("401"), "{err}");
    let (st, _, err) = agent.report(&tb, &["--namespace", "shop", "--token-file", &wrong])?;
    assert_eq!(st.code(), Some(1), "{err}");
    // Through the API server's pods/proxy (which keeps Authorization for itself), too.
    let double = KubeDoubleProc::start(
        &tb,
        tb.node_netns(),
        "127.0.0.1:6443".parse()?,
        &kube_fixtures_dir(),
    )?;
    double.apply(
        &tb,
        KubeResource::Pods,
        &agent_pod_json("mtls-agent-x", "node-x", &agent.url())?,
    )?;
    let kc = double.kubeconfig().to_str().unwrap();
    let (st, out, err) = agent.report_with(
        &tb,
        &["-n", "shop", "--kubeconfig", kc, "--token-file", &tf],
    )?;
    assert!(st.success(), "{err}");
    assert!(out.contains("1 of 1 nodes answered"), "{out}");
    let (st, _, err) = agent.report_with(&tb, &["-n", "shop", "--kubeconfig", kc])?;
    assert_eq!(st.code(), Some(1), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("401"), "{err}");
    drop(double);
    // A bad token file is a usage error naming the flag.
    let empty = write_file(tb.workdir(), "empty", "\n")?;
    let out = tb.output(
        tb.node_netns(),
        &[
            bin.to_str().unwrap(),
            "run",
            "--inventory",
            inv.to_str().unwrap(),
            "--api-token-file",
            &empty,
        ],
        None,
        Duration::from_secs(10),
    )?;
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--api-token-file"));
    assert!(agent.stop()?.success());
    tb.destroy()
}

#[test]
fn tls_serves_metrics_and_api_over_https_only() -> Result<()> {
    ensure_root()?;
    let bin = agent_bin()?;
    let (tb, _server, _client, inv) = bed("mtsectls")?;
    let pki = Pki::new(tb.workdir().join("pki"))?;
    let cert = pki.issue("agent", &[San::Ip("127.0.0.1".parse()?)])?;
    let listen = "127.0.0.1:9478";
    let agent = tb.spawn_env(
        tb.node_netns(),
        &[
            bin.to_str().unwrap(),
            "run",
            "--inventory",
            inv.to_str().unwrap(),
            "--interface",
            "vp*",
            "--listen",
            listen,
            "--tls-cert",
            cert.cert.to_str().unwrap(),
            "--tls-key",
            cert.key.to_str().unwrap(),
        ],
        &[("NO_COLOR", "1")],
    )?;
    let ca = pki.ca_cert().to_str().unwrap().to_owned();
    let https = |p: &str| format!("https://{listen}{p}");
    let deadline = Instant::now() + Duration::from_secs(20);
    while status(&tb, &https("/healthz"), &["--cacert", &ca])? != 200 {
        agent.ensure_running()?;
        if Instant::now() > deadline {
            bail!("agent did not answer over HTTPS: {}", agent.stderr_tail());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let m = body(&tb, &https("/metrics"), &["--cacert", &ca])?;
    assert_eq!(
        metric_value(&m, "mtls_agent_interfaces_attached", &[]),
        Some(2.0),
        "{m}"
    );
    assert_eq!(
        status(&tb, &https("/api/v1/namespaces"), &["--cacert", &ca])?,
        200
    );
    // Verified against the CA: a client that does not trust it fails; plain HTTP gets nothing.
    assert_eq!(status(&tb, &https("/metrics"), &[])?, 0);
    assert_eq!(status(&tb, &format!("http://{listen}/metrics"), &[])?, 0);
    // The CLI reports over HTTPS, trusting the CA given with --ca-file; without it (public roots
    // only) the certificate is refused: exit 1 with one line; a bad --ca-file is exit 2.
    let report = |extra: &[&str]| -> Result<std::process::Output> {
        let mut args = vec![
            bin.to_str().unwrap(),
            "report",
            "--namespace",
            "shop",
            "--output",
            "json",
            "--agent",
        ];
        let url = https("");
        args.push(&url);
        args.extend_from_slice(extra);
        tb.output(tb.node_netns(), &args, None, Duration::from_secs(20))
    };
    let out = report(&["--ca-file", &ca])?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(json["namespace"], "shop", "{json}");
    let out = report(&[])?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("cannot reach the agent") && err.trim().lines().count() == 1,
        "{err}"
    );
    let out = report(&["--ca-file", cert.key.to_str().unwrap()])?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("--ca-file") && err.trim().lines().count() == 1,
        "{err}"
    );
    // Unreadable key: exit 2 naming the flag.
    let out = tb.output(
        tb.node_netns(),
        &[
            bin.to_str().unwrap(),
            "run",
            "--inventory",
            inv.to_str().unwrap(),
            "--tls-cert",
            cert.cert.to_str().unwrap(),
            "--tls-key",
            "/nonexistent.pem",
        ],
        None,
        Duration::from_secs(10),
    )?;
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--tls-key") && err.trim().lines().count() == 1,
        "{err}"
    );
    drop(agent);
    tb.destroy()
}

/// SNI, certificate data and payload bytes appear on no endpoint by default; with
/// --expose-handshake-details the SNI shows up in /api/v1/connections (so the check can fail).
#[test]
fn no_sni_or_payload_leaves_the_agent_unless_asked() -> Result<()> {
    ensure_root()?;
    let bin = agent_bin()?;
    let (tb, server, client, inv) = bed("mtsecleak")?;
    let pki = Pki::new(tb.workdir().join("pki"))?;
    let scert = pki.issue("web", &[San::spiffe("shop", "web")])?;
    let _tls = openssl_server(
        &tb,
        &server.netns,
        &TlsServer::new(8443, &scert, pki.ca_cert()),
    )?;
    let _http = http_server(&tb, &server.netns, 8080, false)?;
    let secret_sni = "secret-sni.example";
    let secret_path = "SECRETPAYLOADPATH";
    for expose in [false, true] {
        let extra: &[&str] = if expose {
            &["--expose-handshake-details"]
        } else {
            &[]
        };
        let agent = Agent::start(&tb, &bin, &inv, &["vp*"], extra, 2)?;
        openssl_client(
            &tb,
            &client.netns,
            &TlsClient::new(server.v4(8443), pki.ca_cert()).servername(secret_sni),
        )?;
        let _ = http_get(
            &tb,
            &client.netns,
            &format!("http://{}/{secret_path}", server.v4(8080)),
        );
        agent.settle(&tb, Duration::from_secs(10))?;
        let mut all = String::new();
        for p in [
            "/metrics",
            "/api/v1/connections",
            "/api/v1/namespaces",
            "/api/v1/report?namespace=shop",
            "/api/v1/report?namespace=legacy",
            "/api/v1/identity?ip=198.18.0.10",
        ] {
            all += &body(&tb, &format!("{}{p}", agent.url()), &[])?;
        }
        assert!(all.contains("198.18.0.10"), "endpoints answered: {all}");
        assert!(!all.contains(secret_path), "payload bytes leaked: {all}");
        assert!(!all.contains("BEGIN CERTIFICATE"));
        assert_eq!(
            all.contains(secret_sni),
            expose,
            "SNI shown only when asked: {all}"
        );
        assert!(agent.stop()?.success());
    }
    tb.destroy()
}

/// Names that reach labels come from the inventory and are validated there: a name that is
/// not a Kubernetes name is refused with exit 2 before anything runs.
#[test]
fn label_values_are_validated_names() -> Result<()> {
    ensure_root()?;
    let bin = agent_bin()?;
    // In a test bed's node namespace, so that a name wrongly accepted cannot attach anywhere else.
    let (tb, _server, _client, _inv) = bed("mtseclbl")?;
    let dir = tempfile::tempdir()?;
    for bad in [
        "\"shop\\\"}\"",
        "\"Shop\"",
        "\"a b\"",
        "\"x\\ny\"",
        &format!("\"{}\"", "a".repeat(300)),
    ] {
        let inv = write_file(
            dir.path(),
            "inv.yaml",
            &format!(
                "workloads:\n  - namespace: {bad}\n    name: web\n    addresses: [198.18.0.9]\n"
            ),
        )?;
        let out = tb.output(
            tb.node_netns(),
            &[
                bin.to_str().unwrap(),
                "run",
                "--inventory",
                &inv,
                "--interface",
                "vp*",
                "--listen",
                "127.0.0.1:9479",
            ],
            None,
            Duration::from_secs(10),
        )?;
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "namespace {bad}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{err}");
    }
    tb.destroy()
}

/// No BTF: one clear line, exit 1, nothing attached (MTLS_AGENT_BTF_PATH stands in for a kernel
/// without /sys/kernel/btf/vmlinux).
#[test]
fn missing_btf_is_one_clear_line() -> Result<()> {
    ensure_root()?;
    let bin = agent_bin()?;
    let (tb, _server, _client, inv) = bed("mtsecbtf")?;
    let mut p = tb.spawn_env(
        tb.node_netns(),
        &[
            bin.to_str().unwrap(),
            "run",
            "--inventory",
            inv.to_str().unwrap(),
            "--interface",
            "vp*",
        ],
        &[
            ("MTLS_AGENT_BTF_PATH", "/nonexistent/vmlinux"),
            ("NO_COLOR", "1"),
        ],
    )?;
    let st = p.wait_timeout(Duration::from_secs(20))?;
    let err = p.stderr();
    assert_eq!(st.code(), Some(1), "{err}");
    let last: Vec<&str> = err
        .lines()
        .filter(|l| l.starts_with("mtls-agent:"))
        .collect();
    assert_eq!(last.len(), 1, "{err}");
    assert!(
        last[0].contains("no BTF")
            && last[0].contains("/nonexistent/vmlinux")
            && last[0].contains("5.8"),
        "{err}"
    );
    assert!(attachments(&tb)?.is_empty());
    tb.destroy()
}
