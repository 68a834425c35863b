/* testos: checks of interrupts, timers, clocks, user mode and system calls. */
#include "kernel.h"

/* ------------------------------------------------------------------------- */
/* Checks                                                                     */

void ok(const char *check, const char *fmt, ...)
{
    char detail[256];
    struct buf b = {detail, sizeof detail, 0};
    va_list ap;
    va_start(ap, fmt);
    vfmt(&b, fmt, ap);
    va_end(ap);
    say("cpu %u: %s ok (%s)", this_cpu()->index, check, detail);
    this_cpu()->progress_tsc = rdtsc();
}

void check_ipi_fixed(struct percpu *c)
{
    uint32_t next = (c->index + 1) % ncpus, prev = (c->index + ncpus - 1) % ncpus;
    barrier("ipi-fixed start");
    apic_send(cpus[next].apic_id, ICR_FIXED | ICR_ASSERT | VEC_FIXED);
    if (!WAIT_UNTIL(c->fixed_cnt >= 1, IRQ_TIMEOUT_MS))
        fail("ipi-fixed: no interrupt from cpu %u within %u ms", prev, (unsigned)IRQ_TIMEOUT_MS);
    barrier("ipi-fixed sent");
    uint32_t expect = fail_requested && c->index == ncpus - 1 ? 2 : 1;
    if (c->fixed_cnt != expect)
        fail("ipi-fixed: received %u interrupts, expected %u%s", c->fixed_cnt, expect,
             expect == 2 ? " (deliberate failure: testos.fail)" : "");
    ok("ipi-fixed", "1 interrupt from cpu %u", prev);
    barrier("ipi-fixed done");
}

void check_ipi_broadcast(struct percpu *c)
{
    int bsp = c->index == bsp_index;
    barrier("ipi-broadcast start");
    if (bsp)
        apic_send(0, ICR_FIXED | ICR_ASSERT | ICR_ALL_BUT_SELF | VEC_BCAST);
    else if (!WAIT_UNTIL(c->bcast_cnt >= 1, IRQ_TIMEOUT_MS))
        fail("ipi-broadcast: no interrupt from the bsp within %u ms", (unsigned)IRQ_TIMEOUT_MS);
    barrier("ipi-broadcast sent");
    if (c->bcast_cnt != (bsp ? 0u : 1u))
        fail("ipi-broadcast: received %u interrupts, expected %u", c->bcast_cnt, bsp ? 0 : 1);
    if (bsp)
        ok("ipi-broadcast", "sent all-but-self, received 0");
    else
        ok("ipi-broadcast", "1 interrupt from the bsp");

    apic_send(0, ICR_FIXED | ICR_ASSERT | ICR_SELF | VEC_SELF);
    if (!WAIT_UNTIL(c->self_cnt >= 1, IRQ_TIMEOUT_MS))
        fail("ipi-self: no self interrupt within %u ms", (unsigned)IRQ_TIMEOUT_MS);
    barrier("ipi-self sent");
    if (c->self_cnt != 1)
        fail("ipi-self: received %u interrupts, expected 1", c->self_cnt);
    ok("ipi-self", "1 interrupt");
    barrier("ipi-self done");
}

void check_nmi(struct percpu *c)
{
    int bsp = c->index == bsp_index;
    uint32_t sender = ncpus > 1 ? (bsp_index + 1) % ncpus : bsp_index;
    barrier("nmi start");
    if (bsp) {
        for (uint32_t i = 0; i < ncpus; i++)
            if (i != bsp_index)
                apic_send(cpus[i].apic_id, ICR_NMI | ICR_ASSERT);
    } else if (!WAIT_UNTIL(c->nmi_cnt >= 1, IRQ_TIMEOUT_MS)) {
        fail("nmi: no NMI from the bsp within %u ms", (unsigned)IRQ_TIMEOUT_MS);
    }
    barrier("nmi to aps");
    if (c->index == sender)
        apic_send(cpus[bsp_index].apic_id, ICR_NMI | ICR_ASSERT);
    if (bsp && !WAIT_UNTIL(c->nmi_cnt >= 1, IRQ_TIMEOUT_MS))
        fail("nmi: no NMI from cpu %u within %u ms", sender, (unsigned)IRQ_TIMEOUT_MS);
    barrier("nmi to bsp");
    if (c->nmi_cnt != 1)
        fail("nmi: received %u NMIs, expected 1", c->nmi_cnt);
    if (bsp)
        ok("nmi", "1 NMI from cpu %u", sender);
    else
        ok("nmi", "1 NMI from the bsp");
    barrier("nmi done");
}

