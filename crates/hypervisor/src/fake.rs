//! A scripted [`Vcpu`] for tests that have no `/dev/kvm`.
//!
//! A [`FakeVcpu`] returns the exits of its script one per [`Vcpu::run`], and writes down
//! what the run loop did with them in a [`FakeLog`] the test keeps a handle to:
//! injected vectors, NMIs, interrupt-window requests, MSR answers, the data handed back
//! for reads, and register writes. Like KVM, a run with `immediate_exit` set returns
//! [`VmExit::Interrupted`] without consuming the script. When the script is used up the
//! fake calls its end hook (once) and reports [`VmExit::Interrupted`] from then on.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use dvmm_sync::MutexExt;

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_sregs, kvm_vcpu_events};

use crate::{HypervisorError, Result, Vcpu, VmExit};

/// Something that happens while the fake "runs the guest", before it reports its exit
/// (e.g. another vCPU sends an IPI).
pub type Action = Box<dyn FnOnce() + Send>;

/// What the guest did to its own registers before an exit.
pub type StateChange = Box<dyn FnOnce(&mut FakeState) + Send>;

/// One step of a script: the exit to report and the state that goes with it.
pub struct Step {
    exit: VmExit,
    data: Vec<u8>,
    if_flag: bool,
    can_inject: bool,
    cr8: Option<u64>,
    action: Option<Action>,
    change: Option<StateChange>,
}

impl Step {
    /// An exit with the guest's interrupts enabled and injection possible, and for I/O
    /// and MMIO exits a zeroed data buffer of the access's size.
    pub fn exit(exit: VmExit) -> Step {
        let len = match &exit {
            VmExit::Io { size, count, .. } => usize::from(*size) * *count as usize,
            VmExit::Mmio { len, .. } => *len as usize,
            _ => 0,
        };
        Step {
            exit,
            data: vec![0; len],
            if_flag: true,
            can_inject: true,
            cr8: None,
            action: None,
            change: None,
        }
    }

    /// The guest wrote CR8 = `cr8` before this exit.
    pub fn cr8(mut self, cr8: u64) -> Step {
        self.cr8 = Some(cr8);
        self
    }

    /// The bytes a write exit carries (must have the access's length).
    pub fn data(mut self, data: &[u8]) -> Step {
        self.data = data.to_vec();
        self
    }

    /// The guest's IF at this exit, and whether an interrupt could be injected.
    pub fn interrupts(mut self, if_flag: bool, can_inject: bool) -> Step {
        self.if_flag = if_flag;
        self.can_inject = can_inject;
        self
    }

    /// The guest changed its registers (e.g. ran to a `vmcall`) before this exit.
    pub fn state(mut self, change: impl FnOnce(&mut FakeState) + Send + 'static) -> Step {
        self.change = Some(Box::new(change));
        self
    }

    /// Runs `action` on the vCPU thread just before the exit is reported.
    pub fn after(mut self, action: impl FnOnce() + Send + 'static) -> Step {
        self.action = Some(Box::new(action));
        self
    }
}

/// What the run loop did to a [`FakeVcpu`], in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// An entry into the guest that consumed a script step (the step's index), with
    /// whether an interrupt window was being asked for at entry.
    Run {
        /// Index of the step in the script.
        step: usize,
        /// `set_interrupt_window(true)` was in force.
        window: bool,
    },
    /// An entry cut short by `immediate_exit` (a kick).
    Kicked,
    /// The data buffer of an I/O or MMIO exit as the loop left it (for reads: what the
    /// devices answered).
    Data(Vec<u8>),
    /// An external interrupt was injected.
    Inject(u8),
    /// An NMI was injected.
    Nmi,
    /// An MSR exit was answered (`None`: #GP).
    Msr(Option<u64>),
    /// The general registers were written (RIP shown).
    SetRegs {
        /// The new RIP.
        rip: u64,
    },
    /// The special registers were written (CS selector shown).
    SetSregs {
        /// The new CS selector.
        cs: u16,
    },
}

/// The record of a [`FakeVcpu`], shared with the test.
#[derive(Default)]
pub struct FakeLog {
    events: Mutex<Vec<Event>>,
}

impl FakeLog {
    fn push(&self, e: Event) {
        self.events.locked().push(e);
    }

