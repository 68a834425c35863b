/* One thread per online CPU, each summing a distinct slice of 1..N with a
 * deliberately non-vectorisable loop; the total must equal N(N+1)/2. Each thread
 * also pins itself to its CPU so every CPU (and, on dvmm, every node) runs work. */
#define _GNU_SOURCE
#include <pthread.h>
#include <sched.h>
#include <stdint.h>
#include <stdio.h>
#include <unistd.h>

#define N 400000000ULL
static long ncpu;
static uint64_t partial[256];

static void *work(void *arg)
{
    long i = (long)arg;
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(i, &set);
    sched_setaffinity(0, sizeof set, &set);
    uint64_t lo = N * i / ncpu + 1, hi = N * (i + 1) / ncpu, s = 0;
    for (volatile uint64_t k = lo; k <= hi; k++)
        s += k;
    partial[i] = s;
    return 0;
}

int main(void)
{
    ncpu = sysconf(_SC_NPROCESSORS_ONLN);
    if (ncpu < 1 || ncpu > 256)
        return 2;
    pthread_t t[256];
    for (long i = 0; i < ncpu; i++)
        pthread_create(&t[i], 0, work, (void *)i);
    uint64_t total = 0;
    for (long i = 0; i < ncpu; i++) {
        pthread_join(t[i], 0);
        total += partial[i];
    }
    uint64_t want = N * (N + 1) / 2;
    printf("dvmm-init: parallel threads=%ld sum=%llu expected=%llu\n", ncpu,
           (unsigned long long)total, (unsigned long long)want);
    return total == want ? 0 : 1;
}
