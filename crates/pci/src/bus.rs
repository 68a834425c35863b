//! PCI bus 0: the host bridge and the devices on it, their configuration spaces
//! through ECAM and through ports 0xCF8/0xCFC, and the routing of memory accesses to
//! whichever BAR the guest placed at the address.
//!
//! Devices are added while the VM is built; the guest may move their BARs at any time
//! (within the window `crates/layout` gives, which the ACPI tables announce), so BAR
//! accesses are routed by the addresses the configuration spaces hold now, not by a
//! fixed map.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use dvmm_devices::bus::BusDevice;
use dvmm_layout::{PCI_DEVICES, PCI_MMIO_SIZE, PCI_MMIO_START};
use dvmm_sync::{MutexExt, RwLockExt};

use crate::config::{ConfigSpace, Identity, BARS};

/// A PCI function on bus 0.
pub trait PciDevice: Send {
    /// Its configuration space (what guest reads see).
    fn config(&self) -> &ConfigSpace;
    /// A guest read of the configuration space; plain bytes by default (a device
    /// whose configuration reads have effects, such as virtio's PCI-configuration
    /// access window, serves them itself).
    fn config_read(&mut self, offset: usize, data: &mut [u8]) {
        self.config().read(offset, data);
    }
    /// A guest write to the configuration space: the device applies it (masked by
    /// [`ConfigSpace::write`]) and reacts (e.g. MSI-X enabled).
    fn config_write(&mut self, offset: usize, data: &[u8]);
    /// A guest read of `data.len()` bytes at `offset` into BAR `bar`.
    fn bar_read(&mut self, bar: usize, offset: u64, data: &mut [u8]);
    /// A guest write of `data` at `offset` into BAR `bar`.
    fn bar_write(&mut self, bar: usize, offset: u64, data: &[u8]);
    /// Places BAR `bar` at `address` while the VM is built, through the device's own
    /// write path as firmware's writes would go (a function served by another node
    /// only notes it: that node places its copy itself).
    fn place_bar(&mut self, bar: usize, address: u32) {
        self.config_write(crate::config::BAR0 + 4 * bar, &address.to_le_bytes());
    }
}

/// A device on the bus, shared between the bus and whoever else serves it.
pub type SharedPciDevice = Arc<Mutex<dyn PciDevice>>;

/// Why a device could not join the bus.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PciError {
    /// Every device number of bus 0 is taken.
    #[error("PCI bus 0 is full ({PCI_DEVICES} devices); attach fewer devices")]
    BusFull,
    /// The BAR window has no room for the device's BARs.
    #[error("no room for a {size:#x}-byte BAR in the PCI memory window; attach fewer devices")]
    NoBarSpace {
        /// Size of the BAR that did not fit.
        size: u64,
    },
}

/// The host bridge at 00:00.0 (what OSes expect to find first).
struct HostBridge(ConfigSpace);

impl PciDevice for HostBridge {
    fn config(&self) -> &ConfigSpace {
        &self.0
    }
    fn config_write(&mut self, offset: usize, data: &[u8]) {
        self.0.write(offset, data);
    }
    fn bar_read(&mut self, _bar: usize, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }
    fn bar_write(&mut self, _bar: usize, _offset: u64, _data: &[u8]) {}
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Window {
    base: u64,
    size: u64,
    device: usize,
    bar: usize,
}

/// PCI bus 0.
pub struct PciBus {
    /// By device number; `None` where another node's bus has the function.
    devices: Vec<Option<SharedPciDevice>>,
    /// The configuration address register (port 0xCF8).
    address: AtomicU32,
    /// Where each decoded BAR is now.
    windows: RwLock<Vec<Window>>,
    /// Next free address of the BAR window (for the placement at build time).
    next_bar: u64,
}

impl std::fmt::Debug for PciBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PciBus")
            .field("devices", &self.devices.len())
            .field("windows", &*self.windows.read_locked())
            .finish()
    }
}

impl Default for PciBus {
    fn default() -> Self {
        Self::new()
    }
}

impl PciBus {
    /// A bus with only the host bridge.
    pub fn new() -> PciBus {
        let bridge = ConfigSpace::new(Identity {
            vendor: 0x1b36,
            device: 0x0008,
            revision: 0,
            class: 0x06_00_00,
            subsystem_vendor: 0x1b36,
            subsystem: 0,
        });
        PciBus {
            devices: vec![Some(Arc::new(Mutex::new(HostBridge(bridge))))],
            address: AtomicU32::new(0),
            windows: RwLock::new(Vec::new()),
            next_bar: PCI_MMIO_START,
        }
    }

