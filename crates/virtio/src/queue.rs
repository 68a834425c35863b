//! Split virtqueues (virtio 1.x, 2.7), read and written only through [`GuestAccess`]:
//! in a cluster that is the DSM, so a queue on one node sees what a driver on another
//! node wrote, page by page, under the coherence protocol.
//!
//! Why not rust-vmm's `virtio-queue`: it reads rings and buffers through vm-memory's
//! `GuestMemory`, whose regions hand out host pointers into guest RAM. Those reads would
//! bypass the DSM (a page another node owns would read stale, and a write would not
//! invalidate the other copies), which the DSM's correctness rests on.
//!
//! Everything the driver wrote is validated: a ring index past the queue size, a
//! descriptor chain longer than the queue (a loop), a buffer outside guest RAM or an
//! indirect descriptor we did not offer is a [`QueueError`]: the device is then marked
//! broken (`DEVICE_NEEDS_RESET`), and nothing outside guest RAM is touched.

use std::sync::atomic::{fence, Ordering};

use dvmm_devices::{GuestAccess, GuestAccessError};
use virtio_bindings::virtio_ring::{
    VRING_AVAIL_F_NO_INTERRUPT, VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
};

/// Why a queue cannot be used: the driver wrote something no correct driver writes.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    /// A ring or descriptor lies outside guest RAM (or the DSM could not reach it).
    #[error("queue memory: {0}")]
    Memory(#[from] GuestAccessError),
    /// An address plus a length overflows.
    #[error("buffer at {addr:#x} (+{len}) wraps the address space")]
    Wraps {
        /// Start of the buffer.
        addr: u64,
        /// Its length.
        len: u64,
    },
    /// The driver made more buffers available than the queue holds.
    #[error(
        "available index {avail} is {ahead} ahead of the device's, more than the queue size {size}"
    )]
    AvailIndex {
        /// The driver's index.
        avail: u16,
        /// How far ahead of the device's index it is.
        ahead: u16,
        /// The queue size.
        size: u16,
    },
    /// A descriptor index at or past the queue size.
    #[error("descriptor index {index} is out of a queue of {size}")]
    DescriptorIndex {
        /// The index.
        index: u16,
        /// The queue size.
        size: u16,
    },
    /// A chain visits more descriptors than the queue has (a loop).
    #[error("descriptor chain from {head} is longer than the queue (a loop)")]
    ChainLoop {
        /// The chain's head.
        head: u16,
    },
    /// An indirect descriptor, which this device did not offer.
    #[error("indirect descriptor in the chain from {head}, a feature not negotiated")]
    Indirect {
        /// The chain's head.
        head: u16,
    },
    /// The queue was used before the driver set it up.
    #[error("queue {0} is not ready")]
    NotReady(usize),
}

/// Reads `buf.len()` bytes at `gpa`, page by page.
pub fn read_guest(mem: &dyn GuestAccess, gpa: u64, buf: &mut [u8]) -> Result<(), QueueError> {
    Ok(dvmm_devices::read_guest(mem, gpa, buf)?)
}

/// Writes `buf` at `gpa`, page by page.
pub fn write_guest(mem: &dyn GuestAccess, gpa: u64, buf: &[u8]) -> Result<(), QueueError> {
    Ok(dvmm_devices::write_guest(mem, gpa, buf)?)
}

fn read_u16(mem: &dyn GuestAccess, gpa: u64) -> Result<u16, QueueError> {
    let mut b = [0u8; 2];
    read_guest(mem, gpa, &mut b)?;
    Ok(u16::from_le_bytes(b))
}

/// One buffer of a chain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Descriptor {
    /// Guest-physical address.
    pub addr: u64,
    /// Length in bytes.
    pub len: u32,
    /// The device writes it (else it reads it).
    pub writable: bool,
}

/// A request: the chain of buffers starting at descriptor `head`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Chain {
    /// Index of the first descriptor (what the used ring reports back).
    pub head: u16,
    /// The buffers, in order.
    pub descriptors: Vec<Descriptor>,
}

impl Chain {
    /// The bytes of its device-readable buffers, in order, at most `limit` of them.
    pub fn read_all(&self, mem: &dyn GuestAccess, limit: usize) -> Result<Vec<u8>, QueueError> {
        let mut out = Vec::new();
        for d in self.descriptors.iter().filter(|d| !d.writable) {
            let take = usize::try_from(d.len)
                .unwrap_or(usize::MAX)
                .min(limit - out.len());
            let at = out.len();
            out.resize(at + take, 0);
            read_guest(mem, d.addr, &mut out[at..])?;
            if out.len() == limit {
                break;
            }
        }
        Ok(out)
    }

