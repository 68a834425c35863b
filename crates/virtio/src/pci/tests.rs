//! The transport driven as Linux's virtio_pci_modern driver drives it, over fake RAM.

use super::*;
use crate::block::Block;
use crate::queue::tests::{Driver, Ram};
use dvmm_pci::config::{COMMAND, COMMAND_BUS_MASTER, COMMAND_MEMORY};
use std::sync::Mutex;
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};

#[derive(Default)]
struct Sent(Mutex<Vec<(u64, u32)>>);

impl MsiSink for Sent {
    fn send_msi(&self, address: u64, data: u32) {
        self.0.lock().unwrap().push((address, data));
    }
}

fn w16(d: &mut VirtioPci, at: u64, v: u16) {
    d.bar_write(0, at, &v.to_le_bytes());
}
fn w32(d: &mut VirtioPci, at: u64, v: u32) {
    d.bar_write(0, at, &v.to_le_bytes());
}
fn r32(d: &mut VirtioPci, at: u64) -> u32 {
    let mut b = [0u8; 4];
    d.bar_read(0, at, &mut b);
    u32::from_le_bytes(b)
}
fn r8(d: &mut VirtioPci, at: u64) -> u8 {
    let mut b = [0u8; 1];
    d.bar_read(0, at, &mut b);
    b[0]
}

struct Rig {
    dev: VirtioPci,
    ram: Arc<Ram>,
    sent: Arc<Sent>,
    image: tempfile::NamedTempFile,
}

/// A block device on a 64 KiB image whose sector n is filled with n, brought up to
/// DRIVER_OK with queue 0 at Driver's addresses on MSI-X vector 1.
fn rig(readonly: bool) -> Rig {
    let image = tempfile::NamedTempFile::new().unwrap();
    let mut content = Vec::new();
    for s in 0..128u8 {
        content.extend(std::iter::repeat_n(s, 512));
    }
    std::fs::write(image.path(), &content).unwrap();
    let block = Block::open(image.path(), readonly).unwrap();
    let ram = Arc::new(Ram::new(0x20000));
    let sent = Arc::new(Sent::default());
    let mut dev =
        VirtioPci::new(Box::new(block), ram.clone(), sent.clone(), "test".into()).unwrap();
    dev.config_write(
        COMMAND,
        &(COMMAND_MEMORY | COMMAND_BUS_MASTER).to_le_bytes(),
    );
    // MSI-X on, vector 1 -> 0xfee00000 / 0x31, unmasked.
    let cap = dev.msix_capability();
    dev.config_write(cap + 2, &0x8000u16.to_le_bytes());
    dev.bar_write(0, MSIX_TABLE + 16, &0xfee0_0000u64.to_le_bytes());
    dev.bar_write(0, MSIX_TABLE + 24, &0x31u32.to_le_bytes());
    dev.bar_write(0, MSIX_TABLE + 28, &0u32.to_le_bytes());
    dev.bar_write(0, COMMON + 0x14, &[1 | 2]);
    w32(&mut dev, 0x08, 0);
    let lo = r32(&mut dev, 0x04);
    w32(&mut dev, 0x0c, lo);
    w32(&mut dev, 0x00, 1);
    w32(&mut dev, 0x08, 1);
    let hi = r32(&mut dev, 0x04);
    assert_eq!(hi & 1, 1, "VERSION_1 offered");
    w32(&mut dev, 0x0c, hi);
    dev.bar_write(0, 0x14, &[1 | 2 | 8]);
    assert_eq!(r8(&mut dev, 0x14) & 8, 8, "features accepted");
    w16(&mut dev, 0x16, 0);
    w16(&mut dev, 0x18, 4);
    w16(&mut dev, 0x1a, 1);
    assert_eq!(r32(&mut dev, 0x18) >> 16, 1, "vector 1 taken");
    dev.bar_write(0, 0x20, &0x1000u64.to_le_bytes());
    dev.bar_write(0, 0x28, &0x2000u64.to_le_bytes());
    dev.bar_write(0, 0x30, &0x3000u64.to_le_bytes());
    w16(&mut dev, 0x1c, 1);
    dev.bar_write(0, 0x14, &[1 | 2 | 4 | 8]);
    Rig {
        dev,
        ram,
        sent,
        image,
    }
}

