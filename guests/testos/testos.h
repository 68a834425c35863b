/* testos: constants shared by the assembly and C parts. */
#ifndef TESTOS_H
#define TESTOS_H

/* GDT selectors (see gdt in boot.S). The order 0x18/0x20/0x28 is what STAR needs. */
#define SEL_KCODE64 0x08
#define SEL_KDATA 0x10
#define SEL_UDATA 0x23
#define SEL_UCODE64 0x2B
#define SEL_KCODE32 0x30
#define SEL_TSS0 0x38

/* Most CPUs testos handles: dvmm's MAX_VCPUS (APIC ids 0..=253). */
#define MAX_CPUS 128 /* per-CPU data is page-aligned; 128 pages fit below 2 MiB */
#define BOOT_STACK_SIZE 16384

/* Offsets into struct percpu used by boot.S. */
#define PERCPU_KSP 8
#define PERCPU_TSS 16
#define PERCPU_SYS_ECHO 24 /* system calls that arrived at CPL0 (SYS_ECHO) */
#define PERCPU_INT80 32    /* int $0x80 that arrived at CPL0 */
#define PERCPU_SYS_BAD 40  /* kernel entries at LSTAR with an unknown number */

/* System-call numbers (RAX) understood by syscall_entry. */
#define SYS_EXIT 0 /* leave user mode: enter_user() returns RDI */
#define SYS_ECHO 1 /* RAX = RDI + 1, R8 = SS, R9 = CS, R10 = RFLAGS at entry; RDX clobbered */

/* Where the AP real-mode trampoline is copied (SIPI vector 0x01). */
#define TRAMPOLINE_ADDR 0x1000

#ifndef __ASSEMBLER__
#include <stdint.h>
#include <stddef.h>

/* The user-mode workload's parameters; lives in user-accessible memory. */
struct user_args {
    uint64_t bitmap;   /* scratch buffer, at least limit / 16 + 8 bytes */
    uint64_t limit;    /* count primes below this */
    uint64_t min_tsc;  /* keep repeating the sieve for at least this many TSC ticks */
    uint64_t max_rounds;
    uint64_t use_ud2;  /* return with ud2 (a #UD the kernel recognises) instead of syscall */
    uint64_t rounds;   /* written by user code */
};

void user_main(struct user_args *args);

/* The syscall check's user-mode part (user_syscalls): system-call round trips, int
 * $0x80, and a jump to LSTAR that must stay a user-mode fault. */
struct sys_args {
    uint64_t rounds;     /* SYS_ECHO round trips */
    uint64_t lstar;      /* where the spoof jumps */
    uint64_t spoof;      /* jump to LSTAR once */
    uint64_t kss, kcs;   /* the SS and CS the kernel entry must see */
    /* Results. */
    uint64_t echo_bad;   /* round trips whose RAX, SS, CS or RFLAGS were wrong */
    uint64_t last_bad_rax, last_bad_ss, last_bad_cs, last_bad_flags;
    uint64_t int80_bad;  /* int $0x80 whose RAX was wrong */
    uint64_t tsc;        /* TSC ticks for the round trips */
};
void user_syscalls(struct sys_args *args);
void user_peek(volatile uint64_t *p);
extern char user_spoof_back[];
extern char user_exit_ud2[];
/* The ud2 with which CPL3 code asks the kernel to halt briefly (a yield). */
extern char user_yield_ud2[];

/*
 * DSM-sensitive checks (counter, spinlock, litmus-*, pingpong): shared variables in
 * user-accessible memory, laid out page by page on purpose. A future multi-node dvmm
 * keeps RAM coherent per 4 KiB page, so "which variables share a page" decides which
 * page ownership transfers a check causes. Every member below that is wrapped in a
 * DSM_PAGE struct sits alone on its own page.
 */
#define DSM_PAGE_SIZE 4096
#define DSM_PAGE __attribute__((aligned(DSM_PAGE_SIZE)))

enum dsm_check {
    DSM_COUNTER = 1,
    DSM_SPINLOCK,
    DSM_MP,
    DSM_SB,
    DSM_IRIW,
    DSM_PINGPONG,
};

/* Why a DSM check's user-mode part stopped (the value user_dsm returns). */
enum dsm_error {
    DSM_OK = 0,
    DSM_E_TIMEOUT,   /* a wait saw no progress: what, expected v1, last seen v2 */
    DSM_E_ABORT,     /* another cpu of the check failed first */
    DSM_E_ORDER,     /* lock xadd returned a smaller value than before: v1 then v2 */
    DSM_E_TORN,      /* spinlock: inside the lock a = v1, b = v2, ticket v3 */
    DSM_E_MP,        /* litmus-mp: flag = v1 but data = v2 */
    DSM_E_SB,        /* litmus-sb: iteration v1: both loads missed the other store */
    DSM_E_IRIW,      /* litmus-iriw: reader 1 saw x >= v1, y = v2; reader 2 y >= v3, x < v1 */
    DSM_E_STALE,     /* a load after a barrier returned v2, outside [v1 - 1, v1] */
    DSM_E_SEQ,       /* pingpong/mp: expected v1, saw v2 */
    DSM_E_BADCHECK,  /* unknown check number */
};

