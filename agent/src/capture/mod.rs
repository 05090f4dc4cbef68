//! capture: load the eBPF object, attach it to the watched interfaces (following link changes),
//! and hand ring-buffer events to the rest of the pipeline. This is the only module that needs
//! root and a kernel; everything after it also runs on pcap files.
pub mod attach;
pub mod events;
pub mod gc;
pub mod links;
pub mod netlink;
pub mod podns;
pub mod reaper;
pub mod reference;
pub mod tcnl;

use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap, MapData, PerCpuArray, RingBuf},
    programs::SchedClassifier,
};
use mtls_agent_common::{CHUNK_BYTES, FlowKey, FlowState, MAX_CHUNKS_PER_SEGMENT, names, stats};
use tracing::{debug, warn};

pub use attach::{
    ChainOrder, Globs, Interface, Position, Selection, Side, SyncReport, list_interfaces,
};

/// How the TC programs are attached (`--tc-mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum TcMode {
    /// TCX links where the kernel has them (6.6+), else a clsact qdisc with named filters.
    #[default]
    Auto,
    /// TCX links only: fail to attach on a kernel without TCX.
    Tcx,
    /// A clsact qdisc with netlink filters named `mtls_ingress`/`mtls_egress`, on any kernel.
    Clsact,
}

/// Which end of a pod's veth the TC programs go on (`--attach-side`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum AttachSide {
    /// The pod's end where its network namespace is reachable (both directions even when a
    /// CNI hands packets into the pod with `bpf_redirect_peer`), else the host side.
    #[default]
    Auto,
    /// The host-side interface only (what a `bpf_redirect_peer` into the pod skips).
    Host,
    /// The pod's end only: an interface whose pod namespace is not found is not attached.
    Pod,
}

/// Where the kernel publishes its BTF; `MTLS_AGENT_BTF_PATH` overrides it (tests only).
const BTF_PATH: &str = "/sys/kernel/btf/vmlinux";

/// Fails with one clear line when the kernel has no BTF, before anything is loaded.
pub fn check_btf() -> Result<(), CaptureError> {
    let path = std::env::var("MTLS_AGENT_BTF_PATH").unwrap_or_else(|_| BTF_PATH.to_owned());
    if std::path::Path::new(&path).exists() {
        Ok(())
    } else {
        Err(CaptureError::NoBtf(path))
    }
}

/// The compiled eBPF object, built by aya-build in build.rs.
pub(crate) static EBPF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/mtls-agent"));

/// Kernel-side settings, chosen at load time.
#[derive(Debug, Clone)]
pub struct CaptureConfig {
    /// Interface-name globs (`--interface`): narrow `interface_auto`, or the whole rule without it.
    pub interfaces: Vec<String>,
    /// Watch every pod-facing interface (`--interface-auto`, see [`Selection`]).
    pub interface_auto: bool,
    pub flow_table_size: u32,
    pub max_segments: u32,
    pub capture_bytes: u32,
    pub ring_buffer_bytes: u32,
    pub tc_mode: TcMode,
    pub attach_side: AttachSide,
}

