//! Forcing a vCPU thread out of `KVM_RUN`, without races.
//!
//! The kicker first makes its request visible (e.g. sets IRR in the target's LAPIC under
//! its lock), then sets `kvm_run.immediate_exit` and sends a signal to the vCPU thread.
//! The vCPU thread clears `immediate_exit` *before* it looks for work and enters
//! `KVM_RUN` after. So a kick that lands
//! - while the guest runs: the signal makes `KVM_RUN` return `EINTR`;
//! - between the check and `KVM_RUN`: `immediate_exit` makes `KVM_RUN` return at once;
//! - before the check: the check sees the request.

use std::sync::atomic::{AtomicBool, AtomicI32, AtomicPtr, AtomicU8, Ordering};
use std::sync::{Arc, Once, OnceLock};

/// The signal used for kicks.
fn kick_signal() -> libc::c_int {
    libc::SIGRTMIN() + 1
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// Installs the (empty) kick signal handler once per process, with vmm-sys-util, which
/// does not set `SA_RESTART`: the blocking `KVM_RUN` returns `EINTR`.
pub fn install_handler() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        if let Err(e) = vmm_sys_util::signal::register_signal_handler(kick_signal(), on_kick) {
            tracing::error!("cannot install the vCPU kick signal handler: {e}");
        }
    });
}

/// Asked before a kick's signal is sent to thread `tid` (a kernel thread id): true if
/// the signal is held back, to be sent later by whoever held it back (the DSM, while the
/// thread waits in one of its faults: see `DsmEngine::defer_kick`).
pub type KickDeferral = Arc<dyn Fn(i32) -> bool + Send + Sync>;

/// A handle that can kick one vCPU thread.
pub struct Kicker {
    /// The vCPU's `immediate_exit` byte (see [`dvmm_hypervisor::Vcpu::immediate_exit`]).
    immediate_exit: AtomicPtr<u8>,
    thread: std::sync::Mutex<Option<libc::pthread_t>>,
    tid: AtomicI32,
    armed: AtomicBool,
    deferral: OnceLock<KickDeferral>,
}

impl Default for Kicker {
    fn default() -> Self {
        Self::new()
    }
}

impl Kicker {
    /// A kicker not yet bound to a thread (kicks before binding are remembered by the
    /// caller's own state, which the thread checks first thing).
    pub fn new() -> Kicker {
        Kicker {
            immediate_exit: AtomicPtr::new(std::ptr::null_mut()),
            thread: std::sync::Mutex::new(None),
            tid: AtomicI32::new(0),
            armed: AtomicBool::new(false),
            deferral: OnceLock::new(),
        }
    }

    /// Binds the kicker to the calling thread and its vCPU's `immediate_exit` byte.
    ///
    /// # Safety
    /// `immediate_exit` must point to the vCPU's flag and stay valid until
    /// [`Kicker::unbind`] is called.
    pub unsafe fn bind(&self, immediate_exit: *mut u8) {
        self.immediate_exit.store(immediate_exit, Ordering::SeqCst);
        // SAFETY: pthread_self has no preconditions.
        let me = unsafe { libc::pthread_self() };
        if let Ok(mut t) = self.thread.lock() {
            *t = Some(me);
        }
        // SAFETY: gettid has no preconditions.
        self.tid.store(unsafe { libc::gettid() }, Ordering::SeqCst);
        self.armed.store(true, Ordering::SeqCst);
    }

    /// Detaches the thread (before its vCPU goes away).
    pub fn unbind(&self) {
        self.armed.store(false, Ordering::SeqCst);
        self.tid.store(0, Ordering::SeqCst);
        if let Ok(mut t) = self.thread.lock() {
            *t = None;
        }
        self.immediate_exit
            .store(std::ptr::null_mut(), Ordering::SeqCst);
    }

    fn immediate_exit(&self) -> Option<&AtomicU8> {
        let flag = self.immediate_exit.load(Ordering::SeqCst);
        if flag.is_null() {
            return None;
        }
        // SAFETY: `bind`'s contract keeps `flag` valid while it is stored; it is a u8 the
        // kernel reads on entry, so accessing it atomically is sound.
        Some(unsafe { AtomicU8::from_ptr(flag) })
    }

    /// Called by the vCPU thread before it checks for pending work.
    pub fn clear(&self) {
        if let Some(ie) = self.immediate_exit() {
            ie.store(0, Ordering::SeqCst);
        }
    }

    /// Has every later kick ask `deferral` before it signals (once; later calls are
    /// ignored).
    pub fn set_deferral(&self, deferral: KickDeferral) {
        let _ = self.deferral.set(deferral);
    }

    /// The bound thread's kernel id (0: not bound).
    pub fn thread_id(&self) -> i32 {
        self.tid.load(Ordering::SeqCst)
    }

    /// Forces the vCPU out of (or keeps it from entering) `KVM_RUN`; the signal may be
    /// held back by the deferral (see [`Kicker::set_deferral`]).
    pub fn kick(&self) {
        match self.deferral.get() {
            Some(d) => self.kick_unless(&mut |tid| d(tid)),
            None => self.kick_unless(&mut |_| false),
        }
    }

    /// [`Kicker::kick`], asking `defer(tid)` whether to hold back the signal (which the
    /// one who held it back sends later with [`Kicker::signal`]).
    pub fn kick_unless(&self, defer: &mut dyn FnMut(i32) -> bool) {
        if !self.armed.load(Ordering::SeqCst) {
            return;
        }
        if let Some(ie) = self.immediate_exit() {
            ie.store(1, Ordering::SeqCst);
        }
        let tid = self.thread_id();
        if tid > 0 && defer(tid) {
            return;
        }
        self.signal();
    }

    /// Sends the kick signal only (`immediate_exit` was set by the kick it completes).
    pub fn signal(&self) {
        if !self.armed.load(Ordering::SeqCst) {
            return;
        }
        if let Ok(t) = self.thread.lock() {
            if let Some(thread) = *t {
                // SAFETY: the thread id is live while bound (the lock keeps unbind out);
                // the signal has a no-op handler.
                unsafe {
                    libc::pthread_kill(thread, kick_signal());
                }
            }
        }
    }
}
