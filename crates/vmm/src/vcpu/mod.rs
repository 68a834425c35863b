//! A vCPU thread: run loop, interrupt injection and exit dispatch.
//!
//! Each exit goes to the owner of the address: the vCPU's own LAPIC (xAPIC page,
//! x2APIC and TSC-deadline MSRs), the port or MMIO bus (devices, IOAPIC), the
//! emulation-gap handler, or the VM's end (shutdown, fatal errors).

use dvmm_sync::CondvarExt;
use std::sync::Arc;

use dvmm_boot::cpu::{CpuBootState, Segment};
use dvmm_hypervisor::{kvm_fpu, kvm_regs, kvm_segment, HypervisorError, Vcpu, VmExit};
use dvmm_irq::clock::Clock;
use dvmm_irq::lapic::LapicEvent;
use dvmm_layout::IoSpace;
use dvmm_layout::{APIC_MMIO_SIZE, LAPIC_ADDR};

use crate::control::{VmControl, VmOutcome};
use crate::device_space::DeviceSpace;
use crate::emulation::{self, InternalError};
use crate::guest_access::GuestAccess;
use crate::hypercall::Hypercall;
use crate::irqchip::{Activity, InterruptHub, VcpuHandle};
use crate::memory::GuestRam;
use crate::stats::{ExitKind, ExitStats};

/// Nice value of vCPU threads (see [`run`]).
const VCPU_NICE: i32 = 5;

/// Everything a vCPU thread shares with the rest of the VM.
pub struct VcpuEnv {
    /// Interrupt routing and all LAPICs.
    pub hub: Arc<InterruptHub>,
    /// Port I/O and MMIO devices, and where accesses none of them claims go.
    pub devices: DeviceSpace,
    /// Guest RAM (the VMM's view).
    pub ram: Arc<GuestRam>,
    /// How the VMM itself reads and writes guest memory (through the DSM in a cluster).
    pub guest: Arc<dyn GuestAccess>,
    /// Host time.
    pub clock: Arc<dyn Clock>,
    /// End-of-VM state.
    pub control: Arc<VmControl>,
    /// Completes the guest's system calls where the host's KVM leaves them at CPL3.
    pub syscalls: Arc<crate::syscall_completion::SyscallCompletion>,
    /// The guest profiler, when profiling.
    pub sampler: Option<Arc<crate::profile::Sampler>>,
    /// The host's KVM emulates guest kernel code (enables the gap handling that only
    /// such hosts need).
    pub emulated_kernel: bool,
    /// Where this node's vCPU threads park while the DSM changes the VM under them.
    pub gate: Arc<crate::run_gate::RunGate>,
}

/// Where the vCPU is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    /// Executing guest code.
    Running,
    /// After INIT (or at power-on for APs): waiting in userspace for a SIPI.
    WaitForSipi,
}

fn segment(s: &Segment) -> kvm_segment {
    kvm_segment {
        base: s.base,
        limit: s.limit,
        selector: s.selector,
        type_: s.type_,
        present: u8::from(s.present),
        dpl: s.dpl,
        db: u8::from(s.db),
        s: u8::from(s.s),
        l: u8::from(s.l),
        g: u8::from(s.g),
        avl: u8::from(s.avl),
        unusable: u8::from(!s.present),
        padding: 0,
    }
}

