//! ACPI tables: RSDP, XSDT, FADT (+FACS), DSDT, MADT, SRAT, SLIT and MCFG, placed in
//! `[ACPI_TABLES_ADDR, ACPI_TABLES_END)`.
//!
//! Built with rust-vmm's `acpi_tables`: its `Sdt` (header, length, checksum), `Rsdp`, the
//! MADT and SRAT entry types it has (`ProcessorLocalApic`, `IoApic`, `MemoryAffinity`)
//! and its AML builder for the DSDT. Where it does not fit we add our own bytes, through
//! its `AmlSink`/`Aml` traits: its typed MADT and SRAT have no x86 interrupt source
//! override, local APIC NMI or processor local APIC affinity entries, its AML has no
//! `IRQNoFlags` descriptor (our COM1 and RTC use the ISA form, as real firmware does),
//! and its typed tables put their own creator ID in the header. The guest sees the same
//! bytes as with dvmm's earlier hand-written encoder (`acpi_tables_are_unchanged`).

use acpi_tables::aml::{self, Path};
use acpi_tables::madt::{EnabledStatus, IoApic, ProcessorLocalApic};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::srat::MemoryAffinity;
use acpi_tables::{Aml, AmlSink};
use dvmm_layout::{
    ACPI_TABLES_ADDR, ACPI_TABLES_END, COM1_IRQ, COM1_PORT, IOAPIC_ADDR, IOAPIC_ID, LAPIC_ADDR,
    MAX_VCPUS, PCI_CONFIG_ADDRESS_PORT, PCI_ECAM_ADDR, PCI_ECAM_SIZE, PCI_MMIO_SIZE,
    PCI_MMIO_START, PIT_GSI, PIT_IRQ, PM1A_CNT_PORT, PM1A_EVT_PORT, PM_TMR_PORT, PVPANIC_PORT,
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

/// An empty table `signature` with dvmm's header (OEM table id "DVMM" + signature,
/// creator "DVMM", revisions 1).
fn table(signature: &[u8; 4], revision: u8) -> Sdt {
    let mut oem_table = *b"DVMM    ";
    oem_table[4..].copy_from_slice(signature);
    let mut t = Sdt::new(
        *signature,
        HEADER_LEN as u32,
        revision,
        OEM_ID,
        oem_table,
        1,
    );
    t.write_bytes(28, &CREATOR_ID);
    t.write_u32(32, 1);
    t
}

/// Appends `entry`'s bytes to `t` (length and checksum follow).
fn push(t: &mut Sdt, entry: &dyn Aml) {
    let mut bytes = Vec::new();
    entry.to_aml_bytes(&mut bytes);
    t.append_slice(&bytes);
}

/// Byte-level writer for table bodies whose layout the crate does not model.
trait Fields: AmlSink {
    /// A Generic Address Structure.
    fn gas(&mut self, space: u8, bit_width: u8, access: u8, address: u64) {
        self.byte(space);
        self.byte(bit_width);
        self.byte(0);
        self.byte(access);
        self.qword(address);
    }
}

impl Fields for Vec<u8> {}

fn rsdp(xsdt: u64) -> Vec<u8> {
    let mut v = Vec::with_capacity(RSDP_LEN);
    Rsdp::new(OEM_ID, xsdt).to_aml_bytes(&mut v);
    v
}

fn xsdt(tables: &[u64]) -> Vec<u8> {
    let mut t = table(b"XSDT", 1);
    for &a in tables {
        t.append_slice(&a.to_le_bytes());
    }
    t.as_slice().to_vec()
}

fn fadt(facs: u64, dsdt: u64) -> Vec<u8> {
    // 32-bit pointers are only valid below 4 GiB; ours always are.
    let facs32 = u32::try_from(facs).unwrap_or(0);
    let dsdt32 = u32::try_from(dsdt).unwrap_or(0);
    let mut b: Vec<u8> = Vec::with_capacity(FADT_LEN - HEADER_LEN);
    b.dword(facs32); // 36 FIRMWARE_CTRL
    b.dword(dsdt32); // 40 DSDT
    b.byte(0); // 44 reserved
    b.byte(0); // 45 preferred PM profile: unspecified
    b.word(SCI_IRQ as u16); // 46 SCI_INT
    b.dword(0); // 48 SMI_CMD: ACPI always enabled
    b.byte(0); // 52 ACPI_ENABLE
    b.byte(0); // 53 ACPI_DISABLE
    b.byte(0); // 54 S4BIOS_REQ
    b.byte(0); // 55 PSTATE_CNT
    b.dword(u32::from(PM1A_EVT_PORT)); // 56 PM1a_EVT_BLK
    b.dword(0); // 60 PM1b_EVT_BLK
    b.dword(u32::from(PM1A_CNT_PORT)); // 64 PM1a_CNT_BLK
    b.dword(0); // 68 PM1b_CNT_BLK
    b.dword(0); // 72 PM2_CNT_BLK
    b.dword(u32::from(PM_TMR_PORT)); // 76 PM_TMR_BLK
    b.dword(0); // 80 GPE0_BLK
    b.dword(0); // 84 GPE1_BLK
    b.byte(4); // 88 PM1_EVT_LEN
    b.byte(2); // 89 PM1_CNT_LEN
    b.byte(0); // 90 PM2_CNT_LEN
    b.byte(4); // 91 PM_TMR_LEN
    b.byte(0); // 92 GPE0_BLK_LEN
    b.byte(0); // 93 GPE1_BLK_LEN
    b.byte(0); // 94 GPE1_BASE
    b.byte(0); // 95 CST_CNT
    b.word(101); // 96 P_LVL2_LAT: > 100, C2 not supported
    b.word(1001); // 98 P_LVL3_LAT: > 1000, C3 not supported
    b.word(0); // 100 FLUSH_SIZE
    b.word(0); // 102 FLUSH_STRIDE
    b.byte(0); // 104 DUTY_OFFSET
    b.byte(0); // 105 DUTY_WIDTH
    b.byte(0); // 106 DAY_ALRM
    b.byte(0); // 107 MON_ALRM
    b.byte(RTC_CENTURY_INDEX); // 108 CENTURY: CMOS index of the century byte
    b.word(BOOT_ARCH_LEGACY_DEVICES | BOOT_ARCH_8042); // 109 IAPC_BOOT_ARCH
    b.byte(0); // 111 reserved
    b.dword(
        FADT_WBINVD
            | FADT_PROC_C1
            | FADT_PWR_BUTTON
            | FADT_SLP_BUTTON
            | FADT_FIX_RTC
            | FADT_RESET_REG_SUP
            | FADT_APIC_PHYSICAL,
    ); // 112 flags
    b.gas(GAS_SYSTEM_IO, 8, GAS_ACCESS_BYTE, u64::from(RESET_PORT)); // 116 RESET_REG
    b.byte(RESET_VALUE); // 128 RESET_VALUE
    b.word(0); // 129 ARM_BOOT_ARCH
    b.byte(0); // 131 FADT minor version
    b.qword(0); // 132 X_FIRMWARE_CTRL: zero, since FIRMWARE_CTRL holds the FACS (ACPI 6.x 5.2.9)
    b.qword(dsdt); // 140 X_DSDT
    b.gas(GAS_SYSTEM_IO, 32, GAS_ACCESS_WORD, u64::from(PM1A_EVT_PORT)); // 148
    b.gas(0, 0, 0, 0); // 160 X_PM1b_EVT_BLK
    b.gas(GAS_SYSTEM_IO, 16, GAS_ACCESS_WORD, u64::from(PM1A_CNT_PORT)); // 172
    b.gas(0, 0, 0, 0); // 184 X_PM1b_CNT_BLK
    b.gas(0, 0, 0, 0); // 196 X_PM2_CNT_BLK
    b.gas(GAS_SYSTEM_IO, 32, GAS_ACCESS_DWORD, u64::from(PM_TMR_PORT)); // 208
    b.gas(0, 0, 0, 0); // 220 X_GPE0_BLK
    b.gas(0, 0, 0, 0); // 232 X_GPE1_BLK
    b.gas(0, 0, 0, 0); // 244 SLEEP_CONTROL_REG
    b.gas(0, 0, 0, 0); // 256 SLEEP_STATUS_REG
    b.vec(b"DVMM\0\0\0\0"); // 268 hypervisor vendor identity
    let mut t = table(b"FACP", 6);
    t.append_slice(&b);
    t.as_slice().to_vec()
}

fn facs() -> Vec<u8> {
    let mut v = vec![0u8; FACS_LEN];
    v[0..4].copy_from_slice(b"FACS");
    v[4..8].copy_from_slice(&(FACS_LEN as u32).to_le_bytes());
    v[32] = 2; // version
    v
}

/// The ISA `IRQNoFlags` resource descriptor (edge, active high), which `acpi_tables`
/// does not provide.
struct IrqNoFlags(u32);

impl Aml for IrqNoFlags {
    fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
        let mask: u16 = if self.0 < 16 { 1 << self.0 } else { 0 };
        sink.byte(0x22);
        sink.word(mask);
    }
}

