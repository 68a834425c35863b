//! A tiny probe VM that finds out what this host's KVM does with `syscall` and `int n`
//! from guest user mode (a few milliseconds at start-up), and whether the guest's
//! `rdtsc` sees the TSC offset KVM is given ([`tsc_offset_applies`]).
//!
//! The probe guest is 64-bit with 4 KiB pages: kernel pages at CPL0, one user code and
//! one user stack page, a GDT with Linux's STAR layout, a TSS and an IDT whose every
//! handler is a `hlt` at its own address. Each run starts at CPL0 on an `iretq` to user
//! mode, where the user executes `syscall` (first run) or `int $0x80` (second run); the
//! address of the `hlt` that exits tells what happened.

use std::sync::mpsc;
use std::time::{Duration, Instant};

use kvm_bindings::{
    kvm_regs, kvm_segment, kvm_userspace_memory_region, Msrs, KVM_MAX_CPUID_ENTRIES,
};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};

/// What this host does with system-call instructions from guest user mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct HostSyscall {
    /// `syscall` jumps to LSTAR but the CPU stays at CPL3 (the fetch then faults).
    pub syscall_stays_at_cpl3: bool,
    /// `int n` through a DPL3 gate raises #UD instead.
    pub int_n_raises_ud: bool,
}

impl HostSyscall {
    /// Whether dvmm must complete system calls for the guest.
    pub fn needs_completion(&self) -> bool {
        self.syscall_stays_at_cpl3
    }
}

/// Why the probe could not tell.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// A KVM call failed.
    #[error("{what}: {source}")]
    Kvm {
        /// What was being done.
        what: &'static str,
        /// The error.
        source: kvm_ioctls::Error,
    },
    /// The probe guest ended somewhere unexpected.
    #[error("the probe guest {0}")]
    Unexpected(String),
    /// The probe did not finish in time.
    #[error("the probe VM did not finish within {0:?}")]
    Timeout(Duration),
    /// Memory for the probe could not be mapped.
    #[error("cannot map the probe's memory: {0}")]
    Memory(std::io::Error),
}

const MEM_SIZE: usize = 2 << 20;
const PML4: u64 = 0x1000;
const PDPT: u64 = 0x2000;
const PD: u64 = 0x3000;
const PT: u64 = 0x4000;
const GDT: u64 = 0x5000;
const IDT: u64 = 0x6000;
const TSS: u64 = 0x7000;
const KSTACK_TOP: u64 = 0x9000;
const KCODE: u64 = 0x1_0000;
const LSTAR: u64 = KCODE + 0x100;
const IRET_AT: u64 = KCODE;
const USER_CODE: u64 = 0x2_0000;
const USER_STACK_TOP: u64 = 0x2_2000;
/// Handler of vector v: a `hlt` at KCODE + 0x1000 + v * 8.
const HANDLERS: u64 = KCODE + 0x1000;

const SEL_KCODE: u16 = 0x08;
const SEL_KDATA: u16 = 0x10;
const SEL_UDATA: u16 = 0x20 | 3;
const SEL_UCODE64: u16 = 0x28 | 3;
const SEL_TSS: u16 = 0x30;

fn handler(v: u64) -> u64 {
    HANDLERS + v * 8
}

/// The probe's memory, mapped anonymously.
struct ProbeMemory {
    ptr: *mut u8,
}

impl ProbeMemory {
    fn new() -> Result<ProbeMemory, ProbeError> {
        // SAFETY: a fresh anonymous private mapping; checked for failure below.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                MEM_SIZE,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(ProbeError::Memory(std::io::Error::last_os_error()));
        }
        Ok(ProbeMemory { ptr: ptr.cast() })
    }

    fn put(&mut self, at: u64, bytes: &[u8]) {
        let at = at as usize;
        assert!(at + bytes.len() <= MEM_SIZE, "probe layout out of range");
        // SAFETY: in bounds of our MEM_SIZE mapping (checked above); no other reference
        // to these bytes exists while we hold &mut self.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), self.ptr.add(at), bytes.len()) };
    }

    fn put_u64(&mut self, at: u64, v: u64) {
        self.put(at, &v.to_le_bytes());
    }
}

impl Drop for ProbeMemory {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `new`; the VM using it is gone.
        unsafe { libc::munmap(self.ptr.cast(), MEM_SIZE) };
    }
}

