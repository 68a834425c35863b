/*
 * testos: a small SMP bare-metal guest that checks what a VMM with a userspace
 * LAPIC/IOAPIC must get right. See README.md for what it checks and its output.
 *
 * All of this runs at CPL0, which our hosts execute in KVM's instruction emulator
 * (~600 ns per instruction, every port/MMIO access a VM exit): keep it short, use
 * only plain integer instructions, bound every wait, and pause in spin loops.
 */
#include "testos.h"
#include <stdarg.h>

/* The guest machine map; mirrors crates/layout/src/lib.rs (dvmm-layout). */
#define LAPIC_ADDR 0xFEE00000UL
#define COM1_PORT 0x3F8
#define COM1_IRQ 4
#define PVPANIC_PORT 0x505
#define I8042_CMD_PORT 0x64
#define PIC_MASTER_DATA 0x21
#define PIC_SLAVE_DATA 0xA1
#define CPUID_TIMING_LEAF 0x40000010u
#define PM_TIMER_HZ 3579545ULL
#define KERNEL_LOAD_ADDR 0x100000UL

/* Our memory map (see README.md). */
#define USER_IMAGE_ADDR 0x200000UL
#define DYN_START 0x400000UL
#define LARGE_PAGE 0x200000UL
#define KSTACK_SIZE 16384UL
#define IST_SIZE 4096UL
#define KBLOCK_SIZE (KSTACK_SIZE + 2 * IST_SIZE)
#define USTACK_SIZE 16384UL
#define UBITMAP_SIZE (128UL * 1024)
#define UBLOCK_SIZE (USTACK_SIZE + UBITMAP_SIZE)

/* Vectors we use. */
#define VEC_NMI 2
#define VEC_FIXED 0x40
#define VEC_BCAST 0x41
#define VEC_SELF 0x42
#define VEC_TIMER 0x50
#define VEC_UART 0x60
#define VEC_PING 0x70
#define VEC_PONG 0x71
#define VEC_SPURIOUS 0xFF
#define VEC_BP 3
#define VEC_UD 6
#define VEC_PF 14
#define VEC_INT80 0x80
#define RFLAGS_IF 0x200ULL

/* LAPIC registers (xAPIC MMIO offsets; x2APIC MSR = 0x800 + offset / 16). */
#define APIC_ID 0x20
#define APIC_TPR 0x80
#define APIC_EOI 0xB0
#define APIC_SVR 0xF0
#define APIC_ICR_LO 0x300
#define APIC_ICR_HI 0x310
#define APIC_LVT_TIMER 0x320
#define APIC_LVT_LINT0 0x350
#define APIC_LVT_LINT1 0x360
#define APIC_LVT_ERROR 0x370
#define APIC_TIMER_ICR 0x380
#define APIC_TIMER_CCR 0x390
#define APIC_TIMER_DCR 0x3E0
#define LVT_MASKED 0x10000u
#define LVT_PERIODIC (1u << 17)
#define LVT_TSC_DEADLINE (2u << 17)
#define ICR_FIXED 0x000u
#define ICR_NMI 0x400u
#define ICR_INIT 0x500u
#define ICR_STARTUP 0x600u
#define ICR_BUSY 0x1000u
#define ICR_ASSERT 0x4000u
#define ICR_SELF 0x40000u
#define ICR_ALL_BUT_SELF 0xC0000u

#define MSR_APIC_BASE 0x1B
#define MSR_TSC_DEADLINE 0x6E0
#define MSR_EFER 0xC0000080
#define MSR_STAR 0xC0000081
#define MSR_LSTAR 0xC0000082
#define MSR_FMASK 0xC0000084
#define MSR_GS_BASE 0xC0000101

#define WATCHDOG_MS 120000ULL
#define IRQ_TIMEOUT_MS 2000ULL
#define AP_TIMEOUT_MS 30000ULL

/* DSM-sensitive checks: default iterations per cpu (testos.iters=N, testos.iters.<check>=N). */
#define DSM_ITERS_COUNTER 100000ULL
#define DSM_ITERS_SPINLOCK 20000ULL
#define DSM_ITERS_MP 100000ULL
#define DSM_ITERS_SB 100000ULL
#define DSM_ITERS_IRIW 2000ULL
#define DSM_ITERS_PINGPONG 20000ULL
/* Default DSM iteration counts are divided by this when the guest spans NUMA nodes. */
#define DSM_MULTINODE_DIVISOR 20ULL
#define DSM_ITERS_DMA 8ULL /* requests per cpu */
#define DSM_MAX_DMA 32ULL /* testos.iters=N caps the dma check here */
/* The longest any single user-mode wait may go without progress. */
#define DSM_WAIT_MS 10000ULL
#define DSM_ARGS_OFFSET 256UL
/* A cpu waiting in user mode yields (halts DSM_NAP_US) after spinning DSM_SPIN_US. */
#define DSM_SPIN_US 1000ULL
#define DSM_NAP_US 100ULL /* struct dsm_args in the user block, above struct user_args */

#define SIEVE_LIMIT 2000000ULL
#define SIEVE_PRIMES 148933ULL
#define USER_MIN_MS 50ULL
#define TIMER_GAPS 64 /* tick intervals kept per cpu for timer-periodic */

