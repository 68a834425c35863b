//! Everything that puts a guest into memory before its first instruction.
//!
//! - [`topology`]: the VM's shape (vCPUs, RAM, NUMA nodes = dvmm nodes);
//! - [`acpi`]: RSDP, XSDT, FADT, FACS, DSDT, MADT, SRAT and SLIT;
//! - [`e820`]: the guest's physical memory map;
//! - [`loader`]: bzImage (64-bit boot protocol) and ELF/PVH kernels, initramfs,
//!   command line, boot GDT and identity page tables;
//! - [`multiboot`]: Multiboot v1 kernels (ELF or a.out-kludge images);
//! - [`cpu`]: the boot vCPU's initial register state, which the VMM turns into
//!   KVM registers.
//!
//! Nothing here talks to KVM.

#![forbid(unsafe_code)]

pub mod acpi;
pub mod cpu;
pub mod e820;
mod error;
pub mod guest_setup;
pub mod identify;
pub mod loader;
pub mod multiboot;
pub mod payload;
pub mod topology;

pub use cpu::{CpuBootState, Segment, Table};
pub use e820::E820Entry;
pub use error::BootError;
pub use loader::{ap_sipi_state, load, BootSpec, EntryKind, Loaded};
pub use topology::{NumaNode, Topology};
