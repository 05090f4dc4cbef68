//! Link notifications from the kernel (rtnetlink, RTMGRP_LINK): a wake-up whenever an interface
//! appears, disappears or changes, so new pod veths are attached within a second. The messages
//! themselves are not parsed — the caller rescans sysfs, which is simpler and cannot drift — so a
//! raw socket is all this needs (no rtnetlink crate).
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use tokio::io::unix::AsyncFd;

pub struct LinkWatch {
    fd: AsyncFd<OwnedFd>,
}

impl LinkWatch {
    pub fn new() -> std::io::Result<Self> {
        // SAFETY: plain socket(2)/bind(2) calls with checked return values.
        unsafe {
            let fd = libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                libc::NETLINK_ROUTE,
            );
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            let fd = OwnedFd::from_raw_fd(fd);
            let mut addr: libc::sockaddr_nl = std::mem::zeroed();
            addr.nl_family = libc::AF_NETLINK as u16;
            addr.nl_groups =
                (libc::RTMGRP_LINK | libc::RTMGRP_IPV4_IFADDR | libc::RTMGRP_IPV6_IFADDR) as u32;
            let rc = libc::bind(
                fd.as_raw_fd(),
                (&addr as *const libc::sockaddr_nl).cast(),
                std::mem::size_of::<libc::sockaddr_nl>() as u32,
            );
            if rc < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(Self {
                fd: super::readable_fd(fd)?,
            })
        }
    }

    /// Waits until at least one link or address notification arrived, then drains the socket.
    pub async fn changed(&mut self) -> std::io::Result<()> {
        loop {
            let mut guard = self.fd.readable().await?;
            let mut got = false;
            loop {
                match drain_one(guard.get_inner().as_raw_fd()) {
                    Ok(true) => got = true,
                    Ok(false) => break,
                    // ENOBUFS: we missed notifications; a rescan covers it.
                    Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => got = true,
                    Err(e) => return Err(e),
                }
            }
            guard.clear_ready();
            if got {
                return Ok(());
            }
        }
    }
}

/// Reads one datagram; `Ok(false)` when none is pending.
fn drain_one(fd: RawFd) -> std::io::Result<bool> {
    let mut buf = [0u8; 16384];
    // SAFETY: reading into a stack buffer of the given length.
    let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT) };
    if n < 0 {
        let e = std::io::Error::last_os_error();
        if e.kind() == std::io::ErrorKind::WouldBlock {
            return Ok(false);
        }
        return Err(e);
    }
    Ok(true)
}