static void timer_reset(struct percpu *c)
{
    c->timer_cnt = 0;
    c->timer_user_cnt = 0;
    c->timer_first_tsc = 0;
    c->timer_ngaps = 0;
}

static void timer_stop(void)
{
    apic_write(APIC_LVT_TIMER, LVT_MASKED | VEC_TIMER);
    apic_write(APIC_TIMER_ICR, 0);
}

/* Starts the LAPIC timer in periodic mode at 100 Hz with divide-by-16. */
static uint32_t timer_start_100hz(void)
{
    uint64_t count = lapic_khz * 1000 / 16 / 100;
    if (count == 0 || count > 0xFFFFFFFFULL)
        fail("timer: LAPIC timer frequency %lu kHz is out of range", lapic_khz);
    apic_write(APIC_TIMER_DCR, 0x3); /* divide by 16 */
    apic_write(APIC_LVT_TIMER, LVT_PERIODIC | VEC_TIMER);
    apic_write(APIC_TIMER_ICR, (uint32_t)count);
    return (uint32_t)count;
}

void check_timer_periodic(struct percpu *c)
{
    timer_reset(c);
    uint64_t t0 = rdtsc();
    uint32_t count = timer_start_100hz();
    /* Spin for the first tick so a dead timer cannot hang us in hlt. */
    if (!WAIT_UNTIL(c->timer_cnt >= 1, 1000)) {
        uint32_t ccr = apic_read(APIC_TIMER_CCR);
        timer_stop();
        fail("timer-periodic: no tick within 1 s (current count %u of %u)", ccr, count);
    }
    uint64_t end = t0 + ms_to_tsc(300);
    for (;;) {
        cli();
        if (rdtsc() >= end)
            break;
        __asm__ volatile("sti; hlt" ::: "memory");
        check_failed();
    }
    uint64_t t1 = rdtsc();
    uint32_t ticks = c->timer_cnt;
    timer_stop();
    sti();
    uint64_t us = tsc_to_us(t1 - t0);
    /* The rate is judged by the median interval between ticks: a host that does not run
     * this vCPU for a while (8 vCPUs on 2 host cpus) loses ticks, as a real LAPIC does
     * when interrupts stay masked, but cannot move the median; a timer programmed at the
     * wrong rate moves every interval. */
    uint32_t n = c->timer_ngaps;
    if (n < 3)
        fail("timer-periodic: only %u ticks in %lu us", ticks, us);
    uint64_t *g = c->timer_gaps;
    for (uint32_t i = 1; i < n; i++)
        for (uint32_t j = i; j > 0 && g[j - 1] > g[j]; j--) {
            uint64_t t = g[j];
            g[j] = g[j - 1];
            g[j - 1] = t;
        }
    uint64_t median_us = tsc_to_us(g[n / 2]);
    uint64_t hz10 = median_us ? 10000000ULL / median_us : 0;
    if (hz10 < 750 || hz10 > 1250)
        fail("timer-periodic: median interval %lu us = %lu.%lu Hz over %u ticks in %lu us, "
             "expected 100 Hz +-25%%",
             median_us, hz10 / 10, hz10 % 10, ticks, us);
    ok("timer-periodic", "%lu.%lu Hz (median of %u intervals), %u ticks in %lu ms, divide 16, "
                         "initial count %u",
       hz10 / 10, hz10 % 10, n, ticks, us / 1000, count);
}

