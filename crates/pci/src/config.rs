//! A PCI function's configuration space: the type 0 header, memory BARs and the
//! capability list, with per-byte write masks so that any guest write, of any size at
//! any offset, changes only what real hardware would let it change.

/// Size of a PCI Express function's configuration space (ECAM reaches all of it; port
/// 0xCF8 the first 256 bytes).
pub const CONFIG_SIZE: usize = 4096;

/// Offset of the vendor id.
pub const VENDOR_ID: usize = 0x00;
/// Offset of the command register.
pub const COMMAND: usize = 0x04;
/// Offset of the status register.
pub const STATUS: usize = 0x06;
/// Offset of the first BAR.
pub const BAR0: usize = 0x10;
/// Offset of the capabilities pointer.
pub const CAPABILITIES_POINTER: usize = 0x34;
/// Offset of the interrupt line (written by the OS, unused by the device).
pub const INTERRUPT_LINE: usize = 0x3C;
/// Offset of the interrupt pin (0: no INTx).
pub const INTERRUPT_PIN: usize = 0x3D;
/// Number of BARs in a type 0 header.
pub const BARS: usize = 6;

/// Command register: the function answers memory accesses to its BARs.
pub const COMMAND_MEMORY: u16 = 1 << 1;
/// Command register: the function may master the bus (DMA, MSI writes).
pub const COMMAND_BUS_MASTER: u16 = 1 << 2;
/// Command register: legacy INTx disabled.
pub const COMMAND_INTX_DISABLE: u16 = 1 << 10;
/// Status register: a capability list is present.
pub const STATUS_CAPABILITIES: u16 = 1 << 4;

/// Identity of a function, as its header shows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Identity {
    /// Vendor id.
    pub vendor: u16,
    /// Device id.
    pub device: u16,
    /// Revision id.
    pub revision: u8,
    /// Class code: base class, subclass, programming interface (`0xBBSSPP`).
    pub class: u32,
    /// Subsystem vendor id.
    pub subsystem_vendor: u16,
    /// Subsystem id.
    pub subsystem: u16,
}

/// Why a configuration space could not take a BAR or a capability.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    /// BAR sizes are powers of two of at least 4 KiB here (so BARs never share a page).
    #[error("BAR size {0:#x} is not a power of two of at least 4 KiB")]
    BarSize(u64),
    /// BAR index past the six a type 0 header has, or already in use.
    #[error("BAR {0} does not exist or is already in use")]
    BarIndex(usize),
    /// No room left for a capability in the first 256 bytes.
    #[error("no room for a {0}-byte capability in the configuration header")]
    NoRoom(usize),
}

/// A function's configuration space.
#[derive(Clone)]
pub struct ConfigSpace {
    bytes: Box<[u8; CONFIG_SIZE]>,
    /// Bits the guest may change, per byte.
    writable: Box<[u8; CONFIG_SIZE]>,
    bar_sizes: [u64; BARS],
    next_capability: usize,
    last_capability: Option<usize>,
}

impl std::fmt::Debug for ConfigSpace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConfigSpace")
            .field(
                "id",
                &format_args!("{:04x}:{:04x}", self.u16(0), self.u16(2)),
            )
            .field("bar_sizes", &self.bar_sizes)
            .finish()
    }
}

impl ConfigSpace {
    /// A type 0 header with `id`, no BARs, no capabilities, no INTx pin.
    pub fn new(id: Identity) -> ConfigSpace {
        let mut c = ConfigSpace {
            bytes: Box::new([0; CONFIG_SIZE]),
            writable: Box::new([0; CONFIG_SIZE]),
            bar_sizes: [0; BARS],
            next_capability: 0x40,
            last_capability: None,
        };
        c.set_u16(VENDOR_ID, id.vendor);
        c.set_u16(0x02, id.device);
        c.bytes[0x08] = id.revision;
        c.bytes[0x09..0x0C].copy_from_slice(&id.class.to_le_bytes()[..3]);
        c.set_u16(0x2C, id.subsystem_vendor);
        c.set_u16(0x2E, id.subsystem);
        let command = COMMAND_MEMORY | COMMAND_BUS_MASTER | COMMAND_INTX_DISABLE;
        c.writable[COMMAND..COMMAND + 2].copy_from_slice(&command.to_le_bytes());
        c.writable[INTERRUPT_LINE] = 0xff;
        c
    }

