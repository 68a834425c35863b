//! The VMM's own reads and writes of guest memory (instruction fetches for emulation,
//! operands of emulated instructions, device DMA).
//!
//! On one node they go straight to RAM ([`LocalAccess`]). In a cluster they must go
//! through the DSM, or they would read a stale copy or write a page another node owns:
//! a cluster node's devices and vCPUs are only built once the DSM exists
//! (`UnsharedVm::share`), with its access path.

use std::sync::Arc;

use vm_memory::{Bytes, GuestAddress};

use crate::memory::GuestRam;

/// Access to guest-physical memory on behalf of the VMM (defined with the devices, whose
/// DMA takes the same path).
pub use dvmm_devices::{GuestAccess, GuestAccessError};

/// Direct access to this node's RAM (single-node VMs).
pub struct LocalAccess(pub Arc<GuestRam>);

impl GuestAccess for LocalAccess {
    fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), GuestAccessError> {
        self.0
            .memory()
            .read_slice(buf, GuestAddress(gpa))
            .map_err(|e| GuestAccessError::Failed {
                gpa,
                source: Box::new(e),
            })
    }

    fn write(&self, gpa: u64, buf: &[u8]) -> Result<(), GuestAccessError> {
        self.0
            .memory()
            .write_slice(buf, GuestAddress(gpa))
            .map_err(|e| GuestAccessError::Failed {
                gpa,
                source: Box::new(e),
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_access_reads_and_writes_ram_only() {
        let ram = Arc::new(GuestRam::new(dvmm_layout::MIN_MEMORY).unwrap());
        let path = LocalAccess(ram);
        path.write(0x2000, &[1, 2, 3, 4]).unwrap();
        let mut b = [0u8; 4];
        path.read(0x2000, &mut b).unwrap();
        assert_eq!(b, [1, 2, 3, 4]);
        assert!(path.read(dvmm_layout::LAPIC_ADDR, &mut b).is_err());
    }
}
