//! What every kernel format's loader shares (the bzImage/PVH loader in
//! [`crate::loader`] and the Multiboot one in [`crate::multiboot`]): the request
//! ([`BootSpec`]) and its result ([`Loaded`]), the boot GDT's layout, and the checks and
//! writes of the command line and of kernel segments. The loaders depend on this module,
//! never on each other's internals.

use std::path::Path;

use dvmm_layout::{RamRange, BOOT_GDT_ADDR, CMDLINE_ADDR, KERNEL_LOAD_ADDR, MMIO_HOLE_START};
use linux_loader::cmdline::Cmdline;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::cpu::{gdt_entry, CpuBootState, Table};
use crate::{BootError, Topology};

/// `__BOOT_CS`: the code segment selector at entry.
pub const BOOT_CS: u16 = 0x10;
/// `__BOOT_DS`: the data segment selector at entry.
pub const BOOT_DS: u16 = 0x18;
/// The boot TSS selector.
pub const BOOT_TSS: u16 = 0x20;
/// Number of 8-byte slots in the boot GDT (the last one is the TSS descriptor's
/// upper half in long mode).
const GDT_SLOTS: usize = 6;

pub(crate) const GDT_CODE32: u64 = gdt_entry(0xC09B, 0, 0xFFFFF);
pub(crate) const GDT_DATA: u64 = gdt_entry(0xC093, 0, 0xFFFFF);
pub(crate) const GDT_TSS: u64 = gdt_entry(0x008B, 0, 0x67);

/// What to boot.
#[derive(Clone, Copy, Debug)]
pub struct BootSpec<'a> {
    /// A bzImage, or an ELF kernel with a PVH entry note.
    pub kernel: &'a Path,
    /// Optional initramfs.
    pub initramfs: Option<&'a Path>,
    /// Kernel command line (without NUL).
    pub cmdline: &'a str,
    /// The VM's shape (RAM size, vCPUs, NUMA nodes).
    pub topology: &'a Topology,
    /// For a bzImage: unpack its compressed vmlinux here and enter that through its PVH
    /// note, instead of running the kernel's own decompressor. For hosts that emulate
    /// guest kernel code, where that decompressor takes tens of minutes. Falls back to
    /// the normal 64-bit entry when the payload cannot be unpacked or has no PVH note.
    pub extract_payload: bool,
}

/// Which entry protocol was used (for logging).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EntryKind {
    /// Linux x86 boot protocol, 64-bit entry at load address + 0x200.
    LinuxBzImage64,
    /// Xen PVH entry (32-bit protected mode, paging off).
    Pvh,
    /// Multiboot v1 (32-bit protected mode, paging off, EAX = 0x2BADB002).
    Multiboot,
}

/// The result of loading: the boot vCPU's state and where things went.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Loaded {
    /// The entry protocol used.
    pub entry: EntryKind,
    /// The boot vCPU's initial state.
    pub cpu: CpuBootState,
    /// One past the last byte of the loaded kernel image.
    pub kernel_end: u64,
    /// Where the initramfs was put, if any.
    pub initramfs: Option<RamRange>,
    /// Guest-physical address of the ACPI RSDP.
    pub rsdp: u64,
}

pub(crate) fn low_ram_end(topology: &Topology) -> u64 {
    topology.memory.min(MMIO_HOLE_START)
}

pub(crate) fn not_a_kernel(path: &Path, reason: impl Into<String>) -> BootError {
    BootError::NotAKernel {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

pub(crate) fn mem_err(
    what: &str,
    addr: u64,
    e: impl std::error::Error + Send + Sync + 'static,
) -> BootError {
    BootError::GuestWrite {
        what: what.to_string(),
        addr,
        source: Box::new(e),
    }
}

pub(crate) fn check_cmdline(cmdline: &str, max: usize) -> Result<(), BootError> {
    if cmdline.len() > max {
        return Err(BootError::CmdlineTooLong {
            len: cmdline.len(),
            max,
        });
    }
    Ok(())
}

/// Writes `cmdline` (already checked: no NUL, within the kernel's limit) at
/// `CMDLINE_ADDR`, NUL-terminated.
pub(crate) fn write_cmdline(mem: &GuestMemoryMmap, cmdline: &str) -> Result<(), BootError> {
    let cmdline = Cmdline::try_from(cmdline, cmdline.len() + 1)
        .map_err(|e| mem_err("the command line", CMDLINE_ADDR, e))?;
    linux_loader::loader::load_cmdline(mem, GuestAddress(CMDLINE_ADDR), &cmdline)
        .map_err(|e| mem_err("the command line", CMDLINE_ADDR, e))
}

/// Writes the boot GDT with `code` at `BOOT_CS`; returns the GDTR value.
pub(crate) fn write_gdt(mem: &GuestMemoryMmap, code: u64) -> Result<Table, BootError> {
    let gdt: [u64; GDT_SLOTS] = [0, 0, code, GDT_DATA, GDT_TSS, 0];
    let bytes: Vec<u8> = gdt.iter().flat_map(|e| e.to_le_bytes()).collect();
    mem.write_slice(&bytes, GuestAddress(BOOT_GDT_ADDR))
        .map_err(|e| mem_err("the boot GDT", BOOT_GDT_ADDR, e))?;
    Ok(Table {
        base: BOOT_GDT_ADDR,
        limit: (bytes.len() - 1) as u16,
    })
}

/// A kernel segment of `len` bytes at `addr` must lie in `[1 MiB, low_end)`: below 1
/// MiB are dvmm's boot data, above the low RAM's end the MMIO hole.
pub(crate) fn check_placement(
    path: &Path,
    addr: u64,
    len: u64,
    low_end: u64,
) -> Result<(), BootError> {
    if addr < KERNEL_LOAD_ADDR {
        return Err(not_a_kernel(
            path,
            format!("segment at {addr:#x} lies below 1 MiB, where dvmm keeps its boot data"),
        ));
    }
    if addr.checked_add(len).is_none_or(|e| e > low_end) {
        return Err(BootError::KernelTooLarge {
            path: path.to_path_buf(),
            addr,
            size: len,
            available: low_end.saturating_sub(addr),
        });
    }
    Ok(())
}
