//! Arbitrary bytes as a capture file for `classify --pcap`: an answer or an error, never a
//! panic, and every record well-formed.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(summary) = mtls_agent::pcap::classify_pcap(data, &mut |_| {}) {
        assert!(summary.tcp_packets <= summary.packets);
        for r in &summary.connections {
            assert!(!r.evidence.is_empty());
        }
    }
});
