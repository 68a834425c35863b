//! Exhaustive model check of the protocol (our own breadth-first explorer).
//!
//! The model runs `nodes` real [`Node`]s (the production code, not a copy) over
//! reliable FIFO channels, one per ordered pair of distinct nodes, and explores every
//! interleaving of message deliveries and of local accesses. Each node has one vCPU
//! that performs up to `accesses_per_node` accesses, each a nondeterministic choice of
//! page and read/write. Page contents are modelled, per buffer and per in-flight
//! payload, as "holds the last write or not": a write makes every other copy and
//! payload stale. This is exact for the properties below (a read must return the
//! last write) and keeps the state space small.
//!
//! Checked in every reachable state:
//! * no node saw a [`crate::ProtocolError`];
//! * single writer: a `Writable` copy excludes every other readable mapping;
//! * coherence: every readable mapping holds the value of the last write (so every
//!   read returns the latest write in the global order: linearizable per page, which
//!   implies sequential consistency);
//! * data never arrives into a page that is mapped for the vCPUs;
//! * zero pages: no message carries data for a page before a node was first granted
//!   write access to it, and no `zero` grant is sent after a write.
//!
//! In final states (every access done, every channel empty): all directories are idle
//! and the current copy (owner's, else home's buffer) holds the last write (no lost
//! write). Liveness: from every reachable state a final state is reachable (so no
//! deadlock, and every fault can complete once messages are delivered).
//!
//! States are stored as 64-bit fingerprints (like TLC/stateright); a collision could
//! hide states, with probability about n²/2⁶⁵ for n states.

use crate::{Access, Action, Msg, Node, NodeId, PageNo, PageState};
use std::collections::hash_map::DefaultHasher;
use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::hash::{Hash, Hasher};

/// Size of the model to check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModelConfig {
    /// Number of nodes (at least 1).
    pub nodes: u16,
    /// Number of pages; page `p` has home `p % nodes`.
    pub pages: u64,
    /// Accesses each node's vCPU performs.
    pub accesses_per_node: u8,
    /// Give up (with [`Property::StateLimit`]) beyond this many states.
    pub max_states: usize,
}

/// Outcome of a successful check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Report {
    /// Distinct states explored.
    pub states: usize,
    /// Transitions explored.
    pub transitions: usize,
    /// Final states (all accesses done, channels empty).
    pub final_states: usize,
    /// Longest shortest path from the initial state.
    pub max_depth: usize,
}

/// The property a violation breaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Property {
    /// A node reported a protocol error (message not fitting its state).
    ProtocolError,
    /// Two writable copies, or a writable copy and a readable one elsewhere.
    SingleWriter,
    /// A readable copy (or a read) does not hold the last written value.
    Coherence,
    /// Page data arrived into a page mapped for the vCPUs.
    DataIntoMappedPage,
    /// Data sent for a never-written page, or a zero grant after a write.
    ZeroPage,
    /// A final state lost the last write or left a directory busy.
    LostWrite,
    /// A state with no successors that is not final.
    Deadlock,
    /// A state from which no final state is reachable.
    Liveness,
    /// A message took a node's copy away although `Node::may_take_copy_away` said it
    /// would not (layers that prepare for that would be caught unprepared).
    UnannouncedTakeAway,
    /// The model is bigger than `max_states`.
    StateLimit,
    /// The configuration is unusable (no nodes, or too many pages for the model).
    BadConfig,
}

/// A counterexample: the broken property and the steps from the initial state.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("model check failed: {property:?}: {detail}\ntrace:\n{}", trace.join("\n"))]
pub struct Violation {
    /// Property broken.
    pub property: Property,
    /// What exactly went wrong.
    pub detail: String,
    /// Steps from the initial state to the violation.
    pub trace: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Vcpu {
    left: u8,
    cur: Option<(PageNo, Access)>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct World {
    nodes: Vec<Node>,
    /// FIFO channel `from * n + to`; with each message whether its payload (if any)
    /// holds the last write.
    chans: Vec<VecDeque<(Msg, bool)>>,
    /// Whether node `n`'s buffer for page `p` holds the last write, at `n * pages + p`.
    buf: Vec<bool>,
    /// Per page: some write was performed.
    written: Vec<bool>,
    /// Per page: some node installed it writable.
    ever_writable: Vec<bool>,
    vcpus: Vec<Vcpu>,
}

#[derive(Debug, Clone, Copy)]
enum Step {
    Start(NodeId, PageNo, Access),
    Retry(NodeId),
    Deliver(NodeId, NodeId),
}

type Fail = (Property, String);

struct Model {
    n: usize,
    pages: u64,
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Step::Start(n, p, a) => write!(f, "node {n}: vCPU starts {a:?} of page {p}"),
            Step::Retry(n) => write!(f, "node {n}: vCPU retries its access"),
            Step::Deliver(from, to) => write!(f, "deliver {from} -> {to}"),
        }
    }
}

