//! The guest profiler: where the guest's vCPUs spend their time, by symbol.
//!
//! A sampler thread asks every local vCPU for its RIP every interval (a kick; the vCPU
//! thread reads its registers when `KVM_RUN` returns) and counts vCPUs that are halted
//! or waiting for a device on another node without disturbing them. At the end the
//! samples are written as a flat profile; with a `System.map` the kernel addresses are
//! named (shifted by the guest's KASLR slide, found from LSTAR = `entry_SYSCALL_64`).
//!
//! The report is also its own interchange format: lines of `count percent name`, so the
//! reports of a cluster's nodes merge by adding counts per name ([`merge_reports`]).

use dvmm_sync::MutexExt;
use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Profiling options of a run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProfileConfig {
    /// Where the flat profile is written at the end.
    pub output: PathBuf,
    /// Time between samples of one vCPU.
    pub interval: Duration,
    /// The guest kernel's symbols (`System.map`), if given.
    pub system_map: Option<PathBuf>,
}

/// Why the profile could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ProfileError {
    /// The symbol file cannot be read.
    #[error("cannot read the symbol file {path}: {source}")]
    SystemMap {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The symbol file holds no symbols.
    #[error("{0} holds no symbols (expected System.map lines: ADDRESS TYPE NAME)")]
    NoSymbols(PathBuf),
    /// The report cannot be written.
    #[error("cannot write the profile {path}: {source}")]
    Write {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
}

/// Kernel symbols, sorted by address.
#[derive(Clone, Debug, Default)]
pub struct SymbolTable {
    syms: Vec<(u64, String)>,
}

impl SymbolTable {
    /// Parses `System.map` text (`ffffffff81000000 T _text`); lines that are not
    /// symbols are skipped.
    pub fn parse(text: &str) -> SymbolTable {
        let mut syms: Vec<(u64, String)> = text
            .lines()
            .filter_map(|l| {
                let mut it = l.split_whitespace();
                let addr = u64::from_str_radix(it.next()?, 16).ok()?;
                let kind = it.next()?;
                let name = it.next()?;
                // Absolute symbols (a, A) are not places in the image.
                (!matches!(kind, "a" | "A")).then(|| (addr, name.to_string()))
            })
            .collect();
        syms.sort_by_key(|(a, _)| *a);
        SymbolTable { syms }
    }

    /// Reads and parses a `System.map` file.
    pub fn load(path: &Path) -> Result<SymbolTable, ProfileError> {
        let text = std::fs::read_to_string(path).map_err(|source| ProfileError::SystemMap {
            path: path.to_path_buf(),
            source,
        })?;
        let t = SymbolTable::parse(&text);
        if t.syms.is_empty() {
            return Err(ProfileError::NoSymbols(path.to_path_buf()));
        }
        Ok(t)
    }

    /// The address of the symbol `name`.
    pub fn address_of(&self, name: &str) -> Option<u64> {
        self.syms.iter().find(|(_, n)| n == name).map(|(a, _)| *a)
    }

    /// The symbol containing `addr` (the last one at or below it), if `addr` lies within
    /// the table's span.
    pub fn lookup(&self, addr: u64) -> Option<&str> {
        let last = self.syms.last()?;
        if addr < self.syms[0].0 || addr > last.0.saturating_add(1 << 20) {
            return None;
        }
        let i = self.syms.partition_point(|(a, _)| *a <= addr);
        self.syms.get(i.checked_sub(1)?).map(|(_, n)| n.as_str())
    }
}

/// What a vCPU was doing when sampled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sample {
    /// Running guest code at `rip` with privilege level `cpl`.
    Guest {
        /// Guest RIP (linear address, CS base 0 in long mode).
        rip: u64,
        /// Current privilege level.
        cpl: u8,
    },
    /// Halted (HLT), waiting for an interrupt.
    Halted,
    /// Waiting for INIT/SIPI (not started, or stopped by INIT).
    WaitingForSipi,
    /// Blocked on a device access forwarded to another node.
    RemoteIo,
}

/// Counted samples.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Profile {
    kernel: HashMap<u64, u64>,
    user: u64,
    halted: u64,
    sipi: u64,
    remote_io: u64,
}

