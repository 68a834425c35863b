//! Engine tests: plain threads touching view A stand in for vCPUs.

// Nodes, threads and pages are numbers that index several tables at once.
#![allow(clippy::needless_range_loop)]

use super::*;
use crate::testing::Cluster;
use dvmm_sync::MutexExt;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::time::Duration;

const PG: usize = PAGE_SIZE as usize;
/// Pages per home block in the test clusters: page p has home (p / 4) % n.
const BLOCK: u64 = 4;
const RAM: usize = 64 * PG;
const DEADLINE: Duration = Duration::from_secs(120);

/// Tests whose assertions count faults (read-ahead) and the one that keeps two threads
/// busy run one at a time: on a 2-core host the busy one delays the others' fault
/// handling enough to change the counts.
static CPU_HEAVY: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn cpu_heavy() -> std::sync::MutexGuard<'static, ()> {
    CPU_HEAVY.locked()
}

fn cluster(n: u16) -> Cluster {
    Cluster::new(n, RAM, BLOCK, &[], |_| {}).unwrap()
}

fn read_u64(p: *mut u8) -> u64 {
    // SAFETY: `p` points into a live view A mapping of a test cluster, 8-byte aligned.
    unsafe { std::ptr::read_volatile(p.cast::<u64>()) }
}

fn write_u64(p: *mut u8, v: u64) {
    // SAFETY: as in `read_u64`.
    unsafe { std::ptr::write_volatile(p.cast::<u64>(), v) }
}

fn atomic(p: *mut u8) -> &'static AtomicU64 {
    // SAFETY: aligned, in a mapping that outlives the test's threads (joined before the
    // cluster drops).
    unsafe { &*p.cast::<AtomicU64>() }
}

fn read_page(p: *mut u8) -> Vec<u8> {
    let mut v = vec![0u8; PG];
    // SAFETY: a whole page of a live view A mapping.
    unsafe { std::ptr::copy_nonoverlapping(p, v.as_mut_ptr(), PG) };
    v
}

fn write_page(p: *mut u8, data: &[u8]) {
    // SAFETY: a whole page of a live view A mapping.
    unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), p, PG) };
}

fn pattern(seed: u8) -> Vec<u8> {
    (0..PG)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

/// A raw pointer that tests may move into threads.
#[derive(Clone, Copy)]
struct Ptr(*mut u8);
// SAFETY: points into test RAM that outlives the threads.
unsafe impl Send for Ptr {}

fn spin_until(what: &str, mut f: impl FnMut() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(t.elapsed() < DEADLINE, "timed out waiting for {what}");
        std::thread::yield_now();
    }
}

fn total(c: &Cluster, f: impl Fn(&DsmStats) -> u64) -> u64 {
    c.engines.iter().map(|e| f(&e.stats())).sum()
}

fn assert_clean(c: &Cluster) {
    for (i, e) in c.engines.iter().enumerate() {
        let s = e.stats();
        assert_eq!(
            (s.protocol_errors, s.bad_msgs, s.io_errors),
            (0, 0, 0),
            "node {i}: {s:?}"
        );
    }
}

#[test]
fn written_page_is_read_everywhere_and_zero_page_never_travels() {
    let c = cluster(3);
    // Page 9 (home 2) is never written: zero everywhere, no payload anywhere.
    for n in 0..3 {
        assert!(read_page(c.a(n, 9 * PG)).iter().all(|&b| b == 0));
    }
    assert_eq!(total(&c, |s| s.pages_sent), 0);
    assert_eq!(total(&c, |s| s.pages_received), 0);
    // Nodes 0 and 1 got zero grants by message, node 2 (home) locally.
    assert_eq!(total(&c, |s| s.zero_grants), 2);
    // Page 5 (home 1) written on node 0, read on 1 and 2.
    let data = pattern(7);
    write_page(c.a(0, 5 * PG), &data);
    assert_eq!(read_page(c.a(1, 5 * PG)), data);
    assert_eq!(read_page(c.a(2, 5 * PG)), data);
    assert_eq!(read_page(c.a(0, 5 * PG)), data);
    assert_eq!(c.engines[1].page_state(5), PageState::ReadOnly);
    assert!(total(&c, |s| s.pages_sent) >= 2);
    assert!(c.engines[0].stats().write_faults >= 1);
    assert_clean(&c);
}

