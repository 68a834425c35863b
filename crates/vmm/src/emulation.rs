//! Recovering from instructions KVM cannot emulate.
//!
//! On hosts without VT-x/AMD-V (nested "PVM" KVM), guest kernel-mode code runs in KVM's
//! instruction emulator, which gives up on some instructions with
//! `KVM_EXIT_INTERNAL_ERROR` (suberror 1). On a VT-x/AMD-V host these instructions
//! run natively and this module is never reached.
//!
//! Handled here: `int3` and `int n` at CPL0 are completed by advancing RIP and
//! injecting the vector as an event, which is what the CPU would have done; a few
//! instructions are computed here (see [`Fixup`]), among them `lsl`, which Linux's
//! paranoid entry (NMI, #MC, #DB) uses to find the CPU number when the CPU lacks RDPID.
//! Anything else stops the VM with the instruction bytes, RIP and advice.

use std::fmt;

use crate::guest_access::GuestAccess;
use dvmm_hypervisor::Vcpu;

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

/// A bit-counting instruction with register operands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BitCount {
    /// `popcnt`: number of set bits.
    Popcnt,
    /// `tzcnt`: trailing zero bits (operand size if zero).
    Tzcnt,
    /// `lzcnt`: leading zero bits (operand size if zero).
    Lzcnt,
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
    /// An instruction with no architectural effect here: advance RIP by `len`. (`fwait`:
    /// waits for pending x87 exceptions, of which an emulated-kernel guest has none
    /// outstanding at this point — the FPU state is saved with `fxsave` before.)
    Skip {
        /// Instruction length.
        len: u8,
    },
    /// `ldmxcsr m32` (`load`) or `stmxcsr m32`: move MXCSR from/to guest memory.
    Mxcsr {
        /// Instruction length.
        len: u8,
        /// ldmxcsr (else stmxcsr).
        load: bool,
        /// The memory operand.
        mem: MemOperand,
    },
    /// `clac`/`stac`: clear or set RFLAGS.AC (SMAP), then advance RIP by 3.
    SetAc {
        /// The new value of AC.
        on: bool,
    },
    /// Compute `op` of register `src` into register `dst` (indices in kvm_regs order:
    /// rax, rcx, rdx, rbx, rsp, rbp, rsi, rdi, r8..r15) at `bits` operand size.
    BitCount {
        /// Instruction length.
        len: u8,
        /// Which instruction.
        op: BitCount,
        /// Destination register.
        dst: u8,
        /// Source register.
        src: u8,
        /// Operand size: 16, 32 or 64.
        bits: u8,
    },
    /// `lsl dst, src` (register source): the limit of the segment that the selector in
    /// `src` names, into `dst`, and ZF; or ZF clear if the selector names none this CPL
    /// may see.
    Lsl {
        /// Instruction length.
        len: u8,
        /// Destination register.
        dst: u8,
        /// Source register (its low 16 bits are the selector).
        src: u8,
        /// Operand size: 16, 32 or 64.
        bits: u8,
    },
}

/// A 64-bit-mode memory operand: `seg:[base + index * scale + disp]` (RIP-relative when
/// `rip_relative`; registers are kvm_regs indices).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemOperand {
    /// Base register.
    pub base: Option<u8>,
    /// Index register and scale.
    pub index: Option<(u8, u8)>,
    /// Displacement.
    pub disp: i64,
    /// Relative to the next instruction's RIP.
    pub rip_relative: bool,
    /// 0x64 (FS) or 0x65 (GS) override.
    pub seg: Option<u8>,
}

/// Decodes a ModRM memory operand at `bytes[0]` (the ModRM byte) with REX bits `rex`.
/// Returns the operand and the number of bytes it took (ModRM, SIB, displacement).
fn decode_mem(bytes: &[u8], rex: u8, seg: Option<u8>) -> Option<(MemOperand, usize)> {
    let modrm = *bytes.first()?;
    let md = modrm >> 6;
    if md == 3 {
        return None;
    }
    let rm = modrm & 7;
    let mut n = 1;
    let mut op = MemOperand {
        base: None,
        index: None,
        disp: 0,
        rip_relative: false,
        seg,
    };
    if rm == 4 {
        let sib = *bytes.get(1)?;
        n = 2;
        let scale = 1u8 << (sib >> 6);
        let idx = ((sib >> 3) & 7) | ((rex & 2) << 2);
        if idx != 4 {
            op.index = Some((idx, scale));
        }
        let b = sib & 7;
        if b == 5 && md == 0 {
            let d = bytes.get(2..6)?;
            op.disp = i64::from(i32::from_le_bytes([d[0], d[1], d[2], d[3]]));
            return Some((op, 6));
        }
        op.base = Some(b | ((rex & 1) << 3));
    } else if rm == 5 && md == 0 {
        let d = bytes.get(1..5)?;
        op.disp = i64::from(i32::from_le_bytes([d[0], d[1], d[2], d[3]]));
        op.rip_relative = true;
        return Some((op, 5));
    } else {
        op.base = Some(rm | ((rex & 1) << 3));
    }
    match md {
        1 => {
            op.disp = i64::from(*bytes.get(n)? as i8);
            n += 1;
        }
        2 => {
            let d = bytes.get(n..n + 4)?;
            op.disp = i64::from(i32::from_le_bytes([d[0], d[1], d[2], d[3]]));
            n += 4;
        }
        _ => {}
    }
    Some((op, n))
}

