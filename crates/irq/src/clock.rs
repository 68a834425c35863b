//! Host time sources and the host-time/guest-TSC mapping.

use std::sync::atomic::{AtomicU64, Ordering};

/// Source of host time in ns.
pub trait Clock: Send + Sync {
    /// Current host time in nanoseconds (CLOCK_MONOTONIC or a fake).
    fn now_ns(&self) -> u64;
}

/// CLOCK_MONOTONIC.
#[derive(Clone, Copy, Debug, Default)]
pub struct MonotonicClock;

impl Clock for MonotonicClock {
    fn now_ns(&self) -> u64 {
        clock_ns(libc::CLOCK_MONOTONIC)
    }
}

/// Host clock `id` in ns.
fn clock_ns(id: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec and the clocks asked for
    // (CLOCK_MONOTONIC, CLOCK_BOOTTIME) are always available on Linux; the call writes
    // only into `ts`.
    let rc = unsafe { libc::clock_gettime(id, &mut ts) };
    if rc != 0 {
        // Cannot happen for these clocks; 0 keeps callers panic-free.
        return 0;
    }
    (ts.tv_sec as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(ts.tv_nsec as u64)
}

/// The host's `CLOCK_BOOTTIME` in ns: what KVM's kvmclock counts from.
pub fn boottime_ns() -> u64 {
    clock_ns(libc::CLOCK_BOOTTIME)
}

/// The host's TSC.
pub fn host_tsc() -> u64 {
    // SAFETY: RDTSC reads the time-stamp counter; it has no memory effects.
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// Manually advanced clock for tests (interior mutability, AtomicU64).
#[derive(Debug, Default)]
pub struct FakeClock {
    now: AtomicU64,
}

impl FakeClock {
    /// A fake clock reading `start_ns`.
    pub fn new(start_ns: u64) -> Self {
        Self {
            now: AtomicU64::new(start_ns),
        }
    }

    /// Set the time to `ns`.
    pub fn set(&self, ns: u64) {
        self.now.store(ns, Ordering::SeqCst);
    }

    /// Move the time forward by `ns` (saturating).
    pub fn advance(&self, ns: u64) {
        let _ = self
            .now
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |t| {
                Some(t.saturating_add(ns))
            });
    }
}

impl Clock for FakeClock {
    fn now_ns(&self) -> u64 {
        self.now.load(Ordering::SeqCst)
    }
}

/// Mapping between host time and the guest's TSC, anchored at a recent reading:
/// the guest TSC read `ref_tsc` at host time `base_ns`, and counts at `tsc_khz`:
/// `guest_tsc(t) = ref_tsc + (t - base_ns) * tsc_khz / 1_000_000` (signed arithmetic in
/// i128; results are clamped to `0..=u64::MAX`).
///
/// Anchoring near the present matters: KVM's reported TSC frequency is only accurate to
/// a few parts in 10^5, so extrapolating from TSC 0 (often hours ago) would put a
/// TSC-deadline timer tens of milliseconds off.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TscMap {
    /// Guest TSC frequency in kHz.
    pub tsc_khz: u64,
    /// Host time (ns) of the anchor reading.
    pub base_ns: u64,
    /// Guest TSC value at `base_ns`.
    pub ref_tsc: u64,
}

impl TscMap {
    /// Guest TSC value at host time `now_ns` (clamped to `0..=u64::MAX`).
    pub fn tsc_at(&self, now_ns: u64) -> u64 {
        let dt = i128::from(now_ns) - i128::from(self.base_ns);
        let tsc = i128::from(self.ref_tsc) + dt * i128::from(self.tsc_khz) / 1_000_000;
        tsc.clamp(0, i128::from(u64::MAX)) as u64
    }

    /// Earliest host time at which the guest TSC reaches `tsc` (so that
    /// `tsc_at(ns_at_tsc(x)) >= x`). Clamped to `0..=u64::MAX` (`u64::MAX` also when
    /// `tsc_khz` is 0).
    pub fn ns_at_tsc(&self, tsc: u64) -> u64 {
        if self.tsc_khz == 0 {
            return u64::MAX;
        }
        let khz = i128::from(self.tsc_khz);
        let dtsc = i128::from(tsc) - i128::from(self.ref_tsc);
        // Ceiling division that also rounds negative values up.
        let dt = (dtsc * 1_000_000).div_euclid(khz)
            + i128::from((dtsc * 1_000_000).rem_euclid(khz) != 0);
        (i128::from(self.base_ns) + dt).clamp(0, i128::from(u64::MAX)) as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn anchored_map_converts_near_the_anchor() {
        // A huge TSC value at the anchor: only the distance from it matters.
        let m = TscMap {
            tsc_khz: 2_000_000,
            base_ns: 5_000_000_000,
            ref_tsc: 3_000_000_000_000,
        };
        assert_eq!(m.tsc_at(5_000_000_000), 3_000_000_000_000);
        assert_eq!(m.tsc_at(5_000_001_000), 3_000_000_002_000);
        assert_eq!(m.ns_at_tsc(3_000_000_002_000), 5_000_001_000);
        assert_eq!(m.ns_at_tsc(3_000_000_000_001), 5_000_000_001);
        // Before the anchor: earlier host times, clamped at 0.
        assert_eq!(m.ns_at_tsc(2_999_999_998_000), 4_999_999_000);
        assert_eq!(m.ns_at_tsc(0), 0);
        assert_eq!(m.tsc_at(0), 2_990_000_000_000);
    }

    #[test]
    fn fake_clock_set_and_advance() {
        let c = FakeClock::new(5);
        assert_eq!(c.now_ns(), 5);
        c.advance(10);
        assert_eq!(c.now_ns(), 15);
        c.set(3);
        assert_eq!(c.now_ns(), 3);
        c.advance(u64::MAX);
        assert_eq!(c.now_ns(), u64::MAX);
    }

    #[test]
    fn monotonic_clock_does_not_go_back() {
        let c = MonotonicClock;
        let a = c.now_ns();
        let b = c.now_ns();
        assert!(a > 0);
        assert!(b >= a);
    }

    #[test]
    fn tsc_map_round_trips() {
        let m = TscMap {
            tsc_khz: 2_500_000, // 2.5 GHz
            base_ns: 1_000,
            ref_tsc: 0,
        };
        assert_eq!(m.tsc_at(1_000), 0);
        assert_eq!(m.tsc_at(2_000), 2_500);
        assert_eq!(m.tsc_at(0), 0); // before base clamps
        assert_eq!(m.ns_at_tsc(2_500), 2_000);
        // Rounds up: 1 TSC tick needs 0.4 ns -> 1 ns.
        assert_eq!(m.ns_at_tsc(1), 1_001);
        for tsc in [0u64, 1, 7, 12_345, 1 << 40] {
            let ns = m.ns_at_tsc(tsc);
            assert!(m.tsc_at(ns) >= tsc);
            assert!(ns == m.base_ns || m.tsc_at(ns - 1) < tsc);
        }
    }

    #[test]
    fn tsc_map_slow_clock_and_zero() {
        let m = TscMap {
            tsc_khz: 3,
            base_ns: 0,
            ref_tsc: 0,
        };
        assert_eq!(m.ns_at_tsc(1), 333_334);
        assert_eq!(m.tsc_at(333_334), 1);
        let z = TscMap {
            tsc_khz: 0,
            base_ns: 0,
            ref_tsc: 0,
        };
        assert_eq!(z.ns_at_tsc(5), u64::MAX);
        assert_eq!(z.tsc_at(1 << 50), 0);
    }
}
