//! A node's Prometheus metrics (`--metrics-addr`): what its vCPUs, DSM engine and links
//! did since the VM started. Names follow Prometheus' conventions: `dvmm_` prefix,
//! `_total` counters, base units (`_seconds`, `_bytes`).

use std::sync::atomic::Ordering;

use dvmm_api::metrics::{Exposition, Kind, MetricsSource};
use dvmm_dsm_uffd::{DsmEngine, FAULT_WAIT_BOUNDS_NS};

use crate::view::NodeView;
use crate::NodeLink;

const NS: f64 = 1e-9;

impl MetricsSource for NodeView {
    fn collect(&self, e: &mut Exposition) {
        let node = self.node.to_string();
        let nodes = self.nodes.to_string();
        e.simple(
            "dvmm_node_info",
            "This node: its index and the cluster's size (always 1).",
            Kind::Gauge,
            &[(
                vec![
                    ("node", node.as_str()),
                    ("nodes", nodes.as_str()),
                    ("version", env!("CARGO_PKG_VERSION")),
                ],
                1.0,
            )],
        );
        e.simple(
            "dvmm_vm_paused",
            "1 while the VM is paused through the control API.",
            Kind::Gauge,
            &[(vec![], f64::from(u8::from(self.live.is_paused())))],
        );
        e.simple(
            "dvmm_vm_paused_seconds_total",
            "Time the VM has spent paused.",
            Kind::Counter,
            &[(vec![], self.live.paused_for().as_secs_f64())],
        );

        let counts = self.live.counters();
        let idx: Vec<String> = counts.iter().map(|c| c.index.to_string()).collect();
        e.family(
            "dvmm_vcpu_exits_total",
            "VM exits of this node's vCPUs, by kind.",
            Kind::Counter,
        );
        for (c, i) in counts.iter().zip(&idx) {
            for (kind, n) in &c.exits {
                e.sample(
                    "dvmm_vcpu_exits_total",
                    &[("vcpu", i), ("kind", kind)],
                    *n as f64,
                );
            }
        }

        if let Some(dsm) = &self.dsm {
            dsm_metrics(e, dsm);
        }
        if let Some(link) = &self.link {
            link_metrics(e, link);
        }
    }
}

fn dsm_metrics(e: &mut Exposition, dsm: &DsmEngine) {
    let s = dsm.stats();
    let c = |v: u64| v as f64;
    e.simple(
        "dvmm_dsm_faults_total",
        "DSM faults by kind: guest reads and writes (userfaultfd), holes (missing), \
         unmapped page-cache pages (minor), write-protected pages (wp), faults already \
         satisfied (spurious), VMM accesses that missed (vmm).",
        Kind::Counter,
        &[
            (vec![("kind", "read")], c(s.read_faults)),
            (vec![("kind", "write")], c(s.write_faults)),
            (vec![("kind", "missing")], c(s.missing_faults)),
            (vec![("kind", "minor")], c(s.minor_faults)),
            (vec![("kind", "wp")], c(s.wp_faults)),
            (vec![("kind", "spurious")], c(s.spurious_faults)),
            (vec![("kind", "vmm")], c(s.vmm_faults)),
        ],
    );
    e.simple(
        "dvmm_dsm_messages_total",
        "DSM protocol messages.",
        Kind::Counter,
        &[
            (vec![("direction", "sent")], c(s.msgs_sent)),
            (vec![("direction", "received")], c(s.msgs_received)),
        ],
    );
    e.simple(
        "dvmm_dsm_pages_total",
        "DSM messages carrying a 4 KiB page.",
        Kind::Counter,
        &[
            (vec![("direction", "sent")], c(s.pages_sent)),
            (vec![("direction", "received")], c(s.pages_received)),
        ],
    );
    let plain: [(&str, &str, u64); 9] = [
        (
            "dvmm_dsm_zero_grants_total",
            "Grants of a zero page (no payload).",
            s.zero_grants,
        ),
        (
            "dvmm_dsm_deferred_messages_total",
            "Messages held back because their page was held (pinned) here.",
            s.deferred_msgs,
        ),
        (
            "dvmm_dsm_kicks_deferred_total",
            "vCPU kicks held back until the kicked thread's fault was answered.",
            s.kicks_deferred,
        ),
        (
            "dvmm_dsm_invalidations_total",
            "Local mappings dropped (another node took the page).",
            s.invalidations,
        ),
        (
            "dvmm_dsm_downgrades_total",
            "Local mappings write-protected.",
            s.downgrades,
        ),
        (
            "dvmm_dsm_quiesces_total",
            "Times the vCPUs were held out of KVM to drop shadow page tables.",
            s.quiesces,
        ),
        (
            "dvmm_dsm_protocol_errors_total",
            "Messages the protocol state machine ignored.",
            s.protocol_errors,
        ),
        (
            "dvmm_dsm_bad_messages_total",
            "Malformed DSM messages dropped.",
            s.bad_msgs,
        ),
        (
            "dvmm_dsm_prefetched_pages_total",
            "Pages requested by read-ahead.",
            s.prefetched,
        ),
    ];
    for (name, help, v) in plain {
        e.simple(name, help, Kind::Counter, &[(vec![], c(v))]);
    }
    e.simple(
        "dvmm_dsm_quiesce_seconds_total",
        "Time spent holding the vCPUs out of KVM (or waiting to).",
        Kind::Counter,
        &[(vec![], s.quiesce_ns as f64 * NS)],
    );
    e.simple(
        "dvmm_dsm_busy_seconds_total",
        "Time the DSM engine spent handling faults and messages under its lock.",
        Kind::Counter,
        &[(vec![], s.busy_ns as f64 * NS)],
    );
    e.family(
        "dvmm_dsm_fault_wait_seconds",
        "How long a faulting vCPU thread waited for its page (fault event to wake-up).",
        Kind::Histogram,
    );
    let buckets: Vec<(f64, u64)> = FAULT_WAIT_BOUNDS_NS
        .iter()
        .zip(s.fault_wait_buckets)
        .map(|(b, n)| (*b as f64 * NS, n))
        .collect();
    e.histogram(
        "dvmm_dsm_fault_wait_seconds",
        &[],
        &buckets,
        s.fault_wait_ns as f64 * NS,
        s.faults_resolved,
    );
}