/// Decodes `[seg] [REX] 0F AE /2|/3` (ldmxcsr/stmxcsr) with a memory operand.
fn decode_mxcsr(bytes: &[u8]) -> Option<Fixup> {
    let mut i = 0;
    let mut seg = None;
    if let Some(&b @ (0x64 | 0x65)) = bytes.first() {
        seg = Some(b);
        i = 1;
    }
    let mut rex = 0;
    if let Some(&b @ 0x40..=0x4f) = bytes.get(i) {
        rex = b;
        i += 1;
    }
    if bytes.get(i..i + 2)? != [0x0f, 0xae] {
        return None;
    }
    let modrm = *bytes.get(i + 2)?;
    let load = match (modrm >> 3) & 7 {
        2 => true,
        3 => false,
        _ => return None,
    };
    let (mem, n) = decode_mem(&bytes[i + 2..], rex, seg)?;
    Some(Fixup::Mxcsr {
        len: (i + 2 + n) as u8,
        load,
        mem,
    })
}

/// The linear address of `mem` for an instruction of `len` bytes at the current RIP.
fn linear_address(
    mem: &MemOperand,
    regs: &mut kvm_bindings::kvm_regs,
    sregs: &kvm_bindings::kvm_sregs,
    len: u8,
) -> u64 {
    let mut a = mem.disp as u64;
    if mem.rip_relative {
        a = a.wrapping_add(regs.rip.wrapping_add(u64::from(len)));
    }
    if let Some(b) = mem.base {
        a = a.wrapping_add(*reg_mut(regs, b));
    }
    if let Some((i, scale)) = mem.index {
        a = a.wrapping_add(reg_mut(regs, i).wrapping_mul(u64::from(scale)));
    }
    match mem.seg {
        Some(0x64) => a.wrapping_add(sregs.fs.base),
        Some(0x65) => a.wrapping_add(sregs.gs.base),
        _ => a,
    }
}

/// Decodes `F3 [66] [REX] 0F B8|BC|BD /r` with a register source (`mod` = 11).
fn decode_bitcount(bytes: &[u8]) -> Option<Fixup> {
    let mut i = 0;
    let (mut rep, mut opsize16, mut rex) = (false, false, 0u8);
    while let Some(&b) = bytes.get(i) {
        match b {
            0xf3 => rep = true,
            0x66 => opsize16 = true,
            _ => break,
        }
        i += 1;
    }
    if let Some(&b @ 0x40..=0x4f) = bytes.get(i) {
        rex = b;
        i += 1;
    }
    if !rep || bytes.get(i) != Some(&0x0f) {
        return None;
    }
    let op = match bytes.get(i + 1)? {
        0xb8 => BitCount::Popcnt,
        0xbc => BitCount::Tzcnt,
        0xbd => BitCount::Lzcnt,
        _ => return None,
    };
    let (dst, src, bits) = register_operands(*bytes.get(i + 2)?, rex, opsize16)?;
    Some(Fixup::BitCount {
        len: (i + 3) as u8,
        op,
        dst,
        src,
        bits,
    })
}

/// Decodes `[66] [REX] 0F 03 /r` (lsl) with a register source.
fn decode_lsl(bytes: &[u8]) -> Option<Fixup> {
    let mut i = 0;
    let opsize16 = bytes.first() == Some(&0x66);
    if opsize16 {
        i += 1;
    }
    let mut rex = 0u8;
    if let Some(&b @ 0x40..=0x4f) = bytes.get(i) {
        rex = b;
        i += 1;
    }
    if bytes.get(i..i + 2)? != [0x0f, 0x03] {
        return None;
    }
    let (dst, src, bits) = register_operands(*bytes.get(i + 2)?, rex, opsize16)?;
    Some(Fixup::Lsl {
        len: (i + 3) as u8,
        dst,
        src,
        bits,
    })
}

/// The register operands of a ModRM byte with `mod` = 11 (else `None`): destination
/// (`reg`), source (`rm`), both widened by REX, and the operand size.
fn register_operands(modrm: u8, rex: u8, opsize16: bool) -> Option<(u8, u8, u8)> {
    if modrm >> 6 != 3 {
        return None;
    }
    let dst = ((modrm >> 3) & 7) | ((rex & 4) << 1);
    let src = (modrm & 7) | ((rex & 1) << 3);
    let bits = if rex & 8 != 0 {
        64
    } else if opsize16 {
        16
    } else {
        32
    };
    Some((dst, src, bits))
}

