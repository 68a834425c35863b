//! The timer thread: fires LAPIC timers and the PIT when their deadlines pass.
//!
//! One thread per VM sleeps until the earliest deadline of any LAPIC timer or of PIT
//! channel 0, or until a register write changes a deadline ([`TimerService::poke`]).
//! When a LAPIC timer fires it sets IRR and wakes (kicks) that vCPU; a PIT edge pulses
//! IOAPIC pin [`dvmm_layout::PIT_GSI`].

use dvmm_sync::{CondvarExt, MutexExt};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use dvmm_irq::clock::Clock;
use dvmm_irq::pit::Pit;
use dvmm_layout::PIT_GSI;

/// What the timer thread drives; the interrupt hub implements it (so this module needs
/// nothing of the hub's, and tests drive the thread with a fake).
pub trait TimerTargets {
    /// Fires every LAPIC timer due at `now` (setting IRR, waking its vCPU); returns the
    /// earliest LAPIC deadline still armed.
    fn fire_lapic_timers(&self, now: u64) -> Option<u64>;
    /// Pulses IOAPIC pin `gsi` (an edge: high, then low).
    fn pulse_gsi(&self, gsi: usize);
}

#[derive(Default)]
struct State {
    poked: bool,
    stop: bool,
}

/// Wakes the timer thread when deadlines change.
#[derive(Default)]
pub struct TimerService {
    state: Mutex<State>,
    cond: Condvar,
}

impl TimerService {
    /// A service whose thread is not yet running.
    pub fn new() -> TimerService {
        TimerService::default()
    }

    /// A deadline may have moved: recompute.
    pub fn poke(&self) {
        let mut s = self.state.locked();
        s.poked = true;
        self.cond.notify_one();
    }

    /// Ends the timer thread.
    pub fn stop(&self) {
        let mut s = self.state.locked();
        s.stop = true;
        self.cond.notify_one();
    }

    /// The timer thread's body. Returns when [`TimerService::stop`] is called.
    pub fn run(&self, targets: &dyn TimerTargets, pit: &Mutex<Pit>, clock: &dyn Clock) {
        loop {
            let now = clock.now_ns();
            let mut next = targets.fire_lapic_timers(now);
            let edge = {
                let mut p = pit.locked();
                let edge = p.poll_irq0(now);
                next = min_opt(next, p.irq0_deadline());
                edge
            };
            if edge {
                targets.pulse_gsi(PIT_GSI as usize);
            }

            let mut s = self.state.locked();
            if s.stop {
                return;
            }
            if !s.poked {
                let wait = match next {
                    Some(d) => Duration::from_nanos(d.saturating_sub(clock.now_ns())),
                    None => Duration::from_secs(3600),
                };
                if !wait.is_zero() {
                    s = self.cond.wait_timeout_locked(s, wait).0;
                }
            }
            s.poked = false;
            if s.stop {
                return;
            }
        }
    }
}

/// The earlier of two optional deadlines.
pub fn min_opt(a: Option<u64>, b: Option<u64>) -> Option<u64> {
    match (a, b) {
        (Some(x), Some(y)) => Some(x.min(y)),
        (x, None) => x,
        (None, y) => y,
    }
}

/// The PIT on the port bus (ports 0x40..=0x43 and 0x61 go to one `Pit`).
pub struct PitPorts {
    pit: Arc<Mutex<Pit>>,
    base: u16,
    clock: Arc<dyn Clock>,
    timers: Arc<TimerService>,
}

impl PitPorts {
    /// The PIT's ports starting at `base` (0x40 or 0x61).
    pub fn new(
        pit: Arc<Mutex<Pit>>,
        base: u16,
        clock: Arc<dyn Clock>,
        timers: Arc<TimerService>,
    ) -> PitPorts {
        PitPorts {
            pit,
            base,
            clock,
            timers,
        }
    }
}

impl dvmm_devices::bus::BusDevice for PitPorts {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let now = self.clock.now_ns();
        let mut p = self.pit.locked();
        let v = p.read(self.base + offset as u16, now);
        data.fill(0);
        if let Some(b) = data.first_mut() {
            *b = v;
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let now = self.clock.now_ns();
        if let Some(&b) = data.first() {
            self.pit.locked().write(self.base + offset as u16, b, now);
            self.timers.poke();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dvmm_irq::clock::MonotonicClock;
    use std::sync::atomic::{AtomicU32, Ordering};

    /// LAPIC timers that are always due again 1 ms later.
    #[derive(Default)]
    struct EveryMs {
        fired: AtomicU32,
        pulses: AtomicU32,
    }

    impl TimerTargets for EveryMs {
        fn fire_lapic_timers(&self, now: u64) -> Option<u64> {
            self.fired.fetch_add(1, Ordering::SeqCst);
            Some(now + 1_000_000)
        }

        fn pulse_gsi(&self, _gsi: usize) {
            self.pulses.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn the_thread_wakes_at_the_deadline_it_was_given_and_stops_on_request() {
        let service = Arc::new(TimerService::new());
        let targets = Arc::new(EveryMs::default());
        let pit = Arc::new(Mutex::new(Pit::new(MonotonicClock.now_ns())));
        let thread = {
            let (service, targets, pit) = (service.clone(), targets.clone(), pit.clone());
            std::thread::spawn(move || service.run(&*targets, &pit, &MonotonicClock))
        };
        // No poke: only the returned deadlines wake the thread.
        let t0 = std::time::Instant::now();
        while targets.fired.load(Ordering::SeqCst) < 5 {
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "the thread slept past its deadlines"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        service.stop();
        thread.join().unwrap();
        let after = targets.fired.load(Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(
            targets.fired.load(Ordering::SeqCst),
            after,
            "fired after stop"
        );
        // The PIT was never programmed: no edges.
        assert_eq!(targets.pulses.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn min_of_options() {
        assert_eq!(min_opt(None, None), None);
        assert_eq!(min_opt(Some(3), None), Some(3));
        assert_eq!(min_opt(None, Some(4)), Some(4));
        assert_eq!(min_opt(Some(5), Some(4)), Some(4));
    }
}
