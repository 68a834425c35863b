/*
 * testos: a small SMP bare-metal guest that checks what a VMM with a userspace
 * LAPIC/IOAPIC must get right. See README.md for what it checks and its output.
 *
 * All of this runs at CPL0, which our hosts execute in KVM's instruction emulator
 * (~600 ns per instruction, every port/MMIO access a VM exit): keep it short, use
 * only plain integer instructions, bound every wait, and pause in spin loops.
 */
#include "kernel.h"

/* Globals shared by the kernel files (declared in kernel.h). */
struct percpu cpus[MAX_CPUS];
struct tss tss[MAX_CPUS];
/* Own page: every interrupt reads it, and on a cluster sharing a page with the barrier and
 * console-lock words would make each of their writes invalidate every node's IDT copy. */
struct idt_entry idt[256] __attribute__((aligned(4096)));
uint32_t ncpus, bsp_index;
int use_x2apic, have_x2apic, have_tsc_deadline, fail_requested, use_ud2, bench_mode;
volatile uint32_t pong_flag;
volatile uint64_t pong_tsc;
uint32_t bsp_apic_id;
uint64_t tsc_khz, lapic_khz, watchdog_tsc;
const char *timing_source = "none";
uint16_t pm1a_cnt_port, pm_tmr_port;
uint32_t pm_tmr_mask = 0xFFFFFF;
int s5_slp_typ = -1;
uint64_t ioapic_base;
uint32_t ioapic_pins, uart_gsi = COM1_IRQ, uart_redir_flags;
char cmdline[256];
volatile uint32_t ap_arrived, failed, con_lock, bar_count, bar_gen, uart_total;
volatile uint32_t uart_last_cpu;
uint64_t watchdog_ms = WATCHDOG_MS;
uint64_t user_ms = USER_MIN_MS; /* testos.user-ms: how long the cpl3 sieve runs */
/* DSM checks: the shared pages (see testos.h) and the groups of cpus. */
struct dsm_global *dsm_global;
struct dsm_pair *dsm_pairs;
struct dsm_quad *dsm_quads;
uint32_t dsm_npairs, dsm_nquads;
uint64_t dsm_iriw_logs; /* per quad, two logs of DSM_IRIW_LOG_BYTES(iters_iriw) */
uint64_t iters_counter = DSM_ITERS_COUNTER, iters_spinlock = DSM_ITERS_SPINLOCK,
                iters_mp = DSM_ITERS_MP, iters_sb = DSM_ITERS_SB, iters_iriw = DSM_ITERS_IRIW,
                iters_pingpong = DSM_ITERS_PINGPONG, iters_dma = DSM_ITERS_DMA;

/* ------------------------------------------------------------------------- */
/* Per-CPU setup                                                              */

void set_gate(int v)
{
    uint64_t h = v == VEC_INT80 ? (uint64_t)int80_entry : (uint64_t)isr_stubs + 16 * (uint64_t)v;
    struct idt_entry e = {
        .off_lo = (uint16_t)h,
        .sel = SEL_KCODE64,
        .ist = v == VEC_NMI ? 1 : v == 8 ? 2 : 0,
        .type = v == VEC_INT80 ? 0xEE : 0x8E, /* int $0x80: DPL3 */
        .off_mid = (uint16_t)(h >> 16),
        .off_hi = (uint32_t)(h >> 32),
        .zero = 0,
    };
    /* The high half first, then the low half in one 8-byte store: with every handler
     * below 4 GiB only the low half changes, so other cpus never see half a gate. */
    uint64_t q[2];
    __builtin_memcpy(q, &e, sizeof q);
    volatile uint64_t *dst = (volatile uint64_t *)&idt[v];
    dst[1] = q[1];
    dst[0] = q[0];
}

static void setup_idt(void)
{
    for (int v = 0; v < 256; v++)
        set_gate(v);
}

static void load_idt(void)
{
    struct {
        uint16_t limit;
        uint64_t base;
    } __attribute__((packed)) p = {sizeof idt - 1, (uint64_t)idt};
    __asm__ volatile("lidt %0" ::"m"(p));
}

static void set_gs(struct percpu *c)
{
    c->self = c;
    wrmsr(MSR_GS_BASE, (uint64_t)c);
}

