//! Helpers for tests and benchmarks: guest RAM as a memfd mapped twice, an in-process
//! [`PageNet`] that connects several engines in one process, and [`UffdFloor`], the bare
//! userfaultfd round trip that bounds what the engine can reach.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::mpsc::{channel, Sender};
use std::sync::{Arc, Mutex, OnceLock, Weak};

use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;

use crate::{sys, DsmEngine, DsmError, GuestPages, Msg, Node, NodeId, PageNet, PageNo};

/// A memfd of `len` bytes mapped twice (view A and view B), unmapped on drop.
pub struct TestRam {
    view_a: *mut u8,
    view_b: *mut u8,
    len: usize,
    fd: libc::c_int,
}

// SAFETY: the mappings are plain shared memory owned by this value.
unsafe impl Send for TestRam {}
// SAFETY: as above.
unsafe impl Sync for TestRam {}

impl TestRam {
    /// Creates the memfd (a hole everywhere) and maps it twice.
    pub fn new(len: usize) -> io::Result<TestRam> {
        // SAFETY: memfd_create with a static NUL-terminated name; checked.
        let fd = unsafe { libc::memfd_create(c"dsm-test-ram".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut ram = TestRam {
            view_a: std::ptr::null_mut(),
            view_b: std::ptr::null_mut(),
            len,
            fd,
        };
        // SAFETY: resizing our own fresh memfd.
        if unsafe { libc::ftruncate(fd, len as libc::off_t) } != 0 {
            return Err(io::Error::last_os_error());
        }
        ram.view_a = map(fd, len)?;
        ram.view_b = map(fd, len)?;
        Ok(ram)
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the length is zero.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// View A (what the engine registers; "vCPU" threads touch it).
    pub fn view_a(&self) -> *mut u8 {
        self.view_a
    }

    /// View B (the VMM's window).
    pub fn view_b(&self) -> *mut u8 {
        self.view_b
    }

    /// The engine's description of this RAM. The `TestRam` must outlive the engine.
    pub fn pages(&self) -> GuestPages {
        // SAFETY: both views map the whole memfd, shared, read-write; the caller keeps
        // `self` alive longer than the engine (documented above).
        unsafe { GuestPages::new(self.view_a, self.view_b, self.len as u64) }.unwrap_or(
            GuestPages {
                view_a: self.view_a,
                view_b: self.view_b,
                len: 0,
            },
        )
    }
}

fn map(fd: libc::c_int, len: usize) -> io::Result<*mut u8> {
    // SAFETY: a fresh shared mapping of our memfd at a kernel-chosen address; checked.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            fd,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    Ok(p.cast())
}

impl Drop for TestRam {
    fn drop(&mut self) {
        // SAFETY: unmapping our own mappings and closing our own descriptor; nothing
        // uses them once the engines built on them are gone.
        unsafe {
            for v in [self.view_a, self.view_b] {
                if !v.is_null() {
                    libc::munmap(v.cast(), self.len);
                }
            }
            libc::close(self.fd);
        }
    }
}

type Packet = (Msg, Option<Vec<u8>>);
type Slots = Arc<Vec<OnceLock<Weak<DsmEngine>>>>;

/// One node's end of an in-process network: a dedicated delivery thread per ordered
/// pair of nodes (FIFO per pair), which calls the destination engine's `receive`.
pub struct LoopNet {
    from: NodeId,
    links: Vec<Option<Mutex<Sender<Packet>>>>,
}

impl PageNet for LoopNet {
    fn send(&self, to: NodeId, msg: &Msg, data: Option<&[u8]>) {
        let Some(Some(link)) = self.links.get(usize::from(to)) else {
            tracing::error!(from = self.from, to, "LoopNet: no such node");
            return;
        };
        let packet = (*msg, data.map(<[u8]>::to_vec));
        let sent = link.lock().map(|s| s.send(packet).is_ok()).unwrap_or(false);
        if !sent {
            tracing::debug!(from = self.from, to, "LoopNet: destination gone");
        }
    }
}

/// `n` engines in one process, each with its own [`TestRam`], connected by [`LoopNet`].
/// Page `p` has home `(p / pages_per_home) % n`.
pub struct Cluster {
    /// The engines, index = node id.
    pub engines: Vec<Arc<DsmEngine>>,
    /// Their RAM (dropped after the engines).
    pub rams: Vec<TestRam>,
}

impl Cluster {
    /// Starts `n` engines over `len` bytes of RAM each. `init` may write view B of every
    /// node before start (a deterministic "boot loader"); `shared` are then seeded.
    pub fn new(
        n: u16,
        len: usize,
        pages_per_home: u64,
        shared: &[PageNo],
        init: impl Fn(&TestRam),
    ) -> Result<Cluster, DsmError> {
        Cluster::with_derived(n, len, pages_per_home, shared, init, |_| None)
    }

    /// [`Cluster::new`], with node `i`'s engine told of invalidations through
    /// `derived(i)` (see [`crate::LocalDerived`]).
    pub fn with_derived(
        n: u16,
        len: usize,
        pages_per_home: u64,
        shared: &[PageNo],
        init: impl Fn(&TestRam),
        derived: impl Fn(u16) -> Option<Arc<dyn crate::LocalDerived>>,
    ) -> Result<Cluster, DsmError> {
        let slots: Slots = Arc::new((0..n).map(|_| OnceLock::new()).collect());
        let mut senders: Vec<Vec<Option<Mutex<Sender<Packet>>>>> =
            (0..n).map(|_| (0..n).map(|_| None).collect()).collect();
        for from in 0..n {
            for to in 0..n {
                if from == to {
                    continue;
                }
                let (tx, rx) = channel::<Packet>();
                senders[usize::from(from)][usize::from(to)] = Some(Mutex::new(tx));
                let slots = Arc::clone(&slots);
                std::thread::Builder::new()
                    .name(format!("loopnet-{from}-{to}"))
                    .spawn(move || {
                        while let Ok((msg, data)) = rx.recv() {
                            let Some(engine) = slots[usize::from(to)].get().and_then(Weak::upgrade)
                            else {
                                continue;
                            };
                            engine.receive(from, msg, data.as_deref());
                        }
                    })
                    .map_err(DsmError::Thread)?;
            }
        }
        let mut rams = Vec::new();
        let mut engines = Vec::new();
        for (id, links) in (0..n).zip(senders) {
            let ram = TestRam::new(len).map_err(|source| DsmError::Uffd {
                what: "test RAM",
                source,
            })?;
            init(&ram);
            let node = Node::new(id, n, move |p| {
                ((p / pages_per_home) % u64::from(n)) as NodeId
            });
            let net = Arc::new(LoopNet { from: id, links });
            let engine = DsmEngine::start_with(node, ram.pages(), net, shared, derived(id))?;
            let _ = slots[usize::from(id)].set(Arc::downgrade(&engine));
            engines.push(engine);
            rams.push(ram);
        }
        Ok(Cluster { engines, rams })
    }

    /// Pointer into node `n`'s view A at RAM offset `off` (what a vCPU would touch).
    pub fn a(&self, n: usize, off: usize) -> *mut u8 {
        self.rams[n].view_a().wrapping_add(off)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for e in &self.engines {
            e.stop();
        }
        self.engines.clear();
    }
}

/// The floor of a local fault: a [`TestRam`] whose view A is registered with a bare
/// userfaultfd, and a handler thread that resolves every fault with one `UFFDIO_COPY` of
/// a 4 KiB page (no protocol, no locks). [`UffdFloor::touch`] faults one page.
pub struct UffdFloor {
    ram: TestRam,
    uffd: Arc<sys::Uffd>,
    stop: Arc<vmm_sys_util::eventfd::EventFd>,
    stopped: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl UffdFloor {
    /// `pages` pages of fresh RAM (holes), registered, with the handler thread running.
    pub fn new(pages: usize) -> io::Result<UffdFloor> {
        let ram = TestRam::new(pages * crate::PAGE_SIZE as usize)?;
        let uffd = Arc::new(sys::Uffd::open()?);
        uffd.register(ram.view_a() as u64, ram.len() as u64)?;
        let stop = Arc::new(sys::stop_eventfd()?);
        let stopped = Arc::new(AtomicBool::new(false));
        let src = vec![0x5au8; crate::PAGE_SIZE as usize];
        let (u, e, s) = (Arc::clone(&uffd), Arc::clone(&stop), Arc::clone(&stopped));
        let thread = std::thread::Builder::new()
            .name("uffd-floor".into())
            .spawn(move || {
                let mut buf = [sys::UffdMsg::default(); 16];
                while !s.load(Ordering::Acquire) {
                    if sys::poll2(u.raw(), e.as_raw_fd()).is_err() {
                        return;
                    }
                    let Ok(n) = u.read_events(&mut buf) else {
                        return;
                    };
                    for m in &buf[..n] {
                        if m.event == sys::EVENT_PAGEFAULT {
                            let addr = m.address & !(crate::PAGE_SIZE - 1);
                            if let Err(err) = u.copy_page(addr, src.as_ptr(), false) {
                                tracing::error!("floor: UFFDIO_COPY failed: {err}");
                            }
                        }
                    }
                }
            })?;
        Ok(UffdFloor {
            ram,
            uffd,
            stop,
            stopped,
            thread: Some(thread),
        })
    }

    /// Number of pages.
    pub fn pages(&self) -> usize {
        self.ram.len() / crate::PAGE_SIZE as usize
    }

    /// Reads the first byte of page `page` of view A (faulting it in the first time).
    /// Returns `None` if `page` is out of range.
    pub fn touch(&self, page: usize) -> Option<u8> {
        if page >= self.pages() {
            return None;
        }
        let p = self
            .ram
            .view_a()
            .wrapping_add(page * crate::PAGE_SIZE as usize);
        // SAFETY: `p` is inside view A, which lives as long as `self`; the handler thread
        // resolves the fault.
        Some(unsafe { std::ptr::read_volatile(p) })
    }
}

impl Drop for UffdFloor {
    fn drop(&mut self) {
        self.stopped.store(true, Ordering::Release);
        let _ = self.stop.write(1);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = self
            .uffd
            .unregister(self.ram.view_a() as u64, self.ram.len() as u64);
    }
}
