//! The control API of a node: `dvmm_api::VmApi` answered from this node's VM, with
//! pause and resume carried to every other node.
//!
//! A pause asked of any node's API pauses that node's vCPUs, then sends every other
//! node [`ControlMsg::Pause`] and waits for each [`ControlMsg::Paused`]; if one fails,
//! every node is resumed and the request fails naming the node. A node answers a peer's
//! request on a thread of its own: pausing waits for its vCPUs, and a vCPU may be
//! waiting for a reply that the dispatcher must deliver.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dvmm_api::{ApiFailure, Counters, VmApi, VmInfo, VmState};
use dvmm_cluster::ControlMsg;
use dvmm_sync::MutexExt;
use dvmm_vmm::live::{LiveError, LiveVm};

use crate::view::NodeView;
use crate::NodeLink;

/// How long a pause waits for the other nodes' answers.
const PEER_WAIT: Duration = Duration::from_secs(12);

/// Pauses and resumes across the cluster.
pub(crate) struct Pauses {
    live: LiveVm,
    /// None on a VM of one node.
    pub(crate) link: Option<Arc<NodeLink>>,
    next_seq: AtomicU32,
    waiting: Mutex<HashMap<u32, mpsc::Sender<(u16, String)>>>,
    /// The current pause: which node coordinates it, and (on that node) when every
    /// node's vCPUs were known to be stopped.
    current: Mutex<Option<(u16, Option<Instant>)>>,
}

impl Pauses {
    pub(crate) fn new(live: LiveVm, link: Option<Arc<NodeLink>>) -> Pauses {
        Pauses {
            live,
            link,
            next_seq: AtomicU32::new(1),
            waiting: Mutex::new(HashMap::new()),
            current: Mutex::new(None),
        }
    }

    fn me(&self) -> u16 {
        self.link.as_ref().map_or(0, |l| l.id)
    }

    fn local(&self, pause: bool, clock_shift: Duration) -> Result<(), LiveError> {
        if pause {
            self.live.pause()
        } else {
            self.live.resume(clock_shift)
        }
    }

    /// Asks every other node and waits for their answers: the nodes that failed.
    fn ask_peers(&self, pause: bool, clock_shift: Duration) -> Vec<(u16, String)> {
        let Some(link) = &self.link else {
            return Vec::new();
        };
        let nodes = link.transport.nodes();
        if nodes <= 1 {
            return Vec::new();
        }
        let seq = self.next_seq.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::channel();
        self.waiting.locked().insert(seq, tx);
        link.broadcast(&ControlMsg::Pause {
            seq,
            pause,
            clock_shift_ns: u64::try_from(clock_shift.as_nanos()).unwrap_or(u64::MAX),
        });
        let mut left: Vec<u16> = (0..nodes).filter(|n| *n != link.id).collect();
        let mut failed = Vec::new();
        let deadline = Instant::now() + PEER_WAIT;
        while !left.is_empty() {
            let wait = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(wait) {
                Ok((from, error)) => {
                    left.retain(|n| *n != from);
                    if !error.is_empty() {
                        failed.push((from, error));
                    }
                }
                Err(_) => {
                    failed.extend(
                        left.drain(..)
                            .map(|n| (n, format!("no answer in {PEER_WAIT:?}"))),
                    );
                }
            }
        }
        self.waiting.locked().remove(&seq);
        failed
    }

    fn refused(e: LiveError) -> ApiFailure {
        match e {
            LiveError::Stuck(_) => ApiFailure::internal(e.to_string()),
            other => ApiFailure::conflict(other.to_string()),
        }
    }

    /// Pauses or resumes the whole VM (this node first). The node that paused the VM
    /// resumes it: it alone knows since when every node's vCPUs are stopped, which is
    /// how far every node sets the guest's clock back.
    pub(crate) fn cluster(&self, pause: bool) -> Result<(), ApiFailure> {
        let me = self.me();
        if pause {
            self.local(true, Duration::ZERO).map_err(Self::refused)?;
            *self.current.locked() = Some((me, None));
            let failed = self.ask_peers(true, Duration::ZERO);
            if failed.is_empty() {
                *self.current.locked() = Some((me, Some(Instant::now())));
                return Ok(());
            }
            // Leave no node paused by a pause that failed (no vCPU ran, no clock moves).
            let _ = self.local(false, Duration::ZERO);
            let _ = self.ask_peers(false, Duration::ZERO);
            *self.current.locked() = None;
            return Err(Self::failed("pause", &failed));
        }
        let shift = match *self.current.locked() {
            Some((by, Some(all_stopped))) if by == me => all_stopped.elapsed(),
            Some((by, _)) if by != me => {
                return Err(ApiFailure::conflict(format!(
                    "node {by} paused the VM: resume it through node {by}'s API (it knows \
                     how long every node was paused, which the guest's clock must not see)"
                )))
            }
            _ => Duration::ZERO,
        };
        self.local(false, shift).map_err(Self::refused)?;
        let failed = self.ask_peers(false, shift);
        *self.current.locked() = None;
        if failed.is_empty() {
            Ok(())
        } else {
            Err(Self::failed("resume", &failed))
        }
    }

