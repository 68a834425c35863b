//! The userfaultfd engine of dvmm's distributed shared memory.
//!
//! It connects the pure protocol state machine [`dvmm_dsm::Node`] to guest RAM. Guest RAM
//! is one memfd mapped twice ([`GuestPages`]): view A, which KVM and the vCPUs use and
//! which the engine registers with userfaultfd (MISSING | MINOR | WP), and view B, the
//! VMM's own window, through which the engine fills and reads page contents.
//!
//! * Fault in view A -> [`Node::fault`]; protocol actions are performed in order:
//!   install read-only (`UFFDIO_CONTINUE` with `MODE_WP`, or `UFFDIO_COPY` of a zero page
//!   with `MODE_WP` for a hole), install writable (the same without WP, or clearing WP of
//!   a mapped page), downgrade (`UFFDIO_WRITEPROTECT`), invalidate (`MADV_DONTNEED` on
//!   view A; the page cache keeps the bytes), send (data read from view B).
//! * Incoming payloads are copied into view B before [`Node::receive`] sees the message.
//! * The VMM's own accesses go through [`DsmEngine::access`], which pins pages: messages
//!   that would take a pinned page away are deferred until the pin drops.
//!
//! * Read-ahead: a read fault that continues a forward sequential stream (the previous read
//!   fault was on the page before, or the page lies in the stream's prefetched range) also
//!   requests the next pages that are `Invalid` (window 8, doubling to
//!   [`DEFAULT_READAHEAD_PAGES`] while the stream goes on, reset by a non-sequential read
//!   fault; see [`DsmEngine::set_readahead`]). Their grants arrive pipelined and are mapped
//!   read-only with nobody waiting, except the first page of each batch (the *marker*),
//!   which is left unmapped: its first touch is a cheap local fault that issues the next
//!   batch, like Linux's `PG_readahead`.
//!
//! One mutex serializes fault handling, message handling and pins for the whole node.
//! That keeps actions in protocol order trivially; its cost is that unrelated pages do
//! not proceed in parallel (and [`PageNet::send`] runs under it, so it must not block long).

mod error;
mod executor;
mod hold;
mod pages;
mod pin;
mod stats;
mod sys;
pub mod testing;
#[cfg(test)]
mod tests;

use dvmm_sync::{CondvarExt, MutexExt};
use std::collections::{HashMap, VecDeque};
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Instant;

pub use dvmm_dsm::{Access, Action, Msg, Node, NodeId, PageNo, PageState, SeedError};
use hold::Hold;

use executor::{is_held, must_defer, owe_kick};

pub use error::DsmError;
pub use pages::GuestPages;
pub use pin::PinGuard;
pub use stats::{DsmStats, FAULT_WAIT_BOUNDS_NS};

/// Size of a DSM page.
pub const PAGE_SIZE: u64 = 4096;

/// Largest read-ahead window (pages) of a new engine; see [`DsmEngine::set_readahead`].
pub const DEFAULT_READAHEAD_PAGES: u64 = 256;

/// First read-ahead window (pages) of a stream; it doubles per batch up to the maximum.
pub const INITIAL_READAHEAD_PAGES: u64 = 8;

/// Whoever else on this node derives state from guest pages and must drop it when the
/// DSM takes a page away. On hosts whose KVM shadows the guest's page tables (no EPT/NPT)
/// that is KVM itself: it assumes it sees every write to a page table it shadows, and a
/// write made on another node is not one it sees.
///
/// Dropping may have to wait for the users of the derived state (KVM's vCPUs), and those
/// may wait in a fault for this engine. So a message that would take such a page away
/// is deferred (like a pinned page's) while the engine asks them to [`quiesce`] and goes
/// on serving faults; once they are [`quiesced`], the message is delivered, the page
/// invalidated, the state dropped, and only then do the operation's messages leave and
/// the users [`resume`].
///
/// [`quiesce`]: LocalDerived::quiesce
/// [`quiesced`]: LocalDerived::quiesced
/// [`resume`]: LocalDerived::resume
pub trait LocalDerived: Send + Sync {
    /// Whether derived state may hang on `contents`, the bytes this node has of `page`,
    /// so that it must be dropped when the page is taken away from this node.
    fn derives_from(&self, page: PageNo, contents: &[u8]) -> bool;
    /// Asks the users of the derived state to stop where they hold nothing (does not
    /// block; called again while they have not). Before kicking user thread `tid`, ask
    /// `defer_kick(tid)`: true means the thread waits in one of the engine's faults and
    /// the engine kicks it once that fault is served (see [`DsmEngine::defer_kick`]).
    fn quiesce(&self, defer_kick: &mut dyn FnMut(i32) -> bool);
    /// Whether every user has stopped.
    fn quiesced(&self) -> bool;
    /// Whether every user that has not stopped waits in a fault (`waiting(tid)`: the
    /// kernel thread `tid` waits in one of the engine's faults), so that it cannot stop
    /// before the engine serves it.
    fn blocked_in_faults(&self, waiting: &dyn Fn(i32) -> bool) -> bool;
    /// Lets the users go on.
    fn resume(&self);
    /// Drops the derived state if the users are quiesced (returns false, dropping
    /// nothing, if not: the engine then keeps them quiescing and asks again).
    fn drop_derived(&self) -> bool;
}

