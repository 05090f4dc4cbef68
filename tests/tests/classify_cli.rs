//! `mtls-agent classify --pcap` as a user runs it: the real binary on real captures (cut from the
//! corpus test's capture of OpenSSL, PostgreSQL, h2c and hostile traffic, kept in
//! fuzz/seeds/pcap), exit codes, one-line errors and warnings, JSON contract, no colour off a TTY.
//! Needs no root.
use std::{
    path::{Path, PathBuf},
    process::Output,
};

use anyhow::{Context as _, Result, ensure};
use mtls_agent_testbed::agent_bin;
use serde_json::Value;

fn seeds() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/seeds/pcap")
}

fn classify(args: &[&str]) -> Result<Output> {
    let out = std::process::Command::new(agent_bin()?)
        .arg("classify")
        .args(args)
        .env("NO_COLOR", "1")
        .output()?;
    Ok(out)
}

fn json(file: &Path) -> Result<Vec<Value>> {
    let out = classify(&["--pcap", file.to_str().context("path")?, "--output", "json"])?;
    ensure!(
        out.status.success() && out.stderr.is_empty(),
        "{}: {:?} {}",
        file.display(),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(serde_json::from_slice(&out.stdout)?)
}

fn summary(records: &[Value]) -> Vec<String> {
    records
        .iter()
        .map(|r| {
            format!(
                "{} {} {} {} {}",
                r["server"].as_str().unwrap_or_default(),
                r["security"].as_str().unwrap_or_default(),
                r["tls_version"].as_str().unwrap_or("-"),
                r["protocol"].as_str().unwrap_or("-"),
                r["evidence"].as_str().unwrap_or_default()
            )
        })
        .collect()
}

#[test]
fn real_captures_are_classified() -> Result<()> {
    let s = |name: &str| -> Result<Vec<String>> { Ok(summary(&json(&seeds().join(name))?)) };
    assert_eq!(
        s("openssl-tls13-mtls.pcapng")?,
        ["198.18.0.10:8401 mtls 1.3 - client_first_record_len=1034"; 2]
    );
    assert_eq!(
        s("openssl-tls12-mtls.pcap")?,
        ["198.18.0.10:8403 mtls 1.2 - client_certificate"; 2]
    );
    assert_eq!(
        s("openssl-tls12-resumed.pcap")?,
        [
            "198.18.0.10:8409 tls 1.2 - no_client_certificate",
            "198.18.0.10:8409 tls 1.2 - resumed_from=198.18.0.10:8409",
            "198.18.0.10:8409 tls 1.2 - resumed_from=198.18.0.10:8409",
        ]
    );
    let pg = [
        "198.18.0.10:5432 plaintext - postgres plaintext_first_bytes",
        "198.18.0.10:5432 tls 1.2 - client_certificate_empty",
        "198.18.0.10:5432 mtls 1.2 - client_certificate",
    ];
    assert_eq!(s("postgres.pcapng")?, [pg, pg].concat());
    let hostile = "198.18.0.10:9000 unknown - - malformed";
    let h2c = "198.18.0.10:8081 plaintext - h2c plaintext_first_bytes";
    assert_eq!(
        s("h2c-and-hostile.pcap")?,
        [h2c, h2c, hostile, hostile, hostile]
    );

    // The JSON contract of DESIGN.md.
    let r = &json(&seeds().join("openssl-tls13-mtls.pcapng"))?[0];
    for key in [
        "client",
        "server",
        "security",
        "mesh",
        "tls_version",
        "alpn",
        "sni",
        "evidence",
        "protocol",
    ] {
        assert!(r.get(key).is_some(), "{key} missing in {r}");
    }
    assert_eq!(r["mesh"], "istio");
    assert_eq!(
        r["alpn"],
        serde_json::json!(["istio-peer-exchange", "istio"])
    );
    Ok(())
}

#[test]
fn table_output_has_no_colour_off_a_terminal() -> Result<()> {
    let f = seeds().join("postgres.pcapng");
    let out = classify(&["--pcap", f.to_str().context("path")?])?;
    ensure!(out.status.success());
    let text = String::from_utf8(out.stdout)?;
    assert!(!text.contains('\x1b'), "{text}");
    assert!(text.contains("plaintext (postgres)"), "{text}");
    assert!(
        text.ends_with(
            "6 TCP connections in 214 packets: mtls 2 · tls 2 · plaintext 2 · unknown 0\n"
        ),
        "{text}"
    );
    let help = std::process::Command::new(agent_bin()?)
        .args(["classify", "--help"])
        .output()?;
    assert!(String::from_utf8(help.stdout)?.contains("mtls-agent classify --pcap pod.pcapng"));
    Ok(())
}

#[test]
fn truncated_file_warns_and_keeps_what_was_read() -> Result<()> {
    let full = std::fs::read(seeds().join("openssl-tls12-mtls.pcap"))?;
    let dir = tempfile::tempdir()?;
    let cut = dir.path().join("cut.pcap");
    std::fs::write(&cut, &full[..full.len() * 2 / 3])?;
    let out = classify(&["--pcap", cut.to_str().context("path")?, "--output", "json"])?;
    assert_eq!(out.status.code(), Some(0));
    let err = String::from_utf8(out.stderr)?;
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.starts_with("mtls-agent: warning: --pcap ") && err.contains("cut.pcap"),
        "{err}"
    );
    let records: Vec<Value> = serde_json::from_slice(&out.stdout)?;
    assert!(!records.is_empty());
    assert_eq!(records[0]["security"], "mtls");
    Ok(())
}

#[test]
fn bad_input_exits_2_with_one_line_naming_the_file() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let text = dir.path().join("notes.txt");
    std::fs::write(&text, "GET / HTTP/1.1\r\n\r\n")?;
    let wifi = dir.path().join("wifi.pcap");
    let mut hdr = vec![0xd4, 0xc3, 0xb2, 0xa1, 2, 0, 4, 0];
    hdr.extend_from_slice(&[0; 8]);
    hdr.extend_from_slice(&65535u32.to_le_bytes());
    hdr.extend_from_slice(&127u32.to_le_bytes()); // 802.11 radiotap
    std::fs::write(&wifi, &hdr)?;
    let cut_header = dir.path().join("cut-header.pcap");
    std::fs::write(&cut_header, &hdr[..10])?;
    let missing = dir.path().join("missing.pcap");
    for (file, reason) in [
        (&text, "not a pcap or pcapng file"),
        (&wifi, "unsupported link type"),
        (&cut_header, "cut short"),
        (&missing, "No such file"),
    ] {
        let out = classify(&["--pcap", file.to_str().context("path")?])?;
        let err = String::from_utf8(out.stderr)?;
        assert_eq!(out.status.code(), Some(2), "{}: {err}", file.display());
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(
            err.contains(&file.display().to_string()) && err.contains(reason),
            "{err}"
        );
        assert!(out.stdout.is_empty());
    }
    Ok(())
}
