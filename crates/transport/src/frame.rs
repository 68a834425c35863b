//! The wire frame: a fixed 24-byte little-endian header followed by a body.
//!
//! The body depends on the phase and mode of the connection:
//! - handshake frames ([`FLAG_HANDSHAKE`]) carry a raw Noise handshake message;
//! - encrypted mode: `AEAD(nonce = seq, header || payload)`; the copy of the header inside
//!   the ciphertext must equal the clear one, so the clear header is authenticated too;
//! - insecure mode: `payload || BLAKE2s-MAC(header || payload)`.

use thiserror::Error;
use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

/// First four bytes of every frame.
pub const MAGIC: [u8; 4] = *b"DVMT";
/// Wire format version this crate speaks.
pub const VERSION: u8 = 1;
/// Size of [`Header`] on the wire.
pub const HEADER_LEN: usize = 24;
/// Largest payload one message may carry (60 KiB: a Noise message is at most 65535 bytes,
/// and it holds the payload, a copy of the header and the 16-byte tag).
pub const MAX_PAYLOAD: usize = 60 * 1024;
/// Length of the authentication tag of an encrypted body.
pub const AEAD_TAG_LEN: usize = 16;
/// Length of the MAC that ends an insecure-mode body.
pub const MAC_LEN: usize = 32;
/// Largest body any frame may announce.
pub const MAX_BODY: usize = HEADER_LEN + MAX_PAYLOAD + MAC_LEN;
/// Largest body a handshake frame may announce.
pub const MAX_HANDSHAKE_BODY: usize = 1024;

/// Flag: a transport control message (hello, heartbeat), never shown to the caller.
pub const FLAG_CONTROL: u8 = 1 << 0;
/// Flag: a Noise handshake message (only before the session is established).
pub const FLAG_HANDSHAKE: u8 = 1 << 1;
const KNOWN_FLAGS: u8 = FLAG_CONTROL | FLAG_HANDSHAKE;

/// The fixed frame header, little-endian on the wire.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned,
)]
#[repr(C)]
pub struct Header {
    /// Always [`MAGIC`].
    pub magic: [u8; 4],
    /// Always [`VERSION`].
    pub version: u8,
    /// `FLAG_*` bits.
    pub flags: u8,
    /// Message kind, opaque to the transport for non-control frames.
    pub kind: U16,
    /// Length of the body that follows the header.
    pub len: U32,
    /// Must be zero.
    pub reserved: U32,
    /// Sequence number: 1, 2, 3, ... per direction of a connection (0 in handshake frames).
    pub seq: U64,
}

const _: () = assert!(core::mem::size_of::<Header>() == HEADER_LEN);
// An encrypted body (header copy + payload + tag) must fit one Noise message.
const _: () = assert!(HEADER_LEN + MAX_PAYLOAD + AEAD_TAG_LEN <= 65535);

impl Header {
    /// Builds a header with the given fields.
    pub fn new(flags: u8, kind: u16, len: u32, seq: u64) -> Self {
        Header {
            magic: MAGIC,
            version: VERSION,
            flags,
            kind: U16::new(kind),
            len: U32::new(len),
            reserved: U32::new(0),
            seq: U64::new(seq),
        }
    }

    /// Parses and validates a header: magic, version, flags, reserved field and body length.
    pub fn parse(bytes: &[u8; HEADER_LEN]) -> Result<Header, FrameError> {
        // Cannot fail: the array has exactly the header's size.
        let h = Header::read_from_bytes(bytes).map_err(|_| FrameError::Truncated)?;
        if h.magic != MAGIC {
            return Err(FrameError::BadMagic(h.magic));
        }
        if h.version != VERSION {
            return Err(FrameError::BadVersion(h.version));
        }
        if h.flags & !KNOWN_FLAGS != 0 || h.flags == KNOWN_FLAGS {
            return Err(FrameError::BadFlags(h.flags));
        }
        if h.reserved.get() != 0 {
            return Err(FrameError::BadReserved);
        }
        let max = if h.flags & FLAG_HANDSHAKE != 0 {
            MAX_HANDSHAKE_BODY
        } else {
            MAX_BODY
        };
        let len = h.len.get() as usize;
        if len > max {
            return Err(FrameError::TooLong { len, max });
        }
        Ok(h)
    }

    /// Body length announced by the header.
    pub fn body_len(&self) -> usize {
        self.len.get() as usize
    }
}

