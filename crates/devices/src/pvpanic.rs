//! QEMU-compatible pvpanic ISA device: the guest reports a panic with one port write.

use std::sync::Arc;

use crate::bus::BusDevice;
use crate::{VmEvent, VmEventSink};

/// The guest has panicked.
pub const PVPANIC_PANICKED: u8 = 1 << 0;
/// The guest has loaded a crash kernel and will dump; informational only.
pub const PVPANIC_CRASH_LOADED: u8 = 1 << 1;

/// pvpanic at `PVPANIC_PORT` (1 byte): reads return the supported events
/// (PANICKED | CRASH_LOADED), writing bit 0 raises [`VmEvent::Panic`].
pub struct PvPanic {
    events: Arc<dyn VmEventSink>,
}

impl PvPanic {
    /// A pvpanic device reporting to `events`.
    pub fn new(events: Arc<dyn VmEventSink>) -> Self {
        Self { events }
    }
}

impl BusDevice for PvPanic {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        for (i, byte) in data.iter_mut().enumerate() {
            *byte = if offset.checked_add(i as u64) == Some(0) {
                PVPANIC_PANICKED | PVPANIC_CRASH_LOADED
            } else {
                0xFF
            };
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        for (i, &value) in data.iter().enumerate() {
            if offset.checked_add(i as u64) != Some(0) {
                continue;
            }
            if value & PVPANIC_PANICKED != 0 {
                self.events.vm_event(VmEvent::Panic);
            } else if value & PVPANIC_CRASH_LOADED != 0 {
                tracing::info!("guest loaded a crash kernel after a crash (pvpanic)");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::Events;

    #[test]
    fn reports_panic_on_bit_0() {
        let events = Arc::new(Events::default());
        let mut dev = PvPanic::new(events.clone());
        let mut b = [0];
        dev.read(0, &mut b);
        assert_eq!(b[0], 0x03);
        dev.write(0, &[PVPANIC_CRASH_LOADED]);
        dev.write(0, &[0]);
        assert!(events.take().is_empty());
        dev.write(0, &[PVPANIC_PANICKED]);
        assert_eq!(events.take(), vec![VmEvent::Panic]);
        dev.write(1, &[PVPANIC_PANICKED]);
        assert!(events.take().is_empty());
    }
}
