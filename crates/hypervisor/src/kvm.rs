//! [`Vcpu`] on Linux KVM: the only code in dvmm that reads or writes `kvm_run`.

use kvm_bindings::{
    kvm_fpu, kvm_interrupt, kvm_msr_entry, kvm_regs, kvm_run, kvm_sregs, kvm_vcpu_events, Msrs,
};
use kvm_ioctls::VcpuFd;
use vmm_sys_util::ioctl::ioctl_with_ref;

use crate::{HypervisorError, Result, Vcpu, VmExit, MSR_IA32_TSC};

/// Ioctls kvm-ioctls does not wrap: `KVM_INTERRUPT` (it assumes an in-kernel irqchip)
/// and the vCPU device-attribute call (wrapped only for other architectures).
mod ioctls {
    #![allow(missing_docs)]
    use kvm_bindings::kvm_interrupt;
    use vmm_sys_util::ioctl_iow_nr;
    const KVMIO: u32 = 0xAE;
    ioctl_iow_nr!(KVM_INTERRUPT, KVMIO, 0x86, kvm_interrupt);
    ioctl_iow_nr!(
        KVM_SET_DEVICE_ATTR,
        KVMIO,
        0xe1,
        kvm_bindings::kvm_device_attr
    );
}
use ioctls::{KVM_INTERRUPT, KVM_SET_DEVICE_ATTR};

const KVM_EXIT_IO: u32 = 2;
const KVM_EXIT_HLT: u32 = 5;
const KVM_EXIT_MMIO: u32 = 6;
const KVM_EXIT_IRQ_WINDOW_OPEN: u32 = 7;
const KVM_EXIT_SHUTDOWN: u32 = 8;
const KVM_EXIT_FAIL_ENTRY: u32 = 9;
const KVM_EXIT_INTR: u32 = 10;
const KVM_EXIT_SET_TPR: u32 = 11;
const KVM_EXIT_INTERNAL_ERROR: u32 = 17;
const KVM_EXIT_X86_RDMSR: u32 = 29;
const KVM_EXIT_X86_WRMSR: u32 = 30;

