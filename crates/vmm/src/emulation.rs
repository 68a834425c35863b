//! Recovering from instructions KVM cannot emulate.
//!
//! On hosts without VT-x/AMD-V (nested "PVM" KVM), guest kernel-mode code runs in KVM's
//! instruction emulator, which gives up on some instructions with
//! `KVM_EXIT_INTERNAL_ERROR` (suberror 1). On a VT-x/AMD-V host these instructions
//! run natively and this module is never reached.
//!
//! Handled here: `int3` and `int n` at CPL0 are completed by advancing RIP and
//! injecting the vector as an event, which is what the CPU would have done. Anything
//! else stops the VM with the instruction bytes, RIP and advice.

use std::fmt;

use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// `KVM_INTERNAL_ERROR_EMULATION`.
pub const SUBERROR_EMULATION: u32 = 1;
/// `KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES`.
const FLAG_INSTRUCTION_BYTES: u64 = 1;

/// What `KVM_EXIT_INTERNAL_ERROR` told us.
#[derive(Clone, Debug)]
pub struct InternalError {
    /// KVM's suberror code.
    pub suberror: u32,
    /// KVM's extra data words.
    pub data: Vec<u64>,
}

/// Why the VM could not go on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EmulationFailure {
    /// KVM's suberror code.
    pub suberror: u32,
    /// Guest RIP of the instruction.
    pub rip: u64,
    /// Privilege level the guest was at.
    pub cpl: u8,
    /// Up to 15 instruction bytes at RIP (empty if unreadable).
    pub bytes: Vec<u8>,
}

impl fmt::Display for EmulationFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let hex: Vec<String> = self.bytes.iter().map(|b| format!("{b:02x}")).collect();
        let what = if self.suberror == SUBERROR_EMULATION {
            "KVM could not emulate the guest instruction"
        } else {
            "KVM reported an internal error"
        };
        write!(
            f,
            "{what} at RIP {:#x} (CPL{}, suberror {}, bytes [{}]). \
             This host's KVM lacks hardware virtualization and emulates guest kernel code; \
             run on a host with VT-x/AMD-V, or configure the guest to avoid this instruction",
            self.rip,
            self.cpl,
            self.suberror,
            hex.join(" ")
        )
    }
}

/// A recognised instruction and how it is completed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fixup {
    /// Advance RIP by `len` and inject `vector` as a software exception/interrupt.
    InjectVector {
        /// Instruction length.
        len: u8,
        /// Vector to deliver.
        vector: u8,
    },
}

/// Decides how to complete the instruction starting with `bytes` at `cpl`, if we can.
pub fn classify(bytes: &[u8], cpl: u8) -> Option<Fixup> {
    if cpl != 0 {
        return None;
    }
    match bytes {
        [0xcc, ..] => Some(Fixup::InjectVector { len: 1, vector: 3 }),
        [0xcd, n, ..] => Some(Fixup::InjectVector { len: 2, vector: *n }),
        _ => None,
    }
}

fn instruction_bytes(
    vcpu: &VcpuFd,
    mem: &GuestMemoryMmap,
    linear_rip: u64,
    err: &InternalError,
) -> Vec<u8> {
    if let Ok(t) = vcpu.translate_gva(linear_rip) {
        if t.valid != 0 {
            let mut buf = [0u8; 15];
            // Read up to the end of the page, then the rest if it is contiguous in RAM.
            let n = (0x1000 - (t.physical_address & 0xfff)).min(15) as usize;
            if mem
                .read_slice(&mut buf[..n], GuestAddress(t.physical_address))
                .is_ok()
            {
                return buf[..n].to_vec();
            }
        }
    }
    // Fall back on the bytes KVM may have attached: data[0] flags, data[1] length,
    // data[2..4] up to 16 bytes.
    if err.data.len() >= 4 && err.data[0] & FLAG_INSTRUCTION_BYTES != 0 {
        let len = (err.data[1] as usize).min(15);
        let mut raw = Vec::with_capacity(16);
        raw.extend_from_slice(&err.data[2].to_le_bytes());
        raw.extend_from_slice(&err.data[3].to_le_bytes());
        raw.truncate(len);
        return raw;
    }
    Vec::new()
}

/// Handles an internal-error exit: either fixes the vCPU up so it can re-enter
/// (returns a short description), or returns why it cannot.
pub fn recover(
    vcpu: &VcpuFd,
    mem: &GuestMemoryMmap,
    err: &InternalError,
) -> Result<&'static str, EmulationFailure> {
    let regs = vcpu.get_regs();
    let sregs = vcpu.get_sregs();
    let (mut regs, sregs) = match (regs, sregs) {
        (Ok(r), Ok(s)) => (r, s),
        _ => {
            return Err(EmulationFailure {
                suberror: err.suberror,
                rip: 0,
                cpl: 0,
                bytes: Vec::new(),
            })
        }
    };
    let cpl = sregs.cs.dpl;
    let linear = sregs.cs.base.wrapping_add(regs.rip);
    let bytes = instruction_bytes(vcpu, mem, linear, err);
    let rip = regs.rip;
    let failure = || EmulationFailure {
        suberror: err.suberror,
        rip,
        cpl,
        bytes: bytes.clone(),
    };
    if err.suberror != SUBERROR_EMULATION {
        return Err(failure());
    }
    match classify(&bytes, cpl) {
        Some(Fixup::InjectVector { len, vector }) => {
            let mut events = vcpu.get_vcpu_events().map_err(|_| failure())?;
            regs.rip = regs.rip.wrapping_add(u64::from(len));
            vcpu.set_regs(&regs).map_err(|_| failure())?;
            events.exception.injected = 1;
            events.exception.nr = vector;
            events.exception.has_error_code = 0;
            events.exception.error_code = 0;
            vcpu.set_vcpu_events(&events).map_err(|_| failure())?;
            Ok(if vector == 3 {
                "int3 at CPL0: injected #BP"
            } else {
                "int n at CPL0: injected the vector"
            })
        }
        None => Err(failure()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn int3_and_int_n_at_cpl0_are_recognised() {
        assert_eq!(
            classify(&[0xcc, 0x90], 0),
            Some(Fixup::InjectVector { len: 1, vector: 3 })
        );
        assert_eq!(
            classify(&[0xcd, 0x80], 0),
            Some(Fixup::InjectVector {
                len: 2,
                vector: 0x80
            })
        );
    }

    #[test]
    fn other_instructions_and_user_mode_are_not() {
        assert_eq!(classify(&[0xcc], 3), None);
        assert_eq!(classify(&[0x0f, 0xae, 0x2f], 0), None);
        assert_eq!(classify(&[0xcd], 0), None);
        assert_eq!(classify(&[], 0), None);
    }

    #[test]
    fn failure_message_names_rip_and_bytes() {
        let f = EmulationFailure {
            suberror: 1,
            rip: 0xffff_ffff_8100_0000,
            cpl: 0,
            bytes: vec![0x0f, 0xae, 0x2f],
        };
        let s = f.to_string();
        assert!(s.contains("0xffffffff81000000"), "{s}");
        assert!(s.contains("0f ae 2f"), "{s}");
        assert!(s.contains("VT-x"), "{s}");
    }
}