static void cpu_init(uint32_t idx)
{
    struct percpu *c = &cpus[idx];
    struct tss *t = &tss[idx];
    c->index = idx;
    c->tss = t;
    set_gs(c);
    load_idt();
    t->rsp0 = c->kblock + KSTACK_SIZE;
    t->ist[0] = c->kblock + KSTACK_SIZE + IST_SIZE;     /* NMI */
    t->ist[1] = c->kblock + KSTACK_SIZE + 2 * IST_SIZE; /* #DF */
    t->iomap_base = sizeof(struct tss);
    uint64_t base = (uint64_t)t, limit = sizeof(struct tss) - 1;
    uint64_t *d = &gdt[SEL_TSS0 / 8 + 2 * idx];
    d[0] = (limit & 0xFFFF) | ((base & 0xFFFFFF) << 16) | (0x89ULL << 40) |
           (((limit >> 16) & 0xF) << 48) | (((base >> 24) & 0xFF) << 56);
    d[1] = base >> 32;
    __asm__ volatile("ltr %0" ::"r"((uint16_t)(SEL_TSS0 + 16 * idx)));
    wrmsr(MSR_EFER, rdmsr(MSR_EFER) | 1); /* SCE */
    wrmsr(MSR_STAR, (0x18ULL << 48) | ((uint64_t)SEL_KCODE64 << 32));
    wrmsr(MSR_LSTAR, (uint64_t)syscall_entry);
    wrmsr(MSR_FMASK, 0x47700); /* TF DF IF IOPL NT AC */
    lapic_init();
}

/* ------------------------------------------------------------------------- */
/* Interrupts                                                                 */

static const char *const exc_names[32] = {
    "#DE", "#DB", "NMI", "#BP", "#OF", "#BR", "#UD", "#NM", "#DF", "#MF(9)", "#TS",
    "#NP", "#SS", "#GP", "#PF", "(15)", "#MF", "#AC", "#MC", "#XM", "#VE", "#CP",
};

void isr_dispatch(struct frame *f)
{
    struct percpu *c = this_cpu();
    uint64_t v = f->vec;
    if (v == VEC_NMI) {
        c->nmi_cnt++;
        return;
    }
    if (v == VEC_BP && !(f->cs & 3)) {
        c->bp_cnt++;
        c->bp_rip = f->rip;
        return;
    }
    if (v < 32) {
        uint64_t cr2;
        __asm__ volatile("movq %%cr2, %0" : "=r"(cr2));
        if (v == VEC_UD && (f->cs & 3) && f->rip == (uint64_t)user_yield_ud2) {
            f->rip += 2; /* past the ud2 */
            nap_us(DSM_NAP_US);
            return;
        }
        if (v == VEC_UD && use_ud2 && (f->cs & 3) && f->rip == (uint64_t)user_exit_ud2) {
            /* testos.ud2: the user's way back; drop this frame, return from enter_user. */
            __asm__ volatile("movq %0, %%rdi; jmp syscall_exit" ::"r"(f->rdi) : "rdi");
            __builtin_unreachable();
        }
        if (f->rip == (uint64_t)syscall_entry && (f->cs & 3)) {
            /* The syscall check's user jump to LSTAR: a user-mode fault, as it must be. */
            if (v == VEC_PF && c->spoof_expected && (f->rflags & RFLAGS_IF)) {
                c->spoof_pf++;
                f->rip = f->rcx;
                return;
            }
            /* Some hosts' KVM (software PVM) jump to LSTAR but stay at CPL3; the VMM
             * must complete the call. testos does not paper over it. */
            fail("syscall: a system call did not arrive at cpl0: exception %u at LSTAR with "
                 "cs=0x%lx rflags=0x%lx (the host's SYSCALL stays at cpl3 and the VMM did not "
                 "complete it)",
                 (unsigned)v, f->cs, f->rflags);
        }
        fail("exception %u %s error=0x%lx rip=0x%lx cs=0x%lx rsp=0x%lx cr2=0x%lx", (unsigned)v,
             exc_names[v] ? exc_names[v] : "", f->err, f->rip, f->cs, f->rsp, cr2);
    }
    switch (v) {
    case VEC_FIXED:
        c->fixed_cnt++;
        break;
    case VEC_BCAST:
        c->bcast_cnt++;
        break;
    case VEC_SELF:
        c->self_cnt++;
        break;
    case VEC_TIMER: {
        uint64_t now = rdtsc();
        if (!c->timer_cnt)
            c->timer_first_tsc = now;
        else if (c->timer_ngaps < TIMER_GAPS)
            c->timer_gaps[c->timer_ngaps++] = now - c->timer_last_tsc;
        c->timer_last_tsc = now;
        c->timer_cnt++;
        if (f->cs & 3)
            c->timer_user_cnt++;
        break;
    }
    case VEC_UART:
        c->uart_iir = inb(COM1_PORT + 2);
        outb(COM1_PORT + 1, 0); /* IER: no more THR-empty interrupts */
        c->uart_cnt++;
        uart_last_cpu = c->index;
        __atomic_fetch_add(&uart_total, 1, __ATOMIC_SEQ_CST);
        break;
    case VEC_PING:
        apic_send(bsp_apic_id, ICR_FIXED | ICR_ASSERT | VEC_PONG);
        break;
    case VEC_PONG:
        pong_tsc = rdtsc();
        pong_flag = 1;
        break;
    case VEC_SPURIOUS:
        c->spurious_cnt++;
        return; /* spurious interrupts take no EOI */
    default:
        fail("unexpected interrupt vector 0x%x (rip=0x%lx)", (unsigned)v, f->rip);
    }
    apic_eoi();
}

