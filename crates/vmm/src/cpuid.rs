//! The CPUID table each vCPU gets.
//!
//! Starts from what KVM supports and adjusts it to the machine dvmm really emulates:
//! a userspace LAPIC with x2APIC and TSC-deadline, per-vCPU APIC ids and topology,
//! KVM paravirt features that need an in-kernel LAPIC removed, and the timing leaf.

use dvmm_layout::cpu_features::{CpuFeatures, CpuModel, Reg, WORDS};
use dvmm_layout::{CPUID_TIMING_LEAF, LAPIC_TIMER_HZ};
use kvm_bindings::{kvm_cpuid_entry2, CpuId, KVM_CPUID_FLAG_SIGNIFCANT_INDEX};

const LEAF1_ECX_CX16: u32 = 1 << 13;
const LEAF1_ECX_XSAVE: u32 = 1 << 26;
const LEAF1_ECX_OSXSAVE: u32 = 1 << 27;
const LEAF1_ECX_AVX: u32 = 1 << 28;
const LEAF1_ECX_X2APIC: u32 = 1 << 21;
const LEAF1_ECX_TSC_DEADLINE: u32 = 1 << 24;
const LEAF1_ECX_HYPERVISOR: u32 = 1 << 31;
const LEAF1_EDX_APIC: u32 = 1 << 9;
const LEAF1_EDX_HTT: u32 = 1 << 28;
const LEAF6_EAX_ARAT: u32 = 1 << 2;

// KVM paravirt features (CPUID 0x40000001 EAX) that are safe without an in-kernel
// LAPIC: kvmclock (both MSR sets), no I/O delay, the stable bit. PV EOI, PV IPIs,
// PV unhalt, async page faults and friends all need KVM's LAPIC.
const KVM_FEATURE_CLOCKSOURCE: u32 = 1 << 0;
const KVM_FEATURE_NOP_IO_DELAY: u32 = 1 << 1;
const KVM_FEATURE_CLOCKSOURCE2: u32 = 1 << 3;
const KVM_FEATURE_CLOCKSOURCE_STABLE_BIT: u32 = 1 << 24;
const KVM_FEATURES_KEPT: u32 = KVM_FEATURE_CLOCKSOURCE
    | KVM_FEATURE_NOP_IO_DELAY
    | KVM_FEATURE_CLOCKSOURCE2
    | KVM_FEATURE_CLOCKSOURCE_STABLE_BIT;

/// Number of bits needed to hold ids 0..n-1.
fn id_bits(n: u32) -> u32 {
    if n <= 1 {
        0
    } else {
        32 - (n - 1).leading_zeros()
    }
}

/// Features to hide from a guest whose kernel code KVM emulates: instructions its
/// emulator cannot execute at CPL0, so the guest kernel must not choose them.
/// (`lock cmpxchg16b`: SLUB's lockless freelists; `xsave`/`xrstor`: FPU context
/// switching, which falls back to `fxsave`/`fxrstor`; AVX needs XSAVE; `popcnt`:
/// hweight; SSE4.x/AES/PCLMUL: crypto and checksums; `rdrand`: early entropy.)
pub const EMULATION_UNSAFE_LEAF1_ECX: u32 = LEAF1_ECX_CX16
    | LEAF1_ECX_XSAVE
    | LEAF1_ECX_OSXSAVE
    | LEAF1_ECX_AVX
    | (1 << 1) // PCLMULQDQ
    | (1 << 19) // SSE4.1
    | (1 << 20) // SSE4.2 (crc32)
    | (1 << 22) // MOVBE
    | (1 << 23) // POPCNT
    | (1 << 25) // AES-NI
    | (1 << 29) // F16C
    | (1 << 30); // RDRAND

/// Leaf 7 (subleaf 0) EBX features hidden likewise: FSGSBASE (rdfsbase/wrfsbase in the
/// context switch), BMI1/BMI2, AVX2, RDSEED, ADX, SMAP (stac/clac), AVX-512, SHA.
pub const EMULATION_UNSAFE_LEAF7_EBX: u32 = 1
    | (1 << 3)
    | (1 << 5)
    | (1 << 8)
    | (1 << 18)
    | (1 << 19)
    | (1 << 20)
    | (1 << 29)
    | (0xffff << 16);

