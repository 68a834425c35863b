//! Userspace local APIC: xAPIC MMIO registers, x2APIC MSRs, the LAPIC timer (one-shot,
//! periodic, TSC-deadline) and the IRR/ISR/TMR state machine (Intel SDM vol. 3, ch. 10/11).

use crate::clock::TscMap;
use crate::msg::{
    DeliveryMode, DestinationMode, InterruptMessage, Shorthand, TriggerMode, X2APIC_BROADCAST,
    XAPIC_BROADCAST,
};
use dvmm_layout::{LAPIC_ADDR, LAPIC_TIMER_HZ};

/// IA32_APIC_BASE.
pub const MSR_IA32_APIC_BASE: u32 = 0x1B;
/// IA32_TSC_DEADLINE.
pub const MSR_IA32_TSC_DEADLINE: u32 = 0x6E0;
/// First x2APIC MSR.
pub const MSR_X2APIC_FIRST: u32 = 0x800;
/// Last MSR of the x2APIC range.
pub const MSR_X2APIC_LAST: u32 = 0x8FF;
/// Every MSR the LAPIC owns, as (first, count): the VMM routes exactly these here.
pub const LAPIC_MSR_RANGES: [(u32, u32); 3] = [
    (MSR_IA32_APIC_BASE, 1),
    (MSR_IA32_TSC_DEADLINE, 1),
    (MSR_X2APIC_FIRST, MSR_X2APIC_LAST - MSR_X2APIC_FIRST + 1),
];

/// Whether the LAPIC owns `msr` (one of [`LAPIC_MSR_RANGES`]).
pub fn is_lapic_msr(msr: u32) -> bool {
    LAPIC_MSR_RANGES
        .iter()
        .any(|&(first, count)| msr >= first && msr - first < count)
}

/// IA32_APIC_BASE: this is the bootstrap processor.
pub const APIC_BASE_BSP: u64 = 1 << 8;
/// IA32_APIC_BASE: x2APIC mode enable.
pub const APIC_BASE_EXTD: u64 = 1 << 10;
/// IA32_APIC_BASE: APIC global enable.
pub const APIC_BASE_EN: u64 = 1 << 11;
const APIC_BASE_ADDR_MASK: u64 = 0x000F_FFFF_FFFF_F000;

/// Value of the version register: integrated APIC (0x14), max LVT entry 5 (no CMCI),
/// no EOI-broadcast suppression.
pub const APIC_VERSION: u32 = 0x0005_0014;

// xAPIC register offsets within the LAPIC page.
const REG_ID: u64 = 0x20;
const REG_VERSION: u64 = 0x30;
const REG_TPR: u64 = 0x80;
const REG_APR: u64 = 0x90;
const REG_PPR: u64 = 0xA0;
const REG_EOI: u64 = 0xB0;
const REG_RRD: u64 = 0xC0;
const REG_LDR: u64 = 0xD0;
const REG_DFR: u64 = 0xE0;
const REG_SVR: u64 = 0xF0;
const REG_ISR: u64 = 0x100;
const REG_TMR: u64 = 0x180;
const REG_IRR: u64 = 0x200;
const REG_ESR: u64 = 0x280;
const REG_LVT_CMCI: u64 = 0x2F0;
const REG_ICR_LOW: u64 = 0x300;
const REG_ICR_HIGH: u64 = 0x310;
const REG_LVT_TIMER: u64 = 0x320;
const REG_LVT_ERROR: u64 = 0x370;
const REG_TIMER_INITIAL: u64 = 0x380;
const REG_TIMER_CURRENT: u64 = 0x390;
const REG_TIMER_DIVIDE: u64 = 0x3E0;
const REG_SELF_IPI: u64 = 0x3F0;

const SVR_ENABLE: u32 = 1 << 8;
const SVR_WRITABLE: u32 = 0x3FF;
const LVT_MASKED: u32 = 1 << 16;
const ICR_LOW_WRITABLE: u32 = 0x000C_CFFF;
const ESR_SEND_ILLEGAL_VECTOR: u32 = 1 << 5;
const ESR_RECEIVE_ILLEGAL_VECTOR: u32 = 1 << 6;

// LVT entries in register order (timer 0x320 .. error 0x370).
const LVT_TIMER: usize = 0;
const LVT_COUNT: usize = 6;
const LVT_WRITABLE: [u32; LVT_COUNT] = [
    0x0007_00FF, // timer: vector, mask, mode
    0x0001_07FF, // thermal: vector, delivery mode, mask
    0x0001_07FF, // performance counters
    0x0001_A7FF, // LINT0: + polarity, trigger
    0x0001_A7FF, // LINT1
    0x0001_00FF, // error: vector, mask
];

const TIMER_MODE_PERIODIC: u32 = 1;
const TIMER_MODE_TSC_DEADLINE: u32 = 2;

