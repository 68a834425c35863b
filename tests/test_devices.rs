//! A Multiboot guest of our own talks to the test devices QEMU-built test suites use
//! (`--test-devices`): it checks the Multiboot magic, reads the CPU count from fw_cfg
//! and ends the run through isa-debug-exit, on one node and across two.

mod common;

use std::time::Duration;

use common::dvmm;

const LIMIT: Duration = Duration::from_secs(120);

/// 32-bit code: if EAX holds the Multiboot magic, write fw_cfg's CPU count to
/// isa-debug-exit, else 63; then halt.
const GUEST: &[u8] = &[
    0x3D, 0x02, 0xB0, 0xAD, 0x2B, // cmp eax, 0x2BADB002
    0x75, 0x18, // jne fail
    0x66, 0xBA, 0x10, 0x05, // mov dx, 0x510 (fw_cfg selector)
    0x66, 0xB8, 0x05, 0x00, // mov ax, 5 (FW_CFG_NB_CPUS)
    0x66, 0xEF, // out dx, ax
    0x66, 0xBA, 0x11, 0x05, // mov dx, 0x511 (fw_cfg data)
    0xEC, // in al, dx
    0x0F, 0xB6, 0xC0, // movzx eax, al
    0x66, 0xBA, 0xF4, 0x00, // mov dx, 0xf4 (isa-debug-exit)
    0xEF, // out dx, eax
    0xF4, // hlt
    // fail:
    0xB8, 0x3F, 0x00, 0x00, 0x00, // mov eax, 63
    0x66, 0xBA, 0xF4, 0x00, // mov dx, 0xf4
    0xEF, // out dx, eax
    0xF4, // hlt
];

/// An ELF32 image with a Multiboot header that loads `GUEST` at 2 MiB, written once:
/// the tests run in parallel, and rewriting the file while another test's nodes read
/// it gave one of them an empty kernel.
fn image() -> std::path::PathBuf {
    static IMAGE: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
    IMAGE.get_or_init(write_image).clone()
}

fn write_image() -> std::path::PathBuf {
    let mut f = vec![0u8; 0x1000];
    f[0..4].copy_from_slice(b"\x7FELF");
    (f[4], f[5], f[6]) = (1, 1, 1);
    f[16] = 2; // executable
    f[18] = 3; // i386
    f[20] = 1;
    f[24..28].copy_from_slice(&0x20_0000u32.to_le_bytes()); // entry
    f[28..32].copy_from_slice(&52u32.to_le_bytes()); // program headers
    (f[40], f[42], f[44]) = (52, 32, 1);
    let ph = 52;
    let len = GUEST.len() as u32;
    for (at, v) in [
        (0, 1),
        (4, 0x800),
        (8, 0x20_0000),
        (12, 0x20_0000),
        (16, len),
        (20, len),
    ] {
        f[ph + at..ph + at + 4].copy_from_slice(&u32::to_le_bytes(v));
    }
    let magic = 0x1BAD_B002u32;
    for (i, w) in [magic, 0, 0u32.wrapping_sub(magic)].iter().enumerate() {
        f[0x100 + 4 * i..0x104 + 4 * i].copy_from_slice(&w.to_le_bytes());
    }
    f[0x800..0x800 + GUEST.len()].copy_from_slice(GUEST);
    let dir = std::env::temp_dir().join(format!("dvmm-test-devices-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join("multiboot.elf");
    std::fs::write(&p, f).unwrap();
    p
}

fn run(nodes: &str, cpus: &str, test_devices: bool) -> common::Run {
    let kernel = image();
    let mut args = vec![
        "run",
        "--kernel",
        kernel.to_str().unwrap(),
        "--nodes",
        nodes,
        "--cpus",
        cpus,
        "--memory",
        "64M",
    ];
    if test_devices {
        args.push("--test-devices");
    }
    dvmm(&args, LIMIT)
}

#[test]
fn fw_cfg_and_debug_exit_on_one_node() {
    let r = run("1", "3", true);
    // fw_cfg said 3 CPUs; isa-debug-exit turns 3 into exit status 2 * 3 + 1.
    assert_eq!(r.code, Some(7), "{}", r.transcript());
    assert!(r.stderr.contains("isa-debug-exit"), "{}", r.transcript());
}

#[test]
fn fw_cfg_and_debug_exit_across_two_nodes() {
    let r = run("2", "2", true);
    assert_eq!(r.code, Some(5), "{}", r.transcript());
    // Every node ends with the status the guest asked for.
    assert!(
        r.stderr.contains("node 0: exit 5, node 1: exit 5"),
        "{}",
        r.transcript()
    );
}

#[test]
fn without_the_option_there_are_no_test_devices() {
    // fw_cfg reads as all ones and port 0xf4 is nobody's: the guest halts with
    // interrupts off and the VM runs on until it is stopped.
    let kernel = image();
    let mut child = std::process::Command::new(common::dvmm_bin())
        .args([
            "run",
            "--kernel",
            kernel.to_str().unwrap(),
            "--cpus",
            "1",
            "--memory",
            "64M",
        ])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let ended = common::wait_within(&mut child, Duration::from_secs(3));
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        ended.is_none(),
        "nothing may end the VM without --test-devices"
    );
}
