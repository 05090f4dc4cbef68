//! Issue 7, hostile input on the wire: random bytes, truncated and oversized TLS records,
//! a ClientHello with thousands of extensions, lying length fields, runs of empty records —
//! sent from a pod through the real kernel path. The agent keeps running with bounded memory,
//! and TLS-looking junk is never called plaintext. Needs root; fails (never skips) without it.
use std::time::Duration;

use anyhow::Result;
use mtls_agent_testbed::*;

mod faults_util;
use faults_util::*;

fn record(ct: u8, body: &[u8]) -> Vec<u8> {
    let mut r = vec![ct, 0x03, 0x03];
    r.extend((body.len() as u16).to_be_bytes());
    r.extend(body);
    r
}

/// A ClientHello with `n` empty extensions (4 bytes each), split over as many records as needed.
fn hello_with_extensions(n: usize) -> Vec<u8> {
    let mut body = vec![0x03, 0x03];
    body.extend([7u8; 32]);
    body.push(0);
    body.extend([0x00, 0x02, 0x13, 0x01, 0x01, 0x00]);
    let mut ext = Vec::new();
    for i in 0..n {
        ext.extend(((0x1000 + i) as u16).to_be_bytes());
        ext.extend([0, 0]);
    }
    body.extend((ext.len() as u16).to_be_bytes());
    body.extend(ext);
    let mut hs = vec![0x01];
    hs.extend(&(body.len() as u32).to_be_bytes()[1..]);
    hs.extend(body);
    hs.chunks(16384).flat_map(|c| record(0x16, c)).collect()
}

