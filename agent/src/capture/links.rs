//! The node's network interfaces as rtnetlink describes them: name, index, link kind and
//! whether the link's peer lives in another network namespace.
//!
//! Why rtnetlink and not sysfs: what makes an interface a pod's is not its name (OVN-Kubernetes
//! names host veths after the container id, Antrea and Kube-OVN have their own schemes) but what
//! it is: a veth or netkit device whose other end is in another network namespace. Only
//! rtnetlink says that (`IFLA_LINKINFO`'s kind, and `IFLA_LINK_NETNSID`, which the kernel adds
//! exactly when the peer's namespace differs from the device's). One dump request per rescan.
use std::io;

use super::tcnl::{Socket, attrs, c_string};

const IFINFOMSG: usize = 16;
const IFLA_IFNAME: u16 = 3;
const IFLA_LINK: u16 = 5;
const IFLA_LINKINFO: u16 = 18;
const IFLA_INFO_KIND: u16 = 1;
const IFLA_LINK_NETNSID: u16 = 37;
/// `ARPHRD_ETHER`: frames start with an Ethernet header, as the TC programs expect.
const ARPHRD_ETHER: u16 = 1;

/// A network interface present on the node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Interface {
    pub name: String,
    pub ifindex: u32,
    /// The link kind (`veth`, `netkit`, `bridge`, `vxlan`, ...); `None` for physical devices.
    pub kind: Option<String>,
    /// The link's peer (veth, netkit) lives in another network namespace.
    pub peer_elsewhere: bool,
    /// The peer's ifindex (`IFLA_LINK`), in the peer's namespace.
    pub peer_ifindex: Option<u32>,
    /// The id this namespace gave the peer's namespace (`IFLA_LINK_NETNSID`).
    pub peer_netnsid: Option<i32>,
    /// Frames carry an Ethernet header (`ARPHRD_ETHER`); netkit in L3 mode does not.
    pub ethernet: bool,
}

impl Interface {
    /// The host side of a pod's network: a veth or netkit whose peer is in another network
    /// namespace. Never an uplink, a bridge, a tunnel, or a veth pair with both ends here
    /// (hostNetwork plumbing).
    pub fn pod_facing(&self) -> bool {
        self.peer_elsewhere && matches!(self.kind.as_deref(), Some("veth" | "netkit"))
    }
}

/// Lists the interfaces of this network namespace (an `RTM_GETLINK` dump).
pub fn list_interfaces() -> io::Result<Vec<Interface>> {
    let sock = Socket::open()?;
    let mut req = Vec::with_capacity(16 + IFINFOMSG);
    req.extend(((16 + IFINFOMSG) as u32).to_ne_bytes());
    req.extend(libc::RTM_GETLINK.to_ne_bytes());
    req.extend(((libc::NLM_F_REQUEST | libc::NLM_F_DUMP) as u16).to_ne_bytes());
    req.extend(1u32.to_ne_bytes()); // seq
    req.extend(0u32.to_ne_bytes()); // pid
    req.extend([0u8; IFINFOMSG]); // AF_UNSPEC, every interface
    sock.send(&req)?;
    let mut out = Vec::new();
    sock.recv_until_done(|ty, payload| {
        if ty == libc::RTM_NEWLINK
            && let Some(i) = parse_link(payload)
        {
            out.push(i);
        }
    })?;
    Ok(out)
}

