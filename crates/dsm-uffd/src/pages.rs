//! Guest RAM as the engine sees it: two views of one memfd.

use super::*;

/// Guest RAM as the engine sees it: the RAM offset space `[0, len)` (not guest-physical
/// addresses; the caller converts), with view A (what KVM/vCPUs access; the engine
/// registers it with userfaultfd) and view B (the VMM's window; the engine fills and reads
/// page contents through it). Both are `MAP_SHARED` mappings of the same memfd.
///
/// The fields are public to keep construction simple; build it with
/// [`GuestPages::new`], whose safety contract the engine relies on.
#[derive(Debug, Clone, Copy)]
pub struct GuestPages {
    /// Start of view A (registered with userfaultfd by the engine).
    pub view_a: *mut u8,
    /// Start of view B (the VMM's window).
    pub view_b: *mut u8,
    /// Length of each view in bytes, a multiple of 4 KiB.
    pub len: u64,
}

// SAFETY: the pointers designate shared mappings that, per `GuestPages::new`'s contract,
// outlive the engine; concurrent access to guest memory is coordinated by the protocol.
unsafe impl Send for GuestPages {}
// SAFETY: as above.
unsafe impl Sync for GuestPages {}

impl GuestPages {
    /// Describes guest RAM.
    ///
    /// # Safety
    ///
    /// `view_a` and `view_b` must each start a readable and writable `MAP_SHARED`
    /// mapping of `len` bytes of the same memfd (shmem), at the same file offset, and
    /// both must stay mapped for as long as any engine built on them (and any
    /// [`PinGuard`]) lives. View A must not be registered with another userfaultfd.
    pub unsafe fn new(view_a: *mut u8, view_b: *mut u8, len: u64) -> Result<GuestPages, DsmError> {
        let pages = GuestPages {
            view_a,
            view_b,
            len,
        };
        pages.validate()?;
        Ok(pages)
    }

    pub(crate) fn validate(&self) -> Result<(), DsmError> {
        let aligned = |p: *mut u8| !p.is_null() && (p as u64).is_multiple_of(PAGE_SIZE);
        if !aligned(self.view_a) || !aligned(self.view_b) {
            return Err(DsmError::BadPages(
                "views must be non-null and 4 KiB aligned",
            ));
        }
        if self.len == 0
            || !self.len.is_multiple_of(PAGE_SIZE)
            || usize::try_from(self.len).is_err()
        {
            return Err(DsmError::BadPages(
                "length must be a non-zero multiple of 4 KiB",
            ));
        }
        Ok(())
    }

    pub(crate) fn a(&self, page: PageNo) -> u64 {
        self.view_a as u64 + page * PAGE_SIZE
    }

    pub(crate) fn b(&self, page: PageNo) -> *mut u8 {
        // In bounds: callers check `page < len / PAGE_SIZE`.
        self.view_b.wrapping_add((page * PAGE_SIZE) as usize)
    }
}