/// How long the engine waits for [`LocalDerived::quiesce`] before it delivers anyway (a
/// user that cannot stop is stuck on something else; waiting longer would hang the guest).
const QUIESCE_GIVE_UP: std::time::Duration = std::time::Duration::from_millis(200);
/// How long a drop that could not be made (users not quiesced) is retried before the
/// engine lets the users go on without it.
const DROP_GIVE_UP: std::time::Duration = std::time::Duration::from_secs(1);
/// How often the hold thread looks at a quiesce in progress.
const QUIESCE_POLL: std::time::Duration = std::time::Duration::from_micros(50);

/// How the engine talks to other nodes (the node runtime implements it over dvmm-transport).
pub trait PageNet: Send + Sync {
    /// Send a protocol message; `data` is the 4 KiB page when `msg.has_data()`.
    fn send(&self, to: NodeId, msg: &Msg, data: Option<&[u8]>);

    /// Send several messages to `to`, in order. The engine collects the messages one fault
    /// or one incoming frame produces and hands each destination's share over here.
    /// The default sends them one by one with [`PageNet::send`]. An implementation may
    /// put them into one transport frame (each message's 16-byte header followed by its
    /// payload, if any, concatenated) if the receiving side passes such frames to
    /// [`DsmEngine::receive_frame`].
    fn send_batch(&self, to: NodeId, msgs: &[(Msg, Option<&[u8]>)]) {
        for (msg, data) in msgs {
            self.send(to, msg, *data);
        }
    }
}

const MAP_NONE: u8 = 0;
const MAP_RO: u8 = 1;
const MAP_RW: u8 = 2;
const MAP_MASK: u8 = 3;
/// The last fault on the page said MISSING and nothing has filled it since.
const HOLE_HINT: u8 = 4;

/// Read-ahead flag: requested speculatively, not yet counted as used.
const RA_PREFETCHED: u8 = 1;
/// Read-ahead flag: the batch's marker; not mapped on arrival unless a fault waits for it.
const RA_MARKER: u8 = 2;

/// One node's forward read stream (faults of all vCPUs of the node together).
#[derive(Default)]
struct ReadAhead {
    /// Largest window in pages; 0 disables read-ahead.
    max: u64,
    /// Current window (0: no stream yet).
    window: u64,
    /// Page of the last read fault.
    last: Option<PageNo>,
    /// End (exclusive) of the pages considered for prefetching so far.
    frontier: PageNo,
    /// Start of the prefetched range not yet accounted as used.
    pos: PageNo,
    /// The current marker page, if any (at most one, so batches stay large).
    marker: Option<PageNo>,
}

#[derive(Default, Clone, Copy)]
struct Pin {
    readers: u32,
    writers: u32,
}

type Deferred = VecDeque<(NodeId, Msg, Option<Box<[u8]>>)>;

/// Per page: the threads waiting in a fault on it (kernel thread ids) and, once read,
/// each one's CPU time while it waited.
type Faulters = HashMap<PageNo, Vec<(i32, Option<std::time::Duration>)>>;

