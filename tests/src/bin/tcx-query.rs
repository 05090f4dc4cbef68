//! `tcx-query IFACE...`: prints, as JSON, the TCX programs attached to each interface of the
//! current network namespace (run it with `ip netns exec`). Debian's bpftool (7.1) predates TCX
//! and cannot show them, so the tests ask the kernel through aya's BPF_PROG_QUERY instead.
use aya::programs::{SchedClassifier, TcAttachType};

fn main() -> std::process::ExitCode {
    let mut out = serde_json::Map::new();
    for iface in std::env::args().skip(1) {
        let mut entry = serde_json::Map::new();
        for (dir, t) in [
            ("ingress", TcAttachType::Ingress),
            ("egress", TcAttachType::Egress),
        ] {
            match SchedClassifier::query_tcx(&iface, t) {
                Ok((_, progs)) => {
                    let names: Vec<String> = progs
                        .iter()
                        .map(|p| p.name_as_str().unwrap_or("?").to_owned())
                        .collect();
                    entry.insert(dir.into(), names.into());
                }
                Err(e) => {
                    eprintln!("tcx-query: {iface} {dir}: {e}");
                    return std::process::ExitCode::from(1);
                }
            }
        }
        out.insert(iface, entry.into());
    }
    println!("{}", serde_json::Value::Object(out));
    std::process::ExitCode::SUCCESS
}