void check_timer_oneshot(struct percpu *c)
{
    uint64_t count = lapic_khz * 10; /* 10 ms at divide-by-1 */
    if (count == 0 || count > 0xFFFFFFFFULL)
        fail("timer-oneshot: LAPIC timer frequency %lu kHz is out of range", lapic_khz);
    timer_reset(c);
    apic_write(APIC_TIMER_DCR, 0xB); /* divide by 1 */
    apic_write(APIC_LVT_TIMER, VEC_TIMER);
    uint64_t t0 = rdtsc();
    apic_write(APIC_TIMER_ICR, (uint32_t)count);
    if (!WAIT_UNTIL(c->timer_cnt >= 1, 1000)) {
        uint32_t ccr = apic_read(APIC_TIMER_CCR);
        timer_stop();
        fail("timer-oneshot: did not fire within 1 s (current count %u of %lu)", ccr, count);
    }
    uint64_t fired = c->timer_first_tsc;
    delay_us(30000); /* a one-shot timer must not fire again */
    uint32_t n = c->timer_cnt;
    timer_stop();
    uint64_t us = tsc_to_us(fired - t0);
    if (n != 1)
        fail("timer-oneshot: fired %u times, expected once", n);
    if (us < 7500)
        fail("timer-oneshot: fired after %lu us, before its 10 ms", us);
    ok("timer-oneshot", "fired once after %lu.%03lu ms, armed for 10 ms", us / 1000, us % 1000);
}

/* tsc-sync: every cpu's TSC and kvmclock agree with the bsp's. The bsp and each other
 * cpu in turn pass readings back and forth through one shared slot: a reading seen by
 * the other cpu must not be later than that cpu's own clock after it saw it (the nodes
 * of a cluster are separate hosts whose clocks dvmm puts in step when they join). A
 * backwards step up to testos.tsc-warp-us (default 1000) is tolerated: the bound of
 * dvmm's measurement across hosts. kvmclock is what Linux keeps time with. */
#define TSC_SYNC_ROUNDS 8
#define MSR_KVM_SYSTEM_TIME_NEW 0x4b564d01u
#define KVM_FEATURE_CLOCKSOURCE2 (1u << 3)
static struct {
    volatile uint64_t seq, tsc, kvmclock;
} tsc_slot __attribute__((aligned(4096)));

static uint64_t kvmclock_ns(const struct pvclock *p)
{
    uint32_t v;
    uint64_t ns;
    do {
        v = p->version;
        __atomic_thread_fence(__ATOMIC_ACQUIRE);
        uint64_t delta = rdtsc() - p->tsc_timestamp;
        if (p->shift < 0)
            delta >>= -p->shift;
        else
            delta <<= p->shift;
        ns = p->system_time + (uint64_t)(((unsigned __int128)delta * p->mul) >> 32);
        __atomic_thread_fence(__ATOMIC_ACQUIRE);
    } while ((v & 1) || v != p->version);
    return ns;
}

