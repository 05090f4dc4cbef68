//! `mtls-agent run`: checks the flags, starts the runtime and hands over to the daemon loop
//! (`crate::daemon`).
use anyhow::Context as _;

use super::{DEFAULT_INTERFACE_GLOBS, RunArgs, usage};
use crate::{capture, identity::Inventory};

pub fn init_logging(filter: &str) {
    use tracing_subscriber::EnvFilter;
    let filter = std::env::var("RUST_LOG")
        .ok()
        .and_then(|f| EnvFilter::try_new(f).ok())
        .or_else(|| EnvFilter::try_new(filter).ok())
        .unwrap_or_else(|| EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr())
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi)
        .try_init();
}

pub fn run(args: RunArgs) -> anyhow::Result<()> {
    init_logging(&args.log);
    // Validate everything the user gave before touching the kernel.
    // --- Kubernetes mode (issue 4): exactly one identity source. ---
    let inventory = match (&args.inventory, args.kubernetes) {
        (Some(path), false) => Inventory::load(path).map_err(|e| usage(e.to_string()))?,
        (None, true) => Inventory::default(),
        _ => {
            return Err(usage(
                "exactly one of --inventory FILE and --kubernetes is required",
            ));
        }
    };
    // --- end Kubernetes mode ---
    // Globs narrow the pod-facing interfaces; without auto discovery they alone select.
    let interfaces: Vec<String> = if args.interfaces.is_empty() && !args.interface_auto {
        DEFAULT_INTERFACE_GLOBS
            .iter()
            .map(|s| s.to_string())
            .collect()
    } else {
        args.interfaces.clone()
    };
    capture::Globs::new(&interfaces)
        .map_err(|e| usage(format!("--interface: invalid glob: {e}")))?;
    if !args.ring_buffer_size.is_power_of_two() || args.ring_buffer_size < 4096 {
        return Err(usage(format!(
            "--ring-buffer-size: {} is not a power of two of at least 4096",
            args.ring_buffer_size
        )));
    }
    if args.max_blocking_clients == 0 {
        return Err(usage("--max-blocking-clients: must be at least 1"));
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(crate::daemon::daemon(args, inventory, interfaces))
}