fn gate(handler: u64, dpl: u8) -> [u8; 16] {
    let mut g = [0u8; 16];
    g[0..2].copy_from_slice(&(handler as u16).to_le_bytes());
    g[2..4].copy_from_slice(&SEL_KCODE.to_le_bytes());
    g[5] = 0x8e | (dpl << 5);
    g[6..8].copy_from_slice(&((handler >> 16) as u16).to_le_bytes());
    g[8..12].copy_from_slice(&((handler >> 32) as u32).to_le_bytes());
    g
}

fn lay_out(mem: &mut ProbeMemory) {
    const P: u64 = 1;
    const W: u64 = 2;
    const U: u64 = 4;
    mem.put_u64(PML4, PDPT | P | W | U);
    mem.put_u64(PDPT, PD | P | W | U);
    mem.put_u64(PD, PT | P | W | U);
    for page in 0..512u64 {
        let va = page << 12;
        let user = (USER_CODE..USER_STACK_TOP).contains(&va);
        mem.put_u64(PT + page * 8, va | P | W | if user { U } else { 0 });
    }
    let gdt: [u64; 8] = [
        0,
        0x00af_9b00_0000_ffff, // 0x08 kernel code, 64-bit
        0x00cf_9300_0000_ffff, // 0x10 kernel data
        0x00cf_fb00_0000_ffff, // 0x18 user code, 32-bit
        0x00cf_f300_0000_ffff, // 0x20 user data
        0x00af_fb00_0000_ffff, // 0x28 user code, 64-bit
        0x0000_8900_0000_0067 | ((TSS & 0xff_ffff) << 16), // 0x30 TSS (low)
        0,                     // TSS (high)
    ];
    for (i, d) in gdt.iter().enumerate() {
        mem.put_u64(GDT + i as u64 * 8, *d);
    }
    mem.put_u64(TSS + 4, KSTACK_TOP); // RSP0
    mem.put(TSS + 0x66, &0x68u16.to_le_bytes());
    for v in 0..256u64 {
        let dpl = if v == 0x80 || v == 3 { 3 } else { 0 };
        mem.put(IDT + v * 16, &gate(handler(v), dpl));
        mem.put(handler(v), &[0xf4, 0xf4]);
    }
    mem.put(IRET_AT, &[0x48, 0xcf]); // iretq
    mem.put(LSTAR, &[0xf4, 0xf4]); // hlt
    mem.put(USER_CODE, &[0x0f, 0x05, 0xf4]); // syscall
    mem.put(USER_CODE + 0x10, &[0xcd, 0x80, 0xf4]); // int $0x80
    mem.put(USER_CODE + 0x20, &[0x0f, 0x31, 0xf4]); // rdtsc; hlt (#GP at CPL3)
}

fn seg(selector: u16, code: bool, dpl: u8) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_: if code { 0xb } else { 0x3 },
        present: 1,
        dpl,
        db: u8::from(!code),
        s: 1,
        l: u8::from(code),
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// Runs the probe vCPU from CPL0 at the `iretq` that enters `user_rip`; returns the
/// RIP of the `hlt` it stopped at and its CPL.
fn run_to_user(
    vcpu: &mut VcpuFd,
    mem: &mut ProbeMemory,
    user_rip: u64,
) -> Result<(u64, u8), ProbeError> {
    let kvm = |what| move |source| ProbeError::Kvm { what, source };
    // The iretq frame: RIP, CS, RFLAGS (IF set), RSP, SS.
    let frame = KSTACK_TOP - 0x100;
    for (i, v) in [
        user_rip,
        u64::from(SEL_UCODE64),
        0x202,
        USER_STACK_TOP - 16,
        u64::from(SEL_UDATA),
    ]
    .iter()
    .enumerate()
    {
        mem.put_u64(frame + i as u64 * 8, *v);
    }
    let mut sregs = vcpu.get_sregs().map_err(kvm("KVM_GET_SREGS"))?;
    sregs.cs = seg(SEL_KCODE, true, 0);
    let data = seg(SEL_KDATA, false, 0);
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = kvm_segment {
        base: TSS,
        limit: 0x67,
        selector: SEL_TSS,
        type_: 0xb,
        present: 1,
        ..Default::default()
    };
    sregs.gdt.base = GDT;
    sregs.gdt.limit = 8 * 8 - 1;
    sregs.idt.base = IDT;
    sregs.idt.limit = 256 * 16 - 1;
    sregs.cr0 = 0x8000_0033; // PG PE MP ET NE
    sregs.cr3 = PML4;
    sregs.cr4 = 1 << 5; // PAE
    sregs.efer = 0x501 | 0x800; // SCE LME LMA NXE
    vcpu.set_sregs(&sregs).map_err(kvm("KVM_SET_SREGS"))?;
    let regs = kvm_regs {
        rip: IRET_AT,
        rsp: frame,
        rflags: 2,
        ..Default::default()
    };
    vcpu.set_regs(&regs).map_err(kvm("KVM_SET_REGS"))?;
    for _ in 0..8 {
        match vcpu.run() {
            Ok(VcpuExit::Hlt) => {
                let r = vcpu.get_regs().map_err(kvm("KVM_GET_REGS"))?;
                let s = vcpu.get_sregs().map_err(kvm("KVM_GET_SREGS"))?;
                return Ok((r.rip.wrapping_sub(1), s.cs.dpl));
            }
            Ok(VcpuExit::Shutdown) => return Err(ProbeError::Unexpected("triple-faulted".into())),
            Ok(VcpuExit::InternalError) => {
                return Err(ProbeError::Unexpected("hit a KVM internal error".into()))
            }
            Ok(other) => {
                return Err(ProbeError::Unexpected(format!("exited with {other:?}")));
            }
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => continue,
            Err(e) => {
                return Err(ProbeError::Kvm {
                    what: "KVM_RUN",
                    source: e,
                })
            }
        }
    }
    Err(ProbeError::Unexpected("kept being interrupted".into()))
}