/// Parses one RTM_NEWLINK payload (ifinfomsg + attributes).
fn parse_link(payload: &[u8]) -> Option<Interface> {
    let hdr = payload.get(..IFINFOMSG)?;
    let ty = u16::from_ne_bytes(hdr[2..4].try_into().ok()?);
    let ifindex = i32::from_ne_bytes(hdr[4..8].try_into().ok()?);
    let mut iface = Interface {
        name: String::new(),
        ifindex: u32::try_from(ifindex).ok()?,
        kind: None,
        peer_elsewhere: false,
        peer_ifindex: None,
        peer_netnsid: None,
        ethernet: ty == ARPHRD_ETHER,
    };
    for (ty, data) in attrs(&payload[IFINFOMSG..]) {
        match ty {
            IFLA_IFNAME => iface.name = c_string(data),
            IFLA_LINK_NETNSID => {
                iface.peer_elsewhere = true;
                iface.peer_netnsid = data
                    .get(..4)
                    .map(|b| i32::from_ne_bytes(b.try_into().expect("4 bytes")));
            }
            IFLA_LINK if data.len() >= 4 => {
                iface.peer_ifindex =
                    Some(u32::from_ne_bytes(data[..4].try_into().expect("4 bytes")))
                        .filter(|&i| i != 0);
            }
            IFLA_LINKINFO => {
                for (ty, data) in attrs(data) {
                    if ty == IFLA_INFO_KIND {
                        iface.kind = Some(c_string(data));
                    }
                }
            }
            _ => {}
        }
    }
    (!iface.name.is_empty()).then_some(iface)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::capture::tcnl::tests::attr;

    fn link(ty: u16, index: i32, attrs: &[Vec<u8>]) -> Vec<u8> {
        let mut p = vec![0u8, 0];
        p.extend(ty.to_ne_bytes());
        p.extend(index.to_ne_bytes());
        p.extend([0u8; 8]);
        for a in attrs {
            p.extend(a);
        }
        p
    }

    #[test]
    fn a_veth_with_its_peer_elsewhere_is_pod_facing() {
        let p = link(
            ARPHRD_ETHER,
            7,
            &[
                attr(IFLA_IFNAME, b"3f2a9c1b0d4e5f6\0"),
                attr(IFLA_LINKINFO, &attr(IFLA_INFO_KIND, b"veth\0")),
                attr(IFLA_LINK_NETNSID, &3i32.to_ne_bytes()),
                attr(IFLA_LINK, &2u32.to_ne_bytes()),
            ],
        );
        let i = parse_link(&p).unwrap();
        assert_eq!(i.name, "3f2a9c1b0d4e5f6");
        assert_eq!(i.ifindex, 7);
        assert!(i.ethernet);
        assert!(i.pod_facing());
        assert_eq!(i.peer_netnsid, Some(3));
        assert_eq!(i.peer_ifindex, Some(2));
    }

    #[test]
    fn bridges_uplinks_and_local_veth_pairs_are_not() {
        let local_veth = link(
            ARPHRD_ETHER,
            8,
            &[
                attr(IFLA_IFNAME, b"hostveth\0"),
                attr(IFLA_LINKINFO, &attr(IFLA_INFO_KIND, b"veth\0")),
            ],
        );
        let bridge = link(
            ARPHRD_ETHER,
            9,
            &[
                attr(IFLA_IFNAME, b"br0\0"),
                attr(IFLA_LINKINFO, &attr(IFLA_INFO_KIND, b"bridge\0")),
            ],
        );
        let uplink = link(ARPHRD_ETHER, 2, &[attr(IFLA_IFNAME, b"eth0\0")]);
        // A VXLAN device in another netns than its underlay also has IFLA_LINK_NETNSID.
        let tunnel = link(
            ARPHRD_ETHER,
            10,
            &[
                attr(IFLA_IFNAME, b"vxlan0\0"),
                attr(IFLA_LINKINFO, &attr(IFLA_INFO_KIND, b"vxlan\0")),
                attr(IFLA_LINK_NETNSID, &0i32.to_ne_bytes()),
            ],
        );
        for p in [local_veth, bridge, uplink, tunnel] {
            let i = parse_link(&p).unwrap();
            assert!(!i.pod_facing(), "{i:?}");
        }
        assert_eq!(parse_link(&[0; 4]), None);
    }

    #[test]
    fn lists_loopback() {
        let all = list_interfaces().unwrap();
        let lo = all.iter().find(|i| i.name == "lo").expect("lo");
        assert_eq!(lo.ifindex, 1);
        assert!(!lo.pod_facing());
    }
}