#[test]
fn atomic_counter_is_exact_on_every_node() {
    const NODES: usize = 3;
    const PER_THREAD: u64 = 10_000;
    const ROUNDS: u64 = 10;
    let c = cluster(NODES as u16);
    let off = 6 * PG + 64; // home 1
    let start = std::sync::Barrier::new(NODES * 2);
    std::thread::scope(|s| {
        for n in 0..NODES {
            for _ in 0..2 {
                let p = Ptr(c.a(n, off));
                let start = &start;
                s.spawn(move || {
                    let p = p;
                    for i in 0..PER_THREAD {
                        // Rounds: every node writes in every one of them, so the page
                        // moves at least twice a round, however the threads are
                        // scheduled.
                        if i % (PER_THREAD / ROUNDS) == 0 {
                            start.wait();
                        }
                        atomic(p.0).fetch_add(1, Ordering::SeqCst);
                        // Let the other nodes in often, so the page really bounces.
                        if i % 16 == 0 {
                            std::thread::yield_now();
                        }
                    }
                });
            }
        }
    });
    for n in 0..NODES {
        assert_eq!(
            read_u64(c.a(n, off)),
            NODES as u64 * 2 * PER_THREAD,
            "node {n}"
        );
    }
    // The page really moved between the nodes: at least twice in each round.
    assert!(total(&c, |s| s.pages_received) >= 2 * ROUNDS);
    eprintln!("counter: {:?}", c.engines[1].stats());
    assert_clean(&c);
}

#[test]
fn ping_pong_loses_no_write() {
    const ROUNDS: u64 = 1_000;
    let c = cluster(2);
    let off = 3 * PG; // home 0
    std::thread::scope(|s| {
        for n in 0..2u64 {
            let p = Ptr(c.a(n as usize, off));
            s.spawn(move || {
                let p = p;
                // Node 0 writes odd numbers after seeing even ones, node 1 the reverse.
                let mut next = n + 1;
                while next <= 2 * ROUNDS {
                    spin_until("the other node's write", || read_u64(p.0) == next - 1);
                    write_u64(p.0, next);
                    next += 2;
                }
            });
        }
    });
    assert_eq!(read_u64(c.a(0, off)), 2 * ROUNDS);
    assert_eq!(read_u64(c.a(1, off)), 2 * ROUNDS);
    assert_clean(&c);
}

#[test]
fn message_passing_litmus_never_reads_stale_data() {
    const ITERS: u64 = 300;
    let c = cluster(3);
    // data home 1, flag home 2, ack home 0.
    let (data, flag, ack) = (4 * PG + 8, 8 * PG + 16, 2 * PG);
    let stale = AtomicU64::new(0);
    std::thread::scope(|s| {
        let (d0, f0, a0) = (Ptr(c.a(0, data)), Ptr(c.a(0, flag)), Ptr(c.a(0, ack)));
        s.spawn(move || {
            let (d, f, a) = (d0, f0, a0);
            for i in 1..=ITERS {
                write_u64(d.0, i);
                write_u64(f.0, i);
                spin_until("ack", || read_u64(a.0) == i);
            }
        });
        let (d1, f1, a1) = (Ptr(c.a(1, data)), Ptr(c.a(1, flag)), Ptr(c.a(1, ack)));
        let stale = &stale;
        s.spawn(move || {
            let (d, f, a) = (d1, f1, a1);
            for i in 1..=ITERS {
                spin_until("flag", || read_u64(f.0) == i);
                if read_u64(d.0) != i {
                    stale.fetch_add(1, Ordering::Relaxed);
                }
                write_u64(a.0, i);
            }
        });
    });
    assert_eq!(stale.load(Ordering::Relaxed), 0);
    assert_clean(&c);
}

