//! Interrupt messages on the (virtual) APIC bus, and MSI decoding.

/// How the receiving LAPIC handles a message (ICR / redirection entry / MSI bits 10:8).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeliveryMode {
    /// Set the vector in IRR.
    Fixed,
    /// Like Fixed, but to the one target with the lowest arbitration priority.
    LowestPriority,
    /// System management interrupt (ignored by dvmm).
    Smi,
    /// Non-maskable interrupt.
    Nmi,
    /// INIT (assert resets the CPU; level de-assert is a no-op).
    Init,
    /// Start-up IPI carrying the real-mode start page in the vector.
    StartUp,
    /// External (8259-style) interrupt (ignored by dvmm).
    ExtInt,
}

impl DeliveryMode {
    /// Decode the 3-bit delivery-mode field; `None` for the reserved encoding 0b011.
    pub fn from_bits(bits: u32) -> Option<Self> {
        Some(match bits & 7 {
            0 => Self::Fixed,
            1 => Self::LowestPriority,
            2 => Self::Smi,
            4 => Self::Nmi,
            5 => Self::Init,
            6 => Self::StartUp,
            7 => Self::ExtInt,
            _ => return None,
        })
    }

    /// The 3-bit encoding used in the ICR, redirection entries and MSI data.
    pub fn bits(self) -> u32 {
        match self {
            Self::Fixed => 0,
            Self::LowestPriority => 1,
            Self::Smi => 2,
            Self::Nmi => 4,
            Self::Init => 5,
            Self::StartUp => 6,
            Self::ExtInt => 7,
        }
    }
}

/// How `destination` is interpreted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DestinationMode {
    /// `destination` is an APIC id.
    Physical,
    /// `destination` is a message destination address matched against LDR/DFR.
    Logical,
}

/// ICR destination shorthand.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shorthand {
    /// Use the destination field.
    None,
    /// Only the sending LAPIC.
    SelfOnly,
    /// Every LAPIC, the sender included.
    AllIncludingSelf,
    /// Every LAPIC but the sender.
    AllExcludingSelf,
}

impl Shorthand {
    /// Decode the 2-bit ICR shorthand field (bits 19:18 shifted down).
    pub fn from_bits(bits: u32) -> Self {
        match bits & 3 {
            0 => Self::None,
            1 => Self::SelfOnly,
            2 => Self::AllIncludingSelf,
            _ => Self::AllExcludingSelf,
        }
    }

    /// The 2-bit encoding.
    pub fn bits(self) -> u32 {
        match self {
            Self::None => 0,
            Self::SelfOnly => 1,
            Self::AllIncludingSelf => 2,
            Self::AllExcludingSelf => 3,
        }
    }
}

/// Edge or level triggered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TriggerMode {
    /// Edge triggered.
    Edge,
    /// Level triggered (the LAPIC sets TMR and reports the EOI).
    Level,
}

/// xAPIC physical broadcast destination.
pub const XAPIC_BROADCAST: u32 = 0xFF;
/// x2APIC physical/logical broadcast destination.
pub const X2APIC_BROADCAST: u32 = 0xFFFF_FFFF;

/// One interrupt message on the (virtual) APIC bus. Serializable later for the network
/// (see [`InterruptMessage::to_wire`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InterruptMessage {
    /// Interrupt vector (or SIPI start page).
    pub vector: u8,
    /// Delivery mode.
    pub delivery: DeliveryMode,
    /// Physical or logical destination.
    pub dest_mode: DestinationMode,
    /// Physical: APIC id (0xFF = broadcast in xAPIC, 0xFFFF_FFFF in x2APIC). Logical: the MDA.
    pub destination: u32,
    /// Destination shorthand (only ICR writes use anything but `None`).
    pub shorthand: Shorthand,
    /// Edge or level.
    pub trigger: TriggerMode,
    /// Level: asserted (true) or de-asserted (false; only meaningful for INIT level de-assert).
    pub level: bool,
}

impl InterruptMessage {
    /// A fixed, edge-triggered, physically addressed message to `apic_id`.
    pub fn fixed(vector: u8, apic_id: u32) -> Self {
        Self {
            vector,
            delivery: DeliveryMode::Fixed,
            dest_mode: DestinationMode::Physical,
            destination: apic_id,
            shorthand: Shorthand::None,
            trigger: TriggerMode::Edge,
            level: true,
        }
    }

