//! 8254 programmable interval timer (3 channels) plus system control port B (0x61).
//!
//! Counting is derived from host time: a channel remembers when it started and how many
//! PIT clock ticks ([`PIT_HZ`]) elapsed before that, so nothing needs to run between
//! accesses.

use dvmm_layout::{PIT_PORT, PORT_61};

/// The 8254 input clock.
pub const PIT_HZ: u64 = 1_193_182;

const PORT_COMMAND: u16 = PIT_PORT + 3;

/// Access modes (control word bits 5:4).
const ACCESS_LO: u8 = 1;
const ACCESS_HI: u8 = 2;
const ACCESS_LOHI: u8 = 3;

fn ticks_in(ns: u64) -> u64 {
    (u128::from(ns) * u128::from(PIT_HZ) / 1_000_000_000) as u64
}

/// Host ns after which `ticks` PIT ticks have elapsed.
fn ns_for_ticks(ticks: u64) -> u64 {
    let ns = (u128::from(ticks) * 1_000_000_000).div_ceil(u128::from(PIT_HZ));
    ns.min(u128::from(u64::MAX)) as u64
}

#[derive(Clone, Debug)]
struct Channel {
    mode: u8,
    access: u8,
    bcd: bool,
    reload: u16,
    /// First byte of a lobyte/hibyte count write.
    write_lo: Option<u8>,
    read_hi_next: bool,
    latch: Option<u16>,
    latch_hi_next: bool,
    status: Option<u8>,
    null_count: bool,
    /// A count has been written since the last control word.
    has_count: bool,
    /// The counter is running (or paused by the gate).
    counting: bool,
    /// Gate low stopped counting (modes 0, 2, 3, 4).
    paused: bool,
    gate: bool,
    start_ns: u64,
    /// Ticks elapsed before `start_ns` (a gate pause keeps them).
    e_offset: u64,
    /// Rising edges of OUT at or before this tick count have been consumed.
    irq_consumed: u64,
}

impl Channel {
    fn new(gate: bool, now_ns: u64) -> Self {
        Self {
            mode: 0,
            access: ACCESS_LOHI,
            bcd: false,
            reload: 0,
            write_lo: None,
            read_hi_next: false,
            latch: None,
            latch_hi_next: false,
            status: None,
            null_count: true,
            has_count: false,
            counting: false,
            paused: false,
            gate,
            start_ns: now_ns,
            e_offset: 0,
            irq_consumed: 0,
        }
    }

    fn modulus(&self) -> u64 {
        if self.bcd {
            10_000
        } else {
            65_536
        }
    }

    /// The initial count as a number (0 means the full modulus).
    fn n(&self) -> u64 {
        let r = u64::from(self.reload);
        let n = if self.bcd {
            (r >> 12 & 0xF) * 1000 + (r >> 8 & 0xF) * 100 + (r >> 4 & 0xF) * 10 + (r & 0xF)
        } else {
            r
        };
        if n == 0 {
            self.modulus()
        } else {
            n
        }
    }

    fn elapsed(&self, now_ns: u64) -> u64 {
        if !self.counting {
            0
        } else if self.paused {
            self.e_offset
        } else {
            self.e_offset
                .saturating_add(ticks_in(now_ns.saturating_sub(self.start_ns)))
        }
    }

    fn count(&self, now_ns: u64) -> u64 {
        let n = self.n();
        let m = self.modulus();
        if !self.counting {
            return if self.has_count { n % m } else { 0 };
        }
        let e = self.elapsed(now_ns);
        match self.mode {
            2 => (n - e % n) % m,
            3 => {
                let p = e % n;
                let half = n.div_ceil(2);
                let c = if p < half {
                    n - 2 * p
                } else {
                    n - 2 * (p - half)
                };
                c % m
            }
            _ => (i128::from(n) - i128::from(e)).rem_euclid(i128::from(m)) as u64,
        }
    }

    fn encoded_count(&self, now_ns: u64) -> u16 {
        let c = self.count(now_ns);
        if self.bcd {
            let c = c % 10_000;
            (((c / 1000) << 12) | ((c / 100 % 10) << 8) | ((c / 10 % 10) << 4) | (c % 10)) as u16
        } else {
            c as u16
        }
    }

    fn out(&self, now_ns: u64) -> bool {
        if !self.counting {
            return self.mode != 0;
        }
        let n = self.n();
        let e = self.elapsed(now_ns);
        match self.mode {
            0 | 1 => e >= n,
            2 => self.paused || n < 2 || e % n != n - 1,
            3 => self.paused || e % n < n.div_ceil(2),
            _ => e != n,
        }
    }

