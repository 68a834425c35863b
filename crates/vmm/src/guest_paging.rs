//! Guest-virtual to guest-physical translation by walking the guest's own page tables.
//!
//! `KVM_TRANSLATE` does the same but costs an ioctl (~7 us on emulated hosts) and reads
//! the tables behind the DSM's back on a cluster node; this walk reads them through a
//! [`GuestAccess`], so it sees the coherent copy. Long mode only (4- and 5-level
//! tables), which is all the callers need: they act on 64-bit kernels.

use crate::guest_access::GuestAccess;

const PRESENT: u64 = 1;
const WRITABLE: u64 = 1 << 1;
const USER: u64 = 1 << 2;
const LARGE: u64 = 1 << 7;
const NO_EXECUTE: u64 = 1 << 63;
const ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;

/// The guest's paging configuration, from its control registers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Paging {
    /// CR3: the top-level table.
    pub cr3: u64,
    /// CR4.LA57: five levels instead of four.
    pub five_level: bool,
}

impl Paging {
    /// Paging as configured by `cr3` and `cr4` (long mode assumed).
    pub fn from_regs(cr3: u64, cr4: u64) -> Paging {
        Paging {
            cr3,
            five_level: cr4 & (1 << 12) != 0,
        }
    }
}

/// A successful translation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Translation {
    /// The guest-physical address.
    pub gpa: u64,
    /// Every level allows user-mode access.
    pub user: bool,
    /// Every level allows writes.
    pub writable: bool,
    /// Some level forbids instruction fetches.
    pub no_execute: bool,
}

/// Translates `va` under `paging`; None if it is not mapped (or a table is unreadable).
pub fn translate(mem: &dyn GuestAccess, paging: Paging, va: u64) -> Option<Translation> {
    let levels: u32 = if paging.five_level { 5 } else { 4 };
    let mut table = paging.cr3 & ADDR_MASK;
    let mut t = Translation {
        gpa: 0,
        user: true,
        writable: true,
        no_execute: false,
    };
    for level in (0..levels).rev() {
        let index = (va >> (12 + 9 * level)) & 511;
        let mut e = [0u8; 8];
        mem.read(table + index * 8, &mut e).ok()?;
        let e = u64::from_le_bytes(e);
        if e & PRESENT == 0 {
            return None;
        }
        t.user &= e & USER != 0;
        t.writable &= e & WRITABLE != 0;
        t.no_execute |= e & NO_EXECUTE != 0;
        // Large pages at the PDPT (1 GiB) and PD (2 MiB) levels.
        if (level == 1 || level == 2) && e & LARGE != 0 {
            let size = 1u64 << (12 + 9 * level);
            t.gpa = (e & ADDR_MASK & !(size - 1)) | (va & (size - 1));
            return Some(t);
        }
        table = e & ADDR_MASK;
    }
    t.gpa = table | (va & 0xfff);
    Some(t)
}

/// Calls `f(gpa, start, len)` for each page-sized piece of `[va, va + len)`, in order,
/// with the piece's guest-physical address and its offset in the range. False if a page
/// is not mapped or `f` fails.
fn for_each_piece(
    mem: &dyn GuestAccess,
    paging: Paging,
    va: u64,
    len: usize,
    mut f: impl FnMut(u64, usize, usize) -> bool,
) -> bool {
    let mut done = 0;
    while done < len {
        let at = va.wrapping_add(done as u64);
        let n = ((4096 - (at & 0xfff)) as usize).min(len - done);
        let Some(t) = translate(mem, paging, at) else {
            return false;
        };
        if !f(t.gpa, done, n) {
            return false;
        }
        done += n;
    }
    true
}

/// Reads `buf.len()` bytes at guest-virtual `va`, page by page. False if any byte is
/// not mapped or not readable.
pub fn read_virt(mem: &dyn GuestAccess, paging: Paging, va: u64, buf: &mut [u8]) -> bool {
    let len = buf.len();
    for_each_piece(mem, paging, va, len, |gpa, at, n| {
        mem.read(gpa, &mut buf[at..at + n]).is_ok()
    })
}

/// Reads a little-endian u64 at guest-virtual `va`.
pub fn read_u64(mem: &dyn GuestAccess, paging: Paging, va: u64) -> Option<u64> {
    let mut b = [0u8; 8];
    read_virt(mem, paging, va, &mut b).then(|| u64::from_le_bytes(b))
}

