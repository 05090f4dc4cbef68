//! The node's own addresses, read from the agent's network namespace: connections from these are
//! the node talking to its pods (kubelet probes, hostNetwork pods). STRICT judges them like any
//! client (ambient mode aside), so the report names them as the node.
use std::net::IpAddr;

use ipnet::IpNet;

/// Every address configured on an interface of this network namespace, loopback excluded.
pub fn local_addresses() -> std::io::Result<Vec<IpNet>> {
    let mut out = Vec::new();
    let mut ifap: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills a linked list we free with freeifaddrs; we only read sockaddrs of
    // the family they claim.
    unsafe {
        if libc::getifaddrs(&mut ifap) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let mut cur = ifap;
        while !cur.is_null() {
            let addr = (*cur).ifa_addr;
            if !addr.is_null() {
                let ip = match (*addr).sa_family as i32 {
                    libc::AF_INET => {
                        let sin = &*(addr as *const libc::sockaddr_in);
                        Some(IpAddr::from(
                            u32::from_be(sin.sin_addr.s_addr).to_be_bytes(),
                        ))
                    }
                    libc::AF_INET6 => {
                        let sin6 = &*(addr as *const libc::sockaddr_in6);
                        Some(IpAddr::from(sin6.sin6_addr.s6_addr))
                    }
                    _ => None,
                };
                if let Some(ip) = ip.filter(|ip| !ip.is_loopback()) {
                    out.push(IpNet::from(ip));
                }
            }
            cur = (*cur).ifa_next;
        }
        libc::freeifaddrs(ifap);
    }
    out.sort();
    out.dedup();
    Ok(out)
}
