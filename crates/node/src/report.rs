//! `--report FILE`: what a run did, written when the VM ends, for a user asking "why
//! was it slow". Each node writes its part as JSON ([`NodeReport`]); [`render`] turns
//! one or all nodes' parts into text: time waited on remote memory, the pages several
//! nodes fault on (with the guest symbol they hold), traffic per link, the guest
//! profile's top entries, and suggestions where the data leaves no doubt.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use dvmm_api::NodeCounters;
use dvmm_vmm::profile::SymbolTable;
use serde::{Deserialize, Serialize};

/// One node's part of a report.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct NodeReport {
    /// The node.
    pub node: u32,
    /// Nodes in the VM.
    pub nodes: u32,
    /// vCPUs of the whole VM.
    pub vcpus: u32,
    /// How long this node ran the VM, in seconds.
    pub wall_s: f64,
    /// How the VM ended.
    pub outcome: String,
    /// The node's counters at the end.
    pub counters: NodeCounters,
    /// The guest profile's top entries on this node, if profiling: (where, samples).
    #[serde(default)]
    pub profile_top: Vec<(String, u64)>,
}

/// Why a report could not be written or read.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    /// Writing failed.
    #[error("cannot write the report {path}: {source}")]
    Write {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// A node's part cannot be read.
    #[error("cannot read the report part {path}: {why}")]
    Read {
        /// The file.
        path: PathBuf,
        /// What was wrong.
        why: String,
    },
}

/// Where a report's machine-readable part goes: `FILE.json`.
pub fn json_path(report: &Path) -> PathBuf {
    let mut p = report.as_os_str().to_owned();
    p.push(".json");
    PathBuf::from(p)
}

/// Writes `parts` as text to `path` and as JSON to `path.json`.
pub fn write(
    path: &Path,
    parts: &[NodeReport],
    symbols: Option<&SymbolTable>,
) -> Result<(), ReportError> {
    let err = |p: &Path| {
        let p = p.to_path_buf();
        move |source| ReportError::Write { path: p, source }
    };
    std::fs::write(path, render(parts, symbols)).map_err(err(path))?;
    let json = serde_json::to_vec_pretty(parts).unwrap_or_default();
    let jp = json_path(path);
    std::fs::write(&jp, json).map_err(err(&jp))?;
    tracing::info!(path = %path.display(), "run report written");
    Ok(())
}

/// Reads the parts another node wrote with [`write()`] (its `FILE.json`).
pub fn read_parts(json: &Path) -> Result<Vec<NodeReport>, ReportError> {
    let text = std::fs::read(json).map_err(|e| ReportError::Read {
        path: json.to_path_buf(),
        why: e.to_string(),
    })?;
    serde_json::from_slice(&text).map_err(|e| ReportError::Read {
        path: json.to_path_buf(),
        why: e.to_string(),
    })
}

/// Write faults each of two nodes must have on a page before the report calls it
/// write-shared.
const MIN_SHARED_WRITES: u64 = 10;

/// Where Linux maps its image (see `dvmm top`).
const KERNEL_MAP: u64 = 0xffff_ffff_8000_0000;

fn symbol(symbols: Option<&SymbolTable>, gpa: u64) -> String {
    symbols
        .and_then(|t| {
            t.lookup(gpa)
                .or_else(|| t.lookup(gpa.wrapping_add(KERNEL_MAP)))
        })
        .map(|s| format!(" ({s})"))
        .unwrap_or_default()
}

fn dsm(c: &NodeCounters, k: &str) -> u64 {
    c.dsm.get(k).copied().unwrap_or(0)
}

/// Faults on one page by node: (reads, writes).
type ByNode = BTreeMap<u32, (u64, u64)>;

/// The pages faulted on by more than one node, most faulted first.
fn contended(parts: &[NodeReport]) -> Vec<(u64, ByNode)> {
    let mut pages: BTreeMap<u64, ByNode> = BTreeMap::new();
    for p in parts {
        for h in &p.counters.hot_pages {
            pages
                .entry(h.gpa)
                .or_default()
                .insert(p.node, (h.read_faults, h.write_faults));
        }
    }
    let mut v: Vec<_> = pages.into_iter().filter(|(_, by)| by.len() > 1).collect();
    v.sort_by_key(|(gpa, by)| {
        (
            std::cmp::Reverse(by.values().map(|(r, w)| r + w).sum::<u64>()),
            *gpa,
        )
    });
    v
}

