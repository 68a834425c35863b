use super::*;
use proptest::prelude::*;

const TSC: TscMap = TscMap {
    tsc_khz: 2_000_000,
    base_ns: 0,
    ref_tsc: 0,
};
const T0: u64 = 1_000_000;
const X2APIC_ON: u64 = 0xFEE0_0000 | APIC_BASE_EN | APIC_BASE_EXTD;

fn enabled_lapic(id: u32) -> Lapic {
    let mut l = Lapic::new(id, id == 0, TSC);
    l.mmio_write(REG_SVR, 0x1FF, 0);
    l
}

fn x2apic_lapic(id: u32) -> Lapic {
    let mut l = Lapic::new(id, id == 0, TSC);
    l.msr_write(MSR_IA32_APIC_BASE, X2APIC_ON, 0).unwrap();
    l.msr_write(0x80F, 0x1FF, 0).unwrap();
    l
}

fn fixed(vector: u8) -> InterruptMessage {
    InterruptMessage::fixed(vector, 0)
}

fn level(vector: u8) -> InterruptMessage {
    InterruptMessage {
        trigger: TriggerMode::Level,
        ..fixed(vector)
    }
}

fn gp(msr: u32) -> LapicError {
    LapicError::GeneralProtection { msr }
}

#[test]
fn power_on_registers() {
    let mut l = Lapic::new(3, false, TSC);
    assert_eq!(l.mmio_read(REG_ID, 0), 3 << 24);
    assert_eq!(l.mmio_read(REG_VERSION, 0), 0x0005_0014);
    assert_eq!(l.mmio_read(REG_SVR, 0), 0xFF);
    assert_eq!(l.mmio_read(REG_DFR, 0), 0xFFFF_FFFF);
    for off in (0x320..=0x370).step_by(16) {
        assert_eq!(l.mmio_read(off, 0), LVT_MASKED, "LVT {off:#x}");
    }
    assert_eq!(l.msr_read(MSR_IA32_APIC_BASE, 0), Ok(0xFEE0_0800));
    let bsp = Lapic::new(0, true, TSC);
    assert!(bsp.is_bsp());
    assert_eq!(bsp.clone().msr_read(MSR_IA32_APIC_BASE, 0), Ok(0xFEE0_0900));
    assert!(l.waiting_for_sipi());
    assert!(!bsp.waiting_for_sipi());
    // Unaligned and unknown offsets read 0.
    assert_eq!(l.mmio_read(REG_VERSION + 4, 0), 0);
    assert_eq!(l.mmio_read(0x400, 0), 0);
    assert_eq!(l.mmio_read(0xFF0, 0), 0);
}

#[test]
fn tpr_masks_by_priority_class() {
    let mut l = enabled_lapic(0);
    assert!(l.accept(&fixed(0x45)));
    l.mmio_write(REG_TPR, 0x50, 0);
    assert_eq!(l.pending_vector(), None);
    assert_eq!(l.mmio_read(REG_PPR, 0), 0x50);
    // Same class as TPR is still blocked.
    l.mmio_write(REG_TPR, 0x40, 0);
    assert_eq!(l.pending_vector(), None);
    l.mmio_write(REG_TPR, 0x3F, 0);
    assert_eq!(l.pending_vector(), Some(0x45));
    // A blocked vector does not ask for a kick.
    l.mmio_write(REG_TPR, 0xF0, 0);
    assert!(!l.accept(&fixed(0x80)));
    assert_eq!(l.acknowledge(), None);
    l.set_tpr(0);
    assert_eq!(l.acknowledge(), Some(0x80));
    assert_eq!(l.tpr(), 0);
}

#[test]
fn nested_isr_ordering_and_eoi() {
    let mut l = enabled_lapic(0);
    l.accept(&fixed(0x50));
    assert_eq!(l.acknowledge(), Some(0x50));
    assert_eq!(l.mmio_read(REG_ISR + 0x20, 0), 1 << 16);
    assert_eq!(l.mmio_read(REG_PPR, 0), 0x50);
    // Lower or equal class waits behind the in-service vector.
    l.accept(&fixed(0x41));
    l.accept(&fixed(0x5F));
    assert_eq!(l.pending_vector(), None);
    // Higher class nests.
    l.accept(&fixed(0x61));
    assert_eq!(l.acknowledge(), Some(0x61));
    assert_eq!(l.pending_vector(), None);
    // EOI retires the highest in-service vector first.
    assert_eq!(l.mmio_write(REG_EOI, 0, 0), None);
    assert_eq!(l.mmio_read(REG_ISR + 0x30, 0), 0);
    assert_eq!(l.pending_vector(), None);
    l.mmio_write(REG_EOI, 0, 0);
    assert_eq!(l.acknowledge(), Some(0x5F));
    l.mmio_write(REG_EOI, 0, 0);
    assert_eq!(l.acknowledge(), Some(0x41));
    l.mmio_write(REG_EOI, 0, 0);
    assert_eq!(l.acknowledge(), None);
    // EOI with nothing in service is harmless.
    assert_eq!(l.mmio_write(REG_EOI, 0, 0), None);
}

