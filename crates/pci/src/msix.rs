//! MSI-X: a function's table of message addresses and data, its pending-bit array, and
//! the capability that enables and masks them.
//!
//! A vector that fires while it (or the whole function) is masked is remembered in the
//! pending-bit array and sent, once, when it is unmasked; one that fires while MSI-X is
//! off is not sent at all (the device falls back to whatever else it has).

use std::sync::Arc;

use crate::config::{ConfigError, ConfigSpace};

/// PCI capability id of MSI-X.
pub const CAPABILITY_ID: u8 = 0x11;
/// Message control: MSI-X enabled.
const CONTROL_ENABLE: u16 = 1 << 15;
/// Message control: every vector masked.
const CONTROL_FUNCTION_MASK: u16 = 1 << 14;
/// Vector control: this vector masked.
const VECTOR_MASKED: u32 = 1;
/// Bytes per table entry.
pub const ENTRY_SIZE: usize = 16;

/// Where MSI messages go: the interrupt controllers. Implemented by the VMM.
pub trait MsiSink: Send + Sync {
    /// Delivers the message a device writes: `data` to `address` (0xFEEx_xxxx).
    fn send_msi(&self, address: u64, data: u32);
}

#[derive(Clone, Copy, Debug, Default)]
struct Entry {
    address: u64,
    data: u32,
    control: u32,
}

/// One function's MSI-X state.
pub struct Msix {
    table: Vec<Entry>,
    pending: Vec<bool>,
    capability: usize,
    sink: Arc<dyn MsiSink>,
}

impl std::fmt::Debug for Msix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Msix")
            .field("vectors", &self.table.len())
            .field("capability", &self.capability)
            .finish()
    }
}

impl Msix {
    /// `vectors` vectors (1..=2048) whose table is at `table_offset` and pending bits
    /// at `pba_offset` of BAR `bar`; adds the capability to `config`.
    pub fn new(
        config: &mut ConfigSpace,
        vectors: u16,
        bar: u8,
        table_offset: u32,
        pba_offset: u32,
        sink: Arc<dyn MsiSink>,
    ) -> Result<Msix, ConfigError> {
        let vectors = vectors.clamp(1, 2048);
        let mut body = Vec::with_capacity(10);
        body.extend_from_slice(&(vectors - 1).to_le_bytes());
        body.extend_from_slice(&(table_offset | u32::from(bar)).to_le_bytes());
        body.extend_from_slice(&(pba_offset | u32::from(bar)).to_le_bytes());
        // Only the enable and function-mask bits are the guest's.
        let capability = config.add_capability(CAPABILITY_ID, &body, &[0, 0, 0, 0xc0])?;
        Ok(Msix {
            table: vec![
                Entry {
                    control: VECTOR_MASKED,
                    ..Entry::default()
                };
                usize::from(vectors)
            ],
            pending: vec![false; usize::from(vectors)],
            capability,
            sink,
        })
    }

    /// Offset of the capability in the configuration space.
    pub fn capability(&self) -> usize {
        self.capability
    }

    /// Number of vectors.
    pub fn vectors(&self) -> usize {
        self.table.len()
    }

    fn control(&self, config: &ConfigSpace) -> u16 {
        config.u16(self.capability + 2)
    }

    /// Whether the guest turned MSI-X on.
    pub fn enabled(&self, config: &ConfigSpace) -> bool {
        self.control(config) & CONTROL_ENABLE != 0
    }

    fn masked(&self, config: &ConfigSpace, vector: usize) -> bool {
        self.control(config) & CONTROL_FUNCTION_MASK != 0
            || self.table[vector].control & VECTOR_MASKED != 0
    }

    /// The device signals `vector`: sent now, or left pending while masked. False if
    /// MSI-X is off or the vector does not exist (nothing was sent or kept).
    pub fn notify(&mut self, config: &ConfigSpace, vector: usize) -> bool {
        if vector >= self.table.len() || !self.enabled(config) {
            return false;
        }
        if self.masked(config, vector) || !config.bus_master() {
            self.pending[vector] = true;
        } else {
            let e = self.table[vector];
            self.sink.send_msi(e.address, e.data);
        }
        true
    }

    /// Sends every pending vector that is no longer masked.
    fn flush_pending(&mut self, config: &ConfigSpace) {
        if !self.enabled(config) || !config.bus_master() {
            return;
        }
        for v in 0..self.table.len() {
            if self.pending[v] && !self.masked(config, v) {
                self.pending[v] = false;
                let e = self.table[v];
                self.sink.send_msi(e.address, e.data);
            }
        }
    }

    /// After a guest write to the configuration space (the capability may have been
    /// enabled or unmasked).
    pub fn config_written(&mut self, config: &ConfigSpace) {
        self.flush_pending(config);
    }

