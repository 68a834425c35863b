//! 82093AA-style IOAPIC (version 0x11): 24 redirection entries, no EOI register.

use crate::msg::{DeliveryMode, DestinationMode, InterruptMessage, Shorthand, TriggerMode};
use dvmm_layout::IOAPIC_PINS;

/// IOREGSEL (register select) offset within the IOAPIC window.
pub const IOREGSEL: u64 = 0x00;
/// IOWIN (register data) offset within the IOAPIC window.
pub const IOWIN: u64 = 0x10;
/// IOAPIC version: 0x11, with the maximum redirection entry (pins - 1) in bits 23:16.
pub const IOAPIC_VERSION: u32 = 0x11 | ((IOAPIC_PINS as u32 - 1) << 16);

const REG_ID: u32 = 0x00;
const REG_VERSION: u32 = 0x01;
const REG_ARB: u32 = 0x02;
const REG_REDIR_FIRST: u32 = 0x10;

const RTE_MASKED: u64 = 1 << 16;
const RTE_LEVEL: u64 = 1 << 15;
const RTE_REMOTE_IRR: u64 = 1 << 14;
const RTE_LOGICAL: u64 = 1 << 11;
/// Vector, delivery mode, destination mode, polarity, trigger mode, mask (low dword).
const RTE_LOW_WRITABLE: u32 = 0x0001_AFFF;
/// Destination field (high dword bits 31:24).
const RTE_HIGH_WRITABLE: u32 = 0xFF00_0000;

/// 82093AA-style IOAPIC, version 0x11 (no EOI register; EOIs arrive from LAPIC
/// LevelEoi broadcasts), 24 pins.
///
/// Pin levels passed to [`set_irq`](Self::set_irq) are logical (true = asserted); the
/// polarity bit is stored for the guest but not applied. The ID register has the
/// 82093AA's 4 bits (24-27); the arbitration register reads the same ID.
#[derive(Clone, Debug)]
pub struct IoApic {
    id: u8,
    ioregsel: u8,
    redirection: [u64; IOAPIC_PINS],
    line: [bool; IOAPIC_PINS],
}

impl IoApic {
    /// An IOAPIC with the given id; all pins masked at reset.
    pub fn new(id: u8) -> Self {
        Self {
            id,
            ioregsel: 0,
            redirection: [RTE_MASKED; IOAPIC_PINS],
            line: [false; IOAPIC_PINS],
        }
    }

    /// The redirection entry of `pin` (None if out of range).
    pub fn redirection_entry(&self, pin: usize) -> Option<u64> {
        self.redirection.get(pin).copied()
    }

    /// MMIO read: IOREGSEL at 0x00, IOWIN at 0x10; anything else reads 0.
    pub fn mmio_read(&mut self, offset: u64) -> u32 {
        match offset {
            IOREGSEL => u32::from(self.ioregsel),
            IOWIN => self.read_register(u32::from(self.ioregsel)),
            _ => 0,
        }
    }

    fn read_register(&self, index: u32) -> u32 {
        match index {
            REG_ID | REG_ARB => u32::from(self.id) << 24,
            REG_VERSION => IOAPIC_VERSION,
            _ => match Self::redirection_slot(index) {
                Some((pin, high)) => {
                    let rte = self.redirection[pin];
                    if high {
                        (rte >> 32) as u32
                    } else {
                        rte as u32
                    }
                }
                None => 0,
            },
        }
    }

    /// Pin and which half for a redirection register index.
    fn redirection_slot(index: u32) -> Option<(usize, bool)> {
        let rel = index.checked_sub(REG_REDIR_FIRST)? as usize;
        let pin = rel / 2;
        (pin < IOAPIC_PINS).then_some((pin, rel % 2 == 1))
    }

    /// MMIO write. Returns messages to deliver (e.g. unmasking a pin whose level line is
    /// asserted).
    pub fn mmio_write(&mut self, offset: u64, value: u32) -> Vec<InterruptMessage> {
        match offset {
            IOREGSEL => {
                self.ioregsel = value as u8;
                Vec::new()
            }
            IOWIN => self.write_register(u32::from(self.ioregsel), value),
            _ => Vec::new(),
        }
    }

    fn write_register(&mut self, index: u32, value: u32) -> Vec<InterruptMessage> {
        if index == REG_ID {
            self.id = ((value >> 24) & 0x0f) as u8;
            return Vec::new();
        }
        let Some((pin, high)) = Self::redirection_slot(index) else {
            return Vec::new();
        };
        let rte = &mut self.redirection[pin];
        if high {
            *rte = (*rte & 0xFFFF_FFFF) | u64::from(value & RTE_HIGH_WRITABLE) << 32;
            return Vec::new();
        }
        let kept = *rte & (0xFFFF_FFFF_0000_0000 | RTE_REMOTE_IRR);
        *rte = kept | u64::from(value & RTE_LOW_WRITABLE);
        if *rte & RTE_LEVEL == 0 {
            *rte &= !RTE_REMOTE_IRR;
        }
        self.deliver_level(pin).into_iter().collect()
    }

