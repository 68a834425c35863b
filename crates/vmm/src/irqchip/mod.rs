//! The userspace irqchip: per-vCPU LAPIC state, the IOAPIC and its MMIO window, routing
//! of interrupt messages (IPIs, IOAPIC and MSI messages) to the LAPICs they address, and
//! ([`timers`]) the timer thread with the PIT's ports. The device models themselves are
//! `dvmm_irq`'s (pure, time passed in), as is the set of LAPIC MSRs.
//!
//! Lock order: a device's bus mutex, then the IOAPIC, then one LAPIC at a time. Nobody
//! holds a LAPIC lock while taking another lock.

use dvmm_sync::MutexExt;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use dvmm_devices::IrqLine;
use dvmm_irq::lapic::{ApicView, Lapic};
use dvmm_irq::msg::{
    DeliveryMode, DestinationMode, InterruptMessage, Shorthand, X2APIC_BROADCAST, XAPIC_BROADCAST,
};
use dvmm_irq::{ioapic::IoApic, route};

pub mod timers;

#[cfg(test)]
mod tests;

use crate::kick::Kicker;
use timers::{min_opt, TimerService, TimerTargets};

/// What other threads share with one vCPU thread.
pub struct VcpuHandle {
    /// vCPU index (= APIC id).
    pub index: u32,
    /// The vCPU's local APIC.
    pub lapic: Mutex<Lapic>,
    /// Signalled (with `lapic` held) whenever the LAPIC gets something to act on;
    /// a halted or SIPI-waiting vCPU thread sleeps on it.
    pub wake: Condvar,
    /// Gets the vCPU thread out of `KVM_RUN`.
    pub kicker: Kicker,
    /// The routing view last published to other nodes.
    published: Mutex<Option<ApicView>>,
    /// What the vCPU thread is doing ([`Activity`] as u8), for the profiler.
    activity: AtomicU8,
    /// The profiler asked for a sample of RIP at the next exit.
    sample_requested: AtomicBool,
    /// The vCPU thread is outside KVM and will pass the run gate before it calls into
    /// KVM again (see [`crate::run_gate`]).
    quiet: AtomicBool,
    /// The vCPU thread's kernel thread id (0 until it runs).
    tid: std::sync::atomic::AtomicI32,
    /// Returns from `KVM_RUN` so far (for the stall watch).
    exits: std::sync::atomic::AtomicU64,
    /// Exits by kind (counted by the vCPU thread, read by the control API).
    pub exit_stats: crate::stats::ExitStats,
}

/// What a vCPU thread is doing, as far as the profiler cares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Activity {
    /// In or around `KVM_RUN`.
    Running = 0,
    /// Halted in userspace, waiting for an interrupt.
    Halted = 1,
    /// Waiting for INIT/SIPI.
    WaitingForSipi = 2,
    /// Waiting for a device access forwarded to another node.
    RemoteIo = 3,
}

impl VcpuHandle {
    /// Creates the handle for vCPU `index`.
    pub fn new(index: u32, lapic: Lapic) -> VcpuHandle {
        VcpuHandle {
            index,
            lapic: Mutex::new(lapic),
            wake: Condvar::new(),
            kicker: Kicker::new(),
            published: Mutex::new(None),
            activity: AtomicU8::new(Activity::Running as u8),
            sample_requested: AtomicBool::new(false),
            quiet: AtomicBool::new(true),
            tid: std::sync::atomic::AtomicI32::new(0),
            exits: std::sync::atomic::AtomicU64::new(0),
            exit_stats: Default::default(),
        }
    }

    /// Counts one return from `KVM_RUN` (called by the vCPU thread).
    pub fn count_exit(&self) {
        self.exits.fetch_add(1, Ordering::Relaxed);
    }

    /// Returns from `KVM_RUN` so far.
    pub fn exits(&self) -> u64 {
        self.exits.load(Ordering::Relaxed)
    }