    /// Adds `device` at the next free device number and places its BARs (as firmware
    /// would; the guest may move them). Returns the device number.
    pub fn add(&mut self, device: SharedPciDevice) -> Result<u8, PciError> {
        let placed = self.place(device.locked().config())?;
        {
            let mut d = device.locked();
            for (bar, address) in placed {
                d.place_bar(bar, address);
            }
        }
        self.devices.push(Some(device));
        Ok(self.last_number())
    }

    /// Takes the next device number and BAR space for a function another node's bus
    /// has (`like` gives its BAR sizes), so that the numbers and BAR addresses of the
    /// functions after it are the same on every node. The function is absent here.
    pub fn reserve(&mut self, like: &ConfigSpace) -> Result<u8, PciError> {
        self.place(like)?;
        self.devices.push(None);
        Ok(self.last_number())
    }

    /// Where the BARs of a function sized like `config` go, as the next device; moves
    /// the free pointer past them.
    fn place(&mut self, config: &ConfigSpace) -> Result<Vec<(usize, u32)>, PciError> {
        if self.devices.len() >= PCI_DEVICES {
            return Err(PciError::BusFull);
        }
        let mut next = self.next_bar;
        let mut placed = Vec::new();
        for bar in 0..BARS {
            let size = config.bar_size(bar);
            if size == 0 {
                continue;
            }
            let at = next.div_ceil(size) * size;
            let address = u32::try_from(at)
                .ok()
                .filter(|_| at + size <= PCI_MMIO_START + PCI_MMIO_SIZE)
                .ok_or(PciError::NoBarSpace { size })?;
            placed.push((bar, address));
            next = at + size;
        }
        self.next_bar = next;
        Ok(placed)
    }

    fn last_number(&self) -> u8 {
        u8::try_from(self.devices.len() - 1).unwrap_or(u8::MAX)
    }

    /// Number of devices, the host bridge included.
    pub fn len(&self) -> usize {
        self.devices.len()
    }

    /// Whether only the host bridge is there (never: it always is).
    pub fn is_empty(&self) -> bool {
        self.devices.is_empty()
    }

    /// Configuration read of function `(device, function)` on bus `bus`; absent
    /// functions read as all ones.
    pub fn config_read(&self, bus: u8, device: u8, function: u8, offset: usize, data: &mut [u8]) {
        match self.function(bus, device, function) {
            Some(d) => d.locked().config_read(offset, data),
            None => data.fill(0xff),
        }
    }

    /// Configuration write; writes to absent functions are dropped.
    pub fn config_write(&self, bus: u8, device: u8, function: u8, offset: usize, data: &[u8]) {
        let Some(d) = self.function(bus, device, function) else {
            return;
        };
        let mut d = d.locked();
        d.config_write(offset, data);
        let decoded = d.config().decoded_bars();
        drop(d);
        let index = usize::from(device);
        let mut windows = self.windows.write_locked();
        windows.retain(|w| w.device != index);
        windows.extend(decoded.into_iter().map(|(bar, base, size)| Window {
            base,
            size,
            device: index,
            bar,
        }));
    }

    fn function(&self, bus: u8, device: u8, function: u8) -> Option<&SharedPciDevice> {
        if bus != 0 || function != 0 {
            return None;
        }
        self.devices.get(usize::from(device))?.as_ref()
    }

    /// The BAR that decodes `address` now: the device, the BAR index and the offset.
    fn bar_at(&self, address: u64) -> Option<(SharedPciDevice, usize, u64)> {
        let windows = self.windows.read_locked();
        let w = windows
            .iter()
            .find(|w| address >= w.base && address - w.base < w.size)?;
        let device = self.devices.get(w.device)?.as_ref()?;
        Some((device.clone(), w.bar, address - w.base))
    }

    /// A memory read at guest-physical `address`: true if a BAR took it.
    pub fn bar_read(&self, address: u64, data: &mut [u8]) -> bool {
        match self.bar_at(address) {
            Some((d, bar, offset)) => {
                d.locked().bar_read(bar, offset, data);
                true
            }
            None => false,
        }
    }

