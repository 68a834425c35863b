//! A DMA test engine, in the spirit of QEMU's `edu` device: the guest hands it a
//! descriptor in guest RAM, and it reads a source buffer and writes a destination buffer
//! in guest RAM by DMA, on its own thread, like a real device. dvmm's test guest uses it
//! to show that device DMA sees (and makes) the same memory the vCPUs do, on whichever
//! node they run. Guests that do not know it never touch it (no ACPI entry).
//!
//! Registers (32-bit port I/O at `base`; other sizes or offsets read as ones and ignore
//! writes):
//!
//! | offset | read | write |
//! | --- | --- | --- |
//! | 0x0 | descriptor address, low half | the same |
//! | 0x4 | descriptor address, high half | the same |
//! | 0x8 | [`STATUS_IDLE`] / [`STATUS_BUSY`] / [`STATUS_DONE`] / [`STATUS_ERROR`] | any value: start (ignored while busy) |
//! | 0xC | [`DMA_TEST_ID`] | ignored |
//!
//! Descriptor ([`DESC_LEN`] bytes, inside one 4 KiB page, little endian): `src: u64`,
//! `dst: u64`, `len: u32` (at most [`MAX_LEN`]), `status: u32`, `checksum: u32`,
//! `reserved: u32`. The engine reads `len` bytes at `src`, writes their complement
//! (`!b`) at `dst`, then the [`checksum`] of the source bytes into `checksum`; then it
//! sets the status register and, last, writes 1 (done) or 2 (error) into `status`: once
//! the guest sees that word, the rest (register included) is final.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Arc;

use crate::bus::BusDevice;
use crate::GuestAccess;

/// Value of the ID register ("DMA1").
pub const DMA_TEST_ID: u32 = u32::from_le_bytes(*b"DMA1");
/// No request yet.
pub const STATUS_IDLE: u32 = 0;
/// A request is being processed.
pub const STATUS_BUSY: u32 = 1;
/// The last request completed.
pub const STATUS_DONE: u32 = 2;
/// The last request failed (bad descriptor or guest address; see the log).
pub const STATUS_ERROR: u32 = 3;
/// Size of a descriptor in bytes.
pub const DESC_LEN: usize = 32;
/// Longest transfer in bytes.
pub const MAX_LEN: u32 = 64 * 1024;
/// Size of the register window in bytes.
pub const REGS_LEN: u64 = 16;

const PAGE: u64 = 4096;

/// The DMA test engine (see the module documentation).
pub struct DmaTest {
    mem: Arc<dyn GuestAccess>,
    desc: u64,
    status: Arc<AtomicU32>,
    worker: Option<Sender<u64>>,
}

impl DmaTest {
    /// An engine whose DMA goes through `mem`. Its thread starts with the first request.
    pub fn new(mem: Arc<dyn GuestAccess>) -> Self {
        Self {
            mem,
            desc: 0,
            status: Arc::new(AtomicU32::new(STATUS_IDLE)),
            worker: None,
        }
    }

    fn start(&mut self) {
        if self.status.load(Ordering::Acquire) == STATUS_BUSY {
            tracing::debug!("DMA test device: start while busy ignored");
            return;
        }
        self.status.store(STATUS_BUSY, Ordering::Release);
        if self.worker.is_none() {
            let (tx, rx) = channel::<u64>();
            let mem = self.mem.clone();
            let status = self.status.clone();
            // The worker may wait for pages held by other nodes: it must not run on a
            // thread that delivers those pages (a node's message dispatcher).
            let spawned = std::thread::Builder::new()
                .name("dma-test".into())
                .spawn(move || worker(&*mem, &status, rx));
            match spawned {
                Ok(_) => self.worker = Some(tx),
                Err(e) => {
                    tracing::error!("DMA test device: cannot start its thread: {e}");
                    self.status.store(STATUS_ERROR, Ordering::Release);
                    return;
                }
            }
        }
        if let Some(tx) = &self.worker {
            if tx.send(self.desc).is_err() {
                self.status.store(STATUS_ERROR, Ordering::Release);
            }
        }
    }
}

/// The checksum the engine reports: over the buffer as little-endian 64-bit words (a
/// shorter tail is zero-padded), `h = (rotl(h, 5) ^ w) * 0x100000001b3` from the FNV-64
/// offset basis, folded to 32 bits (`h ^ h >> 32`). Word-wise, so that a guest whose
/// kernel code runs emulated can check it quickly.
pub fn checksum(bytes: &[u8]) -> u32 {
    let h = bytes.chunks(8).fold(0xcbf2_9ce4_8422_2325u64, |h, c| {
        let mut w = [0u8; 8];
        w[..c.len()].copy_from_slice(c);
        (h.rotate_left(5) ^ u64::from_le_bytes(w)).wrapping_mul(0x0000_0100_0000_01b3)
    });
    (h ^ (h >> 32)) as u32
}

