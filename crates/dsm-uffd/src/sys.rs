//! Thin wrappers over the userfaultfd ABI (`linux/userfaultfd.h`); libc does not define it.
//!
//! Why not the `userfaultfd` crate: the DSM installs a page read-only in the same call
//! that resolves the fault (`UFFDIO_COPY_MODE_WP`, `UFFDIO_CONTINUE_MODE_WP`), so that a
//! reader never holds a window in which its write would go unseen; the crate offers
//! neither mode, and it hides the raw event records the engine batches (16 per read).

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use vmm_sys_util::eventfd::EventFd;

const UFFDIO: u64 = 0xAA;
const UFFD_API: u64 = 0xAA;

const fn iowr(nr: u64, size: usize) -> u64 {
    (3 << 30) | ((size as u64) << 16) | (UFFDIO << 8) | nr
}
const fn ior(nr: u64, size: usize) -> u64 {
    (2 << 30) | ((size as u64) << 16) | (UFFDIO << 8) | nr
}

#[repr(C)]
#[derive(Default)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Default, Clone, Copy)]
struct UffdioRange {
    start: u64,
    len: u64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioRegister {
    range: UffdioRange,
    mode: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioCopy {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    copy: i64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioWriteprotect {
    range: UffdioRange,
    mode: u64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioContinue {
    range: UffdioRange,
    mode: u64,
    mapped: i64,
}

const UFFDIO_API: u64 = iowr(0x3F, std::mem::size_of::<UffdioApi>());
const UFFDIO_REGISTER: u64 = iowr(0x00, std::mem::size_of::<UffdioRegister>());
const UFFDIO_UNREGISTER: u64 = ior(0x01, std::mem::size_of::<UffdioRange>());
const UFFDIO_WAKE: u64 = ior(0x02, std::mem::size_of::<UffdioRange>());
const UFFDIO_COPY: u64 = iowr(0x03, std::mem::size_of::<UffdioCopy>());
const UFFDIO_WRITEPROTECT: u64 = iowr(0x06, std::mem::size_of::<UffdioWriteprotect>());
const UFFDIO_CONTINUE: u64 = iowr(0x07, std::mem::size_of::<UffdioContinue>());
/// `_IO(0xAA, 0x00)` on /dev/userfaultfd.
const USERFAULTFD_IOC_NEW: u64 = UFFDIO << 8;

const FEATURE_PAGEFAULT_FLAG_WP: u64 = 1 << 0;
const FEATURE_MISSING_SHMEM: u64 = 1 << 5;
const FEATURE_THREAD_ID: u64 = 1 << 8;
const FEATURE_MINOR_SHMEM: u64 = 1 << 10;
const FEATURE_WP_HUGETLBFS_SHMEM: u64 = 1 << 12;

const REGISTER_MODE_MISSING: u64 = 1 << 0;
const REGISTER_MODE_WP: u64 = 1 << 1;
const REGISTER_MODE_MINOR: u64 = 1 << 2;

const COPY_MODE_WP: u64 = 1 << 1;
const CONTINUE_MODE_WP: u64 = 1 << 1;
const WRITEPROTECT_MODE_WP: u64 = 1 << 0;

/// `UFFD_EVENT_PAGEFAULT`.
pub const EVENT_PAGEFAULT: u8 = 0x12;
/// The fault was a write.
pub const PF_WRITE: u64 = 1 << 0;
/// The fault hit a write-protected page.
pub const PF_WP: u64 = 1 << 1;
/// The fault hit a page present in the page cache but not mapped.
pub const PF_MINOR: u64 = 1 << 2;

/// `struct uffd_msg`, pagefault layout (32 bytes).
#[repr(C)]
#[derive(Default, Clone, Copy)]
pub struct UffdMsg {
    pub event: u8,
    reserved1: u8,
    reserved2: u16,
    reserved3: u32,
    pub flags: u64,
    pub address: u64,
    /// The faulting thread's id (`UFFD_FEATURE_THREAD_ID`).
    pub ptid: u32,
    reserved4: u32,
}

pub const PAGE: u64 = 4096;

/// A userfaultfd descriptor, non-blocking.
pub struct Uffd {
    fd: OwnedFd,
}

fn check(r: libc::c_int) -> io::Result<()> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

impl Uffd {
    /// Opens a userfaultfd (syscall, else /dev/userfaultfd) able to handle kernel-mode
    /// faults too (KVM touches guest RAM from the kernel), and negotiates the API with
    /// shmem MISSING, MINOR and WP support.
    pub fn open() -> io::Result<Uffd> {
        let flags = libc::O_CLOEXEC | libc::O_NONBLOCK;
        // SAFETY: plain syscall with integer flags; the result is checked.
        let mut raw = unsafe { libc::syscall(libc::SYS_userfaultfd, flags) } as libc::c_int;
        if raw < 0 {
            let first = io::Error::last_os_error();
            // SAFETY: opening a device node with a static NUL-terminated path.
            let dev =
                unsafe { libc::open(c"/dev/userfaultfd".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
            if dev < 0 {
                return Err(first);
            }
            // SAFETY: `dev` is ours; the ioctl takes the flags by value.
            raw = unsafe { libc::ioctl(dev, USERFAULTFD_IOC_NEW as _, flags) };
            let err = io::Error::last_os_error();
            // SAFETY: closing the descriptor we opened above.
            unsafe { libc::close(dev) };
            if raw < 0 {
                return Err(err);
            }
        }
        // SAFETY: `raw` is a fresh descriptor owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let uffd = Uffd { fd };
        let mut api = UffdioApi {
            api: UFFD_API,
            features: FEATURE_PAGEFAULT_FLAG_WP
                | FEATURE_THREAD_ID
                | FEATURE_MISSING_SHMEM
                | FEATURE_MINOR_SHMEM
                | FEATURE_WP_HUGETLBFS_SHMEM,
            ioctls: 0,
        };
        // SAFETY: UFFDIO_API reads and writes a struct of the declared size that we own.
        check(unsafe { libc::ioctl(uffd.raw(), UFFDIO_API as _, &mut api) })?;
        Ok(uffd)
    }

    /// The raw descriptor (for poll).
    pub fn raw(&self) -> libc::c_int {
        self.fd.as_raw_fd()
    }

    /// Registers `[start, start+len)` for MISSING | MINOR | WP faults.
    pub fn register(&self, start: u64, len: u64) -> io::Result<()> {
        let mut reg = UffdioRegister {
            range: UffdioRange { start, len },
            mode: REGISTER_MODE_MISSING | REGISTER_MODE_MINOR | REGISTER_MODE_WP,
            ioctls: 0,
        };
        // SAFETY: the ioctl reads/writes a struct we own; the range is validated by the kernel.
        check(unsafe { libc::ioctl(self.raw(), UFFDIO_REGISTER as _, &mut reg) })
    }

    /// Unregisters a range registered before.
    pub fn unregister(&self, start: u64, len: u64) -> io::Result<()> {
        let mut r = UffdioRange { start, len };
        // SAFETY: the ioctl reads a struct we own.
        check(unsafe { libc::ioctl(self.raw(), UFFDIO_UNREGISTER as _, &mut r) })
    }

    /// Reads pending events into `buf`; returns how many (0 if none are pending).
    pub fn read_events(&self, buf: &mut [UffdMsg]) -> io::Result<usize> {
        let size = std::mem::size_of_val(buf);
        // SAFETY: `buf` is a writable buffer of `size` bytes of plain-old-data structs.
        let n = unsafe { libc::read(self.raw(), buf.as_mut_ptr().cast(), size) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::WouldBlock {
                return Ok(0);
            }
            return Err(e);
        }
        Ok(n as usize / std::mem::size_of::<UffdMsg>())
    }

    /// Wakes threads blocked on faults in the page at `addr`.
    pub fn wake(&self, addr: u64) -> io::Result<()> {
        let mut r = UffdioRange {
            start: addr,
            len: PAGE,
        };
        // SAFETY: the ioctl reads a struct we own.
        check(unsafe { libc::ioctl(self.raw(), UFFDIO_WAKE as _, &mut r) })
    }

    /// Maps the page at `addr` from the page cache (MINOR resolution), write-protected
    /// if `wp`; wakes its waiters.
    pub fn continue_page(&self, addr: u64, wp: bool) -> io::Result<()> {
        let mut c = UffdioContinue {
            range: UffdioRange {
                start: addr,
                len: PAGE,
            },
            mode: if wp { CONTINUE_MODE_WP } else { 0 },
            mapped: 0,
        };
        // SAFETY: the ioctl reads/writes a struct we own.
        check(unsafe { libc::ioctl(self.raw(), UFFDIO_CONTINUE as _, &mut c) })
    }

    /// Fills the hole at `addr` with a copy of the page at `src`, write-protected if
    /// `wp`; wakes its waiters.
    pub fn copy_page(&self, addr: u64, src: *const u8, wp: bool) -> io::Result<()> {
        let mut c = UffdioCopy {
            dst: addr,
            src: src as u64,
            len: PAGE,
            mode: if wp { COPY_MODE_WP } else { 0 },
            copy: 0,
        };
        // SAFETY: the ioctl reads `PAGE` bytes at `src` (the caller's readable page) and a
        // struct we own.
        check(unsafe { libc::ioctl(self.raw(), UFFDIO_COPY as _, &mut c) })
    }

    /// Sets (`wp`) or clears write protection of the mapped page at `addr`; clearing wakes
    /// its waiters.
    pub fn write_protect(&self, addr: u64, wp: bool) -> io::Result<()> {
        let mut w = UffdioWriteprotect {
            range: UffdioRange {
                start: addr,
                len: PAGE,
            },
            mode: if wp { WRITEPROTECT_MODE_WP } else { 0 },
        };
        // SAFETY: the ioctl reads a struct we own.
        check(unsafe { libc::ioctl(self.raw(), UFFDIO_WRITEPROTECT as _, &mut w) })
    }
}

/// Drops the mapping of the page at `addr` (page cache contents survive for shmem).
pub fn zap(addr: u64) -> io::Result<()> {
    // SAFETY: the caller passes a page-aligned address inside a mapping it owns; dropping
    // the PTE of a MAP_SHARED memfd page loses no data.
    check(unsafe {
        libc::madvise(
            addr as *mut libc::c_void,
            PAGE as usize,
            libc::MADV_DONTNEED,
        )
    })
}

/// An eventfd used to stop the fault thread's poll (non-blocking, close-on-exec).
pub fn stop_eventfd() -> io::Result<EventFd> {
    EventFd::new(libc::EFD_CLOEXEC | libc::EFD_NONBLOCK)
}

/// Waits until `a` or `b` is readable (or the wait is interrupted); returns
/// (a readable, b readable).
pub fn poll2(a: libc::c_int, b: libc::c_int) -> io::Result<(bool, bool)> {
    let mut fds = [
        libc::pollfd {
            fd: a,
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: b,
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    // SAFETY: polls two pollfd structs we own.
    let r = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
    if r < 0 {
        let e = io::Error::last_os_error();
        if e.kind() == io::ErrorKind::Interrupted {
            return Ok((false, false));
        }
        return Err(e);
    }
    Ok((fds[0].revents != 0, fds[1].revents != 0))
}

/// One anonymous, read-only, zero-filled page: the source of UFFDIO_COPY for holes.
pub struct ZeroPage {
    ptr: *mut u8,
}

// SAFETY: a read-only mapping that nobody writes; sharing its address is harmless.
unsafe impl Send for ZeroPage {}
// SAFETY: as above.
unsafe impl Sync for ZeroPage {}

impl ZeroPage {
    /// Maps the page.
    pub fn new() -> io::Result<ZeroPage> {
        // SAFETY: a fresh private anonymous mapping; the result is checked.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                PAGE as usize,
                libc::PROT_READ,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_POPULATE,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(ZeroPage { ptr: p.cast() })
    }

    /// Its address.
    pub fn ptr(&self) -> *const u8 {
        self.ptr
    }
}

impl Drop for ZeroPage {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly the page mapped in `new`.
        unsafe { libc::munmap(self.ptr.cast(), PAGE as usize) };
    }
}