struct tss {
    uint32_t reserved0;
    uint64_t rsp0, rsp1, rsp2;
    uint64_t reserved1;
    uint64_t ist[7];
    uint64_t reserved2;
    uint16_t reserved3;
    uint16_t iomap_base;
} __attribute__((packed));

/* kvmclock's per-cpu time (KVM's struct pvclock_vcpu_time_info). */
struct pvclock {
    volatile uint32_t version, pad0;
    volatile uint64_t tsc_timestamp, system_time;
    volatile uint32_t mul;
    volatile int8_t shift;
    volatile uint8_t flags, pad[2];
};

struct percpu {
    struct percpu *self; /* PERCPU_SELF: gs:0 */
    uint64_t ksp;        /* PERCPU_KSP: kernel rsp saved by enter_user */
    struct tss *tss;     /* PERCPU_TSS */
    volatile uint64_t sys_echo_cnt; /* PERCPU_SYS_ECHO */
    volatile uint64_t int80_cnt;    /* PERCPU_INT80 */
    volatile uint64_t sys_bad_cnt;  /* PERCPU_SYS_BAD */
    volatile uint32_t spoof_expected, spoof_pf;
    uint32_t index;
    uint32_t apic_id;
    uint64_t kblock;
    uint64_t ublock;
    volatile uint32_t fixed_cnt, bcast_cnt, self_cnt, nmi_cnt, uart_cnt, spurious_cnt;
    volatile uint32_t timer_cnt, timer_user_cnt, uart_iir;
    volatile uint64_t timer_first_tsc, timer_last_tsc;
    volatile uint32_t timer_ngaps;
    uint64_t timer_gaps[TIMER_GAPS]; /* TSC between consecutive ticks */
    volatile uint32_t bp_cnt;
    volatile uint64_t bp_rip;
    volatile uint64_t progress_tsc; /* when this cpu last finished a check (ok) */
    struct pvclock pvclock;         /* KVM writes it from this cpu's node */
} __attribute__((aligned(4096))); /* one page per CPU: no false sharing between nodes */

_Static_assert(__builtin_offsetof(struct percpu, ksp) == PERCPU_KSP, "PERCPU_KSP");
_Static_assert(__builtin_offsetof(struct percpu, tss) == PERCPU_TSS, "PERCPU_TSS");
_Static_assert(__builtin_offsetof(struct percpu, sys_echo_cnt) == PERCPU_SYS_ECHO, "SYS_ECHO");
_Static_assert(__builtin_offsetof(struct percpu, int80_cnt) == PERCPU_INT80, "INT80");
_Static_assert(__builtin_offsetof(struct percpu, sys_bad_cnt) == PERCPU_SYS_BAD, "SYS_BAD");
_Static_assert(sizeof(struct tss) == 104, "tss size");

struct frame {
    uint64_t r15, r14, r13, r12, r11, r10, r9, r8, rdi, rsi, rbp, rbx, rdx, rcx, rax;
    uint64_t vec, err, rip, cs, rflags, rsp, ss;
};

struct idt_entry {
    uint16_t off_lo, sel;
    uint8_t ist, type;
    uint16_t off_mid;
    uint32_t off_hi, zero;
} __attribute__((packed));

struct hvm_start_info {
    uint32_t magic, version, flags, nr_modules;
    uint64_t modlist_paddr, cmdline_paddr, rsdp_paddr, memmap_paddr;
    uint32_t memmap_entries, reserved;
};

struct hvm_memmap_entry {
    uint64_t addr, size;
    uint32_t type, reserved;
};

/* From boot.S and the linker script. */
extern char __bss_start[], __bss_end[], _kernel_end[], _user_start[], _user_end[];
extern char trampoline_start[], trampoline_end[], isr_stubs[];
extern uint64_t pvh_start_info, ap_stack_top, ap_cpu_index;
extern uint64_t pd_tables[], pml4[], gdt[];
uint64_t enter_user(uint64_t rip, uint64_t rsp, uint64_t arg);
void syscall_entry(void);
void int80_entry(void);
void kmain(void);
void ap_main(uint32_t index);
void isr_dispatch(struct frame *f);

static struct percpu cpus[MAX_CPUS];
static struct tss tss[MAX_CPUS];
/* Own page: every interrupt reads it, and on a cluster sharing a page with the barrier and
 * console-lock words would make each of their writes invalidate every node's IDT copy. */
