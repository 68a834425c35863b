//! Connection set-up, the per-peer receive threads, heartbeats and the send path.

use dvmm_sync::MutexExt;
use std::io::{self, BufReader};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use thiserror::Error;
use tracing::{debug, info, warn};

use crate::frame::{FLAG_CONTROL, MAX_PAYLOAD};
use crate::session::{
    self, derive_psk, HandshakeError, Identity, Psk, RecvError, Role, RxSession, SealError,
    SendError, Session, TxSession, CTL_HEARTBEAT, CTL_PING, CTL_PONG,
};

mod setup;
use setup::{accept_loop, connect_loop, HandshakeSlots, Setup, SetupCtx, MAX_HANDSHAKES};

/// How often a node still waiting for peers at start-up says which.
const WAITING_NOTE_EVERY: Duration = Duration::from_secs(5);
/// Read buffer of a receive thread (a few full frames).
const RX_BUFFER: usize = 256 * 1024;

/// Configuration of one node's transport.
#[derive(Clone, Debug)]
pub struct TransportConfig {
    /// This node's id: an index into `peers`.
    pub id: u16,
    /// Address of every node of the cluster, indexed by node id. `peers[id]` is where this
    /// node listens.
    pub peers: Vec<SocketAddr>,
    /// The cluster secret shared by all nodes (any non-empty byte string).
    pub secret: Vec<u8>,
    /// Encrypt payloads (default). When false, frames are still authenticated; the caller
    /// should log that it runs with `--insecure-transport`.
    pub encrypt: bool,
    /// How long [`Transport::start`] keeps trying to reach every peer.
    pub connect_timeout: Duration,
    /// Heartbeat period: an idle connection carries a heartbeat at least this often.
    pub heartbeat: Duration,
    /// A peer from which nothing arrived for this long is reported lost. At least twice
    /// `heartbeat`.
    pub dead_after: Duration,
}

impl TransportConfig {
    /// A configuration with the defaults: encrypted, 30 s to connect, heartbeats every
    /// 500 ms, peers lost after 2 s of silence.
    pub fn new(id: u16, peers: Vec<SocketAddr>, secret: impl Into<Vec<u8>>) -> Self {
        TransportConfig {
            id,
            peers,
            secret: secret.into(),
            encrypt: true,
            connect_timeout: Duration::from_secs(30),
            heartbeat: Duration::from_millis(500),
            dead_after: Duration::from_secs(2),
        }
    }

    fn validate(&self) -> Result<(), TransportError> {
        let bad = |m: String| Err(TransportError::InvalidConfig(m));
        let n = self.peers.len();
        if n > usize::from(u16::MAX) {
            return bad(format!("{n} nodes is more than the {} supported", u16::MAX));
        }
        if usize::from(self.id) >= n {
            return bad(format!(
                "node id {} is out of range: the cluster has {n} nodes (ids 0..{n})",
                self.id
            ));
        }
        if self.secret.is_empty() {
            return bad("the cluster secret is empty".into());
        }
        if self.heartbeat.is_zero() || self.connect_timeout.is_zero() {
            return bad("heartbeat and connect timeout must be non-zero".into());
        }
        if self.dead_after < self.heartbeat * 2 {
            return bad(format!(
                "dead-peer timeout {:?} must be at least twice the heartbeat period {:?}",
                self.dead_after, self.heartbeat
            ));
        }
        Ok(())
    }
}

/// What the transport reports to its user.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// An authenticated message from a peer. Messages from one peer arrive in send order.
    Message {
        /// Sending node.
        from: u16,
        /// Message kind given by the sender.
        kind: u16,
        /// Message payload.
        payload: Vec<u8>,
    },
    /// The connection to a peer is gone (closed, reset, silent for `dead_after`, or it
    /// sent a frame that was rejected). Sends to it fail from now on. Reported once.
    PeerLost {
        /// The lost node.
        node: u16,
        /// Why, for the log.
        reason: String,
    },
}

/// Errors of the transport.
#[derive(Debug, Error)]
pub enum TransportError {
    /// The configuration is unusable.
    #[error("invalid transport configuration: {0}")]
    InvalidConfig(String),
    /// Another process already listens on this node's port.
    #[error("cannot listen on {addr}: port {port} is already in use (another dvmm node on this host with the same port in the cluster file?)")]
    PortInUse {
        /// The port.
        port: u16,
        /// The full listen address.
        addr: SocketAddr,
    },
    /// Listening failed for another reason.
    #[error(
        "cannot listen on {addr}: {source} (is this host's address in the cluster file right?)"
    )]
    Bind {
        /// The listen address.
        addr: SocketAddr,
        /// The OS error.
        source: io::Error,
    },
    /// A lower-numbered peer could not be reached and authenticated in time.
    #[error("could not connect to node {node} at {addr} within {timeout:?}: {reason}")]
    ConnectFailed {
        /// The unreachable node.
        node: u16,
        /// Its address.
        addr: SocketAddr,
        /// The configured connect timeout.
        timeout: Duration,
        /// The last failure seen.
        reason: String,
    },
    /// A higher-numbered peer never connected to us in time.
    #[error("node {node} (at {addr}) did not connect to this node within {timeout:?}: is it running, with the same cluster file and secret?")]
    PeerNeverConnected {
        /// The missing node.
        node: u16,
        /// Its address as configured.
        addr: SocketAddr,
        /// The configured connect timeout.
        timeout: Duration,
    },
    /// The destination is not a peer of this node (out of range, or this node itself).
    #[error(
        "node {node} is not a peer of this node (cluster of {nodes} nodes, this is node {me})"
    )]
    NoSuchPeer {
        /// The requested node.
        node: u16,
        /// Cluster size.
        nodes: u16,
        /// This node.
        me: u16,
    },
    /// The connection to the destination was lost earlier.
    #[error("node {node} is unreachable: its connection was lost")]
    PeerDown {
        /// The lost node.
        node: u16,
    },
    /// The payload is larger than [`MAX_PAYLOAD`].
    #[error("message of {len} bytes exceeds the transport limit of {max} bytes")]
    PayloadTooLarge {
        /// Payload length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// Sending failed; the connection is now considered lost.
    #[error("sending to node {node} failed: {reason}")]
    SendFailed {
        /// The destination.
        node: u16,
        /// What went wrong.
        reason: String,
    },
    /// A thread could not be started.
    #[error("cannot start a transport thread: {0}")]
    Thread(io::Error),
}

