//! The pod side of a host veth: which network namespace holds the peer, and running code there.
//!
//! Why: with BPF host routing, Cilium hands packets into a pod with `bpf_redirect_peer`, from the
//! client's host-side ingress straight to the server pod's end of its veth; the server's
//! host-side egress hook never runs. The pod side's own TC hooks still do
//! (`bpf_redirect_peer` re-enters the receive path on the peer device), so the agent attaches
//! there when it can reach the pod's namespace (`--attach-side`, see attach.rs).
//!
//! Finding the namespace: the link dump gives the peer's ifindex (`IFLA_LINK`) and the id this
//! namespace gave the peer's namespace (`IFLA_LINK_NETNSID`). Candidate namespaces are the
//! bind mounts in `/var/run/netns` (containerd and CRI-O keep pod namespaces there as `cni-*`)
//! and `/proc/<pid>/ns/net`; `RTM_GETNSID` with a candidate's fd asks the kernel which id it has
//! here (without assigning one). No namespace is held open between calls: a held fd would keep a
//! deleted pod's namespace, and its veth, alive.
use std::{
    collections::{BTreeMap, BTreeSet, HashSet},
    fs::File,
    io,
    os::{fd::AsRawFd, unix::fs::MetadataExt as _},
    path::{Path, PathBuf},
};

use super::tcnl::{Socket, attrs};

const RTM_GETNSID: u16 = 90;
const RTM_NEWNSID: u16 = 88;
const NETNSA_NSID: u16 = 1;
const NETNSA_FD: u16 = 3;

/// Where CNI runtimes bind-mount pod network namespaces.
pub const NETNS_DIR: &str = "/var/run/netns";

/// A network namespace known by a path, and the inode it had when found (a path under /proc
/// can come to name another namespace once its process is gone).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodNs {
    pub path: PathBuf,
    dev: u64,
    ino: u64,
}

impl PodNs {
    /// The namespace at `path` now.
    pub fn at(path: &Path) -> io::Result<Self> {
        let m = std::fs::metadata(path)?;
        Ok(Self {
            path: path.to_owned(),
            dev: m.dev(),
            ino: m.ino(),
        })
    }

    /// Opens the namespace again; `NotFound` when the path now names another one, or none.
    fn open(&self) -> io::Result<File> {
        let f = File::open(&self.path)?;
        let m = f.metadata()?;
        if (m.dev(), m.ino()) != (self.dev, self.ino) {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("{} is another namespace now", self.path.display()),
            ));
        }
        Ok(f)
    }

    /// The id this namespace has here now (`None`: gone, or no id: a cached entry is stale).
    pub fn id_here(&self) -> Option<i32> {
        let sock = Socket::open().ok()?;
        nsid_of(&sock, &self.open().ok()?).ok().flatten()
    }

    /// Whether the path still names the namespace it did when found.
    pub fn present(&self) -> bool {
        self.open().is_ok()
    }

    /// Runs `f` on a short-lived thread that entered this namespace (`setns` changes only the
    /// calling thread's namespace; the thread ends with `f`).
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> io::Result<T> {
        let file = self.open()?;
        std::thread::scope(|s| {
            s.spawn(|| {
                // SAFETY: setns on this thread only, with an open namespace fd.
                if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(f())
            })
            .join()
            .unwrap_or_else(|_| Err(io::Error::other("pod namespace thread panicked")))
        })
    }
}

/// Every namespace reachable from here that has an id in this namespace, by that id.
pub fn scan() -> BTreeMap<i32, PodNs> {
    scan_until(None)
}

/// Like [`scan`], but stops once every id of `wanted` is found (`/var/run/netns` is read
/// first, so on a containerd or CRI-O node `/proc` is not walked at all).
pub fn scan_for(wanted: &BTreeSet<i32>) -> BTreeMap<i32, PodNs> {
    scan_until(Some(wanted))
}

fn scan_until(wanted: Option<&BTreeSet<i32>>) -> BTreeMap<i32, PodNs> {
    let mut out = BTreeMap::new();
    let Ok(sock) = Socket::open() else {
        return out;
    };
    let mut seen = HashSet::new();
    if let Ok(own) = std::fs::metadata("/proc/self/ns/net") {
        seen.insert((own.dev(), own.ino()));
    }
    let mut candidates: Vec<PathBuf> = dir_entries(Path::new(NETNS_DIR));
    candidates.extend(
        dir_entries(Path::new("/proc"))
            .into_iter()
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit()))
            })
            .map(|p| p.join("ns/net")),
    );
    for path in candidates {
        // stat follows the nsfs link without opening it: one open per namespace, not per process.
        let Ok(m) = std::fs::metadata(&path) else {
            continue;
        };
        if !seen.insert((m.dev(), m.ino())) {
            continue;
        }
        let Ok(f) = File::open(&path) else { continue };
        if let Ok(Some(id)) = nsid_of(&sock, &f) {
            out.entry(id).or_insert(PodNs {
                path,
                dev: m.dev(),
                ino: m.ino(),
            });
            if wanted.is_some_and(|w| w.iter().all(|id| out.contains_key(id))) {
                break;
            }
        }
    }
    out
}

