/* testos: the checks that stress the DSM (their loops run at CPL3: user_dsm in user.c). */
#include "kernel.h"

/* ------------------------------------------------------------------------- */
/* DSM-sensitive checks: the loops run at CPL3 (user_dsm in user.c)           */

/* Where a cpu sits in the pairs (k = 2) or groups of four (k = 4) of a check. Members
 * of one group are n / k apart, so with cpus placed on nodes in contiguous blocks a
 * group spans as many nodes as it can. Returns 0 if this cpu is left over. */
static int dsm_group(struct percpu *c, uint32_t k, uint32_t *group, uint32_t *role)
{
    uint32_t groups = ncpus / k;
    if (!groups || c->index >= groups * k)
        return 0;
    *group = c->index % groups;
    *role = c->index / groups;
    return 1;
}

/* The cpu with the given role in this cpu's group. */
static uint32_t dsm_member(uint32_t k, uint32_t group, uint32_t role)
{
    return group + role * (ncpus / k);
}

static void dsm_reset(struct percpu *c)
{
    uint32_t g, r;
    if (c->index == bsp_index) {
        struct dsm_global *d = dsm_global;
        d->ctl.abort = 0;
        d->counter.value = 0;
        d->lock.next = 0;
        d->lock.serving = 0;
        d->rec_a.v = 0;
        d->rec_b.v = 0;
    }
    if (dsm_group(c, 2, &g, &r) && r == 0) {
        struct dsm_pair *p = &dsm_pairs[g];
        p->mp_data.v = p->mp_flag.v = p->mp_ack.v = 0;
        p->sb_x.v = p->sb_y.v = 0;
        p->sb_sync.bar.count = p->sb_sync.bar.sense = 0;
        p->pingpong.seq = 0;
    }
    if (dsm_group(c, 4, &g, &r) && r == 0) {
        struct dsm_quad *q = &dsm_quads[g];
        q->x.v = q->y.v = 0;
        q->sync.len[0] = q->sync.len[1] = q->sync.done[0] = q->sync.done[1] = 0;
        q->seen[0].v[0] = q->seen[0].v[1] = q->seen[1].v[0] = q->seen[1].v[1] = 0;
    }
}

/* Runs one check's user-mode part on this cpu; fails with what went wrong. */
static struct dsm_args *dsm_run(struct percpu *c, const char *name, uint64_t check,
                                uint64_t iters, uint64_t role, uint64_t members, void *group,
                                uint64_t *ms)
{
    struct dsm_args *a = (struct dsm_args *)(c->ublock + DSM_ARGS_OFFSET);
    a->check = check;
    a->role = role;
    a->members = members;
    a->iters = iters;
    a->wait_tsc = ms_to_tsc(DSM_WAIT_MS);
    a->yield_tsc = tsc_khz * DSM_SPIN_US / 1000;
    a->use_ud2 = (uint64_t)use_ud2;
    a->global = (uint64_t)dsm_global;
    a->group = (uint64_t)group;
    a->logs = 0;
    if (check == DSM_IRIW && group)
        a->logs = dsm_iriw_logs + (uint64_t)((struct dsm_quad *)group - dsm_quads) * 2 *
                                      DSM_IRIW_LOG_BYTES(iters);
    a->what = 0;
    uint64_t t0 = rdtsc();
    a->progress_tsc = t0;
    uint64_t err = enter_user((uint64_t)user_dsm, c->ublock + USTACK_SIZE - 8, (uint64_t)a);
    uint64_t t1 = rdtsc();
    sti();
    *ms = tsc_to_us(t1 - t0) / 1000;
    switch (err) {
    case DSM_OK:
        return a;
    case DSM_E_TIMEOUT:
        fail("%s: iteration %lu: no progress for %lu ms waiting for %s (expected %lu, last "
             "saw %lu)",
             name, a->at, DSM_WAIT_MS, a->what ? (const char *)a->what : "?", a->v1, a->v2);
    case DSM_E_ABORT:
        /* The cpu that stopped us reports why; give it time to do so. */
        WAIT_UNTIL(0, 2000);
        fail("%s: stopped at iteration %lu because another cpu of the check failed", name, a->at);
    case DSM_E_ORDER:
        fail("%s: lock xadd %lu returned %lu after %lu: the counter went backwards", name, a->at,
             a->v2, a->v1);
    case DSM_E_TORN:
        fail("%s: acquisition %lu, ticket %lu: inside the lock the record reads a = %lu, "
             "b = %lu, expected both %lu (a lost or torn update)",
             name, a->at, a->v3, a->v1, a->v2, a->v3);
    case DSM_E_MP:
        fail("%s: message %lu: the reader saw flag = %lu but then data = %lu (stale data after "
             "the flag: forbidden by x86-TSO)",
             name, a->at, a->v1, a->v2);
    case DSM_E_SB:
        fail("%s: iteration %lu: with mfence neither cpu saw the other's store (r1 = r2 = 0: "
             "forbidden)",
             name, a->at);
    case DSM_E_IRIW:
        fail("%s: reader cpu %u saw x = %lu then y = %lu, but reader cpu %u saw y = %lu then an "
             "older x (the writes x = %lu and y = %lu became visible in different orders: "
             "forbidden on x86)",
             name, dsm_member(4, c->index % dsm_nquads, 1), a->v1, a->v2,
             dsm_member(4, c->index % dsm_nquads, 3), a->v3, a->v1, a->v3);
    case DSM_E_STALE:
        fail("%s: iteration %lu: a load after the barrier returned %lu, expected %lu or %lu (a "
             "stale value)",
             name, a->at, a->v2, a->v1 - 1, a->v1);
    case DSM_E_SEQ:
        fail("%s: round %lu: expected the value %lu, saw %lu (a skipped or repeated value)", name,
             a->at, a->v1, a->v2);
    default:
        fail("%s: the user-mode part returned %lu (unknown check %lu?)", name, err, check);
    }
}

