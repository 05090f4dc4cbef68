//! `cargo xtask setup`: installs what building and testing need on a fresh Debian machine of this
//! kind, skipping every step that is already satisfied, so running it again costs a few seconds.
use std::process::Command;

use anyhow::{Context as _, bail};

/// Debian's LLVM 22 matches the nightly toolchain's LLVM; bpf-linker is built against it.
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";
/// bpf-linker release known to build with `--features llvm-22` here.
const BPF_LINKER_VERSION: &str = "0.13.0";

/// Debian packages: LLVM for bpf-linker, and the real tools the demo and tests drive.
const PACKAGES: &[(&str, &str)] = &[
    ("llvm-22-dev", "LLVM 22 for bpf-linker"),
    ("libpolly-22-dev", "LLVM 22 Polly (bpf-linker links it)"),
    ("iproute2", "ip netns / veth / tc for the test topology"),
    (
        "iptables",
        "kube-proxy-style Service DNAT and packet loss in the test bed",
    ),
    (
        "ethtool",
        "turning offloads off for segmented-traffic tests",
    ),
    (
        "openssl",
        "real TLS clients and servers (s_client/s_server)",
    ),
    ("curl", "HTTP/TLS client"),
    ("nginx-light", "TLS server with ssl_verify_client"),
    ("python3", "plain HTTP server in test pods"),
    ("bpftool", "checking that no program is left attached"),
    (
        "prometheus",
        "a real Prometheus (and promtool) for the rules, dashboards and report --prometheus tests",
    ),
    (
        "iperf3",
        "bulk and small-message load for `cargo xtask bench`",
    ),
    (
        "tshark",
        "the packet capture `cargo xtask bench` compares against, and the corpus test's capture and cross-check",
    ),
    (
        "postgresql",
        "a real PostgreSQL server (SSLRequest, TLS with and without client certificates) in the corpus test",
    ),
];

fn step(msg: &str) {
    eprintln!("setup: {msg}");
}

fn ok(cmd: &mut Command) -> bool {
    cmd.stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

fn run(cmd: &mut Command, what: &str) -> anyhow::Result<()> {
    let status = cmd
        .status()
        .with_context(|| format!("{what}: cannot start {cmd:?}"))?;
    if !status.success() {
        bail!("{what} failed ({status}); command: {cmd:?}");
    }
    Ok(())
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc_geteuid() == 0 }
}

unsafe extern "C" {
    #[link_name = "geteuid"]
    fn libc_geteuid() -> u32;
}

fn dpkg_installed(pkg: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", pkg])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        .unwrap_or(false)
}