/// Something the VMM must do after a register access.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LapicEvent {
    /// Guest wrote the ICR (xAPIC ICR low, x2APIC ICR MSR, or x2APIC SELF_IPI): route this message.
    /// For SelfOnly shorthand the VMM will route it back to this LAPIC via `route::targets`.
    Ipi(InterruptMessage),
    /// EOI of a level-triggered vector (TMR bit was set): VMM forwards to the IOAPIC's end_of_interrupt.
    LevelEoi {
        /// The vector whose ISR bit was cleared.
        vector: u8,
    },
    /// The timer was (re)programmed or stopped: VMM re-reads `timer_deadline()`.
    TimerChanged,
}

/// A LAPIC register access the guest must see fail.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LapicError {
    /// Access must raise #GP in the guest (e.g. x2APIC MSR while not in x2APIC mode,
    /// reserved bits, read of a write-only register).
    #[error(
        "guest access to MSR {msr:#x} must raise #GP (register absent or read/write-only, \
         reserved bits set, or not allowed in the current APIC mode)"
    )]
    GeneralProtection {
        /// The MSR the guest accessed.
        msr: u32,
    },
}

/// What routing needs to know about one LAPIC (cheap Copy snapshot; later shipped between nodes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ApicView {
    /// APIC id (as in the MADT; the x2APIC id).
    pub apic_id: u32,
    /// In x2APIC mode.
    pub x2apic: bool,
    /// Logical destination register (x2APIC: the derived value).
    pub ldr: u32,
    /// Destination format register (xAPIC only; 0xFFFF_FFFF flat, 0x0FFF_FFFF cluster).
    pub dfr: u32,
    /// Arbitration priority for lowest-priority delivery (0xFF while software-disabled).
    pub arbitration_priority: u8,
    /// Hardware-enabled (IA32_APIC_BASE.EN); a disabled LAPIC receives nothing.
    pub enabled: bool,
}

impl ApicView {
    /// Whether this LAPIC accepts `destination` in `mode`.
    ///
    /// Physical: the APIC id, or broadcast (0xFF or 0xFFFF_FFFF; no APIC id can be 0xFF
    /// since `MAX_VCPUS` stops at 254). Logical: xAPIC flat/cluster via LDR and DFR
    /// (MDA 0xFF is broadcast), x2APIC cluster (bits 31:16 cluster, 15:0 bitmap).
    pub fn matches(&self, mode: DestinationMode, destination: u32) -> bool {
        if !self.enabled {
            return false;
        }
        match mode {
            DestinationMode::Physical => {
                destination == X2APIC_BROADCAST
                    || destination == XAPIC_BROADCAST
                    || destination == self.apic_id
            }
            DestinationMode::Logical if self.x2apic => {
                destination == X2APIC_BROADCAST
                    || (destination >> 16 == self.ldr >> 16 && destination & self.ldr & 0xFFFF != 0)
            }
            DestinationMode::Logical => {
                let mda = destination & 0xFF;
                if mda == 0xFF {
                    return true;
                }
                let logical_id = self.ldr >> 24;
                match self.dfr >> 28 {
                    0xF => mda & logical_id != 0,
                    0x0 => mda >> 4 == logical_id >> 4 && mda & logical_id & 0xF != 0,
                    _ => false,
                }
            }
        }
    }
}

/// One vCPU's local APIC.
#[derive(Clone, Debug)]
pub struct Lapic {
    apic_id: u32,
    is_bsp: bool,
    tsc: TscMap,
    apic_base: u64,
    /// The address bits IA32_APIC_BASE may hold (below the guest's MAXPHYADDR).
    base_addr_mask: u64,

    tpr: u32,
    ldr: u32,
    dfr: u32,
    svr: u32,
    isr: [u32; 8],
    tmr: [u32; 8],
    irr: [u32; 8],
    esr: u32,
    esr_pending: u32,
    lvt: [u32; LVT_COUNT],
    icr_low: u32,
    icr_high: u32,

    timer_initial: u32,
    timer_divide: u32,
    /// Next expiry of a running one-shot/periodic timer.
    timer_next_ns: Option<u64>,
    timer_period_ns: u64,
    tsc_deadline: u64,
    pacing: TimerPacing,

    nmi_pending: u8,
    init_pending: bool,
    sipi: Option<u8>,
    wait_for_sipi: bool,
}

/// The longest gap [`Lapic::set_timer_pacing`] puts between two timer interrupts.
pub const MAX_TIMER_PACING_GAP_NS: u64 = 50_000_000;
/// A re-arm this long after the last timer interrupt is taken as unrelated to it (the
/// guest set a new timer later), and is not paced.
pub const TIMER_PACING_WINDOW_NS: u64 = 25_000_000;

/// Timer pacing state (see [`Lapic::set_timer_pacing`]).
#[derive(Clone, Copy, Debug, Default)]
struct TimerPacing {
    /// 0: off.
    factor: u32,
    /// When the last timer interrupt became pending, until the guest re-arms the timer.
    fired_ns: Option<u64>,
    /// The timer does not fire before this host time.
    not_before_ns: u64,
}