static void check_counter(struct percpu *c)
{
    uint64_t ms;
    nap_barrier("counter start");
    dsm_run(c, "counter", DSM_COUNTER, iters_counter, c->index, ncpus, 0, &ms);
    nap_barrier("counter done");
    uint64_t v = dsm_global->counter.value, want = ncpus * iters_counter;
    if (v != want)
        fail("counter: the shared counter is %lu after %u cpus x %lu lock xadd, expected %lu", v,
             ncpus, iters_counter, want);
    ok("counter", "%lu lock xadd in %lu ms; counter = %lu = %u cpus x %lu", iters_counter, ms, v,
       ncpus, iters_counter);
}

static void check_spinlock(struct percpu *c)
{
    uint64_t ms;
    nap_barrier("spinlock start");
    dsm_run(c, "spinlock", DSM_SPINLOCK, iters_spinlock, c->index, ncpus, 0, &ms);
    nap_barrier("spinlock done");
    struct dsm_global *g = dsm_global;
    uint64_t want = ncpus * iters_spinlock;
    if (g->rec_a.v != want || g->rec_b.v != want || g->lock.next != want ||
        g->lock.serving != want)
        fail("spinlock: after %u cpus x %lu acquisitions a = %lu, b = %lu, next ticket %lu, now "
             "serving %lu; expected all %lu",
             ncpus, iters_spinlock, g->rec_a.v, g->rec_b.v, g->lock.next, g->lock.serving, want);
    ok("spinlock", "%lu ticket-lock acquisitions in %lu ms, never torn; a = b = %lu",
       iters_spinlock, ms, want);
}

/* Says why this cpu sits out a pair/group check; returns 1 if it does. */
static int dsm_sits_out(struct percpu *c, const char *name, uint32_t k)
{
    if (ncpus < k) {
        if (k == 2)
            ok(name, "skipped: 1 cpu");
        else
            ok(name, "skipped: needs %u cpus", k);
        return 1;
    }
    if (c->index >= ncpus / k * k) {
        ok(name, "idle: cpus are used in groups of %u, %u cpus", k, ncpus);
        return 1;
    }
    return 0;
}

static void check_litmus_mp(struct percpu *c)
{
    uint32_t g = 0, r = 0;
    uint64_t ms;
    int out = dsm_sits_out(c, "litmus-mp", 2);
    for (uint32_t turn = 0; turn < dsm_npairs || turn == 0; turn++) {
        nap_barrier("litmus-mp turn");
        if (out || !dsm_group(c, 2, &g, &r) || g != turn)
            continue;
        dsm_run(c, "litmus-mp", DSM_MP, iters_mp, r, 2, &dsm_pairs[g], &ms);
        uint32_t other = dsm_member(2, g, 1 - r);
        if (r == 0)
            ok("litmus-mp", "writer to cpu %u: %lu messages (data, flag, ack on 3 pages) in %lu "
                            "ms",
               other, iters_mp, ms);
        else
            ok("litmus-mp", "reader from cpu %u: %lu messages, data never stale, in %lu ms",
               other, iters_mp, ms);
    }
    nap_barrier("litmus-mp done");
}

