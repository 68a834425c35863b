//! How a VM ends: the first event that ends it wins and every thread learns of it.
//! And whether it is paused: vCPU threads park while it is.

use dvmm_sync::{CondvarExt, MutexExt};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

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
    paused: AtomicBool,
    /// When the current pause began, and the time spent in earlier ones.
    pause: Mutex<(Option<Instant>, Duration)>,
    pause_cond: Condvar,
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
        drop(o);
        // Taking the lock orders this wake-up after a parked vCPU's last look.
        drop(self.pause.locked());
        self.pause_cond.notify_all();
    }

    /// Pauses (`true`) or resumes the vCPUs; false if it already was so. Pausing only
    /// asks: each vCPU thread parks at its next pass through its run loop (kick it).
    pub fn set_paused(&self, on: bool) -> bool {
        let mut p = self.pause.locked();
        if self.paused.load(Ordering::SeqCst) == on {
            return false;
        }
        self.paused.store(on, Ordering::SeqCst);
        if on {
            p.0 = Some(Instant::now());
        } else if let Some(since) = p.0.take() {
            p.1 += since.elapsed();
        }
        drop(p);
        self.pause_cond.notify_all();
        true
    }

    /// Whether the vCPUs are asked to stay paused.
    pub fn is_paused(&self) -> bool {
        self.paused.load(Ordering::SeqCst)
    }

    /// Time spent paused so far (the current pause included).
    pub fn paused_for(&self) -> Duration {
        let p = self.pause.locked();
        p.1 + p.0.map_or(Duration::ZERO, |s| s.elapsed())
    }

    /// A vCPU thread: parks while the VM is paused and not stopping, with `quiet` set
    /// (it is outside KVM, see [`crate::run_gate`]).
    pub fn wait_while_paused(&self, quiet: &AtomicBool) {
        let mut p = self.pause.locked();
        quiet.store(true, Ordering::SeqCst);
        while self.paused.load(Ordering::SeqCst) && !self.stopping() {
            p = self
                .pause_cond
                .wait_timeout_locked(p, Duration::from_millis(500))
                .0;
        }
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

    #[test]
    fn a_paused_vcpu_parks_until_resumed_or_stopped() {
        use std::sync::Arc;
        let c = Arc::new(VmControl::new());
        assert!(c.set_paused(true));
        assert!(!c.set_paused(true), "pausing twice changes nothing");
        let quiet = Arc::new(AtomicBool::new(false));
        let t = {
            let (c, quiet) = (c.clone(), quiet.clone());
            std::thread::spawn(move || c.wait_while_paused(&quiet))
        };
        let t0 = Instant::now();
        while !quiet.load(Ordering::SeqCst) {
            assert!(t0.elapsed() < Duration::from_secs(10), "never parked");
            std::thread::yield_now();
        }
        std::thread::sleep(Duration::from_millis(20));
        assert!(!t.is_finished(), "left while paused");
        assert!(c.paused_for() >= Duration::from_millis(20));
        assert!(c.set_paused(false));
        t.join().unwrap();
        let total = c.paused_for();
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(c.paused_for(), total, "the clock stops with the pause");

        // A stop wins over a pause.
        assert!(c.set_paused(true));
        let t = {
            let (c, quiet) = (c.clone(), quiet.clone());
            std::thread::spawn(move || c.wait_while_paused(&quiet))
        };
        c.finish(VmOutcome::Stopped);
        t.join().unwrap();
    }
}
