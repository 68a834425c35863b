//! Multiboot v1 (the 0.6.96 specification): kernels with a Multiboot header in their
//! first 8 KiB, such as kvm-unit-tests' `.flat` images, GRUB-style hobby kernels and
//! Xen's loader path. The image is an ELF file (32- or 64-bit, loaded by its program
//! headers' physical addresses) or, with the header's "a.out kludge" flag, raw bytes at
//! the addresses the header names. The kernel is entered in 32-bit protected mode,
//! paging off, EAX = 0x2BADB002 and EBX = the Multiboot information structure, which
//! gives the memory sizes, a memory map, the command line (the kernel's path first, as
//! GRUB and QEMU pass it) and the initramfs as module 0.
//!
//! Not offered: video modes (header flag 2) and the boot device: a kernel that requires
//! either is refused with the reason.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use dvmm_layout::{CMDLINE_ADDR, CMDLINE_MAX, KERNEL_LOAD_ADDR, PAGE_SIZE, PVH_INFO_ADDR};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::cpu::{
    segment_from_gdt_entry, CpuBootState, Segment, Table, CR0_ET, CR0_PE, RFLAGS_RESERVED,
};
use crate::e820::E820Entry;
use crate::guest_setup::{
    check_cmdline, check_placement, low_ram_end, mem_err, not_a_kernel, write_cmdline, write_gdt,
    BootSpec, EntryKind, Loaded, BOOT_CS, BOOT_DS, BOOT_TSS, GDT_CODE32, GDT_DATA, GDT_TSS,
};
use crate::{acpi, e820, BootError};

/// The header's magic number.
pub const HEADER_MAGIC: u32 = 0x1BAD_B002;
/// What EAX holds at entry.
pub const BOOTLOADER_MAGIC: u32 = 0x2BAD_B002;
/// The header must lie, 4-byte aligned, in this many bytes at the start of the image.
pub const SEARCH_LEN: usize = 8192;
/// Where the information structure, the module list, the memory map and the loader's
/// name go (the page PVH's start info uses; a Multiboot boot writes no start info).
pub const INFO_ADDR: u64 = PVH_INFO_ADDR;

/// Header flag: modules page-aligned.
const FLAG_PAGE_ALIGN: u32 = 1 << 0;
/// Header flag: memory information wanted.
const FLAG_MEMORY_INFO: u32 = 1 << 1;
/// Header flag: a video mode wanted.
const FLAG_VIDEO_MODE: u32 = 1 << 2;
/// Header flag: the load addresses are in the header (the "a.out kludge").
const FLAG_AOUT_KLUDGE: u32 = 1 << 16;

/// Information flags: mem_lower/mem_upper, cmdline, mods, mmap, boot_loader_name.
const INFO_MEMORY: u32 = 1 << 0;
const INFO_CMDLINE: u32 = 1 << 2;
const INFO_MODS: u32 = 1 << 3;
const INFO_MMAP: u32 = 1 << 6;
const INFO_LOADER_NAME: u32 = 1 << 9;

/// Size of the information structure (through the VBE fields).
const INFO_LEN: usize = 88;
const LOADER_NAME: &[u8] = b"dvmm\0";

/// A Multiboot header, as found in the image.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// Offset of the header in the file.
    pub offset: usize,
    /// Its flags.
    pub flags: u32,
    /// With the a.out kludge: header_addr, load_addr, load_end_addr, bss_end_addr,
    /// entry_addr.
    pub addresses: Option<[u32; 5]>,
}

fn u32_at(b: &[u8], o: usize) -> Option<u32> {
    b.get(o..o + 4)
        .map(|x| u32::from_le_bytes([x[0], x[1], x[2], x[3]]))
}

/// The Multiboot header in `head` (the image's first bytes), if there is a valid one:
/// magic, flags and checksum summing to zero.
pub fn find_header(head: &[u8]) -> Option<Header> {
    let end = head.len().min(SEARCH_LEN);
    (0..end.saturating_sub(11)).step_by(4).find_map(|offset| {
        let magic = u32_at(head, offset)?;
        let flags = u32_at(head, offset + 4)?;
        let checksum = u32_at(head, offset + 8)?;
        if magic != HEADER_MAGIC || magic.wrapping_add(flags).wrapping_add(checksum) != 0 {
            return None;
        }
        let addresses = if flags & FLAG_AOUT_KLUDGE != 0 {
            let mut a = [0u32; 5];
            for (i, slot) in a.iter_mut().enumerate() {
                *slot = u32_at(head, offset + 12 + 4 * i)?;
            }
            Some(a)
        } else {
            None
        };
        Some(Header {
            offset,
            flags,
            addresses,
        })
    })
}

