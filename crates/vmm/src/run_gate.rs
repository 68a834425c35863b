//! Holding one node's vCPU threads out of KVM for a moment.
//!
//! Some changes to a VM (a memory-slot change, which is how dvmm drops KVM's shadow page
//! tables, see [`crate::shadow_mmu`]) wait for every vCPU thread inside KVM. A vCPU
//! thread can be inside KVM waiting for the DSM in a userfault, and the DSM may be the
//! one that wants the change: so the DSM closes the gate, kicks the vCPUs, and makes
//! the change only once every vCPU thread is *quiet*: parked at the gate, or sleeping in
//! userspace (halted, waiting for SIPI). A quiet thread that wakes passes the gate
//! before it calls into KVM again.

use dvmm_sync::{CondvarExt, MutexExt};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

/// The longest a vCPU waits at a closed gate before it goes on anyway (the DSM opens
/// it within its own give-up time; this only guards against a DSM that died).
const PARK_LIMIT: Duration = Duration::from_secs(2);

/// The gate (one per VM).
#[derive(Default)]
pub struct RunGate {
    closed: AtomicBool,
    lock: Mutex<()>,
    cv: Condvar,
}

impl RunGate {
    /// Asks vCPU threads to park before their next call into KVM.
    pub fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
    }

    /// Whether the gate is closed.
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::SeqCst)
    }

    /// Lets parked vCPU threads go on.
    pub fn open(&self) {
        {
            let _g = self.lock.locked();
            self.closed.store(false, Ordering::SeqCst);
        }
        self.cv.notify_all();
    }

    /// A vCPU thread (whose quiet flag is `quiet`) about to call into KVM: parks while
    /// the gate is closed, then clears `quiet`. The flag is cleared *before* the gate
    /// is looked at, so a closer that sees the thread quiet knows it will look.
    pub fn pass(&self, quiet: &AtomicBool) {
        let start = Instant::now();
        loop {
            quiet.store(false, Ordering::SeqCst);
            if !self.closed.load(Ordering::SeqCst) {
                return;
            }
            quiet.store(true, Ordering::SeqCst);
            let mut g = self.lock.locked();
            while self.closed.load(Ordering::SeqCst) {
                if start.elapsed() > PARK_LIMIT {
                    tracing::warn!("vCPU: the run gate stayed closed for {PARK_LIMIT:?}; going on");
                    quiet.store(false, Ordering::SeqCst);
                    return;
                }
                g = self.cv.wait_timeout_locked(g, Duration::from_millis(10)).0;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn a_closed_gate_parks_and_an_open_one_does_not() {
        let gate = Arc::new(RunGate::default());
        let quiet = Arc::new(AtomicBool::new(true));
        gate.pass(&quiet);
        assert!(
            !quiet.load(Ordering::SeqCst),
            "passing an open gate is not quiet"
        );

        gate.close();
        let passed = Arc::new(AtomicBool::new(false));
        let t = {
            let (gate, quiet, passed) = (gate.clone(), quiet.clone(), passed.clone());
            std::thread::spawn(move || {
                gate.pass(&quiet);
                passed.store(true, Ordering::SeqCst);
            })
        };
        let t0 = Instant::now();
        while !quiet.load(Ordering::SeqCst) {
            assert!(t0.elapsed() < Duration::from_secs(10), "never parked");
            std::thread::yield_now();
        }
        std::thread::sleep(Duration::from_millis(20));
        assert!(!passed.load(Ordering::SeqCst), "went through a closed gate");
        gate.open();
        t.join().unwrap();
        assert!(passed.load(Ordering::SeqCst));
        assert!(!quiet.load(Ordering::SeqCst));
    }
}
