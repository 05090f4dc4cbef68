//! `kube-double --listen ADDR [--fixtures DIR] [--kubeconfig FILE] [--peer-authentication-versions v1,v1beta1]`
//!
//! The Kubernetes API double of `mtls_agent_testbed::kube_double` as a process, so that it can
//! run inside a test bed's node network namespace (`Testbed::spawn`) next to the agent. Tests
//! change its objects over `POST /_double/...` (`KubeDoubleClient`). Runs until killed.
use std::{net::SocketAddr, path::PathBuf};

use anyhow::{Context as _, Result, bail};
use mtls_agent_testbed::kube_double::{KubeDouble, kube_fixtures_dir};

fn main() -> Result<()> {
    let mut listen: SocketAddr = "127.0.0.1:6443".parse()?;
    let mut fixtures: Option<PathBuf> = Some(kube_fixtures_dir());
    let mut kubeconfig: Option<PathBuf> = None;
    let mut versions: Option<String> = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = || args.next().with_context(|| format!("{a} needs a value"));
        match a.as_str() {
            "--listen" => listen = val()?.parse().context("--listen")?,
            "--fixtures" => fixtures = Some(PathBuf::from(val()?)),
            "--no-fixtures" => fixtures = None,
            "--kubeconfig" => kubeconfig = Some(PathBuf::from(val()?)),
            "--peer-authentication-versions" => versions = Some(val()?),
            other => bail!("unknown argument {other}"),
        }
    }
    let double = KubeDouble::start(listen)?;
    if let Some(v) = &versions {
        let v: Vec<&str> = v.split(',').filter(|s| !s.is_empty()).collect();
        double.set_peer_authentication_versions(&v);
    }
    if let Some(dir) = &fixtures {
        double.load_fixtures(dir)?;
    }
    if let Some(k) = &kubeconfig {
        double.write_kubeconfig(k)?;
    }
    println!("kube-double listening on {}", double.url());
    loop {
        std::thread::park();
    }
}