    /// Adds a 32-bit non-prefetchable memory BAR of `size` bytes at index `bar`.
    pub fn add_memory_bar(&mut self, bar: usize, size: u64) -> Result<(), ConfigError> {
        if !size.is_power_of_two() || !(0x1000..=1 << 31).contains(&size) {
            return Err(ConfigError::BarSize(size));
        }
        if bar >= BARS || self.bar_sizes[bar] != 0 {
            return Err(ConfigError::BarIndex(bar));
        }
        self.bar_sizes[bar] = size;
        let mask = !(u32::try_from(size - 1).unwrap_or(u32::MAX));
        let at = BAR0 + 4 * bar;
        self.writable[at..at + 4].copy_from_slice(&mask.to_le_bytes());
        Ok(())
    }

    /// Adds a capability with id `id` and `body` (what follows the id and next-pointer
    /// bytes); `writable` gives the writable bits of the whole capability, id byte first
    /// (shorter than the capability: the rest is read-only). Returns its offset.
    pub fn add_capability(
        &mut self,
        id: u8,
        body: &[u8],
        writable: &[u8],
    ) -> Result<usize, ConfigError> {
        let len = 2 + body.len();
        let at = self.next_capability;
        // Dword-aligned, inside the 256-byte header.
        if at + len > 0x100 {
            return Err(ConfigError::NoRoom(len));
        }
        self.bytes[at] = id;
        self.bytes[at + 1] = 0;
        self.bytes[at + 2..at + len].copy_from_slice(body);
        for (i, m) in writable.iter().take(len).enumerate() {
            self.writable[at + i] = *m;
        }
        match self.last_capability {
            Some(prev) => self.bytes[prev + 1] = at as u8,
            None => {
                self.bytes[CAPABILITIES_POINTER] = at as u8;
                let status = self.u16(STATUS) | STATUS_CAPABILITIES;
                self.set_u16(STATUS, status);
            }
        }
        self.last_capability = Some(at);
        self.next_capability = (at + len + 3) & !3;
        Ok(at)
    }

