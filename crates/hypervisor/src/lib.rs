//! dvmm's edge to KVM.
//!
//! The vCPU run loop (`dvmm_vmm::vcpu`) talks to a [`Vcpu`]: enter the guest, get a
//! [`VmExit`] that keeps what the loop needs (the port, the access size and count, the
//! MSR index), answer it, inject interrupts and NMIs, read and write registers. The
//! [`kvm::KvmVcpu`] implementation is the only code that touches `kvm_run`; the
//! [`fake::FakeVcpu`] plays a script of exits, so the run loop, interrupt injection,
//! INIT/SIPI and HLT handling can be tested with no `/dev/kvm`.
//!
//! Register state is exchanged in KVM's own plain-data layouts (`kvm_regs`, `kvm_sregs`,
//! ...): they are what x86 has, and converting them would only add copies.

pub mod fake;
pub mod kvm;

pub use kvm_bindings::{kvm_fpu, kvm_regs, kvm_segment, kvm_sregs, kvm_vcpu_events};

/// The time-stamp counter MSR.
pub const MSR_IA32_TSC: u32 = 0x10;

/// Why a vCPU stopped running guest code, with what the handler needs to answer it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VmExit {
    /// Port I/O: `count` accesses of `size` bytes each (a `rep ins/outs`); the data is
    /// [`Vcpu::exit_data`] (`size * count` bytes: filled by the handler for a read).
    Io {
        /// The port.
        port: u16,
        /// Bytes per access (1, 2 or 4).
        size: u8,
        /// Accesses (more than 1 for string I/O).
        count: u32,
        /// A write (`out`).
        write: bool,
    },
    /// An access to guest-physical memory that is no RAM KVM knows; the data is
    /// [`Vcpu::exit_data`] (`len` bytes, at most 8).
    Mmio {
        /// Guest-physical address.
        addr: u64,
        /// Bytes.
        len: u32,
        /// A write.
        write: bool,
    },
    /// RDMSR of an MSR the filter sends to userspace; answer with [`Vcpu::complete_msr`].
    RdMsr {
        /// The MSR.
        index: u32,
    },
    /// WRMSR of an MSR the filter sends to userspace; answer with [`Vcpu::complete_msr`].
    WrMsr {
        /// The MSR.
        index: u32,
        /// The value written.
        data: u64,
    },
    /// The guest executed HLT.
    Hlt,
    /// The interrupt window asked for with [`Vcpu::set_interrupt_window`] opened.
    IrqWindowOpen,
    /// The guest lowered CR8 below the priority of a pending interrupt
    /// (`KVM_EXIT_SET_TPR`, only without an in-kernel LAPIC): [`Vcpu::cr8`] has it.
    TprChanged,
    /// The run was cut short before or during guest execution: a signal (a kick) or
    /// `immediate_exit` (`KVM_RUN` returned `EINTR`/`EAGAIN`).
    Interrupted,
    /// KVM's own exit for a pending signal (`KVM_EXIT_INTR`).
    SignalPending,
    /// Triple fault.
    Shutdown,
    /// VM entry failed, with the hardware's reason.
    FailEntry {
        /// Hardware entry-failure reason.
        reason: u64,
    },
    /// KVM could not handle something itself, e.g. an instruction its emulator lacks.
    InternalError {
        /// KVM's sub-error code.
        suberror: u32,
        /// The extra data KVM attached.
        data: Vec<u64>,
    },
    /// An exit reason dvmm does not handle.
    Unknown(u32),
}

/// A failed call into the hypervisor.
#[derive(Debug, thiserror::Error)]
#[error("{what} failed: {source}")]
pub struct HypervisorError {
    /// The call, e.g. "KVM_RUN".
    pub what: &'static str,
    /// The kernel's error.
    #[source]
    pub source: kvm_ioctls::Error,
}

impl HypervisorError {
    /// `what` failed with `source`.
    pub fn new(what: &'static str, source: kvm_ioctls::Error) -> HypervisorError {
        HypervisorError { what, source }
    }
}

/// Shorthand for results of hypervisor calls.
pub type Result<T> = std::result::Result<T, HypervisorError>;

/// One virtual CPU, owned by the thread that runs it.
pub trait Vcpu: Send {
    /// Enters the guest and returns at its next exit.
    fn run(&mut self) -> Result<VmExit>;
    /// The data of the last [`VmExit::Io`] or [`VmExit::Mmio`] exit (empty after any
    /// other exit).
    fn exit_data(&mut self) -> &mut [u8];
    /// Answers the last RDMSR/WRMSR exit: `Some(value)` completes it (the value is what
    /// RDMSR returns; ignored for WRMSR), `None` raises #GP in the guest.
    fn complete_msr(&mut self, value: Option<u64>);
    /// Whether an interrupt can be injected now (the guest has IF set and nothing blocks
    /// injection), as of the last exit.
    fn can_inject(&self) -> bool;
    /// Whether the guest had IF set at the last exit.
    fn interrupts_enabled(&self) -> bool;
    /// Asks for an [`VmExit::IrqWindowOpen`] exit as soon as an interrupt could be
    /// injected (or stops asking).
    fn set_interrupt_window(&mut self, wanted: bool);
    /// CR8 (the task priority, TPR >> 4) as of the last exit. With the LAPIC in
    /// userspace KVM keeps CR8 itself; the LAPIC's TPR must follow it.
    fn cr8(&self) -> u64;
    /// The CR8 the next entry loads (KVM loads `kvm_run.cr8` at every entry when the
    /// LAPIC is in userspace), so that a TPR written through the LAPIC reaches CR8.
    fn set_cr8(&mut self, cr8: u64);
    /// Injects external interrupt `vector` (only when [`Vcpu::can_inject`]).
    fn inject(&self, vector: u8) -> Result<()>;
    /// Injects an NMI.
    fn nmi(&self) -> Result<()>;
    /// The general-purpose registers, RIP and RFLAGS.
    fn regs(&self) -> Result<kvm_regs>;
    /// Sets the general-purpose registers, RIP and RFLAGS.
    fn set_regs(&self, regs: &kvm_regs) -> Result<()>;
    /// Segment, control and descriptor-table registers.
    fn sregs(&self) -> Result<kvm_sregs>;
    /// Sets segment, control and descriptor-table registers.
    fn set_sregs(&self, sregs: &kvm_sregs) -> Result<()>;
    /// The FPU/SSE state.
    fn fpu(&self) -> Result<kvm_fpu>;
    /// Sets the FPU/SSE state.
    fn set_fpu(&self, fpu: &kvm_fpu) -> Result<()>;
    /// Pending exceptions, interrupts and NMIs.
    fn events(&self) -> Result<kvm_vcpu_events>;
    /// Sets pending exceptions, interrupts and NMIs.
    fn set_events(&self, events: &kvm_vcpu_events) -> Result<()>;
    /// The guest-physical address a guest-virtual address maps to now (`None`: not
    /// mapped).
    fn translate(&self, gva: u64) -> Result<Option<u64>>;
    /// Reads one MSR (`None`: KVM refused).
    fn msr(&self, index: u32) -> Option<u64>;
    /// The guest's TSC right now.
    fn guest_tsc(&self) -> Option<u64> {
        self.msr(MSR_IA32_TSC)
    }
    /// Writes one MSR; false if KVM refused the value (real hardware would raise #GP).
    fn set_msr(&self, index: u32, value: u64) -> bool;
    /// The byte that, set to 1, makes the next (or current) entry return at once with
    /// [`VmExit::Interrupted`]. It stays valid, at the same address, as long as `self`.
    fn immediate_exit(&mut self) -> *mut u8;
}
