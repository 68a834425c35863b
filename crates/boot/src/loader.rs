//! Kernel loading: Linux bzImage via the 64-bit boot protocol, and ELF (`vmlinux`)
//! images via their PVH entry note; initramfs, command line, boot GDT, identity page
//! tables, and the boot vCPU's initial state.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use dvmm_layout::{
    ram_ranges, RamRange, BOOT_STACK_TOP, CMDLINE_ADDR, CMDLINE_MAX, HIGH_RAM_START,
    KERNEL_LOAD_ADDR, PAGE_SIZE, PDPT_ADDR, PD_ADDR, PML4_ADDR, PVH_INFO_ADDR, ZERO_PAGE_ADDR,
};
use linux_loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use linux_loader::loader::elf::{Elf, PvhBootCapability};
use linux_loader::loader::{BzImage, KernelLoader};
use vm_memory::{
    ByteValued, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, ReadVolatile,
};

use crate::cpu::{
    gdt_entry, segment_from_gdt_entry, CpuBootState, Segment, Table, CR0_CD, CR0_ET, CR0_MP,
    CR0_NE, CR0_NW, CR0_PE, CR0_PG, CR0_WP, CR4_PAE, EFER_LMA, EFER_LME, RFLAGS_RESERVED,
};
use crate::e820::E820Entry;
use crate::guest_setup::{
    check_cmdline, check_placement, low_ram_end, mem_err, not_a_kernel, write_cmdline, write_gdt,
    GDT_CODE32, GDT_DATA, GDT_TSS,
};
pub use crate::guest_setup::{BootSpec, EntryKind, Loaded, BOOT_CS, BOOT_DS, BOOT_TSS};
use crate::{acpi, e820, multiboot, payload, BootError, Topology};

/// Magic value of `hvm_start_info`.
pub const PVH_START_INFO_MAGIC: u32 = 0x336e_c578;
/// `type_of_loader` for an undefined boot loader.
const LOADER_TYPE_UNDEFINED: u8 = 0xFF;
/// Setup header `loadflags`: protected-mode code loaded at 1 MiB.
const LOADED_HIGH: u8 = 0x01;
/// Setup header `loadflags`: `heap_end_ptr` is valid.
const CAN_USE_HEAP: u8 = 0x80;
/// Setup header `xloadflags`: the kernel has the 64-bit entry at +0x200.
const XLF_KERNEL_64: u16 = 0x01;
/// End of the setup heap, relative to the real-mode code, as boot loaders customarily set it.
const HEAP_END_PTR: u16 = 0xFE00;
/// Offset of the 64-bit entry point into the protected-mode kernel.
const ENTRY_64_OFFSET: u64 = 0x200;
/// Where the setup header begins in a bzImage.
const SETUP_HEADER_OFFSET: usize = 0x1F1;
/// "HdrS".
const HDRS_MAGIC: u32 = 0x5372_6448;
const BOOT_FLAG_MAGIC: u16 = 0xAA55;
/// Oldest boot protocol with the 64-bit entry (`xloadflags`).
const MIN_BOOT_PROTOCOL: u16 = 0x020C;
/// `initrd_addr_max` of kernels that predate the field (protocol < 2.03).
const DEFAULT_INITRD_ADDR_MAX: u64 = 0x37FF_FFFF;
/// Longest command line of kernels that predate `cmdline_size` (protocol < 2.06).
const DEFAULT_CMDLINE_SIZE: usize = 255;

/// 2 MiB page-directory entry flags: present, writable, page size.
const PDE_2M: u64 = 0x83;
/// Page-table entry flags: present, writable.
const PTE_TABLE: u64 = 0x03;
/// Number of page directories of the identity map (one per GiB).
const IDENTITY_MAP_GIBS: u64 = 4;

const GDT_CODE64: u64 = gdt_entry(0xA09B, 0, 0xFFFFF);

/// Load kernel (+initramfs, cmdline), write ACPI tables, e820, boot_params or PVH
/// start_info, GDT/page tables, and return the boot vCPU's state.
///
/// A bzImage boots through the 64-bit boot protocol (protocol >= 2.12 with
/// XLF_KERNEL_64) in long mode with an identity map of 0..4 GiB; an ELF kernel boots
/// through its PVH note in 32-bit protected mode. The initramfs goes page-aligned at
/// the highest address that fits below min(low RAM end, initrd_addr_max, 4 GiB), above
/// the kernel.
pub fn load(mem: &GuestMemoryMmap, spec: &BootSpec) -> Result<Loaded, BootError> {
    check_memory(mem, spec.topology)?;
    if let Some(offset) = spec.cmdline.bytes().position(|b| b == 0) {
        return Err(BootError::CmdlineNul { offset });
    }
    let path = spec.kernel;
    let open_err = |source| BootError::KernelOpen {
        path: path.to_path_buf(),
        source,
    };
    let mut file = File::open(path).map_err(open_err)?;
    let file_len = file.metadata().map_err(open_err)?.len();
    let mut head = Vec::with_capacity(multiboot::SEARCH_LEN);
    (&mut file)
        .take(multiboot::SEARCH_LEN as u64)
        .read_to_end(&mut head)
        .map_err(open_err)?;

    let linux = head.get(0x202..0x206) == Some(b"HdrS");
    let multiboot = multiboot::find_header(&head).filter(|_| !linux);
    let elf64 = head.starts_with(b"\x7FELF") && head.get(4) == Some(&2);
    match multiboot {
        // A 64-bit ELF with a PVH note enters there; one without enters through its
        // Multiboot header.
        Some(h) if elf64 => match load_pvh(mem, spec, &mut file, file_len, &head) {
            Err(BootError::ElfWithoutPvh { .. }) => {
                multiboot::load(mem, spec, &mut file, file_len, &head, h)
            }
            other => other,
        },
        Some(h) => multiboot::load(mem, spec, &mut file, file_len, &head, h),
        None if head.starts_with(b"\x7FELF") => load_pvh(mem, spec, &mut file, file_len, &head),
        None => load_bzimage(mem, spec, &mut file, file_len, &head),
    }
}