/// One piece of the image to put in guest memory: `file_len` bytes from the file at
/// `file_offset`, then zeros up to `mem_len`, at `addr`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Piece {
    file_offset: u64,
    file_len: u64,
    addr: u64,
    mem_len: u64,
}

/// What to load and where to enter, from the header's addresses (a.out kludge).
fn kludge_pieces(h: &Header, a: [u32; 5], file_len: u64) -> Result<(Vec<Piece>, u64), String> {
    let [header_addr, load_addr, load_end_addr, bss_end_addr, entry_addr] = a.map(u64::from);
    if load_addr > header_addr {
        return Err(format!(
            "Multiboot header: load_addr {load_addr:#x} is above header_addr {header_addr:#x}"
        ));
    }
    let file_offset = (h.offset as u64)
        .checked_sub(header_addr - load_addr)
        .ok_or("Multiboot header: header_addr - load_addr points before the file's start")?;
    let file_part = if load_end_addr == 0 {
        file_len - file_offset
    } else {
        load_end_addr
            .checked_sub(load_addr)
            .ok_or("Multiboot header: load_end_addr is below load_addr")?
    };
    if file_offset + file_part > file_len {
        return Err(format!(
            "Multiboot header: {file_part} bytes to load from offset {file_offset:#x}, past the \
             end of the {file_len}-byte file"
        ));
    }
    let end = if bss_end_addr == 0 {
        load_addr + file_part
    } else {
        bss_end_addr.max(load_addr + file_part)
    };
    let piece = Piece {
        file_offset,
        file_len: file_part,
        addr: load_addr,
        mem_len: end - load_addr,
    };
    Ok((vec![piece], entry_addr))
}

/// What to load and where to enter, from an ELF file's program headers (32- or 64-bit).
fn elf_pieces(head: &[u8], file: &mut File, file_len: u64) -> Result<(Vec<Piece>, u64), String> {
    if head.get(5) != Some(&1) {
        return Err("not a little-endian ELF file".into());
    }
    let machine = head.get(18..20).map(|b| u16::from_le_bytes([b[0], b[1]]));
    let u16_at = |o: usize| head.get(o..o + 2).map(|b| u16::from_le_bytes([b[0], b[1]]));
    let u64_at = |b: &[u8], o: usize| {
        b.get(o..o + 8)
            .map(|x| u64::from_le_bytes([x[0], x[1], x[2], x[3], x[4], x[5], x[6], x[7]]))
    };
    let wide = match head.get(4) {
        Some(1) => false,
        Some(2) => true,
        _ => return Err("ELF class is neither 32- nor 64-bit".into()),
    };
    if !matches!(machine, Some(3) | Some(0x3E)) {
        return Err(format!("ELF machine {machine:?} is not x86"));
    }
    let field = |b: &[u8], o32: usize, o64: usize| -> Option<u64> {
        if wide {
            u64_at(b, o64)
        } else {
            u32_at(b, o32).map(u64::from)
        }
    };
    let bad = || "ELF header is truncated".to_string();
    let entry = field(head, 24, 24).ok_or_else(bad)?;
    let phoff = field(head, 28, 32).ok_or_else(bad)?;
    let (phentsize, phnum) = if wide {
        (u16_at(54), u16_at(56))
    } else {
        (u16_at(42), u16_at(44))
    };
    let (Some(phentsize), Some(phnum)) = (phentsize, phnum) else {
        return Err(bad());
    };
    let want = if wide { 56 } else { 32 };
    if usize::from(phentsize) != want {
        return Err(format!("program header size {phentsize}, expected {want}"));
    }
    let mut phdrs = vec![0u8; usize::from(phentsize) * usize::from(phnum)];
    file.seek(SeekFrom::Start(phoff))
        .and_then(|_| file.read_exact(&mut phdrs))
        .map_err(|e| format!("cannot read the program headers: {e}"))?;
    let mut pieces = Vec::new();
    for p in phdrs.chunks_exact(want) {
        if u32_at(p, 0) != Some(1) {
            continue; // not PT_LOAD
        }
        let (file_offset, addr, filesz, memsz) = if wide {
            (u64_at(p, 8), u64_at(p, 24), u64_at(p, 32), u64_at(p, 40))
        } else {
            let f = |o| u32_at(p, o).map(u64::from);
            (f(4), f(12), f(16), f(20))
        };
        let (Some(file_offset), Some(addr), Some(file_len_), Some(mem_len)) =
            (file_offset, addr, filesz, memsz)
        else {
            return Err(bad());
        };
        if mem_len == 0 {
            continue;
        }
        if file_len_ > mem_len {
            return Err(format!(
                "segment at {addr:#x} has more file bytes than memory bytes"
            ));
        }
        if file_offset
            .checked_add(file_len_)
            .is_none_or(|e| e > file_len)
        {
            return Err(format!(
                "segment at file offset {file_offset:#x} runs past the end of the file; it is \
                 truncated"
            ));
        }
        pieces.push(Piece {
            file_offset,
            file_len: file_len_,
            addr,
            mem_len,
        });
    }
    if pieces.is_empty() {
        return Err("the ELF file has nothing to load".into());
    }
    Ok((pieces, entry))
}