/* ------------------------------------------------------------------------- */
/* Boot                                                                       */

static void setup_timing(void)
{
    uint32_t a, b, cx, d;
    cpuid(1, &a, &b, &cx, &d);
    if (cx & (1u << 31)) {
        cpuid(0x40000000, &a, &b, &cx, &d);
        if (a >= CPUID_TIMING_LEAF && a < 0x40010000) {
            cpuid(CPUID_TIMING_LEAF, &a, &b, &cx, &d);
            if (a && b) {
                tsc_khz = a;
                lapic_khz = b;
                timing_source = "cpuid 0x40000010";
                return;
            }
        }
    }
    if (!pm_tmr_port)
        fail("timing: no CPUID leaf 0x40000010 and no ACPI PM timer to calibrate against");
    /* Calibrate the TSC and the LAPIC timer against 50 ms of the PM timer. */
    const uint64_t target = PM_TIMER_HZ / 20;
    apic_write(APIC_TIMER_DCR, 0xB);
    apic_write(APIC_LVT_TIMER, LVT_MASKED | VEC_TIMER);
    uint32_t prev = inl(pm_tmr_port) & pm_tmr_mask;
    uint64_t t0 = rdtsc();
    apic_write(APIC_TIMER_ICR, 0xFFFFFFFF);
    uint64_t elapsed = 0;
    for (uint32_t i = 0; elapsed < target && i < 10000000; i++) {
        uint32_t p = inl(pm_tmr_port) & pm_tmr_mask;
        elapsed += (p - prev) & pm_tmr_mask;
        prev = p;
    }
    uint32_t ccr = apic_read(APIC_TIMER_CCR);
    uint64_t t1 = rdtsc();
    apic_write(APIC_TIMER_ICR, 0);
    if (elapsed < target)
        fail("timing: the ACPI PM timer at port 0x%x does not advance", pm_tmr_port);
    tsc_khz = (t1 - t0) * PM_TIMER_HZ / (elapsed * 1000);
    lapic_khz = (uint64_t)(0xFFFFFFFFu - ccr) * PM_TIMER_HZ / (elapsed * 1000);
    timing_source = "pm-timer calibration";
    if (!tsc_khz || !lapic_khz)
        fail("timing: calibration gave tsc %lu kHz, lapic timer %lu kHz", tsc_khz, lapic_khz);
}

static void setup_memory(const struct hvm_start_info *si)
{
    if ((uint64_t)_kernel_end > USER_IMAGE_ADDR || (uint64_t)_user_end > DYN_START)
        fail("memory: the image does not fit its layout");
    uint64_t kend = DYN_START + ncpus * KBLOCK_SIZE;
    uint64_t ustart = (kend + LARGE_PAGE - 1) & ~(LARGE_PAGE - 1);
    /* The DSM checks' shared pages follow the user blocks. */
    uint64_t dsm = (ustart + ncpus * UBLOCK_SIZE + DSM_PAGE_SIZE - 1) & ~(DSM_PAGE_SIZE - 1);
    dsm_npairs = ncpus / 2;
    dsm_nquads = ncpus / 4;
    dsm_global = (struct dsm_global *)dsm;
    dsm_pairs = (struct dsm_pair *)(dsm + sizeof(struct dsm_global));
    dsm_quads = (struct dsm_quad *)((uint64_t)dsm_pairs + dsm_npairs * sizeof(struct dsm_pair));
    dsm_iriw_logs = (uint64_t)dsm_quads + dsm_nquads * sizeof(struct dsm_quad);
    uint64_t dsm_end = dsm_iriw_logs + dsm_nquads * 2 * DSM_IRIW_LOG_BYTES(iters_iriw);
    uint64_t uend = (dsm_end + LARGE_PAGE - 1) & ~(LARGE_PAGE - 1);
    if (!ram_ok(si, KERNEL_LOAD_ADDR, uend))
        fail("memory: testos needs RAM at 0x%lx-0x%lx for %u cpus", KERNEL_LOAD_ADDR, uend, ncpus);
    for (uint32_t i = 0; i < ncpus; i++) {
        cpus[i].kblock = DYN_START + i * KBLOCK_SIZE;
        cpus[i].ublock = ustart + i * UBLOCK_SIZE;
    }
    /* User access for the user image page and the user blocks. */
    pd_tables[USER_IMAGE_ADDR >> 21] |= 4;
    for (uint64_t a = ustart; a < uend; a += LARGE_PAGE)
        pd_tables[a >> 21] |= 4;
    __asm__ volatile("movq %%cr3, %%rax; movq %%rax, %%cr3" ::: "rax", "memory");
}

