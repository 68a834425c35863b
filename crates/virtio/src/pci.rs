//! The virtio-over-PCI modern transport (virtio 1.x, 4.1): vendor capabilities that
//! point into BAR 0, where the common configuration, ISR, device configuration,
//! notification registers and the MSI-X table live.
//!
//! BAR 0 (32 KiB): common configuration at 0x0000, ISR at 0x1000, device
//! configuration at 0x2000, notifications at 0x3000 (4 bytes per queue), the MSI-X
//! table at 0x4000 and its pending bits at 0x6000. Queues are served synchronously on
//! the thread whose write notified them (a vCPU, or node 0's dispatcher for a vCPU on
//! another node), or on a device's own thread through its [`Waker`] when input arrives
//! by itself (console bytes, network frames).

use std::sync::{Arc, Mutex, Weak};

use dvmm_sync::MutexExt;

use dvmm_devices::GuestAccess;
use dvmm_pci::config::{ConfigError, ConfigSpace, Identity};
use dvmm_pci::msix::{MsiSink, Msix};
use dvmm_pci::PciDevice;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;

use crate::queue::{Queue, NO_VECTOR};
use crate::VirtioDevice;

const BAR_SIZE: u64 = 0x8000;
const COMMON: u64 = 0x0000;
const COMMON_LEN: u64 = 0x38;
const ISR: u64 = 0x1000;
const DEVICE: u64 = 0x2000;
const DEVICE_LEN: u64 = 0x1000;
const NOTIFY: u64 = 0x3000;
const NOTIFY_MULTIPLIER: u32 = 4;
const MSIX_TABLE: u64 = 0x4000;
const MSIX_PBA: u64 = 0x6000;

/// Device status bits (virtio 2.1).
const STATUS_FEATURES_OK: u8 = 8;
const STATUS_DRIVER_OK: u8 = 4;
const STATUS_NEEDS_RESET: u8 = 0x40;

/// ISR bits.
const ISR_QUEUE: u8 = 1;
const ISR_CONFIG: u8 = 2;

/// Virtio PCI capability types.
const CAP_COMMON: u8 = 1;
const CAP_NOTIFY: u8 = 2;
const CAP_ISR: u8 = 3;
const CAP_DEVICE: u8 = 4;
const CAP_PCI_CFG: u8 = 5;
/// Offset of `pci_cfg_data` in the PCI-configuration access capability.
const PCI_CFG_DATA: usize = 16;

/// What a device's own threads hold to have one of its queues served when input
/// arrives by itself: the transport runs the device's `process_queue` for that queue as
/// if the driver had notified it, and interrupts the driver if buffers were used.
#[derive(Clone)]
pub struct Waker(Weak<Mutex<VirtioPci>>);

impl Waker {
    /// Serves queue `index` now; false once the transport is gone (the VM ended), when
    /// the device's threads should end.
    pub fn wake(&self, index: usize) -> bool {
        match self.0.upgrade() {
            Some(t) => {
                t.locked().notify(index);
                true
            }
            None => false,
        }
    }

    /// A waker whose transport is already gone (for devices tested on their own).
    pub fn none() -> Waker {
        Waker(Weak::new())
    }
}

/// The transport around one virtio device.
pub struct VirtioPci {
    config: ConfigSpace,
    msix: Msix,
    device: Box<dyn VirtioDevice>,
    queues: Vec<Queue>,
    mem: Arc<dyn GuestAccess>,
    device_feature_select: u32,
    driver_feature_select: u32,
    driver_features: u64,
    config_vector: u16,
    status: u8,
    generation: u8,
    queue_select: u16,
    isr: u8,
    /// Where the PCI-configuration access capability is.
    pci_cfg: usize,
    name: String,
}

impl std::fmt::Debug for VirtioPci {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VirtioPci")
            .field("name", &self.name)
            .field("status", &self.status)
            .finish()
    }
}

/// The PCI identity of virtio device type `ty` (modern transport: device id 0x1040 + ty).
fn identity(ty: u16) -> Identity {
    let class = match ty {
        1 => 0x02_00_00, // network controller
        2 => 0x01_80_00, // mass storage, other
        3 => 0x07_80_00, // communication controller, other
        _ => 0xff_00_00,
    };
    Identity {
        vendor: 0x1af4,
        device: 0x1040 + ty,
        revision: 1,
        class,
        subsystem_vendor: 0x1af4,
        subsystem: 0x40,
    }
}

/// A configuration space sized like that of a virtio function of type `ty` (its
/// identity and BAR): what node 0's stand-in for a function served by another node
/// needs to place it and route its BAR.
pub fn stand_in_config(ty: u16) -> Result<ConfigSpace, ConfigError> {
    let mut config = ConfigSpace::new(identity(ty));
    config.add_memory_bar(0, BAR_SIZE)?;
    Ok(config)
}

