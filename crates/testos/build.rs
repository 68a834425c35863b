//! Builds the testos guest image (guests/testos) with gcc into OUT_DIR.

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

const SOURCES: &[&str] = &[
    "boot.S",
    "kernel.c",
    "console.c",
    "platform.c",
    "checks.c",
    "checks_dsm.c",
    "user.c",
];
const HEADERS: &[&str] = &["testos.h", "kernel.h", "linker.ld"];

const CFLAGS: &[&str] = &[
    "-ffreestanding",
    "-nostdlib",
    "-fno-pic",
    "-fno-pie",
    "-mno-red-zone",
    "-mgeneral-regs-only",
    "-fno-stack-protector",
    "-fno-asynchronous-unwind-tables",
    "-O2",
    "-static",
    "-Wl,--build-id=none",
    // Keep loops loops: user code may not call the kernel's memset.
    "-fno-tree-loop-distribute-patterns",
    // No endbr64: the kernel runs in KVM's instruction emulator.
    "-fcf-protection=none",
    // No padding NOPs executed inside loops (fewer emulated instructions).
    "-falign-jumps=1",
    "-falign-loops=1",
    "-Wall",
    "-Wextra",
    "-Werror",
];

fn run(cmd: &mut Command) {
    let status = cmd
        .status()
        .unwrap_or_else(|e| panic!("testos: cannot run {cmd:?}: {e} (is gcc installed?)"));
    assert!(status.success(), "testos: {cmd:?} failed with {status}");
}

fn main() {
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let src = manifest.join("../../guests/testos");
    let src = src.canonicalize().unwrap_or(src);
    let out = PathBuf::from(env::var("OUT_DIR").expect("OUT_DIR"));
    let cc = env::var("TESTOS_CC").unwrap_or_else(|_| "gcc".to_string());

    for dep in SOURCES.iter().chain(HEADERS) {
        println!("cargo:rerun-if-changed={}", src.join(dep).display());
    }
    println!("cargo:rerun-if-env-changed=TESTOS_CC");

    let mut objects = Vec::new();
    for source in SOURCES {
        let obj = out.join(Path::new(source).with_extension("o"));
        run(Command::new(&cc)
            .args(CFLAGS)
            .arg("-I")
            .arg(&src)
            .arg("-c")
            .arg(src.join(source))
            .arg("-o")
            .arg(&obj));
        objects.push(obj);
    }
    let elf = out.join("testos.elf");
    run(Command::new(&cc)
        .args(CFLAGS)
        .args(["-no-pie", "-Wl,--no-warn-rwx-segments", "-T"])
        .arg(src.join("linker.ld"))
        .arg("-o")
        .arg(&elf)
        .args(&objects));
    println!("cargo:rustc-env=TESTOS_ELF={}", elf.display());
}