fn fail<T>(p: Property, d: String) -> Result<T, Fail> {
    Err((p, d))
}

impl Model {
    fn initial(&self, cfg: &ModelConfig, make: &dyn Fn(NodeId) -> Node) -> World {
        let n = self.n;
        let pages = self.pages as usize;
        World {
            nodes: (0..n as NodeId).map(make).collect(),
            chans: vec![VecDeque::new(); n * n],
            buf: vec![true; n * pages],
            written: vec![false; pages],
            ever_writable: vec![false; pages],
            vcpus: vec![
                Vcpu {
                    left: cfg.accesses_per_node,
                    cur: None,
                };
                n
            ],
        }
    }

    fn bi(&self, node: NodeId, page: PageNo) -> usize {
        node as usize * self.pages as usize + page as usize
    }

    fn steps(&self, w: &World) -> Vec<Step> {
        let mut out = Vec::new();
        for (i, v) in w.vcpus.iter().enumerate() {
            let id = i as NodeId;
            match v.cur {
                None if v.left > 0 => {
                    for p in 0..self.pages {
                        out.push(Step::Start(id, p, Access::Read));
                        out.push(Step::Start(id, p, Access::Write));
                    }
                }
                Some((p, _)) if !w.nodes[i].state(p).pending() => out.push(Step::Retry(id)),
                None | Some(_) => {}
            }
        }
        for from in 0..self.n {
            for to in 0..self.n {
                if !w.chans[from * self.n + to].is_empty() {
                    out.push(Step::Deliver(from as NodeId, to as NodeId));
                }
            }
        }
        out
    }

    fn apply_step(&self, w: &World, step: Step) -> Result<World, Fail> {
        let mut w = w.clone();
        match step {
            Step::Start(n, p, a) => {
                let v = &mut w.vcpus[n as usize];
                v.left = v.left.saturating_sub(1);
                v.cur = Some((p, a));
                self.access(&mut w, n)?;
            }
            Step::Retry(n) => self.access(&mut w, n)?,
            Step::Deliver(from, to) => {
                let Some((msg, val)) = w.chans[from as usize * self.n + to as usize].pop_front()
                else {
                    return fail(Property::Deadlock, "empty channel".into());
                };
                let p = msg.page();
                if msg.has_data() {
                    if w.nodes[to as usize].state(p).readable() {
                        return fail(
                            Property::DataIntoMappedPage,
                            format!("{msg:?} to node {to} whose page is mapped"),
                        );
                    }
                    let i = self.bi(to, p);
                    w.buf[i] = val;
                }
                let announced = w.nodes[to as usize].may_take_copy_away(from, msg);
                let actions = w.nodes[to as usize].receive(from, msg);
                if !announced && actions.contains(&Action::Invalidate { page: p }) {
                    return fail(
                        Property::UnannouncedTakeAway,
                        format!(
                            "{msg:?} from node {from} invalidated node {to}'s copy unannounced"
                        ),
                    );
                }
                self.apply_actions(&mut w, to, actions)?;
            }
        }
        Ok(w)
    }

    /// The vCPU of node `n` tries its current access: performs it if the mapping
    /// allows, else faults (the node may send a request or make it wait).
    fn access(&self, w: &mut World, n: NodeId) -> Result<(), Fail> {
        let Some((p, a)) = w.vcpus[n as usize].cur else {
            return Ok(());
        };
        let state = w.nodes[n as usize].state(p);
        let allowed = match a {
            Access::Read => state.readable(),
            Access::Write => state == PageState::Writable,
        };
        let i = self.bi(n, p);
        if allowed {
            match a {
                Access::Read => {
                    if !w.buf[i] {
                        return fail(
                            Property::Coherence,
                            format!("node {n} read a stale value from page {p}"),
                        );
                    }
                }
                Access::Write => {
                    // Every other copy, and every payload in flight, is now stale.
                    for j in 0..self.n {
                        let k = self.bi(j as NodeId, p);
                        w.buf[k] = false;
                    }
                    for c in &mut w.chans {
                        for (m, fresh) in c.iter_mut() {
                            if m.page() == p {
                                *fresh = false;
                            }
                        }
                    }
                    w.buf[i] = true;
                    w.written[p as usize] = true;
                }
            }
            w.vcpus[n as usize].cur = None;
            Ok(())
        } else {
            let actions = w.nodes[n as usize].fault(p, a);
            self.apply_actions(w, n, actions)
        }
    }

