//! Raw kernel requests the test bed needs beyond what Debian's tools do: netkit pairs (iproute2
//! 6.1 predates netkit) and a Cilium-like redirector, a TC program that hands each packet from a
//! pod straight to another pod (`bpf_redirect_peer`, or `bpf_redirect`) and ends it with
//! `TC_ACT_REDIRECT`, so that programs after it never see it.
//!
//! Everything runs on a short-lived thread that entered the test bed's node namespace (`setns`
//! changes only the calling thread's namespace), so nothing touches the machine's own
//! interfaces. TCX links and program fds are held by this process; they go when the
//! [`Redirector`] is dropped (or with the namespace).
use std::{
    ffi::CString,
    net::IpAddr,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
};

use anyhow::{Context as _, Result, bail, ensure};

const NLA_F_NESTED: u16 = 0x8000;
const IFLA_IFNAME: u16 = 3;
const IFLA_LINKINFO: u16 = 18;
const IFLA_INFO_KIND: u16 = 1;
const IFLA_INFO_DATA: u16 = 2;
const IFLA_NET_NS_FD: u16 = 28;
const IFLA_NETKIT_PEER_INFO: u16 = 1;
const IFLA_NETKIT_MODE: u16 = 5;
const TCA_KIND: u16 = 1;
const TCA_OPTIONS: u16 = 2;
const TCA_BPF_FD: u16 = 6;
const TCA_BPF_NAME: u16 = 7;
const TCA_BPF_FLAGS: u16 = 8;
const TCA_BPF_FLAG_ACT_DIRECT: u32 = 1;
/// `TC_H_MAKE(TC_H_CLSACT, TC_H_MIN_INGRESS)`.
const CLSACT_INGRESS: u32 = 0xffff_fff2;
const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_PROG_TYPE_SCHED_CLS: u32 = 3;
const BPF_TCX_INGRESS: u32 = 46;
const HELPER_REDIRECT: i32 = 23;
const HELPER_REDIRECT_PEER: i32 = 155;

/// Runs `f` on a thread inside the named network namespace (`/run/netns/NAME`).
pub fn in_netns<T: Send>(ns: &str, f: impl FnOnce() -> Result<T> + Send) -> Result<T> {
    let path = format!("/run/netns/{ns}");
    std::thread::scope(|s| {
        s.spawn(|| {
            let file = std::fs::File::open(&path).with_context(|| format!("opening {path}"))?;
            // SAFETY: setns on this thread only, with an open namespace fd.
            if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                bail!("setns {path}: {}", std::io::Error::last_os_error());
            }
            f()
        })
        .join()
        .map_err(|_| anyhow::anyhow!("netns thread panicked"))?
    })
}

fn attr(ty: u16, data: &[u8]) -> Vec<u8> {
    let mut a = Vec::new();
    a.extend(((4 + data.len()) as u16).to_ne_bytes());
    a.extend(ty.to_ne_bytes());
    a.extend(data);
    a.resize((a.len() + 3) & !3, 0);
    a
}

fn cstr(s: &str) -> Vec<u8> {
    let mut v = s.as_bytes().to_vec();
    v.push(0);
    v
}

/// Sends one request (header added here) on a fresh NETLINK_ROUTE socket of the current
/// thread's namespace and waits for its ack.
fn netlink_request(ty: u16, flags: u16, body: &[u8]) -> Result<()> {
    // SAFETY: plain socket calls with checked results; buffers outlive the calls.
    unsafe {
        let fd = libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::NETLINK_ROUTE,
        );
        ensure!(
            fd >= 0,
            "netlink socket: {}",
            std::io::Error::last_os_error()
        );
        let fd = OwnedFd::from_raw_fd(fd);
        let mut msg = Vec::new();
        msg.extend(((16 + body.len()) as u32).to_ne_bytes());
        msg.extend(ty.to_ne_bytes());
        msg.extend((flags | (libc::NLM_F_REQUEST | libc::NLM_F_ACK) as u16).to_ne_bytes());
        msg.extend(1u32.to_ne_bytes());
        msg.extend(0u32.to_ne_bytes());
        msg.extend(body);
        let mut addr: libc::sockaddr_nl = std::mem::zeroed();
        addr.nl_family = libc::AF_NETLINK as u16;
        let n = libc::sendto(
            fd.as_raw_fd(),
            msg.as_ptr().cast(),
            msg.len(),
            0,
            (&addr as *const libc::sockaddr_nl).cast(),
            std::mem::size_of::<libc::sockaddr_nl>() as u32,
        );
        ensure!(n >= 0, "netlink send: {}", std::io::Error::last_os_error());
        let mut buf = [0u8; 8192];
        let n = libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0);
        ensure!(n >= 20, "netlink recv: {}", std::io::Error::last_os_error());
        let code = i32::from_ne_bytes(buf[16..20].try_into().expect("4 bytes"));
        ensure!(
            code == 0,
            "netlink: {}",
            std::io::Error::from_raw_os_error(-code)
        );
    }
    Ok(())
}

