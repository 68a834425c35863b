//! MC146818 CMOS real-time clock at ports 0x70 (index) / 0x71 (data).
//!
//! The time registers are computed from a wall clock at the moment the guest reads
//! them; a guest that sets the clock stores an offset from that wall clock. No
//! interrupts are generated.

use crate::bus::BusDevice;

/// Number of I/O ports the RTC occupies (index and data).
pub const RTC_PORT_LEN: u64 = 2;

const REG_SECONDS: u8 = 0x00;
const REG_MINUTES: u8 = 0x02;
const REG_HOURS: u8 = 0x04;
const REG_WEEKDAY: u8 = 0x06;
const REG_DAY: u8 = 0x07;
const REG_MONTH: u8 = 0x08;
const REG_YEAR: u8 = 0x09;
const REG_A: u8 = 0x0A;
const REG_B: u8 = 0x0B;
const REG_C: u8 = 0x0C;
const REG_D: u8 = 0x0D;
/// Century register, as the FADT's CENTURY field must say.
pub const REG_CENTURY: u8 = dvmm_layout::RTC_CENTURY_INDEX;

const REG_A_DEFAULT: u8 = 0x26;
const REG_A_UIP: u8 = 0x80;
const REG_B_SET: u8 = 0x80;
const REG_B_BINARY: u8 = 0x04;
const REG_B_24H: u8 = 0x02;
const REG_B_DEFAULT: u8 = REG_B_24H;
const REG_D_VRT: u8 = 0x80;
const HOUR_PM: u8 = 0x80;

const SECS_PER_DAY: i64 = 86_400;

/// A broken-down UTC time. Fields hold whatever the guest wrote while it sets the
/// clock, so they are wide and unvalidated; [`DateTime::to_unix`] normalises them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct DateTime {
    year: i64,
    month: i64,
    day: i64,
    hour: i64,
    minute: i64,
    second: i64,
}

/// Days since 1970-01-01 of the first of `month` (1..=12) in `year` (proleptic
/// Gregorian; after H. Hinnant's `days_from_civil`).
fn days_from_civil(year: i64, month: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12; // March = 0
    let doy = (153 * mp + 2) / 5;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// (year, month, day) of `days` since 1970-01-01.
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

impl DateTime {
    fn from_unix(secs: i64) -> Self {
        let days = secs.div_euclid(SECS_PER_DAY);
        let rem = secs.rem_euclid(SECS_PER_DAY);
        let (year, month, day) = civil_from_days(days);
        Self {
            year,
            month,
            day,
            hour: rem / 3600,
            minute: rem / 60 % 60,
            second: rem % 60,
        }
    }

    /// Seconds since the epoch; out-of-range fields carry into the next larger unit.
    fn to_unix(self) -> i64 {
        // Saturating: a clock near the ends of i64 must not overflow.
        let days = days_from_civil(self.year, self.month.clamp(1, 12)) + self.day - 1;
        days.saturating_mul(SECS_PER_DAY)
            .saturating_add(self.hour * 3600 + self.minute * 60 + self.second)
    }

    /// Day of the week, 1 = Sunday.
    fn weekday(self) -> i64 {
        // 1970-01-01 was a Thursday.
        (self.to_unix().div_euclid(SECS_PER_DAY) + 4).rem_euclid(7) + 1
    }
}

fn to_bcd(v: u8) -> u8 {
    ((v / 10 % 10) << 4) | (v % 10)
}

fn from_bcd(v: u8) -> u8 {
    (v >> 4) * 10 + (v & 0x0F)
}

/// A wall clock: seconds since the Unix epoch.
pub type WallClock = Box<dyn Fn() -> i64 + Send>;

fn host_clock() -> i64 {
    use std::time::{SystemTime, UNIX_EPOCH};
    match SystemTime::now().duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        Err(e) => i64::try_from(e.duration().as_secs()).map_or(i64::MIN, |s| -s),
    }
}

