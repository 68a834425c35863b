//! Completing system calls that the host's KVM leaves unfinished.
//!
//! On some hosts without VT-x/AMD-V (KVM's software "PVM" mode) a `syscall` from guest
//! user mode jumps to LSTAR but stays at CPL3, so the kernel's first instruction raises
//! a #PF, and `int $0x80` raises #UD. No exit reaches the VMM by itself. [`probe()`] finds
//! out at start-up whether this host does that; only then does dvmm arm the completion:
//!
//! 1. KVM's MSR filter sends the guest's writes of STAR/LSTAR/CSTAR/FMASK to us (we
//!    perform them with `KVM_SET_MSRS`). At each, and on later checks, dvmm makes sure
//!    that IDT gate 14 (and 6) point at a small stub ([`stub`]) it wrote into unused
//!    `int3` padding of the kernel text near LSTAR. In Linux that padding is the
//!    2 MiB-aligned end of the entry text, which page-table isolation also maps for user
//!    page tables.
//! 2. The stub turns the host's unfinished SYSCALL into a real kernel entry without any
//!    exit; every other #PF goes to the guest's handler. A #UD from CPL3 exits (HLT at a
//!    known RIP) and [`SyscallCompletion::complete_ud`] performs the `int n`.
//! 3. [`SyscallCompletion::verify`] runs on vCPU exits (every HLT, and at least every
//!    [`VERIFY_INTERVAL_NS`] otherwise): if the guest rewrote a gate (e.g. reinstalled
//!    its IDT) or the stub's bytes (e.g. reused that memory), the completion is
//!    installed again, keeping the guest's new handler as the one the stub falls back to.
//!
//! All guest memory is read and written through a [`GuestAccess`], i.e. the DSM on a
//! cluster node, so every node's vCPUs see one stub and one IDT. The logic here takes
//! register values and returns register values: the vCPU thread does the ioctls.

pub mod probe;
pub mod stub;

use dvmm_sync::MutexExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use kvm_bindings::{kvm_regs, kvm_sregs};

use crate::guest_access::GuestAccess;
use crate::guest_paging::{self, Paging};
use stub::{Gate, StubParams, STUB_LEN};

pub use probe::{probe, HostSyscall};

/// IA32_STAR.
pub const MSR_STAR: u32 = 0xc000_0081;
/// IA32_LSTAR.
pub const MSR_LSTAR: u32 = 0xc000_0082;
/// IA32_CSTAR.
pub const MSR_CSTAR: u32 = 0xc000_0083;
/// IA32_FMASK.
pub const MSR_FMASK: u32 = 0xc000_0084;
/// How often (at least) a running vCPU checks that the completion is still in place.
pub const VERIFY_INTERVAL_NS: u64 = 20_000_000;

const VEC_UD: u64 = 6;
const VEC_PF: u64 = 14;
const RFLAGS_IF: u64 = 1 << 9;
/// How far from LSTAR (in pages, within LSTAR's 2 MiB region) the stub may go.
const REGION: u64 = 2 << 20;

/// Is `msr` one whose guest writes the completion must see?
pub fn is_syscall_msr(msr: u32) -> bool {
    (MSR_STAR..=MSR_FMASK).contains(&msr)
}

/// Where the completion lives in the guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Installed {
    /// Guest-virtual address of the stub.
    va: u64,
    /// Guest-physical addresses of the stub (it never crosses a page) and the gates.
    gpa: u64,
    pf_gate_gpa: u64,
    ud_gate_gpa: Option<u64>,
    params: StubParams,
    /// The IDT base the gates' addresses were found from.
    idt_base: u64,
}

#[derive(Default)]
struct State {
    star: u64,
    lstar: u64,
    fmask: u64,
    installed: Option<Installed>,
    /// Why the last attempt failed (logged once per distinct reason).
    last_failure: Option<String>,
    warned_fmask: bool,
    /// LSTAR for which the text had no room (not searched again until it changes).
    no_room_for: Option<u64>,
}

/// Counters for the end-of-run report.
#[derive(Default, Debug)]
pub struct CompletionStats {
    /// Times the stub and gates were (re)written.
    pub installs: AtomicU64,
    /// `int n` instructions completed from the #UD path.
    pub int_n: AtomicU64,
    /// User-mode #UDs handed to the guest's own handler.
    pub ud_passed: AtomicU64,
}

