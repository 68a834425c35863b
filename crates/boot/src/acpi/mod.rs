//! ACPI tables: RSDP, XSDT, FADT (+FACS), DSDT, MADT, SRAT and SLIT, placed in
//! `[ACPI_TABLES_ADDR, ACPI_TABLES_END)`.

pub mod aml;

use dvmm_layout::{
    ACPI_TABLES_ADDR, ACPI_TABLES_END, COM1_IRQ, COM1_PORT, IOAPIC_ADDR, IOAPIC_ID, LAPIC_ADDR,
    MAX_VCPUS, PIT_GSI, PIT_IRQ, PM1A_CNT_PORT, PM1A_EVT_PORT, PM_TMR_PORT, PVPANIC_PORT,
    RESET_PORT, RESET_VALUE, RTC_CENTURY_INDEX, RTC_IRQ, RTC_PORT, S5_SLP_TYP, SCI_IRQ,
};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::{BootError, Topology};

const OEM_ID: [u8; 6] = *b"DVMM  ";
const CREATOR_ID: [u8; 4] = *b"DVMM";
/// Size of the common table header.
pub const HEADER_LEN: usize = 36;
/// Size of a revision 2 RSDP.
pub const RSDP_LEN: usize = 36;
/// Size of a revision 6 FADT.
pub const FADT_LEN: usize = 276;
/// Size of the FACS.
pub const FACS_LEN: usize = 64;

// FADT flags.
const FADT_WBINVD: u32 = 1 << 0;
const FADT_PROC_C1: u32 = 1 << 2;
const FADT_PWR_BUTTON: u32 = 1 << 4;
const FADT_SLP_BUTTON: u32 = 1 << 5;
const FADT_FIX_RTC: u32 = 1 << 6;
const FADT_RESET_REG_SUP: u32 = 1 << 10;
const FADT_APIC_PHYSICAL: u32 = 1 << 19;
// IAPC_BOOT_ARCH flags.
const BOOT_ARCH_LEGACY_DEVICES: u16 = 1 << 0;
const BOOT_ARCH_8042: u16 = 1 << 1;
// GAS address space and access sizes.
const GAS_SYSTEM_IO: u8 = 1;
const GAS_ACCESS_BYTE: u8 = 1;
const GAS_ACCESS_WORD: u8 = 2;
const GAS_ACCESS_DWORD: u8 = 3;
// MADT.
const MADT_PCAT_COMPAT: u32 = 1;
const MADT_LOCAL_APIC: u8 = 0;
const MADT_IO_APIC: u8 = 1;
const MADT_INT_SRC_OVERRIDE: u8 = 2;
const MADT_LOCAL_APIC_NMI: u8 = 4;
const MPS_INTI_ACTIVE_HIGH: u16 = 0b01;
const MPS_INTI_LEVEL: u16 = 0b11 << 2;
// SLIT distances.
const LOCAL_DISTANCE: u8 = 10;
const REMOTE_DISTANCE: u8 = 20;

/// Sum of bytes, for checksums.
pub fn byte_sum(bytes: &[u8]) -> u8 {
    bytes.iter().fold(0u8, |a, &b| a.wrapping_add(b))
}

/// A system description table under construction: header first, body appended.
struct Sdt(Vec<u8>);

