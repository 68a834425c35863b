/*
 * testos's kernel: what its files share. kernel.c boots, takes interrupts and runs
 * the checks; console.c formats, prints and fails; platform.c keeps time and drives
 * the APICs and reads the boot information (PVH start_info, command line, ACPI);
 * checks.c checks interrupts, timers, clocks, user mode and system calls; checks_dsm.c
 * holds the checks that stress the DSM.
 */
#ifndef KERNEL_H
#define KERNEL_H

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

/* ------------------------------------------------------------------------- */
/* Globals (defined in kernel.c unless said otherwise)                        */

extern struct percpu cpus[MAX_CPUS];
extern struct tss tss[MAX_CPUS];
/* Own page: every interrupt reads it, and on a cluster sharing a page with the barrier and
 * console-lock words would make each of their writes invalidate every node's IDT copy. */
extern struct idt_entry idt[256];
extern uint32_t ncpus, bsp_index;
extern int use_x2apic, have_x2apic, have_tsc_deadline, fail_requested, use_ud2, bench_mode;
extern volatile uint32_t pong_flag;
extern volatile uint64_t pong_tsc;
extern uint32_t bsp_apic_id;
extern uint64_t tsc_khz, lapic_khz, watchdog_tsc;
extern const char *timing_source;
extern uint16_t pm1a_cnt_port, pm_tmr_port;
extern uint32_t pm_tmr_mask;
extern int s5_slp_typ;
extern uint64_t ioapic_base;
extern uint32_t ioapic_pins, uart_gsi, uart_redir_flags;
extern char cmdline[256];
extern volatile uint32_t ap_arrived, failed, con_lock, bar_count, bar_gen, uart_total;
extern volatile uint32_t uart_last_cpu;
extern uint64_t watchdog_ms;
extern uint64_t user_ms; /* testos.user-ms: how long the cpl3 sieve runs */
/* DSM checks: the shared pages (see testos.h) and the groups of cpus. */
extern struct dsm_global *dsm_global;
extern struct dsm_pair *dsm_pairs;
extern struct dsm_quad *dsm_quads;
extern uint32_t dsm_npairs, dsm_nquads;
extern uint64_t dsm_iriw_logs; /* per quad, two logs of DSM_IRIW_LOG_BYTES(iters_iriw) */
extern uint64_t iters_counter, iters_spinlock, iters_mp, iters_sb, iters_iriw, iters_pingpong,
    iters_dma;
extern uint64_t iters_kshared, iters_kstream, iters_pagetable; /* checks_dsm.c */
extern uint32_t numa_nodes;                                      /* platform.c */

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
static inline __attribute__((noreturn)) void halt_forever(void)
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

void *memset(void *d, int c, size_t n);
void *memcpy(void *d, const void *s, size_t n);

/* A bounded output buffer for the formatter. */
struct buf {
    char *p;
    size_t cap, len;
};
#define LINE_MAX 1200

static inline uint64_t ms_to_tsc(uint64_t ms) { return ms * tsc_khz; }
static inline uint64_t tsc_to_us(uint64_t t) { return tsc_khz ? t * 1000 / tsc_khz : 0; }
static inline void con_release(void) { __atomic_store_n(&con_lock, 0, __ATOMIC_RELEASE); }

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

/* ------------------------------------------------------------------------- */
/* Functions, in the order of the files that define them: console.c,          */
/* platform.c, checks.c, checks_dsm.c, kernel.c                               */

void bputc(struct buf *b, char ch);
void bnum(struct buf *b, uint64_t v, unsigned base, int width, char pad, int neg);
void vfmt(struct buf *b, const char *fmt, va_list ap);
__attribute__((noreturn)) void fail(const char *fmt, ...);
int no_progress_since(volatile uint64_t *end, uint64_t ms);
void check_failed(void);
void con_acquire(void);
void say(const char *fmt, ...);
__attribute__((noreturn)) void vfail(const char *fmt, va_list ap);
void delay_us(uint64_t us);
void barrier(const char *name);
void nap_barrier(const char *name);
uint32_t apic_read(uint32_t reg);
void apic_write(uint32_t reg, uint32_t v);
uint32_t apic_id(void);
void nap_us(uint64_t us);
void apic_send(uint32_t dest, uint32_t icr);
void lapic_init(void);
void ioapic_write(uint32_t reg, uint32_t v);
void ioapic_route(uint32_t pin, uint32_t low, uint32_t dest);
void ioapic_init(void);
int cmdline_has(const char *word);
uint64_t cmdline_u64(const char *key, uint64_t def);
void parse_acpi(const struct hvm_start_info *si);
int ram_ok(const struct hvm_start_info *si, uint64_t start, uint64_t end);
void ok(const char *check, const char *fmt, ...);
void check_ipi_fixed(struct percpu *c);
void check_ipi_broadcast(struct percpu *c);
void check_nmi(struct percpu *c);
void check_timer_periodic(struct percpu *c);
void check_timer_oneshot(struct percpu *c);
void check_tsc_sync(struct percpu *c);
void check_timer_tsc_deadline(struct percpu *c);
void check_ioapic_uart(struct percpu *c);
void check_user(struct percpu *c);
void check_syscall(struct percpu *c);
void check_int3(struct percpu *c);
void run_checks(struct percpu *c);
void set_gate(int v);
static inline void apic_eoi(void) { apic_write(APIC_EOI, 0); }

#endif
