//! The VM's shape: how many vCPUs, how much RAM, and how both are split over the
//! NUMA nodes (one NUMA proximity domain per dvmm node).

use std::ops::Range;

use dvmm_layout::{ram_offset_to_gpa, RamRange, MAX_VCPUS, MIN_MEMORY, MMIO_HOLE_START, PAGE_SIZE};

use crate::BootError;

/// Granularity of the RAM split between nodes.
const NODE_RAM_ALIGN: u64 = 2 << 20;

/// One NUMA proximity domain = one dvmm node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NumaNode {
    /// The vCPUs (= APIC ids) this node runs.
    pub vcpus: Range<u32>,
    /// The guest-physical RAM ranges this node is home of.
    pub ram: Vec<RamRange>,
}

/// The VM's shape. vCPU i has APIC id i.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Topology {
    /// Number of vCPUs.
    pub vcpus: u32,
    /// Guest RAM in bytes.
    pub memory: u64,
    /// The NUMA nodes, proximity domain = index.
    pub nodes: Vec<NumaNode>,
}

impl Topology {
    /// `nodes` nodes, vCPUs in contiguous blocks (as even as possible, earlier nodes get
    /// the extra), RAM in contiguous blocks of the RAM offset space (2 MiB aligned split,
    /// last node takes the rest), converted to guest-physical ranges (a block crossing the
    /// MMIO hole becomes two ranges).
    pub fn uniform(vcpus: u32, memory: u64, nodes: u32) -> Result<Topology, BootError> {
        let err = |m: String| Err(BootError::Topology(m));
        if vcpus == 0 {
            return err("the VM needs at least one vCPU".into());
        }
        if vcpus > MAX_VCPUS {
            return err(format!(
                "{vcpus} vCPUs requested, at most {MAX_VCPUS} are supported"
            ));
        }
        if nodes == 0 {
            return err("the VM needs at least one node".into());
        }
        if nodes > vcpus {
            return err(format!(
                "{nodes} nodes but only {vcpus} vCPUs: every node needs at least one vCPU"
            ));
        }
        if memory < MIN_MEMORY {
            return err(format!(
                "guest memory of {memory} bytes is too small: at least {} MiB are needed",
                MIN_MEMORY >> 20
            ));
        }
        if !memory.is_multiple_of(PAGE_SIZE) {
            return err(format!(
                "RAM size {memory} is not a multiple of the page size {PAGE_SIZE}"
            ));
        }
        // Keep every guest-physical address representable.
        if memory > u64::MAX - ram_offset_to_gpa(MMIO_HOLE_START) {
            return err(format!("RAM size {memory} is too large"));
        }
        let per_node = memory / u64::from(nodes) / NODE_RAM_ALIGN * NODE_RAM_ALIGN;
        if per_node < NODE_RAM_ALIGN {
            return err(format!(
                "{memory} bytes of RAM over {nodes} nodes leaves less than 2 MiB per node"
            ));
        }

        let base = vcpus / nodes;
        let extra = vcpus % nodes;
        let mut next_vcpu = 0;
        let mut next_off = 0;
        let mut out = Vec::with_capacity(nodes as usize);
        for i in 0..nodes {
            let n = base + u32::from(i < extra);
            let end_off = if i + 1 == nodes {
                memory
            } else {
                next_off + per_node
            };
            out.push(NumaNode {
                vcpus: next_vcpu..next_vcpu + n,
                ram: offsets_to_ranges(next_off, end_off),
            });
            next_vcpu += n;
            next_off = end_off;
        }
        Ok(Topology {
            vcpus,
            memory,
            nodes: out,
        })
    }

    /// Explicit per-node shares: `(vcpus, memory)` for each node, in node order. The
    /// same checks as [`Topology::uniform`]; each node's memory must be a multiple of
    /// 2 MiB.
    pub fn from_nodes(shares: &[(u32, u64)]) -> Result<Topology, BootError> {
        let vcpus: u32 = shares.iter().map(|s| s.0).sum();
        let memory: u64 = shares.iter().map(|s| s.1).sum();
        // Validate totals with the uniform rules, then lay out the given shares.
        let mut t = Topology::uniform(vcpus, memory, shares.len().max(1) as u32)?;
        let mut next_vcpu = 0;
        let mut next_off = 0;
        for (node, (n, mem)) in t.nodes.iter_mut().zip(shares) {
            if *n == 0 || *mem < NODE_RAM_ALIGN || mem % NODE_RAM_ALIGN != 0 {
                return Err(BootError::Topology(format!(
                    "every node needs at least one vCPU and a multiple of 2 MiB of RAM (got {n} vCPUs, {mem} bytes)"
                )));
            }
            node.vcpus = next_vcpu..next_vcpu + n;
            node.ram = offsets_to_ranges(next_off, next_off + mem);
            next_vcpu += n;
            next_off += mem;
        }
        Ok(t)
    }

    /// Node that owns vCPU `vcpu`.
    pub fn node_of_vcpu(&self, vcpu: u32) -> Option<usize> {
        self.nodes.iter().position(|n| n.vcpus.contains(&vcpu))
    }

    /// Node whose RAM holds `gpa`.
    pub fn node_of_gpa(&self, gpa: u64) -> Option<usize> {
        self.nodes.iter().position(|n| {
            n.ram
                .iter()
                .any(|r| gpa >= r.start && gpa - r.start < r.len)
        })
    }
}

