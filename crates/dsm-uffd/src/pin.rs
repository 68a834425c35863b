//! Pinned access to guest pages for the VMM itself ([`DsmEngine::access`]).

use super::*;

/// Pages made accessible by [`DsmEngine::access`]; they stay pinned (not invalidated or
/// downgraded here) until the guard drops. Reads and writes go through view B.
pub struct PinGuard<'a> {
    pub(crate) engine: &'a DsmEngine,
    pub(crate) offset: u64,
    pub(crate) len: u64,
    pub(crate) access: Access,
    pub(crate) first: PageNo,
    pub(crate) pinned_end: PageNo,
}

impl PinGuard<'_> {
    /// RAM offset of the start of the pinned range.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// Length of the pinned range in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the range is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The access the pin grants.
    pub fn access(&self) -> Access {
        self.access
    }

    /// Pointer into view B at [`PinGuard::offset`]; valid for [`PinGuard::len`] bytes while
    /// the guard lives (writes only with [`Access::Write`]).
    pub fn as_ptr(&self) -> *mut u8 {
        self.engine
            .inner
            .pages
            .view_b
            .wrapping_add(self.offset as usize)
    }

    fn check(&self, offset: u64, len: usize) -> Result<usize, DsmError> {
        let end = self.offset + self.len;
        match offset.checked_add(len as u64) {
            Some(e) if offset >= self.offset && e <= end => Ok(offset as usize),
            _ => Err(DsmError::OutOfRange {
                offset,
                len: len as u64,
                start: self.offset,
                end,
            }),
        }
    }

    /// Copies guest RAM at RAM offset `offset` (inside the pinned range) into `buf`.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), DsmError> {
        let at = self.check(offset, buf.len())?;
        // SAFETY: the range is inside the pinned range, hence inside view B; pinned pages
        // are readable here and their bytes are not overwritten by the engine.
        unsafe {
            std::ptr::copy_nonoverlapping(
                self.engine.inner.pages.view_b.add(at),
                buf.as_mut_ptr(),
                buf.len(),
            );
        }
        Ok(())
    }

    /// Copies `buf` into guest RAM at RAM offset `offset` (inside the pinned range); the
    /// guard must have been taken with [`Access::Write`].
    pub fn write(&self, offset: u64, buf: &[u8]) -> Result<(), DsmError> {
        if self.access != Access::Write {
            return Err(DsmError::ReadOnlyPin);
        }
        let at = self.check(offset, buf.len())?;
        // SAFETY: as in `read`; we hold the only writable copy in the cluster.
        unsafe {
            std::ptr::copy_nonoverlapping(
                buf.as_ptr(),
                self.engine.inner.pages.view_b.add(at),
                buf.len(),
            );
        }
        Ok(())
    }
}

impl Drop for PinGuard<'_> {
    fn drop(&mut self) {
        let inner = &*self.engine.inner;
        let mut st = inner.lock();
        for page in self.first..self.pinned_end {
            let Some(pin) = st.pins.get_mut(&page) else {
                continue;
            };
            match self.access {
                Access::Read => pin.readers = pin.readers.saturating_sub(1),
                Access::Write => pin.writers = pin.writers.saturating_sub(1),
            }
            if pin.readers + pin.writers > 0 {
                continue;
            }
            st.pins.remove(&page);
            inner.drain_deferred(&mut st, page);
        }
        inner.flush(&mut st);
        inner.cv.notify_all();
    }
}