static void check_litmus_sb(struct percpu *c)
{
    uint32_t g = 0, r = 0;
    uint64_t ms;
    int out = dsm_sits_out(c, "litmus-sb", 2);
    for (uint32_t turn = 0; turn < dsm_npairs || turn == 0; turn++) {
        nap_barrier("litmus-sb turn");
        if (out || !dsm_group(c, 2, &g, &r) || g != turn)
            continue;
        struct dsm_args *a = dsm_run(c, "litmus-sb", DSM_SB, iters_sb, r, 2, &dsm_pairs[g], &ms);
        /* stat[r_cpu0 * 2 + r_cpu1]: 1 = saw the other's store of that iteration. */
        ok("litmus-sb", "with cpu %u: %lu iterations in %lu ms; r1/r2 = 0/0: 0 (forbidden), "
                        "0/1: %lu, 1/0: %lu, 1/1: %lu",
           dsm_member(2, g, 1 - r), iters_sb, ms, a->stat[1], a->stat[2], a->stat[3]);
    }
    nap_barrier("litmus-sb done");
}

static void check_litmus_iriw(struct percpu *c)
{
    uint32_t g = 0, r = 0;
    uint64_t ms;
    nap_barrier("litmus-iriw start");
    if (!dsm_sits_out(c, "litmus-iriw", 4)) {
        dsm_group(c, 4, &g, &r);
        struct dsm_args *a =
            dsm_run(c, "litmus-iriw", DSM_IRIW, iters_iriw, r, 4, &dsm_quads[g], &ms);
        uint32_t w0 = dsm_member(4, g, 0), r1 = dsm_member(4, g, 1), w2 = dsm_member(4, g, 2),
                 r3 = dsm_member(4, g, 3);
        if (r == 0 || r == 2)
            ok("litmus-iriw", "writer of %c (writers %u %u, readers %u %u): %lu writes, each "
                              "seen by both readers, in %lu ms",
               r == 0 ? 'x' : 'y', w0, w2, r1, r3, iters_iriw, ms);
        else if (r == 1)
            ok("litmus-iriw", "reader x,y (writers %u %u, readers %u %u): %lu samples, %lu "
                              "distinct, in %lu ms; x ahead of y in %lu, the other reader saw y "
                              "ahead of x in %lu; no two samples disagree on the write order",
               w0, w2, r1, r3, a->stat[0], a->stat[1], ms, a->stat[2], a->stat[3]);
        else
            ok("litmus-iriw", "reader y,x (writers %u %u, readers %u %u): %lu samples, %lu "
                              "distinct, in %lu ms (checked by cpu %u)",
               w0, w2, r1, r3, a->stat[0], a->stat[1], ms, r1);
    }
    nap_barrier("litmus-iriw done");
}

/* Shared memory written by kernel code (CPL0), as a kernel's atomics and spinlocks do:
 * on emulated-kernel hosts these accesses are made by KVM's instruction emulator, not
 * by the CPU, so they take another path to guest memory than the CPL3 checks. Every
 * cpu adds to a counter with lock xadd, then takes a ticket lock (lock xadd on next,
 * spin on serving) around plain increments of a word on the lock's page and of two
 * words on pages of their own. */
#define KSHARED_ITERS 300 /* default; testos.iters.kernel-shared=N */
uint64_t iters_kshared = KSHARED_ITERS;
static struct {
    volatile uint64_t counter;
    volatile uint64_t next, serving, inpage;
} kshared __attribute__((aligned(4096)));
static struct { volatile uint64_t v; } krec_a __attribute__((aligned(4096))),
    krec_b __attribute__((aligned(4096)));

