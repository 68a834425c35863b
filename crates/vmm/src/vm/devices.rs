//! The devices of the node that has them, on its port and MMIO buses, and the PCI bus
//! of every node that serves virtio devices.

use dvmm_sync::MutexExt;
use std::io::Write;
use std::sync::{Arc, Mutex};

use dvmm_devices::acpi_pm::{AcpiPm, ResetPort};
use dvmm_devices::bus::{Bus, BusDevice};
use dvmm_devices::i8042::I8042;
use dvmm_devices::pic::Pic;
use dvmm_devices::pvpanic::PvPanic;
use dvmm_devices::rtc::Rtc;
use dvmm_devices::serial::Serial;
use dvmm_devices::test_devices::{
    self, DebugExit, FwCfg, FwCfgFacts, PcTestDev, TestDevIoMem, TestDevIrqs,
};
use dvmm_devices::DmaTest;
use dvmm_devices::VmEventSink;
use dvmm_irq::clock::Clock;
use dvmm_irq::pit::Pit;
use dvmm_layout as layout;

use crate::device_space::RemoteIo;
use crate::irqchip::timers::{PitPorts, TimerService};
use crate::irqchip::{HubMsi, InterruptHub, IoApicMmio, IoApicPin};
use crate::VmmError;
use dvmm_pci::bus::{ecam_offset, BarWindow, ConfigAddressPort, ConfigDataPort, EcamWindow};
use dvmm_pci::{FunctionLink, PciBus, RemoteFunction};
use dvmm_virtio::pci::VirtioPci;

pub(super) fn add(
    bus: &mut Bus,
    dev: impl BusDevice + 'static,
    base: u64,
    len: u64,
) -> Result<(), VmmError> {
    bus.insert(Arc::new(Mutex::new(dev)), base, len)
        .map_err(VmmError::DeviceMap)
}

/// Presents a device's register at `shift` as if it were at offset 0 of its own range.
struct Shifted<D> {
    inner: Arc<Mutex<D>>,
    shift: u64,
}

impl<D: BusDevice> BusDevice for Shifted<D> {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        self.inner.locked().read(offset + self.shift, data);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        self.inner.locked().write(offset + self.shift, data);
    }
}

/// QEMU's test devices (`--test-devices`) on node 0's port bus: fw_cfg with the VM's
/// shape, isa-debug-exit, and pc-testdev, whose IRQ line n drives ISA IRQ n (IRQ 0
/// arrives at GSI 2, as the MADT's override says).
pub(super) fn attach_test_devices(
    pio: &mut Bus,
    mmio: &mut Bus,
    hub: &Arc<InterruptHub>,
    events: Arc<dyn VmEventSink>,
    topology: &dvmm_boot::Topology,
) -> Result<(), VmmError> {
    let mut cpu_nodes = vec![0u64; topology.vcpus as usize];
    let mut node_memory = Vec::new();
    for (n, node) in topology.nodes.iter().enumerate() {
        for v in node.vcpus.clone() {
            if let Some(slot) = cpu_nodes.get_mut(v as usize) {
                *slot = n as u64;
            }
        }
        node_memory.push(node.ram.iter().map(|r| r.len).sum());
    }
    let facts = FwCfgFacts {
        memory: topology.memory,
        cpu_nodes,
        node_memory,
    };
    add(
        pio,
        FwCfg::new(&facts),
        u64::from(test_devices::FW_CFG_PORT),
        test_devices::FW_CFG_PORTS,
    )?;
    add(
        pio,
        DebugExit::new(events),
        u64::from(test_devices::DEBUG_EXIT_PORT),
        test_devices::DEBUG_EXIT_PORTS,
    )?;
    add(
        pio,
        PcTestDev::default(),
        u64::from(test_devices::TESTDEV_IOPORT),
        test_devices::TESTDEV_IOPORT_LEN,
    )?;
    add(
        mmio,
        TestDevIoMem::default(),
        test_devices::TESTDEV_IOMEM_ADDR,
        test_devices::TESTDEV_IOMEM_LEN,
    )?;
    let lines = (0..test_devices::TESTDEV_IRQ_LINES)
        .map(|irq| {
            let gsi = if irq == layout::PIT_IRQ as usize {
                layout::PIT_GSI as usize
            } else {
                irq
            };
            Arc::new(IoApicPin::new(hub.clone(), gsi)) as Arc<dyn dvmm_devices::IrqLine>
        })
        .collect();
    add(
        pio,
        TestDevIrqs::new(lines),
        u64::from(test_devices::TESTDEV_IRQ_PORT),
        test_devices::TESTDEV_IRQ_LINES as u64,
    )
}