/// Why a received frame was rejected. Any of these drops the connection.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum FrameError {
    /// Fewer bytes than a header, or than the header announces.
    #[error("truncated frame")]
    Truncated,
    /// More bytes than the header announces.
    #[error("frame has trailing bytes after its body")]
    Trailing,
    /// Not a dvmm transport frame (another program, or a desynchronised stream).
    #[error("bad frame magic {0:02x?}: peer is not a dvmm transport")]
    BadMagic([u8; 4]),
    /// The peer speaks another wire format version.
    #[error("unsupported frame version {0} (this dvmm speaks {VERSION}): mixed dvmm versions in the cluster?")]
    BadVersion(u8),
    /// Unknown or contradictory flag bits.
    #[error("bad frame flags {0:#04x}")]
    BadFlags(u8),
    /// The reserved header field is not zero.
    #[error("reserved header field is not zero")]
    BadReserved,
    /// The announced body length exceeds the limit.
    #[error("frame body of {len} bytes exceeds the limit of {max}")]
    TooLong {
        /// Announced length.
        len: usize,
        /// Limit for this frame type.
        max: usize,
    },
    /// The body is too short to hold the authentication data.
    #[error("frame body of {0} bytes is too short to be authenticated")]
    TooShort(usize),
    /// A handshake frame after the handshake, or a data frame during it.
    #[error("unexpected frame type (flags {0:#04x}) at this point of the connection")]
    Unexpected(u8),
    /// The sequence number is not the next one: a replayed, dropped or reordered frame.
    #[error("sequence number {got} where {expected} was expected: replayed or reordered frame")]
    Replay {
        /// Sequence number in the frame.
        got: u64,
        /// The only acceptable one.
        expected: u64,
    },
    /// The MAC or AEAD tag did not verify: altered frame or wrong key.
    #[error(
        "authentication failed: frame altered in transit, or peer uses another cluster secret"
    )]
    AuthFailed,
    /// The authenticated copy of the header differs from the clear one.
    #[error("authenticated header does not match the clear header: frame altered in transit")]
    HeaderMismatch,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes(h: &Header) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b.copy_from_slice(h.as_bytes());
        b
    }

    #[test]
    fn header_layout_is_little_endian() {
        let h = Header::new(FLAG_CONTROL, 0x1234, 0x0102, 0x1122_3344_5566_7788);
        let b = bytes(&h);
        assert_eq!(&b[0..4], b"DVMT");
        assert_eq!(b[4], VERSION);
        assert_eq!(b[5], FLAG_CONTROL);
        assert_eq!(&b[6..8], &[0x34, 0x12]);
        assert_eq!(&b[8..12], &[0x02, 0x01, 0, 0]);
        assert_eq!(&b[12..16], &[0, 0, 0, 0]);
        assert_eq!(
            &b[16..24],
            &[0x88, 0x77, 0x66, 0x55, 0x44, 0x33, 0x22, 0x11]
        );
        assert_eq!(Header::parse(&b), Ok(h));
    }

    #[test]
    fn malformed_headers_rejected() {
        let good = bytes(&Header::new(0, 1, 100, 1));
        assert!(Header::parse(&good).is_ok());

        let mut b = good;
        b[0] = b'X';
        assert!(matches!(Header::parse(&b), Err(FrameError::BadMagic(_))));
        let mut b = good;
        b[4] = 2;
        assert_eq!(Header::parse(&b), Err(FrameError::BadVersion(2)));
        let mut b = good;
        b[5] = 0x80;
        assert_eq!(Header::parse(&b), Err(FrameError::BadFlags(0x80)));
        let mut b = good;
        b[5] = FLAG_CONTROL | FLAG_HANDSHAKE;
        assert_eq!(Header::parse(&b), Err(FrameError::BadFlags(3)));
        let mut b = good;
        b[13] = 1;
        assert_eq!(Header::parse(&b), Err(FrameError::BadReserved));
        let b = bytes(&Header::new(0, 1, (MAX_BODY + 1) as u32, 1));
        assert_eq!(
            Header::parse(&b),
            Err(FrameError::TooLong {
                len: MAX_BODY + 1,
                max: MAX_BODY
            })
        );
        let b = bytes(&Header::new(0, 1, MAX_BODY as u32, 1));
        assert!(Header::parse(&b).is_ok());
        let b = bytes(&Header::new(FLAG_HANDSHAKE, 0, 2000, 0));
        assert!(matches!(Header::parse(&b), Err(FrameError::TooLong { .. })));
    }
}
