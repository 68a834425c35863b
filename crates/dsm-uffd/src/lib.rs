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

mod hold;
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

/// Size of a DSM page.
pub const PAGE_SIZE: u64 = 4096;

/// Largest read-ahead window (pages) of a new engine; see [`DsmEngine::set_readahead`].
pub const DEFAULT_READAHEAD_PAGES: u64 = 256;

/// First read-ahead window (pages) of a stream; it doubles per batch up to the maximum.
pub const INITIAL_READAHEAD_PAGES: u64 = 8;

/// Guest RAM as the engine sees it: the RAM offset space `[0, len)` (not guest-physical
/// addresses; the caller converts), with view A (what KVM/vCPUs access; the engine
/// registers it with userfaultfd) and view B (the VMM's window; the engine fills and reads
/// page contents through it). Both are `MAP_SHARED` mappings of the same memfd.
///
/// The fields are public to keep construction simple; build it with
/// [`GuestPages::new`], whose safety contract the engine relies on.
#[derive(Debug, Clone, Copy)]
pub struct GuestPages {
    /// Start of view A (registered with userfaultfd by the engine).
    pub view_a: *mut u8,
    /// Start of view B (the VMM's window).
    pub view_b: *mut u8,
    /// Length of each view in bytes, a multiple of 4 KiB.
    pub len: u64,
}

// SAFETY: the pointers designate shared mappings that, per `GuestPages::new`'s contract,
// outlive the engine; concurrent access to guest memory is coordinated by the protocol.
unsafe impl Send for GuestPages {}
// SAFETY: as above.
unsafe impl Sync for GuestPages {}

impl GuestPages {
    /// Describes guest RAM.
    ///
    /// # Safety
    ///
    /// `view_a` and `view_b` must each start a readable and writable `MAP_SHARED`
    /// mapping of `len` bytes of the same memfd (shmem), at the same file offset, and
    /// both must stay mapped for as long as any engine built on them (and any
    /// [`PinGuard`]) lives. View A must not be registered with another userfaultfd.
    pub unsafe fn new(view_a: *mut u8, view_b: *mut u8, len: u64) -> Result<GuestPages, DsmError> {
        let pages = GuestPages {
            view_a,
            view_b,
            len,
        };
        pages.validate()?;
        Ok(pages)
    }

    fn validate(&self) -> Result<(), DsmError> {
        let aligned = |p: *mut u8| !p.is_null() && (p as u64).is_multiple_of(PAGE_SIZE);
        if !aligned(self.view_a) || !aligned(self.view_b) {
            return Err(DsmError::BadPages(
                "views must be non-null and 4 KiB aligned",
            ));
        }
        if self.len == 0
            || !self.len.is_multiple_of(PAGE_SIZE)
            || usize::try_from(self.len).is_err()
        {
            return Err(DsmError::BadPages(
                "length must be a non-zero multiple of 4 KiB",
            ));
        }
        Ok(())
    }

    fn a(&self, page: PageNo) -> u64 {
        self.view_a as u64 + page * PAGE_SIZE
    }

    fn b(&self, page: PageNo) -> *mut u8 {
        // In bounds: callers check `page < len / PAGE_SIZE`.
        self.view_b.wrapping_add((page * PAGE_SIZE) as usize)
    }
}

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

