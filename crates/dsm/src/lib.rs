//! The coherence protocol of dvmm's distributed shared memory, as a pure state machine.
//!
//! Pages are 4 KiB; single writer / multiple readers; write-invalidate; sequential
//! consistency. Every page has a fixed *home* node that keeps its directory entry
//! (owner, copyset, "ever written") and serializes all requests for the page. The home
//! is a node like any other: its own faults go through the same code, as messages it
//! sends to itself (delivered synchronously inside [`Node`], never as [`Action::Send`]).
//!
//! Nothing here does I/O, spawns threads or reads clocks. [`Node::fault`] and
//! [`Node::receive`] return the side effects the node's I/O layer must perform, in
//! order ([`Action`]). Rules for that layer:
//!
//! * Before calling [`Node::receive`] with a message whose [`Msg::has_data`] is true,
//!   store the 4 KiB payload in our buffer for the page (view B). The protocol only
//!   ever delivers data for pages that are unmapped for the vCPUs at that moment.
//! * When executing [`Action::Send`] with [`Msg::has_data`], attach the current bytes
//!   of our buffer for the page. Actions are ordered so the bytes are stable then
//!   (a `Downgrade`/`Invalidate` of our own mapping comes first).
//! * [`Action::Invalidate`] drops the vCPU mapping but must keep the bytes in our
//!   buffer (true for `MADV_DONTNEED` on a shared memfd mapping): the home forwards
//!   data from its buffer while its own mapping is invalid.
//! * A grant with `zero` set carries no payload: the page was never written anywhere,
//!   so every node's buffer for it still holds zeroes.
//!
//! See `docs/PROTOCOL.md` for the transition table and the races, and [`model`] for
//! the exhaustive model check.

#![forbid(unsafe_code)]

pub mod model;
mod wire;

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fmt;
use std::hash::{Hash, Hasher};
use std::sync::Arc;

pub use wire::{
    pack_frames, parse_frame, DecodeError, FrameError, FrameMessages, PAGE_BYTES, WIRE_MSG_LEN,
};

/// Index of a dvmm node in the cluster, `0..nodes`.
pub type NodeId = u16;
/// Guest-physical page number (guest-physical address / 4096).
pub type PageNo = u64;

/// Kind of access that missed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Access {
    /// A load (or instruction fetch).
    Read,
    /// A store.
    Write,
}

/// Wire-level messages between nodes. Plain data: page bytes are never inside; when
/// [`Msg::has_data`] is true the transport appends the page's 4 KiB.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Msg {
    /// Requester -> home: I want a read-only copy.
    ReadReq {
        /// Page.
        page: PageNo,
    },
    /// Requester -> home: I want the only writable copy. `has_copy` tells whether the
    /// requester held a read-only copy when asking (informational; the home decides from
    /// its directory).
    WriteReq {
        /// Page.
        page: PageNo,
        /// Requester held a read-only copy when it asked.
        has_copy: bool,
    },
    /// Home -> requester: here is a read-only copy; carries data unless `zero`.
    ReadGrant {
        /// Page.
        page: PageNo,
        /// The page was never written: no payload, contents are zero.
        zero: bool,
    },
    /// Home -> requester: you are the owner. `has_data`: payload follows; `zero`: the
    /// page was never written (no payload); neither: keep the read-only copy you have.
    WriteGrant {
        /// Page.
        page: PageNo,
        /// A 4 KiB payload follows.
        has_data: bool,
        /// The page was never written; contents are zero.
        zero: bool,
    },
    /// Home -> copy holder: drop your read-only copy and acknowledge.
    Invalidate {
        /// Page.
        page: PageNo,
    },
    /// Copy holder -> home: copy dropped.
    InvalidateAck {
        /// Page.
        page: PageNo,
    },
    /// Home -> owner: downgrade to read-only and send me the data.
    Fetch {
        /// Page.
        page: PageNo,
    },
    /// Owner -> home: downgraded; the data follows.
    FetchReply {
        /// Page.
        page: PageNo,
    },
    /// Home -> owner: drop your writable copy and send me the data.
    Revoke {
        /// Page.
        page: PageNo,
    },
    /// Owner -> home: dropped; the data follows.
    RevokeAck {
        /// Page.
        page: PageNo,
    },
}