static void start_aps(void)
{
    uint64_t len = (uint64_t)(trampoline_end - trampoline_start);
    memcpy((void *)TRAMPOLINE_ADDR, trampoline_start, len);
    for (uint32_t i = 0; i < ncpus; i++) {
        if (i == bsp_index)
            continue;
        uint32_t id = cpus[i].apic_id, before = ap_arrived;
        ap_cpu_index = i;
        ap_stack_top = cpus[i].kblock + KSTACK_SIZE;
        __atomic_thread_fence(__ATOMIC_SEQ_CST);
        apic_send(id, ICR_INIT | ICR_ASSERT);
        delay_us(10000);
        apic_send(id, ICR_STARTUP | (TRAMPOLINE_ADDR >> 12));
        delay_us(200);
        apic_send(id, ICR_STARTUP | (TRAMPOLINE_ADDR >> 12));
        if (!WAIT_UNTIL(ap_arrived != before, AP_TIMEOUT_MS))
            fail("cpu %u (apic id %u) did not come online within %u s of INIT-SIPI-SIPI", i, id,
                 (unsigned)(AP_TIMEOUT_MS / 1000));
    }
}

/* CPU features every cpu must show alike (a vCPU may run on any node's host): the
 * words of CPUID 1, 7.0 and 0x80000001, the bsp's recorded first. */
#define FEATURE_WORDS 7
static uint32_t bsp_features[FEATURE_WORDS];

static void read_features(uint32_t *w)
{
    uint32_t a, b;
    cpuid(1, &a, &b, &w[0], &w[1]);
    cpuid(7, &a, &w[2], &w[3], &w[4]);
    cpuid(0x80000001u, &a, &b, &w[5], &w[6]);
}

static void check_features_match(uint32_t index)
{
    uint32_t w[FEATURE_WORDS];
    read_features(w);
    for (int i = 0; i < FEATURE_WORDS; i++)
        if (w[i] != bsp_features[i])
            fail("cpu %u: CPUID feature word %d is 0x%x, the bsp's is 0x%x", index, i, w[i],
                 bsp_features[i]);
}

void ap_main(uint32_t index)
{
    struct percpu *c = &cpus[index];
    cpu_init(index);
    uint32_t id = apic_id();
    if (id != c->apic_id)
        fail("started as cpu %u but my apic id is %u, the MADT says %u", index, id, c->apic_id);
    check_features_match(index);
    say("cpu %u: online (apic id %u)", index, id);
    __atomic_fetch_add(&ap_arrived, 1, __ATOMIC_SEQ_CST);
    run_checks(c);
    if (bench_mode)
        for (;;)
            __asm__ volatile("sti; hlt" ::: "memory"); /* answer pings */
    halt_forever();
}

/* ------------------------------------------------------------------------- */
/* Microbenchmarks of the VMM's hot paths (testos.bench)                      */

#define BENCH_N 201
static uint64_t bench_samples[BENCH_N];

/* Median of `n` samples, in ns. Insertion sort: n is small and this code is emulated. */
static uint64_t bench_median_ns(int n)
{
    for (int i = 1; i < n; i++) {
        uint64_t v = bench_samples[i];
        int j = i - 1;
        while (j >= 0 && bench_samples[j] > v) {
            bench_samples[j + 1] = bench_samples[j];
            j--;
        }
        bench_samples[j + 1] = v;
    }
    return bench_samples[n / 2] * 1000000 / tsc_khz;
}