/// State of an application processor after a SIPI with `vector`: real mode,
/// CS.selector = vector << 8, CS.base = vector << 12, IP = 0, other segments 0-based with
/// limit 0xFFFF, CR0 = 0x60000010 (ET|CD|NW), RFLAGS = 2; otherwise the SDM's INIT state.
pub fn ap_sipi_state(vector: u8) -> CpuBootState {
    let real = |selector: u16, base: u64, type_: u8| Segment {
        base,
        limit: 0xFFFF,
        selector,
        type_,
        present: true,
        s: true,
        ..Segment::default()
    };
    CpuBootState {
        rip: 0,
        rax: 0,
        rsp: 0,
        rsi: 0,
        rbx: 0,
        rflags: RFLAGS_RESERVED,
        cr0: CR0_ET | CR0_CD | CR0_NW,
        cr3: 0,
        cr4: 0,
        efer: 0,
        cs: real(u16::from(vector) << 8, u64::from(vector) << 12, 0xB),
        data: real(0, 0, 0x3),
        tr: Segment {
            limit: 0xFFFF,
            type_: 0xB,
            present: true,
            ..Segment::default()
        },
        ldt: Segment {
            limit: 0xFFFF,
            type_: 0x2,
            present: true,
            ..Segment::default()
        },
        gdt: Table {
            base: 0,
            limit: 0xFFFF,
        },
        idt: Table {
            base: 0,
            limit: 0xFFFF,
        },
    }
}

/// Checks that guest memory backs all of the topology's RAM.
fn check_memory(mem: &GuestMemoryMmap, topology: &Topology) -> Result<(), BootError> {
    if topology.memory < KERNEL_LOAD_ADDR {
        return Err(BootError::Topology(format!(
            "{} bytes of RAM is too little to boot",
            topology.memory
        )));
    }
    for r in ram_ranges(topology.memory) {
        let ok = usize::try_from(r.len)
            .map(|len| mem.check_range(GuestAddress(r.start), len))
            .unwrap_or(false);
        if !ok {
            return Err(BootError::GuestMemory(format!(
                "RAM range {:#x}..{:#x} of a {}-byte guest is not backed by the guest memory \
                 map",
                r.start,
                r.end(),
                topology.memory
            )));
        }
    }
    Ok(())
}

/// The identity map of 0..4 GiB with 2 MiB pages: PML4, PDPT and four PDs.
fn write_page_tables(mem: &GuestMemoryMmap) -> Result<(), BootError> {
    let mut pml4 = vec![0u8; PAGE_SIZE as usize];
    pml4[..8].copy_from_slice(&(PDPT_ADDR | PTE_TABLE).to_le_bytes());
    let mut pdpt = vec![0u8; PAGE_SIZE as usize];
    for (i, slot) in pdpt
        .chunks_exact_mut(8)
        .take(IDENTITY_MAP_GIBS as usize)
        .enumerate()
    {
        let pd = PD_ADDR + i as u64 * PAGE_SIZE;
        slot.copy_from_slice(&(pd | PTE_TABLE).to_le_bytes());
    }
    let pds: Vec<u8> = (0..IDENTITY_MAP_GIBS * 512)
        .flat_map(|i| ((i << 21) | PDE_2M).to_le_bytes())
        .collect();
    for (addr, bytes) in [(PML4_ADDR, &pml4), (PDPT_ADDR, &pdpt), (PD_ADDR, &pds)] {
        mem.write_slice(bytes, GuestAddress(addr))
            .map_err(|e| mem_err("the boot page tables", addr, e))?;
    }
    Ok(())
}

/// Puts the initramfs page-aligned as high as possible in `[floor, ceiling)`.
fn load_initramfs(
    mem: &GuestMemoryMmap,
    path: &Path,
    floor: u64,
    ceiling: u64,
) -> Result<RamRange, BootError> {
    let open_err = |source| BootError::InitramfsOpen {
        path: path.to_path_buf(),
        source,
    };
    let mut file = File::open(path).map_err(open_err)?;
    let size = file.metadata().map_err(open_err)?.len();
    let floor = floor.div_ceil(PAGE_SIZE) * PAGE_SIZE;
    let available = ceiling.saturating_sub(floor);
    let start = ceiling
        .checked_sub(size)
        .map(|s| s & !(PAGE_SIZE - 1))
        .filter(|&s| s >= floor);
    let (Some(start), Ok(len)) = (start, usize::try_from(size)) else {
        return Err(BootError::InitramfsTooLarge { size, available });
    };
    let mut progress = Progress::new(
        "the initramfs",
        size,
        PROGRESS_EVERY,
        std::time::Instant::now(),
    );
    let mut done = 0usize;
    while done < len {
        let n = (len - done).min(LOAD_CHUNK);
        mem.read_exact_volatile_from(GuestAddress(start + done as u64), &mut file, n)
            .map_err(|e| open_err(std::io::Error::other(e.to_string())))?;
        done += n;
        if let Some(line) = progress.advance(n as u64, std::time::Instant::now()) {
            tracing::info!("{line}");
        }
    }
    Ok(RamRange { start, len: size })
}

/// Large images are read this much at a time, so that a slow read can say how far it is.
const LOAD_CHUNK: usize = 16 << 20;
/// How often a long load says how far it is.
const PROGRESS_EVERY: std::time::Duration = std::time::Duration::from_secs(2);

/// Progress of a long operation over `total` bytes: a line at most every `every`.
pub struct Progress {
    what: &'static str,
    total: u64,
    done: u64,
    every: std::time::Duration,
    started: std::time::Instant,
    last: std::time::Instant,
}

impl Progress {
    /// Nothing done yet, at `now`.
    pub fn new(
        what: &'static str,
        total: u64,
        every: std::time::Duration,
        now: std::time::Instant,
    ) -> Progress {
        Progress {
            what,
            total,
            done: 0,
            every,
            started: now,
            last: now,
        }
    }

    /// `n` more bytes done at `now`: the line to show, if one is due.
    pub fn advance(&mut self, n: u64, now: std::time::Instant) -> Option<String> {
        self.done += n;
        if now.duration_since(self.last) < self.every {
            return None;
        }
        self.last = now;
        Some(format!(
            "loading {}: {} of {} MiB ({} s)",
            self.what,
            self.done >> 20,
            self.total >> 20,
            now.duration_since(self.started).as_secs()
        ))
    }
}

/// Reads and unpacks the bzImage payload at `offset` (`len` bytes) of `file`.
fn extracted_vmlinux(
    file: &mut File,
    offset: u64,
    len: u64,
    spec: &BootSpec,
) -> Result<Vec<u8>, String> {
    if len == 0 {
        return Err("the setup header gives no payload (boot protocol < 2.08?)".into());
    }
    let mut packed = vec![0u8; len as usize];
    file.seek(SeekFrom::Start(offset))
        .and_then(|_| file.read_exact(&mut packed))
        .map_err(|e| format!("cannot read the compressed kernel: {e}"))?;
    let vmlinux = payload::decompress(&packed, low_ram_end(spec.topology))?;
    if !vmlinux.starts_with(b"\x7FELF") {
        return Err("the unpacked payload is not an ELF image".into());
    }
    Ok(vmlinux)
}