impl Msg {
    /// The page the message is about.
    pub fn page(&self) -> PageNo {
        match *self {
            Msg::ReadReq { page }
            | Msg::WriteReq { page, .. }
            | Msg::ReadGrant { page, .. }
            | Msg::WriteGrant { page, .. }
            | Msg::Invalidate { page }
            | Msg::InvalidateAck { page }
            | Msg::Fetch { page }
            | Msg::FetchReply { page }
            | Msg::Revoke { page }
            | Msg::RevokeAck { page } => page,
        }
    }

    /// Whether the page's 4 KiB travel right after this header.
    pub fn has_data(&self) -> bool {
        match *self {
            Msg::ReadGrant { zero, .. } => !zero,
            Msg::WriteGrant { has_data, .. } => has_data,
            Msg::FetchReply { .. } | Msg::RevokeAck { .. } => true,
            _ => false,
        }
    }
}

/// A side effect the node's I/O layer must perform. Perform them in the order given.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Action {
    /// Send `msg` to node `to` (never ourselves), with the page payload if
    /// [`Msg::has_data`].
    Send {
        /// Destination node.
        to: NodeId,
        /// The message.
        msg: Msg,
    },
    /// Map our copy read-only for the vCPUs (its data is already in our buffer).
    InstallReadOnly {
        /// Page.
        page: PageNo,
    },
    /// Map our copy writable for the vCPUs (its data is already in our buffer).
    InstallWritable {
        /// Page.
        page: PageNo,
    },
    /// Write-protect our mapping (it stays readable).
    Downgrade {
        /// Page.
        page: PageNo,
    },
    /// Drop our mapping; the buffer's bytes must survive (see crate docs).
    Invalidate {
        /// Page.
        page: PageNo,
    },
    /// vCPU threads blocked on this page may retry their access.
    WakeFaulters {
        /// Page.
        page: PageNo,
    },
}

/// A page's state at one node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum PageState {
    /// No copy mapped.
    #[default]
    Invalid,
    /// A read-only copy is mapped.
    ReadOnly,
    /// The only copy in the cluster that may be written, mapped writable.
    Writable,
    /// No copy; a read request is outstanding.
    ReadPending,
    /// A write request is outstanding. `has_copy`: our read-only copy is still mapped
    /// (an upgrade in progress); it is cleared if an invalidation overtakes the grant.
    WritePending {
        /// A read-only copy is still mapped.
        has_copy: bool,
    },
}

impl PageState {
    /// Whether vCPUs can read the page in this state.
    pub fn readable(self) -> bool {
        matches!(
            self,
            PageState::ReadOnly | PageState::Writable | PageState::WritePending { has_copy: true }
        )
    }

    /// Whether a request for the page is outstanding.
    pub fn pending(self) -> bool {
        matches!(
            self,
            PageState::ReadPending | PageState::WritePending { .. }
        )
    }
}

/// A message that does not fit the state it arrived in. The message is ignored; a
/// correct cluster never produces these (the model check asserts it), so seeing one
/// means a peer is broken or the transport lost/reordered messages.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    /// A request or reply for a page we are not home of.
    #[error("node {from} sent {msg:?} to a node that is not the page's home; cluster configuration differs between nodes?")]
    NotHome {
        /// Sender.
        from: NodeId,
        /// The message.
        msg: Msg,
    },
    /// A home-only message from a node that is not the page's home.
    #[error("node {from} sent {msg:?} but is not the page's home; cluster configuration differs between nodes?")]
    NotFromHome {
        /// Sender.
        from: NodeId,
        /// The message.
        msg: Msg,
    },
    /// A message that does not fit our state for the page.
    #[error("unexpected {msg:?} from node {from} (local page state {state:?}); lost or reordered message?")]
    Unexpected {
        /// Sender.
        from: NodeId,
        /// The message.
        msg: Msg,
        /// Our page state when it arrived.
        state: PageState,
    },
    /// A sender id outside the cluster.
    #[error("message from unknown node {from} (cluster has {nodes} nodes)")]
    UnknownNode {
        /// Sender.
        from: NodeId,
        /// Cluster size.
        nodes: u16,
    },
}