/// The segment limit `lsl` loads for `selector` at `cpl`, given the 8-byte descriptor
/// it names (`None`: ZF clear). 64-bit mode rules: code and data segments (conforming
/// code at any privilege), and of the system types only the LDT and 64-bit TSSs.
pub fn lsl_limit(selector: u16, descriptor: u64, cpl: u8) -> Option<u32> {
    let access = (descriptor >> 40) as u8;
    let system = access & 0x10 == 0;
    let kind = access & 0x0f;
    let dpl = (access >> 5) & 3;
    let rpl = (selector & 3) as u8;
    let conforming_code = !system && kind & 0b1100 == 0b1100;
    if system && !matches!(kind, 0x2 | 0x9 | 0xb) {
        return None;
    }
    if !conforming_code && dpl < cpl.max(rpl) {
        return None;
    }
    let raw = (descriptor & 0xffff) as u32 | (((descriptor >> 48) & 0xf) as u32) << 16;
    let granular = descriptor & (1 << 55) != 0;
    Some(if granular { (raw << 12) | 0xfff } else { raw })
}

/// Reads the descriptor `selector` names from the GDT or LDT, through `read` (reads of
/// guest-linear memory). `Ok(None)`: a null selector or one past the table's limit;
/// `Err`: the descriptor could not be read.
fn read_descriptor(
    sregs: &kvm_bindings::kvm_sregs,
    selector: u16,
    read: impl Fn(u64, &mut [u8]) -> bool,
) -> Result<Option<u64>, ()> {
    let (base, limit) = if selector & 4 != 0 {
        if sregs.ldt.unusable != 0 {
            return Ok(None);
        }
        (sregs.ldt.base, u64::from(sregs.ldt.limit))
    } else {
        if selector & !3 == 0 {
            return Ok(None);
        }
        (sregs.gdt.base, u64::from(sregs.gdt.limit))
    };
    let offset = u64::from(selector & !7);
    if offset + 7 > limit {
        return Ok(None);
    }
    let mut d = [0u8; 8];
    if !read(base.wrapping_add(offset), &mut d) {
        return Err(());
    }
    Ok(Some(u64::from_le_bytes(d)))
}

/// Completes `lsl` in `regs` given the limit it found (`None`: ZF clear, `dst` as it was).
pub fn apply_lsl(regs: &mut kvm_bindings::kvm_regs, fix: Fixup, limit: Option<u32>) {
    const FLAG_ZF: u64 = 1 << 6;
    let Fixup::Lsl { len, dst, bits, .. } = fix else {
        return;
    };
    match limit {
        Some(l) => {
            let d = reg_mut(regs, dst);
            *d = if bits == 16 {
                (*d & !0xffff) | u64::from(l & 0xffff)
            } else {
                u64::from(l)
            };
            regs.rflags |= FLAG_ZF;
        }
        None => regs.rflags &= !FLAG_ZF,
    }
    regs.rip = regs.rip.wrapping_add(u64::from(len));
}

fn reg_mut(regs: &mut kvm_bindings::kvm_regs, n: u8) -> &mut u64 {
    match n {
        0 => &mut regs.rax,
        1 => &mut regs.rcx,
        2 => &mut regs.rdx,
        3 => &mut regs.rbx,
        4 => &mut regs.rsp,
        5 => &mut regs.rbp,
        6 => &mut regs.rsi,
        7 => &mut regs.rdi,
        8 => &mut regs.r8,
        9 => &mut regs.r9,
        10 => &mut regs.r10,
        11 => &mut regs.r11,
        12 => &mut regs.r12,
        13 => &mut regs.r13,
        14 => &mut regs.r14,
        _ => &mut regs.r15,
    }
}

const FLAG_CF: u64 = 1 << 0;
const FLAG_PF: u64 = 1 << 2;
const FLAG_AF: u64 = 1 << 4;
const FLAG_ZF: u64 = 1 << 6;
const FLAG_SF: u64 = 1 << 7;
const FLAG_OF: u64 = 1 << 11;

/// Executes a decoded bit-count instruction on `regs` (RIP included).
pub fn apply_bitcount(regs: &mut kvm_bindings::kvm_regs, fix: Fixup) {
    let Fixup::BitCount {
        len,
        op,
        dst,
        src,
        bits,
    } = fix
    else {
        return;
    };
    let mask = if bits == 64 {
        u64::MAX
    } else {
        (1u64 << bits) - 1
    };
    let v = *reg_mut(regs, src) & mask;
    let result = match op {
        BitCount::Popcnt => u64::from(v.count_ones()),
        BitCount::Tzcnt if v == 0 => u64::from(bits),
        BitCount::Tzcnt => u64::from(v.trailing_zeros()),
        BitCount::Lzcnt if v == 0 => u64::from(bits),
        BitCount::Lzcnt => u64::from(v.leading_zeros()) - (64 - u64::from(bits)),
    };
    let d = reg_mut(regs, dst);
    *d = match bits {
        16 => (*d & !0xffff) | result,
        _ => result, // 32-bit results zero-extend into the 64-bit register
    };
    let mut f = regs.rflags;
    match op {
        BitCount::Popcnt => {
            f &= !(FLAG_CF | FLAG_PF | FLAG_AF | FLAG_ZF | FLAG_SF | FLAG_OF);
            if v == 0 {
                f |= FLAG_ZF;
            }
        }
        BitCount::Tzcnt | BitCount::Lzcnt => {
            f &= !(FLAG_CF | FLAG_ZF);
            if v == 0 {
                f |= FLAG_CF;
            }
            if result == 0 {
                f |= FLAG_ZF;
            }
        }
    }
    regs.rflags = f;
    regs.rip = regs.rip.wrapping_add(u64::from(len));
}

