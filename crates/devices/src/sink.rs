//! A device that ignores writes and reads as all-ones, like an empty ISA slot.

use crate::bus::BusDevice;

/// Accepts and ignores writes; reads return 0xFF bytes. For port 0x80 (POST) and other
/// harmless ports.
#[derive(Clone, Copy, Debug, Default)]
pub struct Sink;

impl BusDevice for Sink {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0xFF);
    }

    fn write(&mut self, _offset: u64, _data: &[u8]) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_all_ones() {
        let mut s = Sink;
        s.write(0, &[1, 2, 3]);
        let mut b = [0u8; 4];
        s.read(0, &mut b);
        assert_eq!(b, [0xFF; 4]);
    }
}
