/* testos: formatting, the serial console, and failing. */
#include "kernel.h"

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


void bputc(struct buf *b, char ch)
{
    if (b->len + 1 < b->cap)
        b->p[b->len++] = ch;
}
static void bputs(struct buf *b, const char *s)
{
    while (*s)
        bputc(b, *s++);
}
void bnum(struct buf *b, uint64_t v, unsigned base, int width, char pad, int neg)
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
void vfmt(struct buf *b, const char *fmt, va_list ap)
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

__attribute__((noreturn)) void fail(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vfail(fmt, ap);
}


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
int no_progress_since(volatile uint64_t *end, uint64_t ms)
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
void check_failed(void)
{
    if (failed)
        halt_forever();
    if (tsc_khz && no_progress_since(&watchdog_tsc, watchdog_ms))
        fail("watchdog: no cpu finished a check or made progress in one for %lu s "
             "(testos.watchdog=<s> to change)",
             watchdog_ms / 1000);
}

void con_acquire(void)
{
    while (__atomic_exchange_n(&con_lock, 1, __ATOMIC_ACQUIRE)) {
        if (failed)
            halt_forever();
        pause();
    }
}

/* Prints "testos: <formatted>\n" as one line that never interleaves with others. */
void say(const char *fmt, ...)
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

void vfail(const char *fmt, va_list ap)
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