/// The PCI host bridge (bus 0; its port window for PCI I/O BARs, its 32-bit memory
/// window for memory BARs) and the motherboard resource that reserves the ECAM window.
fn pci_host_bridge(body: &mut Vec<u8>) {
    use aml::{
        AddressSpace, AddressSpaceCacheable, Device, EISAName, Memory32Fixed, Name,
        ResourceTemplate, Scope, IO, ZERO,
    };
    let bus = AddressSpace::<u16>::new_bus_number(0, 0);
    let config_ports = IO::new(PCI_CONFIG_ADDRESS_PORT, PCI_CONFIG_ADDRESS_PORT, 1, 8);
    let low_ports = AddressSpace::<u16>::new_io(0, PCI_CONFIG_ADDRESS_PORT - 1, None);
    let high_ports = AddressSpace::<u16>::new_io(0x0d00, 0xffff, None);
    let mmio_end = u32::try_from(PCI_MMIO_START + PCI_MMIO_SIZE - 1).unwrap_or(u32::MAX);
    let mmio_start = u32::try_from(PCI_MMIO_START).unwrap_or(u32::MAX);
    let memory = AddressSpace::<u32>::new_memory(
        AddressSpaceCacheable::NotCacheable,
        true,
        mmio_start,
        mmio_end,
        None,
    );
    let ecam = Memory32Fixed::new(
        false,
        u32::try_from(PCI_ECAM_ADDR).unwrap_or(u32::MAX),
        u32::try_from(PCI_ECAM_SIZE).unwrap_or(u32::MAX),
    );
    Scope::new(
        Path::new("\\_SB_"),
        vec![
            &Device::new(
                Path::new("PCI0"),
                vec![
                    &Name::new(Path::new("_HID"), &EISAName::new("PNP0A08")),
                    &Name::new(Path::new("_CID"), &EISAName::new("PNP0A03")),
                    &Name::new(Path::new("_ADR"), &ZERO),
                    &Name::new(Path::new("_SEG"), &ZERO),
                    &Name::new(Path::new("_UID"), &ZERO),
                    &Name::new(Path::new("_BBN"), &ZERO),
                    // The bridge's proximity domain: without one a NUMA guest warns
                    // "Unknown NUMA node; performance will be reduced". Node 0 answers
                    // its configuration space.
                    &Name::new(Path::new("_PXM"), &ZERO),
                    &Name::new(
                        Path::new("_CRS"),
                        &ResourceTemplate::new(vec![
                            &bus,
                            &config_ports,
                            &low_ports,
                            &high_ports,
                            &memory,
                        ]),
                    ),
                ],
            ),
            &Device::new(
                Path::new("MRES"),
                vec![
                    &Name::new(Path::new("_HID"), &EISAName::new("PNP0C02")),
                    &Name::new(Path::new("_UID"), &ZERO),
                    &Name::new(Path::new("_CRS"), &ResourceTemplate::new(vec![&ecam])),
                ],
            ),
        ],
    )
    .to_aml_bytes(body);
}