/// Leaf 7 (subleaf 0) ECX features hidden likewise: UMIP, PKU, VAES/VPCLMUL, RDPID, LA57.
pub const EMULATION_UNSAFE_LEAF7_ECX: u32 =
    (1 << 2) | (1 << 3) | (1 << 9) | (1 << 10) | (1 << 16) | (1 << 22);

/// The physical-address width a CPU without CPUID leaf 0x80000008 has (SDM: 36).
pub const DEFAULT_PHYS_ADDR_BITS: u8 = 36;

/// The guest's physical-address width (CPUID.80000008H:EAX bits 7:0) in `entries`.
pub fn phys_addr_bits(entries: &[kvm_cpuid_entry2]) -> u8 {
    entries
        .iter()
        .find(|e| e.function == 0x8000_0008)
        .map_or(DEFAULT_PHYS_ADDR_BITS, |e| e.eax as u8)
}

/// The CPUID entries for vCPU `apic_id` of `vcpus`, from KVM's supported `base` table.
/// `emulated_kernel`: the host's KVM emulates guest kernel code (see
/// [`EMULATION_UNSAFE_LEAF1_ECX`]).
pub fn vcpu_cpuid(
    base: &[kvm_cpuid_entry2],
    apic_id: u32,
    vcpus: u32,
    tsc_khz: u32,
    emulated_kernel: bool,
) -> Vec<kvm_cpuid_entry2> {
    let core_bits = id_bits(vcpus);
    let mut out: Vec<kvm_cpuid_entry2> = Vec::with_capacity(base.len() + 2);
    for e in base {
        let mut e = *e;
        match e.function {
            1 => {
                e.ebx = (e.ebx & 0x0000_ffff) | (apic_id << 24) | ((vcpus.min(255)) << 16);
                e.ecx |= LEAF1_ECX_X2APIC | LEAF1_ECX_TSC_DEADLINE | LEAF1_ECX_HYPERVISOR;
                e.edx |= LEAF1_EDX_APIC | LEAF1_EDX_HTT;
                if emulated_kernel {
                    e.ecx &= !EMULATION_UNSAFE_LEAF1_ECX;
                }
            }
            // XSAVE state enumeration and AVX2/AVX-512 make no sense without XSAVE.
            0xd if emulated_kernel => continue,
            7 if emulated_kernel && e.index == 0 => {
                e.ebx &= !EMULATION_UNSAFE_LEAF7_EBX;
                e.ecx &= !EMULATION_UNSAFE_LEAF7_ECX;
            }
            // LZCNT/ABM (ECX bit 5) and RDTSCP (EDX bit 27).
            0x8000_0001 if emulated_kernel => {
                e.ecx &= !(1 << 5);
                e.edx &= !(1 << 27);
            }
            4 => {
                // Cache topology: every cache is per core; cores per package in 31:26.
                e.eax = (e.eax & 0x03ff_ffff) | ((vcpus.saturating_sub(1).min(63)) << 26);
                e.eax &= !(0xfff << 14);
            }
            6 => e.eax |= LEAF6_EAX_ARAT,
            0xb | 0x1f => {
                // Level 0: SMT (one thread per core); level 1: cores; then invalid.
                e.edx = apic_id;
                match e.index {
                    0 => {
                        e.eax = 0;
                        e.ebx = 1;
                        e.ecx = 1 << 8;
                    }
                    1 => {
                        e.eax = core_bits;
                        e.ebx = vcpus;
                        e.ecx = (2 << 8) | 1;
                    }
                    i => {
                        e.eax = 0;
                        e.ebx = 0;
                        e.ecx = i & 0xff;
                    }
                }
            }
            0x4000_0000 => e.eax = e.eax.max(CPUID_TIMING_LEAF),
            0x4000_0001 => e.eax &= KVM_FEATURES_KEPT,
            _ => {}
        }
        if e.function != CPUID_TIMING_LEAF {
            out.push(e);
        }
    }
    out.push(kvm_cpuid_entry2 {
        function: CPUID_TIMING_LEAF,
        index: 0,
        flags: 0,
        eax: tsc_khz,
        ebx: (LAPIC_TIMER_HZ / 1000) as u32,
        ..Default::default()
    });
    out
}

