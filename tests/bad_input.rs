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
fn unknown_cpu_feature_to_hide() {
    let run = dvmm(
        &[
            "run",
            "--kernel",
            dvmm_testos::TESTOS_ELF,
            "--hide-cpuid",
            "avx2,avx9000",
        ],
        LIMIT,
    );
    let t = run.transcript();
    assert_eq!(run.code, Some(2), "clap usage errors exit 2\n{t}");
    assert!(run.stderr.contains("'avx9000' is not a CPU feature"), "{t}");
    assert!(run.stdout.is_empty(), "no guest may run\n{t}");
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

#[test]
fn zero_nodes() {
    let run = dvmm(
        &["run", "--kernel", dvmm_testos::TESTOS_ELF, "--nodes", "0"],
        LIMIT,
    );
    let t = run.transcript();
    assert_eq!(run.code, Some(2), "clap usage errors exit 2\n{t}");
    assert!(run.stderr.contains("--nodes"), "{t}");
    assert!(run.stdout.is_empty(), "no guest may run\n{t}");
}

/// The vCPU limit is checked before any node process is started.
#[test]
fn too_many_cpus_for_a_local_cluster() {
    let run = dvmm(
        &[
            "run",
            "--kernel",
            dvmm_testos::TESTOS_ELF,
            "--nodes",
            "300",
            "--cpus",
            "300",
        ],
        LIMIT,
    );
    assert_rejected(&run, "at most 254");
    assert!(
        !run.stderr.contains("starting a local cluster"),
        "{}",
        run.transcript()
    );
}

/// A two-node cluster file for `kernel`; `port0` is node 0's port.
fn cluster_file(name: &str, kernel: &str, port0: u16) -> std::path::PathBuf {
    let port1 = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let text = format!(
        "secret = \"a-long-enough-test-secret-0123\"\n[guest]\nkernel = \"{kernel}\"\n\
         [[node]]\naddress = \"127.0.0.1:{port0}\"\nvcpus = 1\nmemory = \"64M\"\n\
         [[node]]\naddress = \"127.0.0.1:{port1}\"\nvcpus = 1\nmemory = \"64M\"\n"
    );
    temp_file(name, text.as_bytes())
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn node_id_not_in_the_cluster_file() {
    let f = cluster_file("ids.toml", dvmm_testos::TESTOS_ELF, free_port());
    let run = dvmm(
        &["node", "--cluster", f.to_str().unwrap(), "--id", "5"],
        LIMIT,
    );
    assert_rejected(&run, "--id 5 is not a node of the cluster file");
    assert!(
        !run.stderr.contains("internal error"),
        "{}",
        run.transcript()
    );
}

#[test]
fn port_zero_in_a_cluster_file() {
    let f = cluster_file("port0.toml", dvmm_testos::TESTOS_ELF, 0);
    let run = dvmm(
        &["node", "--cluster", f.to_str().unwrap(), "--id", "0"],
        LIMIT,
    );
    assert_rejected(&run, "port 0");
}

/// A node that cannot read the kernel says so at once, not after its peers connected
/// (its peer never starts here: waiting would take the 30 s connect time-out).
#[test]
fn cluster_node_with_a_missing_kernel_fails_before_connecting() {
    let f = cluster_file("nokernel.toml", "/nonexistent/vmlinuz", free_port());
    let run = dvmm(
        &["node", "--cluster", f.to_str().unwrap(), "--id", "1"],
        Duration::from_secs(20),
    );
    assert_rejected(&run, "cannot read kernel image /nonexistent/vmlinuz");
    assert!(
        !run.stderr.contains("did not connect"),
        "{}",
        run.transcript()
    );
}

fn run_with_disk(disk: &str) -> Run {
    dvmm(
        &["run", "--kernel", dvmm_testos::TESTOS_ELF, "--disk", disk],
        LIMIT,
    )
}

#[test]
fn missing_disk_image() {
    let run = run_with_disk("path=/nonexistent/disk.img");
    assert_rejected(&run, "cannot open disk image /nonexistent/disk.img");
}

#[test]
fn missing_disk_image_on_the_node_that_serves_it() {
    // Node 1 opens it and says why; node 0 learns that node 1 is gone; nothing boots.
    let run = dvmm(
        &[
            "run",
            "--kernel",
            dvmm_testos::TESTOS_ELF,
            "--nodes",
            "2",
            "--cpus",
            "2",
            "--disk",
            "path=/nonexistent/disk1.img,node=1",
        ],
        LIMIT,
    );
    assert_rejected(&run, "cannot open disk image /nonexistent/disk1.img");
    assert!(
        run.stderr.contains("node 1: exit 1"),
        "{}",
        run.transcript()
    );
}

#[test]
fn disk_image_that_cannot_be_written() {
    // A directory opens for reading but never for writing, even as root.
    let dir = std::env::temp_dir().join(format!("dvmm-bad-input-{}-dir.img", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let run = run_with_disk(&format!("path={}", dir.display()));
    assert_rejected(&run, "cannot open disk image");
}

#[test]
fn empty_disk_image() {
    let p = temp_file("empty.img", &[]);
    let run = run_with_disk(&format!("path={}", p.display()));
    assert_rejected(&run, "less than one 512-byte sector");
}

#[test]
fn disk_image_in_use_by_another_vm() {
    let p = temp_file("busy.img", &[0; 4096]);
    // What another VM holds while it runs: an exclusive lock.
    let holder = std::fs::File::open(&p).unwrap();
    holder.try_lock().unwrap();
    let run = run_with_disk(&format!("path={}", p.display()));
    assert_rejected(&run, "in use by another process");
    // Read-only users share: a second read-only VM would be fine, but not beside a writer.
    let run = run_with_disk(&format!("path={},readonly=on", p.display()));
    assert_rejected(&run, "in use by another process");
    drop(holder);
}

#[test]
fn malformed_disk_options() {
    for (value, needle) in [
        ("disk.img", "not key=value"),
        ("path=x.img,readonly=maybe", "on or off"),
        ("path=x.img,cache=none", "unknown disk option"),
        ("readonly=on", "no path"),
    ] {
        let run = run_with_disk(value);
        let t = run.transcript();
        assert_eq!(run.code, Some(2), "clap usage errors exit 2\n{t}");
        assert!(run.stderr.contains(needle), "{value}: {t}");
    }
    let run = run_with_disk("path=x.img,node=1");
    assert_rejected(&run, "node=1 but this VM has one node");
}

fn run_with(extra: &[&str]) -> Run {
    let mut args = vec!["run", "--kernel", dvmm_testos::TESTOS_ELF];
    args.extend_from_slice(extra);
    dvmm(&args, LIMIT)
}

#[test]
fn tap_that_does_not_exist() {
    let run = run_with(&["--net", "tap=dvmm-none0"]);
    assert_rejected(&run, "TAP device dvmm-none0 does not exist");
    // Not a TAP: the loopback interface exists, but TUNSETIFF refuses it.
    let run = run_with(&["--net", "tap=lo"]);
    assert_rejected(&run, "cannot open TAP device lo");
}

#[test]
fn malformed_net_and_console_options() {
    for (flag, value, needle) in [
        ("--net", "tap0", "not key=value"),
        ("--net", "tap=t,mac=52:54", "six hex pairs"),
        ("--net", "tap=t,mac=01:00:00:00:00:01", "multicast"),
        ("--net", "mac=52:54:00:00:00:01", "no tap="),
        ("--console", "pty", "use off, file=PATH"),
    ] {
        let run = run_with(&[flag, value]);
        let t = run.transcript();
        assert_eq!(run.code, Some(2), "clap usage errors exit 2\n{t}");
        assert!(run.stderr.contains(needle), "{flag} {value}: {t}");
    }
    let run = run_with(&["--net", "tap=t,node=1"]);
    assert_rejected(&run, "node=1 but this VM has one node");
}

#[test]
fn console_socket_path_that_exists() {
    let p = temp_file("taken.sock", b"not a socket");
    let run = run_with(&["--console", &format!("socket={}", p.display())]);
    assert_rejected(&run, "already exists");
    assert_eq!(std::fs::read(&p).unwrap(), b"not a socket", "left alone");
    let run = run_with(&["--console", "file=/nonexistent/dir/hvc0.log"]);
    assert_rejected(&run, "cannot open /nonexistent/dir/hvc0.log");
}