fn ifinfomsg() -> Vec<u8> {
    vec![0u8; 16]
}

/// Creates a netkit pair in the current thread's namespace: `host` here, `eth0` in the
/// namespace of `peer_ns_fd`. `l2`: Ethernet headers (netkit's L2 mode), else L3 (the default).
fn netkit_add_here(host: &str, peer_ns: &std::fs::File, l2: bool) -> Result<()> {
    let mut peer = ifinfomsg();
    peer.extend(attr(IFLA_IFNAME, &cstr("eth0")));
    peer.extend(attr(
        IFLA_NET_NS_FD,
        &(peer_ns.as_raw_fd() as u32).to_ne_bytes(),
    ));
    let mut data = attr(IFLA_NETKIT_PEER_INFO, &peer);
    data.extend(attr(IFLA_NETKIT_MODE, &u32::from(l2).to_ne_bytes()));
    let mut info = attr(IFLA_INFO_KIND, &cstr("netkit"));
    info.extend(attr(IFLA_INFO_DATA | NLA_F_NESTED, &data));
    let mut body = ifinfomsg();
    body.extend(attr(IFLA_IFNAME, &cstr(host)));
    body.extend(attr(IFLA_LINKINFO | NLA_F_NESTED, &info));
    netlink_request(
        libc::RTM_NEWLINK,
        (libc::NLM_F_CREATE | libc::NLM_F_EXCL) as u16,
        &body,
    )
    .with_context(|| {
        format!("creating netkit {host} (EOPNOTSUPP: the kernel was built without CONFIG_NETKIT)")
    })
}

/// Creates a netkit pair: `host` in `node_ns`, `eth0` in `pod_ns`.
pub fn netkit_add(node_ns: &str, host: &str, pod_ns: &str, l2: bool) -> Result<()> {
    let pod = std::fs::File::open(format!("/run/netns/{pod_ns}"))
        .with_context(|| format!("opening netns {pod_ns}"))?;
    in_netns(node_ns, || netkit_add_here(host, &pod, l2))
}

fn ifindex(name: &str) -> Result<u32> {
    let c = CString::new(name)?;
    // SAFETY: a valid C string.
    let i = unsafe { libc::if_nametoindex(c.as_ptr()) };
    ensure!(i != 0, "no interface {name}");
    Ok(i)
}

fn bpf(cmd: libc::c_long, attr: &mut [u8; 128]) -> Result<OwnedFd> {
    // SAFETY: the bpf syscall with an attribute buffer of the size given.
    let fd = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), attr.len()) };
    ensure!(fd >= 0, "bpf({cmd}): {}", std::io::Error::last_os_error());
    // SAFETY: the syscall returned a new fd.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// How the redirector hands packets on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Redirect {
    /// `bpf_redirect_peer`: straight into the target veth's peer (the other pod), skipping the
    /// host side's egress, as Cilium does with BPF host routing.
    Peer,
    /// `bpf_redirect`: out of the target (host-side) interface.
    Plain,
}

impl Redirect {
    /// The program's name as the kernel reports it.
    pub fn prog_name(self) -> &'static str {
        match self {
            Redirect::Peer => "redir_peer",
            Redirect::Plain => "redir_plain",
        }
    }
}

fn insn(code: u8, regs: u8, off: i16, imm: i32) -> [u8; 8] {
    let mut b = [0u8; 8];
    b[0] = code;
    b[1] = regs;
    b[2..4].copy_from_slice(&off.to_ne_bytes());
    b[4..].copy_from_slice(&imm.to_ne_bytes());
    b
}

impl Redirect {
    fn helper(self) -> i32 {
        match self {
            Redirect::Peer => HELPER_REDIRECT_PEER,
            Redirect::Plain => HELPER_REDIRECT,
        }
    }