    /// Records what the vCPU thread is doing (called by that thread).
    pub fn set_activity(&self, a: Activity) {
        self.activity.store(a as u8, Ordering::Relaxed);
    }

    /// What the vCPU thread is doing.
    pub fn activity(&self) -> Activity {
        match self.activity.load(Ordering::Relaxed) {
            1 => Activity::Halted,
            2 => Activity::WaitingForSipi,
            3 => Activity::RemoteIo,
            _ => Activity::Running,
        }
    }

    /// The vCPU thread's quiet flag (see [`crate::run_gate`]).
    pub fn quiet_flag(&self) -> &AtomicBool {
        &self.quiet
    }

    /// Records the calling thread as this vCPU's thread.
    pub fn set_thread_id(&self, tid: i32) {
        self.tid.store(tid, Ordering::SeqCst);
    }

    /// The vCPU thread's kernel thread id (0 until it runs).
    pub fn thread_id(&self) -> i32 {
        self.tid.load(Ordering::SeqCst)
    }

    /// Whether the vCPU thread is quiet (see [`crate::run_gate`]).
    pub fn is_quiet(&self) -> bool {
        self.quiet.load(Ordering::SeqCst)
    }

    /// Asks the running vCPU for a sample of its RIP (kicks it out of `KVM_RUN`).
    pub fn request_sample(&self) {
        self.sample_requested.store(true, Ordering::Relaxed);
        self.kicker.kick();
    }

    /// Whether a sample was asked for (and clears the request).
    pub fn take_sample_request(&self) -> bool {
        self.sample_requested.swap(false, Ordering::Relaxed)
    }

    /// Locks the LAPIC. A poisoned lock (a panicking vCPU thread) still yields the
    /// state: the VM is being torn down anyway and we must not cascade panics.
    pub fn lock(&self) -> MutexGuard<'_, Lapic> {
        self.lapic.locked()
    }

    /// Wakes the vCPU wherever it is: halted, waiting for SIPI, or in `KVM_RUN`.
    pub fn notify(&self) {
        self.wake.notify_all();
        self.kicker.kick();
    }
}

/// What interrupt routing needs from the other nodes of a cluster.
pub trait RemoteInterrupts: Send + Sync {
    /// Deliver `msg` to APIC `apic_id`, which lives on another node.
    fn send_irq(&self, apic_id: u32, msg: &InterruptMessage);
    /// A level-triggered `vector` was EOId here; the IOAPIC lives on another node.
    fn level_eoi(&self, vector: u8);
    /// One of our LAPICs changed how it is addressed (mode, LDR, DFR, enable).
    fn publish_view(&self, view: &ApicView);
}

/// Routes interrupt messages to vCPUs, local or (through [`RemoteInterrupts`]) on
/// other nodes. vCPU `i` of the VM has APIC id `i`.
pub struct InterruptHub {
    vcpus: Vec<Arc<VcpuHandle>>,
    first_apic: u32,
    total: u32,
    ioapic: Option<Mutex<IoApic>>,
    timers: Arc<TimerService>,
    remote: Option<Arc<dyn RemoteInterrupts>>,
    remote_views: Mutex<Vec<ApicView>>,
}

/// How a LAPIC looks at reset, before its node tells us otherwise.
fn reset_view(apic_id: u32) -> ApicView {
    ApicView {
        apic_id,
        x2apic: false,
        ldr: 0,
        dfr: 0xffff_ffff,
        arbitration_priority: 0,
        enabled: true,
    }
}

impl TimerTargets for InterruptHub {
    fn fire_lapic_timers(&self, now: u64) -> Option<u64> {
        let mut next = None;
        for v in self.vcpus() {
            let mut lapic = v.lock();
            if lapic.timer_deadline().is_some_and(|d| d <= now) && lapic.timer_tick(now) {
                drop(lapic);
                v.notify();
                lapic = v.lock();
            }
            next = min_opt(next, lapic.timer_deadline());
        }
        next
    }

