//! A TCP proxy that puts faults on a node link: delay and jitter, a stall, a flipped
//! byte, a duplicated chunk. The transport's byte stream cannot be reordered without
//! breaking its framing, so reordering shows up as duplication of an earlier chunk
//! (a replayed frame) or as a corrupted frame; both must end the cluster, never be
//! delivered.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

/// What the proxy does to the bytes.
#[derive(Clone, Debug, Default)]
pub struct Faults {
    /// Every chunk waits this long (both directions).
    pub delay: Duration,
    /// Plus up to this much more, at random (order is kept).
    pub jitter: Duration,
    /// After `.0` of the proxy's life, nothing moves for `.1` (both directions).
    pub stall: Option<(Duration, Duration)>,
    /// The byte at this offset of the dialer-to-listener stream has one bit flipped.
    pub flip_at: Option<u64>,
    /// The chunk holding this offset of the dialer-to-listener stream is sent twice.
    pub duplicate_at: Option<u64>,
    /// Seeds the jitter.
    pub seed: u64,
}

/// A running proxy: connections to `addr` go to the target with `faults` applied.
pub struct FaultyLink {
    /// Where to connect.
    pub addr: SocketAddr,
    /// Bytes forwarded so far (both directions).
    pub forwarded: Arc<AtomicU64>,
    /// Whether the stall happened (some bytes were held for it).
    pub stalled: Arc<AtomicBool>,
    /// Tells the accepting thread to end.
    done: Arc<AtomicBool>,
}

impl Drop for FaultyLink {
    fn drop(&mut self) {
        self.done.store(true, Ordering::Release);
        // Wake the accepting thread so that it sees the flag.
        let _ = TcpStream::connect(self.addr);
    }
}

impl FaultyLink {
    /// Starts a proxy in front of `target` (one connection at a time, as a node link).
    pub fn start(target: SocketAddr, faults: Faults) -> FaultyLink {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind proxy");
        let addr = listener.local_addr().expect("proxy address");
        let forwarded = Arc::new(AtomicU64::new(0));
        let stalled = Arc::new(AtomicBool::new(false));
        let done = Arc::new(AtomicBool::new(false));
        let (fwd, st, end) = (forwarded.clone(), stalled.clone(), done.clone());
        thread::spawn(move || {
            let born = Instant::now();
            for conn in listener.incoming() {
                if end.load(Ordering::Acquire) {
                    return;
                }
                let Ok(client) = conn else { return };
                let Ok(server) = TcpStream::connect(target) else {
                    let _ = client.shutdown(Shutdown::Both);
                    continue;
                };
                let _ = client.set_nodelay(true);
                let _ = server.set_nodelay(true);
                let up = (client.try_clone().unwrap(), server.try_clone().unwrap());
                let down = (server, client);
                let f = faults.clone();
                let (a, b) = (fwd.clone(), fwd.clone());
                let (s1, s2) = (st.clone(), st.clone());
                thread::spawn(move || pump(up.0, up.1, f, true, born, a, s1));
                let f = faults.clone();
                thread::spawn(move || pump(down.0, down.1, f, false, born, b, s2));
            }
        });
        FaultyLink {
            addr,
            forwarded,
            stalled,
            done,
        }
    }
}

/// A tiny xorshift: jitter needs no quality, only variety.
struct Rng(u64);
impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        if n == 0 {
            0
        } else {
            self.0 % n
        }
    }
}

/// Copies `from` to `to` with the faults; `dialer` marks the dialer-to-listener side.
fn pump(
    mut from: TcpStream,
    to: TcpStream,
    f: Faults,
    dialer: bool,
    born: Instant,
    forwarded: Arc<AtomicU64>,
    stalled_flag: Arc<AtomicBool>,
) {
    let (tx, rx) = mpsc::channel::<(Instant, Vec<u8>)>();
    let mut writer = to.try_clone().expect("clone");
    let stall = f.stall;
    let w = thread::spawn(move || {
        let mut stalled = false;
        for (due, bytes) in rx {
            if let Some((at, len)) = stall {
                if !stalled && born.elapsed() >= at {
                    stalled = true;
                    stalled_flag.store(true, Ordering::Release);
                    thread::sleep(len);
                }
            }
            let now = Instant::now();
            if due > now {
                thread::sleep(due - now);
            }
            if writer.write_all(&bytes).is_err() {
                break;
            }
        }
        let _ = writer.shutdown(Shutdown::Write);
    });
    let mut rng = Rng(
        (0x9e37_79b9_7f4a_7c15 ^ f.seed.wrapping_mul(0x2545_f491_4f6c_dd1d))
            | 1
            | u64::from(dialer) << 1,
    );
    let mut offset = 0u64;
    let mut last_due = Instant::now();
    let mut buf = vec![0u8; 64 * 1024];
    'read: loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let mut chunk = buf[..n].to_vec();
        let range = offset..offset + n as u64;
        let mut copies = 1;
        if dialer {
            if let Some(at) = f.flip_at.filter(|a| range.contains(a)) {
                chunk[(at - offset) as usize] ^= 0x10;
            }
            if f.duplicate_at.is_some_and(|a| range.contains(&a)) {
                copies = 2;
            }
        }
        offset += n as u64;
        let jitter = Duration::from_nanos(rng.below(f.jitter.as_nanos() as u64));
        let due = (Instant::now() + f.delay + jitter).max(last_due);
        last_due = due;
        forwarded.fetch_add(n as u64, Ordering::Relaxed);
        for _ in 0..copies {
            if tx.send((due, chunk.clone())).is_err() {
                // The writer is gone: so is this direction.
                break 'read;
            }
        }
    }
    let _ = from.shutdown(Shutdown::Both);
    drop(tx);
    let _ = w.join();
    let _ = to.shutdown(Shutdown::Write);
}