    /// Everything so far.
    pub fn events(&self) -> Vec<Event> {
        self.events.locked().clone()
    }

    /// The injected vectors, in order.
    pub fn injected(&self) -> Vec<u8> {
        self.events()
            .iter()
            .filter_map(|e| match e {
                Event::Inject(v) => Some(*v),
                _ => None,
            })
            .collect()
    }
}

/// Registers and MSRs of the fake, readable by the test too.
#[derive(Default, Clone)]
pub struct FakeState {
    /// General registers.
    pub regs: kvm_regs,
    /// Special registers.
    pub sregs: kvm_sregs,
    /// FPU state.
    pub fpu: kvm_fpu,
    /// Event state.
    pub events: kvm_vcpu_events,
    /// MSR values; a missing MSR is refused.
    pub msrs: BTreeMap<u32, u64>,
    /// CR8 (what the last entry loaded, or the guest wrote since).
    pub cr8: u64,
}

/// A scripted vCPU (see the module documentation).
pub struct FakeVcpu {
    script: VecDeque<Step>,
    next_step: usize,
    current: Option<Step>,
    window: bool,
    immediate_exit: Box<AtomicU8>,
    state: Arc<Mutex<FakeState>>,
    log: Arc<FakeLog>,
    at_end: Option<Action>,
}

impl FakeVcpu {
    /// A fake that plays `script`.
    pub fn new(script: impl IntoIterator<Item = Step>) -> FakeVcpu {
        FakeVcpu {
            script: script.into_iter().collect(),
            next_step: 0,
            current: None,
            window: false,
            immediate_exit: Box::new(AtomicU8::new(0)),
            state: Arc::default(),
            log: Arc::default(),
            at_end: None,
        }
    }

    /// Calls `hook` (once) when the script is used up, e.g. to stop the VM.
    pub fn at_end(mut self, hook: impl FnOnce() + Send + 'static) -> FakeVcpu {
        self.at_end = Some(Box::new(hook));
        self
    }

    /// The log the fake writes (keep a clone before the fake is moved into the loop).
    pub fn log(&self) -> Arc<FakeLog> {
        self.log.clone()
    }

    /// The fake's registers and MSRs.
    pub fn state(&self) -> Arc<Mutex<FakeState>> {
        self.state.clone()
    }

    fn st(&self) -> MutexGuard<'_, FakeState> {
        self.state.locked()
    }

    fn flags(&self) -> (bool, bool) {
        self.current
            .as_ref()
            .map_or((true, true), |s| (s.if_flag, s.can_inject))
    }
}

impl Vcpu for FakeVcpu {
    fn run(&mut self) -> Result<VmExit> {
        if let Some(done) = self.current.take() {
            if !done.data.is_empty() {
                self.log.push(Event::Data(done.data.clone()));
            }
            // Keep the IF state of the last exit until the next one.
            self.current = Some(Step {
                data: Vec::new(),
                action: None,
                ..done
            });
        }
        if self.immediate_exit.load(Ordering::SeqCst) != 0 {
            self.log.push(Event::Kicked);
            return Ok(VmExit::Interrupted);
        }
        let Some(mut step) = self.script.pop_front() else {
            if let Some(hook) = self.at_end.take() {
                hook();
            }
            return Ok(VmExit::Interrupted);
        };
        self.log.push(Event::Run {
            step: self.next_step,
            window: self.window,
        });
        self.next_step += 1;
        if let Some(action) = step.action.take() {
            action();
        }
        if let Some(cr8) = step.cr8 {
            self.st().cr8 = cr8;
        }
        if let Some(change) = step.change.take() {
            change(&mut self.st());
        }
        let exit = step.exit.clone();
        self.current = Some(step);
        Ok(exit)
    }

    fn exit_data(&mut self) -> &mut [u8] {
        match &mut self.current {
            Some(s) => &mut s.data,
            None => &mut [],
        }
    }

    fn complete_msr(&mut self, value: Option<u64>) {
        self.log.push(Event::Msr(value));
    }

    fn can_inject(&self) -> bool {
        self.flags().1
    }

    fn interrupts_enabled(&self) -> bool {
        self.flags().0
    }

    fn cr8(&self) -> u64 {
        self.st().cr8
    }

    fn set_cr8(&mut self, cr8: u64) {
        self.st().cr8 = cr8;
    }

