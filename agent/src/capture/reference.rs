//! `mtls-agent bench-reference` (hidden): observer R of `cargo xtask bench`. Attaches the
//! parse-only reference programs (ebpf/src/reference.rs) with TCX at ingress and egress of every
//! interface whose name matches, exactly where `run` attaches its own (first in the chain), waits
//! for SIGTERM or SIGINT, and detaches. The benchmark compares the agent's eBPF cost per packet
//! with this program's: the floor of a TC program on this kernel and VM.
use aya::{
    EbpfLoader,
    programs::{LinkOrder, SchedClassifier, TcAttachType, tc::TcAttachOptions},
};
use mtls_agent_common::names;
use tracing::{info, warn};

use super::{
    CaptureError, EBPF_OBJECT, Globs, bump_memlock_rlimit, check_btf, list_interfaces,
    load_classifier,
};

#[derive(Debug, thiserror::Error)]
pub enum ReferenceError {
    #[error(transparent)]
    Capture(#[from] CaptureError),
    #[error("--interface: invalid glob: {0}")]
    Glob(#[from] glob::PatternError),
    #[error("listing interfaces: {0}")]
    Links(#[source] std::io::Error),
    #[error("no interface matches {0:?}")]
    NoInterface(Vec<String>),
    #[error("attaching {prog} to {iface}: {source}")]
    Attach {
        prog: &'static str,
        iface: String,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("waiting for a signal: {0}")]
    Signal(#[source] std::io::Error),
}

/// Attaches the reference programs, prints `attached N` on stdout once they are in place, and
/// returns after SIGTERM/SIGINT with everything detached.
pub fn run(globs: &[String]) -> Result<(), ReferenceError> {
    if EBPF_OBJECT.is_empty() {
        return Err(CaptureError::NoObject.into());
    }
    check_btf()?;
    let sel = Globs::new(globs)?;
    // Block the signals before attaching, so one that arrives early is still waited for.
    let set = signal_set();
    // SAFETY: a valid, initialised sigset; this thread is the only one.
    unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    bump_memlock_rlimit();
    // The reference programs use no map; the agent's maps are created small.
    let mut ebpf = EbpfLoader::new()
        .map_max_entries(names::FLOWS, 1024)
        .map_max_entries(names::EVENTS, 4096)
        .load(EBPF_OBJECT)
        .map_err(CaptureError::Load)?;
    let ifaces: Vec<String> = list_interfaces()
        .map_err(ReferenceError::Links)?
        .into_iter()
        .filter(|i| sel.matches(&i.name))
        .map(|i| i.name)
        .collect();
    if ifaces.is_empty() {
        return Err(ReferenceError::NoInterface(globs.to_vec()));
    }
    let mut links = Vec::new();
    for (name, hook) in [
        (names::PROG_REF_INGRESS, TcAttachType::Ingress),
        (names::PROG_REF_EGRESS, TcAttachType::Egress),
    ] {
        let prog = load_classifier(&mut ebpf, name)?;
        for iface in &ifaces {
            let id = prog
                .attach_with_options(iface, hook, TcAttachOptions::TcxOrder(LinkOrder::first()))
                .map_err(|source| ReferenceError::Attach {
                    prog: name,
                    iface: iface.clone(),
                    source,
                })?;
            links.push((name, id));
        }
    }
    println!("attached {}", ifaces.len());
    info!(interfaces = ?ifaces, "reference programs attached; waiting for SIGTERM");
    let mut sig = 0;
    // SAFETY: valid set and out pointer.
    let ret = unsafe { libc::sigwait(&set, &mut sig) };
    for (name, id) in links {
        let prog: Option<&mut SchedClassifier> =
            ebpf.program_mut(name).and_then(|p| p.try_into().ok());
        if let Some(p) = prog
            && let Err(e) = p.detach(id)
        {
            warn!(program = name, error = %e, "detaching");
        }
    }
    if ret != 0 {
        return Err(ReferenceError::Signal(std::io::Error::from_raw_os_error(
            ret,
        )));
    }
    info!(signal = sig, "detached");
    Ok(())
}

fn signal_set() -> libc::sigset_t {
    // SAFETY: sigemptyset initialises the set before sigaddset uses it.
    unsafe {
        let mut set = std::mem::zeroed::<libc::sigset_t>();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        set
    }
}