fn load_bzimage(
    mem: &GuestMemoryMmap,
    spec: &BootSpec,
    file: &mut File,
    file_len: u64,
    head: &[u8],
) -> Result<Loaded, BootError> {
    let path = spec.kernel;
    let hdr_len = std::mem::size_of::<setup_header>();
    let Some(raw) = head.get(SETUP_HEADER_OFFSET..SETUP_HEADER_OFFSET + hdr_len) else {
        return Err(not_a_kernel(
            path,
            format!("file is {file_len} bytes, too short for a Linux setup header"),
        ));
    };
    let mut hdr = setup_header::default();
    hdr.as_mut_slice().copy_from_slice(raw);
    // Copy packed fields out before use.
    let (magic, boot_flag, version) = (hdr.header, hdr.boot_flag, hdr.version);
    if magic != HDRS_MAGIC || boot_flag != BOOT_FLAG_MAGIC {
        return Err(not_a_kernel(
            path,
            "no \"HdrS\" setup header signature at offset 0x202",
        ));
    }
    if version < MIN_BOOT_PROTOCOL {
        return Err(BootError::UnsupportedBootProtocol { version });
    }
    let (xloadflags, loadflags) = (hdr.xloadflags, hdr.loadflags);
    if xloadflags & XLF_KERNEL_64 == 0 {
        return Err(BootError::NoKernel64Entry {
            path: path.to_path_buf(),
        });
    }
    if loadflags & LOADED_HIGH == 0 {
        return Err(not_a_kernel(
            path,
            "zImage kernels (loaded below 1 MiB) are not supported",
        ));
    }
    let setup_sects = match hdr.setup_sects {
        0 => 4,
        n => u64::from(n),
    };
    let setup_size = (setup_sects + 1) * 512;
    if file_len <= setup_size {
        return Err(not_a_kernel(
            path,
            format!(
                "file is {file_len} bytes but its setup code alone takes {setup_size}; it is \
                 truncated"
            ),
        ));
    }
    let pm_size = file_len - setup_size;
    if spec.extract_payload {
        let (offset, len) = (hdr.payload_offset, hdr.payload_length);
        match extracted_vmlinux(file, setup_size + u64::from(offset), u64::from(len), spec) {
            Ok(vmlinux) => {
                let vmlinux_len = vmlinux.len() as u64;
                let head = vmlinux[..vmlinux.len().min(1024)].to_vec();
                // linux-loader reads ELF segments from a file; hand it an unnamed one.
                let mut unpacked = tempfile::tempfile()
                    .and_then(|mut f| f.write_all(&vmlinux).map(|_| f))
                    .map_err(|e| {
                        BootError::GuestMemory(format!("cannot stage the unpacked kernel: {e}"))
                    })?;
                drop(vmlinux);
                match load_pvh(mem, spec, &mut unpacked, vmlinux_len, &head) {
                    Err(BootError::ElfWithoutPvh { .. }) => {
                        tracing::info!(
                            "the unpacked kernel has no PVH entry; using its decompressor"
                        )
                    }
                    other => return other,
                }
            }
            Err(why) => tracing::info!("not unpacking the kernel in dvmm: {why}"),
        }
    }
    let need = pm_size.max(u64::from(hdr.init_size));
    let low_end = low_ram_end(spec.topology);
    let available = low_end - KERNEL_LOAD_ADDR;
    if need > available {
        return Err(BootError::KernelTooLarge {
            path: path.to_path_buf(),
            addr: KERNEL_LOAD_ADDR,
            size: need,
            available,
        });
    }
    let cmdline_max = if version >= 0x0206 {
        usize::try_from(hdr.cmdline_size).unwrap_or(usize::MAX)
    } else {
        DEFAULT_CMDLINE_SIZE
    }
    .min(CMDLINE_MAX - 1);
    check_cmdline(spec.cmdline, cmdline_max)?;

    let result = BzImage::load(mem, Some(GuestAddress(KERNEL_LOAD_ADDR)), file, None)
        .map_err(|e| not_a_kernel(path, e.to_string()))?;
    let kernel_end = result.kernel_end;

    let initramfs = match spec.initramfs {
        Some(p) => {
            let max = if version >= 0x0203 {
                u64::from(hdr.initrd_addr_max)
            } else {
                DEFAULT_INITRD_ADDR_MAX
            };
            let ceiling = low_end.min(max + 1).min(HIGH_RAM_START);
            let floor = kernel_end.max(KERNEL_LOAD_ADDR + u64::from(hdr.init_size));
            Some(load_initramfs(mem, p, floor, ceiling)?)
        }
        None => None,
    };
    write_cmdline(mem, spec.cmdline)?;
    let rsdp = acpi::write_tables(mem, spec.topology)?;
    let map = e820::map(spec.topology);

    let mut params = boot_params {
        hdr: result.setup_header.unwrap_or(hdr),
        ..Default::default()
    };
    params.hdr.type_of_loader = LOADER_TYPE_UNDEFINED;
    params.hdr.loadflags = loadflags | LOADED_HIGH | CAN_USE_HEAP;
    params.hdr.heap_end_ptr = HEAP_END_PTR;
    params.hdr.cmd_line_ptr = CMDLINE_ADDR as u32;
    params.hdr.code32_start = KERNEL_LOAD_ADDR as u32;
    if let Some(r) = initramfs {
        // The initramfs lies below 4 GiB (ceiling above), so these fit.
        params.hdr.ramdisk_image = r.start as u32;
        params.hdr.ramdisk_size = r.len as u32;
        params.ext_ramdisk_image = (r.start >> 32) as u32;
        params.ext_ramdisk_size = (r.len >> 32) as u32;
    }
    params.acpi_rsdp_addr = rsdp;
    let mut table = params.e820_table;
    let mut n = 0u8;
    for (slot, e) in table.iter_mut().zip(&map) {
        *slot = boot_e820_entry {
            addr: e.addr,
            size: e.size,
            r#type: e.kind,
        };
        n += 1;
    }
    params.e820_table = table;
    params.e820_entries = n;
    LinuxBootConfigurator::write_bootparams(
        &BootParams::new(&params, GuestAddress(ZERO_PAGE_ADDR)),
        mem,
    )
    .map_err(|e| mem_err("boot_params", ZERO_PAGE_ADDR, e))?;

    let gdt = write_gdt(mem, GDT_CODE64)?;
    write_page_tables(mem)?;
    let cpu = CpuBootState {
        rax: 0,
        rip: KERNEL_LOAD_ADDR + ENTRY_64_OFFSET,
        rsp: BOOT_STACK_TOP,
        rsi: ZERO_PAGE_ADDR,
        rbx: 0,
        rflags: RFLAGS_RESERVED,
        cr0: CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_PG,
        cr3: PML4_ADDR,
        cr4: CR4_PAE,
        efer: EFER_LME | EFER_LMA,
        cs: segment_from_gdt_entry(GDT_CODE64, BOOT_CS),
        data: segment_from_gdt_entry(GDT_DATA, BOOT_DS),
        tr: segment_from_gdt_entry(GDT_TSS, BOOT_TSS),
        ldt: Segment::default(),
        gdt,
        idt: Table::default(),
    };
    Ok(Loaded {
        entry: EntryKind::LinuxBzImage64,
        cpu,
        kernel_end,
        initramfs,
        rsdp,
    })
}