#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error(
        "this binary was built without its eBPF program (AYA_BUILD_SKIP was set); rebuild without it"
    )]
    NoObject,
    #[error(
        "this kernel has no BTF ({0} is missing): mtls-agent needs Linux 5.8+ built with CONFIG_DEBUG_INFO_BTF=y"
    )]
    NoBtf(String),
    #[error("--capture-bytes must be between 1 and {max}, got {got}")]
    CaptureBytes { got: u32, max: u32 },
    #[error("--ring-buffer-size must be a power of two of at least 4096 bytes, got {0}")]
    RingSize(u32),
    #[error(
        "loading the eBPF program failed: {0} (needs root or CAP_BPF+CAP_NET_ADMIN+CAP_PERFMON, and a kernel with BTF and ring buffers, 5.8+)"
    )]
    Load(#[source] aya::EbpfError),
    #[error("eBPF program {0}: {1}")]
    Program(&'static str, #[source] aya::programs::ProgramError),
    #[error("eBPF map {0}: {1}")]
    Map(&'static str, String),
}

/// Sums of the per-CPU statistics array, indexed by `mtls_agent_common::stats`.
pub type KernelStats = [u64; stats::COUNT as usize];

pub struct Capture {
    ebpf: Ebpf,
    attacher: attach::Attacher,
}

impl Capture {
    pub fn load(cfg: &CaptureConfig) -> Result<Self, CaptureError> {
        if EBPF_OBJECT.is_empty() {
            return Err(CaptureError::NoObject);
        }
        check_btf()?;
        let max = CHUNK_BYTES as u32 * MAX_CHUNKS_PER_SEGMENT;
        if cfg.capture_bytes == 0 || cfg.capture_bytes > max {
            return Err(CaptureError::CaptureBytes {
                got: cfg.capture_bytes,
                max,
            });
        }
        if !cfg.ring_buffer_bytes.is_power_of_two() || cfg.ring_buffer_bytes < 4096 {
            return Err(CaptureError::RingSize(cfg.ring_buffer_bytes));
        }
        let globs =
            Globs::new(&cfg.interfaces).map_err(|e| CaptureError::Map("globs", e.to_string()))?;
        bump_memlock_rlimit();
        let mut ebpf = EbpfLoader::new()
            .override_global(names::GLOBAL_MAX_SEGMENTS, &cfg.max_segments, true)
            .override_global(names::GLOBAL_CAPTURE_BYTES, &cfg.capture_bytes, true)
            .map_max_entries(names::FLOWS, cfg.flow_table_size)
            .map_max_entries(names::EVENTS, cfg.ring_buffer_bytes)
            .load(EBPF_OBJECT)
            .map_err(CaptureError::Load)?;
        start_ebpf_log(&mut ebpf);
        for name in [names::PROG_INGRESS, names::PROG_EGRESS] {
            load_classifier(&mut ebpf, name)?;
        }
        let mut prog_ids = Vec::new();
        let (i, e) = programs(&mut ebpf);
        for (name, p) in [(names::PROG_INGRESS, &*i), (names::PROG_EGRESS, &*e)] {
            prog_ids.push(p.info().map_err(|e| CaptureError::Program(name, e))?.id());
        }
        Ok(Self {
            ebpf,
            attacher: attach::Attacher::new(
                Selection {
                    auto: cfg.interface_auto,
                    globs,
                },
                cfg.tc_mode,
                cfg.attach_side,
                prog_ids,
            ),
        })
    }

    /// Takes the ring buffer out of the object, for the reader task.
    pub fn take_ring(&mut self) -> Result<RingBuf<MapData>, CaptureError> {
        let map = self
            .ebpf
            .take_map(names::EVENTS)
            .ok_or(CaptureError::Map(names::EVENTS, "missing".into()))?;
        RingBuf::try_from(map).map_err(|e| CaptureError::Map(names::EVENTS, e.to_string()))
    }

    /// Takes the flow table out of the object, for the garbage collector (gc.rs).
    pub fn take_flows(&mut self) -> Result<HashMap<MapData, FlowKey, FlowState>, CaptureError> {
        let map = self
            .ebpf
            .take_map(names::FLOWS)
            .ok_or(CaptureError::Map(names::FLOWS, "missing".into()))?;
        HashMap::try_from(map).map_err(|e| CaptureError::Map(names::FLOWS, e.to_string()))
    }

    /// The ifindexes we are attached to.
    pub fn attached_ifindexes(&self) -> std::collections::BTreeSet<u32> {
        self.attacher.attached_ifindexes()
    }

    /// Attaches to new matching interfaces and forgets vanished ones.
    pub fn sync_interfaces(&mut self) -> std::io::Result<SyncReport> {
        let present = list_interfaces()?;
        let (i, e) = programs(&mut self.ebpf);
        Ok(self.attacher.sync(i, e, &present))
    }

    /// Attached interfaces by the side their programs went on.
    pub fn attach_sides(&self) -> std::collections::BTreeMap<Side, usize> {
        self.attacher.sides()
    }

    /// Our place in the TC chains of the attached interfaces.
    pub fn chain_order(&self) -> ChainOrder {
        self.attacher.chain_order()
    }

    pub fn attached_count(&self) -> usize {
        self.attacher.attached_count()
    }

    pub fn attached_names(&self) -> Vec<String> {
        self.attacher.attached_names().map(str::to_owned).collect()
    }

    /// Detaches everything this process attached. Other programs on the interfaces are untouched.
    pub fn detach_all(&mut self) {
        let (i, e) = programs(&mut self.ebpf);
        self.attacher.detach_all(i, e);
    }

    /// Reads the kernel statistics, summed over CPUs.
    pub fn kernel_stats(&self) -> Result<KernelStats, CaptureError> {
        let map = self
            .ebpf
            .map(names::STATS)
            .ok_or(CaptureError::Map(names::STATS, "missing".into()))?;
        let arr = PerCpuArray::<_, u64>::try_from(map)
            .map_err(|e| CaptureError::Map(names::STATS, e.to_string()))?;
        let mut out = [0u64; stats::COUNT as usize];
        for (i, slot) in out.iter_mut().enumerate() {
            let values = arr
                .get(&(i as u32), 0)
                .map_err(|e| CaptureError::Map(names::STATS, e.to_string()))?;
            *slot = values.iter().copied().fold(0u64, u64::wrapping_add);
        }
        Ok(out)
    }
}

/// The two loaded classifiers (checked in [`Capture::load`]).
impl Capture {
    /// Runs the ingress or egress program once on `packet` with `BPF_PROG_TEST_RUN`: the
    /// kernel's own code path and maps, without an interface. Tests of the program's bookkeeping
    /// use it (tests/tests/capture_kernel.rs). Returns the program's return code.
    pub fn test_run(&mut self, ingress: bool, packet: &[u8]) -> std::io::Result<u32> {
        use std::os::fd::{AsFd as _, AsRawFd as _};
        /// `union bpf_attr`, its `test` member (BPF_PROG_TEST_RUN), zero-padded.
        #[repr(C)]
        #[derive(Default)]
        struct TestRun {
            prog_fd: u32,
            retval: u32,
            data_size_in: u32,
            data_size_out: u32,
            data_in: u64,
            data_out: u64,
            repeat: u32,
            duration: u32,
            ctx_size_in: u32,
            ctx_size_out: u32,
            ctx_in: u64,
            ctx_out: u64,
            flags: u32,
            cpu: u32,
            batch_size: u32,
            _pad: u32,
        }
        const BPF_PROG_TEST_RUN: libc::c_long = 10;
        let (i, e) = programs(&mut self.ebpf);
        let prog = if ingress { i } else { e };
        let fd = prog
            .fd()
            .map_err(|e| std::io::Error::other(e.to_string()))?
            .as_fd()
            .as_raw_fd();
        let mut attr = TestRun {
            prog_fd: fd as u32,
            data_size_in: packet.len() as u32,
            data_in: packet.as_ptr() as u64,
            repeat: 1,
            ..TestRun::default()
        };
        // SAFETY: the attr points to `packet`, alive for the call; the kernel reads
        // size_of::<TestRun>() bytes of attr and writes back retval/duration.
        let ret = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_PROG_TEST_RUN,
                &mut attr as *mut TestRun,
                std::mem::size_of::<TestRun>(),
            )
        };
        if ret < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(attr.retval)
    }
}