    /// Writes `bytes` into its device-writable buffers, in order; returns how many fit.
    pub fn write_all(&self, mem: &dyn GuestAccess, bytes: &[u8]) -> Result<usize, QueueError> {
        let mut done = 0usize;
        for d in self.descriptors.iter().filter(|d| d.writable) {
            if done == bytes.len() {
                break;
            }
            let take = usize::try_from(d.len)
                .unwrap_or(usize::MAX)
                .min(bytes.len() - done);
            write_guest(mem, d.addr, &bytes[done..done + take])?;
            done += take;
        }
        Ok(done)
    }

    /// Total length of its device-writable buffers.
    pub fn writable_len(&self) -> u64 {
        self.descriptors
            .iter()
            .filter(|d| d.writable)
            .map(|d| u64::from(d.len))
            .sum()
    }
}

/// A split virtqueue as the driver configured it through the transport.
#[derive(Clone, Debug)]
pub struct Queue {
    /// Largest size the device allows.
    pub max_size: u16,
    /// Size the driver chose (a power of two up to `max_size`).
    pub size: u16,
    /// The driver enabled the queue.
    pub ready: bool,
    /// Descriptor table address.
    pub desc: u64,
    /// Available ring ("driver area") address.
    pub avail: u64,
    /// Used ring ("device area") address.
    pub used: u64,
    /// MSI-X vector for used-buffer notifications (0xffff: none).
    pub msix_vector: u16,
    next_avail: u16,
    next_used: u16,
}

/// "No MSI-X vector".
pub const NO_VECTOR: u16 = 0xffff;

impl Queue {
    /// A queue of at most `max_size` entries, not yet configured.
    pub fn new(max_size: u16) -> Queue {
        Queue {
            max_size,
            size: max_size,
            ready: false,
            desc: 0,
            avail: 0,
            used: 0,
            msix_vector: NO_VECTOR,
            next_avail: 0,
            next_used: 0,
        }
    }

    /// Back to the state after device reset.
    pub fn reset(&mut self) {
        *self = Queue::new(self.max_size);
    }

    fn usable(&self) -> bool {
        self.ready && self.size.is_power_of_two() && self.size <= self.max_size
    }

    /// The next request the driver made available, if any.
    pub fn pop(&mut self, mem: &dyn GuestAccess) -> Result<Option<Chain>, QueueError> {
        if !self.usable() {
            return Ok(None);
        }
        let avail_idx = read_u16(mem, self.avail + 2)?;
        let ahead = avail_idx.wrapping_sub(self.next_avail);
        if ahead == 0 {
            return Ok(None);
        }
        if ahead > self.size {
            return Err(QueueError::AvailIndex {
                avail: avail_idx,
                ahead,
                size: self.size,
            });
        }
        // The ring entry and the descriptors were written before the index.
        fence(Ordering::Acquire);
        let slot = u64::from(self.next_avail % self.size);
        let head = read_u16(mem, self.avail + 4 + 2 * slot)?;
        let chain = self.chain(mem, head)?;
        self.next_avail = self.next_avail.wrapping_add(1);
        Ok(Some(chain))
    }

    fn chain(&self, mem: &dyn GuestAccess, head: u16) -> Result<Chain, QueueError> {
        let mut descriptors = Vec::new();
        let mut index = head;
        loop {
            if index >= self.size {
                return Err(QueueError::DescriptorIndex {
                    index,
                    size: self.size,
                });
            }
            if descriptors.len() >= usize::from(self.size) {
                return Err(QueueError::ChainLoop { head });
            }
            let mut d = [0u8; 16];
            read_guest(mem, self.desc + 16 * u64::from(index), &mut d)?;
            let addr = u64::from_le_bytes([d[0], d[1], d[2], d[3], d[4], d[5], d[6], d[7]]);
            let len = u32::from_le_bytes([d[8], d[9], d[10], d[11]]);
            let flags = u32::from(u16::from_le_bytes([d[12], d[13]]));
            let next = u16::from_le_bytes([d[14], d[15]]);
            if flags & VRING_DESC_F_INDIRECT != 0 {
                return Err(QueueError::Indirect { head });
            }
            if addr.checked_add(u64::from(len)).is_none() {
                return Err(QueueError::Wraps {
                    addr,
                    len: u64::from(len),
                });
            }
            descriptors.push(Descriptor {
                addr,
                len,
                writable: flags & VRING_DESC_F_WRITE != 0,
            });
            if flags & VRING_DESC_F_NEXT == 0 {
                return Ok(Chain { head, descriptors });
            }
            index = next;
        }
    }

