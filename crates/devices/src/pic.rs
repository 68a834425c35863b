//! Register-level stub of one 8259A PIC. Instantiate it twice: master at
//! `PIC_MASTER_PORT` and slave at `PIC_SLAVE_PORT`, 2 ports each.
//!
//! It accepts the ICW1..ICW4 initialisation sequence and the OCWs, reads the interrupt
//! mask back as written (so Linux detects a PIC and masks it), and reads IRR and ISR
//! as 0. It never delivers an interrupt: dvmm routes legacy IRQs through the IOAPIC
//! and does not support ExtINT.

use crate::bus::BusDevice;

/// Number of I/O ports one 8259A occupies.
pub const PIC_PORT_LEN: u64 = 2;

const ICW1: u8 = 0x10;
const ICW1_NEED_ICW4: u8 = 0x01;
const ICW1_SINGLE: u8 = 0x02;
const OCW3: u8 = 0x08;

/// Where the chip is in its initialisation sequence.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Init {
    Ready,
    Icw2,
    Icw3,
    Icw4,
}

/// One 8259A programmable interrupt controller, registers only.
#[derive(Clone, Debug)]
pub struct Pic {
    init: Init,
    icw1: u8,
    vector_base: u8,
    icw3: u8,
    icw4: u8,
    imr: u8,
}

impl Default for Pic {
    fn default() -> Self {
        Self::new()
    }
}

impl Pic {
    /// A PIC in its power-on state: not initialised, all lines unmasked.
    pub fn new() -> Self {
        Self {
            init: Init::Ready,
            icw1: 0,
            vector_base: 0,
            icw3: 0,
            icw4: 0,
            imr: 0,
        }
    }

    /// The interrupt mask register (OCW1); bit n masks IR line n.
    pub fn imr(&self) -> u8 {
        self.imr
    }

    /// Vector of IR line 0, as programmed by ICW2.
    pub fn vector_base(&self) -> u8 {
        self.vector_base
    }

    /// Whether the chip is waiting for more initialisation words.
    pub fn initialising(&self) -> bool {
        self.init != Init::Ready
    }

    fn write_command(&mut self, value: u8) {
        if value & ICW1 != 0 {
            // Starts initialisation: mask cleared, waiting for ICW2.
            self.icw1 = value;
            self.imr = 0;
            self.icw4 = 0;
            self.init = Init::Icw2;
        } else if value & OCW3 != 0 {
            // Register selection / poll / special mask: IRR and ISR read 0 anyway.
        } else {
            // OCW2 (EOI, rotation): nothing is ever in service.
        }
    }

    fn write_data(&mut self, value: u8) {
        self.init = match self.init {
            Init::Ready => {
                self.imr = value;
                Init::Ready
            }
            Init::Icw2 => {
                self.vector_base = value & 0xF8;
                if self.icw1 & ICW1_SINGLE == 0 {
                    Init::Icw3
                } else if self.icw1 & ICW1_NEED_ICW4 != 0 {
                    Init::Icw4
                } else {
                    Init::Ready
                }
            }
            Init::Icw3 => {
                self.icw3 = value;
                if self.icw1 & ICW1_NEED_ICW4 != 0 {
                    Init::Icw4
                } else {
                    Init::Ready
                }
            }
            Init::Icw4 => {
                self.icw4 = value;
                Init::Ready
            }
        };
    }
}

impl BusDevice for Pic {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        for (i, byte) in data.iter_mut().enumerate() {
            *byte = match offset.checked_add(i as u64) {
                // IRR or ISR, whichever OCW3 selected; poll reads "no interrupt".
                Some(0) => 0,
                Some(1) => self.imr,
                _ => 0xFF,
            };
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        for (i, &value) in data.iter().enumerate() {
            match offset.checked_add(i as u64) {
                Some(0) => self.write_command(value),
                Some(1) => self.write_data(value),
                _ => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(pic: &mut Pic, offset: u64) -> u8 {
        let mut b = [0];
        pic.read(offset, &mut b);
        b[0]
    }

    #[test]
    fn imr_reads_back_through_icw_sequence() {
        let mut pic = Pic::new();
        // Linux's probe: mask everything, read it back.
        pic.write(1, &[0xFF]);
        assert_eq!(read(&mut pic, 1), 0xFF);
        // init_8259A on the master: ICW1 (edge, cascade, ICW4), ICW2..ICW4.
        pic.write(0, &[0x11]);
        assert!(pic.initialising());
        pic.write(1, &[0x30]);
        pic.write(1, &[0x04]);
        assert!(pic.initialising());
        pic.write(1, &[0x01]);
        assert!(!pic.initialising());
        assert_eq!(pic.vector_base(), 0x30);
        // The ICWs did not land in the IMR; OCW1 does.
        assert_eq!(read(&mut pic, 1), 0x00);
        pic.write(1, &[0xFB]);
        assert_eq!(read(&mut pic, 1), 0xFB);
        // OCW2 (EOI) and OCW3 (read ISR) leave it alone; IRR/ISR read 0.
        pic.write(0, &[0x20]);
        pic.write(0, &[0x0B]);
        assert_eq!(read(&mut pic, 0), 0);
        assert_eq!(pic.imr(), 0xFB);
    }

    #[test]
    fn single_mode_without_icw4() {
        let mut pic = Pic::new();
        pic.write(0, &[0x12]); // single, no ICW4
        pic.write(1, &[0x08]);
        assert!(!pic.initialising());
        pic.write(1, &[0xAA]);
        assert_eq!(read(&mut pic, 1), 0xAA);
    }
}
