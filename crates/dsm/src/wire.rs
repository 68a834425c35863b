//! Fixed little-endian wire layout of [`Msg`] headers.
//!
//! Every message is a 16-byte header:
//!
//! | offset | size | field |
//! | --- | --- | --- |
//! | 0 | 1 | kind (see [`Msg`] variants, 1..=10) |
//! | 1 | 1 | flags (per kind; unknown bits are rejected) |
//! | 2 | 6 | reserved, must be zero |
//! | 8 | 8 | page number, little-endian |
//!
//! When [`Msg::has_data`] is true the transport sends the page's 4 KiB right after
//! the header; the header itself never contains page bytes.

use crate::{Msg, PageNo};
use zerocopy::little_endian::U64;
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

/// Size in bytes of an encoded [`Msg`] header.
pub const WIRE_MSG_LEN: usize = 16;

#[derive(FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned)]
#[repr(C)]
struct WireMsg {
    kind: u8,
    flags: u8,
    reserved: [u8; 6],
    page: U64,
}

const KIND_READ_REQ: u8 = 1;
const KIND_WRITE_REQ: u8 = 2;
const KIND_READ_GRANT: u8 = 3;
const KIND_WRITE_GRANT: u8 = 4;
const KIND_INVALIDATE: u8 = 5;
const KIND_INVALIDATE_ACK: u8 = 6;
const KIND_FETCH: u8 = 7;
const KIND_FETCH_REPLY: u8 = 8;
const KIND_REVOKE: u8 = 9;
const KIND_REVOKE_ACK: u8 = 10;

/// `WriteReq.has_copy`, `ReadGrant.zero`, `WriteGrant.has_data`.
const FLAG_0: u8 = 1;
/// `WriteGrant.zero`.
const FLAG_1: u8 = 2;

/// Why a received header could not be decoded. A peer sending any of these is
/// running an incompatible or broken dvmm: drop the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The buffer is not exactly one header long.
    #[error("DSM message header must be {WIRE_MSG_LEN} bytes, got {got}; peer speaks another protocol version?")]
    WrongLength {
        /// Bytes received.
        got: usize,
    },
    /// The kind byte names no message.
    #[error("unknown DSM message kind {0}; peer speaks another protocol version?")]
    UnknownKind(u8),
    /// Flag bits that this kind does not define, or a forbidden combination.
    #[error("invalid flags {flags:#04x} for DSM message kind {kind}")]
    BadFlags {
        /// Kind byte.
        kind: u8,
        /// Flags byte.
        flags: u8,
    },
    /// Reserved bytes are not zero.
    #[error("reserved bytes of DSM message header are not zero")]
    ReservedNotZero,
}

fn flag(flags: u8, bit: u8) -> bool {
    flags & bit != 0
}

fn bit(cond: bool, bit: u8) -> u8 {
    if cond {
        bit
    } else {
        0
    }
}

impl Msg {
    /// Encodes the header into its fixed 16-byte little-endian layout.
    pub fn encode(&self) -> [u8; WIRE_MSG_LEN] {
        let (kind, flags) = match *self {
            Msg::ReadReq { .. } => (KIND_READ_REQ, 0),
            Msg::WriteReq { has_copy, .. } => (KIND_WRITE_REQ, bit(has_copy, FLAG_0)),
            Msg::ReadGrant { zero, .. } => (KIND_READ_GRANT, bit(zero, FLAG_0)),
            Msg::WriteGrant { has_data, zero, .. } => {
                (KIND_WRITE_GRANT, bit(has_data, FLAG_0) | bit(zero, FLAG_1))
            }
            Msg::Invalidate { .. } => (KIND_INVALIDATE, 0),
            Msg::InvalidateAck { .. } => (KIND_INVALIDATE_ACK, 0),
            Msg::Fetch { .. } => (KIND_FETCH, 0),
            Msg::FetchReply { .. } => (KIND_FETCH_REPLY, 0),
            Msg::Revoke { .. } => (KIND_REVOKE, 0),
            Msg::RevokeAck { .. } => (KIND_REVOKE_ACK, 0),
        };
        let wire = WireMsg {
            kind,
            flags,
            reserved: [0; 6],
            page: U64::new(self.page()),
        };
        let mut out = [0u8; WIRE_MSG_LEN];
        out.copy_from_slice(wire.as_bytes());
        out
    }

