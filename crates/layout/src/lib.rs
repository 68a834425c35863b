//! The guest machine's fixed map: where RAM, MMIO, boot data and legacy ports live.
//!
//! Every other crate takes these numbers from here, so that the ACPI tables the boot
//! code writes, the devices the VMM attaches and the test guest's expectations agree.
//! Nothing here depends on KVM or on the host.

#![forbid(unsafe_code)]

pub mod cpu_features;

/// Size of a guest page.
pub const PAGE_SIZE: u64 = 4096;

// ---------------------------------------------------------------------------
// Physical address map
// ---------------------------------------------------------------------------

/// Start of the 32-bit MMIO hole; RAM beyond this size continues at [`HIGH_RAM_START`].
pub const MMIO_HOLE_START: u64 = 0xC000_0000;
/// First address above the 32-bit MMIO hole.
pub const HIGH_RAM_START: u64 = 0x1_0000_0000;
/// A guest-physical page in the MMIO hole that no device uses: where the VMM briefly
/// adds and removes a memory slot to make KVM drop its shadow page tables.
pub const SCRATCH_SLOT_ADDR: u64 = 0xFEB0_0000;
/// The IOAPIC's MMIO register window (4 KiB).
pub const IOAPIC_ADDR: u64 = 0xFEC0_0000;
/// The local APIC's xAPIC MMIO page (per vCPU, same address on each).
pub const LAPIC_ADDR: u64 = 0xFEE0_0000;
/// Size of the LAPIC and IOAPIC MMIO windows.
pub const APIC_MMIO_SIZE: u64 = 0x1000;

/// Start of the window where PCI devices' memory BARs are placed (32-bit, non-prefetchable).
pub const PCI_MMIO_START: u64 = 0xC000_0000;
/// Size of the PCI memory BAR window.
pub const PCI_MMIO_SIZE: u64 = 0x2000_0000;
/// PCI Express enhanced configuration space (ECAM) for bus 0, as the MCFG table says.
pub const PCI_ECAM_ADDR: u64 = 0xE000_0000;
/// Size of the ECAM window: one bus (32 devices x 8 functions x 4 KiB).
pub const PCI_ECAM_SIZE: u64 = 1 << 20;
/// PCI configuration mechanism #1: the 32-bit address register (0xCF8; byte 0xCF9 is
/// the reset register).
pub const PCI_CONFIG_ADDRESS_PORT: u16 = 0xCF8;
/// PCI configuration mechanism #1: the data window (0xCFC..=0xCFF).
pub const PCI_CONFIG_DATA_PORT: u16 = 0xCFC;
/// Device numbers on PCI bus 0 (device 0 is the host bridge).
pub const PCI_DEVICES: usize = 32;

/// GDT used at boot entry (both 64-bit Linux and 32-bit PVH entry).
pub const BOOT_GDT_ADDR: u64 = 0x500;
/// PVH `hvm_start_info` structure, followed by its memory map entries.
pub const PVH_INFO_ADDR: u64 = 0x6000;
/// Linux `boot_params` ("zero page").
pub const ZERO_PAGE_ADDR: u64 = 0x7000;
/// Top of the boot stack handed to a 64-bit Linux entry (grows down).
pub const BOOT_STACK_TOP: u64 = 0x8ff0;
/// Identity page tables for the 64-bit entry: PML4, then PDPT, then four PDs (0..4 GiB).
pub const PML4_ADDR: u64 = 0x9000;
/// Page-directory-pointer table of the boot identity map.
pub const PDPT_ADDR: u64 = 0xA000;
/// First of four page directories (2 MiB pages) of the boot identity map.
pub const PD_ADDR: u64 = 0xB000;
/// Kernel command line (NUL-terminated).
pub const CMDLINE_ADDR: u64 = 0x20000;
/// Largest command line accepted, including the terminating NUL.
pub const CMDLINE_MAX: usize = 0x10000;
/// Start of the extended BIOS data area; RAM below it is usable, above it reserved.
pub const EBDA_START: u64 = 0x9_FC00;
/// ACPI tables live here (the RSDP first, in the BIOS area where OSes scan for it).
pub const ACPI_TABLES_ADDR: u64 = 0xE_0000;
/// End of the ACPI table area.
pub const ACPI_TABLES_END: u64 = 0x10_0000;
/// Where a kernel's protected-mode part is loaded (1 MiB).
pub const KERNEL_LOAD_ADDR: u64 = 0x10_0000;
/// Lowest guest RAM size we accept.
pub const MIN_MEMORY: u64 = 16 << 20;