fn bit_test(bits: &[u32; 8], v: u8) -> bool {
    bits[(v >> 5) as usize] & (1 << (v & 31)) != 0
}

fn bit_set(bits: &mut [u32; 8], v: u8) {
    bits[(v >> 5) as usize] |= 1 << (v & 31);
}

fn bit_clear(bits: &mut [u32; 8], v: u8) {
    bits[(v >> 5) as usize] &= !(1 << (v & 31));
}

fn highest(bits: &[u32; 8]) -> Option<u8> {
    (0..8)
        .rev()
        .find(|&i| bits[i] != 0)
        .map(|i| (i as u32 * 32 + 31 - bits[i].leading_zeros()) as u8)
}

impl Lapic {
    /// `apic_id` as in the MADT; `is_bsp` sets APIC_BASE.BSP; APIC_BASE starts at
    /// 0xFEE00000 | enabled (bit 11), xAPIC mode. Application processors start waiting
    /// for a SIPI.
    pub fn new(apic_id: u32, is_bsp: bool, tsc: TscMap) -> Self {
        let mut lapic = Self {
            apic_id,
            is_bsp,
            tsc,
            apic_base: LAPIC_ADDR | APIC_BASE_EN,
            base_addr_mask: APIC_BASE_ADDR_MASK,
            tpr: 0,
            ldr: 0,
            dfr: 0,
            svr: 0,
            isr: [0; 8],
            tmr: [0; 8],
            irr: [0; 8],
            esr: 0,
            esr_pending: 0,
            lvt: [0; LVT_COUNT],
            icr_low: 0,
            icr_high: 0,
            timer_initial: 0,
            timer_divide: 0,
            timer_next_ns: None,
            timer_period_ns: 0,
            tsc_deadline: 0,
            pacing: TimerPacing::default(),
            nmi_pending: 0,
            init_pending: false,
            sipi: None,
            wait_for_sipi: !is_bsp,
        };
        lapic.reset_registers();
        lapic
    }

    /// The guest's physical-address width (CPUID.80000008H:EAX bits 7:0): IA32_APIC_BASE
    /// address bits at or above it are reserved (a write setting one is a #GP).
    pub fn set_phys_addr_bits(&mut self, bits: u8) {
        let bits = bits.clamp(32, 52);
        self.base_addr_mask = APIC_BASE_ADDR_MASK & ((1u64 << bits) - 1);
    }

    /// Power-on register state (everything but id, BSP flag, APIC_BASE and INIT/SIPI bookkeeping).
    fn reset_registers(&mut self) {
        self.tpr = 0;
        self.ldr = 0;
        self.dfr = 0xFFFF_FFFF;
        self.svr = 0xFF;
        self.isr = [0; 8];
        self.tmr = [0; 8];
        self.irr = [0; 8];
        self.esr = 0;
        self.esr_pending = 0;
        self.lvt = [LVT_MASKED; LVT_COUNT];
        self.icr_low = 0;
        self.icr_high = 0;
        self.timer_initial = 0;
        self.timer_divide = 0;
        self.timer_next_ns = None;
        self.timer_period_ns = 0;
        self.tsc_deadline = 0;
        self.pacing = TimerPacing {
            factor: self.pacing.factor,
            ..TimerPacing::default()
        };
        self.nmi_pending = 0;
    }

    /// The APIC id this LAPIC was created with.
    pub fn apic_id(&self) -> u32 {
        self.apic_id
    }

    /// Whether this is the bootstrap processor's LAPIC.
    pub fn is_bsp(&self) -> bool {
        self.is_bsp
    }

    /// The physical address in IA32_APIC_BASE (where the guest expects the MMIO page).
    pub fn base_address(&self) -> u64 {
        self.apic_base & APIC_BASE_ADDR_MASK
    }

    /// IA32_APIC_BASE.EN.
    pub fn hardware_enabled(&self) -> bool {
        self.apic_base & APIC_BASE_EN != 0
    }

    /// SVR bit 8.
    pub fn software_enabled(&self) -> bool {
        self.svr & SVR_ENABLE != 0
    }

    /// In x2APIC mode (EN and EXTD set).
    pub fn x2apic_enabled(&self) -> bool {
        self.apic_base & (APIC_BASE_EN | APIC_BASE_EXTD) == APIC_BASE_EN | APIC_BASE_EXTD
    }

    /// Whether the CPU waits for a SIPI (an AP after power-on or after INIT).
    pub fn waiting_for_sipi(&self) -> bool {
        self.wait_for_sipi
    }

    /// Task priority register (bits 7:0).
    pub fn tpr(&self) -> u8 {
        self.tpr as u8
    }

    /// Set the TPR, e.g. from `kvm_run.cr8` (CR8 = TPR >> 4) after a guest CR8 write.
    pub fn set_tpr(&mut self, tpr: u8) {
        self.tpr = u32::from(tpr);
    }

