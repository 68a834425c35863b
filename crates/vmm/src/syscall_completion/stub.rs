//! The in-guest stub that finishes a SYSCALL the host left at CPL3, and IDT gates.
//!
//! The stub is written by dvmm into unused `int3` padding of the guest's kernel text and
//! IDT gate 14 (#PF) is pointed at it; with `int n` completion, gate 6 (#UD) too.
//!
//! - **#PF entry**: a fault whose frame says "RIP = LSTAR, from CPL3, IF clear" is the
//!   host's unfinished SYSCALL (RCX, R11 and the FMASK-masked RFLAGS are already right;
//!   only CS/SS are still the user's). A user program that jumps to LSTAR itself faults
//!   the same way but with IF set (user code cannot clear IF), so it is not taken for a
//!   system call. The stub enters LSTAR as SYSCALL would: SS = STAR\[47:32\] + 8,
//!   RFLAGS = the frame's minus RF, RSP = the user's; the CPU already loaded the kernel
//!   CS from the gate. Anything else goes to the guest's own #PF handler.
//! - **#UD entry**: from CPL3 it executes `hlt`, an exit that dvmm recognises by RIP
//!   and completes (`int $0x80` and other `int n` the host turned into #UD); from CPL0
//!   (e.g. Linux's `ud2` for BUG/WARN) it goes straight to the guest's handler.
//!
//! Layout (offsets in the 136-byte block):
//!
//! ```text
//! 0x00 pf_entry:  endbr64
//! 0x04            cmpl  $LSTAR[31:0], 8(%rsp)      frame RIP, low half
//! 0x0c            jne   to_orig_pf
//! 0x0e            cmpl  $LSTAR[63:32], 12(%rsp)    frame RIP, high half
//! 0x16            jne   to_orig_pf
//! 0x18            testb $3, 16(%rsp)               frame CS: from CPL3?
//! 0x1d            je    to_orig_pf
//! 0x1f            testl $0x200, 24(%rsp)           frame RFLAGS.IF: masked by FMASK?
//! 0x27            jne   to_orig_pf
//! 0x29            andl  $~RF, 24(%rsp)
//! 0x31            pushq 24(%rsp)
//! 0x35            popfq                            RFLAGS as SYSCALL leaves them
//! 0x36            movw  kss(%rip), %ss
//! 0x3c            movq  32(%rsp), %rsp             the user's RSP
//! 0x41            jmpq  *lstar(%rip)
//! 0x47 to_orig_pf: jmpq *orig_pf(%rip)
//! 0x4d ud_entry:  endbr64
//! 0x51            testb $3, 8(%rsp)                frame CS: from CPL3?
//! 0x56            je    to_orig_ud
//! 0x58 ud_hlt:    hlt                              dvmm sets RIP
//! 0x59 to_orig_ud: jmpq *orig_ud(%rip)
//! 0x60 lstar, 0x68 orig_pf, 0x70 orig_ud (u64), 0x78 kss (u16), 0x80 "dvmmSYS1"
//! ```

/// Length of the stub block.
pub const STUB_LEN: usize = 0x88;
/// Offset of the #PF entry (gate 14's target).
pub const PF_ENTRY: u64 = 0x00;
/// Offset of the #UD entry (gate 6's target).
pub const UD_ENTRY: u64 = 0x4d;
/// Offset of the `hlt` in the #UD path; its HLT exit has RIP = this + 1.
pub const UD_HLT: u64 = 0x58;

const LSTAR_LO_IMM: usize = 0x08;
const LSTAR_HI_IMM: usize = 0x12;
const SLOT_LSTAR: usize = 0x60;
const SLOT_ORIG_PF: usize = 0x68;
const SLOT_ORIG_UD: usize = 0x70;
const SLOT_KSS: usize = 0x78;
const SIGNATURE_AT: usize = 0x80;
const SIGNATURE: &[u8; 8] = b"dvmmSYS1";