struct State {
    node: Node,
    /// Per page: view A mapping (`MAP_*`) and `HOLE_HINT`.
    flags: Vec<u8>,
    pins: HashMap<PageNo, Pin>,
    deferred: HashMap<PageNo, Deferred>,
    waiting_since: HashMap<PageNo, Instant>,
    /// Pages just handed to waiting vCPUs, kept for them a little (see [`hold`]).
    holds: HashMap<PageNo, Hold>,
    /// Threads waiting in a fault on the page (kernel thread ids), for its hold.
    /// With each thread's CPU time while it waited, read once the request is out (it
    /// does not change while the thread sleeps; reading it after the wake would compete
    /// with the thread's own wake-up).
    faulters: Faulters,
    /// Some: every hold lasts this long (see [`DsmEngine::set_fixed_hold`]).
    fixed_hold: Option<std::time::Duration>,
    stats: DsmStats,
    /// Per page: `RA_*` flags.
    ra_flags: Vec<u8>,
    ra: ReadAhead,
    /// Messages to send when the current operation ends: destination, message, offset of
    /// the payload in `outdata`.
    outbox: Vec<(NodeId, Msg, Option<usize>)>,
    outdata: Vec<u8>,
    /// Guest faults per page that needed the protocol (reads, writes): the hot pages.
    hot: HashMap<PageNo, [u32; 2]>,
    /// An invalidation in the current operation needs [`LocalDerived::drop_derived`].
    drop_derived: bool,
    /// Pages whose deferred messages wait for [`LocalDerived::quiesced`].
    quiesce_pages: std::collections::BTreeSet<PageNo>,
    /// When the current quiesce was asked for.
    quiesce_since: Option<Instant>,
    /// Deliver without quiescing (the quiesce was given up).
    quiesce_forced: bool,
    /// A drop is owed: an invalidation happened while the users were not quiesced.
    drop_owed: bool,
    /// Threads whose kick was held back while they waited in a fault (see
    /// [`DsmEngine::defer_kick`]).
    owed_kicks: Vec<i32>,
}

struct Inner {
    st: Mutex<State>,
    cv: Condvar,
    /// Wakes the hold thread: a message was deferred behind a hold, or the engine stops.
    hold_cv: Condvar,
    uffd: sys::Uffd,
    stop_fd: vmm_sys_util::eventfd::EventFd,
    stopped: AtomicBool,
    pages: GuestPages,
    npages: u64,
    net: Arc<dyn PageNet>,
    zero: sys::ZeroPage,
    derived: Option<Arc<dyn LocalDerived>>,
    /// Sends a kick held back by [`DsmEngine::defer_kick`].
    kick: std::sync::OnceLock<KickThread>,
}

/// Kicks a thread (by kernel thread id) whose kick waited for its fault to end.
pub type KickThread = Box<dyn Fn(i32) + Send + Sync>;

