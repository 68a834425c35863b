//! What one node shows of its VM: its place in the cluster, the VM's shape, and live
//! handles to its vCPUs, DSM engine and links. The control API's `vm.info` and
//! `vm.counters`, the Prometheus metrics and the `--report` part all read one
//! [`NodeView`].

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use dvmm_api::{NodeCounters, PeerCounters, VcpuCounters};
use dvmm_dsm_uffd::DsmEngine;
use dvmm_vmm::control::VmOutcome;
use dvmm_vmm::live::LiveVm;
use dvmm_vmm::vm::{Vm, VmConfig};

use crate::report::NodeReport;
use crate::NodeLink;

/// One node's view of the VM it runs (see the module's comment).
pub struct NodeView {
    /// This node's index.
    pub(crate) node: u32,
    /// Nodes in the VM.
    pub(crate) nodes: u32,
    /// vCPUs of the whole VM.
    pub(crate) vcpus: u32,
    /// Guest RAM of the whole VM.
    pub(crate) memory_bytes: u64,
    /// The guest's kernel image.
    pub(crate) kernel: PathBuf,
    /// Where the guest profile goes, if profiling.
    pub(crate) profile: Option<PathBuf>,
    /// This node's vCPUs.
    pub(crate) live: LiveVm,
    /// None on a VM of one node.
    pub(crate) dsm: Option<Arc<DsmEngine>>,
    /// None on a VM of one node.
    pub(crate) link: Option<Arc<NodeLink>>,
}

impl NodeView {
    /// The view of node `node` of `nodes` running `cfg`.
    pub(crate) fn new(
        node: u32,
        nodes: u32,
        cfg: &VmConfig,
        vm: &Vm,
        shared: Option<(Arc<DsmEngine>, Arc<NodeLink>)>,
    ) -> NodeView {
        let (dsm, link) = shared.unzip();
        NodeView {
            node,
            nodes,
            vcpus: cfg.vcpus,
            memory_bytes: cfg.memory,
            kernel: cfg.kernel.clone(),
            profile: cfg.profile.as_ref().map(|p| p.output.clone()),
            live: vm.live(),
            dsm,
            link,
        }
    }

    /// The view of a VM of one node (`dvmm run` without `--nodes`).
    pub fn single(cfg: &VmConfig, vm: &Vm) -> NodeView {
        NodeView::new(0, 1, cfg, vm, None)
    }

    /// This node's counters now.
    pub fn counters(&self) -> NodeCounters {
        let live = &self.live;
        let dsm = self.dsm.as_deref();
        NodeCounters {
            peers: self
                .link
                .as_deref()
                .map(|l| {
                    (0..l.transport.nodes())
                        .filter_map(|n| {
                            let s = l.transport.peer_stats(n)?;
                            Some(PeerCounters {
                                peer: u32::from(n),
                                up: s.up,
                                bytes_sent: s.bytes_sent,
                                bytes_received: s.bytes_received,
                                rtt_ns: s.rtt_ns,
                            })
                        })
                        .collect()
                })
                .unwrap_or_default(),
            node: self.node,
            vcpus: live
                .counters()
                .into_iter()
                .map(|c| VcpuCounters {
                    index: c.index,
                    exits_total: c.exits_total,
                    exits: c
                        .exits
                        .into_iter()
                        .map(|(k, n)| (k.to_string(), n))
                        .collect(),
                })
                .collect(),
            dsm: dsm
                .map(|d| {
                    d.stats()
                        .named()
                        .into_iter()
                        .map(|(k, n)| (k.to_string(), n))
                        .collect()
                })
                .unwrap_or_default(),
            paused_ns: u64::try_from(live.paused_for().as_nanos()).unwrap_or(u64::MAX),
            hot_pages: dsm
                .map(|d| {
                    d.hot_pages(32)
                        .into_iter()
                        .map(|(page, r, w)| dvmm_api::HotPage {
                            gpa: dvmm_layout::ram_offset_to_gpa(page * dvmm_layout::PAGE_SIZE),
                            read_faults: u64::from(r),
                            write_faults: u64::from(w),
                        })
                        .collect()
                })
                .unwrap_or_default(),
        }
    }

    /// This node's part of the `--report`, when the VM has ended with `outcome` after
    /// running for `wall`.
    pub fn report(&self, wall: Duration, outcome: &VmOutcome) -> NodeReport {
        NodeReport {
            node: self.node,
            nodes: self.nodes,
            vcpus: self.vcpus,
            wall_s: wall.as_secs_f64(),
            outcome: crate::describe_outcome(outcome),
            counters: self.counters(),
            profile_top: crate::report::profile_top(self.profile.as_deref(), 10),
        }
    }
}