fn vendor_cap(
    config: &mut ConfigSpace,
    cfg_type: u8,
    offset: u64,
    length: u64,
    extra: Option<u32>,
) -> Result<(), ConfigError> {
    let cap_len: u8 = if extra.is_some() { 20 } else { 16 };
    let mut body = vec![cap_len, cfg_type, 0, 0, 0, 0];
    body.extend_from_slice(&u32::try_from(offset).unwrap_or(0).to_le_bytes());
    body.extend_from_slice(&u32::try_from(length).unwrap_or(0).to_le_bytes());
    if let Some(x) = extra {
        body.extend_from_slice(&x.to_le_bytes());
    }
    config.add_capability(0x09, &body, &[]).map(|_| ())
}

impl VirtioPci {
    /// The transport for `device`, reaching guest memory through `mem` and sending its
    /// interrupts to `msi`. `name` is for the log.
    pub fn new(
        device: Box<dyn VirtioDevice>,
        mem: Arc<dyn GuestAccess>,
        msi: Arc<dyn MsiSink>,
        name: String,
    ) -> Result<VirtioPci, ConfigError> {
        let mut config = ConfigSpace::new(identity(device.device_type()));
        config.add_memory_bar(0, BAR_SIZE)?;
        let queues: Vec<Queue> = device.queue_sizes().into_iter().map(Queue::new).collect();
        vendor_cap(&mut config, CAP_COMMON, COMMON, COMMON_LEN, None)?;
        vendor_cap(
            &mut config,
            CAP_NOTIFY,
            NOTIFY,
            u64::from(NOTIFY_MULTIPLIER) * queues.len().max(1) as u64,
            Some(NOTIFY_MULTIPLIER),
        )?;
        vendor_cap(&mut config, CAP_ISR, ISR, 1, None)?;
        vendor_cap(&mut config, CAP_DEVICE, DEVICE, DEVICE_LEN, None)?;
        // The PCI-configuration access window every device must present (virtio 4.1.4.9):
        // the driver writes bar, offset and length, then reads or writes pci_cfg_data.
        let mut body = vec![20, CAP_PCI_CFG, 0, 0, 0, 0];
        body.extend_from_slice(&[0; 12]);
        let mut writable = vec![0u8; 20];
        writable[4] = 0xff;
        writable[8..20].fill(0xff);
        let pci_cfg = config.add_capability(0x09, &body, &writable)?;
        // One vector per queue and one for configuration changes.
        let vectors = u16::try_from(queues.len() + 1).unwrap_or(u16::MAX);
        let msix = Msix::new(
            &mut config,
            vectors,
            0,
            MSIX_TABLE as u32,
            MSIX_PBA as u32,
            msi,
        )?;
        Ok(VirtioPci {
            config,
            msix,
            device,
            queues,
            mem,
            device_feature_select: 0,
            driver_feature_select: 0,
            driver_features: 0,
            config_vector: NO_VECTOR,
            status: 0,
            generation: 0,
            queue_select: 0,
            isr: 0,
            pci_cfg,
            name,
        })
    }

    /// The device's end-of-run line, named (None when it has nothing to say).
    pub fn summary(&self) -> Option<String> {
        self.device
            .summary()
            .map(|line| format!("{}: {line}", self.name))
    }

    /// The transport shared with the PCI bus; the device gets its [`Waker`] here (and
    /// may start its own threads).
    pub fn shared(mut self) -> Arc<Mutex<VirtioPci>> {
        Arc::new_cyclic(|weak| {
            self.device.set_waker(Waker(weak.clone()));
            Mutex::new(self)
        })
    }

    fn offered(&self) -> u64 {
        self.device.features() | 1 << VIRTIO_F_VERSION_1
    }

    fn reset(&mut self) {
        self.device.reset();
        for q in &mut self.queues {
            q.reset();
        }
        self.driver_features = 0;
        self.device_feature_select = 0;
        self.driver_feature_select = 0;
        self.config_vector = NO_VECTOR;
        self.status = 0;
        self.queue_select = 0;
        self.isr = 0;
    }

    /// Whether the device gave up on a malformed queue (until the driver resets it).
    pub fn is_broken(&self) -> bool {
        self.status & STATUS_NEEDS_RESET != 0
    }

    /// Offset of the MSI-X capability in the configuration space.
    pub fn msix_capability(&self) -> usize {
        self.msix.capability()
    }

    fn selected(&self) -> Option<&Queue> {
        self.queues.get(usize::from(self.queue_select))
    }

