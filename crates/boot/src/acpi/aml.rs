//! A tiny encoder for the ACPI Machine Language subset our DSDT needs: names,
//! integers, strings, packages, scopes, devices and resource-template buffers.
//!
//! Every function returns the encoded bytes of one AML object; callers concatenate.

const ZERO_OP: u8 = 0x00;
const ONE_OP: u8 = 0x01;
const ONES_OP: u8 = 0xFF;
const NAME_OP: u8 = 0x08;
const BYTE_PREFIX: u8 = 0x0A;
const WORD_PREFIX: u8 = 0x0B;
const DWORD_PREFIX: u8 = 0x0C;
const STRING_PREFIX: u8 = 0x0D;
const QWORD_PREFIX: u8 = 0x0E;
const SCOPE_OP: u8 = 0x10;
const BUFFER_OP: u8 = 0x11;
const PACKAGE_OP: u8 = 0x12;
const DUAL_NAME_PREFIX: u8 = 0x2E;
const MULTI_NAME_PREFIX: u8 = 0x2F;
const EXT_OP_PREFIX: u8 = 0x5B;
const DEVICE_OP: u8 = 0x82;
const ROOT_CHAR: u8 = b'\\';
const PARENT_PREFIX_CHAR: u8 = b'^';

/// Encodes a PkgLength for `payload` bytes that follow it; the encoded length counts
/// the PkgLength bytes themselves. Lengths beyond the 28-bit AML limit are clamped
/// (never reached by our fixed tables).
pub fn pkg_length(payload: usize) -> Vec<u8> {
    if payload + 1 < 0x40 {
        return vec![(payload + 1) as u8];
    }
    for extra in 1..=3usize {
        let total = payload + 1 + extra;
        if total < 1 << (4 + 8 * extra) {
            let mut out = vec![((extra as u8) << 6) | (total & 0xF) as u8];
            for i in 0..extra {
                out.push((total >> (4 + 8 * i)) as u8);
            }
            return out;
        }
    }
    vec![0xCF, 0xFF, 0xFF, 0xFF]
}

/// Encodes one name segment: up to 4 characters, padded with `_`.
fn name_seg(seg: &str) -> [u8; 4] {
    let mut out = [b'_'; 4];
    for (o, c) in out.iter_mut().zip(seg.bytes()) {
        *o = c;
    }
    out
}

/// Encodes a NameString such as `_S5_`, `\_SB_` or `\_SB_.COM1`.
pub fn name_string(path: &str) -> Vec<u8> {
    let mut out = Vec::new();
    let mut rest = path;
    if let Some(r) = rest.strip_prefix('\\') {
        out.push(ROOT_CHAR);
        rest = r;
    }
    while let Some(r) = rest.strip_prefix('^') {
        out.push(PARENT_PREFIX_CHAR);
        rest = r;
    }
    let segs: Vec<&str> = if rest.is_empty() {
        Vec::new()
    } else {
        rest.split('.').collect()
    };
    match segs.len() {
        0 => out.push(ZERO_OP), // NullName
        1 => {}
        2 => out.push(DUAL_NAME_PREFIX),
        n => {
            out.push(MULTI_NAME_PREFIX);
            out.push(n as u8);
        }
    }
    for s in segs {
        out.extend_from_slice(&name_seg(s));
    }
    out
}

/// Encodes an integer with the shortest constant form.
pub fn integer(v: u64) -> Vec<u8> {
    match v {
        0 => vec![ZERO_OP],
        1 => vec![ONE_OP],
        u64::MAX => vec![ONES_OP],
        v if v <= 0xFF => vec![BYTE_PREFIX, v as u8],
        v if v <= 0xFFFF => {
            let mut o = vec![WORD_PREFIX];
            o.extend_from_slice(&(v as u16).to_le_bytes());
            o
        }
        v if v <= 0xFFFF_FFFF => dword(v as u32),
        v => {
            let mut o = vec![QWORD_PREFIX];
            o.extend_from_slice(&v.to_le_bytes());
            o
        }
    }
}