    fn apply_actions(&self, w: &mut World, n: NodeId, actions: Vec<Action>) -> Result<(), Fail> {
        for a in actions {
            match a {
                Action::Send { to, msg } => {
                    let p = msg.page();
                    if to == n || to as usize >= self.n || p >= self.pages {
                        return fail(
                            Property::ProtocolError,
                            format!("node {n} sends {msg:?} to {to}"),
                        );
                    }
                    let zero_grant = matches!(
                        msg,
                        Msg::ReadGrant { zero: true, .. } | Msg::WriteGrant { zero: true, .. }
                    );
                    if zero_grant && w.written[p as usize] {
                        return fail(
                            Property::ZeroPage,
                            format!("node {n} sends {msg:?} but page {p} was written"),
                        );
                    }
                    let val = if msg.has_data() {
                        if !w.ever_writable[p as usize] {
                            return fail(
                                Property::ZeroPage,
                                format!("node {n} sends {msg:?} with data for never-written page"),
                            );
                        }
                        w.buf[self.bi(n, p)]
                    } else {
                        true
                    };
                    w.chans[n as usize * self.n + to as usize].push_back((msg, val));
                }
                Action::InstallWritable { page } => {
                    if let Some(e) = w.ever_writable.get_mut(page as usize) {
                        *e = true;
                    }
                }
                Action::InstallReadOnly { .. }
                | Action::Downgrade { .. }
                | Action::Invalidate { .. }
                | Action::WakeFaulters { .. } => {}
            }
        }
        Ok(())
    }

    fn invariants(&self, w: &World) -> Result<(), Fail> {
        for node in &w.nodes {
            if node.protocol_errors() != 0 {
                return fail(
                    Property::ProtocolError,
                    format!("node {} saw a protocol error: {node:?}", node.id()),
                );
            }
        }
        for p in 0..self.pages {
            let writers: Vec<usize> = (0..self.n)
                .filter(|&i| w.nodes[i].state(p) == PageState::Writable)
                .collect();
            let readable = (0..self.n)
                .filter(|&i| w.nodes[i].state(p).readable())
                .count();
            if writers.len() > 1 || (writers.len() == 1 && readable > 1) {
                return fail(
                    Property::SingleWriter,
                    format!("page {p}: writers {writers:?}, {readable} readable mappings"),
                );
            }
            for i in 0..self.n {
                if w.nodes[i].state(p).readable() && !w.buf[self.bi(i as NodeId, p)] {
                    return fail(
                        Property::Coherence,
                        format!("node {i} maps page {p} holding a stale value"),
                    );
                }
            }
        }
        Ok(())
    }

    fn is_final(&self, w: &World) -> bool {
        w.vcpus.iter().all(|v| v.left == 0 && v.cur.is_none())
            && w.chans.iter().all(VecDeque::is_empty)
    }

    fn check_final(&self, w: &World) -> Result<(), Fail> {
        for p in 0..self.pages {
            let home = (p % self.n as u64) as NodeId;
            let Some(d) = w.nodes[home as usize].directory(p) else {
                return fail(Property::LostWrite, format!("page {p} has no home"));
            };
            if d.busy || d.queued != 0 {
                return fail(
                    Property::LostWrite,
                    format!("page {p}: directory busy {d:?}"),
                );
            }
            let holder = d.owner.unwrap_or(home);
            if !w.buf[self.bi(holder, p)] {
                return fail(
                    Property::LostWrite,
                    format!("page {p}: current copy at node {holder} is not the last write"),
                );
            }
        }
        Ok(())
    }
}

fn fingerprint(w: &World) -> u64 {
    let mut h = DefaultHasher::new();
    w.hash(&mut h);
    h.finish()
}

/// Checks the real protocol. See the module docs for what is checked.
pub fn check(cfg: &ModelConfig) -> Result<Report, Violation> {
    check_with(cfg, &|id| {
        let nodes = cfg.nodes;
        Node::new(id, nodes, move |p| (p % u64::from(nodes.max(1))) as NodeId)
    })
}

