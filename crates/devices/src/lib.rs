//! dvmm's emulated platform devices, other than the interrupt controllers, and the bus
//! that dispatches port I/O and MMIO accesses to them.
//!
//! Devices know nothing about KVM or about which thread (or which node) calls them:
//! a vCPU thread, a stdin thread or a node forwarding an access all go through the same
//! [`bus::BusDevice`] interface. Interrupts leave a device through an [`IrqLine`] and
//! requests that concern the whole VM through a [`VmEventSink`], both implemented by
//! the VMM.
//!
//! Every device tolerates any guest access: any offset, any length, any value.

#![forbid(unsafe_code)]

pub mod acpi_pm;
pub mod bus;
pub mod dma_test;
pub mod i8042;
pub mod pic;
pub mod pvpanic;
pub mod rtc;
pub mod serial;
pub mod sink;
pub mod test_devices;

pub use acpi_pm::{AcpiPm, ResetPort};
pub use bus::{Bus, BusDevice, BusError};
pub use dma_test::DmaTest;
pub use i8042::I8042;
pub use pic::Pic;
pub use pvpanic::PvPanic;
pub use rtc::Rtc;
pub use serial::Serial;
pub use sink::Sink;

/// An interrupt input line of the interrupt controller (an IOAPIC pin). Implemented by
/// the VMM.
pub trait IrqLine: Send + Sync {
    /// Drive the line high (true) or low (false). An edge-triggered user pulses:
    /// `set_level(true); set_level(false)`.
    fn set_level(&self, high: bool);
}

/// Guest-physical memory as the VMM and its devices (DMA) reach it; in a cluster, through
/// the DSM. Implemented by the VMM.
pub trait GuestAccess: Send + Sync {
    /// Reads `buf.len()` bytes at `gpa`; the range lies within one 4 KiB page.
    fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), GuestAccessError>;
    /// Writes `buf` at `gpa`; the range lies within one 4 KiB page.
    fn write(&self, gpa: u64, buf: &[u8]) -> Result<(), GuestAccessError>;
}

/// Calls `f(address, range of the buffer)` for each piece of `[gpa, gpa + len)` that
/// stays within one 4 KiB page; a range that wraps the address space is not RAM.
fn per_page(
    gpa: u64,
    len: usize,
    mut f: impl FnMut(u64, std::ops::Range<usize>) -> Result<(), GuestAccessError>,
) -> Result<(), GuestAccessError> {
    const PAGE: u64 = 4096;
    let mut done = 0usize;
    while done < len {
        let at = gpa
            .checked_add(done as u64)
            .ok_or(GuestAccessError::NotRam { gpa, len })?;
        let n = usize::try_from(PAGE - at % PAGE)
            .unwrap_or(usize::MAX)
            .min(len - done);
        f(at, done..done + n)?;
        done += n;
    }
    Ok(())
}

/// Reads `buf.len()` bytes at `gpa` through `mem`, page by page (any length or alignment).
pub fn read_guest(mem: &dyn GuestAccess, gpa: u64, buf: &mut [u8]) -> Result<(), GuestAccessError> {
    let len = buf.len();
    per_page(gpa, len, |at, r| mem.read(at, &mut buf[r]))
}

/// Writes `buf` at `gpa` through `mem`, page by page (any length or alignment).
pub fn write_guest(mem: &dyn GuestAccess, gpa: u64, buf: &[u8]) -> Result<(), GuestAccessError> {
    per_page(gpa, buf.len(), |at, r| mem.write(at, &buf[r]))
}

/// Why a [`GuestAccess`] failed.
#[derive(Debug, thiserror::Error)]
pub enum GuestAccessError {
    /// The range is not guest RAM (an MMIO hole, or past the end).
    #[error("guest address {gpa:#x} ({len} bytes) is not RAM")]
    NotRam {
        /// Start of the access.
        gpa: u64,
        /// Its length.
        len: usize,
    },
    /// The memory behind the range failed (the DSM could not fetch or own the page, or
    /// the mapping refused the access).
    #[error("guest memory at {gpa:#x} could not be reached: {source}")]
    Failed {
        /// Start of the access.
        gpa: u64,
        /// What failed underneath.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// What a device may ask of the whole VM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VmEvent {
    /// The guest switched itself off (ACPI S5).
    PowerOff,
    /// The guest asked for a system reset (reset register, i8042 reset line).
    Reset,
    /// The guest reported a kernel panic (pvpanic).
    Panic,
    /// A test wrote this value to isa-debug-exit (`--test-devices`).
    DebugExit(u32),
}

/// Receives the [`VmEvent`]s devices raise. Implemented by the VMM.
pub trait VmEventSink: Send + Sync {
    /// Handle `event`; called on whatever thread performed the guest access.
    fn vm_event(&self, event: VmEvent);
}

#[cfg(test)]
pub(crate) mod test_util {
    use super::{IrqLine, VmEvent, VmEventSink};
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::Mutex;

    /// Counts rising edges and remembers the current level.
    #[derive(Default)]
    pub struct FakeIrq {
        pub rising: AtomicUsize,
        pub level: AtomicBool,
    }

