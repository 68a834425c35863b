//! Minimal i8042 keyboard controller: enough for the guest to probe it and to reset
//! the machine through it. No keyboard or mouse is attached and no interrupts are
//! raised; responses are read by polling the status register.

use std::sync::Arc;

use crate::bus::BusDevice;
use crate::{VmEvent, VmEventSink};

/// Span of ports from `I8042_DATA_PORT` (0x60) to `I8042_CMD_PORT` (0x64) inclusive.
/// Offsets 1..=3 (ports 0x61..=0x63) are not this device: reads give 0xFF, writes are
/// ignored.
pub const I8042_PORT_LEN: u64 = 5;
/// Offset of the data port (0x60) within the device.
pub const DATA_OFFSET: u64 = 0;
/// Offset of the command/status port (0x64) within the device. A bus that also holds
/// port 0x61 can map the device twice (0x60 length 1, and 0x64 length 1 with accesses
/// shifted by this offset).
pub const CMD_OFFSET: u64 = 4;

const STATUS_OBF: u8 = 0x01;
const STATUS_SYS: u8 = 0x04;
const STATUS_CMD: u8 = 0x08;
/// Keyboard not inhibited.
const STATUS_UNLOCKED: u8 = 0x10;

const CTR_SYS: u8 = 0x04;
const CTR_KBD_DISABLED: u8 = 0x10;
const CTR_AUX_DISABLED: u8 = 0x20;
const CTR_XLATE: u8 = 0x40;
/// Controller command byte after firmware: system flag set, translation on, both
/// ports disabled and their interrupts off (there is nothing behind them).
const CTR_DEFAULT: u8 = CTR_XLATE | CTR_AUX_DISABLED | CTR_KBD_DISABLED | CTR_SYS;

const CMD_READ_RAM: u8 = 0x20;
const CMD_WRITE_RAM: u8 = 0x60;
const CMD_AUX_DISABLE: u8 = 0xA7;
const CMD_AUX_ENABLE: u8 = 0xA8;
const CMD_AUX_TEST: u8 = 0xA9;
const CMD_SELF_TEST: u8 = 0xAA;
const CMD_KBD_TEST: u8 = 0xAB;
const CMD_KBD_DISABLE: u8 = 0xAD;
const CMD_KBD_ENABLE: u8 = 0xAE;
const CMD_READ_OUTPUT_PORT: u8 = 0xD0;
const CMD_WRITE_OUTPUT_PORT: u8 = 0xD1;
/// 0xF0..=0xFF pulse output-port lines low; bit 0 clear pulses the reset line.
const CMD_PULSE_BASE: u8 = 0xF0;

const SELF_TEST_OK: u8 = 0x55;
const INTERFACE_OK: u8 = 0x00;
/// "Clock line stuck low": there is no mouse.
const INTERFACE_NO_DEVICE: u8 = 0x01;
/// Output port: bit 0 = system reset line (active low), bit 1 = A20 gate.
const OUTPUT_PORT_DEFAULT: u8 = 0x03;

/// What the next data-port write means.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Pending {
    /// A byte for the (absent) keyboard.
    Keyboard,
    /// Controller RAM byte `n` (0 is the command byte).
    Ram(u8),
    OutputPort,
}

/// Minimal i8042 at `I8042_DATA_PORT` / `I8042_CMD_PORT` (base 0x60, length 5).
pub struct I8042 {
    events: Arc<dyn VmEventSink>,
    /// Controller RAM; byte 0 is the command byte.
    ram: [u8; 32],
    output: Option<u8>,
    /// What a data read returns when the output buffer is empty (the stale byte).
    last_output: u8,
    last_write_was_command: bool,
    pending: Pending,
    output_port: u8,
}

impl I8042 {
    /// A controller that reports reset requests to `events`.
    pub fn new(events: Arc<dyn VmEventSink>) -> Self {
        let mut ram = [0u8; 32];
        ram[0] = CTR_DEFAULT;
        Self {
            events,
            ram,
            output: None,
            last_output: 0,
            last_write_was_command: false,
            pending: Pending::Keyboard,
            output_port: OUTPUT_PORT_DEFAULT,
        }
    }

    fn status(&self) -> u8 {
        let mut s = STATUS_UNLOCKED;
        if self.output.is_some() {
            s |= STATUS_OBF;
        }
        if self.ram[0] & CTR_SYS != 0 {
            s |= STATUS_SYS;
        }
        if self.last_write_was_command {
            s |= STATUS_CMD;
        }
        s
    }

    fn respond(&mut self, byte: u8) {
        self.output = Some(byte);
    }

    fn read_data(&mut self) -> u8 {
        if let Some(b) = self.output.take() {
            self.last_output = b;
        }
        self.last_output
    }

