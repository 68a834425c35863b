//! The CPU the guest sees, as nodes compare it: the CPUID feature words, the vendor
//! and the family/model/stepping signature, and the names of the feature bits (those
//! Linux shows in `/proc/cpuinfo`).
//!
//! One guest runs on every node's hardware, and a vCPU may run on any node: a feature
//! one node lacks must be hidden from every vCPU. Nodes tell each other what they offer
//! when they join and apply the intersection; users with mixed hardware (or who want a
//! common baseline) hide features by name.

use std::fmt;

/// A CPUID output register.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reg {
    /// EAX.
    Eax,
    /// EBX.
    Ebx,
    /// ECX.
    Ecx,
    /// EDX.
    Edx,
}

/// One 32-bit word of feature flags: a register of a CPUID leaf and subleaf.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FeatureWord {
    /// CPUID leaf (EAX input).
    pub leaf: u32,
    /// Subleaf (ECX input); 0 for leaves without subleaves.
    pub subleaf: u32,
    /// The register holding the flags.
    pub reg: Reg,
}

const fn word(leaf: u32, subleaf: u32, reg: Reg) -> FeatureWord {
    FeatureWord { leaf, subleaf, reg }
}

/// How many feature words nodes compare.
pub const WORD_COUNT: usize = 11;

/// The feature words nodes compare, in wire order.
pub const WORDS: [FeatureWord; WORD_COUNT] = [
    word(1, 0, Reg::Edx),
    word(1, 0, Reg::Ecx),
    word(7, 0, Reg::Ebx),
    word(7, 0, Reg::Ecx),
    word(7, 0, Reg::Edx),
    word(7, 1, Reg::Eax),
    word(0xd, 1, Reg::Eax),
    word(0x8000_0001, 0, Reg::Ecx),
    word(0x8000_0001, 0, Reg::Edx),
    word(0x8000_0008, 0, Reg::Ebx),
    word(0x4000_0001, 0, Reg::Eax),
];