#[test]
fn level_eoi_event() {
    let mut l = enabled_lapic(0);
    l.accept(&level(0x70));
    assert_eq!(l.mmio_read(REG_TMR + 0x30, 0), 1 << 16);
    assert_eq!(l.acknowledge(), Some(0x70));
    assert_eq!(
        l.mmio_write(REG_EOI, 0, 0),
        Some(LapicEvent::LevelEoi { vector: 0x70 })
    );
    // Re-accepting as edge clears TMR.
    l.accept(&fixed(0x70));
    assert_eq!(l.acknowledge(), Some(0x70));
    assert_eq!(l.mmio_write(REG_EOI, 0, 0), None);
    // Same in x2APIC mode via MSR.
    let mut x = x2apic_lapic(1);
    x.accept(&level(0x90));
    x.acknowledge();
    assert_eq!(
        x.msr_write(0x80B, 0, 0),
        Ok(Some(LapicEvent::LevelEoi { vector: 0x90 }))
    );
}

#[test]
fn xapic_icr_encodes_ipis() {
    let mut l = enabled_lapic(0);
    assert_eq!(l.mmio_write(REG_ICR_HIGH, 0x0312_3456, 0), None);
    assert_eq!(l.mmio_read(REG_ICR_HIGH, 0), 0x0300_0000);
    let ev = l.mmio_write(REG_ICR_LOW, 0x0000_40F1, 0);
    assert_eq!(ev, Some(LapicEvent::Ipi(InterruptMessage::fixed(0xF1, 3))));
    // Delivery status (bit 12) always reads idle.
    l.mmio_write(REG_ICR_LOW, 0x0000_50F1, 0);
    assert_eq!(l.mmio_read(REG_ICR_LOW, 0), 0x0000_40F1);
    // INIT assert, level.
    let Some(LapicEvent::Ipi(init)) = l.mmio_write(REG_ICR_LOW, 0x0000_C500, 0) else {
        panic!("INIT not sent");
    };
    assert_eq!(init.delivery, DeliveryMode::Init);
    assert_eq!(init.trigger, TriggerMode::Level);
    assert!(init.level);
    assert_eq!(init.destination, 3);
    // INIT level de-assert is not sent at all.
    assert_eq!(l.mmio_write(REG_ICR_LOW, 0x0000_8500, 0), None);
    // SIPI with vector 0x9A.
    let Some(LapicEvent::Ipi(sipi)) = l.mmio_write(REG_ICR_LOW, 0x0000_469A, 0) else {
        panic!("SIPI not sent");
    };
    assert_eq!(sipi.delivery, DeliveryMode::StartUp);
    assert_eq!(sipi.vector, 0x9A);
    // Logical, lowest priority, broadcast destination.
    l.mmio_write(REG_ICR_HIGH, 0xFF00_0000, 0);
    let Some(LapicEvent::Ipi(lp)) = l.mmio_write(REG_ICR_LOW, 0x0000_0931, 0) else {
        panic!("IPI not sent");
    };
    assert_eq!(lp.delivery, DeliveryMode::LowestPriority);
    assert_eq!(lp.dest_mode, DestinationMode::Logical);
    assert_eq!(lp.destination, 0xFF);
}

#[test]
fn shorthands_from_icr() {
    let mut l = enabled_lapic(2);
    let sh = |l: &mut Lapic, bits: u32| match l.mmio_write(REG_ICR_LOW, bits << 18 | 0x40FD, 0) {
        Some(LapicEvent::Ipi(m)) => m.shorthand,
        other => panic!("unexpected {other:?}"),
    };
    assert_eq!(sh(&mut l, 0), Shorthand::None);
    assert_eq!(sh(&mut l, 1), Shorthand::SelfOnly);
    assert_eq!(sh(&mut l, 2), Shorthand::AllIncludingSelf);
    assert_eq!(sh(&mut l, 3), Shorthand::AllExcludingSelf);
}

#[test]
fn illegal_vectors_set_esr() {
    let mut l = enabled_lapic(0);
    assert_eq!(l.mmio_write(REG_ICR_LOW, 0x0000_4005, 0), None);
    assert!(!l.accept(&fixed(0x0E)));
    assert_eq!(l.mmio_read(REG_ESR, 0), 0);
    l.mmio_write(REG_ESR, 0, 0);
    assert_eq!(l.mmio_read(REG_ESR, 0), 0x60);
    l.mmio_write(REG_ESR, 0, 0);
    assert_eq!(l.mmio_read(REG_ESR, 0), 0);
    // NMI via ICR ignores the vector.
    assert!(l.mmio_write(REG_ICR_LOW, 0x0000_4400, 0).is_some());
}