#[test]
fn vmm_access_writes_are_seen_by_vcpus_elsewhere() {
    let c = cluster(3);
    // Pages 4..=8 span homes 1 and 2; start mid-page.
    let off = 4 * PG as u64 + 100;
    let buf: Vec<u8> = (0..4 * PG + 300).map(|i| (i % 251) as u8).collect();
    {
        let g = c.engines[0]
            .access(off, buf.len() as u64, Access::Write)
            .unwrap();
        g.write(off, &buf).unwrap();
        assert_eq!(c.engines[0].page_state(4), PageState::Writable);
    }
    let n2 = std::thread::scope(|s| {
        let p = Ptr(c.a(2, off as usize));
        let len = buf.len();
        s.spawn(move || {
            let p = p;
            let mut v = vec![0u8; len];
            // SAFETY: inside node 2's view A.
            unsafe { std::ptr::copy_nonoverlapping(p.0, v.as_mut_ptr(), len) };
            v
        })
        .join()
        .unwrap()
    });
    assert_eq!(n2, buf);
    // And the VMM of node 1 reads it back through access().
    let g = c.engines[1]
        .access(off, buf.len() as u64, Access::Read)
        .unwrap();
    let mut back = vec![0u8; buf.len()];
    g.read(off, &mut back).unwrap();
    assert_eq!(back, buf);
    assert!(matches!(g.write(off, &back), Err(DsmError::ReadOnlyPin)));
    assert!(matches!(
        g.read(off - 1, &mut back[..1]),
        Err(DsmError::OutOfRange { .. })
    ));
    drop(g);
    assert!(matches!(
        c.engines[1].access(RAM as u64 - 8, 16, Access::Read),
        Err(DsmError::OutOfRange { .. })
    ));
    assert!(matches!(
        c.engines[1].access(u64::MAX, 2, Access::Read),
        Err(DsmError::OutOfRange { .. })
    ));
    assert_clean(&c);
}

#[test]
fn seeded_pages_are_read_without_messages_and_first_write_invalidates() {
    let shared: Vec<PageNo> = (20..24).collect();
    let c = Cluster::new(3, RAM, BLOCK, &shared, |ram| {
        for &p in &shared {
            let d = pattern(p as u8);
            // SAFETY: view B of a fresh test RAM, before the engine starts.
            unsafe {
                std::ptr::copy_nonoverlapping(d.as_ptr(), ram.view_b().add(p as usize * PG), PG)
            };
        }
    })
    .unwrap();
    // Reading 20..24 in order is a stream; read-ahead would request pages past 23 and
    // break the exact message counts below.
    for e in &c.engines {
        e.set_readahead(0);
    }
    for n in 0..3 {
        for &p in &shared {
            assert_eq!(read_page(c.a(n, p as usize * PG)), pattern(p as u8));
        }
    }
    assert_eq!(total(&c, |s| s.msgs_sent), 0);
    assert!(total(&c, |s| s.minor_faults) >= 12);
    // Page 21 has home 2; node 1 writes it: nodes 0 and 2 drop their copies, no payload.
    write_u64(c.a(1, 21 * PG), 0xdead_beef);
    assert_eq!(c.engines[0].page_state(21), PageState::Invalid);
    assert_eq!(c.engines[2].page_state(21), PageState::Invalid);
    assert_eq!(c.engines[0].stats().invalidations, 1);
    assert_eq!(c.engines[2].stats().invalidations, 1);
    assert_eq!(total(&c, |s| s.pages_sent), 0);
    assert_eq!(read_u64(c.a(0, 21 * PG)), 0xdead_beef);
    assert_eq!(read_u64(c.a(2, 21 * PG)), 0xdead_beef);
    assert_eq!(read_page(c.a(0, 22 * PG)), pattern(22));
    assert_clean(&c);
}