    /// Guest read of the table at `offset` (from the table's start).
    pub fn table_read(&self, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = self.table_byte(offset.saturating_add(i as u64));
        }
    }

    fn table_byte(&self, offset: u64) -> u8 {
        let Some(e) = usize::try_from(offset / 16)
            .ok()
            .and_then(|i| self.table.get(i))
        else {
            return 0;
        };
        let mut bytes = [0u8; ENTRY_SIZE];
        bytes[..8].copy_from_slice(&e.address.to_le_bytes());
        bytes[8..12].copy_from_slice(&e.data.to_le_bytes());
        bytes[12..].copy_from_slice(&e.control.to_le_bytes());
        bytes[(offset % 16) as usize]
    }

    /// Guest write to the table at `offset`; unmasking a pending vector sends it.
    pub fn table_write(&mut self, config: &ConfigSpace, offset: u64, data: &[u8]) {
        for (i, v) in data.iter().enumerate() {
            let o = offset.saturating_add(i as u64);
            let Some(e) = usize::try_from(o / 16)
                .ok()
                .and_then(|i| self.table.get_mut(i))
            else {
                continue;
            };
            let mut bytes = [0u8; ENTRY_SIZE];
            bytes[..8].copy_from_slice(&e.address.to_le_bytes());
            bytes[8..12].copy_from_slice(&e.data.to_le_bytes());
            bytes[12..].copy_from_slice(&e.control.to_le_bytes());
            bytes[(o % 16) as usize] = *v;
            e.address = u64::from_le_bytes(bytes[..8].try_into().unwrap_or([0; 8]));
            e.data = u32::from_le_bytes(bytes[8..12].try_into().unwrap_or([0; 4]));
            // Only the mask bit of vector control is defined.
            e.control =
                u32::from_le_bytes(bytes[12..].try_into().unwrap_or([0; 4])) & VECTOR_MASKED;
        }
        self.flush_pending(config);
    }

    /// Guest read of the pending-bit array at `offset`.
    pub fn pba_read(&self, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            let byte = offset.saturating_add(i as u64);
            *b = (0..8u64).fold(0u8, |acc, bit| {
                let v = byte
                    .checked_mul(8)
                    .and_then(|b| usize::try_from(b + bit).ok())
                    .unwrap_or(usize::MAX);
                if self.pending.get(v).copied().unwrap_or(false) {
                    acc | 1 << bit
                } else {
                    acc
                }
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Identity, COMMAND, COMMAND_BUS_MASTER};
    use std::sync::Mutex;

    #[derive(Default)]
    struct Sent(Mutex<Vec<(u64, u32)>>);

    impl MsiSink for Sent {
        fn send_msi(&self, address: u64, data: u32) {
            self.0.lock().unwrap().push((address, data));
        }
    }

    fn setup() -> (ConfigSpace, Msix, Arc<Sent>) {
        let mut c = ConfigSpace::new(Identity {
            vendor: 1,
            device: 2,
            revision: 0,
            class: 0,
            subsystem_vendor: 0,
            subsystem: 0,
        });
        let sent = Arc::new(Sent::default());
        let m = Msix::new(&mut c, 3, 0, 0x4000, 0x6000, sent.clone()).unwrap();
        c.write(COMMAND, &COMMAND_BUS_MASTER.to_le_bytes());
        (c, m, sent)
    }

    fn program(c: &ConfigSpace, m: &mut Msix, v: u64, address: u64, data: u32, masked: bool) {
        let mut e = [0u8; 16];
        e[..8].copy_from_slice(&address.to_le_bytes());
        e[8..12].copy_from_slice(&data.to_le_bytes());
        e[12] = u8::from(masked);
        // As Linux writes it: dwords.
        for (i, d) in e.chunks(4).enumerate() {
            m.table_write(c, v * 16 + 4 * i as u64, d);
        }
    }

    fn set_control(c: &mut ConfigSpace, m: &mut Msix, control: u16) {
        c.write(m.capability + 2, &control.to_le_bytes());
        m.config_written(c);
    }

    #[test]
    fn capability_describes_the_table() {
        let (c, m, _) = setup();
        assert_eq!(c.u16(m.capability + 2), 2, "table size - 1");
        assert_eq!(c.u32(m.capability + 4), 0x4000);
        assert_eq!(c.u32(m.capability + 8), 0x6000);
        let mut b = [0u8; 4];
        m.table_read(12, &mut b);
        assert_eq!(b, [1, 0, 0, 0], "vectors start masked");
    }

    #[test]
    fn off_sends_nothing_masked_is_pending_and_sent_once_on_unmask() {
        let (mut c, mut m, sent) = setup();
        assert!(!m.notify(&c, 0), "MSI-X is off");
        set_control(&mut c, &mut m, CONTROL_ENABLE);
        program(&c, &mut m, 1, 0xfee0_1000, 0x41, true);
        assert!(m.notify(&c, 1));
        assert!(m.notify(&c, 1));
        assert!(sent.0.lock().unwrap().is_empty());
        let mut pba = [0u8; 1];
        m.pba_read(0, &mut pba);
        assert_eq!(pba, [0b010]);
        program(&c, &mut m, 1, 0xfee0_1000, 0x41, false);
        assert_eq!(
            *sent.0.lock().unwrap(),
            [(0xfee0_1000, 0x41)],
            "exactly once"
        );
        m.pba_read(0, &mut pba);
        assert_eq!(pba, [0]);
        assert!(m.notify(&c, 1));
        assert_eq!(sent.0.lock().unwrap().len(), 2, "unmasked: sent at once");
        assert!(!m.notify(&c, 3), "no such vector");
    }

    #[test]
    fn function_mask_holds_every_vector() {
        let (mut c, mut m, sent) = setup();
        set_control(&mut c, &mut m, CONTROL_ENABLE | CONTROL_FUNCTION_MASK);
        program(&c, &mut m, 0, 0xfee0_0000, 0x30, false);
        program(&c, &mut m, 2, 0xfee0_0000, 0x32, false);
        m.notify(&c, 0);
        m.notify(&c, 2);
        assert!(sent.0.lock().unwrap().is_empty());
        set_control(&mut c, &mut m, CONTROL_ENABLE);
        assert_eq!(
            *sent.0.lock().unwrap(),
            [(0xfee0_0000, 0x30), (0xfee0_0000, 0x32)]
        );
    }

    #[test]
    fn odd_table_accesses_never_panic() {
        let (c, mut m, _) = setup();
        m.table_write(&c, u64::MAX - 2, &[1; 8]);
        let mut b = [0u8; 8];
        m.table_read(u64::MAX - 3, &mut b);
        m.pba_read(u64::MAX, &mut b);
        m.table_write(&c, 47, &[0xff; 8]);
    }
}