static void bench(void)
{
    for (int i = 0; i < BENCH_N; i++) {
        uint64_t t0 = rdtsc();
        bench_samples[i] = rdtsc() - t0;
    }
    say("bench: rdtsc-pair median %lu ns (measurement floor)", bench_median_ns(BENCH_N));
    for (int i = 0; i < BENCH_N; i++) {
        uint64_t t0 = rdtsc();
        outb(0x80, 0);
        bench_samples[i] = rdtsc() - t0;
    }
    say("bench: pio-exit median %lu ns (out to port 0x80)", bench_median_ns(BENCH_N));
    for (int i = 0; i < BENCH_N; i++) {
        uint64_t t0 = rdtsc();
        (void)apic_read(APIC_TPR);
        bench_samples[i] = rdtsc() - t0;
    }
    say("bench: lapic-read median %lu ns (%s)", bench_median_ns(BENCH_N),
        use_x2apic ? "x2apic rdmsr exit" : "xapic mmio exit");
    if (ncpus < 2)
        return;
    uint32_t target = cpus[(bsp_index + 1) % ncpus].apic_id;
    sti(); /* the pong is an interrupt; the checks may have left IF clear */
    for (int i = 0; i < BENCH_N; i++) {
        pong_flag = 0;
        uint64_t t0 = rdtsc();
        apic_send(target, ICR_FIXED | ICR_ASSERT | VEC_PING);
        uint64_t limit = t0 + tsc_khz * 1000; /* 1 s */
        while (!pong_flag) {
            if (rdtsc() > limit)
                fail("bench: no pong from apic id %u within 1 s", target);
            __asm__ volatile("pause");
        }
        bench_samples[i] = pong_tsc - t0;
    }
    say("bench: ipi-round-trip median %lu ns (fixed IPI to apic id %u and back)",
        bench_median_ns(BENCH_N), target);
}