    fn set_interrupt_window(&mut self, wanted: bool) {
        self.window = wanted;
    }

    fn inject(&self, vector: u8) -> Result<()> {
        if !self.can_inject() {
            // KVM refuses an injection while the guest cannot take one.
            return Err(HypervisorError::new(
                "KVM_INTERRUPT",
                kvm_ioctls::Error::new(libc::EBUSY),
            ));
        }
        self.log.push(Event::Inject(vector));
        Ok(())
    }

    fn nmi(&self) -> Result<()> {
        self.log.push(Event::Nmi);
        Ok(())
    }

    fn regs(&self) -> Result<kvm_regs> {
        Ok(self.st().regs)
    }

    fn set_regs(&self, regs: &kvm_regs) -> Result<()> {
        self.st().regs = *regs;
        self.log.push(Event::SetRegs { rip: regs.rip });
        Ok(())
    }

    fn sregs(&self) -> Result<kvm_sregs> {
        Ok(self.st().sregs)
    }

    fn set_sregs(&self, sregs: &kvm_sregs) -> Result<()> {
        self.st().sregs = *sregs;
        self.log.push(Event::SetSregs {
            cs: sregs.cs.selector,
        });
        Ok(())
    }

    fn fpu(&self) -> Result<kvm_fpu> {
        Ok(self.st().fpu)
    }

    fn set_fpu(&self, fpu: &kvm_fpu) -> Result<()> {
        self.st().fpu = *fpu;
        Ok(())
    }

    fn events(&self) -> Result<kvm_vcpu_events> {
        Ok(self.st().events)
    }

    fn set_events(&self, events: &kvm_vcpu_events) -> Result<()> {
        self.st().events = *events;
        Ok(())
    }

    /// Identity paging.
    fn translate(&self, gva: u64) -> Result<Option<u64>> {
        Ok(Some(gva))
    }

    fn msr(&self, index: u32) -> Option<u64> {
        self.st().msrs.get(&index).copied()
    }

    fn set_msr(&self, index: u32, value: u64) -> bool {
        let mut st = self.st();
        match st.msrs.get_mut(&index) {
            Some(v) => {
                *v = value;
                true
            }
            None => false,
        }
    }

    fn immediate_exit(&mut self) -> *mut u8 {
        self.immediate_exit.as_ptr()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plays_its_script_and_logs_what_was_done() {
        let ended = Arc::new(AtomicU8::new(0));
        let e = ended.clone();
        let mut v = FakeVcpu::new([
            Step::exit(VmExit::Io {
                port: 0x3f8,
                size: 1,
                count: 2,
                write: false,
            }),
            Step::exit(VmExit::Hlt).interrupts(false, false),
        ])
        .at_end(move || e.store(1, Ordering::SeqCst));
        let log = v.log();
        assert_eq!(
            v.run().unwrap(),
            VmExit::Io {
                port: 0x3f8,
                size: 1,
                count: 2,
                write: false
            }
        );
        v.exit_data().copy_from_slice(&[7, 8]);
        v.inject(0x30).unwrap();
        assert_eq!(v.run().unwrap(), VmExit::Hlt);
        assert!(!v.interrupts_enabled());
        assert!(
            v.inject(0x31).is_err(),
            "no injection while the guest cannot take it"
        );
        assert_eq!(v.run().unwrap(), VmExit::Interrupted);
        assert_eq!(ended.load(Ordering::SeqCst), 1);
        assert_eq!(
            log.events(),
            vec![
                Event::Run {
                    step: 0,
                    window: false
                },
                Event::Inject(0x30),
                Event::Data(vec![7, 8]),
                Event::Run {
                    step: 1,
                    window: false
                },
            ]
        );
    }

    #[test]
    fn immediate_exit_does_not_consume_the_script() {
        let mut v = FakeVcpu::new([Step::exit(VmExit::Hlt)]);
        let ie = v.immediate_exit();
        // SAFETY: `ie` points into `v`, which is alive.
        unsafe { *ie = 1 };
        assert_eq!(v.run().unwrap(), VmExit::Interrupted);
        // SAFETY: as above.
        unsafe { *ie = 0 };
        assert_eq!(v.run().unwrap(), VmExit::Hlt);
        assert_eq!(v.log().events()[0], Event::Kicked);
    }
}