impl Sdt {
    fn new(signature: &[u8; 4], revision: u8) -> Sdt {
        let mut v = Vec::with_capacity(256);
        v.extend_from_slice(signature);
        v.extend_from_slice(&[0; 4]); // length, patched in finish()
        v.push(revision);
        v.push(0); // checksum, patched in finish()
        v.extend_from_slice(&OEM_ID);
        v.extend_from_slice(b"DVMM");
        v.extend_from_slice(signature); // OEM table id
        v.extend_from_slice(&1u32.to_le_bytes()); // OEM revision
        v.extend_from_slice(&CREATOR_ID);
        v.extend_from_slice(&1u32.to_le_bytes()); // creator revision
        Sdt(v)
    }
    fn u8(&mut self, v: u8) -> &mut Self {
        self.0.push(v);
        self
    }
    fn u16(&mut self, v: u16) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn u32(&mut self, v: u32) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn u64(&mut self, v: u64) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn bytes(&mut self, v: &[u8]) -> &mut Self {
        self.0.extend_from_slice(v);
        self
    }
    /// A Generic Address Structure.
    fn gas(&mut self, space: u8, bit_width: u8, access: u8, address: u64) -> &mut Self {
        self.u8(space).u8(bit_width).u8(0).u8(access).u64(address)
    }
    fn finish(mut self) -> Vec<u8> {
        let len = self.0.len() as u32;
        self.0[4..8].copy_from_slice(&len.to_le_bytes());
        self.0[9] = 0u8.wrapping_sub(byte_sum(&self.0));
        self.0
    }
}

fn rsdp(xsdt: u64) -> Vec<u8> {
    let mut v = Vec::with_capacity(RSDP_LEN);
    v.extend_from_slice(b"RSD PTR ");
    v.push(0); // checksum of the first 20 bytes
    v.extend_from_slice(&OEM_ID);
    v.push(2); // revision
    v.extend_from_slice(&0u32.to_le_bytes()); // no RSDT
    v.extend_from_slice(&(RSDP_LEN as u32).to_le_bytes());
    v.extend_from_slice(&xsdt.to_le_bytes());
    v.push(0); // extended checksum
    v.extend_from_slice(&[0; 3]);
    v[8] = 0u8.wrapping_sub(byte_sum(&v[..20]));
    v[32] = 0u8.wrapping_sub(byte_sum(&v));
    v
}

fn xsdt(tables: &[u64]) -> Vec<u8> {
    let mut t = Sdt::new(b"XSDT", 1);
    for &a in tables {
        t.u64(a);
    }
    t.finish()
}

