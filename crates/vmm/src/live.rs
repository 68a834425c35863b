//! What a running VM shows and accepts from outside (the control API): its vCPUs'
//! counters, pause and resume, stop. A [`LiveVm`] is a cheap handle, valid while the VM
//! runs and after (it then reports the VM as stopping).

use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use crate::control::{VmControl, VmOutcome};
use crate::irqchip::VcpuHandle;

/// How long a pause waits for every vCPU thread to leave the guest.
const PAUSE_WAIT: Duration = Duration::from_secs(10);

/// Why a pause or resume could not be done.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum LiveError {
    /// The VM is ending.
    #[error("the VM is stopping")]
    Stopping,
    /// Asked to pause a paused VM.
    #[error("the VM is already paused")]
    AlreadyPaused,
    /// Asked to resume a running VM.
    #[error("the VM is not paused")]
    NotPaused,
    /// A vCPU did not leave the guest in time (the pause is taken back).
    #[error("vCPU {0} did not stop within {PAUSE_WAIT:?} (the VM keeps running)")]
    Stuck(u32),
}

/// One vCPU's counters at some recent moment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VcpuCounts {
    /// The vCPU index (= APIC id).
    pub index: u32,
    /// Returns from `KVM_RUN`.
    pub exits_total: u64,
    /// Exits by kind.
    pub exits: Vec<(&'static str, u64)>,
}

/// A handle on a running VM's local vCPUs and its end state.
#[derive(Clone)]
pub struct LiveVm {
    control: Arc<VmControl>,
    handles: Vec<Arc<VcpuHandle>>,
    /// The KVM VM, for its clock (gone once the VM is torn down).
    vm: Weak<kvm_ioctls::VmFd>,
}

impl LiveVm {
    pub(crate) fn new(
        control: Arc<VmControl>,
        handles: Vec<Arc<VcpuHandle>>,
        vm: Weak<kvm_ioctls::VmFd>,
    ) -> LiveVm {
        LiveVm {
            control,
            handles,
            vm,
        }
    }

    /// The guest's kvmclock now, in ns (None once the VM is gone).
    pub fn guest_clock_ns(&self) -> Option<u64> {
        self.vm.upgrade()?.get_clock().ok().map(|c| c.clock)
    }

    /// The local vCPUs' indices.
    pub fn vcpus(&self) -> Vec<u32> {
        self.handles.iter().map(|h| h.index).collect()
    }

    /// Whether the VM is paused.
    pub fn is_paused(&self) -> bool {
        self.control.is_paused()
    }

    /// Whether the VM is ending.
    pub fn is_stopping(&self) -> bool {
        self.control.stopping()
    }

    /// Time spent paused so far.
    pub fn paused_for(&self) -> Duration {
        self.control.paused_for()
    }

    /// Stops this node's vCPUs: returns once every one is out of the guest (parked, or
    /// sleeping in userspace where it will park before it enters the guest again).
    pub fn pause(&self) -> Result<(), LiveError> {
        if self.control.stopping() {
            return Err(LiveError::Stopping);
        }
        if !self.control.set_paused(true) {
            return Err(LiveError::AlreadyPaused);
        }
        for h in &self.handles {
            h.kicker.kick();
        }
        let deadline = Instant::now() + PAUSE_WAIT;
        for h in &self.handles {
            while !h.quiet_flag().load(Ordering::SeqCst) {
                if self.control.stopping() {
                    return Err(LiveError::Stopping);
                }
                if Instant::now() > deadline {
                    self.control.set_paused(false);
                    return Err(LiveError::Stuck(h.index));
                }
                h.kicker.kick();
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        tracing::info!(vcpus = ?self.vcpus(), "paused");
        Ok(())
    }

    /// Lets this node's vCPUs run again, first setting the guest's kvmclock back by
    /// `clock_shift`: the time the VM was paused, so that the guest's clock does not
    /// advance across the pause (as Cloud Hypervisor does). The shift must not exceed
    /// the time since the last vCPU stopped, or the guest would see its clock go back.
    pub fn resume(&self, clock_shift: Duration) -> Result<(), LiveError> {
        if self.control.stopping() {
            return Err(LiveError::Stopping);
        }
        if !self.control.is_paused() {
            return Err(LiveError::NotPaused);
        }
        let shift = u64::try_from(clock_shift.as_nanos()).unwrap_or(u64::MAX);
        if shift > 0 {
            if let Some(vm) = self.vm.upgrade() {
                match vm.get_clock() {
                    Ok(mut c) => {
                        c.clock = c.clock.saturating_sub(shift);
                        // KVM takes only the clock (flags 0: no host-clock pairing).
                        c.flags = 0;
                        if let Err(e) = vm.set_clock(&c) {
                            tracing::warn!(error = %e, "cannot hold the guest clock across the pause");
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot read the guest clock to hold it across the pause")
                    }
                }
            }
        }
        if !self.control.set_paused(false) {
            return Err(LiveError::NotPaused);
        }
        tracing::info!(vcpus = ?self.vcpus(), clock_shift = ?clock_shift, "resumed");
        Ok(())
    }

    /// Ends the VM as a stop from outside would.
    pub fn stop(&self) {
        self.control.finish(VmOutcome::Stopped);
    }

    /// The local vCPUs' counters.
    pub fn counters(&self) -> Vec<VcpuCounts> {
        self.handles
            .iter()
            .map(|h| VcpuCounts {
                index: h.index,
                exits_total: h.exits(),
                exits: h.exit_stats.snapshot(),
            })
            .collect()
    }
}