static struct idt_entry idt[256] __attribute__((aligned(4096)));
static uint32_t ncpus, bsp_index;
static int use_x2apic, have_x2apic, have_tsc_deadline, fail_requested, use_ud2, bench_mode;
static volatile uint32_t pong_flag;
static volatile uint64_t pong_tsc;
static uint32_t bsp_apic_id;
static uint64_t tsc_khz, lapic_khz, watchdog_tsc;
static const char *timing_source = "none";
static uint16_t pm1a_cnt_port, pm_tmr_port;
static uint32_t pm_tmr_mask = 0xFFFFFF;
static int s5_slp_typ = -1;
static uint64_t ioapic_base;
static uint32_t ioapic_pins, uart_gsi = COM1_IRQ, uart_redir_flags;
static char cmdline[256];
static volatile uint32_t ap_arrived, failed, con_lock, bar_count, bar_gen, uart_total;
static volatile uint32_t uart_last_cpu;
static uint64_t watchdog_ms = WATCHDOG_MS;
static uint64_t user_ms = USER_MIN_MS; /* testos.user-ms: how long the cpl3 sieve runs */
/* DSM checks: the shared pages (see testos.h) and the groups of cpus. */
static struct dsm_global *dsm_global;
static struct dsm_pair *dsm_pairs;
static struct dsm_quad *dsm_quads;
static uint32_t dsm_npairs, dsm_nquads;
static uint64_t dsm_iriw_logs; /* per quad, two logs of DSM_IRIW_LOG_BYTES(iters_iriw) */
static uint64_t iters_counter = DSM_ITERS_COUNTER, iters_spinlock = DSM_ITERS_SPINLOCK,
                iters_mp = DSM_ITERS_MP, iters_sb = DSM_ITERS_SB, iters_iriw = DSM_ITERS_IRIW,
                iters_pingpong = DSM_ITERS_PINGPONG, iters_dma = DSM_ITERS_DMA;

/* ------------------------------------------------------------------------- */
/* CPU primitives                                                             */

static inline void outb(uint16_t port, uint8_t v) { __asm__ volatile("outb %0, %1" ::"a"(v), "Nd"(port)); }
static inline void outw(uint16_t port, uint16_t v) { __asm__ volatile("outw %0, %1" ::"a"(v), "Nd"(port)); }
static inline void outl(uint16_t port, uint32_t v) { __asm__ volatile("outl %0, %1" ::"a"(v), "Nd"(port)); }
static inline uint8_t inb(uint16_t port)
{
    uint8_t v;
    __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port));
    return v;
}
static inline uint32_t inl(uint16_t port)
{
    uint32_t v;
    __asm__ volatile("inl %1, %0" : "=a"(v) : "Nd"(port));
    return v;
}
static inline uint64_t rdmsr(uint32_t msr)
{
    uint32_t lo, hi;
    __asm__ volatile("rdmsr" : "=a"(lo), "=d"(hi) : "c"(msr));
    return ((uint64_t)hi << 32) | lo;
}
static inline void wrmsr(uint32_t msr, uint64_t v)
{
    __asm__ volatile("wrmsr" ::"c"(msr), "a"((uint32_t)v), "d"((uint32_t)(v >> 32)) : "memory");
}
static inline uint64_t rdtsc(void)
{
    uint32_t lo, hi;
    __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
    return ((uint64_t)hi << 32) | lo;
}
static inline void cpuid(uint32_t leaf, uint32_t *a, uint32_t *b, uint32_t *c, uint32_t *d)
{
    __asm__ volatile("cpuid" : "=a"(*a), "=b"(*b), "=c"(*c), "=d"(*d) : "a"(leaf), "c"(0));
}
static inline void pause(void) { __asm__ volatile("pause" ::: "memory"); }
static inline void cli(void) { __asm__ volatile("cli" ::: "memory"); }
static inline void sti(void) { __asm__ volatile("sti" ::: "memory"); }
static inline uint64_t save_cli(void)
{
    uint64_t fl;
    __asm__ volatile("pushfq; popq %0; cli" : "=r"(fl)::"memory");
    return fl;
}
static inline void restore_if(uint64_t fl)
{
    if (fl & 0x200)
        sti();
}
static inline struct percpu *this_cpu(void)
{
    struct percpu *c;
    __asm__ volatile("movq %%gs:0, %0" : "=r"(c));
    return c;
}
static __attribute__((noreturn)) void halt_forever(void)
{
    for (;;)
        __asm__ volatile("cli; hlt" ::: "memory");
}
static inline uint32_t rd32(const uint8_t *p)
{
    uint32_t v;
    __builtin_memcpy(&v, p, 4);
    return v;
}
static inline uint64_t rd64(const uint8_t *p)
{
    uint64_t v;
    __builtin_memcpy(&v, p, 8);
    return v;
}

/* GCC may emit calls to these even in freestanding code. */
void *memset(void *d, int c, size_t n)
{
    unsigned char *p = d;
    while (n--) {
        __asm__ volatile("" ::: "memory");
        *p++ = (unsigned char)c;
    }
    return d;
}
void *memcpy(void *d, const void *s, size_t n)
{
    unsigned char *p = d;
    const unsigned char *q = s;
    while (n--) {
        __asm__ volatile("" ::: "memory");
        *p++ = *q++;
    }
    return d;
}

/* ------------------------------------------------------------------------- */
/* Formatting and console                                                     */

struct buf {
    char *p;
    size_t cap, len;
};

static void bputc(struct buf *b, char ch)
{
    if (b->len + 1 < b->cap)
        b->p[b->len++] = ch;
}
static void bputs(struct buf *b, const char *s)
{
    while (*s)
        bputc(b, *s++);
}
static void bnum(struct buf *b, uint64_t v, unsigned base, int width, char pad, int neg)
{
    char tmp[24];
    int n = 0;
    do {
        tmp[n++] = "0123456789abcdef"[v % base];
        v /= base;
    } while (v);
    if (neg)
        tmp[n++] = '-';
    while (width-- > n)
        bputc(b, pad);
    while (n)
        bputc(b, tmp[--n]);
}