/// Feature names: `(name, word index in [`WORDS`], bit)`.
const NAMES: &[(&str, usize, u8)] = &[
    // CPUID.1:EDX
    ("fpu", 0, 0),
    ("vme", 0, 1),
    ("de", 0, 2),
    ("pse", 0, 3),
    ("tsc", 0, 4),
    ("msr", 0, 5),
    ("pae", 0, 6),
    ("mce", 0, 7),
    ("cx8", 0, 8),
    ("apic", 0, 9),
    ("sep", 0, 11),
    ("mtrr", 0, 12),
    ("pge", 0, 13),
    ("mca", 0, 14),
    ("cmov", 0, 15),
    ("pat", 0, 16),
    ("pse36", 0, 17),
    ("pn", 0, 18),
    ("clflush", 0, 19),
    ("dts", 0, 21),
    ("acpi", 0, 22),
    ("mmx", 0, 23),
    ("fxsr", 0, 24),
    ("sse", 0, 25),
    ("sse2", 0, 26),
    ("ss", 0, 27),
    ("ht", 0, 28),
    ("tm", 0, 29),
    ("pbe", 0, 31),
    // CPUID.1:ECX
    ("pni", 1, 0),
    ("pclmulqdq", 1, 1),
    ("dtes64", 1, 2),
    ("monitor", 1, 3),
    ("ds_cpl", 1, 4),
    ("vmx", 1, 5),
    ("smx", 1, 6),
    ("est", 1, 7),
    ("tm2", 1, 8),
    ("ssse3", 1, 9),
    ("cid", 1, 10),
    ("sdbg", 1, 11),
    ("fma", 1, 12),
    ("cx16", 1, 13),
    ("xtpr", 1, 14),
    ("pdcm", 1, 15),
    ("pcid", 1, 17),
    ("dca", 1, 18),
    ("sse4_1", 1, 19),
    ("sse4_2", 1, 20),
    ("x2apic", 1, 21),
    ("movbe", 1, 22),
    ("popcnt", 1, 23),
    ("tsc_deadline_timer", 1, 24),
    ("aes", 1, 25),
    ("xsave", 1, 26),
    ("osxsave", 1, 27),
    ("avx", 1, 28),
    ("f16c", 1, 29),
    ("rdrand", 1, 30),
    ("hypervisor", 1, 31),
    // CPUID.7.0:EBX
    ("fsgsbase", 2, 0),
    ("tsc_adjust", 2, 1),
    ("sgx", 2, 2),
    ("bmi1", 2, 3),
    ("hle", 2, 4),
    ("avx2", 2, 5),
    ("fdp_excptn_only", 2, 6),
    ("smep", 2, 7),
    ("bmi2", 2, 8),
    ("erms", 2, 9),
    ("invpcid", 2, 10),
    ("rtm", 2, 11),
    ("cqm", 2, 12),
    ("zero_fcs_fds", 2, 13),
    ("mpx", 2, 14),
    ("rdt_a", 2, 15),
    ("avx512f", 2, 16),
    ("avx512dq", 2, 17),
    ("rdseed", 2, 18),
    ("adx", 2, 19),
    ("smap", 2, 20),
    ("avx512ifma", 2, 21),
    ("clflushopt", 2, 23),
    ("clwb", 2, 24),
    ("intel_pt", 2, 25),
    ("avx512pf", 2, 26),
    ("avx512er", 2, 27),
    ("avx512cd", 2, 28),
    ("sha_ni", 2, 29),
    ("avx512bw", 2, 30),
    ("avx512vl", 2, 31),
    // CPUID.7.0:ECX
    ("avx512vbmi", 3, 1),
    ("umip", 3, 2),
    ("pku", 3, 3),
    ("ospke", 3, 4),
    ("waitpkg", 3, 5),
    ("avx512_vbmi2", 3, 6),
    ("shstk", 3, 7),
    ("gfni", 3, 8),
    ("vaes", 3, 9),
    ("vpclmulqdq", 3, 10),
    ("avx512_vnni", 3, 11),
    ("avx512_bitalg", 3, 12),
    ("tme", 3, 13),
    ("avx512_vpopcntdq", 3, 14),
    ("la57", 3, 16),
    ("rdpid", 3, 22),
    ("bus_lock_detect", 3, 24),
    ("cldemote", 3, 25),
    ("movdiri", 3, 27),
    ("movdir64b", 3, 28),
    ("enqcmd", 3, 29),
    ("sgx_lc", 3, 30),
    // CPUID.7.0:EDX
    ("avx512_4vnniw", 4, 2),
    ("avx512_4fmaps", 4, 3),
    ("fsrm", 4, 4),
    ("avx512_vp2intersect", 4, 8),
    ("md_clear", 4, 10),
    ("serialize", 4, 14),
    ("tsxldtrk", 4, 16),
    ("pconfig", 4, 18),
    ("arch_lbr", 4, 19),
    ("ibt", 4, 20),
    ("amx_bf16", 4, 22),
    ("avx512_fp16", 4, 23),
    ("amx_tile", 4, 24),
    ("amx_int8", 4, 25),
    ("spec_ctrl", 4, 26),
    ("intel_stibp", 4, 27),
    ("flush_l1d", 4, 28),
    ("arch_capabilities", 4, 29),
    ("core_capabilities", 4, 30),
    ("spec_ctrl_ssbd", 4, 31),
    // CPUID.7.1:EAX
    ("avx_vnni", 5, 4),
    ("avx512_bf16", 5, 5),
    // CPUID.0xD.1:EAX
    ("xsaveopt", 6, 0),
    ("xsavec", 6, 1),
    ("xgetbv1", 6, 2),
    ("xsaves", 6, 3),
    // CPUID.0x80000001:ECX
    ("lahf_lm", 7, 0),
    ("cmp_legacy", 7, 1),
    ("svm", 7, 2),
    ("extapic", 7, 3),
    ("cr8_legacy", 7, 4),
    ("abm", 7, 5),
    ("sse4a", 7, 6),
    ("misalignsse", 7, 7),
    ("3dnowprefetch", 7, 8),
    ("osvw", 7, 9),
    ("ibs", 7, 10),
    ("xop", 7, 11),
    ("skinit", 7, 12),
    ("wdt", 7, 13),
    ("lwp", 7, 15),
    ("fma4", 7, 16),
    ("tce", 7, 17),
    ("nodeid_msr", 7, 19),
    ("tbm", 7, 21),
    ("topoext", 7, 22),
    ("perfctr_core", 7, 23),
    ("perfctr_nb", 7, 24),
    ("bpext", 7, 26),
    ("ptsc", 7, 27),
    ("perfctr_llc", 7, 28),
    ("mwaitx", 7, 29),
    // CPUID.0x80000001:EDX
    ("syscall", 8, 11),
    ("nx", 8, 20),
    ("mmxext", 8, 22),
    ("fxsr_opt", 8, 25),
    ("pdpe1gb", 8, 26),
    ("rdtscp", 8, 27),
    ("lm", 8, 29),
    ("3dnowext", 8, 30),
    ("3dnow", 8, 31),
    // CPUID.0x80000008:EBX
    ("clzero", 9, 0),
    ("irperf", 9, 1),
    ("xsaveerptr", 9, 2),
    ("rdpru", 9, 4),
    ("wbnoinvd", 9, 9),
    ("amd_ibpb", 9, 12),
    ("amd_ibrs", 9, 14),
    ("amd_stibp", 9, 15),
    ("amd_ssbd", 9, 24),
    ("virt_ssbd", 9, 25),
    ("amd_ssb_no", 9, 26),
    // CPUID.0x40000001:EAX (KVM's paravirtual features)
    ("kvmclock", 10, 0),
    ("kvm_nopiodelay", 10, 1),
    ("kvm_mmu", 10, 2),
    ("kvmclock2", 10, 3),
    ("kvm_async_pf", 10, 4),
    ("kvm_steal_time", 10, 5),
    ("kvm_pv_eoi", 10, 6),
    ("kvm_pv_unhalt", 10, 7),
    ("kvm_pv_tlb_flush", 10, 9),
    ("kvm_async_pf_vmexit", 10, 10),
    ("kvm_pv_send_ipi", 10, 11),
    ("kvm_poll_control", 10, 12),
    ("kvm_pv_sched_yield", 10, 13),
    ("kvm_async_pf_int", 10, 14),
    ("kvm_msi_ext_dest_id", 10, 15),
    ("kvm_hc_map_gpa_range", 10, 16),
    ("kvm_migration_control", 10, 17),
    ("kvmclock_stable", 10, 24),
];