    /// A memory write at guest-physical `address`: true if a BAR took it.
    pub fn bar_write(&self, address: u64, data: &[u8]) -> bool {
        match self.bar_at(address) {
            Some((d, bar, offset)) => {
                d.locked().bar_write(bar, offset, data);
                true
            }
            None => false,
        }
    }

    /// Accesses to the configuration address register (0xCF8).
    fn address_register(&self) -> u32 {
        self.address.load(Ordering::Relaxed)
    }
}

/// Decodes the configuration mechanism #1 address: `(bus, device, function, offset)`,
/// `None` with the enable bit clear.
fn decode_address(a: u32) -> Option<(u8, u8, u8, usize)> {
    if a & 0x8000_0000 == 0 {
        return None;
    }
    Some((
        ((a >> 16) & 0xff) as u8,
        ((a >> 11) & 0x1f) as u8,
        ((a >> 8) & 0x7) as u8,
        (a & 0xfc) as usize,
    ))
}

/// Port 0xCF8: the configuration address register (dword accesses only; a byte access
/// at 0xCF9 is the reset register, another device).
pub struct ConfigAddressPort(pub Arc<PciBus>);

impl BusDevice for ConfigAddressPort {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset == 0 && data.len() == 4 {
            data.copy_from_slice(&self.0.address_register().to_le_bytes());
        } else {
            data.fill(0xff);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset == 0 && data.len() == 4 {
            let v = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
            self.0.address.store(v & 0x80ff_fffc, Ordering::Relaxed);
        }
    }
}

/// Ports 0xCFC..=0xCFF: the configuration data window for the address in 0xCF8.
pub struct ConfigDataPort(pub Arc<PciBus>);

impl BusDevice for ConfigDataPort {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match decode_address(self.0.address_register()) {
            Some((b, d, f, reg)) if offset < 4 => {
                self.0.config_read(b, d, f, reg + offset as usize, data)
            }
            _ => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let Some((b, d, f, reg)) = decode_address(self.0.address_register()) {
            if offset < 4 {
                self.0.config_write(b, d, f, reg + offset as usize, data);
            }
        }
    }
}

/// The ECAM window: bus << 20 | device << 15 | function << 12 | register.
pub struct EcamWindow(pub Arc<PciBus>);

/// Where register `register` of device `device` (bus 0, function 0) is in the ECAM
/// window.
pub fn ecam_offset(device: u8, register: usize) -> u64 {
    (u64::from(device) << 15) | (register as u64 & 0xfff)
}

fn decode_ecam(offset: u64) -> (u8, u8, u8, usize) {
    (
        ((offset >> 20) & 0xff) as u8,
        ((offset >> 15) & 0x1f) as u8,
        ((offset >> 12) & 0x7) as u8,
        (offset & 0xfff) as usize,
    )
}

impl BusDevice for EcamWindow {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let (b, d, f, reg) = decode_ecam(offset);
        self.0.config_read(b, d, f, reg, data);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let (b, d, f, reg) = decode_ecam(offset);
        self.0.config_write(b, d, f, reg, data);
    }
}

/// The BAR window: routes each access to the BAR placed there now.
pub struct BarWindow(pub Arc<PciBus>);

impl BusDevice for BarWindow {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if !self.0.bar_read(PCI_MMIO_START + offset, data) {
            data.fill(0xff);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        self.0.bar_write(PCI_MMIO_START + offset, data);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{BAR0, COMMAND, COMMAND_MEMORY};

    /// A device with one 4 KiB BAR of registers that remember bytes.
    struct Regs {
        config: ConfigSpace,
        bytes: Vec<u8>,
    }

    impl PciDevice for Regs {
        fn config(&self) -> &ConfigSpace {
            &self.config
        }
        fn config_write(&mut self, offset: usize, data: &[u8]) {
            self.config.write(offset, data);
        }
        fn bar_read(&mut self, _bar: usize, offset: u64, data: &mut [u8]) {
            for (i, b) in data.iter_mut().enumerate() {
                *b = self.bytes[(offset as usize + i) % 4096];
            }
        }
        fn bar_write(&mut self, _bar: usize, offset: u64, data: &[u8]) {
            for (i, b) in data.iter().enumerate() {
                self.bytes[(offset as usize + i) % 4096] = *b;
            }
        }
    }

