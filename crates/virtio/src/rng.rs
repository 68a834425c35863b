//! virtio-rng (virtio 1.x, 5.4): one queue whose device-writable buffers the device fills
//! with bytes from the host's `/dev/urandom`.

use std::fs::File;
use std::io::Read;

use dvmm_devices::GuestAccess;

use crate::queue::{Queue, QueueError};
use crate::VirtioDevice;

const QUEUE_SIZE: u16 = 64;
/// Most bytes given for one request (Linux asks for at most a page or so).
const MOST: u64 = 64 * 1024;

/// Why the entropy device cannot be made.
#[derive(Debug, thiserror::Error)]
#[error("cannot open /dev/urandom for the guest's virtio-rng: {0}")]
pub struct RngError(#[source] pub std::io::Error);

/// The entropy device.
#[derive(Debug)]
pub struct Rng {
    source: File,
}

impl Rng {
    /// An entropy device fed by the host's `/dev/urandom`.
    pub fn new() -> Result<Rng, RngError> {
        File::open("/dev/urandom")
            .map(|source| Rng { source })
            .map_err(RngError)
    }
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u16 {
        crate::device_type::ENTROPY
    }

    fn features(&self) -> u64 {
        0
    }

    fn queue_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE]
    }

    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn process_queue(
        &mut self,
        _index: usize,
        queue: &mut Queue,
        mem: &dyn GuestAccess,
    ) -> Result<bool, QueueError> {
        let mut used = false;
        while let Some(chain) = queue.pop(mem)? {
            let want = usize::try_from(chain.writable_len().min(MOST)).unwrap_or(0);
            let mut bytes = vec![0u8; want];
            // A failed read gives the driver nothing rather than bytes that are not random.
            let written = match self.source.read_exact(&mut bytes) {
                Ok(()) => chain.write_all(mem, &bytes)?,
                Err(e) => {
                    tracing::warn!(error = %e, "virtio-rng: /dev/urandom failed");
                    0
                }
            };
            queue.push_used(mem, chain.head, u32::try_from(written).unwrap_or(0))?;
            used = true;
        }
        Ok(used)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queue::tests::{Driver, Ram};
    use virtio_bindings::virtio_ring::VRING_DESC_F_WRITE;

    #[test]
    fn writable_buffers_are_filled_and_their_length_reported() {
        let ram = Ram::new(0x10000);
        let mut q = Driver::queue(4);
        let mut drv = Driver {
            size: 4,
            avail_idx: 0,
        };
        Driver::desc(&ram, 0, 0x8000, 256, VRING_DESC_F_WRITE as u16, 0);
        drv.offer(&ram, 0);
        let mut rng = Rng::new().unwrap();
        assert!(rng.process_queue(0, &mut q, &ram).unwrap());
        assert_eq!(
            ram.get(0x3004, 8),
            [0, 0, 0, 0, 0, 1, 0, 0],
            "256 bytes used"
        );
        let got = ram.get(0x8000, 256);
        assert!(
            got.iter().filter(|b| **b == 0).count() < 32,
            "random bytes, not zeros"
        );
        assert!(
            !rng.process_queue(0, &mut q, &ram).unwrap(),
            "nothing more offered"
        );
    }
}