static void check_kernel_shared(struct percpu *c)
{
    nap_barrier("kernel-shared start");
    if (c->index == bsp_index) {
        kshared.counter = kshared.next = kshared.serving = kshared.inpage = 0;
        krec_a.v = krec_b.v = 0;
    }
    nap_barrier("kernel-shared reset");
    uint64_t t0 = rdtsc(), last = 0;
    for (uint64_t i = 0; i < iters_kshared; i++) {
        uint64_t v = __atomic_fetch_add(&kshared.counter, 1, __ATOMIC_SEQ_CST);
        if (i && v <= last)
            fail("kernel-shared: lock xadd returned %lu after %lu", v, last);
        last = v;
    }
    for (uint64_t i = 0; i < iters_kshared; i++) {
        uint64_t t = __atomic_fetch_add(&kshared.next, 1, __ATOMIC_SEQ_CST);
        if (!WAIT_UNTIL(__atomic_load_n(&kshared.serving, __ATOMIC_ACQUIRE) == t, watchdog_ms))
            fail("kernel-shared: ticket %lu never served (serving %lu)", t, kshared.serving);
        uint64_t a = krec_a.v, p = kshared.inpage;
        if (a != t || p != t || krec_b.v != t)
            fail("kernel-shared: inside the lock with ticket %lu: a = %lu, b = %lu, on the lock's "
                 "page %lu (a lost or stale write)",
                 t, a, krec_b.v, p);
        krec_a.v = a + 1;
        kshared.inpage = p + 1;
        krec_b.v = krec_b.v + 1;
        __atomic_store_n(&kshared.serving, t + 1, __ATOMIC_RELEASE);
    }
    nap_barrier("kernel-shared done");
    uint64_t want = (uint64_t)ncpus * iters_kshared;
    if (kshared.counter != want || krec_a.v != want || krec_b.v != want || kshared.inpage != want)
        fail("kernel-shared: counter %lu, a %lu, b %lu, on the lock's page %lu; expected all %lu",
             kshared.counter, krec_a.v, krec_b.v, kshared.inpage, want);
    ok("kernel-shared", "%u lock xadd and %u ticket-lock rounds at cpl0 in %lu ms; all = %lu",
       (unsigned)iters_kshared, (unsigned)iters_kshared, tsc_to_us(rdtsc() - t0) / 1000, want);
}

/* Kernel code reading memory that another node keeps rewriting, while that node
 * interrupts it with IPIs: on emulated-kernel hosts each read is made by KVM's emulator
 * and may wait for the page to arrive; an interrupt (a kick of the vCPU thread) must not
 * turn that wait into a failed access (a spurious #PF or a wrong value). Pairs; the
 * writer fills KSTREAM_PAGES pages with a new value per round and then sends IPIs
 * while the reader checks every word at CPL0. */
#define KSTREAM_PAGES 16
#define KSTREAM_ROUNDS 6 /* default; testos.iters.kernel-stream=N */
uint64_t iters_kstream = KSTREAM_ROUNDS;
static volatile uint64_t kstream[KSTREAM_PAGES][512] __attribute__((aligned(4096)));
static volatile uint32_t kstream_done;

static void check_kernel_stream(struct percpu *c)
{
    uint32_t g = 0, r = 0;
    int out = dsm_sits_out(c, "kernel-stream", 2);
    uint64_t words = 0;
    uint32_t ipis = 0;
    for (uint32_t turn = 0; turn < dsm_npairs || turn == 0; turn++) {
        int mine = !out && dsm_group(c, 2, &g, &r) && g == turn;
        for (uint32_t round = 0; round < iters_kstream; round++) {
            uint64_t want = 0x6b73000000000000ULL | ((uint64_t)turn << 16) | (round + 1);
            nap_barrier("kernel-stream fill");
            if (mine && r == 0) {
                for (int p = 0; p < KSTREAM_PAGES; p++)
                    for (int w = 0; w < 512; w++)
                        kstream[p][w] = want;
                kstream_done = 0;
            }
            nap_barrier("kernel-stream read");
            if (!mine)
                continue;
            if (r == 0) {
                uint32_t other = cpus[dsm_member(2, g, 1)].apic_id;
                while (!__atomic_load_n(&kstream_done, __ATOMIC_ACQUIRE)) {
                    apic_send(other, ICR_FIXED | ICR_ASSERT | VEC_FIXED);
                    ipis++;
                    nap_us(200);
                }
            } else {
                for (int p = 0; p < KSTREAM_PAGES; p++)
                    for (int w = 0; w < 512; w++) {
                        uint64_t v = kstream[p][w];
                        if (v != want)
                            fail("kernel-stream: read 0x%lx at cpl0 from page %d word %d, "
                                 "expected 0x%lx (round %u)",
                                 v, p, w, want, round);
                        words++;
                    }
                __atomic_store_n(&kstream_done, 1, __ATOMIC_RELEASE);
            }
        }
    }
    nap_barrier("kernel-stream done");
    if (!out) {
        if (r == 0)
            ok("kernel-stream", "writer to cpu %u: %u rounds of %u pages, %u IPIs while it read",
               dsm_member(2, g, 1), (unsigned)iters_kstream, KSTREAM_PAGES, ipis);
        else
            ok("kernel-stream", "reader from cpu %u: %lu words at cpl0, all current, under IPIs",
               dsm_member(2, g, 0), words);
    }
}