/// Loads a full architectural start state into the vCPU.
pub fn load_state(vcpu: &dyn Vcpu, st: &CpuBootState) -> Result<(), HypervisorError> {
    let mut sregs = vcpu.sregs()?;
    sregs.cs = segment(&st.cs);
    let data = segment(&st.data);
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = segment(&st.tr);
    sregs.ldt = segment(&st.ldt);
    sregs.gdt.base = st.gdt.base;
    sregs.gdt.limit = st.gdt.limit;
    sregs.idt.base = st.idt.base;
    sregs.idt.limit = st.idt.limit;
    sregs.cr0 = st.cr0;
    sregs.cr3 = st.cr3;
    sregs.cr4 = st.cr4;
    sregs.efer = st.efer;
    sregs.cr2 = 0;
    sregs.cr8 = 0;
    sregs.interrupt_bitmap = [0; 4];
    vcpu.set_sregs(&sregs)?;
    let regs = kvm_regs {
        rip: st.rip,
        rax: st.rax,
        rsp: st.rsp,
        rsi: st.rsi,
        rbx: st.rbx,
        rflags: st.rflags | 2,
        ..Default::default()
    };
    vcpu.set_regs(&regs)?;
    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu)?;
    Ok(())
}

/// Why a vCPU had to stop the VM.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    /// A call into KVM failed.
    #[error(transparent)]
    Hypervisor(#[from] HypervisorError),
    /// The boot vCPU's start state could not be loaded.
    #[error("cannot load the boot CPU state: {0}")]
    BootState(#[source] HypervisorError),
    /// An AP's SIPI start state could not be loaded.
    #[error("cannot start at SIPI vector {vector:#x}: {source}")]
    Sipi {
        /// The SIPI vector.
        vector: u8,
        /// KVM's error.
        #[source]
        source: HypervisorError,
    },
    /// KVM could not emulate an instruction and dvmm could not complete it.
    #[error("{0}")]
    Emulation(emulation::EmulationFailure),
    /// VM entry failed.
    #[error("KVM could not enter the guest (hardware reason {0:#x})")]
    FailEntry(u64),
    /// An exit reason dvmm does not handle.
    #[error("unexpected KVM exit reason {0}")]
    UnexpectedExit(u32),
}

/// Runs one vCPU until the VM stops. `boot` is the BSP's start state; APs start
/// waiting for INIT/SIPI.
pub fn run<V: Vcpu>(
    mut vcpu: V,
    handle: Arc<VcpuHandle>,
    env: Arc<VcpuEnv>,
    boot: Option<CpuBootState>,
) {
    let index = handle.index;
    // A guest spinning on a lock or a flag must not starve the threads that serve it
    // (DSM faults, node messages, timers): vCPU threads run at a lower priority.
    // SAFETY: gettid/setpriority on the calling thread; failure only costs performance.
    unsafe {
        let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
        libc::setpriority(libc::PRIO_PROCESS, tid, VCPU_NICE);
        handle.set_thread_id(tid as i32);
    }
    let mut profile = crate::profile::Profile::default();
    let result = run_loop(&mut vcpu, &handle, &env, boot, &mut profile);
    handle.kicker.unbind();
    if let Some(s) = &env.sampler {
        s.collect(&profile);
        if let Some(l) = vcpu.msr(crate::syscall_completion::MSR_LSTAR) {
            s.note_lstar(l);
        }
    }
    handle.exit_stats.report(index);
    handle
        .quiet_flag()
        .store(true, std::sync::atomic::Ordering::SeqCst);
    if let Err(reason) = result {
        env.control
            .finish(VmOutcome::Failed(format!("vCPU {index}: {reason}")));
    }
}

fn run_loop<V: Vcpu>(
    vcpu: &mut V,
    handle: &VcpuHandle,
    env: &VcpuEnv,
    boot: Option<CpuBootState>,
    profile: &mut crate::profile::Profile,
) -> Result<(), VcpuError> {
    let stats = &handle.exit_stats;
    // SAFETY: the flag belongs to `vcpu`, which outlives this loop; `run` unbinds the
    // kicker before `vcpu` is dropped.
    unsafe { handle.kicker.bind(vcpu.immediate_exit()) };

    let mut mode = match boot {
        Some(st) => {
            load_state(vcpu, &st).map_err(VcpuError::BootState)?;
            Mode::Running
        }
        None => Mode::WaitForSipi,
    };

    // NMIs owed to the guest (KVM queues each; it keeps at most two).
    let mut nmi = 0u8;
    // An NMI handed to KVM may wait there for the guest's running NMI handler to
    // return; an interrupt injected meanwhile would be delivered first, as KVM
    // re-injects a queued interrupt before a pending NMI. Set when one was handed over.
    let mut nmi_in_kvm = false;
    let mut stuck = crate::hypercall::StuckHypercall::default();
    // RIP of an emulation failure that was retried and not yet followed by another exit.
    let mut gap_retried_at: Option<u64> = None;
    loop {
        handle.kicker.clear();
        if env.control.stopping() {
            if let Ok(r) = vcpu.regs() {
                tracing::debug!(
                    vcpu = handle.index,
                    rip = format_args!("{:#x}", r.rip),
                    ?mode,
                    "vCPU stopped"
                );
            }
            return Ok(());
        }
        // Parks before anything is injected: an interrupt handed to KVM and then held
        // across a pause would meet a second injection on the next pass.
        if env.control.is_paused() {
            env.control.wait_while_paused(handle.quiet_flag());
            continue;
        }
        if mode == Mode::WaitForSipi {
            match wait_for_sipi(handle, env) {
                Some(vector) => {
                    let st = dvmm_boot::loader::ap_sipi_state(vector);
                    load_state(vcpu, &st).map_err(|source| VcpuError::Sipi { vector, source })?;
                    tracing::debug!(vcpu = handle.index, vector, "SIPI");
                    mode = Mode::Running;
                }
                None => return Ok(()),
            }
            continue;
        }

        // The CR8 this entry loads (TPR >> 4).
        let entry_cr8;
        // Deliver what is pending before entering the guest.
        {
            let mut lapic = handle.lock();
            if lapic.take_init() {
                drop(lapic);
                mode = Mode::WaitForSipi;
                continue;
            }
            nmi = (nmi + lapic.take_nmi()).min(2);
            if nmi > 0 {
                drop(lapic);
                for _ in 0..std::mem::take(&mut nmi) {
                    vcpu.nmi()?;
                    nmi_in_kvm = true;
                }
                lapic = handle.lock();
            }
            if vcpu.can_inject() && lapic.pending_vector().is_some() {
                if nmi_in_kvm {
                    nmi_in_kvm = vcpu
                        .events()
                        .is_ok_and(|e| e.nmi.pending != 0 || e.nmi.injected != 0);
                }
                if !nmi_in_kvm {
                    if let Some(vector) = lapic.acknowledge() {
                        drop(lapic);
                        vcpu.inject(vector)?;
                        lapic = handle.lock();
                    }
                }
            }
            vcpu.set_interrupt_window(lapic.pending_vector().is_some());
            entry_cr8 = u64::from(lapic.tpr() >> 4);
            vcpu.set_cr8(entry_cr8);
        }
        if env.syscalls.verify_due(env.clock.now_ns()) {
            if let Ok(sregs) = vcpu.sregs() {
                env.syscalls
                    .verify(env.clock.now_ns(), false, &sregs, &*env.guest);
            }
        }

        env.gate.pass(handle.quiet_flag());
        let exit = vcpu.run();
        handle.count_exit();
        if handle.take_sample_request() {
            if let Some(regs) = take_sample(vcpu, profile) {
                if trace_samples() {
                    trace_sample(&regs, handle.index, stats);
                }
            }
        }
        let exit = exit?;
        // A `mov cr8` the guest ran is KVM's to keep: the LAPIC's TPR follows it.
        let cr8 = vcpu.cr8();
        if cr8 != entry_cr8 {
            handle
                .lock()
                .set_tpr(u8::try_from(cr8 & 0xf).unwrap_or(0) << 4);
        }
        if !matches!(exit, VmExit::InternalError { .. } | VmExit::Interrupted) {
            gap_retried_at = None;
        }
        match exit {
            VmExit::Interrupted => {
                stats.count(ExitKind::Kick);
                if env.emulated_kernel
                    && stuck
                        .on_kick(vcpu, &*env.guest, |call| hypercall(call, handle, env))
                        .is_some()
                {
                    stats.count(ExitKind::Emulation);
                }
            }
            VmExit::Io {
                port, size, write, ..
            } => {
                stats.count(ExitKind::Pio);
                for chunk in vcpu.exit_data().chunks_mut(usize::from(size).max(1)) {
                    device_access(IoSpace::Pio, u64::from(port), chunk, write, handle, env);
                }
            }
            VmExit::Mmio { addr, write, .. } => {
                stats.count(ExitKind::Mmio);
                if handle_mmio(addr, vcpu.exit_data(), write, handle, env) {
                    stats.count(ExitKind::RamAsMmio);
                }
            }
            VmExit::RdMsr { index } => {
                stats.count(ExitKind::Msr);
                let reply = handle_msr(vcpu, index, None, handle, env);
                vcpu.complete_msr(reply);
            }
            VmExit::WrMsr { index, data } => {
                stats.count(ExitKind::Msr);
                let reply = handle_msr(vcpu, index, Some(data), handle, env);
                vcpu.complete_msr(reply);
            }
            VmExit::Hlt => {
                stats.count(ExitKind::Hlt);
                if env.syscalls.active() && syscall_hlt(vcpu, env)? {
                    stats.count(ExitKind::SyscallCompletion);
                    continue;
                }
                match halt(handle, env, vcpu.interrupts_enabled()) {
                    Wake::Resume => {}
                    Wake::Nmi(n) => nmi = (nmi + n).min(2),
                    Wake::Init => mode = Mode::WaitForSipi,
                }
            }
            VmExit::IrqWindowOpen => stats.count(ExitKind::IrqWindow),
            VmExit::TprChanged => stats.count(ExitKind::IrqWindow),
            VmExit::SignalPending => stats.count(ExitKind::Kick),
            VmExit::InternalError { suberror, data } => {
                stats.count(ExitKind::Emulation);
                let err = InternalError { suberror, data };
                match emulation::recover(vcpu, &*env.guest, &err) {
                    Ok(what) => tracing::debug!(vcpu = handle.index, what, "emulation gap"),
                    // The bytes read now may not be those KVM failed on: kernel code
                    // patched by another vCPU (text_poke's int3, then the new
                    // instruction). Running it again decides; the same failure at the
                    // same RIP with no other exit in between is final.
                    Err(f) if gap_retried_at != Some(f.rip) => {
                        tracing::warn!(
                            vcpu = handle.index,
                            "{f}; running it once more in case it was rewritten meanwhile"
                        );
                        gap_retried_at = Some(f.rip);
                    }
                    Err(f) => return Err(VcpuError::Emulation(f)),
                }
            }
            VmExit::Shutdown => {
                let rip = vcpu.regs().map(|r| r.rip).unwrap_or(0);
                env.control.finish(VmOutcome::Reset(format!(
                    "vCPU {} triple-faulted (KVM_EXIT_SHUTDOWN) at RIP {rip:#x}",
                    handle.index
                )));
                return Ok(());
            }
            VmExit::FailEntry { reason } => return Err(VcpuError::FailEntry(reason)),
            VmExit::Unknown(other) => return Err(VcpuError::UnexpectedExit(other)),
        }
    }
}

/// Counts where the vCPU is (RIP and CPL) in `profile`; returns the registers read.
fn take_sample(vcpu: &dyn Vcpu, profile: &mut crate::profile::Profile) -> Option<kvm_regs> {
    let (r, s) = (vcpu.regs().ok()?, vcpu.sregs().ok()?);
    profile.add(crate::profile::Sample::Guest {
        rip: s.cs.base.wrapping_add(r.rip),
        cpl: s.cs.dpl,
    });
    Some(r)
}

/// Diagnostics: `DVMM_TRACE_SAMPLES=1` logs every profiler sample (with `--profile`):
/// where a vCPU is over time, e.g. to tell a guest stuck at one instruction from one
/// that loops.
fn trace_samples() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("DVMM_TRACE_SAMPLES").as_deref() == Ok("1"))
}

