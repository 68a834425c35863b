//! The VMM's own reads and writes of guest memory (instruction fetches for emulation,
//! operands of emulated instructions, device DMA).
//!
//! On one node they go straight to RAM. In a cluster they must go through the DSM, or
//! they would read a stale copy or write a page another node owns.

use std::sync::{Arc, OnceLock};

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

/// The access path in force: local until a DSM is installed.
pub struct GuestMemoryPath {
    local: LocalAccess,
    dsm: OnceLock<Arc<dyn GuestAccess>>,
}

impl GuestMemoryPath {
    /// Local access to `ram`.
    pub fn new(ram: Arc<GuestRam>) -> GuestMemoryPath {
        GuestMemoryPath {
            local: LocalAccess(ram),
            dsm: OnceLock::new(),
        }
    }

    /// From now on, go through `dsm` (set once, before the vCPUs run).
    pub fn use_dsm(&self, dsm: Arc<dyn GuestAccess>) {
        let _ = self.dsm.set(dsm);
    }
}

impl GuestAccess for GuestMemoryPath {
    fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), GuestAccessError> {
        match self.dsm.get() {
            Some(d) => d.read(gpa, buf),
            None => self.local.read(gpa, buf),
        }
    }

    fn write(&self, gpa: u64, buf: &[u8]) -> Result<(), GuestAccessError> {
        match self.dsm.get() {
            Some(d) => d.write(gpa, buf),
            None => self.local.write(gpa, buf),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fake;

    impl GuestAccess for Fake {
        fn read(&self, _gpa: u64, buf: &mut [u8]) -> Result<(), GuestAccessError> {
            buf.fill(0xab);
            Ok(())
        }

        fn write(&self, gpa: u64, _buf: &[u8]) -> Result<(), GuestAccessError> {
            Err(GuestAccessError::Failed {
                gpa,
                source: "read-only fake".into(),
            })
        }
    }

    #[test]
    fn local_until_a_dsm_is_installed() {
        let ram = Arc::new(GuestRam::new(dvmm_layout::MIN_MEMORY).unwrap());
        let path = GuestMemoryPath::new(ram);
        path.write(0x2000, &[1, 2, 3, 4]).unwrap();
        let mut b = [0u8; 4];
        path.read(0x2000, &mut b).unwrap();
        assert_eq!(b, [1, 2, 3, 4]);
        assert!(path.read(dvmm_layout::LAPIC_ADDR, &mut b).is_err());
        path.use_dsm(Arc::new(Fake));
        path.read(0x2000, &mut b).unwrap();
        assert_eq!(b, [0xab; 4]);
        assert!(path.write(0x2000, &b).is_err());
    }
}