struct PeerTx {
    session: TxSession,
    stream: TcpStream,
}

struct Peer {
    node: u16,
    /// For shutting the connection down from any thread.
    stream: TcpStream,
    tx: Mutex<PeerTx>,
    lost: AtomicBool,
    /// Time of the last successful send, in ns since `Inner::epoch`.
    last_tx_ns: AtomicU64,
    frames_sent: AtomicU64,
    bytes_sent: AtomicU64,
    frames_received: AtomicU64,
    bytes_received: AtomicU64,
    /// The last measured round trip (ns; 0 until one was measured).
    rtt_ns: AtomicU64,
}

/// Traffic on the connection to one peer, since it was made.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PeerStats {
    /// Whether the connection is up.
    pub up: bool,
    /// Frames sent (messages, heartbeats and probes).
    pub frames_sent: u64,
    /// Payload bytes sent.
    pub bytes_sent: u64,
    /// Frames received.
    pub frames_received: u64,
    /// Payload bytes received.
    pub bytes_received: u64,
    /// The last round trip measured by a probe (once a second), in ns; 0 until the first.
    pub rtt_ns: u64,
}

struct Inner {
    id: u16,
    nodes: u16,
    peers: Vec<OnceLock<Arc<Peer>>>,
    events: Sender<Event>,
    stop: AtomicBool,
    heartbeat: Duration,
    dead_after: Duration,
    epoch: Instant,
    heartbeats_paused: AtomicBool,
    /// Messages of this kind go to the handler on the reader thread (see
    /// [`Transport::deliver_inline`]).
    inline: OnceLock<(u16, InlineHandler)>,
}

/// Takes a message (sender, payload) on the connection's reader thread.
pub type InlineHandler = Arc<dyn Fn(u16, &[u8]) + Send + Sync>;

impl Inner {
    fn now_ns(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    fn peer(&self, node: u16) -> Result<&Arc<Peer>, TransportError> {
        if node == self.id {
            return Err(self.no_such(node));
        }
        let slot = self
            .peers
            .get(usize::from(node))
            .ok_or_else(|| self.no_such(node))?;
        slot.get().ok_or(TransportError::PeerDown { node })
    }

    fn no_such(&self, node: u16) -> TransportError {
        TransportError::NoSuchPeer {
            node,
            nodes: self.nodes,
            me: self.id,
        }
    }

    fn send_frame(
        &self,
        peer: &Peer,
        flags: u8,
        kind: u16,
        parts: &[&[u8]],
    ) -> Result<(), TransportError> {
        if peer.lost.load(Ordering::Acquire) {
            return Err(TransportError::PeerDown { node: peer.node });
        }
        let mut guard = peer.tx.locked();
        let tx = &mut *guard;
        let res = tx.session.send(&mut tx.stream, flags, kind, parts);
        drop(guard);
        match res {
            Ok(()) => {
                peer.last_tx_ns.store(self.now_ns(), Ordering::Relaxed);
                peer.frames_sent.fetch_add(1, Ordering::Relaxed);
                let len: usize = parts.iter().map(|p| p.len()).sum();
                peer.bytes_sent.fetch_add(len as u64, Ordering::Relaxed);
                Ok(())
            }
            Err(SendError::Seal(SealError::TooLarge(len))) => {
                Err(TransportError::PayloadTooLarge {
                    len,
                    max: MAX_PAYLOAD,
                })
            }
            Err(e) => {
                let reason = format!("send failed: {e}");
                self.lose(peer, &reason);
                Err(TransportError::SendFailed {
                    node: peer.node,
                    reason,
                })
            }
        }
    }

    /// Drops the connection to `peer` and reports it, once.
    fn lose(&self, peer: &Peer, reason: &str) {
        let first = !peer.lost.swap(true, Ordering::AcqRel);
        // Ignore errors: the socket may already be closed.
        let _ = peer.stream.shutdown(Shutdown::Both);
        if first && !self.stop.load(Ordering::Acquire) {
            // The owner of the event decides how loud a loss is (at shutdown it is expected).
            debug!(node = peer.node, reason, "transport: peer lost");
            let _ = self.events.send(Event::PeerLost {
                node: peer.node,
                reason: reason.to_string(),
            });
        }
    }
}

/// The transport of one node: a connection to every other node of the cluster.
///
/// `Transport` is `Sync`: share it (e.g. in an `Arc`) and send from any thread; sends to
/// different peers do not contend. Dropping it closes every connection (peers see
/// [`Event::PeerLost`]) and joins its threads.
pub struct Transport {
    inner: Arc<Inner>,
    threads: Vec<JoinHandle<()>>,
    heartbeat_thread: Option<JoinHandle<()>>,
}

impl Transport {
    /// Listens on `cfg.peers[cfg.id]`, connects to and accepts from every peer, and
    /// returns once all are connected and authenticated, or fails after
    /// `cfg.connect_timeout` naming the first missing peer.
    ///
    /// A peer with another cluster secret or transport mode fails the handshake and is
    /// never connected: the node that dials it fails with [`TransportError::ConnectFailed`]
    /// (reason: the handshake was rejected), the node it dials fails with
    /// [`TransportError::PeerNeverConnected`]; both log a warning per rejected attempt.
    pub fn start(cfg: TransportConfig) -> Result<(Transport, Receiver<Event>), TransportError> {
        cfg.validate()?;
        let addr = cfg.peers[usize::from(cfg.id)];
        let listener = TcpListener::bind(addr).map_err(|source| {
            if source.kind() == io::ErrorKind::AddrInUse {
                TransportError::PortInUse {
                    port: addr.port(),
                    addr,
                }
            } else {
                TransportError::Bind { addr, source }
            }
        })?;
        Self::start_with_listener(cfg, listener)
    }

