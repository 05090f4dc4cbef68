//! `mtls-agent classify --pcap FILE`: classify every TCP connection of a capture file with the
//! daemon's classifier (see `crate::pcap`), as a table or as JSON records.
use std::{
    cell::Cell,
    io::{IsTerminal as _, Read},
    rc::Rc,
};

use comfy_table::{ContentArrangement, Table, presets::UTF8_BORDERS_ONLY};
use owo_colors::{OwoColorize as _, Stream};

use super::{ClassifyArgs, Output, usage};
use crate::{
    classify::{ConnectionRecord, Security},
    pcap::{self, PcapError, Summary},
};

/// Files from this size on get a progress bar (on a terminal only).
const PROGRESS_MIN_BYTES: u64 = 16 * 1024 * 1024;

/// Counts the bytes read, for the progress bar.
struct Counting<R> {
    inner: R,
    read: Rc<Cell<u64>>,
}

impl<R: Read> Read for Counting<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.read.set(self.read.get() + n as u64);
        Ok(n)
    }
}

fn progress_bar(size: u64) -> Option<indicatif::ProgressBar> {
    let color = std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    if size < PROGRESS_MIN_BYTES || !std::io::stderr().is_terminal() {
        return None;
    }
    let bar = indicatif::ProgressBar::new(size);
    let template = if color {
        "{spinner} {bytes}/{total_bytes} [{bar:40.cyan/blue}] {eta} left"
    } else {
        "{spinner} {bytes}/{total_bytes} [{bar:40}] {eta} left"
    };
    if let Ok(style) = indicatif::ProgressStyle::with_template(template) {
        bar.set_style(style.progress_chars("=> "));
    }
    Some(bar)
}

pub fn classify(args: ClassifyArgs) -> anyhow::Result<()> {
    let path = &args.pcap;
    let name = path.display();
    let file = std::fs::File::open(path).map_err(|e| usage(format!("--pcap {name}: {e}")))?;
    let size = file.metadata().map(|m| m.len()).unwrap_or(0);
    let read = Rc::new(Cell::new(0));
    let bar = progress_bar(size);
    let reader = Counting {
        inner: file,
        read: read.clone(),
    };
    let result = pcap::classify_pcap(reader, &mut |_| {
        if let Some(b) = &bar {
            b.set_position(read.get());
        }
    });
    if let Some(b) = &bar {
        b.finish_and_clear();
    }
    let summary = result.map_err(|e| match e {
        PcapError::Io(_) => anyhow::anyhow!("--pcap {name}: {e}"),
        PcapError::Unsupported(_) | PcapError::Corrupt(_) => usage(format!("--pcap {name}: {e}")),
    })?;
    if let Some(w) = &summary.truncated {
        eprintln!("mtls-agent: warning: --pcap {name}: {w}");
    }
    match args.output {
        Output::Json => println!(
            "{}",
            serde_json::to_string_pretty(&summary.connections)
                .map_err(|e| anyhow::anyhow!("serialising: {e}"))?
        ),
        Output::Table => print!("{}", render_table(&summary)),
    }
    Ok(())
}

fn colored_security(r: &ConnectionRecord) -> String {
    let label = r.security_label();
    match r.security {
        Security::Mtls => label
            .if_supports_color(Stream::Stdout, |t| t.green().to_string())
            .to_string(),
        Security::Tls => label
            .if_supports_color(Stream::Stdout, |t| t.yellow().to_string())
            .to_string(),
        Security::Plaintext => label
            .if_supports_color(Stream::Stdout, |t| t.red().to_string())
            .to_string(),
        Security::Unknown => label
            .if_supports_color(Stream::Stdout, |t| t.dimmed().to_string())
            .to_string(),
    }
}

/// The table for people: one row per connection, then the totals.
pub fn render_table(s: &Summary) -> String {
    let mut out = String::new();
    if !s.connections.is_empty() {
        let mut t = Table::new();
        t.load_preset(UTF8_BORDERS_ONLY)
            .set_content_arrangement(ContentArrangement::Disabled)
            .set_header([
                "CLIENT", "SERVER", "SECURITY", "MESH", "TLS", "ALPN", "SNI", "EVIDENCE",
            ]);
        for r in &s.connections {
            let dash = || "-".to_owned();
            t.add_row([
                r.client.to_string(),
                r.server.to_string(),
                colored_security(r),
                r.mesh.to_string(),
                r.tls_version.map(str::to_owned).unwrap_or_else(dash),
                if r.alpn.is_empty() {
                    dash()
                } else {
                    alpn_cell(&r.alpn)
                },
                r.sni.clone().unwrap_or_else(dash),
                if r.midstream {
                    format!("{} (mid-stream)", r.evidence)
                } else {
                    r.evidence.clone()
                },
            ]);
        }
        out.push_str(&t.to_string());
        out.push('\n');
    }
    let count = |sec: Security| s.connections.iter().filter(|r| r.security == sec).count();
    out.push_str(&format!(
        "{} TCP connections in {} packets: mtls {} · tls {} · plaintext {} · unknown {}\n",
        s.connections.len(),
        s.packets,
        count(Security::Mtls),
        count(Security::Tls),
        count(Security::Plaintext),
        count(Security::Unknown),
    ));
    out
}

/// ALPN lists padded with filler names can be kilobytes long: show the last few entries.
fn alpn_cell(alpn: &[String]) -> String {
    const SHOW: usize = 3;
    let shown: Vec<String> = alpn
        .iter()
        .skip(alpn.len().saturating_sub(SHOW))
        .map(|a| a.chars().take(40).collect())
        .collect();
    if alpn.len() > SHOW {
        format!("(+{}) {}", alpn.len() - SHOW, shown.join(","))
    } else {
        shown.join(",")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::classify::{Evidence, Verdict};

    #[test]
    fn table_lists_connections_and_totals() {
        let mut v = Verdict::new(Security::Mtls, Evidence::ClientFirstRecordLen(465));
        v.alpn = (0..5).map(|i| format!("p{i}")).collect();
        v.tls_version = Some("1.3");
        let rec = ConnectionRecord::new(
            "198.18.0.20:40000".parse().unwrap(),
            "198.18.0.10:8443".parse().unwrap(),
            &v,
            false,
            std::time::SystemTime::UNIX_EPOCH,
            true,
        );
        let s = Summary {
            connections: vec![rec],
            packets: 12,
            ..Summary::default()
        };
        let t = render_table(&s);
        assert!(t.contains("198.18.0.10:8443"), "{t}");
        assert!(t.contains("(+2) p2,p3,p4"), "{t}");
        assert!(t.contains("client_first_record_len=465"), "{t}");
        assert!(t.ends_with(
            "1 TCP connections in 12 packets: mtls 1 · tls 0 · plaintext 0 · unknown 0\n"
        ));
    }
}