fn trace_sample(r: &kvm_regs, index: u32, stats: &ExitStats) {
    tracing::info!(
        vcpu = index,
        rip = format_args!("{:#x}", r.rip),
        rsp = format_args!("{:#x}", r.rsp),
        rflags = format_args!("{:#x}", r.rflags),
        kicks = stats.get(ExitKind::Kick),
        msr = stats.get(ExitKind::Msr),
        hlt = stats.get(ExitKind::Hlt),
        "sample"
    );
}

/// Waits for a SIPI after INIT. None when the VM stops.
fn wait_for_sipi(handle: &VcpuHandle, env: &VcpuEnv) -> Option<u8> {
    handle.set_activity(Activity::WaitingForSipi);
    let _running = RunningAgain::new(handle, env);
    let mut lapic = handle.lock();
    lapic.note_halt();
    loop {
        if env.control.stopping() {
            return None;
        }
        lapic.take_init();
        lapic.take_nmi();
        if let Some(v) = lapic.take_sipi() {
            return Some(v);
        }
        lapic = handle.wake.wait_locked(lapic);
    }
}

/// Marks the vCPU thread quiet while it sleeps in userspace; when dropped, sets its
/// activity back to running and passes the run gate (it may call into KVM next).
struct RunningAgain<'a>(&'a VcpuHandle, &'a VcpuEnv);

