/* testos: time, the local APIC and IOAPIC, and the boot information (PVH start_info,
 * command line, ACPI tables). */
#include "kernel.h"

/* ------------------------------------------------------------------------- */
/* Time                                                                       */


void delay_us(uint64_t us)
{
    uint64_t end = rdtsc() + us * tsc_khz / 1000;
    while (rdtsc() < end) {
        check_failed();
        pause();
    }
}

/* All CPUs meet here; fails if some CPU does not arrive while none makes progress for
 * the watchdog's time (testos.watchdog): how long the others take depends on the host
 * (8 nodes sharing 2 cores print slowly), not on dvmm. With nap, the waiters halt
 * between looks (so that on an oversubscribed host the cpus still working get the host
 * cpus). */
static void meet(const char *name, int nap)
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
        if (nap)
            nap_us(DSM_NAP_US);
        else
            pause();
    }
}

void barrier(const char *name) { meet(name, 0); }
void nap_barrier(const char *name) { meet(name, 1); }

/* ------------------------------------------------------------------------- */
/* Local APIC and IOAPIC                                                      */

uint32_t apic_read(uint32_t reg)
{
    if (use_x2apic)
        return (uint32_t)rdmsr(0x800 + (reg >> 4));
    return *(volatile uint32_t *)(LAPIC_ADDR + reg);
}
void apic_write(uint32_t reg, uint32_t v)
{
    if (use_x2apic)
        wrmsr(0x800 + (reg >> 4), v);
    else
        *(volatile uint32_t *)(LAPIC_ADDR + reg) = v;
}
uint32_t apic_id(void)
{
    uint32_t v = apic_read(APIC_ID);
    return use_x2apic ? v : v >> 24;
}

/* Halts for about us microseconds (a one-shot LAPIC timer wakes us), giving the host cpu
 * to other vcpus. Only after the timer checks: it reprograms the timer. */
void nap_us(uint64_t us)
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
void apic_send(uint32_t dest, uint32_t icr)
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

void lapic_init(void)
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
void ioapic_write(uint32_t reg, uint32_t v)
{
    *(volatile uint32_t *)ioapic_base = reg;
    *(volatile uint32_t *)(ioapic_base + 0x10) = v;
}
void ioapic_route(uint32_t pin, uint32_t low, uint32_t dest)
{
    ioapic_write(0x10 + 2 * pin, LVT_MASKED); /* mask while changing the entry */
    ioapic_write(0x11 + 2 * pin, dest << 24);
    ioapic_write(0x10 + 2 * pin, low);
}

void ioapic_init(void)
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

int cmdline_has(const char *word)
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
uint64_t cmdline_u64(const char *key, uint64_t def)
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
uint32_t numa_nodes = 1;

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

void parse_acpi(const struct hvm_start_info *si)
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
int ram_ok(const struct hvm_start_info *si, uint64_t start, uint64_t end)
{
    if (si->version < 1 || !si->memmap_paddr || !si->memmap_entries)
        return end <= (16ULL << 20); /* no map: trust the minimum RAM size only */
    const struct hvm_memmap_entry *m = (const struct hvm_memmap_entry *)si->memmap_paddr;
    for (uint32_t i = 0; i < si->memmap_entries; i++)
        if (m[i].type == 1 && m[i].addr <= start && m[i].addr + m[i].size >= end)
            return 1;
    return 0;
}
