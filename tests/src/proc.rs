//! Running commands inside the test namespaces.
//!
//! Every command goes through `ip netns exec <ns> ...` so that it sees only the simulated network,
//! never the machine's own interfaces. Commands are started in their own process group so that a
//! server which forks (nginx master/worker, shell wrappers) is stopped as a whole.

use std::ffi::OsStr;
use std::fs::File;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};

/// Default bound for one-shot commands, so a wedged command fails the test instead of hanging it.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// How much of a log is quoted in error messages: enough to see the cause, not a wall of text.
const TAIL_BYTES: usize = 4000;

/// Builds the command line for `args` run inside `ns` (or on the host when `ns` is `None`, which
/// is only meant for namespace management and offline tools such as `openssl req`).
pub(crate) fn command(ns: Option<&str>, args: &[&str]) -> Result<Command> {
    let (first, rest) = args
        .split_first()
        .ok_or_else(|| anyhow!("empty command line"))?;
    let mut cmd = match ns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns]).arg(first);
            c
        }
        None => Command::new(first),
    };
    cmd.args(rest);
    // Own process group: lets us signal the whole tree, and keeps a terminal's Ctrl-C from
    // racing our own cleanup.
    cmd.process_group(0);
    Ok(cmd)
}

/// Human-readable command line for error messages.
pub(crate) fn display(ns: Option<&str>, args: &[&str]) -> String {
    let mut s = String::new();
    if let Some(ns) = ns {
        s.push_str("ip netns exec ");
        s.push_str(ns);
        s.push(' ');
    }
    s.push_str(&args.join(" "));
    s
}

/// Last `TAIL_BYTES` of a byte buffer as text.
pub(crate) fn tail(bytes: &[u8]) -> String {
    let start = bytes.len().saturating_sub(TAIL_BYTES);
    let s = String::from_utf8_lossy(&bytes[start..]);
    let s = s.trim();
    if s.is_empty() {
        "<empty>".to_string()
    } else {
        s.to_string()
    }
}

/// Returns true once `pid` has exited, without reaping it: a zombie keeps its pid and process
/// group id reserved, so a later `killpg` can never hit an unrelated, recycled group.
fn has_exited(pid: u32) -> bool {
    // SAFETY: waitid only writes into the zeroed siginfo we own.
    unsafe {
        let mut info: libc::siginfo_t = std::mem::zeroed();
        let r = libc::waitid(
            libc::P_PID,
            pid as libc::id_t,
            &mut info,
            libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
        );
        // r < 0: ECHILD, i.e. already reaped (treat as exited).
        r < 0 || info.si_pid() != 0
    }
}

fn killpg(pgid: u32, sig: libc::c_int) {
    // SAFETY: plain syscall; callers guarantee the group leader is our un-reaped child.
    unsafe {
        libc::killpg(pgid as libc::pid_t, sig);
    }
}

/// Runs a command to completion with a time limit and returns its output whatever the exit
/// status. Fails only if it cannot be started or does not finish in time (then its whole process
/// group is killed and the error quotes what it printed so far).
pub fn output_in(
    ns: Option<&str>,
    args: &[&str],
    stdin: Option<&[u8]>,
    timeout: Duration,
) -> Result<Output> {
    let shown = display(ns, args);
    let mut cmd = command(ns, args)?;
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .with_context(|| format!("cannot start `{shown}`"))?;
    let pid = child.id();

    let (tx, rx) = mpsc::channel::<(bool, Vec<u8>)>();
    for (is_out, pipe) in [
        (
            true,
            child
                .stdout
                .take()
                .map(|p| Box::new(p) as Box<dyn Read + Send>),
        ),
        (
            false,
            child
                .stderr
                .take()
                .map(|p| Box::new(p) as Box<dyn Read + Send>),
        ),
    ] {
        let tx = tx.clone();
        let mut pipe = pipe.expect("piped");
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = pipe.read_to_end(&mut buf);
            let _ = tx.send((is_out, buf));
        });
    }
    drop(tx);
    if let (Some(data), Some(mut pipe)) = (stdin, child.stdin.take()) {
        let data = data.to_vec();
        // A separate thread: a child that does not read its stdin must not block us.
        std::thread::spawn(move || {
            let _ = pipe.write_all(&data);
        });
    }

    let deadline = Instant::now() + timeout;
    let mut timed_out = false;
    while !has_exited(pid) {
        if Instant::now() >= deadline {
            timed_out = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    // Kill leftovers of the group (or everything, on timeout) before reaping the leader.
    killpg(pid, libc::SIGKILL);
    let status = child
        .wait()
        .with_context(|| format!("waiting for `{shown}`"))?;

    let (mut out, mut err) = (Vec::new(), Vec::new());
    let collect_deadline = Instant::now() + Duration::from_secs(2);
    for _ in 0..2 {
        let left = collect_deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok((true, b)) => out = b,
            Ok((false, b)) => err = b,
            Err(_) => break, // a process outside the group still holds the pipe; give up on it
        }
    }
    if timed_out {
        bail!(
            "`{shown}` did not finish within {timeout:?} and was killed; stderr: {}; stdout: {}",
            tail(&err),
            tail(&out)
        );
    }
    Ok(Output {
        status,
        stdout: out,
        stderr: err,
    })
}