/// MC146818 CMOS RTC at ports 0x70/0x71: index register (bit 7 = NMI mask, ignored)
/// and 128 bytes of CMOS.
///
/// Time registers 0x00..=0x09 and the century (0x32) come from the wall clock (UTC)
/// when read, in BCD or binary and 12/24 h as register B says. Register A reads 0x26
/// (UIP always clear), B defaults to 0x02 (24 h, BCD), C reads 0, D reads 0x80.
/// Guest writes to the time registers set an offset from the wall clock; while
/// register B's SET bit is held the clock is frozen and writes collect until SET is
/// cleared.
pub struct Rtc {
    clock: WallClock,
    index: u8,
    cmos: [u8; 128],
    /// Guest time minus wall-clock time, in seconds.
    offset: i64,
    /// The time being set while register B's SET bit is held.
    frozen: Option<DateTime>,
}

impl Default for Rtc {
    fn default() -> Self {
        Self::new()
    }
}

impl Rtc {
    /// An RTC showing the host's wall clock.
    pub fn new() -> Self {
        Self::with_clock(Box::new(host_clock))
    }

    /// For tests: an RTC over a given wall clock (seconds since the Unix epoch).
    pub fn with_clock(clock: Box<dyn Fn() -> i64 + Send>) -> Self {
        let mut cmos = [0u8; 128];
        cmos[usize::from(REG_A)] = REG_A_DEFAULT;
        cmos[usize::from(REG_B)] = REG_B_DEFAULT;
        Self {
            clock,
            index: 0,
            cmos,
            offset: 0,
            frozen: None,
        }
    }

    fn reg_b(&self) -> u8 {
        self.cmos[usize::from(REG_B)]
    }

    fn now(&self) -> DateTime {
        self.frozen.unwrap_or_else(|| {
            // Years beyond i64 seconds are nonsense anyway; saturate rather than wrap.
            DateTime::from_unix((self.clock)().saturating_add(self.offset))
        })
    }

    fn encode(&self, v: i64) -> u8 {
        let v = v.rem_euclid(100) as u8;
        if self.reg_b() & REG_B_BINARY != 0 {
            v
        } else {
            to_bcd(v)
        }
    }

    fn decode(&self, v: u8) -> i64 {
        i64::from(if self.reg_b() & REG_B_BINARY != 0 {
            v
        } else {
            from_bcd(v)
        })
    }

    fn encode_hour(&self, hour: i64) -> u8 {
        if self.reg_b() & REG_B_24H != 0 {
            return self.encode(hour);
        }
        let h12 = match hour % 12 {
            0 => 12,
            h => h,
        };
        let pm = if hour >= 12 { HOUR_PM } else { 0 };
        self.encode(h12) | pm
    }

    fn decode_hour(&self, v: u8) -> i64 {
        if self.reg_b() & REG_B_24H != 0 {
            return self.decode(v);
        }
        let pm = if v & HOUR_PM != 0 { 12 } else { 0 };
        self.decode(v & !HOUR_PM) % 12 + pm
    }

    fn read_register(&self, reg: u8) -> u8 {
        match reg {
            REG_SECONDS => self.encode(self.now().second),
            REG_MINUTES => self.encode(self.now().minute),
            REG_HOURS => self.encode_hour(self.now().hour),
            REG_WEEKDAY => self.encode(self.now().weekday()),
            REG_DAY => self.encode(self.now().day),
            REG_MONTH => self.encode(self.now().month),
            REG_YEAR => self.encode(self.now().year),
            REG_CENTURY => self.encode(self.now().year.div_euclid(100)),
            REG_A => self.cmos[usize::from(REG_A)] & !REG_A_UIP,
            REG_C => 0,
            REG_D => REG_D_VRT,
            _ => self.cmos[usize::from(reg & 0x7F)],
        }
    }

    /// Apply a guest write to a time field: to the frozen time while SET is held,
    /// otherwise straight into the offset.
    fn set_time_field(&mut self, reg: u8, value: u8) {
        let mut t = self.now();
        match reg {
            REG_SECONDS => t.second = self.decode(value),
            REG_MINUTES => t.minute = self.decode(value),
            REG_HOURS => t.hour = self.decode_hour(value),
            REG_DAY => t.day = self.decode(value),
            REG_MONTH => t.month = self.decode(value),
            REG_YEAR => t.year = t.year.div_euclid(100) * 100 + self.decode(value),
            REG_CENTURY => t.year = self.decode(value) * 100 + t.year.rem_euclid(100),
            _ => return,
        }
        if self.frozen.is_some() {
            self.frozen = Some(t);
        } else {
            self.commit(t);
        }
    }

    fn commit(&mut self, t: DateTime) {
        self.offset = t.to_unix().saturating_sub((self.clock)());
    }

