//! `dvmm top`: a live view of a running VM from its control API: per node and vCPU,
//! exits/s; per node, DSM faults/s and MiB/s on each link; and the hot pages: the pages
//! whose faults moved them most often since the last frame, which nodes fault on them,
//! and (with `--system-map`) the guest symbol they hold.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Result;
use dvmm_api::client::ApiClient;
use dvmm_api::Counters;
use dvmm_vmm::profile::SymbolTable;

/// `dvmm top`'s arguments.
#[derive(clap::Args, Debug)]
pub struct TopArgs {
    /// The VM's API socket (its `--api-socket`).
    #[arg(long, value_name = "PATH")]
    api_socket: PathBuf,
    /// Symbols of the guest (System.map format, e.g. a kernel's System.map or `nm` of
    /// an ELF image), to name the hot pages.
    #[arg(long, value_name = "FILE")]
    system_map: Option<PathBuf>,
    /// Seconds between frames.
    #[arg(long, default_value_t = 1.0)]
    interval: f64,
    /// Stop after this many frames (0: until Ctrl-C or the VM ends).
    #[arg(long, default_value_t = 0)]
    frames: u64,
}

/// Where Linux maps its image: the symbol of a physical address in the kernel image is
/// at this offset from it (for a kernel running at its link address).
const KERNEL_MAP: u64 = 0xffff_ffff_8000_0000;

fn symbol(symbols: Option<&SymbolTable>, gpa: u64) -> String {
    let Some(t) = symbols else {
        return String::new();
    };
    t.lookup(gpa)
        .or_else(|| t.lookup(gpa.wrapping_add(KERNEL_MAP)))
        .map(str::to_string)
        .unwrap_or_default()
}

/// Faults on one page since the last frame, by node: (reads, writes).
type ByNode = BTreeMap<u32, (u64, u64)>;

fn dsm(c: &dvmm_api::NodeCounters, k: &str) -> u64 {
    c.dsm.get(k).copied().unwrap_or(0)
}

/// One frame from two snapshots `dt` apart.
pub fn frame(
    info: &dvmm_api::VmInfo,
    prev: &Counters,
    now: &Counters,
    dt: f64,
    symbols: Option<&SymbolTable>,
) -> String {
    let dt = dt.max(1e-3);
    let mut out = String::new();
    let _ = writeln!(
        out,
        "dvmm top: {} node(s), {} vCPU(s), {} MiB, {:?}   (q: Ctrl-C)",
        info.nodes,
        info.vcpus,
        info.memory_bytes >> 20,
        info.state
    );
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "{:<6} {:>8} {:>10} {:>10} {:>10}   links (MiB/s out/in, rtt)",
        "node", "vcpu", "exits/s", "faults/s", "pages/s"
    );
    let before: BTreeMap<u32, &dvmm_api::NodeCounters> =
        prev.nodes.iter().map(|n| (n.node, n)).collect();
    // Per page: faults since the last frame, by node (reads, writes).
    let mut pages: BTreeMap<u64, ByNode> = BTreeMap::new();
    for n in &now.nodes {
        let p = before.get(&n.node);
        let faults = (dsm(n, "read_faults") + dsm(n, "write_faults"))
            .saturating_sub(p.map_or(0, |p| dsm(p, "read_faults") + dsm(p, "write_faults")));
        let moved =
            dsm(n, "pages_received").saturating_sub(p.map_or(0, |p| dsm(p, "pages_received")));
        let mut links = Vec::new();
        for l in &n.peers {
            let old = p.and_then(|p| p.peers.iter().find(|o| o.peer == l.peer));
            let out_b = l.bytes_sent.saturating_sub(old.map_or(0, |o| o.bytes_sent));
            let in_b = l
                .bytes_received
                .saturating_sub(old.map_or(0, |o| o.bytes_received));
            links.push(format!(
                "->{} {:.2}/{:.2} {}",
                l.peer,
                out_b as f64 / dt / 1048576.0,
                in_b as f64 / dt / 1048576.0,
                if !l.up {
                    "DOWN".to_string()
                } else if l.rtt_ns == 0 {
                    "-".to_string()
                } else {
                    format!("{:.0}us", l.rtt_ns as f64 / 1000.0)
                }
            ));
        }
        let _ = writeln!(
            out,
            "{:<6} {:>8} {:>10} {:>10.0} {:>10.0}   {}",
            n.node,
            "",
            "",
            faults as f64 / dt,
            moved as f64 / dt,
            links.join("  ")
        );
        for v in &n.vcpus {
            let old = p
                .and_then(|p| p.vcpus.iter().find(|o| o.index == v.index))
                .map_or(0, |o| o.exits_total);
            let _ = writeln!(
                out,
                "{:<6} {:>8} {:>10.0}",
                "",
                v.index,
                v.exits_total.saturating_sub(old) as f64 / dt
            );
        }
        for h in &n.hot_pages {
            let (r0, w0) = p
                .and_then(|p| p.hot_pages.iter().find(|o| o.gpa == h.gpa))
                .map_or((0, 0), |o| (o.read_faults, o.write_faults));
            let d = (
                h.read_faults.saturating_sub(r0),
                h.write_faults.saturating_sub(w0),
            );
            if d.0 + d.1 > 0 {
                pages.entry(h.gpa).or_default().insert(n.node, d);
            }
        }
    }
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "hot pages (faults/s since the last frame; nodes: reads/writes)"
    );
    let mut hot: Vec<(u64, u64, &ByNode)> = pages
        .iter()
        .map(|(gpa, by)| (*gpa, by.values().map(|(r, w)| r + w).sum(), by))
        .collect();
    hot.sort_by_key(|(gpa, n, _)| (std::cmp::Reverse(*n), *gpa));
    if hot.is_empty() {
        let _ = writeln!(out, "  (none moved)");
    }
    for (gpa, n, by) in hot.iter().take(12) {
        let nodes: Vec<String> = by
            .iter()
            .map(|(node, (r, w))| format!("n{node} {r}/{w}"))
            .collect();
        let fight = if by.len() > 1 { " CONTENDED" } else { "" };
        let _ = writeln!(
            out,
            "  {gpa:#012x} {:>8.0}/s  {:<24} {}{fight}",
            *n as f64 / dt,
            nodes.join(", "),
            symbol(symbols, *gpa)
        );
    }
    out
}

