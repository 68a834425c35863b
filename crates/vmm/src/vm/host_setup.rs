//! Per-VM KVM set-up that depends on what the host's KVM is: clocks in step across
//! nodes, the MSR filter that hands the LAPIC's MSRs to dvmm, and the SYSCALL probe.

use kvm_bindings::kvm_enable_cap;
use kvm_ioctls::{MsrFilterDefaultAction, MsrFilterRange, MsrFilterRangeFlags, VcpuFd, VmFd};

use super::kvm_err;
use crate::syscall_completion::{self, HostSyscall};
use crate::VmmError;

/// Sets the guest's clocks from the host's, so that every node of a cluster (each its
/// own KVM VM, created at its own moment) shows the guest the same time: the TSC offset
/// is `align.tsc_offset` (0: guest TSC = host TSC) and kvmclock starts at the host's
/// boot-time clock plus `align.boottime_offset_ns`. The join measures the offsets
/// between hosts (`dvmm_node::clock_sync`).
pub(super) fn align_clocks(
    vm: &VmFd,
    vcpus: &[VcpuFd],
    align: super::ClockAlign,
) -> Result<(), VmmError> {
    for v in vcpus {
        // KVM adds the offset modulo 2^64. Kernels before 5.16 lack the attribute:
        // then the guest TSC is written directly (host TSC + offset, now).
        if let Err(e) = dvmm_hypervisor::kvm::set_tsc_offset(v, align.tsc_offset as u64) {
            let guest = dvmm_irq::clock::host_tsc().wrapping_add_signed(align.tsc_offset);
            let msrs = kvm_bindings::Msrs::from_entries(&[kvm_bindings::kvm_msr_entry {
                index: dvmm_hypervisor::MSR_IA32_TSC,
                data: guest,
                ..Default::default()
            }])
            .map_err(|_| VmmError::ClockSetup(format!("cannot set the guest TSC offset: {e}")))?;
            if !matches!(v.set_msrs(&msrs), Ok(1)) {
                return Err(VmmError::ClockSetup(format!(
                    "cannot set the guest TSC (offset {} cycles): {e}, and writing IA32_TSC failed too",
                    align.tsc_offset
                )));
            }
            tracing::debug!(error = %e, "no KVM TSC offset attribute; wrote IA32_TSC instead");
        }
    }
    let now = dvmm_irq::clock::boottime_ns();
    let clock = kvm_bindings::kvm_clock_data {
        clock: now.wrapping_add_signed(align.boottime_offset_ns),
        ..Default::default()
    };
    if let Err(e) = vm.set_clock(&clock) {
        if align.boottime_offset_ns != 0 {
            return Err(VmmError::ClockSetup(format!(
                "cannot move kvmclock by {} ns: {e}",
                align.boottime_offset_ns
            )));
        }
        tracing::warn!(error = %e, "cannot align kvmclock with the host clock");
    }
    Ok(())
}

/// Makes KVM hand the LAPIC's MSRs (and MSRs it does not know) to us.
///
/// KVM never filters the x2APIC range 0x800-0x8ff; without an in-kernel LAPIC it
/// treats those accesses as invalid, so the INVAL reason is what routes them to us.
/// With `syscall_msrs`, the guest's writes of STAR/LSTAR/CSTAR/FMASK exit too (for the
/// system-call completion, see [`crate::syscall_completion`]).
pub(super) fn route_msrs_to_userspace(vm: &VmFd, syscall_msrs: bool) -> Result<(), VmmError> {
    let cap = kvm_enable_cap {
        cap: kvm_bindings::KVM_CAP_X86_USER_SPACE_MSR,
        args: [
            u64::from(
                kvm_bindings::KVM_MSR_EXIT_REASON_FILTER
                    | kvm_bindings::KVM_MSR_EXIT_REASON_UNKNOWN
                    | kvm_bindings::KVM_MSR_EXIT_REASON_INVAL,
            ),
            0,
            0,
            0,
        ],
        ..Default::default()
    };
    vm.enable_cap(&cap).map_err(kvm_err(
        "enabling userspace MSR exits (KVM_CAP_X86_USER_SPACE_MSR)",
    ))?;
    let deny_one = [0u8; 1];
    // One bit per MSR, 0 = filtered (sent to us).
    let bitmaps: Vec<Vec<u8>> = dvmm_irq::lapic::LAPIC_MSR_RANGES
        .iter()
        .map(|&(_, count)| vec![0u8; (count as usize).div_ceil(8)])
        .collect();
    let rw = MsrFilterRangeFlags::READ | MsrFilterRangeFlags::WRITE;
    let mut ranges: Vec<MsrFilterRange> = dvmm_irq::lapic::LAPIC_MSR_RANGES
        .iter()
        .zip(&bitmaps)
        .map(|(&(base, msr_count), bitmap)| MsrFilterRange {
            flags: rw,
            base,
            msr_count,
            bitmap,
        })
        .collect();
    if syscall_msrs {
        ranges.push(MsrFilterRange {
            flags: MsrFilterRangeFlags::WRITE,
            base: crate::syscall_completion::MSR_STAR,
            msr_count: 4,
            bitmap: &deny_one,
        });
    }
    vm.set_msr_filter(MsrFilterDefaultAction::ALLOW, &ranges)
        .map_err(kvm_err(
            "installing the LAPIC MSR filter (KVM_X86_SET_MSR_FILTER)",
        ))
}

/// What this host does with system calls from guest user mode: probed once per process
/// with a tiny VM, said in one log line where dvmm has to complete them.
pub(super) fn host_syscall() -> HostSyscall {
    static PROBED: std::sync::OnceLock<HostSyscall> = std::sync::OnceLock::new();
    *PROBED.get_or_init(|| match syscall_completion::probe() {
        Ok((h, took)) => {
            if h.needs_completion() {
                tracing::info!(
                    "this host's KVM leaves SYSCALL from guest user mode at CPL3{} (probe VM, \
                     {:.1} ms): dvmm completes the guest's system calls",
                    if h.int_n_raises_ud {
                        " and turns int $0x80 into #UD"
                    } else {
                        ""
                    },
                    took.as_secs_f64() * 1e3
                );
            } else {
                tracing::debug!(?h, ?took, "SYSCALL from guest user mode works on this host");
            }
            h
        }
        Err(e) => {
            tracing::warn!("cannot probe this host's SYSCALL behaviour ({e}); assuming it works");
            HostSyscall::default()
        }
    })
}
