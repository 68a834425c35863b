//! One node of a multi-node VM.
//!
//! Every node builds the same VM (same RAM size, same loaded guest image), creates only
//! its own vCPUs, and joins the others over [`dvmm_transport`]. Node 0 owns the devices
//! and the boot vCPU. A dispatcher thread per node turns incoming messages into local
//! actions: interrupts for local LAPICs, device accesses (node 0), LAPIC views, DSM
//! traffic, and the end of the VM.
//!
//! This crate is the cluster runtime: it sits above `dvmm_vmm` (which builds and runs
//! one node's part of the VM and knows nothing of the network) and wires it to the
//! transport, the cluster file's control messages and the DSM engine.

pub mod api;
pub mod clock_sync;
pub mod join;
mod metrics;
pub mod report;
pub mod view;

use dvmm_sync::{CondvarExt, MutexExt};
use dvmm_vmm::guest_access::GuestAccessError;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dvmm_cluster::wire::{StopCode, KIND_CONTROL, KIND_DSM};
use dvmm_cluster::{ClusterConfig, ControlMsg, IoSpace};
use dvmm_dsm::{Msg as DsmMsg, Node as DsmNode};
use dvmm_dsm_uffd::{DsmEngine, GuestPages, PageNet};
use dvmm_irq::lapic::ApicView;
use dvmm_irq::msg::InterruptMessage;
use dvmm_layout::PAGE_SIZE;
use dvmm_transport::{Event, Transport, TransportConfig};

use dvmm_vmm::control::{VmControl, VmOutcome};
use dvmm_vmm::device_space::{DeviceSpace, RemoteIo};
use dvmm_vmm::irqchip::RemoteInterrupts;
use dvmm_vmm::shadow_mmu::ShadowPageTables;
use dvmm_vmm::vm::{Placement, Vm, VmConfig};
use dvmm_vmm::VmmError;

