/* smp-check: what a program written for one big SMP box needs from the machine it
 * runs on, checked. One thread per online CPU, each pinned to its CPU:
 *   - atomic: a shared counter incremented with __atomic_fetch_add; must end exact;
 *   - mutex: a plain counter incremented under a pthread mutex; must end exact, and no
 *     thread may see it move while it holds the lock;
 *   - message passing: CPU i sends to CPU i+1 (mod n) a sequence of messages, each a
 *     data word then a flag (release/acquire); the receiver must never see a flag
 *     without its data;
 *   - numa: every thread touches fresh memory and asks the kernel (get_mempolicy) where
 *     its pages are: they must be on the NUMA node of the thread's CPU (getcpu).
 * Prints "smp-check: ... ok" lines and "smp-check: PASS", or "smp-check: FAIL ..." and
 * exits 1. Usage: smp-check [iterations] (default 2000). */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#define MAX_CPUS 256
#define NUMA_PAGES 256

static long ncpu, iters;
static uint64_t atomic_counter;
static uint64_t plain_counter;
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_barrier_t start;

/* One message channel per receiving CPU, on its own cache lines (and pages). */
struct channel {
    volatile uint64_t data __attribute__((aligned(4096)));
    volatile uint64_t flag __attribute__((aligned(64)));
    volatile uint64_t ack __attribute__((aligned(64)));
};
static struct channel chan[MAX_CPUS];

struct result {
    long cpu, node;
    uint64_t mutex_torn, mp_stale, mp_got;
    long numa_local, numa_other, numa_bad, numa_err;
    int pin_err;
};
static struct result res[MAX_CPUS];

static void *worker(void *arg)
{
    long i = (long)arg;
    struct result *r = &res[i];
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(i, &set);
    r->pin_err = sched_setaffinity(0, sizeof set, &set) != 0;
    unsigned cpu = 0, node = 0;
    syscall(SYS_getcpu, &cpu, &node, NULL);
    r->cpu = cpu;
    r->node = node;
    pthread_barrier_wait(&start);

    for (long k = 0; k < iters; k++)
        __atomic_fetch_add(&atomic_counter, 1, __ATOMIC_SEQ_CST);

    for (long k = 0; k < iters; k++) {
        pthread_mutex_lock(&lock);
        uint64_t v = plain_counter;
        for (volatile int d = 0; d < 20; d++)
            ;
        if (plain_counter != v)
            r->mutex_torn++;
        plain_counter = v + 1;
        pthread_mutex_unlock(&lock);
    }
    pthread_barrier_wait(&start);

    /* Message passing: send to the next CPU while receiving from the previous one. */
    if (ncpu > 1) {
        struct channel *out = &chan[(i + 1) % ncpu], *in = &chan[i];
        long sent = 0, got = 0;
        while (sent < iters || got < iters) {
            if (sent < iters && out->ack == (uint64_t)sent) {
                out->data = (uint64_t)(sent + 1) * 7919;
                __atomic_store_n(&out->flag, (uint64_t)(sent + 1), __ATOMIC_RELEASE);
                sent++;
            }
            uint64_t f = __atomic_load_n(&in->flag, __ATOMIC_ACQUIRE);
            if (f == (uint64_t)(got + 1)) {
                if (in->data != f * 7919)
                    r->mp_stale++;
                got++;
                __atomic_store_n(&in->ack, (uint64_t)got, __ATOMIC_RELEASE);
            } else if (f == (uint64_t)got) {
                sched_yield();
            }
        }
        r->mp_got = (uint64_t)got;
    }
    pthread_barrier_wait(&start);

    /* NUMA: first touch, then ask where the pages are. The pages sit in a 2 MiB-aligned
     * window of this thread's own mapping: with transparent huge pages a fault fills
     * the whole aligned 2 MiB, and a window shared with another thread's mapping (the
     * kernel merges adjacent anonymous mappings) would be filled by whichever thread
     * touched it first. */
    long page = sysconf(_SC_PAGESIZE);
    size_t huge = 2ul << 20, len = 2 * huge;
    char *map = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (map == MAP_FAILED) {
        r->numa_err = errno;
        return 0;
    }
    char *mem = (char *)(((uintptr_t)map + huge - 1) & ~(uintptr_t)(huge - 1));
    for (int p = 0; p < NUMA_PAGES; p++)
        mem[p * page] = (char)p;
    /* get_mempolicy(MPOL_F_NODE | MPOL_F_ADDR) names the node of the page at an address;
     * unlike move_pages' status it looks the page up as an access would, so a page
     * that NUMA balancing has just made PROT_NONE (a hinting fault pending; the scanner
     * reaches a task after ~1 s of its run time, which a slow machine gets to) still
     * counts, instead of reading as "not present". */
    for (int p = 0; p < NUMA_PAGES; p++) {
        int node = -1;
        if (syscall(SYS_get_mempolicy, &node, NULL, 0, mem + p * page, 3 /* F_NODE|F_ADDR */)) {
            r->numa_bad++;
            r->numa_err = errno;
        } else if (node == (int)r->node) {
            r->numa_local++;
        } else {
            r->numa_other++;
        }
    }
    munmap(map, len);
    return 0;
}