/// Why [`Node::seed_shared`] refused a page.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SeedError {
    /// The page already has protocol state here: seeding is only for pages nobody touched yet.
    #[error("page {page} cannot be seeded as shared: it already has protocol state (seed before any fault or message)")]
    PageInUse {
        /// Page.
        page: PageNo,
    },
    /// A holder id outside the cluster.
    #[error("cannot seed page {page}: holder {node} is not in the cluster of {nodes} nodes")]
    UnknownNode {
        /// Page.
        page: PageNo,
        /// The bad holder.
        node: NodeId,
        /// Cluster size.
        nodes: u16,
    },
}

/// How many [`ProtocolError`]s a node keeps for [`Node::take_protocol_errors`].
pub const MAX_KEPT_ERRORS: usize = 64;

/// Read-only view of a directory entry, for tests and metrics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirectoryEntry {
    /// Some node has been granted write access at least once (so the page may be non-zero).
    pub written: bool,
    /// Node holding the only writable copy.
    pub owner: Option<NodeId>,
    /// Nodes holding read-only copies.
    pub copyset: Vec<NodeId>,
    /// A transaction is in flight.
    pub busy: bool,
    /// Requests queued behind it.
    pub queued: usize,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Txn {
    requester: NodeId,
    access: Access,
    awaiting_acks: BTreeSet<NodeId>,
    awaiting_owner: bool,
    requester_has_copy: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
struct DirEntry {
    written: bool,
    owner: Option<NodeId>,
    copyset: BTreeSet<NodeId>,
    txn: Option<Txn>,
    queue: VecDeque<(NodeId, Access)>,
}

impl DirEntry {
    fn is_default(&self) -> bool {
        *self == DirEntry::default()
    }
}

/// Deliberate protocol bugs, used to show that the model check can fail.
#[cfg(test)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mutant {
    /// The home grants write access without waiting for invalidation acks.
    SkipInvalidateAcks,
    /// The owner answers a fetch but keeps its mapping writable.
    NoDowngradeOnFetch,
    /// The home forgets that a page was written once it has no owner.
    ForgetWritten,
}

type HomeFn = Arc<dyn Fn(PageNo) -> NodeId + Send + Sync>;

/// One node's protocol state for all pages: the local state of every page it touched
/// and the directory entries of the pages it is home of.
#[derive(Clone)]
pub struct Node {
    id: NodeId,
    nodes: u16,
    home_of: HomeFn,
    pages: BTreeMap<PageNo, PageState>,
    dir: BTreeMap<PageNo, DirEntry>,
    error_count: u64,
    errors: Vec<ProtocolError>,
    #[cfg(test)]
    pub(crate) mutant: Option<Mutant>,
}

impl fmt::Debug for Node {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Node")
            .field("id", &self.id)
            .field("pages", &self.pages)
            .field("dir", &self.dir)
            .field("error_count", &self.error_count)
            .finish()
    }
}

/// Equality over the protocol state (ignores the `home_of` function and kept errors).
impl PartialEq for Node {
    fn eq(&self, other: &Self) -> bool {
        self.id == other.id
            && self.nodes == other.nodes
            && self.pages == other.pages
            && self.dir == other.dir
            && self.error_count == other.error_count
    }
}

impl Eq for Node {}

/// Hashes the same fields [`PartialEq`] compares.
impl Hash for Node {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.id.hash(state);
        self.nodes.hash(state);
        self.pages.hash(state);
        self.dir.hash(state);
        self.error_count.hash(state);
    }
}

/// Outputs of one call, plus messages to ourselves still to be handled.
#[derive(Default)]
struct Ctx {
    out: Vec<Action>,
    inbox: VecDeque<Msg>,
}

impl Node {
    /// A node `id` of a cluster of `nodes` nodes; `home_of(page)` names each page's home
    /// and must be the same function on every node.
    pub fn new(
        id: NodeId,
        nodes: u16,
        home_of: impl Fn(PageNo) -> NodeId + Send + Sync + 'static,
    ) -> Node {
        Node {
            id,
            nodes,
            home_of: Arc::new(home_of),
            pages: BTreeMap::new(),
            dir: BTreeMap::new(),
            error_count: 0,
            errors: Vec::new(),
            #[cfg(test)]
            mutant: None,
        }
    }

