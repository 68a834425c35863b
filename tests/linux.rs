//! An unmodified Linux kernel boots on dvmm, on one node and across nodes, and runs
//! user programs: busybox, and smp-check (threads pinned to every CPU checking an
//! atomic counter, a mutex, message passing and NUMA-local allocation).
//!
//! Two kernels: dvmm's small one, built from Debian's linux-source-6.1 with
//! guests/linux/kernel.config by scripts/build-linux.sh (cached outside the checkout;
//! these tests build it on a cache miss), and Debian's stock kernel as packaged
//! (scripts/linux-guest.sh; those tests are `#[ignore]`d: tens of minutes here).

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use common::{accept_until, dvmm, ended, script, waiting, write_until, Ended, Run, Tap};

/// A kernel and the test initramfs.
struct Guest {
    kernel: PathBuf,
    initramfs: PathBuf,
}

/// dvmm's small kernel (built on a cache miss) and the test initramfs.
fn small_kernel() -> Guest {
    let kernel = script(&["scripts/build-linux.sh"]).remove(0);
    let initramfs = script(&["scripts/linux-guest.sh", "--initramfs-only"]).remove(0);
    Guest { kernel, initramfs }
}

/// Debian's stock kernel and the test initramfs.
fn debian_kernel() -> Guest {
    let p = script(&["scripts/linux-guest.sh"]);
    Guest {
        kernel: p[0].clone(),
        initramfs: p[1].clone(),
    }
}

/// Guests boot one at a time: two emulated kernels at once on a 2-core host would each
/// take twice as long.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn boot(g: &Guest, nodes: u32, cpus: u32, memory: &str, cmdline: &str, limit: Duration) -> Run {
    boot_with(g, nodes, cpus, memory, cmdline, &[], limit)
}

fn boot_with(
    g: &Guest,
    nodes: u32,
    cpus: u32,
    memory: &str,
    cmdline: &str,
    extra: &[&str],
    limit: Duration,
) -> Run {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let nodes = nodes.to_string();
    let cpus = cpus.to_string();
    let kernel = g.kernel.to_string_lossy().to_string();
    let initramfs = g.initramfs.to_string_lossy().to_string();
    dvmm(
        &[
            "run",
            "--kernel",
            &kernel,
            "--initramfs",
            &initramfs,
            "--cmdline",
            cmdline,
            "--nodes",
            &nodes,
            "--cpus",
            &cpus,
            "--memory",
            memory,
        ]
        .into_iter()
        .chain(extra.iter().copied())
        .collect::<Vec<_>>(),
        limit,
    )
}

/// SHA-256 of `bytes` in hex, by the host's `sha256sum`.
fn sha256(bytes: &[u8]) -> String {
    use std::io::Write;
    let mut child = Command::new("sha256sum")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("sha256sum");
    child.stdin.take().unwrap().write_all(bytes).unwrap();
    let out = child.wait_with_output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string()
}