#[test]
fn x2apic_icr_and_self_ipi() {
    let mut l = x2apic_lapic(7);
    let ev = l.msr_write(0x830, 0x0000_0105_0000_40F1, 0).unwrap();
    assert_eq!(
        ev,
        Some(LapicEvent::Ipi(InterruptMessage::fixed(0xF1, 0x105)))
    );
    assert_eq!(l.msr_read(0x830, 0), Ok(0x0000_0105_0000_40F1));
    let ev = l.msr_write(0x830, 0x000C_40F1, 0).unwrap();
    let Some(LapicEvent::Ipi(m)) = ev else {
        panic!("no IPI")
    };
    assert_eq!(m.shorthand, Shorthand::AllExcludingSelf);
    let ev = l.msr_write(0x83F, 0x33, 0).unwrap();
    assert_eq!(
        ev,
        Some(LapicEvent::Ipi(InterruptMessage {
            shorthand: Shorthand::SelfOnly,
            ..InterruptMessage::fixed(0x33, 7)
        }))
    );
    assert_eq!(l.msr_write(0x83F, 0x133, 0), Err(gp(0x83F)));
    assert_eq!(l.msr_read(0x83F, 0), Err(gp(0x83F)));
}

#[test]
fn x2apic_registers_and_gp_cases() {
    let mut l = x2apic_lapic(0x23);
    assert_eq!(l.msr_read(0x802, 0), Ok(0x23));
    assert_eq!(l.msr_read(0x803, 0), Ok(0x0005_0014));
    // LDR: cluster 2, bit 3.
    assert_eq!(l.msr_read(0x80D, 0), Ok(0x0002_0008));
    assert_eq!(l.msr_write(0x80D, 1, 0), Err(gp(0x80D)));
    assert_eq!(l.msr_write(0x802, 1, 0), Err(gp(0x802)));
    assert_eq!(l.msr_read(0x80E, 0), Err(gp(0x80E))); // no DFR
    assert_eq!(l.msr_read(0x80B, 0), Err(gp(0x80B))); // EOI write-only
    assert_eq!(l.msr_write(0x80B, 1, 0), Err(gp(0x80B)));
    assert_eq!(l.msr_read(0x831, 0), Err(gp(0x831))); // no ICR high
    assert_eq!(l.msr_read(0x8FF, 0), Err(gp(0x8FF)));
    assert_eq!(l.msr_write(0x808, 1 << 32, 0), Err(gp(0x808)));
    assert_eq!(l.msr_write(0x808, 0x100, 0), Err(gp(0x808)));
    assert_eq!(l.msr_write(0x808, 0x20, 0), Ok(None));
    assert_eq!(l.msr_read(0x808, 0), Ok(0x20));
    assert_eq!(l.msr_write(0x828, 1, 0), Err(gp(0x828)));
    assert_eq!(l.msr_write(0x828, 0, 0), Ok(None));
    // Current count is readable, not writable.
    assert_eq!(l.msr_read(0x839, 0), Ok(0));
    assert_eq!(l.msr_write(0x839, 0, 0), Err(gp(0x839)));
    // MMIO is dead in x2APIC mode.
    assert_eq!(l.mmio_read(REG_VERSION, 0), 0);
    assert_eq!(l.mmio_write(REG_TPR, 0x80, 0), None);
    assert_eq!(l.msr_read(0x808, 0), Ok(0x20));
    // Other MSRs are not ours.
    assert_eq!(l.msr_read(0x10, 0), Err(gp(0x10)));
    assert_eq!(l.msr_write(0x1C, 0, 0), Err(gp(0x1C)));
}

#[test]
fn x2apic_msrs_gp_in_xapic_mode() {
    let mut l = enabled_lapic(1);
    assert_eq!(l.msr_read(0x802, 0), Err(gp(0x802)));
    assert_eq!(l.msr_write(0x808, 0, 0), Err(gp(0x808)));
    assert!(!l.x2apic_enabled());
}

#[test]
fn apic_base_address_bits_past_maxphyaddr_are_reserved() {
    let mut l = enabled_lapic(1);
    l.set_phys_addr_bits(40);
    let base = l.msr_read(MSR_IA32_APIC_BASE, 0).unwrap();
    assert_eq!(
        l.msr_write(MSR_IA32_APIC_BASE, base | 1 << 40, 0),
        Err(gp(0x1B))
    );
    assert_eq!(l.msr_write(MSR_IA32_APIC_BASE, base | 1 << 39, 0), Ok(None));
    assert_eq!(l.base_address(), 0xFEE0_0000 | 1 << 39);
}

