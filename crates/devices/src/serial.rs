//! 16550A UART (the console) at `COM1_PORT`, interrupting on `COM1_IRQ`.
//!
//! The register logic is `vm_superio::Serial`'s; this adapts it to the bus and to an
//! [`IrqLine`].

use dvmm_sync::MutexExt;
use std::collections::VecDeque;
use std::io::Write;
use std::sync::{Arc, Mutex};

use vm_superio::serial::{Error as SerialError, NoEvents};
use vm_superio::Trigger;

use crate::bus::BusDevice;
use crate::IrqLine;

/// Number of I/O ports a 16550 occupies.
pub const SERIAL_PORT_LEN: u64 = 8;

/// Adapts `vm_superio`'s edge trigger to an [`IrqLine`]: each trigger is one pulse.
struct IrqPulse(Arc<dyn IrqLine>);

impl Trigger for IrqPulse {
    type E = std::convert::Infallible;

    fn trigger(&self) -> Result<(), Self::E> {
        self.0.set_level(true);
        self.0.set_level(false);
        Ok(())
    }
}

type Uart = vm_superio::Serial<IrqPulse, NoEvents, Box<dyn Write + Send>>;

/// How much of the guest's recent console output is kept (see [`ConsoleTail`]).
const TAIL_BYTES: usize = 8192;

/// The guest's most recent console output, for messages about how the VM ended (e.g.
/// the kernel's panic line).
#[derive(Clone, Default)]
pub struct ConsoleTail(Arc<Mutex<VecDeque<u8>>>);

impl ConsoleTail {
    fn push(&self, bytes: &[u8]) {
        let mut t = self.0.locked();
        t.extend(bytes);
        let excess = t.len().saturating_sub(TAIL_BYTES);
        t.drain(..excess);
    }

    /// The last `n` non-empty lines (oldest first), without control characters.
    pub fn last_lines(&self, n: usize) -> Vec<String> {
        let t = self.0.locked();
        let bytes: Vec<u8> = t.iter().copied().collect();
        drop(t);
        let text = String::from_utf8_lossy(&bytes);
        let lines: Vec<String> = text
            .split(['\n', '\r'])
            .map(|l| l.chars().filter(|c| !c.is_control()).collect::<String>())
            .filter(|l| !l.trim().is_empty())
            .collect();
        lines[lines.len().saturating_sub(n)..].to_vec()
    }
}

/// Copies what the guest writes to the real output and into a [`ConsoleTail`].
struct TeeToTail {
    out: Box<dyn Write + Send>,
    tail: ConsoleTail,
}

impl Write for TeeToTail {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.tail.push(buf);
        self.out.write_all(buf)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.out.flush()
    }
}

/// 16550A UART at `COM1_PORT` (8 ports) on `COM1_IRQ`.
pub struct Serial {
    uart: Uart,
    tail: ConsoleTail,
    /// Whether a failed write to the output has been reported (once is enough).
    output_error_logged: bool,
}

impl Serial {
    /// A UART that pulses `irq` on each interrupt and writes guest output to `out`.
    pub fn new(irq: Arc<dyn IrqLine>, out: Box<dyn Write + Send>) -> Self {
        let tail = ConsoleTail::default();
        let tee = TeeToTail {
            out,
            tail: tail.clone(),
        };
        Self {
            uart: Uart::new(IrqPulse(irq), Box::new(tee)),
            tail,
            output_error_logged: false,
        }
    }

    /// The guest's recent console output.
    pub fn tail(&self) -> ConsoleTail {
        self.tail.clone()
    }

    /// Queue guest input (from stdin). Returns how many bytes were accepted
    /// (0..=bytes.len()); the caller retries the rest later (the FIFO holds 64).
    /// Nothing is accepted while the guest keeps the UART in loopback mode.
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> usize {
        if bytes.is_empty() || self.uart.fifo_capacity() == 0 {
            return 0;
        }
        // The only possible errors are a full FIFO (checked above) and a trigger
        // failure, which `IrqPulse` cannot produce.
        self.uart.enqueue_raw_bytes(bytes).unwrap_or(0)
    }

    /// Room left in the input FIFO.
    pub fn input_capacity(&self) -> usize {
        self.uart.fifo_capacity()
    }

    fn write_register(&mut self, offset: u8, value: u8) {
        // Trigger errors cannot happen; a full FIFO only concerns input.
        if let Err(SerialError::IOError(err)) = self.uart.write(offset, value) {
            if !self.output_error_logged {
                self.output_error_logged = true;
                tracing::warn!("serial console output failed, dropping guest output: {err}");
            }
        }
    }
}

