//! The completion against a fake Linux-shaped guest in flat memory (no /dev/kvm).

use super::*;
use crate::guest_paging::tests::{map_4k, FlatMemory};

const CR3: u64 = 0x1000;
const KTEXT_VA: u64 = 0xffff_ffff_8160_0000; // a 2 MiB-aligned entry text
const KTEXT_GPA: u64 = 0x20_0000;
const IDT_VA: u64 = 0xffff_fe00_0000_0000;
const IDT_GPA: u64 = 0x1_0000;
const USER_VA: u64 = 0x40_0000;
const USER_GPA: u64 = 0x3_0000;
const STACK_VA: u64 = 0xffff_fe00_0000_8000;
const STACK_GPA: u64 = 0x1_8000;
const LSTAR: u64 = KTEXT_VA + 0x40;
const PF_HANDLER: u64 = KTEXT_VA + 0x1000;
const UD_HANDLER: u64 = KTEXT_VA + 0x1100;
const INT80_HANDLER: u64 = KTEXT_VA + 0x1200;
const STAR: u64 = 0x0023_0010_0000_0000;
const PRESENT: u64 = 1;
const WRITE: u64 = 2;
const USER: u64 = 4;

fn raw_gate(handler: u64, dpl: u8, kind: u8) -> [u8; 16] {
    let mut g = [0u8; 16];
    g[0..2].copy_from_slice(&(handler as u16).to_le_bytes());
    g[2..4].copy_from_slice(&0x10u16.to_le_bytes());
    g[5] = 0x80 | (dpl << 5) | kind;
    g[6..8].copy_from_slice(&((handler >> 16) as u16).to_le_bytes());
    g[8..12].copy_from_slice(&((handler >> 32) as u32).to_le_bytes());
    g
}

struct Guest {
    mem: FlatMemory,
}

impl Guest {
    /// Kernel text: entry code for 2 pages, then int3 padding up to 4 pages (the rest
    /// of the 2 MiB region unmapped); an IDT; a user page; a kernel stack page.
    fn new() -> Guest {
        let mem = FlatMemory::new(4 << 20);
        let mut next = 0x2000;
        for i in 0..4u64 {
            map_4k(
                &mem,
                CR3,
                KTEXT_VA + i * 4096,
                KTEXT_GPA + i * 4096,
                PRESENT,
                &mut next,
            );
        }
        map_4k(&mem, CR3, IDT_VA, IDT_GPA, PRESENT, &mut next);
        map_4k(
            &mem,
            CR3,
            USER_VA,
            USER_GPA,
            PRESENT | USER | WRITE,
            &mut next,
        );
        map_4k(&mem, CR3, STACK_VA, STACK_GPA, PRESENT | WRITE, &mut next);
        mem.write(KTEXT_GPA, &vec![0x90; 2 * 4096]).unwrap();
        mem.write(KTEXT_GPA + 2 * 4096, &vec![0xcc; 2 * 4096])
            .unwrap();
        let g = Guest { mem };
        g.set_gate(14, PF_HANDLER, 0);
        g.set_gate(6, UD_HANDLER, 0);
        g.set_gate(0x80, INT80_HANDLER, 3);
        g
    }

    fn set_gate(&self, v: u64, handler: u64, dpl: u8) {
        self.mem
            .write(IDT_GPA + v * 16, &raw_gate(handler, dpl, 0xe))
            .unwrap();
    }

    fn gate(&self, v: u64) -> Gate {
        let mut raw = [0u8; 16];
        self.mem.read(IDT_GPA + v * 16, &mut raw).unwrap();
        Gate::decode(&raw)
    }

    fn stub_at(&self, va: u64) -> Option<StubParams> {
        let gpa = va - KTEXT_VA + KTEXT_GPA;
        stub::parse(&self.mem.get(gpa, STUB_LEN))
    }
}

fn sregs() -> kvm_sregs {
    kvm_sregs {
        cr3: CR3,
        idt: kvm_bindings::kvm_dtable {
            base: IDT_VA,
            limit: 4095,
            ..Default::default()
        },
        ..Default::default()
    }
}

fn armed(host_ud: bool) -> (Guest, SyscallCompletion) {
    let g = Guest::new();
    let c = SyscallCompletion::new(HostSyscall {
        syscall_stays_at_cpl3: true,
        int_n_raises_ud: host_ud,
    });
    // Linux's order: STAR, LSTAR, ..., FMASK.
    c.msr_written(MSR_STAR, STAR, &sregs(), &g.mem);
    assert!(
        g.stub_at(g.gate(14).offset).is_none(),
        "nothing before LSTAR"
    );
    c.msr_written(MSR_LSTAR, LSTAR, &sregs(), &g.mem);
    c.msr_written(MSR_FMASK, 0x4_7700, &sregs(), &g.mem);
    (g, c)
}