    /// Processor priority register.
    pub fn ppr(&self) -> u8 {
        let isrv = u32::from(highest(&self.isr).unwrap_or(0));
        let ppr = if self.tpr & 0xF0 >= isrv & 0xF0 {
            self.tpr
        } else {
            isrv & 0xF0
        };
        ppr as u8
    }

    /// APR as the SDM defines it (10.6.2.4).
    fn apr(&self) -> u8 {
        let tpr = self.tpr & 0xFF;
        let isrv = u32::from(highest(&self.isr).unwrap_or(0));
        let irrv = u32::from(highest(&self.irr).unwrap_or(0));
        if tpr >> 4 >= irrv >> 4 && tpr >> 4 > isrv >> 4 {
            tpr as u8
        } else {
            (((tpr & isrv) >> 4).max(irrv >> 4) << 4) as u8
        }
    }

    fn current_ldr(&self) -> u32 {
        if self.x2apic_enabled() {
            ((self.apic_id >> 4) << 16) | (1 << (self.apic_id & 0xF))
        } else {
            self.ldr
        }
    }

    /// Arbitration priority used for lowest-priority delivery. A software-disabled LAPIC
    /// (which would drop a fixed interrupt) reports 0xFF so that it loses arbitration.
    pub fn arbitration_priority(&self) -> u8 {
        if self.software_enabled() {
            self.apr()
        } else {
            0xFF
        }
    }

    /// Snapshot used by routing.
    pub fn view(&self) -> ApicView {
        ApicView {
            apic_id: self.apic_id,
            x2apic: self.x2apic_enabled(),
            ldr: self.current_ldr(),
            dfr: self.dfr,
            arbitration_priority: self.arbitration_priority(),
            enabled: self.hardware_enabled(),
        }
    }

    /// Whether this LAPIC accepts `destination` in `mode` (physical id match incl.
    /// broadcast; logical flat/cluster via LDR/DFR in xAPIC, x2APIC cluster logical).
    pub fn matches(&self, mode: DestinationMode, destination: u32) -> bool {
        self.view().matches(mode, destination)
    }

    // ----- interrupt acceptance and delivery -----

    /// Accept a message already routed to this LAPIC: Fixed/LowestPriority set IRR (and
    /// TMR for level), Nmi -> NMI pending, Init (assert) -> INIT pending, StartUp -> SIPI
    /// vector pending (only while the CPU waits for SIPI), Smi/ExtInt ignored.
    /// A hardware-disabled LAPIC accepts nothing; a software-disabled one drops fixed
    /// interrupts. Returns true when something became pending that the vCPU must act on.
    pub fn accept(&mut self, msg: &InterruptMessage) -> bool {
        if !self.hardware_enabled() {
            return false;
        }
        match msg.delivery {
            DeliveryMode::Fixed | DeliveryMode::LowestPriority => {
                if !self.software_enabled() {
                    return false;
                }
                if msg.vector < 16 {
                    self.esr_pending |= ESR_RECEIVE_ILLEGAL_VECTOR;
                    return false;
                }
                bit_set(&mut self.irr, msg.vector);
                if msg.trigger == TriggerMode::Level {
                    bit_set(&mut self.tmr, msg.vector);
                } else {
                    bit_clear(&mut self.tmr, msg.vector);
                }
                self.pending_vector().is_some()
            }
            DeliveryMode::Nmi => {
                // A CPU latches one NMI while it handles another: two can be owed.
                self.nmi_pending = (self.nmi_pending + 1).min(2);
                true
            }
            DeliveryMode::Init => {
                if msg.is_init_deassert() {
                    return false;
                }
                self.init_pending = true;
                self.wait_for_sipi = true;
                self.sipi = None;
                true
            }
            DeliveryMode::StartUp => {
                if self.wait_for_sipi {
                    self.sipi = Some(msg.vector);
                    true
                } else {
                    false
                }
            }
            DeliveryMode::Smi | DeliveryMode::ExtInt => false,
        }
    }

    /// Highest-priority deliverable vector (IRR above PPR, APIC enabled), without
    /// changing state.
    pub fn pending_vector(&self) -> Option<u8> {
        if !self.hardware_enabled() || !self.software_enabled() {
            return None;
        }
        let v = highest(&self.irr)?;
        (v & 0xF0 > self.ppr() & 0xF0).then_some(v)
    }

    /// Move the highest deliverable vector from IRR to ISR and return it (the VMM then
    /// injects it).
    pub fn acknowledge(&mut self) -> Option<u8> {
        let v = self.pending_vector()?;
        bit_clear(&mut self.irr, v);
        bit_set(&mut self.isr, v);
        Some(v)
    }

    /// The NMIs received since the last call (at most 2: one to deliver, one latched
    /// behind it), returned once.
    pub fn take_nmi(&mut self) -> u8 {
        std::mem::take(&mut self.nmi_pending)
    }