/// Errors of the DSM engine.
#[derive(Debug, thiserror::Error)]
pub enum DsmError {
    /// The guest RAM description is unusable.
    #[error("guest RAM views are unusable: {0}")]
    BadPages(&'static str),
    /// Setting up userfaultfd failed.
    #[error("cannot set up userfaultfd ({what}): {source}; the DSM needs root (or vm.unprivileged_userfaultfd=1) and a kernel with userfaultfd MINOR and WP support for shmem")]
    Uffd {
        /// The step that failed.
        what: &'static str,
        /// The OS error.
        source: io::Error,
    },
    /// A shared page outside guest RAM.
    #[error("shared page {page} is outside guest RAM ({pages} pages)")]
    SharedOutOfRange {
        /// The page.
        page: PageNo,
        /// Pages of guest RAM.
        pages: u64,
    },
    /// Seeding a shared page failed.
    #[error("cannot seed shared pages: {0}")]
    Seed(#[from] SeedError),
    /// An access outside guest RAM (or outside the pinned range).
    #[error("access of {len:#x} bytes at RAM offset {offset:#x} is outside the range [{start:#x}, {end:#x})")]
    OutOfRange {
        /// Requested offset.
        offset: u64,
        /// Requested length.
        len: u64,
        /// Start of the valid range.
        start: u64,
        /// End of the valid range.
        end: u64,
    },
    /// A write through a read-only pin.
    #[error("write through a pin taken for reading; call access() with Access::Write")]
    ReadOnlyPin,
    /// The engine was stopped.
    #[error("the DSM engine is stopped")]
    Stopped,
    /// The fault thread could not be started.
    #[error("cannot start the DSM fault thread: {0}")]
    Thread(io::Error),
}

/// Counters of one engine (see [`DsmEngine::stats`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DsmStats {
    /// Userfaultfd read faults.
    pub read_faults: u64,
    /// Userfaultfd write faults (write or write-protect).
    pub write_faults: u64,
    /// Faults on holes (MISSING).
    pub missing_faults: u64,
    /// Faults on unmapped page-cache pages (MINOR).
    pub minor_faults: u64,
    /// Faults on write-protected pages (WP).
    pub wp_faults: u64,
    /// Faults already satisfied when handled (raced with an install).
    pub spurious_faults: u64,
    /// Requests made by [`DsmEngine::access`] (VMM accesses that missed).
    pub vmm_faults: u64,
    /// Messages sent.
    pub msgs_sent: u64,
    /// Messages received.
    pub msgs_received: u64,
    /// Messages sent with a 4 KiB payload.
    pub pages_sent: u64,
    /// Messages received with a 4 KiB payload.
    pub pages_received: u64,
    /// Grants received (or made locally by the home) saying "zero page, no payload".
    pub zero_grants: u64,
    /// Times derived local state (KVM's shadow page tables) was dropped.
    pub derived_drops: u64,
    /// Times the users of derived state were asked to quiesce.
    pub quiesces: u64,
    /// Quiesces given up after [`QUIESCE_GIVE_UP`] (the message was delivered anyway).
    pub quiesce_timeouts: u64,
    /// Quiesces cut short because the users left waited in faults (delivered at once,
    /// the drop made once they stopped).
    pub quiesce_blocked: u64,
    /// Drops made after the pages had left (see `quiesce_blocked`).
    pub late_drops: u64,
    /// Drops abandoned after [`DROP_GIVE_UP`].
    pub drops_abandoned: u64,
    /// Time spent quiesced or waiting for it.
    pub quiesce_ns: u64,
    /// Pages mapped read-only.
    pub installs_read_only: u64,
    /// Pages mapped writable.
    pub installs_writable: u64,
    /// Mappings dropped (`MADV_DONTNEED`).
    pub invalidations: u64,
    /// Mappings write-protected.
    pub downgrades: u64,
    /// Messages held back because their page was pinned.
    pub deferred_msgs: u64,
    /// Protocol errors reported by the state machine (ignored messages).
    pub protocol_errors: u64,
    /// Malformed messages dropped by the engine (bad page, missing/short payload, ...).
    pub bad_msgs: u64,
    /// Failed userfaultfd / madvise calls.
    pub io_errors: u64,
    /// Faults that waited for a grant, and their total wait (fault event to wake-up).
    pub faults_resolved: u64,
    /// Total time faulting threads waited, in nanoseconds.
    pub fault_wait_ns: u64,
    /// Time spent handling faults and messages under the engine lock, in nanoseconds.
    pub busy_ns: u64,
    /// [`PageNet::send_batch`] calls with more than one message.
    pub batches_sent: u64,
    /// Frames given to [`DsmEngine::receive_frame`] that held more than one message.
    pub batches_received: u64,
    /// Read-ahead batches issued (a sequential read fault that requested more pages).
    pub readahead_batches: u64,
    /// Pages requested speculatively by read-ahead.
    pub prefetched: u64,
    /// Prefetched pages the stream went on to use: faulted on, or passed over by a later
    /// fault of the same stream (accesses to mapped pages are invisible to userfaultfd, so
    /// "passed over" is inferred from the stream's progress).
    pub prefetch_used: u64,
    /// Faults on a prefetched page whose grant had not arrived yet (read-ahead too shallow).
    pub prefetch_late: u64,
    /// Faults on a page already waiting for the answer to an earlier fault (a thread
    /// that was interrupted in its fault, or another thread on the same page).
    pub faults_on_pending: u64,
    /// Kicks held back until the kicked thread's fault was answered.
    pub kicks_deferred: u64,
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
    stop_fd: sys::EventFd,
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
        let stop_fd = sys::EventFd::new().map_err(os("eventfd"))?;
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
        inner.stop_fd.signal();
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

/// How many holds may pile up before the expired ones are swept.
const HOLDS_SWEEP: usize = 256;

/// Whether thread `tid` waits in a fault of this engine.
fn in_fault(faulters: &Faulters, tid: i32) -> bool {
    faulters.values().any(|w| w.iter().any(|&(t, _)| t == tid))
}

/// Records a kick to `tid` as owed if the thread waits in one of our faults (the engine
/// sends it when that fault is answered); false if it does not (kick it now).
fn owe_kick(faulters: &Faulters, owed: &mut Vec<i32>, stats: &mut DsmStats, tid: i32) -> bool {
    if !in_fault(faulters, tid) {
        return false;
    }
    if !owed.contains(&tid) {
        owed.push(tid);
    }
    stats.kicks_deferred += 1;
    true
}

/// Whether a hold on `page` still keeps it for the threads it was handed to.
fn is_held(st: &State, page: PageNo, now: Instant) -> bool {
    st.holds
        .get(&page)
        .is_some_and(|h| h.remaining(now, |t| in_fault(&st.faulters, t)).is_some())
}

/// Whether a message for a page pinned (or held) here must wait until the pin drops.
fn must_defer(msg: Msg, pin: Pin, is_home: bool) -> bool {
    if is_home {
        // The home handles its own copy inside the state machine: any request or reply
        // may start a transaction that invalidates or downgrades us.
        return true;
    }
    match msg {
        Msg::Invalidate { .. } | Msg::Revoke { .. } => true,
        Msg::Fetch { .. } => pin.writers > 0,
        _ => false,
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic under the lock leaves consistent enough state to keep serving.
        self.st.locked()
    }

    fn fault_loop(&self) {
        let mut buf = [sys::UffdMsg::default(); 16];
        loop {
            if self.stopped.load(Ordering::Acquire) {
                return;
            }
            if let Err(e) = sys::poll2(self.uffd.raw(), self.stop_fd.raw()) {
                tracing::error!("DSM fault thread: poll failed: {e}");
                return;
            }
            if self.stopped.load(Ordering::Acquire) {
                return;
            }
            let n = match self.uffd.read_events(&mut buf) {
                Ok(n) => n,
                Err(e) => {
                    tracing::error!("DSM fault thread: reading userfaultfd failed: {e}");
                    return;
                }
            };
            for m in &buf[..n] {
                if m.event == sys::EVENT_PAGEFAULT {
                    self.on_fault(m.address, m.flags, m.ptid as i32);
                } else {
                    tracing::debug!(event = m.event, "ignored userfaultfd event");
                }
            }
        }
    }

    /// The hold thread: ends holds (see [`hold`]) and delivers what they deferred.
    fn hold_loop(&self) {
        // Holds end after tens of microseconds: the default 50 us timer slack would
        // double them.
        // SAFETY: prctl with integer arguments; it only changes this thread's slack.
        unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1000 as libc::c_ulong, 0, 0, 0) };
        let mut st = self.lock();
        loop {
            if self.stopped.load(Ordering::Acquire) {
                return;
            }
            st = match self.release_holds(st) {
                (st, Some(wait)) => self.hold_cv.wait_timeout_locked(st, wait).0,
                (st, None) => self.hold_cv.wait_locked(st),
            };
        }
    }

