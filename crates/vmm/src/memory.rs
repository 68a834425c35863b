//! Guest RAM: one memfd mapped twice.
//!
//! View A is handed to KVM (and, once the DSM exists, registered with userfaultfd so
//! that guest accesses can be trapped page by page); view B is the VMM's own window,
//! used by the loaders and by device emulation. Both views share the same page cache
//! pages, so a write through one is visible through the other.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};
use std::ptr::NonNull;

use dvmm_layout::{ram_ranges, RamRange, MIN_MEMORY, PAGE_SIZE};
use vm_memory::{GuestAddress, GuestMemoryMmap, GuestRegionMmap, MmapRegion};

/// Errors setting up guest RAM.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// The requested size is below what a guest can boot with.
    #[error("guest memory of {size} bytes is too small: at least {min} MiB are needed", min = MIN_MEMORY >> 20)]
    TooSmall {
        /// Requested size.
        size: u64,
    },
    /// Not a whole number of pages.
    #[error("guest memory of {size} bytes is not a multiple of 4 KiB")]
    Unaligned {
        /// Requested size.
        size: u64,
    },
    /// More than the host has.
    #[error("guest memory of {size_mib} MiB is more than this host can give ({host_mib} MiB of RAM); choose a smaller --memory")]
    TooLarge {
        /// Requested size in MiB.
        size_mib: u64,
        /// Host RAM in MiB.
        host_mib: u64,
    },
    /// A system call failed.
    #[error("cannot set up guest memory: {what}: {source}")]
    Os {
        /// What was being done.
        what: &'static str,
        /// The OS error.
        source: io::Error,
    },
}

/// One mapping of the whole memfd.
struct View {
    ptr: NonNull<u8>,
    len: usize,
}

impl View {
    fn map(fd: &File, len: usize) -> Result<View, MemoryError> {
        // SAFETY: a fresh shared mapping of a memfd we own, at an address the kernel
        // chooses; the result is checked before use.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_NORESERVE,
                fd.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(MemoryError::Os {
                what: "mmap of guest RAM",
                source: io::Error::last_os_error(),
            });
        }
        let ptr = NonNull::new(p.cast::<u8>()).ok_or(MemoryError::Os {
            what: "mmap of guest RAM returned NULL",
            source: io::Error::from(io::ErrorKind::Other),
        })?;
        Ok(View { ptr, len })
    }
}

impl Drop for View {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly the mapping made in `View::map`; nothing borrows it
        // any more because `GuestRam` drops its `GuestMemoryMmap` first.
        unsafe {
            libc::munmap(self.ptr.as_ptr().cast(), self.len);
        }
    }
}

/// The guest's RAM (see the module documentation).
pub struct GuestRam {
    // Field order matters: `mem` borrows `vmm_view` and must drop first.
    mem: GuestMemoryMmap,
    kvm_view: View,
    vmm_view: View,
    ranges: Vec<RamRange>,
    size: u64,
    _fd: File,
}

// SAFETY: the raw pointers in the views are plain shared mappings that stay valid for the
// lifetime of `GuestRam`; concurrent access to guest memory is the guest's own business,
// exactly as for `GuestMemoryMmap`, which is itself Send + Sync.
unsafe impl Send for GuestRam {}
// SAFETY: as above.
unsafe impl Sync for GuestRam {}

fn host_ram_bytes() -> u64 {
    // SAFETY: sysinfo fills a plain struct we own.
    unsafe {
        let mut info: libc::sysinfo = std::mem::zeroed();
        if libc::sysinfo(&mut info) != 0 {
            return u64::MAX;
        }
        (info.totalram as u64).saturating_mul(u64::from(info.mem_unit))
    }
}