/// Checks nodes built by `make` (tests use it to inject protocol bugs).
pub(crate) fn check_with(
    cfg: &ModelConfig,
    make: &dyn Fn(NodeId) -> Node,
) -> Result<Report, Violation> {
    if cfg.nodes == 0 || cfg.pages > 64 {
        return Err(Violation {
            property: Property::BadConfig,
            detail: format!("need 1..=65535 nodes and at most 64 pages, got {cfg:?}"),
            trace: Vec::new(),
        });
    }
    let m = Model {
        n: cfg.nodes as usize,
        pages: cfg.pages,
    };
    let init = m.initial(cfg, make);
    let mut ids: HashMap<u64, u32> = HashMap::new();
    let mut parent: Vec<u32> = vec![u32::MAX];
    let mut fps: Vec<u64> = vec![fingerprint(&init)];
    let mut depth: Vec<u32> = vec![0];
    let mut edges: Vec<(u32, u32)> = Vec::new();
    let mut finals: Vec<u32> = Vec::new();
    ids.insert(fps[0], 0);
    let mut queue: VecDeque<(World, u32)> = VecDeque::new();
    if let Err(f) = m.invariants(&init) {
        return Err(Violation {
            property: f.0,
            detail: f.1,
            trace: Vec::new(),
        });
    }
    queue.push_back((init, 0));
    let mut transitions = 0usize;
    while let Some((w, id)) = queue.pop_front() {
        let steps = m.steps(&w);
        if steps.is_empty() {
            let r = if m.is_final(&w) {
                finals.push(id);
                m.check_final(&w)
            } else {
                fail(Property::Deadlock, "no step possible".into())
            };
            if let Err(f) = r {
                return Err(make_violation(&m, cfg, make, id, None, f, &parent, &fps));
            }
            continue;
        }
        for step in steps {
            transitions += 1;
            let next = match m
                .apply_step(&w, step)
                .and_then(|n| m.invariants(&n).map(|()| n))
            {
                Ok(n) => n,
                Err(f) => {
                    return Err(make_violation(
                        &m,
                        cfg,
                        make,
                        id,
                        Some(step),
                        f,
                        &parent,
                        &fps,
                    ))
                }
            };
            let fp = fingerprint(&next);
            let nid = match ids.get(&fp) {
                Some(&nid) => nid,
                None => {
                    let nid = fps.len() as u32;
                    if fps.len() >= cfg.max_states {
                        return Err(Violation {
                            property: Property::StateLimit,
                            detail: format!("more than {} states", cfg.max_states),
                            trace: Vec::new(),
                        });
                    }
                    ids.insert(fp, nid);
                    fps.push(fp);
                    parent.push(id);
                    depth.push(depth[id as usize] + 1);
                    queue.push_back((next, nid));
                    nid
                }
            };
            edges.push((id, nid));
        }
    }
    // Liveness: walk backwards from the final states; every state must be reached.
    let n = fps.len();
    let mut start = vec![0u32; n + 1];
    for &(_, d) in &edges {
        start[d as usize + 1] += 1;
    }
    for i in 0..n {
        start[i + 1] += start[i];
    }
    let mut fill = start.clone();
    let mut preds = vec![0u32; edges.len()];
    for &(s, d) in &edges {
        preds[fill[d as usize] as usize] = s;
        fill[d as usize] += 1;
    }
    let mut reach = vec![false; n];
    let mut stack: Vec<u32> = finals.clone();
    for &f in &finals {
        reach[f as usize] = true;
    }
    while let Some(s) = stack.pop() {
        for &p in &preds[start[s as usize] as usize..start[s as usize + 1] as usize] {
            if !reach[p as usize] {
                reach[p as usize] = true;
                stack.push(p);
            }
        }
    }
    if let Some(bad) = reach.iter().position(|&r| !r) {
        let f = (
            Property::Liveness,
            "no final state is reachable from here (livelock or deadlock)".to_string(),
        );
        return Err(make_violation(
            &m, cfg, make, bad as u32, None, f, &parent, &fps,
        ));
    }
    Ok(Report {
        states: n,
        transitions,
        final_states: finals.len(),
        max_depth: depth.iter().copied().max().unwrap_or(0) as usize,
    })
}

#[allow(clippy::too_many_arguments)]
fn make_violation(
    m: &Model,
    cfg: &ModelConfig,
    make: &dyn Fn(NodeId) -> Node,
    id: u32,
    last: Option<Step>,
    (property, detail): Fail,
    parent: &[u32],
    fps: &[u64],
) -> Violation {
    let mut path = vec![id];
    let mut cur = id;
    while let Some(&p) = parent.get(cur as usize) {
        if p == u32::MAX {
            break;
        }
        path.push(p);
        cur = p;
    }
    path.reverse();
    let mut w = m.initial(cfg, make);
    let mut trace = Vec::new();
    for &next in path.iter().skip(1) {
        let found = m.steps(&w).into_iter().find_map(|s| {
            m.apply_step(&w, s)
                .ok()
                .filter(|n| fingerprint(n) == fps[next as usize])
                .map(|n| (s, n))
        });
        let Some((s, n)) = found else {
            trace.push("(trace reconstruction failed)".into());
            break;
        };
        trace.push(format!("{s}"));
        w = n;
    }
    if let Some(s) = last {
        trace.push(format!("{s}  <-- violation"));
    }
    Violation {
        property,
        detail,
        trace,
    }
}

#[cfg(test)]
mod tests;