impl BusDevice for Serial {
    /// Wider accesses are split into byte accesses to consecutive registers, as an
    /// ISA bus does for an 8-bit device.
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        for (i, byte) in data.iter_mut().enumerate() {
            *byte = match offset.checked_add(i as u64) {
                Some(reg) if reg < SERIAL_PORT_LEN => self.uart.read(reg as u8),
                _ => 0xFF,
            };
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        for (i, &value) in data.iter().enumerate() {
            if let Some(reg) = offset.checked_add(i as u64) {
                if reg < SERIAL_PORT_LEN {
                    self.write_register(reg as u8, value);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::FakeIrq;
    use std::sync::Mutex;

    const DATA: u64 = 0;
    const IER: u64 = 1;
    const IIR: u64 = 2;
    const LSR: u64 = 5;

    #[derive(Clone, Default)]
    struct SharedOut(Arc<Mutex<Vec<u8>>>);

    impl Write for SharedOut {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    struct Broken;
    impl Write for Broken {
        fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
            Err(std::io::Error::other("gone"))
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn setup() -> (Serial, Arc<FakeIrq>, SharedOut) {
        let irq = Arc::new(FakeIrq::default());
        let out = SharedOut::default();
        (Serial::new(irq.clone(), Box::new(out.clone())), irq, out)
    }

    fn read1(s: &mut Serial, offset: u64) -> u8 {
        let mut b = [0u8];
        s.read(offset, &mut b);
        b[0]
    }

    #[test]
    fn output_reaches_the_writer() {
        let (mut s, _, out) = setup();
        for &b in b"hi\n" {
            s.write(DATA, &[b]);
        }
        assert_eq!(*out.0.lock().unwrap(), b"hi\n");
    }

    #[test]
    fn the_tail_keeps_the_last_lines() {
        let (mut s, _, _) = setup();
        let tail = s.tail();
        for &b in b"one\r\ntwo\n\n\x1b[0mthree" {
            s.write(DATA, &[b]);
        }
        assert_eq!(tail.last_lines(2), vec!["two", "[0mthree"]);
        for _ in 0..TAIL_BYTES {
            s.write(DATA, b"x");
        }
        assert_eq!(tail.last_lines(5).len(), 1, "old lines age out");
    }

    #[test]
    fn output_failure_does_not_stop_the_uart() {
        let irq = Arc::new(FakeIrq::default());
        let mut s = Serial::new(irq.clone(), Box::new(Broken));
        s.write(IER, &[0x02]); // THR empty interrupt
        for (i, b) in b"xy".iter().enumerate() {
            read1(&mut s, IIR); // acknowledge
            s.write(DATA, &[*b]);
            assert_eq!(irq.pulses(), i + 2);
        }
        assert!(s.output_error_logged);
    }

    #[test]
    fn input_appears_in_rbr_and_raises_irq_when_enabled() {
        let (mut s, irq, _) = setup();
        // Without IER no pulse, but data is readable.
        assert_eq!(s.enqueue_input(b"a"), 1);
        assert_eq!(irq.pulses(), 0);
        assert_eq!(read1(&mut s, LSR) & 1, 1);
        assert_eq!(read1(&mut s, DATA), b'a');
        assert_eq!(read1(&mut s, LSR) & 1, 0);

        s.write(IER, &[0x01]); // received data available
        assert_eq!(s.enqueue_input(b"bc"), 2);
        assert_eq!(irq.pulses(), 1);
        assert!(!irq.is_high(), "an edge user pulses the line");
        assert_eq!(read1(&mut s, IIR) & 0x0F, 0x04);
        assert_eq!(read1(&mut s, DATA), b'b');
        assert_eq!(read1(&mut s, DATA), b'c');
        assert_eq!(s.enqueue_input(b"d"), 1);
        assert_eq!(irq.pulses(), 2);
    }

    #[test]
    fn enqueue_respects_capacity() {
        let (mut s, _, _) = setup();
        assert_eq!(s.input_capacity(), 64);
        assert_eq!(s.enqueue_input(&[b'x'; 50]), 50);
        assert_eq!(s.input_capacity(), 14);
        assert_eq!(s.enqueue_input(&[b'y'; 20]), 14);
        assert_eq!(s.input_capacity(), 0);
        assert_eq!(s.enqueue_input(b"z"), 0);
        assert_eq!(s.enqueue_input(b""), 0);
        assert_eq!(read1(&mut s, DATA), b'x');
        assert_eq!(s.input_capacity(), 1);
    }

    #[test]
    fn wide_access_is_split_into_bytes() {
        let (mut s, _, _) = setup();
        s.write(7, &[0x5A, 0x11]); // scratch register, then past the end
        let mut buf = [0u8; 2];
        s.read(7, &mut buf);
        assert_eq!(buf, [0x5A, 0xFF]);
    }
}
