/* io-bench: block-device throughput as a guest sees it, with O_DIRECT (no page cache):
 *   sequential write and read in 1 MiB requests over the first SIZE MiB, then random
 *   4 KiB reads for SECONDS. Prints one line per test:
 *     io-bench: seq-write MiB=64 s=1.234 MiB/s=51.9
 *     io-bench: seq-read MiB=64 s=0.987 MiB/s=64.8
 *     io-bench: rand-read-4k ops=1234 s=5.000 IOPS=246.8
 * It overwrites the device: give it a scratch disk. Usage: io-bench DEVICE SIZE_MIB SECONDS */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}

int main(int argc, char **argv) {
    if (argc != 4) {
        fprintf(stderr, "usage: io-bench DEVICE SIZE_MIB SECONDS\n");
        return 2;
    }
    long mib = atol(argv[2]);
    double seconds = atof(argv[3]);
    int fd = open(argv[1], O_RDWR | O_DIRECT);
    if (fd < 0) {
        perror("io-bench: open");
        return 1;
    }
    const size_t big = 1 << 20;
    void *buf;
    if (posix_memalign(&buf, 4096, big)) {
        return 1;
    }
    memset(buf, 0x5a, big);
    double t0 = now();
    for (long i = 0; i < mib; i++) {
        if (pwrite(fd, buf, big, (off_t)i * big) != (ssize_t)big) {
            perror("io-bench: write");
            return 1;
        }
    }
    fdatasync(fd);
    double t = now() - t0;
    printf("io-bench: seq-write MiB=%ld s=%.3f MiB/s=%.1f\n", mib, t, mib / t);
    t0 = now();
    for (long i = 0; i < mib; i++) {
        if (pread(fd, buf, big, (off_t)i * big) != (ssize_t)big) {
            perror("io-bench: read");
            return 1;
        }
    }
    t = now() - t0;
    printf("io-bench: seq-read MiB=%ld s=%.3f MiB/s=%.1f\n", mib, t, mib / t);
    uint64_t x = 0x9e3779b97f4a7c15ull, ops = 0;
    long blocks = mib * 256;
    t0 = now();
    while ((t = now() - t0) < seconds) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        if (pread(fd, buf, 4096, (off_t)(x % blocks) * 4096) != 4096) {
            perror("io-bench: random read");
            return 1;
        }
        ops++;
    }
    printf("io-bench: rand-read-4k ops=%llu s=%.3f IOPS=%.1f\n", (unsigned long long)ops, t,
           ops / t);
    return 0;
}