    fn failed(what: &str, failed: &[(u16, String)]) -> ApiFailure {
        let why: Vec<String> = failed
            .iter()
            .map(|(n, e)| format!("node {n}: {e}"))
            .collect();
        ApiFailure::internal(format!(
            "{what} failed on {}{}",
            why.join("; "),
            if what == "pause" {
                " (every node was resumed)"
            } else {
                ""
            }
        ))
    }

    /// A peer asks this node to pause or resume (called by the dispatcher).
    pub(crate) fn on_request(
        self: &Arc<Self>,
        from: u16,
        seq: u32,
        pause: bool,
        clock_shift: Duration,
    ) {
        let Some(link) = self.link.clone() else {
            return;
        };
        let me = self.clone();
        let spawned = std::thread::Builder::new()
            .name("node-pause".into())
            .spawn(move || {
                let error = match me.local(pause, clock_shift) {
                    // Asked twice (two nodes' APIs at once): it is as asked.
                    Ok(()) | Err(LiveError::AlreadyPaused) | Err(LiveError::NotPaused) => {
                        String::new()
                    }
                    Err(e) => e.to_string(),
                };
                *me.current.locked() = pause.then_some((from, None));
                link.send(from, &ControlMsg::Paused { seq, error });
            });
        if let Err(e) = spawned {
            let Some(link) = &self.link else { return };
            link.send(
                from,
                &ControlMsg::Paused {
                    seq,
                    error: format!("cannot start a thread: {e}"),
                },
            );
        }
    }

    /// A peer's answer to one of this node's requests (called by the dispatcher).
    pub(crate) fn on_answer(&self, from: u16, seq: u32, error: String) {
        if let Some(tx) = self.waiting.locked().get(&seq) {
            let _ = tx.send((from, error));
        }
    }
}

/// The API of one node.
pub(crate) struct NodeApi {
    pub(crate) pauses: Arc<Pauses>,
    pub(crate) view: Arc<NodeView>,
}

impl VmApi for NodeApi {
    fn info(&self) -> Result<VmInfo, ApiFailure> {
        let (view, live) = (&self.view, &self.view.live);
        Ok(VmInfo {
            state: if live.is_stopping() {
                VmState::Stopping
            } else if live.is_paused() {
                VmState::Paused
            } else {
                VmState::Running
            },
            nodes: view.nodes,
            node: Some(view.node),
            vcpus: view.vcpus,
            local_vcpus: live.vcpus(),
            memory_bytes: view.memory_bytes,
            kernel: view.kernel.display().to_string(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            guest_clock_ns: live.guest_clock_ns(),
        })
    }

    fn pause(&self) -> Result<(), ApiFailure> {
        self.pauses.cluster(true)
    }

    fn resume(&self) -> Result<(), ApiFailure> {
        self.pauses.cluster(false)
    }

    fn shutdown(&self) -> Result<(), ApiFailure> {
        if self.view.live.is_stopping() {
            return Err(ApiFailure::conflict("the VM is already stopping"));
        }
        tracing::info!("shutdown asked through the control API");
        // The run loop's end tells the other nodes.
        self.view.live.stop();
        Ok(())
    }

    fn counters(&self) -> Result<Counters, ApiFailure> {
        Ok(Counters {
            nodes: vec![self.view.counters()],
        })
    }
}

/// Serves `view`'s metrics on `listener`.
pub fn serve_metrics(
    listener: dvmm_api::metrics::MetricsListener,
    view: Arc<NodeView>,
) -> Result<dvmm_api::metrics::MetricsServer, dvmm_api::ApiError> {
    listener.serve(view)
}

/// Serves the control API of a VM of one node (`dvmm run` without `--nodes`) on
/// `listener`.
pub fn serve_single(
    listener: dvmm_api::server::ApiListener,
    view: Arc<NodeView>,
) -> Result<dvmm_api::server::ApiServer, dvmm_api::ApiError> {
    let pauses = Arc::new(Pauses::new(view.live.clone(), None));
    listener.serve(Arc::new(NodeApi { pauses, view }))
}