fn fadt(facs: u64, dsdt: u64) -> Vec<u8> {
    let mut t = Sdt::new(b"FACP", 6);
    // 32-bit pointers are only valid below 4 GiB; ours always are.
    let facs32 = u32::try_from(facs).unwrap_or(0);
    let dsdt32 = u32::try_from(dsdt).unwrap_or(0);
    t.u32(facs32) // 36 FIRMWARE_CTRL
        .u32(dsdt32) // 40 DSDT
        .u8(0) // 44 reserved
        .u8(0) // 45 preferred PM profile: unspecified
        .u16(SCI_IRQ as u16) // 46 SCI_INT
        .u32(0) // 48 SMI_CMD: ACPI always enabled
        .u8(0) // 52 ACPI_ENABLE
        .u8(0) // 53 ACPI_DISABLE
        .u8(0) // 54 S4BIOS_REQ
        .u8(0) // 55 PSTATE_CNT
        .u32(u32::from(PM1A_EVT_PORT)) // 56 PM1a_EVT_BLK
        .u32(0) // 60 PM1b_EVT_BLK
        .u32(u32::from(PM1A_CNT_PORT)) // 64 PM1a_CNT_BLK
        .u32(0) // 68 PM1b_CNT_BLK
        .u32(0) // 72 PM2_CNT_BLK
        .u32(u32::from(PM_TMR_PORT)) // 76 PM_TMR_BLK
        .u32(0) // 80 GPE0_BLK
        .u32(0) // 84 GPE1_BLK
        .u8(4) // 88 PM1_EVT_LEN
        .u8(2) // 89 PM1_CNT_LEN
        .u8(0) // 90 PM2_CNT_LEN
        .u8(4) // 91 PM_TMR_LEN
        .u8(0) // 92 GPE0_BLK_LEN
        .u8(0) // 93 GPE1_BLK_LEN
        .u8(0) // 94 GPE1_BASE
        .u8(0) // 95 CST_CNT
        .u16(101) // 96 P_LVL2_LAT: > 100, C2 not supported
        .u16(1001) // 98 P_LVL3_LAT: > 1000, C3 not supported
        .u16(0) // 100 FLUSH_SIZE
        .u16(0) // 102 FLUSH_STRIDE
        .u8(0) // 104 DUTY_OFFSET
        .u8(0) // 105 DUTY_WIDTH
        .u8(0) // 106 DAY_ALRM
        .u8(0) // 107 MON_ALRM
        .u8(RTC_CENTURY_INDEX) // 108 CENTURY: CMOS index of the century byte
        .u16(BOOT_ARCH_LEGACY_DEVICES | BOOT_ARCH_8042) // 109 IAPC_BOOT_ARCH
        .u8(0) // 111 reserved
        .u32(
            FADT_WBINVD
                | FADT_PROC_C1
                | FADT_PWR_BUTTON
                | FADT_SLP_BUTTON
                | FADT_FIX_RTC
                | FADT_RESET_REG_SUP
                | FADT_APIC_PHYSICAL,
        ) // 112 flags
        .gas(GAS_SYSTEM_IO, 8, GAS_ACCESS_BYTE, u64::from(RESET_PORT)) // 116 RESET_REG
        .u8(RESET_VALUE) // 128 RESET_VALUE
        .u16(0) // 129 ARM_BOOT_ARCH
        .u8(0) // 131 FADT minor version
        .u64(0) // 132 X_FIRMWARE_CTRL: zero, since FIRMWARE_CTRL holds the FACS (ACPI 6.x 5.2.9)
        .u64(dsdt) // 140 X_DSDT
        .gas(GAS_SYSTEM_IO, 32, GAS_ACCESS_WORD, u64::from(PM1A_EVT_PORT)) // 148
        .gas(0, 0, 0, 0) // 160 X_PM1b_EVT_BLK
        .gas(GAS_SYSTEM_IO, 16, GAS_ACCESS_WORD, u64::from(PM1A_CNT_PORT)) // 172
        .gas(0, 0, 0, 0) // 184 X_PM1b_CNT_BLK
        .gas(0, 0, 0, 0) // 196 X_PM2_CNT_BLK
        .gas(GAS_SYSTEM_IO, 32, GAS_ACCESS_DWORD, u64::from(PM_TMR_PORT)) // 208
        .gas(0, 0, 0, 0) // 220 X_GPE0_BLK
        .gas(0, 0, 0, 0) // 232 X_GPE1_BLK
        .gas(0, 0, 0, 0) // 244 SLEEP_CONTROL_REG
        .gas(0, 0, 0, 0) // 256 SLEEP_STATUS_REG
        .bytes(b"DVMM\0\0\0\0"); // 268 hypervisor vendor identity
    t.finish()
}

fn facs() -> Vec<u8> {
    let mut v = vec![0u8; FACS_LEN];
    v[0..4].copy_from_slice(b"FACS");
    v[4..8].copy_from_slice(&(FACS_LEN as u32).to_le_bytes());
    v[32] = 2; // version
    v
}

/// The DSDT's AML body (without the table header).
pub fn dsdt_aml() -> Vec<u8> {
    use aml::*;
    let s5 = u64::from(S5_SLP_TYP);
    let mut body = name(
        "_S5_",
        &package(&[integer(s5), integer(s5), integer(0), integer(0)]),
    );
    // EISA ids are compile-time literals; `None` cannot happen.
    let pnp = |id: &str| dword(eisa_id(id).unwrap_or(0));
    let com1 = device(
        "COM1",
        &[
            name("_HID", &pnp("PNP0501")),
            name("_UID", &integer(1)),
            name(
                "_CRS",
                &resource_template(&[io(COM1_PORT, COM1_PORT, 0, 8), irq_no_flags(COM1_IRQ)]),
            ),
        ]
        .concat(),
    );
    let rtc = device(
        "RTC_",
        &[
            name("_HID", &pnp("PNP0B00")),
            name(
                "_CRS",
                &resource_template(&[io(RTC_PORT, RTC_PORT, 0, 2), irq_no_flags(RTC_IRQ)]),
            ),
        ]
        .concat(),
    );
    let pvpanic = device(
        "PEVT",
        &[
            name("_HID", &string("QEMU0001")),
            name(
                "_CRS",
                &resource_template(&[io(PVPANIC_PORT, PVPANIC_PORT, 1, 1)]),
            ),
            name("_STA", &integer(0xF)),
        ]
        .concat(),
    );
    body.extend(scope("\\_SB_", &[com1, rtc, pvpanic].concat()));
    body
}

