//! ACPI fixed hardware of a non-hardware-reduced platform: the PM1a event and control
//! blocks, the PM timer, and the FADT reset register.

use std::sync::Arc;
use std::time::Instant;

use dvmm_layout::{
    PM1A_CNT_PORT, PM1A_EVT_PORT, PM_TIMER_HZ, PM_TMR_PORT, RESET_VALUE, S5_SLP_TYP,
};

use crate::bus::BusDevice;
use crate::{IrqLine, VmEvent, VmEventSink};

/// Ports covered by [`AcpiPm`], from `PM1A_EVT_PORT`: event block (4), control
/// block (2), 2 unused, PM timer (4).
pub const ACPI_PM_PORT_LEN: u64 = (PM_TMR_PORT - PM1A_EVT_PORT) as u64 + 4;

const STS_OFFSET: u64 = 0;
const EN_OFFSET: u64 = 2;
const CNT_OFFSET: u64 = (PM1A_CNT_PORT - PM1A_EVT_PORT) as u64;
const TMR_OFFSET: u64 = (PM_TMR_PORT - PM1A_EVT_PORT) as u64;

/// PM1 status: the power button was pressed.
pub const PM1_STS_PWRBTN: u16 = 1 << 8;
/// PM1 control: the OS has switched to ACPI mode; always reads set (no SMI mode).
pub const PM1_CNT_SCI_EN: u16 = 1 << 0;
/// PM1 control: write-only "enter the sleep state in SLP_TYP".
pub const PM1_CNT_SLP_EN: u16 = 1 << 13;
const PM1_CNT_SLP_TYP_SHIFT: u16 = 10;
const PM1_CNT_SLP_TYP_MASK: u16 = 0x7;

const PM_TIMER_MASK: u32 = 0x00FF_FFFF;
const NS_PER_SEC: u128 = 1_000_000_000;

/// A monotonic clock in nanoseconds.
pub type MonotonicClock = Box<dyn Fn() -> u64 + Send>;

/// ACPI PM1a event block (status and enable, u16 each), PM1a control (u16) and PM
/// timer (u32, 24-bit, at `PM_TIMER_HZ`), as one device over ports 0x600..0x60C.
///
/// Writing SLP_EN with SLP_TYP = `S5_SLP_TYP` raises [`VmEvent::PowerOff`]; other
/// sleep states are not supported and ignored. Status bits are write-1-to-clear.
/// The SCI (level, `SCI_IRQ`) is driven only if a line is attached with
/// [`AcpiPm::set_sci`].
pub struct AcpiPm {
    events: Arc<dyn VmEventSink>,
    now_ns: MonotonicClock,
    sci: Option<Arc<dyn IrqLine>>,
    sci_level: bool,
    status: u16,
    enable: u16,
    control: u16,
}

impl AcpiPm {
    /// PM registers whose timer runs from the host's monotonic clock.
    pub fn new(events: Arc<dyn VmEventSink>) -> Self {
        let start = Instant::now();
        Self::with_clock(
            events,
            Box::new(move || u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX)),
        )
    }

    /// For tests: PM registers whose timer runs from `now_ns` (nanoseconds).
    pub fn with_clock(events: Arc<dyn VmEventSink>, now_ns: Box<dyn Fn() -> u64 + Send>) -> Self {
        Self {
            events,
            now_ns,
            sci: None,
            sci_level: false,
            status: 0,
            enable: 0,
            control: PM1_CNT_SCI_EN,
        }
    }

    /// Attach the SCI line; it is high while any enabled status bit is set.
    pub fn set_sci(&mut self, sci: Arc<dyn IrqLine>) {
        self.sci_level = false;
        self.sci = Some(sci);
        self.update_sci();
    }

    /// Set PM1 status bits (e.g. [`PM1_STS_PWRBTN`] for a power-button press), raising
    /// the SCI if they are enabled.
    pub fn raise_status(&mut self, bits: u16) {
        self.status |= bits;
        self.update_sci();
    }

    /// The PM timer's current 24-bit count.
    pub fn timer(&self) -> u32 {
        let ticks = u128::from((self.now_ns)()) * u128::from(PM_TIMER_HZ) / NS_PER_SEC;
        (ticks as u32) & PM_TIMER_MASK
    }

    fn update_sci(&mut self) {
        let level = self.status & self.enable != 0;
        if let Some(sci) = &self.sci {
            if level != self.sci_level {
                sci.set_level(level);
            }
        }
        self.sci_level = level;
    }

    /// The 12 bytes of the block, as a little-endian integer.
    fn registers(&self) -> u128 {
        u128::from(self.status)
            | u128::from(self.enable) << 16
            | u128::from(self.control | PM1_CNT_SCI_EN) << 32
            | u128::from(self.timer()) << 64
    }
}