/// One node's DSM engine (see the crate documentation).
pub struct DsmEngine {
    inner: Arc<Inner>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl DsmEngine {
    /// Registers view A with userfaultfd (MISSING | MINOR | WP) and starts the fault-handling
    /// thread. `shared` lists pages that every node already holds identical contents for
    /// (the boot loader ran deterministically on every node before start): they start
    /// ReadOnly everywhere, written=true at their home with copyset = all nodes. They are
    /// mapped lazily, on the first fault, without any message.
    pub fn start(
        node: Node,
        pages: GuestPages,
        net: Arc<dyn PageNet>,
        shared: &[PageNo],
    ) -> Result<Arc<DsmEngine>, DsmError> {
        DsmEngine::start_with(node, pages, net, shared, None)
    }

    /// [`DsmEngine::start`], with `derived` told of every invalidation (see
    /// [`LocalDerived`]).
    pub fn start_with(
        mut node: Node,
        pages: GuestPages,
        net: Arc<dyn PageNet>,
        shared: &[PageNo],
        derived: Option<Arc<dyn LocalDerived>>,
    ) -> Result<Arc<DsmEngine>, DsmError> {
        pages.validate()?;
        let npages = pages.len / PAGE_SIZE;
        let all: Vec<NodeId> = (0..node.nodes()).collect();
        for &page in shared {
            if page >= npages {
                return Err(DsmError::SharedOutOfRange {
                    page,
                    pages: npages,
                });
            }
            node.seed_shared(page, &all)?;
        }
        let os = |what| move |source| DsmError::Uffd { what, source };
        let uffd = sys::Uffd::open().map_err(os("open and API handshake"))?;
        uffd.register(pages.view_a as u64, pages.len)
            .map_err(os("register view A for MISSING|MINOR|WP"))?;
        let stop_fd = sys::stop_eventfd().map_err(os("eventfd"))?;
        let zero = sys::ZeroPage::new().map_err(os("zero page"))?;
        let inner = Arc::new(Inner {
            st: Mutex::new(State {
                node,
                flags: vec![0; npages as usize],
                pins: HashMap::new(),
                deferred: HashMap::new(),
                waiting_since: HashMap::new(),
                holds: HashMap::new(),
                faulters: HashMap::new(),
                fixed_hold: None,
                stats: DsmStats::default(),
                ra_flags: vec![0; npages as usize],
                ra: ReadAhead {
                    max: DEFAULT_READAHEAD_PAGES,
                    ..ReadAhead::default()
                },
                outbox: Vec::new(),
                outdata: Vec::new(),
                hot: HashMap::new(),
                drop_derived: false,
                quiesce_pages: Default::default(),
                quiesce_since: None,
                quiesce_forced: false,
                drop_owed: false,
                owed_kicks: Vec::new(),
            }),
            cv: Condvar::new(),
            hold_cv: Condvar::new(),
            uffd,
            stop_fd,
            stopped: AtomicBool::new(false),
            pages,
            npages,
            net,
            zero,
            derived,
            kick: std::sync::OnceLock::new(),
        });
        let worker = Arc::clone(&inner);
        let thread = std::thread::Builder::new()
            .name("dsm-uffd".into())
            .spawn(move || worker.fault_loop())
            .map_err(DsmError::Thread)?;
        let holder = Arc::clone(&inner);
        std::thread::Builder::new()
            .name("dsm-hold".into())
            .spawn(move || holder.hold_loop())
            .map_err(DsmError::Thread)?;
        Ok(Arc::new(DsmEngine {
            inner,
            thread: Mutex::new(Some(thread)),
        }))
    }

    /// A message from another node (called from the transport's receive thread). `data` is
    /// the page payload if any. Malformed or unexpected messages are logged and counted.
    pub fn receive(&self, from: NodeId, msg: Msg, data: Option<&[u8]>) {
        let inner = &*self.inner;
        let mut st = inner.lock();
        if inner.stopped.load(Ordering::Acquire) {
            return;
        }
        let t0 = Instant::now();
        self.receive_locked(&mut st, from, msg, data);
        inner.flush(&mut st);
        st.stats.busy_ns += t0.elapsed().as_nanos() as u64;
    }

    /// A transport frame of DSM messages from another node: one or more messages, each
    /// its 16-byte header followed by its 4 KiB payload if it has one (what a
    /// [`PageNet::send_batch`] implementation may send). A single message is the same
    /// frame [`PageNet::send`] sends. A malformed tail is counted and dropped; the
    /// messages before it are delivered.
    pub fn receive_frame(&self, from: NodeId, frame: &[u8]) {
        let inner = &*self.inner;
        let mut st = inner.lock();
        if inner.stopped.load(Ordering::Acquire) {
            return;
        }
        let t0 = Instant::now();
        let mut count = 0u64;
        for item in dvmm_dsm::parse_frame(frame) {
            match item {
                Ok((msg, data)) => {
                    count += 1;
                    self.receive_locked(&mut st, from, msg, data);
                }
                Err(e) => {
                    st.stats.bad_msgs += 1;
                    tracing::warn!(from, error = %e, "malformed DSM frame: the rest is dropped");
                }
            }
        }
        if count > 1 {
            st.stats.batches_received += 1;
        }
        inner.flush(&mut st);
        st.stats.busy_ns += t0.elapsed().as_nanos() as u64;
    }

    fn receive_locked(&self, st: &mut State, from: NodeId, msg: Msg, data: Option<&[u8]>) {
        let inner = &*self.inner;
        st.stats.msgs_received += 1;
        let page = msg.page();
        if page >= inner.npages {
            st.stats.bad_msgs += 1;
            tracing::warn!(
                from,
                ?msg,
                "DSM message for a page outside guest RAM dropped"
            );
            return;
        }
        let data = match (msg.has_data(), data) {
            (true, Some(d)) if d.len() as u64 == PAGE_SIZE => Some(d),
            (true, _) => {
                st.stats.bad_msgs += 1;
                tracing::warn!(from, ?msg, "DSM message without its 4 KiB payload dropped");
                return;
            }
            (false, Some(_)) => {
                st.stats.bad_msgs += 1;
                tracing::debug!(from, ?msg, "unexpected payload ignored");
                None
            }
            (false, None) => None,
        };
        // A hold that is over stays in the map until the hold thread drains what it
        // deferred, so that those messages keep their order.
        let held = is_held(st, page, Instant::now());
        let pin = match st.pins.get(&page).copied() {
            Some(pin) => Some(pin),
            // A hold defers like a pin of the access the woken vCPU asked for.
            None if held => Some(match st.node.state(page) {
                PageState::Writable => Pin {
                    readers: 0,
                    writers: 1,
                },
                _ => Pin {
                    readers: 1,
                    writers: 0,
                },
            }),
            None => None,
        };
        let queued = st.deferred.get(&page).is_some_and(|q| !q.is_empty());
        let is_home = st.node.home(page) == st.node.id();
        let quiesce = !queued && inner.needs_quiesce(st, from, msg);
        if queued
            && pin.is_none()
            && !st.holds.contains_key(&page)
            && !st.quiesce_pages.contains(&page)
        {
            // Nothing left to drain the queue later (cannot happen: a queue lives only
            // while a pin or a hold does); deliver it now, in order.
            inner.drain_deferred(st, page);
        } else if quiesce || queued || pin.is_some_and(|p| must_defer(msg, p, is_home)) {
            st.stats.deferred_msgs += 1;
            if quiesce {
                inner.start_quiesce(st, page);
            } else if !st.pins.contains_key(&page) {
                // Only the hold thread will deliver it: let it look again now.
                inner.hold_cv.notify_one();
            }
            let copy = data.map(|d| d.to_vec().into_boxed_slice());
            st.deferred
                .entry(page)
                .or_default()
                .push_back((from, msg, copy));
            return;
        }
        inner.deliver(st, from, msg, data);
    }

    /// The VMM's own access to guest RAM (device DMA, firmware tables after start): makes
    /// `[offset, offset+len)` locally readable (or writable), blocking until granted, and
    /// pins those pages against invalidation/downgrade until the guard drops; reads/writes
    /// go through view B.
    ///
    /// Pages are acquired and pinned in ascending order, so concurrent `access` calls on
    /// any nodes cannot deadlock, as long as a thread does not call `access` while it
    /// holds a guard. While a page is pinned, other nodes' requests for it wait.
    pub fn access(&self, offset: u64, len: u64, access: Access) -> Result<PinGuard<'_>, DsmError> {
        let inner = &*self.inner;
        let end = offset
            .checked_add(len)
            .filter(|&e| e <= inner.pages.len)
            .ok_or(DsmError::OutOfRange {
                offset,
                len,
                start: 0,
                end: inner.pages.len,
            })?;
        let mut guard = PinGuard {
            engine: self,
            offset,
            len,
            access,
            first: offset / PAGE_SIZE,
            pinned_end: offset / PAGE_SIZE,
        };
        if len == 0 {
            return Ok(guard);
        }
        let last = (end - 1) / PAGE_SIZE;
        let mut st = inner.lock();
        for page in guard.first..=last {
            let mut asked = false;
            loop {
                if inner.stopped.load(Ordering::Acquire) {
                    drop(st);
                    return Err(DsmError::Stopped);
                }
                let state = st.node.state(page);
                let ok = match access {
                    Access::Read => state.readable(),
                    Access::Write => state == PageState::Writable,
                };
                if ok {
                    let pin = st.pins.entry(page).or_default();
                    match access {
                        Access::Read => pin.readers += 1,
                        Access::Write => pin.writers += 1,
                    }
                    guard.pinned_end = page + 1;
                    break;
                }
                if !asked || !state.pending() {
                    asked = true;
                    let t0 = Instant::now();
                    st.stats.vmm_faults += 1;
                    let actions = st.node.fault(page, access);
                    inner.exec(&mut st, actions);
                    inner.flush(&mut st);
                    st.stats.busy_ns += t0.elapsed().as_nanos() as u64;
                    continue;
                }
                st = inner.cv.wait_locked(st);
            }
        }
        drop(st);
        Ok(guard)
    }