#[test]
fn pinned_page_defers_invalidation_until_the_guard_drops() {
    let c = cluster(2);
    let off = 4 * PG; // home 1
    let g = c.engines[0].access(off as u64, 8, Access::Read).unwrap();
    let done = AtomicBool::new(false);
    std::thread::scope(|s| {
        let p = Ptr(c.a(1, off));
        let done = &done;
        s.spawn(move || {
            let p = p;
            write_u64(p.0, 42);
            done.store(true, Ordering::SeqCst);
        });
        spin_until("a deferred message", || {
            c.engines[0].stats().deferred_msgs > 0
        });
        assert!(!done.load(Ordering::SeqCst), "write overtook the pin");
        assert_eq!(c.engines[0].page_state(4), PageState::ReadOnly);
        let mut v = [0u8; 8];
        g.read(off as u64, &mut v).unwrap();
        assert_eq!(v, [0; 8]);
        drop(g);
    });
    assert!(done.load(Ordering::SeqCst));
    assert_eq!(c.engines[0].page_state(4), PageState::Invalid);
    assert_eq!(read_u64(c.a(0, off)), 42);
    assert_clean(&c);
}

#[test]
fn a_kick_to_a_thread_in_a_fault_waits_for_its_page() {
    let c = cluster(2);
    let kicked = Arc::new(std::sync::Mutex::new(Vec::new()));
    let k = kicked.clone();
    c.engines[1].set_kick_thread(Box::new(move |tid| k.lock().unwrap().push(tid)));
    // SAFETY: gettid has no preconditions.
    let me = unsafe { libc::gettid() };
    assert!(
        !c.engines[1].defer_kick(me),
        "a thread in no fault is kicked at once"
    );
    let off = 4 * PG; // home 1
    let g = c.engines[0].access(off as u64, 8, Access::Read).unwrap();
    let tid = std::sync::atomic::AtomicI32::new(0);
    std::thread::scope(|s| {
        let p = Ptr(c.a(1, off));
        let tid = &tid;
        s.spawn(move || {
            let p = p;
            // SAFETY: gettid has no preconditions.
            tid.store(unsafe { libc::gettid() }, Ordering::SeqCst);
            write_u64(p.0, 42);
        });
        spin_until("the writer waiting behind the pin", || {
            c.engines[0].stats().deferred_msgs > 0
        });
        let t = tid.load(Ordering::SeqCst);
        assert!(c.engines[1].defer_kick(t), "held back while in the fault");
        assert!(c.engines[1].defer_kick(t), "a second kick joins the first");
        assert!(
            kicked.lock().unwrap().is_empty(),
            "kicked before its page came"
        );
        drop(g);
    });
    // The engine kicks right after it wakes the thread: the write may finish first.
    spin_until("the held-back kick", || !kicked.lock().unwrap().is_empty());
    assert_eq!(*kicked.lock().unwrap(), vec![tid.load(Ordering::SeqCst)]);
    assert_eq!(c.engines[1].stats().kicks_deferred, 2);
    assert_clean(&c);
}

#[test]
fn malformed_messages_are_counted_not_fatal() {
    let c = cluster(2);
    let e = &c.engines[0];
    let far = (RAM / PG) as u64 + 5;
    e.receive(1, Msg::ReadReq { page: far }, None);
    e.receive(1, Msg::FetchReply { page: 0 }, None);
    e.receive(1, Msg::FetchReply { page: 0 }, Some(&[1, 2, 3]));
    assert_eq!(e.stats().bad_msgs, 3);
    // Well-formed but unexpected: a grant nobody asked for, an unknown sender.
    e.receive(
        1,
        Msg::ReadGrant {
            page: 4,
            zero: true,
        },
        None,
    );
    e.receive(9, Msg::ReadReq { page: 0 }, None);
    e.receive(1, Msg::RevokeAck { page: 0 }, Some(&[0xff; PG]));
    let s = e.stats();
    assert_eq!(s.protocol_errors, 3);
    assert_eq!(e.page_state(4), PageState::Invalid);
    // The engine still works.
    write_u64(c.a(1, 0), 5);
    assert_eq!(read_u64(c.a(0, 0)), 5);
}