impl BusDevice for AcpiPm {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let regs = self.registers();
        for (i, byte) in data.iter_mut().enumerate() {
            *byte = match offset.checked_add(i as u64) {
                Some(o) if o < ACPI_PM_PORT_LEN => (regs >> (8 * o)) as u8,
                _ => 0xFF,
            };
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let mut clear = 0u16;
        let mut enable = u64::from(self.enable);
        let mut control = u64::from(self.control);
        let mut wrote_control = false;
        for (i, &value) in data.iter().enumerate() {
            let Some(o) = offset.checked_add(i as u64) else {
                continue;
            };
            match o {
                STS_OFFSET | 1 => clear |= u16::from(value) << (8 * (o - STS_OFFSET)),
                EN_OFFSET | 3 => {
                    let shift = 8 * (o - EN_OFFSET);
                    enable = (enable & !(0xFF << shift)) | u64::from(value) << shift;
                }
                CNT_OFFSET | 5 => {
                    let shift = 8 * (o - CNT_OFFSET);
                    control = (control & !(0xFF << shift)) | u64::from(value) << shift;
                    wrote_control = true;
                }
                // The PM timer is read-only.
                o if (TMR_OFFSET..TMR_OFFSET + 4).contains(&o) => {}
                _ => {}
            }
        }
        self.status &= !clear;
        self.enable = enable as u16;
        if wrote_control {
            let control = control as u16;
            self.control = (control & !PM1_CNT_SLP_EN) | PM1_CNT_SCI_EN;
            if control & PM1_CNT_SLP_EN != 0 {
                let slp_typ = (control >> PM1_CNT_SLP_TYP_SHIFT) & PM1_CNT_SLP_TYP_MASK;
                if slp_typ == S5_SLP_TYP {
                    self.events.vm_event(VmEvent::PowerOff);
                } else {
                    tracing::warn!("guest asked for unsupported sleep type {slp_typ}; ignored");
                }
            }
        }
        self.update_sci();
    }
}

/// The FADT reset register at `RESET_PORT` (1 byte). Any write with the CPU-reset bit
/// (bit 2) set, which includes `RESET_VALUE` and the classic 0x0E, raises
/// [`VmEvent::Reset`].
pub struct ResetPort {
    events: Arc<dyn VmEventSink>,
    value: u8,
}

const RESET_CPU_BIT: u8 = 0x04;
const _: () = assert!(RESET_VALUE & RESET_CPU_BIT != 0);

impl ResetPort {
    /// A reset register that reports resets to `events`.
    pub fn new(events: Arc<dyn VmEventSink>) -> Self {
        Self { events, value: 0 }
    }
}