/* Page tables changed by one cpu must be seen by another after it flushes its TLB, as
 * Linux relies on for every fork (COW), munmap and exit: pairs of cpus (on different
 * nodes when vCPUs are spread) take turns; in each iteration one of them points a
 * user-accessible virtual page at a fresh physical page with a new value, both flush
 * the address (as a TLB shootdown does), and the other reads it from CPL3 (which runs
 * natively on emulated-kernel hosts, through the host's shadow page tables). */
#define PT_VA 0x0000008000000000ULL /* PML4 slot 1 */
#define PT_ITERS 32 /* default (even); testos.iters.pagetable=N */
uint64_t iters_pagetable = PT_ITERS;
static uint64_t pt_pdpt[512] __attribute__((aligned(4096)));
static uint64_t pt_pd[512] __attribute__((aligned(4096)));
static volatile uint64_t pt_pt[512] __attribute__((aligned(4096)));
static volatile uint64_t pt_data[2][512] __attribute__((aligned(4096)));
/* A second address space (its own PML4, as a new process gets): the kernel half shared,
 * slot 1 switching between two page-table subtrees at the PDPT level. */
static volatile uint64_t pt2_pml4[512] __attribute__((aligned(4096)));
static volatile uint64_t pt2_pdpt[512] __attribute__((aligned(4096)));
static volatile uint64_t pt2_pdpt_alt[512] __attribute__((aligned(4096)));
static volatile uint64_t pt2_pd[2][512] __attribute__((aligned(4096)));
static volatile uint64_t pt2_pt[2][512] __attribute__((aligned(4096)));

static void check_pagetable(struct percpu *c)
{
    uint32_t g = 0, r = 0;
    nap_barrier("pagetable start");
    if (c->index == bsp_index) {
        pt_pd[0] = (uint64_t)pt_pt | 7;
        pt_pdpt[0] = (uint64_t)pt_pd | 7;
        pml4[1] = (uint64_t)pt_pdpt | 7;
        pt2_pml4[0] = pml4[0];
        pt2_pml4[1] = (uint64_t)pt2_pdpt | 7;
        pt2_pdpt_alt[0] = (uint64_t)pt2_pd[1] | 7;
        for (int k = 0; k < 2; k++) {
            pt2_pd[k][0] = (uint64_t)pt2_pt[k] | 7;
            pt2_pt[k][0] = (uint64_t)pt_data[k] | 7;
            pt_data[k][0] = 0x7a6e0000000000a0ULL + (uint64_t)k;
        }
    }
    nap_barrier("pagetable set up");
    int out = dsm_sits_out(c, "pagetable", 2);
    uint32_t reads = 0;
    for (uint32_t turn = 0; turn < dsm_npairs || turn == 0; turn++) {
        int mine = !out && dsm_group(c, 2, &g, &r) && g == turn;
        for (uint32_t it = 0; it < iters_pagetable; it++) {
            /* Role 0 writes the page tables in the first half, role 1 in the second: a
             * node that only ever reads a page table must still see its changes. */
            uint32_t writer = it >= iters_pagetable / 2;
            /* Only the page-table entry changes, never the pages it points at: the
             * reader's node learns of the change through the page table alone (as a
             * fork's COW write-protection or a remap is seen). */
            uint64_t want = pt_data[it & 1][0];
            nap_barrier("pagetable map");
            /* it & 4: the second address space, changed at its PDPT; it & 8: changed at
             * its root (a PML4 page reused for another process). */
            int space2 = it & 12;
            if (mine && r == writer) {
                volatile uint64_t *page = pt_data[it & 1];
                if (it & 8) {
                    pt2_pdpt[0] = (uint64_t)pt2_pd[0] | 7;
                    pt2_pml4[1] = (uint64_t)((it & 1) ? pt2_pdpt_alt : pt2_pdpt) | 7;
                } else if (space2) {
                    pt2_pml4[1] = (uint64_t)pt2_pdpt | 7;
                    pt2_pdpt[0] = (uint64_t)pt2_pd[it & 1] | 7;
                } else
                    pt_pt[0] = (uint64_t)page | 7;
            }
            nap_barrier("pagetable flush");
            if (mine) {
                if (it & 2) /* a full flush, as a context switch or a big shootdown does */
                    __asm__ volatile("movq %%cr3, %%rax; movq %%rax, %%cr3" ::: "rax", "memory");
                else
                    __asm__ volatile("invlpg (%0)" ::"r"(PT_VA) : "memory");
                if (r != writer) {
                    uint64_t cr3;
                    __asm__ volatile("movq %%cr3, %0" : "=r"(cr3));
                    if (space2) /* switch to the other address space for this read */
                        __asm__ volatile("movq %0, %%cr3" ::"r"((uint64_t)pt2_pml4) : "memory");
                    uint64_t got = enter_user((uint64_t)user_peek, c->ublock + USTACK_SIZE - 8,
                                              PT_VA);
                    if (space2)
                        __asm__ volatile("movq %0, %%cr3" ::"r"(cr3) : "memory");
                    if (got != want)
                        fail("pagetable: read 0x%lx at 0x%lx from cpl3 after cpu %u mapped it to "
                             "a page holding 0x%lx (iteration %u): a stale translation",
                             got, PT_VA, dsm_member(2, g, writer), want, it);
                    reads++;
                }
            }
        }
    }
    nap_barrier("pagetable done");
    if (c->index == bsp_index)
        pml4[1] = 0;
    if (!out)
        ok("pagetable", "with cpu %u: %u reads from cpl3 through page-table entries the other cpu "
                        "changed, all current",
           dsm_member(2, g, 1 - r), reads);
}

