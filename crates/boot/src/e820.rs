//! The guest's physical memory map (BIOS e820), shared by the Linux zero page and the
//! PVH start info.

use dvmm_layout::{ram_ranges, EBDA_START, KERNEL_LOAD_ADDR, PCI_ECAM_ADDR, PCI_ECAM_SIZE};

use crate::Topology;

/// Usable RAM.
pub const E820_RAM: u32 = 1;
/// Reserved, not to be used by the OS.
pub const E820_RESERVED: u32 = 2;
/// ACPI reclaimable.
pub const E820_ACPI: u32 = 3;

/// One e820 map entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct E820Entry {
    /// Guest-physical start.
    pub addr: u64,
    /// Length in bytes.
    pub size: u64,
    /// [`E820_RAM`], [`E820_RESERVED`] or [`E820_ACPI`].
    pub kind: u32,
}

/// `[0, EBDA_START)` RAM; `[EBDA_START, 1 MiB)` reserved (holds the ACPI tables);
/// `[1 MiB, low end)` RAM; the PCI ECAM window reserved (OSes check that it is before
/// they use it); high RAM above 4 GiB.
pub fn map(topology: &Topology) -> Vec<E820Entry> {
    let mut out = vec![
        E820Entry {
            addr: 0,
            size: EBDA_START,
            kind: E820_RAM,
        },
        E820Entry {
            addr: EBDA_START,
            size: KERNEL_LOAD_ADDR - EBDA_START,
            kind: E820_RESERVED,
        },
    ];
    for r in ram_ranges(topology.memory) {
        let start = r.start.max(KERNEL_LOAD_ADDR);
        if r.end() > start {
            out.push(E820Entry {
                addr: start,
                size: r.end() - start,
                kind: E820_RAM,
            });
        }
    }
    out.push(E820Entry {
        addr: PCI_ECAM_ADDR,
        size: PCI_ECAM_SIZE,
        kind: E820_RESERVED,
    });
    out.sort_by_key(|e| e.addr);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use dvmm_layout::{HIGH_RAM_START, MMIO_HOLE_START};

    #[test]
    fn small_vm_has_three_entries_and_the_ecam_window() {
        let t = Topology::uniform(1, 256 << 20, 1).unwrap();
        assert_eq!(
            map(&t),
            vec![
                E820Entry {
                    addr: 0,
                    size: EBDA_START,
                    kind: E820_RAM
                },
                E820Entry {
                    addr: EBDA_START,
                    size: 0x10_0000 - EBDA_START,
                    kind: E820_RESERVED
                },
                E820Entry {
                    addr: 0x10_0000,
                    size: (256 << 20) - 0x10_0000,
                    kind: E820_RAM
                },
                E820Entry {
                    addr: PCI_ECAM_ADDR,
                    size: PCI_ECAM_SIZE,
                    kind: E820_RESERVED
                },
            ]
        );
    }

    #[test]
    fn large_vm_has_high_ram_above_4g() {
        let t = Topology::uniform(2, 6 << 30, 2).unwrap();
        let m = map(&t);
        assert_eq!(m.len(), 5);
        assert_eq!(m[2].addr + m[2].size, MMIO_HOLE_START);
        assert_eq!(m[3].addr, PCI_ECAM_ADDR);
        assert_eq!(
            m[4],
            E820Entry {
                addr: HIGH_RAM_START,
                size: (6 << 30) - MMIO_HOLE_START,
                kind: E820_RAM
            }
        );
        let ram: u64 = m
            .iter()
            .filter(|e| e.kind == E820_RAM)
            .map(|e| e.size)
            .sum();
        assert_eq!(ram, (6 << 30) - (0x10_0000 - EBDA_START));
    }
}
