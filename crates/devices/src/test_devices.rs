//! The devices test suites written for QEMU talk to (kvm-unit-tests among them), offered
//! only with `--test-devices`: QEMU's fw_cfg (its legacy port interface), isa-debug-exit
//! and pc-testdev. They are QEMU's interfaces, so a test binary built for QEMU runs
//! unchanged; nothing here is used by an ordinary guest.
//!
//! - [`FwCfg`] at 0x510 (selector, 16-bit write) and 0x511 (data, read byte by byte):
//!   the signature, the interface id (1: no DMA), the RAM size, the CPU counts and the
//!   NUMA layout, in QEMU's formats; any other key reads as zeros.
//! - [`DebugExit`] at 0xf4: a write of `v` ends the VM with exit status `(v << 1) | 1`,
//!   as QEMU's `isa-debug-exit` does (so 1 means the test passed).
//! - [`PcTestDev`] at 0xe0 (a 32-bit register that reads back what was written), 0xe4
//!   (page flush: accepted, nothing to do, since guest pages are never remapped under
//!   the guest here) and 0x2000..0x2018 (a write of 0 or 1 drives ISA IRQ line n), and
//!   [`TestDevIoMem`], its 64 KiB of MMIO that behaves like memory at 0xff000000 (for
//!   tests of instruction emulation on MMIO).

use std::sync::Arc;

use crate::bus::BusDevice;
use crate::{IrqLine, VmEvent, VmEventSink};

/// fw_cfg's selector port (its data port is the next one).
pub const FW_CFG_PORT: u16 = 0x510;
/// Ports fw_cfg decodes (selector, data; the DMA address registers at +4 are not offered).
pub const FW_CFG_PORTS: u64 = 2;
/// isa-debug-exit's port (QEMU's `iobase=0xf4,iosize=0x4`).
pub const DEBUG_EXIT_PORT: u16 = 0xf4;
/// Ports isa-debug-exit decodes.
pub const DEBUG_EXIT_PORTS: u64 = 4;
/// pc-testdev's I/O register and page-flush port.
pub const TESTDEV_IOPORT: u16 = 0xe0;
/// Ports at [`TESTDEV_IOPORT`] (the register, then the flush port at +4).
pub const TESTDEV_IOPORT_LEN: u64 = 8;
/// pc-testdev's IRQ-line ports: port `TESTDEV_IRQ_PORT + n` drives ISA IRQ `n`.
pub const TESTDEV_IRQ_PORT: u16 = 0x2000;
/// Lines pc-testdev drives (the ISA IRQs, 0..24).
pub const TESTDEV_IRQ_LINES: usize = 24;
/// pc-testdev's memory-like MMIO window.
pub const TESTDEV_IOMEM_ADDR: u64 = 0xff00_0000;
/// Its size.
pub const TESTDEV_IOMEM_LEN: u64 = 0x1_0000;

/// fw_cfg keys (QEMU's `FW_CFG_*`).
pub mod key {
    /// "QEMU".
    pub const SIGNATURE: u16 = 0x00;
    /// Interface revision and features (bit 0: traditional interface).
    pub const ID: u16 = 0x01;
    /// RAM size in bytes (u64).
    pub const RAM_SIZE: u16 = 0x03;
    /// CPUs present at boot (u16).
    pub const NB_CPUS: u16 = 0x05;
    /// The NUMA layout: node count, each CPU's node, each node's bytes (u64 each).
    pub const NUMA: u16 = 0x0d;
    /// Most CPUs the VM can have (u16).
    pub const MAX_CPUS: u16 = 0x0f;
}

/// What fw_cfg tells the guest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FwCfgFacts {
    /// Guest RAM in bytes.
    pub memory: u64,
    /// Each vCPU's NUMA node, in APIC-id order.
    pub cpu_nodes: Vec<u64>,
    /// Each NUMA node's RAM in bytes.
    pub node_memory: Vec<u64>,
}

/// QEMU's fw_cfg, port interface only.
#[derive(Debug)]
pub struct FwCfg {
    entries: Vec<(u16, Vec<u8>)>,
    selected: Option<usize>,
    at: usize,
}

