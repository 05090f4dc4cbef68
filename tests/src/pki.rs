//! A throw-away certificate authority made with the `openssl` CLI.
//!
//! Keys are EC P-256 (ECDSA with SHA-256): certificates of a few hundred bytes keep handshakes
//! close to what an Istio mesh sends (its workload certificates are EC P-256 too) and make the
//! "client Certificate record is much larger than a Finished" evidence realistic. Leaf
//! certificates carry both serverAuth and clientAuth so one identity can be used on either side.

use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{Context, Result, ensure};

use crate::proc::{self, DEFAULT_TIMEOUT};

/// A subjectAltName entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum San {
    /// A URI SAN, e.g. a SPIFFE ID `spiffe://cluster.local/ns/shop/sa/web`.
    Uri(String),
    /// A DNS name, e.g. `web.shop.svc.cluster.local`.
    Dns(String),
    /// An IP address (lets clients connect by pod IP with hostname checks on).
    Ip(IpAddr),
}

impl San {
    /// The SPIFFE ID Istio gives a workload running as service account `sa` in namespace `ns`.
    pub fn spiffe(ns: &str, sa: &str) -> San {
        San::Uri(format!("spiffe://cluster.local/ns/{ns}/sa/{sa}"))
    }
}

impl fmt::Display for San {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            San::Uri(u) => write!(f, "URI:{u}"),
            San::Dns(d) => write!(f, "DNS:{d}"),
            San::Ip(ip) => write!(f, "IP:{ip}"),
        }
    }
}

/// Where an issued certificate and its key were written (PEM).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertPaths {
    /// Leaf certificate (PEM).
    pub cert: PathBuf,
    /// Unencrypted PKCS#8 private key (PEM).
    pub key: PathBuf,
}

/// A CA whose files live in a directory chosen by the caller (e.g. [`crate::Testbed::workdir`]).
#[derive(Debug)]
pub struct Pki {
    dir: PathBuf,
    ca_cert: PathBuf,
    ca_key: PathBuf,
    serial: AtomicU64,
}

fn openssl(args: &[&str]) -> Result<()> {
    let mut full = vec!["openssl"];
    full.extend_from_slice(args);
    proc::run_in(None, &full, None, DEFAULT_TIMEOUT)?;
    Ok(())
}

fn path_str(p: &Path) -> Result<&str> {
    p.to_str()
        .with_context(|| format!("non-UTF-8 path {}", p.display()))
}

impl Pki {
    /// Creates `dir` (if needed) and a self-signed root CA in it (`ca.crt`, `ca.key`).
    pub fn new(dir: impl AsRef<Path>) -> Result<Pki> {
        let dir = dir.as_ref().to_path_buf();
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let ca_cert = dir.join("ca.crt");
        let ca_key = dir.join("ca.key");
        openssl(&[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-sha256",
            "-days",
            "3650",
            "-subj",
            "/O=mtls-agent testbed/CN=testbed root CA",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
            "-keyout",
            path_str(&ca_key)?,
            "-out",
            path_str(&ca_cert)?,
        ])
        .context("creating the test CA")?;
        // Distinct serials across CAs and runs keep certificates of different beds apart.
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_micros() as u64)
            .unwrap_or(1)
            << 8;
        Ok(Pki {
            dir,
            ca_cert,
            ca_key,
            serial: AtomicU64::new(seed),
        })
    }

    /// The CA certificate: the trust anchor to give servers (to verify clients) and clients.
    pub fn ca_cert(&self) -> &Path {
        &self.ca_cert
    }

    /// The directory holding all files of this CA.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Issues a leaf certificate for `name` (also its CN and file stem: `<name>.crt`,
    /// `<name>.key`) with the given SANs, usable as TLS server and client certificate.
    pub fn issue(&self, name: &str, sans: &[San]) -> Result<CertPaths> {
        ensure!(
            !name.is_empty()
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
                && !name.starts_with('.'),
            "invalid certificate name {name:?}: use [A-Za-z0-9._-]"
        );
        for san in sans {
            let s = san.to_string();
            ensure!(
                !s.contains([',', '\n', '\r']) && s.len() > 4,
                "invalid subjectAltName {s:?}"
            );
        }
        let cert = self.dir.join(format!("{name}.crt"));
        let key = self.dir.join(format!("{name}.key"));
        let csr = self.dir.join(format!("{name}.csr"));
        let ext = self.dir.join(format!("{name}.ext"));
        let mut ext_text = String::from(
            "basicConstraints=critical,CA:FALSE\n\
             keyUsage=critical,digitalSignature,keyAgreement\n\
             extendedKeyUsage=serverAuth,clientAuth\n\
             subjectKeyIdentifier=hash\n\
             authorityKeyIdentifier=keyid\n",
        );
        if !sans.is_empty() {
            let list: Vec<String> = sans.iter().map(|s| s.to_string()).collect();
            ext_text.push_str(&format!("subjectAltName={}\n", list.join(",")));
        }
        std::fs::write(&ext, ext_text).with_context(|| format!("writing {}", ext.display()))?;
        openssl(&[
            "req",
            "-new",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-subj",
            &format!("/O=mtls-agent testbed/CN={name}"),
            "-keyout",
            path_str(&key)?,
            "-out",
            path_str(&csr)?,
        ])
        .with_context(|| format!("creating key and CSR for {name}"))?;
        let serial = format!("{:#x}", self.serial.fetch_add(1, Ordering::Relaxed));
        openssl(&[
            "x509",
            "-req",
            "-sha256",
            "-days",
            "365",
            "-set_serial",
            &serial,
            "-in",
            path_str(&csr)?,
            "-CA",
            path_str(&self.ca_cert)?,
            "-CAkey",
            path_str(&self.ca_key)?,
            "-extfile",
            path_str(&ext)?,
            "-out",
            path_str(&cert)?,
        ])
        .with_context(|| format!("signing the certificate of {name}"))?;
        Ok(CertPaths { cert, key })
    }
}