fn dsdt() -> Vec<u8> {
    let mut t = Sdt::new(b"DSDT", 2);
    t.bytes(&dsdt_aml());
    t.finish()
}

fn madt(topology: &Topology) -> Vec<u8> {
    let mut t = Sdt::new(b"APIC", 5);
    t.u32(LAPIC_ADDR as u32).u32(MADT_PCAT_COMPAT);
    for id in 0..topology.vcpus {
        // build_tables checked vcpus <= MAX_VCPUS, so the id fits a byte.
        let id = id as u8;
        t.u8(MADT_LOCAL_APIC).u8(8).u8(id).u8(id).u32(1);
    }
    t.u8(MADT_IO_APIC)
        .u8(12)
        .u8(IOAPIC_ID)
        .u8(0)
        .u32(IOAPIC_ADDR as u32)
        .u32(0);
    t.u8(MADT_INT_SRC_OVERRIDE)
        .u8(10)
        .u8(0)
        .u8(PIT_IRQ as u8)
        .u32(PIT_GSI)
        .u16(0);
    t.u8(MADT_INT_SRC_OVERRIDE)
        .u8(10)
        .u8(0)
        .u8(SCI_IRQ as u8)
        .u32(SCI_IRQ)
        .u16(MPS_INTI_ACTIVE_HIGH | MPS_INTI_LEVEL);
    t.u8(MADT_LOCAL_APIC_NMI).u8(6).u8(0xFF).u16(0).u8(1);
    t.finish()
}

fn srat(topology: &Topology) -> Vec<u8> {
    let mut t = Sdt::new(b"SRAT", 3);
    t.u32(1).u64(0); // reserved (1 for compatibility), reserved
    for (domain, node) in topology.nodes.iter().enumerate() {
        let domain = domain as u32;
        for r in &node.ram {
            t.u8(1) // memory affinity
                .u8(40)
                .u32(domain)
                .u16(0)
                .u64(r.start)
                .u64(r.len)
                .u32(0)
                .u32(1) // enabled
                .u64(0);
        }
        for id in node.vcpus.clone() {
            let [d0, d1, d2, d3] = domain.to_le_bytes();
            t.u8(0) // processor local APIC affinity
                .u8(16)
                .u8(d0)
                .u8(id as u8)
                .u32(1) // enabled
                .u8(0) // local SAPIC EID
                .bytes(&[d1, d2, d3])
                .u32(0); // clock domain
        }
    }
    t.finish()
}

fn slit(topology: &Topology) -> Vec<u8> {
    let n = topology.nodes.len();
    let mut t = Sdt::new(b"SLIT", 1);
    t.u64(n as u64);
    for i in 0..n {
        for j in 0..n {
            t.u8(if i == j {
                LOCAL_DISTANCE
            } else {
                REMOTE_DISTANCE
            });
        }
    }
    t.finish()
}

fn check_topology(topology: &Topology) -> Result<(), BootError> {
    let bad = |m: String| Err(BootError::Topology(m));
    if topology.vcpus == 0 || topology.vcpus > MAX_VCPUS {
        return bad(format!(
            "{} vCPUs; between 1 and {MAX_VCPUS} are supported",
            topology.vcpus
        ));
    }
    if topology.nodes.is_empty() {
        return bad("no NUMA nodes; at least one is needed".into());
    }
    for (i, n) in topology.nodes.iter().enumerate() {
        if n.vcpus.end > topology.vcpus {
            return bad(format!(
                "node {i} has vCPUs {:?} but the VM has only {}",
                n.vcpus, topology.vcpus
            ));
        }
    }
    Ok(())
}