/// A name that is not a known CPU feature.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("'{0}' is not a CPU feature dvmm knows (use the names of /proc/cpuinfo's flags, e.g. avx2, sse4_2, pdpe1gb)")]
pub struct UnknownFeature(pub String);

/// A set of feature bits, one `u32` per [`WORDS`] entry.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct CpuFeatures {
    /// The flags, word by word in [`WORDS`] order.
    pub words: [u32; WORD_COUNT],
}

impl CpuFeatures {
    /// The features named, e.g. `["avx2", "sse4_2"]` (case-insensitive; `-` may stand
    /// for `_`).
    pub fn from_names<S: AsRef<str>>(names: &[S]) -> Result<CpuFeatures, UnknownFeature> {
        let mut f = CpuFeatures::default();
        for n in names {
            let want = n.as_ref().trim().to_ascii_lowercase().replace('-', "_");
            let (_, w, b) = NAMES
                .iter()
                .find(|(name, _, _)| *name == want)
                .ok_or_else(|| UnknownFeature(n.as_ref().to_string()))?;
            f.words[*w] |= 1 << b;
        }
        Ok(f)
    }

    /// Features in both sets.
    pub fn intersect(&self, other: &CpuFeatures) -> CpuFeatures {
        let mut out = *self;
        for (o, b) in out.words.iter_mut().zip(other.words) {
            *o &= b;
        }
        out
    }

    /// Features in `self` but not in `other`.
    pub fn minus(&self, other: &CpuFeatures) -> CpuFeatures {
        let mut out = *self;
        for (o, b) in out.words.iter_mut().zip(other.words) {
            *o &= !b;
        }
        out
    }

