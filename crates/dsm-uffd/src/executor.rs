//! The engine's core: faults, incoming messages, the state machine's actions (UFFDIO_COPY/CONTINUE, write protection, sends), holds and deferral.

use super::*;
use std::os::fd::AsRawFd;

/// How many holds may pile up before the expired ones are swept.
pub(crate) const HOLDS_SWEEP: usize = 256;

/// Whether thread `tid` waits in a fault of this engine.
pub(crate) fn in_fault(faulters: &Faulters, tid: i32) -> bool {
    faulters.values().any(|w| w.iter().any(|&(t, _)| t == tid))
}

/// Records a kick to `tid` as owed if the thread waits in one of our faults (the engine
/// sends it when that fault is answered); false if it does not (kick it now).
pub(crate) fn owe_kick(
    faulters: &Faulters,
    owed: &mut Vec<i32>,
    stats: &mut DsmStats,
    tid: i32,
) -> bool {
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
pub(crate) fn is_held(st: &State, page: PageNo, now: Instant) -> bool {
    st.holds
        .get(&page)
        .is_some_and(|h| h.remaining(now, |t| in_fault(&st.faulters, t)).is_some())
}

/// Whether a message for a page pinned (or held) here must wait until the pin drops.
pub(crate) fn must_defer(msg: Msg, pin: Pin, is_home: bool) -> bool {
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
    pub(crate) fn lock(&self) -> MutexGuard<'_, State> {
        // A panic under the lock leaves consistent enough state to keep serving.
        self.st.locked()
    }

    pub(crate) fn fault_loop(&self) {
        let mut buf = [sys::UffdMsg::default(); 16];
        loop {
            if self.stopped.load(Ordering::Acquire) {
                return;
            }
            if let Err(e) = sys::poll2(self.uffd.raw(), self.stop_fd.as_raw_fd()) {
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
    pub(crate) fn hold_loop(&self) {
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
    pub(crate) fn release_holds<'a>(
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

    pub(crate) fn on_fault(&self, address: u64, flags: u64, tid: i32) {
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
    pub(crate) fn read_ahead(&self, st: &mut State, page: PageNo, ra: u8) {
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
    pub(crate) fn drain_deferred(&self, st: &mut State, page: PageNo) {
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
    pub(crate) fn needs_quiesce(&self, st: &State, from: NodeId, msg: Msg) -> bool {
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
    pub(crate) fn ask_quiesce(&self, st: &mut State, d: &dyn LocalDerived) {
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
    pub(crate) fn start_quiesce(&self, st: &mut State, page: PageNo) {
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
    pub(crate) fn release_quiesce(&self, st: &mut State) -> Option<std::time::Duration> {
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
    pub(crate) fn deliver(&self, st: &mut State, from: NodeId, msg: Msg, data: Option<&[u8]>) {
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
    pub(crate) fn flush(&self, st: &mut State) {
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
    pub(crate) fn exec(&self, st: &mut State, actions: Vec<Action>) {
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
                        st.stats.count_fault_wait(t.elapsed().as_nanos() as u64);
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
    pub(crate) fn map(&self, st: &mut State, page: PageNo, want: u8) -> bool {
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
    pub(crate) fn fill(&self, addr: u64, wp: bool, hole: bool) -> io::Result<bool> {
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
pub(crate) fn lazy(st: &State, page: PageNo) -> bool {
    st.ra_flags[page as usize] & RA_MARKER != 0 && !st.waiting_since.contains_key(&page)
}

pub(crate) fn retry(mut f: impl FnMut() -> io::Result<()>) -> io::Result<()> {
    let mut tries = 0;
    loop {
        match f() {
            Err(e) if e.raw_os_error() == Some(libc::EAGAIN) && tries < 100 => tries += 1,
            r => return r,
        }
    }
}