int main(int argc, char **argv)
{
    setvbuf(stdout, NULL, _IOLBF, 0);
    ncpu = sysconf(_SC_NPROCESSORS_ONLN);
    iters = argc > 1 ? atol(argv[1]) : 2000;
    if (ncpu < 1 || ncpu > MAX_CPUS || iters < 1) {
        printf("smp-check: FAIL bad setup (cpus %ld, iterations %ld)\n", ncpu, iters);
        return 1;
    }
    pthread_barrier_init(&start, NULL, (unsigned)ncpu);
    pthread_t t[MAX_CPUS];
    for (long i = 0; i < ncpu; i++)
        if (pthread_create(&t[i], NULL, worker, (void *)i) != 0) {
            printf("smp-check: FAIL cannot start thread %ld\n", i);
            return 1;
        }
    for (long i = 0; i < ncpu; i++)
        pthread_join(t[i], NULL);

    int failed = 0;
    uint64_t want = (uint64_t)ncpu * (uint64_t)iters, torn = 0, stale = 0;
    for (long i = 0; i < ncpu; i++) {
        if (res[i].pin_err || res[i].cpu != i) {
            printf("smp-check: FAIL thread %ld runs on cpu %ld, not its own\n", i, res[i].cpu);
            failed = 1;
        }
        torn += res[i].mutex_torn;
        stale += res[i].mp_stale;
    }
    printf("smp-check: threads=%ld iterations=%ld\n", ncpu, iters);
    if (atomic_counter != want) {
        printf("smp-check: FAIL atomic counter %llu, expected %llu\n",
               (unsigned long long)atomic_counter, (unsigned long long)want);
        failed = 1;
    } else {
        printf("smp-check: atomic ok (counter %llu = %ld threads x %ld)\n",
               (unsigned long long)atomic_counter, ncpu, iters);
    }
    if (plain_counter != want || torn) {
        printf("smp-check: FAIL mutex counter %llu, expected %llu; %llu torn updates\n",
               (unsigned long long)plain_counter, (unsigned long long)want,
               (unsigned long long)torn);
        failed = 1;
    } else {
        printf("smp-check: mutex ok (plain counter %llu, never torn)\n",
               (unsigned long long)plain_counter);
    }
    if (ncpu > 1) {
        int mp_ok = stale == 0;
        for (long i = 0; i < ncpu; i++)
            mp_ok &= res[i].mp_got == (uint64_t)iters;
        if (!mp_ok) {
            printf("smp-check: FAIL message passing: %llu stale reads\n",
                   (unsigned long long)stale);
            failed = 1;
        } else {
            printf("smp-check: message-passing ok (%ld messages per cpu pair, data never "
                   "stale)\n",
                   iters);
        }
    }
    for (long i = 0; i < ncpu; i++) {
        struct result *r = &res[i];
        if (r->numa_err) {
            printf("smp-check: FAIL numa: on cpu %ld (mmap, or get_mempolicy for %ld of %d pages): %s\n", i,
                   r->numa_bad, NUMA_PAGES, strerror(r->numa_err));
            failed = 1;
        } else if (r->numa_other) {
            printf("smp-check: FAIL numa: cpu %ld (node %ld): %ld of %d fresh pages on another "
                   "node\n",
                   i, r->node, r->numa_other, NUMA_PAGES);
            failed = 1;
        } else {
            printf("smp-check: numa ok (cpu %ld node %ld: %ld/%d fresh pages local)\n", i,
                   r->node, r->numa_local, NUMA_PAGES);
        }
    }
    printf("smp-check: %s\n", failed ? "FAIL" : "PASS");
    return failed;
}