    /// Returns request `head` to the driver, having written `len` bytes into its buffers.
    pub fn push_used(
        &mut self,
        mem: &dyn GuestAccess,
        head: u16,
        len: u32,
    ) -> Result<(), QueueError> {
        if !self.usable() {
            return Err(QueueError::NotReady(0));
        }
        let slot = u64::from(self.next_used % self.size);
        let mut elem = [0u8; 8];
        elem[..4].copy_from_slice(&u32::from(head).to_le_bytes());
        elem[4..].copy_from_slice(&len.to_le_bytes());
        write_guest(mem, self.used + 4 + 8 * slot, &elem)?;
        self.next_used = self.next_used.wrapping_add(1);
        // The element before the index that publishes it.
        fence(Ordering::Release);
        write_guest(mem, self.used + 2, &self.next_used.to_le_bytes())
    }

    /// Whether the driver wants an interrupt for used buffers now.
    pub fn wants_interrupt(&self, mem: &dyn GuestAccess) -> Result<bool, QueueError> {
        fence(Ordering::SeqCst);
        let flags = u32::from(read_u16(mem, self.avail)?);
        Ok(flags & VRING_AVAIL_F_NO_INTERRUPT == 0)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::sync::Mutex;

    const PAGE: u64 = 4096;

    /// `size` bytes of guest RAM at address 0.
    pub struct Ram(pub Mutex<Vec<u8>>);

    impl Ram {
        pub fn new(size: usize) -> Ram {
            Ram(Mutex::new(vec![0; size]))
        }
        pub fn put(&self, gpa: u64, bytes: &[u8]) {
            let mut m = self.0.lock().unwrap();
            m[gpa as usize..gpa as usize + bytes.len()].copy_from_slice(bytes);
        }
        pub fn get(&self, gpa: u64, len: usize) -> Vec<u8> {
            self.0.lock().unwrap()[gpa as usize..gpa as usize + len].to_vec()
        }
    }

    impl Ram {
        /// The bytes `[gpa, +len)` as an index range, checking what a real access path
        /// would: one page, inside RAM.
        fn range(
            &self,
            len_ram: usize,
            gpa: u64,
            len: usize,
        ) -> Result<std::ops::Range<usize>, GuestAccessError> {
            assert!(
                gpa / PAGE == gpa.saturating_add(len as u64 - 1) / PAGE,
                "one page"
            );
            (gpa as usize)
                .checked_add(len)
                .filter(|e| *e <= len_ram)
                .map(|end| gpa as usize..end)
                .ok_or(GuestAccessError::NotRam { gpa, len })
        }
    }

    impl GuestAccess for Ram {
        fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), GuestAccessError> {
            let m = self.0.lock().unwrap();
            let r = self.range(m.len(), gpa, buf.len())?;
            buf.copy_from_slice(&m[r]);
            Ok(())
        }
        fn write(&self, gpa: u64, buf: &[u8]) -> Result<(), GuestAccessError> {
            let mut m = self.0.lock().unwrap();
            let r = self.range(m.len(), gpa, buf.len())?;
            m[r].copy_from_slice(buf);
            Ok(())
        }
    }

    /// A driver's view of a queue at fixed addresses: descriptors at 0x1000, avail at
    /// 0x2000, used at 0x3000.
    pub struct Driver {
        pub size: u16,
        pub avail_idx: u16,
    }

    impl Driver {
        pub fn queue(size: u16) -> Queue {
            let mut q = Queue::new(256);
            q.size = size;
            q.desc = 0x1000;
            q.avail = 0x2000;
            q.used = 0x3000;
            q.ready = true;
            q
        }

        pub fn desc(ram: &Ram, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
            let mut d = [0u8; 16];
            d[..8].copy_from_slice(&addr.to_le_bytes());
            d[8..12].copy_from_slice(&len.to_le_bytes());
            d[12..14].copy_from_slice(&flags.to_le_bytes());
            d[14..].copy_from_slice(&next.to_le_bytes());
            ram.put(0x1000 + 16 * u64::from(i), &d);
        }

        pub fn offer(&mut self, ram: &Ram, head: u16) {
            let slot = u64::from(self.avail_idx % self.size);
            ram.put(0x2000 + 4 + 2 * slot, &head.to_le_bytes());
            self.avail_idx = self.avail_idx.wrapping_add(1);
            ram.put(0x2002, &self.avail_idx.to_le_bytes());
        }
    }

