//! `mtls-bench`: the load generators of `cargo xtask bench` that stock tools do not provide.
//!
//! - `serve --listen ADDR:PORT --mode reply|hold [--threads N] [--more-ports P,P..]`: a TCP
//!   server. `reply` reads one request, answers a short HTTP response and closes (connection
//!   churn); `hold` listens (on more ports too) and never accepts: connections stay open in the
//!   accept queues without costing a file descriptor (idle flows).
//! - `churn --connect ADDR:PORT --sources IP,IP.. --threads N --seconds S`: opens, uses and
//!   closes connections as fast as it can (connect, send an HTTP/1.1 request, read the answer
//!   until the server closes); prints `connections=N errors=E seconds=S`.
//! - `hold --connect ADDR:PORT [--more-ports P,P..] --sources IP,IP.. --count N [--threads T]`:
//!   opens N connections (run several processes when N exceeds the file-descriptor limit),
//!   sends a few plaintext bytes on each (so the agent classifies and tracks them), prints
//!   `ready N` and keeps them open until killed.
//!
//! Blocking sockets and plain threads: the point is many connections per second from a few
//! cores, not elegance. Sources are spread over several addresses of the client pod with
//! `IP_BIND_ADDRESS_NO_PORT`, so ports are chosen per destination and 100k connections fit.
use std::{
    collections::HashMap,
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream},
    os::fd::FromRawFd,
    process::ExitCode,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

const RESPONSE: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok";
const REQUEST: &[u8] = b"GET / HTTP/1.1\r\nHost: srv\r\nUser-Agent: mtls-bench\r\n\r\n";
const IDLE_HELLO: &[u8] = b"PING idle-flow\r\n";

type Args = HashMap<String, String>;

fn parse_args(args: &[String]) -> Result<Args, String> {
    let mut out = HashMap::new();
    let mut it = args.iter();
    while let Some(k) = it.next() {
        let key = k
            .strip_prefix("--")
            .ok_or_else(|| format!("unexpected argument {k:?}"))?;
        let v = it.next().ok_or_else(|| format!("--{key} needs a value"))?;
        out.insert(key.to_string(), v.clone());
    }
    Ok(out)
}

fn get<T: std::str::FromStr>(a: &Args, key: &str, default: Option<T>) -> Result<T, String> {
    match a.get(key) {
        Some(v) => v.parse().map_err(|_| format!("--{key}: bad value {v:?}")),
        None => default.ok_or_else(|| format!("--{key} is required")),
    }
}

fn sources(a: &Args) -> Result<Vec<Ipv4Addr>, String> {
    let s = a.get("sources").ok_or("--sources is required")?;
    s.split(',')
        .map(|x| {
            x.parse()
                .map_err(|_| format!("--sources: bad address {x:?}"))
        })
        .collect()
}

fn check(ret: libc::c_int, what: &str) -> std::io::Result<libc::c_int> {
    if ret < 0 {
        let e = std::io::Error::last_os_error();
        return Err(std::io::Error::new(e.kind(), format!("{what}: {e}")));
    }
    Ok(ret)
}

fn sockaddr(a: SocketAddrV4) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: a.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(*a.ip()).to_be(),
        },
        sin_zero: [0; 8],
    }
}

