//! Holds: how long a page stays with the vCPUs that waited for it before another node may
//! take it away.
//!
//! Without a hold, a page contended by several nodes (a lock word everyone spins on) can
//! be revoked before the vCPU that faulted it in has run a single instruction, and the
//! holder of the lock never gets to release it. A fixed hold long enough for an
//! oversubscribed host makes every contended handoff pay for it, so a hold ends as soon
//! as every thread that faulted on the page has *run* for [`HOLD_RUN`] of CPU time since
//! it was woken (read from the kernel's per-thread CPU clock), or sleeps again (a woken
//! thread is runnable until it has run, so it ran and is done with the page), and at the
//! latest after [`HOLD_MAX`]. A thread that sleeps in another fault of ours may need both
//! pages for one instruction: its hold lasts until [`HOLD_IN_FAULT`] after the wake.
//! Without thread ids (an old kernel) it lasts [`HOLD_FALLBACK`].

use std::time::{Duration, Instant};

/// CPU time a woken faulting thread must have run before its page may leave: enough to
/// return from the fault, re-enter the guest and execute the faulting instruction.
pub const HOLD_RUN: Duration = Duration::from_micros(20);

/// The longest a page is held for a thread that does not get to run (oversubscribed host).
pub const HOLD_MAX: Duration = Duration::from_millis(1);

/// How long after its wake a page stays held for a thread that now waits in another of
/// our faults (the second page of a two-page access, or simply its next access).
pub const HOLD_IN_FAULT: Duration = Duration::from_micros(200);

/// The hold when the faulting threads are not known.
pub const HOLD_FALLBACK: Duration = Duration::from_micros(200);

/// Shortest pause between two looks at a pending hold's threads.
const RECHECK_MIN: Duration = Duration::from_micros(5);

/// A page handed to the threads that waited for it.
#[derive(Debug, Clone)]
pub struct Hold {
    /// When the threads were woken.
    woken: Instant,
    /// When the hold ends whatever the threads did.
    until: Instant,
    /// Faulting threads (kernel thread ids) and their CPU time when they were woken.
    threads: Vec<(i32, Duration)>,
}

impl Hold {
    /// A hold for the threads that faulted on the page, woken now: their ids and their
    /// CPU time while they waited (`None`: read it now).
    pub fn new(now: Instant, faulters: &[(i32, Option<Duration>)]) -> Hold {
        let threads: Vec<(i32, Duration)> = faulters
            .iter()
            .filter_map(|&(t, cpu)| cpu.or_else(|| thread_cpu_time(t)).map(|c| (t, c)))
            .collect();
        let until = now
            + if threads.is_empty() {
                HOLD_FALLBACK
            } else {
                HOLD_MAX
            };
        Hold {
            woken: now,
            until,
            threads,
        }
    }

    /// A hold of fixed length `d`, whatever the threads do (for comparisons).
    pub fn fixed(now: Instant, d: Duration) -> Hold {
        Hold {
            woken: now,
            until: now + d,
            threads: Vec::new(),
        }
    }

    /// `None` if the hold is over at `now`, else how long to wait before looking again.
    /// `in_fault(tid)` says whether the thread waits in another fault of this engine.
    pub fn remaining(&self, now: Instant, in_fault: impl Fn(i32) -> bool) -> Option<Duration> {
        let left = self
            .until
            .checked_duration_since(now)
            .filter(|d| !d.is_zero())?;
        if self.threads.is_empty() {
            return Some(left);
        }
        let mut need = Duration::ZERO;
        for &(tid, at_wake) in &self.threads {
            // A thread that is gone no longer needs the page.
            let Some(now_cpu) = thread_cpu_time(tid) else {
                continue;
            };
            let ran = now_cpu.saturating_sub(at_wake);
            if ran >= HOLD_RUN || thread_sleeps(tid) == Some(false) {
                if ran < HOLD_RUN {
                    need = need.max(HOLD_RUN - ran);
                }
                continue;
            }
            // Asleep again (or unknown): it has run since the wake.
            if in_fault(tid) {
                let two_page = (self.woken + HOLD_IN_FAULT).saturating_duration_since(now);
                need = need.max(two_page);
            }
        }
        if need.is_zero() {
            None
        } else {
            Some(need.max(RECHECK_MIN).min(left))
        }
    }

    /// When the hold ends at the latest.
    pub fn deadline(&self) -> Instant {
        self.until
    }
}

/// CPU time consumed so far by thread `tid` of this process, `None` if it cannot be read
/// (the thread exited, or `tid` is not one of ours).
pub fn thread_cpu_time(tid: i32) -> Option<Duration> {
    if tid <= 0 {
        return None;
    }
    // The kernel's encoding of a per-thread CPU clock: MAKE_THREAD_CPUCLOCK(tid,
    // CPUCLOCK_SCHED) = (~tid << 3) | CPUCLOCK_PERTHREAD_MASK | CPUCLOCK_SCHED.
    let clock = ((!(tid as u32)) << 3) as i32 | 4 | 2;
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec we own; an invalid clock id is an error
    // return, not undefined behaviour.
    let r = unsafe { libc::clock_gettime(clock as libc::clockid_t, &mut ts) };
    if r != 0 {
        return None;
    }
    Some(Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32))
}