fn reg_mut(e: &mut kvm_cpuid_entry2, r: Reg) -> &mut u32 {
    match r {
        Reg::Eax => &mut e.eax,
        Reg::Ebx => &mut e.ebx,
        Reg::Ecx => &mut e.ecx,
        Reg::Edx => &mut e.edx,
    }
}

/// Whether `e` is the entry that holds `leaf`.`subleaf`.
fn holds(e: &kvm_cpuid_entry2, leaf: u32, subleaf: u32) -> bool {
    e.function == leaf && (e.index == subleaf || (!is_indexed(e) && subleaf == 0))
}

/// The CPU a vCPU with these entries sees: vendor, signature and feature words (a
/// missing leaf offers nothing).
pub fn model_of(entries: &[kvm_cpuid_entry2]) -> CpuModel {
    let mut m = CpuModel::default();
    if let Some(e) = entries.iter().find(|e| e.function == 0) {
        m.vendor[0..4].copy_from_slice(&e.ebx.to_le_bytes());
        m.vendor[4..8].copy_from_slice(&e.edx.to_le_bytes());
        m.vendor[8..12].copy_from_slice(&e.ecx.to_le_bytes());
    }
    if let Some(e) = entries.iter().find(|e| e.function == 1) {
        m.signature = e.eax;
    }
    for (w, fw) in m.features.words.iter_mut().zip(WORDS) {
        if let Some(e) = entries.iter().find(|e| holds(e, fw.leaf, fw.subleaf)) {
            let mut e = *e;
            *w = *reg_mut(&mut e, fw.reg);
        }
    }
    m
}

/// Makes the entries show `model`: its signature, and no feature outside
/// `model.features` (features are only ever removed; the vendor must already match).
pub fn restrict_to(entries: &mut [kvm_cpuid_entry2], model: &CpuModel) {
    let allowed: &CpuFeatures = &model.features;
    for e in entries.iter_mut() {
        if e.function == 1 {
            e.eax = model.signature;
        }
        for (w, fw) in allowed.words.iter().zip(WORDS) {
            if holds(e, fw.leaf, fw.subleaf) {
                *reg_mut(e, fw.reg) &= *w;
            }
        }
    }
}

/// What this host can show a guest as its CPU (from KVM's `supported` table): the
/// model of dvmm's vCPU table, less the `hide`den features. Nodes compare these.
pub fn offer(
    supported: &[kvm_cpuid_entry2],
    emulated_kernel: bool,
    hide: &CpuFeatures,
) -> CpuModel {
    let mut m = model_of(&vcpu_cpuid(supported, 0, 1, 0, emulated_kernel));
    m.features = m.features.minus(hide);
    m
}

/// Packs entries into KVM's CPUID structure.
pub fn to_kvm(entries: &[kvm_cpuid_entry2]) -> Result<CpuId, vmm_sys_util::fam::Error> {
    CpuId::from_entries(entries)
}