    /// Sets the largest read-ahead window in pages ([`DEFAULT_READAHEAD_PAGES`] for a new
    /// engine); 0 turns read-ahead off. Resets the current stream.
    pub fn set_readahead(&self, max_pages: u64) {
        let mut st = self.inner.lock();
        st.ra = ReadAhead {
            max: max_pages,
            ..ReadAhead::default()
        };
    }

    /// Replaces the hold rule (see PROTOCOL.md) by a fixed hold of `hold` for every page
    /// handed to waiting vCPUs (`None`: back to the rule). For benchmarks that compare
    /// the two; a fixed hold makes every contended handoff pay for it.
    pub fn set_fixed_hold(&self, hold: Option<std::time::Duration>) {
        self.inner.lock().fixed_hold = hold;
    }

    /// The largest read-ahead window in pages (0: off).
    pub fn readahead(&self) -> u64 {
        self.inner.lock().ra.max
    }

    /// The `n` pages whose guest faults needed the protocol most often: (page, read
    /// faults, write faults), most first.
    pub fn hot_pages(&self, n: usize) -> Vec<(PageNo, u32, u32)> {
        let st = self.inner.lock();
        let mut v: Vec<(PageNo, u32, u32)> =
            st.hot.iter().map(|(p, [r, w])| (*p, *r, *w)).collect();
        v.sort_by_key(|&(p, r, w)| (std::cmp::Reverse(u64::from(r) + u64::from(w)), p));
        v.truncate(n);
        v
    }

