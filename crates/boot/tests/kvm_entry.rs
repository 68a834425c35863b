//! Runs the entry state `load` produces on real KVM (when /dev/kvm is usable): a tiny
//! kernel must execute its first instructions in the expected mode and see its boot
//! data. Skipped, with a message, on hosts without KVM.

use std::path::{Path, PathBuf};

use dvmm_boot::{load, BootSpec, CpuBootState, EntryKind, Segment, Topology};
use kvm_bindings::{kvm_segment, kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Kvm, VcpuExit};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

const MEM: u64 = 64 << 20;
const PORT: u16 = 0xE9;

fn kvm_seg(s: &Segment) -> kvm_segment {
    kvm_segment {
        base: s.base,
        limit: s.limit,
        selector: s.selector,
        type_: s.type_,
        present: u8::from(s.present),
        dpl: s.dpl,
        db: u8::from(s.db),
        s: u8::from(s.s),
        l: u8::from(s.l),
        g: u8::from(s.g),
        avl: u8::from(s.avl),
        unusable: u8::from(!s.present),
        padding: 0,
    }
}

/// Runs the boot vCPU until HLT; returns the 32-bit values written to `PORT`.
fn run(mem: &GuestMemoryMmap, cpu: &CpuBootState) -> Option<Vec<u32>> {
    let Ok(kvm) = Kvm::new() else {
        eprintln!("skipping: /dev/kvm is not usable here");
        return None;
    };
    let vm = kvm.create_vm().unwrap();
    let host = mem.get_host_address(GuestAddress(0)).unwrap();
    let region = kvm_userspace_memory_region {
        slot: 0,
        guest_phys_addr: 0,
        memory_size: MEM,
        userspace_addr: host as u64,
        flags: 0,
    };
    // SAFETY: the region is MEM bytes of mapped guest memory that outlives the VM.
    unsafe { vm.set_user_memory_region(region) }.unwrap();
    let mut vcpu = vm.create_vcpu(0).unwrap();
    let cpuid = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).unwrap();
    vcpu.set_cpuid2(&cpuid).unwrap();

    let mut sregs = vcpu.get_sregs().unwrap();
    sregs.cs = kvm_seg(&cpu.cs);
    let data = kvm_seg(&cpu.data);
    (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss) = (data, data, data, data, data);
    sregs.tr = kvm_seg(&cpu.tr);
    sregs.ldt = kvm_seg(&cpu.ldt);
    sregs.gdt.base = cpu.gdt.base;
    sregs.gdt.limit = cpu.gdt.limit;
    sregs.idt.base = cpu.idt.base;
    sregs.idt.limit = cpu.idt.limit;
    (sregs.cr0, sregs.cr3, sregs.cr4, sregs.efer) = (cpu.cr0, cpu.cr3, cpu.cr4, cpu.efer);
    vcpu.set_sregs(&sregs).unwrap();
    let mut regs = vcpu.get_regs().unwrap();
    regs.rip = cpu.rip;
    regs.rsp = cpu.rsp;
    regs.rax = cpu.rax;
    regs.rsi = cpu.rsi;
    regs.rbx = cpu.rbx;
    regs.rflags = cpu.rflags;
    vcpu.set_regs(&regs).unwrap();

    let mut out = vec![];
    for _ in 0..16 {
        match vcpu.run().unwrap() {
            VcpuExit::IoOut(PORT, d) if d.len() == 4 => {
                out.push(u32::from_le_bytes(d.try_into().unwrap()))
            }
            VcpuExit::Hlt => return Some(out),
            other => panic!("unexpected exit {other:?}"),
        }
    }
    panic!("guest did not halt");
}

struct TempFile(PathBuf);
impl TempFile {
    fn new(name: &str, bytes: &[u8]) -> TempFile {
        let p = std::env::temp_dir().join(format!("dvmm-kvm-{}-{name}", std::process::id()));
        std::fs::write(&p, bytes).unwrap();
        TempFile(p)
    }
}
impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn boot(kernel: &Path) -> (GuestMemoryMmap, dvmm_boot::Loaded) {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM as usize)]).unwrap();
    let t = Topology::uniform(1, MEM, 1).unwrap();
    let l = load(
        &mem,
        &BootSpec {
            extract_payload: false,
            kernel,
            initramfs: None,
            cmdline: "console=ttyS0",
            topology: &t,
        },
    )
    .unwrap();
    (mem, l)
}