    fn regs() -> Arc<Mutex<Regs>> {
        let mut config = ConfigSpace::new(Identity {
            vendor: 0x1af4,
            device: 0x1044,
            revision: 1,
            class: 0xff_00_00,
            subsystem_vendor: 0x1af4,
            subsystem: 0x40,
        });
        config.add_memory_bar(0, 0x4000).unwrap();
        Arc::new(Mutex::new(Regs {
            config,
            bytes: vec![0; 4096],
        }))
    }

    fn cf8(bus: &Arc<PciBus>, dev: u8, reg: u32) -> (ConfigAddressPort, ConfigDataPort) {
        let mut a = ConfigAddressPort(bus.clone());
        a.write(0, &(0x8000_0000 | u32::from(dev) << 11 | reg).to_le_bytes());
        (a, ConfigDataPort(bus.clone()))
    }

    #[test]
    fn both_config_mechanisms_see_the_same_functions() {
        let mut bus = PciBus::new();
        assert_eq!(bus.add(regs()).unwrap(), 1);
        let bus = Arc::new(bus);
        let mut ecam = EcamWindow(bus.clone());
        let mut b = [0u8; 4];
        ecam.read(0, &mut b);
        assert_eq!(u32::from_le_bytes(b), 0x0008_1b36, "host bridge at 00:00.0");
        ecam.read(1 << 15, &mut b);
        assert_eq!(u32::from_le_bytes(b), 0x1044_1af4);
        let (_, mut data) = cf8(&bus, 1, 0);
        data.read(0, &mut b);
        assert_eq!(u32::from_le_bytes(b), 0x1044_1af4);
        let mut w = [0u8; 2];
        data.read(2, &mut w);
        assert_eq!(u16::from_le_bytes(w), 0x1044, "a word at 0xCFE");
        // Absent device, function or bus: all ones.
        for off in [2 << 15, (1 << 15) | (1 << 12), 1 << 20] {
            ecam.read(off, &mut b);
            assert_eq!(b, [0xff; 4], "{off:#x}");
        }
        // 0xCF8 reads back what was written, with the enable bit.
        let (mut addr, _) = cf8(&bus, 3, 0x10);
        addr.read(0, &mut b);
        assert_eq!(u32::from_le_bytes(b), 0x8000_1810);
        // A byte access at 0xCF9 is not the address register's.
        addr.write(1, &[6]);
        addr.read(0, &mut b);
        assert_eq!(u32::from_le_bytes(b), 0x8000_1810);
    }

    #[test]
    fn bars_are_placed_in_the_window_and_follow_the_guest() {
        let mut bus = PciBus::new();
        let dev = regs();
        bus.add(dev.clone()).unwrap();
        bus.add(regs()).unwrap();
        let bus = Arc::new(bus);
        let first = dev.lock().unwrap().config.u32(BAR0);
        assert_eq!(u64::from(first), PCI_MMIO_START);
        let mut window = BarWindow(bus.clone());
        // Not decoded until memory decoding is on.
        window.write(8, &[7]);
        assert_eq!(dev.lock().unwrap().bytes[8], 0);
        bus.config_write(0, 1, 0, COMMAND, &COMMAND_MEMORY.to_le_bytes());
        window.write(8, &[7]);
        assert_eq!(dev.lock().unwrap().bytes[8], 7);
        // The guest moves the BAR: the old address is empty, the new one reaches it.
        let moved = PCI_MMIO_START + 0x10_0000;
        bus.config_write(0, 1, 0, BAR0, &(moved as u32).to_le_bytes());
        let mut b = [0u8; 1];
        window.read(8, &mut b);
        assert_eq!(b, [0xff]);
        window.read(0x10_0008, &mut b);
        assert_eq!(b, [7]);
    }

    #[test]
    fn a_full_bus_or_window_is_an_error() {
        let mut bus = PciBus::new();
        for _ in 1..PCI_DEVICES {
            bus.add(regs()).unwrap();
        }
        assert_eq!(bus.add(regs()), Err(PciError::BusFull));
        let mut bus = PciBus::new();
        let mut config = ConfigSpace::new(Identity {
            vendor: 1,
            device: 1,
            revision: 0,
            class: 0,
            subsystem_vendor: 0,
            subsystem: 0,
        });
        config.add_memory_bar(0, 1 << 31).unwrap();
        let big = Arc::new(Mutex::new(Regs {
            config,
            bytes: vec![0; 4096],
        }));
        assert_eq!(bus.add(big), Err(PciError::NoBarSpace { size: 1 << 31 }));
    }
}