impl Profile {
    /// Counts one sample.
    pub fn add(&mut self, s: Sample) {
        match s {
            Sample::Guest { cpl: 3, .. } => self.user += 1,
            Sample::Guest { rip, .. } => *self.kernel.entry(rip).or_insert(0) += 1,
            Sample::Halted => self.halted += 1,
            Sample::WaitingForSipi => self.sipi += 1,
            Sample::RemoteIo => self.remote_io += 1,
        }
    }

    /// Adds `other`'s counts.
    pub fn merge(&mut self, other: &Profile) {
        for (rip, n) in &other.kernel {
            *self.kernel.entry(*rip).or_insert(0) += n;
        }
        self.user += other.user;
        self.halted += other.halted;
        self.sipi += other.sipi;
        self.remote_io += other.remote_io;
    }

    /// All samples.
    pub fn total(&self) -> u64 {
        self.kernel.values().sum::<u64>() + self.user + self.halted + self.sipi + self.remote_io
    }

    /// Counts by name: kernel symbols (`rip - slide` looked up in `symbols`; raw
    /// addresses by 4 KiB page without them) and the bracketed states.
    pub fn by_name(&self, symbols: Option<&SymbolTable>, slide: u64) -> Vec<(String, u64)> {
        let mut m: HashMap<String, u64> = HashMap::new();
        for (rip, n) in &self.kernel {
            let addr = rip.wrapping_sub(slide);
            let name = match symbols.and_then(|s| s.lookup(addr)) {
                Some(sym) => sym.to_string(),
                None if symbols.is_some() => "[kernel, no symbol]".to_string(),
                None => format!("[kernel page {:#x}]", addr & !0xfff),
            };
            *m.entry(name).or_insert(0) += n;
        }
        for (name, n) in [
            ("[user mode]", self.user),
            ("[halted]", self.halted),
            ("[waiting for INIT/SIPI]", self.sipi),
            ("[waiting for a device on another node]", self.remote_io),
        ] {
            if n > 0 {
                m.insert(name.to_string(), n);
            }
        }
        let mut v: Vec<(String, u64)> = m.into_iter().collect();
        v.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        v
    }
}

/// The KASLR slide of a guest kernel: how far its LSTAR is from `entry_SYSCALL_64` in
/// `symbols` (0 when either is unknown).
pub fn kaslr_slide(symbols: Option<&SymbolTable>, lstar: Option<u64>) -> u64 {
    match (
        symbols.and_then(|s| s.address_of("entry_SYSCALL_64")),
        lstar,
    ) {
        (Some(sym), Some(l)) if l != 0 => l.wrapping_sub(sym),
        _ => 0,
    }
}

/// Formats a flat profile from counts by name.
pub fn format_report(title: &str, rows: &[(String, u64)]) -> String {
    let total: u64 = rows.iter().map(|(_, n)| n).sum();
    let mut out = String::new();
    let _ = writeln!(out, "# {title}");
    let _ = writeln!(out, "# {total} samples");
    let _ = writeln!(out, "#    samples        %  where");
    for (name, n) in rows {
        let pct = if total == 0 {
            0.0
        } else {
            *n as f64 * 100.0 / total as f64
        };
        let _ = writeln!(out, "{n:>12} {pct:>7.2}%  {name}");
    }
    out
}

/// Reads the rows of reports written by [`format_report`] and adds them up by name.
pub fn merge_reports(reports: &[String]) -> Vec<(String, u64)> {
    let mut m: HashMap<String, u64> = HashMap::new();
    for r in reports {
        for line in r.lines().filter(|l| !l.starts_with('#')) {
            // "<samples> <percent>%  <name>", columns padded with spaces.
            let Some((n, rest)) = line.trim_start().split_once(char::is_whitespace) else {
                continue;
            };
            let Some((_pct, name)) = rest.trim_start().split_once(char::is_whitespace) else {
                continue;
            };
            if let Ok(n) = n.parse::<u64>() {
                *m.entry(name.trim().to_string()).or_insert(0) += n;
            }
        }
    }
    let mut v: Vec<(String, u64)> = m.into_iter().collect();
    v.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    v
}

/// Writes `text` to `path`.
pub fn write_report(path: &Path, text: &str) -> Result<(), ProfileError> {
    std::fs::write(path, text).map_err(|source| ProfileError::Write {
        path: path.to_path_buf(),
        source,
    })
}