/// Submits header (type, sector) + a data buffer at 0x8000 + status at 0x7000.
fn submit(
    r: &mut Rig,
    drv: &mut Driver,
    ty: u32,
    sector: u64,
    len: u32,
    data_writable: bool,
) -> u8 {
    let mut h = [0u8; 16];
    h[..4].copy_from_slice(&ty.to_le_bytes());
    h[8..].copy_from_slice(&sector.to_le_bytes());
    r.ram.put(0x6000, &h);
    r.ram.put(0x7000, &[0xee]);
    Driver::desc(&r.ram, 0, 0x6000, 16, VRING_DESC_F_NEXT as u16, 1);
    let f = VRING_DESC_F_NEXT as u16
        | if data_writable {
            VRING_DESC_F_WRITE as u16
        } else {
            0
        };
    Driver::desc(&r.ram, 1, 0x8000, len, f, 2);
    Driver::desc(&r.ram, 2, 0x7000, 1, VRING_DESC_F_WRITE as u16, 0);
    drv.offer(&r.ram, 0);
    w16(&mut r.dev, NOTIFY, 0);
    r.ram.get(0x7000, 1)[0]
}

#[test]
fn reads_and_writes_reach_the_image_and_interrupt_once_each() {
    let mut r = rig(false);
    let mut drv = Driver {
        size: 4,
        avail_idx: 0,
    };
    assert_eq!(submit(&mut r, &mut drv, 0, 3, 1024, true), 0, "read ok");
    assert_eq!(r.ram.get(0x8000, 1024), [[3u8; 512], [4u8; 512]].concat());
    assert_eq!(
        r.ram.get(0x3004, 8),
        [0, 0, 0, 0, 0x01, 0x04, 0, 0],
        "1025 bytes used"
    );
    assert_eq!(*r.sent.0.lock().unwrap(), [(0xfee0_0000, 0x31)]);
    r.ram.put(0x8000, &[0xab; 512]);
    assert_eq!(submit(&mut r, &mut drv, 1, 7, 512, false), 0, "write ok");
    assert_eq!(submit(&mut r, &mut drv, 4, 0, 0, false), 0, "flush ok");
    let on_disk = std::fs::read(r.image.path()).unwrap();
    assert_eq!(&on_disk[7 * 512..8 * 512], &[0xab; 512][..]);
    assert_eq!(r.sent.0.lock().unwrap().len(), 3);
    // Past the end: an I/O error, not a crash; the device still works.
    assert_eq!(submit(&mut r, &mut drv, 0, 127, 1024, true), 1);
    assert_eq!(submit(&mut r, &mut drv, 99, 0, 0, true), 2, "unsupported");
    assert!(!r.dev.is_broken());
}

#[test]
fn read_only_refuses_writes_and_says_so() {
    let mut r = rig(true);
    w32(&mut r.dev, 0x00, 0);
    assert_ne!(r32(&mut r.dev, 0x04) & 1 << VIRTIO_BLK_F_RO_BIT, 0);
    let mut drv = Driver {
        size: 4,
        avail_idx: 0,
    };
    assert_eq!(submit(&mut r, &mut drv, 1, 0, 512, false), 1);
    assert_eq!(std::fs::read(r.image.path()).unwrap()[0], 0);
    // A second writer is refused while this one holds the image.
    let err = Block::open(r.image.path(), false).unwrap_err();
    assert!(
        matches!(err, crate::block::BlockError::InUse { .. }),
        "{err}"
    );
}

const VIRTIO_BLK_F_RO_BIT: u32 = virtio_bindings::virtio_blk::VIRTIO_BLK_F_RO;

#[test]
fn a_malformed_queue_marks_the_device_broken_until_reset() {
    let mut r = rig(false);
    let mut drv = Driver {
        size: 4,
        avail_idx: 0,
    };
    // Data buffer outside RAM.
    let mut h = [0u8; 16];
    h[8..].copy_from_slice(&0u64.to_le_bytes());
    r.ram.put(0x6000, &h);
    Driver::desc(&r.ram, 0, 0x6000, 16, VRING_DESC_F_NEXT as u16, 1);
    Driver::desc(
        &r.ram,
        1,
        0x4000_0000,
        512,
        (VRING_DESC_F_NEXT | VRING_DESC_F_WRITE) as u16,
        2,
    );
    Driver::desc(&r.ram, 2, 0x7000, 1, VRING_DESC_F_WRITE as u16, 0);
    drv.offer(&r.ram, 0);
    w16(&mut r.dev, NOTIFY, 0);
    assert!(r.dev.is_broken());
    assert_eq!(
        r8(&mut r.dev, 0x14) & STATUS_NEEDS_RESET,
        STATUS_NEEDS_RESET
    );
    // Broken: further notifications do nothing. A reset clears it.
    w16(&mut r.dev, NOTIFY, 0);
    r.dev.bar_write(0, 0x14, &[0]);
    assert!(!r.dev.is_broken());
    assert_eq!(r8(&mut r.dev, 0x14), 0);
}