    /// Like [`Transport::start`], with a listener the caller already bound (e.g. to a port
    /// it picked itself). `cfg.peers[cfg.id]` is then only informative.
    pub fn start_with_listener(
        cfg: TransportConfig,
        listener: TcpListener,
    ) -> Result<(Transport, Receiver<Event>), TransportError> {
        cfg.validate()?;
        let nodes = cfg.peers.len() as u16;
        let (ev_tx, ev_rx) = mpsc::channel();
        let inner = Arc::new(Inner {
            id: cfg.id,
            nodes,
            peers: (0..nodes).map(|_| OnceLock::new()).collect(),
            events: ev_tx,
            stop: AtomicBool::new(false),
            heartbeat: cfg.heartbeat,
            dead_after: cfg.dead_after,
            epoch: Instant::now(),
            heartbeats_paused: AtomicBool::new(false),
            inline: OnceLock::new(),
        });
        let mut transport = Transport {
            inner: inner.clone(),
            threads: Vec::new(),
            heartbeat_thread: None,
        };
        // Heartbeats start at once so early-connected peers do not time us out while we
        // wait for the others.
        let hb_inner = inner.clone();
        transport.heartbeat_thread = Some(
            thread::Builder::new()
                .name(format!("dvmm-tr{}-hb", cfg.id))
                .spawn(move || heartbeat_loop(&hb_inner))
                .map_err(TransportError::Thread)?,
        );

        let ctx = Arc::new(SetupCtx {
            psk: derive_psk(&cfg.secret),
            id: cfg.id,
            nodes,
            encrypt: cfg.encrypt,
            deadline: Instant::now() + cfg.connect_timeout,
            abort: AtomicBool::new(false),
            handshakes: HandshakeSlots::new(MAX_HANDSHAKES),
        });
        let (setup_tx, setup_rx) = mpsc::channel::<Setup>();
        let mut setup_threads = Vec::new();
        let last_errors: Arc<Vec<Mutex<Option<String>>>> =
            Arc::new((0..nodes).map(|_| Mutex::new(None)).collect());

        let result = (|| {
            if cfg.id + 1 < nodes {
                listener
                    .set_nonblocking(true)
                    .map_err(|source| TransportError::Bind {
                        addr: cfg.peers[usize::from(cfg.id)],
                        source,
                    })?;
                let (ctx, tx) = (ctx.clone(), setup_tx.clone());
                setup_threads.push(
                    thread::Builder::new()
                        .name(format!("dvmm-tr{}-accept", cfg.id))
                        .spawn(move || accept_loop(&listener, &ctx, &tx))
                        .map_err(TransportError::Thread)?,
                );
            }
            for node in 0..cfg.id {
                let addr = cfg.peers[usize::from(node)];
                let (ctx, tx, errs) = (ctx.clone(), setup_tx.clone(), last_errors.clone());
                setup_threads.push(
                    thread::Builder::new()
                        .name(format!("dvmm-tr{}-conn{node}", cfg.id))
                        .spawn(move || connect_loop(node, addr, &ctx, &tx, &errs))
                        .map_err(TransportError::Thread)?,
                );
            }
            drop(setup_tx);

            let mut missing = usize::from(nodes) - 1;
            let started = Instant::now();
            let mut next_note = started + WAITING_NOTE_EVERY;
            while missing > 0 {
                let now = Instant::now();
                if now >= ctx.deadline {
                    break;
                }
                if now >= next_note {
                    let waiting: Vec<String> = (0..nodes)
                        .filter(|&n| n != cfg.id && inner.peers[usize::from(n)].get().is_none())
                        .map(|n| n.to_string())
                        .collect();
                    info!(
                        "transport: waiting for node(s) {} to connect ({} s of {} s)",
                        waiting.join(", "),
                        now.duration_since(started).as_secs(),
                        cfg.connect_timeout.as_secs()
                    );
                    next_note += WAITING_NOTE_EVERY;
                }
                let wait = ctx.deadline.min(next_note).saturating_duration_since(now);
                let Setup::Connected {
                    session,
                    stream,
                    addr,
                } = match setup_rx.recv_timeout(wait) {
                    Ok(s) => s,
                    Err(RecvTimeoutError::Timeout) => continue,
                    Err(RecvTimeoutError::Disconnected) => break,
                };
                let node = session.peer;
                if inner.peers[usize::from(node)].get().is_some() {
                    warn!(node, %addr, "transport: dropping a second connection from node {node}");
                    continue;
                }
                transport.install(session, stream)?;
                info!(node, %addr, "transport: connected to node {node}");
                missing -= 1;
            }
            if missing == 0 {
                return Ok(());
            }
            let node = (0..nodes)
                .find(|&n| n != cfg.id && inner.peers[usize::from(n)].get().is_none())
                .unwrap_or(0);
            let addr = cfg.peers[usize::from(node)];
            let timeout = cfg.connect_timeout;
            Err(if node < cfg.id {
                let reason = last_errors[usize::from(node)]
                    .locked()
                    .clone()
                    .unwrap_or_else(|| "no connection attempt completed".into());
                TransportError::ConnectFailed {
                    node,
                    addr,
                    timeout,
                    reason,
                }
            } else {
                TransportError::PeerNeverConnected {
                    node,
                    addr,
                    timeout,
                }
            })
        })();
        ctx.abort.store(true, Ordering::Release);
        for t in setup_threads {
            let _ = t.join();
        }
        result.map(|()| (transport, ev_rx))
    }

