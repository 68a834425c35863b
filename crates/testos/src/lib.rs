//! testos, dvmm's multi-processor test guest.
//!
//! The guest itself (freestanding C and assembly in `guests/testos`) is built by this
//! crate's build script with `gcc` into a PVH-bootable ELF; [`TESTOS_ELF`] is its path.
//! The guest prints one line per check on COM1 and ends with [`PASS_LINE`] (then
//! powers off through ACPI S5) or a line starting with [`FAIL_PREFIX`] (then writes the
//! pvpanic port and resets). [`verdict`] reads that from captured console output, and
//! [`pvh_entry`] finds the PVH entry point of an image, as a VMM's loader would.

#![forbid(unsafe_code)]

use thiserror::Error;

/// Absolute path of the built testos ELF image.
pub const TESTOS_ELF: &str = env!("TESTOS_ELF");

/// Prefix of every line testos prints.
pub const LINE_PREFIX: &str = "testos: ";
/// The line testos prints when every check passed on every CPU.
pub const PASS_LINE: &str = "testos: PASS";
/// The start of the line testos prints when a check fails: `testos: FAIL cpu <i>: <what>`.
pub const FAIL_PREFIX: &str = "testos: FAIL";
/// Command-line word that keeps testos in xAPIC (MMIO) mode even if x2APIC is available.
pub const CMDLINE_XAPIC: &str = "xapic";
/// Command-line word that makes one check fail on purpose (to test the failure path).
pub const CMDLINE_FAIL: &str = "testos.fail";
/// Command-line word that makes the `user` and DSM checks' CPL3 code return through a
/// `ud2` (#UD) instead of `syscall` (the `syscall` check still uses `syscall`).
pub const CMDLINE_UD2: &str = "testos.ud2";
/// Command-line word: after PASS, halt forever instead of powering off (for tests of
/// stopping a VM from outside).
pub const CMDLINE_IDLE: &str = "testos.idle";
/// The line printed when `testos.idle` starts idling.
pub const IDLE_LINE: &str = "testos: idle: halting until stopped from outside";
/// The checks each CPU runs, in order, as named in `testos: cpu <i>: <check> ok (...)`.
/// `timer-tsc-deadline` prints `skipped (...)` instead of `ok` without TSC-deadline.
pub const CHECKS: &[&str] = &[
    "ipi-fixed",
    "ipi-broadcast",
    "ipi-self",
    "nmi",
    "timer-periodic",
    "timer-oneshot",
    "timer-tsc-deadline",
    "tsc-sync",
    "ioapic-uart",
    "int3",
    "user",
    "syscall",
    "counter",
    "spinlock",
    "litmus-mp",
    "litmus-sb",
    "litmus-iriw",
    "pingpong",
    "kernel-shared",
    "kernel-stream",
    "pagetable",
    "dma",
];

/// The checks whose result depends on guest RAM being coherent between vCPUs (the
/// distributed shared memory, once vCPUs run on several nodes), in the order they run.
/// Each also appears in [`CHECKS`]. A check that needs more CPUs than the guest has
/// prints `ok (skipped: ...)`; a CPU left over when CPUs are grouped prints `ok (idle: ...)`.
pub const DSM_CHECKS: &[&str] = &[
    "counter",
    "spinlock",
    "litmus-mp",
    "litmus-sb",
    "litmus-iriw",
    "pingpong",
    "kernel-shared",
    "kernel-stream",
    "pagetable",
    "dma",
];

/// Command-line key: `testos.iters=N` sets the iteration count of every check in
/// [`DSM_CHECKS`] (for slow multi-node runs; `dma` takes at most 32);
/// `testos.iters.<check>=N` sets one.
pub const CMDLINE_ITERS: &str = "testos.iters";
/// Command-line key: `testos.watchdog=S`: the run fails when no CPU finishes a check or
/// makes progress inside one for S seconds (default 120).
pub const CMDLINE_WATCHDOG: &str = "testos.watchdog";
/// Command-line key: `testos.user-ms=MS` runs the `user` check's CPL3 sieve for at least
/// MS milliseconds (default 50); its `N rounds in M ms` measures a CPU's throughput.
pub const CMDLINE_USER_MS: &str = "testos.user-ms";

/// The outcome testos reported in its console output.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// `testos: PASS` was printed.
    Pass,
    /// A `testos: FAIL ...` line was printed; holds the text after `testos: FAIL `.
    Fail(String),
}

/// Reads the verdict from testos console output; `None` while there is none yet.
/// A FAIL line wins over a PASS line.
pub fn verdict(output: &str) -> Option<Verdict> {
    let mut pass = false;
    for line in output.lines() {
        let line = line.trim_end_matches('\r');
        if let Some(rest) = line.strip_prefix(FAIL_PREFIX) {
            return Some(Verdict::Fail(rest.trim_start().to_string()));
        }
        pass |= line == PASS_LINE;
    }
    pass.then_some(Verdict::Pass)
}