fn link_metrics(e: &mut Exposition, link: &NodeLink) {
    let peers: Vec<(String, dvmm_transport::PeerStats)> = (0..link.transport.nodes())
        .filter_map(|n| Some((n.to_string(), link.transport.peer_stats(n)?)))
        .collect();
    let per_peer =
        |f: &dyn Fn(&dvmm_transport::PeerStats) -> f64| -> Vec<(Vec<(&str, &str)>, f64)> {
            peers
                .iter()
                .map(|(p, s)| (vec![("peer", p.as_str())], f(s)))
                .collect()
        };
    e.simple(
        "dvmm_peer_up",
        "1 while the connection to the peer node is up.",
        Kind::Gauge,
        &per_peer(&|s| f64::from(u8::from(s.up))),
    );
    e.simple(
        "dvmm_peer_rtt_seconds",
        "The last round trip to the peer, measured once a second (0 until measured).",
        Kind::Gauge,
        &per_peer(&|s| s.rtt_ns as f64 * NS),
    );
    for (name, help, sent, received) in [
        (
            "dvmm_peer_frames_total",
            "Transport frames exchanged with the peer (messages, heartbeats, probes).",
            (|s: &dvmm_transport::PeerStats| s.frames_sent) as fn(&_) -> u64,
            (|s: &dvmm_transport::PeerStats| s.frames_received) as fn(&_) -> u64,
        ),
        (
            "dvmm_peer_bytes_total",
            "Payload bytes exchanged with the peer (DSM pages, control messages).",
            |s: &dvmm_transport::PeerStats| s.bytes_sent,
            |s: &dvmm_transport::PeerStats| s.bytes_received,
        ),
    ] {
        e.family(name, help, Kind::Counter);
        for (p, s) in &peers {
            e.sample(name, &[("peer", p), ("direction", "sent")], sent(s) as f64);
            e.sample(
                name,
                &[("peer", p), ("direction", "received")],
                received(s) as f64,
            );
        }
    }
    e.family(
        "dvmm_interrupts_forwarded_total",
        "Interrupt messages sent to a vCPU on the peer node.",
        Kind::Counter,
    );
    for (p, n) in link.irqs_sent.iter().enumerate() {
        if p != usize::from(link.id) {
            let p = p.to_string();
            e.sample(
                "dvmm_interrupts_forwarded_total",
                &[("peer", &p)],
                n.load(Ordering::Relaxed) as f64,
            );
        }
    }
    e.simple(
        "dvmm_io_forwarded_total",
        "Device accesses forwarded to the node that has the device.",
        Kind::Counter,
        &[(vec![], link.next_io.load(Ordering::Relaxed) as f64)],
    );
}