// ---------------------------------------------------------------------------
// Legacy I/O ports and their interrupt lines (ISA IRQ numbers)
// ---------------------------------------------------------------------------

/// 8259 PIC, master command/data ports.
pub const PIC_MASTER_PORT: u16 = 0x20;
/// 8259 PIC, slave command/data ports.
pub const PIC_SLAVE_PORT: u16 = 0xA0;
/// 8254 PIT channel 0..2 data ports and the mode/command port (0x40..=0x43).
pub const PIT_PORT: u16 = 0x40;
/// PIT channel 0 interrupt, as an ISA IRQ (routed to IOAPIC pin 2 by an override).
pub const PIT_IRQ: u32 = 0;
/// IOAPIC pin (GSI) the PIT drives, as the MADT interrupt source override says.
pub const PIT_GSI: u32 = 2;
/// System control port B: PIT channel 2 gate and output, speaker.
pub const PORT_61: u16 = 0x61;
/// i8042 keyboard controller data port.
pub const I8042_DATA_PORT: u16 = 0x60;
/// i8042 keyboard controller command/status port (0xFE = CPU reset).
pub const I8042_CMD_PORT: u16 = 0x64;
/// CMOS RTC index / data ports (0x70, 0x71).
pub const RTC_PORT: u16 = 0x70;
/// CMOS index of the RTC's century byte (the FADT's CENTURY field points here).
pub const RTC_CENTURY_INDEX: u8 = 0x32;
/// RTC interrupt line.
pub const RTC_IRQ: u32 = 8;
/// POST code port: writes are ignored (Linux uses it for I/O delays).
pub const POST_PORT: u16 = 0x80;
/// First serial port (console).
pub const COM1_PORT: u16 = 0x3F8;
/// COM1 interrupt line (IOAPIC pin 4).
pub const COM1_IRQ: u32 = 4;
/// pvpanic device: a guest write of bit 0 reports a guest panic.
pub const PVPANIC_PORT: u16 = 0x505;
/// dvmm's DMA test engine (16 bytes of 32-bit registers; `dvmm_devices::dma_test`).
pub const DMA_TEST_PORT: u16 = 0x520;
/// ACPI PM1a event block (status u16 at +0, enable u16 at +2).
pub const PM1A_EVT_PORT: u16 = 0x600;
/// ACPI PM1a control block (u16): SLP_TYP in bits 10..12, SLP_EN bit 13.
pub const PM1A_CNT_PORT: u16 = 0x604;
/// ACPI PM timer (u32 read, 24-bit counter at [`PM_TIMER_HZ`]).
pub const PM_TMR_PORT: u16 = 0x608;
/// Frequency of the ACPI PM timer.
pub const PM_TIMER_HZ: u64 = 3_579_545;
/// ACPI SCI interrupt (level, active high).
pub const SCI_IRQ: u32 = 9;
/// The SLP_TYP value our DSDT gives for S5 (soft off) in its `_S5_` package.
pub const S5_SLP_TYP: u16 = 5;
/// Reset control port, named as the FADT RESET_REG; writing [`RESET_VALUE`] resets.
pub const RESET_PORT: u16 = 0xCF9;
/// Value the FADT tells the guest to write to [`RESET_PORT`] to reset.
pub const RESET_VALUE: u8 = 0x06;

// ---------------------------------------------------------------------------
// Interrupt controllers and CPU identification
// ---------------------------------------------------------------------------