    /// `r0 = redirect(target, 0); return r0` (`TC_ACT_REDIRECT`).
    fn call(self, target: u32) -> Vec<[u8; 8]> {
        vec![
            insn(0xb7, 0x01, 0, target as i32), // mov64 r1, target
            insn(0xb7, 0x02, 0, 0),             // mov64 r2, 0
            insn(0x85, 0x00, 0, self.helper()), // call helper
            insn(0x95, 0x00, 0, 0),             // exit
        ]
    }
}

/// Loads `r0 = redirect(target, 0); return r0` (`TC_ACT_REDIRECT`) as a TC program.
fn load_redirect(target: u32, how: Redirect) -> Result<OwnedFd> {
    load_prog(&how.call(target).concat(), how)
}

/// Loads a program that redirects a packet whose destination address is one of `routes`'
/// to that route's interface, and lets every other packet go on (`TC_ACT_UNSPEC`/`TCX_NEXT`),
/// as a CNI's BPF host routing does for local pods. Classic packet loads (`LD_ABS`, network
/// order to host) read the EtherType and the destination; 32-bit compares (`JMP32`) match
/// each word.
fn load_routed(routes: &[(IpAddr, u32)], how: Redirect) -> Result<OwnedFd> {
    const LDABS_H: u8 = 0x28;
    const LDABS_W: u8 = 0x20;
    const JNE32_K: u8 = 0x56;
    let mut prog = vec![insn(0xbf, 0x16, 0, 0)]; // mov64 r6, r1 (LD_ABS reads the skb in r6)
    for (addr, target) in routes {
        let (ethertype, offset, words): (i32, i32, Vec<u32>) = match addr {
            IpAddr::V4(a) => (0x0800, 30, vec![u32::from(*a)]),
            IpAddr::V6(a) => (
                0x86dd,
                38,
                a.octets()
                    .chunks(4)
                    .map(|c| u32::from_be_bytes(c.try_into().expect("4 bytes")))
                    .collect(),
            ),
        };
        let call = how.call(*target);
        // Each test jumps past the rest of this route's block.
        let block = 2 + 2 * words.len() + call.len();
        let mut b = vec![insn(LDABS_H, 0, 0, 12)];
        b.push(insn(JNE32_K, 0, (block - 2) as i16, ethertype));
        for (i, w) in words.iter().enumerate() {
            b.push(insn(LDABS_W, 0, 0, offset + 4 * i as i32));
            b.push(insn(JNE32_K, 0, (block - b.len() - 1) as i16, *w as i32));
        }
        b.extend(call);
        assert_eq!(b.len(), block);
        prog.extend(b);
    }
    prog.push(insn(0xb7, 0x00, 0, -1)); // mov64 r0, TC_ACT_UNSPEC
    prog.push(insn(0x95, 0x00, 0, 0)); // exit
    load_prog(&prog.concat(), how)
}

fn load_prog(prog: &[u8], how: Redirect) -> Result<OwnedFd> {
    let license = cstr("GPL");
    let mut a = [0u8; 128];
    a[0..4].copy_from_slice(&BPF_PROG_TYPE_SCHED_CLS.to_ne_bytes());
    a[4..8].copy_from_slice(&((prog.len() / 8) as u32).to_ne_bytes());
    a[8..16].copy_from_slice(&(prog.as_ptr() as u64).to_ne_bytes());
    a[16..24].copy_from_slice(&(license.as_ptr() as u64).to_ne_bytes());
    let name = how.prog_name().as_bytes();
    a[48..48 + name.len()].copy_from_slice(name);
    bpf(BPF_PROG_LOAD, &mut a).context("loading the redirector program")
}

/// Which program one interface gets.
enum Program<'a> {
    /// Every packet to this interface.
    To(&'a str),
    /// Packets to these addresses to their interface; the rest go on.
    Routed(&'a [(IpAddr, &'a str)]),
}

impl Program<'_> {
    /// Loads it (in the node namespace: interface names are resolved there).
    fn load(&self, how: Redirect) -> Result<OwnedFd> {
        match self {
            Program::To(to) => load_redirect(ifindex(to)?, how),
            Program::Routed(routes) => {
                let routes = routes
                    .iter()
                    .map(|(a, dev)| Ok((*a, ifindex(dev)?)))
                    .collect::<Result<Vec<_>>>()?;
                load_routed(&routes, how)
            }
        }
    }
}

/// The redirector's programs (and TCX links) on the host-side interfaces.
pub struct Redirector {
    _fds: Vec<OwnedFd>,
}