/// The report's text.
pub fn render(parts: &[NodeReport], symbols: Option<&SymbolTable>) -> String {
    let mut out = String::new();
    let Some(first) = parts.first() else {
        return "dvmm run report: no node reported\n".to_string();
    };
    let wall = parts.iter().map(|p| p.wall_s).fold(0.0, f64::max);
    let _ = writeln!(
        out,
        "dvmm run report: {} node(s), {} vCPU(s), {wall:.1} s, ended: {}",
        first.nodes, first.vcpus, first.outcome
    );
    if parts.len() < first.nodes as usize {
        let _ = writeln!(
            out,
            "(this report holds node(s) {:?} only: each node of a multi-host cluster writes its own)",
            parts.iter().map(|p| p.node).collect::<Vec<_>>()
        );
    }
    let mut tips = Vec::new();

    let _ = writeln!(out, "\nTime waiting on remote memory");
    for p in parts {
        let c = &p.counters;
        let vcpu_s = p.wall_s * c.vcpus.len() as f64;
        let waited = dsm(c, "fault_wait_ns") as f64 * 1e-9;
        let n = dsm(c, "faults_resolved");
        let share = if vcpu_s > 0.0 {
            100.0 * waited / vcpu_s
        } else {
            0.0
        };
        let _ = writeln!(
            out,
            "  node {}: {waited:.2} s of {vcpu_s:.1} vCPU-s ({share:.1} %), {n} faults waited for, {} us each on average",
            p.node,
            if n > 0 { (waited * 1e6 / n as f64).round() } else { 0.0 }
        );
        if share >= 20.0 {
            tips.push(format!(
                "node {}'s vCPUs waited on remote memory {share:.0} % of their time: the guest's \
                 threads there work on memory other nodes use (see the pages below); pin \
                 cooperating threads to one node's CPUs, or give each node its own data",
                p.node
            ));
        }
    }

    let hot = contended(parts);
    let mut shared_said = false;
    let _ = writeln!(
        out,
        "\nPages several nodes fault on (faults since the start: node reads/writes)"
    );
    if hot.is_empty() {
        let _ = writeln!(out, "  none");
    }
    for (gpa, by) in hot.iter().take(12) {
        let nodes: Vec<String> = by
            .iter()
            .map(|(n, (r, w))| format!("node {n} {r}/{w}"))
            .collect();
        let _ = writeln!(
            out,
            "  {gpa:#x}{}: {}",
            symbol(symbols, *gpa),
            nodes.join(", ")
        );
        // Certain: at least two nodes each wrote the page often enough to have moved it
        // back and forth many times.
        let writers: Vec<(u32, u64)> = by
            .iter()
            .filter(|(_, (_, w))| *w >= MIN_SHARED_WRITES)
            .map(|(n, (_, w))| (*n, *w))
            .collect();
        if writers.len() > 1 && tips.len() < 8 {
            let w: u64 = writers.iter().map(|(_, w)| w).sum();
            let names: Vec<String> = writers.iter().map(|(n, _)| n.to_string()).collect();
            let counts: Vec<String> = writers.iter().map(|(_, w)| w.to_string()).collect();
            tips.push(format!(
                "page {gpa:#x}{} is written by vCPUs on nodes {} ({} write faults, {:.1}/s): \
                 it ping-pongs between them{}",
                symbol(symbols, *gpa),
                names.join(" and "),
                counts.join(" and "),
                w as f64 / wall.max(1e-3),
                if shared_said {
                    String::new()
                } else {
                    shared_said = true;
                    "; different variables on one page are false sharing (give each node's \
                     data its own page), one variable (a lock, a counter) is true sharing \
                     (keep it per node and combine rarely)"
                        .to_string()
                }
            ));
        }
    }

    let _ = writeln!(out, "\nLinks (payload sent / received, last round trip)");
    let mut any_link = false;
    for p in parts {
        for l in &p.counters.peers {
            any_link = true;
            let _ = writeln!(
                out,
                "  node {} -> {}: {:.2} MiB / {:.2} MiB, {}{}",
                p.node,
                l.peer,
                l.bytes_sent as f64 / 1048576.0,
                l.bytes_received as f64 / 1048576.0,
                if l.rtt_ns == 0 {
                    "not measured".to_string()
                } else {
                    format!("{:.0} us", l.rtt_ns as f64 / 1000.0)
                },
                if l.up { "" } else { " (down at the end)" }
            );
        }
    }
    if !any_link {
        let _ = writeln!(out, "  none (one node)");
    }

    let _ = writeln!(out, "\nVM exits (whole run)");
    for p in parts {
        for v in &p.counters.vcpus {
            let mut kinds: Vec<(&String, &u64)> = v.exits.iter().filter(|(_, n)| **n > 0).collect();
            kinds.sort_by_key(|(_, n)| std::cmp::Reverse(**n));
            let top: Vec<String> = kinds
                .iter()
                .take(4)
                .map(|(k, n)| format!("{k} {n}"))
                .collect();
            let _ = writeln!(
                out,
                "  node {} vCPU {}: {} ({})",
                p.node,
                v.index,
                v.exits_total,
                top.join(", ")
            );
        }
    }

    let mut prof: BTreeMap<&str, u64> = BTreeMap::new();
    for p in parts {
        for (w, n) in &p.profile_top {
            *prof.entry(w.as_str()).or_default() += n;
        }
    }
    if !prof.is_empty() {
        let total: u64 = prof.values().sum();
        let mut v: Vec<(&str, u64)> = prof.into_iter().collect();
        v.sort_by_key(|(w, n)| (std::cmp::Reverse(*n), *w));
        let _ = writeln!(out, "\nGuest profile (top entries of --profile)");
        for (w, n) in v.iter().take(10) {
            let _ = writeln!(out, "  {:5.1} %  {w}", 100.0 * *n as f64 / total as f64);
        }
    }

    let _ = writeln!(out, "\nSuggestions");
    if tips.is_empty() {
        let _ = writeln!(
            out,
            "  none: nothing in this run is certain to be a problem"
        );
    }
    for t in tips {
        let _ = writeln!(out, "  - {t}");
    }
    out
}