/// The MCFG table: ECAM for segment 0, bus 0. (Written with our header like the
/// others; `acpi_tables`' typed MCFG puts its own creator id in it.)
fn mcfg() -> Vec<u8> {
    let mut t = table(b"MCFG", 1);
    let mut body = vec![0u8; 8]; // reserved
    body.extend_from_slice(&PCI_ECAM_ADDR.to_le_bytes());
    body.extend_from_slice(&0u16.to_le_bytes()); // segment group
    body.push(0); // first bus
    body.push(0); // last bus
    body.extend_from_slice(&[0; 4]);
    t.append_slice(&body);
    t.as_slice().to_vec()
}

/// The DSDT's AML body (without the table header).
pub fn dsdt_aml() -> Vec<u8> {
    use aml::{Device, EISAName, Name, Package, ResourceTemplate, Scope, IO, ONE, ZERO};
    let s5 = S5_SLP_TYP;
    let present = 0xfu8;
    let mut body = Vec::new();
    Name::new(
        Path::new("_S5_"),
        &Package::new(vec![&s5, &s5, &ZERO, &ZERO]),
    )
    .to_aml_bytes(&mut body);
    Scope::new(
        Path::new("\\_SB_"),
        vec![
            &Device::new(
                Path::new("COM1"),
                vec![
                    &Name::new(Path::new("_HID"), &EISAName::new("PNP0501")),
                    &Name::new(Path::new("_UID"), &ONE),
                    &Name::new(
                        Path::new("_CRS"),
                        &ResourceTemplate::new(vec![
                            &IO::new(COM1_PORT, COM1_PORT, 0, 8),
                            &IrqNoFlags(COM1_IRQ),
                        ]),
                    ),
                ],
            ),
            &Device::new(
                Path::new("RTC_"),
                vec![
                    &Name::new(Path::new("_HID"), &EISAName::new("PNP0B00")),
                    &Name::new(
                        Path::new("_CRS"),
                        &ResourceTemplate::new(vec![
                            &IO::new(RTC_PORT, RTC_PORT, 0, 2),
                            &IrqNoFlags(RTC_IRQ),
                        ]),
                    ),
                ],
            ),
            &Device::new(
                Path::new("PEVT"),
                vec![
                    &Name::new(Path::new("_HID"), &"QEMU0001"),
                    &Name::new(
                        Path::new("_CRS"),
                        &ResourceTemplate::new(vec![&IO::new(PVPANIC_PORT, PVPANIC_PORT, 1, 1)]),
                    ),
                    &Name::new(Path::new("_STA"), &present),
                ],
            ),
        ],
    )
    .to_aml_bytes(&mut body);
    pci_host_bridge(&mut body);
    body
}

