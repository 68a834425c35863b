/*
 * testos: the CPL3 workload. Linked into its own user-accessible 2 MiB page; it may
 * not call kernel code or touch kernel data, and it never executes in/out.
 */
#include "testos.h"

static inline uint64_t user_rdtsc(void)
{
    uint32_t lo, hi;
    __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
    return ((uint64_t)hi << 32) | lo;
}

/* Back to the kernel: enter_user() returns result. Every CPL3 workload leaves here. */
static __attribute__((noinline, noreturn)) void user_exit(uint64_t result, uint64_t use_ud2)
{
    if (use_ud2)
        __asm__ volatile(".globl user_exit_ud2\nuser_exit_ud2: ud2" ::"D"(result) : "memory");
    else
        __asm__ volatile("syscall" ::"a"(SYS_EXIT), "D"(result) : "rcx", "r11", "memory");
    for (;;)
        __asm__ volatile("pause");
}

/* Counts the primes below limit with a sieve over odd numbers (bit i stands for 2i+1). */
static uint64_t sieve(uint64_t *bits, uint64_t limit)
{
    uint64_t n = limit / 2; /* odd numbers 1, 3, ..., below limit */
    uint64_t words = n / 64 + 1;
    for (uint64_t w = 0; w < words; w++) {
        __asm__ volatile("" ::: "memory"); /* keep this a loop, not a call to memset */
        bits[w] = 0;
    }
    for (uint64_t i = 1; (2 * i + 1) * (2 * i + 1) < limit; i++) {
        if (bits[i / 64] & (1ULL << (i % 64)))
            continue;
        uint64_t p = 2 * i + 1;
        for (uint64_t j = (p * p) / 2; j < n; j += p)
            bits[j / 64] |= 1ULL << (j % 64);
    }
    uint64_t count = limit > 2 ? 1 : 0; /* the prime 2 */
    for (uint64_t i = 1; i < n; i++)
        if (!(bits[i / 64] & (1ULL << (i % 64))))
            count++;
    return count;
}

void user_main(struct user_args *args)
{
    uint64_t start = user_rdtsc();
    uint64_t result = 0, rounds = 0;
    do {
        uint64_t c = sieve((uint64_t *)args->bitmap, args->limit);
        if (rounds == 0)
            result = c;
        else if (c != result)
            result = ~0ULL; /* nondeterministic results: report garbage */
        rounds++;
    } while (user_rdtsc() - start < args->min_tsc && rounds < args->max_rounds);
    args->rounds = rounds;
    user_exit(result, args->use_ud2);
}

/* ------------------------------------------------------------------------- */
/* DSM-sensitive checks (user mode: runs natively on our hosts)               */

static inline uint64_t xadd64(volatile uint64_t *p, uint64_t v)
{
    __asm__ volatile("lock xaddq %0, %1" : "+r"(v), "+m"(*p)::"memory");
    return v;
}
static inline void mfence(void) { __asm__ volatile("mfence" ::: "memory"); }
static inline void lfence(void) { __asm__ volatile("lfence" ::: "memory"); }
static inline void relax(void) { __asm__ volatile("pause" ::: "memory"); }
static inline void compiler_barrier(void) { __asm__ volatile("" ::: "memory"); }

static uint64_t report(struct dsm_args *a, uint64_t err, uint64_t at, uint64_t v1, uint64_t v2,
                       uint64_t v3)
{
    a->at = at;
    a->v1 = v1;
    a->v2 = v2;
    a->v3 = v3;
    if (err != DSM_E_ABORT)
        ((struct dsm_global *)a->global)->ctl.abort = 1;
    return err;
}

/* Asks the kernel to halt this cpu briefly, so that on an oversubscribed host the cpu we
 * wait for gets our host cpu. */
static __attribute__((noinline)) void user_yield(void)
{
    __asm__ volatile(".globl user_yield_ud2\nuser_yield_ud2: ud2" ::: "memory");
}

/* Called on every spin of a wait (every 64 spins it looks at the clock): yields after
 * yield_tsc, gives up after wait_tsc without progress or as soon as another cpu aborted. */
struct waiter {
    uint64_t t0, last_yield;
    uint32_t spins;
};
static int wait_over(struct dsm_args *a, struct waiter *w)
{
    relax();
    if (++w->spins & 63)
        return 0;
    uint64_t now = user_rdtsc();
    if (!w->t0) { /* a new wait: the one before it made progress */
        w->t0 = w->last_yield = now;
        a->progress_tsc = now;
    }
    if (((struct dsm_global *)a->global)->ctl.abort)
        return DSM_E_ABORT;
    if (now - w->t0 > a->wait_tsc)
        return DSM_E_TIMEOUT;
    if (a->yield_tsc && now - w->last_yield > a->yield_tsc) {
        user_yield();
        w->last_yield = user_rdtsc();
    }
    return 0;
}

