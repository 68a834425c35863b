//! Dispatch of port I/O and MMIO accesses to the device that owns the address.

use dvmm_sync::{MutexExt, RwLockExt};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, RwLock};

/// A device reachable at a range of port or MMIO addresses.
///
/// Accesses may have any length (1..=8 for PIO/MMIO exits) and any `offset`, even one
/// past the end of the device's range when an access straddles it; implementations
/// must not panic on any of them.
pub trait BusDevice: Send {
    /// Guest read of `data.len()` bytes at `offset`, relative to the range's base.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// Guest write of `data` at `offset`, relative to the range's base.
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// Why a device could not be placed on a [`Bus`].
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    /// The new range shares addresses with a device already on the bus.
    #[error(
        "bus range {base:#x} (+{len:#x}) overlaps a device already on the bus; pick a free range"
    )]
    Overlap {
        /// Base of the rejected range.
        base: u64,
        /// Length of the rejected range.
        len: u64,
    },
    /// A device range must cover at least one address.
    #[error("bus range length is zero; a device must cover at least one address")]
    ZeroLength,
    /// The range runs past the end of the 64-bit address space.
    #[error("bus range {base:#x} (+{len:#x}) runs past the end of the address space")]
    Wraps {
        /// Base of the rejected range.
        base: u64,
        /// Length of the rejected range.
        len: u64,
    },
}

/// A shared handle to a device on the bus.
pub type SharedDevice = Arc<Mutex<dyn BusDevice>>;

#[derive(Clone)]
struct Entry {
    len: u64,
    device: SharedDevice,
}

/// Address-ordered map of ranges to devices; lookup is O(log n).
///
/// Cloning gives another handle to the same map: a device inserted through one clone is
/// visible through all of them.
#[derive(Default, Clone)]
pub struct Bus {
    map: Arc<RwLock<BTreeMap<u64, Entry>>>,
}

impl std::fmt::Debug for Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let map = self.map.read_locked();
        f.debug_list()
            .entries(map.iter().map(|(base, e)| (*base, e.len)))
            .finish()
    }
}

/// Whether `addr` lies in `[base, base + len)`, without overflowing.
fn covers(base: u64, len: u64, addr: u64) -> bool {
    addr >= base && addr - base < len
}

impl Bus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Place `device` at `[base, base + len)`. The range may end exactly at 2^64.
    pub fn insert(&mut self, device: SharedDevice, base: u64, len: u64) -> Result<(), BusError> {
        if len == 0 {
            return Err(BusError::ZeroLength);
        }
        if len - 1 > u64::MAX - base {
            return Err(BusError::Wraps { base, len });
        }
        let mut map = self.map.write_locked();
        // The only candidates are the closest range starting at or below `base`, and
        // the closest one starting above it.
        if let Some((&b, e)) = map.range(..=base).next_back() {
            if covers(b, e.len, base) {
                return Err(BusError::Overlap { base, len });
            }
        }
        if let Some((&b, _)) = map.range(base..).next() {
            if covers(base, len, b) {
                return Err(BusError::Overlap { base, len });
            }
        }
        map.insert(base, Entry { len, device });
        Ok(())
    }

    /// The device covering `addr` and the offset of `addr` within its range.
    pub fn device_at(&self, addr: u64) -> Option<(SharedDevice, u64)> {
        let map = self.map.read_locked();
        let (&base, entry) = map.range(..=addr).next_back()?;
        covers(base, entry.len, addr).then(|| (entry.device.clone(), addr - base))
    }

    /// Dispatch a read; returns false (and leaves `data` untouched) when no device
    /// covers `addr`.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        let Some((device, offset)) = self.device_at(addr) else {
            return false;
        };
        // A device that panicked earlier left consistent-enough state for register
        // emulation; keep serving the guest rather than wedging every vCPU.
        let mut device = device.locked();
        device.read(offset, data);
        true
    }

    /// Dispatch a write; returns false when no device covers `addr`.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        let Some((device, offset)) = self.device_at(addr) else {
            return false;
        };
        let mut device = device.locked();
        device.write(offset, data);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Records accesses; reads return the offset as bytes.
    #[derive(Default)]
    struct Probe {
        writes: Vec<(u64, Vec<u8>)>,
    }

    impl BusDevice for Probe {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.writes.push((offset, data.to_vec()));
        }
    }

    fn probe() -> Arc<Mutex<Probe>> {
        Arc::new(Mutex::new(Probe::default()))
    }

    #[test]
    fn rejects_overlaps_and_zero_length() {
        let mut bus = Bus::new();
        bus.insert(probe(), 0x100, 0x10).unwrap();
        for (base, len) in [
            (0x100, 0x10),
            (0xF8, 0x9),
            (0x10F, 1),
            (0x105, 2),
            (0x0, 0x1000),
        ] {
            assert!(
                matches!(
                    bus.insert(probe(), base, len),
                    Err(BusError::Overlap { .. })
                ),
                "{base:#x}+{len:#x}"
            );
        }
        assert!(matches!(
            bus.insert(probe(), 0x200, 0),
            Err(BusError::ZeroLength)
        ));
        assert!(matches!(
            bus.insert(probe(), u64::MAX, 2),
            Err(BusError::Wraps { .. })
        ));
        // Adjacent ranges on either side are fine, as is one ending at 2^64.
        bus.insert(probe(), 0xF0, 0x10).unwrap();
        bus.insert(probe(), 0x110, 0x10).unwrap();
        bus.insert(probe(), u64::MAX, 1).unwrap();
    }

    #[test]
    fn dispatches_by_offset_and_misses() {
        let mut bus = Bus::new();
        let a = probe();
        let b = probe();
        bus.insert(a.clone(), 0x3F8, 8).unwrap();
        bus.insert(b.clone(), 0xFEE0_0000, 0x1000).unwrap();
        let view = bus.clone();

        let mut data = [0u8; 2];
        assert!(view.read(0x3FA, &mut data));
        assert_eq!(data, [2, 2]);
        assert!(view.write(0xFEE0_0300, &[1, 2, 3, 4]));
        assert_eq!(b.lock().unwrap().writes, vec![(0x300, vec![1, 2, 3, 4])]);
        assert!(a.lock().unwrap().writes.is_empty());

        let mut untouched = [0xAB; 4];
        assert!(!view.read(0x400, &mut untouched));
        assert!(!view.read(0x3F7, &mut untouched));
        assert_eq!(untouched, [0xAB; 4]);
        assert!(!view.write(0xFEE0_1000, &[0]));
        assert_eq!(b.lock().unwrap().writes.len(), 1);
    }

    #[test]
    fn clones_share_the_map() {
        let mut bus = Bus::new();
        let view = bus.clone();
        bus.insert(probe(), 0x80, 1).unwrap();
        assert!(view.write(0x80, &[1]));
    }
}