#[test]
fn bzimage_entry_runs_in_long_mode() {
    let mut img = vec![0u8; 1024];
    img[0x1F1] = 1;
    img[0x1FE..0x200].copy_from_slice(&0xAA55u16.to_le_bytes());
    img[0x202..0x206].copy_from_slice(b"HdrS");
    img[0x206..0x208].copy_from_slice(&0x020Fu16.to_le_bytes());
    img[0x211] = 1;
    img[0x236..0x238].copy_from_slice(&1u16.to_le_bytes());
    img[0x238..0x23C].copy_from_slice(&2048u32.to_le_bytes());
    let mut pm = vec![0x90u8; 0x200]; // 32-bit entry: unused
    pm.extend_from_slice(&[
        0x8B, 0x86, 0x28, 0x02, 0x00, 0x00, // mov eax, [rsi + 0x228] (cmd_line_ptr)
        0x66, 0xBA, 0xE9, 0x00, // mov dx, 0xE9
        0xEF, // out dx, eax
        0x48, 0xB8, 0x88, 0x77, 0x66, 0x55, 0x44, 0x33, 0x22, 0x11, // mov rax, imm64
        0xEF, // out dx, eax (only 64-bit decoding gives 0x55667788)
        0x8B, 0x04, 0x25, 0x00, 0x00, 0xC0, 0x03, // mov eax, [60 MiB] via the identity map
        0xEF, // out dx, eax
        0xF4, // hlt
    ]);
    img.extend_from_slice(&pm);
    let k = TempFile::new("bzimage", &img);
    let (mem, l) = boot(&k.0);
    assert_eq!(l.entry, EntryKind::LinuxBzImage64);
    mem.write_slice(&0xC0DE_F00Du32.to_le_bytes(), GuestAddress(60 << 20))
        .unwrap();
    let Some(out) = run(&mem, &l.cpu) else { return };
    assert_eq!(out, vec![0x20000, 0x5566_7788, 0xC0DE_F00D]);
}

#[test]
fn pvh_entry_runs_in_protected_mode() {
    let code: &[u8] = &[
        0x8B, 0x03, // mov eax, [ebx] (start_info magic)
        0x66, 0xBA, 0xE9, 0x00, // mov dx, 0xE9
        0xEF, // out dx, eax
        0x8B, 0x43, 0x18, // mov eax, [ebx + 0x18] (cmdline_paddr low)
        0xEF, // out dx, eax
        0xF4, // hlt
    ];
    let mut f = vec![0u8; 0x1000];
    f[0..4].copy_from_slice(b"\x7FELF");
    f[4] = 2;
    f[5] = 1;
    f[6] = 1;
    f[16] = 2;
    f[18] = 0x3E;
    f[20] = 1;
    f[24..32].copy_from_slice(&0x20_0000u64.to_le_bytes());
    f[32..40].copy_from_slice(&64u64.to_le_bytes());
    f[52] = 64;
    f[54] = 56;
    f[56] = 2;
    let mut phdr = |at: usize, ty: u32, off: u64, addr: u64, len: u64| {
        f[at..at + 4].copy_from_slice(&ty.to_le_bytes());
        f[at + 8..at + 16].copy_from_slice(&off.to_le_bytes());
        f[at + 16..at + 24].copy_from_slice(&addr.to_le_bytes());
        f[at + 24..at + 32].copy_from_slice(&addr.to_le_bytes());
        f[at + 32..at + 40].copy_from_slice(&len.to_le_bytes());
        f[at + 40..at + 48].copy_from_slice(&len.to_le_bytes());
    };
    phdr(64, 1, 0x800, 0x20_0000, code.len() as u64);
    phdr(120, 4, 0x200, 0, 20);
    let mut note = vec![];
    for v in [4u32, 4, 18] {
        note.extend_from_slice(&v.to_le_bytes());
    }
    note.extend_from_slice(b"Xen\0");
    note.extend_from_slice(&0x20_0000u32.to_le_bytes());
    f[0x200..0x200 + note.len()].copy_from_slice(&note);
    f[0x800..0x800 + code.len()].copy_from_slice(code);
    let k = TempFile::new("pvh", &f);
    let (mem, l) = boot(&k.0);
    assert_eq!(l.entry, EntryKind::Pvh);
    let Some(out) = run(&mem, &l.cpu) else { return };
    assert_eq!(out, vec![0x336E_C578, 0x20000]);
}

/// Code that reports EAX (the Multiboot magic), the information structure's flags,
/// mem_upper and the first 4 bytes of the command line, then halts.
const MULTIBOOT_REPORT: &[u8] = &[
    0x66, 0xBA, 0xE9, 0x00, // mov dx, 0xE9
    0xEF, // out dx, eax (magic)
    0x8B, 0x03, // mov eax, [ebx] (flags)
    0xEF, // out dx, eax
    0x8B, 0x43, 0x08, // mov eax, [ebx + 8] (mem_upper)
    0xEF, // out dx, eax
    0x8B, 0x43, 0x10, // mov eax, [ebx + 16] (cmdline)
    0x8B, 0x00, // mov eax, [eax]
    0xEF, // out dx, eax
    0xF4, // hlt
];

