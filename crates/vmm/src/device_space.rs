//! The one rule for a device access (port I/O or MMIO) that leaves a vCPU: a device on
//! this node's bus if one claims the address; else a BAR of a PCI function this node
//! serves (a disk or network card placed here with `node=`); else, on a cluster node
//! without the devices, the node that has them (node 0); else nothing is there, and the
//! access ends as it does on a PC with no device behind the address: reads return all
//! ones, writes are dropped. A node serving an access forwarded to it uses the same
//! rule without the forwarding step ([`DeviceSpace::local`]), so it never forwards to
//! itself; there the configuration spaces of the functions it serves answer too (node
//! 0 forwards them as ECAM accesses, see `vm::devices`).

use std::sync::Arc;

use dvmm_devices::bus::{Bus, BusDevice};
use dvmm_layout::{IoSpace, PCI_ECAM_ADDR, PCI_ECAM_SIZE};
use dvmm_pci::bus::EcamWindow;
use dvmm_pci::PciBus;

/// Device accesses forwarded to another node. Blocks until the reply arrives.
pub trait RemoteIo: Send + Sync {
    /// Performs the access on node `node`; for reads, fills `data`.
    fn io(&self, node: usize, space: IoSpace, addr: u64, data: &mut [u8], write: bool);
}

/// This node's port and MMIO buses, and where unclaimed accesses go.
#[derive(Clone)]
pub struct DeviceSpace {
    pio: Bus,
    mmio: Bus,
    served: Option<Arc<PciBus>>,
    remote: Option<Arc<dyn RemoteIo>>,
}

impl DeviceSpace {
    /// `served`: the PCI functions a node other than node 0 serves (their BARs and,
    /// for forwarded accesses, their configuration spaces); `remote` is None on a
    /// single node and on the node that has the devices.
    pub fn new(
        pio: Bus,
        mmio: Bus,
        served: Option<Arc<PciBus>>,
        remote: Option<Arc<dyn RemoteIo>>,
    ) -> DeviceSpace {
        DeviceSpace {
            pio,
            mmio,
            served,
            remote,
        }
    }

    /// The bus of `space`.
    pub fn bus(&self, space: IoSpace) -> &Bus {
        match space {
            IoSpace::Pio => &self.pio,
            IoSpace::Mmio => &self.mmio,
        }
    }

    /// Performs one access by the rule above; `forwarding(true)` and `forwarding(false)`
    /// bracket a forwarded one (the vCPU says where it waits).
    pub fn access(
        &self,
        space: IoSpace,
        addr: u64,
        data: &mut [u8],
        write: bool,
        mut forwarding: impl FnMut(bool),
    ) {
        if self.claimed(space, addr, data, write) {
            return;
        }
        match &self.remote {
            Some(r) => {
                forwarding(true);
                r.io(0, space, addr, data, write);
                forwarding(false);
            }
            None => absent(data, write),
        }
    }

    /// The rule without forwarding, for an access another node forwarded: this node's
    /// devices, the functions it serves, else nothing.
    pub fn local(&self, space: IoSpace, addr: u64, data: &mut [u8], write: bool) {
        if self.claimed(space, addr, data, write) {
            return;
        }
        if let (IoSpace::Mmio, Some(pci)) = (space, &self.served) {
            if (PCI_ECAM_ADDR..PCI_ECAM_ADDR + PCI_ECAM_SIZE).contains(&addr) {
                let mut ecam = EcamWindow(pci.clone());
                if write {
                    ecam.write(addr - PCI_ECAM_ADDR, data);
                } else {
                    ecam.read(addr - PCI_ECAM_ADDR, data);
                }
                return;
            }
        }
        absent(data, write);
    }

    fn claimed(&self, space: IoSpace, addr: u64, data: &mut [u8], write: bool) -> bool {
        let bus = self.bus(space);
        let taken = if write {
            bus.write(addr, data)
        } else {
            bus.read(addr, data)
        };
        taken
            || match (space, &self.served) {
                (IoSpace::Mmio, Some(pci)) if write => pci.bar_write(addr, data),
                (IoSpace::Mmio, Some(pci)) => pci.bar_read(addr, data),
                _ => false,
            }
    }
}