impl Redirector {
    /// Attaches through TCX, on the ingress of each `from` interface of `node_ns`, a program
    /// that redirects every packet to `to`. Attached with default order (last among what is
    /// there now), before the agent starts, as a CNI agent would be.
    pub fn tcx(node_ns: &str, pairs: &[(&str, &str)], how: Redirect) -> Result<Redirector> {
        let progs: Vec<(&str, Program)> = pairs.iter().map(|(f, t)| (*f, Program::To(t))).collect();
        Self::tcx_with(node_ns, &progs, how)
    }

    /// Like [`Redirector::tcx`], but packets are redirected by destination: on the ingress of
    /// each of `from`, a packet to one of `routes`' addresses goes to its interface, others go
    /// on (to the node's stack, e.g. the bridge). Through TCX, or with `clsact_priority` as
    /// direct-action clsact filters at that priority (the qdiscs must exist).
    pub fn routed(
        node_ns: &str,
        from: &[&str],
        routes: &[(IpAddr, &str)],
        how: Redirect,
        clsact_priority: Option<u16>,
    ) -> Result<Redirector> {
        let progs: Vec<(&str, Program)> =
            from.iter().map(|f| (*f, Program::Routed(routes))).collect();
        match clsact_priority {
            None => Self::tcx_with(node_ns, &progs, how),
            Some(p) => Self::clsact_with(node_ns, &progs, how, p),
        }
    }

    fn tcx_with(node_ns: &str, progs: &[(&str, Program)], how: Redirect) -> Result<Redirector> {
        in_netns(node_ns, || {
            let mut fds = Vec::new();
            for (from, p) in progs {
                let prog = p.load(how)?;
                let mut a = [0u8; 128];
                a[0..4].copy_from_slice(&(prog.as_raw_fd() as u32).to_ne_bytes());
                a[4..8].copy_from_slice(&ifindex(from)?.to_ne_bytes());
                a[8..12].copy_from_slice(&BPF_TCX_INGRESS.to_ne_bytes());
                let link =
                    bpf(BPF_LINK_CREATE, &mut a).with_context(|| format!("TCX link on {from}"))?;
                fds.push(prog);
                fds.push(link);
            }
            Ok(Redirector { _fds: fds })
        })
    }

    /// The same as a direct-action filter at `priority` on each `from` interface's clsact
    /// ingress (the qdisc must exist). Filters outlive the process: they go with the namespace.
    pub fn clsact(
        node_ns: &str,
        pairs: &[(&str, &str)],
        how: Redirect,
        priority: u16,
    ) -> Result<Redirector> {
        let progs: Vec<(&str, Program)> = pairs.iter().map(|(f, t)| (*f, Program::To(t))).collect();
        Self::clsact_with(node_ns, &progs, how, priority)
    }

    fn clsact_with(
        node_ns: &str,
        progs: &[(&str, Program)],
        how: Redirect,
        priority: u16,
    ) -> Result<Redirector> {
        in_netns(node_ns, || {
            let mut fds = Vec::new();
            for (from, p) in progs {
                let prog = p.load(how)?;
                let mut body = Vec::new();
                body.extend([libc::AF_UNSPEC as u8, 0, 0, 0]);
                body.extend((ifindex(from)? as i32).to_ne_bytes());
                body.extend(0u32.to_ne_bytes()); // handle: the kernel picks
                body.extend(CLSACT_INGRESS.to_ne_bytes());
                let proto = (libc::ETH_P_ALL as u16).to_be();
                body.extend(((u32::from(priority) << 16) | u32::from(proto)).to_ne_bytes());
                body.extend(attr(TCA_KIND, &cstr("bpf")));
                let mut opts = attr(TCA_BPF_FD, &(prog.as_raw_fd() as u32).to_ne_bytes());
                opts.extend(attr(TCA_BPF_NAME, &cstr(how.prog_name())));
                opts.extend(attr(TCA_BPF_FLAGS, &TCA_BPF_FLAG_ACT_DIRECT.to_ne_bytes()));
                body.extend(attr(TCA_OPTIONS | NLA_F_NESTED, &opts));
                netlink_request(
                    libc::RTM_NEWTFILTER,
                    (libc::NLM_F_CREATE | libc::NLM_F_EXCL) as u16,
                    &body,
                )
                .with_context(|| format!("clsact filter on {from}"))?;
                fds.push(prog);
            }
            Ok(Redirector { _fds: fds })
        })
    }
}