    /// For a level pin: deliver if asserted, unmasked and remote-IRR clear.
    fn deliver_level(&mut self, pin: usize) -> Option<InterruptMessage> {
        let rte = self.redirection[pin];
        if rte & RTE_LEVEL == 0 || rte & (RTE_MASKED | RTE_REMOTE_IRR) != 0 || !self.line[pin] {
            return None;
        }
        let msg = Self::message(rte)?;
        self.redirection[pin] |= RTE_REMOTE_IRR;
        Some(msg)
    }

    /// The message a redirection entry sends; None for reserved delivery modes.
    fn message(rte: u64) -> Option<InterruptMessage> {
        let delivery = DeliveryMode::from_bits((rte >> 8) as u32)?;
        if delivery == DeliveryMode::StartUp {
            return None;
        }
        Some(InterruptMessage {
            vector: rte as u8,
            delivery,
            dest_mode: if rte & RTE_LOGICAL != 0 {
                DestinationMode::Logical
            } else {
                DestinationMode::Physical
            },
            destination: (rte >> 56) as u32,
            shorthand: Shorthand::None,
            trigger: if rte & RTE_LEVEL != 0 {
                TriggerMode::Level
            } else {
                TriggerMode::Edge
            },
            level: true,
        })
    }

    /// Drive input pin `pin` (GSI). Edge pins deliver on a rising edge; level pins deliver
    /// while asserted and remote-IRR is clear (then set remote-IRR). Masked pins deliver
    /// nothing (a level pin asserted while masked delivers on unmask). Out-of-range pins
    /// are ignored.
    pub fn set_irq(&mut self, pin: usize, level: bool) -> Vec<InterruptMessage> {
        let Some(old) = self.line.get(pin).copied() else {
            return Vec::new();
        };
        self.line[pin] = level;
        let rte = self.redirection[pin];
        if rte & RTE_LEVEL != 0 {
            return self.deliver_level(pin).into_iter().collect();
        }
        if level && !old && rte & RTE_MASKED == 0 {
            return Self::message(rte).into_iter().collect();
        }
        Vec::new()
    }

    /// Assert then de-assert an edge pin (what a PIT tick does); returns what the rising
    /// edge delivers.
    pub fn pulse_irq(&mut self, pin: usize) -> Vec<InterruptMessage> {
        let msgs = self.set_irq(pin, true);
        let more = self.set_irq(pin, false);
        msgs.into_iter().chain(more).collect()
    }