    fn write_register(&mut self, reg: u8, value: u8) {
        match reg {
            REG_SECONDS | REG_MINUTES | REG_HOURS | REG_DAY | REG_MONTH | REG_YEAR
            | REG_CENTURY => self.set_time_field(reg, value),
            // Derived from the date.
            REG_WEEKDAY => {}
            REG_A => self.cmos[usize::from(REG_A)] = value & !REG_A_UIP,
            REG_B => {
                let setting = value & REG_B_SET != 0;
                match (self.frozen, setting) {
                    (None, true) => self.frozen = Some(self.now()),
                    (Some(t), false) => {
                        self.frozen = None;
                        self.commit(t);
                    }
                    _ => {}
                }
                self.cmos[usize::from(REG_B)] = value;
            }
            REG_C | REG_D => {}
            _ => self.cmos[usize::from(reg & 0x7F)] = value,
        }
    }
}

impl BusDevice for Rtc {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        for (i, byte) in data.iter_mut().enumerate() {
            *byte = match offset.checked_add(i as u64) {
                // The index register is write-only.
                Some(0) => 0xFF,
                Some(1) => self.read_register(self.index),
                _ => 0xFF,
            };
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        for (i, &value) in data.iter().enumerate() {
            match offset.checked_add(i as u64) {
                // Bit 7 masks NMIs, which we do not model.
                Some(0) => self.index = value & 0x7F,
                Some(1) => self.write_register(self.index, value),
                _ => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicI64, Ordering};
    use std::sync::Arc;

    /// 2024-02-29 13:45:56 UTC, a Thursday.
    const LEAP_DAY: i64 = 1_709_214_356;

    fn rtc_at(t: Arc<AtomicI64>) -> Rtc {
        Rtc::with_clock(Box::new(move || t.load(Ordering::SeqCst)))
    }

    fn get(rtc: &mut Rtc, reg: u8) -> u8 {
        rtc.write(0, &[reg | 0x80]); // with the NMI-mask bit, which must be ignored
        let mut b = [0];
        rtc.read(1, &mut b);
        b[0]
    }

    fn set(rtc: &mut Rtc, reg: u8, value: u8) {
        rtc.write(0, &[reg]);
        rtc.write(1, &[value]);
    }

    fn time_regs(rtc: &mut Rtc) -> [u8; 8] {
        [0x00, 0x02, 0x04, 0x06, 0x07, 0x08, 0x09, 0x32].map(|r| get(rtc, r))
    }

    #[test]
    fn calendar_conversions_round_trip() {
        assert_eq!(
            DateTime::from_unix(LEAP_DAY),
            DateTime {
                year: 2024,
                month: 2,
                day: 29,
                hour: 13,
                minute: 45,
                second: 56
            }
        );
        for t in [0, -1, LEAP_DAY, 951_782_400, 4_102_444_800, -2_208_988_800] {
            assert_eq!(DateTime::from_unix(t).to_unix(), t);
        }
        assert_eq!(DateTime::from_unix(0).weekday(), 5); // Thursday
    }

    #[test]
    fn reads_bcd_24h_by_default() {
        let mut rtc = rtc_at(Arc::new(AtomicI64::new(LEAP_DAY)));
        assert_eq!(
            time_regs(&mut rtc),
            [0x56, 0x45, 0x13, 0x05, 0x29, 0x02, 0x24, 0x20]
        );
        assert_eq!(get(&mut rtc, REG_A), 0x26);
        assert_eq!(get(&mut rtc, REG_B), 0x02);
        assert_eq!(get(&mut rtc, REG_C), 0);
        assert_eq!(get(&mut rtc, REG_D), 0x80);
    }

    #[test]
    fn reads_binary_and_12h() {
        let mut rtc = rtc_at(Arc::new(AtomicI64::new(LEAP_DAY)));
        set(&mut rtc, REG_B, REG_B_BINARY | REG_B_24H);
        assert_eq!(time_regs(&mut rtc), [56, 45, 13, 5, 29, 2, 24, 20]);
        set(&mut rtc, REG_B, REG_B_BINARY);
        assert_eq!(get(&mut rtc, REG_HOURS), 0x80 | 1);
        set(&mut rtc, REG_B, 0);
        assert_eq!(get(&mut rtc, REG_HOURS), 0x81);
        // Midnight and noon are 12 AM and 12 PM.
        let mut night = rtc_at(Arc::new(AtomicI64::new(LEAP_DAY - 13 * 3600)));
        set(&mut night, REG_B, 0);
        assert_eq!(get(&mut night, REG_HOURS), 0x12);
        let mut noon = rtc_at(Arc::new(AtomicI64::new(LEAP_DAY - 3600)));
        set(&mut noon, REG_B, 0);
        assert_eq!(get(&mut noon, REG_HOURS), 0x92);
    }

    #[test]
    fn time_follows_the_clock() {
        let clock = Arc::new(AtomicI64::new(LEAP_DAY));
        let mut rtc = rtc_at(clock.clone());
        clock.store(LEAP_DAY + 4 + 14 * 60 + 10 * 3600, Ordering::SeqCst); // 00:00:00 next day
        assert_eq!(
            time_regs(&mut rtc),
            [0x00, 0x00, 0x00, 0x06, 0x01, 0x03, 0x24, 0x20]
        );
        assert_eq!(get(&mut rtc, REG_A) & REG_A_UIP, 0);
    }

    #[test]
    fn guest_sets_the_clock_with_set_bit() {
        let clock = Arc::new(AtomicI64::new(LEAP_DAY));
        let mut rtc = rtc_at(clock.clone());
        set(&mut rtc, REG_B, REG_B_SET | REG_B_24H);
        // 1999-12-31 23:59:58, written field by field.
        for (reg, v) in [
            (REG_SECONDS, 0x58),
            (REG_MINUTES, 0x59),
            (REG_HOURS, 0x23),
            (REG_DAY, 0x31),
            (REG_MONTH, 0x12),
            (REG_YEAR, 0x99),
            (REG_CENTURY, 0x19),
        ] {
            set(&mut rtc, reg, v);
        }
        clock.fetch_add(100, Ordering::SeqCst); // frozen while SET is held
        assert_eq!(get(&mut rtc, REG_SECONDS), 0x58);
        set(&mut rtc, REG_B, REG_B_24H);
        clock.fetch_add(3, Ordering::SeqCst);
        assert_eq!(
            time_regs(&mut rtc),
            [0x01, 0x00, 0x00, 0x07, 0x01, 0x01, 0x00, 0x20]
        );
    }

    #[test]
    fn single_field_write_without_set_adjusts_offset() {
        let clock = Arc::new(AtomicI64::new(LEAP_DAY));
        let mut rtc = rtc_at(clock.clone());
        set(&mut rtc, REG_B, 0); // 12 h BCD
        set(&mut rtc, REG_HOURS, 0x12); // 12 AM
        assert_eq!(get(&mut rtc, REG_HOURS), 0x12);
        clock.fetch_add(3600, Ordering::SeqCst);
        assert_eq!(get(&mut rtc, REG_HOURS), 0x01);
        set(&mut rtc, REG_B, REG_B_24H);
        assert_eq!(get(&mut rtc, REG_HOURS), 0x01);
        assert_eq!(get(&mut rtc, REG_DAY), 0x29);
    }

    #[test]
    fn cmos_ram_and_index_port() {
        let mut rtc = rtc_at(Arc::new(AtomicI64::new(LEAP_DAY)));
        set(&mut rtc, 0x40, 0xA5);
        set(&mut rtc, 0x7F, 0x5A);
        assert_eq!(get(&mut rtc, 0x40), 0xA5);
        assert_eq!(get(&mut rtc, 0x7F), 0x5A);
        set(&mut rtc, REG_D, 0);
        assert_eq!(get(&mut rtc, REG_D), 0x80);
        // A 16-bit write sets the index then the data.
        rtc.write(0, &[0x41, 0x77]);
        assert_eq!(get(&mut rtc, 0x41), 0x77);
        let mut b = [0];
        rtc.read(0, &mut b);
        assert_eq!(b[0], 0xFF);
    }

    #[test]
    fn garbage_time_writes_do_not_panic() {
        let mut rtc = rtc_at(Arc::new(AtomicI64::new(LEAP_DAY)));
        for reg in [0, 2, 4, 7, 8, 9, 0x32] {
            set(&mut rtc, reg, 0xFF);
            set(&mut rtc, reg, 0x00);
        }
        let _ = time_regs(&mut rtc);
    }
}