    /// INIT received: resets the LAPIC to its power-on state (keeping id, BSP flag and
    /// APIC_BASE) and returns true once. The CPU then waits for a SIPI; call this before
    /// [`take_sipi`](Self::take_sipi).
    pub fn take_init(&mut self) -> bool {
        if !std::mem::take(&mut self.init_pending) {
            return false;
        }
        self.reset_registers();
        true
    }

    /// A SIPI vector received since the last INIT, returned once (the CPU then stops
    /// waiting for SIPI, so a second SIPI is ignored).
    pub fn take_sipi(&mut self) -> Option<u8> {
        let v = self.sipi.take()?;
        self.wait_for_sipi = false;
        Some(v)
    }

    fn eoi(&mut self) -> Option<LapicEvent> {
        let v = highest(&self.isr)?;
        bit_clear(&mut self.isr, v);
        bit_test(&self.tmr, v).then_some(LapicEvent::LevelEoi { vector: v })
    }

    /// Build the message for an ICR write; `None` when nothing is to be sent.
    fn send_ipi(&mut self, icr: u64) -> Option<LapicEvent> {
        let msg = InterruptMessage::from_icr(icr)?;
        if msg.is_init_deassert() {
            return None;
        }
        if matches!(
            msg.delivery,
            DeliveryMode::Fixed | DeliveryMode::LowestPriority
        ) && msg.vector < 16
        {
            self.esr_pending |= ESR_SEND_ILLEGAL_VECTOR;
            return None;
        }
        Some(LapicEvent::Ipi(msg))
    }

    fn self_ipi(&mut self, vector: u8) -> Option<LapicEvent> {
        let msg = InterruptMessage {
            shorthand: Shorthand::SelfOnly,
            ..InterruptMessage::fixed(vector, self.apic_id)
        };
        self.send_ipi(msg.to_icr())
    }

    // ----- timer -----

    fn timer_mode(&self) -> u32 {
        (self.lvt[LVT_TIMER] >> 17) & 3
    }

    fn tsc_deadline_mode(&self) -> bool {
        self.timer_mode() == TIMER_MODE_TSC_DEADLINE
    }

    fn divisor(&self) -> u64 {
        let v = (self.timer_divide & 3) | ((self.timer_divide >> 1) & 4);
        1 << ((v + 1) & 7)
    }

    fn ticks_to_ns(&self, ticks: u64) -> u64 {
        let ns = u128::from(ticks) * u128::from(self.divisor()) * 1_000_000_000
            / u128::from(LAPIC_TIMER_HZ);
        ns.clamp(1, u128::from(u64::MAX)) as u64
    }

    /// Ticks (rounded up) left in `ns`.
    fn ns_to_ticks(&self, ns: u64) -> u64 {
        let per = u128::from(self.divisor()) * 1_000_000_000;
        let ticks = (u128::from(ns) * u128::from(LAPIC_TIMER_HZ)).div_ceil(per);
        ticks.min(u128::from(u64::MAX)) as u64
    }

    fn timer_masked(&self) -> bool {
        self.lvt[LVT_TIMER] & LVT_MASKED != 0
            || !self.software_enabled()
            || !self.hardware_enabled()
    }

    fn current_count(&self, now_ns: u64) -> u32 {
        if self.tsc_deadline_mode() {
            return 0;
        }
        let Some(next) = self.timer_next_ns else {
            return 0;
        };
        let remaining = if now_ns < next {
            next - now_ns
        } else if self.timer_mode() == TIMER_MODE_PERIODIC && self.timer_period_ns > 0 {
            self.timer_period_ns - (now_ns - next) % self.timer_period_ns
        } else {
            0
        };
        self.ns_to_ticks(remaining)
            .min(u64::from(self.timer_initial)) as u32
    }

    /// Host time at which the timer next fires (one-shot, periodic, or TSC-deadline via
    /// TscMap), None if stopped or masked.
    pub fn timer_deadline(&self) -> Option<u64> {
        if self.timer_masked() {
            return None;
        }
        let due = if self.tsc_deadline_mode() {
            (self.tsc_deadline != 0).then(|| self.tsc.ns_at_tsc(self.tsc_deadline))
        } else {
            self.timer_next_ns
        };
        due.map(|d| d.max(self.pacing.not_before_ns))
    }

    /// Spaces this LAPIC's timer interrupts where handling one costs the guest a lot of
    /// time: when the guest re-arms the timer (a TSC-deadline or initial-count write) `h`
    /// ns after its last interrupt became pending, the next one fires no sooner than
    /// `factor * h` ns later (at most [`MAX_TIMER_PACING_GAP_NS`]). The interrupt comes
    /// late, as on a busy host; none is lost and the count and deadline registers read
    /// as programmed. A periodic timer, which is never re-armed, is not paced. 0 turns
    /// pacing off (the default).
    pub fn set_timer_pacing(&mut self, factor: u32) {
        self.pacing.factor = factor;
        if factor == 0 {
            self.pacing = TimerPacing::default();
        }
    }

