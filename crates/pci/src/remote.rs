//! A function whose device another node serves: node 0's bus, which every
//! configuration access reaches, holds this stand-in for it. Configuration reads and
//! writes and BAR accesses go to the serving node as they are; the stand-in keeps a
//! copy of the header's BARs and command register (written with the same masks as the
//! real one) so that this bus routes the BAR addresses the guest chooses.

use crate::bus::PciDevice;
use crate::config::{ConfigSpace, BAR0};

/// How a stand-in reaches the node that serves its function.
pub trait FunctionLink: Send + Sync {
    /// A configuration access at `offset` of the function (reads fill `data`).
    fn config(&self, offset: usize, data: &mut [u8], write: bool);
    /// A memory access at guest-physical `address`, inside one of its BARs.
    fn memory(&self, address: u64, data: &mut [u8], write: bool);
}

/// The stand-in for a function served by another node.
pub struct RemoteFunction {
    /// Sized like the real function's; only its BARs and command register matter.
    copy: ConfigSpace,
    link: Box<dyn FunctionLink>,
}

impl RemoteFunction {
    /// A stand-in whose BARs are sized as in `like`, reaching its function via `link`.
    pub fn new(like: ConfigSpace, link: Box<dyn FunctionLink>) -> RemoteFunction {
        RemoteFunction { copy: like, link }
    }

    fn bar_address(&self, bar: usize, offset: u64) -> Option<u64> {
        self.copy
            .decoded_bars()
            .into_iter()
            .find(|(b, _, size)| *b == bar && offset < *size)
            .map(|(_, base, _)| base + offset)
    }
}

impl PciDevice for RemoteFunction {
    fn config(&self) -> &ConfigSpace {
        &self.copy
    }

    fn config_read(&mut self, offset: usize, data: &mut [u8]) {
        self.link.config(offset, data, false);
    }

    fn config_write(&mut self, offset: usize, data: &[u8]) {
        self.copy.write(offset, data);
        let mut bytes = data.to_vec();
        self.link.config(offset, &mut bytes, true);
    }

    fn bar_read(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
        match self.bar_address(bar, offset) {
            Some(address) => self.link.memory(address, data, false),
            None => data.fill(0xff),
        }
    }

    fn bar_write(&mut self, bar: usize, offset: u64, data: &[u8]) {
        if let Some(address) = self.bar_address(bar, offset) {
            let mut bytes = data.to_vec();
            self.link.memory(address, &mut bytes, true);
        }
    }

    fn place_bar(&mut self, bar: usize, address: u32) {
        self.copy.write(BAR0 + 4 * bar, &address.to_le_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::{ecam_offset, EcamWindow, PciBus};
    use crate::config::{Identity, COMMAND, COMMAND_MEMORY};
    use dvmm_devices::bus::BusDevice;
    use std::sync::{Arc, Mutex};

    fn like() -> ConfigSpace {
        let mut c = ConfigSpace::new(Identity {
            vendor: 0x1af4,
            device: 0x1042,
            revision: 1,
            class: 0x01_00_00,
            subsystem_vendor: 0x1af4,
            subsystem: 0x40,
        });
        c.add_memory_bar(0, 0x8000).unwrap();
        c
    }

    /// The serving node: its bus with the real function (here, another copy that
    /// answers BAR reads with the low byte of the offset).
    struct Real {
        config: ConfigSpace,
    }

    impl PciDevice for Real {
        fn config(&self) -> &ConfigSpace {
            &self.config
        }
        fn config_write(&mut self, offset: usize, data: &[u8]) {
            self.config.write(offset, data);
        }
        fn bar_read(&mut self, _bar: usize, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn bar_write(&mut self, _bar: usize, _offset: u64, _data: &[u8]) {}
    }

    /// Forwards to the serving node's bus as the VMM does: configuration as ECAM
    /// accesses, memory by address; records the memory accesses.
    struct Link {
        there: Arc<PciBus>,
        device: u8,
        seen: Arc<Mutex<Vec<(u64, bool)>>>,
    }

    impl FunctionLink for Link {
        fn config(&self, offset: usize, data: &mut [u8], write: bool) {
            let mut ecam = EcamWindow(self.there.clone());
            let at = ecam_offset(self.device, offset);
            if write {
                ecam.write(at, data);
            } else {
                ecam.read(at, data);
            }
        }
        fn memory(&self, address: u64, data: &mut [u8], write: bool) {
            self.seen.lock().unwrap().push((address, write));
            if write {
                self.there.bar_write(address, data);
            } else {
                assert!(self.there.bar_read(address, data), "no BAR at {address:#x}");
            }
        }
    }

    #[test]
    fn both_buses_agree_on_numbers_and_bars_and_follow_the_guest() {
        // The serving node: function 1 is another node's, function 2 its own.
        let mut there = PciBus::new();
        there.reserve(&like()).unwrap();
        let real = Arc::new(Mutex::new(Real { config: like() }));
        assert_eq!(there.add(real.clone()).unwrap(), 2);
        let there = Arc::new(there);
        // Node 0: function 1 its own, function 2 the stand-in.
        let mut here = PciBus::new();
        here.add(Arc::new(Mutex::new(Real { config: like() })))
            .unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let stand_in = RemoteFunction::new(
            like(),
            Box::new(Link {
                there: there.clone(),
                device: 2,
                seen: seen.clone(),
            }),
        );
        assert_eq!(here.add(Arc::new(Mutex::new(stand_in))).unwrap(), 2);
        let bar = |c: &ConfigSpace| c.u32(BAR0);
        // Placement is each bus's own, at the same address.
        let mut id = [0u8; 4];
        here.config_read(0, 2, 0, 0, &mut id);
        assert_eq!(u32::from_le_bytes(id), 0x1042_1af4);
        let mut b = [0u8; 4];
        here.config_read(0, 2, 0, BAR0, &mut b);
        let placed = u32::from_le_bytes(b);
        assert_ne!(placed, 0);
        assert_eq!(bar(&real.lock().unwrap().config), placed);
        // The guest moves the BAR and turns memory on: both copies follow.
        let moved = placed + 0x10_0000;
        here.config_write(0, 2, 0, BAR0, &moved.to_le_bytes());
        here.config_write(0, 2, 0, COMMAND, &COMMAND_MEMORY.to_le_bytes());
        assert_eq!(bar(&real.lock().unwrap().config), moved);
        let mut d = [0u8; 4];
        assert!(here.bar_read(u64::from(moved) + 0x24, &mut d));
        assert_eq!(d, [0x24; 4]);
        assert!(there.bar_read(u64::from(moved) + 0x24, &mut d));
        assert!(
            !here.bar_read(u64::from(placed) + 0x24, &mut d),
            "old place"
        );
        assert_eq!(*seen.lock().unwrap(), [(u64::from(moved) + 0x24, false)]);
    }
}