    /// Level EOI for `vector`: clear remote-IRR of matching level pins, re-deliver those
    /// still asserted.
    pub fn end_of_interrupt(&mut self, vector: u8) -> Vec<InterruptMessage> {
        let mut out = Vec::new();
        for pin in 0..IOAPIC_PINS {
            let rte = self.redirection[pin];
            if rte as u8 == vector && rte & RTE_LEVEL != 0 && rte & RTE_REMOTE_IRR != 0 {
                self.redirection[pin] &= !RTE_REMOTE_IRR;
                out.extend(self.deliver_level(pin));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn write_rte(io: &mut IoApic, pin: u32, low: u32, high: u32) -> Vec<InterruptMessage> {
        io.mmio_write(IOREGSEL, 0x11 + 2 * pin);
        io.mmio_write(IOWIN, high);
        io.mmio_write(IOREGSEL, 0x10 + 2 * pin);
        io.mmio_write(IOWIN, low)
    }

    fn read_rte(io: &mut IoApic, pin: u32) -> (u32, u32) {
        io.mmio_write(IOREGSEL, 0x10 + 2 * pin);
        let low = io.mmio_read(IOWIN);
        io.mmio_write(IOREGSEL, 0x11 + 2 * pin);
        (low, io.mmio_read(IOWIN))
    }

    #[test]
    fn id_version_and_reset_state() {
        let mut io = IoApic::new(dvmm_layout::IOAPIC_ID);
        io.mmio_write(IOREGSEL, 0);
        assert_eq!(io.mmio_read(IOWIN), 0);
        io.mmio_write(IOREGSEL, 1);
        assert_eq!(io.mmio_read(IOWIN), 0x0017_0011);
        assert_eq!(io.mmio_read(IOREGSEL), 1);
        for pin in 0..24 {
            assert_eq!(read_rte(&mut io, pin), (0x0001_0000, 0));
        }
        // Only ID bits 24-27 are writable; the arbitration register follows, read-only.
        io.mmio_write(IOREGSEL, 0);
        io.mmio_write(IOWIN, 0xFFFF_FFFF);
        assert_eq!(io.mmio_read(IOWIN), 0x0F00_0000);
        io.mmio_write(IOREGSEL, 2);
        io.mmio_write(IOWIN, 0);
        assert_eq!(io.mmio_read(IOWIN), 0x0F00_0000);
        io.mmio_write(IOREGSEL, 0);
        io.mmio_write(IOWIN, 0);
        // Beyond the last pin and unknown offsets read 0.
        io.mmio_write(IOREGSEL, 0x10 + 48);
        assert_eq!(io.mmio_read(IOWIN), 0);
        assert_eq!(io.mmio_read(0x20), 0);
    }

    #[test]
    fn redirection_low_and_high_dwords() {
        let mut io = IoApic::new(0);
        // Read-only bits (delivery status 12, remote IRR 14) are not writable.
        write_rte(&mut io, 5, 0xFFFF_FFFF, 0xFFFF_FFFF);
        assert_eq!(read_rte(&mut io, 5), (0x0001_AFFF, 0xFF00_0000));
        write_rte(&mut io, 5, 0x0000_0931, 0x0300_0000);
        assert_eq!(read_rte(&mut io, 5), (0x0000_0931, 0x0300_0000));
        assert_eq!(io.redirection_entry(5), Some(0x0300_0000_0000_0931));
        assert_eq!(io.redirection_entry(24), None);
    }

    #[test]
    fn edge_pin_delivers_on_rising_edge_only() {
        let mut io = IoApic::new(0);
        assert!(write_rte(&mut io, 2, 0x30, 0x0100_0000).is_empty());
        let m = io.set_irq(2, true);
        assert_eq!(m, vec![InterruptMessage::fixed(0x30, 1)]);
        assert!(io.set_irq(2, true).is_empty());
        assert!(io.set_irq(2, false).is_empty());
        assert_eq!(io.pulse_irq(2).len(), 1);
        assert!(io.set_irq(99, true).is_empty());
    }

    #[test]
    fn masked_edge_is_lost() {
        let mut io = IoApic::new(0);
        write_rte(&mut io, 4, 0x0001_0031, 0);
        assert!(io.set_irq(4, true).is_empty());
        // Unmasking an edge pin does not replay.
        assert!(write_rte(&mut io, 4, 0x31, 0).is_empty());
    }

    #[test]
    fn level_remote_irr_and_eoi_redelivery() {
        let mut io = IoApic::new(0);
        write_rte(&mut io, 9, 0x0000_A841, 0);
        let m = io.set_irq(9, true);
        assert_eq!(m.len(), 1);
        assert_eq!(m[0].trigger, TriggerMode::Level);
        assert_eq!(m[0].dest_mode, DestinationMode::Logical);
        assert_eq!(read_rte(&mut io, 9).0 & (1 << 14), 1 << 14);
        // Still asserted, remote IRR set: nothing more.
        assert!(io.set_irq(9, true).is_empty());
        // EOI of another vector does nothing.
        assert!(io.end_of_interrupt(0x42).is_empty());
        // EOI while still asserted: re-delivered.
        assert_eq!(io.end_of_interrupt(0x41).len(), 1);
        // Line drops, EOI: remote IRR clears and nothing is delivered.
        io.set_irq(9, false);
        assert!(io.end_of_interrupt(0x41).is_empty());
        assert_eq!(read_rte(&mut io, 9).0 & (1 << 14), 0);
        // Next assertion delivers again.
        assert_eq!(io.set_irq(9, true).len(), 1);
    }

    #[test]
    fn level_asserted_while_masked_delivers_on_unmask() {
        let mut io = IoApic::new(0);
        write_rte(&mut io, 10, 0x0001_8051, 0x0200_0000);
        assert!(io.set_irq(10, true).is_empty());
        let m = write_rte(&mut io, 10, 0x0000_8051, 0x0200_0000);
        assert_eq!(m.len(), 1);
        assert_eq!(m[0].vector, 0x51);
        assert_eq!(m[0].destination, 2);
        // Re-writing the entry while remote IRR is set does not deliver twice.
        assert!(write_rte(&mut io, 10, 0x0000_8051, 0x0200_0000).is_empty());
        // Switching to edge clears remote IRR.
        write_rte(&mut io, 10, 0x51, 0);
        assert_eq!(read_rte(&mut io, 10).0 & (1 << 14), 0);
    }

    proptest! {
        #[test]
        fn random_accesses_never_panic(ops in proptest::collection::vec((0u8..4, any::<u64>(), any::<u32>(), any::<bool>()), 0..200)) {
            let mut io = IoApic::new(0);
            for (kind, offset, value, level) in ops {
                match kind {
                    0 => { io.mmio_read(offset % 0x1000); }
                    1 => { io.mmio_write(offset % 0x1000, value); }
                    2 => { io.set_irq((value % 32) as usize, level); }
                    _ => { io.end_of_interrupt(value as u8); }
                }
            }
        }
    }
}
