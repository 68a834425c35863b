//! DSM fault costs over the real node transport: every engine has its own memfd
//! ([`TestRam`]) and talks to the others through an encrypted `dvmm_transport::Transport`
//! on loopback, with one receive thread per node feeding `DsmEngine::receive` exactly as
//! the node runtime (`crates/vmm/src/node.rs`) does. Plain threads stand in for vCPUs.
//! Threads are not pinned (floor and cases alike).
//!
//! `cargo bench -p dvmm-dsm-uffd --bench transport` (env `DSM_BENCH_N`: samples per
//! latency case, default 1000; `DSM_BENCH_STREAM_MIB`: MiB per streaming run, default 16;
//! `DSM_BENCH_STREAM_RUNS`: runs per streaming mode, default 3).

use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Arc;
use std::time::Instant;

use dvmm_dsm::WIRE_MSG_LEN;
use dvmm_dsm_uffd::testing::{TestRam, UffdFloor};
use dvmm_dsm_uffd::{
    Access, DsmEngine, DsmStats, Msg, Node, NodeId, PageNet, DEFAULT_READAHEAD_PAGES, PAGE_SIZE,
};
use dvmm_transport::{Event, Transport, TransportConfig, MAX_PAYLOAD};

type Res<T> = Result<T, Box<dyn std::error::Error>>;

const PG: usize = PAGE_SIZE as usize;
/// Message kinds, as in `dvmm-cluster`'s wire module (DSM = 1); 0x7e0x are bench-only.
const KIND_DSM: u16 = 1;
const KIND_PING: u16 = 0x7e01;
const KIND_PONG: u16 = 0x7e02;

/// The engine's way out, as `DsmNet` in node.rs: header and page as one framed message.
/// With `batch`, the messages of one engine operation to one node share frames (up to
/// the transport's `MAX_PAYLOAD`), which the receiver takes apart with `receive_frame`.
struct TransportNet {
    t: Arc<Transport>,
    batch: Arc<AtomicBool>,
}

impl PageNet for TransportNet {
    fn send(&self, to: NodeId, msg: &Msg, data: Option<&[u8]>) {
        let hdr = msg.encode();
        let r = match data {
            Some(d) => self.t.send_parts(to, KIND_DSM, &[&hdr, d]),
            None => self.t.send_parts(to, KIND_DSM, &[&hdr]),
        };
        if let Err(e) = r {
            eprintln!("DSM message not sent: {e}");
        }
    }

    fn send_batch(&self, to: NodeId, msgs: &[(Msg, Option<&[u8]>)]) {
        if !self.batch.load(Ordering::Relaxed) {
            for (m, d) in msgs {
                self.send(to, m, *d);
            }
            return;
        }
        dvmm_dsm::pack_frames(msgs, MAX_PAYLOAD, |parts| {
            if let Err(e) = self.t.send_parts(to, KIND_DSM, parts) {
                eprintln!("DSM frame not sent: {e}");
            }
        });
    }
}

/// `n` engines connected by real transports; page `p` has home `(p / per_home) % n`.
struct Net {
    engines: Vec<Arc<DsmEngine>>,
    rams: Vec<TestRam>,
    transports: Vec<Arc<Transport>>,
    /// Per node: notified when a PONG arrives.
    pongs: Vec<Receiver<()>>,
    /// Whether the engines' messages share frames.
    batch: Arc<AtomicBool>,
}

/// The receive loop of one node, mirroring `Dispatch::run` / `Dispatch::dsm_msg`.
fn receive_loop(
    events: Receiver<Event>,
    engine: Arc<DsmEngine>,
    t: Arc<Transport>,
    pong: Sender<()>,
) {
    let reply = vec![0x5au8; WIRE_MSG_LEN + PG];
    for ev in events {
        match ev {
            Event::Message {
                from,
                kind: KIND_DSM,
                payload,
            } => engine.receive_frame(from, &payload),
            Event::Message {
                from,
                kind: KIND_PING,
                ..
            } => {
                let _ = t.send(from, KIND_PONG, &reply);
            }
            Event::Message {
                kind: KIND_PONG, ..
            } => {
                let _ = pong.send(());
            }
            Event::Message { kind, .. } => eprintln!("unknown message kind {kind}"),
            Event::PeerLost { node, reason } => {
                eprintln!("transport lost node {node}: {reason}");
                std::process::exit(2);
            }
        }
    }
}

