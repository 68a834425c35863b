//! virtio 1.x devices for the guest, on PCI with the modern transport.
//!
//! [`pci::VirtioPci`] is the transport (configuration capabilities, common
//! configuration, notifications, ISR, MSI-X); it drives a [`VirtioDevice`] (the
//! device type: [`block::Block`], [`net::Net`], [`console::Console`], [`rng::Rng`]). Queues ([`queue`]) reach guest memory only through
//! [`dvmm_devices::GuestAccess`], the VMM's path that in a cluster is the DSM.
//!
//! Whatever a driver writes, the device never panics and never touches memory outside
//! guest RAM: a malformed queue marks the device broken (`DEVICE_NEEDS_RESET`, as the
//! spec says), which the driver can reset.

#![deny(unsafe_code)]

pub mod block;
pub mod console;
pub mod net;
pub mod pci;
pub mod queue;
pub mod rng;

use dvmm_devices::GuestAccess;
pub use queue::{Queue, QueueError};

/// The virtio device ids (virtio 1.2, 5) of the devices here.
pub mod device_type {
    /// A network card.
    pub const NET: u16 = 1;
    /// A block device.
    pub const BLOCK: u16 = 2;
    /// A console.
    pub const CONSOLE: u16 = 3;
    /// An entropy source.
    pub const ENTROPY: u16 = 4;
}

/// A virtio device type, behind the transport.
///
/// Locking: the transport holds its lock while it calls these; a device's own thread
/// must not hold any lock of the device's while it calls [`pci::Waker::wake`].
pub trait VirtioDevice: Send {
    /// The virtio device id (one of [`device_type`]).
    fn device_type(&self) -> u16;
    /// Feature bits the device offers (the transport adds `VIRTIO_F_VERSION_1`).
    fn features(&self) -> u64;
    /// Largest size of each of its queues.
    fn queue_sizes(&self) -> Vec<u16>;
    /// Reads its configuration space (the transport's device-specific region).
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes its configuration space; read-only by default.
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    /// The driver finished setting up with `features` (DRIVER_OK).
    fn activate(&mut self, _features: u64) {}
    /// The driver reset the device.
    fn reset(&mut self) {}
    /// The transport is shared: `waker` serves one of this device's queues from its
    /// own threads (devices without input of their own ignore it).
    fn set_waker(&mut self, _waker: pci::Waker) {}
    /// One line of counters for the end-of-run log (None: nothing to say).
    fn summary(&self) -> Option<String> {
        None
    }
    /// Serves what the driver made available on queue `index`; true if buffers were
    /// returned (the driver may want an interrupt). An error marks the device broken.
    fn process_queue(
        &mut self,
        index: usize,
        queue: &mut Queue,
        mem: &dyn GuestAccess,
    ) -> Result<bool, QueueError>;
}