/// Why a node could not run its part of the VM.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// Building or running this node's VM failed.
    #[error(transparent)]
    Vmm(#[from] VmmError),
    /// This node cannot read the guest it is to load.
    #[error(transparent)]
    Boot(#[from] dvmm_boot::BootError),
    /// The DSM could not be set up.
    #[error("cluster: DSM: {0}")]
    Dsm(#[source] dvmm_dsm_uffd::DsmError),
    /// The control API socket could not be made.
    #[error("{0}")]
    Api(#[source] dvmm_api::ApiError),
    /// The node-to-node transport could not be set up.
    #[error("cluster: {0}")]
    Transport(#[source] dvmm_transport::TransportError),
    /// `--id` names no node of the cluster file.
    #[error("--id {id} is not a node of the cluster file: it lists {nodes} nodes, ids 0 to {}", nodes - 1)]
    NotInCluster {
        /// The id asked for.
        id: usize,
        /// Nodes in the cluster file (at least 1).
        nodes: usize,
    },
    /// A thread could not be started.
    #[error("cannot start a thread: {0}")]
    Thread(#[source] std::io::Error),
    /// The nodes could not agree on the VM they run.
    #[error("cluster: {0}")]
    Join(#[from] join::JoinError),
    /// This host's TSC may change rate or stop: guest time would drift between nodes.
    #[error("this host's TSC is not invariant (CPUID 0x80000007 EDX bit 8; /proc/cpuinfo shows no nonstop_tsc): the guest's clocks on this node would drift from the other nodes'; a cluster needs hosts with an invariant TSC")]
    NoInvariantTsc,
    /// `DVMM_TEST_CLOCK_SKEW` is malformed.
    #[error("DVMM_TEST_CLOCK_SKEW={0:?} is not a list of NODE:NANOSECONDS")]
    BadClockSkew(String),
    /// `DVMM_TIMER_PACING` is malformed.
    #[error("DVMM_TIMER_PACING={0:?} is not a whole number (0 turns timer pacing off)")]
    BadTimerPacing(String),
}

/// The timer pacing factor `DVMM_TIMER_PACING` asks for (`None`: unset, the host's
/// default; see `dvmm_vmm::vm::VmConfig::timer_pacing`).
pub fn timer_pacing_from_env() -> Result<Option<u32>, NodeError> {
    match std::env::var("DVMM_TIMER_PACING") {
        Ok(v) => v
            .trim()
            .parse()
            .map(Some)
            .map_err(|_| NodeError::BadTimerPacing(v)),
        Err(_) => Ok(None),
    }
}

/// KVM's shadow page tables as the DSM engine's derived state: dropped whenever a page
/// table leaves this node.
struct Shadows(ShadowPageTables);

impl dvmm_dsm_uffd::LocalDerived for Shadows {
    fn derives_from(&self, _page: dvmm_dsm_uffd::PageNo, contents: &[u8]) -> bool {
        self.0.derives_from(contents)
    }
    fn quiesce(&self, defer_kick: &mut dyn FnMut(i32) -> bool) {
        self.0.quiesce(defer_kick)
    }
    fn quiesced(&self) -> bool {
        self.0.quiesced()
    }
    fn blocked_in_faults(&self, waiting: &dyn Fn(i32) -> bool) -> bool {
        self.0.blocked_in_faults(waiting)
    }
    fn resume(&self) {
        self.0.resume()
    }
    fn drop_derived(&self) -> bool {
        self.0.drop_derived()
    }
}

/// How long a node waits for all peers to connect at start-up (the environment
/// variable `DVMM_CONNECT_TIMEOUT_SECS` overrides it).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// A vCPU waiting this long for a forwarded device access says so (and again after each
/// further period) ...
const IO_NOTE_AFTER: Duration = Duration::from_secs(5);
/// ... and the VM fails after this long (the peer is alive, or heartbeats would have
/// ended the VM, but does not answer: a bug, not a reason to hang).
const IO_GIVE_UP: Duration = Duration::from_secs(60);
/// How long the nodes wait for each other to finish building their VMs.
const READY_TIMEOUT: Duration = Duration::from_secs(120);

/// A node's outgoing side: what vCPU threads and devices use to reach other nodes.
pub struct NodeLink {
    transport: Transport,
    id: u16,
    /// Node of each APIC id.
    owner: Vec<u16>,
    pending_io: Mutex<HashMap<u64, SyncSender<[u8; 8]>>>,
    next_io: AtomicU64,
    control: Arc<VmControl>,
    /// Interrupt messages sent to each node (for the metrics).
    irqs_sent: Vec<AtomicU64>,
}

impl NodeLink {
    fn send(&self, to: u16, msg: &ControlMsg) {
        if let Err(e) = self.transport.send(to, KIND_CONTROL, &msg.encode()) {
            tracing::debug!(to, error = %e, "control message not sent");
        }
    }

    fn broadcast(&self, msg: &ControlMsg) {
        for n in 0..self.transport.nodes() {
            if n != self.id {
                self.send(n, msg);
            }
        }
    }

    fn stopping(&self) -> bool {
        self.control.stopping()
    }

    /// Sends DSM traffic (used by the DSM engine's network adapter).
    pub fn send_dsm(&self, to: u16, parts: &[&[u8]]) {
        if let Err(e) = self.transport.send_parts(to, KIND_DSM, parts) {
            tracing::debug!(to, error = %e, "DSM message not sent");
        }
    }
}

impl RemoteInterrupts for NodeLink {
    fn send_irq(&self, apic_id: u32, msg: &InterruptMessage) {
        if let Some(&node) = self.owner.get(apic_id as usize) {
            if let Some(n) = self.irqs_sent.get(usize::from(node)) {
                n.fetch_add(1, Ordering::Relaxed);
            }
            self.send(node, &ControlMsg::Irq { apic_id, msg: *msg });
        }
    }

    fn level_eoi(&self, vector: u8) {
        self.send(0, &ControlMsg::LevelEoi { vector });
    }

    fn publish_view(&self, view: &ApicView) {
        self.broadcast(&ControlMsg::ApicView(*view));
    }
}

impl RemoteIo for NodeLink {
    fn io(&self, node: usize, space: IoSpace, addr: u64, data: &mut [u8], write: bool) {
        let node = u16::try_from(node).unwrap_or(u16::MAX);
        let len = data.len().min(8);
        let id = self.next_io.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::sync_channel(1);
        self.pending_io.locked().insert(id, tx);
        let mut out = [0u8; 8];
        if write {
            out[..len].copy_from_slice(&data[..len]);
        }
        self.send(
            node,
            &ControlMsg::IoRequest {
                id,
                space,
                addr,
                len: len as u8,
                write,
                data: out,
            },
        );
        let start = Instant::now();
        let mut next_note = IO_NOTE_AFTER;
        loop {
            match rx.recv_timeout(Duration::from_millis(100)) {
                Ok(reply) => {
                    if !write {
                        data[..len].copy_from_slice(&reply[..len]);
                    }
                    return;
                }
                Err(mpsc::RecvTimeoutError::Timeout) if !self.stopping() => {
                    let waited = start.elapsed();
                    let what = format!(
                        "node {node} to answer a {} {} of {addr:#x}",
                        match space {
                            IoSpace::Pio => "port",
                            IoSpace::Mmio => "MMIO",
                        },
                        if write { "write" } else { "read" }
                    );
                    if waited >= IO_GIVE_UP {
                        self.control.finish(VmOutcome::Failed(format!(
                            "a vCPU waited {} s for {what}; giving up",
                            waited.as_secs()
                        )));
                    } else if waited >= next_note {
                        tracing::warn!("a vCPU has waited {} s for {what}", waited.as_secs());
                        next_note += IO_NOTE_AFTER;
                    }
                    continue;
                }
                Err(_) => {
                    self.pending_io.locked().remove(&id);
                    data.fill(0xff);
                    return;
                }
            }
        }
    }
}

/// The DSM engine's way out: DSM messages over the node transport.
struct DsmNet(Arc<NodeLink>);

impl PageNet for DsmNet {
    fn send(&self, to: u16, msg: &DsmMsg, data: Option<&[u8]>) {
        self.send_batch(to, &[(*msg, data)]);
    }

    /// Packs consecutive messages to one node into as few frames as the transport's
    /// payload limit allows (the layout is `dvmm_dsm`'s).
    fn send_batch(&self, to: u16, msgs: &[(DsmMsg, Option<&[u8]>)]) {
        dvmm_dsm::pack_frames(msgs, dvmm_transport::MAX_PAYLOAD, |parts| {
            self.0.send_dsm(to, parts);
        });
    }
}

/// The VMM's guest-memory accesses on a cluster node: through the DSM, page by page.
struct DsmAccess {
    dsm: Arc<DsmEngine>,
    memory: u64,
}

impl DsmAccess {
    fn with<T>(
        &self,
        gpa: u64,
        len: usize,
        access: dvmm_dsm::Access,
        f: impl FnOnce(&dvmm_dsm_uffd::PinGuard<'_>, u64) -> Result<T, dvmm_dsm_uffd::DsmError>,
    ) -> Result<T, GuestAccessError> {
        let offset = dvmm_layout::gpa_to_ram_offset(gpa, self.memory)
            .ok_or(GuestAccessError::NotRam { gpa, len })?;
        let failed = |e: dvmm_dsm_uffd::DsmError| GuestAccessError::Failed {
            gpa,
            source: Box::new(e),
        };
        let guard = self
            .dsm
            .access(offset, len as u64, access)
            .map_err(failed)?;
        f(&guard, offset).map_err(failed)
    }
}

impl dvmm_vmm::guest_access::GuestAccess for DsmAccess {
    fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), GuestAccessError> {
        self.with(gpa, buf.len(), dvmm_dsm::Access::Read, |g, off| {
            g.read(off, buf)
        })
    }

    fn write(&self, gpa: u64, buf: &[u8]) -> Result<(), GuestAccessError> {
        self.with(gpa, buf.len(), dvmm_dsm::Access::Write, |g, off| {
            g.write(off, buf)
        })
    }
}

/// Home node of each page: node `i` is home of its contiguous block of RAM offsets.
fn home_table(shares: &[(u32, u64)]) -> Vec<(u64, u16)> {
    let mut end = 0;
    shares
        .iter()
        .enumerate()
        .map(|(i, (_, mem))| {
            end += mem / PAGE_SIZE;
            (end, i as u16)
        })
        .collect()
}

/// How a VM ended, in a few words (for reports).
pub fn describe_outcome(outcome: &VmOutcome) -> String {
    match outcome {
        VmOutcome::PowerOff => "power off".into(),
        VmOutcome::Reset(r) => format!("reset ({r})"),
        VmOutcome::Panic(l) if l.is_empty() => "guest panic".into(),
        VmOutcome::Panic(l) => format!("guest panic: {l}"),
        VmOutcome::DebugExit(v) => format!("debug exit {v}"),
        VmOutcome::Stopped => "stopped from outside".into(),
        VmOutcome::Failed(r) => format!("failed: {r}"),
    }
}

/// Writes a run report; a failure is logged (the run's outcome stands).
pub fn write_report(
    path: &std::path::Path,
    parts: &[report::NodeReport],
    symbols: Option<&std::path::Path>,
) {
    let table = match symbols
        .map(dvmm_vmm::profile::SymbolTable::load)
        .transpose()
    {
        Ok(t) => t,
        Err(e) => {
            tracing::warn!(error = %e, "the report names no symbols");
            None
        }
    };
    if let Err(e) = report::write(path, parts, table.as_ref()) {
        tracing::error!(error = %e, "no run report");
    }
}

/// Turns an outcome into the message that tells the other nodes.
fn stop_msg(outcome: &VmOutcome) -> ControlMsg {
    let (code, reason) = match outcome {
        VmOutcome::PowerOff => (StopCode::PowerOff, String::new()),
        VmOutcome::Reset(r) => (StopCode::Reset, r.clone()),
        VmOutcome::Panic(line) => (StopCode::Panic, line.clone()),
        VmOutcome::DebugExit(v) => (StopCode::DebugExit, v.to_string()),
        VmOutcome::Stopped => (StopCode::Stopped, String::new()),
        VmOutcome::Failed(r) => (StopCode::Failed, r.clone()),
    };
    ControlMsg::Stop { code, reason }
}

fn outcome_of(from: u16, code: StopCode, reason: String) -> VmOutcome {
    match code {
        StopCode::PowerOff => VmOutcome::PowerOff,
        StopCode::Reset => VmOutcome::Reset(reason),
        StopCode::Panic => VmOutcome::Panic(reason),
        StopCode::DebugExit => match reason.parse() {
            Ok(v) => VmOutcome::DebugExit(v),
            Err(_) => VmOutcome::Failed(format!(
                "node {from} reported a debug exit with the unreadable value {reason:?}"
            )),
        },
        StopCode::Stopped => VmOutcome::Stopped,
        StopCode::Failed => VmOutcome::Failed(format!("node {from}: {reason}")),
    }
}

/// Where a node serves its control API and metrics and writes its run report (none of
/// them by default).
#[derive(Clone, Debug, Default)]
pub struct Outputs {
    /// The control API's Unix socket (`--api-socket`).
    pub api_socket: Option<std::path::PathBuf>,
    /// The Prometheus metrics address (`--metrics-addr`).
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// The run report (`--report`): text here, JSON beside it.
    pub report: Option<std::path::PathBuf>,
    /// The guest's symbols, to name pages in the report.
    pub symbols: Option<std::path::PathBuf>,
}

/// State the dispatcher thread needs.
struct Dispatch {
    link: Arc<NodeLink>,
    dsm: Arc<DsmEngine>,
    vm_hub: Arc<dvmm_vmm::irqchip::InterruptHub>,
    control: Arc<VmControl>,
    /// To node-io, which serves forwarded device accesses.
    io_requests: mpsc::Sender<ForwardedIo>,
    /// Pauses asked by peers, and answers to this node's.
    pauses: Arc<api::Pauses>,
    ready: Mutex<usize>,
    ready_cond: std::sync::Condvar,
}

impl Dispatch {
    /// Handles `early` (received before the dispatcher started), then `events`.
    fn run(&self, early: Vec<Event>, events: Receiver<Event>) {
        for ev in early.into_iter().chain(events) {
            match ev {
                Event::Message {
                    from,
                    kind: KIND_CONTROL,
                    payload,
                } => match ControlMsg::decode(&payload) {
                    Ok(msg) => self.control_msg(from, msg),
                    Err(e) => tracing::warn!(from, error = %e, "malformed control message dropped"),
                },
                Event::Message {
                    from,
                    kind: KIND_DSM,
                    payload,
                } => self.dsm_msg(from, &payload),
                Event::Message { from, kind, .. } => {
                    tracing::warn!(from, kind, "message of unknown kind dropped");
                }
                Event::PeerLost { node, reason } => {
                    if !self.control.stopping() {
                        tracing::error!(node, %reason, "lost a node");
                    }
                    self.control
                        .finish(VmOutcome::Failed(format!("lost node {node}: {reason}")));
                }
            }
        }
    }

    fn dsm_msg(&self, from: u16, payload: &[u8]) {
        // One or more DSM messages, each a header and, if it carries data, its page;
        // the engine validates and counts malformed ones.
        self.dsm.receive_frame(from, payload);
    }

    fn control_msg(&self, from: u16, msg: ControlMsg) {
        match msg {
            ControlMsg::Ready => {
                let mut r = self.ready.locked();
                *r += 1;
                self.ready_cond.notify_all();
            }
            ControlMsg::Irq { apic_id, msg } => self.vm_hub.deliver_local(apic_id, &msg),
            ControlMsg::LevelEoi { vector } => self.vm_hub.level_eoi(vector),
            ControlMsg::ApicView(view) => self.vm_hub.update_remote_view(view),
            ControlMsg::IoRequest {
                id,
                space,
                addr,
                len,
                write,
                data,
            } => {
                // Served on node-io: serving one may wait for another node's reply
                // (node 0's stand-in for a function another node serves), which
                // arrives here.
                let _ = self.io_requests.send(ForwardedIo {
                    from,
                    id,
                    space,
                    addr,
                    len: usize::from(len).min(data.len()),
                    write,
                    data,
                });
            }
            ControlMsg::IoReply { id, data } => {
                let waiter = self.link.pending_io.locked().remove(&id);
                if let Some(tx) = waiter {
                    let _ = tx.send(data);
                }
            }
            ControlMsg::Stop { code, reason } => {
                self.control.finish(outcome_of(from, code, reason));
            }
            ControlMsg::Pause {
                seq,
                pause,
                clock_shift_ns,
            } => self
                .pauses
                .on_request(from, seq, pause, Duration::from_nanos(clock_shift_ns)),
            ControlMsg::Paused { seq, error } => self.pauses.on_answer(from, seq, error),
            ControlMsg::CpuOffer(_)
            | ControlMsg::CpuAgreed(_)
            | ControlMsg::ClockProbe { .. }
            | ControlMsg::ClockEcho { .. }
            | ControlMsg::ClockSet { .. } => {
                tracing::warn!(
                    from,
                    "a join message (CPU or clock) after the join was ignored"
                );
            }
        }
    }

    /// Waits until `n` Ready messages arrived (or the VM stopped). True if all arrived.
    fn wait_ready(&self, n: usize) -> bool {
        let started = Instant::now();
        let deadline = started + READY_TIMEOUT;
        let mut next_note = started + Duration::from_secs(5);
        let mut r = self.ready.locked();
        while *r < n && !self.control.stopping() {
            let now = Instant::now();
            let left = deadline.saturating_duration_since(now);
            if left.is_zero() {
                return false;
            }
            if now >= next_note {
                tracing::info!(
                    "waiting for {} of {n} other node(s) to build their VM ({} s of {} s)",
                    n - *r,
                    now.duration_since(started).as_secs(),
                    READY_TIMEOUT.as_secs()
                );
                next_note += Duration::from_secs(5);
            }
            r = self
                .ready_cond
                .wait_timeout_locked(r, left.min(Duration::from_millis(200)))
                .0;
        }
        *r >= n
    }
}

/// A device access another node forwarded here, waiting for node-io.
struct ForwardedIo {
    from: u16,
    id: u64,
    space: IoSpace,
    addr: u64,
    len: usize,
    write: bool,
    data: [u8; 8],
}

/// Serves the device accesses other nodes forward here, in order, until the
/// dispatcher ends.
fn serve_io(devices: &DeviceSpace, link: &NodeLink, queue: Receiver<ForwardedIo>) {
    for mut io in queue {
        devices.local(io.space, io.addr, &mut io.data[..io.len], io.write);
        let mut reply = [0u8; 8];
        if !io.write {
            reply[..io.len].copy_from_slice(&io.data[..io.len]);
        }
        link.send(
            io.from,
            &ControlMsg::IoReply {
                id: io.id,
                data: reply,
            },
        );
    }
}

/// The network cards, in the guest's order, each with its MAC (resolved by the card's
/// index in the whole list, so every node agrees on them) and the node serving it.
pub fn nets_config(nets: &[dvmm_cluster::NetSpec]) -> Vec<dvmm_vmm::vm::NetConfig> {
    nets.iter()
        .enumerate()
        .map(|(i, n)| dvmm_vmm::vm::NetConfig {
            tap: n.tap.clone(),
            mac: n.mac_for(i),
            node: n.node,
        })
        .collect()
}

/// The disks, in the guest's order, each with the node serving it.
pub fn disks_config(disks: &[dvmm_cluster::DiskSpec]) -> Vec<dvmm_vmm::vm::DiskConfig> {
    disks
        .iter()
        .map(|d| dvmm_vmm::vm::DiskConfig {
            path: d.path.clone(),
            readonly: d.readonly,
            node: d.node,
        })
        .collect()
}

/// The virtio-console backend a cluster file or command line asks for.
pub fn console_backend(c: &dvmm_cluster::ConsoleSpec) -> dvmm_virtio::console::ConsoleBackend {
    match c {
        dvmm_cluster::ConsoleSpec::File(p) => dvmm_virtio::console::ConsoleBackend::File(p.clone()),
        dvmm_cluster::ConsoleSpec::Socket(p) => {
            dvmm_virtio::console::ConsoleBackend::Socket(p.clone())
        }
    }
}

/// Node `id`'s skew in a `NODE:NS[,NODE:NS...]` list (0 if it is not listed); `None`
/// if the list is malformed.
fn clock_skew_for(list: &str, id: usize) -> Option<i64> {
    let mut skew = 0;
    for item in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let (node, ns) = item.split_once(':')?;
        let ns: i64 = ns.trim().parse().ok()?;
        if node.trim().parse::<usize>().ok()? == id {
            skew = ns;
        }
    }
    Some(skew)
}

fn check_readable(path: &std::path::Path) -> std::io::Result<()> {
    use std::io::Read;
    let mut byte = [0u8; 1];
    std::fs::File::open(path)?.read(&mut byte).map(|_| ())
}

/// Runs node `id` of `cluster` until the VM ends; returns the outcome.
pub fn run_node(
    cluster: &ClusterConfig,
    id: usize,
    profile: Option<dvmm_vmm::profile::ProfileConfig>,
    console_out: Box<dyn std::io::Write + Send>,
    endpoints: &Outputs,
    on_console: impl FnOnce(Option<dvmm_vmm::ConsoleInput>, Arc<VmControl>),
) -> Result<VmOutcome, NodeError> {
    let nodes = cluster.nodes.len();
    if id >= nodes {
        return Err(NodeError::NotInCluster { id, nodes });
    }
    // A node that cannot read the guest would fail only after every peer connected
    // (up to the connect timeout later, with the others waiting on it): look first.
    check_readable(&cluster.guest.kernel).map_err(|source| dvmm_boot::BootError::KernelOpen {
        path: cluster.guest.kernel.clone(),
        source,
    })?;
    if let Some(p) = &cluster.guest.initramfs {
        check_readable(p).map_err(|source| dvmm_boot::BootError::InitramfsOpen {
            path: p.clone(),
            source,
        })?;
    }
    // The API socket and metrics port first: a path or port in use fails before any
    // peer waits for this node.
    let api_listener = endpoints
        .api_socket
        .as_deref()
        .map(dvmm_api::server::ApiListener::bind)
        .transpose()
        .map_err(NodeError::Api)?;
    let metrics_listener = endpoints
        .metrics_addr
        .map(dvmm_api::metrics::MetricsListener::bind)
        .transpose()
        .map_err(NodeError::Api)?;
    let mut tcfg = TransportConfig::new(
        id as u16,
        cluster.nodes.iter().map(|n| n.address).collect(),
        cluster.secret.as_bytes().to_vec(),
    );
    tcfg.encrypt = !cluster.insecure_transport;
    tcfg.connect_timeout = std::env::var("DVMM_CONNECT_TIMEOUT_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .map_or(CONNECT_TIMEOUT, Duration::from_secs);
    if cluster.insecure_transport {
        tracing::warn!("--insecure-transport: node traffic is authenticated but NOT encrypted");
    }
    if nodes > 1 && !clock_sync::invariant_tsc() {
        return Err(NodeError::NoInvariantTsc);
    }
    // Test hook: DVMM_TEST_CLOCK_SKEW=NODE:NS[,NODE:NS...] makes those nodes' host
    // clocks read as if they were NS ahead (hosts whose clocks differ, on one machine).
    let skew_ns = match std::env::var("DVMM_TEST_CLOCK_SKEW") {
        Ok(v) => clock_skew_for(&v, id).ok_or(NodeError::BadClockSkew(v))?,
        Err(_) => 0,
    };
    if skew_ns != 0 {
        tracing::warn!(
            skew_ns,
            "this host's clocks read skewed (DVMM_TEST_CLOCK_SKEW)"
        );
    }
    let tsc = Vm::host_tsc()?;
    if nodes > 1 && !tsc.offsets_apply {
        tracing::info!(
            "this host's KVM lets guest code read the host's TSC (TSC offsets do not apply): \
             the cluster runs only if this host's TSC agrees with node 0's"
        );
    }
    let host_clock = clock_sync::HostClock::new(tsc.khz, skew_ns, tsc.offsets_apply);
    let (transport, events) = Transport::start(tcfg).map_err(NodeError::Transport)?;
    tracing::info!(node = id, nodes, "connected to all peers");

    let mut owner = Vec::new();
    for (n, spec) in cluster.nodes.iter().enumerate() {
        owner.extend(std::iter::repeat_n(n as u16, spec.vcpus as usize));
    }
    let link = Arc::new(NodeLink {
        transport,
        id: id as u16,
        owner,
        pending_io: Mutex::new(HashMap::new()),
        next_io: AtomicU64::new(0),
        control: Arc::new(VmControl::new()),
        irqs_sent: (0..nodes).map(|_| AtomicU64::new(0)).collect(),
    });
    let hide = &cluster.nodes[id].hide_cpuid;
    if !hide.is_empty() {
        tracing::info!(
            "hiding CPU features from the guest, as the cluster file asks: {}",
            hide.names().join(", ")
        );
    }
    let offer = Vm::offered_cpu(hide)?;
    let deadline = Instant::now() + READY_TIMEOUT;
    let send = |to, msg: &ControlMsg| link.send(to, msg);
    let joined = join::agree_cpu(id as u16, nodes, offer, &send, &events, deadline).and_then(
        |mut joined| {
            let clock = join::agree_clock(
                id as u16,
                nodes,
                &host_clock,
                &send,
                &events,
                deadline,
                &mut joined.early,
            )?;
            Ok((joined, clock))
        },
    );
    let (joined, clock) = match joined {
        Ok(j) => j,
        Err(e) => {
            // The join told the others why; let that leave before the link closes.
            std::thread::sleep(Duration::from_millis(50));
            return Err(e.into());
        }
    };
    let placement = Placement {
        node: id,
        shares: cluster.nodes.iter().map(|n| (n.vcpus, n.memory)).collect(),
        remote_irq: link.clone(),
        remote_io: link.clone(),
        control: link.control.clone(),
    };
    let cfg = VmConfig {
        kernel: cluster.guest.kernel.clone(),
        initramfs: cluster.guest.initramfs.clone(),
        cmdline: cluster.guest.cmdline.clone(),
        vcpus: cluster.vcpus(),
        memory: cluster.memory(),
        profile,
        // Every node gets the whole list: it opens those it serves and numbers the
        // others' PCI functions alike.
        disks: disks_config(&cluster.disks),
        nets: nets_config(&cluster.nets),
        // Node-wide devices live with the other devices, on node 0.
        rng: cluster.rng && id == 0,
        console: cluster
            .console
            .as_ref()
            .filter(|_| id == 0)
            .map(console_backend),
        test_devices: cluster.test_devices,
        hide_cpu: *hide,
        cpu: Some(joined.cpu),
        clock,
        timer_pacing: timer_pacing_from_env()?,
    };
    let shares = placement.shares.clone();
    let vm = Vm::build_node(&cfg, placement, console_out)?;
    let control = vm.control();

    // Guest RAM becomes shared: every node loaded the same image, so the pages the
    // loader wrote start as read-only copies everywhere; all others are zero pages.
    let ram = vm.ram();
    let (view_a, view_b) = ram.views();
    // SAFETY: both views map the whole memfd and live as long as `ram`, which this
    // function keeps until after the engine is stopped.
    let pages = unsafe { GuestPages::new(view_a, view_b, ram.size()) }.map_err(NodeError::Dsm)?;
    let homes = home_table(&shares);
    let dsm_node = DsmNode::new(id as u16, nodes as u16, move |page| {
        homes
            .iter()
            .find(|(end, _)| page < *end)
            .map_or(0, |(_, n)| *n)
    });
    let shared = ram.populated_pages();
    tracing::info!(node = id, shared = shared.len(), "starting the DSM");
    let shadow = vm.shadow_page_tables()?.map(|s| Arc::new(Shadows(s)));
    if shadow.is_some() {
        tracing::info!(
            "this host's KVM shadows the guest's page tables: they are dropped whenever a \
             page table is taken away from this node"
        );
    }
    let dsm = DsmEngine::start_with(
        dsm_node,
        pages,
        Arc::new(DsmNet(link.clone())),
        &shared,
        shadow
            .clone()
            .map(|s| s as Arc<dyn dvmm_dsm_uffd::LocalDerived>),
    )
    .map_err(NodeError::Dsm)?;
    // DSM frames are served on the connection's reader thread: a fault's request and
    // its reply each skip a hop through node-rx. (The engine sends replies but never
    // waits for a message.)
    if std::env::var("DVMM_DSM_RX_INLINE").as_deref() != Ok("0") {
        let weak = Arc::downgrade(&dsm);
        // The only inline kind, set once per transport.
        let _ = link.transport.deliver_inline(
            KIND_DSM,
            Arc::new(move |from, payload| {
                if let Some(d) = weak.upgrade() {
                    d.receive_frame(from, payload);
                }
            }),
        );
    }
    // A vCPU kicked while it waits in a DSM fault is signalled once the fault is served
    // (see DsmEngine::defer_kick).
    dsm.set_kick_thread(Box::new(vm.signal_kick_fn()));
    let weak = Arc::downgrade(&dsm);
    vm.defer_kicks(Arc::new(move |tid| {
        weak.upgrade().is_some_and(|d| d.defer_kick(tid))
    }));
    // Diagnostics: DVMM_DSM_READAHEAD=N caps read-ahead (0: off); DVMM_DSM_HOLD_US=N
    // makes every hold N us long.
    if let Some(n) = std::env::var("DVMM_DSM_READAHEAD")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        tracing::info!(pages = n, "DSM read-ahead capped (DVMM_DSM_READAHEAD)");
        dsm.set_readahead(n);
    }
    if let Some(us) = std::env::var("DVMM_DSM_HOLD_US")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        tracing::info!(us, "fixed DSM holds (DVMM_DSM_HOLD_US)");
        dsm.set_fixed_hold(Some(Duration::from_micros(us)));
    }
    let vm = vm.share(Arc::new(DsmAccess {
        dsm: dsm.clone(),
        memory: ram.size(),
    }))?;
    let (io_requests, io_queue) = mpsc::channel();
    {
        let devices = vm.devices();
        let link = link.clone();
        std::thread::Builder::new()
            .name("node-io".into())
            .spawn(move || serve_io(&devices, &link, io_queue))
            .map_err(NodeError::Thread)?;
    }
    let pauses = Arc::new(api::Pauses::new(vm.live(), Some(link.clone())));
    let dispatch = Arc::new(Dispatch {
        link: link.clone(),
        dsm: dsm.clone(),
        vm_hub: vm.hub(),
        control: control.clone(),
        io_requests,
        pauses: pauses.clone(),
        ready: Mutex::new(0),
        ready_cond: std::sync::Condvar::new(),
    });
    {
        let d = dispatch.clone();
        std::thread::Builder::new()
            .name("node-rx".into())
            .spawn(move || d.run(joined.early, events))
            .map_err(NodeError::Thread)?;
    }
    let view = Arc::new(view::NodeView::new(
        id as u32,
        nodes as u32,
        &cfg,
        &vm,
        Some((dsm.clone(), link.clone())),
    ));
    let _api = api_listener
        .map(|l| {
            l.serve(Arc::new(api::NodeApi {
                pauses,
                view: view.clone(),
            }))
        })
        .transpose()
        .map_err(NodeError::Api)?;
    let _metrics = metrics_listener
        .map(|l| api::serve_metrics(l, view.clone()))
        .transpose()
        .map_err(NodeError::Api)?;
    on_console(vm.console_input(), control.clone());
    {
        // Once the VM is ending, stop the DSM first: vCPUs blocked on a page that a lost
        // node held are released (unregistering the range wakes them), so they can stop.
        let dsm = dsm.clone();
        let control = control.clone();
        std::thread::Builder::new()
            .name("dsm-stop".into())
            .spawn(move || {
                control.wait();
                dsm.stop();
            })
            .map_err(NodeError::Thread)?;
    }

    if id == 0 {
        if !dispatch.wait_ready(nodes - 1) {
            control.finish(VmOutcome::Failed(
                "not every node finished building its VM in time".into(),
            ));
        }
    } else {
        link.send(0, &ControlMsg::Ready);
    }
    let started = Instant::now();
    let outcome = vm.run()?;
    link.broadcast(&stop_msg(&outcome));
    if let Some(path) = &endpoints.report {
        let part = view.report(started.elapsed(), &outcome);
        write_report(path, &[part], endpoints.symbols.as_deref());
    }
    let stats = dsm.stats();
    tracing::info!(node = id, ?stats, "DSM statistics");
    let hot: Vec<String> = dsm
        .hot_pages(8)
        .into_iter()
        .map(|(page, r, w)| {
            let gpa = dvmm_layout::ram_offset_to_gpa(page * PAGE_SIZE);
            format!("{gpa:#x}: {r} read + {w} write faults")
        })
        .collect();
    if !hot.is_empty() {
        tracing::info!(node = id, "hottest pages: {}", hot.join("; "));
    }
    dsm.stop();
    drop(ram);
    // Give the stop message a moment to leave before the connections close.
    std::thread::sleep(Duration::from_millis(50));
    Ok(outcome)
}

#[cfg(test)]
mod tests {
    use super::clock_skew_for;

    #[test]
    fn a_clock_skew_list_names_nodes() {
        assert_eq!(clock_skew_for("1:1000000000", 1), Some(1_000_000_000));
        assert_eq!(clock_skew_for("1:1000000000", 0), Some(0));
        assert_eq!(clock_skew_for("0:-5, 2:7", 2), Some(7));
        assert_eq!(clock_skew_for("", 0), Some(0));
        assert_eq!(clock_skew_for("1=5", 1), None);
        assert_eq!(clock_skew_for("x:5", 0), None);
    }
}