fn dir_entries(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .map(|rd| rd.flatten().map(|e| e.path()).collect())
        .unwrap_or_default()
}

/// The id this namespace gave the namespace of `ns` (`None`: none assigned, so no link here
/// points into it).
fn nsid_of(sock: &Socket, ns: &File) -> io::Result<Option<i32>> {
    const HDR: u32 = 16 + 4 + 8; // nlmsghdr + rtgenmsg (padded) + NETNSA_FD attribute
    let mut req = Vec::with_capacity(HDR as usize);
    req.extend(HDR.to_ne_bytes());
    req.extend(RTM_GETNSID.to_ne_bytes());
    req.extend((libc::NLM_F_REQUEST as u16).to_ne_bytes());
    req.extend(1u32.to_ne_bytes()); // seq
    req.extend(0u32.to_ne_bytes()); // pid
    req.extend([libc::AF_UNSPEC as u8, 0, 0, 0]);
    req.extend(8u16.to_ne_bytes());
    req.extend(NETNSA_FD.to_ne_bytes());
    req.extend((ns.as_raw_fd() as u32).to_ne_bytes());
    sock.send(&req)?;
    let mut id = None;
    let mut got = false;
    // The reply is one RTM_NEWNSID message (no DONE follows a non-dump request); an error
    // comes as NLMSG_ERROR, which ends the receive.
    sock.recv_one(|ty, payload| {
        if ty == RTM_NEWNSID {
            got = true;
            for (t, d) in attrs(payload.get(4..).unwrap_or_default()) {
                if t == NETNSA_NSID && d.len() >= 4 {
                    let v = i32::from_ne_bytes(d[..4].try_into().expect("4 bytes"));
                    id = (v >= 0).then_some(v);
                }
            }
        }
    })?;
    if !got {
        return Err(io::Error::other("no RTM_NEWNSID reply"));
    }
    Ok(id)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::capture::links::list_interfaces;

    /// Two namespaces of its own (needs root): a "node" holding the host side of a veth whose
    /// peer is in a "pod". From inside the node, the link dump names the pod's namespace by id,
    /// and the scan finds that namespace under /var/run/netns; entering it finds the peer.
    #[test]
    fn the_pod_end_of_a_veth_is_found_through_its_namespace() {
        struct Netns(&'static str);
        impl Drop for Netns {
            fn drop(&mut self) {
                let _ = std::process::Command::new("ip")
                    .args(["netns", "del", self.0])
                    .status();
            }
        }
        let ip = |args: &[&str]| {
            let st = std::process::Command::new("ip")
                .args(args)
                .status()
                .unwrap();
            assert!(st.success(), "ip {args:?}");
        };
        let (node, pod) = (Netns("mtpodns-node"), Netns("mtpodns-pod"));
        for n in [node.0, pod.0] {
            let _ = std::process::Command::new("ip")
                .args(["netns", "del", n])
                .status();
            ip(&["netns", "add", n]);
        }
        ip(&[
            "-n", node.0, "link", "add", "hpod0", "type", "veth", "peer", "name", "eth7", "netns",
            pod.0,
        ]);
        let node_ns = PodNs::at(&Path::new(NETNS_DIR).join(node.0)).unwrap();
        let (iface, found) = node_ns
            .run(|| {
                let iface = list_interfaces()
                    .unwrap()
                    .into_iter()
                    .find(|i| i.name == "hpod0")
                    .expect("hpod0 listed");
                (iface, scan())
            })
            .unwrap();
        assert!(iface.pod_facing());
        let id = iface.peer_netnsid.expect("peer netns id");
        let ns = found.get(&id).expect("the pod's namespace found by its id");
        let pod_stat = std::fs::metadata(Path::new(NETNS_DIR).join(pod.0)).unwrap();
        assert_eq!((ns.dev, ns.ino), (pod_stat.dev(), pod_stat.ino()));
        let peer = iface.peer_ifindex.expect("peer ifindex");
        let name = ns
            .run(|| {
                let mut buf = [0 as libc::c_char; libc::IF_NAMESIZE];
                // SAFETY: if_indextoname writes at most IF_NAMESIZE bytes.
                let p = unsafe { libc::if_indextoname(peer, buf.as_mut_ptr()) };
                assert!(!p.is_null());
                // SAFETY: NUL-terminated on success.
                unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) }
                    .to_string_lossy()
                    .into_owned()
            })
            .unwrap();
        assert_eq!(name, "eth7");
        // Our own namespace has no id here: it is never taken for a pod's.
        let own = std::fs::metadata("/proc/self/ns/net").unwrap();
        assert!(
            !found
                .values()
                .any(|n| (n.dev, n.ino) == (own.dev(), own.ino()))
        );
    }
}
