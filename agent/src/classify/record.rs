//! The per-connection record that `classify --pcap` prints and `GET /api/v1/connections` serves,
//! and the bounded ring of recent records the daemon keeps (`--recent-connections`).
//!
//! One type for both, so that the offline and the live answer for the same traffic can be
//! compared field by field (the corpus test does exactly that).
use std::{collections::VecDeque, net::SocketAddr, time::SystemTime};

use super::{Mesh, Protocol, Security, Verdict};

/// One classified TCP connection (DESIGN.md contract of `classify --pcap`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ConnectionRecord {
    /// The side that sent the SYN (guessed from the ports for mid-stream connections).
    pub client: SocketAddr,
    pub server: SocketAddr,
    pub security: Security,
    pub mesh: Mesh,
    pub tls_version: Option<&'static str>,
    /// ALPN protocols offered by the client, in order.
    pub alpn: Vec<String>,
    /// Server name from the ClientHello: `null` on the live API unless the agent runs with
    /// `--expose-handshake-details`.
    pub sni: Option<String>,
    /// The detailed evidence (`client_first_record_len=465`, `resumed_from=1.2.3.4:443`, ...).
    pub evidence: String,
    /// Its bounded kind, as on the `mtls_agent_verdict_evidence_total` counter.
    pub evidence_kind: &'static str,
    /// Plaintext sub-protocol (`http1`, `h2c`, `postgres`, ...), `null` unless plaintext.
    pub protocol: Option<Protocol>,
    pub cipher: Option<String>,
    pub resumed: bool,
    /// The SYN was not seen: the connection was already open when capture started.
    pub midstream: bool,
    /// spiffe:// IDs of the certificates (TLS <= 1.2 only); omitted on the live API unless
    /// `--expose-handshake-details`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub client_spiffe: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub server_spiffe: Vec<String>,
    /// When the verdict was reached (RFC 3339): wall-clock time live, capture time offline.
    #[serde(serialize_with = "rfc3339")]
    pub at: SystemTime,
    /// Live only: the address the client dialled, where a DNAT (a Service) rewrote it to
    /// `server`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dialled: Option<SocketAddr>,
    /// Live only: which sides of the connection this node hosts (the others are remote: this
    /// agent saw them but another node counts them).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub local: Option<Sides>,
}

/// The two sides of a connection: which of them a node hosts, or counts. Each side is counted
/// by the node that hosts it, so a cluster-wide sum counts every connection once per side.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Sides {
    pub client: bool,
    pub server: bool,
}

impl Sides {
    pub const BOTH: Sides = Sides {
        client: true,
        server: true,
    };

    pub fn any(self) -> bool {
        self.client || self.server
    }
}

fn rfc3339<S: serde::Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(&humantime::format_rfc3339_micros(*t))
}

impl ConnectionRecord {
    /// A record of `verdict`. Without `details`, handshake contents that identify more than the
    /// connection itself (SNI, certificate identities) are left out.
    pub fn new(
        client: SocketAddr,
        server: SocketAddr,
        verdict: &Verdict,
        midstream: bool,
        at: SystemTime,
        details: bool,
    ) -> Self {
        ConnectionRecord {
            client,
            server,
            security: verdict.security,
            mesh: verdict.mesh,
            tls_version: verdict.tls_version,
            alpn: verdict.alpn.clone(),
            sni: if details { verdict.sni.clone() } else { None },
            evidence: verdict.evidence.to_string(),
            evidence_kind: verdict.evidence.kind(),
            protocol: verdict.protocol,
            cipher: verdict.cipher.clone(),
            resumed: verdict.resumed,
            midstream,
            client_spiffe: if details {
                verdict.client_spiffe.clone()
            } else {
                Vec::new()
            },
            server_spiffe: if details {
                verdict.server_spiffe.clone()
            } else {
                Vec::new()
            },
            at,
            dialled: None,
            local: None,
        }
    }

    /// `security` with the plaintext sub-protocol, e.g. `plaintext (http1)`.
    pub fn security_label(&self) -> String {
        match (self.security, self.protocol) {
            (Security::Plaintext, Some(p)) => format!("plaintext ({p})"),
            (s, _) => s.to_string(),
        }
    }
}

/// The most recent connection records, oldest first, at most `capacity` of them.
#[derive(Debug)]
pub struct RecentConnections {
    capacity: usize,
    details: bool,
    records: VecDeque<ConnectionRecord>,
    total: u64,
}