impl Net {
    fn new(n: u16, ram_bytes: usize, per_home: u64) -> Res<Net> {
        let listeners = (0..n)
            .map(|_| TcpListener::bind("127.0.0.1:0"))
            .collect::<Result<Vec<_>, _>>()?;
        let peers = listeners
            .iter()
            .map(TcpListener::local_addr)
            .collect::<Result<Vec<SocketAddr>, _>>()?;
        let starts: Vec<_> = listeners
            .into_iter()
            .enumerate()
            .map(|(id, l)| {
                let cfg = TransportConfig::new(id as u16, peers.clone(), "dsm bench secret");
                std::thread::spawn(move || Transport::start_with_listener(cfg, l))
            })
            .collect();
        let mut net = Net {
            engines: Vec::new(),
            rams: Vec::new(),
            transports: Vec::new(),
            pongs: Vec::new(),
            batch: Arc::new(AtomicBool::new(false)),
        };
        for (id, h) in starts.into_iter().enumerate() {
            let (t, events) = h.join().map_err(|_| "transport start panicked")??;
            assert!(t.is_connected(((id + 1) % n as usize) as u16));
            let t = Arc::new(t);
            let ram = TestRam::new(ram_bytes)?;
            let node = Node::new(id as NodeId, n, move |p| {
                ((p / per_home) % u64::from(n)) as NodeId
            });
            let engine = DsmEngine::start(
                node,
                ram.pages(),
                Arc::new(TransportNet {
                    t: t.clone(),
                    batch: net.batch.clone(),
                }),
                &[],
            )?;
            engine.set_readahead(0);
            let (ptx, prx) = channel();
            let (e, tt) = (engine.clone(), t.clone());
            std::thread::Builder::new()
                .name(format!("recv-{id}"))
                .spawn(move || receive_loop(events, e, tt, ptx))?;
            net.engines.push(engine);
            net.rams.push(ram);
            net.transports.push(t);
            net.pongs.push(prx);
        }
        Ok(net)
    }

    /// Pointer into node `n`'s view A at page `page` (what a vCPU touches).
    fn a(&self, n: usize, page: usize) -> *mut u8 {
        self.rams[n].view_a().wrapping_add(page * PG)
    }

    /// One transport round trip from node 0 to node 1: 16-byte PING, 4 KiB + 16-byte PONG.
    fn ping(&self) -> Res<()> {
        self.transports[0].send(1, KIND_PING, &[7u8; WIRE_MSG_LEN])?;
        self.pongs[0].recv()?;
        Ok(())
    }

    fn sum(&self, f: impl Fn(&DsmStats) -> u64) -> u64 {
        self.engines.iter().map(|e| f(&e.stats())).sum()
    }
}

fn read(p: *mut u8) -> u64 {
    // SAFETY: `p` points into a live view A of a bench cluster, 8-byte aligned.
    unsafe { std::ptr::read_volatile(p.cast::<u64>()) }
}

fn write(p: *mut u8, v: u64) {
    // SAFETY: as in `read`.
    unsafe { std::ptr::write_volatile(p.cast::<u64>(), v) }
}

/// A raw pointer the ping-pong helper thread may own.
#[derive(Clone, Copy)]
struct Ptr(*mut u8);
// SAFETY: points into bench RAM that outlives the helper thread (the process ends first).
unsafe impl Send for Ptr {}

fn us(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e6
}

#[derive(Default)]
struct Series {
    name: String,
    us: Vec<f64>,
}

impl Series {
    fn new(name: &str) -> Series {
        Series {
            name: name.into(),
            us: Vec::new(),
        }
    }
    fn q(&self, f: f64) -> f64 {
        let mut v = self.us.clone();
        v.sort_by(f64::total_cmp);
        v[((v.len() - 1) as f64 * f).round() as usize]
    }
    fn print(&self) {
        println!(
            "| {:<52} | {:>9.1} | {:>9.1} | {:>6} |",
            self.name,
            self.q(0.5),
            self.q(0.9),
            self.us.len()
        );
    }
}

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

