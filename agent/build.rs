//! Builds the eBPF object with aya-build (nightly, `-Z build-std=core`, bpf-linker) and places it in
//! OUT_DIR, where `capture` embeds it. `AYA_BUILD_SKIP=1` skips this (e.g. for `cargo doc`); the
//! agent then embeds an empty object and `run` fails with a clear message.
use anyhow::{Context as _, anyhow};

fn main() -> anyhow::Result<()> {
    let out_dir = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    let skip = matches!(
        std::env::var("AYA_BUILD_SKIP").as_deref(),
        Ok("1") | Ok("true")
    );
    if skip {
        let obj = out_dir.join("mtls-agent");
        if !obj.exists() {
            std::fs::write(&obj, b"").context("writing empty eBPF placeholder")?;
        }
    }
    let metadata = cargo_metadata::MetadataCommand::new()
        .no_deps()
        .exec()
        .context("cargo metadata")?;
    let ebpf = metadata
        .packages
        .into_iter()
        .find(|p| p.name.as_str() == "mtls-agent-ebpf")
        .ok_or_else(|| anyhow!("mtls-agent-ebpf package not found"))?;
    let root = ebpf
        .manifest_path
        .parent()
        .ok_or_else(|| anyhow!("no parent for {}", ebpf.manifest_path))?;
    aya_build::build_ebpf(
        [aya_build::Package {
            name: ebpf.name.as_str(),
            root_dir: root.as_str(),
            ..Default::default()
        }],
        aya_build::Toolchain::default(),
    )
}