/// Performs the request whose descriptor is at `desc`, all but the final status word.
/// `Ok(status word)`: 1 if the transfer was done, 2 if it was refused (the reason is
/// logged here); `Err`: the descriptor itself is unusable.
fn run(mem: &dyn GuestAccess, desc: u64) -> Result<u32, String> {
    if desc % PAGE + DESC_LEN as u64 > PAGE {
        return Err(format!("descriptor at {desc:#x} crosses a page boundary"));
    }
    let mut d = [0u8; DESC_LEN];
    mem.read(desc, &mut d).map_err(|e| e.to_string())?;
    let word = |at: usize| u64::from_le_bytes(d[at..at + 8].try_into().unwrap_or([0; 8]));
    let (src, dst) = (word(0), word(8));
    let len = u32::from_le_bytes(d[16..20].try_into().unwrap_or([0; 4]));
    let result = if len > MAX_LEN {
        Err(format!("length {len} is over the {MAX_LEN}-byte limit"))
    } else {
        let mut buf = vec![0u8; len as usize];
        crate::read_guest(mem, src, &mut buf)
            .map_err(|e| e.to_string())
            .and_then(|()| {
                let sum = checksum(&buf);
                for b in &mut buf {
                    *b = !*b;
                }
                crate::write_guest(mem, dst, &buf)
                    .map(|()| sum)
                    .map_err(|e| e.to_string())
            })
    };
    let (status, sum) = match result {
        Ok(sum) => (1u32, sum),
        Err(e) => {
            tracing::warn!("DMA test device: request at {desc:#x} refused: {e}");
            (2u32, 0)
        }
    };
    mem.write(desc + 24, &sum.to_le_bytes())
        .map_err(|e| e.to_string())?;
    Ok(status)
}

/// The worker: one request after the other.
fn worker(mem: &dyn GuestAccess, status: &AtomicU32, requests: Receiver<u64>) {
    for desc in requests {
        match run(mem, desc) {
            Ok(word) => {
                status.store(
                    if word == 1 { STATUS_DONE } else { STATUS_ERROR },
                    Ordering::Release,
                );
                // Last: once the guest sees this word, everything else is final.
                if let Err(e) = mem.write(desc + 20, &word.to_le_bytes()) {
                    tracing::warn!("DMA test device: descriptor at {desc:#x}: {e}");
                }
            }
            Err(e) => {
                tracing::warn!("DMA test device: request at {desc:#x} failed: {e}");
                status.store(STATUS_ERROR, Ordering::Release);
            }
        }
    }
}