    fn install(&mut self, session: Session, stream: TcpStream) -> Result<(), TransportError> {
        let inner = &self.inner;
        let node = session.peer;
        let io_err = |e: io::Error| TransportError::SendFailed {
            node,
            reason: format!("cannot configure the connection: {e}"),
        };
        stream
            .set_read_timeout(Some(inner.dead_after))
            .map_err(io_err)?;
        stream
            .set_write_timeout(Some(inner.dead_after))
            .map_err(io_err)?;
        let reader = stream.try_clone().map_err(io_err)?;
        let writer = stream.try_clone().map_err(io_err)?;
        let peer = Arc::new(Peer {
            node,
            stream,
            tx: Mutex::new(PeerTx {
                session: session.tx,
                stream: writer,
            }),
            lost: AtomicBool::new(false),
            last_tx_ns: AtomicU64::new(inner.now_ns()),
            frames_sent: AtomicU64::new(0),
            bytes_sent: AtomicU64::new(0),
            frames_received: AtomicU64::new(0),
            bytes_received: AtomicU64::new(0),
            rtt_ns: AtomicU64::new(0),
        });
        let mut rx = session.rx;
        let (inner2, peer2) = (inner.clone(), peer.clone());
        let handle = thread::Builder::new()
            .name(format!("dvmm-tr{}-rx{node}", inner.id))
            .spawn(move || rx_loop(&inner2, &peer2, &mut rx, reader))
            .map_err(TransportError::Thread)?;
        self.threads.push(handle);
        // The caller checked the slot is empty, and only this thread fills slots.
        let _ = inner.peers[usize::from(node)].set(peer);
        Ok(())
    }

    /// Sends one message to node `to`. Thread-safe; blocks while the connection's send
    /// buffer is full (at most `dead_after`, then the peer is declared lost).
    pub fn send(&self, to: u16, kind: u16, payload: &[u8]) -> Result<(), TransportError> {
        self.send_parts(to, kind, &[payload])
    }

    /// Sends one message whose payload is the concatenation of `parts` (e.g. a small
    /// header and a guest page), without first concatenating them in insecure mode.
    pub fn send_parts(&self, to: u16, kind: u16, parts: &[&[u8]]) -> Result<(), TransportError> {
        let peer = self.inner.peer(to)?;
        self.inner.send_frame(peer, 0, kind, parts)
    }

    /// From now on, hands every message of `kind` to `handler` on the reader thread of
    /// the connection it arrived on, in order, instead of the event channel: one thread
    /// hop less per message. The handler may send, but must never wait for another
    /// message (that message may be queued behind it). One kind per transport: false
    /// (and nothing changes) if a handler was set before.
    pub fn deliver_inline(&self, kind: u16, handler: InlineHandler) -> bool {
        self.inner.inline.set((kind, handler)).is_ok()
    }

    /// This node's id.
    pub fn id(&self) -> u16 {
        self.inner.id
    }

    /// Number of nodes in the cluster, this one included.
    pub fn nodes(&self) -> u16 {
        self.inner.nodes
    }

    /// Whether the connection to `node` is up (false for this node and unknown nodes).
    pub fn is_connected(&self, node: u16) -> bool {
        self.inner
            .peer(node)
            .is_ok_and(|p| !p.lost.load(Ordering::Acquire))
    }

    /// Traffic on the connection to `node` (None for this node and unknown nodes).
    pub fn peer_stats(&self, node: u16) -> Option<PeerStats> {
        let p = self.inner.peer(node).ok()?;
        Some(PeerStats {
            up: !p.lost.load(Ordering::Acquire),
            frames_sent: p.frames_sent.load(Ordering::Relaxed),
            bytes_sent: p.bytes_sent.load(Ordering::Relaxed),
            frames_received: p.frames_received.load(Ordering::Relaxed),
            bytes_received: p.bytes_received.load(Ordering::Relaxed),
            rtt_ns: p.rtt_ns.load(Ordering::Relaxed),
        })
    }