impl<'a> RunningAgain<'a> {
    fn new(handle: &'a VcpuHandle, env: &'a VcpuEnv) -> RunningAgain<'a> {
        handle
            .quiet_flag()
            .store(true, std::sync::atomic::Ordering::SeqCst);
        RunningAgain(handle, env)
    }
}

impl Drop for RunningAgain<'_> {
    fn drop(&mut self) {
        self.0.set_activity(Activity::Running);
        self.1.gate.pass(self.0.quiet_flag());
    }
}

/// What ended a HLT.
enum Wake {
    /// A maskable interrupt (with IF set), or the VM is stopping.
    Resume,
    /// NMIs to inject (1 or 2).
    Nmi(u8),
    /// INIT: wait for SIPI.
    Init,
}

/// HLT: sleeps until an interrupt the vCPU would take, an NMI or INIT.
fn halt(handle: &VcpuHandle, env: &VcpuEnv, if_flag: bool) -> Wake {
    handle.set_activity(Activity::Halted);
    let _running = RunningAgain::new(handle, env);
    let mut lapic = handle.lock();
    loop {
        if env.control.stopping() {
            return Wake::Resume;
        }
        if lapic.take_init() {
            return Wake::Init;
        }
        let n = lapic.take_nmi();
        if n > 0 {
            return Wake::Nmi(n);
        }
        if if_flag && lapic.pending_vector().is_some() {
            return Wake::Resume;
        }
        lapic = handle.wake.wait_locked(lapic);
    }
}

