//! The few rtnetlink traffic-control requests the clsact path needs beyond what aya exposes:
//! list the filters on a clsact hook with their BPF program ids, delete one filter, delete the
//! clsact qdisc.
//!
//! Why by hand: aya 0.14 can only find filters by *name* (`qdisc_detach_program`), and the
//! reaper (see `reaper.rs`) must remove exactly the filters of one agent process, by program
//! id, never those of a newer agent with the same names. The agent also used to shell out to
//! `tc` to delete its qdisc, and the distroless image has no `tc`. Three fixed-layout requests
//! are smaller than a netlink crate and its tc attribute model.
use std::{
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
};

const NLMSG_HDR: usize = 16;
const TCMSG: usize = 20;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const TCA_KIND: u16 = 1;
const TCA_OPTIONS: u16 = 2;
const TCA_BPF_NAME: u16 = 7;
const TCA_BPF_ID: u16 = 11;
const NLA_TYPE_MASK: u16 = 0x3fff;
/// `TC_H_CLSACT` (== `TC_H_INGRESS`): the clsact qdisc's parent.
const TC_H_CLSACT: u32 = 0xffff_fff1;
/// `TC_H_MAKE(TC_H_CLSACT, 0)`: the clsact qdisc's handle.
const CLSACT_HANDLE: u32 = 0xffff_0000;

/// Which clsact hook.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hook {
    Ingress,
    Egress,
}

impl Hook {
    /// `TC_H_MAKE(TC_H_CLSACT, TC_H_MIN_INGRESS / TC_H_MIN_EGRESS)`.
    fn parent(self) -> u32 {
        match self {
            Hook::Ingress => 0xffff_fff2,
            Hook::Egress => 0xffff_fff3,
        }
    }
}

/// One filter on a clsact hook, as the kernel dumps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Filter {
    /// `tcm_info`: priority in the upper 16 bits, protocol (network order) in the lower.
    info: u32,
    handle: u32,
    pub kind: String,
    /// Set for `bpf` filters with an eBPF program.
    pub bpf_id: Option<u32>,
    pub bpf_name: Option<String>,
}

impl Filter {
    /// The filter's priority (lower runs first).
    pub fn priority(&self) -> u16 {
        (self.info >> 16) as u16
    }
}

/// A blocking NETLINK_ROUTE socket with a receive timeout, so a request never hangs.
pub(super) struct Socket(OwnedFd);

