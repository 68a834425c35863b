//! Per-vCPU counts of VM exits by kind, logged when the vCPU ends.

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

/// Exit counters of one vCPU (owned by its thread, so plain integers).
#[derive(Default, Debug, Clone)]
pub struct ExitStats {
    counts: [u64; KINDS.len()],
}

impl ExitStats {
    /// Counts one exit.
    pub fn count(&mut self, kind: ExitKind) {
        self.counts[kind as usize] += 1;
    }

    /// How many exits of `kind`.
    pub fn get(&self, kind: ExitKind) -> u64 {
        self.counts[kind as usize]
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
        let mut s = ExitStats::default();
        s.count(ExitKind::Pio);
        s.count(ExitKind::Pio);
        s.count(ExitKind::Hlt);
        assert_eq!(s.get(ExitKind::Pio), 2);
        assert_eq!(s.get(ExitKind::Hlt), 1);
        assert_eq!(s.get(ExitKind::Mmio), 0);
    }
}