/* printf subset: %s %c %d %u %x with optional 0, width and l/ll. */
static void vfmt(struct buf *b, const char *fmt, va_list ap)
{
    for (; *fmt; fmt++) {
        if (*fmt != '%') {
            bputc(b, *fmt);
            continue;
        }
        fmt++;
        char pad = ' ';
        int width = 0, lng = 0;
        if (*fmt == '0') {
            pad = '0';
            fmt++;
        }
        while (*fmt >= '0' && *fmt <= '9')
            width = width * 10 + (*fmt++ - '0');
        while (*fmt == 'l') {
            lng++;
            fmt++;
        }
        if (*fmt == 'd') {
            int64_t v = lng ? va_arg(ap, int64_t) : va_arg(ap, int);
            bnum(b, v < 0 ? -(uint64_t)v : (uint64_t)v, 10, width, pad, v < 0);
        } else if (*fmt == 'u' || *fmt == 'x') {
            uint64_t v = lng ? va_arg(ap, uint64_t) : va_arg(ap, unsigned);
            bnum(b, v, *fmt == 'u' ? 10 : 16, width, pad, 0);
        } else if (*fmt == 's') {
            const char *s = va_arg(ap, const char *);
            bputs(b, s ? s : "(null)");
        } else if (*fmt == 'c') {
            bputc(b, (char)va_arg(ap, int));
        } else if (*fmt == 0) {
            break;
        } else {
            bputc(b, *fmt);
        }
    }
    b->p[b->len] = 0;
}

static void serial_putc(char ch)
{
    /* Bounded wait for THR empty (LSR bit 5); write anyway after that. */
    for (int i = 0; i < 100000 && !(inb(COM1_PORT + 5) & 0x20); i++)
        pause();
    outb(COM1_PORT, (uint8_t)ch);
}

static void serial_write(const char *s, size_t n)
{
    for (size_t i = 0; i < n; i++)
        serial_putc(s[i]);
}

static __attribute__((noreturn)) void vfail(const char *fmt, va_list ap);
static __attribute__((noreturn)) void fail(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vfail(fmt, ap);
}

static uint64_t ms_to_tsc(uint64_t ms);

/* The latest TSC at which any cpu finished a check or made progress inside a user-mode
 * one (struct dsm_args.progress_tsc). Read only when a deadline has passed, so the
 * other cpus' pages are not pulled across nodes while the checks run. */
static uint64_t last_progress(void)
{
    uint64_t now = rdtsc(), t = 0;
    for (uint32_t i = 0; i < ncpus; i++) {
        uint64_t k = cpus[i].progress_tsc, u = 0;
        if (cpus[i].ublock)
            u = ((volatile struct dsm_args *)(cpus[i].ublock + DSM_ARGS_OFFSET))->progress_tsc;
        if (k > t && k <= now)
            t = k;
        if (u > t && u <= now) /* not yet written: whatever the block held */
            t = u;
    }
    return t;
}

/* The watchdog judges progress, not the run's length: true once *end has passed and no
 * cpu made progress in the ms before now; else moves *end to ms after the last progress. */
static int no_progress_since(volatile uint64_t *end, uint64_t ms)
{
    uint64_t now = rdtsc();
    if (now <= *end)
        return 0;
    uint64_t next = last_progress() + ms_to_tsc(ms);
    if (next > now) {
        *end = next;
        return 0;
    }
    return 1;
}

/* Halts quietly when another CPU has failed; fails on the global watchdog. */
static void check_failed(void)
{
    if (failed)
        halt_forever();
    if (tsc_khz && no_progress_since(&watchdog_tsc, watchdog_ms))
        fail("watchdog: no cpu finished a check or made progress in one for %lu s "
             "(testos.watchdog=<s> to change)",
             watchdog_ms / 1000);
}

static void con_acquire(void)
{
    while (__atomic_exchange_n(&con_lock, 1, __ATOMIC_ACQUIRE)) {
        if (failed)
            halt_forever();
        pause();
    }
}
static void con_release(void) { __atomic_store_n(&con_lock, 0, __ATOMIC_RELEASE); }

#define LINE_MAX 1200

/* Prints "testos: <formatted>\n" as one line that never interleaves with others. */
static void say(const char *fmt, ...)
{
    char line[LINE_MAX];
    struct buf b = {line, sizeof line, 0};
    va_list ap;
    bputs(&b, "testos: ");
    va_start(ap, fmt);
    vfmt(&b, fmt, ap);
    va_end(ap);
    bputc(&b, '\n');
    uint64_t fl = save_cli();
    con_acquire();
    serial_write(line, b.len);
    con_release();
    restore_if(fl);
}