fn junk(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

#[test]
fn hostile_payloads_keep_the_agent_up_and_tls_junk_is_never_plaintext() -> Result<()> {
    ensure_root()?;
    let bin = agent_bin()?;
    let mut tb = Testbed::new("mtfhostile")?;
    let tlsjunk = tb.add_pod(PodSpec::new("tlsjunk", "198.18.0.10".parse()?))?;
    let randjunk = tb.add_pod(PodSpec::new("randjunk", "198.18.0.11".parse()?))?;
    let otherrec = tb.add_pod(PodSpec::new("otherrec", "198.18.0.12".parse()?))?;
    let client = tb.add_pod(PodSpec::new("client", "198.18.0.20".parse()?))?;
    let inv = tb.workdir().join("inventory.yaml");
    write_inventory(
        &inv,
        &[
            Workload::new("shop", "tlsjunk", &[&tlsjunk]),
            Workload::new("shop", "randjunk", &[&randjunk]),
            Workload::new("shop", "otherrec", &[&otherrec]),
            Workload::new("legacy", "batch", &[&client]).without_sidecar(),
        ],
    )?;
    let _s1 = tb.spawn(
        &tlsjunk.netns,
        &["python3", "-c", SINK_SERVER_PY, "443", ""],
    )?;
    let _s2 = tb.spawn(
        &randjunk.netns,
        &[
            "python3",
            "-c",
            SINK_SERVER_PY,
            "8080",
            &hex(&junk(99, 700)),
        ],
    )?;
    let _s3 = tb.spawn(
        &otherrec.netns,
        &["python3", "-c", SINK_SERVER_PY, "443", ""],
    )?;
    tb.wait_tcp_listening(&otherrec.netns, otherrec.v4(443), Duration::from_secs(10))?;
    tb.wait_tcp_listening(&tlsjunk.netns, tlsjunk.v4(443), Duration::from_secs(10))?;
    tb.wait_tcp_listening(&randjunk.netns, randjunk.v4(8080), Duration::from_secs(10))?;
    let agent = Agent::start(&tb, &bin, &inv, &["vp*"], &[], 4)?;
    let pid = agent.proc().pid();
    let rss0 = rss_kib(pid)?;

    let mut oversized = vec![0x16, 0x03, 0x03, 0xff, 0xff];
    oversized.extend(junk(1, 6000));
    let mut truncated = vec![0x16, 0x03, 0x01, 0x3f, 0x00];
    truncated.extend(junk(2, 100));
    let mut lying_hs = vec![0x16, 0x03, 0x01, 0x00, 0x40, 0x01, 0xff, 0xff, 0xff];
    lying_hs.extend(junk(3, 60));
    let empty_records: Vec<u8> = (0..1500).flat_map(|_| record(0x16, &[])).collect();
    let mut alert_then_junk = record(0x15, &[2, 40]);
    alert_then_junk.extend(junk(4, 3000));
    let tls_payloads: Vec<(&str, Vec<u8>)> = vec![
        ("3000 extensions", hello_with_extensions(3000)),
        ("10000 extensions", hello_with_extensions(10000)),
        ("oversized record", oversized),
        ("truncated record", truncated),
        ("lying handshake length", lying_hs),
        ("1500 empty records", empty_records),
        ("header only", vec![0x16, 0x03, 0x01]),
    ];
    // TLS records of other types as the first client bytes go to a third server: the
    // classifier only treats a handshake record as the start of TLS, so these are currently
    // `plaintext` (other). Counted and printed, not asserted: see the report of issue 7.
    let other_records: Vec<(&str, Vec<u8>)> = vec![
        ("alert then junk", alert_then_junk),
        ("application data", record(0x17, &junk(5, 2000))),
    ];
    let mut sent = 0;
    for (what, p) in &tls_payloads {
        let done = burst(&tb, &client.netns, tlsjunk.v4(443), 8, 4, p)?;
        assert_eq!(done, 8, "{what}");
        sent += done;
    }
    for (what, p) in &other_records {
        assert_eq!(
            burst(&tb, &client.netns, otherrec.v4(443), 4, 4, p)?,
            4,
            "{what}"
        );
    }
    for seed in 0..40u64 {
        let len = 1 + (seed as usize * 997) % 9000;
        burst(
            &tb,
            &client.netns,
            randjunk.v4(8080),
            1,
            4,
            &junk(seed + 10, len),
        )?;
    }
    let m = agent.settle(&tb, Duration::from_secs(20))?;
    agent.proc().ensure_running()?;
    let rss1 = rss_kib(pid)?;
    let by = |wl, sec| conns(&m, "shop", wl, "inbound", sec);
    eprintln!(
        "hostile: tlsjunk mtls {} tls {} plaintext {} unknown {}; randjunk plaintext {} unknown {}; \
         alert/application-data first: plaintext {} unknown {}; \
         RSS {rss0} -> {rss1} KiB",
        by("tlsjunk", "mtls"),
        by("tlsjunk", "tls"),
        by("tlsjunk", "plaintext"),
        by("tlsjunk", "unknown"),
        by("randjunk", "plaintext"),
        by("randjunk", "unknown"),
        by("otherrec", "plaintext"),
        by("otherrec", "unknown"),
    );
    assert_eq!(
        by("tlsjunk", "plaintext"),
        0.0,
        "TLS-looking junk is not plaintext\n{m}"
    );
    let total: f64 = ["mtls", "tls", "unknown"]
        .iter()
        .map(|s| by("tlsjunk", s))
        .sum();
    assert_eq!(
        total, sent as f64,
        "each hostile connection counted once\n{m}"
    );
    // Alert / application-data records where the ClientHello belongs: TLS-looking junk too.
    assert_eq!(
        by("otherrec", "plaintext"),
        0.0,
        "a TLS alert or application-data record first is not plaintext\n{m}"
    );
    assert_eq!(
        by("otherrec", "unknown"),
        (other_records.len() * 4) as f64,
        "{m}"
    );
    let rand_total: f64 = ["mtls", "tls", "plaintext", "unknown"]
        .iter()
        .map(|s| by("randjunk", s))
        .sum();
    assert_eq!(rand_total, 40.0, "{m}");
    assert!(rss1 < rss0 + 32 * 1024, "RSS {rss0} -> {rss1} KiB");
    let noisy = warn_error_lines(&agent.proc().stderr());
    assert!(noisy.is_empty(), "{noisy:#?}");
    assert!(!agent.proc().stderr().contains("panicked"));
    assert!(agent.stop()?.success());
    tb.destroy()
}

/// Raw TCP from a pod: handshake by hand from an address the pod's kernel does not own (so it
/// sends no RST of its own), then overlapping segments with conflicting contents, out of order,
/// with gaps. Printed: connections completed.
const OVERLAP_PY: &str = r#"
import socket, struct, random, sys
src, dst, dport, n, mode = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
def csum(b):
    if len(b) % 2: b += b"\0"
    s = sum(struct.unpack("!%dH" % (len(b) // 2), b))
    while s >> 16: s = (s & 0xffff) + (s >> 16)
    return ~s & 0xffff
S, D = socket.inet_aton(src), socket.inet_aton(dst)
def seg(sport, seq, ack, flags, data=b""):
    h = struct.pack("!HHIIBBHHH", sport, dport, seq & 0xffffffff, ack & 0xffffffff, 5 << 4, flags, 65535, 0, 0)
    c = csum(S + D + struct.pack("!BBH", 0, 6, len(h) + len(data)) + h + data)
    h = h[:16] + struct.pack("!H", c) + h[18:]
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(h) + len(data), random.randint(1, 65535), 0x4000, 64, 6, 0, S, D)
    ip = ip[:10] + struct.pack("!H", csum(ip)) + ip[12:]
    return ip + h + data
tx = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
rx = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0800))
rx.bind(("eth0", 0)); rx.settimeout(2)
SYN, ACK, PSH, RST = 2, 16, 8, 4
def send(p): tx.sendto(p, (dst, 0))
tls = bytes([0x16, 3, 1, 0, 0x40]) + b"X" * 20
done = 0
for i in range(n):
    sport = (41000 if mode == "overlap" else 42000) + i; isn = random.randint(0, 2**32 - 1)
    send(seg(sport, isn, 0, SYN))
    sisn = None
    try:
        while sisn is None:
            f = rx.recv(2048)
            ip = f[14:]; ihl = (ip[0] & 15) * 4; t = ip[ihl:]
            if ip[9] == 6 and ip[12:16] == D and ip[16:20] == S and struct.unpack("!H", t[2:4])[0] == sport and t[13] & (SYN | ACK) == SYN | ACK:
                sisn = struct.unpack("!I", t[4:8])[0]
    except socket.timeout:
        continue
    a = sisn + 1; b = isn + 1
    send(seg(sport, b, a, ACK))
    if mode == "plain":
        # Control: plain HTTP in one segment, so a broken raw path cannot pass for "not plaintext".
        send(seg(sport, b, a, ACK | PSH, b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"))
    elif i % 2 == 0:
        # In order: TLS header first, then an overlap rewriting its tail, then a retransmission
        # of the start that claims to be HTTP.
        send(seg(sport, b, a, ACK | PSH, tls))
        send(seg(sport, b + 10, a, ACK | PSH, b"Y" * 40))
        send(seg(sport, b, a, ACK | PSH, b"GET / HTTP/1.1\r\n"))
    else:
        # Out of order with a gap: the middle first, then the start twice with different bytes.
        send(seg(sport, b + 25, a, ACK | PSH, b"Z" * 30))
        send(seg(sport, b, a, ACK | PSH, tls))
        send(seg(sport, b, a, ACK | PSH, b"POST /x HTTP/1.1\r\nHost: a\r\n"))
        send(seg(sport, b + 500, a, ACK | PSH, b"W" * 100))
    send(seg(sport, b + 200, a, RST | ACK))
    done += 1
print(done)
"#;

#[test]
fn overlapping_segments_do_not_turn_tls_into_plaintext() -> Result<()> {
    ensure_root()?;
    let bin = agent_bin()?;
    let mut tb = Testbed::new("mtfoverlap")?;
    let server = tb.add_pod(PodSpec::new("server", "198.18.0.10".parse()?))?;
    let client = tb.add_pod(PodSpec::new("client", "198.18.0.20".parse()?))?;
    let inv = tb.workdir().join("inventory.yaml");
    write_inventory(&inv, &[Workload::new("shop", "web", &[&server])])?;
    let _sink = tb.spawn(&server.netns, &["python3", "-c", SINK_SERVER_PY, "443", ""])?;
    tb.wait_tcp_listening(&server.netns, server.v4(443), Duration::from_secs(10))?;
    // The spoofed client address resolves to the client pod's MAC on the server's side.
    let link = tb.run(&client.netns, &["ip", "-j", "link", "show", "eth0"])?;
    let link: serde_json::Value = serde_json::from_slice(&link.stdout)?;
    let mac = link[0]["address"].as_str().unwrap_or_default().to_owned();
    let spoofed = "198.18.0.77";
    tb.run(
        &server.netns,
        &[
            "ip",
            "neigh",
            "replace",
            spoofed,
            "lladdr",
            &mac,
            "dev",
            "eth0",
            "nud",
            "permanent",
        ],
    )?;
    let agent = Agent::start(&tb, &bin, &inv, &["vp*"], &[], 2)?;
    let n = 20;
    let raw = |mode: &str, n: usize| -> Result<usize> {
        let out = tb.run_timeout(
            &client.netns,
            &[
                "python3",
                "-c",
                OVERLAP_PY,
                spoofed,
                "198.18.0.10",
                "443",
                &n.to_string(),
                mode,
            ],
            Duration::from_secs(60),
        )?;
        Ok(String::from_utf8_lossy(&out.stdout).trim().parse()?)
    };
    // Control first: the raw path delivers bytes the agent classifies.
    assert_eq!(raw("plain", 2)?, 2);
    let m = agent.settle(&tb, Duration::from_secs(20))?;
    assert_eq!(
        conns(&m, "shop", "web", "inbound", "plaintext"),
        2.0,
        "control\n{m}"
    );
    assert_eq!(raw("overlap", n)?, n, "raw handshakes");
    let m = agent.settle(&tb, Duration::from_secs(20))?;
    let by = |sec| conns(&m, "shop", "web", "inbound", sec);
    eprintln!(
        "overlap: {n} raw connections; inbound mtls {} tls {} plaintext {} unknown {}",
        by("mtls"),
        by("tls"),
        by("plaintext"),
        by("unknown")
    );
    assert_eq!(
        by("plaintext"),
        2.0,
        "overlaps never make TLS plaintext\n{m}"
    );
    assert_eq!(by("mtls") + by("tls") + by("unknown"), n as f64, "{m}");
    agent.proc().ensure_running()?;
    let noisy = warn_error_lines(&agent.proc().stderr());
    assert!(noisy.is_empty(), "{noisy:#?}");
    assert!(agent.stop()?.success());
    tb.destroy()
}