/// Writes `buf` at guest-virtual `va`, page by page (the VMM writes regardless of the
/// guest's write-protection). False if any byte is not mapped or the write failed.
pub fn write_virt(mem: &dyn GuestAccess, paging: Paging, va: u64, buf: &[u8]) -> bool {
    for_each_piece(mem, paging, va, buf.len(), |gpa, at, n| {
        mem.write(gpa, &buf[at..at + n]).is_ok()
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::guest_access::GuestAccessError;
    use std::sync::Mutex;

    /// Flat guest-physical memory for tests.
    pub struct FlatMemory(pub Mutex<Vec<u8>>);

    impl FlatMemory {
        pub fn new(size: usize) -> FlatMemory {
            FlatMemory(Mutex::new(vec![0; size]))
        }

        pub fn put_u64(&self, gpa: u64, v: u64) {
            self.write(gpa, &v.to_le_bytes()).unwrap();
        }

        pub fn get(&self, gpa: u64, len: usize) -> Vec<u8> {
            let mut b = vec![0; len];
            self.read(gpa, &mut b).unwrap();
            b
        }
    }

    impl GuestAccess for FlatMemory {
        fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), GuestAccessError> {
            let m = self.0.lock().unwrap();
            let s = gpa as usize;
            let len = buf.len();
            let src = m
                .get(s..s + len)
                .ok_or(GuestAccessError::NotRam { gpa, len })?;
            buf.copy_from_slice(src);
            Ok(())
        }

        fn write(&self, gpa: u64, buf: &[u8]) -> Result<(), GuestAccessError> {
            let mut m = self.0.lock().unwrap();
            let s = gpa as usize;
            let len = buf.len();
            let dst = m
                .get_mut(s..s + len)
                .ok_or(GuestAccessError::NotRam { gpa, len })?;
            dst.copy_from_slice(buf);
            Ok(())
        }
    }

    /// Maps 4 KiB page `va` -> `gpa` with `flags` in 4-level tables rooted at `cr3`,
    /// taking table pages from `next_table` onwards.
    pub fn map_4k(mem: &FlatMemory, cr3: u64, va: u64, gpa: u64, flags: u64, next_table: &mut u64) {
        let mut table = cr3;
        for level in (1..4).rev() {
            let idx = (va >> (12 + 9 * level)) & 511;
            let mut e = [0u8; 8];
            mem.read(table + idx * 8, &mut e).unwrap();
            let mut e = u64::from_le_bytes(e);
            if e & PRESENT == 0 {
                e = *next_table | PRESENT | WRITABLE | USER;
                *next_table += 4096;
                mem.put_u64(table + idx * 8, e);
            }
            table = e & ADDR_MASK;
        }
        mem.put_u64(table + ((va >> 12) & 511) * 8, gpa | flags);
    }

    #[test]
    fn four_level_walk_with_flags() {
        let mem = FlatMemory::new(1 << 20);
        let mut next = 0x2000;
        let va = 0xffff_ffff_8123_4000;
        map_4k(&mem, 0x1000, va, 0x9_0000, PRESENT | NO_EXECUTE, &mut next);
        let p = Paging::from_regs(0x1000, 0);
        let t = translate(&mem, p, va + 0x123).unwrap();
        assert_eq!(t.gpa, 0x9_0123);
        assert!(!t.user && !t.writable && t.no_execute);
        assert!(translate(&mem, p, va + 0x1000).is_none());
    }

    #[test]
    fn large_pages() {
        let mem = FlatMemory::new(1 << 20);
        // PML4[0] -> PDPT at 0x2000; PDPT[1] = 1 GiB page at 0x4000_0000; PDPT[0] -> PD
        // at 0x3000 whose entry 3 is a 2 MiB page at 0x60_0000.
        mem.put_u64(0x1000, 0x2000 | PRESENT | WRITABLE | USER);
        mem.put_u64(0x2000 + 8, 0x4000_0000 | PRESENT | LARGE | USER);
        mem.put_u64(0x2000, 0x3000 | PRESENT | WRITABLE);
        mem.put_u64(
            0x3000 + 3 * 8,
            0x60_0000 | PRESENT | LARGE | WRITABLE | USER,
        );
        let p = Paging::from_regs(0x1000, 0);
        let t = translate(&mem, p, 0x4123_4567).unwrap();
        assert_eq!(t.gpa, 0x4123_4567);
        assert!(t.user && !t.writable);
        let t = translate(&mem, p, 0x61_2345).unwrap();
        assert_eq!(t.gpa, 0x61_2345);
        assert!(!t.user && t.writable);
    }

    #[test]
    fn five_level_uses_bits_48_to_56() {
        let mem = FlatMemory::new(1 << 20);
        let va: u64 = 0x0002_0000_0000_0000 | 0x5000;
        // PML5[2] -> PML4 0x2000 [0] -> PDPT 0x3000 [0] -> PD 0x4000 [0] -> PT 0x5000 [5]
        mem.put_u64(0x1000 + 2 * 8, 0x2000 | PRESENT);
        mem.put_u64(0x2000, 0x3000 | PRESENT);
        mem.put_u64(0x3000, 0x4000 | PRESENT);
        mem.put_u64(0x4000, 0x5000 | PRESENT);
        mem.put_u64(0x5000 + 5 * 8, 0x7000 | PRESENT);
        let t = translate(&mem, Paging::from_regs(0x1000, 1 << 12), va + 8).unwrap();
        assert_eq!(t.gpa, 0x7008);
        assert!(translate(&mem, Paging::from_regs(0x1000, 0), va).is_none());
    }

    #[test]
    fn reads_and_writes_cross_pages() {
        let mem = FlatMemory::new(1 << 20);
        let mut next = 0x2000;
        // Two virtually adjacent pages that are physically apart.
        map_4k(&mem, 0x1000, 0x40_0000, 0x8_0000, PRESENT, &mut next);
        map_4k(&mem, 0x1000, 0x40_1000, 0x6_0000, PRESENT, &mut next);
        let p = Paging::from_regs(0x1000, 0);
        assert!(write_virt(&mem, p, 0x40_0ffc, &[1, 2, 3, 4, 5, 6, 7, 8]));
        assert_eq!(mem.get(0x8_0ffc, 4), [1, 2, 3, 4]);
        assert_eq!(mem.get(0x6_0000, 4), [5, 6, 7, 8]);
        assert_eq!(read_u64(&mem, p, 0x40_0ffc), Some(0x0807_0605_0403_0201));
        assert_eq!(read_u64(&mem, p, 0x40_1ffc), None);
    }
}