static void vfail(const char *fmt, va_list ap)
{
    cli();
    if (__atomic_exchange_n(&failed, 1, __ATOMIC_SEQ_CST))
        halt_forever();
    char line[LINE_MAX];
    struct buf b = {line, sizeof line, 0};
    struct percpu *c = this_cpu();
    bputs(&b, "testos: FAIL cpu ");
    bnum(&b, c ? c->index : 0, 10, 0, ' ', 0);
    bputs(&b, ": ");
    vfmt(&b, fmt, ap);
    bputc(&b, '\n');
    /* The console lock holder may be the one that died: wait a bounded time. */
    for (int i = 0; i < 2000000 && __atomic_exchange_n(&con_lock, 1, __ATOMIC_ACQUIRE); i++)
        pause();
    serial_write(line, b.len);
    outb(PVPANIC_PORT, 1);
    outb(I8042_CMD_PORT, 0xFE);
    halt_forever();
}

/* ------------------------------------------------------------------------- */
/* Time                                                                       */

static uint64_t ms_to_tsc(uint64_t ms) { return ms * tsc_khz; }
static uint64_t tsc_to_us(uint64_t t) { return tsc_khz ? t * 1000 / tsc_khz : 0; }

static void delay_us(uint64_t us)
{
    uint64_t end = rdtsc() + us * tsc_khz / 1000;
    while (rdtsc() < end) {
        check_failed();
        pause();
    }
}

/* Spins (with pause) until cond holds or ms milliseconds pass; yields cond. */
#define WAIT_UNTIL(cond, ms)                                                                       \
    ({                                                                                             \
        uint64_t end_ = rdtsc() + ms_to_tsc(ms);                                                   \
        int ok_;                                                                                   \
        for (;;) {                                                                                 \
            if (cond) {                                                                            \
                ok_ = 1;                                                                           \
                break;                                                                             \
            }                                                                                      \
            if (rdtsc() > end_) {                                                                  \
                ok_ = 0;                                                                           \
                break;                                                                             \
            }                                                                                      \
            check_failed();                                                                        \
            pause();                                                                               \
        }                                                                                          \
        ok_;                                                                                       \
    })

/* All CPUs meet here; fails if some CPU does not arrive while none makes progress for
 * the watchdog's time (testos.watchdog): how long the others take depends on the host
 * (8 nodes sharing 2 cores print slowly), not on dvmm. */
static void barrier(const char *name)
{
    uint32_t gen = __atomic_load_n(&bar_gen, __ATOMIC_ACQUIRE);
    if (__atomic_add_fetch(&bar_count, 1, __ATOMIC_ACQ_REL) == ncpus) {
        __atomic_store_n(&bar_count, 0, __ATOMIC_RELAXED);
        __atomic_store_n(&bar_gen, gen + 1, __ATOMIC_RELEASE);
        return;
    }
    volatile uint64_t end = rdtsc() + ms_to_tsc(watchdog_ms);
    while (__atomic_load_n(&bar_gen, __ATOMIC_ACQUIRE) == gen) {
        if (no_progress_since(&end, watchdog_ms))
            fail("barrier '%s': only %u of %u cpus arrived, and no cpu made progress for %lu s",
                 name, bar_count, ncpus, watchdog_ms / 1000);
        check_failed();
        pause();
    }
}

static void nap_us(uint64_t us);

/* A barrier whose waiters halt between looks (so that on an oversubscribed host the
 * cpus still working get the host cpus); bounded by the watchdog. */
static void nap_barrier(const char *name)
{
    uint32_t gen = __atomic_load_n(&bar_gen, __ATOMIC_ACQUIRE);
    if (__atomic_add_fetch(&bar_count, 1, __ATOMIC_ACQ_REL) == ncpus) {
        __atomic_store_n(&bar_count, 0, __ATOMIC_RELAXED);
        __atomic_store_n(&bar_gen, gen + 1, __ATOMIC_RELEASE);
        return;
    }
    volatile uint64_t end = rdtsc() + ms_to_tsc(watchdog_ms);
    while (__atomic_load_n(&bar_gen, __ATOMIC_ACQUIRE) == gen) {
        if (no_progress_since(&end, watchdog_ms))
            fail("barrier '%s': only %u of %u cpus arrived, and no cpu made progress for %lu s",
                 name, bar_count, ncpus, watchdog_ms / 1000);
        check_failed();
        nap_us(DSM_NAP_US);
    }
}

/* ------------------------------------------------------------------------- */
/* Local APIC and IOAPIC                                                      */

static uint32_t apic_read(uint32_t reg)
{
    if (use_x2apic)
        return (uint32_t)rdmsr(0x800 + (reg >> 4));
    return *(volatile uint32_t *)(LAPIC_ADDR + reg);
}
static void apic_write(uint32_t reg, uint32_t v)
{
    if (use_x2apic)
        wrmsr(0x800 + (reg >> 4), v);
    else
        *(volatile uint32_t *)(LAPIC_ADDR + reg) = v;
}
static uint32_t apic_id(void)
{
    uint32_t v = apic_read(APIC_ID);
    return use_x2apic ? v : v >> 24;
}
static void apic_eoi(void) { apic_write(APIC_EOI, 0); }

/* Halts for about us microseconds (a one-shot LAPIC timer wakes us), giving the host cpu
 * to other vcpus. Only after the timer checks: it reprograms the timer. */