/// What [`SyscallCompletion::complete_ud`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UdOutcome {
    /// `int n` from user mode: RIP now at gate n's handler, the frame's RIP after the
    /// instruction.
    IntN(u8),
    /// A genuine #UD: RIP now at the guest's own #UD handler.
    Passed,
}

/// A problem that stops the completion from being installed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum InstallError {
    /// The guest has not set up what is needed yet (normal early in boot).
    #[error("not ready: {0}")]
    NotReady(&'static str),
    /// No room for the stub.
    #[error(
        "no 256 bytes of int3 padding in the kernel text within LSTAR's 2 MiB \
         ({0:#x}); system calls from user mode will fault on this host"
    )]
    NoRoom(u64),
    /// Guest memory could not be read or written.
    #[error("guest memory at {0:#x} is not accessible")]
    Memory(u64),
}

/// The completion state of one VM (one node: shared by its vCPU threads).
pub struct SyscallCompletion {
    host: HostSyscall,
    state: Mutex<State>,
    /// Guest-virtual address of the #UD `hlt` + 1 (0: none), read on every HLT exit.
    ud_exit_rip: AtomicU64,
    last_verify_ns: AtomicU64,
    /// Counters.
    pub stats: CompletionStats,
}

fn gate_va(sregs: &kvm_sregs, vector: u64) -> Result<u64, InstallError> {
    if u64::from(sregs.idt.limit) < vector * 16 + 15 {
        return Err(InstallError::NotReady("the IDT is too short"));
    }
    Ok(sregs.idt.base.wrapping_add(vector * 16))
}

fn read_gate(mem: &dyn GuestAccess, gpa: u64) -> Result<[u8; 16], InstallError> {
    let mut raw = [0u8; 16];
    mem.read(gpa, &mut raw)
        .map_err(|_| InstallError::Memory(gpa))?;
    Ok(raw)
}

fn translate(mem: &dyn GuestAccess, paging: Paging, va: u64) -> Result<u64, InstallError> {
    guest_paging::translate(mem, paging, va)
        .map(|t| t.gpa)
        .ok_or(InstallError::NotReady("a kernel address is not mapped"))
}

impl SyscallCompletion {
    /// The completion for a host that behaves as `host` says. Inert unless
    /// [`HostSyscall::needs_completion`].
    pub fn new(host: HostSyscall) -> SyscallCompletion {
        SyscallCompletion {
            host,
            state: Mutex::new(State::default()),
            ud_exit_rip: AtomicU64::new(0),
            last_verify_ns: AtomicU64::new(0),
            stats: CompletionStats::default(),
        }
    }

    /// Whether this host needs it at all (else every method is a no-op).
    pub fn active(&self) -> bool {
        self.host.needs_completion()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.locked()
    }

    /// The guest wrote `value` to the system-call MSR `msr` (already performed); `sregs`
    /// is the writing vCPU's state.
    pub fn msr_written(&self, msr: u32, value: u64, sregs: &kvm_sregs, mem: &dyn GuestAccess) {
        if !self.active() {
            return;
        }
        let mut st = self.lock();
        match msr {
            MSR_STAR => st.star = value,
            MSR_LSTAR => st.lstar = value,
            MSR_FMASK => {
                st.fmask = value;
                if value & RFLAGS_IF == 0 && !st.warned_fmask {
                    st.warned_fmask = true;
                    tracing::warn!(
                        fmask = format_args!("{value:#x}"),
                        "the guest's FMASK keeps IF set: dvmm cannot tell its system calls \
                         from user code jumping to LSTAR, so they are not completed"
                    );
                }
            }
            _ => return,
        }
        self.ensure(&mut st, sregs, mem);
    }

    /// Checks that the completion is still in place (and installs it if it can now be);
    /// cheap: a few small reads of guest memory. Call from vCPU threads on exits; runs
    /// at most every [`VERIFY_INTERVAL_NS`] unless `force`.
    pub fn verify(&self, now_ns: u64, force: bool, sregs: &kvm_sregs, mem: &dyn GuestAccess) {
        if !self.active() {
            return;
        }
        let last = self.last_verify_ns.load(Ordering::Relaxed);
        if !force && now_ns.saturating_sub(last) < VERIFY_INTERVAL_NS {
            return;
        }
        let mut st = self.lock();
        if st.lstar == 0 {
            return;
        }
        // A forced look (a HLT) only needs to see the stub and both gates unchanged,
        // read where they were found (three reads instead of three page walks; on a
        // cluster each walk reads page tables other nodes may be rewriting). The timed
        // look redoes everything, translations included.
        if force
            && now_ns.saturating_sub(last) < VERIFY_INTERVAL_NS
            && self.gates_intact(&st, sregs, mem)
        {
            return;
        }
        self.last_verify_ns.store(now_ns, Ordering::Relaxed);
        self.ensure(&mut st, sregs, mem);
    }