/// Runs `dvmm top`.
pub fn run(args: TopArgs) -> Result<u8> {
    let c = ApiClient::new(&args.api_socket);
    let symbols = args
        .system_map
        .as_deref()
        .map(SymbolTable::load)
        .transpose()?;
    let interval = Duration::from_secs_f64(args.interval.clamp(0.1, 3600.0));
    let mut prev = c.counters()?;
    let mut t_prev = Instant::now();
    let mut shown = 0u64;
    loop {
        std::thread::sleep(interval);
        let (info, now) = match (c.info(), c.counters()) {
            (Ok(i), Ok(n)) => (i, n),
            (Err(e), _) | (_, Err(e)) => {
                println!("dvmm top: the VM is gone ({e})");
                return Ok(0);
            }
        };
        let dt = t_prev.elapsed().as_secs_f64();
        t_prev = Instant::now();
        let text = frame(&info, &prev, &now, dt, symbols.as_ref());
        // Home and clear, then the frame.
        print!("\x1b[H\x1b[2J{text}");
        use std::io::Write;
        let _ = std::io::stdout().flush();
        prev = now;
        shown += 1;
        if args.frames != 0 && shown >= args.frames {
            return Ok(0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dvmm_api::{HotPage, NodeCounters, PeerCounters, VcpuCounters, VmInfo, VmState};

    fn node(n: u32, exits: u64, faults: u64, hot: &[(u64, u64, u64)], sent: u64) -> NodeCounters {
        NodeCounters {
            node: n,
            vcpus: vec![VcpuCounters {
                index: n,
                exits_total: exits,
                exits: Default::default(),
            }],
            dsm: [("write_faults".to_string(), faults)].into(),
            paused_ns: 0,
            hot_pages: hot
                .iter()
                .map(|&(gpa, r, w)| HotPage {
                    gpa,
                    read_faults: r,
                    write_faults: w,
                })
                .collect(),
            peers: vec![PeerCounters {
                peer: 1 - n,
                up: true,
                bytes_sent: sent,
                bytes_received: 0,
                rtt_ns: 80_000,
            }],
        }
    }

    #[test]
    fn a_frame_shows_rates_and_the_pages_two_nodes_fight_over() {
        let info = VmInfo {
            state: VmState::Running,
            nodes: 2,
            node: None,
            vcpus: 2,
            local_vcpus: vec![0, 1],
            memory_bytes: 256 << 20,
            kernel: "k".into(),
            version: "v".into(),
            guest_clock_ns: None,
        };
        let prev = Counters {
            nodes: vec![
                node(0, 100, 10, &[(0x5000, 1, 1)], 0),
                node(1, 50, 0, &[], 0),
            ],
        };
        let now = Counters {
            nodes: vec![
                node(0, 300, 30, &[(0x5000, 1, 21), (0x9000, 4, 0)], 2 << 20),
                node(1, 150, 20, &[(0x5000, 0, 20)], 0),
            ],
        };
        let map = SymbolTable::parse("0000000000005000 D shared_counter\n0000000000006000 D x\n");
        let f = frame(&info, &prev, &now, 2.0, Some(&map));
        assert!(f.contains("2 node(s), 2 vCPU(s), 256 MiB"), "{f}");
        let lines: Vec<&str> = f.lines().collect();
        fn words(l: &str) -> Vec<&str> {
            l.split_whitespace().collect()
        }
        assert!(
            lines.iter().any(|l| words(l) == ["0", "100"]),
            "vCPU 0: 200 exits in 2 s\n{f}"
        );
        assert!(
            lines
                .iter()
                .any(|l| words(l).starts_with(&["0", "10", "0"])),
            "node 0: 20 faults in 2 s\n{f}"
        );
        assert!(f.contains("->1 1.00/0.00 80us"), "link rate\n{f}");
        let hot = lines
            .iter()
            .position(|l| l.starts_with("hot pages"))
            .unwrap();
        assert!(
            lines[hot + 1].contains("0x0000005000") && lines[hot + 1].contains("CONTENDED"),
            "{f}"
        );
        assert!(lines[hot + 1].contains("shared_counter"), "{f}");
        assert!(lines[hot + 1].contains("n0 0/20, n1 0/20"), "{f}");
        assert!(
            lines[hot + 2].contains("0x0000009000") && !lines[hot + 2].contains("CONTENDED"),
            "{f}"
        );
    }
}