    /// Guest read of `data.len()` bytes at `offset` (bytes past the end read as ones).
    pub fn read(&self, offset: usize, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = offset
                .checked_add(i)
                .and_then(|o| self.bytes.get(o))
                .copied()
                .unwrap_or(0xff);
        }
    }

    /// Guest write of `data` at `offset`: only writable bits change.
    pub fn write(&mut self, offset: usize, data: &[u8]) {
        for (i, v) in data.iter().enumerate() {
            let Some(o) = offset.checked_add(i).filter(|&o| o < CONFIG_SIZE) else {
                return;
            };
            let m = self.writable[o];
            self.bytes[o] = (self.bytes[o] & !m) | (v & m);
        }
    }

    /// The 16-bit value at `offset` (must lie inside the space).
    pub fn u16(&self, offset: usize) -> u16 {
        u16::from_le_bytes([self.bytes[offset], self.bytes[offset + 1]])
    }

    /// The 32-bit value at `offset` (must lie inside the space).
    pub fn u32(&self, offset: usize) -> u32 {
        u32::from_le_bytes([
            self.bytes[offset],
            self.bytes[offset + 1],
            self.bytes[offset + 2],
            self.bytes[offset + 3],
        ])
    }

    /// Sets the 16-bit value at `offset`, whatever the write mask (the device's side).
    pub fn set_u16(&mut self, offset: usize, v: u16) {
        self.bytes[offset..offset + 2].copy_from_slice(&v.to_le_bytes());
    }

    /// Sets the 32-bit value at `offset`, whatever the write mask (the device's side).
    pub fn set_u32(&mut self, offset: usize, v: u32) {
        self.bytes[offset..offset + 4].copy_from_slice(&v.to_le_bytes());
    }

    /// Places BAR `bar` at `address` (what firmware does before the OS starts).
    pub fn set_bar_address(&mut self, bar: usize, address: u32) {
        if let Some(&size) = self.bar_sizes.get(bar).filter(|s| **s != 0) {
            let mask = !(u32::try_from(size - 1).unwrap_or(u32::MAX));
            self.set_u32(BAR0 + 4 * bar, address & mask);
        }
    }

    /// The size of BAR `bar` (0: not implemented).
    pub fn bar_size(&self, bar: usize) -> u64 {
        self.bar_sizes.get(bar).copied().unwrap_or(0)
    }

    /// The memory windows the function decodes now: `(bar, base, size)` for each BAR,
    /// while memory decoding is on. A BAR the guest is sizing (all ones) or left at 0
    /// decodes nothing.
    pub fn decoded_bars(&self) -> Vec<(usize, u64, u64)> {
        if self.u16(COMMAND) & COMMAND_MEMORY == 0 {
            return Vec::new();
        }
        (0..BARS)
            .filter_map(|bar| {
                let size = self.bar_sizes[bar];
                let base = u64::from(self.u32(BAR0 + 4 * bar) & !0xf);
                let mask = !(size.wrapping_sub(1)) & 0xffff_ffff;
                (size != 0 && base != 0 && base != mask).then_some((bar, base, size))
            })
            .collect()
    }

    /// Whether the function may master the bus (DMA and MSI writes).
    pub fn bus_master(&self) -> bool {
        self.u16(COMMAND) & COMMAND_BUS_MASTER != 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id() -> Identity {
        Identity {
            vendor: 0x1af4,
            device: 0x1042,
            revision: 1,
            class: 0x01_80_00,
            subsystem_vendor: 0x1af4,
            subsystem: 0x40,
        }
    }

    fn read32(c: &ConfigSpace, at: usize) -> u32 {
        let mut b = [0u8; 4];
        c.read(at, &mut b);
        u32::from_le_bytes(b)
    }

    #[test]
    fn header_shows_the_identity_and_is_read_only() {
        let mut c = ConfigSpace::new(id());
        assert_eq!(read32(&c, 0), 0x1042_1af4);
        assert_eq!(read32(&c, 8), 0x0180_0001);
        c.write(0, &[0; 4]);
        c.write(8, &[0xff; 4]);
        assert_eq!(read32(&c, 0), 0x1042_1af4);
        assert_eq!(read32(&c, 8), 0x0180_0001);
        let mut b = [0u8; 2];
        c.read(CONFIG_SIZE - 1, &mut b);
        assert_eq!(b, [0, 0xff], "past the end reads ones");
    }

    #[test]
    fn a_bar_is_sized_placed_and_decoded_only_with_memory_on() {
        let mut c = ConfigSpace::new(id());
        c.add_memory_bar(0, 0x8000).unwrap();
        c.write(BAR0, &u32::MAX.to_le_bytes());
        assert_eq!(read32(&c, BAR0), 0xffff_8000, "size probe");
        assert!(c.decoded_bars().is_empty(), "memory decoding is off");
        c.write(BAR0, &0xc000_1234u32.to_le_bytes());
        assert_eq!(read32(&c, BAR0), 0xc000_0000);
        c.write(COMMAND, &COMMAND_MEMORY.to_le_bytes());
        assert_eq!(c.decoded_bars(), vec![(0, 0xc000_0000, 0x8000)]);
        // An unimplemented BAR stays 0.
        c.write(BAR0 + 4, &u32::MAX.to_le_bytes());
        assert_eq!(read32(&c, BAR0 + 4), 0);
        assert_eq!(c.add_memory_bar(0, 0x1000), Err(ConfigError::BarIndex(0)));
        assert_eq!(
            c.add_memory_bar(1, 0x1800),
            Err(ConfigError::BarSize(0x1800))
        );
    }

    #[test]
    fn capabilities_are_chained() {
        let mut c = ConfigSpace::new(id());
        let a = c
            .add_capability(0x11, &[1, 2, 3, 4, 5, 6, 7, 8, 9, 10], &[])
            .unwrap();
        let b = c.add_capability(0x09, &[0; 14], &[]).unwrap();
        assert_eq!(c.u16(STATUS) & STATUS_CAPABILITIES, STATUS_CAPABILITIES);
        assert_eq!(usize::from(c.bytes[CAPABILITIES_POINTER]), a);
        assert_eq!(usize::from(c.bytes[a + 1]), b);
        assert_eq!(c.bytes[b + 1], 0);
        assert_eq!(b % 4, 0);
        assert!(matches!(
            c.add_capability(9, &[0; 250], &[]),
            Err(ConfigError::NoRoom(_))
        ));
    }
}
