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
//!
//! A frame (one transport message) carries one or more messages back to back, each a
//! header and, when it has data, its page: [`pack_frames`] builds them, [`parse_frame`]
//! reads them. Both sides of the wire use these two and nothing else.

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

/// Bytes of page data that follow a header whose message has data.
pub const PAGE_BYTES: usize = 4096;

/// Packs `msgs` (all for one node) into frames of at most `max_frame` bytes, in order,
/// and hands each frame to `emit` as its parts (headers and page data, to be sent back
/// to back). A message never straddles two frames; one larger than `max_frame` gets a
/// frame of its own. `data` must be [`PAGE_BYTES`] long exactly when the message
/// [has data](Msg::has_data).
pub fn pack_frames(
    msgs: &[(Msg, Option<&[u8]>)],
    max_frame: usize,
    mut emit: impl FnMut(&[&[u8]]),
) {
    let headers: Vec<[u8; WIRE_MSG_LEN]> = msgs.iter().map(|(m, _)| m.encode()).collect();
    let mut parts: Vec<&[u8]> = Vec::with_capacity(msgs.len() * 2);
    let mut size = 0;
    for ((_, data), hdr) in msgs.iter().zip(&headers) {
        let len = WIRE_MSG_LEN + data.map_or(0, <[u8]>::len);
        if size + len > max_frame && !parts.is_empty() {
            emit(&parts);
            parts.clear();
            size = 0;
        }
        parts.push(hdr);
        if let Some(d) = data {
            parts.push(d);
        }
        size += len;
    }
    if !parts.is_empty() {
        emit(&parts);
    }
}

/// Why the rest of a frame was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// A header did not decode.
    #[error(transparent)]
    Header(#[from] DecodeError),
    /// A message with data came without its whole page.
    #[error("DSM message {msg:?} came with {got} bytes of its {PAGE_BYTES}-byte page")]
    ShortPage {
        /// The message.
        msg: Msg,
        /// Bytes that followed its header.
        got: usize,
    },
}

/// The messages of one frame, in order, each with its page when it has data; after the
/// first error the iterator ends.
pub fn parse_frame(frame: &[u8]) -> FrameMessages<'_> {
    FrameMessages { rest: frame }
}

/// Iterator returned by [`parse_frame`].
#[derive(Debug, Clone)]
pub struct FrameMessages<'a> {
    rest: &'a [u8],
}

impl<'a> Iterator for FrameMessages<'a> {
    type Item = Result<(Msg, Option<&'a [u8]>), FrameError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.rest.is_empty() {
            return None;
        }
        let (hdr, tail) = self.rest.split_at(self.rest.len().min(WIRE_MSG_LEN));
        let msg = match Msg::decode(hdr) {
            Ok(m) => m,
            Err(e) => {
                self.rest = &[];
                return Some(Err(e.into()));
            }
        };
        if !msg.has_data() {
            self.rest = tail;
            return Some(Ok((msg, None)));
        }
        if tail.len() < PAGE_BYTES {
            self.rest = &[];
            return Some(Err(FrameError::ShortPage {
                msg,
                got: tail.len(),
            }));
        }
        let (page, tail) = tail.split_at(PAGE_BYTES);
        self.rest = tail;
        Some(Ok((msg, Some(page))))
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

    /// Data for message `i` of a batch: a page whose bytes say which message it is.
    fn page_for(i: usize) -> Vec<u8> {
        (0..PAGE_BYTES).map(|b| (i * 31 + b) as u8).collect()
    }

    #[test]
    fn a_short_page_ends_the_frame() {
        let msg = Msg::FetchReply { page: 9 };
        let mut frame = msg.encode().to_vec();
        frame.extend_from_slice(&[0; 100]);
        let got: Vec<_> = parse_frame(&frame).collect();
        assert_eq!(got, vec![Err(FrameError::ShortPage { msg, got: 100 })]);
        let mut frame = Msg::Fetch { page: 1 }.encode().to_vec();
        frame.extend_from_slice(&[0; 3]);
        let got: Vec<_> = parse_frame(&frame).collect();
        assert_eq!(got.len(), 2);
        assert_eq!(got[0], Ok((Msg::Fetch { page: 1 }, None)));
        assert_eq!(
            got[1],
            Err(FrameError::Header(DecodeError::WrongLength { got: 3 }))
        );
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

        /// Packing then parsing gives back every message and page, in order, in frames
        /// no larger than the limit (unless one message alone is larger).
        #[test]
        fn frames_roundtrip(
            picks in proptest::collection::vec((0usize..14, any::<u64>()), 0..40),
            max_frame in 1usize..20_000,
        ) {
            let pages: Vec<Vec<u8>> = (0..picks.len()).map(page_for).collect();
            let msgs: Vec<(Msg, Option<&[u8]>)> = picks
                .iter()
                .zip(&pages)
                .map(|(&(idx, page), data)| {
                    let m = all_msgs(page)[idx];
                    (m, m.has_data().then_some(&data[..]))
                })
                .collect();
            let mut frames: Vec<Vec<u8>> = Vec::new();
            pack_frames(&msgs, max_frame, |parts| frames.push(parts.concat()));
            let mut back = Vec::new();
            for f in &frames {
                let parsed: Vec<_> = parse_frame(f).collect::<Result<_, _>>().unwrap();
                prop_assert!(!parsed.is_empty());
                prop_assert!(f.len() <= max_frame || parsed.len() == 1, "frame of {} bytes", f.len());
                back.extend(parsed.into_iter().map(|(m, d)| (m, d.map(<[u8]>::to_vec))));
            }
            let want: Vec<(Msg, Option<Vec<u8>>)> =
                msgs.iter().map(|(m, d)| (*m, d.map(<[u8]>::to_vec))).collect();
            prop_assert_eq!(back, want);
        }

        #[test]
        fn parse_frame_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..9000)) {
            let mut total = 0;
            for item in parse_frame(&bytes) {
                match item {
                    Ok((_, d)) => total += WIRE_MSG_LEN + d.map_or(0, <[u8]>::len),
                    Err(_) => break,
                }
            }
            prop_assert!(total <= bytes.len());
        }

        #[test]
        fn decode_header_sized_garbage(bytes in any::<[u8; 16]>()) {
            if let Ok(msg) = Msg::decode(&bytes) {
                prop_assert_eq!(msg.encode(), bytes);
            }
        }
    }
}
