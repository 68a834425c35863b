//! Faults on the node link, injected by a proxy between two nodes (this machine's
//! kernel has no `netem`): node 1 dials node 0 through [`FaultyLink`]. The guest's
//! results stay exact (testos checks every one of them), or the cluster stops with an
//! error naming the link; never a wrong result, never a hang.
//!
//! `DVMM_FAULT_ROUNDS=N` repeats the delay-and-jitter case N times with other delays
//! and seeds (`scripts/link-faults.sh` runs longer campaigns).

mod common;

use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::faulty_link::{Faults, FaultyLink};

/// One cluster at a time: they share this machine's two cores.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// Longest a run may take before the test calls it a hang.
const LIMIT: Duration = Duration::from_secs(300);

struct Outcome {
    /// Node 0's console (the guest's output).
    out: String,
    /// Exit codes of node 0 and node 1.
    codes: (Option<i32>, Option<i32>),
    /// How long the cluster ran, from the start of node 0 to the end of the later node.
    took: Duration,
    /// Everything, for assertion messages.
    transcript: String,
    /// Both nodes' logs.
    logs: String,
    /// Whether the proxy's stall happened.
    stalled: bool,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Runs testos on 2 nodes (1 vCPU each) with node 1's link to node 0 through a proxy
/// that applies `faults`.
fn run_through(faults: Faults, iters: &str) -> Outcome {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let dir = std::env::temp_dir().join(format!(
        "dvmm-faults-{}-{}",
        std::process::id(),
        free_port()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let (p0, p1) = (free_port(), free_port());
    let real0: std::net::SocketAddr = format!("127.0.0.1:{p0}").parse().unwrap();
    let proxy = FaultyLink::start(real0, faults);
    // Node 0 listens on its real port; node 1 is told node 0 lives at the proxy. (Node
    // i dials every node j < i, so node 0 never dials node 1.)
    let file = |node0: std::net::SocketAddr, name: &str| {
        let path = dir.join(name);
        std::fs::write(
            &path,
            format!(
                "secret = \"link-faults-secret-0123456789\"\n[guest]\nkernel = \"{}\"\n\
                 cmdline = \"testos {iters}\"\n\
                 [[node]]\naddress = \"{node0}\"\nvcpus = 1\nmemory = \"128M\"\n\
                 [[node]]\naddress = \"127.0.0.1:{p1}\"\nvcpus = 1\nmemory = \"128M\"\n",
                dvmm_testos::TESTOS_ELF,
            ),
        )
        .unwrap();
        path
    };
    let f0 = file(real0, "node0.toml");
    let f1 = file(proxy.addr, "node1.toml");
    let start = Instant::now();
    let mut n0 = common::spawn_node(&f0, "0");
    let mut n1 = common::spawn_node(&f1, "1");
    let o0 = common::read_all(n0.stdout.take().unwrap());
    let e0 = common::read_all(n0.stderr.take().unwrap());
    let o1 = common::read_all(n1.stdout.take().unwrap());
    let e1 = common::read_all(n1.stderr.take().unwrap());
    let s0 = common::wait_within(&mut n0, LIMIT);
    let s1 = common::wait_within(&mut n1, Duration::from_secs(20));
    let took = start.elapsed();
    for (s, n) in [(&s0, &mut n0), (&s1, &mut n1)] {
        if s.is_none() {
            let _ = n.kill();
            let _ = n.wait();
        }
    }
    let (out, e0, e1) = (o0.join().unwrap(), e0.join().unwrap(), e1.join().unwrap());
    let out1 = o1.join().unwrap();
    let logs = format!("--- node 0 ---\n{e0}\n--- node 1 ---\n{out1}{e1}");
    let transcript = format!("{out}\n{logs}");
    assert!(
        s0.is_some() && s1.is_some(),
        "a node did not end: a hang\n{transcript}"
    );
    let _ = std::fs::remove_dir_all(&dir);
    Outcome {
        out,
        codes: (s0.and_then(|s| s.code()), s1.and_then(|s| s.code())),
        took,
        transcript,
        logs,
        stalled: proxy.stalled.load(std::sync::atomic::Ordering::Acquire),
    }
}

fn assert_exact(o: &Outcome) {
    let t = &o.transcript;
    assert!(o.out.contains(dvmm_testos::PASS_LINE), "no PASS\n{t}");
    assert!(!o.out.contains(dvmm_testos::FAIL_PREFIX), "{t}");
    assert_eq!(o.codes, (Some(0), Some(0)), "{t}");
    for cpu in 0..2 {
        for check in dvmm_testos::DSM_CHECKS {
            let line = format!("testos: cpu {cpu}: {check} ok");
            assert!(o.out.contains(&line), "cpu {cpu}: no '{check} ok'\n{t}");
        }
    }
}

/// The cluster stopped, both nodes with an error, and a log names the link.
fn assert_stopped_naming_the_link(o: &Outcome, why: &str) {
    let t = &o.transcript;
    assert!(
        !o.out.contains(dvmm_testos::PASS_LINE),
        "{why}: the guest passed anyway\n{t}"
    );
    assert!(
        o.codes.0 != Some(0) && o.codes.1 != Some(0),
        "{why}: {:?}\n{t}",
        o.codes
    );
    assert!(
        o.logs.contains("lost node 1") || o.logs.contains("lost node 0"),
        "{why}: no error names the lost link\n{t}"
    );
    let first = o
        .logs
        .lines()
        .find(|l| l.contains("lost node"))
        .unwrap_or("");
    eprintln!(
        "{why}: stopped after {:?}, exit codes {:?}: {first}",
        o.took, o.codes
    );
}

const ITERS: &str = "testos.iters=100 testos.watchdog=500";

/// Every chunk 0.5-2.5 ms late, order kept: slower, and exact.
#[test]
fn delay_and_jitter_keep_results_exact() {
    let rounds: u64 = std::env::var("DVMM_FAULT_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    for round in 0..rounds {
        let o = run_through(
            Faults {
                delay: Duration::from_micros(500 + 250 * (round % 5)),
                jitter: Duration::from_millis(2),
                seed: round,
                ..Faults::default()
            },
            ITERS,
        );
        assert_exact(&o);
    }
}

/// A 1 s stall (the dead-peer time-out is 2 s): the nodes wait it out, exact.
#[test]
fn a_stall_shorter_than_the_dead_peer_timeout_is_survived() {
    let o = run_through(
        Faults {
            stall: Some((Duration::from_secs(3), Duration::from_secs(1))),
            ..Faults::default()
        },
        ITERS,
    );
    assert_exact(&o);
    assert!(
        o.stalled,
        "the run ended before the stall\n{}",
        o.transcript
    );
}

/// A 6 s stall: both nodes give up on the link within the time-out and stop with an
/// error naming it, instead of waiting forever or finishing wrong.
#[test]
fn a_stall_longer_than_the_dead_peer_timeout_stops_the_cluster() {
    let o = run_through(
        Faults {
            stall: Some((Duration::from_secs(3), Duration::from_secs(6))),
            ..Faults::default()
        },
        "testos.iters=2000 testos.watchdog=500",
    );
    assert_stopped_naming_the_link(&o, "6 s stall");
    assert!(o.stalled, "{}", o.transcript);
    assert!(o.logs.contains("no traffic"), "{}", o.transcript);
    // Lost after 2 s of silence; both nodes are gone well before the stall ends + 20 s.
    assert!(o.took < Duration::from_secs(40), "took {:?}", o.took);
}

/// One bit flipped in node 1's stream, after the handshake and the join: the frame's
/// authentication fails, node 0 drops the link and the cluster stops.
#[test]
fn a_flipped_bit_stops_the_cluster_naming_the_link() {
    let o = run_through(
        Faults {
            flip_at: Some(300_000),
            ..Faults::default()
        },
        "testos.iters=2000 testos.watchdog=500",
    );
    assert_stopped_naming_the_link(&o, "flipped bit");
    assert!(o.logs.contains("rejected frame"), "{}", o.transcript);
}

/// A chunk of node 1's stream sent twice (what a link that duplicates or reorders
/// does to a byte stream): rejected, and the cluster stops.
#[test]
fn a_duplicated_chunk_stops_the_cluster_naming_the_link() {
    let o = run_through(
        Faults {
            duplicate_at: Some(300_000),
            ..Faults::default()
        },
        "testos.iters=2000 testos.watchdog=500",
    );
    assert_stopped_naming_the_link(&o, "duplicated chunk");
    assert!(o.logs.contains("rejected frame"), "{}", o.transcript);
}