const PT_LOAD: u32 = 1;
const ELF64_EHDR_LEN: usize = 64;
const ELF64_PHDR_LEN: usize = 56;

/// A PT_LOAD program header, the fields we check.
struct LoadSegment {
    offset: u64,
    paddr: u64,
    filesz: u64,
    memsz: u64,
}

fn le_u16(b: &[u8], o: usize) -> u16 {
    b.get(o..o + 2)
        .and_then(|s| s.try_into().ok())
        .map_or(0, u16::from_le_bytes)
}
fn le_u32(b: &[u8], o: usize) -> u32 {
    b.get(o..o + 4)
        .and_then(|s| s.try_into().ok())
        .map_or(0, u32::from_le_bytes)
}
fn le_u64(b: &[u8], o: usize) -> u64 {
    b.get(o..o + 8)
        .and_then(|s| s.try_into().ok())
        .map_or(0, u64::from_le_bytes)
}

/// Reads and checks the ELF header and PT_LOAD segments before anything is written, so
/// that a bad image cannot overwrite boot data or run past RAM.
fn check_elf<R: Read + Seek>(
    path: &Path,
    file: &mut R,
    file_len: u64,
    head: &[u8],
    low_end: u64,
) -> Result<(), BootError> {
    let bad = |r: String| not_a_kernel(path, r);
    if head.len() < ELF64_EHDR_LEN {
        return Err(bad(format!("ELF file of {file_len} bytes is truncated")));
    }
    if head[4] != 2 || head[5] != 1 {
        return Err(bad("not a 64-bit little-endian ELF file".into()));
    }
    let machine = le_u16(head, 18);
    if machine != 0x3E {
        return Err(bad(format!("ELF machine {machine:#x} is not x86-64")));
    }
    let phoff = le_u64(head, 32);
    let phentsize = le_u16(head, 54) as usize;
    let phnum = le_u16(head, 56) as usize;
    if phentsize != ELF64_PHDR_LEN {
        return Err(bad(format!("program header size {phentsize}, expected 56")));
    }
    let mut phdrs = vec![0u8; phnum * ELF64_PHDR_LEN];
    file.seek(SeekFrom::Start(phoff))
        .and_then(|_| file.read_exact(&mut phdrs))
        .map_err(|e| bad(format!("cannot read the program headers: {e}")))?;
    let segments = phdrs
        .chunks_exact(ELF64_PHDR_LEN)
        .filter(|p| le_u32(p, 0) == PT_LOAD && le_u64(p, 32) != 0)
        .map(|p| LoadSegment {
            offset: le_u64(p, 8),
            paddr: le_u64(p, 24),
            filesz: le_u64(p, 32),
            memsz: le_u64(p, 40),
        });
    for s in segments {
        if s.offset.checked_add(s.filesz).is_none_or(|e| e > file_len) {
            return Err(bad(format!(
                "segment at file offset {:#x} runs past the end of the file; it is truncated",
                s.offset
            )));
        }
        if s.filesz > s.memsz {
            return Err(bad(format!(
                "segment at {:#x} has more file bytes than memory bytes",
                s.paddr
            )));
        }
        check_placement(path, s.paddr, s.memsz, low_end)?;
    }
    Ok(())
}

/// Zeroes the BSS part of each PT_LOAD segment (linux-loader copies only file bytes).
fn zero_bss<R: Read + Seek>(mem: &GuestMemoryMmap, file: &mut R) -> Result<(), BootError> {
    let mut ehdr = [0u8; ELF64_EHDR_LEN];
    let io = |e: std::io::Error| BootError::GuestMemory(format!("cannot zero kernel BSS: {e}"));
    file.seek(SeekFrom::Start(0)).map_err(io)?;
    file.read_exact(&mut ehdr).map_err(io)?;
    let mut phdrs = vec![0u8; le_u16(&ehdr, 56) as usize * ELF64_PHDR_LEN];
    file.seek(SeekFrom::Start(le_u64(&ehdr, 32))).map_err(io)?;
    file.read_exact(&mut phdrs).map_err(io)?;
    let zeros = vec![0u8; 1 << 16];
    for p in phdrs.chunks_exact(ELF64_PHDR_LEN) {
        if le_u32(p, 0) != PT_LOAD || le_u64(p, 32) == 0 {
            continue;
        }
        let (paddr, filesz, memsz) = (le_u64(p, 24), le_u64(p, 32), le_u64(p, 40));
        let mut at = paddr.saturating_add(filesz);
        let end = paddr.saturating_add(memsz);
        while at < end {
            let n = (end - at).min(zeros.len() as u64) as usize;
            mem.write_slice(&zeros[..n], GuestAddress(at))
                .map_err(|e| mem_err("kernel BSS", at, e))?;
            at += n as u64;
        }
    }
    Ok(())
}