/// A probe VM: one vCPU over the laid-out probe memory. Fields drop in order: the vCPU,
/// then the VM, then the memory it maps.
struct ProbeVm {
    vcpu: VcpuFd,
    _vm: VmFd,
    mem: ProbeMemory,
}

impl ProbeVm {
    fn new(kvm: &Kvm) -> Result<ProbeVm, ProbeError> {
        let kerr = |what| move |source| ProbeError::Kvm { what, source };
        let vm = kvm.create_vm().map_err(kerr("KVM_CREATE_VM"))?;
        let mut mem = ProbeMemory::new()?;
        lay_out(&mut mem);
        let region = kvm_userspace_memory_region {
            slot: 0,
            guest_phys_addr: 0,
            memory_size: MEM_SIZE as u64,
            userspace_addr: mem.ptr as u64,
            flags: 0,
        };
        // SAFETY: the region is our mapping of MEM_SIZE bytes, which the returned
        // ProbeVm drops only after the VM.
        unsafe { vm.set_user_memory_region(region) }.map_err(kerr("KVM_SET_USER_MEMORY_REGION"))?;
        let vcpu = vm.create_vcpu(0).map_err(kerr("KVM_CREATE_VCPU"))?;
        let cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(kerr("KVM_GET_SUPPORTED_CPUID"))?;
        vcpu.set_cpuid2(&cpuid).map_err(kerr("KVM_SET_CPUID2"))?;
        Ok(ProbeVm { vcpu, _vm: vm, mem })
    }
}

fn probe_now(kvm: &Kvm) -> Result<HostSyscall, ProbeError> {
    let kerr = |what| move |source| ProbeError::Kvm { what, source };
    let mut p = ProbeVm::new(kvm)?;
    let star = (0x18u64 << 48) | (u64::from(SEL_KCODE) << 32);
    let msrs = Msrs::from_entries(&[
        kvm_bindings::kvm_msr_entry {
            index: super::MSR_STAR,
            data: star,
            ..Default::default()
        },
        kvm_bindings::kvm_msr_entry {
            index: super::MSR_LSTAR,
            data: LSTAR,
            ..Default::default()
        },
        kvm_bindings::kvm_msr_entry {
            index: super::MSR_FMASK,
            data: 0x4_7700,
            ..Default::default()
        },
    ])
    .map_err(|_| ProbeError::Unexpected("MSR list".into()))?;
    p.vcpu.set_msrs(&msrs).map_err(kerr("KVM_SET_MSRS"))?;

    let (at, cpl) = run_to_user(&mut p.vcpu, &mut p.mem, USER_CODE)?;
    let syscall_stays_at_cpl3 = match (at, cpl) {
        (LSTAR, 0) => false,
        (a, _) if a == handler(14) => true,
        (a, c) => {
            return Err(ProbeError::Unexpected(format!(
                "stopped at {a:#x} (CPL{c}) after syscall"
            )))
        }
    };
    let (at, cpl) = run_to_user(&mut p.vcpu, &mut p.mem, USER_CODE + 0x10)?;
    let int_n_raises_ud = match (at, cpl) {
        (a, 0) if a == handler(0x80) => false,
        (a, _) if a == handler(6) => true,
        (a, c) => {
            return Err(ProbeError::Unexpected(format!(
                "stopped at {a:#x} (CPL{c}) after int $0x80"
            )))
        }
    };
    Ok(HostSyscall {
        syscall_stays_at_cpl3,
        int_n_raises_ud,
    })
}

