//! Guest I/O through dvmm's virtio devices, side by side with the host in one run.
//!
//! Disk: `io-bench` (guests/linux/io-bench.c: O_DIRECT, 1 MiB sequential write and
//! read, then random 4 KiB reads) on a scratch image, run by the host on the image file
//! and by the guest on the same image as its virtio-blk `/dev/vda`: on one node, and on
//! two nodes with the devices and the guest's process on different nodes, both ways
//! (devices on node 0 and the process pinned to vCPU 1, which is node 1's; devices on
//! node 1 with `node=1` and the process on vCPU 0), so requests, DMA and completions
//! cross nodes. The host's own `dd` (O_DIRECT,
//! 1 MiB) on the image is printed beside it.
//! Network: the guest sends MiB of zeros over TCP through virtio-net and a TAP to the
//! host side (a network namespace bridged to the TAP), then receives as many; the host
//! times both directions.
//!
//! Run (root; iproute2, gcc): `cargo bench --bench devices` (`-- --mib N --seconds S
//! --net-mib M`, and `--nodes 1` or `--nodes 2` for only those guest rows). It builds
//! the small kernel on a cache miss, as the tests do.

#[path = "../tests/common/mod.rs"]
mod common;

use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{accept_until, dvmm, ended, script, waiting, Ended, Tap};

/// The `KEY=value` fields of the io-bench line for `test` in `text`.
fn field(text: &str, test: &str, key: &str) -> Option<f64> {
    let line = text
        .lines()
        .find(|l| l.contains(&format!("io-bench: {test} ")))?;
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(&format!("{key}=")))
        .and_then(|v| v.parse().ok())
}

/// MB/s from dd's last line ("... copied, 0.05 s, 1.3 GB/s"), in MiB/s.
fn dd_rate(args: &[&str]) -> f64 {
    let out = Command::new("dd").args(args).output().expect("dd");
    let text = String::from_utf8_lossy(&out.stderr);
    let last = text.lines().last().unwrap_or_default();
    let mut words = last.rsplit(' ');
    let unit = words.next().unwrap_or_default();
    let n: f64 = words.next().and_then(|v| v.parse().ok()).unwrap_or(0.0);
    let bytes = match unit {
        "GB/s" => n * 1e9,
        "MB/s" => n * 1e6,
        "kB/s" => n * 1e3,
        _ => n,
    };
    bytes / f64::from(1u32 << 20)
}

/// Times MiB from the guest, then MiB to it; returns (guest→host, host→guest) MiB/s,
/// 0 for a direction that did not complete before the VM ended.
fn net_peer(
    listener: TcpListener,
    mib: usize,
    vm_ended: Ended,
) -> std::thread::JoinHandle<(f64, f64)> {
    std::thread::spawn(move || {
        let rate = |t: Duration| mib as f64 / t.as_secs_f64().max(1e-9);
        let Some(mut up) = accept_until(&listener, &vm_ended) else {
            return (0.0, 0.0);
        };
        let mut buf = vec![0u8; 1 << 16];
        let mut got = 0usize;
        let mut start = None;
        while got < mib << 20 {
            match up.read(&mut buf) {
                Ok(0) => return (0.0, 0.0),
                Ok(n) => {
                    start.get_or_insert_with(Instant::now);
                    got += n;
                }
                Err(e) if waiting(&e) && !ended(&vm_ended) => {}
                Err(_) => return (0.0, 0.0),
            }
        }
        let up_rate = rate(start.map(|s| s.elapsed()).unwrap_or_default());
        drop(up);
        let Some(mut down) = accept_until(&listener, &vm_ended) else {
            return (up_rate, 0.0);
        };
        let start = Instant::now();
        let chunk = vec![0x5au8; 1 << 16];
        let mut left = mib << 20;
        while left > 0 {
            match down.write(&chunk[..left.min(chunk.len())]) {
                Ok(n) => left -= n,
                Err(e) if waiting(&e) && !ended(&vm_ended) => {}
                Err(_) => return (up_rate, 0.0),
            }
        }
        let _ = down.shutdown(std::net::Shutdown::Write);
        // The guest's nc closes once it has read everything.
        loop {
            match down.read(&mut buf) {
                Err(e) if waiting(&e) && !ended(&vm_ended) => {}
                _ => break,
            }
        }
        (up_rate, rate(start.elapsed()))
    })
}

struct Row {
    what: String,
    write: f64,
    read: f64,
    iops: f64,
    up: f64,
    down: f64,
}