    /// Ends holds that are over and have deferred messages, delivering those (unless a
    /// pin still defers them), and forgets expired holds. Returns how long to sleep
    /// before the next look (None: until a message is deferred behind a hold). Holds
    /// that defer nothing need no timer: they are only looked at when a message comes.
    fn release_holds<'a>(
        &'a self,
        mut st: MutexGuard<'a, State>,
    ) -> (MutexGuard<'a, State>, Option<std::time::Duration>) {
        let mut next = self.release_quiesce(&mut st);
        let now = Instant::now();
        let mut over = Vec::new();
        for (&page, h) in &st.holds {
            if st.deferred.get(&page).is_some_and(|q| !q.is_empty()) {
                // Somebody waits for this page: look at its threads again soon.
                match h.remaining(now, |t| in_fault(&st.faulters, t)) {
                    None => over.push(page),
                    Some(w) => next = Some(next.map_or(w, |n| n.min(w))),
                }
            } else if h.deadline() <= now {
                over.push(page);
            }
        }
        for page in over {
            st.holds.remove(&page);
            if st.pins.contains_key(&page) || st.quiesce_pages.contains(&page) {
                continue;
            }
            self.drain_deferred(&mut st, page);
        }
        self.flush(&mut st);
        if st.quiesce_since.is_some() {
            // A drain above may have started one (its wake-up was for this thread).
            next = Some(next.map_or(QUIESCE_POLL, |n| n.min(QUIESCE_POLL)));
        }
        (st, next)
    }

    fn on_fault(&self, address: u64, flags: u64, tid: i32) {
        let base = self.pages.view_a as u64;
        let page = address.wrapping_sub(base) / PAGE_SIZE;
        let mut st = self.lock();
        let t0 = Instant::now();
        if address < base || page >= self.npages {
            st.stats.io_errors += 1;
            tracing::error!(address, "userfaultfd fault outside guest RAM");
            return;
        }
        let write = flags & (sys::PF_WRITE | sys::PF_WP) != 0;
        let access = if write { Access::Write } else { Access::Read };
        let s = &mut st.stats;
        if write {
            s.write_faults += 1;
        } else {
            s.read_faults += 1;
        }
        if flags & sys::PF_WP != 0 {
            s.wp_faults += 1;
        } else if flags & sys::PF_MINOR != 0 {
            s.minor_faults += 1;
        } else {
            s.missing_faults += 1;
            st.flags[page as usize] |= HOLE_HINT;
        }
        let ra = std::mem::take(&mut st.ra_flags[page as usize]);
        let pending = st.node.state(page).pending();
        if pending {
            st.stats.faults_on_pending += 1;
        }
        let actions = st.node.fault(page, access);
        if actions == [Action::WakeFaulters { page }] {
            if ra & RA_MARKER == 0 {
                st.stats.spurious_faults += 1;
            }
        } else {
            let h = st.hot.entry(page).or_default();
            h[usize::from(write)] = h[usize::from(write)].saturating_add(1);
            st.waiting_since.entry(page).or_insert(t0);
            if tid > 0 {
                let waiting = st.faulters.entry(page).or_default();
                if !waiting.iter().any(|&(t, _)| t == tid) {
                    waiting.push((tid, None));
                }
            }
        }
        self.exec(&mut st, actions);
        if !write && st.ra.max > 0 {
            if ra & RA_PREFETCHED != 0 && pending {
                st.stats.prefetch_late += 1;
            }
            self.read_ahead(&mut st, page, ra);
        }
        self.flush(&mut st);
        if let Some(w) = st.faulters.get_mut(&page) {
            for (t, cpu) in w.iter_mut().filter(|(t, c)| *t == tid && c.is_none()) {
                *cpu = hold::thread_cpu_time(*t);
            }
        }
        st.stats.busy_ns += t0.elapsed().as_nanos() as u64;
    }

    /// Read-ahead after a read fault on `page` (whose read-ahead flags were `ra`).
    fn read_ahead(&self, st: &mut State, page: PageNo, ra: u8) {
        let r = &st.ra;
        if r.last == Some(page) {
            return;
        }
        let in_stream = ra != 0
            || r.last
                .is_some_and(|l| page > l && page <= r.frontier.max(l + 1));
        if !in_stream {
            st.ra.window = 0;
            st.ra.last = Some(page);
            st.ra.frontier = page + 1;
            st.ra.pos = page + 1;
            return;
        }
        let mut used = u64::from(ra & RA_PREFETCHED != 0);
        for q in st.ra.pos.min(page)..page {
            let f = &mut st.ra_flags[q as usize];
            used += u64::from(*f & RA_PREFETCHED != 0);
            *f &= !RA_PREFETCHED;
        }
        st.stats.prefetch_used += used;
        let r = &mut st.ra;
        r.window = if r.window == 0 {
            INITIAL_READAHEAD_PAGES.min(r.max)
        } else {
            (r.window * 2).min(r.max)
        };
        r.last = Some(page);
        r.pos = page + 1;
        let start = r.frontier.max(page + 1);
        let end = (page + 1 + r.window).min(self.npages);
        r.frontier = end.max(start);
        let half = r.window / 2;
        let mut issued = false;
        for q in start..end {
            if st.node.state(q) != PageState::Invalid {
                continue;
            }
            st.ra_flags[q as usize] = RA_PREFETCHED;
            issued = true;
            st.stats.prefetched += 1;
            let actions = st.node.fault(q, Access::Read);
            self.exec(st, actions);
        }
        if issued {
            st.stats.readahead_batches += 1;
        }
        // Move the single marker half a window ahead: reaching it issues the next batch
        // while the other half is still ahead of the reader.
        if let Some(old) = st.ra.marker.take() {
            st.ra_flags[old as usize] &= !RA_MARKER;
            if st.node.state(old).readable() && st.flags[old as usize] & MAP_MASK == MAP_NONE {
                self.map(st, old, MAP_RO);
            }
        }
        let first = (page + half.max(1)).min(end);
        let marker = (first..end).find(|&q| {
            let s = st.node.state(q);
            st.flags[q as usize] & MAP_MASK == MAP_NONE
                && (s == PageState::ReadPending || s == PageState::ReadOnly)
        });
        if let Some(q) = marker {
            st.ra_flags[q as usize] |= RA_MARKER;
            st.ra.marker = Some(q);
        }
    }

    /// Delivers, in arrival order, the messages deferred for `page`; stops (keeping the
    /// rest in order) at one that must wait for a quiesce.
    fn drain_deferred(&self, st: &mut State, page: PageNo) {
        let Some(mut queue) = st.deferred.remove(&page) else {
            return;
        };
        while let Some((from, msg, data)) = queue.pop_front() {
            if self.needs_quiesce(st, from, msg) {
                queue.push_front((from, msg, data));
                st.deferred.insert(page, queue);
                self.start_quiesce(st, page);
                return;
            }
            self.deliver(st, from, msg, data.as_deref());
        }
    }

    /// Whether `msg` may take away a page that derived state hangs on while its users
    /// have not quiesced (see [`LocalDerived`]).
    fn needs_quiesce(&self, st: &State, from: NodeId, msg: Msg) -> bool {
        let Some(d) = &self.derived else {
            return false;
        };
        if st.quiesce_forced {
            return false;
        }
        let page = msg.page();
        if !st.node.state(page).readable() {
            return false;
        }
        let takes_away = st.node.may_take_copy_away(from, msg);
        if !takes_away || d.quiesced() {
            return false;
        }
        // SAFETY: `page < npages` (checked on entry); 4 KiB of view B, read only.
        let contents =
            unsafe { std::slice::from_raw_parts(self.pages.b(page), PAGE_SIZE as usize) };
        d.derives_from(page, contents)
    }

    /// [`LocalDerived::quiesce`], holding back kicks to threads that wait in our faults.
    fn ask_quiesce(&self, st: &mut State, d: &dyn LocalDerived) {
        let can_defer = self.kick.get().is_some();
        let State {
            faulters,
            owed_kicks,
            stats,
            ..
        } = st;
        d.quiesce(&mut |tid| can_defer && owe_kick(faulters, owed_kicks, stats, tid));
    }

    /// Adds `page` to the pages waiting for a quiesce, asking for one if none is under way.
    fn start_quiesce(&self, st: &mut State, page: PageNo) {
        st.quiesce_pages.insert(page);
        if st.quiesce_since.is_none() {
            st.quiesce_since = Some(Instant::now());
            st.stats.quiesces += 1;
            if let Some(d) = &self.derived {
                self.ask_quiesce(st, d.as_ref());
            }
        }
        self.hold_cv.notify_one();
    }

    /// Delivers what waits for a quiesce once the users have quiesced (or at once when
    /// those left wait in faults, or after [`QUIESCE_GIVE_UP`]), makes a drop that is
    /// owed once they have, then lets them go on. Returns when to look again while a
    /// quiesce is under way.
    fn release_quiesce(&self, st: &mut State) -> Option<std::time::Duration> {
        let (Some(since), Some(d)) = (st.quiesce_since, self.derived.clone()) else {
            return None;
        };
        let ready = d.quiesced();
        if !st.quiesce_pages.is_empty() {
            let blocked = !ready && d.blocked_in_faults(&|t| in_fault(&st.faulters, t));
            let timed_out = since.elapsed() >= QUIESCE_GIVE_UP;
            if !ready && !blocked && !timed_out {
                self.ask_quiesce(st, d.as_ref());
                return Some(QUIESCE_POLL);
            }
            if !ready {
                if blocked {
                    st.stats.quiesce_blocked += 1;
                } else {
                    st.stats.quiesce_timeouts += 1;
                    tracing::warn!(
                        pages = st.quiesce_pages.len(),
                        "DSM: this node's vCPUs did not quiesce within {QUIESCE_GIVE_UP:?}; \
                         taking the pages away first, dropping the state derived from them \
                         once they do"
                    );
                }
                st.quiesce_forced = true;
            }
            let now = Instant::now();
            let pages = std::mem::take(&mut st.quiesce_pages);
            for page in pages {
                let held = is_held(st, page, now);
                if st.pins.contains_key(&page) || held {
                    // Waits for its pin or hold as well; delivered on a later look.
                    st.quiesce_pages.insert(page);
                    continue;
                }
                self.drain_deferred(st, page);
            }
            self.flush(st);
            st.quiesce_forced = false;
            if !st.quiesce_pages.is_empty() {
                return Some(QUIESCE_POLL);
            }
        }
        if st.drop_owed {
            if d.quiesced() && d.drop_derived() {
                st.drop_owed = false;
                st.stats.late_drops += 1;
                st.stats.derived_drops += 1;
            } else if since.elapsed() < DROP_GIVE_UP {
                self.ask_quiesce(st, d.as_ref());
                return Some(QUIESCE_POLL);
            } else {
                st.drop_owed = false;
                st.stats.drops_abandoned += 1;
                tracing::warn!(
                    "DSM: this node's vCPUs did not quiesce within {DROP_GIVE_UP:?}; KVM's \
                     state derived from pages taken away was not dropped"
                );
            }
        }
        st.quiesce_since = None;
        st.stats.quiesce_ns += since.elapsed().as_nanos() as u64;
        d.resume();
        None
    }

    /// Delivers a (validated, not deferred) message to the state machine.
    fn deliver(&self, st: &mut State, from: NodeId, msg: Msg, data: Option<&[u8]>) {
        let page = msg.page();
        if let Some(d) = data {
            if st.flags[page as usize] & MAP_MASK != MAP_NONE {
                // The protocol never sends data for a page mapped here; do not let a
                // broken peer change bytes a vCPU can see.
                st.stats.bad_msgs += 1;
                tracing::warn!(from, ?msg, "payload for a page mapped here ignored");
            } else {
                // SAFETY: `page < npages`, so the 4 KiB at view B are inside the mapping
                // (GuestPages contract); `d` is exactly 4 KiB and cannot overlap guest RAM
                // we own exclusively here (the page is unmapped for vCPUs).
                unsafe {
                    std::ptr::copy_nonoverlapping(d.as_ptr(), self.pages.b(page), d.len());
                }
                st.flags[page as usize] &= !HOLE_HINT;
                st.stats.pages_received += 1;
            }
        }
        if matches!(
            msg,
            Msg::ReadGrant { zero: true, .. } | Msg::WriteGrant { zero: true, .. }
        ) {
            st.stats.zero_grants += 1;
        }
        let errors = st.node.protocol_errors();
        let actions = st.node.receive(from, msg);
        if st.node.protocol_errors() != errors {
            for e in st.node.take_protocol_errors() {
                tracing::warn!("DSM protocol error: {e}");
            }
        }
        self.exec(st, actions);
    }

    /// Sends what the operation that is ending queued, per destination in order (per-pair
    /// FIFO is all the protocol needs). Runs under the lock, so operations stay ordered.
    fn flush(&self, st: &mut State) {
        if std::mem::take(&mut st.drop_derived) {
            if let Some(d) = &self.derived {
                if d.drop_derived() {
                    st.stats.derived_drops += 1;
                } else {
                    // Owed: made as soon as the users are quiesced (they stay asked to).
                    st.drop_owed = true;
                    if st.quiesce_since.is_none() {
                        st.quiesce_since = Some(Instant::now());
                        st.stats.quiesces += 1;
                        self.ask_quiesce(st, d.as_ref());
                        self.hold_cv.notify_one();
                    }
                }
            }
        }
        if st.outbox.is_empty() {
            return;
        }
        let outbox = std::mem::take(&mut st.outbox);
        let data = std::mem::take(&mut st.outdata);
        let mut batch: Vec<(Msg, Option<&[u8]>)> = Vec::with_capacity(outbox.len());
        let mut done = vec![false; outbox.len()];
        for i in 0..outbox.len() {
            if done[i] {
                continue;
            }
            let to = outbox[i].0;
            batch.clear();
            for (j, &(dest, msg, at)) in outbox.iter().enumerate().skip(i) {
                if dest == to {
                    done[j] = true;
                    let payload = at.and_then(|o| data.get(o..o + PAGE_SIZE as usize));
                    batch.push((msg, payload));
                }
            }
            if batch.len() > 1 {
                st.stats.batches_sent += 1;
            }
            self.net.send_batch(to, &batch);
        }
        drop(batch);
        // Keep the allocations for the next operation.
        st.outbox = outbox;
        st.outbox.clear();
        st.outdata = data;
        st.outdata.clear();
    }

    /// Performs protocol actions in order.
    fn exec(&self, st: &mut State, actions: Vec<Action>) {
        let mut woken: Option<PageNo> = None;
        for a in actions {
            match a {
                Action::Send { to, msg } => {
                    st.stats.msgs_sent += 1;
                    let mut at = None;
                    if msg.has_data() {
                        let page = msg.page();
                        let off = st.outdata.len();
                        st.outdata.resize(off + PAGE_SIZE as usize, 0);
                        // SAFETY: pages in actions were range-checked on entry; the bytes
                        // are stable (no writable mapping here or pinned writer at this
                        // point, per the protocol's action order), so we copy them now.
                        unsafe {
                            std::ptr::copy_nonoverlapping(
                                self.pages.b(page),
                                st.outdata.as_mut_ptr().add(off),
                                PAGE_SIZE as usize,
                            );
                        }
                        st.stats.pages_sent += 1;
                        at = Some(off);
                    }
                    st.outbox.push((to, msg, at));
                }
                Action::InstallReadOnly { page } => {
                    st.stats.installs_read_only += 1;
                    if !lazy(st, page) && self.map(st, page, MAP_RO) {
                        woken = Some(page);
                    }
                }
                Action::InstallWritable { page } => {
                    st.stats.installs_writable += 1;
                    if self.map(st, page, MAP_RW) {
                        woken = Some(page);
                    }
                }
                Action::Downgrade { page } => {
                    st.stats.downgrades += 1;
                    if st.flags[page as usize] & MAP_MASK == MAP_RW {
                        self.map(st, page, MAP_RO);
                    }
                }
                Action::Invalidate { page } => {
                    st.stats.invalidations += 1;
                    if let Err(e) = sys::zap(self.pages.a(page)) {
                        st.stats.io_errors += 1;
                        tracing::error!(page, "MADV_DONTNEED failed: {e}");
                    }
                    st.flags[page as usize] &= !MAP_MASK;
                    st.ra_flags[page as usize] = 0;
                    if let Some(d) = &self.derived {
                        // SAFETY: `page < npages` (checked on entry): 4 KiB of view B that
                        // nothing writes now (unmapped in view A, not pinned).
                        let old = unsafe {
                            std::slice::from_raw_parts(self.pages.b(page), PAGE_SIZE as usize)
                        };
                        if d.derives_from(page, old) {
                            st.drop_derived = true;
                        }
                    }
                }
                Action::WakeFaulters { page } => {
                    // Lazily mapped pages (seeded ones) are readable without a mapping.
                    let want = match st.node.state(page) {
                        PageState::Writable => MAP_RW,
                        s if s.readable() => MAP_RO,
                        _ => MAP_NONE,
                    };
                    let have = st.flags[page as usize] & MAP_MASK;
                    if want > have && !lazy(st, page) && self.map(st, page, want) {
                        woken = Some(page);
                    }
                    if woken != Some(page) {
                        if let Err(e) = self.uffd.wake(self.pages.a(page)) {
                            st.stats.io_errors += 1;
                            tracing::error!(page, "UFFDIO_WAKE failed: {e}");
                        }
                    }
                    if let Some(t) = st.waiting_since.remove(&page) {
                        st.stats.faults_resolved += 1;
                        st.stats.fault_wait_ns += t.elapsed().as_nanos() as u64;
                        let tids = st.faulters.remove(&page).unwrap_or_default();
                        if !st.owed_kicks.is_empty() {
                            let owed = &mut st.owed_kicks;
                            for &(t, _) in &tids {
                                if let Some(i) = owed.iter().position(|&o| o == t) {
                                    owed.swap_remove(i);
                                    if let Some(kick) = self.kick.get() {
                                        kick(t);
                                    }
                                }
                            }
                        }
                        let now = Instant::now();
                        let hold = match st.fixed_hold {
                            Some(d) => Hold::fixed(now, d),
                            None => Hold::new(now, &tids),
                        };
                        if st.holds.len() >= HOLDS_SWEEP {
                            // Holds that deferred nothing are not timed: forget the
                            // expired ones now and then.
                            let (holds, deferred) = (&mut st.holds, &st.deferred);
                            holds.retain(|p, h| h.deadline() > now || deferred.contains_key(p));
                        }
                        st.holds.insert(page, hold);
                    }
                    self.cv.notify_all();
                }
            }
        }
    }

    /// Sets view A's mapping of `page` to `want` (`MAP_RO` or `MAP_RW`). Returns whether
    /// the ioctl used woke the page's waiters.
    fn map(&self, st: &mut State, page: PageNo, want: u8) -> bool {
        let addr = self.pages.a(page);
        let wp = want == MAP_RO;
        let flags = st.flags[page as usize];
        let r = match flags & MAP_MASK {
            MAP_NONE => self.fill(addr, wp, flags & HOLE_HINT != 0),
            have if have == want => Ok(false),
            _ => self.uffd.write_protect(addr, wp).map(|()| !wp),
        };
        match r {
            Ok(woke) => {
                st.flags[page as usize] = want;
                woke
            }
            Err(e) => {
                st.stats.io_errors += 1;
                tracing::error!(page, "mapping guest page failed: {e}");
                false
            }
        }
    }

    /// Maps an unmapped page: CONTINUE if it is in the page cache, else COPY of zeroes.
    fn fill(&self, addr: u64, wp: bool, hole: bool) -> io::Result<bool> {
        let cont = || retry(|| self.uffd.continue_page(addr, wp));
        let copy = || retry(|| self.uffd.copy_page(addr, self.zero.ptr(), wp));
        let first = if hole { copy() } else { cont() };
        let r = match first {
            Ok(()) => Ok(()),
            // COPY: the page cache has the page after all. CONTINUE: it is a hole.
            Err(e) if hole && e.raw_os_error() == Some(libc::EEXIST) => cont(),
            Err(e) if !hole && e.raw_os_error() == Some(libc::EFAULT) => copy(),
            Err(e) => Err(e),
        };
        match r {
            Ok(()) => Ok(true),
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {
                // Already mapped (a race we did not track): fix protection, then wake.
                self.uffd.write_protect(addr, wp)?;
                self.uffd.wake(addr)?;
                Ok(true)
            }
            Err(e) => Err(e),
        }
    }
}