/// Decides how to complete the instruction starting with `bytes` at `cpl`, if we can.
pub fn classify(bytes: &[u8], cpl: u8) -> Option<Fixup> {
    if cpl != 0 {
        return None;
    }
    match bytes {
        [0xcc, ..] => Some(Fixup::InjectVector { len: 1, vector: 3 }),
        [0xcd, n, ..] => Some(Fixup::InjectVector { len: 2, vector: *n }),
        [0x9b, ..] => Some(Fixup::Skip { len: 1 }),
        _ if decode_mxcsr(bytes).is_some() => decode_mxcsr(bytes),
        [0x0f, 0x01, 0xca, ..] => Some(Fixup::SetAc { on: false }),
        [0x0f, 0x01, 0xcb, ..] => Some(Fixup::SetAc { on: true }),
        _ if decode_lsl(bytes).is_some() => decode_lsl(bytes),
        _ => decode_bitcount(bytes),
    }
}

fn instruction_bytes(
    vcpu: &dyn Vcpu,
    mem: &dyn GuestAccess,
    linear_rip: u64,
    err: &InternalError,
) -> Vec<u8> {
    if let Ok(Some(gpa)) = vcpu.translate(linear_rip) {
        let mut buf = [0u8; 15];
        // Read up to the end of the page, then the rest if it is contiguous in RAM.
        let n = (0x1000 - (gpa & 0xfff)).min(15) as usize;
        if mem.read(gpa, &mut buf[..n]).is_ok() {
            return buf[..n].to_vec();
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

/// A fault that delivering a vector through the IDT raises before the handler runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GateFault {
    /// #GP (13) or #NP (11).
    pub vector: u8,
    /// Its error code.
    pub error_code: u32,
}

const GP: u8 = 13;
const NP: u8 = 11;

/// The checks a CPU in long mode makes of `int n`'s IDT gate and its code segment before it
/// delivers (SDM vol. 3, 6.12.1 and `INT n` in vol. 2), which this host's KVM skips for
/// the injected vector: the gate inside the IDT's limit, an interrupt or trap gate,
/// present; its selector not null, inside the GDT, a code segment, present. `read`
/// reads guest-linear memory. None: the gate is good (or unreadable: KVM decides).
pub fn gate_fault(
    sregs: &kvm_bindings::kvm_sregs,
    vector: u8,
    read: impl Fn(u64, &mut [u8]) -> bool,
) -> Option<GateFault> {
    const EFER_LMA: u64 = 1 << 10;
    if sregs.efer & EFER_LMA == 0 {
        // Legacy gates are 8 bytes of another layout: left to KVM.
        return None;
    }
    let idt_code = u32::from(vector) * 8 + 2; // the IDT bit, EXT clear (a software int)
    let fault = |vector, error_code| Some(GateFault { vector, error_code });
    let at = u64::from(vector) * 16;
    if at + 15 > u64::from(sregs.idt.limit) {
        return fault(GP, idt_code);
    }
    let mut gate = [0u8; 16];
    if !read(sregs.idt.base.wrapping_add(at), &mut gate) {
        return None;
    }
    let kind = gate[5] & 0x0f;
    if kind != 0xe && kind != 0xf {
        return fault(GP, idt_code);
    }
    if gate[5] & 0x80 == 0 {
        return fault(NP, idt_code);
    }
    let selector = u16::from_le_bytes([gate[2], gate[3]]);
    let code = u32::from(selector & 0xfffc);
    if selector & 0xfffc == 0 {
        return fault(GP, 0);
    }
    if selector & 4 != 0 {
        // In the LDT: rare enough at CPL0 to leave to KVM.
        return None;
    }
    let access = match read_descriptor(sregs, selector, &read) {
        Ok(Some(desc)) => desc.to_le_bytes()[5],
        Ok(None) => return fault(GP, code),
        Err(()) => return None,
    };
    // S (code or data) and the executable bit.
    if access & 0x18 != 0x18 {
        return fault(GP, code);
    }
    if access & 0x80 == 0 {
        return fault(NP, code);
    }
    None
}

/// Handles an internal-error exit: either fixes the vCPU up so it can re-enter
/// (returns a short description), or returns why it cannot.
pub fn recover(
    vcpu: &dyn Vcpu,
    mem: &dyn GuestAccess,
    err: &InternalError,
) -> Result<&'static str, EmulationFailure> {
    let regs = vcpu.regs();
    let sregs = vcpu.sregs();
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
            let mut events = vcpu.events().map_err(|_| failure())?;
            let paging = crate::guest_paging::Paging::from_regs(sregs.cr3, sregs.cr4);
            let read =
                |va: u64, buf: &mut [u8]| crate::guest_paging::read_virt(mem, paging, va, buf);
            if let Some(fault) = gate_fault(&sregs, vector, read) {
                // The CPU checks the gate before it delivers anything: the fault is
                // reported at the `int`, RIP unmoved (the guest's handler may mend the
                // gate and return to it).
                events.exception.injected = 1;
                events.exception.nr = fault.vector;
                events.exception.has_error_code = 1;
                events.exception.error_code = fault.error_code;
                vcpu.set_events(&events).map_err(|_| failure())?;
                return Ok("int n at CPL0 through a bad gate: injected its fault");
            }
            regs.rip = regs.rip.wrapping_add(u64::from(len));
            vcpu.set_regs(&regs).map_err(|_| failure())?;
            if vector < 32 {
                events.exception.injected = 1;
                events.exception.nr = vector;
                events.exception.has_error_code = 0;
                events.exception.error_code = 0;
            } else {
                // KVM takes only vectors 0-31 as exceptions. The interrupt is injected
                // as a hardware one (`soft` would make KVM step RIP over an instruction
                // a second time): at CPL0 the gate's DPL does not matter, and the frame
                // holds the RIP after the `int n`, as the instruction's own would.
                events.interrupt.injected = 1;
                events.interrupt.nr = vector;
                events.interrupt.soft = 0;
            }
            vcpu.set_events(&events).map_err(|_| failure())?;
            Ok(if vector == 3 {
                "int3 at CPL0: injected #BP"
            } else {
                "int n at CPL0: injected the vector"
            })
        }
        Some(Fixup::Mxcsr { len, load, mem: op }) => {
            let linear = linear_address(&op, &mut regs, &sregs, len);
            let gpa = vcpu.translate(linear).map_err(|_| failure())?;
            // The 4 bytes must not cross a page, which Linux's aligned operands never do.
            let Some(gpa) = gpa.filter(|_| linear & 0xfff <= 0xffc) else {
                return Err(failure());
            };
            let mut fpu = vcpu.fpu().map_err(|_| failure())?;
            if load {
                let mut v = [0u8; 4];
                mem.read(gpa, &mut v).map_err(|_| failure())?;
                fpu.mxcsr = u32::from_le_bytes(v);
                vcpu.set_fpu(&fpu).map_err(|_| failure())?;
            } else {
                mem.write(gpa, &fpu.mxcsr.to_le_bytes())
                    .map_err(|_| failure())?;
            }
            regs.rip = regs.rip.wrapping_add(u64::from(len));
            vcpu.set_regs(&regs).map_err(|_| failure())?;
            Ok("ldmxcsr/stmxcsr at CPL0: done in dvmm")
        }
        Some(Fixup::Skip { len }) => {
            regs.rip = regs.rip.wrapping_add(u64::from(len));
            vcpu.set_regs(&regs).map_err(|_| failure())?;
            Ok("fwait at CPL0: skipped")
        }
        Some(Fixup::SetAc { on }) => {
            const FLAG_AC: u64 = 1 << 18;
            if on {
                regs.rflags |= FLAG_AC;
            } else {
                regs.rflags &= !FLAG_AC;
            }
            regs.rip = regs.rip.wrapping_add(3);
            vcpu.set_regs(&regs).map_err(|_| failure())?;
            Ok("clac/stac at CPL0: RFLAGS.AC set in dvmm")
        }
        Some(fix @ Fixup::BitCount { .. }) => {
            apply_bitcount(&mut regs, fix);
            vcpu.set_regs(&regs).map_err(|_| failure())?;
            Ok("popcnt/tzcnt/lzcnt at CPL0: computed in dvmm")
        }
        Some(fix @ Fixup::Lsl { src, .. }) => {
            let selector = (*reg_mut(&mut regs, src) & 0xffff) as u16;
            let read = |linear: u64, buf: &mut [u8]| {
                // Descriptors are 8-byte aligned in every table Linux builds, so one
                // never spans pages.
                linear & 7 == 0
                    && matches!(vcpu.translate(linear), Ok(Some(gpa)) if mem.read(gpa, buf).is_ok())
            };
            let limit = read_descriptor(&sregs, selector, read)
                .map_err(|()| failure())?
                .and_then(|d| lsl_limit(selector, d, cpl));
            apply_lsl(&mut regs, fix, limit);
            vcpu.set_regs(&regs).map_err(|_| failure())?;
            Ok("lsl at CPL0: segment limit read in dvmm")
        }
        None => Err(failure()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One page of guest RAM at address 0.
    struct Page(std::sync::Mutex<Vec<u8>>);

    impl GuestAccess for Page {
        fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), dvmm_devices::GuestAccessError> {
            let m = self.0.lock().unwrap();
            let at = gpa as usize;
            buf.copy_from_slice(&m[at..at + buf.len()]);
            Ok(())
        }
        fn write(&self, gpa: u64, buf: &[u8]) -> Result<(), dvmm_devices::GuestAccessError> {
            let mut m = self.0.lock().unwrap();
            let at = gpa as usize;
            m[at..at + buf.len()].copy_from_slice(buf);
            Ok(())
        }
    }

    #[test]
    fn int_n_at_cpl0_is_injected_as_an_exception_below_32_and_an_interrupt_above() {
        for (insn, vector) in [
            (&[0xcc][..], 3u8),
            (&[0xcd, 0x0e], 0x0e),
            (&[0xcd, 0x20], 0x20),
        ] {
            let mut ram = vec![0u8; 0x1000];
            ram[0x100..0x100 + insn.len()].copy_from_slice(insn);
            let mem = Page(std::sync::Mutex::new(ram));
            let vcpu = dvmm_hypervisor::fake::FakeVcpu::new([]);
            vcpu.state().lock().unwrap().regs.rip = 0x100;
            // An IDT for every vector, which (no page tables here) cannot be read: the
            // gate's checks are left to KVM.
            vcpu.state().lock().unwrap().sregs.idt.limit = 0xfff;
            let err = InternalError {
                suberror: SUBERROR_EMULATION,
                data: Vec::new(),
            };
            assert!(recover(&vcpu, &mem, &err).is_ok(), "{insn:x?}");
            let st = vcpu.state().lock().unwrap().clone();
            assert_eq!(
                st.regs.rip,
                0x100 + insn.len() as u64,
                "past the instruction"
            );
            if vector < 32 {
                assert_eq!(
                    (st.events.exception.injected, st.events.exception.nr),
                    (1, vector)
                );
                assert_eq!(st.events.interrupt.injected, 0);
            } else {
                assert_eq!(st.events.exception.injected, 0);
                let i = st.events.interrupt;
                assert_eq!((i.injected, i.nr, i.soft), (1, vector, 0));
            }
        }
    }

    #[test]
    fn lsl_as_linux_paranoid_entry_uses_it() {
        // lsl rax, eax; and rax, 0xfff (GET_PERCPU_BASE without RDPID).
        let f = classify(&[0x48, 0x0f, 0x03, 0xc0, 0x48, 0x25], 0).unwrap();
        assert_eq!(
            f,
            Fixup::Lsl {
                len: 4,
                dst: 0,
                src: 0,
                bits: 64
            }
        );
        // Linux's CPUNODE entry: a DPL3 read-only data segment whose limit is
        // cpu | node << 12 (here cpu 5, node 1), byte granular.
        let limit: u64 = 5 | (1 << 12);
        let desc = (limit & 0xffff) | (0xf1 << 40) | (((limit >> 16) & 0xf) << 48);
        assert_eq!(lsl_limit(0x7b, desc, 0), Some(0x1005));
        let mut regs = kvm_bindings::kvm_regs {
            rax: 0xffff_ffff_0000_007b,
            rip: 0x1000,
            ..Default::default()
        };
        apply_lsl(&mut regs, f, Some(0x1005));
        assert_eq!(
            (regs.rax, regs.rip, regs.rflags & 0x40),
            (0x1005, 0x1004, 0x40)
        );
        // A failed lsl clears ZF and leaves the destination alone.
        let mut regs = kvm_bindings::kvm_regs {
            rax: 7,
            rflags: 0x42,
            ..Default::default()
        };
        apply_lsl(&mut regs, f, None);
        assert_eq!((regs.rax, regs.rflags & 0x40, regs.rip), (7, 0, 4));
        // 16-bit form keeps the upper bits; r9 <- r10 with REX.RB.
        assert_eq!(
            classify(&[0x66, 0x45, 0x0f, 0x03, 0xca], 0),
            Some(Fixup::Lsl {
                len: 5,
                dst: 9,
                src: 10,
                bits: 16
            })
        );
        // Memory operands are not handled here.
        assert_eq!(classify(&[0x0f, 0x03, 0x00], 0), None);
    }

    #[test]
    fn lsl_checks_privilege_and_type() {
        let data = |dpl: u64| 0xffff | ((0x90 | (dpl << 5) | 0x2) << 40);
        // A DPL0 data segment: visible at CPL0 with RPL0, not with RPL3 or at CPL3.
        assert_eq!(lsl_limit(0x10, data(0), 0), Some(0xffff));
        assert_eq!(lsl_limit(0x13, data(0), 0), None);
        assert_eq!(lsl_limit(0x10, data(0), 3), None);
        // Conforming code is visible at any level; page granularity scales the limit.
        let conforming = 0xf | (0x9c << 40) | (1 << 55);
        assert_eq!(lsl_limit(0x0b, conforming, 3), Some(0xffff));
        // System descriptors: a 64-bit TSS yes, an interrupt gate no.
        assert_eq!(lsl_limit(0x40, 0x67 | (0x89 << 40), 0), Some(0x67));
        assert_eq!(lsl_limit(0x40, 0x67 | (0x8e << 40), 0), None);
    }

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
    fn mxcsr_memory_operands_decode() {
        // ldmxcsr [rsp+4], as in Linux's kernel_fpu_begin.
        let f = classify(&[0x0f, 0xae, 0x54, 0x24, 0x04, 0x83], 0).unwrap();
        let Fixup::Mxcsr { len, load, mem } = f else {
            panic!("{f:?}")
        };
        assert_eq!((len, load), (5, true));
        assert_eq!(mem.base, Some(4));
        assert_eq!(mem.disp, 4);
        let mut regs = kvm_bindings::kvm_regs {
            rsp: 0x8000,
            rip: 0x1000,
            ..Default::default()
        };
        let sregs = kvm_bindings::kvm_sregs::default();
        assert_eq!(linear_address(&mem, &mut regs, &sregs, len), 0x8004);
        // stmxcsr [rip+0x10] and stmxcsr gs:[r9*8+rax+0x100].
        let f = classify(&[0x0f, 0xae, 0x1d, 0x10, 0, 0, 0], 0).unwrap();
        let Fixup::Mxcsr { len, load, mem } = f else {
            panic!("{f:?}")
        };
        assert_eq!((len, load), (7, false));
        assert_eq!(
            linear_address(&mem, &mut regs, &sregs, len),
            0x1000 + 7 + 0x10
        );
        let f = classify(&[0x65, 0x42, 0x0f, 0xae, 0x9c, 0xc8, 0, 1, 0, 0], 0).unwrap();
        let Fixup::Mxcsr { len, mem, .. } = f else {
            panic!("{f:?}")
        };
        assert_eq!(len, 10);
        let mut regs = kvm_bindings::kvm_regs {
            rax: 0x10,
            r9: 2,
            ..Default::default()
        };
        let mut sregs = kvm_bindings::kvm_sregs::default();
        sregs.gs.base = 0x7000_0000;
        assert_eq!(
            linear_address(&mem, &mut regs, &sregs, len),
            0x7000_0000 + 0x10 + 16 + 0x100
        );
        // fxsave (/0) is not ours.
        assert_eq!(classify(&[0x0f, 0xae, 0x04, 0x24], 0), None);
    }

    #[test]
    fn fwait_is_skipped() {
        assert_eq!(classify(&[0x9b, 0x65], 0), Some(Fixup::Skip { len: 1 }));
    }

    #[test]
    fn clac_and_stac_are_recognised() {
        assert_eq!(
            classify(&[0x0f, 0x01, 0xca, 0xfc], 0),
            Some(Fixup::SetAc { on: false })
        );
        assert_eq!(
            classify(&[0x0f, 0x01, 0xcb], 0),
            Some(Fixup::SetAc { on: true })
        );
        assert_eq!(classify(&[0x0f, 0x01, 0xca], 3), None);
    }

    #[test]
    fn popcnt_from_linux_is_emulated() {
        // popcnt rax, rdi (as Linux's hweight64 emits it).
        let fix = classify(&[0xf3, 0x48, 0x0f, 0xb8, 0xc7, 0x41], 0).unwrap();
        let mut regs = kvm_bindings::kvm_regs {
            rdi: 0xf0f0_0000_0000_0001,
            rip: 0x1000,
            rflags: 0x2 | FLAG_ZF | FLAG_CF,
            ..Default::default()
        };
        apply_bitcount(&mut regs, fix);
        assert_eq!(regs.rax, 9);
        assert_eq!(regs.rip, 0x1005);
        assert_eq!(regs.rflags & (FLAG_ZF | FLAG_CF), 0);
    }

    #[test]
    fn bitcounts_with_rex_and_sizes() {
        // popcnt r9d, r10d: REX.R + REX.B, 32-bit, zero source sets ZF.
        let fix = classify(&[0xf3, 0x45, 0x0f, 0xb8, 0xca], 0).unwrap();
        let mut regs = kvm_bindings::kvm_regs {
            r9: u64::MAX,
            r10: 0xffff_ffff_0000_0000,
            ..Default::default()
        };
        apply_bitcount(&mut regs, fix);
        assert_eq!(regs.r9, 0);
        assert_ne!(regs.rflags & FLAG_ZF, 0);
        // tzcnt eax, ecx and lzcnt eax, ecx.
        let mut regs = kvm_bindings::kvm_regs {
            rcx: 0x100,
            ..Default::default()
        };
        apply_bitcount(&mut regs, classify(&[0xf3, 0x0f, 0xbc, 0xc1], 0).unwrap());
        assert_eq!(regs.rax, 8);
        apply_bitcount(&mut regs, classify(&[0xf3, 0x0f, 0xbd, 0xc1], 0).unwrap());
        assert_eq!(regs.rax, 23);
        regs.rcx = 0;
        apply_bitcount(&mut regs, classify(&[0xf3, 0x0f, 0xbd, 0xc1], 0).unwrap());
        assert_eq!(regs.rax, 32);
        assert_ne!(regs.rflags & FLAG_CF, 0);
        // A memory operand is not handled.
        assert_eq!(classify(&[0xf3, 0x48, 0x0f, 0xb8, 0x07], 0), None);
    }

    #[test]
    fn other_instructions_and_user_mode_are_not() {
        assert_eq!(classify(&[0xcc], 3), None);
        assert_eq!(classify(&[0x0f, 0xae, 0x2f], 0), None);
        assert_eq!(classify(&[0xcd], 0), None);
        assert_eq!(classify(&[], 0), None);
    }

    /// An IDT at 0x1000 (limit for 64 gates) whose gate `n` is written by `gate`, and a
    /// GDT at 0x2000 with a present 64-bit code segment at 0x10 and a not-present one at
    /// 0x18.
    fn tables(gate: impl Fn(u8) -> [u8; 16]) -> (kvm_bindings::kvm_sregs, Vec<u8>) {
        let mut mem = vec![0u8; 0x3000];
        for n in 0..64u8 {
            let at = 0x1000 + usize::from(n) * 16;
            mem[at..at + 16].copy_from_slice(&gate(n));
        }
        mem[0x2010..0x2018].copy_from_slice(&[0xff, 0xff, 0, 0, 0, 0x9b, 0xaf, 0]);
        mem[0x2018..0x2020].copy_from_slice(&[0xff, 0xff, 0, 0, 0, 0x1b, 0xaf, 0]);
        let mut sregs = kvm_bindings::kvm_sregs {
            efer: 0x500, // LME | LMA
            ..Default::default()
        };
        (sregs.idt.base, sregs.idt.limit) = (0x1000, 64 * 16 - 1);
        (sregs.gdt.base, sregs.gdt.limit) = (0x2000, 0x1f);
        (sregs, mem)
    }

    fn interrupt_gate(selector: u16, present: bool) -> [u8; 16] {
        let mut g = [0u8; 16];
        g[2..4].copy_from_slice(&selector.to_le_bytes());
        g[5] = 0x0e | if present { 0x80 } else { 0 };
        g
    }

    fn check(sregs: &kvm_bindings::kvm_sregs, mem: &[u8], vector: u8) -> Option<GateFault> {
        gate_fault(sregs, vector, |va, buf| {
            let at = va as usize;
            match mem.get(at..at + buf.len()) {
                Some(src) => {
                    buf.copy_from_slice(src);
                    true
                }
                None => false,
            }
        })
    }

    #[test]
    fn a_good_gate_raises_nothing() {
        let (sregs, mem) = tables(|_| interrupt_gate(0x10, true));
        assert_eq!(check(&sregs, &mem, 33), None);
    }

    #[test]
    fn a_gate_whose_code_segment_is_absent_raises_np_with_its_selector() {
        // kvm-unit-tests' eventinj "NP exception".
        let (sregs, mem) = tables(|n| interrupt_gate(if n == 33 { 0x18 } else { 0x10 }, true));
        assert_eq!(
            check(&sregs, &mem, 33),
            Some(GateFault {
                vector: 11,
                error_code: 0x18
            })
        );
        assert_eq!(check(&sregs, &mem, 34), None);
        let legacy = kvm_bindings::kvm_sregs { efer: 0, ..sregs };
        assert_eq!(
            check(&legacy, &mem, 33),
            None,
            "not in long mode: not checked"
        );
    }

    #[test]
    fn absent_missing_and_wrong_gates_raise_np_or_gp_naming_the_vector() {
        let (sregs, mem) = tables(|n| match n {
            40 => interrupt_gate(0x10, false),
            41 => [0; 16],
            42 => interrupt_gate(0, true),
            43 => interrupt_gate(0x28, true), // past the GDT's limit
            _ => interrupt_gate(0x10, true),
        });
        let f = |vector, error_code| Some(GateFault { vector, error_code });
        assert_eq!(check(&sregs, &mem, 40), f(11, 40 * 8 + 2));
        assert_eq!(check(&sregs, &mem, 41), f(13, 41 * 8 + 2));
        assert_eq!(check(&sregs, &mem, 42), f(13, 0));
        assert_eq!(check(&sregs, &mem, 43), f(13, 0x28));
        assert_eq!(
            check(&sregs, &mem, 64),
            f(13, 64 * 8 + 2),
            "past the IDT's limit"
        );
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
