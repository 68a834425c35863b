//! Which LAPICs receive an interrupt message.

use crate::lapic::ApicView;
use crate::msg::{DeliveryMode, InterruptMessage, Shorthand};

/// Indices into `views` that must receive `msg` sent by the LAPIC with id `source`
/// (None for IOAPIC/MSI), honouring shorthands, physical/logical destinations, broadcast,
/// and lowest-priority (exactly one target: lowest arbitration priority, ties broken by
/// rotating with the vector). Hardware-disabled LAPICs receive nothing. Indices are in
/// ascending order.
pub fn targets(msg: &InterruptMessage, source: Option<u32>, views: &[ApicView]) -> Vec<usize> {
    let enabled = views.iter().enumerate().filter(|(_, v)| v.enabled);
    let candidates: Vec<usize> = match msg.shorthand {
        Shorthand::SelfOnly => enabled
            .filter(|(_, v)| Some(v.apic_id) == source)
            .map(|(i, _)| i)
            .collect(),
        Shorthand::AllIncludingSelf => enabled.map(|(i, _)| i).collect(),
        Shorthand::AllExcludingSelf => enabled
            .filter(|(_, v)| Some(v.apic_id) != source)
            .map(|(i, _)| i)
            .collect(),
        Shorthand::None => enabled
            .filter(|(_, v)| v.matches(msg.dest_mode, msg.destination))
            .map(|(i, _)| i)
            .collect(),
    };
    if msg.delivery != DeliveryMode::LowestPriority || candidates.len() <= 1 {
        return candidates;
    }
    let Some(lowest) = candidates
        .iter()
        .map(|&i| views[i].arbitration_priority)
        .min()
    else {
        return candidates;
    };
    let ties: Vec<usize> = candidates
        .into_iter()
        .filter(|&i| views[i].arbitration_priority == lowest)
        .collect();
    let pick = ties[msg.vector as usize % ties.len()];
    vec![pick]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::TscMap;
    use crate::lapic::Lapic;
    use crate::msg::{DestinationMode, TriggerMode};

    const TSC: TscMap = TscMap {
        tsc_khz: 1_000_000,
        base_ns: 0,
        ref_tsc: 0,
    };

    fn view(id: u32) -> ApicView {
        ApicView {
            apic_id: id,
            x2apic: false,
            ldr: 0,
            dfr: 0xFFFF_FFFF,
            arbitration_priority: 0,
            enabled: true,
        }
    }

    fn msg(dest_mode: DestinationMode, destination: u32) -> InterruptMessage {
        InterruptMessage {
            dest_mode,
            destination,
            ..InterruptMessage::fixed(0x40, 0)
        }
    }

    #[test]
    fn physical_and_broadcast() {
        let views = [view(0), view(1), view(2)];
        assert_eq!(
            targets(&msg(DestinationMode::Physical, 1), None, &views),
            vec![1]
        );
        assert_eq!(
            targets(&msg(DestinationMode::Physical, 7), None, &views),
            Vec::<usize>::new()
        );
        assert_eq!(
            targets(&msg(DestinationMode::Physical, 0xFF), None, &views),
            vec![0, 1, 2]
        );
        assert_eq!(
            targets(&msg(DestinationMode::Physical, 0xFFFF_FFFF), None, &views),
            vec![0, 1, 2]
        );
    }

    #[test]
    fn disabled_apic_receives_nothing() {
        let mut views = [view(0), view(1)];
        views[1].enabled = false;
        assert_eq!(
            targets(&msg(DestinationMode::Physical, 1), None, &views),
            Vec::<usize>::new()
        );
        assert_eq!(
            targets(&msg(DestinationMode::Physical, 0xFF), None, &views),
            vec![0]
        );
    }

    #[test]
    fn logical_flat() {
        let mut views = [view(0), view(1), view(2)];
        views[0].ldr = 0x01 << 24;
        views[1].ldr = 0x02 << 24;
        views[2].ldr = 0x04 << 24;
        assert_eq!(
            targets(&msg(DestinationMode::Logical, 0x05), None, &views),
            vec![0, 2]
        );
        assert_eq!(
            targets(&msg(DestinationMode::Logical, 0x02), None, &views),
            vec![1]
        );
        assert_eq!(
            targets(&msg(DestinationMode::Logical, 0x08), None, &views),
            Vec::<usize>::new()
        );
        assert_eq!(
            targets(&msg(DestinationMode::Logical, 0xFF), None, &views),
            vec![0, 1, 2]
        );
    }

    #[test]
    fn logical_cluster() {
        let mut views = [view(0), view(1), view(2)];
        for v in &mut views {
            v.dfr = 0x0FFF_FFFF;
        }
        views[0].ldr = 0x11 << 24; // cluster 1, bit 0
        views[1].ldr = 0x12 << 24; // cluster 1, bit 1
        views[2].ldr = 0x21 << 24; // cluster 2, bit 0
        assert_eq!(
            targets(&msg(DestinationMode::Logical, 0x13), None, &views),
            vec![0, 1]
        );
        assert_eq!(
            targets(&msg(DestinationMode::Logical, 0x21), None, &views),
            vec![2]
        );
        assert_eq!(
            targets(&msg(DestinationMode::Logical, 0x31), None, &views),
            Vec::<usize>::new()
        );
        assert_eq!(
            targets(&msg(DestinationMode::Logical, 0xFF), None, &views),
            vec![0, 1, 2]
        );
    }

    #[test]
    fn x2apic_cluster_from_real_lapics() {
        let mut lapics: Vec<Lapic> = (0..20).map(|id| Lapic::new(id, id == 0, TSC)).collect();
        for l in &mut lapics {
            l.msr_write(0x1B, 0xFEE0_0000 | (1 << 11) | (1 << 10), 0)
                .unwrap();
        }
        let views: Vec<ApicView> = lapics.iter().map(Lapic::view).collect();
        assert_eq!(views[17].ldr, 0x0001_0002);
        // Cluster 1, bits 0 and 1 -> ids 16 and 17.
        assert_eq!(
            targets(&msg(DestinationMode::Logical, 0x0001_0003), None, &views),
            vec![16, 17]
        );
        // Cluster 0, bit 3 -> id 3.
        assert_eq!(
            targets(&msg(DestinationMode::Logical, 0x0000_0008), None, &views),
            vec![3]
        );
        assert_eq!(
            targets(&msg(DestinationMode::Logical, 0xFFFF_FFFF), None, &views).len(),
            20
        );
    }

    #[test]
    fn shorthands() {
        let views = [view(0), view(1), view(2)];
        let base = msg(DestinationMode::Physical, 0);
        let with = |s| InterruptMessage {
            shorthand: s,
            ..base
        };
        assert_eq!(
            targets(&with(Shorthand::SelfOnly), Some(2), &views),
            vec![2]
        );
        assert_eq!(
            targets(&with(Shorthand::SelfOnly), None, &views),
            Vec::<usize>::new()
        );
        assert_eq!(
            targets(&with(Shorthand::AllIncludingSelf), Some(2), &views),
            vec![0, 1, 2]
        );
        assert_eq!(
            targets(&with(Shorthand::AllExcludingSelf), Some(1), &views),
            vec![0, 2]
        );
    }

    #[test]
    fn lowest_priority_picks_exactly_one() {
        let mut views = [view(0), view(1), view(2), view(3)];
        views[0].arbitration_priority = 0x20;
        views[1].arbitration_priority = 0x10;
        views[2].arbitration_priority = 0x10;
        views[3].arbitration_priority = 0x00;
        let lp = |vector, dest| InterruptMessage {
            vector,
            delivery: DeliveryMode::LowestPriority,
            ..msg(DestinationMode::Logical, dest)
        };
        for (i, v) in views.iter_mut().enumerate() {
            v.ldr = (1 << i) << 24;
        }
        // All four: id 3 has the lowest priority.
        assert_eq!(targets(&lp(0x40, 0x0F), None, &views), vec![3]);
        // Ids 0..2: ids 1 and 2 tie; the vector rotates between them.
        assert_eq!(targets(&lp(0x40, 0x07), None, &views), vec![1]);
        assert_eq!(targets(&lp(0x41, 0x07), None, &views), vec![2]);
        // A single candidate is returned as is.
        assert_eq!(targets(&lp(0x41, 0x01), None, &views), vec![0]);
    }

    #[test]
    fn level_messages_route_like_edge() {
        let views = [view(0), view(1)];
        let m = InterruptMessage {
            trigger: TriggerMode::Level,
            ..msg(DestinationMode::Physical, 1)
        };
        assert_eq!(targets(&m, None, &views), vec![1]);
    }
}