#[test]
fn stop_unblocks_and_refuses_access() {
    let c = cluster(2);
    c.engines[0].stop();
    assert!(matches!(
        c.engines[0].access(0, 8, Access::Read),
        Err(DsmError::Stopped)
    ));
    // View A is plain shared memory again.
    write_u64(c.a(0, 0), 3);
    assert_eq!(read_u64(c.a(0, 0)), 3);
}

/// 2 nodes; every page of `len` bytes is homed at node 1, which writes `pattern(page)`
/// into each through the VMM path. Returns the cluster.
fn remote_stream_cluster(len: usize) -> Cluster {
    let pages = (len / PG) as u64;
    let c = Cluster::new(2, len, pages, &[], |_| {}).unwrap();
    // Pages [0, pages) have home (p / pages) % 2 = 0; use node 0 as the owner instead, and
    // let node 1 stream.
    let g = c.engines[0].access(0, len as u64, Access::Write).unwrap();
    for p in 0..pages {
        g.write(p * PAGE_SIZE, &pattern(p as u8)).unwrap();
        g.write(p * PAGE_SIZE, &p.to_le_bytes()).unwrap();
    }
    drop(g);
    c
}

fn stream_and_check(c: &Cluster, node: usize, pages: u64) {
    for p in 0..pages {
        let got = read_page(c.a(node, p as usize * PG));
        let mut want = pattern(p as u8);
        want[..8].copy_from_slice(&p.to_le_bytes());
        assert!(got == want, "page {p} differs");
    }
}

#[test]
fn streaming_16_mib_with_readahead_reads_right_data_with_few_faults() {
    let _one = cpu_heavy();
    const LEN: usize = 16 << 20;
    let pages = (LEN / PG) as u64;
    let c = remote_stream_cluster(LEN);
    assert_eq!(c.engines[1].readahead(), DEFAULT_READAHEAD_PAGES);
    stream_and_check(&c, 1, pages);
    let s = c.engines[1].stats();
    eprintln!("stream: {s:?}");
    // Nearly every page came by read-ahead; the vCPU faulted on a small fraction of
    // pages read-ahead had not asked for yet. (A reader that outruns the read-ahead on
    // a busy host also faults on pages already in flight: those are counted apart.)
    assert!(s.prefetched >= pages - 64, "{s:?}");
    assert!(
        s.read_faults.saturating_sub(s.faults_on_pending) < pages / 8,
        "{s:?}"
    );
    assert!(
        s.prefetch_used >= pages - 2 * DEFAULT_READAHEAD_PAGES,
        "{s:?}"
    );
    assert!(
        s.readahead_batches >= pages / DEFAULT_READAHEAD_PAGES,
        "{s:?}"
    );
    assert_eq!(s.pages_received, pages);
    // Prefetched copies are real copies: a write at the owner invalidates them.
    for p in [5u64, 1000, pages - 1] {
        write_u64(c.a(0, p as usize * PG + 8), 0xabcd + p);
        assert_eq!(read_u64(c.a(1, p as usize * PG + 8)), 0xabcd + p);
    }
    assert_clean(&c);
}

#[test]
fn streaming_without_readahead_faults_once_per_page() {
    let _one = cpu_heavy();
    const LEN: usize = 1 << 20;
    let pages = (LEN / PG) as u64;
    let c = remote_stream_cluster(LEN);
    c.engines[1].set_readahead(0);
    stream_and_check(&c, 1, pages);
    let s = c.engines[1].stats();
    assert_eq!((s.prefetched, s.readahead_batches), (0, 0), "{s:?}");
    assert_eq!(s.read_faults, pages, "{s:?}");
    assert_clean(&c);
}

#[test]
fn strided_and_backward_reads_do_not_prefetch() {
    let _one = cpu_heavy();
    let c = cluster(2);
    let pages = (RAM / PG) as u64;
    for p in (0..pages).step_by(3) {
        assert_eq!(read_u64(c.a(0, p as usize * PG)), 0);
    }
    for p in (0..pages).rev().filter(|p| p % 3 != 0) {
        assert_eq!(read_u64(c.a(0, p as usize * PG)), 0);
    }
    let s = c.engines[0].stats();
    assert_eq!(s.prefetched, 0, "{s:?}");
    assert_eq!(s.read_faults, pages, "{s:?}");
    assert_clean(&c);
}