/// A 64 MiB ext4 image holding /host.bin (256 KiB of varied bytes); returns its path
/// and the SHA-256 of host.bin.
fn disk_image(name: &str) -> (PathBuf, String) {
    let dir = std::env::temp_dir().join(format!("dvmm-linux-disk-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let root = dir.join("root");
    std::fs::create_dir_all(&root).unwrap();
    let content = varied_bytes(256 * 1024, 0x9e37_79b9_7f4a_7c15);
    std::fs::write(root.join("host.bin"), &content).unwrap();
    let image = dir.join("disk.img");
    let f = std::fs::File::create(&image).unwrap();
    f.set_len(64 << 20).unwrap();
    drop(f);
    let out = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-d"])
        .arg(&root)
        .arg(&image)
        .output()
        .expect("mkfs.ext4 (e2fsprogs)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    (image, sha256(&content))
}

/// The file `name` in the ext4 image, read by the host's debugfs.
fn file_in_image(image: &std::path::Path, name: &str) -> Vec<u8> {
    let out = Command::new("debugfs")
        .args(["-R", &format!("cat /{name}")])
        .arg(image)
        .output()
        .expect("debugfs (e2fsprogs)");
    out.stdout
}

/// The guest mounted the disk, read host.bin right, wrote guest.bin and unmounted; the
/// host finds guest.bin in the image with the checksum the guest printed, and the file
/// system is clean.
fn assert_disk_round_trip(run: &Run, image: &std::path::Path, host_sha: &str) {
    assert_eq!(run.code, Some(0), "{}", run.transcript());
    assert_eq!(
        line_with(run, "dvmm-init: disk host.bin"),
        format!("dvmm-init: disk host.bin sha256={host_sha}")
    );
    let guest_line = line_with(run, "dvmm-init: disk guest.bin sha256=");
    let guest_sha = guest_line.trim_start_matches("dvmm-init: disk guest.bin sha256=");
    assert!(
        run.stdout.contains("dvmm-init: disk unmounted"),
        "{}",
        run.transcript()
    );
    let written = file_in_image(image, "guest.bin");
    assert_eq!(written.len(), 256 * 1024, "guest.bin as the host reads it");
    assert_eq!(sha256(&written), guest_sha.trim());
    let fsck = Command::new("e2fsck")
        .args(["-f", "-n"])
        .arg(image)
        .output()
        .unwrap();
    assert!(
        fsck.status.success(),
        "e2fsck: {}",
        String::from_utf8_lossy(&fsck.stdout)
    );
}

/// The value after `key` on the console line starting with `prefix`.
fn line_with<'a>(run: &'a Run, prefix: &str) -> &'a str {
    run.stdout
        .lines()
        .find(|l| l.starts_with(prefix))
        .unwrap_or_else(|| panic!("no line starting {prefix:?}\n{}", run.transcript()))
}

fn kb_after(line: &str, key: &str) -> u64 {
    let rest = &line[line
        .find(key)
        .unwrap_or_else(|| panic!("{key} in {line:?}"))
        + key.len()..];
    rest.split_whitespace()
        .next()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("a number after {key} in {line:?}"))
}

/// Everything a good run shows: user space ran, saw every CPU and NUMA node with the
/// right memory and distances, and smp-check passed on every CPU; the guest powered off
/// and every node exited 0.
fn assert_good_run(run: &Run, nodes: u32, cpus: u32, memory_mib: u64) {
    assert_eq!(run.code, Some(0), "{}", run.transcript());
    assert!(
        run.stdout.contains("Run /init as init process"),
        "{}",
        run.transcript()
    );
    assert_eq!(
        line_with(run, "dvmm-init: nproc="),
        format!("dvmm-init: nproc={cpus}")
    );
    let total = kb_after(line_with(run, "dvmm-init: MemTotal:"), "MemTotal:");
    assert!(
        total > memory_mib * 1024 * 7 / 10 && total <= memory_mib * 1024,
        "MemTotal {total} kB for {memory_mib} MiB\n{}",
        run.transcript()
    );
    let want_nodes = if nodes == 1 {
        "0".to_string()
    } else {
        format!("0-{}", nodes - 1)
    };
    assert_eq!(
        line_with(run, "dvmm-init: numa nodes="),
        format!("dvmm-init: numa nodes={want_nodes}")
    );
    // Each NUMA node: the node's share of the RAM (less what the kernel reserved on it)
    // and SLIT distances 10 to itself, 20 to the others.
    let share = memory_mib * 1024 / u64::from(nodes);
    for n in 0..nodes {
        let l = line_with(run, &format!("dvmm-init: node{n} cpus="));
        let mem = kb_after(l, "MemTotal:");
        assert!(
            mem > share / 2 && mem <= share + 2048,
            "node {n}: MemTotal {mem} kB of a {share} kB share\n{}",
            run.transcript()
        );
        let want: Vec<&str> = (0..nodes)
            .map(|m| if m == n { "10" } else { "20" })
            .collect();
        assert!(l.ends_with(&format!("distance={}", want.join(","))), "{l}");
    }
    assert!(
        run.stdout.contains("smp-check: PASS"),
        "{}",
        run.transcript()
    );
    assert!(
        run.stdout.contains("smp-check: atomic ok"),
        "{}",
        run.transcript()
    );
    assert!(
        run.stdout.contains("smp-check: mutex ok"),
        "{}",
        run.transcript()
    );
    if cpus > 1 {
        assert!(run.stdout.contains("smp-check: message-passing ok"));
    }
    for cpu in 0..cpus {
        // A CPU's fresh memory must land on its own node (CPUs are split in blocks).
        let node = cpu * nodes / cpus;
        let want = format!("smp-check: numa ok (cpu {cpu} node {node}: 256/256 fresh pages local)");
        assert!(run.stdout.contains(&want), "{want}\n{}", run.transcript());
    }
    assert!(run.stdout.contains("dvmm-init: powering off"));
    // What a long run is quoted by (visible with --nocapture).
    for l in run.stdout.lines() {
        if l.contains("Run /init as init process") || l.starts_with("smp-check: numa") {
            eprintln!("{l}");
        }
    }
}

