//! virtio 1.x devices for the guest, on PCI with the modern transport.
//!
//! [`pci::VirtioPci`] is the transport (configuration capabilities, common
//! configuration, notifications, ISR, MSI-X); it drives a [`VirtioDevice`] (the
//! device type: [`block::Block`]). Queues ([`queue`]) reach guest memory only through
//! [`dvmm_devices::GuestAccess`], the VMM's path that in a cluster is the DSM.
//!
//! Whatever a driver writes, the device never panics and never touches memory outside
//! guest RAM: a malformed queue marks the device broken (`DEVICE_NEEDS_RESET`, as the
//! spec says), which the driver can reset.

#![deny(unsafe_code)]

pub mod block;
pub mod pci;
pub mod queue;

use dvmm_devices::GuestAccess;
pub use queue::{Queue, QueueError};

/// A virtio device type, behind the transport.
pub trait VirtioDevice: Send {
    /// The virtio device id (2: block).
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
    /// Serves what the driver made available on queue `index`; true if buffers were
    /// returned (the driver may want an interrupt). An error marks the device broken.
    fn process_queue(
        &mut self,
        index: usize,
        queue: &mut Queue,
        mem: &dyn GuestAccess,
    ) -> Result<bool, QueueError>;
}