#[test]
fn installs_into_int3_padding_at_lstar() {
    let (g, c) = armed(true);
    let pf = g.gate(14);
    let p = g.stub_at(pf.offset).expect("gate 14 points at a stub");
    assert_eq!(
        p,
        StubParams {
            lstar: LSTAR,
            kernel_ss: 0x18,
            orig_pf: PF_HANDLER,
            orig_ud: UD_HANDLER,
        }
    );
    // 64 bytes into the first 256-byte int3 run after the entry code.
    assert_eq!(pf.offset, KTEXT_VA + 2 * 4096 + 64);
    assert_eq!(
        (pf.selector, pf.kind, pf.dpl),
        (0x10, 0xe, 0),
        "only the offset changed"
    );
    assert_eq!(g.gate(6).offset, pf.offset + stub::UD_ENTRY);
    assert!(c.is_ud_exit(pf.offset + stub::UD_HLT + 1));
    assert_eq!(c.stats.installs.load(Ordering::Relaxed), 1);
}

#[test]
fn inert_where_the_host_completes_syscall() {
    let g = Guest::new();
    let c = SyscallCompletion::new(HostSyscall::default());
    c.msr_written(MSR_STAR, STAR, &sregs(), &g.mem);
    c.msr_written(MSR_LSTAR, LSTAR, &sregs(), &g.mem);
    c.verify(u64::MAX, true, &sregs(), &g.mem);
    assert_eq!(g.gate(14).offset, PF_HANDLER);
    assert!(!c.is_ud_exit(0));
    assert!(c.summary().is_none());
}

#[test]
fn without_int_n_trouble_gate_6_stays() {
    let (g, _) = armed(false);
    assert!(g.stub_at(g.gate(14).offset).is_some());
    assert_eq!(g.gate(6).offset, UD_HANDLER);
}

#[test]
fn a_rewritten_gate_is_taken_over_with_the_new_handler() {
    let (g, c) = armed(true);
    let stub_va = g.gate(14).offset;
    // The guest reinstalls its IDT with a new #PF handler (as Linux's trap_init does
    // after the early #PF handler).
    let new_pf = KTEXT_VA + 0x1800;
    g.set_gate(14, new_pf, 0);
    g.set_gate(6, UD_HANDLER, 0);
    c.verify(0, false, &sregs(), &g.mem); // not due yet: nothing happens
    assert_eq!(g.gate(14).offset, new_pf);
    c.verify(VERIFY_INTERVAL_NS, false, &sregs(), &g.mem);
    assert_eq!(g.gate(14).offset, stub_va, "same place");
    assert_eq!(g.stub_at(stub_va).unwrap().orig_pf, new_pf);
    assert_eq!(g.stub_at(stub_va).unwrap().orig_ud, UD_HANDLER);
    assert_eq!(c.stats.installs.load(Ordering::Relaxed), 2);
    // Steady state: nothing is written again.
    c.verify(u64::MAX, true, &sregs(), &g.mem);
    assert_eq!(c.stats.installs.load(Ordering::Relaxed), 2);
}

#[test]
fn overwritten_stub_moves_and_keeps_the_guest_handler() {
    let (g, c) = armed(true);
    let old = g.gate(14).offset;
    // The guest reuses the padding where the stub was (gate 14 still points there).
    let gpa = old - KTEXT_VA + KTEXT_GPA;
    g.mem.write(gpa - 64, &[0x55; 512]).unwrap();
    c.verify(0, true, &sregs(), &g.mem);
    let new = g.gate(14).offset;
    assert_ne!(new, old);
    let p = g.stub_at(new).expect("a new stub");
    assert_eq!(p.orig_pf, PF_HANDLER, "not the overwritten place");
    assert_eq!(p.orig_ud, UD_HANDLER);
    assert_eq!(
        g.mem.get(gpa, 4),
        [0x55; 4],
        "the guest's bytes are left alone"
    );
}

#[test]
fn a_new_lstar_rewrites_the_stub_in_place() {
    let (g, c) = armed(true);
    let va = g.gate(14).offset;
    c.msr_written(MSR_LSTAR, LSTAR + 0x100, &sregs(), &g.mem);
    assert_eq!(g.gate(14).offset, va);
    assert_eq!(g.stub_at(va).unwrap().lstar, LSTAR + 0x100);
    assert_eq!(g.stub_at(va).unwrap().orig_pf, PF_HANDLER);
}