impl BusDevice for DmaTest {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let value = match (offset, data.len()) {
            (0x0, 4) => self.desc as u32,
            (0x4, 4) => (self.desc >> 32) as u32,
            (0x8, 4) => self.status.load(Ordering::Acquire),
            (0xC, 4) => DMA_TEST_ID,
            _ => {
                data.fill(0xFF);
                return;
            }
        };
        data.copy_from_slice(&value.to_le_bytes());
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            return;
        };
        let value = u64::from(u32::from_le_bytes(bytes));
        match offset {
            0x0 => self.desc = (self.desc & !0xFFFF_FFFF) | value,
            0x4 => self.desc = (self.desc & 0xFFFF_FFFF) | (value << 32),
            0x8 => self.start(),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;
    use std::time::{Duration, Instant};

    /// 64 KiB of fake guest RAM at guest-physical 0x10000; anything else is an error.
    struct Ram(Mutex<Vec<u8>>);

    const BASE: u64 = 0x10000;

    impl Ram {
        fn new() -> Arc<Ram> {
            Arc::new(Ram(Mutex::new(vec![0; 0x10000])))
        }
        fn range(
            &self,
            gpa: u64,
            len: usize,
        ) -> Result<std::ops::Range<usize>, crate::GuestAccessError> {
            assert!(
                gpa / PAGE == (gpa + len as u64 - 1) / PAGE,
                "an access crosses a page"
            );
            let not_ram = crate::GuestAccessError::NotRam { gpa, len };
            let off = gpa.checked_sub(BASE).ok_or(not_ram)? as usize;
            if off + len > 0x10000 {
                return Err(crate::GuestAccessError::NotRam { gpa, len });
            }
            Ok(off..off + len)
        }
        fn put(&self, gpa: u64, bytes: &[u8]) {
            let off = (gpa - BASE) as usize;
            self.0.lock().unwrap()[off..off + bytes.len()].copy_from_slice(bytes);
        }
        fn get(&self, gpa: u64, len: usize) -> Vec<u8> {
            let off = (gpa - BASE) as usize;
            self.0.lock().unwrap()[off..off + len].to_vec()
        }
    }

    impl GuestAccess for Ram {
        fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), crate::GuestAccessError> {
            let r = self.range(gpa, buf.len())?;
            buf.copy_from_slice(&self.0.lock().unwrap()[r]);
            Ok(())
        }
        fn write(&self, gpa: u64, buf: &[u8]) -> Result<(), crate::GuestAccessError> {
            let r = self.range(gpa, buf.len())?;
            self.0.lock().unwrap()[r].copy_from_slice(buf);
            Ok(())
        }
    }

    fn descriptor(src: u64, dst: u64, len: u32) -> Vec<u8> {
        let mut d = Vec::new();
        d.extend_from_slice(&src.to_le_bytes());
        d.extend_from_slice(&dst.to_le_bytes());
        d.extend_from_slice(&len.to_le_bytes());
        d.extend_from_slice(&[0; 12]);
        d
    }

    fn reg(dev: &mut DmaTest, offset: u64) -> u32 {
        let mut b = [0u8; 4];
        dev.read(offset, &mut b);
        u32::from_le_bytes(b)
    }

    fn submit(dev: &mut DmaTest, desc: u64) -> u32 {
        dev.write(0x0, &(desc as u32).to_le_bytes());
        dev.write(0x4, &((desc >> 32) as u32).to_le_bytes());
        dev.write(0x8, &1u32.to_le_bytes());
        let t = Instant::now();
        loop {
            let s = reg(dev, 0x8);
            if s != STATUS_BUSY {
                return s;
            }
            assert!(t.elapsed() < Duration::from_secs(10), "request never ended");
            std::thread::yield_now();
        }
    }

    #[test]
    fn copies_the_complement_across_pages_and_reports_the_checksum() {
        let ram = Ram::new();
        let mut dev = DmaTest::new(ram.clone());
        assert_eq!(reg(&mut dev, 0xC), DMA_TEST_ID);
        assert_eq!(reg(&mut dev, 0x8), STATUS_IDLE);
        let src: Vec<u8> = (0..6000u32).map(|i| (i * 7 + 3) as u8).collect();
        let (s, d, desc) = (BASE + 100, BASE + 0x3000 + 3000, BASE + 0x8000 + 64);
        ram.put(s, &src);
        ram.put(desc, &descriptor(s, d, src.len() as u32));
        assert_eq!(submit(&mut dev, desc), STATUS_DONE);
        let out = ram.get(d, src.len());
        assert!(out.iter().zip(&src).all(|(o, i)| *o == !*i));
        let tail = ram.get(desc + 20, 8);
        assert_eq!(&tail[0..4], &1u32.to_le_bytes(), "status done");
        assert_eq!(&tail[4..8], &checksum(&src).to_le_bytes());
        assert_eq!(
            u64::from(reg(&mut dev, 0x0)) | u64::from(reg(&mut dev, 0x4)) << 32,
            desc
        );
    }

    #[test]
    fn bad_requests_fail_without_writing_outside_the_descriptor() {
        let ram = Ram::new();
        let mut dev = DmaTest::new(ram.clone());
        // Too long.
        let desc = BASE + 0x100;
        ram.put(desc, &descriptor(BASE + 0x1000, BASE + 0x2000, MAX_LEN + 1));
        assert_eq!(submit(&mut dev, desc), STATUS_ERROR);
        assert_eq!(&ram.get(desc + 20, 4), &2u32.to_le_bytes());
        assert!(ram.get(BASE + 0x2000, 64).iter().all(|&b| b == 0));
        // Source outside RAM: the error is reported in the descriptor.
        ram.put(desc, &descriptor(0xdead_0000, BASE + 0x2000, 16));
        assert_eq!(submit(&mut dev, desc), STATUS_ERROR);
        assert_eq!(&ram.get(desc + 20, 4), &2u32.to_le_bytes());
        // Descriptor outside RAM or across a page: only the register says so.
        assert_eq!(submit(&mut dev, 0x10), STATUS_ERROR);
        assert_eq!(submit(&mut dev, BASE + PAGE - 8), STATUS_ERROR);
        // And the device still works afterwards.
        ram.put(BASE + 0x1000, &[1, 2, 3]);
        ram.put(desc, &descriptor(BASE + 0x1000, BASE + 0x2000, 3));
        assert_eq!(submit(&mut dev, desc), STATUS_DONE);
        assert_eq!(ram.get(BASE + 0x2000, 3), vec![!1u8, !2, !3]);
    }

    #[test]
    fn odd_accesses_are_harmless() {
        let ram = Ram::new();
        let mut dev = DmaTest::new(ram);
        let mut b = [0u8; 2];
        dev.read(0x8, &mut b);
        assert_eq!(b, [0xFF, 0xFF]);
        dev.write(0x8, &[1]);
        dev.write(0x20, &[1, 2, 3, 4]);
        assert_eq!(
            reg(&mut dev, 0x8),
            STATUS_IDLE,
            "a 1-byte doorbell is ignored"
        );
    }

    #[test]
    fn checksum_sees_every_byte_and_its_place() {
        let a: Vec<u8> = (0..100u8).collect();
        let mut b = a.clone();
        b.swap(3, 11);
        let mut c = a.clone();
        c[99] ^= 1;
        assert_ne!(checksum(&a), checksum(&b));
        assert_ne!(checksum(&a), checksum(&c));
        assert_ne!(checksum(&a[..96]), checksum(&a));
        // The reference value the test guest's C code must agree with.
        assert_eq!(checksum(&[]), 0xcbf2_9ce4 ^ 0x8422_2325);
    }
}