static void nap_us(uint64_t us)
{
    uint64_t count = lapic_khz * us / 1000;
    if (count == 0)
        count = 1;
    if (count > 0xFFFFFFFFULL)
        count = 0xFFFFFFFFULL;
    uint64_t fl = save_cli();
    apic_write(APIC_TIMER_DCR, 0xB); /* divide by 1 */
    apic_write(APIC_LVT_TIMER, VEC_TIMER);
    apic_write(APIC_TIMER_ICR, (uint32_t)count);
    __asm__ volatile("sti; hlt; cli" ::: "memory");
    apic_write(APIC_TIMER_ICR, 0);
    restore_if(fl);
}

/* Sends an IPI; icr is the low ICR word (vector, delivery mode, shorthand). */
static void apic_send(uint32_t dest, uint32_t icr)
{
    uint64_t fl = save_cli();
    if (use_x2apic) {
        wrmsr(0x830, ((uint64_t)dest << 32) | icr);
    } else {
        for (int i = 0; i < 100000 && (apic_read(APIC_ICR_LO) & ICR_BUSY); i++)
            pause();
        apic_write(APIC_ICR_HI, dest << 24);
        apic_write(APIC_ICR_LO, icr);
        for (int i = 0; i < 100000 && (apic_read(APIC_ICR_LO) & ICR_BUSY); i++)
            pause();
    }
    restore_if(fl);
}

static void lapic_init(void)
{
    uint64_t base = rdmsr(MSR_APIC_BASE);
    const uint64_t en = 1 << 11, extd = 1 << 10;
    if (use_x2apic) {
        if (!(base & extd)) {
            if (!(base & en))
                wrmsr(MSR_APIC_BASE, base | en);
            wrmsr(MSR_APIC_BASE, base | en | extd);
        }
    } else {
        if (base & extd) {
            base &= ~(en | extd);
            wrmsr(MSR_APIC_BASE, base); /* x2APIC -> xAPIC must pass through disabled */
        }
        if (!(base & en))
            wrmsr(MSR_APIC_BASE, base | en);
        if ((base & ~0xFFFULL & 0xFFFFFFFFFFULL) != LAPIC_ADDR)
            fail("IA32_APIC_BASE is 0x%lx, expected the LAPIC at 0x%lx", base, LAPIC_ADDR);
    }
    apic_write(APIC_SVR, 0x100 | VEC_SPURIOUS);
    apic_write(APIC_TPR, 0);
    apic_write(APIC_LVT_LINT0, LVT_MASKED);
    apic_write(APIC_LVT_LINT1, LVT_MASKED);
    apic_write(APIC_LVT_ERROR, LVT_MASKED);
    apic_write(APIC_LVT_TIMER, LVT_MASKED | VEC_TIMER);
    apic_write(APIC_TIMER_ICR, 0);
}

static uint32_t ioapic_read(uint32_t reg)
{
    *(volatile uint32_t *)ioapic_base = reg;
    return *(volatile uint32_t *)(ioapic_base + 0x10);
}
static void ioapic_write(uint32_t reg, uint32_t v)
{
    *(volatile uint32_t *)ioapic_base = reg;
    *(volatile uint32_t *)(ioapic_base + 0x10) = v;
}
static void ioapic_route(uint32_t pin, uint32_t low, uint32_t dest)
{
    ioapic_write(0x10 + 2 * pin, LVT_MASKED); /* mask while changing the entry */
    ioapic_write(0x11 + 2 * pin, dest << 24);
    ioapic_write(0x10 + 2 * pin, low);
}

static void ioapic_init(void)
{
    if (!ioapic_base)
        fail("acpi: the MADT lists no IOAPIC");
    ioapic_pins = ((ioapic_read(1) >> 16) & 0xFF) + 1;
    if (uart_gsi >= ioapic_pins)
        fail("ioapic: COM1 is on GSI %u but the IOAPIC has only %u pins", uart_gsi, ioapic_pins);
    for (uint32_t pin = 0; pin < ioapic_pins; pin++)
        ioapic_write(0x10 + 2 * pin, LVT_MASKED);
}

/* ------------------------------------------------------------------------- */
/* Boot information: PVH start_info, command line, ACPI                       */

static int cmdline_has(const char *word)
{
    for (const char *p = cmdline; *p;) {
        while (*p == ' ')
            p++;
        const char *w = word;
        const char *q = p;
        while (*w && *q == *w)
            q++, w++;
        if (!*w && (*q == ' ' || *q == 0))
            return 1;
        while (*p && *p != ' ')
            p++;
    }
    return 0;
}

/* Value of the command-line word "<key>=<decimal>", or def without one (or if malformed). */
static uint64_t cmdline_u64(const char *key, uint64_t def)
{
    for (const char *p = cmdline; *p;) {
        while (*p == ' ')
            p++;
        const char *k = key;
        const char *q = p;
        while (*k && *q == *k)
            q++, k++;
        if (!*k && *q == '=' && q[1] >= '0' && q[1] <= '9') {
            uint64_t v = 0;
            for (q++; *q >= '0' && *q <= '9'; q++) {
                if (v > (~0ULL - 9) / 10)
                    return def;
                v = v * 10 + (uint64_t)(*q - '0');
            }
            if (*q == ' ' || *q == 0)
                return v;
        }
        while (*p && *p != ' ')
            p++;
    }
    return def;
}