    /// A snapshot of the engine's counters.
    pub fn stats(&self) -> DsmStats {
        let mut st = self.inner.lock();
        st.stats.protocol_errors = st.node.protocol_errors();
        st.stats.clone()
    }

    /// The protocol state of `page` at this node (for tests and diagnostics).
    pub fn page_state(&self, page: PageNo) -> PageState {
        self.inner.lock().node.state(page)
    }

    /// Sets how a held-back kick is sent (see [`DsmEngine::defer_kick`]); once.
    pub fn set_kick_thread(&self, kick: KickThread) {
        if self.inner.kick.set(kick).is_err() {
            tracing::warn!("the DSM's kick function was set twice; keeping the first");
        }
    }

    /// Holds back a kick to thread `tid` while it waits in a fault of this engine:
    /// returns true if held back (the engine sends it with the function given to
    /// [`DsmEngine::set_kick_thread`] right after it wakes the thread), false if `tid`
    /// waits in no fault of ours (kick it now).
    ///
    /// Why: a signal that reaches a thread sleeping in a userfault makes the kernel end
    /// the fault early; a KVM whose instruction emulator retries the access without
    /// returning to user space then faults again at once, over and over, until the page
    /// arrives: CPU time and a stream of fault events taken from the other threads. The
    /// thread cannot act on the kick before its access completes anyway.
    pub fn defer_kick(&self, tid: i32) -> bool {
        if tid <= 0 || self.inner.kick.get().is_none() {
            return false;
        }
        let mut st = self.inner.lock();
        // Checked under the lock: `stop` sends the owed kicks after it set the flag.
        if self.inner.stopped.load(Ordering::Acquire) {
            return false;
        }
        let State {
            faulters,
            owed_kicks,
            stats,
            ..
        } = &mut *st;
        owe_kick(faulters, owed_kicks, stats, tid)
    }

    /// Ends the fault thread (also on Drop) and unregisters view A, which wakes blocked
    /// faulters: afterwards view A behaves like plain shared memory, without coherence.
    /// Blocked [`DsmEngine::access`] calls return [`DsmError::Stopped`].
    pub fn stop(&self) {
        let inner = &*self.inner;
        if inner.stopped.swap(true, Ordering::AcqRel) {
            return;
        }
        // A full counter (2^64 - 2 signals) is the only failure, and it is readable then.
        let _ = inner.stop_fd.write(1);
        let handle = self.thread.locked().take();
        if let Some(h) = handle {
            if h.thread().id() != std::thread::current().id() && h.join().is_err() {
                tracing::error!("DSM fault thread panicked");
            }
        }
        if let Err(e) = inner
            .uffd
            .unregister(inner.pages.view_a as u64, inner.pages.len)
        {
            tracing::warn!("unregistering guest RAM from userfaultfd failed: {e}");
        }
        let owed = std::mem::take(&mut inner.lock().owed_kicks);
        if let Some(kick) = inner.kick.get() {
            for tid in owed {
                kick(tid);
            }
        }
        let _st = inner.lock();
        inner.cv.notify_all();
        inner.hold_cv.notify_all();
    }
}

impl Drop for DsmEngine {
    fn drop(&mut self) {
        self.stop();
    }
}