/// Why an image has no usable PVH entry point.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ImageError {
    /// The file is not a little-endian x86-64 ELF64 executable.
    #[error("not an x86-64 ELF64 image")]
    NotElf64,
    /// A header or note points outside the file.
    #[error("the ELF image is truncated or has out-of-range headers")]
    Truncated,
    /// No `Xen` note of type XEN_ELFNOTE_PHYS32_ENTRY (18) in any PT_NOTE segment.
    #[error("the ELF image has no PVH entry note (Xen, type 18); build it with the PVH note")]
    NoPvhNote,
}

const PT_NOTE: u32 = 4;
const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;

fn u16_at(b: &[u8], off: usize) -> Result<u16, ImageError> {
    let s = b.get(off..off + 2).ok_or(ImageError::Truncated)?;
    Ok(u16::from_le_bytes([s[0], s[1]]))
}

fn u32_at(b: &[u8], off: usize) -> Result<u32, ImageError> {
    let s = b.get(off..off + 4).ok_or(ImageError::Truncated)?;
    Ok(u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
}

fn u64_at(b: &[u8], off: usize) -> Result<u64, ImageError> {
    let lo = u64::from(u32_at(b, off)?);
    let hi = u64::from(u32_at(b, off + 4)?);
    Ok(lo | hi << 32)
}

fn usize_from(v: u64) -> Result<usize, ImageError> {
    usize::try_from(v).map_err(|_| ImageError::Truncated)
}

/// Returns the 32-bit physical PVH entry address from an ELF image's
/// `Xen`/XEN_ELFNOTE_PHYS32_ENTRY note.
pub fn pvh_entry(elf: &[u8]) -> Result<u32, ImageError> {
    // e_ident: magic, ELFCLASS64, ELFDATA2LSB; e_machine: EM_X86_64.
    if elf.get(0..6) != Some(&[0x7f, b'E', b'L', b'F', 2, 1][..]) || u16_at(elf, 18)? != 62 {
        return Err(ImageError::NotElf64);
    }
    let phoff = usize_from(u64_at(elf, 32)?)?;
    let phentsize = usize::from(u16_at(elf, 54)?);
    let phnum = usize::from(u16_at(elf, 56)?);
    for i in 0..phnum {
        let ph = phoff
            .checked_add(i.checked_mul(phentsize).ok_or(ImageError::Truncated)?)
            .ok_or(ImageError::Truncated)?;
        if u32_at(elf, ph)? != PT_NOTE {
            continue;
        }
        let start = usize_from(u64_at(elf, ph + 8)?)?;
        let size = usize_from(u64_at(elf, ph + 32)?)?;
        let end = start.checked_add(size).ok_or(ImageError::Truncated)?;
        let notes = elf.get(start..end).ok_or(ImageError::Truncated)?;
        let mut off = 0;
        while off + 12 <= notes.len() {
            let namesz = usize_from(u64::from(u32_at(notes, off)?))?;
            let descsz = usize_from(u64::from(u32_at(notes, off + 4)?))?;
            let kind = u32_at(notes, off + 8)?;
            let name_off = off + 12;
            let desc_off = name_off
                .checked_add(namesz.next_multiple_of(4))
                .ok_or(ImageError::Truncated)?;
            let next = desc_off
                .checked_add(descsz.next_multiple_of(4))
                .ok_or(ImageError::Truncated)?;
            let name = notes
                .get(name_off..name_off + namesz)
                .ok_or(ImageError::Truncated)?;
            if name == b"Xen\0" && kind == XEN_ELFNOTE_PHYS32_ENTRY && descsz >= 4 {
                return u32_at(notes, desc_off);
            }
            off = next;
        }
    }
    Err(ImageError::NoPvhNote)
}

#[cfg(test)]
mod tests {
    use super::*;
    use dvmm_layout::KERNEL_LOAD_ADDR;

    fn image() -> Vec<u8> {
        std::fs::read(TESTOS_ELF).unwrap()
    }

    #[test]
    fn image_is_an_elf64_linked_at_1_mib() {
        let elf = image();
        assert_eq!(&elf[0..6], &[0x7f, b'E', b'L', b'F', 2, 1]);
        assert_eq!(u16_at(&elf, 16).unwrap(), 2, "ET_EXEC");
        let phoff = u64_at(&elf, 32).unwrap() as usize;
        let phnum = u16_at(&elf, 56).unwrap() as usize;
        let lowest_load = (0..phnum)
            .map(|i| phoff + i * 56)
            .filter(|&ph| u32_at(&elf, ph).unwrap() == 1)
            .map(|ph| u64_at(&elf, ph + 24).unwrap())
            .min()
            .unwrap();
        assert_eq!(lowest_load, KERNEL_LOAD_ADDR);
    }

    #[test]
    fn image_has_a_pvh_note_pointing_at_its_entry() {
        let elf = image();
        let entry = pvh_entry(&elf).unwrap();
        assert_eq!(u64::from(entry), u64_at(&elf, 24).unwrap());
        assert!(u64::from(entry) >= KERNEL_LOAD_ADDR && entry < 0x20_0000);
    }

    #[test]
    fn pvh_entry_rejects_bad_images() {
        assert_eq!(pvh_entry(b"hello"), Err(ImageError::NotElf64));
        let elf = image();
        assert_eq!(pvh_entry(&elf[..40]), Err(ImageError::Truncated));
        let mut no_note = elf.clone();
        let phoff = u64_at(&elf, 32).unwrap() as usize;
        for i in 0..u16_at(&elf, 56).unwrap() as usize {
            let ph = phoff + i * 56;
            if u32_at(&elf, ph).unwrap() == PT_NOTE {
                no_note[ph] = 0; // PT_NULL
            }
        }
        assert_eq!(pvh_entry(&no_note), Err(ImageError::NoPvhNote));
    }

    #[test]
    fn verdict_reads_pass_and_fail() {
        assert_eq!(verdict("testos: start\n"), None);
        assert_eq!(
            verdict("testos: cpu 0: user ok (x)\r\ntestos: PASS\r\n"),
            Some(Verdict::Pass)
        );
        assert_eq!(
            verdict("testos: PASS\ntestos: FAIL cpu 1: nmi: received 0 NMIs, expected 1\n"),
            Some(Verdict::Fail(
                "cpu 1: nmi: received 0 NMIs, expected 1".into()
            ))
        );
        assert_eq!(verdict("testos: PASSED?\n"), None);
    }

    #[test]
    fn sources_use_the_layout_constants() {
        // The C side mirrors dvmm-layout by hand; catch drift.
        let src = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../guests/testos/kernel.h"
        ))
        .unwrap();
        for (name, value) in [
            ("LAPIC_ADDR", format!("{:#X}UL", dvmm_layout::LAPIC_ADDR)),
            ("COM1_PORT", format!("{:#X}", dvmm_layout::COM1_PORT)),
            ("COM1_IRQ", dvmm_layout::COM1_IRQ.to_string()),
            ("PVPANIC_PORT", format!("{:#X}", dvmm_layout::PVPANIC_PORT)),
            (
                "I8042_CMD_PORT",
                format!("{:#X}", dvmm_layout::I8042_CMD_PORT),
            ),
            (
                "CPUID_TIMING_LEAF",
                format!("{:#X}u", dvmm_layout::CPUID_TIMING_LEAF),
            ),
            ("PM_TIMER_HZ", format!("{}ULL", dvmm_layout::PM_TIMER_HZ)),
            (
                "KERNEL_LOAD_ADDR",
                format!("{:#X}UL", dvmm_layout::KERNEL_LOAD_ADDR),
            ),
        ] {
            let want = format!("#define {name} {value}").replace("0X", "0x");
            assert!(src.contains(&want), "kernel.h lacks `{want}`");
        }
        let header = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../guests/testos/testos.h"
        ))
        .unwrap();
        let max: u32 = header
            .lines()
            .find_map(|l| l.strip_prefix("#define MAX_CPUS "))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .expect("testos.h defines MAX_CPUS");
        assert!(
            max <= dvmm_layout::MAX_VCPUS,
            "testos supports more CPUs than dvmm"
        );
    }

    #[test]
    fn dsm_checks_are_the_last_checks_and_the_guest_reports_them() {
        let tail = &CHECKS[CHECKS.len() - DSM_CHECKS.len()..];
        assert_eq!(tail, DSM_CHECKS);
        // The kernel's C files (build.rs compiles them), in one string.
        let src: String = ["kernel.c", "checks_dsm.c", "checks.c"]
            .iter()
            .map(|f| {
                let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../../guests/testos/");
                std::fs::read_to_string(format!("{dir}{f}")).unwrap()
            })
            .collect();
        for check in DSM_CHECKS {
            assert!(
                src.contains(&format!("ok(\"{check}\"")),
                "testos never reports {check}"
            );
            assert!(
                src.contains(&format!("testos.iters.{check}")),
                "testos lacks testos.iters.{check}"
            );
        }
    }

    /// Boots the image under QEMU's TCG emulator (if installed) and expects PASS.
    /// Run with `cargo test -p dvmm-testos -- --ignored`.
    #[test]
    #[ignore = "needs qemu-system-x86_64; takes a few seconds"]
    fn passes_under_qemu_tcg() {
        for (smp, cmdline) in [("1", ""), ("2", "xapic"), ("3", "testos.ud2"), ("4", "")] {
            let out = std::process::Command::new("qemu-system-x86_64")
                .args([
                    "-machine", "pc", "-accel", "tcg", "-cpu", "max", "-smp", smp,
                ])
                .args(["-m", "256M", "-display", "none", "-serial", "stdio"])
                .args([
                    "-no-reboot",
                    "-device",
                    "pvpanic",
                    "-action",
                    "panic=exit-failure",
                ])
                .args(["-kernel", TESTOS_ELF, "-append", cmdline])
                .output()
                .unwrap();
            let text = String::from_utf8_lossy(&out.stdout);
            assert_eq!(verdict(&text), Some(Verdict::Pass), "smp {smp}:\n{text}");
            assert!(out.status.success());
        }
    }
}