    /// Decodes a header. Never panics: any byte string that is not a valid header
    /// yields a [`DecodeError`].
    pub fn decode(bytes: &[u8]) -> Result<Msg, DecodeError> {
        let wire = WireMsg::read_from_bytes(bytes)
            .map_err(|_| DecodeError::WrongLength { got: bytes.len() })?;
        if wire.reserved != [0; 6] {
            return Err(DecodeError::ReservedNotZero);
        }
        let page: PageNo = wire.page.get();
        let (kind, flags) = (wire.kind, wire.flags);
        let allowed = match kind {
            KIND_WRITE_REQ | KIND_READ_GRANT => FLAG_0,
            KIND_WRITE_GRANT => FLAG_0 | FLAG_1,
            KIND_READ_REQ..=KIND_REVOKE_ACK => 0,
            _ => return Err(DecodeError::UnknownKind(kind)),
        };
        if flags & !allowed != 0 || (kind == KIND_WRITE_GRANT && flags == FLAG_0 | FLAG_1) {
            return Err(DecodeError::BadFlags { kind, flags });
        }
        let f0 = flag(flags, FLAG_0);
        Ok(match kind {
            KIND_READ_REQ => Msg::ReadReq { page },
            KIND_WRITE_REQ => Msg::WriteReq { page, has_copy: f0 },
            KIND_READ_GRANT => Msg::ReadGrant { page, zero: f0 },
            KIND_WRITE_GRANT => Msg::WriteGrant {
                page,
                has_data: f0,
                zero: flag(flags, FLAG_1),
            },
            KIND_INVALIDATE => Msg::Invalidate { page },
            KIND_INVALIDATE_ACK => Msg::InvalidateAck { page },
            KIND_FETCH => Msg::Fetch { page },
            KIND_FETCH_REPLY => Msg::FetchReply { page },
            KIND_REVOKE => Msg::Revoke { page },
            _ => Msg::RevokeAck { page },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn all_msgs(page: PageNo) -> Vec<Msg> {
        vec![
            Msg::ReadReq { page },
            Msg::WriteReq {
                page,
                has_copy: false,
            },
            Msg::WriteReq {
                page,
                has_copy: true,
            },
            Msg::ReadGrant { page, zero: false },
            Msg::ReadGrant { page, zero: true },
            Msg::WriteGrant {
                page,
                has_data: false,
                zero: false,
            },
            Msg::WriteGrant {
                page,
                has_data: true,
                zero: false,
            },
            Msg::WriteGrant {
                page,
                has_data: false,
                zero: true,
            },
            Msg::Invalidate { page },
            Msg::InvalidateAck { page },
            Msg::Fetch { page },
            Msg::FetchReply { page },
            Msg::Revoke { page },
            Msg::RevokeAck { page },
        ]
    }

    #[test]
    fn layout_is_fixed_little_endian() {
        let b = Msg::WriteGrant {
            page: 0x0102_0304_0506_0708,
            has_data: false,
            zero: true,
        }
        .encode();
        assert_eq!(b, [4, 2, 0, 0, 0, 0, 0, 0, 8, 7, 6, 5, 4, 3, 2, 1]);
    }

    #[test]
    fn rejects_bad_headers() {
        assert_eq!(
            Msg::decode(&[0; 15]),
            Err(DecodeError::WrongLength { got: 15 })
        );
        assert_eq!(
            Msg::decode(&[0; 17]),
            Err(DecodeError::WrongLength { got: 17 })
        );
        assert_eq!(Msg::decode(&[0; 16]), Err(DecodeError::UnknownKind(0)));
        let mut b = Msg::Fetch { page: 1 }.encode();
        b[1] = 1;
        assert_eq!(
            Msg::decode(&b),
            Err(DecodeError::BadFlags { kind: 7, flags: 1 })
        );
        let mut b = Msg::WriteGrant {
            page: 1,
            has_data: true,
            zero: false,
        }
        .encode();
        b[1] = 3;
        assert_eq!(
            Msg::decode(&b),
            Err(DecodeError::BadFlags { kind: 4, flags: 3 })
        );
        let mut b = Msg::Fetch { page: 1 }.encode();
        b[5] = 1;
        assert_eq!(Msg::decode(&b), Err(DecodeError::ReservedNotZero));
    }

    proptest! {
        #[test]
        fn roundtrip(page in any::<u64>(), idx in 0usize..14) {
            let msg = all_msgs(page)[idx];
            prop_assert_eq!(Msg::decode(&msg.encode()), Ok(msg));
        }

        #[test]
        fn decode_never_panics_and_reencodes_exactly(bytes in proptest::collection::vec(any::<u8>(), 0..40)) {
            if let Ok(msg) = Msg::decode(&bytes) {
                prop_assert_eq!(&msg.encode()[..], &bytes[..]);
            }
        }

        #[test]
        fn decode_header_sized_garbage(bytes in any::<[u8; 16]>()) {
            if let Ok(msg) = Msg::decode(&bytes) {
                prop_assert_eq!(msg.encode(), bytes);
            }
        }
    }
}
