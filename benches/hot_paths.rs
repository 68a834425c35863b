//! Benchmarks of dvmm's hot paths on a real guest, side by side in one run.
//!
//! Boots testos (guests/testos) repeatedly and reports medians of:
//! - wall time from `dvmm run` to the guest's `testos: PASS` (1, 2 and 4 vCPUs);
//! - the guest's own measurements in `testos.bench` mode: a port-I/O exit, a LAPIC
//!   register read (x2APIC MSR exit or xAPIC MMIO exit), and a fixed-IPI round trip
//!   between two vCPUs (interrupt delivery to a halted vCPU and back to a running one).
//!
//! Run: `cargo bench --bench hot_paths` (add `-- --runs N` to change the repeat count,
//! `-- --guest-only` to skip the boot timings, whose 4-vCPU run is the guest's full
//! default checks: a minute and more on hosts that emulate guest kernel code).

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Instant;

/// One dvmm run; returns (seconds to PASS, guest output lines).
fn run_once(cpus: u32, extra: &str) -> (f64, Vec<String>) {
    let start = Instant::now();
    let mut child = Command::new(env!("CARGO_BIN_EXE_dvmm"))
        .args([
            "run",
            "--kernel",
            dvmm_testos::TESTOS_ELF,
            "--cpus",
            &cpus.to_string(),
            "--memory",
            "256M",
            "--cmdline",
            &format!("testos {extra}"),
        ])
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn dvmm");
    let out = BufReader::new(child.stdout.take().expect("stdout"));
    let mut pass_at = None;
    let mut lines = Vec::new();
    for line in out.lines().map_while(Result::ok) {
        if line.starts_with(dvmm_testos::PASS_LINE) {
            pass_at = Some(start.elapsed().as_secs_f64());
        }
        lines.push(line);
    }
    let status = child.wait().expect("wait");
    let Some(t) = pass_at.filter(|_| status.success()) else {
        panic!("testos did not pass ({status}):\n{}", lines.join("\n"));
    };
    (t, lines)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Parses "testos: bench: <name> median <N> ns ...".
fn bench_value(lines: &[String], name: &str) -> Option<f64> {
    let prefix = format!("testos: bench: {name} median ");
    lines
        .iter()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let runs = args
        .iter()
        .position(|a| a == "--runs")
        .and_then(|i| args.get(i + 1))
        .and_then(|n| n.parse().ok())
        .unwrap_or(5usize);
    let guest_only = args.iter().any(|a| a == "--guest-only");
    println!("dvmm hot paths: medians of {runs} runs each, interleaved");

    let configs: &[u32] = if guest_only { &[] } else { &[1, 2, 4] };
    let mut boot: Vec<Vec<f64>> = vec![Vec::new(); configs.len()];
    let names = ["rdtsc-pair", "pio-exit", "lapic-read", "ipi-round-trip"];
    let mut guest: Vec<Vec<f64>> = vec![Vec::new(); names.len()];
    let mut guest_xapic: Vec<f64> = Vec::new();
    for _ in 0..runs {
        for (i, cpus) in configs.iter().enumerate() {
            boot[i].push(run_once(*cpus, "").0);
        }
        let (_, lines) = run_once(2, "testos.bench");
        for (i, n) in names.iter().enumerate() {
            if let Some(v) = bench_value(&lines, n) {
                guest[i].push(v);
            }
        }
        let (_, lines) = run_once(2, "testos.bench xapic");
        if let Some(v) = bench_value(&lines, "lapic-read") {
            guest_xapic.push(v);
        }
    }
    for (i, cpus) in configs.iter().enumerate() {
        println!(
            "boot-to-PASS  {cpus} vCPU(s): {:8.3} s",
            median(boot[i].clone())
        );
    }
    for (i, n) in names.iter().enumerate() {
        if !guest[i].is_empty() {
            println!("{n:<22} {:10.1} us", median(guest[i].clone()) / 1000.0);
        }
    }
    if !guest_xapic.is_empty() {
        println!(
            "{:<22} {:10.1} us",
            "lapic-read (xapic)",
            median(guest_xapic) / 1000.0
        );
    }
}
