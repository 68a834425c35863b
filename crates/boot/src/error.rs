//! Errors of the boot crate.

use std::path::PathBuf;

/// Why a guest could not be set up for boot.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// The kernel image could not be opened or read.
    #[error("cannot read kernel image {}: {source}", path.display())]
    KernelOpen {
        /// The kernel path given by the user.
        path: PathBuf,
        /// The underlying I/O error.
        source: std::io::Error,
    },
    /// The file is neither a bzImage nor an ELF kernel, or it is damaged.
    #[error(
        "{} is not a bootable x86-64 Linux kernel ({reason}); pass a bzImage (arch/x86/boot/bzImage) \
         or a vmlinux ELF built with CONFIG_PVH=y",
        path.display()
    )]
    NotAKernel {
        /// The kernel path given by the user.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The bzImage's boot protocol is too old for the 64-bit entry.
    #[error(
        "kernel uses boot protocol {}.{:02}, but dvmm needs 2.12 or newer (Linux 3.8+) for the \
         64-bit entry; use a newer kernel",
        version >> 8,
        version & 0xff
    )]
    UnsupportedBootProtocol {
        /// The protocol version from the setup header (e.g. 0x020f).
        version: u16,
    },
    /// The bzImage has no 64-bit entry point (XLF_KERNEL_64 clear).
    #[error(
        "{} has no 64-bit entry point (XLF_KERNEL_64 not set): it is a 32-bit kernel; build an \
         x86_64 kernel",
        path.display()
    )]
    NoKernel64Entry {
        /// The kernel path given by the user.
        path: PathBuf,
    },
    /// An ELF kernel without a PVH entry note.
    #[error(
        "{} is an ELF kernel without a PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY); rebuild it with \
         CONFIG_PVH=y or pass the bzImage instead",
        path.display()
    )]
    ElfWithoutPvh {
        /// The kernel path given by the user.
        path: PathBuf,
    },
    /// The kernel does not fit into guest RAM below the MMIO hole.
    #[error(
        "kernel {} needs {size} bytes at {addr:#x} but only {available} bytes of low RAM are \
         there; give the guest more memory",
        path.display()
    )]
    KernelTooLarge {
        /// The kernel path given by the user.
        path: PathBuf,
        /// Guest-physical address the kernel (or its segment) is loaded at.
        addr: u64,
        /// Bytes the kernel needs from `addr` on.
        size: u64,
        /// Bytes of RAM available from `addr` on.
        available: u64,
    },
    /// The initramfs could not be opened or read.
    #[error("cannot read initramfs {}: {source}", path.display())]
    InitramfsOpen {
        /// The initramfs path given by the user.
        path: PathBuf,
        /// The underlying I/O error.
        source: std::io::Error,
    },
    /// The initramfs does not fit between the kernel and the highest address it may use.
    #[error(
        "initramfs of {size} bytes does not fit: only {available} bytes are free between the \
         kernel and the highest address the kernel accepts; give the guest more memory or use a \
         smaller initramfs"
    )]
    InitramfsTooLarge {
        /// Size of the initramfs file.
        size: u64,
        /// Bytes available for it.
        available: u64,
    },
    /// The kernel command line is too long.
    #[error("kernel command line is {len} bytes long, the limit is {max}; shorten it")]
    CmdlineTooLong {
        /// Length of the given command line in bytes.
        len: usize,
        /// Longest command line accepted (without the terminating NUL).
        max: usize,
    },
    /// The kernel command line contains a NUL byte.
    #[error("kernel command line contains a NUL byte at offset {offset}; remove it")]
    CmdlineNul {
        /// Byte offset of the first NUL.
        offset: usize,
    },
    /// The requested VM shape is impossible.
    #[error("invalid VM topology: {0}")]
    Topology(String),
    /// Guest memory is missing where boot data must go.
    #[error("guest memory: {0}")]
    GuestMemory(String),
    /// Writing boot data into guest memory failed.
    #[error("guest memory: cannot write {what} at {addr:#x}: {source}")]
    GuestWrite {
        /// What was being written.
        what: String,
        /// Where.
        addr: u64,
        /// Why it failed.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The ACPI tables do not fit into their reserved area.
    #[error(
        "ACPI tables need {size} bytes, more than the {} bytes reserved for them; use fewer \
         vCPUs or NUMA nodes",
        dvmm_layout::ACPI_TABLES_END - dvmm_layout::ACPI_TABLES_ADDR
    )]
    AcpiTooLarge {
        /// Bytes the tables need.
        size: u64,
    },
}