/// The devices that live on node 0: UART, PIT, RTC, i8042, ACPI PM, reset, pvpanic,
/// the DMA test engine, PICs, and the IOAPIC's MMIO window. Returns the UART (for console input).
#[allow(clippy::too_many_arguments)]
pub(super) fn attach_devices(
    pio: &mut Bus,
    mmio: &mut Bus,
    hub: &Arc<InterruptHub>,
    pit: &Arc<Mutex<Pit>>,
    clock: &Arc<dyn Clock>,
    timers: &Arc<TimerService>,
    events: Arc<dyn VmEventSink>,
    console_out: Box<dyn Write + Send>,
    guest: Arc<dyn crate::guest_access::GuestAccess>,
    pci: PciBus,
) -> Result<Arc<Mutex<Serial>>, VmmError> {
    let serial = Arc::new(Mutex::new(Serial::new(
        Arc::new(IoApicPin::new(hub.clone(), layout::COM1_IRQ as usize)),
        console_out,
    )));
    pio.insert(serial.clone(), u64::from(layout::COM1_PORT), 8)
        .map_err(VmmError::DeviceMap)?;
    add(
        pio,
        PitPorts::new(pit.clone(), layout::PIT_PORT, clock.clone(), timers.clone()),
        u64::from(layout::PIT_PORT),
        4,
    )?;
    add(
        pio,
        PitPorts::new(pit.clone(), layout::PORT_61, clock.clone(), timers.clone()),
        u64::from(layout::PORT_61),
        1,
    )?;
    add(pio, Rtc::new(), u64::from(layout::RTC_PORT), 2)?;
    // One i8042 answers at 0x60 and 0x64, around port 0x61 (which is the PIT's).
    let i8042 = Arc::new(Mutex::new(I8042::new(events.clone())));
    let i8042_cmd = u64::from(layout::I8042_CMD_PORT - layout::I8042_DATA_PORT);
    pio.insert(i8042.clone(), u64::from(layout::I8042_DATA_PORT), 1)
        .map_err(VmmError::DeviceMap)?;
    add(
        pio,
        Shifted {
            inner: i8042,
            shift: i8042_cmd,
        },
        u64::from(layout::I8042_CMD_PORT),
        1,
    )?;
    add(
        pio,
        AcpiPm::new(events.clone()),
        u64::from(layout::PM1A_EVT_PORT),
        12,
    )?;
    add(
        pio,
        ResetPort::new(events.clone()),
        u64::from(layout::RESET_PORT),
        1,
    )?;
    add(
        pio,
        PvPanic::new(events.clone()),
        u64::from(layout::PVPANIC_PORT),
        1,
    )?;
    add(
        pio,
        DmaTest::new(guest.clone()),
        u64::from(layout::DMA_TEST_PORT),
        dvmm_devices::dma_test::REGS_LEN,
    )?;
    add(pio, Pic::new(), u64::from(layout::PIC_MASTER_PORT), 2)?;
    add(pio, Pic::new(), u64::from(layout::PIC_SLAVE_PORT), 2)?;

    add(
        mmio,
        IoApicMmio::new(hub.clone()),
        layout::IOAPIC_ADDR,
        layout::APIC_MMIO_SIZE,
    )?;

    attach_pci(pio, mmio, pci)?;
    Ok(serial)
}

/// A virtio transport, shared between the PCI bus and the VM (for its end-of-run line).
pub(super) type SharedVirtio = Arc<Mutex<VirtioPci>>;

/// A virtio device of the configuration, in the guest's order, waiting for its PCI slot.
pub(super) struct VirtioSlot {
    /// For the log: e.g. "virtio-blk0 (/images/disk.img)".
    name: String,
    place: Place,
}

/// Where a virtio device is served.
enum Place {
    /// On this node: the device, opened.
    Here(Box<dyn dvmm_virtio::VirtioDevice>),
    /// On node `node` (a device of virtio type `ty`).
    Elsewhere { node: usize, ty: u16 },
}

impl VirtioSlot {
    /// Whether this node serves the device.
    pub(super) fn here(&self) -> bool {
        matches!(self.place, Place::Here(_))
    }
}

/// Opens the configured virtio devices that node `node` serves, and notes where the
/// others are, in the order the guest sees them (disks, network cards, the entropy
/// device, the console: the last two always on node 0), so that a bad path fails before
/// boot.
pub(super) fn open_virtio(cfg: &super::VmConfig, node: usize) -> Result<Vec<VirtioSlot>, VmmError> {
    use dvmm_virtio::device_type;
    let mut out = Vec::new();
    let mut slot =
        |name: String,
         at: usize,
         ty: u16,
         open: &mut dyn FnMut() -> Result<Box<dyn dvmm_virtio::VirtioDevice>, VmmError>|
         -> Result<(), VmmError> {
            let place = if at == node {
                Place::Here(open()?)
            } else {
                Place::Elsewhere { node: at, ty }
            };
            out.push(VirtioSlot { name, place });
            Ok(())
        };
    for (i, d) in cfg.disks.iter().enumerate() {
        slot(
            format!("virtio-blk{i} ({})", d.path.display()),
            d.node,
            device_type::BLOCK,
            &mut || {
                let disk = dvmm_virtio::block::Block::open(&d.path, d.readonly)?;
                tracing::info!(
                    disk = %disk.path().display(),
                    sectors = disk.sectors(),
                    readonly = d.readonly,
                    "attaching a virtio-blk device"
                );
                Ok(Box::new(disk))
            },
        )?;
    }
    for (i, n) in cfg.nets.iter().enumerate() {
        slot(
            format!("virtio-net{i} ({})", n.tap),
            n.node,
            device_type::NET,
            &mut || {
                let net = dvmm_virtio::net::Net::open(&n.tap, n.mac)?;
                let mac = n.mac.map(|b| format!("{b:02x}")).join(":");
                tracing::info!(tap = %n.tap, %mac, "attaching a virtio-net device");
                Ok(Box::new(net))
            },
        )?;
    }
    if cfg.rng {
        slot("virtio-rng".into(), 0, device_type::ENTROPY, &mut || {
            Ok(Box::new(dvmm_virtio::rng::Rng::new()?))
        })?;
    }
    if let Some(backend) = &cfg.console {
        slot(
            "virtio-console".into(),
            0,
            device_type::CONSOLE,
            &mut || {
                let console = dvmm_virtio::console::Console::open(backend)?;
                tracing::info!(?backend, "attaching a virtio-console (the guest's hvc0)");
                Ok(Box::new(console))
            },
        )?;
    }
    Ok(out)
}