/// Whether a guest's `rdtsc` sees the vCPU's KVM TSC offset: with the offset 2^50
/// cycles (months) ahead, the probe guest reads the TSC and stops.
fn tsc_offset_applies_now(kvm: &Kvm) -> Result<bool, ProbeError> {
    const AHEAD: u64 = 1 << 50;
    let kerr = |what| move |source| ProbeError::Kvm { what, source };
    let mut p = ProbeVm::new(kvm)?;
    dvmm_hypervisor::kvm::set_tsc_offset(&p.vcpu, AHEAD)
        .map_err(|e| ProbeError::Unexpected(format!("could not be given a TSC offset: {e}")))?;
    let (at, _) = run_to_user(&mut p.vcpu, &mut p.mem, USER_CODE + 0x20)?;
    if at != handler(13) {
        return Err(ProbeError::Unexpected(format!(
            "stopped at {at:#x} after rdtsc; hlt"
        )));
    }
    let r = p.vcpu.get_regs().map_err(kerr("KVM_GET_REGS"))?;
    let guest = (r.rdx << 32) | (r.rax & 0xffff_ffff);
    let host = dvmm_irq::clock::host_tsc();
    Ok(guest.wrapping_sub(host) > AHEAD / 2 && guest.wrapping_sub(host) < AHEAD * 2)
}

/// Runs `probe` on a probe VM's own thread named `name`, for at most 5 s. (A probe
/// that does not come back is left behind; it holds nothing the VM needs.)
fn bounded<T: Send + 'static>(
    name: &str,
    probe: fn(&Kvm) -> Result<T, ProbeError>,
) -> Result<T, ProbeError> {
    const LIMIT: Duration = Duration::from_secs(5);
    let (tx, rx) = mpsc::channel();
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            let r = Kvm::new()
                .map_err(|source| ProbeError::Kvm {
                    what: "opening /dev/kvm",
                    source,
                })
                .and_then(|kvm| probe(&kvm));
            let _ = tx.send(r);
        })
        .map_err(ProbeError::Memory)?;
    rx.recv_timeout(LIMIT)
        .unwrap_or(Err(ProbeError::Timeout(LIMIT)))
}

/// Whether this host's KVM makes the guest's `rdtsc` show the TSC offset it is given
/// (true on VT-x/AMD-V; PVM lets guest code read the host's TSC directly). Runs a
/// probe VM on its own thread, bounded in time.
pub fn tsc_offset_applies() -> Result<bool, ProbeError> {
    bounded("tsc-probe", tsc_offset_applies_now)
}

/// Runs the probe VM (on its own thread, bounded in time) and reports what it found,
/// with how long it took.
pub fn probe() -> Result<(HostSyscall, Duration), ProbeError> {
    let start = Instant::now();
    bounded("syscall-probe", probe_now).map(|h| (h, start.elapsed()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_layout_gates_point_at_hlts() {
        let mut mem = ProbeMemory::new().unwrap();
        lay_out(&mut mem);
        let g = gate(handler(0x80), 3);
        let d = crate::syscall_completion::stub::Gate::decode(&g);
        assert_eq!((d.offset, d.dpl, d.kind), (handler(0x80), 3, 0xe));
    }

    /// Needs /dev/kvm: the probe guest must end at one of the two known places for
    /// both instructions, and on VT-x/AMD-V hosts nothing needs completing.
    #[test]
    fn probe_finds_a_known_behaviour() {
        if !std::path::Path::new("/dev/kvm").exists() {
            return;
        }
        let (h, _) = probe().expect("probe ran");
        let host = crate::host::HostKvm::detect();
        if host.hardware_virtualization && !host.pvm {
            assert!(!h.needs_completion(), "{h:?}");
        }
    }

    /// Needs /dev/kvm: hardware KVM applies a vCPU's TSC offset to the guest's `rdtsc`;
    /// PVM (which emulates guest kernel code) lets the guest read the host's TSC.
    #[test]
    fn the_tsc_probe_matches_the_kind_of_host() {
        if !std::path::Path::new("/dev/kvm").exists() {
            return;
        }
        let host = crate::host::HostKvm::detect();
        assert_eq!(
            tsc_offset_applies().expect("probe ran"),
            !host.emulates_guest_kernel(),
            "{host:?}"
        );
    }
}