impl Socket {
    pub(super) fn open() -> io::Result<Self> {
        // SAFETY: socket(2)/setsockopt(2) with checked results; the fd is owned right away.
        unsafe {
            let fd = libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::NETLINK_ROUTE,
            );
            if fd < 0 {
                return Err(io::Error::last_os_error());
            }
            let fd = OwnedFd::from_raw_fd(fd);
            let tv = libc::timeval {
                tv_sec: 2,
                tv_usec: 0,
            };
            if libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&tv as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as u32,
            ) < 0
            {
                return Err(io::Error::last_os_error());
            }
            Ok(Self(fd))
        }
    }

    pub(super) fn send(&self, msg: &[u8]) -> io::Result<()> {
        // SAFETY: sending a byte buffer of the given length to the kernel (nl_pid 0).
        let n = unsafe {
            let mut addr: libc::sockaddr_nl = std::mem::zeroed();
            addr.nl_family = libc::AF_NETLINK as u16;
            libc::sendto(
                self.0.as_raw_fd(),
                msg.as_ptr().cast(),
                msg.len(),
                0,
                (&addr as *const libc::sockaddr_nl).cast(),
                std::mem::size_of::<libc::sockaddr_nl>() as u32,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Receives one datagram (the reply to a request that is not a dump) and hands its messages
    /// to `each`; an `NLMSG_ERROR` with a code is that error.
    pub(super) fn recv_one(&self, each: impl FnMut(u16, &[u8])) -> io::Result<()> {
        let mut buf = vec![0u8; 8192];
        let n = self.recv(&mut buf)?;
        messages(&buf[..n], each).map(|_| ())
    }

    /// Receives messages until `NLMSG_DONE` or an `NLMSG_ERROR` (an ack when its code is 0),
    /// handing every other message's (type, payload) to `each`.
    pub(super) fn recv_until_done(&self, mut each: impl FnMut(u16, &[u8])) -> io::Result<()> {
        let mut buf = vec![0u8; 65536];
        loop {
            let n = self.recv(&mut buf)?;
            if messages(&buf[..n], &mut each)? {
                return Ok(());
            }
        }
    }

    fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: receiving into a buffer of the given length.
        let n = unsafe { libc::recv(self.0.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }
}

/// Hands the (type, payload) of each message in one datagram to `each`, up to `NLMSG_DONE` or
/// an `NLMSG_ERROR` (an ack when its code is 0, else that error): true when one of those ended it.
fn messages(mut msgs: &[u8], mut each: impl FnMut(u16, &[u8])) -> io::Result<bool> {
    while msgs.len() >= NLMSG_HDR {
        let len = u32::from_ne_bytes(msgs[0..4].try_into().expect("4 bytes")) as usize;
        let ty = u16::from_ne_bytes(msgs[4..6].try_into().expect("2 bytes"));
        if len < NLMSG_HDR || len > msgs.len() {
            return Err(io::Error::other("truncated netlink message"));
        }
        let payload = &msgs[NLMSG_HDR..len];
        match ty {
            NLMSG_DONE => return Ok(true),
            NLMSG_ERROR => {
                let code = payload
                    .get(0..4)
                    .map(|b| i32::from_ne_bytes(b.try_into().expect("4 bytes")))
                    .ok_or_else(|| io::Error::other("short netlink error"))?;
                return if code == 0 {
                    Ok(true)
                } else {
                    Err(io::Error::from_raw_os_error(-code))
                };
            }
            _ => each(ty, payload),
        }
        msgs = &msgs[align4(len).min(msgs.len())..];
    }
    Ok(false)
}

fn align4(n: usize) -> usize {
    (n + 3) & !3
}

/// A request: netlink header (length filled in) plus a tcmsg.
fn request(ty: u16, flags: u16, ifindex: u32, handle: u32, parent: u32, info: u32) -> Vec<u8> {
    let mut m = Vec::with_capacity(NLMSG_HDR + TCMSG);
    m.extend(((NLMSG_HDR + TCMSG) as u32).to_ne_bytes());
    m.extend(ty.to_ne_bytes());
    m.extend((flags | libc::NLM_F_REQUEST as u16).to_ne_bytes());
    m.extend(1u32.to_ne_bytes()); // seq
    m.extend(0u32.to_ne_bytes()); // pid
    m.extend([libc::AF_UNSPEC as u8, 0, 0, 0]);
    m.extend((ifindex as i32).to_ne_bytes());
    m.extend(handle.to_ne_bytes());
    m.extend(parent.to_ne_bytes());
    m.extend(info.to_ne_bytes());
    m
}

/// Iterates the (type, payload) of the netlink attributes in `buf`; stops at a malformed one.
pub(super) fn attrs(mut buf: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    std::iter::from_fn(move || {
        if buf.len() < 4 {
            return None;
        }
        let len = u16::from_ne_bytes([buf[0], buf[1]]) as usize;
        let ty = u16::from_ne_bytes([buf[2], buf[3]]) & NLA_TYPE_MASK;
        if len < 4 || len > buf.len() {
            return None;
        }
        let data = &buf[4..len];
        buf = &buf[align4(len).min(buf.len())..];
        Some((ty, data))
    })
}

pub(super) fn c_string(data: &[u8]) -> String {
    let end = data.iter().position(|&b| b == 0).unwrap_or(data.len());
    String::from_utf8_lossy(&data[..end]).into_owned()
}

/// Parses one RTM_NEWTFILTER payload (tcmsg + attributes).
fn parse_filter(payload: &[u8]) -> Option<Filter> {
    let tc = payload.get(..TCMSG)?;
    let handle = u32::from_ne_bytes(tc[8..12].try_into().ok()?);
    let info = u32::from_ne_bytes(tc[16..20].try_into().ok()?);
    let mut f = Filter {
        info,
        handle,
        kind: String::new(),
        bpf_id: None,
        bpf_name: None,
    };
    for (ty, data) in attrs(&payload[TCMSG..]) {
        match ty {
            TCA_KIND => f.kind = c_string(data),
            TCA_OPTIONS => {
                for (ty, data) in attrs(data) {
                    match ty {
                        TCA_BPF_ID if data.len() >= 4 => {
                            f.bpf_id = Some(u32::from_ne_bytes(data[..4].try_into().ok()?));
                        }
                        TCA_BPF_NAME => f.bpf_name = Some(c_string(data)),
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    // The dump also lists each priority's filter chain head, without a handle: not a filter.
    (f.handle != 0).then_some(f)
}

/// The filters on one clsact hook of an interface. An interface without a clsact qdisc has none
/// (the kernel answers EINVAL/ENOENT, reported here as an empty list).
pub fn filters(ifindex: u32, hook: Hook) -> io::Result<Vec<Filter>> {
    let sock = Socket::open()?;
    sock.send(&request(
        libc::RTM_GETTFILTER,
        libc::NLM_F_DUMP as u16,
        ifindex,
        0,
        hook.parent(),
        0,
    ))?;
    let mut out = Vec::new();
    match sock.recv_until_done(|ty, payload| {
        if ty == libc::RTM_NEWTFILTER
            && let Some(f) = parse_filter(payload)
        {
            out.push(f);
        }
    }) {
        Ok(()) => Ok(out),
        Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL | libc::ENOENT)) => Ok(Vec::new()),
        Err(e) => Err(e),
    }
}

/// Deletes one filter found by [`filters`].
pub fn delete_filter(ifindex: u32, hook: Hook, f: &Filter) -> io::Result<()> {
    let sock = Socket::open()?;
    sock.send(&request(
        libc::RTM_DELTFILTER,
        libc::NLM_F_ACK as u16,
        ifindex,
        f.handle,
        hook.parent(),
        f.info,
    ))?;
    sock.recv_until_done(|_, _| {})
}

/// Deletes the interface's clsact qdisc (and with it any filter still on it).
pub fn delete_clsact(ifindex: u32) -> io::Result<()> {
    let sock = Socket::open()?;
    sock.send(&request(
        libc::RTM_DELQDISC,
        libc::NLM_F_ACK as u16,
        ifindex,
        CLSACT_HANDLE,
        TC_H_CLSACT,
        0,
    ))?;
    sock.recv_until_done(|_, _| {})
}

/// Deletes the clsact qdisc only if neither hook has a filter left: a qdisc we created may have
/// gained other products' filters since, and deleting it would take those with it.
pub fn delete_clsact_if_empty(ifindex: u32) -> io::Result<bool> {
    if !filters(ifindex, Hook::Ingress)?.is_empty() || !filters(ifindex, Hook::Egress)?.is_empty() {
        return Ok(false);
    }
    delete_clsact(ifindex)?;
    Ok(true)
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    /// One netlink attribute, padded (for building test messages).
    pub(in crate::capture) fn attr(ty: u16, data: &[u8]) -> Vec<u8> {
        let mut a = Vec::new();
        a.extend(((4 + data.len()) as u16).to_ne_bytes());
        a.extend(ty.to_ne_bytes());
        a.extend(data);
        a.resize(align4(a.len()), 0);
        a
    }

    #[test]
    fn parses_a_bpf_filter_dump() {
        let mut p =
            request(0, 0, 7, 0x1, 0xffff_fff2, (49152 << 16) | 0x0300)[NLMSG_HDR..].to_vec();
        p.extend(attr(TCA_KIND, b"bpf\0"));
        let mut opts = attr(TCA_BPF_NAME, b"mtls_ingress\0");
        opts.extend(attr(TCA_BPF_ID, &42u32.to_ne_bytes()));
        p.extend(attr(TCA_OPTIONS, &opts));
        let f = parse_filter(&p).unwrap();
        assert_eq!(f.kind, "bpf");
        assert_eq!(f.bpf_id, Some(42));
        assert_eq!(f.bpf_name.as_deref(), Some("mtls_ingress"));
        assert_eq!(f.handle, 1);
        assert_eq!(f.info >> 16, 49152);
    }

    #[test]
    fn chain_heads_and_garbage_are_not_filters() {
        let mut p = request(0, 0, 7, 0, 0xffff_fff2, 0)[NLMSG_HDR..].to_vec();
        p.extend(attr(TCA_KIND, b"bpf\0"));
        assert_eq!(parse_filter(&p), None, "handle 0: the chain head");
        assert_eq!(parse_filter(&[1, 2, 3]), None);
        // A lying attribute length ends attribute parsing instead of reading past the end.
        let mut p = request(0, 0, 7, 5, 0xffff_fff2, 0)[NLMSG_HDR..].to_vec();
        p.extend([200, 0, 1, 0, b'b']);
        let f = parse_filter(&p).unwrap();
        assert_eq!(f.kind, "");
    }
}