    /// First rising edge of OUT after tick `after`, in ticks since the count started.
    fn next_rising_edge(&self, after: u64) -> Option<u64> {
        let n = self.n();
        match self.mode {
            0 | 1 => (n > after).then_some(n),
            2 | 3 => Some((after / n + 1).saturating_mul(n)),
            _ => (n + 1 > after).then_some(n + 1),
        }
    }

    fn status_byte(&self, now_ns: u64) -> u8 {
        u8::from(self.out(now_ns)) << 7
            | u8::from(self.null_count) << 6
            | self.access << 4
            | self.mode << 1
            | u8::from(self.bcd)
    }

    fn restart(&mut self, now_ns: u64) {
        self.counting = true;
        self.paused = false;
        self.start_ns = now_ns;
        self.e_offset = 0;
        self.irq_consumed = 0;
    }

    fn load(&mut self, value: u16, now_ns: u64) {
        self.reload = value;
        self.has_count = true;
        self.null_count = false;
        // Modes 1 and 5 wait for a gate trigger; a running one-shot keeps running.
        if matches!(self.mode, 1 | 5) {
            return;
        }
        self.restart(now_ns);
        self.paused = !self.gate;
    }

    fn set_gate(&mut self, gate: bool, now_ns: u64) {
        let old = self.gate;
        self.gate = gate;
        if old == gate || !self.has_count {
            return;
        }
        match (self.mode, gate) {
            (1 | 5 | 2 | 3, true) => self.restart(now_ns),
            (0 | 4, true) if self.counting && self.paused => {
                self.paused = false;
                self.start_ns = now_ns;
            }
            (0 | 2 | 3 | 4, false) if self.counting && !self.paused => {
                self.e_offset = self.elapsed(now_ns);
                self.paused = true;
            }
            _ => {}
        }
    }

    fn latch_count(&mut self, now_ns: u64) {
        if self.latch.is_none() {
            self.latch = Some(self.encoded_count(now_ns));
            self.latch_hi_next = false;
        }
    }

    fn control(&mut self, value: u8) {
        let mode = (value >> 1) & 7;
        self.mode = if mode > 5 { mode - 4 } else { mode };
        self.access = (value >> 4) & 3;
        self.bcd = value & 1 != 0;
        self.write_lo = None;
        self.read_hi_next = false;
        self.latch = None;
        self.latch_hi_next = false;
        self.status = None;
        self.null_count = true;
        self.has_count = false;
        self.counting = false;
        self.paused = false;
        self.irq_consumed = 0;
    }

    fn read(&mut self, now_ns: u64) -> u8 {
        if let Some(status) = self.status.take() {
            return status;
        }
        if let Some(latch) = self.latch {
            let [lo, hi] = latch.to_le_bytes();
            return match self.access {
                ACCESS_LO => {
                    self.latch = None;
                    lo
                }
                ACCESS_HI => {
                    self.latch = None;
                    hi
                }
                _ => {
                    if self.latch_hi_next {
                        self.latch = None;
                        self.latch_hi_next = false;
                        hi
                    } else {
                        self.latch_hi_next = true;
                        lo
                    }
                }
            };
        }
        let [lo, hi] = self.encoded_count(now_ns).to_le_bytes();
        match self.access {
            ACCESS_LO => lo,
            ACCESS_HI => hi,
            _ => {
                self.read_hi_next = !self.read_hi_next;
                if self.read_hi_next {
                    lo
                } else {
                    hi
                }
            }
        }
    }

    fn write(&mut self, value: u8, now_ns: u64) {
        match self.access {
            ACCESS_LO => self.load(u16::from(value), now_ns),
            ACCESS_HI => self.load(u16::from(value) << 8, now_ns),
            _ => match self.write_lo.take() {
                Some(lo) => self.load(u16::from_le_bytes([lo, value]), now_ns),
                None => {
                    self.write_lo = Some(value);
                    // Mode 0: writing the first byte stops the count (OUT goes low).
                    if self.mode == 0 {
                        self.counting = false;
                    }
                }
            },
        }
    }
}