    /// The vCPU halted: until it re-arms the timer it was idle, not handling the last
    /// timer interrupt, so that re-arm is not paced.
    pub fn note_halt(&mut self) {
        self.pacing.fired_ns = None;
    }

    /// The guest re-armed the timer: start the gap after a paced interrupt. A re-arm
    /// later than [`TIMER_PACING_WINDOW_NS`] after the interrupt is not the handler's.
    fn pace_rearm(&mut self, now_ns: u64) {
        if let Some(fired) = self.pacing.fired_ns.take() {
            let busy = now_ns.saturating_sub(fired);
            if busy > TIMER_PACING_WINDOW_NS {
                return;
            }
            let gap = busy
                .saturating_mul(u64::from(self.pacing.factor))
                .min(MAX_TIMER_PACING_GAP_NS);
            self.pacing.not_before_ns = now_ns.saturating_add(gap);
        }
    }

    /// Replaces the guest-TSC mapping (the VMM re-anchors it at a fresh TSC reading
    /// before handing over a TSC-deadline write, so that frequency error cannot build up).
    pub fn set_tsc_map(&mut self, tsc: TscMap) {
        self.tsc = tsc;
    }

    /// The current guest-TSC mapping.
    pub fn tsc_map(&self) -> TscMap {
        self.tsc
    }

    /// Fire the timer if `now_ns >= deadline`: set the LVT timer vector in IRR (unless
    /// masked), reload periodic (skipping missed periods without bursting), stop one-shot /
    /// TSC-deadline. Returns true if a vector became pending.
    pub fn timer_tick(&mut self, now_ns: u64) -> bool {
        if now_ns < self.pacing.not_before_ns {
            return false;
        }
        self.expire_due(now_ns)
    }

    /// [`timer_tick`](Self::timer_tick) without pacing: a register write that reprograms
    /// the timer first lets an expiry that is due under the old settings fire, paced or
    /// not, so that pacing only ever delays an interrupt and never drops or merges one.
    fn expire_due(&mut self, now_ns: u64) -> bool {
        if self.tsc_deadline_mode() {
            if self.tsc_deadline == 0 || now_ns < self.tsc.ns_at_tsc(self.tsc_deadline) {
                return false;
            }
            self.tsc_deadline = 0;
        } else {
            let Some(next) = self.timer_next_ns else {
                return false;
            };
            if now_ns < next {
                return false;
            }
            if self.timer_mode() == TIMER_MODE_PERIODIC && self.timer_period_ns > 0 {
                let period = self.timer_period_ns;
                let periods = (now_ns - next) / period + 1;
                let next = u128::from(next) + u128::from(periods) * u128::from(period);
                self.timer_next_ns = Some(next.min(u128::from(u64::MAX)) as u64);
            } else {
                self.timer_next_ns = None;
            }
        }
        if self.timer_masked() {
            return false;
        }
        let vector = self.lvt[LVT_TIMER] as u8;
        if vector < 16 {
            self.esr_pending |= ESR_RECEIVE_ILLEGAL_VECTOR;
            return false;
        }
        bit_set(&mut self.irr, vector);
        bit_clear(&mut self.tmr, vector);
        if self.pacing.factor != 0 {
            self.pacing.fired_ns = Some(now_ns);
        }
        true
    }

    fn write_timer_initial(&mut self, value: u32, now_ns: u64) -> Option<LapicEvent> {
        if self.tsc_deadline_mode() {
            return None;
        }
        self.timer_initial = value;
        if value == 0 {
            self.timer_next_ns = None;
            self.timer_period_ns = 0;
        } else {
            self.timer_period_ns = self.ticks_to_ns(u64::from(value));
            self.timer_next_ns = Some(now_ns.saturating_add(self.timer_period_ns));
            self.pace_rearm(now_ns);
        }
        Some(LapicEvent::TimerChanged)
    }

    fn write_timer_divide(&mut self, value: u32, now_ns: u64) -> Option<LapicEvent> {
        self.expire_due(now_ns);
        let running = self.timer_next_ns.is_some() && !self.tsc_deadline_mode();
        let left = self.current_count(now_ns);
        self.timer_divide = value & 0xB;
        if !running {
            return None;
        }
        // Keep the count where it is; it continues at the new rate.
        self.timer_period_ns = self.ticks_to_ns(u64::from(self.timer_initial));
        self.timer_next_ns = Some(now_ns.saturating_add(self.ticks_to_ns(u64::from(left))));
        Some(LapicEvent::TimerChanged)
    }