    fn common_bytes(&self) -> [u8; COMMON_LEN as usize] {
        let mut b = [0u8; COMMON_LEN as usize];
        let put = |b: &mut [u8], at: usize, v: &[u8]| b[at..at + v.len()].copy_from_slice(v);
        put(&mut b, 0x00, &self.device_feature_select.to_le_bytes());
        let features = match self.device_feature_select {
            0 => self.offered() as u32,
            1 => (self.offered() >> 32) as u32,
            _ => 0,
        };
        put(&mut b, 0x04, &features.to_le_bytes());
        put(&mut b, 0x08, &self.driver_feature_select.to_le_bytes());
        let driver = match self.driver_feature_select {
            0 => self.driver_features as u32,
            1 => (self.driver_features >> 32) as u32,
            _ => 0,
        };
        put(&mut b, 0x0c, &driver.to_le_bytes());
        put(&mut b, 0x10, &self.config_vector.to_le_bytes());
        let n = u16::try_from(self.queues.len()).unwrap_or(u16::MAX);
        put(&mut b, 0x12, &n.to_le_bytes());
        b[0x14] = self.status;
        b[0x15] = self.generation;
        put(&mut b, 0x16, &self.queue_select.to_le_bytes());
        if let Some(q) = self.selected() {
            put(&mut b, 0x18, &q.size.to_le_bytes());
            put(&mut b, 0x1a, &q.msix_vector.to_le_bytes());
            put(&mut b, 0x1c, &u16::from(q.ready).to_le_bytes());
            put(&mut b, 0x1e, &self.queue_select.to_le_bytes());
            put(&mut b, 0x20, &q.desc.to_le_bytes());
            put(&mut b, 0x28, &q.avail.to_le_bytes());
            put(&mut b, 0x30, &q.used.to_le_bytes());
        }
        b
    }

    fn common_write(&mut self, offset: u64, data: &[u8]) {
        let mut b = self.common_bytes();
        let start = usize::try_from(offset).unwrap_or(usize::MAX);
        for (i, v) in data.iter().enumerate() {
            if let Some(slot) = start.checked_add(i).and_then(|o| b.get_mut(o)) {
                *slot = *v;
            }
        }
        let end = start.saturating_add(data.len());
        let touched = |at: usize, len: usize| start < at + len && at < end;
        let u16_at = |at: usize| u16::from_le_bytes([b[at], b[at + 1]]);
        let u32_at = |at: usize| u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]);
        let u64_at = |at: usize| u64::from(u32_at(at)) | u64::from(u32_at(at + 4)) << 32;
        if touched(0x00, 4) {
            self.device_feature_select = u32_at(0x00);
        }
        if touched(0x08, 4) {
            self.driver_feature_select = u32_at(0x08);
        }
        if touched(0x0c, 4) && self.status & STATUS_FEATURES_OK == 0 {
            let v = u64::from(u32_at(0x0c));
            match self.driver_feature_select {
                0 => self.driver_features = (self.driver_features & !0xffff_ffff) | v,
                1 => self.driver_features = (self.driver_features & 0xffff_ffff) | v << 32,
                _ => {}
            }
        }
        if touched(0x10, 2) {
            self.config_vector = self.valid_vector(u16_at(0x10));
        }
        if touched(0x16, 2) {
            self.queue_select = u16_at(0x16);
        }
        let vector = self.valid_vector(u16_at(0x1a));
        if let Some(q) = self.queues.get_mut(usize::from(self.queue_select)) {
            if touched(0x18, 2) {
                q.size = u16_at(0x18);
            }
            if touched(0x1a, 2) {
                q.msix_vector = vector;
            }
            if touched(0x1c, 2) && u16_at(0x1c) == 1 {
                q.ready = true;
            }
            if touched(0x20, 8) {
                q.desc = u64_at(0x20);
            }
            if touched(0x28, 8) {
                q.avail = u64_at(0x28);
            }
            if touched(0x30, 8) {
                q.used = u64_at(0x30);
            }
        }
        if touched(0x14, 1) {
            self.write_status(b[0x14]);
        }
    }

    /// A vector the table has, else "none" (the driver reads it back to check).
    fn valid_vector(&self, v: u16) -> u16 {
        if usize::from(v) < self.msix.vectors() {
            v
        } else {
            NO_VECTOR
        }
    }

    fn write_status(&mut self, v: u8) {
        if v == 0 {
            self.reset();
            return;
        }
        let mut v = v | (self.status & STATUS_NEEDS_RESET);
        if v & STATUS_FEATURES_OK != 0 && self.status & STATUS_FEATURES_OK == 0 {
            let f = self.driver_features;
            if f & !self.offered() != 0 || f & (1 << VIRTIO_F_VERSION_1) == 0 {
                // Not accepted: the driver sees FEATURES_OK clear and gives up.
                v &= !STATUS_FEATURES_OK;
            }
        }
        if v & STATUS_DRIVER_OK != 0 && self.status & STATUS_DRIVER_OK == 0 {
            self.device.activate(self.driver_features);
        }
        self.status = v;
    }

    fn notify(&mut self, index: usize) {
        if self.status & STATUS_DRIVER_OK == 0 || self.is_broken() {
            return;
        }
        let Some(queue) = self.queues.get_mut(index) else {
            return;
        };
        match self.device.process_queue(index, queue, self.mem.as_ref()) {
            Ok(false) => {}
            Ok(true) => {
                let vector = queue.msix_vector;
                match queue.wants_interrupt(self.mem.as_ref()) {
                    Ok(true) => self.signal(vector, ISR_QUEUE),
                    Ok(false) => {}
                    Err(e) => self.broken(index, &e),
                }
            }
            Err(e) => self.broken(index, &e),
        }
    }

    fn broken(&mut self, index: usize, e: &crate::QueueError) {
        tracing::warn!(
            device = %self.name,
            queue = index,
            error = %e,
            "virtio device marked broken (DEVICE_NEEDS_RESET) after the driver's malformed queue"
        );
        self.status |= STATUS_NEEDS_RESET;
        let v = self.config_vector;
        self.signal(v, ISR_CONFIG);
    }

    fn signal(&mut self, vector: u16, isr: u8) {
        self.isr |= isr;
        if vector != NO_VECTOR {
            self.msix.notify(&self.config, usize::from(vector));
        }
    }
}

