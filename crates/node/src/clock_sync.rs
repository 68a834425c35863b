//! Clocks across hosts: how far this host's clocks are from node 0's, measured the way
//! NTP does it. A probe leaves at local time t1, node 0 reads its clocks (t2) when the
//! probe arrives and echoes them, the echo arrives at t3. Node 0's clock at the midpoint
//! of t1 and t3 was t2, give or take half the round trip; the round trip with the
//! smallest delay gives the tightest bound.
//!
//! Each node of a cluster is its own KVM VM on its own host. dvmm gives every vCPU the
//! guest TSC and kvmclock of node 0's host: the offset measured here goes into the
//! vCPUs' TSC offsets and the VM's kvmclock ([`dvmm_vmm::vm::ClockAlign`]). An offset
//! within its bound is indistinguishable from none (nodes on one host), and is not
//! applied.

use dvmm_vmm::vm::ClockAlign;

/// One reading of a host's clocks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Sample {
    /// The TSC.
    pub tsc: u64,
    /// `CLOCK_BOOTTIME` (what kvmclock counts from), in ns.
    pub ns: u64,
}

/// This host's clocks, as the node reads them.
#[derive(Clone, Copy, Debug)]
pub struct HostClock {
    tsc_khz: u32,
    skew_ns: i64,
    offsets_apply: bool,
}

impl HostClock {
    /// The host's clocks; `skew_ns` makes them read that much ahead (a test hook that
    /// stands in for a host whose clocks differ: `DVMM_TEST_CLOCK_SKEW`).
    /// `offsets_apply`: whether guest code sees a vCPU's TSC offset.
    pub fn new(tsc_khz: u32, skew_ns: i64, offsets_apply: bool) -> HostClock {
        HostClock {
            tsc_khz,
            skew_ns,
            offsets_apply,
        }
    }

    /// The TSC frequency in kHz.
    pub fn tsc_khz(&self) -> u32 {
        self.tsc_khz
    }

    /// The skew in TSC cycles.
    fn skew_tsc(&self) -> i64 {
        ns_to_cycles(self.skew_ns, self.tsc_khz)
    }

    /// Reads both clocks, back to back.
    pub fn now(&self) -> Sample {
        let tsc = dvmm_irq::clock::host_tsc();
        let ns = dvmm_irq::clock::boottime_ns();
        Sample {
            tsc: tsc.wrapping_add_signed(self.skew_tsc()),
            ns: ns.wrapping_add_signed(self.skew_ns),
        }
    }

    /// The clock set-up that makes this node's vCPUs show `applied` (node 0's clocks
    /// less this host's, as this node reads them) on top of this host's clocks as KVM
    /// reads them (without the test skew).
    pub fn align(&self, applied: Offset) -> ClockAlign {
        ClockAlign {
            tsc_offset: self.skew_tsc().wrapping_add(applied.tsc),
            boottime_offset_ns: self.skew_ns.wrapping_add(applied.ns),
        }
    }
}

/// Why this host cannot show the guest node 0's clocks.
#[derive(Debug, thiserror::Error)]
#[error("this host's TSC is {offset_ns} ns from node 0's (+-{bound_ns} ns), and its KVM does not let dvmm move the guest's TSC (guest code reads the host's TSC directly, as on PVM): the guest's TSC would jump between nodes; run such nodes on hosts whose TSCs agree, or on hosts with VT-x/AMD-V")]
pub struct OffsetsIgnored {
    /// The TSC offset that would be needed, in ns.
    pub offset_ns: i64,
    /// The measurement's bound.
    pub bound_ns: u64,
}

impl HostClock {
    /// `align` as this host can apply it: unchanged where guest code sees TSC offsets;
    /// elsewhere with no TSC offset, which must then be within `bound_ns` of the one
    /// wanted (kvmclock's offset still applies: KVM computes it from what the guest reads).
    pub fn fit(&self, align: ClockAlign, bound_ns: u64) -> Result<ClockAlign, OffsetsIgnored> {
        if self.offsets_apply || align.tsc_offset == 0 {
            return Ok(align);
        }
        let offset_ns = cycles_to_ns(align.tsc_offset, self.tsc_khz);
        if offset_ns.unsigned_abs() > bound_ns {
            return Err(OffsetsIgnored {
                offset_ns,
                bound_ns,
            });
        }
        Ok(ClockAlign {
            tsc_offset: 0,
            ..align
        })
    }
}

