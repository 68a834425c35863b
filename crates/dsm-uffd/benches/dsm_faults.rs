//! Micro-benchmark of the DSM engine's fault paths, all in one process (plain threads
//! stand in for vCPUs, an in-process network for the transport). Prints medians.
//!
//! `cargo bench -p dvmm-dsm-uffd` (env `DSM_BENCH_N` = samples per case, default 500).

use std::time::Instant;

use dvmm_dsm_uffd::testing::Cluster;
use dvmm_dsm_uffd::{DsmStats, PAGE_SIZE};

const PG: usize = PAGE_SIZE as usize;

fn touch_read(p: *mut u8) -> u64 {
    // SAFETY: `p` points into a live view A of a cluster.
    unsafe { std::ptr::read_volatile(p.cast::<u64>()) }
}

fn touch_write(p: *mut u8, v: u64) {
    // SAFETY: as above.
    unsafe { std::ptr::write_volatile(p.cast::<u64>(), v) }
}

fn time(f: impl FnOnce()) -> f64 {
    let t = Instant::now();
    f();
    t.elapsed().as_secs_f64() * 1e6
}

fn report(name: &str, mut us: Vec<f64>) {
    us.sort_by(f64::total_cmp);
    let q = |f: f64| us[((us.len() - 1) as f64 * f) as usize];
    println!(
        "{name:<52} median {:>8.1} us   p10 {:>8.1}   p90 {:>8.1}   (n={})",
        q(0.5),
        q(0.1),
        q(0.9),
        us.len()
    );
}

fn sum(c: &Cluster, f: impl Fn(&DsmStats) -> u64) -> u64 {
    c.engines.iter().map(|e| f(&e.stats())).sum()
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let n: usize = std::env::var("DSM_BENCH_N")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(500);

    // Floor: one node, read fault on a hole -> engine -> UFFDIO_COPY (zero, WP), no messages.
    {
        let c = Cluster::new(1, n * PG, n as u64, &[], |_| {})?;
        let us = (0..n)
            .map(|i| time(|| assert_eq!(touch_read(c.a(0, i * PG)), 0)))
            .collect();
        report("floor: local fault + UFFDIO_COPY (1 node)", us);
        assert_eq!(sum(&c, |s| s.msgs_sent), 0);
    }
    // Remote read fault: page homed and written (owned) by node 1, read by node 0.
    {
        let c = Cluster::new(2, 2 * n * PG, n as u64, &[], |_| {})?;
        for i in 0..n {
            touch_write(c.a(1, (n + i) * PG), i as u64 + 1);
        }
        let us = (0..n)
            .map(|i| time(|| assert_eq!(touch_read(c.a(0, (n + i) * PG)), i as u64 + 1)))
            .collect();
        report("remote read fault (4 KiB from owner = home)", us);
    }
    // Remote read fault where the owner is a third node (home fetches from it).
    {
        let c = Cluster::new(3, 3 * n * PG, n as u64, &[], |_| {})?;
        for i in 0..n {
            touch_write(c.a(2, (n + i) * PG), i as u64 + 1);
        }
        let us = (0..n)
            .map(|i| time(|| assert_eq!(touch_read(c.a(0, (n + i) * PG)), i as u64 + 1)))
            .collect();
        report("remote read fault (owner is a third node)", us);
    }
    // Write faults with invalidation of k sharers: 4 nodes, home node 3 (holds no copy:
    // the pages were never written, so reads got zero grants), node 0 holds a read-only
    // copy and writes; nodes 1..=k hold copies.
    for k in [1usize, 2] {
        let c = Cluster::new(4, 4 * n * PG, n as u64, &[], |_| {})?;
        let base = 3 * n;
        for i in 0..n {
            for node in 0..=k {
                assert_eq!(touch_read(c.a(node, (base + i) * PG)), 0);
            }
        }
        let inv0 = sum(&c, |s| s.invalidations);
        let us = (0..n)
            .map(|i| time(|| touch_write(c.a(0, (base + i) * PG), 8)))
            .collect();
        report(
            &format!("write fault (upgrade), invalidating {k} sharer(s)"),
            us,
        );
        assert_eq!(sum(&c, |s| s.invalidations) - inv0, (k * n) as u64);
    }
    // Write fault without a copy, page owned by another node (revoke + data).
    {
        let c = Cluster::new(2, 2 * n * PG, n as u64, &[], |_| {})?;
        for i in 0..n {
            touch_write(c.a(1, (n + i) * PG), 1);
        }
        let us = (0..n)
            .map(|i| time(|| touch_write(c.a(0, (n + i) * PG), 2)))
            .collect();
        report("write fault, page owned by the home (revoke + 4 KiB)", us);
    }
    Ok(())
}