void kmain(void)
{
    /* Provisional per-CPU pointer so that early failures can print. */
    set_gs(&cpus[0]);
    setup_idt();
    load_idt();
    outb(PIC_MASTER_DATA, 0xFF);
    outb(PIC_SLAVE_DATA, 0xFF);
    outb(COM1_PORT + 1, 0x00); /* IER: polled */
    outb(COM1_PORT + 3, 0x03); /* 8N1 */
    outb(COM1_PORT + 4, 0x0B); /* DTR RTS OUT2 */

    const struct hvm_start_info *si = (const struct hvm_start_info *)pvh_start_info;
    if (!si || si->magic != 0x336ec578)
        fail("boot: not started through PVH (start_info at 0x%lx has no 0x336ec578 magic)",
             pvh_start_info);
    if (si->cmdline_paddr && si->cmdline_paddr < 0x100000000ULL) {
        const char *s = (const char *)si->cmdline_paddr;
        for (size_t i = 0; i + 1 < sizeof cmdline && s[i]; i++)
            cmdline[i] = s[i];
    }
    say("start (cmdline \"%s\")", cmdline);
    fail_requested = cmdline_has("testos.fail");
    use_ud2 = cmdline_has("testos.ud2");
    bench_mode = cmdline_has("testos.bench");
    watchdog_ms = cmdline_u64("testos.watchdog", WATCHDOG_MS / 1000) * 1000;
    user_ms = cmdline_u64("testos.user-ms", USER_MIN_MS);
    if (user_ms == 0)
        user_ms = USER_MIN_MS;
    if (watchdog_ms == 0)
        watchdog_ms = WATCHDOG_MS;
    parse_acpi(si);
    {
        uint64_t all = cmdline_u64("testos.iters", 0);
        uint64_t *const iters[] = {&iters_counter, &iters_sb,       &iters_mp, &iters_spinlock,
                                   &iters_iriw,    &iters_pingpong, &iters_dma};
        const char *const keys[] = {"testos.iters.counter",     "testos.iters.litmus-sb",
                                    "testos.iters.litmus-mp",   "testos.iters.spinlock",
                                    "testos.iters.litmus-iriw", "testos.iters.pingpong",
                                    "testos.iters.dma"};
        /* The default counts are sized for one node; across nodes every handoff is a
         * page transfer (ms each here), so a run with the defaults would take tens of
         * minutes. Explicit counts are kept as given. */
        if (numa_nodes > 1 && !all) {
            for (int i = 0; i < 6; i++)
                *iters[i] = *iters[i] / DSM_MULTINODE_DIVISOR ? *iters[i] / DSM_MULTINODE_DIVISOR : 1;
            say("%u NUMA nodes: the DSM checks run 1/%u of their one-node iteration counts "
                "(testos.iters=N to choose)",
                numa_nodes, (unsigned)DSM_MULTINODE_DIVISOR);
        }
        if (all > DSM_MAX_DMA)
            iters_dma = DSM_MAX_DMA;
        else if (all)
            iters_dma = all;
        for (int i = 0; i < 7; i++) {
            *iters[i] = cmdline_u64(keys[i], all && i != 6 ? all : *iters[i]);
            if (*iters[i] == 0)
                *iters[i] = 1;
        }
        /* The checks of kernel code: testos.iters=N lowers their counts, never raises
         * them (every iteration is emulated kernel code on some hosts). */
        uint64_t *const kiters[] = {&iters_kshared, &iters_kstream, &iters_pagetable};
        const char *const kkeys[] = {"testos.iters.kernel-shared", "testos.iters.kernel-stream",
                                     "testos.iters.pagetable"};
        for (int i = 0; i < 3; i++) {
            uint64_t def = all && all < *kiters[i] ? all : *kiters[i];
            *kiters[i] = cmdline_u64(kkeys[i], def);
            if (*kiters[i] == 0)
                *kiters[i] = 1;
        }
        iters_pagetable += iters_pagetable & 1; /* half written by each cpu of a pair */
        if (iters_iriw > 0x7FFFFFFFULL) /* its log holds 32-bit values */
            iters_iriw = 0x7FFFFFFFULL;
    }

    uint32_t a, b, cx, d;
    cpuid(1, &a, &b, &cx, &d);
    have_x2apic = (cx >> 21) & 1;
    have_tsc_deadline = (cx >> 24) & 1;
    use_x2apic = have_x2apic && !cmdline_has("xapic");
    lapic_init();
    uint32_t id = apic_id();
    bsp_index = ncpus;
    for (uint32_t i = 0; i < ncpus; i++)
        if (cpus[i].apic_id == id)
            bsp_index = i;
    if (bsp_index == ncpus)
        fail("the bsp's apic id %u is not in the MADT", id);
    setup_memory(si);
    cpu_init(bsp_index);
    setup_timing();
    watchdog_tsc = rdtsc() + ms_to_tsc(watchdog_ms);
    ioapic_init();

    say("cpus=%u apic=%s tsc_khz=%lu", ncpus, use_x2apic ? "x2apic" : "xapic", tsc_khz);
    {
        char ids[LINE_MAX];
        struct buf bb = {ids, sizeof ids, 0};
        for (uint32_t i = 0; i < ncpus; i++) {
            if (i)
                bputc(&bb, ' ');
            bnum(&bb, cpus[i].apic_id, 10, 0, ' ', 0);
        }
        ids[bb.len] = 0;
        say("apic ids: %s", ids);
    }
    say("lapic_timer_khz=%lu timing=%s tsc_deadline=%s ioapic=0x%lx pins=%u com1_gsi=%u "
        "s5_slp_typ=%u",
        lapic_khz, timing_source, have_tsc_deadline ? "yes" : "no", ioapic_base, ioapic_pins,
        uart_gsi, (unsigned)s5_slp_typ);
    bsp_apic_id = id;
    read_features(bsp_features);
    say("cpuid: 1.ecx=0x%x 1.edx=0x%x 7.ebx=0x%x 7.ecx=0x%x 7.edx=0x%x 80000001.ecx=0x%x "
        "80000001.edx=0x%x",
        bsp_features[0], bsp_features[1], bsp_features[2], bsp_features[3], bsp_features[4],
        bsp_features[5], bsp_features[6]);
    say("cpu %u: online (apic id %u, bsp)", bsp_index, id);

    start_aps();
    say("all %u cpus online", ncpus);
    run_checks(&cpus[bsp_index]);

    say("PASS");
    if (bench_mode)
        bench();
    if (cmdline_has("testos.idle")) {
        /* For tests of how the VMM stops a guest that never ends by itself. */
        say("idle: halting until stopped from outside");
        halt_forever();
    }
    outw(pm1a_cnt_port, (uint16_t)((s5_slp_typ << 10) | (1 << 13)));
    delay_us(1000000);
    say("poweroff through ACPI S5 (port 0x%x) did not stop the machine; resetting", pm1a_cnt_port);
    outb(I8042_CMD_PORT, 0xFE);
    halt_forever();
}