    /// This node's id.
    pub fn id(&self) -> NodeId {
        self.id
    }

    /// Number of nodes in the cluster.
    pub fn nodes(&self) -> u16 {
        self.nodes
    }

    /// Declares `page` as already held, with identical contents, by every node in
    /// `holders` (e.g. written by a deterministic boot loader on every node before the
    /// cluster started). Every node must make the same call before any fault or message
    /// for the page. Locally the page becomes [`PageState::ReadOnly`] if we are a holder;
    /// at the home the directory records `written` and the copyset `holders`, so the first
    /// write invalidates the other holders and needs no data transfer if the writer holds
    /// a copy. Nothing is sent; the I/O layer maps the page read-only when it likes.
    pub fn seed_shared(&mut self, page: PageNo, holders: &[NodeId]) -> Result<(), SeedError> {
        if let Some(&node) = holders.iter().find(|&&n| n >= self.nodes) {
            return Err(SeedError::UnknownNode {
                page,
                node,
                nodes: self.nodes,
            });
        }
        let is_home = self.home(page) == self.id;
        if self.pages.contains_key(&page) || (is_home && self.dir.contains_key(&page)) {
            return Err(SeedError::PageInUse { page });
        }
        if holders.contains(&self.id) {
            self.set_state(page, PageState::ReadOnly);
        }
        if is_home {
            let e = DirEntry {
                written: true,
                copyset: holders.iter().copied().collect(),
                ..DirEntry::default()
            };
            self.put_dir(page, e);
        }
        Ok(())
    }

    /// The home node of `page`.
    pub fn home(&self, page: PageNo) -> NodeId {
        (self.home_of)(page)
    }

    /// Our state of `page`.
    pub fn state(&self, page: PageNo) -> PageState {
        self.pages.get(&page).copied().unwrap_or_default()
    }

    /// The directory entry of `page`, if we are its home.
    pub fn directory(&self, page: PageNo) -> Option<DirectoryEntry> {
        if self.home(page) != self.id {
            return None;
        }
        let e = self.dir.get(&page).cloned().unwrap_or_default();
        Some(DirectoryEntry {
            written: e.written,
            owner: e.owner,
            copyset: e.copyset.iter().copied().collect(),
            busy: e.txn.is_some(),
            queued: e.queue.len(),
        })
    }

    /// Whether delivering `msg` from `from` may take this node's own copy of the page
    /// away: at a non-home node an invalidation or revoke; at the home a write request
    /// from another node that starts at once, or a reply that may end the transaction
    /// in progress while another node's write request waits behind it. For layers that
    /// must prepare before the copy goes (see `dvmm-dsm-uffd`'s `LocalDerived`); it
    /// over-approximates and changes nothing.
    pub fn may_take_copy_away(&self, from: NodeId, msg: Msg) -> bool {
        let page = msg.page();
        if self.home(page) != self.id {
            return matches!(msg, Msg::Invalidate { .. } | Msg::Revoke { .. });
        }
        let e = self.dir.get(&page);
        let remote_write_queued = || {
            e.is_some_and(|e| {
                e.queue
                    .iter()
                    .any(|&(n, a)| n != self.id && a == Access::Write)
            })
        };
        match msg {
            Msg::WriteReq { .. } => {
                from != self.id && e.is_none_or(|e| e.txn.is_none() && e.queue.is_empty())
            }
            Msg::InvalidateAck { .. } | Msg::RevokeAck { .. } | Msg::FetchReply { .. } => {
                remote_write_queued()
            }
            _ => false,
        }
    }

    /// Number of protocol errors (ignored messages) seen so far.
    pub fn protocol_errors(&self) -> u64 {
        self.error_count
    }

    /// Takes the kept protocol errors (at most [`MAX_KEPT_ERRORS`] since the last call).
    pub fn take_protocol_errors(&mut self) -> Vec<ProtocolError> {
        std::mem::take(&mut self.errors)
    }