/// What the vCPU threads and the sampler share.
pub struct Sampler {
    /// Time between samples.
    pub interval: Duration,
    collected: std::sync::Mutex<Profile>,
    lstar: std::sync::atomic::AtomicU64,
}

impl Sampler {
    /// A sampler taking a sample of every vCPU each `interval`.
    pub fn new(interval: Duration) -> Sampler {
        Sampler {
            interval,
            collected: std::sync::Mutex::new(Profile::default()),
            lstar: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// Adds a thread's samples.
    pub fn collect(&self, p: &Profile) {
        self.collected.locked().merge(p);
    }

    /// Notes the guest's LSTAR (for the KASLR slide).
    pub fn note_lstar(&self, lstar: u64) {
        if lstar != 0 {
            self.lstar
                .store(lstar, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// All samples collected so far, and the guest's LSTAR if known.
    pub fn result(&self) -> (Profile, Option<u64>) {
        let p = self.collected.locked().clone();
        let l = self.lstar.load(std::sync::atomic::Ordering::Relaxed);
        (p, (l != 0).then_some(l))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAP: &str = "\
0000000000000000 A VDSO32_PRELINK
ffffffff81000000 T _text
ffffffff81000000 T startup_64
ffffffff81001000 t do_one_initcall
ffffffff81002000 T clear_page_erms
ffffffff81800040 T entry_SYSCALL_64
";

    #[test]
    fn symbols_are_found_by_address() {
        let t = SymbolTable::parse(MAP);
        assert_eq!(t.lookup(0xffff_ffff_8100_1abc), Some("do_one_initcall"));
        assert_eq!(t.lookup(0xffff_ffff_8100_2000), Some("clear_page_erms"));
        assert_eq!(t.lookup(0x1000), None, "below the image");
        assert_eq!(
            t.lookup(0xffff_ffff_9000_0000),
            None,
            "far beyond the image"
        );
        assert_eq!(
            t.address_of("entry_SYSCALL_64"),
            Some(0xffff_ffff_8180_0040)
        );
        assert_eq!(
            t.address_of("VDSO32_PRELINK"),
            None,
            "absolute symbols skipped"
        );
    }

    #[test]
    fn slide_comes_from_lstar() {
        let t = SymbolTable::parse(MAP);
        assert_eq!(
            kaslr_slide(Some(&t), Some(0xffff_ffff_a580_0040)),
            0x2400_0000
        );
        assert_eq!(kaslr_slide(Some(&t), None), 0);
        assert_eq!(kaslr_slide(None, Some(5)), 0);
    }

    #[test]
    fn report_groups_by_symbol_and_state() {
        let t = SymbolTable::parse(MAP);
        let slide = 0x1000_0000;
        let mut p = Profile::default();
        for _ in 0..3 {
            p.add(Sample::Guest {
                rip: 0xffff_ffff_9100_2010,
                cpl: 0,
            });
        }
        p.add(Sample::Guest {
            rip: 0xffff_ffff_9100_2ff0,
            cpl: 0,
        });
        p.add(Sample::Guest {
            rip: 0xffff_ffff_9100_1000,
            cpl: 0,
        });
        p.add(Sample::Guest {
            rip: 0x40_1000,
            cpl: 3,
        });
        p.add(Sample::Halted);
        p.add(Sample::Halted);
        assert_eq!(p.total(), 8);
        let rows = p.by_name(Some(&t), slide);
        assert_eq!(rows[0], ("clear_page_erms".to_string(), 4));
        assert_eq!(rows[1], ("[halted]".to_string(), 2));
        assert!(rows.contains(&("do_one_initcall".to_string(), 1)));
        assert!(rows.contains(&("[user mode]".to_string(), 1)));
        let raw = p.by_name(None, 0);
        assert!(raw.contains(&("[kernel page 0xffffffff91002000]".to_string(), 4)));
    }

    #[test]
    fn reports_merge_by_name() {
        let a = format_report("node 0", &[("f".into(), 3), ("[halted]".into(), 1)]);
        let b = format_report("node 1", &[("f".into(), 2), ("g h".into(), 5)]);
        assert!(a.contains("75.00%  f"));
        let m = merge_reports(&[a, b]);
        assert_eq!(
            m,
            vec![
                ("f".to_string(), 5),
                ("g h".to_string(), 5),
                ("[halted]".to_string(), 1)
            ]
        );
    }
}