/// Varied bytes for the guest to check (xorshift, seeded).
fn varied_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// The host's TCP peer: accepts one connection on `listener`, reads exactly `expect`
/// bytes, sends `reply` and closes; returns the SHA-256 of what it read (empty if the
/// guest never connected or sent less before the VM ended).
fn tcp_peer(
    listener: std::net::TcpListener,
    expect: usize,
    reply: Vec<u8>,
    vm_ended: Ended,
) -> std::thread::JoinHandle<String> {
    use std::io::Read;
    std::thread::spawn(move || {
        let Some(mut conn) = accept_until(&listener, &vm_ended) else {
            return String::new();
        };
        let mut got = vec![0u8; expect];
        let mut have = 0;
        while have < expect {
            match conn.read(&mut got[have..]) {
                Ok(0) => return String::new(),
                Ok(n) => have += n,
                Err(e) if waiting(&e) && !ended(&vm_ended) => {}
                Err(_) => return String::new(),
            }
        }
        // The guest finds a short reply by its checksum.
        let _ = write_until(&mut conn, &reply, &vm_ended);
        sha256(&got)
    })
}

/// A client of the guest's virtio-console socket: waits for the socket, reads until the
/// guest's greeting, answers with `answer`, then reads until the guest hangs up or the
/// VM ends; returns everything it read.
fn hvc_client(
    path: PathBuf,
    answer: &'static str,
    vm_ended: Ended,
) -> std::thread::JoinHandle<String> {
    use std::io::{Read, Write};
    std::thread::spawn(move || {
        let mut s = loop {
            match std::os::unix::net::UnixStream::connect(&path) {
                Ok(s) => break s,
                Err(_) if !ended(&vm_ended) => std::thread::sleep(Duration::from_millis(100)),
                Err(e) => return format!("(no socket: {e})"),
            }
        };
        s.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let mut seen = Vec::new();
        let mut answered = false;
        let mut buf = [0u8; 4096];
        while !ended(&vm_ended) {
            match s.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => seen.extend_from_slice(&buf[..n]),
                Err(_) => {}
            }
            if !answered && String::from_utf8_lossy(&seen).contains("hello on hvc0") {
                s.write_all(answer.as_bytes()).unwrap();
                answered = true;
            }
        }
        String::from_utf8_lossy(&seen).into_owned()
    })
}

