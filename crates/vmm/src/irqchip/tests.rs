//! The interrupt hub on its own: routing to local LAPICs and to other nodes, the
//! IOAPIC's level-triggered handshake, and LAPIC views, with a recording stand-in for
//! the other nodes (no `/dev/kvm`, no network).

use std::sync::{Arc, Mutex};

use dvmm_irq::clock::TscMap;
use dvmm_irq::ioapic::{IoApic, IOREGSEL, IOWIN};
use dvmm_irq::lapic::{ApicView, Lapic};
use dvmm_irq::msg::{DeliveryMode, DestinationMode, InterruptMessage, Shorthand, TriggerMode};

use super::timers::TimerService;
use super::{InterruptHub, RemoteInterrupts, VcpuHandle};

/// What the hub asked of the other nodes.
#[derive(Default)]
struct Remote {
    irqs: Mutex<Vec<(u32, u8)>>,
    eois: Mutex<Vec<u8>>,
    views: Mutex<Vec<ApicView>>,
}

impl RemoteInterrupts for Remote {
    fn send_irq(&self, apic_id: u32, msg: &InterruptMessage) {
        self.irqs.lock().unwrap().push((apic_id, msg.vector));
    }
    fn level_eoi(&self, vector: u8) {
        self.eois.lock().unwrap().push(vector);
    }
    fn publish_view(&self, view: &ApicView) {
        self.views.lock().unwrap().push(*view);
    }
}

const SVR: u64 = 0xf0;

/// A hub for the vCPUs with APIC ids `local` of `total`, the IOAPIC here if `ioapic`.
fn hub(local: std::ops::Range<u32>, total: u32, ioapic: bool) -> (InterruptHub, Arc<Remote>) {
    let tsc = TscMap {
        tsc_khz: 1_000_000,
        base_ns: 0,
        ref_tsc: 0,
    };
    let first = local.start;
    let handles = local
        .map(|i| {
            let mut lapic = Lapic::new(i, i == 0, tsc);
            lapic.mmio_write(SVR, 0x1ff, 0);
            Arc::new(VcpuHandle::new(i, lapic))
        })
        .collect();
    let remote = Arc::new(Remote::default());
    let hub = InterruptHub::new(
        handles,
        first,
        total,
        ioapic.then(|| IoApic::new(0)),
        Arc::new(TimerService::new()),
        Some(remote.clone() as Arc<dyn RemoteInterrupts>),
    );
    (hub, remote)
}

fn fixed(vector: u8, destination: u32, shorthand: Shorthand) -> InterruptMessage {
    InterruptMessage {
        vector,
        delivery: DeliveryMode::Fixed,
        dest_mode: DestinationMode::Physical,
        destination,
        shorthand,
        trigger: TriggerMode::Edge,
        level: true,
    }
}

fn pending(hub: &InterruptHub, apic_id: u32) -> Option<u8> {
    let first = hub.vcpus()[0].index;
    hub.vcpus()[(apic_id - first) as usize]
        .lock()
        .pending_vector()
}

#[test]
fn a_physical_ipi_reaches_a_local_lapic_or_the_node_of_a_remote_one() {
    let (hub, remote) = hub(2..4, 4, false);
    hub.deliver(&fixed(0x41, 3, Shorthand::None), Some(2));
    assert_eq!(pending(&hub, 3), Some(0x41));
    assert_eq!(pending(&hub, 2), None);
    hub.deliver(&fixed(0x42, 0, Shorthand::None), Some(2));
    // An APIC id beyond the VM goes nowhere.
    hub.deliver(&fixed(0x43, 9, Shorthand::None), Some(2));
    assert_eq!(*remote.irqs.lock().unwrap(), [(0, 0x42)]);
}

#[test]
fn a_broadcast_reaches_every_lapic_but_the_sender_on_every_node() {
    let (hub, remote) = hub(2..4, 4, false);
    hub.deliver(&fixed(0x51, 0, Shorthand::AllExcludingSelf), Some(2));
    assert_eq!(pending(&hub, 3), Some(0x51));
    assert_eq!(pending(&hub, 2), None, "not the sender");
    let mut sent = remote.irqs.lock().unwrap().clone();
    sent.sort_unstable();
    assert_eq!(sent, [(0, 0x51), (1, 0x51)]);
}

/// Programs IOAPIC pin `pin`: `vector`, level-triggered, physical destination `dest`.
fn route_level(hub: &InterruptHub, pin: u32, vector: u8, dest: u32) {
    let reg = 0x10 + 2 * pin;
    hub.ioapic_write(IOREGSEL, reg + 1);
    hub.ioapic_write(IOWIN, dest << 24);
    hub.ioapic_write(IOREGSEL, reg);
    hub.ioapic_write(IOWIN, u32::from(vector) | (1 << 15));
}

#[test]
fn a_level_pin_is_delivered_once_until_its_eoi_then_again_while_still_high() {
    let (hub, remote) = hub(0..1, 2, true);
    route_level(&hub, 4, 0x60, 1);
    hub.set_gsi(4, true);
    hub.set_gsi(4, true);
    assert_eq!(
        *remote.irqs.lock().unwrap(),
        [(1, 0x60)],
        "remote IRR holds it"
    );
    // The EOI (from the other node's LAPIC) re-arms the pin; the line is still high.
    hub.level_eoi(0x60);
    assert_eq!(*remote.irqs.lock().unwrap(), [(1, 0x60), (1, 0x60)]);
    hub.set_gsi(4, false);
    hub.level_eoi(0x60);
    assert_eq!(
        remote.irqs.lock().unwrap().len(),
        2,
        "low line: nothing more"
    );
    assert!(remote.eois.lock().unwrap().is_empty(), "the IOAPIC is here");
}

#[test]
fn a_node_without_the_ioapic_forwards_level_eois_and_reads_all_ones() {
    let (hub, remote) = hub(1..2, 2, false);
    hub.level_eoi(0x61);
    hub.set_gsi(4, true);
    assert_eq!(*remote.eois.lock().unwrap(), [0x61]);
    assert!(remote.irqs.lock().unwrap().is_empty());
    assert_eq!(hub.ioapic_read(IOWIN), !0);
}

#[test]
fn a_lapic_view_is_published_when_it_changes_and_remote_ones_are_kept() {
    let (hub, remote) = hub(0..1, 2, false);
    let me = hub.vcpus()[0].clone();
    hub.lapic_written(&me);
    hub.lapic_written(&me);
    assert_eq!(remote.views.lock().unwrap().len(), 1, "published once");
    // A view of our own LAPIC from elsewhere is ignored; the other node's is kept and
    // used for logical delivery.
    let other = ApicView {
        apic_id: 1,
        x2apic: false,
        ldr: 0x0200_0000,
        dfr: 0xffff_ffff,
        arbitration_priority: 0,
        enabled: true,
    };
    hub.update_remote_view(other);
    let logical = InterruptMessage {
        dest_mode: DestinationMode::Logical,
        destination: 0x02,
        ..fixed(0x70, 0, Shorthand::None)
    };
    hub.deliver(&logical, None);
    assert_eq!(*remote.irqs.lock().unwrap(), [(1, 0x70)]);
    assert_eq!(pending(&hub, 0), None);
}