    /// Whether the installed stub's gates still point at it (same IDT, same bytes).
    fn gates_intact(&self, st: &State, sregs: &kvm_sregs, mem: &dyn GuestAccess) -> bool {
        let Some(i) = &st.installed else {
            return false;
        };
        if sregs.idt.base != i.idt_base {
            return false;
        }
        let points_at = |gpa: u64, entry: u64| {
            read_gate(mem, gpa).is_ok_and(|raw| {
                let g = Gate::decode(&raw);
                g.is_valid() && g.offset == i.va + entry
            })
        };
        let mut bytes = [0u8; STUB_LEN];
        if mem.read(i.gpa, &mut bytes).is_err() || bytes != stub::build(&i.params) {
            return false;
        }
        points_at(i.pf_gate_gpa, stub::PF_ENTRY)
            && i.ud_gate_gpa
                .is_none_or(|gpa| points_at(gpa, stub::UD_ENTRY))
    }

    /// Whether a vCPU's verify is due (lets the caller skip reading sregs).
    pub fn verify_due(&self, now_ns: u64) -> bool {
        self.active()
            && now_ns.saturating_sub(self.last_verify_ns.load(Ordering::Relaxed))
                >= VERIFY_INTERVAL_NS
    }

    /// Does a HLT exit at `rip` (the address after the `hlt`) come from the #UD stub?
    pub fn is_ud_exit(&self, rip: u64) -> bool {
        let at = self.ud_exit_rip.load(Ordering::Relaxed);
        at != 0 && rip == at
    }

    fn ensure(&self, st: &mut State, sregs: &kvm_sregs, mem: &dyn GuestAccess) {
        match self.check_or_install(st, sregs, mem) {
            Ok(()) => st.last_failure = None,
            Err(e) => {
                let msg = e.to_string();
                if st.last_failure.as_deref() != Some(msg.as_str()) {
                    match e {
                        InstallError::NotReady(_) => {
                            tracing::debug!(reason = %msg, "SYSCALL completion not installed yet")
                        }
                        _ => tracing::warn!("cannot complete the guest's system calls: {msg}"),
                    }
                    st.last_failure = Some(msg);
                }
            }
        }
    }