impl VirtioPci {
    /// Whether `[offset, +len)` touches the access window's data field; if so, the
    /// (bar, offset, length) the driver set up there.
    fn pci_cfg_access(&self, offset: usize, len: usize) -> Option<(usize, u64, usize)> {
        let data = self.pci_cfg + PCI_CFG_DATA;
        if offset >= data + 4 || offset + len <= data {
            return None;
        }
        let bar = usize::from(self.config.u16(self.pci_cfg + 4) as u8);
        let at = u64::from(self.config.u32(self.pci_cfg + 8));
        let length = usize::try_from(self.config.u32(self.pci_cfg + 12)).unwrap_or(0);
        // Only BAR 0 exists; lengths are 1, 2 or 4 and stay inside the BAR.
        (bar == 0 && matches!(length, 1 | 2 | 4) && at + length as u64 <= BAR_SIZE)
            .then_some((bar, at, length))
    }
}

impl PciDevice for VirtioPci {
    fn config(&self) -> &ConfigSpace {
        &self.config
    }

    fn config_read(&mut self, offset: usize, data: &mut [u8]) {
        if let Some((bar, at, length)) = self.pci_cfg_access(offset, data.len()) {
            let mut window = [0u8; 4];
            self.bar_read(bar, at, &mut window[..length]);
            let field = self.pci_cfg + PCI_CFG_DATA;
            self.config.set_u32(field, u32::from_le_bytes(window));
        }
        self.config.read(offset, data);
    }

    fn config_write(&mut self, offset: usize, data: &[u8]) {
        self.config.write(offset, data);
        self.msix.config_written(&self.config);
        if let Some((bar, at, length)) = self.pci_cfg_access(offset, data.len()) {
            let field = self.pci_cfg + PCI_CFG_DATA;
            let bytes = self.config.u32(field).to_le_bytes();
            self.bar_write(bar, at, &bytes[..length]);
        }
    }

    fn bar_read(&mut self, _bar: usize, offset: u64, data: &mut [u8]) {
        data.fill(0);
        match offset {
            o if o < COMMON + COMMON_LEN => {
                let b = self.common_bytes();
                for (i, d) in data.iter_mut().enumerate() {
                    *d = b.get(o as usize + i).copied().unwrap_or(0);
                }
            }
            ISR => {
                data[0] = self.isr;
                self.isr = 0;
            }
            o if (DEVICE..DEVICE + DEVICE_LEN).contains(&o) => {
                self.device.read_config(o - DEVICE, data);
            }
            o if (MSIX_TABLE..MSIX_PBA).contains(&o) => self.msix.table_read(o - MSIX_TABLE, data),
            o if (MSIX_PBA..BAR_SIZE).contains(&o) => self.msix.pba_read(o - MSIX_PBA, data),
            _ => {}
        }
    }

    fn bar_write(&mut self, _bar: usize, offset: u64, data: &[u8]) {
        match offset {
            o if o < COMMON + COMMON_LEN => self.common_write(o, data),
            o if (DEVICE..DEVICE + DEVICE_LEN).contains(&o) => {
                self.device.write_config(o - DEVICE, data);
                self.generation = self.generation.wrapping_add(1);
            }
            o if (NOTIFY..MSIX_TABLE).contains(&o) => {
                let index = usize::try_from((o - NOTIFY) / u64::from(NOTIFY_MULTIPLIER))
                    .unwrap_or(usize::MAX);
                self.notify(index);
            }
            o if (MSIX_TABLE..MSIX_PBA).contains(&o) => {
                self.msix.table_write(&self.config, o - MSIX_TABLE, data)
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests;
