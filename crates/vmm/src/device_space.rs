//! The one rule for a device access (port I/O or MMIO) that leaves a vCPU: a device on
//! this node's bus if one claims the address; else, on a cluster node without the
//! devices, the node that has them (node 0); else nothing is there, and the access ends
//! as it does on a PC with no device behind the address: reads return all ones, writes
//! are dropped. Node 0, serving an access forwarded to it, uses the same rule without
//! the forwarding step ([`DeviceSpace::local`]), so it never forwards to itself.

use std::sync::Arc;

use dvmm_devices::bus::Bus;
use dvmm_layout::IoSpace;

/// Device accesses that no local device claims, forwarded to the node that has the
/// devices (node 0). Blocks until the reply arrives.
pub trait RemoteIo: Send + Sync {
    /// Performs the access remotely; for reads, fills `data`.
    fn io(&self, space: IoSpace, addr: u64, data: &mut [u8], write: bool);
}

/// This node's port and MMIO buses, and where unclaimed accesses go.
#[derive(Clone)]
pub struct DeviceSpace {
    pio: Bus,
    mmio: Bus,
    remote: Option<Arc<dyn RemoteIo>>,
}

impl DeviceSpace {
    /// `remote` is None on a single node and on the node that has the devices.
    pub fn new(pio: Bus, mmio: Bus, remote: Option<Arc<dyn RemoteIo>>) -> DeviceSpace {
        DeviceSpace { pio, mmio, remote }
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
                r.io(space, addr, data, write);
                forwarding(false);
            }
            None => absent(data, write),
        }
    }

    /// The rule without forwarding: this node's devices, else nothing.
    pub fn local(&self, space: IoSpace, addr: u64, data: &mut [u8], write: bool) {
        if !self.claimed(space, addr, data, write) {
            absent(data, write);
        }
    }

    fn claimed(&self, space: IoSpace, addr: u64, data: &mut [u8], write: bool) -> bool {
        let bus = self.bus(space);
        if write {
            bus.write(addr, data)
        } else {
            bus.read(addr, data)
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
        fn io(&self, space: IoSpace, addr: u64, data: &mut [u8], write: bool) {
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
        DeviceSpace::new(pio, Bus::new(), remote)
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
}
