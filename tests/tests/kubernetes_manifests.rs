//! The deployment manifests (deploy/): the example overlay rendered by `kubectl kustomize` and
//! validated offline against the Kubernetes schemas (`kubernetes-validate --strict`, installed
//! by `cargo xtask setup`), the Prometheus Operator kinds checked structurally and their alert
//! rules by `promtool`, the DaemonSet's privileges pinned, and the overlay's agent flags parsed
//! by the real binary. A missing tool fails the test, it never skips it.
use std::{
    io::Write as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context as _, Result, bail};
use mtls_agent_testbed::agent_bin;
use serde_json::{Value, json};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn tool(name: &str) -> Result<Command> {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {name}")])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !found {
        bail!("{name} is not installed: run `cargo xtask setup`");
    }
    Ok(Command::new(name))
}

fn piped(mut cmd: Command, stdin: &[u8]) -> Result<std::process::Output> {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {cmd:?}"))?;
    child.stdin.take().context("stdin")?.write_all(stdin)?;
    Ok(child.wait_with_output()?)
}

fn kustomize(dir: &Path) -> Result<String> {
    let out = tool("kubectl")?.arg("kustomize").arg(dir).output()?;
    if !out.status.success() {
        bail!(
            "kubectl kustomize {}: {}",
            dir.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8(out.stdout)?)
}

/// The YAML documents as JSON (PyYAML, which kubernetes-validate depends on).
fn documents(yaml: &str) -> Result<Vec<Value>> {
    let mut py = tool("python3")?;
    py.args([
        "-c",
        "import sys, json, yaml; print(json.dumps([d for d in yaml.safe_load_all(sys.stdin) if d]))",
    ]);
    let out = piped(py, yaml.as_bytes())?;
    if !out.status.success() {
        bail!("YAML → JSON: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(serde_json::from_slice(&out.stdout)?)
}

fn find<'a>(docs: &'a [Value], kind: &str) -> Result<&'a Value> {
    docs.iter()
        .find(|d| d["kind"] == kind)
        .with_context(|| format!("no {kind} rendered"))
}

/// kubernetes-validate on every document of `yaml`: core kinds must pass against the bundled
/// schemas; the Prometheus Operator kinds have no schema there (they are CRDs) and are the only
/// ones allowed to be reported as such: they are checked structurally and with promtool below.
fn validate(yaml: &str) -> Result<()> {
    let mut kv = tool("kubernetes-validate")?;
    kv.args(["--strict", "-"]);
    let out = piped(kv, yaml.as_bytes())?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if !out.status.success() {
        bail!("kubernetes-validate failed:\n{text}");
    }
    for kind in [
        "namespace",
        "serviceaccount",
        "clusterrole",
        "clusterrolebinding",
        "service",
        "daemonset",
    ] {
        if !text.contains(&format!("passed for resource {kind}/mtls-agent")) {
            bail!("{kind} was not validated:\n{text}");
        }
    }
    for line in text.lines().filter(|l| l.contains("Couldn't find schema")) {
        if !(line.contains("kind PodMonitor") || line.contains("kind PrometheusRule")) {
            bail!("a core kind without schema: {line}");
        }
    }
    Ok(())
}

#[test]
fn example_overlay_renders_and_validates_offline() -> Result<()> {
    let yaml = kustomize(&repo().join("deploy/overlays/example"))?;
    validate(&yaml)?;
    validate(&kustomize(&repo().join("deploy/base"))?)?;
    let docs = documents(&yaml)?;
    let kinds: Vec<&str> = docs.iter().filter_map(|d| d["kind"].as_str()).collect();
    assert_eq!(
        kinds,
        [
            "Namespace",
            "ServiceAccount",
            "ClusterRole",
            "ClusterRoleBinding",
            "Service",
            "DaemonSet",
            "PodMonitor",
            "PrometheusRule"
        ]
    );
    for d in &docs {
        if d["kind"] != "Namespace"
            && d["kind"] != "ClusterRole"
            && d["kind"] != "ClusterRoleBinding"
        {
            assert_eq!(d["metadata"]["namespace"], "mtls-agent", "{d:#}");
        }
    }

    // The DaemonSet asks for no more than it uses.
    let ds = find(&docs, "DaemonSet")?;
    let pod = &ds["spec"]["template"]["spec"];
    assert_eq!(pod["hostNetwork"], true);
    assert_eq!(pod["serviceAccountName"], "mtls-agent");
    assert!(
        pod["tolerations"].as_array().is_some_and(|t| t
            .iter()
            .any(|t| t["operator"] == "Exists" && t.get("key").is_none())),
        "tolerates every taint: {pod:#}"
    );
    let c = &pod["containers"][0];
    let sc = &c["securityContext"];
    assert_eq!(sc["privileged"], false);
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    assert_eq!(sc["capabilities"]["drop"], json!(["ALL"]));
    assert_eq!(
        sc["capabilities"]["add"],
        json!(["BPF", "NET_ADMIN", "PERFMON", "SYS_ADMIN"]),
        "exactly the capabilities of docs/kubernetes.md"
    );
    assert!(pod.get("hostPID").is_none() && pod.get("hostIPC").is_none());
    assert_eq!(
        c["image"], "registry.example.com/platform/mtls-agent:0.1.0",
        "the overlay's image"
    );
    let env = c["env"].as_array().context("env")?;
    assert!(
        env.iter().any(|e| e["name"] == "NODE_NAME"
            && e["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName")
    );
    for k in ["requests", "limits"] {
        for r in ["cpu", "memory"] {
            assert!(c["resources"][k][r].is_string(), "resources.{k}.{r}");
        }
    }
    let bpffs = pod["volumes"]
        .as_array()
        .and_then(|v| v.iter().find(|v| v["hostPath"]["path"] == "/sys/fs/bpf"))
        .context("bpffs volume")?;
    assert!(c["volumeMounts"].as_array().is_some_and(|m| {
        m.iter()
            .any(|m| m["name"] == bpffs["name"] && m["mountPath"] == "/sys/fs/bpf")
    }));
    // The pods' network namespaces, read-only, following mounts made after the agent started
    // (--attach-side auto attaches on the pods' ends through them).
    let netns = pod["volumes"]
        .as_array()
        .and_then(|v| v.iter().find(|v| v["hostPath"]["path"] == "/var/run/netns"))
        .context("netns volume")?;
    assert!(
        c["volumeMounts"]
            .as_array()
            .is_some_and(|m| m.iter().any(|m| {
                m["name"] == netns["name"]
                    && m["mountPath"] == "/var/run/netns"
                    && m["readOnly"] == true
                    && m["mountPropagation"] == "HostToContainer"
            })),
        "{c:#}"
    );
    // The overlay's port is the container port the probes, Service and PodMonitor use.
    let args: Vec<&str> = c["args"]
        .as_array()
        .context("args")?
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(args.contains(&"--listen=0.0.0.0:9100"), "{args:?}");
    assert_eq!(c["ports"][0]["containerPort"], 9100);
    assert_eq!(c["ports"][0]["name"], "metrics");
    assert_eq!(c["readinessProbe"]["httpGet"]["port"], "metrics");

    // RBAC: read-only, only the four resources the agent watches.
    let role = find(&docs, "ClusterRole")?;
    let mut granted = Vec::new();
    for rule in role["rules"].as_array().context("rules")? {
        assert_eq!(rule["verbs"], json!(["get", "list", "watch"]), "{rule:#}");
        for g in rule["apiGroups"].as_array().context("apiGroups")? {
            for r in rule["resources"].as_array().context("resources")? {
                granted.push(format!(
                    "{}/{}",
                    g.as_str().unwrap_or_default(),
                    r.as_str().unwrap_or_default()
                ));
            }
        }
    }
    granted.sort();
    assert_eq!(
        granted,
        [
            "/namespaces",
            "/nodes",
            "/pods",
            "security.istio.io/peerauthentications"
        ]
    );
    let binding = find(&docs, "ClusterRoleBinding")?;
    assert_eq!(binding["roleRef"]["name"], role["metadata"]["name"]);
    assert_eq!(
        binding["subjects"][0],
        json!({"kind": "ServiceAccount", "name": "mtls-agent", "namespace": "mtls-agent"})
    );

    // Service and PodMonitor find the agent's pods and port.
    let pod_labels = &ds["spec"]["template"]["metadata"]["labels"];
    let selects = |sel: &Value| {
        sel.as_object()
            .is_some_and(|m| !m.is_empty() && m.iter().all(|(k, v)| &pod_labels[k] == v))
    };
    let svc = find(&docs, "Service")?;
    assert!(selects(&svc["spec"]["selector"]), "{svc:#}");
    assert_eq!(svc["spec"]["ports"][0]["targetPort"], "metrics");
    let pm = find(&docs, "PodMonitor")?;
    assert_eq!(pm["apiVersion"], "monitoring.coreos.com/v1");
    assert!(selects(&pm["spec"]["selector"]["matchLabels"]), "{pm:#}");
    let ep = &pm["spec"]["podMetricsEndpoints"][0];
    assert_eq!(ep["port"], "metrics");
    assert_eq!(ep["path"], "/metrics");
    assert_eq!(
        ep["honorLabels"], true,
        "the series' own namespace label must win"
    );

    // PrometheusRule: promtool accepts the rules, and they use series the agent exports.
    let pr = find(&docs, "PrometheusRule")?;
    assert_eq!(pr["apiVersion"], "monitoring.coreos.com/v1");
    let groups = json!({"groups": pr["spec"]["groups"]});
    let dir = tempfile::tempdir()?;
    let rules = dir.path().join("rules.json");
    std::fs::write(&rules, serde_json::to_vec_pretty(&groups)?)?;
    let out = tool("promtool")?
        .args(["check", "rules"])
        .arg(&rules)
        .output()?;
    assert!(
        out.status.success(),
        "promtool check rules: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let alerts: Vec<&str> = pr["spec"]["groups"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|g| g["rules"].as_array().into_iter().flatten())
        .filter_map(|r| r["alert"].as_str())
        .collect();
    for want in [
        "MtlsAgentPlaintextToStrictNamespace",
        "MtlsAgentEventsLost",
        "MtlsAgentDown",
        "MtlsAgentNotAttached",
    ] {
        assert!(alerts.contains(&want), "{want} in {alerts:?}");
    }
    let metrics_src = std::fs::read_to_string(repo().join("agent/src/export/metrics.rs"))?;
    let rule_text = serde_json::to_string(&groups)?;
    let bytes = rule_text.as_bytes();
    let mut at = 0;
    while let Some(i) = rule_text[at..].find("mtls_agent_").map(|i| i + at) {
        let name: String = rule_text[i..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        // Recording-rule names (`level:metric:operation`) are not exported series.
        let inside_word = i > 0
            && (bytes[i - 1].is_ascii_alphanumeric()
                || bytes[i - 1] == b'_'
                || bytes[i - 1] == b':');
        assert!(
            inside_word || metrics_src.contains(&format!("\"{name}\"")),
            "the rules use {name}, which the agent does not export"
        );
        at = i + name.len();
    }

    // The overlay's flags are flags the agent accepts: it gets as far as the kubeconfig.
    let bin = agent_bin()?;
    let mut cmd = Command::new(&bin);
    cmd.args(&args)
        .args(["--kubeconfig", "/nonexistent/kubeconfig"]);
    let out = cmd.env_remove("KUBECONFIG").output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
    assert!(
        err.trim()
            .lines()
            .last()
            .unwrap_or_default()
            .contains("--kubeconfig"),
        "every other flag parsed: {err}"
    );
    Ok(())
}

fn copy_dir(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to)?;
    for e in std::fs::read_dir(from)? {
        let e = e?;
        let dest = to.join(e.file_name());
        if e.file_type()?.is_dir() {
            copy_dir(&e.path(), &dest)?;
        } else {
            std::fs::copy(e.path(), dest)?;
        }
    }
    Ok(())
}

/// The old-kernels component adds CAP_SYS_RESOURCE, and only that.
#[test]
fn old_kernels_component_adds_only_sys_resource() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let deploy = dir.path().join("deploy");
    copy_dir(&repo().join("deploy"), &deploy)?;
    let overlay = deploy.join("overlays/old-kernels-test");
    std::fs::create_dir_all(&overlay)?;
    std::fs::write(
        overlay.join("kustomization.yaml"),
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nresources:\n  - ../../base\ncomponents:\n  - ../../components/old-kernels\n",
    )?;
    let yaml = kustomize(&overlay)?;
    validate(&yaml)?;
    let docs = documents(&yaml)?;
    let ds = find(&docs, "DaemonSet")?;
    assert_eq!(
        ds["spec"]["template"]["spec"]["containers"][0]["securityContext"]["capabilities"]["add"],
        json!(["BPF", "NET_ADMIN", "PERFMON", "SYS_ADMIN", "SYS_RESOURCE"])
    );
    Ok(())
}

/// The report-users component grants users exactly what `report` through the API needs (get/list
/// pods, get pods/proxy), in the agent namespace only, and changes nothing else.
#[test]
fn report_users_component_grants_pod_proxy_in_the_agent_namespace() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let deploy = dir.path().join("deploy");
    copy_dir(&repo().join("deploy"), &deploy)?;
    let overlay = deploy.join("overlays/report-users-test");
    std::fs::create_dir_all(&overlay)?;
    std::fs::write(
        overlay.join("kustomization.yaml"),
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nresources:\n  - ../../base\ncomponents:\n  - ../../components/report-users\n",
    )?;
    let yaml = kustomize(&overlay)?;
    validate(&yaml)?;
    let docs = documents(&yaml)?;
    let base = documents(&kustomize(&repo().join("deploy/base"))?)?;
    assert_eq!(
        docs.len(),
        base.len() + 2,
        "only the ClusterRole and its RoleBinding"
    );
    let role = docs
        .iter()
        .find(|d| d["kind"] == "ClusterRole" && d["metadata"]["name"] == "mtls-agent-report")
        .context("ClusterRole mtls-agent-report")?;
    assert_eq!(
        role["rules"],
        json!([
            {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list"]},
            {"apiGroups": [""], "resources": ["pods/proxy"], "verbs": ["get"]}
        ])
    );
    let binding = find(&docs, "RoleBinding")?;
    assert_eq!(binding["metadata"]["namespace"], "mtls-agent");
    assert_eq!(binding["roleRef"]["name"], "mtls-agent-report");
    // The binding's namespace is the one the agent pods live in, which `report` looks in.
    let ds = find(&docs, "DaemonSet")?;
    assert_eq!(ds["metadata"]["namespace"], "mtls-agent");
    assert_eq!(
        ds["spec"]["selector"]["matchLabels"]["app.kubernetes.io/name"],
        "mtls-agent"
    );
    Ok(())
}