/// The code, with zeros where [`build`] puts the values; bytes 0x5f and 0x7a-0x7f are
/// never executed (int3).
const TEMPLATE: [u8; STUB_LEN] = [
    0xf3, 0x0f, 0x1e, 0xfa, // endbr64
    0x81, 0x7c, 0x24, 0x08, 0, 0, 0, 0, // cmpl $imm32, 8(%rsp)
    0x75, 0x39, // jne 0x47
    0x81, 0x7c, 0x24, 0x0c, 0, 0, 0, 0, // cmpl $imm32, 12(%rsp)
    0x75, 0x2f, // jne 0x47
    0xf6, 0x44, 0x24, 0x10, 0x03, // testb $3, 16(%rsp)
    0x74, 0x28, // je 0x47
    0xf7, 0x44, 0x24, 0x18, 0x00, 0x02, 0x00, 0x00, // testl $0x200, 24(%rsp)
    0x75, 0x1e, // jne 0x47
    0x81, 0x64, 0x24, 0x18, 0xff, 0xff, 0xfe, 0xff, // andl $0xfffeffff, 24(%rsp)
    0xff, 0x74, 0x24, 0x18, // pushq 24(%rsp)
    0x9d, // popfq
    0x8e, 0x15, 0x3c, 0x00, 0x00, 0x00, // movw 0x78(%rip-rel), %ss
    0x48, 0x8b, 0x64, 0x24, 0x20, // movq 32(%rsp), %rsp
    0xff, 0x25, 0x19, 0x00, 0x00, 0x00, // jmpq *0x60(%rip-rel)
    0xff, 0x25, 0x1b, 0x00, 0x00, 0x00, // 0x47: jmpq *0x68(%rip-rel)
    0xf3, 0x0f, 0x1e, 0xfa, // 0x4d: endbr64
    0xf6, 0x44, 0x24, 0x08, 0x03, // testb $3, 8(%rsp)
    0x74, 0x01, // je 0x59
    0xf4, // 0x58: hlt
    0xff, 0x25, 0x11, 0x00, 0x00, 0x00, // 0x59: jmpq *0x70(%rip-rel)
    0xcc, // 0x5f
    0, 0, 0, 0, 0, 0, 0, 0, // 0x60 lstar
    0, 0, 0, 0, 0, 0, 0, 0, // 0x68 orig_pf
    0, 0, 0, 0, 0, 0, 0, 0, // 0x70 orig_ud
    0, 0, 0xcc, 0xcc, 0xcc, 0xcc, 0xcc, 0xcc, // 0x78 kss
    b'd', b'v', b'm', b'm', b'S', b'Y', b'S', b'1', // 0x80 signature
];

/// What a stub is built from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StubParams {
    /// The guest's IA32_LSTAR (its 64-bit system-call entry).
    pub lstar: u64,
    /// The kernel stack segment SYSCALL loads: STAR\[47:32\] + 8.
    pub kernel_ss: u16,
    /// The guest's own #PF handler.
    pub orig_pf: u64,
    /// The guest's own #UD handler (0 if gate 6 is not redirected).
    pub orig_ud: u64,
}

fn put_u64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

fn get_u64(b: &[u8], at: usize) -> u64 {
    let mut v = [0u8; 8];
    v.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(v)
}

/// The stub's bytes for `p` (position-independent).
pub fn build(p: &StubParams) -> [u8; STUB_LEN] {
    let mut b = TEMPLATE;
    b[LSTAR_LO_IMM..LSTAR_LO_IMM + 4].copy_from_slice(&(p.lstar as u32).to_le_bytes());
    b[LSTAR_HI_IMM..LSTAR_HI_IMM + 4].copy_from_slice(&((p.lstar >> 32) as u32).to_le_bytes());
    put_u64(&mut b, SLOT_LSTAR, p.lstar);
    put_u64(&mut b, SLOT_ORIG_PF, p.orig_pf);
    put_u64(&mut b, SLOT_ORIG_UD, p.orig_ud);
    b[SLOT_KSS..SLOT_KSS + 2].copy_from_slice(&p.kernel_ss.to_le_bytes());
    b
}