static void check_pingpong(struct percpu *c)
{
    uint32_t g = 0, r = 0;
    uint64_t ms;
    int out = dsm_sits_out(c, "pingpong", 2);
    for (uint32_t turn = 0; turn < dsm_npairs || turn == 0; turn++) {
        nap_barrier("pingpong turn");
        if (out || !dsm_group(c, 2, &g, &r) || g != turn)
            continue;
        dsm_run(c, "pingpong", DSM_PINGPONG, iters_pingpong, r, 2, &dsm_pairs[g], &ms);
        ok("pingpong", "with cpu %u: %lu round trips on one word in %lu ms, saw every value",
           dsm_member(2, g, 1 - r), iters_pingpong, ms);
    }
    nap_barrier("pingpong done");
    uint64_t want = 2 * iters_pingpong;
    if (ncpus >= 2 && dsm_group(c, 2, &g, &r) && dsm_pairs[g].pingpong.seq != want)
        fail("pingpong: the shared word ends at %lu, expected %lu", dsm_pairs[g].pingpong.seq,
             want);
}

/* dma: dvmm's DMA test engine (port DMA_TEST_PORT, on node 0 in a cluster) reads a
 * buffer this cpu just wrote and writes its complement to another, by DMA through the
 * VMM. Each cpu in turn, iters_dma requests of 6000 bytes that cross page boundaries,
 * with a fresh pattern each time: a device that read a stale copy of the source, or whose
 * writes this cpu does not see, fails the checksum or the comparison. */
#define DMA_TEST_PORT 0x520
#define DMA_TEST_ID 0x31414D44u /* "DMA1" */
#define DMA_LEN 6000u
struct dma_desc {
    uint64_t src, dst;
    uint32_t len, status, checksum, reserved;
};
static uint8_t dma_src[8192] __attribute__((aligned(4096)));
static uint8_t dma_dst[8192] __attribute__((aligned(4096)));
static struct dma_desc dma_desc_page[4096 / sizeof(struct dma_desc)] __attribute__((aligned(4096)));

/* The engine's checksum (dvmm_devices::dma_test::checksum), len a multiple of 8. */
static uint32_t dma_checksum(const volatile uint64_t *p, uint32_t len)
{
    uint64_t h = 0xcbf29ce484222325ULL;
    for (uint32_t i = 0; i < len / 8; i++)
        h = (((h << 5) | (h >> 59)) ^ p[i]) * 0x100000001b3ULL;
    return (uint32_t)(h ^ (h >> 32));
}