fn programs(ebpf: &mut Ebpf) -> (&mut SchedClassifier, &mut SchedClassifier) {
    let mut ingress = None;
    let mut egress = None;
    for (name, p) in ebpf.programs_mut() {
        if name == names::PROG_INGRESS {
            ingress = <&mut SchedClassifier>::try_from(p).ok();
        } else if name == names::PROG_EGRESS {
            egress = <&mut SchedClassifier>::try_from(p).ok();
        }
    }
    match (ingress, egress) {
        (Some(i), Some(e)) => (i, e),
        // Checked in `load`: both programs exist and are classifiers.
        _ => unreachable!("programs checked at load"),
    }
}

/// Loads the classifier `name` of the object into the kernel (not attached yet).
pub(crate) fn load_classifier<'a>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<&'a mut SchedClassifier, CaptureError> {
    let prog: &mut SchedClassifier = ebpf
        .program_mut(name)
        .ok_or(CaptureError::Map(name, "missing from object".into()))?
        .try_into()
        .map_err(|e| CaptureError::Program(name, e))?;
    prog.load().map_err(|e| CaptureError::Program(name, e))?;
    Ok(prog)
}

/// Kernels before 5.11 charge BPF memory to RLIMIT_MEMLOCK.
pub(crate) fn bump_memlock_rlimit() {
    let rlim = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: setrlimit with a valid struct.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &rlim) } != 0 {
        debug!("raising RLIMIT_MEMLOCK failed; fine on 5.11+");
    }
}

/// Forwards the eBPF side's aya-log records into `tracing` (target `mtls_agent_ebpf`).
fn start_ebpf_log(ebpf: &mut Ebpf) {
    match aya_log::EbpfLogger::init_with_logger(ebpf, tracing_log::LogTracer::new()) {
        Ok(logger) => {
            let Ok(mut fd) = readable_fd(logger) else {
                warn!("eBPF log reader could not be registered");
                return;
            };
            tokio::spawn(async move {
                loop {
                    let Ok(mut guard) = fd.readable_mut().await else {
                        return;
                    };
                    guard.get_inner_mut().flush();
                    guard.clear_ready();
                }
            });
        }
        Err(e) => debug!(error = %e, "eBPF logger not started"),
    }
}

/// Registers a file descriptor this module owns (netlink socket, ring buffer, log buffer) with
/// the tokio reactor for readability.
pub(crate) fn readable_fd<T: std::os::fd::AsRawFd>(
    inner: T,
) -> std::io::Result<tokio::io::unix::AsyncFd<T>> {
    // SAFETY: every caller passes an owned object whose fd stays open, and the same, for as long
    // as the AsyncFd lives (it owns the object).
    unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(inner, tokio::io::Interest::READABLE)
    }
    .map_err(|e| e.into_parts().1)
}
