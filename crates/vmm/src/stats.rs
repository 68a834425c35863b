//! Per-vCPU counts of VM exits by kind: read live (the control API) and logged when
//! the vCPU ends.

use std::sync::atomic::{AtomicU64, Ordering};

/// Kinds of exit we count.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExitKind {
    /// Port I/O.
    Pio,
    /// MMIO (LAPIC page, IOAPIC, unbacked).
    Mmio,
    /// RDMSR/WRMSR handled in userspace.
    Msr,
    /// HLT.
    Hlt,
    /// Interrupt window opened.
    IrqWindow,
    /// Kicked out of KVM_RUN (signal or immediate_exit).
    Kick,
    /// Instruction the host's KVM could not emulate.
    Emulation,
    /// A user-mode `int n` that dvmm completed (hosts that turn it into #UD).
    SyscallCompletion,
    /// An access to guest RAM that KVM's emulator left to userspace (see
    /// `vcpu::ram_access_as_mmio`).
    RamAsMmio,
}

const KINDS: [ExitKind; 9] = [
    ExitKind::Pio,
    ExitKind::Mmio,
    ExitKind::Msr,
    ExitKind::Hlt,
    ExitKind::IrqWindow,
    ExitKind::Kick,
    ExitKind::Emulation,
    ExitKind::SyscallCompletion,
    ExitKind::RamAsMmio,
];

impl ExitKind {
    /// The kind's name in counters and metrics.
    pub fn name(self) -> &'static str {
        match self {
            ExitKind::Pio => "pio",
            ExitKind::Mmio => "mmio",
            ExitKind::Msr => "msr",
            ExitKind::Hlt => "hlt",
            ExitKind::IrqWindow => "irq_window",
            ExitKind::Kick => "kick",
            ExitKind::Emulation => "emulation",
            ExitKind::SyscallCompletion => "syscall_completion",
            ExitKind::RamAsMmio => "ram_as_mmio",
        }
    }
}

/// Exit counters of one vCPU: written by its thread only, read by anyone (relaxed
/// atomics: a reader sees each count at some recent value).
#[derive(Default, Debug)]
pub struct ExitStats {
    counts: [AtomicU64; KINDS.len()],
}

impl ExitStats {
    /// Counts one exit.
    pub fn count(&self, kind: ExitKind) {
        self.counts[kind as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// How many exits of `kind`.
    pub fn get(&self, kind: ExitKind) -> u64 {
        self.counts[kind as usize].load(Ordering::Relaxed)
    }

    /// Every kind's name and count.
    pub fn snapshot(&self) -> Vec<(&'static str, u64)> {
        KINDS.iter().map(|k| (k.name(), self.get(*k))).collect()
    }

    /// Logs the counts at info level.
    pub fn report(&self, vcpu: u32) {
        let parts: Vec<String> = KINDS
            .iter()
            .map(|k| format!("{k:?}={}", self.get(*k)))
            .collect();
        tracing::info!(vcpu, "exits: {}", parts.join(" "));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_by_kind() {
        let s = ExitStats::default();
        s.count(ExitKind::Pio);
        s.count(ExitKind::Pio);
        s.count(ExitKind::Hlt);
        assert_eq!(s.get(ExitKind::Pio), 2);
        assert_eq!(s.get(ExitKind::Hlt), 1);
        assert_eq!(s.get(ExitKind::Mmio), 0);
        assert!(s.snapshot().contains(&("pio", 2)));
        assert_eq!(s.snapshot().len(), KINDS.len());
    }
}