#[test]
fn apic_base_transitions() {
    let mut l = enabled_lapic(1);
    l.mmio_write(REG_TPR, 0x30, 0);
    // Reserved bits and EXTD without EN.
    assert_eq!(
        l.msr_write(MSR_IA32_APIC_BASE, 0xFEE0_0801, 0),
        Err(gp(0x1B))
    );
    assert_eq!(
        l.msr_write(MSR_IA32_APIC_BASE, 0xFEE0_0400, 0),
        Err(gp(0x1B))
    );
    // xAPIC -> x2APIC keeps state.
    assert_eq!(l.msr_write(MSR_IA32_APIC_BASE, X2APIC_ON, 0), Ok(None));
    assert!(l.x2apic_enabled());
    assert_eq!(l.msr_read(0x808, 0), Ok(0x30));
    assert_eq!(l.msr_read(MSR_IA32_APIC_BASE, 0), Ok(X2APIC_ON));
    // x2APIC -> xAPIC is illegal.
    assert_eq!(
        l.msr_write(MSR_IA32_APIC_BASE, 0xFEE0_0800, 0),
        Err(gp(0x1B))
    );
    // Disable resets everything.
    assert_eq!(
        l.msr_write(MSR_IA32_APIC_BASE, 0xFEE0_0000, 0),
        Ok(Some(LapicEvent::TimerChanged))
    );
    assert!(!l.hardware_enabled());
    assert!(!l.accept(&InterruptMessage {
        delivery: DeliveryMode::Nmi,
        ..fixed(0)
    }));
    assert_eq!(l.mmio_write(REG_TPR, 0x30, 0), None);
    assert_eq!(l.mmio_read(REG_TPR, 0), 0);
    // Disabled -> x2APIC is illegal; disabled -> xAPIC -> x2APIC is fine.
    assert_eq!(l.msr_write(MSR_IA32_APIC_BASE, X2APIC_ON, 0), Err(gp(0x1B)));
    l.msr_write(MSR_IA32_APIC_BASE, 0xFEE0_0800, 0).unwrap();
    assert_eq!(l.mmio_read(REG_SVR, 0), 0xFF);
    assert_eq!(l.mmio_read(REG_TPR, 0), 0);
    assert_eq!(l.mmio_read(REG_ID, 0), 1 << 24);
    l.msr_write(MSR_IA32_APIC_BASE, X2APIC_ON, 0).unwrap();
    assert!(l.x2apic_enabled());
    // The BSP flag cannot be written.
    let mut ap = Lapic::new(2, false, TSC);
    ap.msr_write(MSR_IA32_APIC_BASE, 0xFEE0_0900, 0).unwrap();
    assert_eq!(ap.msr_read(MSR_IA32_APIC_BASE, 0), Ok(0xFEE0_0800));
    // Relocation is recorded.
    ap.msr_write(MSR_IA32_APIC_BASE, 0xFED0_0800, 0).unwrap();
    assert_eq!(ap.base_address(), 0xFED0_0000);
}

#[test]
fn software_disable_masks_and_drops_fixed() {
    let mut l = enabled_lapic(0);
    l.mmio_write(REG_LVT_TIMER, 0x30, 0);
    l.accept(&fixed(0x40));
    assert_eq!(
        l.mmio_write(REG_SVR, 0xFF, 0),
        Some(LapicEvent::TimerChanged)
    );
    assert_eq!(l.mmio_read(REG_LVT_TIMER, 0), 0x1_0030);
    // LVT writes stay masked while disabled.
    l.mmio_write(REG_LVT_LINT0_TEST, 0x700, 0);
    assert_eq!(l.mmio_read(REG_LVT_LINT0_TEST, 0), 0x1_0700);
    assert_eq!(l.pending_vector(), None);
    assert!(!l.accept(&fixed(0x41)));
    assert_eq!(l.arbitration_priority(), 0xFF);
    let nmi = InterruptMessage {
        delivery: DeliveryMode::Nmi,
        ..fixed(0)
    };
    assert!(l.accept(&nmi));
    assert_eq!(l.take_nmi(), 1);
    assert_eq!(l.take_nmi(), 0);
    // Two NMIs before the vCPU looks are both owed; a third is not (a CPU latches one
    // behind the one it handles).
    for _ in 0..3 {
        assert!(l.accept(&nmi));
    }
    assert_eq!(l.take_nmi(), 2);
    // Re-enable: the held vector is delivered, the dropped one is gone.
    l.mmio_write(REG_SVR, 0x1FF, 0);
    assert_eq!(l.acknowledge(), Some(0x40));
    assert_eq!(l.acknowledge(), None);
}

const REG_LVT_LINT0_TEST: u64 = 0x350;

#[test]
fn init_and_sipi() {
    let mut ap = enabled_lapic(1);
    ap.mmio_write(REG_TPR, 0x20, 0);
    let sipi = |v| InterruptMessage {
        delivery: DeliveryMode::StartUp,
        ..fixed(v)
    };
    let init = InterruptMessage {
        delivery: DeliveryMode::Init,
        trigger: TriggerMode::Level,
        ..fixed(0)
    };
    let deassert = InterruptMessage {
        level: false,
        ..init
    };
    // Level de-assert is a no-op.
    assert!(!ap.accept(&deassert));
    assert!(!ap.take_init());
    assert!(ap.accept(&init));
    assert!(ap.accept(&sipi(0x9A)));
    assert!(ap.take_init());
    assert!(!ap.take_init());
    assert_eq!(ap.mmio_read(REG_TPR, 0), 0);
    assert_eq!(ap.mmio_read(REG_SVR, 0), 0xFF);
    assert_eq!(ap.mmio_read(REG_ID, 0), 1 << 24);
    assert_eq!(ap.take_sipi(), Some(0x9A));
    assert_eq!(ap.take_sipi(), None);
    // A second SIPI after start-up is ignored.
    assert!(!ap.accept(&sipi(0x9A)));
    assert_eq!(ap.take_sipi(), None);
    // The BSP is not waiting for SIPI.
    let mut bsp = enabled_lapic(0);
    assert!(!bsp.accept(&sipi(0x10)));
    // INIT keeps x2APIC mode.
    let mut x = x2apic_lapic(4);
    x.accept(&init);
    x.take_init();
    assert!(x.x2apic_enabled());
    assert_eq!(x.msr_read(0x80F, 0), Ok(0xFF));
    // SMI and ExtINT are ignored.
    let smi = InterruptMessage {
        delivery: DeliveryMode::Smi,
        ..fixed(0)
    };
    assert!(!bsp.accept(&smi));
}

