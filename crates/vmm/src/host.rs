//! What kind of KVM this host has.
//!
//! dvmm must behave identically on VT-x/AMD-V hosts; this is only used to tell the user
//! (and, later, to choose workarounds that only make sense without hardware support).

use std::path::Path;

/// The host's virtualization support as far as dvmm cares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HostKvm {
    /// The CPU advertises VT-x or AMD-V.
    pub hardware_virtualization: bool,
    /// KVM is the software "PVM" flavour (guest kernel code is emulated).
    pub pvm: bool,
    /// KVM shadows the guest's page tables (no EPT/NPT): PVM, or EPT/NPT turned off.
    pub shadow_paging: bool,
}

impl HostKvm {
    /// Probes /proc/cpuinfo and /sys/module.
    pub fn detect() -> HostKvm {
        let flags = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let param = |p: &str| {
            std::fs::read_to_string(p)
                .ok()
                .map(|v| matches!(v.trim(), "N" | "0"))
        };
        // kvm_intel.ept / kvm_amd.npt: "N"/"0" when two-dimensional paging is off.
        let tdp_off = param("/sys/module/kvm_intel/parameters/ept")
            .or_else(|| param("/sys/module/kvm_amd/parameters/npt"))
            .unwrap_or(false);
        let mut h = HostKvm::from_parts(&flags, Path::new("/sys/module/kvm_pvm").exists());
        h.shadow_paging |= tdp_off;
        h
    }

    fn from_parts(cpuinfo: &str, pvm_module: bool) -> HostKvm {
        let hw = cpuinfo
            .lines()
            .filter(|l| l.starts_with("flags"))
            .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"));
        HostKvm {
            hardware_virtualization: hw,
            pvm: pvm_module || !hw,
            shadow_paging: pvm_module || !hw,
        }
    }

    /// Guest kernel-mode code is emulated instruction by instruction.
    pub fn emulates_guest_kernel(&self) -> bool {
        self.pvm
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vmx_flag_means_hardware() {
        let h = HostKvm::from_parts("flags\t: fpu vme vmx sse\n", false);
        assert!(h.hardware_virtualization);
        assert!(!h.emulates_guest_kernel());
    }

    #[test]
    fn no_flag_or_pvm_module_means_emulated() {
        assert!(HostKvm::from_parts("flags\t: fpu hypervisor\n", false).emulates_guest_kernel());
        assert!(HostKvm::from_parts("flags\t: fpu svm\n", true).emulates_guest_kernel());
    }
}