/// The information page: the structure at [`INFO_ADDR`], then the module list, the
/// memory map and the strings it points to.
fn info_page(
    map: &[E820Entry],
    low_end: u64,
    module: Option<(u64, u64)>,
    module_name: &str,
) -> Result<Vec<u8>, BootError> {
    let mut page = vec![0u8; INFO_LEN];
    let put = |page: &mut Vec<u8>, at: usize, v: u32| {
        page[at..at + 4].copy_from_slice(&v.to_le_bytes());
    };
    let addr_of = |len: usize| u32::try_from(INFO_ADDR + len as u64).unwrap_or(0);
    let mut flags = INFO_MEMORY | INFO_CMDLINE | INFO_MMAP | INFO_LOADER_NAME;
    // mem_lower: KiB below the EBDA (conventional memory); mem_upper: KiB from 1 MiB to
    // the first hole.
    let lower = map
        .iter()
        .find(|e| e.addr == 0 && e.kind == e820::E820_RAM)
        .map_or(0, |e| e.size / 1024);
    put(&mut page, 4, u32::try_from(lower).unwrap_or(640));
    let upper = low_end.saturating_sub(KERNEL_LOAD_ADDR) / 1024;
    put(&mut page, 8, u32::try_from(upper).unwrap_or(u32::MAX));
    put(&mut page, 16, u32::try_from(CMDLINE_ADDR).unwrap_or(0));
    if let Some((start, end)) = module {
        flags |= INFO_MODS;
        let list = page.len();
        page.extend_from_slice(&[0; 16]);
        put(&mut page, 20, 1);
        put(&mut page, 24, addr_of(list));
        let name = page.len();
        page.extend_from_slice(module_name.as_bytes());
        page.push(0);
        put(&mut page, list, u32::try_from(start).unwrap_or(0));
        put(&mut page, list + 4, u32::try_from(end).unwrap_or(0));
        put(&mut page, list + 8, addr_of(name));
        while !page.len().is_multiple_of(8) {
            page.push(0);
        }
    }
    // The memory map: entries of size (20, not counting itself), base, length, type.
    let mmap = page.len();
    for e in map {
        page.extend_from_slice(&20u32.to_le_bytes());
        page.extend_from_slice(&e.addr.to_le_bytes());
        page.extend_from_slice(&e.size.to_le_bytes());
        page.extend_from_slice(&e.kind.to_le_bytes());
    }
    let mmap_len = page.len() - mmap;
    put(&mut page, 44, u32::try_from(mmap_len).unwrap_or(0));
    put(&mut page, 48, addr_of(mmap));
    let name = page.len();
    page.extend_from_slice(LOADER_NAME);
    put(&mut page, 64, addr_of(name));
    put(&mut page, 0, flags);
    if page.len() as u64 > PAGE_SIZE {
        return Err(BootError::GuestMemory(format!(
            "the Multiboot information ({} bytes) does not fit its page",
            page.len()
        )));
    }
    Ok(page)
}

/// Puts the file at `path` at `start` (below `ceiling`); returns its length.
fn load_module(
    mem: &GuestMemoryMmap,
    path: &Path,
    start: u64,
    ceiling: u64,
) -> Result<u64, BootError> {
    let open_err = |source| BootError::InitramfsOpen {
        path: path.to_path_buf(),
        source,
    };
    let bytes = std::fs::read(path).map_err(open_err)?;
    let size = bytes.len() as u64;
    if start.checked_add(size).is_none_or(|e| e > ceiling) {
        return Err(BootError::InitramfsTooLarge {
            size,
            available: ceiling.saturating_sub(start),
        });
    }
    mem.write_slice(&bytes, GuestAddress(start))
        .map_err(|e| mem_err("the module", start, e))?;
    Ok(size)
}