    fn check_or_install(
        &self,
        st: &mut State,
        sregs: &kvm_sregs,
        mem: &dyn GuestAccess,
    ) -> Result<(), InstallError> {
        if st.lstar == 0 || st.star == 0 {
            return Err(InstallError::NotReady("STAR/LSTAR not written"));
        }
        let paging = Paging::from_regs(sregs.cr3, sregs.cr4);
        let pf_gate_gpa = translate(mem, paging, gate_va(sregs, VEC_PF)?)?;
        let pf_raw = read_gate(mem, pf_gate_gpa)?;
        let pf = Gate::decode(&pf_raw);
        if !pf.is_valid() {
            return Err(InstallError::NotReady("gate 14 is not a valid gate"));
        }
        let with_ud = self.host.int_n_raises_ud;
        let ud = if with_ud {
            let gpa = translate(mem, paging, gate_va(sregs, VEC_UD)?)?;
            let raw = read_gate(mem, gpa)?;
            if !Gate::decode(&raw).is_valid() {
                return Err(InstallError::NotReady("gate 6 is not a valid gate"));
            }
            Some((gpa, raw))
        } else {
            None
        };
        // Where the guest's gates point now: at a stub of ours (this node's or another's),
        // at our old place that the guest has since overwritten, or at its own handlers.
        let ours_before = st.installed;
        let mut existing = [0u8; STUB_LEN];
        let target_stub = guest_paging::read_virt(mem, paging, pf.offset, &mut existing)
            .then(|| stub::parse(&existing))
            .flatten();
        let (orig_pf, reuse) = match (target_stub, ours_before) {
            (Some(p), _) => (p.orig_pf, Some(pf.offset - stub::PF_ENTRY)),
            (None, Some(i)) if pf.offset == i.va + stub::PF_ENTRY => (i.params.orig_pf, None),
            (None, _) => (pf.offset, None),
        };
        let orig_ud = match ud {
            None => 0,
            Some((_, raw)) => {
                let at = Gate::decode(&raw).offset;
                match (target_stub, reuse, ours_before) {
                    (Some(p), Some(va), _) if at == va + stub::UD_ENTRY => p.orig_ud,
                    (_, _, Some(i)) if at == i.va + stub::UD_ENTRY => i.params.orig_ud,
                    _ => at,
                }
            }
        };
        let params = StubParams {
            lstar: st.lstar,
            kernel_ss: stub::kernel_ss(st.star),
            orig_pf,
            orig_ud,
        };
        let va = match (reuse, ours_before) {
            (Some(va), _) => va,
            // Our old place, if it still holds our stub (its values may be stale).
            (None, Some(i)) if self.still_ours(mem, i.gpa) => i.va,
            _ => {
                if st.no_room_for == Some(st.lstar) {
                    return Err(InstallError::NoRoom(st.lstar));
                }
                match find_place(mem, paging, st.lstar) {
                    Ok(va) => va,
                    Err(e) => {
                        if matches!(e, InstallError::NoRoom(_)) {
                            st.no_room_for = Some(st.lstar);
                        }
                        return Err(e);
                    }
                }
            }
        };
        let gpa = translate(mem, paging, va)?;
        let bytes = stub::build(&params);
        let mut current = [0u8; STUB_LEN];
        mem.read(gpa, &mut current)
            .map_err(|_| InstallError::Memory(gpa))?;
        let mut changed = false;
        if current != bytes {
            // The stub first, then the gates: a gate never points at a half-written stub.
            mem.write(gpa, &bytes)
                .map_err(|_| InstallError::Memory(gpa))?;
            changed = true;
        }
        let pf_new = Gate::with_offset(&pf_raw, va + stub::PF_ENTRY);
        if pf_new != pf_raw {
            mem.write(pf_gate_gpa, &pf_new)
                .map_err(|_| InstallError::Memory(pf_gate_gpa))?;
            changed = true;
        }
        let mut ud_gate_gpa = None;
        if let Some((gpa_ud, raw)) = ud {
            let new = Gate::with_offset(&raw, va + stub::UD_ENTRY);
            if new != raw {
                mem.write(gpa_ud, &new)
                    .map_err(|_| InstallError::Memory(gpa_ud))?;
                changed = true;
            }
            ud_gate_gpa = Some(gpa_ud);
            self.ud_exit_rip
                .store(va + stub::UD_HLT + 1, Ordering::Relaxed);
        }
        let inst = Installed {
            va,
            gpa,
            pf_gate_gpa,
            ud_gate_gpa,
            params,
            idt_base: sregs.idt.base,
        };
        if changed {
            self.stats.installs.fetch_add(1, Ordering::Relaxed);
            let first = st.installed.is_none();
            if first {
                tracing::info!(
                    stub = format_args!("{va:#x}"),
                    lstar = format_args!("{:#x}", st.lstar),
                    guest_pf_handler = format_args!("{orig_pf:#x}"),
                    int_n = with_ud,
                    "completing the guest's system calls: IDT gate 14{} now enter dvmm's stub in \
                     the kernel text's int3 padding",
                    if with_ud { " and 6" } else { "" }
                );
            } else {
                tracing::debug!(
                    stub = format_args!("{va:#x}"),
                    ?params,
                    "SYSCALL completion reinstalled"
                );
            }
        }
        st.installed = Some(inst);
        Ok(())
    }

    /// Whether guest memory at `gpa` still holds a stub of ours.
    fn still_ours(&self, mem: &dyn GuestAccess, gpa: u64) -> bool {
        let mut b = [0u8; STUB_LEN];
        mem.read(gpa, &mut b).is_ok() && stub::parse(&b).is_some()
    }