/// Whether thread `tid` of this process is sleeping (`Some(false)`: running or runnable;
/// `None`: unknown, e.g. it exited).
pub fn thread_sleeps(tid: i32) -> Option<bool> {
    let stat = std::fs::read(format!("/proc/self/task/{tid}/stat")).ok()?;
    // "tid (comm) S ...": the state follows the last ')' (comm may hold anything).
    let close = stat.iter().rposition(|&b| b == b')')?;
    let state = stat.get(close + 2).copied()?;
    Some(state != b'R')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gettid() -> i32 {
        // SAFETY: gettid has no arguments and cannot fail.
        unsafe { libc::gettid() }
    }

    #[test]
    fn own_cpu_clock_advances_with_work() {
        let me = gettid();
        let a = thread_cpu_time(me).expect("own thread clock");
        let t = Instant::now();
        let mut x = 0u64;
        while t.elapsed() < Duration::from_millis(5) {
            x = std::hint::black_box(x.wrapping_add(1));
        }
        let b = thread_cpu_time(me).expect("own thread clock");
        assert!(b > a, "{a:?} -> {b:?}");
    }

    #[test]
    fn foreign_or_bad_tid_has_no_clock() {
        assert_eq!(thread_cpu_time(0), None);
        assert_eq!(thread_cpu_time(-5), None);
        // pid 1 is not a thread of this process.
        assert_eq!(thread_cpu_time(1), None);
    }

    /// Spins until this thread's CPU clock has advanced by `d` (wall time is not enough:
    /// a preempted thread does not run).
    fn run_for(d: Duration) {
        let me = gettid();
        let start = thread_cpu_time(me).expect("own thread clock");
        while thread_cpu_time(me).expect("own thread clock") < start + d {
            std::hint::spin_loop();
        }
    }

    /// CPU time "at the wake" that this thread cannot have run past yet however it is
    /// scheduled: reading the clock twice must not decide whether a test holds (on a
    /// nested-virtualisation host 20 us of CPU time can pass between two reads).
    fn not_yet_run() -> Option<Duration> {
        thread_cpu_time(gettid()).map(|c| c + Duration::from_secs(3600))
    }

    #[test]
    fn hold_ends_once_the_thread_has_run() {
        let me = gettid();
        let now = Instant::now();
        let h = Hold::new(now, &[(me, not_yet_run())]);
        assert!(
            h.remaining(Instant::now(), |_| false).is_some(),
            "held while the woken thread has not run"
        );
        let h = Hold::new(now, &[(me, None)]);
        run_for(HOLD_RUN * 2);
        assert_eq!(
            h.remaining(Instant::now(), |_| false),
            None,
            "the thread ran: hold over"
        );
    }

    /// A thread that waits to be told to go on (it sleeps), then spins for `spin`.
    fn parked_thread() -> (
        i32,
        std::sync::mpsc::Sender<()>,
        std::thread::JoinHandle<()>,
    ) {
        let (tx, rx) = std::sync::mpsc::channel();
        let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
        let t = std::thread::spawn(move || {
            tx.send(gettid()).ok();
            go_rx.recv().ok();
        });
        let tid = rx.recv().expect("tid");
        // Let it reach its sleep.
        while thread_sleeps(tid) != Some(true) {
            std::thread::yield_now();
        }
        (tid, go_tx, t)
    }

    #[test]
    fn thread_state_is_read() {
        assert_eq!(thread_sleeps(gettid()), Some(false), "this thread runs");
        let (tid, go, t) = parked_thread();
        assert_eq!(thread_sleeps(tid), Some(true));
        go.send(()).ok();
        t.join().expect("join");
        assert_eq!(thread_sleeps(-1), None);
    }

    #[test]
    fn a_thread_asleep_again_is_done_with_the_page() {
        let (tid, go, t) = parked_thread();
        let now = Instant::now();
        let h = Hold::new(now, &[(tid, None)]);
        assert_eq!(h.remaining(now, |_| false), None);
        go.send(()).ok();
        t.join().expect("join");
    }

    #[test]
    fn a_runnable_thread_that_has_not_run_enough_keeps_it_until_the_deadline() {
        let me = gettid();
        let now = Instant::now();
        let h = Hold::new(now, &[(me, not_yet_run())]);
        let wait = h.remaining(now, |_| false).expect("held");
        assert!(
            wait <= HOLD_RUN,
            "look again once it may have run enough: {wait:?}"
        );
        assert_eq!(
            h.remaining(now + HOLD_MAX, |_| false),
            None,
            "over at the deadline"
        );
    }

    #[test]
    fn hold_of_a_thread_that_ran_and_sleeps_ends_unless_it_waits_in_a_fault() {
        let (tid, go, t) = parked_thread();
        // Pretend it was woken with less CPU time than it has: it "ran" since.
        let cpu = thread_cpu_time(tid).expect("clock");
        let now = Instant::now();
        let h = Hold {
            woken: now,
            until: now + HOLD_MAX,
            threads: vec![(tid, cpu.saturating_sub(Duration::from_nanos(500)))],
        };
        assert_eq!(h.remaining(now, |_| false), None, "ran, then slept: done");
        assert!(
            h.remaining(now, |t| t == tid).is_some(),
            "sleeping in another of our faults: still held"
        );
        assert_eq!(
            h.remaining(now + HOLD_IN_FAULT, |t| t == tid),
            None,
            "but not for longer than HOLD_IN_FAULT"
        );
        go.send(()).ok();
        t.join().expect("join");
    }

    #[test]
    fn a_fixed_hold_ignores_the_threads() {
        let now = Instant::now();
        let h = Hold::fixed(now, Duration::from_micros(300));
        assert!(h
            .remaining(now + Duration::from_micros(299), |_| false)
            .is_some());
        assert_eq!(
            h.remaining(now + Duration::from_micros(300), |_| false),
            None
        );
    }

    #[test]
    fn unknown_threads_fall_back_to_a_fixed_hold() {
        let now = Instant::now();
        let h = Hold::new(now, &[]);
        assert_eq!(h.deadline(), now + HOLD_FALLBACK);
        assert!(h.remaining(now, |_| false).is_some());
        assert_eq!(h.remaining(now + HOLD_FALLBACK, |_| false), None);
    }
}