fn dsdt() -> Vec<u8> {
    let mut t = table(b"DSDT", 2);
    t.append_slice(&dsdt_aml());
    t.as_slice().to_vec()
}

fn madt(topology: &Topology) -> Vec<u8> {
    let mut t = table(b"APIC", 5);
    let mut b: Vec<u8> = Vec::new();
    b.dword(LAPIC_ADDR as u32);
    b.dword(MADT_PCAT_COMPAT);
    t.append_slice(&b);
    for id in 0..topology.vcpus {
        // build_tables checked vcpus <= MAX_VCPUS, so the id fits a byte.
        let id = id as u8;
        push(
            &mut t,
            &ProcessorLocalApic::new(id, id, EnabledStatus::Enabled),
        );
    }
    push(&mut t, &IoApic::new(IOAPIC_ID, IOAPIC_ADDR as u32, 0));
    let mut b: Vec<u8> = Vec::new();
    for (irq, gsi, flags) in [
        (PIT_IRQ, PIT_GSI, 0),
        (SCI_IRQ, SCI_IRQ, MPS_INTI_ACTIVE_HIGH | MPS_INTI_LEVEL),
    ] {
        // Interrupt source override: ISA bus, IRQ, GSI, MPS INTI flags.
        b.vec(&[MADT_INT_SRC_OVERRIDE, 10, 0, irq as u8]);
        b.dword(gsi);
        b.word(flags);
    }
    // Local APIC NMI: every processor, LINT1, conforming flags.
    b.vec(&[MADT_LOCAL_APIC_NMI, 6, 0xFF]);
    b.word(0);
    b.byte(1);
    t.append_slice(&b);
    t.as_slice().to_vec()
}

fn srat(topology: &Topology) -> Vec<u8> {
    let mut t = table(b"SRAT", 3);
    let mut b: Vec<u8> = Vec::new();
    b.dword(1); // reserved (1 for compatibility)
    b.qword(0); // reserved
    t.append_slice(&b);
    for (domain, node) in topology.nodes.iter().enumerate() {
        let domain = domain as u32;
        for r in &node.ram {
            push(
                &mut t,
                &MemoryAffinity::new(domain, r.start, r.len).enabled(),
            );
        }
        for id in node.vcpus.clone() {
            let [d0, d1, d2, d3] = domain.to_le_bytes();
            // Processor local APIC affinity: domain bits 0-7, APIC id, enabled, local
            // SAPIC EID, domain bits 8-31, clock domain.
            let mut b: Vec<u8> = Vec::new();
            b.vec(&[0, 16, d0, id as u8]);
            b.dword(1);
            b.vec(&[0, d1, d2, d3]);
            b.dword(0);
            t.append_slice(&b);
        }
    }
    t.as_slice().to_vec()
}

