//! Interrupt delivery: per-vCPU LAPIC state, the IOAPIC, and routing of interrupt
//! messages (IPIs, IOAPIC and MSI messages) to the LAPICs they address.
//!
//! Lock order: a device's bus mutex, then the IOAPIC, then one LAPIC at a time. Nobody
//! holds a LAPIC lock while taking another lock.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use dvmm_devices::IrqLine;
use dvmm_irq::lapic::Lapic;
use dvmm_irq::msg::InterruptMessage;
use dvmm_irq::{ioapic::IoApic, route};

use crate::kick::Kicker;
use crate::timers::TimerService;

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
}

impl VcpuHandle {
    /// Creates the handle for vCPU `index`.
    pub fn new(index: u32, lapic: Lapic) -> VcpuHandle {
        VcpuHandle {
            index,
            lapic: Mutex::new(lapic),
            wake: Condvar::new(),
            kicker: Kicker::new(),
        }
    }

    /// Locks the LAPIC. A poisoned lock (a panicking vCPU thread) still yields the
    /// state: the VM is being torn down anyway and we must not cascade panics.
    pub fn lock(&self) -> MutexGuard<'_, Lapic> {
        self.lapic.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Wakes the vCPU wherever it is: halted, waiting for SIPI, or in `KVM_RUN`.
    pub fn notify(&self) {
        self.wake.notify_all();
        self.kicker.kick();
    }
}

/// Routes interrupt messages to vCPUs.
pub struct InterruptHub {
    vcpus: Vec<Arc<VcpuHandle>>,
    ioapic: Mutex<IoApic>,
    timers: Arc<TimerService>,
}

impl InterruptHub {
    /// A hub over the given vCPUs with a fresh IOAPIC.
    pub fn new(vcpus: Vec<Arc<VcpuHandle>>, ioapic: IoApic, timers: Arc<TimerService>) -> Self {
        InterruptHub {
            vcpus,
            ioapic: Mutex::new(ioapic),
            timers,
        }
    }

    /// All vCPU handles, by index.
    pub fn vcpus(&self) -> &[Arc<VcpuHandle>] {
        &self.vcpus
    }

    /// The timer service (so register writes that reprogram a timer can poke it).
    pub fn timers(&self) -> &Arc<TimerService> {
        &self.timers
    }

    fn ioapic(&self) -> MutexGuard<'_, IoApic> {
        self.ioapic.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Delivers `msg`, sent by the LAPIC with id `source` (None for IOAPIC/MSI).
    pub fn deliver(&self, msg: &InterruptMessage, source: Option<u32>) {
        let views: Vec<_> = self.vcpus.iter().map(|v| v.lock().view()).collect();
        for idx in route::targets(msg, source, &views) {
            let Some(target) = self.vcpus.get(idx) else {
                continue;
            };
            let woke = target.lock().accept(msg);
            if woke {
                target.notify();
            }
        }
    }

    /// Delivers every message in `msgs`.
    pub fn deliver_all(&self, msgs: Vec<InterruptMessage>) {
        for m in msgs {
            self.deliver(&m, None);
        }
    }

    /// Drives IOAPIC input `pin`.
    pub fn set_gsi(&self, pin: usize, level: bool) {
        let msgs = self.ioapic().set_irq(pin, level);
        self.deliver_all(msgs);
    }

    /// A level-triggered vector was EOId at a LAPIC.
    pub fn level_eoi(&self, vector: u8) {
        let msgs = self.ioapic().end_of_interrupt(vector);
        self.deliver_all(msgs);
    }

    /// IOAPIC register read.
    pub fn ioapic_read(&self, offset: u64) -> u32 {
        self.ioapic().mmio_read(offset)
    }

    /// IOAPIC register write.
    pub fn ioapic_write(&self, offset: u64, value: u32) {
        let msgs = self.ioapic().mmio_write(offset, value);
        self.deliver_all(msgs);
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