fn align_up(v: u64, a: u64) -> u64 {
    v.div_ceil(a) * a
}

/// Build the tables as bytes (for tests and for the stock-kernel work later):
/// `(address, bytes)` chunks, the RSDP first.
pub fn build_tables(topology: &Topology) -> Result<Vec<(u64, Vec<u8>)>, BootError> {
    check_topology(topology)?;
    let dsdt = dsdt();
    let madt = madt(topology);
    let srat = srat(topology);
    let slit = slit(topology);

    // Lay out: RSDP, XSDT, FADT, FACS (64-byte aligned), DSDT, MADT, SRAT, SLIT.
    let mut next = ACPI_TABLES_ADDR;
    let mut place = |len: usize, align: u64| {
        let at = align_up(next, align);
        next = at + len as u64;
        at
    };
    let rsdp_at = place(RSDP_LEN, 16);
    let xsdt_at = place(HEADER_LEN + 4 * 8, 16);
    let fadt_at = place(FADT_LEN, 16);
    let facs_at = place(FACS_LEN, 64);
    let dsdt_at = place(dsdt.len(), 16);
    let madt_at = place(madt.len(), 16);
    let srat_at = place(srat.len(), 16);
    let slit_at = place(slit.len(), 16);
    if next > ACPI_TABLES_END {
        return Err(BootError::AcpiTooLarge {
            size: next - ACPI_TABLES_ADDR,
        });
    }
    Ok(vec![
        (rsdp_at, rsdp(xsdt_at)),
        (xsdt_at, xsdt(&[fadt_at, madt_at, srat_at, slit_at])),
        (fadt_at, fadt(facs_at, dsdt_at)),
        (facs_at, facs()),
        (dsdt_at, dsdt),
        (madt_at, madt),
        (srat_at, srat),
        (slit_at, slit),
    ])
}