impl GuestRam {
    /// Creates `size` bytes of guest RAM laid out per [`dvmm_layout::ram_ranges`].
    pub fn new(size: u64) -> Result<GuestRam, MemoryError> {
        if size < MIN_MEMORY {
            return Err(MemoryError::TooSmall { size });
        }
        if !size.is_multiple_of(PAGE_SIZE) {
            return Err(MemoryError::Unaligned { size });
        }
        let host = host_ram_bytes();
        if size > host {
            return Err(MemoryError::TooLarge {
                size_mib: size >> 20,
                host_mib: host >> 20,
            });
        }
        let len = usize::try_from(size).map_err(|_| MemoryError::TooLarge {
            size_mib: size >> 20,
            host_mib: host >> 20,
        })?;
        // SAFETY: memfd_create with a static NUL-terminated name; the result is checked.
        let raw = unsafe { libc::memfd_create(c"dvmm-guest-ram".as_ptr(), libc::MFD_CLOEXEC) };
        if raw < 0 {
            return Err(MemoryError::Os {
                what: "memfd_create",
                source: io::Error::last_os_error(),
            });
        }
        // SAFETY: `raw` is a fresh descriptor that nothing else owns.
        let fd = unsafe { File::from_raw_fd(raw) };
        fd.set_len(size).map_err(|source| MemoryError::Os {
            what: "sizing the guest RAM memfd",
            source,
        })?;
        let kvm_view = View::map(&fd, len)?;
        let vmm_view = View::map(&fd, len)?;
        let ranges = ram_ranges(size);
        let mut regions = Vec::with_capacity(ranges.len());
        let mut offset = 0u64;
        for r in &ranges {
            // SAFETY: the slice [offset, offset + r.len) lies inside view B, which lives as
            // long as `mem` (field order above); MmapRegion::build_raw does not take
            // ownership of the mapping.
            let region = unsafe {
                MmapRegion::build_raw(
                    vmm_view.ptr.as_ptr().add(offset as usize),
                    r.len as usize,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_SHARED,
                )
            }
            .map_err(|e| MemoryError::Os {
                what: "describing guest RAM to vm-memory",
                source: io::Error::other(e.to_string()),
            })?;
            let region =
                GuestRegionMmap::new(region, GuestAddress(r.start)).ok_or(MemoryError::Os {
                    what: "guest RAM region overflows the address space",
                    source: io::Error::from(io::ErrorKind::InvalidInput),
                })?;
            regions.push(region);
            offset += r.len;
        }
        let mem = GuestMemoryMmap::from_regions(regions).map_err(|e| MemoryError::Os {
            what: "assembling guest RAM regions",
            source: io::Error::other(e.to_string()),
        })?;
        Ok(GuestRam {
            mem,
            kvm_view,
            vmm_view,
            ranges,
            size,
            _fd: fd,
        })
    }

    /// The VMM's view as vm-memory guest memory (guest-physical addressing).
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    /// Total RAM size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The guest-physical RAM ranges, with the host address of each in KVM's view.
    pub fn kvm_slots(&self) -> Vec<(RamRange, u64)> {
        let mut offset = 0u64;
        self.ranges
            .iter()
            .map(|r| {
                let host = self.kvm_view.ptr.as_ptr() as u64 + offset;
                offset += r.len;
                (*r, host)
            })
            .collect()
    }

    /// Host address of view B (for diagnostics and benchmarks).
    pub fn vmm_view_addr(&self) -> u64 {
        self.vmm_view.ptr.as_ptr() as u64
    }

    /// Both views' start addresses (A: KVM's, B: the VMM's), for the DSM engine.
    pub fn views(&self) -> (*mut u8, *mut u8) {
        (self.kvm_view.ptr.as_ptr(), self.vmm_view.ptr.as_ptr())
    }

    /// Pages (RAM offset / 4 KiB) that hold data, i.e. were ever written: the memfd's
    /// allocated extents, found with `SEEK_DATA`/`SEEK_HOLE`.
    pub fn populated_pages(&self) -> Vec<u64> {
        let fd = self._fd.as_raw_fd();
        let size = self.size as i64;
        let mut out = Vec::new();
        let mut pos: i64 = 0;
        while pos < size {
            // SAFETY: lseek on our own memfd; results are checked.
            let data = unsafe { libc::lseek(fd, pos, libc::SEEK_DATA) };
            if data < 0 {
                break;
            }
            // SAFETY: as above.
            let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
            let end = if hole < 0 { size } else { hole.min(size) };
            let first = data as u64 / PAGE_SIZE;
            let last = (end as u64).div_ceil(PAGE_SIZE);
            out.extend(first..last);
            pos = end;
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestMemoryBackend};

    #[test]
    fn views_alias_the_same_pages() {
        let ram = GuestRam::new(MIN_MEMORY).unwrap();
        ram.memory()
            .write_obj(0xdead_beef_u32, GuestAddress(0x1234))
            .unwrap();
        let (range, host) = ram.kvm_slots()[0];
        assert_eq!(range.start, 0);
        // SAFETY: reading inside view A, which the RAM object keeps mapped.
        let v = unsafe { std::ptr::read_unaligned((host + 0x1234) as *const u32) };
        assert_eq!(v, 0xdead_beef);
        assert_eq!(ram.memory().num_regions(), 1);
        assert_eq!(ram.populated_pages(), vec![1]);
    }

    #[test]
    fn rejects_bad_sizes() {
        assert!(matches!(
            GuestRam::new(1 << 20),
            Err(MemoryError::TooSmall { .. })
        ));
        assert!(matches!(
            GuestRam::new(MIN_MEMORY + 1),
            Err(MemoryError::Unaligned { .. })
        ));
        assert!(matches!(
            GuestRam::new(1 << 50),
            Err(MemoryError::TooLarge { .. })
        ));
    }
}
