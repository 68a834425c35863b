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
    if (args->use_ud2)
        __asm__ volatile(".globl user_exit_ud2\nuser_exit_ud2: ud2" ::"D"(result) : "memory");
    else
        __asm__ volatile("syscall" ::"D"(result) : "rcx", "r11", "memory");
    for (;;)
        __asm__ volatile("pause");
}