/// What `GET /api/v1/connections` answers.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RecentSnapshot {
    /// Size of the ring (`--recent-connections`).
    pub capacity: usize,
    /// Connections recorded since the agent started (older ones have left the ring).
    pub total: u64,
    /// Whether SNI and certificate identities are included (`--expose-handshake-details`).
    pub handshake_details: bool,
    pub connections: Vec<ConnectionRecord>,
}

impl RecentConnections {
    /// A ring of `capacity` records (0 keeps none); `details` keeps SNI and certificate identities.
    pub fn new(capacity: usize, details: bool) -> Self {
        RecentConnections {
            capacity,
            details,
            records: VecDeque::with_capacity(capacity.min(4096)),
            total: 0,
        }
    }

    /// Remembers one classified connection, forgetting the oldest beyond the capacity.
    pub fn push(
        &mut self,
        client: SocketAddr,
        server: SocketAddr,
        verdict: &Verdict,
        midstream: bool,
        at: SystemTime,
    ) {
        self.push_live(client, server, None, Sides::BOTH, verdict, midstream, at);
    }

    /// [`RecentConnections::push`] with what only the live agent knows: the address the client
    /// dialled behind a DNAT, and which sides this node hosts.
    #[allow(clippy::too_many_arguments)]
    pub fn push_live(
        &mut self,
        client: SocketAddr,
        server: SocketAddr,
        dialled: Option<SocketAddr>,
        local: Sides,
        verdict: &Verdict,
        midstream: bool,
        at: SystemTime,
    ) {
        self.total += 1;
        if self.capacity == 0 {
            return;
        }
        while self.records.len() >= self.capacity {
            self.records.pop_front();
        }
        let mut rec = ConnectionRecord::new(client, server, verdict, midstream, at, self.details);
        rec.dialled = dialled;
        rec.local = Some(local);
        self.records.push_back(rec);
    }

    pub fn len(&self) -> usize {
        self.records.len()
    }

    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// A copy of the ring, oldest first.
    pub fn snapshot(&self) -> RecentSnapshot {
        RecentSnapshot {
            capacity: self.capacity,
            total: self.total,
            handshake_details: self.details,
            connections: self.records.iter().cloned().collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::Evidence;
    use super::*;

    fn verdict() -> Verdict {
        let mut v = Verdict::new(Security::Mtls, Evidence::ClientFirstRecordLen(465));
        v.sni = Some("api.shop".into());
        v.alpn = vec!["istio".into()];
        v.client_spiffe = vec!["spiffe://cluster.local/ns/a/sa/b".into()];
        v
    }

    #[test]
    fn ring_is_bounded_and_keeps_the_newest() {
        let mut r = RecentConnections::new(3, false);
        let server: SocketAddr = "198.18.0.10:443".parse().unwrap();
        for port in 1..=5u16 {
            let client = SocketAddr::new("198.18.0.20".parse().unwrap(), port);
            r.push(client, server, &verdict(), false, SystemTime::UNIX_EPOCH);
        }
        let s = r.snapshot();
        assert_eq!(s.total, 5);
        assert_eq!(s.connections.len(), 3);
        let ports: Vec<u16> = s.connections.iter().map(|c| c.client.port()).collect();
        assert_eq!(ports, [3, 4, 5]);
        let mut empty = RecentConnections::new(0, false);
        empty.push(server, server, &verdict(), false, SystemTime::UNIX_EPOCH);
        assert!(empty.is_empty());
        assert_eq!(empty.snapshot().total, 1);
    }

    #[test]
    fn handshake_details_only_when_asked() {
        let addr: SocketAddr = "198.18.0.10:443".parse().unwrap();
        let mut hidden = RecentConnections::new(1, false);
        hidden.push(addr, addr, &verdict(), false, SystemTime::UNIX_EPOCH);
        let json = serde_json::to_value(hidden.snapshot()).unwrap();
        let c = &json["connections"][0];
        assert!(c["sni"].is_null());
        assert!(c.get("client_spiffe").is_none());
        assert_eq!(c["alpn"][0], "istio");
        assert_eq!(c["evidence"], "client_first_record_len=465");
        assert_eq!(c["evidence_kind"], "client_first_record_len");
        assert_eq!(c["security"], "mtls");

        let mut shown = RecentConnections::new(1, true);
        shown.push(addr, addr, &verdict(), false, SystemTime::UNIX_EPOCH);
        let json = serde_json::to_value(shown.snapshot()).unwrap();
        assert_eq!(json["connections"][0]["sni"], "api.shop");
        assert_eq!(
            json["connections"][0]["client_spiffe"][0],
            "spiffe://cluster.local/ns/a/sa/b"
        );
        assert_eq!(json["connections"][0]["at"], "1970-01-01T00:00:00.000000Z");
    }
}