void check_tsc_sync(struct percpu *c)
{
    uint64_t tol = cmdline_u64("testos.tsc-warp-us", 1000) * tsc_khz / 1000;
    uint32_t a, b, cx, d;
    cpuid(0x40000001, &a, &b, &cx, &d);
    int kvmclock = (a & KVM_FEATURE_CLOCKSOURCE2) != 0;
    struct pvclock *pv = &c->pvclock;
    if (kvmclock) {
        wrmsr(MSR_KVM_SYSTEM_TIME_NEW, (uint64_t)(uintptr_t)pv | 1);
        if (!WAIT_UNTIL(pv->version != 0 && pv->mul != 0, 1000))
            fail("tsc-sync: kvmclock enabled, but KVM never filled in its time");
    }
    int64_t worst = 0, worst_ns = 0;
    uint32_t worst_with = 0, worst_ns_with = 0;
    for (uint32_t turn = 0; turn < ncpus; turn++) {
        nap_barrier("tsc-sync turn");
        if (turn == bsp_index || (c->index != bsp_index && c->index != turn))
            continue;
        uint32_t other = c->index == bsp_index ? turn : bsp_index;
        /* Each turn counts from its own base, which the bsp sets: a value the previous
         * turn never reached. Step st is written by the bsp when st is even. */
        uint64_t base = (uint64_t)turn << 32;
        if (c->index == bsp_index)
            __atomic_store_n(&tsc_slot.seq, base, __ATOMIC_RELEASE);
        for (uint64_t st = 0; st < 2 * TSC_SYNC_ROUNDS; st++) {
            int mine = (st % 2 == 0) == (c->index == bsp_index);
            uint64_t want = base + st + (mine ? 0 : 1);
            if (!WAIT_UNTIL(__atomic_load_n(&tsc_slot.seq, __ATOMIC_ACQUIRE) == want,
                            watchdog_ms))
                fail("tsc-sync: cpu %u did not answer within %lu s", other, watchdog_ms / 1000);
            if (mine) {
                tsc_slot.kvmclock = kvmclock ? kvmclock_ns(pv) : 0;
                tsc_slot.tsc = rdtsc();
                __atomic_store_n(&tsc_slot.seq, base + st + 1, __ATOMIC_RELEASE);
                continue;
            }
            int64_t warp = (int64_t)(tsc_slot.tsc - rdtsc());
            int64_t warp_ns = kvmclock ? (int64_t)(tsc_slot.kvmclock - kvmclock_ns(pv)) : 0;
            if (warp > worst) {
                worst = warp;
                worst_with = other;
            }
            if (warp_ns > worst_ns) {
                worst_ns = warp_ns;
                worst_ns_with = other;
            }
        }
    }
    nap_barrier("tsc-sync done");
    if (ncpus < 2) {
        ok("tsc-sync", "skipped: needs 2 cpus");
        return;
    }
    if ((uint64_t)worst > tol)
        fail("tsc-sync: a TSC reading of cpu %u was %lu us ahead of this cpu's TSC after it "
             "arrived (tolerated: %lu us): the cpus' TSCs are not in step",
             worst_with, tsc_to_us((uint64_t)worst), tsc_to_us(tol));
    if ((uint64_t)worst_ns > tsc_to_us(tol) * 1000)
        fail("tsc-sync: a kvmclock reading of cpu %u was %lu us ahead of this cpu's kvmclock "
             "after it arrived (tolerated: %lu us): the cpus' kvmclocks are not in step",
             worst_ns_with, (uint64_t)worst_ns / 1000, tsc_to_us(tol));
    ok("tsc-sync", "%u readings passed with %s; none ahead by more than %lu us (TSC), %s%lu us",
       TSC_SYNC_ROUNDS * (c->index == bsp_index ? ncpus - 1 : 1),
       c->index == bsp_index ? "every cpu" : "the bsp", tsc_to_us((uint64_t)worst),
       kvmclock ? "kvmclock " : "no kvmclock: ", (uint64_t)worst_ns / 1000);
}

void check_timer_tsc_deadline(struct percpu *c)
{
    if (!have_tsc_deadline) {
        say("cpu %u: timer-tsc-deadline skipped (CPUID.1:ECX[24] is clear)", c->index);
        return;
    }
    timer_reset(c);
    apic_write(APIC_LVT_TIMER, LVT_TSC_DEADLINE | VEC_TIMER);
    uint64_t deadline = rdtsc() + ms_to_tsc(10);
    wrmsr(MSR_TSC_DEADLINE, deadline);
    if (!WAIT_UNTIL(c->timer_cnt >= 1, 1000)) {
        timer_stop();
        wrmsr(MSR_TSC_DEADLINE, 0);
        fail("timer-tsc-deadline: did not fire within 1 s of a 10 ms deadline");
    }
    uint64_t fired = c->timer_first_tsc;
    delay_us(30000);
    uint32_t n = c->timer_cnt;
    wrmsr(MSR_TSC_DEADLINE, 0);
    timer_stop();
    if (n != 1)
        fail("timer-tsc-deadline: fired %u times, expected once", n);
    if (fired < deadline)
        fail("timer-tsc-deadline: fired %lu us before its deadline", tsc_to_us(deadline - fired));
    ok("timer-tsc-deadline", "fired once, %lu us after its deadline", tsc_to_us(fired - deadline));
}

