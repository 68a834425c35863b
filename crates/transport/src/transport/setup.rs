//! Connection set-up: every node dials the lower ids and accepts the higher ones, each
//! connection authenticated with the Noise handshake before it is handed over.

use super::*;

/// Longest a single handshake may take before the attempt is abandoned.
pub(super) const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// Pause between connection attempts to a peer that is not listening yet.
pub(super) const RETRY_INTERVAL: Duration = Duration::from_millis(100);
/// Pause after a peer rejected our handshake (it is unlikely to change its mind soon).
pub(super) const RETRY_AFTER_REJECT: Duration = Duration::from_secs(1);
/// Poll interval of the non-blocking accept loop.
pub(super) const ACCEPT_POLL: Duration = Duration::from_millis(10);
/// Incoming handshakes in progress at once (one thread each); a connection beyond
/// them is closed at once, so a flood of silent connections cannot pile up threads.
/// A real peer that lands on a full set retries (it sees the close as a rejection).
pub(super) const MAX_HANDSHAKES: usize = 16;

pub(super) enum Setup {
    Connected {
        session: Session,
        stream: TcpStream,
        addr: SocketAddr,
    },
}

/// Handshake parameters shared by the set-up threads.
pub(super) struct SetupCtx {
    pub(super) psk: Psk,
    pub(super) id: u16,
    pub(super) nodes: u16,
    pub(super) encrypt: bool,
    pub(super) deadline: Instant,
    pub(super) abort: AtomicBool,
    pub(super) handshakes: HandshakeSlots,
}

/// A bounded count of handshakes in progress.
pub(super) struct HandshakeSlots {
    busy: AtomicUsize,
    max: usize,
}

/// One handshake's slot in its set-up context, given back on drop.
pub(super) struct HandshakeSlot(Arc<SetupCtx>);

impl HandshakeSlots {
    pub(super) fn new(max: usize) -> HandshakeSlots {
        HandshakeSlots {
            busy: AtomicUsize::new(0),
            max,
        }
    }

    pub(super) fn try_take(&self) -> bool {
        self.busy
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.max).then_some(n + 1)
            })
            .is_ok()
    }

    pub(super) fn give_back(&self) {
        self.busy.fetch_sub(1, Ordering::AcqRel);
    }
}

impl HandshakeSlot {
    pub(super) fn take(ctx: &Arc<SetupCtx>) -> Option<HandshakeSlot> {
        ctx.handshakes
            .try_take()
            .then(|| HandshakeSlot(ctx.clone()))
    }
}

impl Drop for HandshakeSlot {
    fn drop(&mut self) {
        self.0.handshakes.give_back();
    }
}

impl SetupCtx {
    pub(super) fn identity(&self) -> Identity {
        Identity {
            id: self.id,
            nodes: self.nodes,
            encrypt: self.encrypt,
        }
    }

    pub(super) fn handshake_timeout(&self) -> Duration {
        self.deadline
            .saturating_duration_since(Instant::now())
            .clamp(Duration::from_millis(50), HANDSHAKE_TIMEOUT)
    }
}

pub(super) fn accept_loop(listener: &TcpListener, ctx: &Arc<SetupCtx>, tx: &Sender<Setup>) {
    while !ctx.abort.load(Ordering::Acquire) && Instant::now() < ctx.deadline {
        match listener.accept() {
            Ok((stream, addr)) => {
                // Dropped with the thread's closure, also when the thread cannot start.
                let Some(slot) = HandshakeSlot::take(ctx) else {
                    warn!(%addr, "transport: {MAX_HANDSHAKES} handshakes already in progress: closing this connection");
                    continue;
                };
                let (ctx, tx) = (ctx.clone(), tx.clone());
                let spawned = thread::Builder::new()
                    .name(format!("dvmm-tr{}-hs", ctx.id))
                    .spawn(move || {
                        let _slot = slot;
                        let me = ctx.id;
                        let nodes = ctx.nodes;
                        let accept = |peer: u16| {
                            if peer > me && peer < nodes {
                                Ok(())
                            } else {
                                Err(format!(
                                    "a node in {}..{nodes} (lower ids are dialled by this node)",
                                    me + 1
                                ))
                            }
                        };
                        match setup_stream(&stream, &ctx)
                            .map_err(HandshakeError::Io)
                            .and_then(|()| {
                                session::handshake(
                                    &mut &stream,
                                    Role::Responder,
                                    &ctx.psk,
                                    &ctx.identity(),
                                    accept,
                                )
                            }) {
                            Ok(session) => {
                                let _ = tx.send(Setup::Connected {
                                    session,
                                    stream,
                                    addr,
                                });
                            }
                            Err(e) => {
                                warn!(%addr, error = %e, "transport: rejected incoming connection");
                            }
                        }
                    });
                if let Err(e) = spawned {
                    warn!(%addr, error = %e, "transport: cannot start a handshake thread");
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => thread::sleep(ACCEPT_POLL),
            Err(e) => {
                debug!(error = %e, "transport: accept failed");
                thread::sleep(ACCEPT_POLL);
            }
        }
    }
}

pub(super) fn setup_stream(stream: &TcpStream, ctx: &SetupCtx) -> io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_nodelay(true)?;
    let t = Some(ctx.handshake_timeout());
    stream.set_read_timeout(t)?;
    stream.set_write_timeout(t)
}

pub(super) fn connect_loop(
    node: u16,
    addr: SocketAddr,
    ctx: &SetupCtx,
    tx: &Sender<Setup>,
    last_errors: &[Mutex<Option<String>>],
) {
    let set_err = |e: String| {
        if let Some(slot) = last_errors.get(usize::from(node)) {
            *slot.locked() = Some(e);
        }
    };
    loop {
        let now = Instant::now();
        if ctx.abort.load(Ordering::Acquire) || now >= ctx.deadline {
            return;
        }
        let left = ctx.deadline - now;
        let mut pause = RETRY_INTERVAL;
        match TcpStream::connect_timeout(&addr, left.min(HANDSHAKE_TIMEOUT)) {
            Ok(stream) => {
                let res = setup_stream(&stream, ctx)
                    .map_err(HandshakeError::Io)
                    .and_then(|()| {
                        session::handshake(
                            &mut &stream,
                            Role::Initiator,
                            &ctx.psk,
                            &ctx.identity(),
                            |peer| {
                                if peer == node {
                                    Ok(())
                                } else {
                                    Err(format!("node {node} (the cluster file's address for it)"))
                                }
                            },
                        )
                    });
                match res {
                    Ok(session) => {
                        let _ = tx.send(Setup::Connected {
                            session,
                            stream,
                            addr,
                        });
                        return;
                    }
                    Err(e) => {
                        let msg = match &e {
                            HandshakeError::Io(io) if io.kind() == io::ErrorKind::UnexpectedEof => {
                                "the peer closed the connection during the handshake: it rejected us (another cluster secret, or --insecure-transport on one side only?)".to_string()
                            }
                            _ => format!("handshake failed: {e}"),
                        };
                        warn!(node, %addr, reason = %msg, "transport: connection attempt failed");
                        set_err(msg);
                        pause = RETRY_AFTER_REJECT;
                    }
                }
            }
            Err(e) => {
                debug!(node, %addr, error = %e, "transport: connect failed, retrying");
                set_err(format!("connect failed: {e}"));
            }
        }
        let left = ctx.deadline.saturating_duration_since(Instant::now());
        thread::sleep(pause.min(left));
    }
}