/// Write RSDP (rev 2, at `ACPI_TABLES_ADDR`), XSDT, FADT (+FACS), DSDT, MADT, SRAT,
/// SLIT into `[ACPI_TABLES_ADDR, ACPI_TABLES_END)`; return the RSDP address.
pub fn write_tables(mem: &GuestMemoryMmap, topology: &Topology) -> Result<u64, BootError> {
    let chunks = build_tables(topology)?;
    let area = vec![0u8; (ACPI_TABLES_END - ACPI_TABLES_ADDR) as usize];
    let write = |addr: u64, bytes: &[u8]| {
        mem.write_slice(bytes, GuestAddress(addr)).map_err(|e| {
            BootError::GuestMemory(format!(
                "cannot write ACPI tables at {addr:#x} ({} bytes): {e}",
                bytes.len()
            ))
        })
    };
    write(ACPI_TABLES_ADDR, &area)?;
    for (addr, bytes) in &chunks {
        write(*addr, bytes)?;
    }
    Ok(ACPI_TABLES_ADDR)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn u16_at(b: &[u8], o: usize) -> u16 {
        u16::from_le_bytes(b[o..o + 2].try_into().unwrap())
    }
    fn u32_at(b: &[u8], o: usize) -> u32 {
        u32::from_le_bytes(b[o..o + 4].try_into().unwrap())
    }
    fn u64_at(b: &[u8], o: usize) -> u64 {
        u64::from_le_bytes(b[o..o + 8].try_into().unwrap())
    }

    fn table<'a>(chunks: &'a [(u64, Vec<u8>)], sig: &[u8; 4]) -> (u64, &'a [u8]) {
        let (a, b) = chunks.iter().find(|(_, b)| &b[0..4] == sig).unwrap();
        (*a, b)
    }

    /// Splits the MADT/SRAT entry list into (type, bytes).
    fn entries(body: &[u8]) -> Vec<(u8, &[u8])> {
        let mut out = vec![];
        let mut i = 0;
        while i < body.len() {
            let len = body[i + 1] as usize;
            assert!(len >= 2);
            out.push((body[i], &body[i..i + len]));
            i += len;
        }
        assert_eq!(i, body.len());
        out
    }

    #[test]
    fn every_table_has_right_checksum_and_length() {
        let t = Topology::uniform(4, 1 << 30, 2).unwrap();
        let chunks = build_tables(&t).unwrap();
        assert_eq!(chunks.len(), 8);
        for (addr, bytes) in &chunks {
            assert!(*addr >= ACPI_TABLES_ADDR && addr + bytes.len() as u64 <= ACPI_TABLES_END);
            match &bytes[0..4] {
                b"RSD " => {
                    assert_eq!(&bytes[0..8], b"RSD PTR ");
                    assert_eq!(byte_sum(&bytes[..20]), 0);
                    assert_eq!(byte_sum(bytes), 0);
                    assert_eq!(u32_at(bytes, 20) as usize, bytes.len());
                    assert_eq!(bytes[15], 2);
                }
                b"FACS" => assert_eq!(u32_at(bytes, 4) as usize, bytes.len()),
                _ => {
                    assert_eq!(byte_sum(bytes), 0, "{:?}", &bytes[0..4]);
                    assert_eq!(u32_at(bytes, 4) as usize, bytes.len());
                }
            }
        }
        assert_eq!(chunks[0].0, ACPI_TABLES_ADDR);
        // Tables do not overlap.
        let mut spans: Vec<(u64, u64)> = chunks
            .iter()
            .map(|(a, b)| (*a, a + b.len() as u64))
            .collect();
        spans.sort();
        for w in spans.windows(2) {
            assert!(w[0].1 <= w[1].0);
        }
    }

    #[test]
    fn pointers_link_the_tables() {
        let t = Topology::uniform(2, 64 << 20, 1).unwrap();
        let chunks = build_tables(&t).unwrap();
        let (_, rsdp) = &chunks[0];
        let (xsdt_at, xsdt) = table(&chunks, b"XSDT");
        assert_eq!(u64_at(rsdp, 24), xsdt_at);
        let ptrs: Vec<u64> = (HEADER_LEN..xsdt.len())
            .step_by(8)
            .map(|o| u64_at(xsdt, o))
            .collect();
        let sigs: Vec<&[u8]> = ptrs
            .iter()
            .map(|p| &chunks.iter().find(|(a, _)| a == p).unwrap().1[0..4])
            .collect();
        assert_eq!(sigs, vec![b"FACP", b"APIC", b"SRAT", b"SLIT"]);
        let (_, fadt) = table(&chunks, b"FACP");
        let (facs_at, _) = table(&chunks, b"FACS");
        let (dsdt_at, _) = table(&chunks, b"DSDT");
        assert_eq!(facs_at % 64, 0);
        assert_eq!(u32_at(fadt, 36) as u64, facs_at);
        assert_eq!(u32_at(fadt, 40) as u64, dsdt_at);
        assert_eq!(u64_at(fadt, 132), 0, "only one FACS pointer may be set");
        assert_eq!(u64_at(fadt, 140), dsdt_at);
    }

    #[test]
    fn fadt_fields() {
        let t = Topology::uniform(1, 64 << 20, 1).unwrap();
        let chunks = build_tables(&t).unwrap();
        let (_, f) = table(&chunks, b"FACP");
        assert_eq!(f.len(), FADT_LEN);
        assert_eq!(f[8], 6);
        assert_eq!(u16_at(f, 46), SCI_IRQ as u16);
        assert_eq!(u32_at(f, 48), 0);
        assert_eq!(u32_at(f, 56), PM1A_EVT_PORT as u32);
        assert_eq!(u32_at(f, 64), PM1A_CNT_PORT as u32);
        assert_eq!(u32_at(f, 76), PM_TMR_PORT as u32);
        assert_eq!((f[88], f[89], f[91]), (4, 2, 4));
        assert_eq!(u16_at(f, 109), 3);
        let flags = u32_at(f, 112);
        assert_ne!(flags & FADT_RESET_REG_SUP, 0);
        assert_eq!(flags & (1 << 20), 0, "must not be hardware-reduced");
        assert_eq!(flags & (1 << 8), 0, "PM timer is 24-bit");
        // RESET_REG: system I/O, 8 bits, at RESET_PORT; value follows.
        assert_eq!(&f[116..120], &[1, 8, 0, 1]);
        assert_eq!(u64_at(f, 120), RESET_PORT as u64);
        assert_eq!(f[128], RESET_VALUE);
        // X_ blocks agree with the 32-bit ones (width = 8 * length).
        assert_eq!((f[148], f[149]), (1, 32));
        assert_eq!(u64_at(f, 152), PM1A_EVT_PORT as u64);
        assert_eq!((f[172], f[173]), (1, 16));
        assert_eq!(u64_at(f, 176), PM1A_CNT_PORT as u64);
        assert_eq!((f[208], f[209]), (1, 32));
        assert_eq!(u64_at(f, 212), PM_TMR_PORT as u64);
    }

    #[test]
    fn madt_lists_every_vcpu_and_the_ioapic() {
        let t = Topology::uniform(5, 64 << 20, 2).unwrap();
        let chunks = build_tables(&t).unwrap();
        let (_, m) = table(&chunks, b"APIC");
        assert_eq!(u32_at(m, 36), LAPIC_ADDR as u32);
        assert_eq!(u32_at(m, 40), MADT_PCAT_COMPAT);
        let e = entries(&m[44..]);
        let lapics: Vec<(u8, u8, u32)> = e
            .iter()
            .filter(|(t, _)| *t == 0)
            .map(|(_, b)| (b[2], b[3], u32_at(b, 4)))
            .collect();
        assert_eq!(lapics, (0..5).map(|i| (i, i, 1)).collect::<Vec<_>>());
        let ioapic: Vec<&[u8]> = e.iter().filter(|(t, _)| *t == 1).map(|x| x.1).collect();
        assert_eq!(ioapic.len(), 1);
        assert_eq!(ioapic[0][2], IOAPIC_ID);
        assert_eq!(u32_at(ioapic[0], 4), IOAPIC_ADDR as u32);
        assert_eq!(u32_at(ioapic[0], 8), 0);
        let isos: Vec<(u8, u32, u16)> = e
            .iter()
            .filter(|(t, _)| *t == 2)
            .map(|(_, b)| (b[3], u32_at(b, 4), u16_at(b, 8)))
            .collect();
        assert_eq!(
            isos,
            vec![(0, PIT_GSI, 0), (SCI_IRQ as u8, SCI_IRQ, 0x000D)]
        );
        let nmis: Vec<&[u8]> = e.iter().filter(|(t, _)| *t == 4).map(|x| x.1).collect();
        assert_eq!(nmis, vec![&[4u8, 6, 0xFF, 0, 0, 1][..]]);
    }

    #[test]
    fn srat_domains_match_topology() {
        let t = Topology::uniform(3, 4 << 30, 2).unwrap();
        let chunks = build_tables(&t).unwrap();
        let (_, s) = table(&chunks, b"SRAT");
        assert_eq!(s[8], 3);
        let e = entries(&s[48..]);
        let mut cpus = vec![];
        let mut mems = vec![];
        for (ty, b) in e {
            match ty {
                0 => {
                    let dom = u32::from_le_bytes([b[2], b[9], b[10], b[11]]);
                    assert_eq!(u32_at(b, 4), 1);
                    cpus.push((b[3] as u32, dom as usize));
                }
                1 => {
                    assert_eq!(u32_at(b, 28), 1);
                    mems.push((u64_at(b, 8), u64_at(b, 16), u32_at(b, 2) as usize));
                }
                other => panic!("unexpected SRAT entry {other}"),
            }
        }
        assert_eq!(cpus.len(), 3);
        for (apic, dom) in cpus {
            assert_eq!(t.node_of_vcpu(apic), Some(dom));
        }
        // Node 1 straddles the hole: 3 memory entries in all.
        assert_eq!(mems.len(), 3);
        let total: u64 = mems.iter().map(|m| m.1).sum();
        assert_eq!(total, 4 << 30);
        for (base, len, dom) in mems {
            assert_eq!(t.node_of_gpa(base), Some(dom));
            assert_eq!(t.node_of_gpa(base + len - 1), Some(dom));
        }
    }

    #[test]
    fn slit_is_10_on_diagonal_20_elsewhere() {
        let t = Topology::uniform(3, 64 << 20, 3).unwrap();
        let chunks = build_tables(&t).unwrap();
        let (_, s) = table(&chunks, b"SLIT");
        assert_eq!(u64_at(s, 36), 3);
        assert_eq!(&s[44..], &[10, 20, 20, 20, 10, 20, 20, 20, 10]);
    }

    #[test]
    fn dsdt_contains_s5_and_devices() {
        let t = Topology::uniform(1, 64 << 20, 1).unwrap();
        let chunks = build_tables(&t).unwrap();
        let (_, d) = table(&chunks, b"DSDT");
        assert_eq!(d[8], 2);
        let s5: &[u8] = &[
            0x08, b'_', b'S', b'5', b'_', 0x12, 0x08, 0x04, 0x0A, 0x05, 0x0A, 0x05, 0x00, 0x00,
        ];
        assert_eq!(&d[HEADER_LEN..HEADER_LEN + s5.len()], s5);
        let has = |needle: &[u8]| d.windows(needle.len()).any(|w| w == needle);
        assert!(has(b"\x5B\x82"), "no Device op");
        assert!(has(b"COM1"));
        assert!(has(b"\x0DQEMU0001\x00"));
        // pvpanic IO descriptor.
        assert!(has(&[0x47, 0x01, 0x05, 0x05, 0x05, 0x05, 0x01, 0x01]));
        // _STA 0xF.
        assert!(has(b"\x08_STA\x0A\x0F"));
        // RTC's IO descriptor.
        assert!(has(&[0x47, 0x01, 0x70, 0x00, 0x70, 0x00, 0x00, 0x02]));
    }

    #[test]
    fn max_topology_fits_and_bad_topologies_fail() {
        let t = Topology::uniform(MAX_VCPUS, 1 << 30, MAX_VCPUS).unwrap();
        assert!(build_tables(&t).is_ok());
        let mut bad = Topology::uniform(2, 64 << 20, 1).unwrap();
        bad.vcpus = MAX_VCPUS + 1;
        assert!(matches!(build_tables(&bad), Err(BootError::Topology(_))));
        bad.vcpus = 2;
        bad.nodes.clear();
        assert!(matches!(build_tables(&bad), Err(BootError::Topology(_))));
    }

    #[test]
    fn write_tables_puts_rsdp_in_guest_memory() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 2 << 20)]).unwrap();
        let t = Topology::uniform(2, 64 << 20, 1).unwrap();
        let at = write_tables(&mem, &t).unwrap();
        assert_eq!(at, ACPI_TABLES_ADDR);
        let mut sig = [0u8; 8];
        mem.read_slice(&mut sig, GuestAddress(at)).unwrap();
        assert_eq!(&sig, b"RSD PTR ");
        let small = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x1000)]).unwrap();
        assert!(matches!(
            write_tables(&small, &t),
            Err(BootError::GuestMemory(_))
        ));
    }
}