/// A port or MMIO access by the one rule of [`DeviceSpace`]; the vCPU's activity says
/// when it waits for node 0.
fn device_access(
    space: IoSpace,
    addr: u64,
    data: &mut [u8],
    write: bool,
    handle: &VcpuHandle,
    env: &VcpuEnv,
) {
    env.devices.access(space, addr, data, write, |forwarding| {
        handle.set_activity(if forwarding {
            Activity::RemoteIo
        } else {
            Activity::Running
        });
    });
}

/// Returns true if the exit was really an access to RAM (see [`ram_access_as_mmio`]).
fn handle_mmio(
    addr: u64,
    data: &mut [u8],
    write: bool,
    handle: &VcpuHandle,
    env: &VcpuEnv,
) -> bool {
    // The xAPIC page is where IA32_APIC_BASE puts it, and only while the APIC is enabled
    // in xAPIC mode; otherwise its default page is nothing (reads all ones, writes lost).
    {
        let mut lapic = handle.lock();
        let base = lapic.base_address();
        if lapic.hardware_enabled()
            && !lapic.x2apic_enabled()
            && (base..base + APIC_MMIO_SIZE).contains(&addr)
        {
            let offset = addr - base;
            let now = env.clock.now_ns();
            if write {
                let mut v = [0u8; 4];
                for (i, b) in data.iter().take(4).enumerate() {
                    v[i] = *b;
                }
                let ev = lapic.mmio_write(offset, u32::from_le_bytes(v), now);
                drop(lapic);
                lapic_event(ev, handle, env);
            } else {
                let v = lapic.mmio_read(offset & !3, now).to_le_bytes();
                for (i, b) in data.iter_mut().enumerate() {
                    *b = v.get(i).copied().unwrap_or(0);
                }
            }
            return false;
        }
    }
    if (LAPIC_ADDR..LAPIC_ADDR + APIC_MMIO_SIZE).contains(&addr) {
        if !write {
            data.fill(0xff);
        }
        return false;
    }
    if dvmm_layout::gpa_to_ram_offset(addr, env.ram.size()).is_some() {
        ram_access_as_mmio(addr, data, write, handle, env);
        return true;
    }
    device_access(IoSpace::Mmio, addr, data, write, handle, env);
    false
}

