//! The compressed kernel inside a bzImage.
//!
//! A bzImage carries `vmlinux` (an ELF image) compressed; its own decompressor unpacks
//! it at boot. Where guest kernel code is emulated instruction by instruction, that
//! decompressor alone takes tens of minutes, so the VMM can unpack the payload itself
//! (natively, in well under a second) and enter the ELF through its PVH entry.

use std::io::Read;

/// Compression formats of a bzImage payload, by magic number.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compression {
    /// xz (LZMA2 with the x86 BCJ filter): Debian's kernels.
    Xz,
    /// gzip.
    Gzip,
    /// Something we do not unpack (zstd, lz4, bzip2, lzo, lzma, or unknown).
    Other(&'static str),
}

/// Identifies the payload's compression from its first bytes.
pub fn detect(magic: &[u8]) -> Compression {
    match magic {
        [0xfd, b'7', b'z', b'X', b'Z', 0x00, ..] => Compression::Xz,
        [0x1f, 0x8b, ..] => Compression::Gzip,
        [0x28, 0xb5, 0x2f, 0xfd, ..] => Compression::Other("zstd"),
        [0x02, 0x21, 0x4c, 0x18, ..] => Compression::Other("lz4"),
        [b'B', b'Z', b'h', ..] => Compression::Other("bzip2"),
        [0x89, b'L', b'Z', b'O', ..] => Compression::Other("lzo"),
        [0x5d, 0x00, ..] => Compression::Other("lzma"),
        _ => Compression::Other("unknown"),
    }
}

/// Unpacks `data`, refusing output larger than `limit` bytes.
pub fn decompress(data: &[u8], limit: u64) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    let read = match detect(data) {
        Compression::Xz => liblzma::read::XzDecoder::new(data)
            .take(limit + 1)
            .read_to_end(&mut out),
        Compression::Gzip => flate2::read::GzDecoder::new(data)
            .take(limit + 1)
            .read_to_end(&mut out),
        Compression::Other(kind) => return Err(format!("{kind} payloads are not unpacked")),
    };
    read.map_err(|e| format!("corrupt compressed kernel: {e}"))?;
    if out.len() as u64 > limit {
        return Err(format!("unpacked kernel exceeds {limit} bytes"));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn detects_formats() {
        assert_eq!(
            detect(&[0xfd, b'7', b'z', b'X', b'Z', 0, 0]),
            Compression::Xz
        );
        assert_eq!(detect(&[0x1f, 0x8b, 8]), Compression::Gzip);
        assert_eq!(
            detect(&[0x28, 0xb5, 0x2f, 0xfd]),
            Compression::Other("zstd")
        );
        assert_eq!(detect(&[]), Compression::Other("unknown"));
    }

    #[test]
    fn round_trips_xz_and_gzip() {
        let original: Vec<u8> = (0..100_000u32)
            .flat_map(|i| (i % 251).to_le_bytes())
            .collect();
        let mut xz = liblzma::write::XzEncoder::new(Vec::new(), 6);
        xz.write_all(&original).unwrap();
        let xz = xz.finish().unwrap();
        assert_eq!(decompress(&xz, 1 << 30).unwrap(), original);

        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&original).unwrap();
        let gz = gz.finish().unwrap();
        assert_eq!(decompress(&gz, 1 << 30).unwrap(), original);
    }

    #[test]
    fn rejects_corrupt_and_oversized() {
        let mut xz = liblzma::write::XzEncoder::new(Vec::new(), 1);
        xz.write_all(&[7u8; 10_000]).unwrap();
        let mut xz = xz.finish().unwrap();
        assert!(decompress(&xz, 100).unwrap_err().contains("exceeds"));
        let n = xz.len();
        xz[n / 2] ^= 0xff;
        assert!(decompress(&xz, 1 << 20).is_err());
        assert!(decompress(b"\x28\xb5\x2f\xfd", 10)
            .unwrap_err()
            .contains("zstd"));
    }
}