fn setopt(
    fd: libc::c_int,
    level: libc::c_int,
    opt: libc::c_int,
    what: &str,
) -> std::io::Result<()> {
    let one: libc::c_int = 1;
    // SAFETY: valid fd, pointer to a live c_int of the given size.
    check(
        unsafe {
            libc::setsockopt(
                fd,
                level,
                opt,
                (&one as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        },
        what,
    )
    .map(drop)
}

/// A connected TCP socket from `src` (port chosen at connect time) to `dst`.
fn connect_from(src: Ipv4Addr, dst: SocketAddrV4) -> std::io::Result<TcpStream> {
    // SAFETY: plain syscalls; the fd is owned by the TcpStream (or closed) before returning.
    unsafe {
        let fd = check(
            libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0),
            "socket",
        )?;
        let stream = TcpStream::from_raw_fd(fd);
        setopt(
            fd,
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            "IP_BIND_ADDRESS_NO_PORT",
        )?;
        let s = sockaddr(SocketAddrV4::new(src, 0));
        let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
        check(
            libc::bind(fd, (&s as *const libc::sockaddr_in).cast(), len),
            "bind",
        )?;
        let d = sockaddr(dst);
        check(
            libc::connect(fd, (&d as *const libc::sockaddr_in).cast(), len),
            "connect",
        )?;
        Ok(stream)
    }
}

fn listen(addr: SocketAddrV4) -> std::io::Result<TcpListener> {
    // SAFETY: plain syscalls; the fd is owned by the TcpListener.
    unsafe {
        let fd = check(
            libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0),
            "socket",
        )?;
        let l = TcpListener::from_raw_fd(fd);
        setopt(fd, libc::SOL_SOCKET, libc::SO_REUSEADDR, "SO_REUSEADDR")?;
        let s = sockaddr(addr);
        let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
        check(
            libc::bind(fd, (&s as *const libc::sockaddr_in).cast(), len),
            "bind",
        )?;
        check(libc::listen(fd, 65535), "listen")?;
        Ok(l)
    }
}

/// Lets one process hold `n` sockets: raises the soft RLIMIT_NOFILE as far as the hard limit
/// allows (raising the hard limit needs CAP_SYS_RESOURCE, which a container may not have).
fn raise_nofile(n: u64) {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return;
        }
        lim.rlim_cur = n.min(lim.rlim_max);
        libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
    }
    if lim.rlim_cur < n {
        eprintln!(
            "mtls-bench: only {} file descriptors allowed (wanted {n})",
            lim.rlim_cur
        );
    }
}

fn serve(a: &Args) -> Result<(), String> {
    let addr: SocketAddrV4 = get(a, "listen", None)?;
    let mode = a.get("mode").map(String::as_str).unwrap_or("reply");
    let threads: usize = get(a, "threads", Some(2))?;
    let l = listen(addr).map_err(|e| format!("listen {addr}: {e}"))?;
    match mode {
        "reply" => {
            let mut handles = Vec::new();
            for _ in 0..threads.max(1) {
                let l = l.try_clone().map_err(|e| e.to_string())?;
                handles.push(std::thread::spawn(move || {
                    let mut buf = [0u8; 4096];
                    loop {
                        let Ok((mut s, _)) = l.accept() else { continue };
                        // One read holds the whole (one-segment) request; then answer and close.
                        if matches!(s.read(&mut buf), Ok(n) if n > 0) {
                            let _ = s.write_all(RESPONSE);
                        }
                    }
                }));
            }
            for h in handles {
                let _ = h.join();
            }
            Ok(())
        }
        "hold" => {
            // Never accept: completed connections wait in the accept queue (up to
            // net.core.somaxconn each), which needs no file descriptor per connection (the
            // hard RLIMIT_NOFILE may be low and not raisable in a container).
            let mut listeners = vec![l];
            for port in a
                .get("more-ports")
                .map(String::as_str)
                .unwrap_or("")
                .split(',')
            {
                if port.is_empty() {
                    continue;
                }
                let port: u16 = port
                    .parse()
                    .map_err(|_| format!("--more-ports: {port:?}"))?;
                let extra = SocketAddrV4::new(*addr.ip(), port);
                listeners.push(listen(extra).map_err(|e| format!("listen {extra}: {e}"))?);
            }
            loop {
                std::thread::sleep(Duration::from_secs(3600));
            }
        }
        m => Err(format!("--mode: {m:?} is not reply or hold")),
    }
}