    /// Completes the #UD stub's exit: `regs` are the vCPU's registers at the HLT exit
    /// (RIP after the stub's `hlt`, RSP at the #UD frame). Sets RIP (and the frame) for
    /// what the CPU should have done. None if the state is not what the stub leaves (the
    /// caller then treats the HLT as an ordinary one).
    pub fn complete_ud(
        &self,
        regs: &mut kvm_regs,
        sregs: &kvm_sregs,
        mem: &dyn GuestAccess,
    ) -> Option<UdOutcome> {
        let orig_ud = self.lock().installed.map(|i| i.params.orig_ud)?;
        let paging = Paging::from_regs(sregs.cr3, sregs.cr4);
        let frame_rip = guest_paging::read_u64(mem, paging, regs.rsp)?;
        let frame_cs = guest_paging::read_u64(mem, paging, regs.rsp + 8)?;
        let frame_rflags = guest_paging::read_u64(mem, paging, regs.rsp + 16)?;
        let passed = |regs: &mut kvm_regs| {
            regs.rip = orig_ud;
            self.stats.ud_passed.fetch_add(1, Ordering::Relaxed);
            Some(UdOutcome::Passed)
        };
        if frame_cs & 3 != 3 {
            return passed(regs);
        }
        // The instruction at the user's RIP, read as the user would.
        let insn = guest_paging::translate(mem, paging, frame_rip)
            .filter(|t| t.user)
            .and_then(|_| {
                let mut b = [0u8; 2];
                guest_paging::read_virt(mem, paging, frame_rip, &mut b).then_some(b)
            });
        let (vector, len) = match insn {
            Some([0xcd, n]) => (n, 2),
            Some([0xcc, _]) => (3, 1),
            _ => return passed(regs),
        };
        let ud_gate = guest_paging::translate(mem, paging, gate_va(sregs, VEC_UD).ok()?)
            .and_then(|t| read_gate(mem, t.gpa).ok())
            .map(|raw| Gate::decode(&raw))?;
        let target = gate_va(sregs, u64::from(vector))
            .ok()
            .and_then(|va| guest_paging::translate(mem, paging, va))
            .and_then(|t| read_gate(mem, t.gpa).ok())
            .map(|raw| Gate::decode(&raw));
        // Only what the CPU would have delivered on the same stack and code segment as
        // the #UD frame we are standing on; anything else stays a #UD.
        let Some(g) = target.filter(|g| {
            g.is_valid() && g.dpl == 3 && g.ist == ud_gate.ist && g.selector == ud_gate.selector
        }) else {
            return passed(regs);
        };
        if !guest_paging::write_virt(mem, paging, regs.rsp, &(frame_rip + len).to_le_bytes()) {
            return passed(regs);
        }
        regs.rip = g.offset;
        if g.kind == 0xf {
            // A trap gate leaves IF as it was.
            regs.rflags |= frame_rflags & RFLAGS_IF;
        }
        self.stats.int_n.fetch_add(1, Ordering::Relaxed);
        Some(UdOutcome::IntN(vector))
    }

    /// One line for the end-of-run log (None when inactive).
    pub fn summary(&self) -> Option<String> {
        if !self.active() {
            return None;
        }
        let st = self.lock();
        Some(format!(
            "SYSCALL completion: {} (installs {}, int n completed {}, user #UD passed {})",
            match st.installed {
                Some(i) => format!("stub at {:#x}", i.va),
                None => "never installed".into(),
            },
            self.stats.installs.load(Ordering::Relaxed),
            self.stats.int_n.load(Ordering::Relaxed),
            self.stats.ud_passed.load(Ordering::Relaxed),
        ))
    }
}

/// Finds room for the stub in executable supervisor text within LSTAR's 2 MiB region:
/// from LSTAR's page to the region's end (where Linux pads its entry text with int3),
/// then from the region's start.
fn find_place(mem: &dyn GuestAccess, paging: Paging, lstar: u64) -> Result<u64, InstallError> {
    let region = lstar & !(REGION - 1);
    let first = lstar & !0xfff;
    let pages = (first..region + REGION)
        .step_by(4096)
        .chain((region..first).step_by(4096));
    let mut page = vec![0u8; 4096];
    for va in pages {
        let Some(t) = guest_paging::translate(mem, paging, va) else {
            continue;
        };
        if t.user || t.no_execute || mem.read(t.gpa, &mut page).is_err() {
            continue;
        }
        if let Some(off) = stub::find_room(&page) {
            return Ok(va + off as u64);
        }
    }
    Err(InstallError::NoRoom(lstar))
}

#[cfg(test)]
mod tests;