impl FwCfg {
    /// The items for a VM of this shape.
    pub fn new(facts: &FwCfgFacts) -> FwCfg {
        let cpus = u16::try_from(facts.cpu_nodes.len()).unwrap_or(u16::MAX);
        let mut numa = Vec::new();
        numa.extend_from_slice(&(facts.node_memory.len() as u64).to_le_bytes());
        for n in facts.cpu_nodes.iter().chain(&facts.node_memory) {
            numa.extend_from_slice(&n.to_le_bytes());
        }
        FwCfg {
            entries: vec![
                (key::SIGNATURE, b"QEMU".to_vec()),
                (key::ID, 1u32.to_le_bytes().to_vec()),
                (key::RAM_SIZE, facts.memory.to_le_bytes().to_vec()),
                (key::NB_CPUS, cpus.to_le_bytes().to_vec()),
                (key::MAX_CPUS, cpus.to_le_bytes().to_vec()),
                (key::NUMA, numa),
            ],
            selected: None,
            at: 0,
        }
    }

    fn select(&mut self, key: u16) {
        self.selected = self.entries.iter().position(|(k, _)| *k == key);
        self.at = 0;
    }

    fn next_byte(&mut self) -> u8 {
        let b = self
            .selected
            .and_then(|i| self.entries.get(i))
            .and_then(|(_, v)| v.get(self.at))
            .copied()
            .unwrap_or(0);
        self.at = self.at.saturating_add(1);
        b
    }
}

impl BusDevice for FwCfg {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match offset {
            1 => data.iter_mut().for_each(|d| *d = self.next_byte()),
            _ => data.fill(0),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset == 0 && data.len() >= 2 {
            self.select(u16::from_le_bytes([data[0], data[1]]));
        } else if offset == 0 && data.len() == 1 {
            self.select(u16::from(data[0]));
        }
    }
}

/// QEMU's isa-debug-exit.
pub struct DebugExit {
    events: Arc<dyn VmEventSink>,
}

impl DebugExit {
    /// Reports to `events`.
    pub fn new(events: Arc<dyn VmEventSink>) -> DebugExit {
        DebugExit { events }
    }
}

impl BusDevice for DebugExit {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset != 0 {
            return;
        }
        let mut v = [0u8; 4];
        for (slot, b) in v.iter_mut().zip(data) {
            *slot = *b;
        }
        self.events
            .vm_event(VmEvent::DebugExit(u32::from_le_bytes(v)));
    }
}

/// QEMU's pc-testdev at [`TESTDEV_IOPORT`]: the register and the flush port (its IRQ
/// lines are [`TestDevIrqs`], far from here in port space).
#[derive(Debug, Default)]
pub struct PcTestDev {
    register: [u8; 4],
}

impl BusDevice for PcTestDev {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        for (i, d) in data.iter_mut().enumerate() {
            let at = offset.saturating_add(i as u64);
            *d = usize::try_from(at)
                .ok()
                .and_then(|a| self.register.get(a))
                .copied()
                .unwrap_or(0);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        for (i, b) in data.iter().enumerate() {
            let at = offset.saturating_add(i as u64);
            if let Some(slot) = usize::try_from(at)
                .ok()
                .and_then(|a| self.register.get_mut(a))
            {
                *slot = *b;
            }
        }
    }
}

/// pc-testdev's MMIO window at [`TESTDEV_IOMEM_ADDR`]: reads return what was written.
pub struct TestDevIoMem(Vec<u8>);

impl Default for TestDevIoMem {
    fn default() -> TestDevIoMem {
        TestDevIoMem(vec![0; TESTDEV_IOMEM_LEN as usize])
    }
}

impl BusDevice for TestDevIoMem {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        for (i, d) in data.iter_mut().enumerate() {
            let at = usize::try_from(offset.saturating_add(i as u64)).unwrap_or(usize::MAX);
            *d = self.0.get(at).copied().unwrap_or(0xff);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        for (i, b) in data.iter().enumerate() {
            let at = usize::try_from(offset.saturating_add(i as u64)).unwrap_or(usize::MAX);
            if let Some(slot) = self.0.get_mut(at) {
                *slot = *b;
            }
        }
    }
}

/// pc-testdev's IRQ-line ports at [`TESTDEV_IRQ_PORT`].
pub struct TestDevIrqs(Vec<Arc<dyn IrqLine>>);

