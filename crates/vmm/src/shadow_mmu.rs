//! KVM's shadow page tables on a cluster node, on hosts without EPT/NPT.
//!
//! Without two-dimensional paging KVM builds its own ("shadow") page tables from the
//! guest's and keeps them in step by write-protecting the guest's page-table pages: every
//! write the guest makes to one traps into KVM, which updates its copy. A guest page
//! table changed on *another* node is never written through this node's KVM: the DSM
//! just drops the page here. KVM would go on translating through its stale copy even
//! after the guest flushed its TLB (seen here: testos `pagetable` reads the old page at
//! CPL3 after the other node remapped it and both flushed; Linux then breaks fork's
//! copy-on-write). So when the DSM invalidates a page whose last contents here look like
//! a page table, this node's shadow pages are dropped before the node acknowledges the
//! invalidation, i.e. before the writer's write, and hence its TLB flush, can happen.
//!
//! KVM has no ioctl to drop the shadow pages of one guest page, but deleting any memory
//! slot makes it drop all of them (`kvm_mmu_zap_all_fast`: a generation bump, roots
//! reloaded by each vCPU on its next entry). So a scratch slot of one page, in a part of
//! the MMIO hole no device uses, is added and deleted; the guest's RAM slots are not
//! touched, and vCPUs rebuild what they touch. (`KVM_SET_NR_MMU_PAGES` with a small
//! limit was tried first: it spares roots and leaves small working sets alone, so the
//! stale translation survived.)
//!
//! A memslot change waits for KVM's SRCU readers, and a vCPU thread sleeping in a
//! userfault inside `KVM_RUN` is one; if that fault waits for this node's DSM, which is
//! what changes the slot, the node deadlocks (seen: the second vCPU never came online;
//! kicking does not help on PVM, whose instruction emulator retries an interrupted fault
//! without leaving KVM). So the DSM first quiesces this node's vCPUs through the
//! [`RunGate`]: it defers the message that takes the page away, closes the gate, kicks
//! the vCPUs and goes on serving faults until every vCPU thread is quiet (parked at the
//! gate or asleep in userspace); then it takes the page away, changes the slot (no
//! vCPU is in KVM, so at once), acknowledges and opens the gate.

use dvmm_sync::MutexExt;
use std::sync::Arc;

use kvm_ioctls::VmFd;

use crate::irqchip::VcpuHandle;
use crate::run_gate::RunGate;

/// The scratch slot's number: far above the RAM slots.
const SCRATCH_SLOT: u32 = 100;

/// Page-table test: could KVM have shadowed `page` as an x86-64 page table? Every
/// present entry must point at a frame inside the guest's physical address space
/// (`max_frame` frames) other than frame 0, with its reserved bits (52..=62) clear;
/// not-present entries are 0 (dvmm's guests have no swap); and at least one present
/// entry has its Accessed bit set: KVM's walker sets it on every entry it translates
/// through, so a table KVM never walked (and so never shadowed) is left alone. Pages of
/// small odd counters (lock words) would otherwise pass, and each false positive costs
/// every vCPU of the node its shadow pages.
pub fn looks_like_page_table(page: &[u8], max_frame: u64) -> bool {
    const PRESENT: u64 = 1;
    const ACCESSED: u64 = 1 << 5;
    let mut accessed = false;
    for e in page.chunks_exact(8) {
        let mut b = [0u8; 8];
        b.copy_from_slice(e);
        let v = u64::from_le_bytes(b);
        if v == 0 {
            continue;
        }
        if v & PRESENT == 0 || v & 0x7ff0_0000_0000_0000 != 0 {
            return false;
        }
        let frame = (v & 0x000f_ffff_ffff_f000) >> 12;
        if frame == 0 || frame >= max_frame {
            return false;
        }
        accessed |= v & ACCESSED != 0;
    }
    accessed
}

/// Drops KVM's shadow page tables when a page table leaves this node (see the module
/// documentation).
pub struct ShadowPageTables {
    vm: VmFd,
    /// This node's vCPUs, quiesced before a drop.
    vcpus: Vec<Arc<VcpuHandle>>,
    gate: Arc<RunGate>,
    /// One page the scratch slot points at.
    scratch: *mut libc::c_void,
    /// Frames of guest-physical address space (RAM and the MMIO hole below 4 GiB).
    max_frame: u64,
    /// One drop at a time (the slot is shared).
    lock: std::sync::Mutex<()>,
}

// SAFETY: `scratch` is a private anonymous page used only as a memslot's backing, never
// dereferenced by us; the VmFd is Send + Sync.
unsafe impl Send for ShadowPageTables {}
// SAFETY: as above; drops are serialized by `lock`.
unsafe impl Sync for ShadowPageTables {}