/* Spins until cond; on timeout/abort returns from the calling function. */
#define WAIT_FOR(a, cond, name, at, expect, seen)                                                  \
    do {                                                                                           \
        struct waiter w_ = {0, 0, 0};                                                                 \
        while (!(cond)) {                                                                          \
            int e_ = wait_over(a, &w_);                                                            \
            if (e_) {                                                                              \
                (a)->what = (uint64_t)(name);                                                      \
                return report(a, e_, at, expect, seen, 0);                                         \
            }                                                                                      \
        }                                                                                          \
    } while (0)

static uint64_t spin_barrier(struct dsm_args *a, struct spin_barrier *b, uint64_t *sense,
                             uint64_t at)
{
    uint64_t s = *sense ^ 1;
    *sense = s;
    if (xadd64(&b->count, 1) == a->members - 1) {
        b->count = 0; /* seen before the sense flip (TSO keeps the two stores in order) */
        b->sense = s;
        return 0;
    }
    WAIT_FOR(a, b->sense == s, "the other cpus at the per-iteration barrier", at, s, b->sense);
    return 0;
}

/* counter: lock xadd +1 on one shared word; each cpu's own view must only grow. */
static uint64_t dsm_counter(struct dsm_args *a)
{
    struct dsm_global *g = (struct dsm_global *)a->global;
    uint64_t prev = 0;
    for (uint64_t i = 0; i < a->iters; i++) {
        uint64_t old = xadd64(&g->counter.value, 1);
        if (i && old <= prev)
            return report(a, DSM_E_ORDER, i, prev, old, 0);
        prev = old;
    }
    a->stat[0] = prev + 1;
    return 0;
}

/* spinlock: a ticket lock around a non-atomic two-word update. With ticket t, exactly t
 * critical sections came before, so the record must read a == b == t. */
static uint64_t dsm_spinlock(struct dsm_args *a)
{
    struct dsm_global *g = (struct dsm_global *)a->global;
    for (uint64_t i = 0; i < a->iters; i++) {
        uint64_t t = xadd64(&g->lock.next, 1);
        WAIT_FOR(a, g->lock.serving == t, "the spinlock (now_serving to reach my ticket)", i, t,
                 g->lock.serving);
        uint64_t ra = g->rec_a.v, rb = g->rec_b.v;
        if (ra != t || rb != t)
            return report(a, DSM_E_TORN, i, ra, rb, t);
        g->rec_a.v = ra + 1;
        for (int d = 0; d < 32; d++) /* widen the window in which a == b + 1 */
            compiler_barrier();
        g->rec_b.v = rb + 1;
        compiler_barrier();
        g->lock.serving = t + 1; /* release: a plain store suffices on x86 */
    }
    return 0;
}

/* litmus-mp: role 0 writes data = i then flag = i (separate pages) and waits for the
 * reader's ack; role 1 waits for flag == i, then data must be i (a stale data value is
 * forbidden by x86-TSO). */
static uint64_t dsm_mp(struct dsm_args *a)
{
    struct dsm_pair *p = (struct dsm_pair *)a->group;
    for (uint64_t i = 1; i <= a->iters; i++) {
        if (a->role == 0) {
            WAIT_FOR(a, p->mp_ack.v == i - 1, "the reader's ack", i, i - 1, p->mp_ack.v);
            p->mp_data.v = i;
            p->mp_flag.v = i;
        } else {
            uint64_t f;
            WAIT_FOR(a, (f = p->mp_flag.v) != i - 1, "the writer's flag", i, i, f);
            if (f != i)
                return report(a, DSM_E_SEQ, i, i, f, 0);
            uint64_t d = p->mp_data.v;
            if (d != i)
                return report(a, DSM_E_MP, i, f, d, 0);
            p->mp_ack.v = i;
        }
    }
    return 0;
}

/* litmus-sb with mfence: role 0: x = i; mfence; r = y. role 1: y = i; mfence; r = x.
 * "Neither saw the other's store of this iteration" is forbidden. Stores are the
 * iteration number, so a value from an older iteration reads as 0. */