fn cycles_to_ns(cycles: i64, khz: u32) -> i64 {
    if khz == 0 {
        return 0;
    }
    (i128::from(cycles) * 1_000_000 / i128::from(khz)) as i64
}

fn ns_to_cycles(ns: i64, khz: u32) -> i64 {
    (i128::from(ns) * i128::from(khz) / 1_000_000) as i64
}

/// Node 0's clocks less this host's.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Offset {
    /// TSC cycles.
    pub tsc: i64,
    /// Nanoseconds.
    pub ns: i64,
}

/// One probe and its echo.
#[derive(Clone, Copy, Debug)]
pub struct Round {
    /// This host's clocks when the probe left.
    pub sent: Sample,
    /// Node 0's clocks when the probe arrived.
    pub echo: Sample,
    /// This host's clocks when the echo arrived.
    pub got: Sample,
}

/// What the rounds say.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Estimate {
    /// Node 0's clocks less this host's.
    pub offset: Offset,
    /// How far off `offset.ns` can be: half the best round trip, in ns.
    pub bound_ns: u64,
}

impl Estimate {
    /// From the round with the shortest round trip; `None` without rounds.
    pub fn from_rounds(rounds: &[Round]) -> Option<Estimate> {
        let best = rounds
            .iter()
            .min_by_key(|r| r.got.ns.wrapping_sub(r.sent.ns))?;
        let mid = |a: u64, b: u64| (i128::from(a) + i128::from(b)) / 2;
        let off = |theirs: u64, a: u64, b: u64| (i128::from(theirs) - mid(a, b)) as i64;
        Some(Estimate {
            offset: Offset {
                tsc: off(best.echo.tsc, best.sent.tsc, best.got.tsc),
                ns: off(best.echo.ns, best.sent.ns, best.got.ns),
            },
            bound_ns: best.got.ns.saturating_sub(best.sent.ns).div_ceil(2),
        })
    }

    /// Whether the offset is larger than the measurement can tell from none.
    pub fn significant(&self) -> bool {
        self.offset.ns.unsigned_abs() > self.bound_ns
    }

    /// The offset to apply, clock by clock: each of the TSC's and the boot-time clock's
    /// where it is larger than the bound, 0 where the measurement cannot tell it from
    /// none (`tsc_khz` converts the TSC's to ns).
    pub fn applied(&self, tsc_khz: u32) -> Offset {
        let tsc_ns = cycles_to_ns(self.offset.tsc, tsc_khz);
        Offset {
            tsc: if tsc_ns.unsigned_abs() > self.bound_ns {
                self.offset.tsc
            } else {
                0
            },
            ns: if self.significant() {
                self.offset.ns
            } else {
                0
            },
        }
    }
}

/// Whether this host's TSC is invariant (CPUID 0x80000007 EDX bit 8): it runs at one rate in
/// every power state, so TSCs of different hosts keep a fixed offset.
pub fn invariant_tsc() -> bool {
    use core::arch::x86_64::__cpuid;
    let max = __cpuid(0x8000_0000).eax;
    max >= 0x8000_0007 && __cpuid(0x8000_0007).edx & (1 << 8) != 0
}

