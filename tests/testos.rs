//! Boots the test guest (guests/testos) on dvmm and checks its verdict.
//!
//! testos fails (and dvmm exits non-zero) if any IPI, NMI, timer, IOAPIC-routed UART
//! interrupt, user-mode round trip or AP start-up misbehaves on any CPU.

mod common;

use std::time::Duration;

use common::dvmm;

const LIMIT: Duration = Duration::from_secs(240);

fn boot_testos(cpus: u32, extra_cmdline: &str) {
    let cpus_s = cpus.to_string();
    let cmdline = format!("testos {extra_cmdline}");
    let run = dvmm(
        &[
            "run",
            "--kernel",
            dvmm_testos::TESTOS_ELF,
            "--cpus",
            &cpus_s,
            "--memory",
            "256M",
            "--cmdline",
            &cmdline,
        ],
        LIMIT,
    );
    let t = run.transcript();
    assert!(run.stdout.contains("testos: PASS"), "no PASS\n{t}");
    assert!(!run.stdout.contains("FAIL"), "a check failed\n{t}");
    assert_eq!(run.code, Some(0), "dvmm must exit 0 on power-off\n{t}");
    assert!(
        run.stdout.contains(&format!("cpus={cpus}")),
        "guest did not see {cpus} CPUs\n{t}"
    );
    // Every CPU reports every check.
    for cpu in 0..cpus {
        let prefix = format!("testos: cpu {cpu}: ");
        let ok = run
            .stdout
            .lines()
            .filter(|l| l.starts_with(&prefix) && l.contains(" ok"))
            .count();
        assert!(ok >= 5, "cpu {cpu} reported only {ok} passing checks\n{t}");
    }
}

#[test]
fn testos_1_vcpu() {
    boot_testos(1, "");
}

#[test]
fn testos_2_vcpus() {
    boot_testos(2, "");
}

#[test]
fn testos_4_vcpus() {
    boot_testos(4, "");
}

#[test]
fn testos_4_vcpus_xapic_mmio() {
    boot_testos(4, "xapic");
}

#[test]
fn testos_failure_is_a_nonzero_exit() {
    let run = dvmm(
        &[
            "run",
            "--kernel",
            dvmm_testos::TESTOS_ELF,
            "--cpus",
            "2",
            "--memory",
            "256M",
            "--cmdline",
            "testos testos.fail",
        ],
        LIMIT,
    );
    let t = run.transcript();
    assert!(run.stdout.contains("testos: FAIL"), "{t}");
    assert_ne!(run.code, Some(0), "{t}");
}
