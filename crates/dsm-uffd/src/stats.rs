//! The engine's counters.

/// Upper bounds of the fault-wait histogram's buckets, in nanoseconds.
pub const FAULT_WAIT_BOUNDS_NS: [u64; 9] = [
    10_000,
    25_000,
    50_000,
    100_000,
    250_000,
    500_000,
    1_000_000,
    10_000_000,
    100_000_000,
];

/// Counters of one engine (see [`crate::DsmEngine::stats`]).
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
    /// Requests made by [`crate::DsmEngine::access`] (VMM accesses that missed).
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
    /// Quiesces given up after 200 ms (the message was delivered anyway).
    pub quiesce_timeouts: u64,
    /// Quiesces cut short because the users left waited in faults (delivered at once,
    /// the drop made once they stopped).
    pub quiesce_blocked: u64,
    /// Drops made after the pages had left (see `quiesce_blocked`).
    pub late_drops: u64,
    /// Drops abandoned after 1 s.
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
    /// Faults that waited at most [`FAULT_WAIT_BOUNDS_NS`]`[i]` (not cumulative: each
    /// fault counts in its first bucket; longer waits only in `faults_resolved`).
    pub fault_wait_buckets: [u64; FAULT_WAIT_BOUNDS_NS.len()],
    /// Time spent handling faults and messages under the engine lock, in nanoseconds.
    pub busy_ns: u64,
    /// [`crate::PageNet::send_batch`] calls with more than one message.
    pub batches_sent: u64,
    /// Frames given to [`crate::DsmEngine::receive_frame`] that held more than one message.
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

impl DsmStats {
    /// Every counter by its field name (the control API and metrics use these names).
    pub fn named(&self) -> Vec<(&'static str, u64)> {
        // Destructured without `..`: a new counter cannot be forgotten here.
        let DsmStats {
            read_faults,
            write_faults,
            missing_faults,
            minor_faults,
            wp_faults,
            spurious_faults,
            vmm_faults,
            msgs_sent,
            msgs_received,
            pages_sent,
            pages_received,
            zero_grants,
            derived_drops,
            quiesces,
            quiesce_timeouts,
            quiesce_blocked,
            late_drops,
            drops_abandoned,
            quiesce_ns,
            installs_read_only,
            installs_writable,
            invalidations,
            downgrades,
            deferred_msgs,
            protocol_errors,
            bad_msgs,
            io_errors,
            faults_resolved,
            fault_wait_ns,
            fault_wait_buckets: _,
            busy_ns,
            batches_sent,
            batches_received,
            readahead_batches,
            prefetched,
            prefetch_used,
            prefetch_late,
            faults_on_pending,
            kicks_deferred,
        } = self;
        vec![
            ("read_faults", *read_faults),
            ("write_faults", *write_faults),
            ("missing_faults", *missing_faults),
            ("minor_faults", *minor_faults),
            ("wp_faults", *wp_faults),
            ("spurious_faults", *spurious_faults),
            ("vmm_faults", *vmm_faults),
            ("msgs_sent", *msgs_sent),
            ("msgs_received", *msgs_received),
            ("pages_sent", *pages_sent),
            ("pages_received", *pages_received),
            ("zero_grants", *zero_grants),
            ("derived_drops", *derived_drops),
            ("quiesces", *quiesces),
            ("quiesce_timeouts", *quiesce_timeouts),
            ("quiesce_blocked", *quiesce_blocked),
            ("late_drops", *late_drops),
            ("drops_abandoned", *drops_abandoned),
            ("quiesce_ns", *quiesce_ns),
            ("installs_read_only", *installs_read_only),
            ("installs_writable", *installs_writable),
            ("invalidations", *invalidations),
            ("downgrades", *downgrades),
            ("deferred_msgs", *deferred_msgs),
            ("protocol_errors", *protocol_errors),
            ("bad_msgs", *bad_msgs),
            ("io_errors", *io_errors),
            ("faults_resolved", *faults_resolved),
            ("fault_wait_ns", *fault_wait_ns),
            ("busy_ns", *busy_ns),
            ("batches_sent", *batches_sent),
            ("batches_received", *batches_received),
            ("readahead_batches", *readahead_batches),
            ("prefetched", *prefetched),
            ("prefetch_used", *prefetch_used),
            ("prefetch_late", *prefetch_late),
            ("faults_on_pending", *faults_on_pending),
            ("kicks_deferred", *kicks_deferred),
        ]
    }
}

impl DsmStats {
    /// Counts one fault that waited `ns` for its grant.
    pub fn count_fault_wait(&mut self, ns: u64) {
        self.faults_resolved += 1;
        self.fault_wait_ns += ns;
        if let Some(i) = FAULT_WAIT_BOUNDS_NS.iter().position(|b| ns <= *b) {
            self.fault_wait_buckets[i] += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fault_wait_lands_in_its_first_bucket() {
        let mut s = DsmStats::default();
        s.count_fault_wait(5_000);
        s.count_fault_wait(10_000);
        s.count_fault_wait(60_000);
        s.count_fault_wait(1_000_000_000);
        assert_eq!(s.faults_resolved, 4);
        assert_eq!(s.fault_wait_buckets[0], 2);
        assert_eq!(s.fault_wait_buckets[3], 1, "60 us is in the 100 us bucket");
        assert_eq!(
            s.fault_wait_buckets.iter().sum::<u64>(),
            3,
            "1 s is beyond them all"
        );
        assert_eq!(s.fault_wait_ns, 1_000_075_000);
    }
}