/// Recognises a stub dvmm wrote (possibly on another node, or before a reset of this
/// process's state) and returns its parameters.
pub fn parse(bytes: &[u8]) -> Option<StubParams> {
    if bytes.len() < STUB_LEN || &bytes[SIGNATURE_AT..SIGNATURE_AT + 8] != SIGNATURE {
        return None;
    }
    let lstar = get_u64(bytes, SLOT_LSTAR);
    let p = StubParams {
        lstar,
        kernel_ss: u16::from_le_bytes([bytes[SLOT_KSS], bytes[SLOT_KSS + 1]]),
        orig_pf: get_u64(bytes, SLOT_ORIG_PF),
        orig_ud: get_u64(bytes, SLOT_ORIG_UD),
    };
    (build(&p)[..] == bytes[..STUB_LEN]).then_some(p)
}

/// The kernel SS that SYSCALL loads for `star`.
pub fn kernel_ss(star: u64) -> u16 {
    (((star >> 32) as u16) & 0xfffc).wrapping_add(8)
}

/// Finds room for a stub in one page of kernel text: a run of at least `MIN_RUN` int3
/// bytes starting at a 16-byte boundary. Returns the offset for the stub, `SKIP`
/// bytes into the run (so that the run's first bytes stay int3).
pub fn find_room(page: &[u8]) -> Option<usize> {
    const MIN_RUN: usize = 256;
    const SKIP: usize = 64;
    let mut start = 0;
    while start + MIN_RUN <= page.len() {
        match page[start..start + MIN_RUN]
            .iter()
            .rposition(|&b| b != 0xcc)
        {
            None => return Some(start + SKIP),
            // Skip past the last non-int3 byte, to the next 16-byte boundary.
            Some(i) => start = (start + i + 1).next_multiple_of(16),
        }
    }
    None
}

/// An IDT gate descriptor (long mode, 16 bytes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Gate {
    /// Handler address.
    pub offset: u64,
    /// Code segment selector.
    pub selector: u16,
    /// Interrupt stack table index (0 = none).
    pub ist: u8,
    /// Gate type: 0xE interrupt gate, 0xF trap gate.
    pub kind: u8,
    /// Descriptor privilege level (who may `int n` through it).
    pub dpl: u8,
    /// Present bit.
    pub present: bool,
}

impl Gate {
    /// Decodes a raw descriptor.
    pub fn decode(raw: &[u8; 16]) -> Gate {
        let lo = get_u64(raw, 0);
        let hi = get_u64(raw, 8);
        Gate {
            offset: (lo & 0xffff) | ((lo >> 32) & 0xffff_0000) | ((hi & 0xffff_ffff) << 32),
            selector: (lo >> 16) as u16,
            ist: ((lo >> 32) & 7) as u8,
            kind: ((lo >> 40) & 0xf) as u8,
            dpl: ((lo >> 45) & 3) as u8,
            present: lo & (1 << 47) != 0,
        }
    }

    /// A usable 64-bit interrupt or trap gate.
    pub fn is_valid(&self) -> bool {
        self.present && (self.kind == 0xe || self.kind == 0xf)
    }