    fn pulse_gsi(&self, gsi: usize) {
        self.set_gsi(gsi, true);
        self.set_gsi(gsi, false);
    }
}

impl InterruptHub {
    /// A hub over the local vCPUs `vcpus` (APIC ids `first_apic..`), of `total` in the
    /// VM. `ioapic` is `Some` on the node that has the devices.
    pub fn new(
        vcpus: Vec<Arc<VcpuHandle>>,
        first_apic: u32,
        total: u32,
        ioapic: Option<IoApic>,
        timers: Arc<TimerService>,
        remote: Option<Arc<dyn RemoteInterrupts>>,
    ) -> Self {
        InterruptHub {
            vcpus,
            first_apic,
            total,
            ioapic: ioapic.map(Mutex::new),
            timers,
            remote,
            remote_views: Mutex::new((0..total).map(reset_view).collect()),
        }
    }

    /// The local vCPU handles.
    pub fn vcpus(&self) -> &[Arc<VcpuHandle>] {
        &self.vcpus
    }

    /// How many APICs the guest has (on every node together).
    pub fn apic_count(&self) -> u32 {
        self.total
    }

    /// The timer service (so register writes that reprogram a timer can poke it).
    pub fn timers(&self) -> &Arc<TimerService> {
        &self.timers
    }

    fn local(&self, apic_id: u32) -> Option<&Arc<VcpuHandle>> {
        apic_id
            .checked_sub(self.first_apic)
            .and_then(|i| self.vcpus.get(i as usize))
    }

    /// Delivers `msg`, sent by the LAPIC with id `source` (None for IOAPIC/MSI).
    pub fn deliver(&self, msg: &InterruptMessage, source: Option<u32>) {
        // The common case, a physical destination naming one APIC, needs no views: skip
        // locking every LAPIC. (A disabled target drops the message in `accept`, just as
        // routing would have skipped it.)
        if msg.dest_mode == DestinationMode::Physical
            && msg.shorthand == Shorthand::None
            && msg.delivery != DeliveryMode::LowestPriority
            && msg.destination != XAPIC_BROADCAST
            && msg.destination != X2APIC_BROADCAST
        {
            self.send_to(msg.destination, msg);
            return;
        }
        let mut views = self.remote_views.locked().clone();
        for v in &self.vcpus {
            if let Some(slot) = views.get_mut(v.index as usize) {
                *slot = v.lock().view();
            }
        }
        for idx in route::targets(msg, source, &views) {
            self.send_to(idx as u32, msg);
        }
    }

    /// Delivers an already-routed `msg` to APIC `apic_id`, here or on its node.
    fn send_to(&self, apic_id: u32, msg: &InterruptMessage) {
        if apic_id >= self.total {
            return;
        }
        match (self.local(apic_id), &self.remote) {
            (Some(_), _) => self.deliver_local(apic_id, msg),
            (None, Some(remote)) => remote.send_irq(apic_id, msg),
            (None, None) => {}
        }
    }

    /// Delivers `msg` to the local LAPIC `apic_id` (routing already done).
    pub fn deliver_local(&self, apic_id: u32, msg: &InterruptMessage) {
        if let Some(target) = self.local(apic_id) {
            let woke = target.lock().accept(msg);
            if woke {
                target.notify();
            }
        }
    }

    /// Records another node's LAPIC view.
    pub fn update_remote_view(&self, view: ApicView) {
        if self.local(view.apic_id).is_some() {
            return;
        }
        let mut views = self.remote_views.locked();
        if let Some(slot) = views.get_mut(view.apic_id as usize) {
            *slot = view;
        }
    }

