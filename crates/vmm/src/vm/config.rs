//! What a VM is built from: the user's configuration and, in a cluster, this node's
//! place in it.

use std::path::PathBuf;
use std::sync::Arc;

use dvmm_layout::cpu_features::{CpuFeatures, CpuModel};

use crate::control::VmControl;
use crate::device_space::RemoteIo;
use crate::irqchip::RemoteInterrupts;

/// What to run.
#[derive(Clone, Debug)]
pub struct VmConfig {
    /// Kernel image (bzImage or PVH ELF).
    pub kernel: PathBuf,
    /// Optional initramfs.
    pub initramfs: Option<PathBuf>,
    /// Kernel command line.
    pub cmdline: String,
    /// Number of vCPUs.
    pub vcpus: u32,
    /// Guest RAM in bytes.
    pub memory: u64,
    /// Sample the vCPUs and write a flat profile at the end.
    pub profile: Option<crate::profile::ProfileConfig>,
    /// Disk images, attached as virtio-blk devices in this order (every node is given
    /// the whole list; each opens those it serves).
    pub disks: Vec<DiskConfig>,
    /// Network cards (virtio-net on host TAP devices), in this order.
    pub nets: Vec<NetConfig>,
    /// A virtio-rng device fed by the host's `/dev/urandom` (node 0's).
    pub rng: bool,
    /// A virtio-console (the guest's `/dev/hvc0`) and where its bytes go (node 0's).
    pub console: Option<dvmm_virtio::console::ConsoleBackend>,
    /// QEMU's test devices (fw_cfg, isa-debug-exit, pc-testdev), for test suites such
    /// as kvm-unit-tests (node 0's, with the other devices).
    pub test_devices: bool,
    /// CPU features this host must not show the guest.
    pub hide_cpu: CpuFeatures,
    /// The CPU every vCPU shows, as the cluster agreed (a subset of what this host
    /// offers: [`Vm::offered_cpu`](super::Vm::offered_cpu)); `None`: this host's, less `hide_cpu`.
    pub cpu: Option<CpuModel>,
    /// How this node's guest clocks differ from its host's (nodes in step with node 0).
    pub clock: ClockAlign,
    /// Timer pacing factor for every LAPIC (`dvmm_irq::lapic::Lapic::set_timer_pacing`;
    /// 0: off). `None`: [`DEFAULT_TIMER_PACING`] where the host emulates guest kernel
    /// code, off elsewhere.
    pub timer_pacing: Option<u32>,
}

/// The timer pacing factor on hosts that emulate guest kernel code: there, one tick of
/// a Linux guest (timekeeping, scheduler, RCU) is thousands of emulated instructions,
/// about as long as HZ=250's 4 ms period, and ticks alone took half of a Debian boot.
pub const DEFAULT_TIMER_PACING: u32 = 4;

/// This host's TSC, as guests see it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HostTsc {
    /// Frequency in kHz.
    pub khz: u32,
    /// Whether the guest's `rdtsc` shows the TSC offset KVM is given (false on PVM).
    pub offsets_apply: bool,
}

/// The guest's clocks on this node, relative to this host's: the guest TSC is the host
/// TSC plus `tsc_offset`, kvmclock starts at the host's `CLOCK_BOOTTIME` plus
/// `boottime_offset_ns`. Zero on node 0 (its host's clocks are the guest's) and on
/// nodes whose clocks are node 0's.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ClockAlign {
    /// Guest TSC less host TSC, in cycles.
    pub tsc_offset: i64,
    /// Guest kvmclock less host `CLOCK_BOOTTIME`, in ns.
    pub boottime_offset_ns: i64,
}

/// A network card for the guest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetConfig {
    /// The host TAP device (it must exist on the serving node's host).
    pub tap: String,
    /// The card's MAC address.
    pub mac: [u8; 6],
    /// The node that serves it (opens the TAP, runs its queues).
    pub node: usize,
}

/// A disk image for the guest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskConfig {
    /// Raw image file (or host block device).
    pub path: PathBuf,
    /// Attach it read-only.
    pub readonly: bool,
    /// The node that serves it (opens the image, runs its queue).
    pub node: usize,
}

/// Where this VM instance sits in a multi-node cluster.
pub struct Placement {
    /// This node's id (node 0 runs the boot vCPU and the devices).
    pub node: usize,
    /// `(vcpus, memory)` of every node, in node order.
    pub shares: Vec<(u32, u64)>,
    /// Interrupt delivery to other nodes.
    pub remote_irq: Arc<dyn RemoteInterrupts>,
    /// Device accesses forwarded to other nodes (to node 0, and from node 0 to the
    /// node that serves a PCI function).
    pub remote_io: Arc<dyn RemoteIo>,
    /// The VM's end state, made by the node runtime before the VM (its link to the
    /// other nodes needs it from the start: a peer may stop the VM at any time).
    pub control: Arc<VmControl>,
}