/// 8254 PIT (3 channels, modes 0-5, latch and read-back commands, lobyte/hibyte/both
/// access) plus port 0x61 (bit0 = channel 2 gate, bit1 = speaker data, bit5 = channel 2
/// OUT, bit4 = refresh toggle that flips on reads).
///
/// Simplifications: a new count takes effect immediately in modes 2 and 3 (the 8254 waits
/// for the end of the current period); the count is loaded without the 8254's extra
/// load clock.
#[derive(Clone, Debug)]
pub struct Pit {
    channels: [Channel; 3],
    port61: u8,
    refresh: bool,
}

impl Pit {
    /// A PIT at power-on: channels 0 and 1 gated on, channel 2 gated off, nothing counting.
    pub fn new(now_ns: u64) -> Self {
        Self {
            channels: [
                Channel::new(true, now_ns),
                Channel::new(true, now_ns),
                Channel::new(false, now_ns),
            ],
            port61: 0,
            refresh: false,
        }
    }

    /// Read an I/O port; `port` is 0x40..=0x43 or 0x61. Unknown ports (and the
    /// write-only command port) read 0xFF.
    pub fn read(&mut self, port: u16, now_ns: u64) -> u8 {
        match port {
            p if (PIT_PORT..PORT_COMMAND).contains(&p) => {
                self.channels[(p - PIT_PORT) as usize].read(now_ns)
            }
            PORT_61 => {
                self.refresh = !self.refresh;
                (self.port61 & 0x0F)
                    | u8::from(self.refresh) << 4
                    | u8::from(self.channels[2].out(now_ns)) << 5
            }
            _ => 0xFF,
        }
    }

    /// Write an I/O port (0x40..=0x43 or 0x61; others are ignored).
    pub fn write(&mut self, port: u16, value: u8, now_ns: u64) {
        match port {
            p if (PIT_PORT..PORT_COMMAND).contains(&p) => {
                self.channels[(p - PIT_PORT) as usize].write(value, now_ns)
            }
            PORT_COMMAND => self.command(value, now_ns),
            PORT_61 => {
                self.port61 = value & 0x0F;
                self.channels[2].set_gate(value & 1 != 0, now_ns);
            }
            _ => {}
        }
    }

    fn command(&mut self, value: u8, now_ns: u64) {
        let select = (value >> 6) as usize;
        if select == 3 {
            // Read-back: bit 5 clear = latch count, bit 4 clear = latch status.
            for (i, ch) in self.channels.iter_mut().enumerate() {
                if value & (2 << i) == 0 {
                    continue;
                }
                if value & 0x20 == 0 {
                    ch.latch_count(now_ns);
                }
                if value & 0x10 == 0 && ch.status.is_none() {
                    ch.status = Some(ch.status_byte(now_ns));
                }
            }
            return;
        }
        let ch = &mut self.channels[select];
        if (value >> 4) & 3 == 0 {
            ch.latch_count(now_ns);
        } else {
            ch.control(value);
        }
    }

    /// OUT of `channel` (0..=2) at `now_ns`; false for other channels.
    pub fn out(&self, channel: usize, now_ns: u64) -> bool {
        self.channels.get(channel).is_some_and(|ch| ch.out(now_ns))
    }

    /// Host time of the next rising edge of channel 0's OUT (its IRQ 0), None if none will occur.
    pub fn irq0_deadline(&self) -> Option<u64> {
        let ch = &self.channels[0];
        if !ch.counting || ch.paused {
            return None;
        }
        let edge = ch.next_rising_edge(ch.irq_consumed)?;
        Some(
            ch.start_ns
                .saturating_add(ns_for_ticks(edge.saturating_sub(ch.e_offset))),
        )
    }

