//! The engine's errors.

use super::*;

/// Errors of the DSM engine.
#[derive(Debug, thiserror::Error)]
pub enum DsmError {
    /// The guest RAM description is unusable.
    #[error("guest RAM views are unusable: {0}")]
    BadPages(&'static str),
    /// Setting up userfaultfd failed.
    #[error("cannot set up userfaultfd ({what}): {source}; the DSM needs root (or vm.unprivileged_userfaultfd=1) and a kernel with userfaultfd MINOR and WP support for shmem")]
    Uffd {
        /// The step that failed.
        what: &'static str,
        /// The OS error.
        source: io::Error,
    },
    /// A shared page outside guest RAM.
    #[error("shared page {page} is outside guest RAM ({pages} pages)")]
    SharedOutOfRange {
        /// The page.
        page: PageNo,
        /// Pages of guest RAM.
        pages: u64,
    },
    /// Seeding a shared page failed.
    #[error("cannot seed shared pages: {0}")]
    Seed(#[from] SeedError),
    /// An access outside guest RAM (or outside the pinned range).
    #[error("access of {len:#x} bytes at RAM offset {offset:#x} is outside the range [{start:#x}, {end:#x})")]
    OutOfRange {
        /// Requested offset.
        offset: u64,
        /// Requested length.
        len: u64,
        /// Start of the valid range.
        start: u64,
        /// End of the valid range.
        end: u64,
    },
    /// A write through a read-only pin.
    #[error("write through a pin taken for reading; call access() with Access::Write")]
    ReadOnlyPin,
    /// The engine was stopped.
    #[error("the DSM engine is stopped")]
    Stopped,
    /// The fault thread could not be started.
    #[error("cannot start the DSM fault thread: {0}")]
    Thread(io::Error),
}