fn guest_run(
    kernel: &Path,
    initramfs: &Path,
    image: &Path,
    (nodes, serving, io_cpu): (u32, u32, u32),
    (mib, seconds, net_mib): (u64, u64, usize),
) -> Row {
    let tap = Tap::new(
        &format!("b{nodes}{serving}"),
        u8::try_from(10 + 2 * nodes + serving).unwrap_or(10),
    );
    let listener = tap.listen();
    let port = listener.local_addr().expect("port").port();
    let vm_ended = Ended::default();
    let peer = net_peer(listener, net_mib, vm_ended.clone());
    let cmdline = format!(
        "console=ttyS0 dvmm.iters=10 dvmm.io_cpu={io_cpu} dvmm.bench={mib},{seconds} \
         dvmm.netbench={},{}:{port},{net_mib}",
        tap.guest_ip, tap.host_ip
    );
    let (nodes_s, kernel_s, initramfs_s) = (
        nodes.to_string(),
        kernel.display().to_string(),
        initramfs.display().to_string(),
    );
    let disk = format!("path={},node={serving}", image.display());
    let net = format!("tap={},node={serving}", tap.name);
    let run = dvmm(
        &[
            "run",
            "--kernel",
            &kernel_s,
            "--initramfs",
            &initramfs_s,
            "--cmdline",
            &cmdline,
            "--nodes",
            &nodes_s,
            "--cpus",
            "2",
            "--memory",
            "256M",
            "--disk",
            &disk,
            "--net",
            &net,
        ],
        Duration::from_secs(1800),
    );
    vm_ended.store(true, std::sync::atomic::Ordering::SeqCst);
    let (up, down) = peer.join().unwrap_or((0.0, 0.0));
    let out = &run.stdout;
    if field(out, "seq-read", "MiB/s").is_none() || up == 0.0 || down == 0.0 {
        eprintln!("{}", run.transcript());
    }
    Row {
        what: if nodes == 1 {
            "guest, 1 node".into()
        } else {
            format!(
                "guest, {nodes} nodes, process on node {} (devices on node {serving})",
                io_cpu * nodes / 2
            )
        },
        write: field(out, "seq-write", "MiB/s").unwrap_or(0.0),
        read: field(out, "seq-read", "MiB/s").unwrap_or(0.0),
        iops: field(out, "rand-read-4k", "IOPS").unwrap_or(0.0),
        up,
        down,
    }
}

fn main() {
    let mut mib = 64u64;
    let mut seconds = 5u64;
    let mut net_mib = 16usize;
    let mut only_nodes: Option<u32> = None;
    let args: Vec<String> = std::env::args().collect();
    for w in args.windows(2) {
        match w[0].as_str() {
            "--mib" => mib = w[1].parse().expect("--mib N"),
            "--seconds" => seconds = w[1].parse().expect("--seconds S"),
            "--net-mib" => net_mib = w[1].parse().expect("--net-mib M"),
            "--nodes" => only_nodes = Some(w[1].parse().expect("--nodes 1|2")),
            _ => {}
        }
    }
    let kernel = script(&["scripts/build-linux.sh"]).remove(0);
    let initramfs = script(&["scripts/linux-guest.sh", "--initramfs-only"]).remove(0);
    let dir = std::env::temp_dir().join(format!("dvmm-bench-devices-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let image = dir.join("scratch.img");
    std::fs::File::create(&image)
        .and_then(|f| f.set_len((mib + 16) << 20))
        .expect("scratch image");
    let host_bench = dir.join("io-bench");
    let cc = Command::new("gcc")
        .args(["-O2", "-o"])
        .arg(&host_bench)
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("guests/linux/io-bench.c"))
        .status()
        .expect("gcc");
    assert!(cc.success(), "gcc io-bench.c");
    let img = image.display().to_string();
    let count = mib.to_string();
    let dd_write = dd_rate(&[
        "if=/dev/zero",
        &format!("of={img}"),
        "bs=1M",
        &format!("count={count}"),
        "oflag=direct",
        "conv=fsync,notrunc",
    ]);
    let dd_read = dd_rate(&[
        &format!("if={img}"),
        "of=/dev/null",
        "bs=1M",
        &format!("count={count}"),
        "iflag=direct",
    ]);
    let host = Command::new(&host_bench)
        .args([&img, &count, &seconds.to_string()])
        .output()
        .expect("io-bench on the host");
    let host_out = String::from_utf8_lossy(&host.stdout).into_owned();
    let mut rows = vec![Row {
        what: "host, io-bench on the image file".into(),
        write: field(&host_out, "seq-write", "MiB/s").unwrap_or(0.0),
        read: field(&host_out, "seq-read", "MiB/s").unwrap_or(0.0),
        iops: field(&host_out, "rand-read-4k", "IOPS").unwrap_or(0.0),
        up: f64::NAN,
        down: f64::NAN,
    }];
    rows.push(Row {
        what: "host, dd bs=1M O_DIRECT on the image file".into(),
        write: dd_write,
        read: dd_read,
        iops: f64::NAN,
        up: f64::NAN,
        down: f64::NAN,
    });
    // Each row as soon as it is measured: a guest run takes minutes here.
    println!(
        "devices: {mib} MiB sequential (1 MiB O_DIRECT), {seconds} s of 4 KiB random reads, \
         {net_mib} MiB each way over TCP"
    );
    println!(
        "| run | seq write MiB/s | seq read MiB/s | 4 KiB random read IOPS | TCP guest→host MiB/s | TCP host→guest MiB/s |"
    );
    println!("| --- | --- | --- | --- | --- | --- |");
    let print = |r: &Row| {
        let f = |v: f64, p: usize| {
            if v.is_nan() {
                "-".to_string()
            } else {
                format!("{v:.p$}")
            }
        };
        println!(
            "| {} | {} | {} | {} | {} | {} |",
            r.what,
            f(r.write, 1),
            f(r.read, 1),
            f(r.iops, 0),
            f(r.up, 2),
            f(r.down, 2)
        );
    };
    rows.iter().for_each(print);
    for placement in [(1, 0, 0), (2, 0, 1), (2, 1, 0)] {
        if only_nodes.is_some_and(|n| n != placement.0) {
            continue;
        }
        let start = Instant::now();
        print(&guest_run(
            &kernel,
            &initramfs,
            &image,
            placement,
            (mib, seconds, net_mib),
        ));
        eprintln!("(that run: {:.0} s)", start.elapsed().as_secs_f64());
    }
    let _ = std::fs::remove_dir_all(&dir);
}