/* A sense-reversing spin barrier (count and sense share a page). */
struct spin_barrier {
    volatile uint64_t count;
    volatile uint64_t sense;
};

/* Shared by all cpus. */
struct dsm_global {
    /* Set by the first cpu whose user-mode part fails, so partners stop waiting. */
    struct { volatile uint64_t abort; } DSM_PAGE ctl;
    /* counter: every cpu's lock xadd hits this page. */
    struct { volatile uint64_t value; } DSM_PAGE counter;
    /* spinlock: the ticket lock's two words on one page ... */
    struct { volatile uint64_t next, serving; } DSM_PAGE lock;
    /* ... and the record it protects, one word per page (a stale copy of either shows). */
    struct { volatile uint64_t v; } DSM_PAGE rec_a;
    struct { volatile uint64_t v; } DSM_PAGE rec_b;
};

/* Shared by the two cpus of a pair (litmus-mp, litmus-sb, pingpong). */
struct dsm_pair {
    struct { volatile uint64_t v; } DSM_PAGE mp_data; /* writer -> reader */
    struct { volatile uint64_t v; } DSM_PAGE mp_flag; /* writer -> reader */
    struct { volatile uint64_t v; } DSM_PAGE mp_ack;  /* reader -> writer */
    struct { volatile uint64_t v; } DSM_PAGE sb_x;    /* written by role 0 */
    struct { volatile uint64_t v; } DSM_PAGE sb_y;    /* written by role 1 */
    struct {
        struct spin_barrier bar;
        volatile uint64_t res[2][2]; /* [role][iteration & 1]: saw the other's store */
    } DSM_PAGE sb_sync;
    struct { volatile uint64_t seq; } DSM_PAGE pingpong; /* both write this one word */
};

/* Shared by the four cpus of a litmus-iriw group; followed (page aligned) by the two
 * readers' logs, DSM_IRIW_LOG_BYTES(iters) each. */
struct dsm_quad {
    struct { volatile uint64_t v; } DSM_PAGE x; /* written by role 0 */
    struct { volatile uint64_t v; } DSM_PAGE y; /* written by role 2 */
    /* Readers' log lengths (entries); a reader sets done after its last entry. */
    struct { volatile uint64_t len[2], done[2]; } DSM_PAGE sync;
    /* Per reader: the latest x and y it has seen (writers wait for both readers). */
    struct { volatile uint64_t v[2]; } DSM_PAGE seen[2];
};
/* A reader logs each new (first, second) pair it sees: at most 2 * iters + 1 entries. */
struct iriw_sample {
    uint32_t first, second;
};
#define DSM_IRIW_LOG_BYTES(iters)                                                                  \
    (((2 * (iters) + 2) * sizeof(struct iriw_sample) + DSM_PAGE_SIZE - 1) &                        \
     ~(uint64_t)(DSM_PAGE_SIZE - 1))

/* One cpu's orders and results for one DSM check (in its private user block). */
struct dsm_args {
    uint64_t check;    /* enum dsm_check */
    uint64_t role;     /* this cpu's index within its pair or group */
    uint64_t members;  /* cpus in the check's group (all cpus for counter/spinlock) */
    uint64_t iters;
    uint64_t wait_tsc; /* the longest any single wait may see no progress, in TSC ticks */
    uint64_t yield_tsc; /* spin this long, then yield (user_yield_ud2); 0: never yield */
    uint64_t pace_tsc;  /* unused (was: litmus-iriw writers' pause between writes) */
    uint64_t use_ud2;
    uint64_t global;   /* struct dsm_global * */
    uint64_t group;    /* struct dsm_pair * or struct dsm_quad * */
    uint64_t logs;     /* litmus-iriw: the readers' two logs (struct iriw_sample[]) */
    /* Results: error details (see enum dsm_error) and per-check statistics. */
    uint64_t what;     /* const char * (in the user image) naming what was awaited */
    uint64_t at, v1, v2, v3;
    uint64_t stat[8];
    /* Written by the check: when a wait last ended (progress), read by the watchdog. */
    volatile uint64_t progress_tsc;
};

void user_dsm(struct dsm_args *args);
#endif

#endif