fn multiboot_header(flags: u32, addresses: &[u32]) -> Vec<u8> {
    let magic = 0x1BAD_B002u32;
    let mut h = vec![magic, flags, 0u32.wrapping_sub(magic.wrapping_add(flags))];
    h.extend_from_slice(addresses);
    h.iter().flat_map(|w| w.to_le_bytes()).collect()
}

fn multiboot_expectation(kernel: &Path) -> Vec<u32> {
    let path = kernel.to_str().unwrap().as_bytes();
    vec![
        0x2BAD_B002,
        0x245, // memory, cmdline, mmap, loader name
        ((MEM - (1 << 20)) / 1024) as u32,
        u32::from_le_bytes(path[..4].try_into().unwrap()),
    ]
}

#[test]
fn multiboot_elf32_entry_runs_in_protected_mode_with_its_information() {
    let mut f = vec![0u8; 0x1000];
    f[0..4].copy_from_slice(b"\x7FELF");
    (f[4], f[5], f[6]) = (1, 1, 1);
    f[16] = 2;
    f[18] = 3;
    f[20] = 1;
    f[24..28].copy_from_slice(&0x20_0000u32.to_le_bytes());
    f[28..32].copy_from_slice(&52u32.to_le_bytes());
    f[40] = 52;
    f[42] = 32;
    f[44] = 1;
    let ph = 52;
    f[ph..ph + 4].copy_from_slice(&1u32.to_le_bytes());
    f[ph + 4..ph + 8].copy_from_slice(&0x800u32.to_le_bytes());
    f[ph + 8..ph + 12].copy_from_slice(&0x20_0000u32.to_le_bytes());
    f[ph + 12..ph + 16].copy_from_slice(&0x20_0000u32.to_le_bytes());
    let len = MULTIBOOT_REPORT.len() as u32;
    f[ph + 16..ph + 20].copy_from_slice(&len.to_le_bytes());
    f[ph + 20..ph + 24].copy_from_slice(&(len + 0x1000).to_le_bytes());
    let h = multiboot_header(2, &[]);
    f[0x100..0x100 + h.len()].copy_from_slice(&h);
    f[0x800..0x800 + MULTIBOOT_REPORT.len()].copy_from_slice(MULTIBOOT_REPORT);
    let k = TempFile::new("multiboot-elf", &f);
    let (mem, l) = boot(&k.0);
    assert_eq!(l.entry, EntryKind::Multiboot);
    assert_eq!(l.kernel_end, 0x20_1000 + u64::from(len));
    let mut bss = [0xAAu8; 16];
    mem.read_slice(&mut bss, GuestAddress(0x20_0000 + u64::from(len)))
        .unwrap();
    assert_eq!(bss, [0; 16], "memory past the file bytes is zeroed");
    let Some(out) = run(&mem, &l.cpu) else { return };
    assert_eq!(out, multiboot_expectation(&k.0));
}

#[test]
fn multiboot_aout_kludge_loads_at_the_header_addresses() {
    // A raw image: the header at offset 0 says "load the file at 0x300000, enter at
    // 0x300040".
    let mut f = multiboot_header(1 << 16, &[0x30_0000, 0x30_0000, 0, 0x30_2000, 0x30_0040]);
    f.resize(0x40, 0);
    f.extend_from_slice(MULTIBOOT_REPORT);
    let k = TempFile::new("multiboot-raw", &f);
    let (mem, l) = boot(&k.0);
    assert_eq!(l.entry, EntryKind::Multiboot);
    assert_eq!(l.cpu.rip, 0x30_0040);
    assert_eq!(l.kernel_end, 0x30_2000);
    let Some(out) = run(&mem, &l.cpu) else { return };
    assert_eq!(out, multiboot_expectation(&k.0));
}

#[test]
fn multiboot_kernels_asking_for_what_we_lack_are_refused() {
    let mut f = multiboot_header(1 << 2, &[]);
    f.resize(0x100, 0);
    let k = TempFile::new("multiboot-video", &f);
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM as usize)]).unwrap();
    let t = Topology::uniform(1, MEM, 1).unwrap();
    let spec = BootSpec {
        extract_payload: false,
        kernel: &k.0,
        initramfs: None,
        cmdline: "",
        topology: &t,
    };
    let e = load(&mem, &spec).unwrap_err().to_string();
    assert!(e.contains("video mode"), "{e}");
    let mut f = multiboot_header(0, &[]);
    f.resize(0x100, 0);
    let k = TempFile::new("multiboot-noaddr", &f);
    let spec = BootSpec {
        kernel: &k.0,
        ..spec
    };
    let e = load(&mem, &spec).unwrap_err().to_string();
    assert!(e.contains("without load addresses"), "{e}");
}