/// IOAPIC id as the MADT reports it: 0, as QEMU, Firecracker and Cloud Hypervisor give
/// it (the 82093AA's ID register has 4 bits; sharing a number with a LAPIC does not
/// matter to xAPIC or x2APIC systems).
pub const IOAPIC_ID: u8 = 0;
/// Number of IOAPIC pins (GSIs 0..23).
pub const IOAPIC_PINS: usize = 24;
/// Most vCPUs one VM may have: APIC ids 0..=253. Ids above 254 need x2APIC with
/// interrupt remapping for IOAPIC/MSI delivery, which we do not provide; 0xFE is the
/// IOAPIC and 0xFF is the xAPIC broadcast id.
pub const MAX_VCPUS: u32 = 254;
/// Frequency of the LAPIC timer's input clock before its divider (1 tick = 1 ns).
pub const LAPIC_TIMER_HZ: u64 = 1_000_000_000;
/// CPUID leaf where dvmm reports timing: EAX = TSC kHz, EBX = LAPIC timer kHz.
/// (The "generic timing" hypervisor leaf also used by VMware and QEMU.)
pub const CPUID_TIMING_LEAF: u32 = 0x4000_0010;

/// One contiguous range of guest RAM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RamRange {
    /// Guest physical start address.
    pub start: u64,
    /// Length in bytes.
    pub len: u64,
}

impl RamRange {
    /// One past the last byte.
    pub fn end(&self) -> u64 {
        self.start + self.len
    }
}

/// The guest RAM ranges for `memory` bytes of RAM: below the MMIO hole, and the rest
/// above 4 GiB.
pub fn ram_ranges(memory: u64) -> Vec<RamRange> {
    let low = memory.min(MMIO_HOLE_START);
    let mut ranges = vec![RamRange { start: 0, len: low }];
    if memory > low {
        ranges.push(RamRange {
            start: HIGH_RAM_START,
            len: memory - low,
        });
    }
    ranges
}

/// Translates an offset into guest RAM (as if RAM were contiguous) into its guest
/// physical address.
pub fn ram_offset_to_gpa(offset: u64) -> u64 {
    if offset < MMIO_HOLE_START {
        offset
    } else {
        offset - MMIO_HOLE_START + HIGH_RAM_START
    }
}

/// Translates a guest physical address into an offset into guest RAM, or `None` when
/// it lies in the MMIO hole or beyond `memory` bytes.
pub fn gpa_to_ram_offset(gpa: u64, memory: u64) -> Option<u64> {
    let offset = if gpa < MMIO_HOLE_START {
        gpa
    } else if gpa >= HIGH_RAM_START {
        gpa - HIGH_RAM_START + MMIO_HOLE_START
    } else {
        return None;
    };
    (offset < memory).then_some(offset)
}

/// Port I/O or memory-mapped I/O: the two spaces a device access is in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IoSpace {
    /// x86 I/O ports.
    Pio,
    /// Guest-physical MMIO.
    Mmio,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_memory_is_one_low_range() {
        assert_eq!(
            ram_ranges(256 << 20),
            vec![RamRange {
                start: 0,
                len: 256 << 20
            }]
        );
    }

    #[test]
    fn large_memory_splits_around_the_hole() {
        let r = ram_ranges(4 << 30);
        assert_eq!(r.len(), 2);
        assert_eq!(r[0].end(), MMIO_HOLE_START);
        assert_eq!(r[1].start, HIGH_RAM_START);
        assert_eq!(r[0].len + r[1].len, 4 << 30);
    }

    #[test]
    fn offsets_and_addresses_round_trip() {
        let mem = 5 << 30;
        for off in [0, 0x1000, MMIO_HOLE_START - 1, MMIO_HOLE_START, mem - 1] {
            let gpa = ram_offset_to_gpa(off);
            assert_eq!(gpa_to_ram_offset(gpa, mem), Some(off));
        }
        assert_eq!(gpa_to_ram_offset(LAPIC_ADDR, mem), None);
        assert_eq!(gpa_to_ram_offset(ram_offset_to_gpa(mem), mem), None);
    }
}