#[test]
fn logical_matching_xapic() {
    let mut l = enabled_lapic(1);
    l.mmio_write(REG_LDR, 0x0400_00FF, 0);
    assert_eq!(l.mmio_read(REG_LDR, 0), 0x0400_0000);
    assert!(l.matches(DestinationMode::Logical, 0x0C));
    assert!(!l.matches(DestinationMode::Logical, 0x03));
    l.mmio_write(REG_DFR, 0, 0);
    assert_eq!(l.mmio_read(REG_DFR, 0), 0x0FFF_FFFF);
    l.mmio_write(REG_LDR, 0x2100_0000, 0);
    assert!(l.matches(DestinationMode::Logical, 0x23));
    assert!(!l.matches(DestinationMode::Logical, 0x13));
    assert!(l.matches(DestinationMode::Physical, 1));
    assert!(l.matches(DestinationMode::Physical, 0xFF));
    assert!(!l.matches(DestinationMode::Physical, 2));
    let v = l.view();
    assert_eq!(v.ldr, 0x2100_0000);
    assert_eq!(v.dfr, 0x0FFF_FFFF);
    assert!(v.enabled && !v.x2apic);
}

#[test]
fn arbitration_priority_follows_tpr_and_isr() {
    let mut l = enabled_lapic(0);
    assert_eq!(l.arbitration_priority(), 0);
    l.mmio_write(REG_TPR, 0x35, 0);
    assert_eq!(l.arbitration_priority(), 0x35);
    assert_eq!(l.mmio_read(REG_APR, 0), 0x35);
    l.accept(&fixed(0x80));
    // A pending vector of a higher class than TPR raises APR to its class.
    assert_eq!(l.arbitration_priority(), 0x80);
    assert_eq!(l.view().arbitration_priority, 0x80);
}

#[test]
fn timer_divide_encodings() {
    let mut l = enabled_lapic(0);
    let expect = [
        (0x0, 2),
        (0x1, 4),
        (0x2, 8),
        (0x3, 16),
        (0x8, 32),
        (0x9, 64),
        (0xA, 128),
        (0xB, 1),
    ];
    for (dcr, div) in expect {
        l.mmio_write(REG_TIMER_DIVIDE, dcr, 0);
        assert_eq!(l.mmio_read(REG_TIMER_DIVIDE, 0), dcr);
        l.mmio_write(REG_LVT_TIMER, 0x30, T0);
        assert_eq!(
            l.mmio_write(REG_TIMER_INITIAL, 1000, T0),
            Some(LapicEvent::TimerChanged)
        );
        assert_eq!(l.timer_deadline(), Some(T0 + 1000 * div), "dcr {dcr:#x}");
    }
}

#[test]
fn one_shot_timer_exact_deadline() {
    let mut l = enabled_lapic(0);
    l.mmio_write(REG_TIMER_DIVIDE, 0x3, 0); // /16
    assert_eq!(
        l.mmio_write(REG_LVT_TIMER, 0x30, 0),
        Some(LapicEvent::TimerChanged)
    );
    assert_eq!(l.timer_deadline(), None);
    l.mmio_write(REG_TIMER_INITIAL, 1000, T0);
    assert_eq!(l.timer_deadline(), Some(T0 + 16_000));
    assert_eq!(l.mmio_read(REG_TIMER_CURRENT, T0), 1000);
    assert_eq!(l.mmio_read(REG_TIMER_CURRENT, T0 + 8_000), 500);
    assert_eq!(l.mmio_read(REG_TIMER_CURRENT, T0 + 8_001), 500);
    assert_eq!(l.mmio_read(REG_TIMER_CURRENT, T0 + 8_016), 499);
    assert!(!l.timer_tick(T0 + 15_999));
    assert_eq!(l.pending_vector(), None);
    assert!(l.timer_tick(T0 + 16_000));
    assert_eq!(l.pending_vector(), Some(0x30));
    assert_eq!(l.timer_deadline(), None);
    assert_eq!(l.mmio_read(REG_TIMER_CURRENT, T0 + 16_001), 0);
    assert_eq!(l.mmio_read(REG_TIMER_INITIAL, 0), 1000);
    assert!(!l.timer_tick(T0 + 100_000));
    // Writing 0 stops a running timer.
    l.mmio_write(REG_TIMER_INITIAL, 50, T0);
    assert_eq!(
        l.mmio_write(REG_TIMER_INITIAL, 0, T0),
        Some(LapicEvent::TimerChanged)
    );
    assert_eq!(l.timer_deadline(), None);
    assert!(!l.timer_tick(T0 + 1_000_000));
}