/// Whether two TSC frequencies are the same for KVM's purposes: within 250 ppm (KVM's
/// default `tsc_tolerance_ppm`, inside which it does not scale a guest's TSC either).
pub fn same_rate(a_khz: u32, b_khz: u32) -> bool {
    u64::from(a_khz.abs_diff(b_khz)) * 1_000_000 <= 250 * u64::from(a_khz.max(b_khz))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round(sent: u64, theirs: u64, got: u64) -> Round {
        // 1 cycle per ns (a 1 GHz TSC) keeps the arithmetic readable.
        let s = |t| Sample { tsc: t, ns: t };
        Round {
            sent: s(sent),
            echo: s(theirs),
            got: s(got),
        }
    }

    #[test]
    fn the_shortest_round_trip_sets_offset_and_bound() {
        // Node 0 is 1 s ahead; one slow round trip (asymmetric) and one fast one.
        let rounds = [
            round(1_000, 1_000_001_000 + 9_000, 11_000),
            round(20_000, 1_000_020_050, 20_100),
        ];
        let e = Estimate::from_rounds(&rounds).unwrap();
        assert_eq!(e.offset.ns, 1_000_000_000);
        assert_eq!(e.offset.tsc, 1_000_000_000);
        assert_eq!(e.bound_ns, 50);
        assert!(e.significant());
        assert_eq!(Estimate::from_rounds(&[]), None);
    }

    #[test]
    fn an_offset_inside_its_bound_is_not_significant() {
        let e = Estimate::from_rounds(&[round(100, 130, 200)]).unwrap();
        assert_eq!((e.offset.ns, e.bound_ns), (-20, 50));
        assert!(!e.significant());
        // Node 0 behind this host.
        let e = Estimate::from_rounds(&[round(5_000, 1_050, 5_100)]).unwrap();
        assert_eq!(e.offset.ns, -4_000);
        assert!(e.significant());
    }

    #[test]
    fn a_skewed_host_clock_is_undone_by_the_measured_offset() {
        let c = HostClock::new(2_000_000, 1_000_000_000, true);
        // Node 0's clocks are this host's real ones: the measured offset is -skew.
        let applied = Offset {
            tsc: -2_000_000_000,
            ns: -1_000_000_000,
        };
        assert_eq!(c.align(applied), ClockAlign::default());
        // Not applying it leaves the guest the skewed clocks.
        assert_eq!(
            c.align(Offset::default()),
            ClockAlign {
                tsc_offset: 2_000_000_000,
                boottime_offset_ns: 1_000_000_000
            }
        );
        let a = c.now();
        let b = HostClock::new(2_000_000, 0, true).now();
        assert!(
            a.ns >= b.ns + 999_000_000 || a.ns < b.ns,
            "skew shows in readings"
        );
    }

    #[test]
    fn a_host_that_ignores_tsc_offsets_takes_only_those_within_the_bound() {
        let want = ClockAlign {
            tsc_offset: 2_000, // 1 us at 2 GHz
            boottime_offset_ns: 5_000_000,
        };
        let pvm = HostClock::new(2_000_000, 0, false);
        assert_eq!(
            pvm.fit(want, 1_500).unwrap(),
            ClockAlign {
                tsc_offset: 0,
                boottime_offset_ns: 5_000_000
            }
        );
        let e = pvm.fit(want, 500).unwrap_err();
        assert_eq!((e.offset_ns, e.bound_ns), (1_000, 500));
        assert!(e
            .to_string()
            .contains("does not let dvmm move the guest's TSC"));
        let hw = HostClock::new(2_000_000, 0, true);
        assert_eq!(hw.fit(want, 0).unwrap(), want);
    }

    #[test]
    fn each_clock_is_moved_only_beyond_the_bound() {
        // 1 GHz TSC: cycles are ns. The TSCs differ by 5 us, the boot clocks by 10 ns.
        let e = Estimate {
            offset: Offset { tsc: 5_000, ns: 10 },
            bound_ns: 100,
        };
        assert_eq!(e.applied(1_000_000), Offset { tsc: 5_000, ns: 0 });
        let e = Estimate {
            offset: Offset { tsc: 50, ns: -500 },
            bound_ns: 100,
        };
        assert_eq!(e.applied(1_000_000), Offset { tsc: 0, ns: -500 });
    }

    #[test]
    fn rates_within_250_ppm_are_the_same() {
        assert!(same_rate(2_445_428, 2_445_428));
        assert!(same_rate(2_000_000, 2_000_500));
        assert!(!same_rate(2_000_000, 2_000_501));
        assert!(!same_rate(2_400_000, 3_000_000));
    }
}