/// Whether `page` is a read-ahead marker nobody waits for: it stays unmapped (readable in
/// the protocol) so that its first touch faults and continues the stream.
fn lazy(st: &State, page: PageNo) -> bool {
    st.ra_flags[page as usize] & RA_MARKER != 0 && !st.waiting_since.contains_key(&page)
}

fn retry(mut f: impl FnMut() -> io::Result<()>) -> io::Result<()> {
    let mut tries = 0;
    loop {
        match f() {
            Err(e) if e.raw_os_error() == Some(libc::EAGAIN) && tries < 100 => tries += 1,
            r => return r,
        }
    }
}

/// Pages made accessible by [`DsmEngine::access`]; they stay pinned (not invalidated or
/// downgraded here) until the guard drops. Reads and writes go through view B.
pub struct PinGuard<'a> {
    engine: &'a DsmEngine,
    offset: u64,
    len: u64,
    access: Access,
    first: PageNo,
    pinned_end: PageNo,
}

impl PinGuard<'_> {
    /// RAM offset of the start of the pinned range.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// Length of the pinned range in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the range is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The access the pin grants.
    pub fn access(&self) -> Access {
        self.access
    }

    /// Pointer into view B at [`PinGuard::offset`]; valid for [`PinGuard::len`] bytes while
    /// the guard lives (writes only with [`Access::Write`]).
    pub fn as_ptr(&self) -> *mut u8 {
        self.engine
            .inner
            .pages
            .view_b
            .wrapping_add(self.offset as usize)
    }

    fn check(&self, offset: u64, len: usize) -> Result<usize, DsmError> {
        let end = self.offset + self.len;
        match offset.checked_add(len as u64) {
            Some(e) if offset >= self.offset && e <= end => Ok(offset as usize),
            _ => Err(DsmError::OutOfRange {
                offset,
                len: len as u64,
                start: self.offset,
                end,
            }),
        }
    }

    /// Copies guest RAM at RAM offset `offset` (inside the pinned range) into `buf`.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), DsmError> {
        let at = self.check(offset, buf.len())?;
        // SAFETY: the range is inside the pinned range, hence inside view B; pinned pages
        // are readable here and their bytes are not overwritten by the engine.
        unsafe {
            std::ptr::copy_nonoverlapping(
                self.engine.inner.pages.view_b.add(at),
                buf.as_mut_ptr(),
                buf.len(),
            );
        }
        Ok(())
    }

    /// Copies `buf` into guest RAM at RAM offset `offset` (inside the pinned range); the
    /// guard must have been taken with [`Access::Write`].
    pub fn write(&self, offset: u64, buf: &[u8]) -> Result<(), DsmError> {
        if self.access != Access::Write {
            return Err(DsmError::ReadOnlyPin);
        }
        let at = self.check(offset, buf.len())?;
        // SAFETY: as in `read`; we hold the only writable copy in the cluster.
        unsafe {
            std::ptr::copy_nonoverlapping(
                buf.as_ptr(),
                self.engine.inner.pages.view_b.add(at),
                buf.len(),
            );
        }
        Ok(())
    }
}

impl Drop for PinGuard<'_> {
    fn drop(&mut self) {
        let inner = &*self.engine.inner;
        let mut st = inner.lock();
        for page in self.first..self.pinned_end {
            let Some(pin) = st.pins.get_mut(&page) else {
                continue;
            };
            match self.access {
                Access::Read => pin.readers = pin.readers.saturating_sub(1),
                Access::Write => pin.writers = pin.writers.saturating_sub(1),
            }
            if pin.readers + pin.writers > 0 {
                continue;
            }
            st.pins.remove(&page);
            inner.drain_deferred(&mut st, page);
        }
        inner.flush(&mut st);
        inner.cv.notify_all();
    }
}
