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
pub mod irqchip;
pub mod kick;
pub mod memory;
pub mod node;
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
    Thread(std::io::Error),
    /// The DSM could not be set up.
    #[error("cluster: DSM: {0}")]
    Dsm(#[source] dvmm_dsm_uffd::DsmError),
    /// The node-to-node transport could not be set up.
    #[error("cluster: {0}")]
    Transport(#[source] dvmm_transport::TransportError),
    /// `--id` names no node of the cluster file.
    #[error("--id {id} is not a node of the cluster file: it lists {nodes} nodes, ids 0 to {}", nodes - 1)]
    NotInCluster {
        /// The id asked for.
        id: usize,
        /// Nodes in the cluster file (at least 1).
        nodes: usize,
    },
    /// A bug in dvmm.
    #[error("internal error: {0}")]
    Internal(String),
}
