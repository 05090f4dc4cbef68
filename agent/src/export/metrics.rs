//! Every Prometheus series the agent exports (names and labels are a contract: DESIGN.md and
//! docs/metrics.md). One registry per agent so tests can run several in one process.
use prometheus::{
    Gauge, GaugeVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
};

/// Labels of the blocking series. `client_address` is set only for clients without identity
/// (empty otherwise); distinct label sets per server are capped by `--max-blocking-clients`.
pub const BLOCKING_LABELS: &[&str] = &[
    "namespace",
    "workload",
    "port",
    "client_namespace",
    "client_workload",
    "client_address",
    "security",
];

#[derive(Clone)]
pub struct Metrics {
    pub registry: Registry,
    pub connections: IntCounterVec,
    pub bytes: IntCounterVec,
    pub strict_ready: IntGaugeVec,
    pub mtls_ratio: GaugeVec,
    pub blocking: IntCounterVec,
    pub blocking_last_seen: GaugeVec,
    pub inbound: IntCounterVec,
    pub workload_info: IntGaugeVec,
    pub strict_intended: IntGaugeVec,
    pub rejected: IntCounterVec,
    /// Sides of connections this node saw in one direction only (evidence `one_direction`).
    pub one_direction: IntCounterVec,
    pub identity_last_sync: Gauge,
    pub blocking_overflow: IntCounterVec,
    /// Judged inbound connections per server port (bounded, issue 12: port-level policies).
    pub inbound_port: IntCounterVec,
    /// The labels a PeerAuthentication selector for a workload uses (issue 12).
    pub workload_selector: IntGaugeVec,
    pub evidence: IntCounterVec,
    pub unattributed: IntCounterVec,
    pub events_lost: IntCounterVec,
    pub kernel_errors: IntCounterVec,
    /// Kernel flow-table entries the agent deleted as garbage (capture/gc.rs), by reason.
    pub flow_table_gc: IntCounterVec,
    /// Kernel flow-table entries counted by the last garbage-collection pass.
    pub flow_table_entries: IntGauge,
    pub tcp_packets: IntCounter,
    /// Payload bytes the kernel program copied to the ring buffer (kernel stat BYTES_COPIED).
    pub capture_bytes: IntCounter,
    pub events: IntCounter,
    pub decode_errors: IntCounter,
    pub flows_tracked: IntGauge,
    pub flows_ended_unseen: IntCounter,
    pub interfaces_attached: IntGauge,
    pub attach_failures: IntCounter,
    /// Selected interfaces the TC programs cannot read, by reason (capture/attach.rs).
    pub interfaces_unsupported: IntGaugeVec,
    /// Attached interfaces by the end of the pod's veth the programs went on (host|pod).
    pub interfaces_attached_side: IntGaugeVec,
    /// Attached interfaces by our place in each hook's chain (first|tied|later).
    pub tc_chain_position: IntGaugeVec,
    /// Attached interfaces where other programs are on the same hook.
    pub tc_chain_shared: IntGaugeVec,
    /// Kubernetes mode: pods of this node never seen on a watched interface (identity/coverage.rs).
    pub pods_unseen: IntGauge,
    pub build_info: IntGaugeVec,
    pub uptime: Gauge,
    /// Kubernetes mode (identity/kubernetes_watch.rs): failed list/watch calls per resource.
    pub kubernetes_api_errors: IntCounterVec,
    /// Kubernetes mode: Unix time of the last complete list or watch event per resource.
    pub kubernetes_last_sync: GaugeVec,
    /// Kubernetes mode: 1 for the effective namespace-level PeerAuthentication mode.
    pub namespace_peer_authentication_mode: IntGaugeVec,
}

fn counter_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels).expect("static metric definition");
    r.register(Box::new(c.clone())).expect("unique metric name");
    c
}

fn counter(r: &Registry, name: &str, help: &str) -> IntCounter {
    let c = IntCounter::new(name, help).expect("static metric definition");
    r.register(Box::new(c.clone())).expect("unique metric name");
    c
}

fn gauge(r: &Registry, name: &str, help: &str) -> IntGauge {
    let g = IntGauge::new(name, help).expect("static metric definition");
    r.register(Box::new(g.clone())).expect("unique metric name");
    g
}