/// Like [`output_in`] but a non-zero exit status is an error that quotes stderr: the form most
/// callers want, since a failed setup step must stop the test with its reason.
pub fn run_in(
    ns: Option<&str>,
    args: &[&str],
    stdin: Option<&[u8]>,
    timeout: Duration,
) -> Result<Output> {
    let out = output_in(ns, args, stdin, timeout)?;
    if !out.status.success() {
        bail!(
            "`{}` failed ({}); stderr: {}; stdout: {}",
            display(ns, args),
            describe_status(out.status),
            tail(&out.stderr),
            tail(&out.stdout)
        );
    }
    Ok(out)
}

pub(crate) fn describe_status(s: ExitStatus) -> String {
    match (s.code(), s.signal()) {
        (Some(c), _) => format!("exit status {c}"),
        (None, Some(sig)) => format!("killed by signal {sig}"),
        _ => s.to_string(),
    }
}

static LOG_SEQ: AtomicU64 = AtomicU64::new(0);

/// A long-running process (server) inside a namespace.
///
/// Its stdout and stderr go to files, so that a server that dies or misbehaves can be diagnosed
/// after the fact ([`Proc::stderr`], quoted in errors), and so that a chatty server can never
/// block on a full pipe. Dropping it stops the whole process group: a test that fails half-way
/// leaves nothing running.
#[derive(Debug)]
pub struct Proc {
    child: Option<Child>,
    cmdline: String,
    stdout_path: PathBuf,
    stderr_path: PathBuf,
}

/// Starts `args` inside `ns` in the background, logging to files under `log_dir`.
///
/// Usually called through [`crate::Testbed::spawn`], which supplies its own log directory.
/// `env` adds environment variables (e.g. `RUST_LOG` for the agent).
pub fn spawn_in(ns: &str, args: &[&str], env: &[(&str, &str)], log_dir: &Path) -> Result<Proc> {
    let cmdline = display(Some(ns), args);
    std::fs::create_dir_all(log_dir)
        .with_context(|| format!("creating log directory {}", log_dir.display()))?;
    let base = Path::new(args.first().copied().unwrap_or("proc"))
        .file_name()
        .unwrap_or(OsStr::new("proc"))
        .to_string_lossy()
        .into_owned();
    let n = LOG_SEQ.fetch_add(1, Ordering::Relaxed);
    let stdout_path = log_dir.join(format!("{n:03}-{ns}-{base}.stdout"));
    let stderr_path = log_dir.join(format!("{n:03}-{ns}-{base}.stderr"));
    let out = File::create(&stdout_path)
        .with_context(|| format!("creating {}", stdout_path.display()))?;
    let err = File::create(&stderr_path)
        .with_context(|| format!("creating {}", stderr_path.display()))?;
    let mut cmd = command(Some(ns), args)?;
    cmd.stdin(Stdio::null()).stdout(out).stderr(err);
    cmd.envs(env.iter().copied());
    let child = cmd
        .spawn()
        .with_context(|| format!("cannot start `{cmdline}`"))?;
    Ok(Proc {
        child: Some(child),
        cmdline,
        stdout_path,
        stderr_path,
    })
}