void check_ioapic_uart(struct percpu *c)
{
    for (uint32_t turn = 0; turn < ncpus; turn++) {
        barrier("ioapic-uart turn");
        if (turn != c->index)
            continue;
        uint32_t before = uart_total;
        c->uart_cnt = 0;
        /* Hold the console so no other output touches the UART meanwhile. */
        uint64_t fl = save_cli();
        con_acquire();
        restore_if(fl);
        ioapic_route(uart_gsi, uart_redir_flags | VEC_UART, c->apic_id);
        outb(COM1_PORT + 1, 0x02); /* IER: THR empty */
        int arrived = WAIT_UNTIL(uart_total != before, IRQ_TIMEOUT_MS);
        ioapic_write(0x10 + 2 * uart_gsi, LVT_MASKED | uart_redir_flags | VEC_UART);
        outb(COM1_PORT + 1, 0);
        con_release();
        if (!arrived)
            fail("ioapic-uart: no interrupt on IOAPIC pin %u (vector 0x%x, dest apic id %u) "
                 "within %u ms",
                 uart_gsi, VEC_UART, c->apic_id, (unsigned)IRQ_TIMEOUT_MS);
        if (uart_last_cpu != c->index)
            fail("ioapic-uart: the interrupt arrived on cpu %u, not here", uart_last_cpu);
        delay_us(1000);
        if (c->uart_cnt != 1 || uart_total != before + 1)
            fail("ioapic-uart: received %u interrupts, expected 1", uart_total - before);
        if ((c->uart_iir & 0xF) != 0x2)
            fail("ioapic-uart: IIR was 0x%x, expected a THR-empty interrupt (0x2)", c->uart_iir);
        ok("ioapic-uart", "pin %u -> vector 0x%x, IIR 0x%x", uart_gsi, VEC_UART, c->uart_iir);
    }
    barrier("ioapic-uart done");
}

void check_user(struct percpu *c)
{
    struct user_args *a = (struct user_args *)c->ublock;
    a->bitmap = c->ublock + USTACK_SIZE;
    a->limit = SIEVE_LIMIT;
    a->min_tsc = ms_to_tsc(user_ms);
    a->max_rounds = 1000000;
    a->rounds = 0;
    a->use_ud2 = (uint64_t)use_ud2;
    timer_reset(c);
    timer_start_100hz();
    uint64_t t0 = rdtsc();
    uint64_t result = enter_user((uint64_t)user_main, c->ublock + USTACK_SIZE - 8, (uint64_t)a);
    uint64_t t1 = rdtsc();
    timer_stop();
    sti();
    uint32_t user_ticks = c->timer_user_cnt;
    if (result != SIEVE_PRIMES)
        fail("user: the cpl3 sieve returned %lu primes below %lu, expected %lu", result,
             SIEVE_LIMIT, SIEVE_PRIMES);
    if (a->rounds < 1)
        fail("user: the cpl3 workload reported %lu rounds", a->rounds);
    if (user_ticks < 1)
        fail("user: no timer interrupt was taken from cpl3 in %lu ms", tsc_to_us(t1 - t0) / 1000);
    ok("user", "cpl3 sieve: %lu primes below %lu, %lu rounds in %lu ms, %u timer interrupts "
               "from cpl3, back by %s",
       result, SIEVE_LIMIT, a->rounds, tsc_to_us(t1 - t0) / 1000, user_ticks,
       use_ud2 ? "ud2" : "syscall");
}

/* System calls from user mode must arrive at CPL0 (on hosts whose SYSCALL stays at
 * CPL3, because the VMM completes them): round trips by syscall/sysretq that check the
 * kernel's SS, CS and RFLAGS, int $0x80 through a DPL3 gate, and a user jump to LSTAR
 * that must stay a user-mode #PF. Then cpu 0 rewrites the #PF and #UD gates with its
 * own handlers twice (as a kernel that reinstalls its IDT does): once followed by a
 * fresh WRMSR(LSTAR), once by a halt; system calls must still arrive. */
#define SYS_ARGS_OFFSET 2048UL
#define SYS_ROUNDS 200