    /// After a LAPIC register write: tell the other nodes if its addressing changed.
    /// (Arbitration priority changes all the time and is left out: lowest-priority
    /// delivery to another node uses the last published value.)
    pub fn lapic_written(&self, handle: &VcpuHandle) {
        let Some(remote) = &self.remote else {
            return;
        };
        let mut view = handle.lock().view();
        view.arbitration_priority = 0;
        let mut published = handle.published.locked();
        if published.as_ref() != Some(&view) {
            *published = Some(view);
            remote.publish_view(&view);
        }
    }

    /// Delivers every message in `msgs`.
    pub fn deliver_all(&self, msgs: Vec<InterruptMessage>) {
        for m in msgs {
            self.deliver(&m, None);
        }
    }

    fn with_ioapic<T>(&self, f: impl FnOnce(&mut IoApic) -> T) -> Option<T> {
        self.ioapic.as_ref().map(|io| f(&mut io.locked()))
    }

    /// Drives IOAPIC input `pin`.
    pub fn set_gsi(&self, pin: usize, level: bool) {
        if let Some(msgs) = self.with_ioapic(|io| io.set_irq(pin, level)) {
            self.deliver_all(msgs);
        }
    }

    /// A level-triggered vector was EOId at a LAPIC (here or on another node).
    pub fn level_eoi(&self, vector: u8) {
        match self.with_ioapic(|io| io.end_of_interrupt(vector)) {
            Some(msgs) => self.deliver_all(msgs),
            None => {
                if let Some(remote) = &self.remote {
                    remote.level_eoi(vector);
                }
            }
        }
    }

    /// IOAPIC register read.
    pub fn ioapic_read(&self, offset: u64) -> u32 {
        self.with_ioapic(|io| io.mmio_read(offset)).unwrap_or(!0)
    }

    /// IOAPIC register write.
    pub fn ioapic_write(&self, offset: u64, value: u32) {
        if let Some(msgs) = self.with_ioapic(|io| io.mmio_write(offset, value)) {
            self.deliver_all(msgs);
        }
    }
}

/// An IOAPIC input pin, as a device sees it.
pub struct IoApicPin {
    hub: Arc<InterruptHub>,
    pin: usize,
}

impl IoApicPin {
    /// Pin `pin` (GSI) of the hub's IOAPIC.
    pub fn new(hub: Arc<InterruptHub>, pin: usize) -> IoApicPin {
        IoApicPin { hub, pin }
    }
}

impl IrqLine for IoApicPin {
    fn set_level(&self, high: bool) {
        self.hub.set_gsi(self.pin, high);
    }
}

/// The IOAPIC's MMIO window on the bus.
pub struct IoApicMmio {
    hub: Arc<InterruptHub>,
}

impl IoApicMmio {
    /// The window of the hub's IOAPIC.
    pub fn new(hub: Arc<InterruptHub>) -> IoApicMmio {
        IoApicMmio { hub }
    }
}

impl dvmm_devices::bus::BusDevice for IoApicMmio {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let v = self.hub.ioapic_read(offset & !3).to_le_bytes();
        let start = (offset & 3) as usize;
        for (i, b) in data.iter_mut().enumerate() {
            *b = v.get(start + i).copied().unwrap_or(0);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        // The IOAPIC only takes 32-bit accesses; narrower ones are merged into a dword.
        let mut v = [0u8; 4];
        for (i, b) in data.iter().take(4).enumerate() {
            v[i] = *b;
        }
        self.hub.ioapic_write(offset & !3, u32::from_le_bytes(v));
    }
}

/// Message-signalled interrupts from PCI devices (MSI-X writes), delivered through the
/// hub to whichever vCPU they name, on this node or another.
pub struct HubMsi(pub Arc<InterruptHub>);

impl dvmm_pci::MsiSink for HubMsi {
    fn send_msi(&self, address: u64, data: u32) {
        match InterruptMessage::from_msi(address, data) {
            Some(msg) => self.0.deliver(&msg, None),
            // A write outside 0xFEEx_xxxx on real hardware goes to memory, not to an APIC.
            None => tracing::debug!(address, data, "MSI with no APIC address dropped"),
        }
    }
}