fn gauge_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    let g = IntGaugeVec::new(Opts::new(name, help), labels).expect("static metric definition");
    r.register(Box::new(g.clone())).expect("unique metric name");
    g
}

impl Metrics {
    pub fn new() -> Self {
        let r = Registry::new();
        let wl = &["namespace", "workload", "direction", "security"];
        let connections = counter_vec(
            &r,
            "mtls_agent_connections_total",
            "TCP connections by workload, direction (from that workload's point of view) and security (mtls, tls, plaintext, unknown).",
            wl,
        );
        let bytes = counter_vec(
            &r,
            "mtls_agent_bytes_total",
            "Bytes on the wire (both directions) of ended connections, by workload, direction and security.",
            wl,
        );
        let strict_ready = IntGaugeVec::new(
            Opts::new(
                "mtls_agent_namespace_strict_ready",
                "1 when every non-exempt inbound connection to the namespace in the window was Istio mTLS (STRICT would break nothing), else 0.",
            ),
            &["namespace"],
        )
        .expect("static metric definition");
        r.register(Box::new(strict_ready.clone()))
            .expect("unique metric name");
        let mtls_ratio = GaugeVec::new(
            Opts::new(
                "mtls_agent_namespace_mtls_ratio",
                "Share of non-exempt inbound connections to the namespace in the window that STRICT accepts (Istio mTLS).",
            ),
            &["namespace"],
        )
        .expect("static metric definition");
        r.register(Box::new(mtls_ratio.clone()))
            .expect("unique metric name");
        let blocking = counter_vec(
            &r,
            "mtls_agent_blocking_connections_total",
            "Inbound connections STRICT would reject, by server workload and port and client identity (bounded: extra clients per server are folded into client_workload=\"other\").",
            BLOCKING_LABELS,
        );
        let blocking_last_seen = GaugeVec::new(
            Opts::new(
                "mtls_agent_blocking_last_seen_timestamp_seconds",
                "Unix time of the last blocking connection per series of mtls_agent_blocking_connections_total.",
            ),
            BLOCKING_LABELS,
        )
        .expect("static metric definition");
        r.register(Box::new(blocking_last_seen.clone()))
            .expect("unique metric name");
        let inbound = counter_vec(
            &r,
            "mtls_agent_inbound_connections_total",
            "Inbound connections to a workload by security and how STRICT would treat them (strict: compliant, blocking, exempt).",
            &["namespace", "workload", "security", "strict"],
        );
        let workload_info = IntGaugeVec::new(
            Opts::new(
                "mtls_agent_workload_info",
                "Known workloads; always 1. Label sidecar is true when the workload has an Istio sidecar.",
            ),
            &["namespace", "workload", "sidecar"],
        )
        .expect("static metric definition");
        r.register(Box::new(workload_info.clone()))
            .expect("unique metric name");
        let rejected = counter_vec(
            &r,
            "mtls_agent_rejected_connections_total",
            "Inbound connections the server reset or closed right after the client's first bytes without answering (what a STRICT sidecar does to plaintext).",
            &["namespace", "workload", "security"],
        );
        let one_direction = counter_vec(
            &r,
            "mtls_agent_one_direction_connections_total",
            "Connections this node saw in one direction only (a packet acknowledged traffic of the other direction that no hook here saw), counted as unknown with evidence one_direction; each side by the node that hosts it.",
            &["namespace", "workload", "direction"],
        );
        let strict_intended = IntGaugeVec::new(
            Opts::new(
                "mtls_agent_namespace_strict_intended",
                "1 when the namespace's PeerAuthentication mode is STRICT (Kubernetes mode), so plaintext reaching it is rejected; 0 otherwise.",
            ),
            &["namespace"],
        )
        .expect("static metric definition");
        r.register(Box::new(strict_intended.clone()))
            .expect("unique metric name");
        let identity_last_sync = Gauge::new(
            "mtls_agent_identity_last_sync_timestamp_seconds",
            "Unix time the identity source last synced: the inventory file's load, or the oldest of the Kubernetes watches' last syncs.",
        )
        .expect("static metric definition");
        r.register(Box::new(identity_last_sync.clone()))
            .expect("unique metric name");
        let blocking_overflow = counter_vec(
            &r,
            "mtls_agent_blocking_clients_overflow_total",
            "Blocking connections whose client was folded into client_workload=\"other\" because the server already had the maximum number of distinct client label sets.",
            &["namespace", "workload"],
        );
        let inbound_port = counter_vec(
            &r,
            "mtls_agent_inbound_port_connections_total",
            "Judged (not exempt) inbound connections to a workload by server port, for port-level PeerAuthentication (bounded: ports beyond the first 16 per workload are port=\"other\").",
            &["namespace", "workload", "port"],
        );
        let workload_selector = IntGaugeVec::new(
            Opts::new(
                "mtls_agent_workload_selector_info",
                "Always 1: the labels all pods of a workload have (selector=\"k=v,k2=v2\", sorted), for the selector of a generated PeerAuthentication. Only for workloads whose labels are known.",
            ),
            &["namespace", "workload", "selector"],
        )
        .expect("static metric definition");
        r.register(Box::new(workload_selector.clone()))
            .expect("unique metric name");
        let evidence = counter_vec(
            &r,
            "mtls_agent_verdict_evidence_total",
            "Classified connections by security and the rule that decided it.",
            &["security", "evidence"],
        );
        let unattributed = counter_vec(
            &r,
            "mtls_agent_unattributed_connections_total",
            "Connections where neither endpoint is a known workload.",
            &["security"],
        );
        let events_lost = counter_vec(
            &r,
            "mtls_agent_events_lost_total",
            "Handshake data the kernel program could not deliver (ring_buffer_full, copy_failed) or the agent could not decode (decode_error).",
            &["reason"],
        );
        let kernel_errors = counter_vec(
            &r,
            "mtls_agent_kernel_errors_total",
            "Packets the kernel program could not track: flow_table_full, parse_error, ipv6_extension_headers.",
            &["reason"],
        );
        let flow_table_gc = counter_vec(
            &r,
            "mtls_agent_flow_table_gc_total",
            "Kernel flow-table entries the agent deleted as garbage: interface_gone (its interface was deleted or is no longer watched), handshake_timeout (a SYN never answered, older than 3 minutes), closed (ended connections, once idle for a second).",
            &["reason"],
        );
        let flow_table_entries = gauge(
            &r,
            "mtls_agent_flow_table_entries",
            "Kernel flow-table entries at the last garbage-collection pass (every 60 s); compare with --flow-table-size.",
        );
        let tcp_packets = counter(
            &r,
            "mtls_agent_tcp_packets_total",
            "TCP packets seen by the kernel program.",
        );
        let capture_bytes = counter(
            &r,
            "mtls_agent_capture_bytes_total",
            "Payload bytes the kernel program copied to the ring buffer (each data event adds a 96-byte header).",
        );
        let events = counter(
            &r,
            "mtls_agent_events_total",
            "Events read from the ring buffer.",
        );
        let decode_errors = counter(
            &r,
            "mtls_agent_event_decode_errors_total",
            "Ring-buffer records that could not be decoded.",
        );
        let flows_tracked = gauge(
            &r,
            "mtls_agent_flows_tracked",
            "Connections currently tracked by the agent.",
        );
        let flows_ended_unseen = counter(
            &r,
            "mtls_agent_flows_ended_unseen_total",
            "Tracked connections ended because their kernel flow-table entry went without a close.",
        );
        let interfaces_attached = gauge(
            &r,
            "mtls_agent_interfaces_attached",
            "Interfaces the TC programs are attached to.",
        );
        let interfaces_unsupported = gauge_vec(
            &r,
            "mtls_agent_interfaces_unsupported",
            "Pod-facing interfaces not watched because the TC programs cannot read them, by reason.",
            &["reason"],
        );
        let interfaces_attached_side = gauge_vec(
            &r,
            "mtls_agent_interfaces_attached_side",
            "Attached interfaces by the end of the pod's veth the TC programs are on (host: the host-side interface; pod: the pod's end, which sees packets a CNI redirects into the pod).",
            &["side"],
        );
        let tc_chain_position = gauge_vec(
            &r,
            "mtls_agent_tc_chain_position",
            "Attached interfaces by the place of the agent's program in the hook's chain.",
            &["hook", "position"],
        );
        let tc_chain_shared = gauge_vec(
            &r,
            "mtls_agent_tc_chain_shared",
            "Attached interfaces where other TC programs are on the same hook.",
            &["hook"],
        );
        let pods_unseen = gauge(
            &r,
            "mtls_agent_pods_unseen",
            "Kubernetes mode: pods of this node whose addresses no watched interface has shown.",
        );
        let attach_failures = counter(
            &r,
            "mtls_agent_attach_failures_total",
            "Failed attempts to attach to a matching interface.",
        );
        let build_info = IntGaugeVec::new(
            Opts::new("mtls_agent_build_info", "Build information; always 1."),
            &["version", "kernel"],
        )
        .expect("static metric definition");
        r.register(Box::new(build_info.clone()))
            .expect("unique metric name");
        let uptime = Gauge::new(
            "mtls_agent_uptime_seconds",
            "Seconds since the agent started.",
        )
        .expect("static metric definition");
        r.register(Box::new(uptime.clone()))
            .expect("unique metric name");
        for reason in ["ring_buffer_full", "copy_failed", "decode_error"] {
            events_lost.with_label_values(&[reason]);
        }
        for reason in ["flow_table_full", "parse_error", "ipv6_extension_headers"] {
            kernel_errors.with_label_values(&[reason]);
        }
        for reason in ["interface_gone", "handshake_timeout", "closed"] {
            flow_table_gc.with_label_values(&[reason]);
        }
        // Kubernetes mode (issue 4).
        let kubernetes_api_errors = counter_vec(
            &r,
            "mtls_agent_kubernetes_api_errors_total",
            "Failed Kubernetes API list/watch calls (also 410 Gone and dropped watches), by resource: pods, namespaces, nodes, peerauthentications.",
            &["resource"],
        );
        let kubernetes_last_sync = GaugeVec::new(
            Opts::new(
                "mtls_agent_kubernetes_last_sync_timestamp_seconds",
                "Unix time of the last complete list or watch event received from the Kubernetes API, by resource.",
            ),
            &["resource"],
        )
        .expect("static metric definition");
        r.register(Box::new(kubernetes_last_sync.clone()))
            .expect("unique metric name");
        let namespace_peer_authentication_mode = IntGaugeVec::new(
            Opts::new(
                "mtls_agent_namespace_peer_authentication_mode",
                "Kubernetes mode: 1 for the namespace's effective Istio PeerAuthentication mode (namespace policy, else mesh policy, else PERMISSIVE), 0 for the other modes.",
            ),
            &["namespace", "mode"],
        )
        .expect("static metric definition");
        r.register(Box::new(namespace_peer_authentication_mode.clone()))
            .expect("unique metric name");
        Self {
            registry: r,
            connections,
            bytes,
            strict_ready,
            mtls_ratio,
            blocking,
            blocking_last_seen,
            inbound,
            workload_info,
            strict_intended,
            rejected,
            one_direction,
            identity_last_sync,
            blocking_overflow,
            inbound_port,
            workload_selector,
            evidence,
            unattributed,
            events_lost,
            kernel_errors,
            flow_table_gc,
            flow_table_entries,
            tcp_packets,
            capture_bytes,
            events,
            decode_errors,
            flows_tracked,
            flows_ended_unseen,
            interfaces_attached,
            attach_failures,
            interfaces_unsupported,
            interfaces_attached_side,
            tc_chain_position,
            tc_chain_shared,
            pods_unseen,
            build_info,
            uptime,
            kubernetes_api_errors,
            kubernetes_last_sync,
            namespace_peer_authentication_mode,
        }
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let mut buf = String::new();
        let enc = prometheus::TextEncoder::new();
        if let Err(e) = enc.encode_utf8(&self.registry.gather(), &mut buf) {
            tracing::warn!(error = %e, "encoding metrics failed");
        }
        buf
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Adds `now - seen` to a counter that mirrors a kernel total, when it grew. For a value that
/// can dip (an estimate), the counter follows its high-water mark.
pub fn mirror(counter: &IntCounter, seen: &mut u64, now: u64) {
    if now > *seen {
        counter.inc_by(now - *seen);
        *seen = now;
    }
}