/// Boots the small kernel with a disk, a network card on a fresh TAP, virtio-rng and a
/// virtio-console socket, on `nodes` nodes with the disk and the card served by node
/// `serving` (the entropy device and the console by node 0) and the device checks on
/// vCPU `io_cpu`, and
/// checks the whole run: the good-run checks (CPUs, RAM and NUMA layout, smp-check) and
/// every device: the disk round trip, 4 MiB (2 MiB on 2 nodes) over TCP to the host
/// side of the card (a network namespace of its own, `Tap`) and 1 MiB back, with
/// matching checksums, bytes from the hwrng, a line each way on hvc0.
fn devices_round_trip(
    nodes: u32,
    serving: u32,
    io_cpu: u32,
    tag: &str,
    subnet: u8,
    limit: Duration,
) {
    let g = small_kernel();
    let (image, sha) = disk_image(tag);
    let tap = Tap::new(tag, subnet);
    let listener = tap.listen();
    let port = listener.local_addr().unwrap().port();
    // Every frame's buffers cross the DSM when the sender runs on another node: less
    // there (TCP runs at ~0.14 MiB/s out and ~0.2 in on one node of this emulating host,
    // about half that across nodes).
    let send: usize = if nodes == 1 { 4 << 20 } else { 2 << 20 };
    let back = 1 << 20;
    // smp-check's shared counters bounce between nodes: longer where that is the point.
    let iters = if nodes == 1 { 50 } else { 500 };
    let reply = varied_bytes(back, 0x1234_5678_9abc_def1);
    let reply_sha = sha256(&reply);
    let vm_ended = Ended::default();
    let peer = tcp_peer(listener, send, reply, vm_ended.clone());
    let socket = image.with_file_name("hvc0.sock");
    let _ = std::fs::remove_file(&socket);
    let hvc = hvc_client(socket.clone(), "ping from the host\n", vm_ended.clone());
    let cmdline = format!(
        "console=ttyS0 dvmm.iters={iters} dvmm.io_cpu={io_cpu} dvmm.hvc_read dvmm.net={},{}:{port},{send}",
        tap.guest_ip, tap.host_ip
    );
    let disk = format!("path={},node={serving}", image.display());
    let net = format!(
        "tap={},mac=52:54:00:aa:bb:0{nodes},node={serving}",
        tap.name
    );
    let console = format!("socket={}", socket.display());
    let run = boot_with(
        &g,
        nodes,
        2,
        "256M",
        &cmdline,
        &[
            "--disk",
            &disk,
            "--net",
            &net,
            "--rng",
            "--console",
            &console,
        ],
        limit,
    );
    vm_ended.store(true, std::sync::atomic::Ordering::SeqCst);
    assert_good_run(&run, nodes, 2, 256);
    let t = run.transcript();
    assert!(
        run.stdout
            .contains(&format!("dvmm-init: device checks on cpu {io_cpu}")),
        "{t}"
    );
    // The bus enumerates and the drivers bind without a warning from the kernel.
    assert!(run.stdout.contains("dvmm-init: pci warnings=0"), "{t}");
    assert_disk_round_trip(&run, &image, &sha);
    assert!(
        run.stdout.contains("[vda] 131072 512-byte logical blocks"),
        "{t}"
    );
    // Network: the MAC given, what the guest sent arrived whole, what the host sent too.
    assert!(
        run.stdout
            .contains(&format!("dvmm-init: net eth0 mac=52:54:00:aa:bb:0{nodes}")),
        "{t}"
    );
    let sent = run
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix(&format!("dvmm-init: net sending {send} bytes sha256=")))
        .unwrap_or_else(|| panic!("the guest sent nothing:\n{t}"))
        .trim()
        .to_string();
    assert_eq!(peer.join().unwrap(), sent, "what the host got\n{t}");
    assert!(
        run.stdout.contains(&format!(
            "dvmm-init: net received {back} bytes sha256={reply_sha}"
        )),
        "{t}"
    );
    // The offloads were taken and used both ways: the host's TCP handed the card whole
    // segments, and so did the guest's (dvmm's end-of-run line counts them).
    let tso = |after: &str| -> u64 {
        run.stderr
            .lines()
            .find(|l| l.contains("virtio-net0 (") && l.contains(" frames to the guest ("))
            .and_then(|l| l.split(after).nth(1))
            .and_then(|r| r.trim_start_matches(" (").split(' ').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no virtio-net counters after {after:?}:\n{t}"))
    };
    assert!(tso("frames to the guest") > 0, "{t}");
    assert!(tso("from it") > 0, "{t}");
    // Entropy: the virtio hwrng is current and gave 32 bytes, not all zero.
    let rng = run
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("dvmm-init: rng current=virtio_rng"))
        .unwrap_or_else(|| panic!("no virtio-rng in the guest:\n{t}"));
    let hex = rng.split("bytes=").nth(1).unwrap_or_default().trim();
    assert_eq!(hex.len(), 64, "{rng}");
    assert_ne!(hex, "0".repeat(64), "{rng}");
    // Console: the greeting reached the socket, the answer reached the guest.
    let seen = hvc.join().unwrap();
    assert!(
        seen.contains("dvmm-init: hello on hvc0"),
        "socket saw: {seen:?}\n{t}"
    );
    assert!(
        run.stdout
            .contains("dvmm-init: hvc0 read: ping from the host"),
        "{t}"
    );
    assert!(!socket.exists(), "the console socket is removed at the end");
}

#[test]
fn small_kernel_devices_one_node() {
    devices_round_trip(1, 0, 0, "one", 8, Duration::from_secs(600));
}

#[test]
fn small_kernel_devices_on_node_1_used_from_node_0() {
    // The disk and the card are node 1's; the shell that uses them runs on vCPU 0, which
    // is node 0's: node 0's bus forwards their configuration and BAR accesses to node
    // 1, their DMA reaches node 0's buffers through the DSM, their MSI-X completions
    // cross back, and so do the frames that arrive on their own. (The entropy device
    // and the console are node 0's, used there.)
    devices_round_trip(2, 1, 0, "two", 9, Duration::from_secs(900));
}

#[test]
#[ignore = "the mirror placement of the test above: ~6 min more here; run before resolving"]
fn small_kernel_devices_on_node_0_used_from_node_1() {
    // The devices are node 0's, the shell runs on vCPU 1 (node 1's): its descriptors
    // and buffers are written on node 1 and read by node 0's device through the DSM,
    // and the card's completions are MSI-X messages sent across to node 1.
    devices_round_trip(2, 0, 1, "rev", 10, Duration::from_secs(900));
}