impl TestDevIrqs {
    /// Ports driving `lines` (ISA IRQ n is `lines[n]`).
    pub fn new(lines: Vec<Arc<dyn IrqLine>>) -> TestDevIrqs {
        TestDevIrqs(lines)
    }
}

impl BusDevice for TestDevIrqs {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let line = usize::try_from(offset).ok().and_then(|n| self.0.get(n));
        if let (Some(line), Some(v)) = (line, data.first()) {
            line.set_level(*v != 0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{Events, FakeIrq};

    fn read_item(dev: &mut FwCfg, key: u16, len: usize) -> Vec<u8> {
        dev.write(0, &key.to_le_bytes());
        (0..len)
            .map(|_| {
                let mut b = [0u8];
                dev.read(1, &mut b);
                b[0]
            })
            .collect()
    }

    #[test]
    fn fw_cfg_gives_the_shape_in_qemu_formats() {
        let mut dev = FwCfg::new(&FwCfgFacts {
            memory: 512 << 20,
            cpu_nodes: vec![0, 0, 1],
            node_memory: vec![256 << 20, 256 << 20],
        });
        assert_eq!(read_item(&mut dev, key::SIGNATURE, 4), b"QEMU");
        assert_eq!(read_item(&mut dev, key::ID, 4), [1, 0, 0, 0]);
        assert_eq!(read_item(&mut dev, key::NB_CPUS, 2), [3, 0]);
        assert_eq!(read_item(&mut dev, key::MAX_CPUS, 2), [3, 0]);
        let ram = read_item(&mut dev, key::RAM_SIZE, 8);
        assert_eq!(u64::from_le_bytes(ram.try_into().unwrap()), 512 << 20);
        let numa: Vec<u64> = read_item(&mut dev, key::NUMA, 6 * 8)
            .chunks(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
            .collect();
        assert_eq!(numa, [2, 0, 0, 1, 256 << 20, 256 << 20]);
        // Past an item's end, and an unknown key: zeros.
        assert_eq!(read_item(&mut dev, key::NB_CPUS, 4), [3, 0, 0, 0]);
        assert_eq!(read_item(&mut dev, 0x4242, 2), [0, 0]);
    }

    #[test]
    fn debug_exit_reports_the_value_written() {
        let events = Arc::new(Events::default());
        let mut dev = DebugExit::new(events.clone());
        dev.write(1, &[7]);
        assert!(events.take().is_empty(), "only the first port");
        dev.write(0, &3u32.to_le_bytes());
        dev.write(0, &[1]);
        assert_eq!(
            events.take(),
            [VmEvent::DebugExit(3), VmEvent::DebugExit(1)]
        );
    }

    #[test]
    fn testdev_register_reads_back_and_lines_follow_writes() {
        let mut dev = PcTestDev::default();
        dev.write(0, &0xdead_beefu32.to_le_bytes());
        let mut b = [0u8; 4];
        dev.read(0, &mut b);
        assert_eq!(u32::from_le_bytes(b), 0xdead_beef);
        dev.write(4, &[1, 2, 3, 4]); // the flush port: nothing changes
        dev.read(0, &mut b);
        assert_eq!(u32::from_le_bytes(b), 0xdead_beef);
        let mut iomem = TestDevIoMem::default();
        iomem.write(0xfffe, &[1, 2, 3]);
        let mut b = [0u8; 3];
        iomem.read(0xfffe, &mut b);
        assert_eq!(b, [1, 2, 0xff], "past the window's end: dropped, all ones");
        let line = Arc::new(FakeIrq::default());
        let lines: Vec<Arc<dyn IrqLine>> = (0..TESTDEV_IRQ_LINES)
            .map(|n| {
                if n == 14 {
                    line.clone() as Arc<dyn IrqLine>
                } else {
                    Arc::new(FakeIrq::default())
                }
            })
            .collect();
        let mut irqs = TestDevIrqs::new(lines);
        irqs.write(14, &[1]);
        assert!(line.is_high());
        irqs.write(14, &[0]);
        assert!(!line.is_high());
        irqs.write(14, &[1]);
        irqs.write(99, &[1]); // no such line
        assert_eq!(line.pulses(), 2);
    }
}
