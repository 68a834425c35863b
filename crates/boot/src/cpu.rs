//! The initial register state of a vCPU, independent of KVM.

/// A segment register as loaded at entry (maps 1:1 onto `kvm_segment`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Segment {
    /// Segment base address.
    pub base: u64,
    /// Segment limit in bytes (already scaled by the granularity bit).
    pub limit: u32,
    /// Selector.
    pub selector: u16,
    /// Descriptor type (4 bits).
    pub type_: u8,
    /// Present bit.
    pub present: bool,
    /// Descriptor privilege level.
    pub dpl: u8,
    /// Default operation size (1 = 32-bit).
    pub db: bool,
    /// Code/data (true) or system (false) descriptor.
    pub s: bool,
    /// 64-bit code segment.
    pub l: bool,
    /// Granularity (limit in 4 KiB units in the descriptor).
    pub g: bool,
    /// Available for software.
    pub avl: bool,
}

/// A descriptor table register (GDTR, IDTR).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Table {
    /// Linear base address.
    pub base: u64,
    /// Limit (size - 1).
    pub limit: u16,
}

/// Full initial state of the boot vCPU. General registers not listed are 0.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CpuBootState {
    /// Instruction pointer.
    pub rip: u64,
    /// RAX (the Multiboot magic for a Multiboot entry).
    pub rax: u64,
    /// Stack pointer.
    pub rsp: u64,
    /// RSI (the zero page for the Linux 64-bit entry).
    pub rsi: u64,
    /// RBX (the `hvm_start_info` for the PVH entry, the information structure for
    /// Multiboot).
    pub rbx: u64,
    /// Flags (bit 1 is always set).
    pub rflags: u64,
    /// CR0.
    pub cr0: u64,
    /// CR3 (page table root).
    pub cr3: u64,
    /// CR4.
    pub cr4: u64,
    /// EFER MSR.
    pub efer: u64,
    /// Code segment.
    pub cs: Segment,
    /// Loaded into DS, ES, FS, GS, SS.
    pub data: Segment,
    /// Task register.
    pub tr: Segment,
    /// LDT register.
    pub ldt: Segment,
    /// GDTR.
    pub gdt: Table,
    /// IDTR.
    pub idt: Table,
}

/// CR0.PE: protected mode.
pub const CR0_PE: u64 = 1 << 0;
/// CR0.MP: monitor coprocessor.
pub const CR0_MP: u64 = 1 << 1;
/// CR0.ET: extension type (always 1).
pub const CR0_ET: u64 = 1 << 4;
/// CR0.NE: native FPU error reporting.
pub const CR0_NE: u64 = 1 << 5;
/// CR0.WP: write protect in supervisor mode.
pub const CR0_WP: u64 = 1 << 16;
/// CR0.NW: not write-through.
pub const CR0_NW: u64 = 1 << 29;
/// CR0.CD: cache disable.
pub const CR0_CD: u64 = 1 << 30;
/// CR0.PG: paging.
pub const CR0_PG: u64 = 1 << 31;
/// CR4.PAE: physical address extension.
pub const CR4_PAE: u64 = 1 << 5;
/// EFER.LME: long mode enable.
pub const EFER_LME: u64 = 1 << 8;
/// EFER.LMA: long mode active.
pub const EFER_LMA: u64 = 1 << 10;
/// RFLAGS bit 1, reserved and always set.
pub const RFLAGS_RESERVED: u64 = 1 << 1;

/// Builds a GDT descriptor (8 bytes) from the access/flags word (`flags`: access byte in
/// bits 0..8, AVL/L/DB/G in bits 12..16), a base and a 20-bit limit.
pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    let base = base as u64;
    let limit = limit as u64;
    ((base & 0xff00_0000) << 32)
        | ((base & 0x00ff_ffff) << 16)
        | (limit & 0xffff)
        | ((limit & 0xf_0000) << 32)
        | ((flags as u64 & 0xf0ff) << 40)
}

/// Decodes a GDT descriptor into the segment register a load of `selector` produces.
pub fn segment_from_gdt_entry(entry: u64, selector: u16) -> Segment {
    let base = ((entry >> 16) & 0x00ff_ffff) | ((entry >> 32) & 0xff00_0000);
    let raw_limit = ((entry & 0xffff) | ((entry >> 32) & 0xf_0000)) as u32;
    let g = (entry >> 55) & 1 == 1;
    Segment {
        base,
        limit: if g {
            (raw_limit << 12) | 0xfff
        } else {
            raw_limit
        },
        selector,
        type_: ((entry >> 40) & 0xf) as u8,
        s: (entry >> 44) & 1 == 1,
        dpl: ((entry >> 45) & 3) as u8,
        present: (entry >> 47) & 1 == 1,
        avl: (entry >> 52) & 1 == 1,
        l: (entry >> 53) & 1 == 1,
        db: (entry >> 54) & 1 == 1,
        g,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flat_64bit_code_descriptor_round_trips() {
        let e = gdt_entry(0xa09b, 0, 0xfffff);
        assert_eq!(e, 0x00af_9b00_0000_ffff);
        let s = segment_from_gdt_entry(e, 0x10);
        assert_eq!(
            s,
            Segment {
                base: 0,
                limit: 0xffff_ffff,
                selector: 0x10,
                type_: 0xb,
                present: true,
                dpl: 0,
                db: false,
                s: true,
                l: true,
                g: true,
                avl: false,
            }
        );
    }

    #[test]
    fn byte_granular_tss_descriptor_keeps_base_and_limit() {
        let e = gdt_entry(0x008b, 0x1234_5678, 0x67);
        let s = segment_from_gdt_entry(e, 0x20);
        assert_eq!(s.base, 0x1234_5678);
        assert_eq!(s.limit, 0x67);
        assert_eq!(s.type_, 0xb);
        assert!(s.present && !s.s && !s.g && !s.db);
    }
}