#[test]
fn small_kernel_panic_ends_every_node() {
    // No init at all: the kernel panics ("No working init found"), pvpanic ends the VM,
    // every node exits 3 and the panic line reaches stderr.
    let g = small_kernel();
    let run = boot(
        &g,
        2,
        2,
        "256M",
        "console=ttyS0 rdinit=/nonexistent init=/nonexistent",
        Duration::from_secs(600),
    );
    assert_eq!(run.code, Some(3), "{}", run.transcript());
    assert!(
        run.stderr.contains("Kernel panic - not syncing"),
        "{}",
        run.transcript()
    );
    assert!(
        run.stderr
            .contains("dvmm: nodes ended: node 0: exit 3, node 1: exit 3"),
        "{}",
        run.transcript()
    );
}

#[test]
#[ignore = "Debian's stock kernel: ~10 min of emulated boot here; run before resolving"]
fn debian_one_node_two_cpus() {
    let g = debian_kernel();
    let run = boot(&g, 1, 2, "512M", "console=ttyS0", Duration::from_secs(1800));
    assert_good_run(&run, 1, 2, 512);
}

#[test]
#[ignore = "Debian's stock kernel: ~10 min of emulated boot here; run before resolving"]
fn debian_two_nodes() {
    let g = debian_kernel();
    let run = boot(&g, 2, 2, "512M", "console=ttyS0", Duration::from_secs(2400));
    assert_good_run(&run, 2, 2, 512);
}

#[test]
#[ignore = "Debian's stock kernel: ~10 min of emulated boot here; run before resolving"]
fn debian_four_nodes() {
    let g = debian_kernel();
    let run = boot(&g, 4, 4, "1G", "console=ttyS0", Duration::from_secs(3600));
    assert_good_run(&run, 4, 4, 1024);
}

#[test]
fn kernel_without_an_entry_is_refused() {
    // An ELF that is neither a bzImage nor has a PVH note: a clear error, exit 1.
    let dir = std::env::temp_dir().join(format!("dvmm-linux-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let elf = dir.join("vmlinux-no-pvh");
    let out = Command::new("gcc")
        .args(["-nostdlib", "-static", "-x", "c", "-", "-o"])
        .arg(&elf)
        .stdin(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            use std::io::Write;
            c.stdin
                .take()
                .expect("stdin")
                .write_all(b"void _start(void){for(;;);}\n")?;
            c.wait()
        })
        .expect("gcc");
    assert!(out.success());
    let run = dvmm(
        &["run", "--kernel", elf.to_str().unwrap(), "--memory", "64M"],
        Duration::from_secs(30),
    );
    assert_eq!(run.code, Some(1), "{}", run.transcript());
    assert!(run.stderr.contains("PVH"), "{}", run.transcript());
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A pseudo-terminal: the master end for the test, the slave end for dvmm's stdio.
fn open_pty() -> (std::fs::File, std::fs::File) {
    use std::os::fd::FromRawFd;
    use std::os::unix::fs::OpenOptionsExt;
    // SAFETY: posix_openpt takes flags only and returns a new descriptor or -1.
    let m = unsafe { libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY) };
    assert!(m >= 0, "posix_openpt: {}", std::io::Error::last_os_error());
    // SAFETY: `m` is a descriptor we just opened and own from here on.
    let master = unsafe { std::fs::File::from_raw_fd(m) };
    let mut name = [0 as libc::c_char; 128];
    // SAFETY: grantpt/unlockpt act on our master descriptor; ptsname_r writes at most
    // `name.len()` bytes into our buffer.
    let ok = unsafe {
        libc::grantpt(m) == 0
            && libc::unlockpt(m) == 0
            && libc::ptsname_r(m, name.as_mut_ptr(), name.len()) == 0
    };
    assert!(ok, "pty setup: {}", std::io::Error::last_os_error());
    // SAFETY: ptsname_r succeeded, so `name` holds a NUL-terminated path.
    let path = unsafe { std::ffi::CStr::from_ptr(name.as_ptr()) }
        .to_string_lossy()
        .to_string();
    let slave = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOCTTY)
        .open(&path)
        .unwrap_or_else(|e| panic!("open {path}: {e}"));
    (master, slave)
}