    /// A local vCPU (or the VMM itself) missed on `page` with `access`. Returns the
    /// actions to perform; an empty list means "wait for [`Action::WakeFaulters`]"
    /// (a request for the page is already outstanding).
    pub fn fault(&mut self, page: PageNo, access: Access) -> Vec<Action> {
        let mut cx = Ctx::default();
        let state = self.state(page);
        match (state, access) {
            (PageState::ReadOnly | PageState::Writable, Access::Read)
            | (PageState::Writable, Access::Write)
            | (PageState::WritePending { has_copy: true }, Access::Read) => {
                // Already satisfied: a fault that raced with the install.
                cx.out.push(Action::WakeFaulters { page });
            }
            (PageState::ReadPending | PageState::WritePending { .. }, _) => {}
            (PageState::Invalid, Access::Read) => {
                self.set_state(page, PageState::ReadPending);
                self.send(&mut cx, self.home(page), Msg::ReadReq { page });
            }
            (PageState::Invalid | PageState::ReadOnly, Access::Write) => {
                let has_copy = state == PageState::ReadOnly;
                self.set_state(page, PageState::WritePending { has_copy });
                self.send(&mut cx, self.home(page), Msg::WriteReq { page, has_copy });
            }
        }
        self.drain(&mut cx);
        cx.out
    }

    /// A message `msg` arrived from node `from`. Returns the actions to perform.
    pub fn receive(&mut self, from: NodeId, msg: Msg) -> Vec<Action> {
        let mut cx = Ctx::default();
        if from >= self.nodes {
            self.error(ProtocolError::UnknownNode {
                from,
                nodes: self.nodes,
            });
        } else {
            self.dispatch(&mut cx, from, msg);
            self.drain(&mut cx);
        }
        cx.out
    }

    fn drain(&mut self, cx: &mut Ctx) {
        while let Some(msg) = cx.inbox.pop_front() {
            self.dispatch(cx, self.id, msg);
        }
    }

    fn send(&self, cx: &mut Ctx, to: NodeId, msg: Msg) {
        if to == self.id {
            cx.inbox.push_back(msg);
        } else {
            cx.out.push(Action::Send { to, msg });
        }
    }

    fn set_state(&mut self, page: PageNo, state: PageState) {
        if state == PageState::Invalid {
            self.pages.remove(&page);
        } else {
            self.pages.insert(page, state);
        }
    }

    fn error(&mut self, e: ProtocolError) {
        self.error_count += 1;
        if self.errors.len() < MAX_KEPT_ERRORS {
            self.errors.push(e);
        }
    }

    fn unexpected(&mut self, from: NodeId, msg: Msg) {
        let state = self.state(msg.page());
        self.error(ProtocolError::Unexpected { from, msg, state });
    }

    #[cfg(test)]
    fn mutant(&self, m: Mutant) -> bool {
        self.mutant == Some(m)
    }

    fn dispatch(&mut self, cx: &mut Ctx, from: NodeId, msg: Msg) {
        let page = msg.page();
        let home = self.home(page);
        let to_home = matches!(
            msg,
            Msg::ReadReq { .. }
                | Msg::WriteReq { .. }
                | Msg::InvalidateAck { .. }
                | Msg::FetchReply { .. }
                | Msg::RevokeAck { .. }
        );
        if to_home && home != self.id {
            return self.error(ProtocolError::NotHome { from, msg });
        }
        if !to_home && from != home {
            return self.error(ProtocolError::NotFromHome { from, msg });
        }
        match msg {
            Msg::ReadReq { .. } => self.home_request(cx, from, page, Access::Read),
            Msg::WriteReq { .. } => self.home_request(cx, from, page, Access::Write),
            Msg::InvalidateAck { .. } => self.home_invalidate_ack(cx, from, msg),
            Msg::FetchReply { .. } | Msg::RevokeAck { .. } => self.home_owner_reply(cx, from, msg),
            Msg::ReadGrant { .. } | Msg::WriteGrant { .. } => self.on_grant(cx, from, msg),
            Msg::Invalidate { .. } => self.on_invalidate(cx, from, msg),
            Msg::Fetch { .. } | Msg::Revoke { .. } => self.on_owner_recall(cx, from, msg),
        }
    }

    // ---- requester / copy holder side ----