#[test]
fn periodic_timer_reloads_without_bursting() {
    let mut l = enabled_lapic(0);
    l.mmio_write(REG_TIMER_DIVIDE, 0xB, 0); // /1
    l.mmio_write(REG_LVT_TIMER, 0x2_0031, 0);
    l.mmio_write(REG_TIMER_INITIAL, 100, T0);
    assert_eq!(l.timer_deadline(), Some(T0 + 100));
    assert!(l.timer_tick(T0 + 100));
    assert_eq!(l.timer_deadline(), Some(T0 + 200));
    assert_eq!(l.mmio_read(REG_TIMER_CURRENT, T0 + 130), 70);
    assert_eq!(l.acknowledge(), Some(0x31));
    l.mmio_write(REG_EOI, 0, 0);
    // Late by 2.5 periods: one interrupt, next deadline on the period grid.
    assert!(l.timer_tick(T0 + 450));
    assert_eq!(l.timer_deadline(), Some(T0 + 500));
    assert_eq!(l.acknowledge(), Some(0x31));
    assert_eq!(l.acknowledge(), None);
    // Masked: no deadline, but the count keeps running.
    l.mmio_write(REG_LVT_TIMER, 0x3_0031, T0 + 460);
    assert_eq!(l.timer_deadline(), None);
    assert_eq!(l.mmio_read(REG_TIMER_CURRENT, T0 + 730), 70);
    // Unmasking after missed periods does not fire for them.
    l.mmio_write(REG_LVT_TIMER, 0x2_0031, T0 + 730);
    assert_eq!(l.pending_vector(), None);
    assert_eq!(l.timer_deadline(), Some(T0 + 800));
}

#[test]
fn divide_change_mid_count_keeps_count() {
    let mut l = enabled_lapic(0);
    l.mmio_write(REG_TIMER_DIVIDE, 0xB, 0); // /1
    l.mmio_write(REG_LVT_TIMER, 0x30, 0);
    l.mmio_write(REG_TIMER_INITIAL, 1000, T0);
    assert_eq!(
        l.mmio_write(REG_TIMER_DIVIDE, 0x0, T0 + 400),
        Some(LapicEvent::TimerChanged)
    ); // /2
    assert_eq!(l.mmio_read(REG_TIMER_CURRENT, T0 + 400), 600);
    assert_eq!(l.timer_deadline(), Some(T0 + 400 + 1200));
}

#[test]
fn tsc_deadline_timer() {
    let mut l = enabled_lapic(0);
    // One-shot mode: the MSR reads 0 and writes are ignored.
    l.mmio_write(REG_LVT_TIMER, 0x30, 0);
    assert_eq!(l.msr_write(MSR_IA32_TSC_DEADLINE, 5, 0), Ok(None));
    assert_eq!(l.msr_read(MSR_IA32_TSC_DEADLINE, 0), Ok(0));
    l.mmio_write(REG_TIMER_INITIAL, 1000, 0);
    // Switching to TSC-deadline disarms the count.
    l.mmio_write(REG_LVT_TIMER, 0x4_0030, 0);
    assert_eq!(l.timer_deadline(), None);
    assert_eq!(l.mmio_read(REG_TIMER_INITIAL, 0), 0);
    // Initial-count writes are ignored in TSC-deadline mode.
    assert_eq!(l.mmio_write(REG_TIMER_INITIAL, 10, 0), None);
    assert_eq!(l.timer_deadline(), None);
    // 2 GHz TSC: tsc 2_000_000 is 1 ms.
    assert_eq!(
        l.msr_write(MSR_IA32_TSC_DEADLINE, 2_000_000, 0),
        Ok(Some(LapicEvent::TimerChanged))
    );
    assert_eq!(l.msr_read(MSR_IA32_TSC_DEADLINE, 0), Ok(2_000_000));
    assert_eq!(l.timer_deadline(), Some(1_000_000));
    assert!(!l.timer_tick(999_999));
    assert!(l.timer_tick(1_000_000));
    assert_eq!(l.acknowledge(), Some(0x30));
    l.mmio_write(REG_EOI, 0, 0);
    assert_eq!(l.msr_read(MSR_IA32_TSC_DEADLINE, 0), Ok(0));
    assert_eq!(l.timer_deadline(), None);
    // A deadline in the past fires at the next tick.
    l.msr_write(MSR_IA32_TSC_DEADLINE, 1, 5_000_000).unwrap();
    assert!(l.timer_deadline().unwrap() <= 5_000_000);
    assert!(l.timer_tick(5_000_000));
    assert_eq!(l.acknowledge(), Some(0x30));
    // Writing 0 disarms.
    l.msr_write(MSR_IA32_TSC_DEADLINE, 100_000_000, 5_000_000)
        .unwrap();
    l.msr_write(MSR_IA32_TSC_DEADLINE, 0, 5_000_000).unwrap();
    assert_eq!(l.timer_deadline(), None);
    assert!(!l.timer_tick(u64::MAX));
    // Masked: armed but no deadline reported, nothing pending at expiry.
    l.mmio_write(REG_EOI, 0, 0);
    l.mmio_write(REG_LVT_TIMER, 0x5_0030, 0);
    l.msr_write(MSR_IA32_TSC_DEADLINE, 2, 0).unwrap();
    assert_eq!(l.timer_deadline(), None);
    assert!(!l.timer_tick(10));
    assert_eq!(l.pending_vector(), None);
    // Leaving TSC-deadline mode clears the MSR.
    l.msr_write(MSR_IA32_TSC_DEADLINE, 1 << 40, 0).unwrap();
    l.mmio_write(REG_LVT_TIMER, 0x30, 20);
    l.mmio_write(REG_LVT_TIMER, 0x4_0030, 20);
    assert_eq!(l.msr_read(MSR_IA32_TSC_DEADLINE, 0), Ok(0));
}