/// What the guest wrote to the terminal so far, and how far the test has read it.
struct Screen {
    text: std::sync::Arc<std::sync::Mutex<String>>,
    seen: usize,
}

impl Screen {
    /// Waits until `want` appears after what earlier waits consumed; returns the text
    /// up to and including it.
    fn wait_for(&mut self, want: &str, limit: Duration) -> String {
        let start = std::time::Instant::now();
        loop {
            {
                let text = self.text.lock().unwrap_or_else(|e| e.into_inner());
                if let Some(at) = text[self.seen..].find(want) {
                    let end = self.seen + at + want.len();
                    let got = text[self.seen..end].to_string();
                    self.seen = end;
                    return got;
                }
                if start.elapsed() > limit {
                    panic!("{want:?} not on the terminal within {limit:?}; it shows:\n{text}");
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

#[test]
fn small_kernel_shell_on_a_terminal() {
    // dvmm on a terminal (a pty that is its controlling terminal, as in a login shell):
    // typed lines reach busybox sh across 2 nodes, its output comes back, and Ctrl-C
    // interrupts the guest's foreground process instead of stopping dvmm.
    use std::io::{Read, Write};
    use std::os::unix::process::CommandExt;
    let g = small_kernel();
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let (mut master, slave) = open_pty();
    let mut cmd = Command::new(common::dvmm_bin());
    cmd.args(["run", "--kernel"])
        .arg(&g.kernel)
        .arg("--initramfs")
        .arg(&g.initramfs)
        .args([
            "--cmdline",
            "console=ttyS0 dvmm.iters=50 dvmm.shell",
            "--nodes",
            "2",
            "--cpus",
            "2",
            "--memory",
            "256M",
        ])
        .env("RUST_LOG", "info")
        .stdin(slave.try_clone().expect("dup pty"))
        .stdout(slave.try_clone().expect("dup pty"))
        .stderr(std::process::Stdio::piped());
    // SAFETY: between fork and exec the child only makes the async-signal-safe calls
    // setsid and ioctl.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() < 0 || libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().expect("spawn dvmm");
    drop(slave);
    let mut err = child.stderr.take().expect("stderr");
    let t_err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let text = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let mut reader = master.try_clone().expect("dup pty");
    let sink = text.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        // Ends with EIO once dvmm has closed the terminal.
        while let Ok(n) = reader.read(&mut buf) {
            if n == 0 {
                break;
            }
            let mut t = sink.lock().unwrap_or_else(|e| e.into_inner());
            t.push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    });
    let mut screen = Screen { text, seen: 0 };
    let mut kill_on_panic = KillOnDrop(&mut child);
    // A 2-node boot to /init plus smp-check: 900 s, as for the 2-node device test (a
    // slow day's CI reached smp-check PASS just past the old 420 s).
    screen.wait_for("dvmm-init: starting a shell", Duration::from_secs(900));
    screen.wait_for("# ", Duration::from_secs(60));
    master.write_all(b"echo hi$((6*7))\r").expect("type");
    screen.wait_for("hi42", Duration::from_secs(60));
    // The subshell says it has started only once it is the foreground job.
    master
        .write_all(b"(echo st''arted; sleep 1000)\r")
        .expect("type");
    screen.wait_for("started", Duration::from_secs(60));
    std::thread::sleep(Duration::from_secs(2));
    master.write_all(b"\x03").expect("type Ctrl-C");
    master.write_all(b"echo rc=$?\r").expect("type");
    screen.wait_for("rc=130", Duration::from_secs(60));
    master.write_all(b"exit\r").expect("type");
    screen.wait_for("dvmm-init: powering off", Duration::from_secs(60));
    let status = kill_on_panic.wait_within(Duration::from_secs(60));
    let stderr = t_err.join().unwrap_or_default();
    assert_eq!(status, Some(0), "dvmm's exit; its messages:\n{stderr}");
    assert!(
        stderr.contains("Ctrl-A x stops the VM"),
        "dvmm did not see a terminal:\n{stderr}"
    );
}

/// Kills the child if the test panics before it ended.
struct KillOnDrop<'a>(&'a mut std::process::Child);

impl KillOnDrop<'_> {
    /// The exit code once the child ends within `limit` (None: still running, or a signal).
    fn wait_within(&mut self, limit: Duration) -> Option<i32> {
        common::wait_within(self.0, limit).and_then(|st| st.code())
    }
}

impl Drop for KillOnDrop<'_> {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