static uint64_t dsm_sb(struct dsm_args *a)
{
    struct dsm_pair *p = (struct dsm_pair *)a->group;
    volatile uint64_t *mine = a->role == 0 ? &p->sb_x.v : &p->sb_y.v;
    volatile uint64_t *other = a->role == 0 ? &p->sb_y.v : &p->sb_x.v;
    uint64_t sense = 0, e;
    for (uint64_t i = 1; i <= a->iters + 1; i++) {
        if ((e = spin_barrier(a, &p->sb_sync.bar, &sense, i)))
            return e;
        if (i > 1) {
            uint64_t k = (i - 1) & 1;
            uint64_t r0 = p->sb_sync.res[0][k], r1 = p->sb_sync.res[1][k];
            if (!r0 && !r1)
                return report(a, DSM_E_SB, i - 1, i - 1, 0, 0);
            a->stat[r0 * 2 + r1]++;
        }
        if (i > a->iters)
            break;
        *mine = i;
        mfence();
        uint64_t r = *other;
        if (r + 1 < i || r > i) /* the barrier orders the previous iteration's store */
            return report(a, DSM_E_STALE, i, i, r, 0);
        p->sb_sync.res[a->role][i & 1] = r == i;
    }
    return 0;
}

/* litmus-iriw: role 0 writes x = 1..iters, role 2 writes y = 1..iters; a writer writes
 * value i once both readers have seen i - 1 (so every write is observed: iters
 * iterations per writer), the two writers are not synchronized with each other.
 * Role 1 samples (x then y), role 3 (y then x), each logging every new pair it sees,
 * until both writers are done; then role 1 looks for the forbidden pair of samples:
 * reader 1 saw (x = a, y = b), reader 2 saw (y = c, x = d) with c > b and d < a, i.e.
 * reader 1 saw the write x = a before y = c, and reader 2 saw them the other way round.
 * That is a cycle for multi-copy-atomic x86 whenever the two samples were taken. */
static uint64_t dsm_iriw(struct dsm_args *a)
{
    struct dsm_quad *q = (struct dsm_quad *)a->group;
    uint64_t n = a->iters;
    if (a->role == 0 || a->role == 2) {
        uint64_t w = a->role == 0 ? 0 : 1;
        volatile uint64_t *v = w == 0 ? &q->x.v : &q->y.v;
        for (uint64_t i = 1; i <= n; i++) {
            WAIT_FOR(a, q->seen[0].v[w] >= i - 1 && q->seen[1].v[w] >= i - 1,
                     "both readers to see my previous write", i, i - 1,
                     q->seen[0].v[w] < q->seen[1].v[w] ? q->seen[0].v[w] : q->seen[1].v[w]);
            *v = i;
        }
        return 0;
    }
    uint64_t me = a->role == 1 ? 0 : 1;
    uint64_t log_entries = DSM_IRIW_LOG_BYTES(n) / sizeof(struct iriw_sample);
    struct iriw_sample *log =
        (struct iriw_sample *)(a->logs + me * DSM_IRIW_LOG_BYTES(n));
    volatile uint64_t *first = me == 0 ? &q->x.v : &q->y.v;
    volatile uint64_t *second = me == 0 ? &q->y.v : &q->x.v;
    uint64_t len = 0, pf = 0, ps = 0, samples = 0;
    struct waiter w = {0, 0, 0};
    for (;;) {
        uint64_t f = *first;
        lfence();
        uint64_t s = *second;
        samples++;
        if (f < pf || s < ps || f > n || s > n) /* a location read went backwards */
            return report(a, DSM_E_STALE, samples, pf, f < pf ? f : s, 0);
        if (len == 0 || f != pf || s != ps) {
            if (len >= log_entries)
                return report(a, DSM_E_SEQ, samples, log_entries, len, 0);
            log[len].first = (uint32_t)f;
            log[len].second = (uint32_t)s;
            len++;
            /* Tell the writers (x is "first" for reader 0, "second" for reader 1). */
            if (q->seen[me].v[me] != f)
                q->seen[me].v[me] = f;
            if (q->seen[me].v[1 - me] != s)
                q->seen[me].v[1 - me] = s;
            w.t0 = 0; /* progress */
            if (f == n && s == n)
                break;
        } else {
            int e = wait_over(a, &w);
            if (e) {
                a->what = (uint64_t) "the writers (x and y to reach iters)";
                return report(a, e, samples, n, f < s ? f : s, 0);
            }
        }
        pf = f;
        ps = s;
    }
    q->sync.len[me] = len;
    q->sync.done[me] = 1;
    a->stat[0] = samples;
    a->stat[1] = len;
    if (me == 1)
        return 0;
    WAIT_FOR(a, q->sync.done[1], "reader 2 to finish", samples, 1, q->sync.done[1]);
    /* Reader 2's log: (c, d) = (y, x), both non-decreasing (checked as it was taken). */
    const struct iriw_sample *other =
        (const struct iriw_sample *)(a->logs + DSM_IRIW_LOG_BYTES(n));
    uint64_t olen = q->sync.len[1], j = 0;
    for (uint64_t i = 0; i < len; i++) {
        uint64_t xa = log[i].first, yb = log[i].second;
        while (j + 1 < olen && other[j + 1].second < xa)
            j++;
        if (olen && other[j].second < xa && other[j].first > yb) {
            return report(a, DSM_E_IRIW, i, xa, yb, other[j].first);
        }
        /* Count samples where this reader saw x ahead of y and the other y ahead of x. */
        a->stat[2] += xa > yb;
    }
    for (uint64_t k = 0; k < olen; k++)
        a->stat[3] += other[k].first > other[k].second;
    return 0;
}