    /// No feature at all.
    pub fn is_empty(&self) -> bool {
        self.words.iter().all(|w| *w == 0)
    }

    /// The set's features by name; unnamed bits as `cpuid 0x7.0:ebx[12]`.
    pub fn names(&self) -> Vec<String> {
        let mut out = Vec::new();
        for (w, bits) in self.words.iter().enumerate() {
            for bit in 0..32u8 {
                if bits & (1 << bit) == 0 {
                    continue;
                }
                match NAMES.iter().find(|(_, nw, nb)| *nw == w && *nb == bit) {
                    Some((name, _, _)) => out.push((*name).to_string()),
                    None => {
                        let fw = WORDS[w];
                        out.push(format!(
                            "cpuid {:#x}.{}:{}[{bit}]",
                            fw.leaf,
                            fw.subleaf,
                            format!("{:?}", fw.reg).to_ascii_lowercase()
                        ));
                    }
                }
            }
        }
        out
    }
}

/// What a node offers the guest as its CPU: vendor, signature and features.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CpuModel {
    /// CPUID.0 vendor string (EBX, EDX, ECX), e.g. `GenuineIntel`.
    pub vendor: [u8; 12],
    /// CPUID.1:EAX: family, model and stepping.
    pub signature: u32,
    /// The feature flags.
    pub features: CpuFeatures,
}

impl CpuModel {
    /// The vendor string, for messages.
    pub fn vendor_name(&self) -> String {
        String::from_utf8_lossy(&self.vendor).into_owned()
    }
}

impl fmt::Display for CpuModel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = self.signature;
        let family = ((s >> 8) & 0xf) + ((s >> 20) & 0xff);
        let model = ((s >> 4) & 0xf) | ((s >> 12) & 0xf0);
        write!(
            f,
            "{} family {family:#x} model {model:#x} stepping {}",
            self.vendor_name(),
            s & 0xf
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_map_to_bits_and_back() {
        let f = CpuFeatures::from_names(&["avx2", "SSE4-2", "pdpe1gb", "kvmclock"]).unwrap();
        assert_eq!(f.words[2], 1 << 5);
        assert_eq!(f.words[1], 1 << 20);
        assert_eq!(f.words[8], 1 << 26);
        assert_eq!(f.words[10], 1);
        assert_eq!(f.names(), ["sse4_2", "avx2", "pdpe1gb", "kvmclock"]);
    }

    #[test]
    fn an_unknown_name_is_an_error_that_names_it() {
        let e = CpuFeatures::from_names(&["avx2", "avx9000"]).unwrap_err();
        assert_eq!(e, UnknownFeature("avx9000".into()));
        assert!(e.to_string().contains("avx9000"));
    }

    #[test]
    fn every_name_is_unique_and_in_range() {
        for (i, (n, w, b)) in NAMES.iter().enumerate() {
            assert!(*w < WORD_COUNT && *b < 32, "{n}");
            for (m, w2, b2) in &NAMES[i + 1..] {
                assert_ne!(n, m);
                assert!((w, b) != (w2, b2), "{n} and {m} share a bit");
            }
        }
    }

    #[test]
    fn set_operations() {
        let a = CpuFeatures::from_names(&["avx2", "sse4_2", "nx"]).unwrap();
        let b = CpuFeatures::from_names(&["sse4_2", "nx", "lm"]).unwrap();
        assert_eq!(a.intersect(&b).names(), ["sse4_2", "nx"]);
        assert_eq!(a.minus(&b).names(), ["avx2"]);
        assert!(a.minus(&a).is_empty());
        let mut unnamed = CpuFeatures::default();
        unnamed.words[2] = 1 << 22;
        assert_eq!(unnamed.names(), ["cpuid 0x7.0:ebx[22]"]);
    }

    #[test]
    fn a_model_prints_its_family_and_model() {
        let m = CpuModel {
            vendor: *b"GenuineIntel",
            signature: 0x000906ea,
            features: CpuFeatures::default(),
        };
        assert_eq!(
            m.to_string(),
            "GenuineIntel family 0x6 model 0x9e stepping 10"
        );
    }
}