/// Encodes a DWordConst (always 4 bytes, as EISA ids customarily are).
pub fn dword(v: u32) -> Vec<u8> {
    let mut o = vec![DWORD_PREFIX];
    o.extend_from_slice(&v.to_le_bytes());
    o
}

/// Encodes a NUL-terminated string constant.
pub fn string(s: &str) -> Vec<u8> {
    let mut o = vec![STRING_PREFIX];
    o.extend(s.bytes().filter(|&b| b != 0));
    o.push(0);
    o
}

/// Compresses a 7-character EISA id such as `PNP0501` into its 32-bit form.
/// Returns `None` when `id` is not three letters and four hex digits.
pub fn eisa_id(id: &str) -> Option<u32> {
    let b = id.as_bytes();
    if b.len() != 7
        || !b[..3].iter().all(|c| c.is_ascii_uppercase())
        || !b[3..].iter().all(|c| c.is_ascii_hexdigit())
    {
        return None;
    }
    let product = u16::from_str_radix(id.get(3..)?, 16).ok()?;
    let l = |c: u8| u32::from(c - b'@') & 0x1F;
    let vendor = (l(b[0]) << 10) | (l(b[1]) << 5) | l(b[2]);
    let big_endian = (vendor << 16) | u32::from(product);
    Some(big_endian.swap_bytes())
}

/// `Name(path, value)` where `value` is an already encoded data object.
pub fn name(path: &str, value: &[u8]) -> Vec<u8> {
    let mut o = vec![NAME_OP];
    o.extend(name_string(path));
    o.extend_from_slice(value);
    o
}

/// `Package(){elements}` of already encoded data objects.
pub fn package(elements: &[Vec<u8>]) -> Vec<u8> {
    let body: Vec<u8> = std::iter::once(elements.len() as u8)
        .chain(elements.iter().flatten().copied())
        .collect();
    let mut o = vec![PACKAGE_OP];
    o.extend(pkg_length(body.len()));
    o.extend(body);
    o
}

/// `Scope(path){body}`.
pub fn scope(path: &str, body: &[u8]) -> Vec<u8> {
    let mut inner = name_string(path);
    inner.extend_from_slice(body);
    let mut o = vec![SCOPE_OP];
    o.extend(pkg_length(inner.len()));
    o.extend(inner);
    o
}

/// `Device(path){body}`.
pub fn device(path: &str, body: &[u8]) -> Vec<u8> {
    let mut inner = name_string(path);
    inner.extend_from_slice(body);
    let mut o = vec![EXT_OP_PREFIX, DEVICE_OP];
    o.extend(pkg_length(inner.len()));
    o.extend(inner);
    o
}

/// `Buffer(){bytes}`.
pub fn buffer(bytes: &[u8]) -> Vec<u8> {
    let mut inner = integer(bytes.len() as u64);
    inner.extend_from_slice(bytes);
    let mut o = vec![BUFFER_OP];
    o.extend(pkg_length(inner.len()));
    o.extend(inner);
    o
}

/// `ResourceTemplate(){descriptors}`: a buffer of the descriptors plus an end tag.
pub fn resource_template(descriptors: &[Vec<u8>]) -> Vec<u8> {
    let mut bytes: Vec<u8> = descriptors.iter().flatten().copied().collect();
    // End tag; a zero checksum means "treat as valid".
    bytes.extend_from_slice(&[0x79, 0x00]);
    buffer(&bytes)
}

/// `IO(Decode16, min, max, align, len)` small resource descriptor.
pub fn io(min: u16, max: u16, align: u8, len: u8) -> Vec<u8> {
    let [min_lo, min_hi] = min.to_le_bytes();
    let [max_lo, max_hi] = max.to_le_bytes();
    vec![0x47, 0x01, min_lo, min_hi, max_lo, max_hi, align, len]
}