fn main() -> Res<()> {
    let n = env("DSM_BENCH_N", 1000);
    let stream_pages = env("DSM_BENCH_STREAM_MIB", 16) * (1 << 20) / PG;
    let runs = env("DSM_BENCH_STREAM_RUNS", 3);

    // 2 nodes: pages [0, H) home 0, [H, 2H) home 1. Node 1 owns (wrote) the remote-read
    // pages and the streaming regions; the ping-pong page is homed at node 0.
    // Regions are apart by a gap, so read-ahead past one region's end does not reach the next.
    let stride = stream_pages + 2 * DEFAULT_READAHEAD_PAGES as usize;
    let half = n + 1 + 3 * runs * stride;
    let two = Net::new(2, 2 * half * PG, half as u64)?;
    let rr_base = half; // n pages, home 1
    let stream_base = half + n; // 2 * runs regions, home 1
    let pp_page = 0;
    {
        let len = ((n + 3 * runs * stride) * PG) as u64;
        let g = two.engines[1].access((rr_base * PG) as u64, len, Access::Write)?;
        for p in 0..n + 3 * runs * stride {
            let v = (p as u64 + 1).to_le_bytes();
            let off = ((rr_base + p) * PG) as u64;
            g.write(off, &v)?;
            g.write(off + PAGE_SIZE - 8, &v)?;
        }
    }
    // 4 nodes, every page homed at node 0 (the writer): it invalidates 1 or 3 sharers.
    let four = Net::new(4, 3 * n * PG, u64::MAX)?;
    let floor = UffdFloor::new(n)?;

    // Ping-pong helper: node 1 waits for an odd value and answers with the next even one.
    let (go_tx, go_rx) = channel::<u64>();
    let pp1 = Ptr(two.a(1, pp_page));
    std::thread::spawn(move || {
        let p = pp1;
        for want in go_rx {
            while read(p.0) != want {
                std::thread::yield_now();
            }
            write(p.0, want + 1);
        }
    });

    let mut fa = Series::new("floor (a): local uffd round trip (UFFDIO_COPY)");
    let mut fb = Series::new("floor (b): transport round trip (16 B -> 4 KiB+16 B)");
    let mut rr = Series::new("remote 4 KiB read fault (owner = home = other node)");
    let mut w1 = Series::new("write fault (upgrade) invalidating 1 sharer");
    let mut w3 = Series::new("write fault (upgrade) invalidating 3 sharers");
    let mut pp = Series::new("page ping-pong, per round trip (2 writes)");
    let mut w1f = Series::new("write fault, 1 sharer, with a fixed 200 us hold");
    let mut ppf = Series::new("page ping-pong, with a fixed 200 us hold");
    let set_hold = |hold: Option<std::time::Duration>| {
        for e in two.engines.iter().chain(&four.engines) {
            e.set_fixed_hold(hold);
        }
    };
    let inv0 = four.sum(|s| s.invalidations);
    let started = Instant::now();
    for i in 0..n {
        let t = Instant::now();
        let v = floor.touch(i);
        fa.us.push(us(t));
        assert_eq!(v, Some(0x5a));

        let t = Instant::now();
        two.ping()?;
        fb.us.push(us(t));

        let t = Instant::now();
        let v = read(two.a(0, rr_base + i));
        rr.us.push(us(t));
        assert_eq!(v, i as u64 + 1);

        for (k, series, page) in [(1, &mut w1, i), (3, &mut w3, n + i)] {
            for node in 0..=k {
                assert_eq!(read(four.a(node, page)), 0);
            }
            let t = Instant::now();
            write(four.a(0, page), 9);
            series.us.push(us(t));
        }

        // Ping-pong, then the old fixed hold on a third set of pages and the same
        // ping-pong page, side by side.
        let p0 = two.a(0, pp_page);
        let round = |series: &mut Series, k: u64| -> Res<()> {
            let odd = 2 * k + 1;
            go_tx.send(odd)?;
            let t = Instant::now();
            write(p0, odd);
            while read(p0) != odd + 1 {
                std::thread::yield_now();
            }
            series.us.push(us(t));
            Ok(())
        };
        round(&mut pp, 2 * i as u64)?;
        set_hold(Some(std::time::Duration::from_micros(200)));
        let page = 2 * n + i;
        for node in 0..=1 {
            assert_eq!(read(four.a(node, page)), 0);
        }
        let t = Instant::now();
        write(four.a(0, page), 9);
        w1f.us.push(us(t));
        round(&mut ppf, 2 * i as u64 + 1)?;
        set_hold(None);
    }
    let latency_s = started.elapsed().as_secs_f64();
    assert_eq!(four.sum(|s| s.invalidations) - inv0, 5 * n as u64);

    // Streaming: node 0 copies fresh regions owned by node 1, page by page; the modes
    // take turns run by run.
    let modes = [
        (0, false, "read-ahead off (one page per fault)"),
        (
            DEFAULT_READAHEAD_PAGES,
            false,
            "read-ahead on (window 8..256)",
        ),
        (
            DEFAULT_READAHEAD_PAGES,
            true,
            "read-ahead on + batched frames",
        ),
    ];
    let mut stat_lines = vec![String::new(); modes.len()];
    let mut stream: Vec<Vec<f64>> = vec![Vec::new(); modes.len()];
    let mut buf = vec![0u8; PG];
    let mut region = 0;
    for _ in 0..runs {
        for (m, &(ra, batch, _)) in modes.iter().enumerate() {
            two.engines[0].set_readahead(ra);
            two.batch.store(batch, Ordering::Relaxed);
            let s0 = two.engines[0].stats();
            let base = stream_base + region * stride;
            region += 1;
            let t = Instant::now();
            for p in base..base + stream_pages {
                // SAFETY: a whole page of node 0's view A.
                unsafe { std::ptr::copy_nonoverlapping(two.a(0, p), buf.as_mut_ptr(), PG) };
                let want = (p - rr_base) as u64 + 1;
                assert_eq!(buf[..8], want.to_le_bytes());
                assert_eq!(buf[PG - 8..], want.to_le_bytes());
            }
            stream[m].push(t.elapsed().as_secs_f64());
            let s1 = two.engines[0].stats();
            let d = |f: fn(&DsmStats) -> u64| f(&s1) - f(&s0);
            stat_lines[m] = format!(
                "read faults {}, prefetched {}, used {}, late {}, batches {}, frames in {} out {}",
                d(|s| s.read_faults),
                d(|s| s.prefetched),
                d(|s| s.prefetch_used),
                d(|s| s.prefetch_late),
                d(|s| s.readahead_batches),
                d(|s| s.batches_received),
                d(|s| s.batches_sent),
            );
        }
    }
    two.engines[0].set_readahead(0);
    two.batch.store(false, Ordering::Relaxed);

    println!();
    println!(
        "DSM over the encrypted loopback transport, threads not pinned, {} CPUs",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!("(latency cases interleaved round by round; {latency_s:.1} s for {n} rounds)");
    println!();
    println!(
        "| {:<52} | {:>9} | {:>9} | {:>6} |",
        "case", "median us", "p90 us", "n"
    );
    println!("|{:-<54}|{:-<11}|{:-<11}|{:-<8}|", "", "", "", "");
    let floor_sum = fa.q(0.5) + fb.q(0.5);
    for s in [&fa, &fb] {
        s.print();
    }
    println!(
        "| {:<52} | {:>9.1} | {:>9} | {:>6} |",
        "floor (a) + (b)", floor_sum, "", ""
    );
    for s in [&rr, &w1, &w3, &pp, &w1f, &ppf] {
        s.print();
    }
    let med = |v: &Vec<f64>| {
        let mut v = v.clone();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let mib = (stream_pages * PG) as f64 / f64::from(1 << 20);
    println!();
    println!(
        "| {:<40} | {:>9} | {:>11} | {:>5} |",
        "sequential streaming (median of runs)", "MiB/s", "pages/s", "runs"
    );
    println!("|{:-<42}|{:-<11}|{:-<13}|{:-<7}|", "", "", "", "");
    for (m, &(_, _, name)) in modes.iter().enumerate() {
        let s = med(&stream[m]);
        println!(
            "| {:<40} | {:>9.1} | {:>11.0} | {:>5} |",
            name,
            mib / s,
            stream_pages as f64 / s,
            stream[m].len()
        );
    }
    println!("\nstreaming node 0, last run of each mode:");
    for (m, &(_, _, name)) in modes.iter().enumerate() {
        println!("  {name}: {}", stat_lines[m]);
    }
    println!();
    println!(
        "ratio remote read / floor (a+b): {:.2} (target <= 1.3)",
        rr.q(0.5) / floor_sum
    );
    println!(
        "ratio streaming read-ahead on / off: {:.1}x; read-ahead + batching / off: {:.1}x (target >= 5)",
        med(&stream[0]) / med(&stream[1]),
        med(&stream[0]) / med(&stream[2])
    );
    for (name, net) in [("2-node", &two), ("4-node", &four)] {
        let bad = net.sum(|s| s.protocol_errors + s.bad_msgs + s.io_errors);
        println!("{name} cluster: protocol errors + bad messages + I/O errors = {bad}");
    }
    // Leave the threads to process exit: engines, transports and receive threads are
    // tied up in each other and a clean shutdown is not what this measures.
    std::process::exit(0);
}
