//! Builds and runs one dvmm VM on KVM, without KVM's in-kernel interrupt controllers.
//!
//! Data flows one way: a [`VmConfig`] becomes guest RAM ([`memory`]), vCPUs with their
//! CPUID ([`cpuid`]), userspace LAPICs/IOAPIC routed by the [`irqchip`], timers
//! ([`irqchip::timers`]) and devices on port/MMIO buses; then [`vm::Vm::run`] starts one thread
//! per vCPU ([`vcpu`]) and waits for the [`control::VmOutcome`].

pub mod cmdline;
pub mod control;
pub mod cpuid;
pub mod device_space;
pub mod emulation;
pub mod guest_access;
pub mod guest_paging;
pub mod host;
pub mod hypercall;
pub mod irqchip;
pub mod kick;
pub mod live;
pub mod memory;
pub mod profile;
pub mod run_gate;
pub mod shadow_mmu;
pub mod stats;
pub mod syscall_completion;
pub mod vcpu;
pub mod vm;

pub use control::{VmControl, VmOutcome};
pub use vm::{ConsoleInput, UnsharedVm, Vm, VmConfig};

/// Errors building or running a VM.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    /// /dev/kvm cannot be used.
    #[error("cannot open /dev/kvm: {source} (is KVM enabled on this host, and may this user open /dev/kvm?)")]
    KvmUnavailable {
        /// The underlying error.
        source: kvm_ioctls::Error,
    },
    /// A KVM call failed.
    #[error("KVM failed while {what}: {source}")]
    Kvm {
        /// What was being done.
        what: &'static str,
        /// The underlying error.
        source: kvm_ioctls::Error,
    },
    /// Guest RAM could not be set up.
    #[error(transparent)]
    Memory(#[from] memory::MemoryError),
    /// The guest could not be loaded, or the VM's shape is invalid.
    #[error(transparent)]
    Boot(#[from] dvmm_boot::BootError),
    /// The guest profiler failed.
    #[error(transparent)]
    Profile(#[from] profile::ProfileError),
    /// A thread could not be started.
    #[error("cannot start a thread: {0}")]
    Thread(#[source] std::io::Error),
    /// Two devices were given overlapping addresses (a bug in dvmm's device map).
    #[error("dvmm's device map is wrong: {0}")]
    DeviceMap(#[source] dvmm_devices::bus::BusError),
    /// The VM's file descriptor could not be duplicated (for the shadow-page drops).
    #[error("cannot duplicate the VM file descriptor: {0}")]
    DuplicateVmFd(#[source] std::io::Error),
    /// The shadow-page-table control could not be set up.
    #[error(transparent)]
    ShadowPageTables(#[from] shadow_mmu::ShadowError),
    /// The placement names a node the topology does not have (a bug in the caller).
    #[error("no node {node} in the VM's topology")]
    NoSuchNode {
        /// The node asked for.
        node: usize,
    },
    /// A disk image cannot be attached (missing, unwritable, in use, empty).
    #[error(transparent)]
    Disk(#[from] dvmm_virtio::block::BlockError),
    /// A network card's TAP cannot be used.
    #[error(transparent)]
    Net(#[from] dvmm_virtio::net::NetError),
    /// The virtio-console's file or socket cannot be made.
    #[error(transparent)]
    Console(#[from] dvmm_virtio::console::ConsoleError),
    /// The entropy device cannot read the host's randomness.
    #[error(transparent)]
    Rng(#[from] dvmm_virtio::rng::RngError),
    /// A PCI device does not fit on the bus.
    #[error(transparent)]
    Pci(#[from] dvmm_pci::PciError),
    /// A PCI device's configuration space could not be laid out (a bug in dvmm).
    #[error("dvmm's PCI device layout is wrong: {0}")]
    PciLayout(#[from] dvmm_pci::config::ConfigError),
    /// A device is placed on a node this VM does not have.
    #[error("{device} is placed on node {node}, but this VM has no other nodes; drop node={node}")]
    DeviceNode {
        /// The device, e.g. "virtio-blk0 (/images/disk.img)".
        device: String,
        /// The node it asks for.
        node: usize,
    },
    /// The guest's clocks could not be set as the cluster measured them.
    #[error("guest clocks: {0}")]
    ClockSetup(String),
    /// KVM's CPUID table could not be built from dvmm's entries (too many entries).
    #[error("cannot build the CPUID table: {0:?}")]
    CpuidTable(#[source] vmm_sys_util::fam::Error),
    /// The cluster agreed on a CPU this host cannot show.
    #[error("the CPU the cluster agreed on is not one this host offers ({0}); were the nodes' offers made on other hosts?")]
    CpuNotOffered(String),
}