#[test]
fn readahead_window_grows_and_resets() {
    let _one = cpu_heavy();
    let c = cluster(2);
    // Two sequential faults: the second issues a batch of INITIAL_READAHEAD_PAGES.
    read_u64(c.a(0, 10 * PG));
    read_u64(c.a(0, 11 * PG));
    let s = c.engines[0].stats();
    assert_eq!(s.prefetched, INITIAL_READAHEAD_PAGES, "{s:?}");
    spin_until("prefetched pages readable", || {
        (12..20).all(|p| c.engines[0].page_state(p) == PageState::ReadOnly)
    });
    // The marker sits half a window ahead (page 15); touching it continues the stream
    // with a doubled window: pages [20, 15 + 1 + 16).
    read_u64(c.a(0, 14 * PG));
    assert_eq!(c.engines[0].stats().readahead_batches, 1);
    read_u64(c.a(0, 15 * PG));
    let s2 = c.engines[0].stats();
    assert_eq!(s2.readahead_batches, 2, "{s2:?}");
    assert_eq!(s2.prefetched, 8 + 12, "{s2:?}");
    // A far-away fault resets the stream: no new batch.
    read_u64(c.a(0, 50 * PG));
    assert_eq!(c.engines[0].stats().readahead_batches, 2);
    // Writes to prefetched-but-untouched pages still work (upgrade of a lazy copy).
    write_u64(c.a(0, 12 * PG), 3);
    write_u64(c.a(0, 13 * PG), 4);
    assert_eq!(read_u64(c.a(1, 13 * PG)), 4);
    assert_clean(&c);
}

/// Random reads and writes from every node over pages shared by all, with the VMM's own
/// pinned accesses mixed in: no write is ever lost and no read goes back in time.
/// Each writer owns one word (slot) of every page and only ever increments it, so a
/// writer that reads its own slot back must see its last value (else a write was lost),
/// and every reader must see each slot never decrease (else it read a stale copy).
#[test]
fn random_sharing_loses_no_write_and_reads_nothing_stale() {
    const NODES: usize = 3;
    const THREADS: usize = 2; // per node
    const PAGES: usize = 24;
    const OPS: u64 = 6_000;
    let c = cluster(NODES as u16);
    let writers = NODES * THREADS;
    let start = std::sync::Barrier::new(writers);
    let stop = AtomicBool::new(false);
    let counts: Vec<Vec<AtomicU64>> = (0..writers)
        .map(|_| (0..PAGES).map(|_| AtomicU64::new(0)).collect())
        .collect();
    std::thread::scope(|s| {
        for n in 0..NODES {
            for t in 0..THREADS {
                let me = n * THREADS + t;
                let base = Ptr(c.a(n, 0));
                let (start, stop, counts, engine) = (&start, &stop, &counts, &c.engines[n]);
                s.spawn(move || {
                    let base = base;
                    let mut seen = vec![vec![0u64; writers]; PAGES];
                    // xorshift: a different, reproducible sequence per thread.
                    let mut x: u64 = 0x9e37_79b9_7f4a_7c15 ^ ((me as u64 + 1) * 0x1234_5678);
                    let mut rnd = || {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        x
                    };
                    start.wait();
                    for op in 0..OPS {
                        let r = rnd();
                        let page = (r % PAGES as u64) as usize;
                        let slot_of = |w: usize| base.0.wrapping_add(page * PG + w * 8);
                        match (r >> 32) % 10 {
                            // Write my slot, through view A (a vCPU) or pinned (the VMM).
                            0..=2 | 9 => {
                                let mine = counts[me][page].load(Ordering::Relaxed);
                                let v = if (r >> 32) % 10 == 9 {
                                    let off = (page * PG + me * 8) as u64;
                                    let g = engine.access(off, 8, Access::Write).unwrap();
                                    let mut b = [0u8; 8];
                                    g.read(off, &mut b).unwrap();
                                    g.write(off, &(mine + 1).to_le_bytes()).unwrap();
                                    u64::from_le_bytes(b)
                                } else {
                                    let v = read_u64(slot_of(me));
                                    write_u64(slot_of(me), mine + 1);
                                    v
                                };
                                assert_eq!(v, mine, "thread {me}: my write to page {page} was lost (op {op})");
                                counts[me][page].store(mine + 1, Ordering::Relaxed);
                                seen[page][me] = mine + 1;
                            }
                            // Read every slot of the page.
                            _ => {
                                for w in 0..writers {
                                    let v = read_u64(slot_of(w));
                                    assert!(
                                        v >= seen[page][w],
                                        "thread {me}: page {page} slot {w} went back from {} to {v} (op {op})",
                                        seen[page][w]
                                    );
                                    seen[page][w] = v;
                                }
                            }
                        }
                        if op % 64 == 0 {
                            std::thread::yield_now();
                        }
                        if stop.load(Ordering::Relaxed) {
                            break;
                        }
                    }
                });
            }
        }
    });
    for n in 0..NODES {
        for page in 0..PAGES {
            for w in 0..writers {
                let want = counts[w][page].load(Ordering::Relaxed);
                assert_eq!(
                    read_u64(c.a(n, page * PG + w * 8)),
                    want,
                    "node {n} page {page} slot {w}"
                );
            }
        }
    }
    assert_clean(&c);
}