    fn write_lvt(&mut self, index: usize, value: u32, now_ns: u64) -> Option<LapicEvent> {
        let mut value = value & LVT_WRITABLE[index];
        if !self.software_enabled() {
            value |= LVT_MASKED;
        }
        if index != LVT_TIMER {
            self.lvt[index] = value;
            return None;
        }
        // Account for an expiry that is already due under the old settings.
        self.expire_due(now_ns);
        let was_tsc = self.tsc_deadline_mode();
        self.lvt[LVT_TIMER] = value;
        if was_tsc != self.tsc_deadline_mode() {
            self.timer_initial = 0;
            self.timer_next_ns = None;
            self.timer_period_ns = 0;
            self.tsc_deadline = 0;
        }
        Some(LapicEvent::TimerChanged)
    }

    fn write_svr(&mut self, value: u32) -> Option<LapicEvent> {
        let was = self.software_enabled();
        self.svr = value & SVR_WRITABLE;
        if !self.software_enabled() {
            for lvt in &mut self.lvt {
                *lvt |= LVT_MASKED;
            }
        }
        (was != self.software_enabled()).then_some(LapicEvent::TimerChanged)
    }

    // ----- register file -----

    /// Common register read; `None` for offsets that hold no register.
    fn read_reg(&self, offset: u64, now_ns: u64) -> Option<u32> {
        Some(match offset {
            REG_ID => {
                if self.x2apic_enabled() {
                    self.apic_id
                } else {
                    self.apic_id << 24
                }
            }
            REG_VERSION => APIC_VERSION,
            REG_TPR => self.tpr,
            REG_APR => u32::from(self.apr()),
            REG_PPR => u32::from(self.ppr()),
            REG_EOI | REG_RRD => 0,
            REG_LDR => self.current_ldr(),
            REG_DFR => self.dfr,
            REG_SVR => self.svr,
            0x100..=0x170 => self.isr[((offset - REG_ISR) >> 4) as usize],
            0x180..=0x1F0 => self.tmr[((offset - REG_TMR) >> 4) as usize],
            0x200..=0x270 => self.irr[((offset - REG_IRR) >> 4) as usize],
            REG_ESR => self.esr,
            REG_ICR_LOW => self.icr_low,
            REG_ICR_HIGH => self.icr_high,
            0x320..=0x370 => self.lvt[((offset - REG_LVT_TIMER) >> 4) as usize],
            REG_TIMER_INITIAL => self.timer_initial,
            REG_TIMER_CURRENT => self.current_count(now_ns),
            REG_TIMER_DIVIDE => self.timer_divide,
            _ => return None,
        })
    }

    /// Writes shared by xAPIC MMIO and x2APIC MSRs (not ICR, ID, LDR, DFR, EOI, ESR).
    fn write_common(&mut self, offset: u64, value: u32, now_ns: u64) -> Option<LapicEvent> {
        match offset {
            REG_TPR => {
                self.tpr = value & 0xFF;
                None
            }
            REG_SVR => self.write_svr(value),
            0x320..=REG_LVT_ERROR => {
                self.write_lvt(((offset - REG_LVT_TIMER) >> 4) as usize, value, now_ns)
            }
            REG_TIMER_INITIAL => self.write_timer_initial(value, now_ns),
            REG_TIMER_DIVIDE => self.write_timer_divide(value, now_ns),
            _ => None,
        }
    }

    fn latch_esr(&mut self) {
        self.esr = std::mem::take(&mut self.esr_pending);
    }

    /// xAPIC MMIO read of a 32-bit register at `offset` (0..0x1000) within the LAPIC
    /// page. Unaligned/unknown offsets, and any read while in x2APIC mode or
    /// hardware-disabled, read 0.
    pub fn mmio_read(&mut self, offset: u64, now_ns: u64) -> u32 {
        if offset & 0xF != 0 || self.x2apic_enabled() || !self.hardware_enabled() {
            return 0;
        }
        self.read_reg(offset, now_ns).unwrap_or(0)
    }

    /// xAPIC MMIO write. Ignored (returns None) when the APIC is in x2APIC mode or
    /// hardware-disabled, and for unaligned or read-only offsets.
    pub fn mmio_write(&mut self, offset: u64, value: u32, now_ns: u64) -> Option<LapicEvent> {
        if offset & 0xF != 0 || self.x2apic_enabled() || !self.hardware_enabled() {
            return None;
        }
        match offset {
            REG_EOI => self.eoi(),
            REG_LDR => {
                self.ldr = value & 0xFF00_0000;
                None
            }
            REG_DFR => {
                self.dfr = value | 0x0FFF_FFFF;
                None
            }
            REG_ESR => {
                self.latch_esr();
                None
            }
            REG_ICR_LOW => {
                self.icr_low = value & ICR_LOW_WRITABLE;
                let dest = u64::from(self.icr_high >> 24);
                self.send_ipi(dest << 32 | u64::from(self.icr_low))
            }
            REG_ICR_HIGH => {
                self.icr_high = value & 0xFF00_0000;
                None
            }
            _ => self.write_common(offset, value, now_ns),
        }
    }

    fn x2apic_offset(&self, msr: u32) -> Result<u64, LapicError> {
        if !self.x2apic_enabled() {
            return Err(LapicError::GeneralProtection { msr });
        }
        Ok(u64::from(msr - MSR_X2APIC_FIRST) << 4)
    }

