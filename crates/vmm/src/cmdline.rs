//! Options dvmm adds to a Linux guest's command line, each for a stated reason and
//! never over the user's own choice (an option the user gave is left alone).
//!
//! None of them changes what the guest can do: they steer the kernel away from
//! instructions this host's KVM cannot run, skip boot-time self-tests that are minutes
//! of emulated code, and drop speculation defences for kernel code that the CPU never
//! runs (emulated-kernel hosts only), and make a kernel panic end the VM instead of
//! hanging it.

use linux_loader::cmdline::Cmdline;

/// Linux `X86_FEATURE_*` numbers of extensions a kernel must not use where KVM emulates
/// its code: PCLMULQDQ 4*32+1, SSSE3 4*32+9, SSE4.1 4*32+19, SSE4.2 4*32+20, AES 4*32+25,
/// AVX 4*32+28, AVX2 9*32+5, AVX-512F 9*32+16, SHA 9*32+29 (the emulator cannot run
/// them), and POPCNT 4*32+23, SMAP 9*32+20 (dvmm can complete popcnt and clac/stac, but
/// at one VM exit each, on hot paths such as every user-memory access), and MWAIT 4*32+3
/// (KVM treats `mwait` as a no-op, so an idle guest would spin instead of halting).
pub const EMULATION_UNSAFE_FEATURE_BITS: &str = "129,131,137,147,148,151,153,156,293,304,308,317";

/// One option added, and why (for the log).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Added {
    /// The option as added.
    pub option: String,
    /// Why.
    pub reason: &'static str,
}

/// Whether the kernel's part of `cmdline` (what comes before a `--`, after which the
/// words are init's) sets `key`.
fn has_key(cmdline: &str, key: &str) -> bool {
    cmdline
        .split_whitespace()
        .take_while(|w| *w != "--")
        .any(|w| w == key || w.strip_prefix(key).is_some_and(|r| r.starts_with('=')))
}

/// The command line a Linux guest gets: `user` plus what this host needs.
/// `emulated_kernel`: the host's KVM emulates guest kernel code.
pub fn for_linux(user: &str, emulated_kernel: bool) -> (String, Vec<Added>) {
    let mut wanted: Vec<(&str, String, &'static str)> = vec![(
        "panic",
        "panic=-1".to_string(),
        "a kernel panic reboots at once, which ends the VM with the panic line, instead of \
         hanging it",
    )];
    // Options the user may also have decided with another key.
    let mut decided_by: Vec<(&str, &str)> = Vec::new();
    if emulated_kernel {
        wanted.push((
            "noxsave",
            "noxsave".to_string(),
            "this host's KVM cannot emulate xsave/xrstor in kernel code, and its guests may \
             see the host's XSAVE bit",
        ));
        wanted.push((
            "clearcpuid",
            format!("clearcpuid={EMULATION_UNSAFE_FEATURE_BITS}"),
            "kernel code must not use SIMD this host's KVM cannot emulate, nor POPCNT/SMAP/\
             MWAIT (an exit each, or a spinning idle loop)",
        ));
        wanted.push((
            "cryptomgr.notests",
            "cryptomgr.notests".to_string(),
            "the kernel's crypto self-tests (RSA, DH, ECC arithmetic) are minutes of \
             emulated code here; the algorithms are unchanged (a FIPS kernel runs them anyway)",
        ));
        // Both defend kernel code against user-trained return predictions. Here KVM's
        // instruction emulator runs the guest's kernel code, the CPU never executes it
        // speculatively; user-mode defences (IBPB, STIBP, retpolines) are unchanged.
        wanted.push((
            "spec_rstack_overflow",
            "spec_rstack_overflow=off".to_string(),
            "this host's KVM emulates guest kernel code, which the CPU then never runs \
             speculatively: the SRSO safe-RET thunk on every kernel return (7 % of a Debian \
             boot's vCPU samples here) defends nothing",
        ));
        wanted.push((
            "retbleed",
            "retbleed=off".to_string(),
            "likewise for the return-stack untraining (or IBRS) on every kernel entry",
        ));
        decided_by.push(("spec_rstack_overflow", "mitigations"));
        decided_by.push(("retbleed", "mitigations"));
    }
    // linux-loader's Cmdline keeps the kernel's options apart from init's (after `--`),
    // so ours go before the separator. A line it cannot hold (a NUL byte) is passed on
    // as it is, for the loader to refuse with the offset of the NUL.
    let capacity = user.len() + wanted.iter().map(|w| w.1.len() + 1).sum::<usize>() + 1;
    let Ok(mut line) = Cmdline::try_from(user, capacity) else {
        return (user.to_string(), Vec::new());
    };
    let mut added = Vec::new();
    for (key, option, reason) in wanted {
        let decided = decided_by
            .iter()
            .any(|(k, other)| *k == key && has_key(user, other));
        if has_key(user, key) || decided {
            continue;
        }
        if line.insert_str(&option).is_ok() {
            added.push(Added { option, reason });
        }
    }
    match line.as_cstring().map(|c| c.into_string()) {
        Ok(Ok(s)) => (s, added),
        _ => (user.to_string(), Vec::new()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adds_what_is_missing_and_keeps_what_the_user_chose() {
        let (c, added) = for_linux("console=ttyS0 panic=30", true);
        assert_eq!(
            c,
            format!(
                "console=ttyS0 panic=30 noxsave clearcpuid={EMULATION_UNSAFE_FEATURE_BITS} \
                 cryptomgr.notests spec_rstack_overflow=off retbleed=off"
            )
        );
        assert_eq!(added.len(), 5);
        // A user who chose the mitigations keeps them.
        let (c, _) = for_linux("mitigations=auto retbleed=stuff", true);
        assert!(
            !c.contains("spec_rstack_overflow") && !c.contains("retbleed=off"),
            "{c}"
        );
        let (c, added) = for_linux("console=ttyS0 clearcpuid=1", false);
        assert_eq!(c, "console=ttyS0 clearcpuid=1 panic=-1");
        assert_eq!(added[0].option, "panic=-1");
    }

    #[test]
    fn options_go_before_inits_arguments() {
        let (c, added) = for_linux("console=ttyS0 -- single panic=3", false);
        assert_eq!(c, "console=ttyS0 panic=-1 -- single panic=3");
        assert_eq!(added.len(), 1, "init's panic=3 is not the kernel's");
        let (c, _) = for_linux("", false);
        assert_eq!(c, "panic=-1");
        // A NUL is left for the loader to refuse.
        let (c, added) = for_linux("a\0b", false);
        assert_eq!((c.as_str(), added.len()), ("a\0b", 0));
    }

    #[test]
    fn keys_match_whole_words() {
        assert!(has_key("a noxsave b", "noxsave"));
        assert!(has_key("panic=5", "panic"));
        assert!(!has_key("panicky=1 oops=panic", "panic"));
    }
}