    /// `raw` with its handler address replaced by `offset` (all else kept).
    pub fn with_offset(raw: &[u8; 16], offset: u64) -> [u8; 16] {
        let mut out = *raw;
        out[0..2].copy_from_slice(&(offset as u16).to_le_bytes());
        out[6..8].copy_from_slice(&((offset >> 16) as u16).to_le_bytes());
        out[8..12].copy_from_slice(&((offset >> 32) as u32).to_le_bytes());
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: StubParams = StubParams {
        lstar: 0xffff_ffff_8160_0080,
        kernel_ss: 0x18,
        orig_pf: 0xffff_ffff_8160_1230,
        orig_ud: 0xffff_ffff_8160_0aa0,
    };

    #[test]
    fn build_places_values_and_parse_recognises_them() {
        let b = build(&P);
        assert_eq!(&b[8..12], &0x8160_0080u32.to_le_bytes());
        assert_eq!(&b[0x12..0x16], &0xffff_ffffu32.to_le_bytes());
        assert_eq!(parse(&b), Some(P));
        let mut other = b;
        other[0x30] ^= 1; // a guest wrote into the code
        assert_eq!(parse(&other), None);
        assert_eq!(parse(&[0xcc; STUB_LEN]), None);
    }

    #[test]
    fn rip_relative_operands_reach_their_slots() {
        // Each rip-relative operand: disp32 at `at`, instruction ends at `end`.
        let b = build(&P);
        for (at, end, slot) in [
            (0x38usize, 0x3cusize, SLOT_KSS),
            (0x43, 0x47, SLOT_LSTAR),
            (0x49, 0x4d, SLOT_ORIG_PF),
            (0x5b, 0x5f, SLOT_ORIG_UD),
        ] {
            let disp = u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]) as usize;
            assert_eq!(end + disp, slot, "operand at {at:#x}");
        }
        // Short jumps land on the orig paths.
        assert_eq!(0x0e + b[0x0d] as usize, 0x47);
        assert_eq!(0x18 + b[0x17] as usize, 0x47);
        assert_eq!(0x1f + b[0x1e] as usize, 0x47);
        assert_eq!(0x29 + b[0x28] as usize, 0x47);
        assert_eq!(0x58 + b[0x57] as usize, 0x59);
        assert_eq!(b[UD_HLT as usize], 0xf4);
        assert_eq!(
            &b[UD_ENTRY as usize..UD_ENTRY as usize + 4],
            &[0xf3, 0x0f, 0x1e, 0xfa]
        );
    }

    #[test]
    fn kernel_ss_follows_star() {
        // Linux: STAR\[47:32\] = __KERNEL_CS (0x10), SS = 0x18.
        assert_eq!(kernel_ss(0x0023_0010_0000_0000), 0x18);
    }

    #[test]
    fn room_is_found_only_in_long_int3_runs() {
        let mut page = vec![0x90u8; 4096];
        assert_eq!(find_room(&page), None);
        page[0x105..0x105 + 260].fill(0xcc); // 260 bytes, but only 245 from 0x110
        assert_eq!(find_room(&page), None);
        page[0x105..0x105 + 400].fill(0xcc);
        assert_eq!(find_room(&page), Some(0x110 + 64));
        let all = vec![0xccu8; 4096];
        assert_eq!(find_room(&all), Some(64));
    }

    #[test]
    fn gates_decode_and_keep_everything_but_the_offset() {
        // Linux-like: selector 0x10, IST 0, interrupt gate, DPL 0, present.
        let h: u64 = 0xffff_ffff_8120_1a70;
        let mut raw = [0u8; 16];
        raw[0..2].copy_from_slice(&(h as u16).to_le_bytes());
        raw[2..4].copy_from_slice(&0x10u16.to_le_bytes());
        raw[5] = 0x8e;
        raw[6..8].copy_from_slice(&((h >> 16) as u16).to_le_bytes());
        raw[8..12].copy_from_slice(&((h >> 32) as u32).to_le_bytes());
        let g = Gate::decode(&raw);
        assert_eq!(
            (g.offset, g.selector, g.kind, g.dpl, g.ist),
            (h, 0x10, 0xe, 0, 0)
        );
        assert!(g.present && g.is_valid());
        let moved = Gate::with_offset(&raw, 0xffff_ffff_8160_0040);
        let m = Gate::decode(&moved);
        assert_eq!(m.offset, 0xffff_ffff_8160_0040);
        assert_eq!((m.selector, m.kind, m.dpl, m.present), (0x10, 0xe, 0, true));
        raw[5] = 0xee; // DPL 3 (Linux's int $0x80 gate)
        assert_eq!(Gate::decode(&raw).dpl, 3);
    }
}