impl Proc {
    /// Pid of the process (also its process group id).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// The command line, for messages.
    pub fn cmdline(&self) -> &str {
        &self.cmdline
    }

    /// True while the process has not exited.
    pub fn is_running(&self) -> bool {
        self.child.as_ref().is_some_and(|c| !has_exited(c.id()))
    }

    /// Errors (quoting the log) if the process has exited: servers are expected to live for the
    /// whole test, and a silent crash would otherwise surface as a confusing client timeout.
    pub fn ensure_running(&self) -> Result<()> {
        if self.is_running() {
            return Ok(());
        }
        bail!(
            "`{}` exited unexpectedly; stderr: {}; stdout: {}",
            self.cmdline,
            self.stderr_tail(),
            tail(self.stdout().as_bytes())
        )
    }

    /// Where stdout is logged.
    pub fn stdout_path(&self) -> &Path {
        &self.stdout_path
    }

    /// Where stderr is logged.
    pub fn stderr_path(&self) -> &Path {
        &self.stderr_path
    }

    /// Everything the process wrote to stdout so far.
    pub fn stdout(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(&self.stdout_path).unwrap_or_default()).into_owned()
    }

    /// Everything the process wrote to stderr so far.
    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(&self.stderr_path).unwrap_or_default()).into_owned()
    }

    /// The end of stderr, for error messages.
    pub fn stderr_tail(&self) -> String {
        tail(self.stderr().as_bytes())
    }

    /// Stops the process group: SIGTERM, then SIGKILL after `grace`. Returns the leader's exit
    /// status (None if it was already stopped before).
    pub fn stop_with_grace(&mut self, grace: Duration) -> Option<ExitStatus> {
        let mut child = self.child.take()?;
        let pid = child.id();
        if !has_exited(pid) {
            killpg(pid, libc::SIGTERM);
            let deadline = Instant::now() + grace;
            while !has_exited(pid) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        // Also kills children that outlived a leader which exited on its own.
        killpg(pid, libc::SIGKILL);
        child.wait().ok()
    }

    /// Stops the process group with a short grace period (lets servers flush their logs).
    pub fn stop(&mut self) -> Option<ExitStatus> {
        self.stop_with_grace(Duration::from_secs(2))
    }

    /// Waits up to `timeout` for the process to exit by itself (e.g. a client or a
    /// `-naccept`-style server); kills it on timeout and returns an error.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let pid = self.pid();
        let deadline = Instant::now() + timeout;
        while self.child.is_some() && !has_exited(pid) {
            if Instant::now() >= deadline {
                self.stop_with_grace(Duration::from_millis(200));
                bail!(
                    "`{}` did not exit within {timeout:?}; stderr: {}",
                    self.cmdline,
                    self.stderr_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        self.stop_with_grace(Duration::ZERO)
            .ok_or_else(|| anyhow!("`{}` was already stopped", self.cmdline))
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop_with_grace(Duration::from_millis(500));
    }
}

/// Parses the local address column of `ss -Hltn` (`0.0.0.0:80`, `[::]:443`, `*:8443`,
/// `127.0.0.53%lo:53`, `[fe80::1]%eth0:22`) into (ip or None for `*`, port).
fn parse_ss_local(s: &str) -> Option<(Option<std::net::IpAddr>, u16)> {
    let (host, port) = s.rsplit_once(':')?;
    let port = port.parse().ok()?;
    let host = host.split('%').next()?;
    if host == "*" {
        return Some((None, port));
    }
    let host = host.trim_start_matches('[').trim_end_matches(']');
    Some((Some(host.parse().ok()?), port))
}

/// Whether a listener bound to `(bound, port)` accepts connections to `want`.
fn listener_serves(bound: Option<std::net::IpAddr>, port: u16, want: SocketAddr) -> bool {
    if port != want.port() {
        return false;
    }
    match bound {
        None => true,
        Some(ip) if ip == want.ip() => true,
        Some(ip) if ip.is_unspecified() => {
            // `[::]` serves IPv4 too unless IPV6_V6ONLY, which ss shows as `[::]` as well; a
            // dual-stack socket is shown as `*`. So `[::]` counts for IPv6 only.
            ip.is_ipv4() == want.is_ipv4()
        }
        _ => false,
    }
}

/// Lists the TCP listeners of a namespace as (address, port).
pub fn tcp_listeners(ns: &str) -> Result<Vec<(Option<std::net::IpAddr>, u16)>> {
    let out = run_in(Some(ns), &["ss", "-Hltn"], None, Duration::from_secs(10))?;
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(text
        .lines()
        .filter_map(|l| l.split_whitespace().nth(3))
        .filter_map(parse_ss_local)
        .collect())
}

/// Waits until something in `ns` listens for TCP on `addr` (an unspecified address means "a
/// wildcard listener of that family"). Reads the socket table instead of probing with a
/// connection, so that the wait itself creates no traffic that an observer would count.
pub fn wait_tcp_listening(ns: &str, addr: SocketAddr, timeout: Duration) -> Result<()> {
    wait_tcp_listening_proc(ns, addr, timeout, None)
}

/// [`wait_tcp_listening`] that fails fast (quoting its stderr) if `proc` exits while we wait.
pub fn wait_tcp_listening_proc(
    ns: &str,
    addr: SocketAddr,
    timeout: Duration,
    proc: Option<&Proc>,
) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let listeners = tcp_listeners(ns)?;
        let found = listeners.iter().any(|&(ip, port)| {
            if addr.ip().is_unspecified() {
                // Asking for a wildcard: accept the exact wildcard or a dual-stack one.
                port == addr.port() && (ip.is_none() || ip.is_some_and(|ip| ip == addr.ip()))
            } else {
                listener_serves(ip, port, addr)
            }
        });
        if found {
            return Ok(());
        }
        if let Some(p) = proc {
            p.ensure_running()
                .with_context(|| format!("server in {ns} died before listening on {addr}"))?;
        }
        if Instant::now() >= deadline {
            bail!(
                "nothing listens on {addr} in netns {ns} after {timeout:?} (listeners: {listeners:?}){}",
                proc.map(|p| format!("; `{}` stderr: {}", p.cmdline(), p.stderr_tail()))
                    .unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ss_addresses() {
        assert_eq!(
            parse_ss_local("0.0.0.0:80"),
            Some((Some("0.0.0.0".parse().unwrap()), 80))
        );
        assert_eq!(
            parse_ss_local("[::]:443"),
            Some((Some("::".parse().unwrap()), 443))
        );
        assert_eq!(parse_ss_local("*:8443"), Some((None, 8443)));
        assert_eq!(
            parse_ss_local("127.0.0.53%lo:53"),
            Some((Some("127.0.0.53".parse().unwrap()), 53))
        );
        assert_eq!(
            parse_ss_local("[fe80::1]%eth0:22"),
            Some((Some("fe80::1".parse().unwrap()), 22))
        );
        assert_eq!(parse_ss_local("garbage"), None);
    }

    #[test]
    fn listener_matching() {
        let v4: SocketAddr = "198.18.0.2:80".parse().unwrap();
        let v6: SocketAddr = "[2001:db8::2]:80".parse().unwrap();
        assert!(listener_serves(None, 80, v4));
        assert!(listener_serves(None, 80, v6));
        assert!(!listener_serves(None, 81, v4));
        assert!(listener_serves(Some("0.0.0.0".parse().unwrap()), 80, v4));
        assert!(!listener_serves(Some("0.0.0.0".parse().unwrap()), 80, v6));
        assert!(listener_serves(Some("::".parse().unwrap()), 80, v6));
        assert!(listener_serves(Some("198.18.0.2".parse().unwrap()), 80, v4));
        assert!(!listener_serves(
            Some("198.18.0.3".parse().unwrap()),
            80,
            v4
        ));
    }
}
