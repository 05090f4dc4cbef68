//! `no-bpf-links CMD [ARGS...]`: runs CMD under a seccomp filter that fails every
//! `bpf(BPF_LINK_CREATE, ...)` with EINVAL, which is what a kernel without TCX (before 6.6)
//! answers for a TCX attach type. Lets the tests prove, on this kernel, that `--tc-mode auto`
//! falls back to clsact. Everything else (loading programs, maps, netlink) is untouched.
use std::{os::unix::process::CommandExt, process::Command};

/// `BPF_LINK_CREATE` (enum bpf_cmd).
const BPF_LINK_CREATE: u32 = 28;
#[cfg(target_arch = "x86_64")]
const AUDIT_ARCH: u32 = 0xc000_003e;
#[cfg(target_arch = "aarch64")]
const AUDIT_ARCH: u32 = 0xc000_00b7;
const SECCOMP_RET_ALLOW: u32 = 0x7fff_0000;
const SECCOMP_RET_ERRNO: u32 = 0x0005_0000;
/// Offsets in `struct seccomp_data`.
const NR: u32 = 0;
const ARCH: u32 = 4;
const ARG0_LOW: u32 = 16;

fn stmt(code: u16, k: u32) -> libc::sock_filter {
    libc::sock_filter {
        code,
        jt: 0,
        jf: 0,
        k,
    }
}

fn jump(code: u16, k: u32, jt: u8, jf: u8) -> libc::sock_filter {
    libc::sock_filter { code, jt, jf, k }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some((cmd, rest)) = args.split_first() else {
        eprintln!("usage: no-bpf-links CMD [ARGS...]");
        std::process::exit(2);
    };
    let ld = (libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16;
    let jeq = (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16;
    let ret = (libc::BPF_RET | libc::BPF_K) as u16;
    let filter = [
        stmt(ld, ARCH),
        jump(jeq, AUDIT_ARCH, 1, 0),
        stmt(ret, SECCOMP_RET_ALLOW),
        stmt(ld, NR),
        jump(jeq, libc::SYS_bpf as u32, 0, 3),
        stmt(ld, ARG0_LOW),
        jump(jeq, BPF_LINK_CREATE, 0, 1),
        stmt(ret, SECCOMP_RET_ERRNO | libc::EINVAL as u32),
        stmt(ret, SECCOMP_RET_ALLOW),
    ];
    let prog = libc::sock_fprog {
        len: filter.len() as u16,
        filter: filter.as_ptr() as *mut libc::sock_filter,
    };
    // SAFETY: prctl with a filter program that outlives the call; exec follows.
    unsafe {
        if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0
            || libc::prctl(
                libc::PR_SET_SECCOMP,
                libc::SECCOMP_MODE_FILTER,
                &prog as *const libc::sock_fprog,
            ) != 0
        {
            eprintln!(
                "no-bpf-links: installing the seccomp filter failed: {}",
                std::io::Error::last_os_error()
            );
            std::process::exit(1);
        }
    }
    let err = Command::new(cmd).args(rest).exec();
    eprintln!("no-bpf-links: cannot run {cmd}: {err}");
    std::process::exit(1);
}