    /// Test hook: stop sending heartbeats, as a hung node would.
    #[cfg(test)]
    fn pause_heartbeats(&self) {
        self.inner.heartbeats_paused.store(true, Ordering::Release);
    }
}

impl Drop for Transport {
    fn drop(&mut self) {
        self.inner.stop.store(true, Ordering::Release);
        for peer in self.inner.peers.iter().filter_map(OnceLock::get) {
            peer.lost.store(true, Ordering::Release);
            let _ = peer.stream.shutdown(Shutdown::Both);
        }
        if let Some(hb) = self.heartbeat_thread.take() {
            hb.thread().unpark();
            let _ = hb.join();
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn rx_loop(inner: &Inner, peer: &Peer, rx: &mut RxSession, stream: TcpStream) {
    let mut reader = BufReader::with_capacity(RX_BUFFER, stream);
    loop {
        let msg = match rx.recv(&mut reader) {
            Ok(m) => m,
            Err(e) => {
                if inner.stop.load(Ordering::Acquire) || peer.lost.load(Ordering::Acquire) {
                    return;
                }
                let reason = match e {
                    RecvError::Io(e) => match e.kind() {
                        io::ErrorKind::UnexpectedEof => "connection closed by peer".to_string(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
                            format!("no traffic for {:?}", inner.dead_after)
                        }
                        _ => format!("connection error: {e}"),
                    },
                    RecvError::Frame(e) => {
                        warn!(node = peer.node, error = %e, "transport: rejected frame, dropping the connection");
                        format!("rejected frame: {e}")
                    }
                };
                inner.lose(peer, &reason);
                return;
            }
        };
        peer.frames_received.fetch_add(1, Ordering::Relaxed);
        peer.bytes_received
            .fetch_add(msg.payload.len() as u64, Ordering::Relaxed);
        if msg.flags & FLAG_CONTROL != 0 {
            // Heartbeats only refresh the read timeout; unknown control kinds are
            // ignored so that later versions can add some.
            if msg.kind == CTL_PING {
                let _ = inner.send_frame(peer, FLAG_CONTROL, CTL_PONG, &[&msg.payload]);
            } else if msg.kind == CTL_PONG {
                if let Ok(sent) = <[u8; 8]>::try_from(&msg.payload[..]) {
                    let rtt = inner.now_ns().saturating_sub(u64::from_le_bytes(sent));
                    peer.rtt_ns.store(rtt.max(1), Ordering::Relaxed);
                }
            } else if msg.kind != CTL_HEARTBEAT {
                debug!(
                    node = peer.node,
                    kind = msg.kind,
                    "transport: ignoring control message"
                );
            }
            continue;
        }
        if let Some((_, handle)) = inner.inline.get().filter(|(k, _)| *k == msg.kind) {
            handle(peer.node, &msg.payload);
            continue;
        }
        let _ = inner.events.send(Event::Message {
            from: peer.node,
            kind: msg.kind,
            payload: msg.payload,
        });
    }
}

fn heartbeat_loop(inner: &Inner) {
    let tick = inner.heartbeat / 2;
    let idle_ns = u64::try_from(tick.as_nanos()).unwrap_or(u64::MAX);
    // A round-trip probe about once a second.
    let probe_every = (Duration::from_secs(1).as_nanos() / tick.as_nanos().max(1)).max(1);
    let mut ticks: u128 = 0;
    while !inner.stop.load(Ordering::Acquire) {
        thread::park_timeout(tick);
        if inner.stop.load(Ordering::Acquire) {
            return;
        }
        if inner.heartbeats_paused.load(Ordering::Acquire) {
            continue;
        }
        ticks += 1;
        if ticks.is_multiple_of(probe_every) {
            for peer in inner.peers.iter().filter_map(OnceLock::get) {
                if !peer.lost.load(Ordering::Acquire) {
                    let now = inner.now_ns().to_le_bytes();
                    let _ = inner.send_frame(peer, FLAG_CONTROL, CTL_PING, &[&now]);
                }
            }
        }
        let now = inner.now_ns();
        for peer in inner.peers.iter().filter_map(OnceLock::get) {
            if peer.lost.load(Ordering::Acquire)
                || now.saturating_sub(peer.last_tx_ns.load(Ordering::Relaxed)) < idle_ns
            {
                continue;
            }
            // A busy lock means traffic is flowing anyway.
            let Ok(mut guard) = peer.tx.try_lock() else {
                continue;
            };
            let tx = &mut *guard;
            let res = tx
                .session
                .send(&mut tx.stream, FLAG_CONTROL, CTL_HEARTBEAT, &[]);
            drop(guard);
            match res {
                Ok(()) => peer.last_tx_ns.store(inner.now_ns(), Ordering::Relaxed),
                Err(e) => inner.lose(peer, &format!("heartbeat send failed: {e}")),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::session::{handshake, Identity};

    const SECRET: &[u8] = b"test cluster secret";

    fn listeners(n: usize) -> (Vec<TcpListener>, Vec<SocketAddr>) {
        let ls: Vec<TcpListener> = (0..n)
            .map(|_| TcpListener::bind("127.0.0.1:0").unwrap())
            .collect();
        let addrs = ls.iter().map(|l| l.local_addr().unwrap()).collect();
        (ls, addrs)
    }

    fn cfg(id: u16, peers: &[SocketAddr], encrypt: bool) -> TransportConfig {
        TransportConfig {
            encrypt,
            connect_timeout: Duration::from_secs(10),
            heartbeat: Duration::from_millis(50),
            dead_after: Duration::from_millis(400),
            ..TransportConfig::new(id, peers.to_vec(), SECRET)
        }
    }

    type Started = Result<(Transport, Receiver<Event>), TransportError>;

    fn start_all(cfgs: Vec<TransportConfig>, ls: Vec<TcpListener>) -> Vec<Started> {
        let handles: Vec<_> = cfgs
            .into_iter()
            .zip(ls)
            .map(|(c, l)| thread::spawn(move || Transport::start_with_listener(c, l)))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    }

    fn cluster(n: usize, encrypt: bool) -> Vec<(Transport, Receiver<Event>)> {
        let (ls, addrs) = listeners(n);
        let cfgs = (0..n).map(|i| cfg(i as u16, &addrs, encrypt)).collect();
        start_all(cfgs, ls)
            .into_iter()
            .map(Result::unwrap)
            .collect()
    }

    fn recv(rx: &Receiver<Event>) -> Event {
        rx.recv_timeout(Duration::from_secs(5))
            .expect("no event within 5 s")
    }

    fn three_nodes(encrypt: bool) {
        let nodes = cluster(3, encrypt);
        const COUNT: u32 = 200;
        let page = vec![0x3cu8; 4096];
        thread::scope(|s| {
            for (t, _) in &nodes {
                let page = &page;
                s.spawn(move || {
                    for i in 0..COUNT {
                        for to in (0..3).filter(|&to| to != t.id()) {
                            let tag = [t.id() as u8, to as u8];
                            if i % 10 == 9 {
                                t.send_parts(to, 2, &[&i.to_le_bytes(), &tag, page])
                                    .unwrap();
                            } else {
                                t.send(to, 1, &[&i.to_le_bytes()[..], &tag].concat())
                                    .unwrap();
                            }
                        }
                    }
                });
            }
        });
        for (t, rx) in &nodes {
            let mut next = [0u32; 3];
            for _ in 0..2 * COUNT {
                let Event::Message {
                    from,
                    kind,
                    payload,
                } = recv(rx)
                else {
                    panic!("unexpected event at node {}", t.id());
                };
                let i = u32::from_le_bytes(payload[..4].try_into().unwrap());
                assert_eq!(
                    i,
                    next[usize::from(from)],
                    "order from {from} to {}",
                    t.id()
                );
                next[usize::from(from)] += 1;
                assert_eq!(&payload[4..6], &[from as u8, t.id() as u8]);
                if i % 10 == 9 {
                    assert_eq!(kind, 2);
                    assert_eq!(&payload[6..], &page[..]);
                } else {
                    assert_eq!((kind, payload.len()), (1, 6));
                }
            }
            let expect: Vec<u32> = (0..3)
                .map(|n| if n == t.id() { 0 } else { COUNT })
                .collect();
            assert_eq!(next.to_vec(), expect);
        }
    }

    #[test]
    fn peer_stats_count_traffic_and_a_probe_measures_the_round_trip() {
        let nodes = cluster(2, true);
        let (a, b) = (&nodes[0].0, &nodes[1].0);
        assert_eq!(a.peer_stats(0), None, "no stats for this node");
        a.send(1, 9, &[7u8; 100]).unwrap();
        assert!(matches!(recv(&nodes[1].1), Event::Message { kind: 9, .. }));
        let sa = a.peer_stats(1).unwrap();
        let sb = b.peer_stats(0).unwrap();
        assert!(sa.up && sb.up);
        assert!(sa.frames_sent >= 1 && sa.bytes_sent >= 100, "{sa:?}");
        assert!(
            sb.frames_received >= 1 && sb.bytes_received >= 100,
            "{sb:?}"
        );
        let t = Instant::now();
        while a.peer_stats(1).unwrap().rtt_ns == 0 {
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "no round trip measured"
            );
            thread::sleep(Duration::from_millis(50));
        }
        let rtt = a.peer_stats(1).unwrap().rtt_ns;
        assert!(rtt < 2_000_000_000, "rtt {rtt} ns");
    }

    #[test]
    fn inline_kind_goes_to_its_handler_in_order_others_to_the_channel() {
        let nodes = cluster(3, true);
        let (tx, got) = mpsc::channel::<(u16, u32)>();
        let tx = Mutex::new(tx);
        assert!(nodes[0].0.deliver_inline(
            7,
            Arc::new(move |from, payload: &[u8]| {
                let i = u32::from_le_bytes(payload[..4].try_into().unwrap());
                let _ = tx.lock().unwrap().send((from, i));
            }),
        ));
        assert!(!nodes[0].0.deliver_inline(3, Arc::new(|_, _: &[u8]| {})));
        const COUNT: u32 = 100;
        for i in 0..COUNT {
            for sender in [1usize, 2] {
                let t = &nodes[sender].0;
                t.send(0, 7, &i.to_le_bytes()).unwrap();
                if i % 10 == 0 {
                    t.send(0, 3, &i.to_le_bytes()).unwrap();
                }
            }
        }
        let mut next = [0u32; 3];
        for _ in 0..2 * COUNT {
            let (from, i) = got.recv_timeout(Duration::from_secs(5)).expect("inline");
            assert_eq!(i, next[usize::from(from)], "order from {from}");
            next[usize::from(from)] += 1;
        }
        assert_eq!(next, [0, COUNT, COUNT]);
        // The other kind still comes through the event channel, and nothing else does.
        for _ in 0..2 * COUNT / 10 {
            let Event::Message { kind, .. } = recv(&nodes[0].1) else {
                panic!("unexpected event");
            };
            assert_eq!(kind, 3);
        }
        assert!(nodes[0].1.recv_timeout(Duration::from_millis(200)).is_err());
    }

    #[test]
    fn three_nodes_all_directions_encrypted() {
        three_nodes(true);
    }

    #[test]
    fn three_nodes_all_directions_insecure() {
        three_nodes(false);
    }

    #[test]
    fn largest_payload_delivered_and_larger_rejected() {
        let nodes = cluster(2, true);
        let big = vec![0x77u8; MAX_PAYLOAD];
        nodes[0].0.send(1, 4, &big).unwrap();
        assert_eq!(
            recv(&nodes[1].1),
            Event::Message {
                from: 0,
                kind: 4,
                payload: big.clone()
            }
        );
        let e = nodes[0].0.send_parts(1, 4, &[&big, b"x"]).unwrap_err();
        assert!(matches!(e, TransportError::PayloadTooLarge { len, .. } if len == MAX_PAYLOAD + 1));
        // The connection is still usable.
        nodes[0].0.send(1, 5, b"ok").unwrap();
        assert!(matches!(recv(&nodes[1].1), Event::Message { kind: 5, .. }));
    }

    #[test]
    fn bad_destinations_rejected() {
        let nodes = cluster(2, true);
        let t = &nodes[0].0;
        assert!(matches!(
            t.send(0, 1, b""),
            Err(TransportError::NoSuchPeer { node: 0, .. })
        ));
        assert!(matches!(
            t.send(2, 1, b""),
            Err(TransportError::NoSuchPeer { node: 2, .. })
        ));
        assert!(t.is_connected(1));
        assert!(!t.is_connected(0));
        assert_eq!((t.id(), t.nodes()), (0, 2));
    }

    #[test]
    fn wrong_secret_never_connects() {
        let (ls, addrs) = listeners(2);
        let mut bad = cfg(1, &addrs, true);
        bad.secret = b"another secret".to_vec();
        bad.connect_timeout = Duration::from_millis(1500);
        let mut good = cfg(0, &addrs, true);
        good.connect_timeout = Duration::from_millis(1500);
        let res = start_all(vec![good, bad], ls);
        match &res[0] {
            Err(TransportError::PeerNeverConnected { node: 1, .. }) => {}
            other => panic!("node 0: {:?}", other.as_ref().err()),
        }
        match &res[1] {
            Err(
                e @ TransportError::ConnectFailed {
                    node: 0, reason, ..
                },
            ) => {
                assert!(reason.contains("rejected"), "{reason}");
                assert!(e.to_string().contains(&addrs[0].to_string()));
            }
            other => panic!("node 1: {:?}", other.as_ref().err()),
        }
    }

    #[test]
    fn mode_mismatch_never_connects() {
        let (ls, addrs) = listeners(2);
        let mut a = cfg(0, &addrs, true);
        a.connect_timeout = Duration::from_millis(800);
        let mut b = cfg(1, &addrs, false);
        b.connect_timeout = Duration::from_millis(800);
        let res = start_all(vec![a, b], ls);
        assert!(res.iter().all(Result::is_err));
    }

    #[test]
    fn connect_gives_up_naming_the_peer() {
        // Reserve a port, then free it, so nothing listens there.
        let (ls, addrs) = listeners(2);
        let mut ls = ls.into_iter();
        drop(ls.next());
        let mut c = cfg(1, &addrs, true);
        c.connect_timeout = Duration::from_millis(600);
        let t0 = Instant::now();
        let e = Transport::start_with_listener(c, ls.next().unwrap())
            .err()
            .expect("start must fail");
        let took = t0.elapsed();
        assert!(
            took >= Duration::from_millis(600) && took < Duration::from_secs(4),
            "{took:?}"
        );
        let msg = e.to_string();
        assert!(
            matches!(e, TransportError::ConnectFailed { node: 0, .. }),
            "{msg}"
        );
        assert!(
            msg.contains("node 0") && msg.contains(&addrs[0].to_string()),
            "{msg}"
        );
    }

    #[test]
    fn port_in_use_named() {
        let busy = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = busy.local_addr().unwrap();
        let c = cfg(0, &[addr, "127.0.0.1:1".parse().unwrap()], true);
        let e = Transport::start(c).err().expect("start must fail");
        assert!(matches!(e, TransportError::PortInUse { port, .. } if port == addr.port()));
        assert!(e.to_string().contains(&addr.port().to_string()));
    }

    #[test]
    fn invalid_configs_rejected() {
        let addrs: Vec<SocketAddr> = vec!["127.0.0.1:1".parse().unwrap(); 2];
        let mut c = cfg(2, &addrs, true);
        assert!(matches!(
            Transport::start(c.clone()),
            Err(TransportError::InvalidConfig(_))
        ));
        c.id = 0;
        c.secret.clear();
        assert!(matches!(
            Transport::start(c.clone()),
            Err(TransportError::InvalidConfig(_))
        ));
        c.secret = b"s".to_vec();
        c.dead_after = c.heartbeat;
        assert!(matches!(
            Transport::start(c),
            Err(TransportError::InvalidConfig(_))
        ));
    }

    fn expect_lost(rx: &Receiver<Event>, node: u16, within: Duration) -> String {
        let t0 = Instant::now();
        loop {
            let left = within.saturating_sub(t0.elapsed());
            match rx.recv_timeout(left) {
                Ok(Event::PeerLost { node: n, reason }) if n == node => return reason,
                Ok(Event::PeerLost { node: n, .. }) => panic!("unexpected loss of node {n}"),
                Ok(Event::Message { .. }) => {}
                Err(_) => panic!("node {node} not reported lost within {within:?}"),
            }
        }
    }

    #[test]
    fn dropped_node_reported_lost() {
        let mut nodes = cluster(3, true);
        let (t2, _rx2) = nodes.pop().unwrap();
        let t0 = Instant::now();
        drop(t2);
        let margin = Duration::from_millis(400) + Duration::from_millis(500);
        for (t, rx) in &nodes {
            let reason = expect_lost(rx, 2, margin);
            assert!(reason.contains("closed"), "{reason}");
            assert!(!t.is_connected(2));
            assert!(matches!(
                t.send(2, 1, b"x"),
                Err(TransportError::PeerDown { node: 2 })
            ));
        }
        assert!(t0.elapsed() < margin);
        // The survivors still talk.
        nodes[0].0.send(1, 3, b"still here").unwrap();
        assert!(matches!(
            recv(&nodes[1].1),
            Event::Message {
                from: 0,
                kind: 3,
                ..
            }
        ));
    }

    #[test]
    fn idle_peers_kept_alive_by_heartbeats_silent_peer_lost() {
        let nodes = cluster(2, false);
        // Idle for well over dead_after (400 ms): heartbeats keep both sides alive.
        assert!(nodes[0]
            .1
            .recv_timeout(Duration::from_millis(1000))
            .is_err());
        assert!(nodes[0].0.is_connected(1) && nodes[1].0.is_connected(0));
        // Node 1 hangs: node 0 must notice within dead_after + margin.
        nodes[1].0.pause_heartbeats();
        let t0 = Instant::now();
        let reason = expect_lost(&nodes[0].1, 1, Duration::from_millis(400 + 600));
        assert!(reason.contains("no traffic"), "{reason}");
        assert!(
            t0.elapsed() >= Duration::from_millis(300),
            "{:?}",
            t0.elapsed()
        );
    }

    /// Starts node 0 of a 2-node cluster and connects to it as node 1 with a raw,
    /// correctly authenticated session the test drives frame by frame.
    fn raw_peer(encrypt: bool) -> (Transport, Receiver<Event>, TcpStream, Session) {
        let (ls, addrs) = listeners(2);
        let c = cfg(0, &addrs, encrypt);
        let l0 = ls.into_iter().next().unwrap();
        let node0 = thread::spawn(move || Transport::start_with_listener(c, l0));
        let stream = TcpStream::connect(addrs[0]).unwrap();
        let me = Identity {
            id: 1,
            nodes: 2,
            encrypt,
        };
        let session = handshake(
            &mut &stream,
            Role::Initiator,
            &derive_psk(SECRET),
            &me,
            |p| if p == 0 { Ok(()) } else { Err("node 0".into()) },
        )
        .unwrap();
        let (t, rx) = node0.join().unwrap().unwrap();
        (t, rx, stream, session)
    }

    fn frame(tx: &mut TxSession, kind: u16, payload: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        tx.send(&mut v, 0, kind, &[payload]).unwrap();
        v
    }

    #[test]
    fn replayed_frame_on_the_wire_rejected() {
        for encrypt in [true, false] {
            let (_t, rx, mut stream, mut s) = raw_peer(encrypt);
            let f = frame(&mut s.tx, 7, b"once");
            io::Write::write_all(&mut stream, &f).unwrap();
            io::Write::write_all(&mut stream, &f).unwrap();
            assert_eq!(
                recv(&rx),
                Event::Message {
                    from: 1,
                    kind: 7,
                    payload: b"once".to_vec()
                }
            );
            let Event::PeerLost { node: 1, reason } = recv(&rx) else {
                panic!("expected PeerLost");
            };
            assert!(reason.contains("replayed"), "{reason}");
            assert!(rx.recv_timeout(Duration::from_millis(100)).is_err());
        }
    }

    #[test]
    fn altered_frame_on_the_wire_rejected() {
        for encrypt in [true, false] {
            let (_t, rx, mut stream, mut s) = raw_peer(encrypt);
            let mut f = frame(&mut s.tx, 7, b"payload");
            let last = f.len() - 20;
            f[last] ^= 0x40;
            io::Write::write_all(&mut stream, &f).unwrap();
            let Event::PeerLost { node: 1, reason } = recv(&rx) else {
                panic!("altered frame delivered");
            };
            assert!(reason.contains("authentication failed"), "{reason}");
        }
    }

    #[test]
    fn malformed_frame_on_the_wire_rejected() {
        let (_t, rx, mut stream, _s) = raw_peer(true);
        io::Write::write_all(&mut stream, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        let Event::PeerLost { node: 1, reason } = recv(&rx) else {
            panic!("garbage delivered");
        };
        assert!(reason.contains("magic"), "{reason}");
    }

    #[test]
    fn stranger_cannot_take_a_peer_slot() {
        let (ls, addrs) = listeners(2);
        let mut c0 = cfg(0, &addrs, true);
        c0.connect_timeout = Duration::from_secs(5);
        let c1 = cfg(1, &addrs, true);
        let mut ls = ls.into_iter();
        let l0 = ls.next().unwrap();
        let node0 = thread::spawn(move || Transport::start_with_listener(c0, l0));
        // A stranger without the secret connects first and is dropped.
        let mut stranger = TcpStream::connect(addrs[0]).unwrap();
        let wrong = derive_psk(b"guess");
        let me = Identity {
            id: 1,
            nodes: 2,
            encrypt: true,
        };
        assert!(handshake(&mut stranger, Role::Initiator, &wrong, &me, |_| Ok(())).is_err());
        // The real node 1 still gets in.
        let (t1, rx1) = Transport::start_with_listener(c1, ls.next().unwrap()).unwrap();
        let (t0, _rx0) = node0.join().unwrap().unwrap();
        t0.send(1, 1, b"hi").unwrap();
        assert_eq!(
            recv(&rx1),
            Event::Message {
                from: 0,
                kind: 1,
                payload: b"hi".to_vec()
            }
        );
        drop(t1);
    }

    #[test]
    fn handshake_slots_are_bounded_and_given_back() {
        let slots = HandshakeSlots::new(2);
        assert!(slots.try_take());
        assert!(slots.try_take());
        assert!(
            !slots.try_take(),
            "a third handshake must wait for a free slot"
        );
        slots.give_back();
        assert!(slots.try_take());
    }

    #[test]
    fn silent_listener_is_named_as_silent() {
        // Something that accepts connections but never speaks.
        let mute = TcpListener::bind("127.0.0.1:0").unwrap();
        let mute_addr = mute.local_addr().unwrap();
        let held = thread::spawn(move || {
            let mut conns = Vec::new();
            mute.set_nonblocking(true).unwrap();
            let t0 = Instant::now();
            while t0.elapsed() < Duration::from_secs(9) {
                if let Ok((c, _)) = mute.accept() {
                    conns.push(c);
                }
                thread::sleep(Duration::from_millis(5));
            }
        });
        let (ls, addrs) = listeners(2);
        let mut ls = ls.into_iter();
        drop(ls.next());
        let mut c = cfg(1, &[mute_addr, addrs[1]], true);
        // Past one whole handshake time-out (5 s), so one attempt has ended for sure.
        c.connect_timeout = Duration::from_secs(7);
        let e = Transport::start_with_listener(c, ls.next().unwrap())
            .err()
            .expect("start must fail");
        let msg = e.to_string();
        assert!(msg.contains("sent nothing"), "{msg}");
        assert!(!msg.contains("os error 11"), "{msg}");
        drop(held); // it lets its connections go by itself
    }

    #[test]
    fn a_flood_of_silent_connections_does_not_keep_a_peer_out() {
        let (ls, addrs) = listeners(2);
        let mut c0 = cfg(0, &addrs, true);
        c0.connect_timeout = Duration::from_secs(20);
        let mut c1 = cfg(1, &addrs, true);
        c1.connect_timeout = Duration::from_secs(20);
        // More silent connections than handshake slots, queued before node 0 accepts.
        let silent: Vec<TcpStream> = (0..3 * MAX_HANDSHAKES)
            .map(|_| TcpStream::connect(addrs[0]).unwrap())
            .collect();
        let mut ls = ls.into_iter();
        let l0 = ls.next().unwrap();
        let node0 = thread::spawn(move || Transport::start_with_listener(c0, l0));
        thread::sleep(Duration::from_millis(200));
        let (t1, rx1) = Transport::start_with_listener(c1, ls.next().unwrap()).unwrap();
        let (t0, _rx0) = node0.join().unwrap().unwrap();
        t0.send(1, 1, b"in").unwrap();
        assert_eq!(
            recv(&rx1),
            Event::Message {
                from: 0,
                kind: 1,
                payload: b"in".to_vec()
            }
        );
        drop((t0, t1, silent));
    }
}