fn load_pvh<R: Read + Seek + ReadVolatile>(
    mem: &GuestMemoryMmap,
    spec: &BootSpec,
    file: &mut R,
    file_len: u64,
    head: &[u8],
) -> Result<Loaded, BootError> {
    let path = spec.kernel;
    let low_end = low_ram_end(spec.topology);
    check_cmdline(spec.cmdline, CMDLINE_MAX - 1)?;
    check_elf(path, file, file_len, head, low_end)?;

    let result = Elf::load(mem, None, file, None).map_err(|e| not_a_kernel(path, e.to_string()))?;
    let PvhBootCapability::PvhEntryPresent(entry) = result.pvh_boot_cap else {
        return Err(BootError::ElfWithoutPvh {
            path: PathBuf::from(path),
        });
    };
    zero_bss(mem, file)?;
    let kernel_end = result.kernel_end;

    let initramfs = match spec.initramfs {
        Some(p) => Some(load_initramfs(
            mem,
            p,
            kernel_end,
            low_end.min(HIGH_RAM_START),
        )?),
        None => None,
    };
    write_cmdline(mem, spec.cmdline)?;
    let rsdp = acpi::write_tables(mem, spec.topology)?;
    write_start_info(mem, &e820::map(spec.topology), initramfs, rsdp)?;

    let gdt = write_gdt(mem, GDT_CODE32)?;
    let cpu = CpuBootState {
        rip: entry.0,
        rax: 0,
        rsp: 0,
        rsi: 0,
        rbx: PVH_INFO_ADDR,
        rflags: RFLAGS_RESERVED,
        cr0: CR0_PE | CR0_ET,
        cr3: 0,
        cr4: 0,
        efer: 0,
        cs: segment_from_gdt_entry(GDT_CODE32, BOOT_CS),
        data: segment_from_gdt_entry(GDT_DATA, BOOT_DS),
        tr: segment_from_gdt_entry(GDT_TSS, BOOT_TSS),
        ldt: Segment::default(),
        gdt,
        idt: Table::default(),
    };
    Ok(Loaded {
        entry: EntryKind::Pvh,
        cpu,
        kernel_end,
        initramfs,
        rsdp,
    })
}