static int checksum_ok(const uint8_t *p, uint32_t len)
{
    uint8_t sum = 0;
    for (uint32_t i = 0; i < len; i++)
        sum += p[i];
    return sum == 0;
}

static int sig_is(const uint8_t *p, const char *sig, int n)
{
    for (int i = 0; i < n; i++)
        if (p[i] != (uint8_t)sig[i])
            return 0;
    return 1;
}

static const uint8_t *scan_rsdp(uint64_t start, uint64_t len)
{
    for (uint64_t a = start; a + 20 <= start + len; a += 16) {
        const uint8_t *p = (const uint8_t *)a;
        if (sig_is(p, "RSD PTR ", 8) && checksum_ok(p, 20))
            return p;
    }
    return 0;
}

/* Validates an ACPI table header at phys; fails with a clear message if broken. */
static const uint8_t *acpi_table(uint64_t phys, const char *what)
{
    if (!phys || phys >= 0x100000000ULL)
        fail("acpi: %s at 0x%lx is outside the identity-mapped 4 GiB", what, phys);
    const uint8_t *t = (const uint8_t *)phys;
    uint32_t len = rd32(t + 4);
    if (len < 36 || len > 0x100000)
        fail("acpi: %s at 0x%lx has a bad length %u", what, phys, len);
    if (!checksum_ok(t, len))
        fail("acpi: %s at 0x%lx has a bad checksum", what, phys);
    return t;
}

static void parse_madt(const uint8_t *t)
{
    uint32_t len = rd32(t + 4);
    for (uint32_t off = 44; off + 2 <= len;) {
        const uint8_t *e = t + off;
        uint8_t type = e[0], elen = e[1];
        if (elen < 2 || off + elen > len)
            fail("acpi: MADT entry at offset %u has a bad length %u", off, elen);
        uint32_t id = 0, flags = 0;
        int cpu = 0;
        if (type == 0 && elen >= 8) {
            id = e[3];
            flags = rd32(e + 4);
            cpu = 1;
        } else if (type == 9 && elen >= 16) {
            id = rd32(e + 4);
            flags = rd32(e + 8);
            cpu = 1;
        } else if (type == 1 && elen >= 12 && !ioapic_base) {
            ioapic_base = rd32(e + 4);
        } else if (type == 2 && elen >= 10 && e[3] == COM1_IRQ) {
            uint16_t f = (uint16_t)(e[8] | (e[9] << 8));
            uart_gsi = rd32(e + 4);
            uart_redir_flags = 0;
            if ((f & 3) == 3)
                uart_redir_flags |= 1u << 13; /* active low */
            if (((f >> 2) & 3) == 3)
                uart_redir_flags |= 1u << 15; /* level */
        }
        if (cpu && (flags & 1)) {
            if (ncpus >= MAX_CPUS)
                fail("acpi: the MADT lists more than %u enabled cpus", MAX_CPUS);
            cpus[ncpus].apic_id = id;
            cpus[ncpus].index = ncpus;
            ncpus++;
        }
        off += elen;
    }
    if (!ncpus)
        fail("acpi: the MADT lists no enabled cpu");
}

/* Finds Name(_S5_, Package(){a, ...}) in the DSDT and decodes a (SLP_TYPa). */
static void parse_s5(const uint8_t *t)
{
    uint32_t len = rd32(t + 4);
    for (uint32_t i = 36; i + 8 < len; i++) {
        if (!sig_is(t + i, "_S5_", 4))
            continue;
        const uint8_t *p = t + i + 4;
        if (p[0] != 0x12) /* PackageOp */
            continue;
        uint32_t pkglen_bytes = (p[1] >> 6) + 1;
        if (i + 4 + 1 + pkglen_bytes + 3 > len)
            break;
        const uint8_t *el = p + 1 + pkglen_bytes + 1; /* skip NumElements */
        if (el[0] == 0x0A || el[0] == 0x0B) /* BytePrefix, WordPrefix */
            s5_slp_typ = el[1] & 7;
        else if (el[0] == 0x00 || el[0] == 0x01) /* ZeroOp, OneOp */
            s5_slp_typ = el[0];
        else
            fail("acpi: cannot decode the _S5_ package in the DSDT (element byte 0x%x)", el[0]);
        return;
    }
    fail("acpi: the DSDT has no _S5_ object; cannot power off");
}

static void parse_fadt(const uint8_t *t)
{
    uint32_t len = rd32(t + 4);
    uint64_t dsdt = rd32(t + 40);
    if (len >= 148 && rd64(t + 140))
        dsdt = rd64(t + 140);
    pm1a_cnt_port = (uint16_t)rd32(t + 64);
    if (!pm1a_cnt_port && len >= 184 && t[172] == 1)
        pm1a_cnt_port = (uint16_t)rd64(t + 176);
    pm_tmr_port = (uint16_t)rd32(t + 76);
    if (!pm_tmr_port && len >= 220 && t[208] == 1)
        pm_tmr_port = (uint16_t)rd64(t + 212);
    if (len >= 116 && (rd32(t + 112) & (1u << 8)))
        pm_tmr_mask = 0xFFFFFFFF;
    if (!pm1a_cnt_port)
        fail("acpi: the FADT has no PM1a_CNT_BLK; cannot power off");
    parse_s5(acpi_table(dsdt, "DSDT"));
}

