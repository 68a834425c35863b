//! KVM hypercalls (`vmcall`/`vmmcall` with the number in RAX) that this host's KVM
//! never completes, answered as KVM answers them.
//!
//! On emulated-kernel hosts a guest `vmcall` at CPL0 is retried forever inside
//! `KVM_RUN`: no exit, RIP never moves. Seen only from the outside, a vCPU kicked twice
//! at the same RIP that holds a `vmcall` is stuck there; [`StuckHypercall`] then gives
//! it the answer KVM with an in-kernel LAPIC would: the hypercalls that need no
//! paravirtual feature dvmm does not offer are done (`KVM_HC_SEND_IPI` through dvmm's
//! own LAPICs, on whichever node the target lives), every other one gets
//! `-KVM_ENOSYS`. Elsewhere KVM answers hypercalls itself and none of this runs.

use std::collections::BTreeSet;

use dvmm_hypervisor::Vcpu;

use crate::guest_access::GuestAccess;

/// `-KVM_ENOSYS`: what KVM answers for a hypercall it does not implement.
pub const KVM_ENOSYS: i64 = -1000;

/// `KVM_HC_VAPIC_POLL_IRQ`: a no-op that returns 0.
const KVM_HC_VAPIC_POLL_IRQ: u64 = 1;
/// `KVM_HC_SEND_IPI`: an IPI to a bitmap of APIC ids.
const KVM_HC_SEND_IPI: u64 = 10;
/// `KVM_HC_SCHED_YIELD`: a hint to run another vCPU; returns 0.
const KVM_HC_SCHED_YIELD: u64 = 11;

/// Is `bytes` a `vmcall` or `vmmcall` (a KVM hypercall)?
pub fn is_hypercall(bytes: &[u8]) -> bool {
    matches!(bytes, [0x0f, 0x01, 0xc1 | 0xd9, ..])
}

/// One hypercall as the guest made it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hypercall {
    /// `KVM_HC_VAPIC_POLL_IRQ`.
    VapicPollIrq,
    /// `KVM_HC_SEND_IPI`: `args` as the guest passed them (RBX, RCX, RDX, RSI).
    SendIpi {
        /// Bitmap low and high, the first APIC id, the ICR's low word.
        args: [u64; 4],
        /// The caller ran in 64-bit mode (else its arguments are 32 bits wide).
        long_mode: bool,
    },
    /// `KVM_HC_SCHED_YIELD`.
    SchedYield,
    /// Any other number: not implemented.
    Other(u64),
}

impl Hypercall {
    /// The hypercall in these registers.
    pub fn decode(regs: &kvm_bindings::kvm_regs, long_mode: bool) -> Hypercall {
        let nr = if long_mode {
            regs.rax
        } else {
            regs.rax & 0xffff_ffff
        };
        match nr {
            KVM_HC_VAPIC_POLL_IRQ => Hypercall::VapicPollIrq,
            KVM_HC_SEND_IPI => Hypercall::SendIpi {
                args: [regs.rbx, regs.rcx, regs.rdx, regs.rsi],
                long_mode,
            },
            KVM_HC_SCHED_YIELD => Hypercall::SchedYield,
            nr => Hypercall::Other(nr),
        }
    }

    /// The hypercall's number.
    pub fn number(&self) -> u64 {
        match self {
            Hypercall::VapicPollIrq => KVM_HC_VAPIC_POLL_IRQ,
            Hypercall::SendIpi { .. } => KVM_HC_SEND_IPI,
            Hypercall::SchedYield => KVM_HC_SCHED_YIELD,
            Hypercall::Other(nr) => *nr,
        }
    }
}

/// Finds the vCPU's stuck hypercalls (see the module's comment).
#[derive(Default)]
pub struct StuckHypercall {
    last_kick_rip: Option<u64>,
    answered: BTreeSet<u64>,
}

impl StuckHypercall {
    /// Called when `KVM_RUN` returned because of a kick. When the vCPU is stuck on a
    /// hypercall, `answer` performs it and gives its result, which goes to RAX with RIP
    /// past the instruction; returns the hypercall then.
    pub fn on_kick(
        &mut self,
        vcpu: &dyn Vcpu,
        mem: &dyn GuestAccess,
        answer: impl FnOnce(&Hypercall) -> i64,
    ) -> Option<Hypercall> {
        let mut regs = vcpu.regs().ok()?;
        let again = self.last_kick_rip == Some(regs.rip);
        self.last_kick_rip = Some(regs.rip);
        if !again {
            return None;
        }
        let sregs = vcpu.sregs().ok()?;
        if sregs.cs.dpl != 0 {
            return None;
        }
        let paging = crate::guest_paging::Paging::from_regs(sregs.cr3, sregs.cr4);
        let mut insn = [0u8; 3];
        let linear = sregs.cs.base.wrapping_add(regs.rip);
        if !crate::guest_paging::read_virt(mem, paging, linear, &mut insn) || !is_hypercall(&insn) {
            return None;
        }
        let call = Hypercall::decode(&regs, sregs.cs.l != 0);
        let ret = answer(&call);
        regs.rax = ret as u64;
        regs.rip = regs.rip.wrapping_add(3);
        vcpu.set_regs(&regs).ok()?;
        self.last_kick_rip = None;
        if self.answered.insert(call.number()) {
            tracing::info!(
                hypercall = call.number(),
                rip = format_args!("{:#x}", regs.rip - 3),
                answer = ret,
                "this host's KVM never completes the guest's hypercall; dvmm answered it \
                 as KVM does"
            );
        }
        Some(call)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vmcall_and_vmmcall() {
        assert!(is_hypercall(&[0x0f, 0x01, 0xc1]));
        assert!(is_hypercall(&[0x0f, 0x01, 0xd9, 0x90]));
        assert!(!is_hypercall(&[0x0f, 0x01, 0xf8])); // swapgs
        assert!(!is_hypercall(&[0x0f, 0x01]));
    }

    #[test]
    fn calls_decode_by_number_and_mode() {
        let regs = kvm_bindings::kvm_regs {
            rax: 10,
            rbx: 1,
            rcx: 2,
            rdx: 3,
            rsi: 4,
            ..Default::default()
        };
        assert_eq!(
            Hypercall::decode(&regs, true),
            Hypercall::SendIpi {
                args: [1, 2, 3, 4],
                long_mode: true
            }
        );
        let high = kvm_bindings::kvm_regs {
            rax: (1 << 32) | 11,
            ..Default::default()
        };
        assert_eq!(Hypercall::decode(&high, false), Hypercall::SchedYield);
        assert_eq!(
            Hypercall::decode(&high, true),
            Hypercall::Other((1 << 32) | 11)
        );
        assert_eq!(Hypercall::Other(7).number(), 7);
    }
}