/// Stands in for KVM: "derives" from pages that start with [`DERIVED_MAGIC`], and its
/// "vCPU" is a thread that parks when asked to quiesce (unless `stubborn`).
struct FakeDerived {
    asked: AtomicBool,
    parked: AtomicBool,
    stubborn: bool,
    drops: AtomicU64,
    /// Drops asked for while the user was not parked.
    refused_drops: AtomicU64,
    /// The user thread's kernel thread id.
    tid: std::sync::atomic::AtomicI32,
    /// The user thread has ended.
    stubborn_exit: AtomicBool,
}

const DERIVED_MAGIC: u64 = 0x7061_6765_7461_626c;

impl FakeDerived {
    fn new(stubborn: bool) -> Arc<FakeDerived> {
        Arc::new(FakeDerived {
            asked: AtomicBool::new(false),
            parked: AtomicBool::new(false),
            stubborn,
            drops: AtomicU64::new(0),
            refused_drops: AtomicU64::new(0),
            tid: std::sync::atomic::AtomicI32::new(0),
            stubborn_exit: AtomicBool::new(false),
        })
    }

    /// The user's side: parks while a quiesce is asked for.
    fn checkpoint(&self) {
        if self.stubborn || self.stubborn_exit.load(Ordering::SeqCst) {
            return;
        }
        // Like dvmm's run gate: not parked before looking, so that a quiesce that sees
        // the thread parked knows it will look again before touching memory.
        loop {
            self.parked.store(false, Ordering::SeqCst);
            if !self.asked.load(Ordering::SeqCst) {
                return;
            }
            self.parked.store(true, Ordering::SeqCst);
            while self.asked.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_micros(20));
            }
        }
    }
}

impl LocalDerived for FakeDerived {
    fn derives_from(&self, _page: PageNo, contents: &[u8]) -> bool {
        contents[..8] == DERIVED_MAGIC.to_le_bytes()
    }
    fn quiesce(&self, _defer_kick: &mut dyn FnMut(i32) -> bool) {
        self.asked.store(true, Ordering::SeqCst);
    }
    fn quiesced(&self) -> bool {
        self.asked.load(Ordering::SeqCst) && self.parked.load(Ordering::SeqCst)
    }
    fn blocked_in_faults(&self, waiting: &dyn Fn(i32) -> bool) -> bool {
        waiting(self.tid.load(Ordering::SeqCst))
    }
    fn resume(&self) {
        self.asked.store(false, Ordering::SeqCst);
    }
    fn drop_derived(&self) -> bool {
        if !self.quiesced() {
            self.refused_drops.fetch_add(1, Ordering::SeqCst);
            return false;
        }
        self.drops.fetch_add(1, Ordering::SeqCst);
        true
    }
}

