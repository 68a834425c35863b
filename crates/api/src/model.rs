//! The JSON documents of the API.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Whether the guest runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VmState {
    /// The vCPUs run.
    Running,
    /// Every vCPU is stopped (`vm.pause`).
    Paused,
    /// The VM is ending.
    Stopping,
}

/// `GET /api/v1/vmm.ping`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ping {
    /// dvmm's version.
    pub version: String,
}

/// `GET /api/v1/vm.info`: the VM's shape and state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmInfo {
    /// Running, paused or stopping.
    pub state: VmState,
    /// Nodes that run the guest together.
    pub nodes: u32,
    /// The node answering (absent from a local cluster's launcher, which speaks for all).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<u32>,
    /// vCPUs of the whole VM.
    pub vcpus: u32,
    /// The vCPUs the answering node runs (all of them from a launcher).
    pub local_vcpus: Vec<u32>,
    /// Guest RAM of the whole VM, in bytes.
    pub memory_bytes: u64,
    /// The guest kernel image.
    pub kernel: String,
    /// dvmm's version.
    pub version: String,
    /// The guest's kvmclock, in ns: it does not advance while the VM is paused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest_clock_ns: Option<u64>,
}

/// `GET /api/v1/vm.counters`: counters since the VM started, per node.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counters {
    /// One entry per node that answered (a node answers for itself; a launcher for all).
    pub nodes: Vec<NodeCounters>,
}

/// One node's counters.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeCounters {
    /// The node.
    pub node: u32,
    /// Its vCPUs.
    pub vcpus: Vec<VcpuCounters>,
    /// Its DSM engine's counters by name (faults by kind, messages and pages sent and
    /// received, holds, ...); empty on a VM of one node.
    pub dsm: BTreeMap<String, u64>,
    /// Nanoseconds the VM has spent paused on this node.
    pub paused_ns: u64,
    /// The pages whose guest faults on this node needed the DSM protocol most often
    /// since the start, most first (at most 32; empty on a VM of one node).
    #[serde(default)]
    pub hot_pages: Vec<HotPage>,
    /// The connections to the other nodes.
    #[serde(default)]
    pub peers: Vec<PeerCounters>,
}

/// Traffic with one other node.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerCounters {
    /// The other node.
    pub peer: u32,
    /// Whether the connection is up.
    pub up: bool,
    /// Payload bytes sent to it.
    pub bytes_sent: u64,
    /// Payload bytes received from it.
    pub bytes_received: u64,
    /// The last measured round trip, in ns (0 until measured).
    pub rtt_ns: u64,
}

/// A page guest code on this node keeps faulting on (its copy moved away or was
/// write-protected because another node used it).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HotPage {
    /// Guest-physical address of the page.
    pub gpa: u64,
    /// Read faults on it since the start.
    pub read_faults: u64,
    /// Write faults on it since the start.
    pub write_faults: u64,
}

/// One vCPU's counters.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VcpuCounters {
    /// The vCPU (= APIC id).
    pub index: u32,
    /// Returns from `KVM_RUN`.
    pub exits_total: u64,
    /// Exits by kind (`pio`, `mmio`, `msr`, `hlt`, ...).
    pub exits: BTreeMap<String, u64>,
}

/// The body of every 4xx/5xx answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// What went wrong.
    pub error: String,
}