#[test]
fn x2apic_timer_via_msrs() {
    let mut l = x2apic_lapic(0);
    l.msr_write(0x83E, 0xB, 0).unwrap();
    l.msr_write(0x832, 0x40, 0).unwrap();
    assert_eq!(
        l.msr_write(0x838, 500, T0),
        Ok(Some(LapicEvent::TimerChanged))
    );
    assert_eq!(l.msr_read(0x839, T0 + 100), Ok(400));
    assert_eq!(l.timer_deadline(), Some(T0 + 500));
}

proptest! {
    #[test]
    fn random_register_accesses_never_panic(
        ops in proptest::collection::vec((0u8..8, any::<u64>(), any::<u64>(), 0u64..1_000_000), 0..200)
    ) {
        let mut l = Lapic::new(1, false, TSC);
        let mut now = 0u64;
        for (kind, a, b, dt) in ops {
            now += dt;
            let msr = match a % 4 {
                0 => MSR_IA32_APIC_BASE,
                1 => MSR_IA32_TSC_DEADLINE,
                2 => 0x800 + (a >> 8) as u32 % 0x100,
                _ => (a >> 8) as u32,
            };
            match kind {
                0 => { l.mmio_read(a % 0x1000, now); }
                1 => { l.mmio_write(a % 0x1000, b as u32, now); }
                2 => { let _ = l.msr_read(msr, now); }
                3 => {
                    // Keep APIC_BASE writes mostly plausible so that x2APIC mode is reached.
                    let v = if msr == MSR_IA32_APIC_BASE && b % 2 == 0 { 0xFEE0_0000 | (b & 0xC00) } else { b };
                    let _ = l.msr_write(msr, v, now);
                }
                4 => {
                    if let Some(m) = InterruptMessage::from_icr(b) {
                        l.accept(&m);
                    }
                }
                5 => { l.acknowledge(); }
                6 => {
                    l.timer_tick(now);
                    if let Some(d) = l.timer_deadline() {
                        // After a tick at `now`, any remaining deadline is in the future.
                        prop_assert!(d > now);
                    }
                }
                _ => {
                    l.take_init();
                    l.take_sipi();
                    l.take_nmi();
                    let _ = l.pending_vector();
                    let _ = l.view();
                }
            }
        }
    }
}

#[test]
fn the_lapic_owns_exactly_its_msrs() {
    for msr in [0x1b, 0x6e0, 0x800, 0x802, 0x830, 0x8ff] {
        assert!(is_lapic_msr(msr), "{msr:#x}");
    }
    for msr in [
        0x0,
        0x1a,
        0x1c,
        0x6df,
        0x6e1,
        0x7ff,
        0x900,
        0xc000_0080,
        u32::MAX,
    ] {
        assert!(!is_lapic_msr(msr), "{msr:#x}");
    }
}

#[test]
fn paced_tsc_deadline_waits_factor_times_the_handling_time() {
    let mut l = enabled_lapic(0);
    l.set_timer_pacing(4);
    l.mmio_write(REG_LVT_TIMER, 0x4_0030, 0);
    // 2 GHz TSC: tsc 2_000_000 is 1 ms. The first deadline is not paced.
    l.msr_write(MSR_IA32_TSC_DEADLINE, 2_000_000, 0).unwrap();
    assert_eq!(l.timer_deadline(), Some(1_000_000));
    assert!(l.timer_tick(1_000_000));
    assert_eq!(l.acknowledge(), Some(0x30));
    l.mmio_write(REG_EOI, 0, 1_000_100);
    // The handler re-arms 3 ms after the interrupt, for 1 ms later: paced to 4 x 3 ms.
    l.msr_write(MSR_IA32_TSC_DEADLINE, 10_000_000, 4_000_000)
        .unwrap();
    assert_eq!(l.msr_read(MSR_IA32_TSC_DEADLINE, 0), Ok(10_000_000));
    assert_eq!(l.timer_deadline(), Some(16_000_000));
    assert!(!l.timer_tick(15_999_999));
    assert_eq!(l.pending_vector(), None);
    assert!(l.timer_tick(16_000_000));
    assert_eq!(l.acknowledge(), Some(0x30));
    // A later deadline than the gap is kept as is; a quick re-arm leaves a short gap.
    l.msr_write(MSR_IA32_TSC_DEADLINE, 40_000_000, 16_010_000)
        .unwrap();
    assert_eq!(l.timer_deadline(), Some(20_000_000));
    // A re-arm without an interrupt in between (the guest moving its deadline) adds
    // no gap of its own.
    l.msr_write(MSR_IA32_TSC_DEADLINE, 33_000_000, 16_020_000)
        .unwrap();
    assert_eq!(l.timer_deadline(), Some(16_500_000));
}