/// The top `n` rows of a profile written by `--profile`, if one was.
pub fn profile_top(profile: Option<&Path>, n: usize) -> Vec<(String, u64)> {
    let Some(text) = profile.and_then(|p| std::fs::read_to_string(p).ok()) else {
        return Vec::new();
    };
    let mut rows = dvmm_vmm::profile::merge_reports(&[text]);
    rows.truncate(n);
    rows
}

#[cfg(test)]
mod tests {
    use super::*;
    use dvmm_api::HotPage;

    fn part(node: u32, hot: &[(u64, u64, u64)], waited_ns: u64) -> NodeReport {
        NodeReport {
            node,
            nodes: 2,
            vcpus: 2,
            wall_s: 10.0,
            outcome: "power off".into(),
            counters: NodeCounters {
                node,
                vcpus: vec![dvmm_api::VcpuCounters {
                    index: node,
                    exits_total: 5,
                    exits: [("pio".to_string(), 5)].into(),
                }],
                dsm: [
                    ("fault_wait_ns".to_string(), waited_ns),
                    ("faults_resolved".to_string(), 100),
                ]
                .into(),
                hot_pages: hot
                    .iter()
                    .map(|&(gpa, r, w)| HotPage {
                        gpa,
                        read_faults: r,
                        write_faults: w,
                    })
                    .collect(),
                ..Default::default()
            },
            profile_top: vec![("[halted]".into(), 3)],
        }
    }

    #[test]
    fn pages_written_on_two_nodes_are_called_out_with_their_symbol() {
        let parts = [
            part(0, &[(0x5000, 1, 40), (0x7000, 9, 0)], 1_000_000_000),
            part(1, &[(0x5000, 2, 30), (0x7000, 3, 0)], 4_000_000_000),
        ];
        let map = SymbolTable::parse("0000000000005000 D lock_word\n0000000000008000 D y\n");
        let r = render(&parts, Some(&map));
        assert!(
            r.contains("2 node(s), 2 vCPU(s), 10.0 s, ended: power off"),
            "{r}"
        );
        assert!(
            r.contains("0x5000 (lock_word): node 0 1/40, node 1 2/30"),
            "{r}"
        );
        assert!(
            r.contains("page 0x5000 (lock_word) is written by vCPUs on nodes 0 and 1 (40 and 30 write faults, 7.0/s)"),
            "{r}"
        );
        assert!(!r.contains("page 0x7000"), "read-shared is no problem\n{r}");
        assert!(
            r.contains("node 1's vCPUs waited on remote memory 40 %"),
            "{r}"
        );
        assert!(
            !r.contains("node 0's vCPUs waited"),
            "10 % is not called out\n{r}"
        );
        assert!(r.contains("[halted]"), "{r}");
    }

    #[test]
    fn a_quiet_run_suggests_nothing_and_the_json_round_trips() {
        let parts = [part(0, &[(0x5000, 1, 0)], 0)];
        let r = render(&parts, None);
        assert!(r.contains("none: nothing in this run is certain"), "{r}");
        assert!(r.contains("holds node(s) [0] only"), "{r}");
        let dir = std::env::temp_dir().join(format!("dvmm-report-{}", std::process::id()));
        write(&dir, &parts, None).unwrap();
        assert_eq!(read_parts(&json_path(&dir)).unwrap(), parts.to_vec());
        let _ = std::fs::remove_file(&dir);
        let _ = std::fs::remove_file(json_path(&dir));
    }
}