    fn command(&mut self, cmd: u8) {
        self.last_write_was_command = true;
        self.pending = Pending::Keyboard;
        match cmd {
            CMD_READ_RAM..=0x3F => self.respond(self.ram[usize::from(cmd - CMD_READ_RAM)]),
            CMD_WRITE_RAM..=0x7F => self.pending = Pending::Ram(cmd - CMD_WRITE_RAM),
            CMD_AUX_DISABLE => self.ram[0] |= CTR_AUX_DISABLED,
            CMD_AUX_ENABLE => self.ram[0] &= !CTR_AUX_DISABLED,
            CMD_AUX_TEST => self.respond(INTERFACE_NO_DEVICE),
            CMD_SELF_TEST => self.respond(SELF_TEST_OK),
            CMD_KBD_TEST => self.respond(INTERFACE_OK),
            CMD_KBD_DISABLE => self.ram[0] |= CTR_KBD_DISABLED,
            CMD_KBD_ENABLE => self.ram[0] &= !CTR_KBD_DISABLED,
            CMD_READ_OUTPUT_PORT => self.respond(self.output_port),
            CMD_WRITE_OUTPUT_PORT => self.pending = Pending::OutputPort,
            CMD_PULSE_BASE..=0xFF => {
                if cmd & 1 == 0 {
                    self.events.vm_event(VmEvent::Reset);
                }
            }
            _ => tracing::debug!("i8042: ignoring command {cmd:#04x}"),
        }
    }

    fn write_data(&mut self, value: u8) {
        self.last_write_was_command = false;
        match std::mem::replace(&mut self.pending, Pending::Keyboard) {
            Pending::Ram(n) => self.ram[usize::from(n & 0x1F)] = value,
            Pending::OutputPort => {
                self.output_port = value;
                if value & 1 == 0 {
                    self.events.vm_event(VmEvent::Reset);
                }
            }
            // No keyboard answers.
            Pending::Keyboard => {}
        }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        for (i, byte) in data.iter_mut().enumerate() {
            *byte = match offset.checked_add(i as u64) {
                Some(DATA_OFFSET) => self.read_data(),
                Some(CMD_OFFSET) => self.status(),
                _ => 0xFF,
            };
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        for (i, &value) in data.iter().enumerate() {
            match offset.checked_add(i as u64) {
                Some(DATA_OFFSET) => self.write_data(value),
                Some(CMD_OFFSET) => self.command(value),
                _ => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::Events;

    fn setup() -> (I8042, Arc<Events>) {
        let events = Arc::new(Events::default());
        (I8042::new(events.clone()), events)
    }

    fn read1(d: &mut I8042, offset: u64) -> u8 {
        let mut b = [0];
        d.read(offset, &mut b);
        b[0]
    }

    #[test]
    fn idle_status() {
        let (mut d, _) = setup();
        let s = read1(&mut d, CMD_OFFSET);
        assert_eq!(
            s & (STATUS_OBF | 0x02),
            0,
            "nothing to read, input buffer empty"
        );
        assert_ne!(s & STATUS_SYS, 0);
        d.write(CMD_OFFSET, &[CMD_KBD_ENABLE]);
        assert_eq!(read1(&mut d, CMD_OFFSET), 0x1C);
    }

    #[test]
    fn reset_command_resets() {
        let (mut d, events) = setup();
        d.write(CMD_OFFSET, &[0xFE]);
        assert_eq!(events.take(), vec![VmEvent::Reset]);
        d.write(CMD_OFFSET, &[0xFF]); // pulses no line
        assert!(events.take().is_empty());
        d.write(CMD_OFFSET, &[CMD_WRITE_OUTPUT_PORT]);
        d.write(DATA_OFFSET, &[0x02]);
        assert_eq!(events.take(), vec![VmEvent::Reset]);
    }

    #[test]
    fn self_test_answers_0x55() {
        let (mut d, events) = setup();
        d.write(CMD_OFFSET, &[CMD_SELF_TEST]);
        assert_eq!(read1(&mut d, CMD_OFFSET) & STATUS_OBF, STATUS_OBF);
        assert_eq!(read1(&mut d, DATA_OFFSET), 0x55);
        assert_eq!(read1(&mut d, CMD_OFFSET) & STATUS_OBF, 0);
        assert!(events.take().is_empty());
    }

    #[test]
    fn command_byte_round_trips() {
        let (mut d, _) = setup();
        d.write(CMD_OFFSET, &[CMD_WRITE_RAM]);
        d.write(DATA_OFFSET, &[0x65]);
        d.write(CMD_OFFSET, &[CMD_KBD_DISABLE]);
        d.write(CMD_OFFSET, &[CMD_AUX_ENABLE]);
        d.write(CMD_OFFSET, &[CMD_READ_RAM]);
        assert_eq!(read1(&mut d, DATA_OFFSET), 0x55);
        // A following data write goes to the (absent) keyboard, not the command byte.
        d.write(DATA_OFFSET, &[0xFF]);
        d.write(CMD_OFFSET, &[CMD_READ_RAM]);
        assert_eq!(read1(&mut d, DATA_OFFSET), 0x55);
    }

    #[test]
    fn port_0x61_gap_is_not_ours() {
        let (mut d, events) = setup();
        let mut buf = [0u8; 3];
        d.read(1, &mut buf);
        assert_eq!(buf, [0xFF; 3]);
        d.write(1, &[0xFE, 0xFE, 0xFE]);
        assert!(events.take().is_empty());
    }
}