    fn on_grant(&mut self, cx: &mut Ctx, from: NodeId, msg: Msg) {
        let page = msg.page();
        let state = self.state(page);
        match (msg, state) {
            (Msg::ReadGrant { .. }, PageState::ReadPending) => {
                self.set_state(page, PageState::ReadOnly);
                cx.out.push(Action::InstallReadOnly { page });
                cx.out.push(Action::WakeFaulters { page });
            }
            (Msg::WriteGrant { has_data, zero, .. }, PageState::WritePending { has_copy })
                if has_data || zero || has_copy =>
            {
                self.set_state(page, PageState::Writable);
                cx.out.push(Action::InstallWritable { page });
                cx.out.push(Action::WakeFaulters { page });
            }
            _ => self.unexpected(from, msg),
        }
    }

    fn on_invalidate(&mut self, cx: &mut Ctx, from: NodeId, msg: Msg) {
        let page = msg.page();
        match self.state(page) {
            PageState::ReadOnly => {
                self.set_state(page, PageState::Invalid);
                cx.out.push(Action::Invalidate { page });
            }
            PageState::WritePending { has_copy: true } => {
                // Our upgrade lost the race: the home will send data with the grant.
                self.set_state(page, PageState::WritePending { has_copy: false });
                cx.out.push(Action::Invalidate { page });
            }
            _ => self.unexpected(from, msg),
        }
        // Ack even when unexpected so the home's transaction cannot hang on us.
        self.send(cx, from, Msg::InvalidateAck { page });
    }

    fn on_owner_recall(&mut self, cx: &mut Ctx, from: NodeId, msg: Msg) {
        let page = msg.page();
        if self.state(page) != PageState::Writable {
            return self.unexpected(from, msg);
        }
        match msg {
            Msg::Fetch { .. } => {
                #[cfg(test)]
                let keep = self.mutant(Mutant::NoDowngradeOnFetch);
                #[cfg(not(test))]
                let keep = false;
                if !keep {
                    self.set_state(page, PageState::ReadOnly);
                    cx.out.push(Action::Downgrade { page });
                }
                self.send(cx, from, Msg::FetchReply { page });
            }
            _ => {
                self.set_state(page, PageState::Invalid);
                cx.out.push(Action::Invalidate { page });
                self.send(cx, from, Msg::RevokeAck { page });
            }
        }
    }

    // ---- home side ----

    fn home_request(&mut self, cx: &mut Ctx, from: NodeId, page: PageNo, access: Access) {
        let entry = self.dir.entry(page).or_default();
        if entry.txn.is_some() || !entry.queue.is_empty() {
            entry.queue.push_back((from, access));
            return;
        }
        self.start(cx, page, from, access);
        self.pump(cx, page);
    }

    /// Starts a transaction; leaves `txn` set if it must wait for replies.
    fn start(&mut self, cx: &mut Ctx, page: PageNo, req: NodeId, access: Access) {
        let mut e = self.dir.remove(&page).unwrap_or_default();
        if e.owner == Some(req) {
            // The requester already owns the page: only a broken peer asks again.
            let msg = match access {
                Access::Read => Msg::ReadReq { page },
                Access::Write => Msg::WriteReq {
                    page,
                    has_copy: true,
                },
            };
            self.dir.insert(page, e);
            return self.unexpected(req, msg);
        }
        match access {
            Access::Read => match e.owner {
                Some(owner) => {
                    e.txn = Some(Txn {
                        requester: req,
                        access,
                        awaiting_acks: BTreeSet::new(),
                        awaiting_owner: true,
                        requester_has_copy: false,
                    });
                    self.send(cx, owner, Msg::Fetch { page });
                }
                None => {
                    e.copyset.insert(req);
                    self.send(
                        cx,
                        req,
                        Msg::ReadGrant {
                            page,
                            zero: !e.written,
                        },
                    );
                }
            },
            Access::Write => {
                let requester_has_copy = e.copyset.remove(&req);
                let others = std::mem::take(&mut e.copyset);
                for &o in &others {
                    self.send(cx, o, Msg::Invalidate { page });
                }
                #[cfg(test)]
                let others = if self.mutant(Mutant::SkipInvalidateAcks) {
                    BTreeSet::new()
                } else {
                    others
                };
                let awaiting_owner = if let Some(owner) = e.owner {
                    self.send(cx, owner, Msg::Revoke { page });
                    true
                } else {
                    false
                };
                let txn = Txn {
                    requester: req,
                    access,
                    awaiting_acks: others,
                    awaiting_owner,
                    requester_has_copy,
                };
                if txn.awaiting_acks.is_empty() && !awaiting_owner {
                    self.grant_write(cx, page, &mut e, &txn);
                } else {
                    e.txn = Some(txn);
                }
            }
        }
        self.put_dir(page, e);
    }