/// Node 0's stand-in for a function another node serves: configuration accesses go
/// there as ECAM accesses, BAR accesses by address (that node's [`DeviceSpace::local`]
/// answers both).
///
/// [`DeviceSpace::local`]: crate::device_space::DeviceSpace::local
struct Forwarded {
    remote: Arc<dyn RemoteIo>,
    node: usize,
    device: u8,
}

impl FunctionLink for Forwarded {
    fn config(&self, offset: usize, data: &mut [u8], write: bool) {
        let addr = layout::PCI_ECAM_ADDR + ecam_offset(self.device, offset);
        self.remote
            .io(self.node, layout::IoSpace::Mmio, addr, data, write);
    }

    fn memory(&self, address: u64, data: &mut [u8], write: bool) {
        self.remote
            .io(self.node, layout::IoSpace::Mmio, address, data, write);
    }
}

/// PCI bus 0 as node `node` has it: the functions it serves (opened devices on virtio
/// transports, MSI-X into the hub), a stand-in (node 0) or a reserved number (other
/// nodes) for each function another node serves, so that every node numbers and places
/// them alike. Also returns the transports it serves (for their end-of-run lines).
pub(super) fn pci_bus(
    node: usize,
    hub: &Arc<InterruptHub>,
    guest: Arc<dyn crate::guest_access::GuestAccess>,
    remote: Option<&Arc<dyn RemoteIo>>,
    virtio: Vec<VirtioSlot>,
) -> Result<(PciBus, Vec<SharedVirtio>), VmmError> {
    let mut pci = PciBus::new();
    let mut served = Vec::new();
    let msi: Arc<dyn dvmm_pci::MsiSink> = Arc::new(HubMsi(hub.clone()));
    for slot in virtio {
        match slot.place {
            Place::Here(device) => {
                let dev = VirtioPci::new(device, guest.clone(), msi.clone(), slot.name)?.shared();
                served.push(dev.clone());
                pci.add(dev)?;
            }
            Place::Elsewhere { node: at, ty } => {
                let like = dvmm_virtio::pci::stand_in_config(ty)?;
                if node != 0 {
                    pci.reserve(&like)?;
                    continue;
                }
                let remote = remote.ok_or_else(|| VmmError::DeviceNode {
                    device: slot.name.clone(),
                    node: at,
                })?;
                let device = u8::try_from(pci.len()).map_err(|_| dvmm_pci::PciError::BusFull)?;
                tracing::info!(device = %slot.name, node = at, "a PCI function served by another node");
                let stand_in = RemoteFunction::new(
                    like,
                    Box::new(Forwarded {
                        remote: remote.clone(),
                        node: at,
                        device,
                    }),
                );
                pci.add(Arc::new(Mutex::new(stand_in)))?;
            }
        }
    }
    Ok((pci, served))
}

/// Node 0's PCI bus on its buses: configuration through ports 0xCF8/0xCFC and ECAM,
/// BARs in the PCI window.
fn attach_pci(pio: &mut Bus, mmio: &mut Bus, pci: PciBus) -> Result<(), VmmError> {
    let pci = Arc::new(pci);
    add(
        pio,
        ConfigAddressPort(pci.clone()),
        u64::from(layout::PCI_CONFIG_ADDRESS_PORT),
        1,
    )?;
    add(
        pio,
        ConfigDataPort(pci.clone()),
        u64::from(layout::PCI_CONFIG_DATA_PORT),
        4,
    )?;
    add(
        mmio,
        EcamWindow(pci.clone()),
        layout::PCI_ECAM_ADDR,
        layout::PCI_ECAM_SIZE,
    )?;
    add(
        mmio,
        BarWindow(pci),
        layout::PCI_MMIO_START,
        layout::PCI_MMIO_SIZE,
    )
}