static void check_dma(struct percpu *c)
{
    if (inl(DMA_TEST_PORT + 0xC) != DMA_TEST_ID) {
        ok("dma", "skipped: no dvmm DMA test engine at port 0x%x", DMA_TEST_PORT);
        return;
    }
    /* 8-byte aligned, each crossing a page boundary; word-wise work keeps this cpu's
     * (possibly emulated) kernel code short. */
    volatile uint64_t *src = (volatile uint64_t *)(dma_src + 96),
                      *dst = (volatile uint64_t *)(dma_dst + 1000);
    volatile struct dma_desc *d = &dma_desc_page[1];
    for (uint32_t turn = 0; turn < ncpus; turn++) {
        nap_barrier("dma turn");
        if (turn != c->index)
            continue;
        uint64_t t0 = rdtsc();
        for (uint64_t k = 0; k < iters_dma; k++) {
            uint64_t x = 0x9E3779B97F4A7C15ULL * (c->index + 1) + k * 0xD1B54A32D192ED03ULL;
            for (uint32_t i = 0; i < DMA_LEN / 8; i++) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                src[i] = x;
                dst[i] = x; /* anything but the answer */
            }
            d->src = (uint64_t)src;
            d->dst = (uint64_t)dst;
            d->len = DMA_LEN;
            d->checksum = 0;
            d->status = 0;
            __atomic_thread_fence(__ATOMIC_SEQ_CST);
            outl(DMA_TEST_PORT + 0, (uint32_t)(uint64_t)d);
            outl(DMA_TEST_PORT + 4, (uint32_t)((uint64_t)d >> 32));
            outl(DMA_TEST_PORT + 8, 1);
            uint64_t end = rdtsc() + ms_to_tsc(watchdog_ms);
            while (__atomic_load_n(&d->status, __ATOMIC_ACQUIRE) == 0) {
                if (rdtsc() > end)
                    fail("dma: request %lu never completed (register status %u)", k,
                         inl(DMA_TEST_PORT + 8));
                check_failed();
                nap_us(DSM_NAP_US);
            }
            uint32_t reg = inl(DMA_TEST_PORT + 8);
            if (d->status != 1 || reg != 2)
                fail("dma: request %lu failed: descriptor status %u, register status %u", k,
                     d->status, reg);
            uint32_t want = dma_checksum(src, DMA_LEN);
            if (d->checksum != want)
                fail("dma: request %lu: the device read other bytes than this cpu wrote "
                     "(checksum 0x%x, expected 0x%x)",
                     k, d->checksum, want);
            for (uint32_t i = 0; i < DMA_LEN / 8; i++) {
                uint64_t expect = ~src[i], got = dst[i];
                if (got != expect)
                    fail("dma: request %lu: word %u of the destination is 0x%lx, expected 0x%lx",
                         k, i, got, expect);
            }
        }
        ok("dma", "%lu requests of %u bytes across pages in %lu ms: device read this cpu's "
                  "data, this cpu saw the device's writes",
           iters_dma, DMA_LEN, tsc_to_us(rdtsc() - t0) / 1000);
    }
    nap_barrier("dma done");
}

static void check_dsm(struct percpu *c)
{
    nap_barrier("dsm reset");
    dsm_reset(c);
    check_counter(c);
    check_spinlock(c);
    check_litmus_mp(c);
    check_litmus_sb(c);
    check_litmus_iriw(c);
    check_pingpong(c);
    check_kernel_shared(c);
    check_kernel_stream(c);
    check_pagetable(c);
    check_dma(c);
}

void run_checks(struct percpu *c)
{
    sti();
    barrier("checks start");
    check_ipi_fixed(c);
    check_ipi_broadcast(c);
    check_nmi(c);
    nap_barrier("timer-periodic start");
    check_timer_periodic(c);
    nap_barrier("timer-oneshot start");
    check_timer_oneshot(c);
    nap_barrier("timer-tsc-deadline start");
    check_timer_tsc_deadline(c);
    check_tsc_sync(c);
    check_ioapic_uart(c);
    check_int3(c);
    check_user(c);
    check_syscall(c);
    check_dsm(c);
    barrier("checks done");
    if (c->spurious_cnt)
        say("cpu %u: note: %u spurious interrupts", c->index, c->spurious_cnt);
    barrier("end");
}