/// Two nodes, node i's engine telling `fakes[i]` of its invalidations.
fn derived_cluster(fakes: &[Arc<FakeDerived>; 2]) -> Cluster {
    Cluster::with_derived(
        2,
        RAM,
        BLOCK,
        &[],
        |_| {},
        |i| Some(fakes[usize::from(i)].clone() as Arc<dyn LocalDerived>),
    )
    .unwrap()
}

/// A page that derived state hangs on is taken from a node only while that node's users
/// are parked, and the state is dropped then; the users' other faults are served
/// meanwhile (a reader of a second page keeps going), and no write is lost.
#[test]
fn derived_pages_leave_only_while_their_users_are_quiesced() {
    let _one = cpu_heavy();
    let fakes = [FakeDerived::new(false), FakeDerived::new(false)];
    let c = derived_cluster(&fakes);
    // Page 0 (home node 0) starts with the magic: a "page table".
    let table = Ptr(c.a(0, 0));
    write_u64(table.0, DERIVED_MAGIC);
    const ROUNDS: u64 = 200;
    std::thread::scope(|s| {
        for n in 0..2usize {
            let (fake, p, other) = (&fakes[n], Ptr(c.a(n, 0)), Ptr(c.a(n, 16 * PG)));
            s.spawn(move || {
                let (p, other) = (p, other);
                // SAFETY: gettid has no preconditions.
                fake.tid.store(unsafe { libc::gettid() }, Ordering::SeqCst);
                let counter = atomic(p.0.wrapping_add(8));
                let mut done = 0;
                while done < ROUNDS {
                    fake.checkpoint();
                    // Round-robin: node n bumps when the counter's parity is n.
                    let v = counter.load(Ordering::SeqCst);
                    if v % 2 == n as u64 {
                        counter.fetch_add(1, Ordering::SeqCst);
                        done += 1;
                    }
                    fake.checkpoint();
                    let _ = read_u64(other.0);
                    std::thread::yield_now();
                }
                // Gone: as quiet as a parked thread (a vCPU thread that ended).
                fake.parked.store(true, Ordering::SeqCst);
                fake.stubborn_exit.store(true, Ordering::SeqCst);
            });
        }
    });
    let v = read_u64(c.a(0, 8));
    assert_eq!(v, 2 * ROUNDS, "a write was lost");
    for (i, f) in fakes.iter().enumerate() {
        // Every invalidation of the page gets its drop, made quiesced: at once, or late
        // (when the users waited in faults, or did not stop in time).
        spin_until("the owed drops", || {
            let s = c.engines[i].stats();
            s.derived_drops == s.invalidations
        });
        let s = c.engines[i].stats();
        assert!(s.derived_drops > 0 && s.quiesces > 0, "node {i}: {s:?}");
        assert_eq!(
            f.drops.load(Ordering::SeqCst),
            s.derived_drops,
            "node {i}: {s:?}"
        );
        assert_eq!(s.drops_abandoned, 0, "node {i}: {s:?}");
    }
    assert_clean(&c);
}

/// Users that never quiesce cost a delay, not a hang: the page is taken away after
/// the give-up time, counted.
#[test]
fn a_user_that_never_quiesces_delays_but_does_not_hang() {
    let fakes = [FakeDerived::new(true), FakeDerived::new(true)];
    let c = derived_cluster(&fakes);
    write_u64(c.a(0, 0), DERIVED_MAGIC);
    // Node 1 reads the page, then node 0 writes it: node 1 must give it up.
    assert_eq!(read_u64(c.a(1, 0)), DERIVED_MAGIC);
    write_u64(c.a(0, 8), 42);
    assert_eq!(read_u64(c.a(1, 8)), 42);
    let s = c.engines[1].stats();
    assert_eq!(s.quiesce_timeouts, 1, "{s:?}");
    assert_clean(&c);
}