#[test]
fn features_the_device_did_not_offer_are_refused() {
    let mut r = rig(false);
    r.dev.bar_write(0, 0x14, &[0]);
    r.dev.bar_write(0, 0x14, &[1 | 2]);
    w32(&mut r.dev, 0x08, 0);
    w32(&mut r.dev, 0x0c, 1 << 28); // INDIRECT_DESC, not offered
    w32(&mut r.dev, 0x08, 1);
    w32(&mut r.dev, 0x0c, 1);
    r.dev.bar_write(0, 0x14, &[1 | 2 | 8]);
    assert_eq!(r8(&mut r.dev, 0x14) & 8, 0);
}

mod fuzz {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]
        /// Whatever the descriptor table and rings hold, the device neither panics nor
        /// reaches outside RAM (the fake RAM refuses, and asserts one page per access).
        #[test]
        fn arbitrary_rings_never_crash(
            descs in proptest::collection::vec((any::<u64>(), any::<u32>(), 0u16..8, any::<u16>()), 4),
            near in proptest::collection::vec((0u64..0x20000, 0u32..0x3000), 4),
            heads in proptest::collection::vec(any::<u16>(), 1..4),
            avail_idx in any::<u16>(),
            notifies in 1usize..4,
        ) {
            let mut r = rig(false);
            for (i, ((a, l, f, n), (na, nl))) in descs.iter().zip(&near).enumerate() {
                // Half the descriptors point somewhere plausible.
                let (a, l) = if i % 2 == 0 { (*na, *nl) } else { (*a, *l) };
                Driver::desc(&r.ram, i as u16, a, l, *f, *n % 6);
            }
            for (i, h) in heads.iter().enumerate() {
                r.ram.put(0x2004 + 2 * i as u64, &(h % 6).to_le_bytes());
            }
            r.ram.put(0x2002, &(avail_idx % 6).to_le_bytes());
            for _ in 0..notifies {
                w16(&mut r.dev, NOTIFY, 0);
            }
        }
    }
}

#[test]
fn the_pci_configuration_window_reaches_bar_0() {
    let mut r = rig(false);
    // Find the vendor capability of type 5 in the capability list.
    let mut at = usize::from(r.dev.config().u16(0x34) as u8);
    while r.dev.config().u16(at) & 0xff != 0x09 || r.dev.config().u16(at + 2) >> 8 != 5 {
        at = usize::from((r.dev.config().u16(at) >> 8) as u8);
        assert_ne!(at, 0, "no VIRTIO_PCI_CAP_PCI_CFG capability");
    }
    // num_queues (common configuration 0x12, 2 bytes) through the window.
    r.dev.config_write(at + 4, &[0]);
    r.dev.config_write(at + 8, &0x12u32.to_le_bytes());
    r.dev.config_write(at + 12, &2u32.to_le_bytes());
    let mut b = [0u8; 4];
    r.dev.config_read(at + 16, &mut b);
    assert_eq!(u16::from_le_bytes([b[0], b[1]]), 1, "one queue");
    // A write through the window: queue_select (0x16) = 7, read back directly.
    r.dev.config_write(at + 8, &0x16u32.to_le_bytes());
    r.dev.config_write(at + 16, &7u16.to_le_bytes());
    let mut q = [0u8; 2];
    r.dev.bar_read(0, 0x16, &mut q);
    assert_eq!(u16::from_le_bytes(q), 7);
    // A length the window does not take is ignored.
    r.dev.config_write(at + 12, &3u32.to_le_bytes());
    r.dev.config_write(at + 16, &9u16.to_le_bytes());
    r.dev.bar_read(0, 0x16, &mut q);
    assert_eq!(u16::from_le_bytes(q), 7);
}

#[test]
fn a_stand_in_is_sized_and_named_like_the_function() {
    let r = rig(false);
    let like = stand_in_config(2).unwrap();
    for bar in 0..dvmm_pci::config::BARS {
        assert_eq!(
            like.bar_size(bar),
            r.dev.config().bar_size(bar),
            "BAR {bar}"
        );
    }
    assert_eq!(like.u32(0), r.dev.config().u32(0), "vendor and device id");
}
