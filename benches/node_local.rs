//! Node-local parallel work: the same vCPUs on one node and spread over several nodes,
//! side by side in one run.
//!
//! Each vCPU of testos runs a CPL3 sieve (its `user` check) over its own 128 KiB bitmap
//! for `--ms` milliseconds and reports how many rounds it completed. On one node that is
//! plain KVM; on K nodes each vCPU's bitmap pages move to its node on first touch (DSM
//! write faults) and stay there, so apart from that warm-up the work is node-local. The
//! figure of merit is the total rounds per second of all vCPUs, K nodes vs 1.
//!
//! Run: `cargo bench --bench node_local` (`-- --runs N --ms MS --cpus C --nodes K`).

use std::process::{Command, Stdio};

/// Total sieve rounds per second over all vCPUs of one run.
fn run_once(cpus: u32, nodes: u32, ms: u64) -> f64 {
    let cmdline = format!("testos testos.user-ms={ms} testos.iters=1");
    let mut args = vec![
        "run".to_string(),
        "--kernel".into(),
        dvmm_testos::TESTOS_ELF.into(),
        "--cpus".into(),
        cpus.to_string(),
        "--memory".into(),
        "256M".into(),
        "--cmdline".into(),
        cmdline,
    ];
    if nodes > 1 {
        args.extend(["--nodes".into(), nodes.to_string()]);
    }
    let out = Command::new(env!("CARGO_BIN_EXE_dvmm"))
        .args(&args)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .expect("spawn dvmm");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains(dvmm_testos::PASS_LINE),
        "testos did not pass:\n{text}"
    );
    // "testos: cpu <i>: user ok (cpl3 sieve: P primes below L, N rounds in M ms, ...)"
    let mut total = 0.0;
    let mut seen = 0;
    for line in text.lines().filter(|l| l.contains(": user ok (")) {
        let rounds_ms = line
            .split(", ")
            .find_map(|part| part.strip_suffix(" ms")?.split_once(" rounds in "))
            .and_then(|(r, m)| Some((r.parse::<f64>().ok()?, m.parse::<f64>().ok()?)));
        if let Some((rounds, ms)) = rounds_ms {
            total += rounds / (ms / 1000.0);
            seen += 1;
        }
    }
    assert_eq!(seen, cpus, "not every vCPU reported its rounds:\n{text}");
    total
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn arg(args: &[String], name: &str, default: u64) -> u64 {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|n| n.parse().ok())
        .unwrap_or(default)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let runs = arg(&args, "--runs", 5) as usize;
    let ms = arg(&args, "--ms", 2000);
    let cpus = arg(&args, "--cpus", 2) as u32;
    let nodes = arg(&args, "--nodes", 2) as u32;
    println!(
        "node-local CPL3 sieve, {cpus} vCPUs for {ms} ms: 1 node vs {nodes} nodes, \
         {runs} interleaved runs each"
    );
    let (mut one, mut many) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        one.push(run_once(cpus, 1, ms));
        many.push(run_once(cpus, nodes, ms));
    }
    let (a, b) = (median(one.clone()), median(many.clone()));
    println!("1 node:       median {a:8.2} rounds/s (runs: {one:.2?})");
    println!("{nodes} nodes:      median {b:8.2} rounds/s (runs: {many:.2?})");
    println!(
        "ratio {nodes} nodes / 1 node: {:.3} (target >= 0.90)",
        b / a
    );
}
