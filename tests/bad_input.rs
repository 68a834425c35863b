//! Bad input gets a clear error and a non-zero exit, never a panic or a hang.

mod common;

use std::io::Write;
use std::time::Duration;

use common::{dvmm, Run};

const LIMIT: Duration = Duration::from_secs(60);

fn assert_rejected(run: &Run, needle: &str) {
    let t = run.transcript();
    assert_eq!(run.code, Some(1), "expected exit code 1\n{t}");
    assert!(
        run.stderr.to_lowercase().contains(&needle.to_lowercase()),
        "stderr should mention '{needle}'\n{t}"
    );
    assert!(!run.stderr.contains("panicked"), "dvmm panicked\n{t}");
    assert!(run.stdout.is_empty(), "no guest should have run\n{t}");
}

fn temp_file(name: &str, bytes: &[u8]) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("dvmm-bad-input-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join(name);
    let mut f = std::fs::File::create(&p).unwrap();
    f.write_all(bytes).unwrap();
    p
}

#[test]
fn missing_kernel_file() {
    let run = dvmm(
        &["run", "--kernel", "/nonexistent/vmlinuz", "--cpus", "1"],
        LIMIT,
    );
    assert_rejected(&run, "/nonexistent/vmlinuz");
}

#[test]
fn file_that_is_not_a_kernel() {
    let p = temp_file("not-a-kernel", &[0x5a; 8192]);
    let run = dvmm(&["run", "--kernel", p.to_str().unwrap()], LIMIT);
    assert_rejected(&run, "not a");
}

#[test]
fn empty_kernel_file() {
    let p = temp_file("empty-kernel", &[]);
    let run = dvmm(&["run", "--kernel", p.to_str().unwrap()], LIMIT);
    assert_rejected(&run, "not a");
}

#[test]
fn initramfs_that_does_not_fit() {
    // 40 MiB of initramfs in 32 MiB of RAM.
    let big = vec![0u8; 40 << 20];
    let p = temp_file("huge-initramfs", &big);
    let run = dvmm(
        &[
            "run",
            "--kernel",
            dvmm_testos::TESTOS_ELF,
            "--initramfs",
            p.to_str().unwrap(),
            "--memory",
            "32M",
        ],
        LIMIT,
    );
    assert_rejected(&run, "initramfs");
}

#[test]
fn zero_cpus() {
    let run = dvmm(
        &["run", "--kernel", dvmm_testos::TESTOS_ELF, "--cpus", "0"],
        LIMIT,
    );
    assert_rejected(&run, "cpu");
}

#[test]
fn more_cpus_than_apic_ids() {
    let run = dvmm(
        &["run", "--kernel", dvmm_testos::TESTOS_ELF, "--cpus", "300"],
        LIMIT,
    );
    assert_rejected(&run, "254");
}

#[test]
fn memory_too_small() {
    let run = dvmm(
        &["run", "--kernel", dvmm_testos::TESTOS_ELF, "--memory", "1M"],
        LIMIT,
    );
    assert_rejected(&run, "too small");
}

#[test]
fn memory_larger_than_the_host() {
    let run = dvmm(
        &[
            "run",
            "--kernel",
            dvmm_testos::TESTOS_ELF,
            "--memory",
            "64T",
        ],
        LIMIT,
    );
    assert_rejected(&run, "more than this host");
}

#[test]
fn malformed_memory_size() {
    let run = dvmm(
        &[
            "run",
            "--kernel",
            dvmm_testos::TESTOS_ELF,
            "--memory",
            "lots",
        ],
        LIMIT,
    );
    let t = run.transcript();
    assert_eq!(run.code, Some(2), "clap usage errors exit 2\n{t}");
    assert!(run.stderr.contains("not a size"), "{t}");
}