/// Writes `hvm_start_info` at `PVH_INFO_ADDR`, the memory map right after it, then the
/// module list.
fn write_start_info(
    mem: &GuestMemoryMmap,
    map: &[E820Entry],
    initramfs: Option<RamRange>,
    rsdp: u64,
) -> Result<(), BootError> {
    let info_len = std::mem::size_of::<hvm_start_info>() as u64;
    let entry_len = std::mem::size_of::<hvm_memmap_table_entry>() as u64;
    let memmap_paddr = PVH_INFO_ADDR + info_len;
    let modlist_paddr = memmap_paddr + entry_len * map.len() as u64;
    let end = modlist_paddr + std::mem::size_of::<hvm_modlist_entry>() as u64;
    if end > ZERO_PAGE_ADDR {
        return Err(BootError::GuestMemory(format!(
            "PVH start info with {} memory map entries does not fit below {ZERO_PAGE_ADDR:#x}",
            map.len()
        )));
    }
    let info = hvm_start_info {
        magic: PVH_START_INFO_MAGIC,
        version: 1,
        flags: 0,
        nr_modules: u32::from(initramfs.is_some()),
        modlist_paddr: if initramfs.is_some() {
            modlist_paddr
        } else {
            0
        },
        cmdline_paddr: CMDLINE_ADDR,
        rsdp_paddr: rsdp,
        memmap_paddr,
        memmap_entries: map.len() as u32,
        reserved: 0,
    };
    let entries: Vec<hvm_memmap_table_entry> = map
        .iter()
        .map(|e| hvm_memmap_table_entry {
            addr: e.addr,
            size: e.size,
            type_: e.kind,
            reserved: 0,
        })
        .collect();
    let mut params = BootParams::new(&info, GuestAddress(PVH_INFO_ADDR));
    params.set_sections(&entries, GuestAddress(memmap_paddr));
    if let Some(r) = initramfs {
        let module = hvm_modlist_entry {
            paddr: r.start,
            size: r.len,
            cmdline_paddr: 0,
            reserved: 0,
        };
        params.set_modules(&[module], GuestAddress(modlist_paddr));
    }
    PvhBootConfigurator::write_bootparams(&params, mem)
        .map_err(|e| mem_err("the PVH start info", PVH_INFO_ADDR, e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::e820::{E820_RAM, E820_RESERVED};
    use dvmm_layout::{ACPI_TABLES_ADDR, BOOT_GDT_ADDR, EBDA_START};
    use std::sync::atomic::{AtomicUsize, Ordering};

    const MIB: u64 = 1 << 20;

    /// A scratch file removed on drop.
    struct TempFile(PathBuf);
    impl TempFile {
        fn new(bytes: &[u8]) -> TempFile {
            static N: AtomicUsize = AtomicUsize::new(0);
            let p = std::env::temp_dir().join(format!(
                "dvmm-boot-test-{}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ));
            std::fs::write(&p, bytes).unwrap();
            TempFile(p)
        }
        fn sized(len: u64) -> TempFile {
            let f = TempFile::new(&[]);
            File::options()
                .write(true)
                .open(&f.0)
                .unwrap()
                .set_len(len)
                .unwrap();
            f
        }
    }
    impl Drop for TempFile {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    fn guest(memory: u64) -> (GuestMemoryMmap, Topology) {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), memory as usize)]).unwrap();
        (mem, Topology::uniform(2, memory, 1).unwrap())
    }

    fn run(
        mem: &GuestMemoryMmap,
        t: &Topology,
        kernel: &Path,
        initramfs: Option<&Path>,
        cmdline: &str,
    ) -> Result<Loaded, BootError> {
        load(
            mem,
            &BootSpec {
                extract_payload: false,
                kernel,
                initramfs,
                cmdline,
                topology: t,
            },
        )
    }

    fn read<const N: usize>(mem: &GuestMemoryMmap, addr: u64) -> [u8; N] {
        let mut b = [0u8; N];
        mem.read_slice(&mut b, GuestAddress(addr)).unwrap();
        b
    }
    fn read_u64(mem: &GuestMemoryMmap, addr: u64) -> u64 {
        u64::from_le_bytes(read(mem, addr))
    }

    /// A synthetic bzImage: one setup sector after the boot sector, then `payload`.
    fn bzimage(version: u16, xloadflags: u16, payload: &[u8]) -> Vec<u8> {
        let mut img = vec![0u8; 1024];
        img[0x1F1] = 1; // setup_sects
        img[0x1FE..0x200].copy_from_slice(&0xAA55u16.to_le_bytes());
        img[0x202..0x206].copy_from_slice(b"HdrS");
        img[0x206..0x208].copy_from_slice(&version.to_le_bytes());
        img[0x211] = LOADED_HIGH; // loadflags
        img[0x214..0x218].copy_from_slice(&0x10_0000u32.to_le_bytes()); // code32_start
        img[0x22C..0x230].copy_from_slice(&0x7FFF_FFFFu32.to_le_bytes()); // initrd_addr_max
        img[0x236..0x238].copy_from_slice(&xloadflags.to_le_bytes());
        img[0x238..0x23C].copy_from_slice(&2048u32.to_le_bytes()); // cmdline_size
        img[0x260..0x264].copy_from_slice(&(4 * MIB as u32).to_le_bytes()); // init_size
        img.extend_from_slice(payload);
        img
    }

    fn payload() -> Vec<u8> {
        (0..8192u32).map(|i| (i * 7 + 3) as u8).collect()
    }

    #[test]
    fn bzimage_boots_in_long_mode() {
        let (mem, t) = guest(64 * MIB);
        let kernel = TempFile::new(&bzimage(0x020F, XLF_KERNEL_64, &payload()));
        let initrd_bytes: Vec<u8> = (0..5000u32).map(|i| (i % 251) as u8).collect();
        let initrd = TempFile::new(&initrd_bytes);
        let l = run(&mem, &t, &kernel.0, Some(&initrd.0), "console=ttyS0 quiet").unwrap();

        assert_eq!(l.entry, EntryKind::LinuxBzImage64);
        assert_eq!(l.kernel_end, KERNEL_LOAD_ADDR + 8192);
        assert_eq!(read::<8192>(&mem, KERNEL_LOAD_ADDR).to_vec(), payload());

        // Initramfs: page-aligned, as high as possible in low RAM.
        let r = l.initramfs.unwrap();
        assert_eq!(r.start % PAGE_SIZE, 0);
        assert!(r.end() <= 64 * MIB && 64 * MIB - r.end() < PAGE_SIZE);
        assert_eq!(r.len, 5000);
        assert_eq!(read::<5000>(&mem, r.start).to_vec(), initrd_bytes);

        // Command line.
        assert_eq!(&read::<20>(&mem, CMDLINE_ADDR), b"console=ttyS0 quiet\0");

        // boot_params.
        let p: boot_params = mem.read_obj(GuestAddress(ZERO_PAGE_ADDR)).unwrap();
        let h = p.hdr;
        assert_eq!({ h.type_of_loader }, 0xFF);
        assert_eq!({ h.loadflags }, LOADED_HIGH | CAN_USE_HEAP);
        assert_eq!({ h.heap_end_ptr }, HEAP_END_PTR);
        assert_eq!(u64::from(h.cmd_line_ptr), CMDLINE_ADDR);
        assert_eq!(u64::from(h.ramdisk_image), r.start);
        assert_eq!({ h.ramdisk_size }, 5000);
        assert_eq!({ h.version }, 0x020F);
        assert_eq!({ p.acpi_rsdp_addr }, ACPI_TABLES_ADDR);
        assert_eq!(l.rsdp, ACPI_TABLES_ADDR);
        assert_eq!(&read::<8>(&mem, ACPI_TABLES_ADDR), b"RSD PTR ");
        let table = p.e820_table;
        let map: Vec<(u64, u64, u32)> = table[..p.e820_entries as usize]
            .iter()
            .map(|e| ({ e.addr }, { e.size }, { e.r#type }))
            .collect();
        assert_eq!(
            map,
            vec![
                (0, EBDA_START, E820_RAM),
                (EBDA_START, MIB - EBDA_START, E820_RESERVED),
                (MIB, 63 * MIB, E820_RAM),
                (
                    dvmm_layout::PCI_ECAM_ADDR,
                    dvmm_layout::PCI_ECAM_SIZE,
                    E820_RESERVED
                ),
            ]
        );

        // CPU state.
        let c = l.cpu;
        assert_eq!(c.rip, KERNEL_LOAD_ADDR + 0x200);
        assert_eq!(c.rsi, ZERO_PAGE_ADDR);
        assert_eq!(c.rsp, BOOT_STACK_TOP);
        assert_eq!(c.rflags, 2);
        assert_eq!(c.cr0, 0x8001_0033);
        assert_eq!(c.cr3, PML4_ADDR);
        assert_eq!(c.cr4, 0x20);
        assert_eq!(c.efer, 0x500);
        assert_eq!(
            (c.cs.selector, c.cs.l, c.cs.db, c.cs.type_),
            (0x10, true, false, 0xB)
        );
        assert_eq!((c.data.selector, c.data.type_, c.data.db), (0x18, 3, true));
        assert_eq!(
            c.gdt,
            Table {
                base: BOOT_GDT_ADDR,
                limit: 47
            }
        );
        assert_eq!(c.tr.type_, 0xB);

        // GDT in memory matches the segments.
        assert_eq!(read_u64(&mem, BOOT_GDT_ADDR + 0x10), GDT_CODE64);
        assert_eq!(read_u64(&mem, BOOT_GDT_ADDR + 0x18), GDT_DATA);
        assert_eq!(
            segment_from_gdt_entry(read_u64(&mem, BOOT_GDT_ADDR + 0x10), 0x10),
            c.cs
        );

        // Identity map.
        assert_eq!(read_u64(&mem, PML4_ADDR), PDPT_ADDR | 3);
        assert_eq!(read_u64(&mem, PDPT_ADDR + 3 * 8), (PD_ADDR + 3 * 4096) | 3);
        assert_eq!(read_u64(&mem, PD_ADDR), 0x83);
        let last = PD_ADDR + (4 * 512 - 1) * 8;
        assert_eq!(read_u64(&mem, last), ((4 << 30) - (2 << 20)) | 0x83);
    }

    #[test]
    fn non_kernels_are_rejected() {
        let (mem, t) = guest(16 * MIB);
        let random: Vec<u8> = (0..4096u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        let full = bzimage(0x020F, XLF_KERNEL_64, &payload());
        for bytes in [
            random,
            vec![],
            full[..0x210].to_vec(),
            full[..1024].to_vec(),
        ] {
            let f = TempFile::new(&bytes);
            let e = run(&mem, &t, &f.0, None, "").unwrap_err();
            assert!(matches!(e, BootError::NotAKernel { .. }), "{e}");
        }
        let missing = run(&mem, &t, Path::new("/nonexistent/bzImage"), None, "").unwrap_err();
        assert!(matches!(missing, BootError::KernelOpen { .. }));
    }

    #[test]
    fn old_or_32bit_bzimages_are_rejected() {
        let (mem, t) = guest(16 * MIB);
        let old = TempFile::new(&bzimage(0x020B, XLF_KERNEL_64, &payload()));
        assert!(matches!(
            run(&mem, &t, &old.0, None, ""),
            Err(BootError::UnsupportedBootProtocol { version: 0x020B })
        ));
        let k32 = TempFile::new(&bzimage(0x020F, 0, &payload()));
        assert!(matches!(
            run(&mem, &t, &k32.0, None, ""),
            Err(BootError::NoKernel64Entry { .. })
        ));
    }

    #[test]
    fn kernel_larger_than_ram_is_rejected() {
        let (mem, t) = guest(16 * MIB);
        let mut img = bzimage(0x020F, XLF_KERNEL_64, &payload());
        img[0x260..0x264].copy_from_slice(&(32 * MIB as u32).to_le_bytes());
        let f = TempFile::new(&img);
        assert!(matches!(
            run(&mem, &t, &f.0, None, ""),
            Err(BootError::KernelTooLarge { size, .. }) if size == 32 * MIB
        ));
    }

    #[test]
    fn initramfs_too_large() {
        let (mem, t) = guest(16 * MIB);
        let kernel = TempFile::new(&bzimage(0x020F, XLF_KERNEL_64, &payload()));
        let initrd = TempFile::sized(12 * MIB);
        match run(&mem, &t, &kernel.0, Some(&initrd.0), "") {
            // RAM ends at 16 MiB; the kernel's init_size reaches 5 MiB.
            Err(BootError::InitramfsTooLarge { size, available }) => {
                assert_eq!(size, 12 * MIB);
                assert_eq!(available, 11 * MIB);
            }
            other => panic!("{other:?}"),
        }
        let fits = TempFile::sized(11 * MIB);
        let l = run(&mem, &t, &kernel.0, Some(&fits.0), "").unwrap();
        assert_eq!(
            l.initramfs,
            Some(RamRange {
                start: 5 * MIB,
                len: 11 * MIB
            })
        );
        let missing = run(
            &mem,
            &t,
            &kernel.0,
            Some(Path::new("/nonexistent/initrd")),
            "",
        );
        assert!(matches!(missing, Err(BootError::InitramfsOpen { .. })));
    }

    #[test]
    fn cmdline_limits() {
        let (mem, t) = guest(16 * MIB);
        let kernel = TempFile::new(&bzimage(0x020F, XLF_KERNEL_64, &payload()));
        let long = "x".repeat(2049);
        assert!(matches!(
            run(&mem, &t, &kernel.0, None, &long),
            Err(BootError::CmdlineTooLong {
                len: 2049,
                max: 2048
            })
        ));
        assert!(run(&mem, &t, &kernel.0, None, &long[..2048]).is_ok());
        assert!(matches!(
            run(&mem, &t, &kernel.0, None, "a\0b"),
            Err(BootError::CmdlineNul { offset: 1 })
        ));
        let elf = TempFile::new(&elf_image(Some(0x20_0010), 0x20_0000));
        let too_long = "y".repeat(CMDLINE_MAX);
        assert!(matches!(
            run(&mem, &t, &elf.0, None, &too_long),
            Err(BootError::CmdlineTooLong { max, .. }) if max == CMDLINE_MAX - 1
        ));
    }

    #[test]
    fn memory_must_back_the_topology() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 16 * MIB as usize)]).unwrap();
        let t = Topology::uniform(1, 32 * MIB, 1).unwrap();
        let kernel = TempFile::new(&bzimage(0x020F, XLF_KERNEL_64, &payload()));
        assert!(matches!(
            run(&mem, &t, &kernel.0, None, ""),
            Err(BootError::GuestMemory(_))
        ));
    }

    const SEG_FILE_OFFSET: usize = 0x1000;
    const SEG_FILESZ: usize = 0x100;
    const SEG_MEMSZ: u64 = 0x3000;

    /// A minimal ELF64: a PT_LOAD at `paddr` and a PT_NOTE holding the Xen PVH entry note
    /// (`pvh_entry`), or an unrelated note when `None`.
    fn elf_image(pvh_entry: Option<u32>, paddr: u64) -> Vec<u8> {
        let mut f = vec![0u8; SEG_FILE_OFFSET + SEG_FILESZ];
        f[0..4].copy_from_slice(b"\x7FELF");
        f[4] = 2; // ELFCLASS64
        f[5] = 1; // little endian
        f[6] = 1; // version
        f[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
        f[18..20].copy_from_slice(&0x3Eu16.to_le_bytes()); // x86-64
        f[20..24].copy_from_slice(&1u32.to_le_bytes());
        f[24..32].copy_from_slice(&paddr.to_le_bytes()); // e_entry
        f[32..40].copy_from_slice(&64u64.to_le_bytes()); // e_phoff
        f[52..54].copy_from_slice(&64u16.to_le_bytes()); // e_ehsize
        f[54..56].copy_from_slice(&56u16.to_le_bytes()); // e_phentsize
        f[56..58].copy_from_slice(&2u16.to_le_bytes()); // e_phnum
        let phdr = |ty: u32, off: u64, addr: u64, filesz: u64, memsz: u64| {
            let mut p = vec![0u8; 56];
            p[0..4].copy_from_slice(&ty.to_le_bytes());
            p[4..8].copy_from_slice(&5u32.to_le_bytes()); // R+X
            p[8..16].copy_from_slice(&off.to_le_bytes());
            p[16..24].copy_from_slice(&addr.to_le_bytes());
            p[24..32].copy_from_slice(&addr.to_le_bytes());
            p[32..40].copy_from_slice(&filesz.to_le_bytes());
            p[40..48].copy_from_slice(&memsz.to_le_bytes());
            p[48..56].copy_from_slice(&4u64.to_le_bytes());
            p
        };
        let note_off = 64 + 2 * 56;
        let mut note = Vec::new();
        note.extend_from_slice(&4u32.to_le_bytes()); // namesz
        note.extend_from_slice(&4u32.to_le_bytes()); // descsz
        let (ty, desc) = match pvh_entry {
            Some(e) => (18u32, e), // XEN_ELFNOTE_PHYS32_ENTRY
            None => (6u32, 0),     // XEN_ELFNOTE_LOADER
        };
        note.extend_from_slice(&ty.to_le_bytes());
        note.extend_from_slice(b"Xen\0");
        note.extend_from_slice(&desc.to_le_bytes());
        let load = phdr(
            PT_LOAD,
            SEG_FILE_OFFSET as u64,
            paddr,
            SEG_FILESZ as u64,
            SEG_MEMSZ,
        );
        let pnote = phdr(4, note_off as u64, 0, note.len() as u64, note.len() as u64);
        f[64..120].copy_from_slice(&load);
        f[120..176].copy_from_slice(&pnote);
        f[note_off..note_off + note.len()].copy_from_slice(&note);
        for (i, b) in f[SEG_FILE_OFFSET..].iter_mut().enumerate() {
            *b = 0xC0 ^ i as u8;
        }
        f
    }

    #[test]
    fn pvh_elf_boots_in_protected_mode() {
        let (mem, t) = guest(32 * MIB);
        // Dirty the BSS area to check it gets zeroed.
        mem.write_slice(&[0xEE; 64], GuestAddress(0x20_0000 + SEG_FILESZ as u64))
            .unwrap();
        let kernel = TempFile::new(&elf_image(Some(0x20_0010), 0x20_0000));
        let initrd = TempFile::new(&[0x5A; 3000]);
        let l = run(&mem, &t, &kernel.0, Some(&initrd.0), "root=/dev/vda").unwrap();

        assert_eq!(l.entry, EntryKind::Pvh);
        assert_eq!(l.kernel_end, 0x20_0000 + SEG_MEMSZ);
        let seg = read::<SEG_FILESZ>(&mem, 0x20_0000);
        assert!(seg.iter().enumerate().all(|(i, &b)| b == 0xC0 ^ i as u8));
        assert_eq!(read::<64>(&mem, 0x20_0000 + SEG_FILESZ as u64), [0u8; 64]);

        let c = l.cpu;
        assert_eq!(c.rip, 0x20_0010);
        assert_eq!(c.rbx, PVH_INFO_ADDR);
        assert_eq!(c.cr0 & (CR0_PE | CR0_PG), CR0_PE);
        assert_eq!((c.cr4, c.efer), (0, 0));
        assert_eq!(c.rflags, 2);
        assert_eq!(
            (c.cs.selector, c.cs.db, c.cs.l, c.cs.limit, c.cs.base),
            (0x10, true, false, 0xFFFF_FFFF, 0)
        );
        assert_eq!(
            (c.data.selector, c.data.db, c.data.limit),
            (0x18, true, 0xFFFF_FFFF)
        );
        assert_eq!(
            (c.tr.type_, c.tr.base, c.tr.limit, c.tr.s),
            (0xB, 0, 0x67, false)
        );
        assert_eq!(read_u64(&mem, BOOT_GDT_ADDR + 0x10), GDT_CODE32);

        let info: hvm_start_info = mem.read_obj(GuestAddress(PVH_INFO_ADDR)).unwrap();
        assert_eq!(info.magic, 0x336E_C578);
        assert_eq!(info.version, 1);
        assert_eq!(info.cmdline_paddr, CMDLINE_ADDR);
        assert_eq!(info.rsdp_paddr, ACPI_TABLES_ADDR);
        assert_eq!(&read::<14>(&mem, CMDLINE_ADDR), b"root=/dev/vda\0");
        assert_eq!(info.memmap_paddr, PVH_INFO_ADDR + 56);
        let map = e820::map(&t);
        assert_eq!(info.memmap_entries as usize, map.len());
        for (i, e) in map.iter().enumerate() {
            let m: hvm_memmap_table_entry = mem
                .read_obj(GuestAddress(info.memmap_paddr + 24 * i as u64))
                .unwrap();
            assert_eq!((m.addr, m.size, m.type_), (e.addr, e.size, e.kind));
        }
        assert_eq!(info.nr_modules, 1);
        let module: hvm_modlist_entry = mem.read_obj(GuestAddress(info.modlist_paddr)).unwrap();
        let r = l.initramfs.unwrap();
        assert_eq!((module.paddr, module.size), (r.start, 3000));
        assert_eq!(r.start, 32 * MIB - PAGE_SIZE);
        assert_eq!(read::<3000>(&mem, r.start), [0x5A; 3000]);
    }

    #[test]
    fn elf_without_pvh_note_is_rejected() {
        let (mem, t) = guest(16 * MIB);
        let f = TempFile::new(&elf_image(None, 0x20_0000));
        assert!(matches!(
            run(&mem, &t, &f.0, None, ""),
            Err(BootError::ElfWithoutPvh { .. })
        ));
    }

    #[test]
    fn elf_segments_must_fit_in_ram_above_1mib() {
        let (mem, t) = guest(16 * MIB);
        let low = TempFile::new(&elf_image(Some(0x8000), 0x8000));
        assert!(matches!(
            run(&mem, &t, &low.0, None, ""),
            Err(BootError::NotAKernel { .. })
        ));
        let high = TempFile::new(&elf_image(Some(0x100_0000), 16 * MIB - 0x1000));
        assert!(matches!(
            run(&mem, &t, &high.0, None, ""),
            Err(BootError::KernelTooLarge { .. })
        ));
        let mut truncated = elf_image(Some(0x20_0010), 0x20_0000);
        truncated.truncate(SEG_FILE_OFFSET + 10);
        let tr = TempFile::new(&truncated);
        assert!(matches!(
            run(&mem, &t, &tr.0, None, ""),
            Err(BootError::NotAKernel { .. })
        ));
    }

    #[test]
    fn ap_state_after_sipi() {
        let s = ap_sipi_state(0x9A);
        assert_eq!(s.cs.selector, 0x9A00);
        assert_eq!(s.cs.base, 0x9_A000);
        assert_eq!(s.cs.limit, 0xFFFF);
        assert_eq!(s.rip, 0);
        assert_eq!(s.rflags, 2);
        assert_eq!(s.cr0, 0x6000_0010);
        assert_eq!((s.data.base, s.data.limit, s.data.selector), (0, 0xFFFF, 0));
        assert!(!s.cs.db && !s.cs.l && s.cs.present);
        assert_eq!(s.efer, 0);
    }

    #[test]
    fn a_long_load_says_how_far_it_is_every_interval_only() {
        let t0 = std::time::Instant::now();
        let s = std::time::Duration::from_secs;
        let mut p = Progress::new("the initramfs", 64 << 20, s(2), t0);
        assert_eq!(p.advance(16 << 20, t0 + s(1)), None, "too soon");
        assert_eq!(
            p.advance(16 << 20, t0 + s(2)).as_deref(),
            Some("loading the initramfs: 32 of 64 MiB (2 s)")
        );
        assert_eq!(p.advance(16 << 20, t0 + s(3)), None);
        assert!(p
            .advance(16 << 20, t0 + s(5))
            .unwrap()
            .contains("64 of 64 MiB (5 s)"));
    }
}