#[test]
fn pacing_gap_is_bounded_and_off_by_default() {
    let mut l = enabled_lapic(0);
    l.mmio_write(REG_TIMER_DIVIDE, 0xB, 0); // /1: a tick is a ns
    l.mmio_write(REG_LVT_TIMER, 0x30, 0);
    l.mmio_write(REG_TIMER_INITIAL, 100, 0);
    assert!(l.timer_tick(100));
    // Off: a re-arm long after the interrupt is not delayed.
    l.mmio_write(REG_TIMER_INITIAL, 100, 1_000_000_000);
    assert_eq!(l.timer_deadline(), Some(1_000_000_100));
    l.set_timer_pacing(4);
    // A 20 ms handler would want 80 ms: capped.
    assert!(l.timer_tick(1_000_000_100));
    l.mmio_write(REG_TIMER_INITIAL, 100, 1_020_000_100);
    assert_eq!(
        l.timer_deadline(),
        Some(1_020_000_100 + MAX_TIMER_PACING_GAP_NS)
    );
    // The one-shot count still runs out as programmed.
    assert_eq!(l.mmio_read(REG_TIMER_CURRENT, 1_020_000_200), 0);
    // Turning pacing off drops the pending gap.
    l.set_timer_pacing(0);
    assert_eq!(l.timer_deadline(), Some(1_020_000_200));
    l.set_timer_pacing(4);
    // A re-arm long after the interrupt, or after a halt, is not the handler's.
    assert!(l.timer_tick(1_020_000_200));
    let late = 1_020_000_200 + TIMER_PACING_WINDOW_NS + 1;
    l.mmio_write(REG_TIMER_INITIAL, 100, late);
    assert_eq!(l.timer_deadline(), Some(late + 100));
    assert!(l.timer_tick(late + 100));
    l.note_halt();
    l.mmio_write(REG_TIMER_INITIAL, 100, late + 1_000_000);
    assert_eq!(l.timer_deadline(), Some(late + 1_000_100));
}

#[test]
fn paced_periodic_timer_is_not_delayed() {
    let mut l = enabled_lapic(0);
    l.set_timer_pacing(4);
    l.mmio_write(REG_TIMER_DIVIDE, 0xB, 0);
    l.mmio_write(REG_LVT_TIMER, 0x2_0031, 0);
    l.mmio_write(REG_TIMER_INITIAL, 100, T0);
    assert!(l.timer_tick(T0 + 100));
    assert_eq!(l.timer_deadline(), Some(T0 + 200));
    assert!(l.timer_tick(T0 + 200));
    assert_eq!(l.timer_deadline(), Some(T0 + 300));
}

#[test]
fn reprogramming_during_a_pacing_gap_fires_the_due_interrupt() {
    let mut l = enabled_lapic(0);
    l.set_timer_pacing(4);
    l.mmio_write(REG_LVT_TIMER, 0x4_0030, 0);
    l.msr_write(MSR_IA32_TSC_DEADLINE, 2_000_000, 0).unwrap();
    assert!(l.timer_tick(1_000_000));
    assert_eq!(l.acknowledge(), Some(0x30));
    l.mmio_write(REG_EOI, 0, 1_000_100);
    // Re-armed 3 ms later for 1 ms later: paced to 16 ms.
    l.msr_write(MSR_IA32_TSC_DEADLINE, 10_000_000, 4_000_000)
        .unwrap();
    assert!(!l.timer_tick(6_000_000));
    // At 8 ms the guest moves its deadline: the one due at 5 ms fires now, as it
    // would have on hardware, instead of being replaced.
    l.msr_write(MSR_IA32_TSC_DEADLINE, 40_000_000, 8_000_000)
        .unwrap();
    assert_eq!(l.pending_vector(), Some(0x30));
    assert_eq!(l.timer_deadline(), Some(20_000_000));
    // Masking the timer mid-gap also lets the due expiry fire first (on hardware it
    // would be in IRR already, and masking does not take it back).
    let mut m = enabled_lapic(0);
    m.set_timer_pacing(4);
    m.mmio_write(REG_TIMER_DIVIDE, 0xB, 0);
    m.mmio_write(REG_LVT_TIMER, 0x30, 0);
    m.mmio_write(REG_TIMER_INITIAL, 100, 0);
    assert!(m.timer_tick(100));
    assert_eq!(m.acknowledge(), Some(0x30));
    m.mmio_write(REG_EOI, 0, 200);
    m.mmio_write(REG_TIMER_INITIAL, 1000, 1_000_100);
    assert_eq!(m.timer_deadline(), Some(1_000_100 + 4_000_000));
    m.mmio_write(REG_LVT_TIMER, 0x1_0030, 2_000_000);
    assert_eq!(m.pending_vector(), Some(0x30));
    assert_eq!(m.timer_deadline(), None);
}
