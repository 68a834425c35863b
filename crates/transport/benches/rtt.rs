//! Round-trip latency over loopback: a 16-byte request answered by a 4 KiB reply,
//! through the encrypted transport, the insecure (authenticated) transport and plain TCP.
//!
//! Run with `cargo bench -p dvmm-transport` (optionally `-- ITERATIONS`).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

use dvmm_transport::{Event, Transport, TransportConfig};

const REQ: usize = 16;
const REPLY: usize = 4096;
const WARMUP: usize = 1000;

fn stats(mut v: Vec<Duration>) -> (Duration, Duration, Duration) {
    v.sort();
    let pct = |p: usize| v[(v.len() - 1) * p / 100];
    (pct(50), pct(90), pct(99))
}

fn transport_rtt(encrypt: bool, iters: usize) -> Vec<Duration> {
    let l0 = TcpListener::bind("127.0.0.1:0").unwrap();
    let l1 = TcpListener::bind("127.0.0.1:0").unwrap();
    let peers: Vec<SocketAddr> = vec![l0.local_addr().unwrap(), l1.local_addr().unwrap()];
    let mut c0 = TransportConfig::new(0, peers.clone(), "bench secret");
    c0.encrypt = encrypt;
    let mut c1 = TransportConfig::new(1, peers, "bench secret");
    c1.encrypt = encrypt;
    let server = thread::spawn(move || {
        let (t, rx) = Transport::start_with_listener(c0, l0).unwrap();
        let reply = vec![0x5a; REPLY];
        while let Ok(Event::Message { from, kind: 1, .. }) = rx.recv() {
            if t.send(from, 2, &reply).is_err() {
                break;
            }
        }
    });
    let (t, rx) = Transport::start_with_listener(c1, l1).unwrap();
    let req = [7u8; REQ];
    let mut out = Vec::with_capacity(iters);
    for i in 0..WARMUP + iters {
        let start = Instant::now();
        t.send(0, 1, &req).unwrap();
        match rx.recv().unwrap() {
            Event::Message {
                kind: 2, payload, ..
            } => assert_eq!(payload.len(), REPLY),
            e => panic!("unexpected event {e:?}"),
        }
        if i >= WARMUP {
            out.push(start.elapsed());
        }
    }
    drop(t);
    server.join().unwrap();
    out
}

fn tcp_rtt(iters: usize) -> Vec<Duration> {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let server = thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        s.set_nodelay(true).unwrap();
        let mut req = [0u8; REQ];
        let reply = vec![0x5a; REPLY];
        while s.read_exact(&mut req).is_ok() {
            if s.write_all(&reply).is_err() {
                break;
            }
        }
    });
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_nodelay(true).unwrap();
    let req = [7u8; REQ];
    let mut reply = vec![0u8; REPLY];
    let mut out = Vec::with_capacity(iters);
    for i in 0..WARMUP + iters {
        let start = Instant::now();
        s.write_all(&req).unwrap();
        s.read_exact(&mut reply).unwrap();
        if i >= WARMUP {
            out.push(start.elapsed());
        }
    }
    drop(s);
    server.join().unwrap();
    out
}

fn main() {
    let iters = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(10_000);
    println!(
        "round trip, {REQ}-byte request + {REPLY}-byte reply over loopback, {iters} iterations"
    );
    println!(
        "{:<28} {:>10} {:>10} {:>10}",
        "mode", "median", "p90", "p99"
    );
    let runs = [
        ("plain TCP", tcp_rtt(iters)),
        ("transport, insecure (MAC)", transport_rtt(false, iters)),
        ("transport, encrypted", transport_rtt(true, iters)),
    ];
    for (name, v) in runs {
        let (p50, p90, p99) = stats(v);
        println!(
            "{name:<28} {:>8.1}us {:>8.1}us {:>8.1}us",
            p50.as_secs_f64() * 1e6,
            p90.as_secs_f64() * 1e6,
            p99.as_secs_f64() * 1e6
        );
    }
}