#[test]
fn a_second_node_finds_the_same_stub() {
    // Another node's completion (fresh state) over the same memory adopts the stub.
    let (g, _) = armed(true);
    let va = g.gate(14).offset;
    let other = SyscallCompletion::new(HostSyscall {
        syscall_stays_at_cpl3: true,
        int_n_raises_ud: true,
    });
    other.msr_written(MSR_STAR, STAR, &sregs(), &g.mem);
    other.msr_written(MSR_LSTAR, LSTAR, &sregs(), &g.mem);
    assert_eq!(g.gate(14).offset, va);
    assert_eq!(
        g.stub_at(va).unwrap().orig_pf,
        PF_HANDLER,
        "not its own stub"
    );
    assert_eq!(
        other.stats.installs.load(Ordering::Relaxed),
        0,
        "nothing to write"
    );
    assert!(other.is_ud_exit(va + stub::UD_HLT + 1));
}

#[test]
fn no_padding_is_reported_and_not_searched_again() {
    let g = Guest::new();
    g.mem
        .write(KTEXT_GPA + 2 * 4096, &vec![0x90; 2 * 4096])
        .unwrap();
    let c = SyscallCompletion::new(HostSyscall {
        syscall_stays_at_cpl3: true,
        int_n_raises_ud: true,
    });
    c.msr_written(MSR_STAR, STAR, &sregs(), &g.mem);
    c.msr_written(MSR_LSTAR, LSTAR, &sregs(), &g.mem);
    assert_eq!(g.gate(14).offset, PF_HANDLER);
    let st = c.lock();
    assert_eq!(st.no_room_for, Some(LSTAR));
    assert!(st
        .last_failure
        .as_deref()
        .unwrap_or("")
        .contains("int3 padding"));
}

/// Puts a #UD frame for user code at `user_rip` on the kernel stack; returns regs as
/// the stub's HLT exit leaves them.
fn ud_exit(g: &Guest, c: &SyscallCompletion, insn: &[u8]) -> kvm_regs {
    let user_rip = USER_VA + 0x100;
    g.mem.write(USER_GPA + 0x100, insn).unwrap();
    let frame = [user_rip, 0x33, 0x246, USER_VA + 0xf00, 0x2b];
    for (i, v) in frame.iter().enumerate() {
        g.mem.put_u64(STACK_GPA + 0x800 + i as u64 * 8, *v);
    }
    let stub_va = g.gate(14).offset;
    let regs = kvm_regs {
        rip: stub_va + stub::UD_HLT + 1,
        rsp: STACK_VA + 0x800,
        rflags: 0x2,
        ..Default::default()
    };
    assert!(c.is_ud_exit(regs.rip));
    regs
}

#[test]
fn int_0x80_from_user_enters_its_gate() {
    let (g, c) = armed(true);
    let mut regs = ud_exit(&g, &c, &[0xcd, 0x80]);
    assert_eq!(
        c.complete_ud(&mut regs, &sregs(), &g.mem),
        Some(UdOutcome::IntN(0x80))
    );
    assert_eq!(regs.rip, INT80_HANDLER);
    assert_eq!(regs.rflags & RFLAGS_IF, 0, "interrupt gate: IF stays clear");
    let mut rip = [0u8; 8];
    g.mem.read(STACK_GPA + 0x800, &mut rip).unwrap();
    assert_eq!(
        u64::from_le_bytes(rip),
        USER_VA + 0x102,
        "returns past the int"
    );
}

#[test]
fn trap_gates_keep_the_users_if() {
    let (g, c) = armed(true);
    g.mem
        .write(IDT_GPA + 0x81 * 16, &raw_gate(INT80_HANDLER + 8, 3, 0xf))
        .unwrap();
    let mut regs = ud_exit(&g, &c, &[0xcd, 0x81]);
    assert_eq!(
        c.complete_ud(&mut regs, &sregs(), &g.mem),
        Some(UdOutcome::IntN(0x81))
    );
    assert_eq!(regs.rip, INT80_HANDLER + 8);
    assert_ne!(regs.rflags & RFLAGS_IF, 0);
}

#[test]
fn genuine_ud_and_privileged_gates_go_to_the_guests_handler() {
    let (g, c) = armed(true);
    for insn in [&[0x0f, 0x0b][..], &[0xcd, 0x0e]] {
        // ud2; int $14 through a DPL0 gate
        let mut regs = ud_exit(&g, &c, insn);
        assert_eq!(
            c.complete_ud(&mut regs, &sregs(), &g.mem),
            Some(UdOutcome::Passed)
        );
        assert_eq!(regs.rip, UD_HANDLER);
        let mut rip = [0u8; 8];
        g.mem.read(STACK_GPA + 0x800, &mut rip).unwrap();
        assert_eq!(u64::from_le_bytes(rip), USER_VA + 0x100, "frame untouched");
    }
    assert_eq!(c.stats.ud_passed.load(Ordering::Relaxed), 2);
}