fn churn(a: &Args) -> Result<(), String> {
    let dst: SocketAddrV4 = get(a, "connect", None)?;
    let srcs = Arc::new(sources(a)?);
    let threads: usize = get(a, "threads", Some(8))?;
    let seconds: f64 = get(a, "seconds", Some(5.0))?;
    let done = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(seconds);
    let mut handles = Vec::new();
    for t in 0..threads.max(1) {
        let (srcs, done, errors) = (srcs.clone(), done.clone(), errors.clone());
        handles.push(std::thread::spawn(move || {
            let mut buf = [0u8; 512];
            let mut i = t;
            while Instant::now() < deadline {
                let src = srcs[i % srcs.len()];
                i += 1;
                let ok = (|| -> std::io::Result<()> {
                    let mut s = connect_from(src, dst)?;
                    s.set_nodelay(true)?;
                    s.write_all(REQUEST)?;
                    // Until the server closes: it always closes first, so the TIME_WAIT
                    // sockets sit on the server side and the client never runs out of ports.
                    while s.read(&mut buf)? > 0 {}
                    Ok(())
                })();
                match ok {
                    Ok(()) => done.fetch_add(1, Ordering::Relaxed),
                    Err(_) => errors.fetch_add(1, Ordering::Relaxed),
                };
            }
        }));
    }
    for h in handles {
        let _ = h.join();
    }
    let elapsed = start.elapsed().as_secs_f64();
    println!(
        "connections={} errors={} seconds={elapsed:.3}",
        done.load(Ordering::Relaxed),
        errors.load(Ordering::Relaxed)
    );
    Ok(())
}

fn hold(a: &Args) -> Result<(), String> {
    let dst: SocketAddrV4 = get(a, "connect", None)?;
    // Destination ports: the first from --connect, more from --more-ports.
    let mut ports = vec![dst.port()];
    for p in a
        .get("more-ports")
        .map(String::as_str)
        .unwrap_or("")
        .split(',')
    {
        if !p.is_empty() {
            ports.push(p.parse().map_err(|_| format!("--more-ports: {p:?}"))?);
        }
    }
    let ports = Arc::new(ports);
    let srcs = Arc::new(sources(a)?);
    let count: usize = get(a, "count", None)?;
    let threads: usize = get(a, "threads", Some(4))?;
    raise_nofile(count as u64 + 4096);
    let start = Instant::now();
    let mut handles = Vec::new();
    for t in 0..threads.max(1) {
        let (srcs, ports) = (srcs.clone(), ports.clone());
        let n = count / threads + usize::from(t < count % threads);
        handles.push(std::thread::spawn(
            move || -> Result<Vec<TcpStream>, String> {
                let mut held = Vec::with_capacity(n);
                for i in 0..n {
                    let k = i * threads + t;
                    let src = srcs[k % srcs.len()];
                    let dst = SocketAddrV4::new(*dst.ip(), ports[(k / srcs.len()) % ports.len()]);
                    let mut tries = 0;
                    loop {
                        match connect_from(src, dst).and_then(|mut s| {
                            s.write_all(IDLE_HELLO)?;
                            Ok(s)
                        }) {
                            Ok(s) => {
                                held.push(s);
                                break;
                            }
                            Err(e) if tries < 20 => {
                                tries += 1;
                                if tries == 1 {
                                    eprintln!(
                                        "mtls-bench: connection {i} from {src}: {e}; retrying"
                                    );
                                }
                                std::thread::sleep(Duration::from_millis(50));
                            }
                            Err(e) => return Err(format!("connection {i} from {src}: {e}")),
                        }
                    }
                }
                Ok(held)
            },
        ));
    }
    let mut held = Vec::with_capacity(count);
    for h in handles {
        held.extend(h.join().map_err(|_| "a connecting thread panicked")??);
    }
    println!(
        "ready {} seconds={:.3}",
        held.len(),
        start.elapsed().as_secs_f64()
    );
    let _ = std::io::stdout().flush();
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

fn main() -> ExitCode {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let Some((cmd, rest)) = argv.split_first() else {
        eprintln!("usage: mtls-bench serve|churn|hold --flag value ... (see the source)");
        return ExitCode::from(2);
    };
    let result = parse_args(rest).and_then(|a| match cmd.as_str() {
        "serve" => serve(&a),
        "churn" => churn(&a),
        "hold" => hold(&a),
        other => Err(format!("unknown command {other:?}")),
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mtls-bench: {e}");
            ExitCode::from(2)
        }
    }
}