/// The scratch slot could not be set up.
#[derive(Debug, thiserror::Error)]
#[error("cannot set up the scratch memory slot that drops KVM's shadow page tables: {0}")]
pub struct ShadowError(#[source] std::io::Error);

impl ShadowPageTables {
    /// For the VM `vm` (a duplicate of its fd) whose guest-physical space ends at
    /// `phys_end`, run by this node's `vcpus`, which park at `gate`.
    pub fn new(
        vm: VmFd,
        phys_end: u64,
        vcpus: Vec<Arc<VcpuHandle>>,
        gate: Arc<RunGate>,
    ) -> Result<ShadowPageTables, ShadowError> {
        // SAFETY: a fresh private anonymous mapping of one page; checked.
        let scratch = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                4096,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if scratch == libc::MAP_FAILED {
            return Err(ShadowError(std::io::Error::last_os_error()));
        }
        let t = ShadowPageTables {
            vm,
            vcpus,
            gate,
            scratch,
            max_frame: phys_end.div_ceil(4096),
            lock: std::sync::Mutex::new(()),
        };
        // Make sure the host lets us, once, at start-up.
        t.cycle_slot()
            .map_err(|e| ShadowError(std::io::Error::other(e.to_string())))?;
        Ok(t)
    }

    fn slot(&self, size: u64) -> Result<(), kvm_ioctls::Error> {
        let region = kvm_bindings::kvm_userspace_memory_region {
            slot: SCRATCH_SLOT,
            guest_phys_addr: dvmm_layout::SCRATCH_SLOT_ADDR,
            memory_size: size,
            userspace_addr: self.scratch as u64,
            flags: 0,
        };
        // SAFETY: the region is our own scratch page, which outlives the VM's use of it
        // (the slot is deleted right after it is made, and on drop at the latest).
        unsafe { self.vm.set_user_memory_region(region) }
    }

    /// Adds and deletes the scratch slot (the deletion drops every shadow page).
    fn cycle_slot(&self) -> Result<(), kvm_ioctls::Error> {
        let _one = self.lock.locked();
        self.slot(4096)?;
        self.slot(0)
    }
}

impl Drop for ShadowPageTables {
    fn drop(&mut self) {
        // SAFETY: unmaps the page mapped in `new`; the slot using it is deleted.
        unsafe { libc::munmap(self.scratch, 4096) };
    }
}

/// The DSM's view of the shadows (the node runtime hands these to the DSM engine as its
/// `LocalDerived` state).
impl ShadowPageTables {
    /// Whether KVM may have shadowed `contents`, this node's bytes of a page: it looks
    /// like a page table.
    pub fn derives_from(&self, contents: &[u8]) -> bool {
        looks_like_page_table(contents, self.max_frame)
    }

    /// Closes the run gate and kicks every vCPU that is not quiet (asking
    /// `defer_kick(tid)` first, see `Kicker::kick_unless`).
    pub fn quiesce(&self, defer_kick: &mut dyn FnMut(i32) -> bool) {
        self.gate.close();
        for v in &self.vcpus {
            if !v.is_quiet() {
                v.kicker.kick_unless(defer_kick);
                // A halted vCPU is quiet already; one waiting for SIPI too.
            }
        }
    }

    /// Whether every vCPU is quiet behind a closed gate.
    pub fn quiesced(&self) -> bool {
        self.gate.is_closed() && self.vcpus.iter().all(|v| v.is_quiet())
    }

    /// Whether every vCPU that is not quiet waits in a DSM fault (`waiting(tid)`).
    pub fn blocked_in_faults(&self, waiting: &dyn Fn(i32) -> bool) -> bool {
        self.vcpus
            .iter()
            .all(|v| v.is_quiet() || (v.thread_id() > 0 && waiting(v.thread_id())))
    }

    /// Opens the gate.
    pub fn resume(&self) {
        self.gate.open();
    }

    /// Drops KVM's shadow pages if the vCPUs are quiesced (false, dropping nothing, if
    /// not).
    pub fn drop_derived(&self) -> bool {
        if !self.quiesced() {
            // Changing the slot now could deadlock (see the module documentation); the
            // DSM asks again once the vCPUs are quiet.
            return false;
        }
        if let Err(e) = self.cycle_slot() {
            tracing::error!("cannot drop KVM's shadow page tables: {e}");
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page(entries: &[(usize, u64)]) -> Vec<u8> {
        let mut p = vec![0u8; 4096];
        for &(i, v) in entries {
            p[i * 8..i * 8 + 8].copy_from_slice(&v.to_le_bytes());
        }
        p
    }

    #[test]
    fn page_tables_are_told_from_data() {
        let frames = (256 << 20) / 4096;
        // Linux-like: user PTEs (NX, accessed, dirty, user, rw, present) and a table link.
        assert!(looks_like_page_table(
            &page(&[(0, 0x8000_0000_0123_4067), (5, 0x0000_0000_0200_0027)]),
            frames
        ));
        assert!(!looks_like_page_table(&page(&[]), frames), "empty");
        assert!(
            !looks_like_page_table(&page(&[(0, 0x0000_0000_0200_0007)]), frames),
            "never walked (no Accessed bit)"
        );
        assert!(
            !looks_like_page_table(&page(&[(0, 0x21), (1, 0x23)]), frames),
            "odd counters: frame 0"
        );
        assert!(!looks_like_page_table(
            &page(&[(0, 0x1234_5678_0000_0000)]),
            frames
        ));
        assert!(
            !looks_like_page_table(&page(&[(0, 0x42)]), frames),
            "not present, not 0"
        );
        assert!(
            !looks_like_page_table(&page(&[(0, 0x7fff_f000 | 1)]), frames),
            "frame beyond guest memory"
        );
        assert!(
            !looks_like_page_table(&page(&[(0, 0xffff_8880_0123_4000)]), frames),
            "a kernel pointer"
        );
    }
}