/// Whether an entry depends on its subleaf index.
pub fn is_indexed(e: &kvm_cpuid_entry2) -> bool {
    e.flags & KVM_CPUID_FLAG_SIGNIFCANT_INDEX != 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            ..Default::default()
        }
    }

    #[test]
    fn apic_id_and_features_are_set() {
        let base = [
            entry(1, 0),
            entry(0xb, 0),
            entry(0xb, 1),
            entry(0x4000_0001, 0),
        ];
        let out = vcpu_cpuid(&base, 3, 4, 2_500_000, false);
        let l1 = out.iter().find(|e| e.function == 1).unwrap();
        assert_eq!(l1.ebx >> 24, 3);
        assert_ne!(l1.ecx & LEAF1_ECX_X2APIC, 0);
        assert_ne!(l1.ecx & LEAF1_ECX_TSC_DEADLINE, 0);
        let b1 = out
            .iter()
            .find(|e| e.function == 0xb && e.index == 1)
            .unwrap();
        assert_eq!((b1.eax, b1.ebx, b1.edx), (2, 4, 3));
        let t = out
            .iter()
            .find(|e| e.function == CPUID_TIMING_LEAF)
            .unwrap();
        assert_eq!((t.eax, t.ebx), (2_500_000, 1_000_000));
    }

    #[test]
    fn pv_features_needing_kernel_lapic_are_removed() {
        let mut kvm = entry(0x4000_0001, 0);
        kvm.eax = 0xffff_ffff;
        let out = vcpu_cpuid(&[kvm], 0, 1, 1, false);
        let f = out.iter().find(|e| e.function == 0x4000_0001).unwrap();
        assert_eq!(f.eax, KVM_FEATURES_KEPT);
    }

    #[test]
    fn emulated_kernels_do_not_see_unemulatable_features() {
        let mut l1 = entry(1, 0);
        l1.ecx = 0xffff_ffff;
        let base = [l1, entry(0xd, 0), entry(0xd, 1)];
        let out = vcpu_cpuid(&base, 0, 1, 1, true);
        let l1 = out.iter().find(|e| e.function == 1).unwrap();
        assert_eq!(l1.ecx & EMULATION_UNSAFE_LEAF1_ECX, 0);
        assert!(out.iter().all(|e| e.function != 0xd));
        let kept = vcpu_cpuid(&base, 0, 1, 1, false);
        let l1 = kept.iter().find(|e| e.function == 1).unwrap();
        assert_eq!(l1.ecx & LEAF1_ECX_CX16, LEAF1_ECX_CX16);
    }

    #[test]
    fn a_model_is_read_and_restricted_word_by_word() {
        let mut vendor = entry(0, 0);
        (vendor.ebx, vendor.edx, vendor.ecx) = (0x756e_6547, 0x4965_6e69, 0x6c65_746e);
        let mut l1 = entry(1, 0);
        (l1.eax, l1.ecx, l1.edx) = (0x906ea, 0xffff_ffff, 0xffff_ffff);
        let mut l7 = entry(7, 0);
        l7.flags = KVM_CPUID_FLAG_SIGNIFCANT_INDEX;
        l7.ebx = 0xffff_ffff;
        let mut l7_1 = entry(7, 1);
        l7_1.flags = KVM_CPUID_FLAG_SIGNIFCANT_INDEX;
        l7_1.eax = 0x30;
        let mut entries = vec![vendor, l1, l7, l7_1];
        let m = model_of(&entries);
        assert_eq!(m.vendor_name(), "GenuineIntel");
        assert_eq!(m.signature, 0x906ea);
        assert_eq!(m.features.words[1], 0xffff_ffff);
        assert_eq!(m.features.words[2], 0xffff_ffff);
        assert_eq!(m.features.words[5], 0x30);
        // A word whose leaf is absent offers nothing.
        assert_eq!(m.features.words[7], 0);

        let mut agreed = m;
        agreed.signature = 0x506e3;
        agreed.features = m
            .features
            .minus(&CpuFeatures::from_names(&["avx2", "ssse3"]).unwrap());
        restrict_to(&mut entries, &agreed);
        let after = model_of(&entries);
        assert_eq!(after, agreed);
        assert_eq!(entries[1].ecx & (1 << 9), 0);
        assert_eq!(entries[2].ebx & (1 << 5), 0);
        // Subleaf 1 of leaf 7 is its own word.
        assert_eq!(entries[3].eax, 0x30);
    }

    #[test]
    fn id_bits_rounds_up() {
        assert_eq!(id_bits(1), 0);
        assert_eq!(id_bits(2), 1);
        assert_eq!(id_bits(3), 2);
        assert_eq!(id_bits(4), 2);
        assert_eq!(id_bits(5), 3);
    }
}