    #[test]
    fn a_chain_is_popped_and_returned() {
        let ram = Ram::new(0x10000);
        let mut q = Driver::queue(4);
        let mut drv = Driver {
            size: 4,
            avail_idx: 0,
        };
        assert_eq!(q.pop(&ram).unwrap(), None);
        Driver::desc(&ram, 2, 0x5000, 16, VRING_DESC_F_NEXT as u16, 3);
        Driver::desc(&ram, 3, 0x6000, 1, VRING_DESC_F_WRITE as u16, 0);
        drv.offer(&ram, 2);
        let c = q.pop(&ram).unwrap().unwrap();
        assert_eq!(c.head, 2);
        assert_eq!(
            c.descriptors,
            vec![
                Descriptor {
                    addr: 0x5000,
                    len: 16,
                    writable: false
                },
                Descriptor {
                    addr: 0x6000,
                    len: 1,
                    writable: true
                }
            ]
        );
        assert_eq!(q.pop(&ram).unwrap(), None);
        q.push_used(&ram, 2, 1).unwrap();
        assert_eq!(ram.get(0x3002, 2), [1, 0], "used index");
        assert_eq!(ram.get(0x3004, 8), [2, 0, 0, 0, 1, 0, 0, 0]);
        assert!(q.wants_interrupt(&ram).unwrap());
        ram.put(0x2000, &1u16.to_le_bytes());
        assert!(!q.wants_interrupt(&ram).unwrap());
    }

    #[test]
    fn malformed_chains_are_errors() {
        let ram = Ram::new(0x10000);
        // A loop.
        let mut q = Driver::queue(4);
        let mut drv = Driver {
            size: 4,
            avail_idx: 0,
        };
        Driver::desc(&ram, 0, 0x5000, 16, VRING_DESC_F_NEXT as u16, 1);
        Driver::desc(&ram, 1, 0x5000, 16, VRING_DESC_F_NEXT as u16, 0);
        drv.offer(&ram, 0);
        assert!(matches!(
            q.pop(&ram),
            Err(QueueError::ChainLoop { head: 0 })
        ));
        // A next index out of the queue.
        let mut q = Driver::queue(4);
        Driver::desc(&ram, 1, 0x5000, 16, VRING_DESC_F_NEXT as u16, 9);
        ram.put(0x2004, &1u16.to_le_bytes());
        assert!(matches!(
            q.pop(&ram),
            Err(QueueError::DescriptorIndex { index: 9, .. })
        ));
        // Indirect.
        let mut q = Driver::queue(4);
        Driver::desc(&ram, 1, 0x5000, 16, VRING_DESC_F_INDIRECT as u16, 0);
        assert!(matches!(q.pop(&ram), Err(QueueError::Indirect { .. })));
        // Too far ahead.
        let mut q = Driver::queue(4);
        ram.put(0x2002, &9u16.to_le_bytes());
        assert!(matches!(q.pop(&ram), Err(QueueError::AvailIndex { .. })));
        // Rings outside RAM.
        let mut q = Driver::queue(4);
        q.avail = 0x10_0000;
        assert!(matches!(q.pop(&ram), Err(QueueError::Memory(_))));
    }

    #[test]
    fn a_chains_buffers_are_gathered_and_scattered_in_order() {
        let ram = Ram::new(0x10000);
        ram.put(0x5000, b"abc");
        ram.put(0x6ffe, b"defg");
        let c = Chain {
            head: 0,
            descriptors: vec![
                Descriptor {
                    addr: 0x5000,
                    len: 3,
                    writable: false,
                },
                Descriptor {
                    addr: 0x8000,
                    len: 2,
                    writable: true,
                },
                Descriptor {
                    addr: 0x6ffe,
                    len: 4,
                    writable: false,
                },
                Descriptor {
                    addr: 0x9ffe,
                    len: 8,
                    writable: true,
                },
            ],
        };
        assert_eq!(c.read_all(&ram, 100).unwrap(), b"abcdefg");
        assert_eq!(c.read_all(&ram, 4).unwrap(), b"abcd");
        assert_eq!(c.writable_len(), 10);
        assert_eq!(c.write_all(&ram, b"0123456789xyz").unwrap(), 10);
        assert_eq!(ram.get(0x8000, 2), b"01");
        assert_eq!(ram.get(0x9ffe, 8), b"23456789");
        assert_eq!(c.write_all(&ram, b"Q").unwrap(), 1);
        assert_eq!(ram.get(0x8000, 2), b"Q1");
    }

    #[test]
    fn reads_and_writes_split_at_pages() {
        let ram = Ram::new(0x4000);
        write_guest(&ram, 0xffe, &[1, 2, 3, 4]).unwrap();
        let mut b = [0u8; 4];
        read_guest(&ram, 0xffe, &mut b).unwrap();
        assert_eq!(b, [1, 2, 3, 4]);
        assert!(matches!(
            read_guest(&ram, u64::MAX - 1, &mut b),
            Err(QueueError::Wraps { .. }) | Err(QueueError::Memory(_))
        ));
    }
}