    /// Consume rising edges of channel 0 OUT up to now; returns true if at least one
    /// occurred (the VMM then pulses IOAPIC pin 2 once; missed periods are coalesced).
    pub fn poll_irq0(&mut self, now_ns: u64) -> bool {
        let ch = &mut self.channels[0];
        if !ch.counting || ch.paused {
            return false;
        }
        let e = ch.elapsed(now_ns);
        match ch.next_rising_edge(ch.irq_consumed) {
            Some(edge) if edge <= e => {
                ch.irq_consumed = e;
                true
            }
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const T0: u64 = 1_000_000_000;

    fn program(pit: &mut Pit, control: u8, count: u16, now: u64) {
        pit.write(0x43, control, now);
        let ch = 0x40 + u16::from(control >> 6);
        let [lo, hi] = count.to_le_bytes();
        match (control >> 4) & 3 {
            1 => pit.write(ch, lo, now),
            2 => pit.write(ch, hi, now),
            _ => {
                pit.write(ch, lo, now);
                pit.write(ch, hi, now);
            }
        }
    }

    fn read16(pit: &mut Pit, port: u16, now: u64) -> u16 {
        let lo = pit.read(port, now);
        let hi = pit.read(port, now);
        u16::from_le_bytes([lo, hi])
    }

    #[test]
    fn tick_conversions_round_trip() {
        assert_eq!(ticks_in(1_000_000_000), PIT_HZ);
        for k in [1u64, 2, 100, 1193, 65_536, 1 << 30] {
            let ns = ns_for_ticks(k);
            assert_eq!(ticks_in(ns), k);
            assert_eq!(ticks_in(ns - 1), k - 1);
        }
    }

    #[test]
    fn mode2_periodic_deadlines_and_coalescing() {
        let mut pit = Pit::new(0);
        assert_eq!(pit.irq0_deadline(), None);
        program(&mut pit, 0x34, 1193, T0); // ch0, lo/hi, mode 2
        let d1 = T0 + ns_for_ticks(1193);
        assert_eq!(pit.irq0_deadline(), Some(d1));
        assert!(!pit.poll_irq0(d1 - 1));
        assert!(pit.poll_irq0(d1));
        assert!(!pit.poll_irq0(d1));
        let d2 = T0 + ns_for_ticks(2 * 1193);
        assert_eq!(pit.irq0_deadline(), Some(d2));
        // Ten periods late: one edge reported, next deadline in the future.
        let late = T0 + ns_for_ticks(12 * 1193) + 5;
        assert!(pit.poll_irq0(late));
        assert!(!pit.poll_irq0(late));
        assert_eq!(pit.irq0_deadline(), Some(T0 + ns_for_ticks(13 * 1193)));
    }

    #[test]
    fn mode0_one_shot_deadline() {
        let mut pit = Pit::new(0);
        program(&mut pit, 0x30, 100, T0); // ch0, lo/hi, mode 0
        assert!(!pit.out(0, T0));
        let d = T0 + ns_for_ticks(100);
        assert_eq!(pit.irq0_deadline(), Some(d));
        assert!(!pit.out(0, d - 1));
        assert!(pit.out(0, d));
        assert!(pit.poll_irq0(d + 1000));
        assert_eq!(pit.irq0_deadline(), None);
        assert!(!pit.poll_irq0(d + 10_000_000));
        // Reprogramming arms it again.
        program(&mut pit, 0x30, 10, d);
        assert_eq!(pit.irq0_deadline(), Some(d + ns_for_ticks(10)));
    }

    #[test]
    fn mode4_strobe_edge_one_tick_later() {
        let mut pit = Pit::new(0);
        program(&mut pit, 0x38, 50, T0);
        assert_eq!(pit.irq0_deadline(), Some(T0 + ns_for_ticks(51)));
        assert!(!pit.out(0, T0 + ns_for_ticks(50)));
        assert!(pit.out(0, T0 + ns_for_ticks(51)));
    }

    #[test]
    fn live_read_and_latch_lobyte_hibyte() {
        let mut pit = Pit::new(0);
        program(&mut pit, 0x34, 1000, T0);
        let t = T0 + ns_for_ticks(10);
        assert_eq!(read16(&mut pit, 0x40, t), 990);
        // Latch at t, read later: the latched value.
        pit.write(0x43, 0x00, t);
        let later = T0 + ns_for_ticks(300);
        // A second latch before reading is ignored.
        pit.write(0x43, 0x00, later);
        assert_eq!(read16(&mut pit, 0x40, later), 990);
        // Latch consumed: live again.
        assert_eq!(read16(&mut pit, 0x40, later), 700);
        // Mode 2 wraps at the reload value.
        assert_eq!(read16(&mut pit, 0x40, T0 + ns_for_ticks(1010)), 990);
    }

    #[test]
    fn lobyte_only_and_hibyte_only_access() {
        let mut pit = Pit::new(0);
        program(&mut pit, 0x50, 0x80, T0); // ch1, lobyte only, mode 0
        assert_eq!(pit.read(0x41, T0), 0x80);
        assert_eq!(pit.read(0x41, T0 + ns_for_ticks(0x10)), 0x70);
        program(&mut pit, 0x60, 0x1200, T0); // ch1, hibyte only, mode 0
        assert_eq!(pit.read(0x41, T0), 0x12);
        assert_eq!(pit.read(0x41, T0 + ns_for_ticks(0x101)), 0x10);
    }

    #[test]
    fn read_back_status_then_count() {
        let mut pit = Pit::new(0);
        pit.write(0x43, 0x34, T0);
        // Status before a count: null count set, OUT high in mode 2.
        pit.write(0x43, 0xE2, T0); // read-back status only, ch0
        assert_eq!(pit.read(0x40, T0), 0x80 | 0x40 | 0x30 | 0x04);
        pit.write(0x40, 0x00, T0);
        pit.write(0x40, 0x10, T0); // count 0x1000
        pit.write(0x43, 0xC2, T0 + ns_for_ticks(0x10)); // count + status, ch0
        assert_eq!(pit.read(0x40, T0), 0x80 | 0x30 | 0x04);
        assert_eq!(read16(&mut pit, 0x40, T0 + 99_999), 0x0FF0);
    }

    #[test]
    fn port61_channel2_mode0_calibration_pattern() {
        let mut pit = Pit::new(0);
        // Linux pit_calibrate_tsc: gate high, speaker off, ch2 mode 0, count 0x2E9B.
        let v = pit.read(0x61, T0);
        pit.write(0x61, (v & !0x02) | 0x01, T0);
        pit.write(0x43, 0xB0, T0);
        pit.write(0x42, 0x9B, T0);
        pit.write(0x42, 0x2E, T0);
        assert_eq!(pit.read(0x61, T0) & 0x20, 0);
        let done = T0 + ns_for_ticks(0x2E9B);
        assert_eq!(pit.read(0x61, done - 1) & 0x20, 0);
        assert_eq!(pit.read(0x61, done) & 0x21, 0x21);
        // Channel 2 does not raise IRQ 0.
        assert_eq!(pit.irq0_deadline(), None);
    }

    #[test]
    fn port61_refresh_toggles_and_bits_read_back() {
        let mut pit = Pit::new(0);
        pit.write(0x61, 0xF3, 0);
        let a = pit.read(0x61, 0);
        let b = pit.read(0x61, 0);
        assert_eq!(a & 0x0F, 0x03);
        assert_ne!(a & 0x10, b & 0x10);
        assert_eq!(pit.read(0x44, 0), 0xFF);
        assert_eq!(pit.read(0x43, 0), 0xFF);
    }

    #[test]
    fn gate_low_pauses_mode0() {
        let mut pit = Pit::new(0);
        pit.write(0x61, 1, T0);
        program(&mut pit, 0xB0, 1000, T0);
        let t = T0 + ns_for_ticks(100);
        pit.write(0x61, 0, t);
        let later = t + 1_000_000_000;
        assert_eq!(read16(&mut pit, 0x42, later), 900);
        assert!(!pit.out(2, later));
        pit.write(0x61, 1, later);
        assert_eq!(read16(&mut pit, 0x42, later + ns_for_ticks(50)), 850);
        assert!(pit.out(2, later + ns_for_ticks(900)));
    }

    #[test]
    fn mode3_square_wave_and_bcd() {
        let mut pit = Pit::new(0);
        program(&mut pit, 0x36, 100, T0); // ch0 mode 3
        assert!(pit.out(0, T0 + ns_for_ticks(49)));
        assert!(!pit.out(0, T0 + ns_for_ticks(50)));
        assert_eq!(pit.irq0_deadline(), Some(T0 + ns_for_ticks(100)));
        program(&mut pit, 0x31, 0x0100, T0); // ch0 mode 0, BCD, count 100
        assert_eq!(pit.irq0_deadline(), Some(T0 + ns_for_ticks(100)));
        assert_eq!(read16(&mut pit, 0x40, T0 + ns_for_ticks(1)), 0x0099);
    }

    proptest! {
        #[test]
        fn random_port_accesses_never_panic(ops in proptest::collection::vec((any::<bool>(), 0x3Eu16..0x64, any::<u8>(), 0u64..10_000_000), 0..300)) {
            let mut pit = Pit::new(0);
            let mut now = 0u64;
            for (write, port, value, dt) in ops {
                now += dt;
                if write {
                    pit.write(port, value, now);
                } else {
                    pit.read(port, now);
                }
                pit.poll_irq0(now);
                // After consuming edges up to now, the next one lies in the future.
                if let Some(d) = pit.irq0_deadline() {
                    prop_assert!(d > now);
                }
            }
        }
    }
}