static void sys_round(struct percpu *c, const char *phase, uint64_t rounds, int spoof)
{
    struct sys_args *a = (struct sys_args *)(c->ublock + SYS_ARGS_OFFSET);
    __builtin_memset(a, 0, sizeof *a);
    a->rounds = rounds;
    a->lstar = (uint64_t)syscall_entry;
    a->spoof = (uint64_t)spoof;
    a->kss = SEL_KDATA;
    a->kcs = SEL_KCODE64;
    uint64_t echo0 = c->sys_echo_cnt, int800 = c->int80_cnt, bad0 = c->sys_bad_cnt;
    c->spoof_pf = 0;
    c->spoof_expected = spoof;
    enter_user((uint64_t)user_syscalls, c->ublock + USTACK_SIZE - 8, (uint64_t)a);
    c->spoof_expected = 0;
    if (a->echo_bad)
        fail("syscall (%s): %lu of %lu round trips wrong: rax=0x%lx ss=0x%lx cs=0x%lx "
             "rflags=0x%lx at the kernel entry (want ss=0x%x cs=0x%x, IF clear)",
             phase, a->echo_bad, rounds, a->last_bad_rax, a->last_bad_ss, a->last_bad_cs,
             a->last_bad_flags, SEL_KDATA, SEL_KCODE64);
    if (c->sys_echo_cnt - echo0 != rounds)
        fail("syscall (%s): %lu of %lu system calls arrived at cpl0", phase,
             c->sys_echo_cnt - echo0, rounds);
    if (a->int80_bad || c->int80_cnt - int800 != 3)
        fail("syscall (%s): int $0x80: %lu of 3 arrived at cpl0, %lu returned a wrong value",
             phase, c->int80_cnt - int800, a->int80_bad);
    if (c->sys_bad_cnt != bad0)
        fail("syscall (%s): a user jump to LSTAR became a kernel entry", phase);
    if (spoof && c->spoof_pf != 1)
        fail("syscall (%s): the user jump to LSTAR raised %u user-mode #PFs, expected 1", phase,
             c->spoof_pf);
}

void check_syscall(struct percpu *c)
{
    struct sys_args *a = (struct sys_args *)(c->ublock + SYS_ARGS_OFFSET);
    sys_round(c, "first", SYS_ROUNDS, 1);
    uint64_t ns = tsc_to_us(a->tsc * 1000) / SYS_ROUNDS;
    barrier("syscall rewrite 1");
    if (c->index == 0) {
        set_gate(VEC_PF);
        set_gate(VEC_UD);
        wrmsr(MSR_LSTAR, (uint64_t)syscall_entry);
    }
    barrier("syscall after rewrite 1");
    sys_round(c, "after the IDT was rewritten and LSTAR written again", 20, 0);
    barrier("syscall rewrite 2");
    if (c->index == 0) {
        set_gate(VEC_PF);
        set_gate(VEC_UD);
        nap_us(1000);
    }
    barrier("syscall after rewrite 2");
    sys_round(c, "after the IDT was rewritten and a halt", 20, 1);
    ok("syscall", "%u round trips at cpl0 (%lu.%03lu us each), int $0x80 at cpl0, a user jump "
                  "to LSTAR stayed a user fault, after 2 IDT rewrites too",
       SYS_ROUNDS, ns / 1000, ns % 1000);
}

/* int3 in kernel mode: a trap whose handler returns to the next instruction. (On hosts
 * whose KVM emulates guest kernel code, the VMM has to complete it.) */
extern char testos_int3_after[];
__attribute__((noinline)) static void do_int3(void)
{
    __asm__ volatile("int3\n\t.globl testos_int3_after\ntestos_int3_after:\n" ::: "memory");
}

void check_int3(struct percpu *c)
{
    c->bp_cnt = 0;
    c->bp_rip = 0;
    do_int3();
    if (c->bp_cnt != 1)
        fail("int3: the #BP handler ran %u times, expected once", c->bp_cnt);
    if (c->bp_rip != (uint64_t)testos_int3_after)
        fail("int3: #BP reported rip 0x%lx, expected 0x%lx", c->bp_rip,
             (uint64_t)testos_int3_after);
    say("cpu %u: int3 ok (#BP at cpl0 handled, resumed after the int3)", c->index);
}