/// An "MMIO" exit for an address that is guest RAM. KVM's instruction emulator turns an
/// access to RAM that it could not complete into an MMIO exit: with userfaultfd that is
/// a fault on a page the DSM has not granted yet whose wait was cut short by a signal
/// (a kick). Completing it as a device access would feed the guest 0xff or drop its
/// write; the access is done here instead, through the DSM, with exactly the bytes the
/// instruction reads or writes.
fn ram_access_as_mmio(addr: u64, data: &mut [u8], write: bool, handle: &VcpuHandle, env: &VcpuEnv) {
    let r = if write {
        env.guest.write(addr, data)
    } else {
        env.guest.read(addr, data)
    };
    tracing::trace!(
        vcpu = handle.index,
        addr = format_args!("{addr:#x}"),
        write,
        "RAM access completed for the emulator"
    );
    if let Err(e) = r {
        env.control.finish(VmOutcome::Failed(format!(
            "vCPU {}: KVM left a {} of guest RAM at {addr:#x} to dvmm, which could not do it: {e}",
            handle.index,
            if write { "write" } else { "read" }
        )));
    }
}

/// A HLT exit while the system-call completion is armed: the #UD stub's exit is
/// completed here (true); any other HLT is first an occasion to check that the
/// completion is still in place (false: the caller halts).
fn syscall_hlt(vcpu: &dyn Vcpu, env: &VcpuEnv) -> Result<bool, VcpuError> {
    let mut regs = vcpu.regs()?;
    let sregs = vcpu.sregs()?;
    if env.syscalls.is_ud_exit(regs.rip) {
        if let Some(outcome) = env.syscalls.complete_ud(&mut regs, &sregs, &*env.guest) {
            tracing::trace!(?outcome, "user #UD");
            vcpu.set_regs(&regs)?;
            return Ok(true);
        }
    }
    env.syscalls
        .verify(env.clock.now_ns(), true, &sregs, &*env.guest);
    Ok(false)
}

/// The guest writes a system-call MSR (STAR, LSTAR, CSTAR, FMASK), which the MSR filter
/// sends us only where dvmm completes system calls: perform it, then let the completion
/// see it.
fn syscall_msr_write(vcpu: &dyn Vcpu, index: u32, data: u64, env: &VcpuEnv) -> bool {
    if !vcpu.set_msr(index, data) {
        // What KVM itself would have done with a value it refuses: #GP.
        return false;
    }
    if let Ok(sregs) = vcpu.sregs() {
        env.syscalls.msr_written(index, data, &sregs, &*env.guest);
    }
    true
}

