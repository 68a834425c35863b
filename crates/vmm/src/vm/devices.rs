//! The devices of the node that has them, on its port and MMIO buses.

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
use dvmm_devices::DmaTest;
use dvmm_devices::VmEventSink;
use dvmm_irq::clock::Clock;
use dvmm_irq::pit::Pit;
use dvmm_layout as layout;

use crate::irqchip::timers::{PitPorts, TimerService};
use crate::irqchip::{HubMsi, InterruptHub, IoApicMmio, IoApicPin};
use crate::VmmError;
use dvmm_pci::bus::{BarWindow, ConfigAddressPort, ConfigDataPort, EcamWindow};
use dvmm_pci::PciBus;
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
    virtio: Vec<VirtioSlot>,
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

    attach_pci(pio, mmio, hub, guest, virtio)?;
    Ok(serial)
}

/// A virtio device opened from the configuration, waiting for its PCI slot.
pub(super) struct VirtioSlot {
    /// For the log: e.g. "virtio-blk0 (/images/disk.img)".
    name: String,
    device: Box<dyn dvmm_virtio::VirtioDevice>,
}

/// Opens the configured virtio devices in the order the guest sees them (disks, network
/// cards, the entropy device, the console), so that a bad path fails before boot.
pub(super) fn open_virtio(cfg: &super::VmConfig) -> Result<Vec<VirtioSlot>, VmmError> {
    let mut out = Vec::new();
    for (i, d) in cfg.disks.iter().enumerate() {
        let disk = dvmm_virtio::block::Block::open(&d.path, d.readonly)?;
        tracing::info!(
            disk = %disk.path().display(),
            sectors = disk.sectors(),
            readonly = d.readonly,
            "attaching a virtio-blk device"
        );
        out.push(VirtioSlot {
            name: format!("virtio-blk{i} ({})", d.path.display()),
            device: Box::new(disk),
        });
    }
    for (i, n) in cfg.nets.iter().enumerate() {
        let net = dvmm_virtio::net::Net::open(&n.tap, n.mac)?;
        let mac = n.mac.map(|b| format!("{b:02x}")).join(":");
        tracing::info!(tap = %n.tap, %mac, "attaching a virtio-net device");
        out.push(VirtioSlot {
            name: format!("virtio-net{i} ({})", n.tap),
            device: Box::new(net),
        });
    }
    if cfg.rng {
        out.push(VirtioSlot {
            name: "virtio-rng".into(),
            device: Box::new(dvmm_virtio::rng::Rng::new()?),
        });
    }
    if let Some(backend) = &cfg.console {
        let console = dvmm_virtio::console::Console::open(backend)?;
        tracing::info!(?backend, "attaching a virtio-console (the guest's hvc0)");
        out.push(VirtioSlot {
            name: "virtio-console".into(),
            device: Box::new(console),
        });
    }
    Ok(out)
}

/// PCI bus 0 with its host bridge and the virtio devices: configuration through ports
/// 0xCF8/0xCFC and ECAM, BARs in the PCI window, MSI-X into the hub.
fn attach_pci(
    pio: &mut Bus,
    mmio: &mut Bus,
    hub: &Arc<InterruptHub>,
    guest: Arc<dyn crate::guest_access::GuestAccess>,
    virtio: Vec<VirtioSlot>,
) -> Result<(), VmmError> {
    let mut pci = PciBus::new();
    let msi: Arc<dyn dvmm_pci::MsiSink> = Arc::new(HubMsi(hub.clone()));
    for slot in virtio {
        let dev = VirtioPci::new(slot.device, guest.clone(), msi.clone(), slot.name)?;
        pci.add(dev.shared())?;
    }
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