    /// RDMSR of IA32_APIC_BASE (0x1B), IA32_TSC_DEADLINE (0x6E0), x2APIC range 0x800..=0x8FF.
    pub fn msr_read(&mut self, msr: u32, now_ns: u64) -> Result<u64, LapicError> {
        let gp = Err(LapicError::GeneralProtection { msr });
        match msr {
            MSR_IA32_APIC_BASE => {
                let bsp = if self.is_bsp { APIC_BASE_BSP } else { 0 };
                Ok(self.apic_base | bsp)
            }
            MSR_IA32_TSC_DEADLINE => Ok(if self.tsc_deadline_mode() {
                self.tsc_deadline
            } else {
                0
            }),
            MSR_X2APIC_FIRST..=MSR_X2APIC_LAST => {
                let offset = self.x2apic_offset(msr)?;
                match offset {
                    REG_APR | REG_RRD | REG_DFR | REG_EOI | REG_ICR_HIGH | REG_LVT_CMCI
                    | REG_SELF_IPI => gp,
                    REG_ICR_LOW => Ok(u64::from(self.icr_high) << 32 | u64::from(self.icr_low)),
                    _ => match self.read_reg(offset, now_ns) {
                        Some(v) => Ok(u64::from(v)),
                        None => gp,
                    },
                }
            }
            _ => gp,
        }
    }

    /// WRMSR of the same set. APIC_BASE transitions per SDM (xAPIC->x2APIC via EXTD|EN,
    /// disable resets state, invalid transitions #GP). In x2APIC mode: ICR (0x830) is one
    /// 64-bit write with destination in bits 63:32; SELF_IPI 0x83F; EOI 0x80B must be 0;
    /// LDR read-only and derived from the id (cluster = id>>4, bit = 1<<(id&15)).
    pub fn msr_write(
        &mut self,
        msr: u32,
        value: u64,
        now_ns: u64,
    ) -> Result<Option<LapicEvent>, LapicError> {
        let gp = Err(LapicError::GeneralProtection { msr });
        match msr {
            MSR_IA32_APIC_BASE => self
                .write_apic_base(value)
                .ok_or(LapicError::GeneralProtection { msr }),
            MSR_IA32_TSC_DEADLINE => {
                if !self.tsc_deadline_mode() {
                    return Ok(None);
                }
                self.expire_due(now_ns);
                self.tsc_deadline = value;
                if value != 0 {
                    self.pace_rearm(now_ns);
                }
                Ok(Some(LapicEvent::TimerChanged))
            }
            MSR_X2APIC_FIRST..=MSR_X2APIC_LAST => {
                let offset = self.x2apic_offset(msr)?;
                if offset == REG_ICR_LOW {
                    let low = value as u32 & ICR_LOW_WRITABLE;
                    self.icr_low = low;
                    self.icr_high = (value >> 32) as u32;
                    return Ok(self.send_ipi((value & !0xFFFF_FFFF) | u64::from(low)));
                }
                if value >> 32 != 0 {
                    return gp;
                }
                let v = value as u32;
                match offset {
                    REG_TPR if v <= 0xFF => Ok(self.write_common(offset, v, now_ns)),
                    REG_EOI if v == 0 => Ok(self.eoi()),
                    REG_ESR if v == 0 => {
                        self.latch_esr();
                        Ok(None)
                    }
                    REG_SELF_IPI if v <= 0xFF => Ok(self.self_ipi(v as u8)),
                    REG_SVR | 0x320..=REG_LVT_ERROR | REG_TIMER_INITIAL | REG_TIMER_DIVIDE => {
                        Ok(self.write_common(offset, v, now_ns))
                    }
                    _ => gp,
                }
            }
            _ => gp,
        }
    }

    /// Apply an IA32_APIC_BASE write; `None` means #GP.
    fn write_apic_base(&mut self, value: u64) -> Option<Option<LapicEvent>> {
        let reserved = !(self.base_addr_mask | APIC_BASE_EN | APIC_BASE_EXTD | APIC_BASE_BSP);
        if value & reserved != 0 {
            return None;
        }
        let en = value & APIC_BASE_EN != 0;
        let extd = value & APIC_BASE_EXTD != 0;
        let was_enabled = self.hardware_enabled();
        let was_x2 = self.x2apic_enabled();
        let invalid = match (en, extd) {
            (false, true) => true,        // EXTD without EN
            (true, false) => was_x2,      // x2APIC -> xAPIC
            (true, true) => !was_enabled, // disabled -> x2APIC
            (false, false) => false,
        };
        if invalid {
            return None;
        }
        if !en && was_enabled {
            self.reset_registers();
        }
        self.apic_base = value & !APIC_BASE_BSP;
        Some((was_enabled != en).then_some(LapicEvent::TimerChanged))
    }
}

#[cfg(test)]
mod tests;