impl BusDevice for ResetPort {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        for (i, byte) in data.iter_mut().enumerate() {
            *byte = if offset.checked_add(i as u64) == Some(0) {
                self.value
            } else {
                0xFF
            };
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        for (i, &value) in data.iter().enumerate() {
            if offset.checked_add(i as u64) == Some(0) {
                self.value = value & !RESET_CPU_BIT;
                if value & RESET_CPU_BIT != 0 {
                    self.events.vm_event(VmEvent::Reset);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{Events, FakeIrq};
    use std::sync::atomic::{AtomicU64, Ordering};

    fn setup() -> (AcpiPm, Arc<Events>, Arc<AtomicU64>) {
        let events = Arc::new(Events::default());
        let clock = Arc::new(AtomicU64::new(0));
        let c = clock.clone();
        let pm = AcpiPm::with_clock(events.clone(), Box::new(move || c.load(Ordering::SeqCst)));
        (pm, events, clock)
    }

    fn read16(pm: &mut AcpiPm, offset: u64) -> u16 {
        let mut b = [0u8; 2];
        pm.read(offset, &mut b);
        u16::from_le_bytes(b)
    }

    fn read32(pm: &mut AcpiPm, offset: u64) -> u32 {
        let mut b = [0u8; 4];
        pm.read(offset, &mut b);
        u32::from_le_bytes(b)
    }

    fn cnt(slp_typ: u16, slp_en: bool) -> [u8; 2] {
        let v = slp_typ << 10 | if slp_en { PM1_CNT_SLP_EN } else { 0 };
        v.to_le_bytes()
    }

    #[test]
    fn s5_power_off_needs_slp_en_and_s5_type() {
        let (mut pm, events, _) = setup();
        pm.write(CNT_OFFSET, &cnt(S5_SLP_TYP, false));
        pm.write(CNT_OFFSET, &cnt(1, true));
        pm.write(CNT_OFFSET, &cnt(3, true));
        assert!(events.take().is_empty());
        assert_eq!(
            read16(&mut pm, CNT_OFFSET),
            3 << 10 | PM1_CNT_SCI_EN,
            "SLP_EN reads 0, SCI_EN reads 1"
        );
        pm.write(CNT_OFFSET, &cnt(S5_SLP_TYP, true));
        assert_eq!(events.take(), vec![VmEvent::PowerOff]);
        // The high byte alone carries SLP_TYP and SLP_EN.
        pm.write(CNT_OFFSET + 1, &[cnt(S5_SLP_TYP, true)[1]]);
        assert_eq!(events.take(), vec![VmEvent::PowerOff]);
    }

    #[test]
    fn sci_en_reads_set() {
        let (mut pm, _, _) = setup();
        assert_eq!(read16(&mut pm, CNT_OFFSET) & PM1_CNT_SCI_EN, 1);
        pm.write(CNT_OFFSET, &[0, 0]);
        assert_eq!(read16(&mut pm, CNT_OFFSET) & PM1_CNT_SCI_EN, 1);
    }

    #[test]
    fn status_is_write_one_to_clear_and_drives_sci() {
        let (mut pm, _, _) = setup();
        let sci = Arc::new(FakeIrq::default());
        pm.set_sci(sci.clone());
        pm.raise_status(PM1_STS_PWRBTN | 1);
        assert_eq!(read16(&mut pm, STS_OFFSET), PM1_STS_PWRBTN | 1);
        assert!(!sci.is_high(), "not enabled");
        pm.write(EN_OFFSET, &PM1_STS_PWRBTN.to_le_bytes());
        assert_eq!(read16(&mut pm, EN_OFFSET), PM1_STS_PWRBTN);
        assert!(sci.is_high());
        pm.write(STS_OFFSET, &0u16.to_le_bytes());
        assert_eq!(read16(&mut pm, STS_OFFSET), PM1_STS_PWRBTN | 1);
        pm.write(STS_OFFSET, &PM1_STS_PWRBTN.to_le_bytes());
        assert_eq!(read16(&mut pm, STS_OFFSET), 1);
        assert!(!sci.is_high());
        // A 32-bit write covers status and enable at once.
        pm.write(STS_OFFSET, &[0xFF, 0xFF, 0x00, 0x00]);
        assert_eq!(read32(&mut pm, STS_OFFSET), 0);
    }

    #[test]
    fn pm_timer_runs_at_3_579545_mhz_and_wraps_at_24_bits() {
        let (mut pm, _, clock) = setup();
        assert_eq!(read32(&mut pm, TMR_OFFSET), 0);
        clock.store(1_000_000_000, Ordering::SeqCst);
        assert_eq!(read32(&mut pm, TMR_OFFSET), 3_579_545);
        clock.store(1_000, Ordering::SeqCst);
        assert_eq!(read32(&mut pm, TMR_OFFSET), 3); // 3.58 ticks per µs
        clock.store(5_000_000_000, Ordering::SeqCst); // 17_897_725 ticks
        assert_eq!(read32(&mut pm, TMR_OFFSET), 17_897_725 & 0xFF_FFFF);
        pm.write(TMR_OFFSET, &[0; 4]);
        assert_eq!(read32(&mut pm, TMR_OFFSET), 17_897_725 & 0xFF_FFFF);
        clock.store(u64::MAX, Ordering::SeqCst);
        assert!(read32(&mut pm, TMR_OFFSET) <= 0xFF_FFFF);
    }

    #[test]
    fn reset_port() {
        let events = Arc::new(Events::default());
        let mut port = ResetPort::new(events.clone());
        port.write(0, &[0x02]);
        assert!(events.take().is_empty());
        let mut b = [0];
        port.read(0, &mut b);
        assert_eq!(b[0], 0x02);
        port.write(0, &[RESET_VALUE]);
        assert_eq!(events.take(), vec![VmEvent::Reset]);
        port.write(1, &[RESET_VALUE]);
        assert!(events.take().is_empty());
    }
}