/* NUMA nodes: distinct proximity domains of the SRAT's enabled memory ranges (1 without
 * an SRAT). */
static uint32_t numa_nodes = 1;

static void parse_srat(const uint8_t *t)
{
    uint32_t len = rd32(t + 4);
    uint64_t seen = 0;
    for (uint32_t off = 48; off + 2 <= len;) {
        uint8_t type = t[off], elen = t[off + 1];
        if (elen < 2 || off + elen > len)
            fail("acpi: SRAT entry at offset %u has a bad length %u", off, elen);
        if (type == 1 && elen >= 40 && (rd32(t + off + 28) & 1)) {
            uint32_t domain = rd32(t + off + 2);
            if (domain < 64)
                seen |= 1ULL << domain;
        }
        off += elen;
    }
    uint32_t n = 0;
    for (; seen; seen &= seen - 1)
        n++;
    numa_nodes = n ? n : 1;
}

static void parse_acpi(const struct hvm_start_info *si)
{
    const uint8_t *rsdp = 0;
    if (si->rsdp_paddr && si->rsdp_paddr < 0x100000000ULL)
        rsdp = (const uint8_t *)si->rsdp_paddr;
    if (!rsdp) {
        const volatile uint16_t *bda_ebda;
        __asm__("" : "=r"(bda_ebda) : "0"(0x40EUL)); /* a plain address, not an object */
        uint64_t ebda = (uint64_t)*bda_ebda << 4;
        if (ebda >= 0x80000 && ebda < 0xA0000)
            rsdp = scan_rsdp(ebda, 1024);
    }
    if (!rsdp)
        rsdp = scan_rsdp(0xE0000, 0x20000);
    if (!rsdp)
        fail("acpi: no RSDP (start_info.rsdp_paddr is 0 and none in 0xE0000-0xFFFFF)");
    if (!sig_is(rsdp, "RSD PTR ", 8) || !checksum_ok(rsdp, 20))
        fail("acpi: the RSDP at 0x%lx is invalid", (uint64_t)rsdp);
    uint64_t root;
    int wide = rsdp[15] >= 2 && rd64(rsdp + 24);
    if (wide) {
        if (!checksum_ok(rsdp, rd32(rsdp + 20)))
            fail("acpi: the RSDP extended checksum is bad");
        root = rd64(rsdp + 24);
    } else {
        root = rd32(rsdp + 16);
    }
    const uint8_t *r = acpi_table(root, wide ? "XSDT" : "RSDT");
    if (!sig_is(r, wide ? "XSDT" : "RSDT", 4))
        fail("acpi: the root table at 0x%lx has a bad signature", root);
    uint32_t step = wide ? 8 : 4, n = (rd32(r + 4) - 36) / step;
    const uint8_t *madt = 0, *fadt = 0;
    for (uint32_t i = 0; i < n; i++) {
        uint64_t a = wide ? rd64(r + 36 + 8 * i) : rd32(r + 36 + 4 * i);
        const uint8_t *t = acpi_table(a, "a table listed in the root table");
        if (sig_is(t, "APIC", 4))
            madt = t;
        else if (sig_is(t, "FACP", 4))
            fadt = t;
        else if (sig_is(t, "SRAT", 4))
            parse_srat(t);
    }
    if (!madt)
        fail("acpi: no MADT (APIC) table");
    if (!fadt)
        fail("acpi: no FADT (FACP) table");
    parse_madt(madt);
    parse_fadt(fadt);
}

/* Checks that [start, end) is usable RAM in the PVH memory map. */
static int ram_ok(const struct hvm_start_info *si, uint64_t start, uint64_t end)
{
    if (si->version < 1 || !si->memmap_paddr || !si->memmap_entries)
        return end <= (16ULL << 20); /* no map: trust the minimum RAM size only */
    const struct hvm_memmap_entry *m = (const struct hvm_memmap_entry *)si->memmap_paddr;
    for (uint32_t i = 0; i < si->memmap_entries; i++)
        if (m[i].type == 1 && m[i].addr <= start && m[i].addr + m[i].size >= end)
            return 1;
    return 0;
}

/* ------------------------------------------------------------------------- */
/* Per-CPU setup                                                              */

static void set_gate(int v)
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
/* Checks                                                                     */

static void ok(const char *check, const char *fmt, ...)
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

static void check_ipi_fixed(struct percpu *c)
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

static void check_ipi_broadcast(struct percpu *c)
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

static void check_nmi(struct percpu *c)
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

static void check_timer_periodic(struct percpu *c)
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

static void check_timer_oneshot(struct percpu *c)
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

static void check_tsc_sync(struct percpu *c)
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

static void check_timer_tsc_deadline(struct percpu *c)
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

static void check_ioapic_uart(struct percpu *c)
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

static void check_user(struct percpu *c)
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

static void check_syscall(struct percpu *c)
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

static void check_int3(struct percpu *c)
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
static uint64_t iters_kshared = KSHARED_ITERS;
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
static uint64_t iters_kstream = KSTREAM_ROUNDS;
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
static uint64_t iters_pagetable = PT_ITERS;
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

static void run_checks(struct percpu *c)
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