/// Guest-physical ranges of the RAM offsets `[start, end)`.
fn offsets_to_ranges(start: u64, end: u64) -> Vec<RamRange> {
    let mut out = Vec::with_capacity(2);
    if start < MMIO_HOLE_START {
        let low_end = end.min(MMIO_HOLE_START);
        out.push(RamRange {
            start,
            len: low_end - start,
        });
    }
    if end > MMIO_HOLE_START {
        let s = start.max(MMIO_HOLE_START);
        out.push(RamRange {
            start: ram_offset_to_gpa(s),
            len: end - s,
        });
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn explicit_shares() {
        let t = super::Topology::from_nodes(&[(2, 64 << 20), (1, 32 << 20)]).unwrap();
        assert_eq!(t.vcpus, 3);
        assert_eq!(t.memory, 96 << 20);
        assert_eq!(t.nodes[1].vcpus, 2..3);
        assert_eq!(t.nodes[1].ram[0].start, 64 << 20);
        assert!(super::Topology::from_nodes(&[(1, 64 << 20), (0, 32 << 20)]).is_err());
        assert!(super::Topology::from_nodes(&[(1, 64 << 20), (1, 3 << 20)]).is_err());
    }

    use super::*;
    use dvmm_layout::HIGH_RAM_START;

    const MIB: u64 = 1 << 20;
    const GIB: u64 = 1 << 30;

    #[test]
    fn three_vcpus_over_two_nodes() {
        let t = Topology::uniform(3, 256 * MIB, 2).unwrap();
        assert_eq!(t.nodes.len(), 2);
        assert_eq!(t.nodes[0].vcpus, 0..2);
        assert_eq!(t.nodes[1].vcpus, 2..3);
        assert_eq!(
            t.nodes[0].ram,
            vec![RamRange {
                start: 0,
                len: 128 * MIB
            }]
        );
        assert_eq!(
            t.nodes[1].ram,
            vec![RamRange {
                start: 128 * MIB,
                len: 128 * MIB
            }]
        );
        assert_eq!(t.node_of_vcpu(1), Some(0));
        assert_eq!(t.node_of_vcpu(2), Some(1));
        assert_eq!(t.node_of_vcpu(3), None);
    }

    #[test]
    fn four_gib_over_two_nodes_crosses_the_hole() {
        let t = Topology::uniform(4, 4 * GIB, 2).unwrap();
        assert_eq!(
            t.nodes[0].ram,
            vec![RamRange {
                start: 0,
                len: 2 * GIB
            }]
        );
        assert_eq!(
            t.nodes[1].ram,
            vec![
                RamRange {
                    start: 2 * GIB,
                    len: MMIO_HOLE_START - 2 * GIB
                },
                RamRange {
                    start: HIGH_RAM_START,
                    len: 4 * GIB - MMIO_HOLE_START
                },
            ]
        );
        assert_eq!(t.node_of_gpa(0), Some(0));
        assert_eq!(t.node_of_gpa(2 * GIB - 1), Some(0));
        assert_eq!(t.node_of_gpa(2 * GIB), Some(1));
        assert_eq!(t.node_of_gpa(MMIO_HOLE_START), None);
        assert_eq!(t.node_of_gpa(HIGH_RAM_START), Some(1));
        assert_eq!(t.node_of_gpa(HIGH_RAM_START + GIB - 1), Some(1));
        assert_eq!(t.node_of_gpa(HIGH_RAM_START + GIB), None);
    }

    #[test]
    fn uneven_memory_split_is_2mib_aligned_and_last_takes_rest() {
        let mem = 100 * MIB + 4096 * 3;
        let t = Topology::uniform(3, mem, 3).unwrap();
        // 100 MiB / 3 = 33.3 MiB -> 32 MiB blocks.
        assert_eq!(t.nodes[0].ram[0].len, 32 * MIB);
        assert_eq!(t.nodes[1].ram[0].start, 32 * MIB);
        assert_eq!(t.nodes[2].ram[0].start, 64 * MIB);
        assert_eq!(t.nodes[2].ram[0].end(), mem);
        let total: u64 = t.nodes.iter().flat_map(|n| &n.ram).map(|r| r.len).sum();
        assert_eq!(total, mem);
    }

    #[test]
    fn vcpus_spread_with_extra_on_earlier_nodes() {
        let t = Topology::uniform(11, 64 * MIB, 4).unwrap();
        let sizes: Vec<u32> = t.nodes.iter().map(|n| n.vcpus.len() as u32).collect();
        assert_eq!(sizes, vec![3, 3, 3, 2]);
        assert_eq!(t.nodes[3].vcpus, 9..11);
    }

    #[test]
    fn rejects_bad_shapes() {
        for (v, m, n) in [
            (0, 64 * MIB, 1),
            (MAX_VCPUS + 1, 64 * MIB, 1),
            (2, 64 * MIB, 0),
            (2, 64 * MIB, 3),
            (1, MIN_MEMORY - 4096, 1),
            (1, 64 * MIB + 1, 1),
            (16, 16 * MIB, 16),
            (1, u64::MAX - 4095, 1),
        ] {
            assert!(
                matches!(Topology::uniform(v, m, n), Err(BootError::Topology(_))),
                "{v} {m} {n}"
            );
        }
        assert!(Topology::uniform(MAX_VCPUS, MIN_MEMORY, 8).is_ok());
    }
}
