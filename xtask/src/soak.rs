//! `cargo xtask soak --minutes N`: the soak test (tests/tests/soak.rs) for N minutes instead of
//! its CI length, writing its samples (RSS, fds, classification counts over time) to
//! docs/soak.md.

use crate::{build_release, cargo, workspace_root};

pub fn soak(minutes: u64) -> anyhow::Result<()> {
    anyhow::ensure!(minutes >= 1, "--minutes must be at least 1");
    let bin = build_release()?;
    let out = workspace_root().join("docs/soak.md");
    let rev = std::process::Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .current_dir(workspace_root())
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned());
    // SAFETY: single-threaded at this point; the test reads these.
    unsafe {
        if let Some(rev) = &rev {
            std::env::set_var("MTLS_SOAK_REV", rev);
        }
        std::env::set_var("MTLS_AGENT_BIN", &bin);
        std::env::set_var("MTLS_SOAK_SECS", (minutes * 60).to_string());
        std::env::set_var("MTLS_SOAK_OUT", &out);
    }
    cargo(&[
        "test",
        "--release",
        "-p",
        "mtls-agent-testbed",
        "--test",
        "soak",
        "--",
        "--nocapture",
    ])?;
    eprintln!("xtask: soak samples written to {}", out.display());
    Ok(())
}