/// `IRQNoFlags(){irq}` small resource descriptor (ISA IRQs 0..15; others are ignored).
pub fn irq_no_flags(irq: u32) -> Vec<u8> {
    let mask: u16 = if irq < 16 { 1 << irq } else { 0 };
    let [lo, hi] = mask.to_le_bytes();
    vec![0x22, lo, hi]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pkg_length_forms() {
        assert_eq!(pkg_length(0), vec![0x01]);
        assert_eq!(pkg_length(62), vec![0x3F]);
        // 63 payload + 2 length bytes = 65 = 0x41.
        assert_eq!(pkg_length(63), vec![0x41, 0x04]);
        // 4093 + 2 = 4095 = 0xFFF still fits two bytes.
        assert_eq!(pkg_length(4093), vec![0x4F, 0xFF]);
        // 4094 + 3 = 4097 = 0x1001 needs three bytes.
        assert_eq!(pkg_length(4094), vec![0x81, 0x00, 0x01]);
    }

    #[test]
    fn names() {
        assert_eq!(name_string("_S5_"), b"_S5_".to_vec());
        assert_eq!(name_string("RTC"), b"RTC_".to_vec());
        assert_eq!(name_string("\\_SB_"), b"\\_SB_".to_vec());
        assert_eq!(name_string("\\_SB.COM1"), b"\\\x2E_SB_COM1".to_vec());
        assert_eq!(name_string("A.B.C"), b"\x2F\x03A___B___C___".to_vec());
        assert_eq!(name_string("\\"), vec![b'\\', 0]);
    }

    #[test]
    fn integers() {
        assert_eq!(integer(0), vec![0x00]);
        assert_eq!(integer(1), vec![0x01]);
        assert_eq!(integer(5), vec![0x0A, 0x05]);
        assert_eq!(integer(0x3F8), vec![0x0B, 0xF8, 0x03]);
        assert_eq!(integer(0x1_0000), vec![0x0C, 0, 0, 1, 0]);
        assert_eq!(integer(1 << 32), vec![0x0E, 0, 0, 0, 0, 1, 0, 0, 0]);
        assert_eq!(integer(u64::MAX), vec![0xFF]);
    }

    #[test]
    fn eisa_ids() {
        assert_eq!(eisa_id("PNP0501"), Some(0x0105_D041));
        assert_eq!(eisa_id("PNP0B00"), Some(0x000B_D041));
        assert_eq!(eisa_id("pnp0501"), None);
        assert_eq!(eisa_id("PNP05"), None);
        assert_eq!(eisa_id("PNP05G1"), None);
        assert_eq!(eisa_id("PNP+501"), None);
    }

    #[test]
    fn s5_package_matches_hand_assembly() {
        let s5 = name(
            "_S5_",
            &package(&[integer(5), integer(5), integer(0), integer(0)]),
        );
        assert_eq!(
            s5,
            vec![
                0x08, b'_', b'S', b'5', b'_', 0x12, 0x08, 0x04, 0x0A, 0x05, 0x0A, 0x05, 0x00, 0x00
            ]
        );
    }

    #[test]
    fn device_with_resources_matches_hand_assembly() {
        let dev = device(
            "COM1",
            &[
                name("_HID", &dword(0x0105_D041)),
                name(
                    "_CRS",
                    &resource_template(&[io(0x3F8, 0x3F8, 0, 8), irq_no_flags(4)]),
                ),
            ]
            .concat(),
        );
        let expected: Vec<u8> = vec![
            0x5B, 0x82, 0x25, b'C', b'O', b'M', b'1', // Device, PkgLength 0x25
            0x08, b'_', b'H', b'I', b'D', 0x0C, 0x41, 0xD0, 0x05, 0x01, // _HID
            0x08, b'_', b'C', b'R', b'S', // Name(_CRS,
            0x11, 0x10, 0x0A, 0x0D, // Buffer, PkgLength 16, size 13
            0x47, 0x01, 0xF8, 0x03, 0xF8, 0x03, 0x00, 0x08, // IO
            0x22, 0x10, 0x00, // IRQNoFlags {4}
            0x79, 0x00, // end tag
        ];
        assert_eq!(dev, expected);
    }

    #[test]
    fn strings_and_scopes() {
        assert_eq!(string("QEMU0001"), b"\x0DQEMU0001\x00".to_vec());
        assert_eq!(
            scope("\\_SB_", &[0xAA]),
            vec![0x10, 0x07, b'\\', b'_', b'S', b'B', b'_', 0xAA]
        );
    }
}