    fn grant_write(&self, cx: &mut Ctx, page: PageNo, e: &mut DirEntry, txn: &Txn) {
        let zero = !e.written;
        e.owner = Some(txn.requester);
        e.copyset.clear();
        e.written = true;
        e.txn = None;
        let has_data = !zero && !txn.requester_has_copy;
        self.send(
            cx,
            txn.requester,
            Msg::WriteGrant {
                page,
                has_data,
                zero,
            },
        );
    }

    fn put_dir(&mut self, page: PageNo, e: DirEntry) {
        #[cfg(test)]
        let e = {
            let mut e = e;
            if self.mutant(Mutant::ForgetWritten) && e.owner.is_none() && e.txn.is_none() {
                e.written = false;
            }
            e
        };
        if e.is_default() {
            self.dir.remove(&page);
        } else {
            self.dir.insert(page, e);
        }
    }

    /// Starts queued requests while the page is idle.
    fn pump(&mut self, cx: &mut Ctx, page: PageNo) {
        loop {
            let Some(e) = self.dir.get_mut(&page) else {
                return;
            };
            if e.txn.is_some() {
                return;
            }
            let Some((req, access)) = e.queue.pop_front() else {
                return;
            };
            self.start(cx, page, req, access);
        }
    }

    fn home_invalidate_ack(&mut self, cx: &mut Ctx, from: NodeId, msg: Msg) {
        let page = msg.page();
        let Some(mut e) = self.dir.remove(&page) else {
            return self.unexpected(from, msg);
        };
        let acked = match e.txn.as_mut() {
            Some(t) => t.awaiting_acks.remove(&from),
            None => false,
        };
        if !acked {
            self.put_dir(page, e);
            #[cfg(test)]
            if self.mutant(Mutant::SkipInvalidateAcks) {
                return;
            }
            return self.unexpected(from, msg);
        }
        self.maybe_finish_write(cx, page, e);
    }

    fn maybe_finish_write(&mut self, cx: &mut Ctx, page: PageNo, mut e: DirEntry) {
        if let Some(txn) = e.txn.clone() {
            if txn.access == Access::Write && txn.awaiting_acks.is_empty() && !txn.awaiting_owner {
                self.grant_write(cx, page, &mut e, &txn);
            }
        }
        self.put_dir(page, e);
        self.pump(cx, page);
    }

    fn home_owner_reply(&mut self, cx: &mut Ctx, from: NodeId, msg: Msg) {
        let page = msg.page();
        let Some(mut e) = self.dir.remove(&page) else {
            return self.unexpected(from, msg);
        };
        let fits = match (&e.txn, msg) {
            (Some(t), Msg::FetchReply { .. }) => t.access == Access::Read && t.awaiting_owner,
            (Some(t), Msg::RevokeAck { .. }) => t.access == Access::Write && t.awaiting_owner,
            _ => false,
        };
        if !fits || e.owner != Some(from) {
            self.put_dir(page, e);
            return self.unexpected(from, msg);
        }
        e.owner = None;
        let Some(mut txn) = e.txn.take() else {
            self.put_dir(page, e);
            return self.unexpected(from, msg);
        };
        txn.awaiting_owner = false;
        if txn.access == Access::Read {
            // The data is now in our buffer; both the old owner and the requester share it.
            e.copyset.insert(from);
            e.copyset.insert(txn.requester);
            self.send(cx, txn.requester, Msg::ReadGrant { page, zero: false });
        } else {
            e.txn = Some(txn);
        }
        self.maybe_finish_write(cx, page, e);
    }
}

#[cfg(test)]
mod tests;