/// No device: a read floats high, a write goes nowhere.
fn absent(data: &mut [u8], write: bool) {
    if !write {
        data.fill(0xff);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dvmm_devices::bus::BusDevice;
    use std::sync::Mutex;

    /// A one-byte register at its base address.
    struct Register(u8);

    impl BusDevice for Register {
        fn read(&mut self, _offset: u64, data: &mut [u8]) {
            data.fill(self.0);
        }
        fn write(&mut self, _offset: u64, data: &[u8]) {
            self.0 = data[0];
        }
    }

    /// Records what was forwarded and answers reads with 0x42.
    #[derive(Default)]
    struct Node0(Mutex<Vec<(IoSpace, u64, bool)>>);

    impl RemoteIo for Node0 {
        fn io(&self, node: usize, space: IoSpace, addr: u64, data: &mut [u8], write: bool) {
            assert_eq!(node, 0);
            self.0.lock().unwrap().push((space, addr, write));
            if !write {
                data.fill(0x42);
            }
        }
    }

    fn space(remote: Option<Arc<dyn RemoteIo>>) -> DeviceSpace {
        let mut pio = Bus::new();
        pio.insert(Arc::new(Mutex::new(Register(7))), 0x80, 1)
            .unwrap();
        DeviceSpace::new(pio, Bus::new(), None, remote)
    }

    #[test]
    fn a_claimed_access_stays_local() {
        let node0 = Arc::new(Node0::default());
        let s = space(Some(node0.clone()));
        let mut b = [0u8; 1];
        s.access(IoSpace::Pio, 0x80, &mut b, false, |_| panic!("forwarded"));
        assert_eq!(b, [7]);
        s.access(IoSpace::Pio, 0x80, &mut [9], true, |_| panic!("forwarded"));
        s.access(IoSpace::Pio, 0x80, &mut b, false, |_| panic!("forwarded"));
        assert_eq!(b, [9]);
        assert!(node0.0.lock().unwrap().is_empty());
    }

    #[test]
    fn an_unclaimed_access_goes_to_node_0_bracketed() {
        let node0 = Arc::new(Node0::default());
        let s = space(Some(node0.clone()));
        let mut b = [0u8; 4];
        let mut seen = Vec::new();
        s.access(IoSpace::Mmio, 0xfed0_0000, &mut b, false, |f| seen.push(f));
        assert_eq!(b, [0x42; 4]);
        assert_eq!(seen, [true, false]);
        s.access(IoSpace::Pio, 0x81, &mut [1], true, |_| {});
        assert_eq!(
            *node0.0.lock().unwrap(),
            [
                (IoSpace::Mmio, 0xfed0_0000, false),
                (IoSpace::Pio, 0x81, true)
            ]
        );
    }

    #[test]
    fn with_no_device_anywhere_reads_float_high_and_writes_vanish() {
        let s = space(None);
        let mut b = [0u8; 2];
        s.access(IoSpace::Pio, 0x81, &mut b, false, |_| panic!("forwarded"));
        assert_eq!(b, [0xff; 2]);
        s.access(IoSpace::Pio, 0x81, &mut [5], true, |_| panic!("forwarded"));
        // Node 0 serving a forwarded access: never forwards, even with a remote set.
        let node0 = Arc::new(Node0::default());
        let s = space(Some(node0.clone()));
        let mut b = [0u8; 1];
        s.local(IoSpace::Pio, 0x99, &mut b, false);
        assert_eq!(b, [0xff]);
        s.local(IoSpace::Pio, 0x80, &mut b, false);
        assert_eq!(b, [7]);
        assert!(node0.0.lock().unwrap().is_empty());
    }

    /// A function with one 4 KiB BAR whose registers read as the low byte of their
    /// offset.
    struct Function(dvmm_pci::ConfigSpace);

    impl dvmm_pci::PciDevice for Function {
        fn config(&self) -> &dvmm_pci::ConfigSpace {
            &self.0
        }
        fn config_write(&mut self, offset: usize, data: &[u8]) {
            self.0.write(offset, data);
        }
        fn bar_read(&mut self, _bar: usize, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn bar_write(&mut self, _bar: usize, _offset: u64, _data: &[u8]) {}
    }

    #[test]
    fn a_served_function_answers_its_bar_here_and_its_configuration_only_when_forwarded() {
        let mut config = dvmm_pci::ConfigSpace::new(dvmm_pci::Identity {
            vendor: 0x1af4,
            device: 0x1042,
            revision: 1,
            class: 0,
            subsystem_vendor: 0,
            subsystem: 0,
        });
        config.add_memory_bar(0, 0x1000).unwrap();
        let mut pci = PciBus::new();
        let number = pci.add(Arc::new(Mutex::new(Function(config)))).unwrap();
        let ecam = PCI_ECAM_ADDR + dvmm_pci::bus::ecam_offset(number, 0);
        let node0 = Arc::new(Node0::default());
        let s = DeviceSpace::new(
            Bus::new(),
            Bus::new(),
            Some(Arc::new(pci)),
            Some(node0.clone()),
        );
        // Node 0 turns memory decoding on (forwarded here as an ECAM write).
        s.local(
            IoSpace::Mmio,
            ecam + dvmm_pci::config::COMMAND as u64,
            &mut dvmm_pci::config::COMMAND_MEMORY.to_le_bytes(),
            true,
        );
        let mut bar = [0u8; 4];
        s.local(
            IoSpace::Mmio,
            ecam + dvmm_pci::config::BAR0 as u64,
            &mut bar,
            false,
        );
        let bar = u64::from(u32::from_le_bytes(bar));
        assert!(bar >= dvmm_layout::PCI_MMIO_START, "{bar:#x}");
        // This node's vCPU: the BAR is answered here, the configuration space by node 0.
        let mut b = [0u8; 2];
        s.access(IoSpace::Mmio, bar + 0x34, &mut b, false, |_| {
            panic!("forwarded")
        });
        assert_eq!(b, [0x34; 2]);
        s.access(IoSpace::Mmio, ecam, &mut b, false, |_| {});
        assert_eq!(b, [0x42; 2]);
        assert_eq!(*node0.0.lock().unwrap(), [(IoSpace::Mmio, ecam, false)]);
        // Forwarded here, the identity.
        let mut id = [0u8; 4];
        s.local(IoSpace::Mmio, ecam, &mut id, false);
        assert_eq!(u32::from_le_bytes(id), 0x1042_1af4);
    }
}
