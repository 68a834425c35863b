//! Pure-logic userspace interrupt controllers for dvmm.
//!
//! Nothing here touches KVM, threads or I/O: every method takes the current host time
//! (`now_ns`, CLOCK_MONOTONIC nanoseconds) as a parameter and returns what the VMM has
//! to do (messages to route, vectors to inject, deadlines to arm). Interrupts between
//! controllers are plain [`InterruptMessage`]s addressed by APIC id, so that they can
//! later travel between dvmm nodes.

pub mod clock;
pub mod ioapic;
pub mod lapic;
pub mod msg;
pub mod pit;
pub mod pv_ipi;
pub mod route;

pub use clock::{Clock, FakeClock, MonotonicClock, TscMap};
pub use ioapic::IoApic;
pub use lapic::{ApicView, Lapic, LapicError, LapicEvent};
pub use msg::{DeliveryMode, DestinationMode, InterruptMessage, Shorthand, TriggerMode};
pub use pit::{Pit, PIT_HZ};
pub use route::targets;