    /// Decode an MSI (address 0xFEExxxxx, data). `None` if the address is not an MSI
    /// address (bits 63:20 must be 0xFEE) or the data uses the reserved delivery mode 0b011.
    ///
    /// Address: bits 19:12 destination id, bit 2 destination mode (1 = logical).
    /// Data: bits 7:0 vector, 10:8 delivery mode, bit 14 level, bit 15 trigger (1 = level).
    pub fn from_msi(address: u64, data: u32) -> Option<Self> {
        if address >> 20 != 0xFEE {
            return None;
        }
        let delivery = DeliveryMode::from_bits(data >> 8)?;
        let trigger = if data & (1 << 15) != 0 {
            TriggerMode::Level
        } else {
            TriggerMode::Edge
        };
        Some(Self {
            vector: data as u8,
            delivery,
            dest_mode: if address & (1 << 2) != 0 {
                DestinationMode::Logical
            } else {
                DestinationMode::Physical
            },
            destination: ((address >> 12) & 0xFF) as u32,
            shorthand: Shorthand::None,
            trigger,
            // Edge messages are always "asserted"; only level messages carry bit 14.
            level: trigger == TriggerMode::Edge || data & (1 << 14) != 0,
        })
    }

    /// Decode an ICR value (x2APIC layout: destination in bits 63:32; for xAPIC pass
    /// `(icr_high >> 24) << 32 | icr_low`). `None` for the reserved delivery mode.
    pub fn from_icr(icr: u64) -> Option<Self> {
        let low = icr as u32;
        Some(Self {
            vector: low as u8,
            delivery: DeliveryMode::from_bits(low >> 8)?,
            dest_mode: if low & (1 << 11) != 0 {
                DestinationMode::Logical
            } else {
                DestinationMode::Physical
            },
            destination: (icr >> 32) as u32,
            shorthand: Shorthand::from_bits(low >> 18),
            trigger: if low & (1 << 15) != 0 {
                TriggerMode::Level
            } else {
                TriggerMode::Edge
            },
            level: low & (1 << 14) != 0,
        })
    }

    /// The ICR encoding of this message (x2APIC layout, destination in bits 63:32).
    pub fn to_icr(&self) -> u64 {
        let mut low =
            u32::from(self.vector) | self.delivery.bits() << 8 | self.shorthand.bits() << 18;
        if self.dest_mode == DestinationMode::Logical {
            low |= 1 << 11;
        }
        if self.level {
            low |= 1 << 14;
        }
        if self.trigger == TriggerMode::Level {
            low |= 1 << 15;
        }
        u64::from(self.destination) << 32 | u64::from(low)
    }

    /// Compact 64-bit wire form (same as [`to_icr`](Self::to_icr)); decode with
    /// [`from_wire`](Self::from_wire).
    pub fn to_wire(&self) -> u64 {
        self.to_icr()
    }

    /// Decode the wire form; `None` if it is malformed.
    pub fn from_wire(wire: u64) -> Option<Self> {
        Self::from_icr(wire)
    }

    /// Whether this is the INIT level de-assert message (a no-op on modern CPUs).
    pub fn is_init_deassert(&self) -> bool {
        self.delivery == DeliveryMode::Init && self.trigger == TriggerMode::Level && !self.level
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn msi_decode_physical_fixed_edge() {
        let m = InterruptMessage::from_msi(0xFEE0_3000, 0x0000_0041).unwrap();
        assert_eq!(m, InterruptMessage::fixed(0x41, 3));
    }

    #[test]
    fn msi_decode_logical_lowest_level() {
        let m = InterruptMessage::from_msi(0xFEE0_F004, 0x0000_C1A5).unwrap();
        assert_eq!(m.vector, 0xA5);
        assert_eq!(m.delivery, DeliveryMode::LowestPriority);
        assert_eq!(m.dest_mode, DestinationMode::Logical);
        assert_eq!(m.destination, 0x0F);
        assert_eq!(m.trigger, TriggerMode::Level);
        assert!(m.level);
        assert_eq!(m.shorthand, Shorthand::None);
    }

    #[test]
    fn msi_decode_nmi_and_rejects() {
        let m = InterruptMessage::from_msi(0xFEE0_1000, 0x400).unwrap();
        assert_eq!(m.delivery, DeliveryMode::Nmi);
        assert_eq!(m.destination, 1);
        assert_eq!(InterruptMessage::from_msi(0xFED0_0000, 0x41), None);
        assert_eq!(InterruptMessage::from_msi(0x1_FEE0_0000, 0x41), None);
        assert_eq!(InterruptMessage::from_msi(0xFEE0_0000, 0x341), None);
    }

    #[test]
    fn icr_round_trip() {
        let m = InterruptMessage {
            vector: 0x9A,
            delivery: DeliveryMode::StartUp,
            dest_mode: DestinationMode::Logical,
            destination: 0x0001_0002,
            shorthand: Shorthand::AllExcludingSelf,
            trigger: TriggerMode::Level,
            level: true,
        };
        assert_eq!(InterruptMessage::from_wire(m.to_wire()), Some(m));
        // 0x9A | StartUp << 8 | logical | level | trigger | all-excluding-self
        assert_eq!(m.to_icr(), 0x0001_0002_000C_CE9A);
    }

    #[test]
    fn init_deassert_detected() {
        let m = InterruptMessage::from_icr(0x0000_8500).unwrap();
        assert!(m.is_init_deassert());
        let a = InterruptMessage::from_icr(0x0000_C500).unwrap();
        assert!(!a.is_init_deassert());
    }
}