/// An MSR exit (`write`: the value WRMSR writes); returns the answer for
/// [`Vcpu::complete_msr`] (`None`: #GP).
fn handle_msr(
    vcpu: &dyn Vcpu,
    index: u32,
    write: Option<u64>,
    handle: &VcpuHandle,
    env: &VcpuEnv,
) -> Option<u64> {
    let now = env.clock.now_ns();
    if let Some(data) = write {
        if crate::syscall_completion::is_syscall_msr(index) {
            return syscall_msr_write(vcpu, index, data, env).then_some(0);
        }
    }
    if !dvmm_irq::lapic::is_lapic_msr(index) {
        // An MSR KVM does not know: what real hardware does for an unknown MSR.
        tracing::debug!(
            vcpu = handle.index,
            msr = format_args!("{index:#x}"),
            write = write.is_some(),
            "unknown MSR: #GP"
        );
        return None;
    }
    let result = match write {
        Some(data) => {
            let mut lapic = handle.lock();
            if index == dvmm_irq::lapic::MSR_IA32_TSC_DEADLINE {
                if let Some(tsc) = vcpu.guest_tsc() {
                    let mut map = lapic.tsc_map();
                    map.base_ns = now;
                    map.ref_tsc = tsc;
                    lapic.set_tsc_map(map);
                }
            }
            let r = lapic.msr_write(index, data, now);
            drop(lapic);
            if index == dvmm_irq::lapic::MSR_IA32_APIC_BASE && r.is_ok() {
                // KVM keeps its own copy, from which it derives CPUID.1:EDX.APIC (clear
                // while the APIC is disabled, as on hardware).
                vcpu.set_msr(index, data);
            }
            r.map(|ev| {
                lapic_event(ev, handle, env);
                0
            })
        }
        None => handle.lock().msr_read(index, now),
    };
    tracing::trace!(
        vcpu = handle.index,
        msr = format_args!("{index:#x}"),
        write = write.is_some(),
        data = format_args!(
            "{:#x}",
            write.or(result.as_ref().ok().copied()).unwrap_or(0)
        ),
        ok = result.is_ok(),
        "LAPIC MSR"
    );
    result.ok()
}

/// Performs a hypercall this host's KVM left to dvmm; returns its answer for RAX.
fn hypercall(call: &Hypercall, handle: &VcpuHandle, env: &VcpuEnv) -> i64 {
    match call {
        Hypercall::VapicPollIrq | Hypercall::SchedYield => 0,
        Hypercall::SendIpi { args, long_mode } => {
            match dvmm_irq::pv_ipi::messages(*args, *long_mode, env.hub.apic_count()) {
                Ok(msgs) => {
                    let n = msgs.len() as i64;
                    for msg in &msgs {
                        env.hub.deliver(msg, Some(handle.index));
                    }
                    n
                }
                Err(e) => e,
            }
        }
        Hypercall::Other(_) => crate::hypercall::KVM_ENOSYS,
    }
}

fn lapic_event(ev: Option<LapicEvent>, handle: &VcpuHandle, env: &VcpuEnv) {
    env.hub.lapic_written(handle);
    match ev {
        None => {}
        Some(LapicEvent::Ipi(msg)) => env.hub.deliver(&msg, Some(handle.index)),
        Some(LapicEvent::LevelEoi { vector }) => env.hub.level_eoi(vector),
        Some(LapicEvent::TimerChanged) => {
            // An expiry already due (a TSC deadline in the past, a tiny count) is
            // pending before the guest's next instruction, as with KVM's own LAPIC.
            handle.lock().timer_tick(env.clock.now_ns());
            env.hub.timers().poke();
        }
    }
}

#[cfg(test)]
mod tests;