pub fn setup() -> anyhow::Result<()> {
    // 1. nightly with rust-src (the eBPF crate builds core itself: -Z build-std=core).
    let toolchains = Command::new("rustup")
        .args(["toolchain", "list"])
        .output()
        .context("rustup is needed (the machine's Rust toolchain comes with it)")?;
    if !String::from_utf8_lossy(&toolchains.stdout)
        .lines()
        .any(|l| l.starts_with("nightly"))
    {
        step("installing the nightly toolchain");
        run(
            Command::new("rustup").args([
                "toolchain",
                "install",
                "nightly",
                "--profile",
                "minimal",
            ]),
            "rustup toolchain install nightly",
        )?;
    } else {
        step("nightly toolchain: present");
    }
    let comps = Command::new("rustup")
        .args(["component", "list", "--toolchain", "nightly", "--installed"])
        .output()
        .context("rustup component list")?;
    if !String::from_utf8_lossy(&comps.stdout)
        .lines()
        .any(|l| l.starts_with("rust-src"))
    {
        step("adding rust-src to nightly");
        run(
            Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]),
            "rustup component add rust-src",
        )?;
    } else {
        step("nightly rust-src: present");
    }

    // 2. Debian packages.
    let missing: Vec<&str> = PACKAGES
        .iter()
        .filter(|(p, _)| !dpkg_installed(p))
        .map(|(p, _)| *p)
        .collect();
    if missing.is_empty() {
        step("Debian packages: all present");
    } else {
        for (p, why) in PACKAGES.iter().filter(|(p, _)| missing.contains(p)) {
            step(&format!("will install {p} ({why})"));
        }
        if !is_root() {
            bail!(
                "installing {} needs root: run as root, or install them with apt-get first",
                missing.join(", ")
            );
        }
        let apt_env = [("DEBIAN_FRONTEND", "noninteractive")];
        run(
            Command::new("apt-get")
                .args(["update", "-qq"])
                .envs(apt_env),
            "apt-get update (is the Debian mirror reachable?)",
        )?;
        run(
            Command::new("apt-get")
                .args(["install", "-y", "-qq", "--no-install-recommends"])
                .args(&missing)
                .envs(apt_env),
            "apt-get install",
        )?;
    }

    // 3. bpf-linker against LLVM 22 (a plain `cargo install bpf-linker` wants LLVM 23).
    if ok(Command::new("bpf-linker").arg("--version")) {
        step("bpf-linker: present");
    } else {
        step(&format!(
            "building bpf-linker {BPF_LINKER_VERSION} against {LLVM_PREFIX} (a few minutes, once)"
        ));
        run(
            Command::new("cargo")
                .args([
                    "install",
                    "bpf-linker",
                    "--version",
                    BPF_LINKER_VERSION,
                    "--no-default-features",
                    "--features",
                    "llvm-22",
                ])
                .env("LLVM_PREFIX", LLVM_PREFIX),
            "cargo install bpf-linker",
        )?;
    }

    // 4. cargo-nextest runs the suite.
    if ok(Command::new("cargo").args(["nextest", "--version"])) {
        step("cargo-nextest: present");
    } else {
        step("installing cargo-nextest");
        run(
            Command::new("cargo").args(["install", "cargo-nextest", "--locked"]),
            "cargo install cargo-nextest",
        )?;
    }
    // 5. kubernetes-validate (PyPI, bundles the Kubernetes schemas: validates the rendered
    //    deploy/ manifests offline in tests/tests/kubernetes_manifests.rs).
    ensure_kubernetes_validate()?;
    step("done");
    Ok(())
}

/// The version of kubernetes-validate the manifest test is written against.
const KUBERNETES_VALIDATE_VERSION: &str = "1.37.0";

fn ensure_kubernetes_validate() -> anyhow::Result<()> {
    if ok(Command::new("kubernetes-validate").arg("--version")) {
        step("kubernetes-validate: present");
        return Ok(());
    }
    step(&format!(
        "installing kubernetes-validate {KUBERNETES_VALIDATE_VERSION} (pip)"
    ));
    run(
        Command::new("python3").args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            &format!("kubernetes-validate=={KUBERNETES_VALIDATE_VERSION}"),
        ]),
        "pip install kubernetes-validate",
    )?;
    // pyenv installs console scripts behind shims that need a rehash.
    if !ok(Command::new("kubernetes-validate").arg("--version")) {
        let _ = ok(Command::new("pyenv").arg("rehash"));
    }
    if !ok(Command::new("kubernetes-validate").arg("--version")) {
        bail!("kubernetes-validate was installed but is not on PATH");
    }
    if !ok(Command::new("kubectl").arg("version").arg("--client")) {
        step(
            "warning: kubectl is missing: the manifest test renders deploy/ with `kubectl kustomize`",
        );
    }
    Ok(())
}

/// `cargo xtask fuzz` only (not part of the default setup): cargo-fuzz, built from crates.io.
pub fn ensure_cargo_fuzz() -> anyhow::Result<()> {
    if ok(Command::new("cargo").args(["fuzz", "--version"])) {
        step("cargo-fuzz: present");
        return Ok(());
    }
    step("installing cargo-fuzz (cargo install cargo-fuzz)");
    run(
        Command::new("cargo").args(["install", "--locked", "cargo-fuzz"]),
        "cargo install cargo-fuzz",
    )
}