fn slit(topology: &Topology) -> Vec<u8> {
    let n = topology.nodes.len();
    let mut t = table(b"SLIT", 1);
    let mut b: Vec<u8> = Vec::new();
    b.qword(n as u64);
    for i in 0..n {
        for j in 0..n {
            b.byte(if i == j {
                LOCAL_DISTANCE
            } else {
                REMOTE_DISTANCE
            });
        }
    }
    t.append_slice(&b);
    t.as_slice().to_vec()
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
    let mcfg = mcfg();

    // Lay out: RSDP, XSDT, FADT, FACS (64-byte aligned), DSDT, MADT, SRAT, SLIT, MCFG.
    let mut next = ACPI_TABLES_ADDR;
    let mut place = |len: usize, align: u64| {
        let at = align_up(next, align);
        next = at + len as u64;
        at
    };
    let rsdp_at = place(RSDP_LEN, 16);
    let xsdt_at = place(HEADER_LEN + 5 * 8, 16);
    let fadt_at = place(FADT_LEN, 16);
    let facs_at = place(FACS_LEN, 64);
    let dsdt_at = place(dsdt.len(), 16);
    let madt_at = place(madt.len(), 16);
    let srat_at = place(srat.len(), 16);
    let slit_at = place(slit.len(), 16);
    let mcfg_at = place(mcfg.len(), 16);
    if next > ACPI_TABLES_END {
        return Err(BootError::AcpiTooLarge {
            size: next - ACPI_TABLES_ADDR,
        });
    }
    Ok(vec![
        (rsdp_at, rsdp(xsdt_at)),
        (
            xsdt_at,
            xsdt(&[fadt_at, madt_at, srat_at, slit_at, mcfg_at]),
        ),
        (fadt_at, fadt(facs_at, dsdt_at)),
        (facs_at, facs()),
        (dsdt_at, dsdt),
        (madt_at, madt),
        (srat_at, srat),
        (slit_at, slit),
        (mcfg_at, mcfg),
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
        assert_eq!(chunks.len(), 9);
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
        assert_eq!(sigs, vec![b"FACP", b"APIC", b"SRAT", b"SLIT", b"MCFG"]);
        let (_, fadt) = table(&chunks, b"FACP");
        let (facs_at, _) = table(&chunks, b"FACS");
        let (dsdt_at, _) = table(&chunks, b"DSDT");
        assert_eq!(facs_at % 64, 0);
        assert_eq!(u64::from(u32_at(fadt, 36)), facs_at);
        assert_eq!(u64::from(u32_at(fadt, 40)), dsdt_at);
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
        assert_eq!(u32_at(f, 56), u32::from(PM1A_EVT_PORT));
        assert_eq!(u32_at(f, 64), u32::from(PM1A_CNT_PORT));
        assert_eq!(u32_at(f, 76), u32::from(PM_TMR_PORT));
        assert_eq!((f[88], f[89], f[91]), (4, 2, 4));
        assert_eq!(u16_at(f, 109), 3);
        let flags = u32_at(f, 112);
        assert_ne!(flags & FADT_RESET_REG_SUP, 0);
        assert_eq!(flags & (1 << 20), 0, "must not be hardware-reduced");
        assert_eq!(flags & (1 << 8), 0, "PM timer is 24-bit");
        // RESET_REG: system I/O, 8 bits, at RESET_PORT; value follows.
        assert_eq!(&f[116..120], &[1, 8, 0, 1]);
        assert_eq!(u64_at(f, 120), u64::from(RESET_PORT));
        assert_eq!(f[128], RESET_VALUE);
        // X_ blocks agree with the 32-bit ones (width = 8 * length).
        assert_eq!((f[148], f[149]), (1, 32));
        assert_eq!(u64_at(f, 152), u64::from(PM1A_EVT_PORT));
        assert_eq!((f[172], f[173]), (1, 16));
        assert_eq!(u64_at(f, 176), u64::from(PM1A_CNT_PORT));
        assert_eq!((f[208], f[209]), (1, 32));
        assert_eq!(u64_at(f, 212), u64::from(PM_TMR_PORT));
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
                    cpus.push((u32::from(b[3]), dom as usize));
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

    #[test]
    fn mcfg_and_the_pci_host_bridge_describe_bus_0() {
        let t = Topology::uniform(1, 64 << 20, 1).unwrap();
        let chunks = build_tables(&t).unwrap();
        let (_, m) = table(&chunks, b"MCFG");
        assert_eq!(m.len(), HEADER_LEN + 8 + 16);
        assert_eq!(u64_at(m, 44), PCI_ECAM_ADDR);
        assert_eq!(&m[52..56], &[0, 0, 0, 0], "segment 0, buses 0..=0");
        let (_, d) = table(&chunks, b"DSDT");
        let has = |needle: &[u8]| d.windows(needle.len()).any(|w| w == needle);
        assert!(has(b"PCI0") && has(b"MRES"));
        // The 32-bit memory window, as DWordMemory min and max.
        let mut window = Vec::new();
        window.extend_from_slice(&(PCI_MMIO_START as u32).to_le_bytes());
        window.extend_from_slice(&((PCI_MMIO_START + PCI_MMIO_SIZE - 1) as u32).to_le_bytes());
        assert!(has(&window));
        // The ECAM window as Memory32Fixed (0x86), read-only.
        let mut ecam = vec![0x86, 9, 0, 0];
        ecam.extend_from_slice(&(PCI_ECAM_ADDR as u32).to_le_bytes());
        ecam.extend_from_slice(&(PCI_ECAM_SIZE as u32).to_le_bytes());
        assert!(has(&ecam));
    }

    /// The tables of a 2-node, 4-vCPU, 512 MiB guest, byte for byte (`golden/`, checked
    /// with `iasl -d` when they were made). A deliberate change to a table updates its
    /// file: `DVMM_ACPI_BLESS=1 cargo test -p dvmm-boot acpi_tables_are_unchanged`
    /// rewrites them.
    #[test]
    fn acpi_tables_are_unchanged() {
        let golden: [(&[u8; 4], &[u8]); 9] = [
            (b"RSD ", include_bytes!("golden/RSD_.dat")),
            (b"XSDT", include_bytes!("golden/XSDT.dat")),
            (b"FACP", include_bytes!("golden/FACP.dat")),
            (b"FACS", include_bytes!("golden/FACS.dat")),
            (b"DSDT", include_bytes!("golden/DSDT.dat")),
            (b"APIC", include_bytes!("golden/APIC.dat")),
            (b"SRAT", include_bytes!("golden/SRAT.dat")),
            (b"SLIT", include_bytes!("golden/SLIT.dat")),
            (b"MCFG", include_bytes!("golden/MCFG.dat")),
        ];
        let t = Topology::uniform(4, 512 << 20, 2).unwrap();
        let chunks = build_tables(&t).unwrap();
        if std::env::var_os("DVMM_ACPI_BLESS").is_some() {
            let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src/acpi/golden");
            for (sig, _) in golden {
                let (_, now) = table(&chunks, sig);
                let name = format!("{}.dat", String::from_utf8_lossy(sig).replace(' ', "_"));
                std::fs::write(dir.join(name), now).unwrap();
            }
            return;
        }
        for (sig, bytes) in golden {
            let (_, now) = table(&chunks, sig);
            assert_eq!(now, bytes, "{} changed", String::from_utf8_lossy(sig));
        }
    }

    /// ACPICA's disassembler reads every table without an error or a warning (skipped,
    /// with a note, where `iasl` is not installed; CI installs it).
    #[test]
    fn iasl_disassembles_every_table_cleanly() {
        if std::process::Command::new("iasl")
            .arg("-v")
            .output()
            .is_err()
        {
            eprintln!("iasl not found (apt-get install acpica-tools): not checked");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let t = Topology::uniform(4, 5 << 30, 4).unwrap();
        for (_, bytes) in build_tables(&t).unwrap() {
            if &bytes[0..4] == b"RSD " {
                continue;
            }
            let sig = String::from_utf8_lossy(&bytes[0..4]).to_string();
            let path = dir.path().join(format!("{sig}.dat"));
            std::fs::write(&path, &bytes).unwrap();
            let out = std::process::Command::new("iasl")
                .current_dir(dir.path())
                .arg("-d")
                .arg(&path)
                .output()
                .unwrap();
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            assert!(out.status.success(), "iasl -d {sig}: {text}");
            let lower = text.to_lowercase();
            assert!(
                !lower.contains("error") || lower.contains("0 errors"),
                "iasl -d {sig}: {text}"
            );
            assert!(
                !lower.contains("warning") || lower.contains("0 warnings"),
                "iasl -d {sig}: {text}"
            );
            let dsl = std::fs::read_to_string(dir.path().join(format!("{sig}.dsl"))).unwrap();
            assert!(
                dsl.contains(&format!("\"{sig}\"")) || dsl.contains(&sig),
                "{dsl}"
            );
        }
    }
}
