//! KVM's paravirtual send-IPI hypercall (`KVM_HC_SEND_IPI`): one call names many
//! physical destinations by a bitmap, instead of one ICR write each.
//!
//! The ABI (Linux `Documentation/virt/kvm/x86/hypercalls.rst`): `a0`/`a1` are the low
//! and high halves of a bitmap of APIC ids starting at `a2` (the high half starts
//! `bits` ids later: 64 in long mode, 32 otherwise), `a3` is the ICR's low word, and
//! the answer is the number of APICs the IPI was delivered to, or `-KVM_EINVAL` when
//! the ICR asks for a logical destination or a shorthand.

use crate::msg::InterruptMessage;

/// `-KVM_EINVAL`: the answer to an ICR the hypercall does not take.
pub const KVM_EINVAL: i64 = -22;

/// ICR bits the hypercall refuses: logical destination mode and any shorthand.
const REFUSED_ICR_BITS: u64 = (1 << 11) | (3 << 18);

/// The messages one `KVM_HC_SEND_IPI` asks for, each to one APIC id below
/// `apic_count`; `Err(KVM_EINVAL)` for an ICR it does not take. `long_mode` is whether
/// the caller ran in 64-bit mode (its arguments are then 64 bits wide, else the low 32).
pub fn messages(
    args: [u64; 4],
    long_mode: bool,
    apic_count: u32,
) -> Result<Vec<InterruptMessage>, i64> {
    let width: u32 = if long_mode { 64 } else { 32 };
    let arg = |v: u64| {
        if long_mode {
            v
        } else {
            v & 0xffff_ffff
        }
    };
    let [low, high, min, icr] = args.map(arg);
    if icr & REFUSED_ICR_BITS != 0 {
        return Err(KVM_EINVAL);
    }
    let icr_low = u64::from(icr as u32);
    let mut out = Vec::new();
    let min = u64::from(min as u32);
    for (half, bitmap) in [low, high].into_iter().enumerate() {
        let base = min + half as u64 * u64::from(width);
        for bit in 0..width {
            if bitmap & (1 << bit) == 0 {
                continue;
            }
            let id = base + u64::from(bit);
            if id >= u64::from(apic_count) {
                break;
            }
            // A reserved delivery mode reaches no APIC.
            out.extend(InterruptMessage::from_icr(icr_low | (id << 32)));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::msg::{DeliveryMode, DestinationMode, Shorthand};

    #[test]
    fn a_bitmap_names_apic_ids_from_min() {
        let m = messages([0b1010, 0, 4, 0x40], true, 16).unwrap();
        let ids: Vec<u32> = m.iter().map(|m| m.destination).collect();
        assert_eq!(ids, vec![5, 7]);
        assert!(m.iter().all(|m| m.vector == 0x40
            && m.delivery == DeliveryMode::Fixed
            && m.dest_mode == DestinationMode::Physical
            && m.shorthand == Shorthand::None));
    }

    #[test]
    fn the_high_half_starts_one_width_later() {
        let ids = |long_mode, apics| {
            messages([0, 1, 0, 0x30], long_mode, apics)
                .unwrap()
                .iter()
                .map(|m| m.destination)
                .collect::<Vec<_>>()
        };
        assert_eq!(ids(true, 128), vec![64]);
        assert_eq!(ids(false, 128), vec![32]);
    }

    #[test]
    fn ids_past_the_last_apic_reach_nobody() {
        // kvm-unit-tests' check: every bit set, from an id no APIC has: 0 delivered.
        let m = messages([0xffff_ffff, 0, 0xffff_ffff, 0], true, 2).unwrap();
        assert!(m.is_empty());
        assert_eq!(messages([!0, !0, 0, 0x20], true, 3).unwrap().len(), 3);
    }

    #[test]
    fn outside_long_mode_arguments_are_32_bits() {
        let m = messages([0x1_0000_0001, 0, 0x1_0000_0000, 0x20], false, 4).unwrap();
        assert_eq!(m.len(), 1);
        assert_eq!(m[0].destination, 0);
    }

    #[test]
    fn logical_destinations_and_shorthands_are_refused() {
        assert_eq!(messages([1, 0, 0, 0x820], true, 2), Err(KVM_EINVAL));
        assert_eq!(messages([1, 0, 0, 0xc0020], true, 2), Err(KVM_EINVAL));
    }

    #[test]
    fn the_delivery_mode_is_the_icrs() {
        let m = messages([1, 0, 1, 0x400], true, 2).unwrap();
        assert_eq!(m[0].delivery, DeliveryMode::Nmi);
        assert_eq!(m[0].destination, 1);
    }
}
