//! How a VM ends: the first event that ends it wins and every thread learns of it.

use dvmm_sync::{CondvarExt, MutexExt};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex};

use dvmm_devices::{VmEvent, VmEventSink};

/// Why the VM stopped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VmOutcome {
    /// The guest powered off (ACPI S5).
    PowerOff,
    /// The guest asked for a reset (i8042, reset register) or triple-faulted.
    Reset(String),
    /// The guest reported a panic (pvpanic); with the kernel's panic line from the
    /// console when one was found.
    Panic(String),
    /// A test wrote this value to isa-debug-exit (`--test-devices`).
    DebugExit(u32),
    /// Stopped from outside (Ctrl-C, SIGTERM).
    Stopped,
    /// dvmm could not go on running the guest.
    Failed(String),
}

/// Shared end-of-VM state.
#[derive(Default)]
pub struct VmControl {
    outcome: Mutex<Option<VmOutcome>>,
    cond: Condvar,
    stopping: AtomicBool,
}

impl VmControl {
    /// A running VM.
    pub fn new() -> VmControl {
        VmControl::default()
    }

    /// Records `outcome` unless another came first, and starts the stop.
    pub fn finish(&self, outcome: VmOutcome) {
        let mut o = self.outcome.locked();
        if o.is_none() {
            tracing::debug!(?outcome, "VM ending");
            *o = Some(outcome);
        }
        self.stopping.store(true, Ordering::SeqCst);
        self.cond.notify_all();
    }

    /// Whether the VM is stopping.
    pub fn stopping(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }

    /// Waits up to `timeout` for the VM to end; None if it still runs.
    pub fn wait_timeout(&self, timeout: std::time::Duration) -> Option<VmOutcome> {
        let deadline = std::time::Instant::now() + timeout;
        let mut o = self.outcome.locked();
        loop {
            if let Some(outcome) = o.clone() {
                return Some(outcome);
            }
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return None;
            }
            o = self.cond.wait_timeout_locked(o, left).0;
        }
    }

    /// Blocks until the VM ends and returns why.
    pub fn wait(&self) -> VmOutcome {
        let mut o = self.outcome.locked();
        loop {
            if let Some(outcome) = o.clone() {
                return outcome;
            }
            o = self.cond.wait_locked(o);
        }
    }
}

impl VmEventSink for VmControl {
    fn vm_event(&self, event: VmEvent) {
        self.finish(match event {
            VmEvent::PowerOff => VmOutcome::PowerOff,
            VmEvent::Reset => VmOutcome::Reset("the guest requested a reset".into()),
            VmEvent::Panic => VmOutcome::Panic(String::new()),
            VmEvent::DebugExit(v) => VmOutcome::DebugExit(v),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_outcome_wins() {
        let c = VmControl::new();
        assert!(!c.stopping());
        c.vm_event(VmEvent::PowerOff);
        c.finish(VmOutcome::Stopped);
        assert!(c.stopping());
        assert_eq!(c.wait(), VmOutcome::PowerOff);
    }
}