/// Sets the vCPU's TSC offset (guest TSC = host TSC + `offset`, modulo 2^64).
pub fn set_tsc_offset(vcpu: &VcpuFd, offset: u64) -> std::io::Result<()> {
    let attr = kvm_bindings::kvm_device_attr {
        group: kvm_bindings::KVM_VCPU_TSC_CTRL,
        attr: u64::from(kvm_bindings::KVM_VCPU_TSC_OFFSET),
        addr: std::ptr::addr_of!(offset) as u64,
        flags: 0,
    };
    // SAFETY: KVM_SET_DEVICE_ATTR reads the attribute struct and the u64 it points to,
    // both alive on our stack for the duration of the call.
    let ret = unsafe { ioctl_with_ref(vcpu, KVM_SET_DEVICE_ATTR(), &attr) };
    if ret < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Reads one MSR of a KVM vCPU.
pub fn read_msr(vcpu: &VcpuFd, index: u32) -> Option<u64> {
    let mut msrs = Msrs::from_entries(&[kvm_msr_entry {
        index,
        ..Default::default()
    }])
    .ok()?;
    match vcpu.get_msrs(&mut msrs) {
        Ok(1) => Some(msrs.as_slice()[0].data),
        _ => None,
    }
}

/// The guest's TSC right now, as KVM sees it.
pub fn guest_tsc(vcpu: &VcpuFd) -> Option<u64> {
    read_msr(vcpu, MSR_IA32_TSC)
}

/// A KVM vCPU and its mapped `kvm_run` page.
pub struct KvmVcpu {
    fd: VcpuFd,
    run: *mut kvm_run,
    /// Where the last exit's data lies in the `kvm_run` mapping.
    data: ExitData,
}

/// The data of the last exit ([`Vcpu::exit_data`]).
#[derive(Clone, Copy)]
enum ExitData {
    /// None (not an I/O or MMIO exit).
    None,
    /// I/O: `len` bytes at `offset` in the mapping.
    Io { offset: usize, len: usize },
    /// MMIO: the first `len` bytes of `kvm_run.mmio.data`.
    Mmio { len: usize },
}

// SAFETY: `run` points into the mapping owned by `fd`, which moves with it; only the
// thread that owns the `KvmVcpu` dereferences it (other threads reach `immediate_exit`
// through the pointer [`Vcpu::immediate_exit`] hands out, atomically).
unsafe impl Send for KvmVcpu {}

impl KvmVcpu {
    /// Takes over `fd`.
    pub fn new(mut fd: VcpuFd) -> KvmVcpu {
        let run: *mut kvm_run = fd.get_kvm_run();
        KvmVcpu {
            fd,
            run,
            data: ExitData::None,
        }
    }

    fn kvm_run(&self) -> &kvm_run {
        // SAFETY: the mapping lives as long as `fd`; the kernel writes it only during
        // KVM_RUN, which takes `&mut self`.
        unsafe { &*self.run }
    }

    fn kvm_run_mut(&mut self) -> &mut kvm_run {
        // SAFETY: as in `kvm_run`, and `&mut self` makes this the only reference.
        unsafe { &mut *self.run }
    }

    fn exit(&mut self) -> VmExit {
        self.data = ExitData::None;
        let run = self.kvm_run();
        match run.exit_reason {
            KVM_EXIT_IO => {
                // SAFETY: exit_reason says `io` is the valid union member.
                let io = unsafe { run.__bindgen_anon_1.io };
                let len = usize::from(io.size) * io.count as usize;
                self.data = ExitData::Io {
                    offset: io.data_offset as usize,
                    len,
                };
                VmExit::Io {
                    port: io.port,
                    size: io.size,
                    count: io.count,
                    write: io.direction != 0,
                }
            }
            KVM_EXIT_MMIO => {
                // SAFETY: exit_reason says `mmio` is the valid union member.
                let mmio = unsafe { run.__bindgen_anon_1.mmio };
                let len = mmio.len.min(mmio.data.len() as u32);
                self.data = ExitData::Mmio { len: len as usize };
                VmExit::Mmio {
                    addr: mmio.phys_addr,
                    len,
                    write: mmio.is_write != 0,
                }
            }
            KVM_EXIT_X86_RDMSR => {
                // SAFETY: exit_reason says `msr` is the valid union member.
                let msr = unsafe { run.__bindgen_anon_1.msr };
                VmExit::RdMsr { index: msr.index }
            }
            KVM_EXIT_X86_WRMSR => {
                // SAFETY: exit_reason says `msr` is the valid union member.
                let msr = unsafe { run.__bindgen_anon_1.msr };
                VmExit::WrMsr {
                    index: msr.index,
                    data: msr.data,
                }
            }
            KVM_EXIT_HLT => VmExit::Hlt,
            KVM_EXIT_IRQ_WINDOW_OPEN => VmExit::IrqWindowOpen,
            KVM_EXIT_INTR => VmExit::SignalPending,
            KVM_EXIT_SET_TPR => VmExit::TprChanged,
            KVM_EXIT_SHUTDOWN => VmExit::Shutdown,
            KVM_EXIT_FAIL_ENTRY => {
                // SAFETY: exit_reason says `fail_entry` is the valid union member.
                let reason = unsafe {
                    run.__bindgen_anon_1
                        .fail_entry
                        .hardware_entry_failure_reason
                };
                VmExit::FailEntry { reason }
            }
            KVM_EXIT_INTERNAL_ERROR => {
                // SAFETY: exit_reason says `internal` is the valid union member.
                let internal = unsafe { run.__bindgen_anon_1.internal };
                let n = (internal.ndata as usize).min(internal.data.len());
                VmExit::InternalError {
                    suberror: internal.suberror,
                    data: internal.data[..n].to_vec(),
                }
            }
            other => VmExit::Unknown(other),
        }
    }
}

impl Vcpu for KvmVcpu {
    fn run(&mut self) -> Result<VmExit> {
        match self.fd.run() {
            Ok(_) => Ok(self.exit()),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                self.data = ExitData::None;
                Ok(VmExit::Interrupted)
            }
            Err(e) => Err(HypervisorError::new("KVM_RUN", e)),
        }
    }

    fn exit_data(&mut self) -> &mut [u8] {
        match self.data {
            ExitData::None => &mut [],
            ExitData::Io { offset, len } => {
                let base = self.run.cast::<u8>();
                // SAFETY: for an I/O exit the kernel places size * count bytes at
                // data_offset inside the kvm_run mapping (larger than one page), which
                // lives as long as `self`.
                unsafe { std::slice::from_raw_parts_mut(base.add(offset), len) }
            }
            ExitData::Mmio { len } => {
                // SAFETY: the last exit was MMIO, so `mmio` is the valid union member.
                let mmio = unsafe { &mut self.kvm_run_mut().__bindgen_anon_1.mmio };
                &mut mmio.data[..len]
            }
        }
    }

    fn complete_msr(&mut self, value: Option<u64>) {
        let run = self.kvm_run_mut();
        if run.exit_reason != KVM_EXIT_X86_RDMSR && run.exit_reason != KVM_EXIT_X86_WRMSR {
            return;
        }
        // SAFETY: the last exit was an MSR exit, so `msr` is the valid union member.
        let msr = unsafe { &mut run.__bindgen_anon_1.msr };
        match value {
            Some(v) => {
                msr.error = 0;
                if run.exit_reason == KVM_EXIT_X86_RDMSR {
                    msr.data = v;
                }
            }
            None => msr.error = 1,
        }
    }

    fn can_inject(&self) -> bool {
        let run = self.kvm_run();
        run.ready_for_interrupt_injection != 0 && run.if_flag != 0
    }

    fn interrupts_enabled(&self) -> bool {
        self.kvm_run().if_flag != 0
    }

    fn set_interrupt_window(&mut self, wanted: bool) {
        self.kvm_run_mut().request_interrupt_window = u8::from(wanted);
    }

    fn cr8(&self) -> u64 {
        self.kvm_run().cr8
    }

    fn set_cr8(&mut self, cr8: u64) {
        self.kvm_run_mut().cr8 = cr8;
    }

    fn inject(&self, vector: u8) -> Result<()> {
        let irq = kvm_interrupt {
            irq: u32::from(vector),
        };
        // SAFETY: KVM_INTERRUPT reads a kvm_interrupt from the pointer we pass, which
        // lives on our stack for the duration of the call.
        let ret = unsafe { ioctl_with_ref(&self.fd, KVM_INTERRUPT(), &irq) };
        if ret < 0 {
            return Err(HypervisorError::new(
                "KVM_INTERRUPT",
                kvm_ioctls::Error::last(),
            ));
        }
        Ok(())
    }

    fn nmi(&self) -> Result<()> {
        self.fd
            .nmi()
            .map_err(|e| HypervisorError::new("KVM_NMI", e))
    }

    fn regs(&self) -> Result<kvm_regs> {
        self.fd
            .get_regs()
            .map_err(|e| HypervisorError::new("KVM_GET_REGS", e))
    }

    fn set_regs(&self, regs: &kvm_regs) -> Result<()> {
        self.fd
            .set_regs(regs)
            .map_err(|e| HypervisorError::new("KVM_SET_REGS", e))
    }

    fn sregs(&self) -> Result<kvm_sregs> {
        self.fd
            .get_sregs()
            .map_err(|e| HypervisorError::new("KVM_GET_SREGS", e))
    }

    fn set_sregs(&self, sregs: &kvm_sregs) -> Result<()> {
        self.fd
            .set_sregs(sregs)
            .map_err(|e| HypervisorError::new("KVM_SET_SREGS", e))
    }

    fn fpu(&self) -> Result<kvm_fpu> {
        self.fd
            .get_fpu()
            .map_err(|e| HypervisorError::new("KVM_GET_FPU", e))
    }

    fn set_fpu(&self, fpu: &kvm_fpu) -> Result<()> {
        self.fd
            .set_fpu(fpu)
            .map_err(|e| HypervisorError::new("KVM_SET_FPU", e))
    }

    fn events(&self) -> Result<kvm_vcpu_events> {
        self.fd
            .get_vcpu_events()
            .map_err(|e| HypervisorError::new("KVM_GET_VCPU_EVENTS", e))
    }

    fn set_events(&self, events: &kvm_vcpu_events) -> Result<()> {
        self.fd
            .set_vcpu_events(events)
            .map_err(|e| HypervisorError::new("KVM_SET_VCPU_EVENTS", e))
    }

    fn translate(&self, gva: u64) -> Result<Option<u64>> {
        let t = self
            .fd
            .translate_gva(gva)
            .map_err(|e| HypervisorError::new("KVM_TRANSLATE", e))?;
        Ok((t.valid != 0).then_some(t.physical_address))
    }

    fn msr(&self, index: u32) -> Option<u64> {
        read_msr(&self.fd, index)
    }

    fn set_msr(&self, index: u32, value: u64) -> bool {
        let Ok(msrs) = Msrs::from_entries(&[kvm_msr_entry {
            index,
            data: value,
            ..Default::default()
        }]) else {
            return false;
        };
        matches!(self.fd.set_msrs(&msrs), Ok(1))
    }

    fn immediate_exit(&mut self) -> *mut u8 {
        // SAFETY: `run` is valid (see `kvm_run`); only the field's address is taken.
        unsafe { std::ptr::addr_of_mut!((*self.run).immediate_exit) }
    }
}
