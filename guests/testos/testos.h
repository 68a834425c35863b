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
#define MAX_CPUS 254
#define BOOT_STACK_SIZE 16384

/* Offsets into struct percpu used by boot.S. */
#define PERCPU_KSP 8
#define PERCPU_TSS 16

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
extern char user_exit_ud2[];
#endif

#endif