/// Loads the Multiboot kernel whose header is `h` (`head`: the file's first bytes).
pub(crate) fn load(
    mem: &GuestMemoryMmap,
    spec: &BootSpec,
    file: &mut File,
    file_len: u64,
    head: &[u8],
    h: Header,
) -> Result<Loaded, BootError> {
    let path = spec.kernel;
    let unsupported = h.flags & 0xffff & !(FLAG_PAGE_ALIGN | FLAG_MEMORY_INFO);
    if unsupported & FLAG_VIDEO_MODE != 0 {
        return Err(not_a_kernel(
            path,
            "its Multiboot header asks for a video mode (flag 2); dvmm has no display",
        ));
    }
    if unsupported != 0 {
        return Err(not_a_kernel(
            path,
            format!("its Multiboot header requires features dvmm does not know (flags {unsupported:#x})"),
        ));
    }
    let (pieces, entry) = match h.addresses {
        Some(a) => kludge_pieces(&h, a, file_len),
        None if head.starts_with(b"\x7FELF") => elf_pieces(head, file, file_len),
        None => Err("it has a Multiboot header without load addresses, and is no ELF file".into()),
    }
    .map_err(|r| not_a_kernel(path, r))?;
    let low_end = low_ram_end(spec.topology);
    let mut kernel_end = KERNEL_LOAD_ADDR;
    for p in &pieces {
        check_placement(path, p.addr, p.mem_len, low_end)?;
        kernel_end = kernel_end.max(p.addr + p.mem_len);
    }
    let cmdline = format!("{} {}", path.display(), spec.cmdline);
    check_cmdline(&cmdline, CMDLINE_MAX - 1)?;
    for p in &pieces {
        let mut bytes = vec![0u8; usize::try_from(p.mem_len).unwrap_or(0)];
        let n = usize::try_from(p.file_len).unwrap_or(0);
        file.seek(SeekFrom::Start(p.file_offset))
            .and_then(|_| file.read_exact(&mut bytes[..n]))
            .map_err(|e| not_a_kernel(path, format!("cannot read it: {e}")))?;
        mem.write_slice(&bytes, GuestAddress(p.addr))
            .map_err(|e| mem_err("the kernel", p.addr, e))?;
    }
    let module = match spec.initramfs {
        Some(p) => {
            let start = kernel_end.div_ceil(PAGE_SIZE) * PAGE_SIZE;
            let len = load_module(mem, p, start, low_end)?;
            Some((start, start + len, p.display().to_string()))
        }
        None => None,
    };
    write_cmdline(mem, &cmdline)?;
    let rsdp = acpi::write_tables(mem, spec.topology)?;
    let map = e820::map(spec.topology);
    let page = info_page(
        &map,
        low_end,
        module.as_ref().map(|m| (m.0, m.1)),
        module.as_ref().map_or("", |m| m.2.as_str()),
    )?;
    mem.write_slice(&page, GuestAddress(INFO_ADDR))
        .map_err(|e| mem_err("the Multiboot information", INFO_ADDR, e))?;
    let gdt = write_gdt(mem, GDT_CODE32)?;
    let cpu = CpuBootState {
        rip: entry,
        rax: u64::from(BOOTLOADER_MAGIC),
        rbx: INFO_ADDR,
        rflags: RFLAGS_RESERVED,
        cr0: CR0_PE | CR0_ET,
        cs: segment_from_gdt_entry(GDT_CODE32, BOOT_CS),
        data: segment_from_gdt_entry(GDT_DATA, BOOT_DS),
        tr: segment_from_gdt_entry(GDT_TSS, BOOT_TSS),
        ldt: Segment::default(),
        gdt,
        idt: Table::default(),
        ..CpuBootState::default()
    };
    Ok(Loaded {
        entry: EntryKind::Multiboot,
        cpu,
        kernel_end,
        initramfs: module.map(|m| dvmm_layout::RamRange {
            start: m.0,
            len: m.1 - m.0,
        }),
        rsdp,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(flags: u32, extra: &[u32]) -> Vec<u8> {
        let mut v = vec![0u8; 64];
        let mut h = vec![
            HEADER_MAGIC,
            flags,
            0u32.wrapping_sub(HEADER_MAGIC.wrapping_add(flags)),
        ];
        h.extend_from_slice(extra);
        for w in h {
            v.extend_from_slice(&w.to_le_bytes());
        }
        v
    }

    #[test]
    fn a_header_is_found_only_with_its_checksum_and_alignment() {
        let h = header(FLAG_MEMORY_INFO, &[]);
        assert_eq!(
            find_header(&h),
            Some(Header {
                offset: 64,
                flags: FLAG_MEMORY_INFO,
                addresses: None
            })
        );
        let mut bad = h.clone();
        bad[72] ^= 1;
        assert_eq!(find_header(&bad), None, "checksum");
        let mut shifted = vec![0u8; 2];
        shifted.extend_from_slice(&h);
        assert_eq!(find_header(&shifted), None, "not 4-byte aligned");
        let mut late = vec![0u8; SEARCH_LEN];
        late.extend_from_slice(&h);
        assert_eq!(find_header(&late), None, "past the first 8 KiB");
        assert_eq!(find_header(&h[..70]), None, "truncated");
    }

    #[test]
    fn the_aout_kludge_loads_what_the_header_names() {
        // Header at file offset 64, mapped at 0x100040: the file loads at 0x100000.
        let h = header(
            FLAG_AOUT_KLUDGE,
            &[0x10_0040, 0x10_0000, 0x10_1000, 0x10_3000, 0x10_0080],
        );
        let found = find_header(&h).unwrap();
        let (pieces, entry) = kludge_pieces(&found, found.addresses.unwrap(), 0x2000).unwrap();
        assert_eq!(entry, 0x10_0080);
        assert_eq!(
            pieces,
            vec![Piece {
                file_offset: 0,
                file_len: 0x1000,
                addr: 0x10_0000,
                mem_len: 0x3000
            }]
        );
        // load_end_addr past the file's end, header_addr before load_addr's reach.
        let past = kludge_pieces(&found, [0x10_0040, 0x10_0000, 0x10_9000, 0, 0], 0x2000);
        assert!(past.unwrap_err().contains("past the end"), "truncated file");
        let before = kludge_pieces(&found, [0x10_1000, 0x10_0000, 0, 0, 0], 0x2000);
        assert!(before.is_err(), "would start before the file");
    }

    #[test]
    fn the_information_page_points_at_its_parts() {
        let map = vec![
            E820Entry {
                addr: 0,
                size: 0x9_FC00,
                kind: e820::E820_RAM,
            },
            E820Entry {
                addr: 0x10_0000,
                size: 0x3F0_0000,
                kind: e820::E820_RAM,
            },
        ];
        let page = info_page(&map, 0x400_0000, Some((0x20_0000, 0x20_0123)), "env").unwrap();
        let at = |o| u32_at(&page, o).unwrap();
        let local = |addr: u32| (u64::from(addr) - INFO_ADDR) as usize;
        assert_eq!(
            at(0),
            INFO_MEMORY | INFO_CMDLINE | INFO_MODS | INFO_MMAP | INFO_LOADER_NAME
        );
        assert_eq!(at(4), 639, "mem_lower in KiB");
        assert_eq!(at(8), (0x400_0000 - 0x10_0000) / 1024, "mem_upper in KiB");
        assert_eq!(u64::from(at(16)), CMDLINE_ADDR);
        assert_eq!(at(20), 1, "one module");
        let m = local(at(24));
        assert_eq!((at(m), at(m + 4)), (0x20_0000, 0x20_0123));
        let name = local(at(m + 8));
        assert_eq!(&page[name..name + 4], b"env\0");
        assert_eq!(at(44), 48, "two 24-byte map entries");
        let mm = local(at(48));
        assert_eq!(at(mm), 20);
        assert_eq!(
            (u64_of(&page, mm + 4), u64_of(&page, mm + 12)),
            (0, 0x9_FC00)
        );
        assert_eq!(u64_of(&page, mm + 24 + 4), 0x10_0000);
        assert_eq!(at(mm + 24 + 20), e820::E820_RAM);
        let loader = local(at(64));
        assert_eq!(&page[loader..loader + 5], b"dvmm\0");
    }

    fn u64_of(b: &[u8], o: usize) -> u64 {
        u64::from_le_bytes(b[o..o + 8].try_into().unwrap())
    }
}