    impl FakeIrq {
        pub fn pulses(&self) -> usize {
            self.rising.load(Ordering::SeqCst)
        }
        pub fn is_high(&self) -> bool {
            self.level.load(Ordering::SeqCst)
        }
    }

    impl IrqLine for FakeIrq {
        fn set_level(&self, high: bool) {
            let was = self.level.swap(high, Ordering::SeqCst);
            if high && !was {
                self.rising.fetch_add(1, Ordering::SeqCst);
            }
        }
    }

    /// Records every event.
    #[derive(Default)]
    pub struct Events(pub Mutex<Vec<VmEvent>>);

    impl Events {
        pub fn take(&self) -> Vec<VmEvent> {
            std::mem::take(&mut *self.0.lock().unwrap())
        }
    }

    impl VmEventSink for Events {
        fn vm_event(&self, event: VmEvent) {
            self.0.lock().unwrap().push(event);
        }
    }
}

#[cfg(test)]
mod fuzz_tests {
    use super::test_util::{Events, FakeIrq};
    use super::*;
    use proptest::prelude::*;
    use std::sync::Arc;

    #[derive(Debug, Clone)]
    enum Op {
        Read(u64, usize),
        Write(u64, Vec<u8>),
    }

    fn op() -> impl Strategy<Value = Op> {
        // Mostly offsets inside the devices' ranges, sometimes anywhere.
        let offset = prop_oneof![4 => 0u64..16, 1 => any::<u64>()];
        prop_oneof![
            (offset.clone(), 1usize..=8).prop_map(|(o, n)| Op::Read(o, n)),
            (offset, proptest::collection::vec(any::<u8>(), 1..=8))
                .prop_map(|(o, d)| Op::Write(o, d)),
        ]
    }

    /// Guest memory that fails every access.
    struct NoRam;

    impl GuestAccess for NoRam {
        fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), GuestAccessError> {
            Err(GuestAccessError::NotRam {
                gpa,
                len: buf.len(),
            })
        }
        fn write(&self, gpa: u64, buf: &[u8]) -> Result<(), GuestAccessError> {
            Err(GuestAccessError::NotRam {
                gpa,
                len: buf.len(),
            })
        }
    }

    fn devices() -> Vec<Box<dyn BusDevice>> {
        let events: Arc<dyn VmEventSink> = Arc::new(Events::default());
        let irq: Arc<dyn IrqLine> = Arc::new(FakeIrq::default());
        let mut pm = AcpiPm::with_clock(events.clone(), Box::new(|| u64::MAX));
        pm.set_sci(irq.clone());
        vec![
            Box::new(Serial::new(irq, Box::new(std::io::sink()))),
            Box::new(Rtc::with_clock(Box::new(|| 1_709_214_356))),
            Box::new(Rtc::with_clock(Box::new(|| i64::MIN))),
            Box::new(Rtc::with_clock(Box::new(|| i64::MAX))),
            Box::new(I8042::new(events.clone())),
            Box::new(pm),
            Box::new(AcpiPm::new(events.clone())),
            Box::new(ResetPort::new(events.clone())),
            Box::new(PvPanic::new(events)),
            Box::new(DmaTest::new(Arc::new(NoRam))),
            Box::new(Pic::new()),
            Box::new(Sink),
            Box::new(test_devices::FwCfg::new(&test_devices::FwCfgFacts {
                memory: 1 << 30,
                cpu_nodes: vec![0, 1],
                node_memory: vec![1 << 29, 1 << 29],
            })),
            Box::new(test_devices::DebugExit::new(Arc::new(Events::default()))),
            Box::new(test_devices::PcTestDev::default()),
            Box::new(test_devices::TestDevIoMem::default()),
            Box::new(test_devices::TestDevIrqs::new(vec![
                Arc::new(FakeIrq::default()) as Arc<dyn IrqLine>;
                test_devices::TESTDEV_IRQ_LINES
            ])),
        ]
    }

    proptest! {
        #[test]
        fn arbitrary_accesses_never_panic(ops in proptest::collection::vec(op(), 1..64)) {
            for mut dev in devices() {
                for op in &ops {
                    match op {
                        Op::Read(offset, len) => {
                            let mut buf = [0u8; 8];
                            dev.read(*offset, &mut buf[..*len]);
                        }
                        Op::Write(offset, data) => dev.write(*offset, data),
                    }
                }
            }
        }

        #[test]
        fn bus_dispatch_never_panics(
            ranges in proptest::collection::vec((any::<u64>(), any::<u64>()), 0..8),
            accesses in proptest::collection::vec((any::<u64>(), 1usize..=8), 0..32),
        ) {
            let mut bus = Bus::new();
            for (base, len) in ranges {
                let _ = bus.insert(Arc::new(std::sync::Mutex::new(Sink)), base, len);
            }
            for (addr, len) in accesses {
                let mut buf = [0u8; 8];
                let hit = bus.read(addr, &mut buf[..len]);
                prop_assert_eq!(hit, bus.write(addr, &buf[..len]));
            }
        }
    }
}