/* pingpong: both cpus write one word; role r expects 2k + r, writes 2k + r + 1. Any
 * other value than the expected one (or its own last) is a skipped or repeated value. */
static uint64_t dsm_pingpong(struct dsm_args *a)
{
    struct dsm_pair *p = (struct dsm_pair *)a->group;
    for (uint64_t k = 0; k < a->iters; k++) {
        uint64_t expect = 2 * k + a->role, v;
        WAIT_FOR(a, (v = p->pingpong.seq) != expect - 1, "the other cpu's value", k, expect, v);
        if (v != expect)
            return report(a, DSM_E_SEQ, k, expect, v, 0);
        p->pingpong.seq = expect + 1;
    }
    return 0;
}

void user_dsm(struct dsm_args *a)
{
    uint64_t r;
    for (int i = 0; i < 8; i++)
        a->stat[i] = 0;
    switch (a->check) {
    case DSM_COUNTER:
        r = dsm_counter(a);
        break;
    case DSM_SPINLOCK:
        r = dsm_spinlock(a);
        break;
    case DSM_MP:
        r = dsm_mp(a);
        break;
    case DSM_SB:
        r = dsm_sb(a);
        break;
    case DSM_IRIW:
        r = dsm_iriw(a);
        break;
    case DSM_PINGPONG:
        r = dsm_pingpong(a);
        break;
    default:
        r = DSM_E_BADCHECK;
        break;
    }
    user_exit(r, a->use_ud2);
}

/* The syscall check's user part (see check_syscall in kernel.c). */
void user_syscalls(struct sys_args *a)
{
    uint64_t t0 = user_rdtsc();
    for (uint64_t i = 0; i < a->rounds; i++) {
        uint64_t rax = SYS_ECHO, ss, cs, fl;
        register uint64_t r8 __asm__("r8");
        register uint64_t r9 __asm__("r9");
        register uint64_t r10 __asm__("r10");
        __asm__ volatile("syscall"
                         : "+a"(rax), "=r"(r8), "=r"(r9), "=r"(r10)
                         : "D"(i)
                         : "rcx", "rdx", "r11", "memory");
        ss = r8 & 0xffff;
        cs = r9 & 0xffff;
        fl = r10;
        if (rax != i + 1 || ss != a->kss || cs != a->kcs || (fl & 0x200)) {
            a->echo_bad++;
            a->last_bad_rax = rax;
            a->last_bad_ss = ss;
            a->last_bad_cs = cs;
            a->last_bad_flags = fl;
        }
    }
    a->tsc = user_rdtsc() - t0;
    for (uint64_t i = 0; i < 3; i++) {
        uint64_t rax;
        __asm__ volatile("int $0x80" : "=a"(rax) : "D"(i) : "memory");
        if (rax != i + 0x80)
            a->int80_bad++;
    }
    if (a->spoof) {
        /* Jump to LSTAR as user code: must fault in user mode (IF stays set). The kernel's
         * #PF handler resumes at user_spoof_back (our RCX). */
        __asm__ volatile("leaq user_spoof_back(%%rip), %%rcx\n\t"
                         "movq $0x202, %%r11\n\t"
                         "movq $0x5f00f, %%rax\n\t"
                         "jmp *%0\n\t"
                         ".globl user_spoof_back\n"
                         "user_spoof_back:"
                         :
                         : "r"(a->lstar)
                         : "rax", "rcx", "r11", "memory");
    }
    user_exit(0, 0);
}

/* Reads one word through a virtual address the kernel maps for us (pagetable check). */
void user_peek(volatile uint64_t *p)
{
    user_exit(*p, 0);
}
