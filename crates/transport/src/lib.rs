//! dvmm's node-to-node transport: framed, authenticated and (by default) encrypted
//! messages over one TCP connection per pair of nodes.
//!
//! Every node of an `n`-node cluster creates a [`Transport`] from a [`TransportConfig`]
//! holding its id, the address of every node (its own is where it listens) and the
//! cluster secret. Node `i` connects to every node `j < i` and accepts from every `j > i`,
//! so each pair has exactly one connection. [`Transport::start`] returns once every peer
//! is connected and authenticated, together with the [`Event`] receiver on which messages
//! and lost peers arrive.
//!
//! Security: each connection starts with a `Noise_NNpsk0_25519_ChaChaPoly_BLAKE2s`
//! handshake keyed by a PSK derived from the secret; a peer with another secret (or the
//! other mode) fails it. Encrypted mode then seals every frame with ChaCha20-Poly1305;
//! insecure mode ([`TransportConfig::encrypt`] false) sends payloads in clear but with a
//! BLAKE2s MAC under per-connection keys. In both modes sequence numbers must increase by
//! exactly one per direction, so replayed, dropped or reordered frames are rejected.
//! A rejected frame is logged with `tracing::warn!`, never delivered, and drops the
//! connection, which the caller sees as [`Event::PeerLost`].
//!
//! Liveness: each side sends a heartbeat when it has sent nothing for half the heartbeat
//! period; a connection that receives nothing for `dead_after` is declared lost.

#![forbid(unsafe_code)]

mod frame;
mod session;
mod transport;

pub use frame::{
    FrameError, Header, FLAG_CONTROL, FLAG_HANDSHAKE, HEADER_LEN, MAGIC, MAX_PAYLOAD, VERSION,
};
pub use transport::{Event, InlineHandler, PeerStats, Transport, TransportConfig, TransportError};
