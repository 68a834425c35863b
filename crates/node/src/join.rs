//! Joining the cluster: what the nodes agree on after they connect and before any of
//! them builds its VM.
//!
//! 1. The CPU every vCPU shows: each node offers what its host can show (less the
//!    features its cluster-file entry hides), node 0 answers with the intersection, and
//!    every node builds its vCPUs from that answer. A guest thread may run on any node,
//!    so a feature one node lacks must be missing everywhere.
//! 2. The clocks: each node measures its host's clocks against node 0's
//!    ([`crate::clock_sync`]) and tells node 0 what it found; every vCPU then shows node
//!    0's TSC and kvmclock.

use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::Instant;

use dvmm_cluster::wire::{StopCode, KIND_CONTROL};
use dvmm_cluster::ControlMsg;
use dvmm_layout::cpu_features::{CpuFeatures, CpuModel};
use dvmm_transport::Event;
use dvmm_vmm::vm::ClockAlign;

use crate::clock_sync::{same_rate, Estimate, HostClock, Offset, Round, Sample};

/// Probes per node: the best of them bounds the offset.
const CLOCK_ROUNDS: u32 = 16;

/// Why nodes could not agree.
#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    /// A peer went away while the nodes were joining.
    #[error("lost node {node} while the nodes were joining: {reason}")]
    PeerLost {
        /// The node.
        node: u16,
        /// Why.
        reason: String,
    },
    /// A peer said nothing in time.
    #[error("node {node} did not {what} within {secs} s (is it the same dvmm version?)")]
    Silent {
        /// The first node not heard from.
        node: usize,
        /// What it did not do.
        what: &'static str,
        /// The time allowed.
        secs: u64,
    },
    /// The hosts' CPUs come from different vendors: one guest kernel cannot run on both.
    #[error("node {node}'s CPU is {theirs}, node 0's is {ours}: one guest cannot run on CPUs of different vendors")]
    UnlikeVendors {
        /// The node that differs.
        node: usize,
        /// Its CPU.
        theirs: String,
        /// Node 0's CPU.
        ours: String,
    },
    /// The hosts' TSCs run at different rates: guest time would drift between nodes.
    #[error("node {node}'s TSC runs at {ours} kHz, node 0's at {theirs} kHz: the guest's TSC would run at different rates on different nodes (dvmm needs hosts with one TSC frequency)")]
    UnlikeTscRates {
        /// This node.
        node: u16,
        /// This host's TSC frequency.
        ours: u32,
        /// Node 0's.
        theirs: u32,
    },
    /// This host cannot show the guest node 0's TSC.
    #[error(transparent)]
    TscOffsetsIgnored(#[from] crate::clock_sync::OffsetsIgnored),
    /// Node 0 ended the join (e.g. it found nodes it cannot combine).
    #[error("node {from} stopped the cluster while it was joining: {reason}")]
    Stopped {
        /// The node that stopped it.
        from: u16,
        /// Its reason.
        reason: String,
    },
}

/// What the join leaves: the agreed CPU, and messages that arrived meanwhile for the
/// dispatcher.
pub struct Joined {
    /// The CPU every vCPU shows.
    pub cpu: CpuModel,
    /// Events received during the join that were not part of it, in arrival order.
    pub early: Vec<Event>,
}

/// Node `me` of `nodes` offers `offer` and gets the CPU all nodes show. `send(to, msg)`
/// sends a control message; `events` is the transport's receive side. On failure the
/// other nodes are told why.
pub fn agree_cpu(
    me: u16,
    nodes: usize,
    offer: CpuModel,
    send: &dyn Fn(u16, &ControlMsg),
    events: &Receiver<Event>,
    deadline: Instant,
) -> Result<Joined, JoinError> {
    cpu_phase(me, nodes, offer, send, events, deadline).map_err(|e| tell_others(me, nodes, send, e))
}

/// A failed join's reason, sent where it is needed: from node 0 to every other node;
/// from another node to node 0, unless node 0 is what failed (it stopped the join, or
/// it is gone). Returns `e`.
fn tell_others(me: u16, nodes: usize, send: &dyn Fn(u16, &ControlMsg), e: JoinError) -> JoinError {
    let stop = ControlMsg::Stop {
        code: StopCode::Failed,
        reason: format!("node {me}: {e}"),
    };
    if me == 0 {
        for n in 1..nodes {
            send(n as u16, &stop);
        }
    } else if !matches!(
        e,
        JoinError::Stopped { from: 0, .. } | JoinError::PeerLost { node: 0, .. }
    ) {
        send(0, &stop);
    }
    e
}

fn cpu_phase(
    me: u16,
    nodes: usize,
    offer: CpuModel,
    send: &dyn Fn(u16, &ControlMsg),
    events: &Receiver<Event>,
    deadline: Instant,
) -> Result<Joined, JoinError> {
    let mut early = Vec::new();
    if me != 0 {
        send(0, &ControlMsg::CpuOffer(offer));
        loop {
            match next(
                events,
                deadline,
                (0, "say which CPU the cluster shows"),
                &mut early,
            )? {
                (0, ControlMsg::CpuAgreed(cpu)) => return Ok(Joined { cpu, early }),
                (from, ControlMsg::Stop { reason, .. }) => {
                    return Err(JoinError::Stopped { from, reason })
                }
                (from, other) => early.push(control_event(from, &other)),
            }
        }
    }
    let mut offers: Vec<Option<CpuModel>> = vec![None; nodes];
    offers[0] = Some(offer);
    while let Some(missing) = offers.iter().position(Option::is_none) {
        match next(
            events,
            deadline,
            (missing, "say which CPU it offers"),
            &mut early,
        )? {
            (from, ControlMsg::CpuOffer(m)) if usize::from(from) < nodes => {
                offers[usize::from(from)] = Some(m);
            }
            (from, ControlMsg::Stop { reason, .. }) => {
                return Err(JoinError::Stopped { from, reason })
            }
            (from, other) => early.push(control_event(from, &other)),
        }
    }
    let offers: Vec<CpuModel> = offers.into_iter().flatten().collect();
    let cpu = combine(&offers)?;
    if let Some(line) = dropped_line(&offers) {
        tracing::info!("{line}");
    }
    for (n, m) in offers.iter().enumerate().skip(1) {
        if m.signature != offer.signature {
            tracing::info!("node {n}'s CPU is {m}; every vCPU shows node 0's signature ({offer})");
        }
    }
    for n in 1..nodes {
        send(n as u16, &ControlMsg::CpuAgreed(cpu));
    }
    Ok(Joined { cpu, early })
}

/// Node `me` of `nodes` puts its clocks in step with node 0's: node 0 answers every
/// probe until each other node has said what it measured (and logs it); another node
/// probes, and returns the clock set-up for its vCPUs. On failure the other nodes are
/// told why.
pub fn agree_clock(
    me: u16,
    nodes: usize,
    clock: &HostClock,
    send: &dyn Fn(u16, &ControlMsg),
    events: &Receiver<Event>,
    deadline: Instant,
    early: &mut Vec<Event>,
) -> Result<ClockAlign, JoinError> {
    clock_phase(me, nodes, clock, send, events, deadline, early)
        .map_err(|e| tell_others(me, nodes, send, e))
}

fn clock_phase(
    me: u16,
    nodes: usize,
    clock: &HostClock,
    send: &dyn Fn(u16, &ControlMsg),
    events: &Receiver<Event>,
    deadline: Instant,
    early: &mut Vec<Event>,
) -> Result<ClockAlign, JoinError> {
    if me == 0 {
        let mut done = vec![false; nodes];
        done[0] = true;
        while let Some(missing) = done.iter().position(|d| !d) {
            match next(
                events,
                deadline,
                (missing, "finish measuring its clock"),
                early,
            )? {
                (from, ControlMsg::ClockProbe { seq }) => {
                    let now = clock.now();
                    send(
                        from,
                        &ControlMsg::ClockEcho {
                            seq,
                            tsc: now.tsc,
                            ns: now.ns,
                            tsc_khz: clock.tsc_khz(),
                        },
                    );
                }
                (
                    from,
                    ControlMsg::ClockSet {
                        offset_ns,
                        bound_ns,
                        applied,
                    },
                ) if usize::from(from) < nodes => {
                    done[usize::from(from)] = true;
                    tracing::info!(
                        "node {from} measured node 0's clocks {offset_ns} ns ahead of its own (+-{bound_ns} ns): {}",
                        if applied {
                            "its vCPUs are moved forward by that much"
                        } else {
                            "within the bound, so its vCPUs use its host's clocks as they are"
                        }
                    );
                }
                (from, ControlMsg::Stop { reason, .. }) => {
                    return Err(JoinError::Stopped { from, reason })
                }
                (from, other) => early.push(control_event(from, &other)),
            }
        }
        // Node 0's own clocks are the guest's (a test skew is all that can move them).
        return Ok(clock.fit(clock.align(Offset::default()), 0)?);
    }
    let mut rounds = Vec::with_capacity(CLOCK_ROUNDS as usize);
    let mut rate = None;
    for seq in 0..CLOCK_ROUNDS {
        let sent = clock.now();
        send(0, &ControlMsg::ClockProbe { seq });
        let (echo, khz) = loop {
            match next(events, deadline, (0, "answer a clock probe"), early)? {
                (
                    0,
                    ControlMsg::ClockEcho {
                        seq: s,
                        tsc,
                        ns,
                        tsc_khz,
                    },
                ) if s == seq => break (Sample { tsc, ns }, tsc_khz),
                (0, ControlMsg::ClockEcho { .. }) => {}
                (from, ControlMsg::Stop { reason, .. }) => {
                    return Err(JoinError::Stopped { from, reason })
                }
                (from, other) => early.push(control_event(from, &other)),
            }
        };
        let got = clock.now();
        rounds.push(Round { sent, echo, got });
        rate = Some(khz);
    }
    if let Some(theirs) = rate.filter(|&k| !same_rate(k, clock.tsc_khz())) {
        return Err(JoinError::UnlikeTscRates {
            node: me,
            ours: clock.tsc_khz(),
            theirs,
        });
    }
    // CLOCK_ROUNDS > 0, so there is an estimate.
    let est = Estimate::from_rounds(&rounds).unwrap_or(Estimate {
        offset: Offset::default(),
        bound_ns: 0,
    });
    let moved = est.applied(clock.tsc_khz());
    let applied = moved != Offset::default();
    tracing::info!(
        "node 0's clocks are {} ns ahead of this host's (+-{} ns, best of {CLOCK_ROUNDS} round trips){}",
        est.offset.ns,
        est.bound_ns,
        if applied {
            ": this node's vCPUs show node 0's TSC and kvmclock"
        } else {
            ": within the bound, so this node's vCPUs use this host's clocks as they are"
        }
    );
    let align = clock.fit(clock.align(moved), est.bound_ns)?;
    send(
        0,
        &ControlMsg::ClockSet {
            offset_ns: est.offset.ns,
            bound_ns: est.bound_ns,
            applied,
        },
    );
    Ok(align)
}

/// The CPU all `offers` (node 0's first) can show: node 0's vendor and signature, the
/// features every node has.
pub fn combine(offers: &[CpuModel]) -> Result<CpuModel, JoinError> {
    let mut cpu = offers.first().copied().unwrap_or_default();
    for (n, m) in offers.iter().enumerate().skip(1) {
        if m.vendor != cpu.vendor {
            return Err(JoinError::UnlikeVendors {
                node: n,
                theirs: m.to_string(),
                ours: cpu.to_string(),
            });
        }
        cpu.features = cpu.features.intersect(&m.features);
    }
    Ok(cpu)
}

/// One line naming the features node 0 has that some other node does not offer, and
/// which nodes those are; `None` if there are none.
pub fn dropped_line(offers: &[CpuModel]) -> Option<String> {
    let ours = offers.first()?.features;
    let mut parts = Vec::new();
    for name in ours.names() {
        let Ok(f) = CpuFeatures::from_names(&[&name]) else {
            // An unnamed bit: say which nodes lack it all the same.
            continue;
        };
        let lacking: Vec<String> = offers
            .iter()
            .enumerate()
            .skip(1)
            .filter(|(_, m)| !f.minus(&m.features).is_empty())
            .map(|(n, _)| n.to_string())
            .collect();
        if !lacking.is_empty() {
            let nodes = if lacking.len() == 1 { "node" } else { "nodes" };
            parts.push(format!(
                "{name} (not offered by {nodes} {})",
                lacking.join(", ")
            ));
        }
    }
    let unnamed = offers
        .iter()
        .skip(1)
        .fold(ours, |acc, m| acc.intersect(&m.features));
    let unnamed_dropped: Vec<String> = ours
        .minus(&unnamed)
        .names()
        .into_iter()
        .filter(|n| n.starts_with("cpuid "))
        .collect();
    if !unnamed_dropped.is_empty() {
        parts.push(format!(
            "{} (not offered by every node)",
            unnamed_dropped.join(", ")
        ));
    }
    if parts.is_empty() {
        return None;
    }
    Some(format!(
        "every vCPU shows the CPU features all {} nodes offer; node 0's host has these, \
         which the guest will not see: {}",
        offers.len(),
        parts.join(", ")
    ))
}

/// The next control message, keeping everything else in `early`.
fn next(
    events: &Receiver<Event>,
    deadline: Instant,
    (waiting_for, what): (usize, &'static str),
    early: &mut Vec<Event>,
) -> Result<(u16, ControlMsg), JoinError> {
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let ev = match events.recv_timeout(left) {
            Ok(ev) => ev,
            Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => {
                return Err(JoinError::Silent {
                    node: waiting_for,
                    what,
                    secs: crate::READY_TIMEOUT.as_secs(),
                })
            }
        };
        match ev {
            Event::Message {
                from,
                kind: KIND_CONTROL,
                ref payload,
            } => match ControlMsg::decode(payload) {
                Ok(m) => return Ok((from, m)),
                Err(_) => early.push(ev),
            },
            Event::PeerLost { node, reason } => return Err(JoinError::PeerLost { node, reason }),
            other => early.push(other),
        }
    }
}

/// A control message put back as the event it came in.
fn control_event(from: u16, msg: &ControlMsg) -> Event {
    Event::Message {
        from,
        kind: KIND_CONTROL,
        payload: msg.encode(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;
    use std::sync::Mutex;
    use std::time::Duration;

    fn model(names: &[&str]) -> CpuModel {
        CpuModel {
            vendor: *b"GenuineIntel",
            signature: 0x906ea,
            features: CpuFeatures::from_names(names).unwrap(),
        }
    }

    fn msg(from: u16, m: &ControlMsg) -> Event {
        control_event(from, m)
    }

    #[test]
    fn node_0_answers_with_what_every_node_offers_and_names_what_is_dropped() {
        let (tx, rx) = mpsc::channel();
        tx.send(msg(
            2,
            &ControlMsg::CpuOffer(model(&["sse2", "avx2", "nx"])),
        ))
        .unwrap();
        // Not part of the join: kept for the dispatcher.
        tx.send(msg(1, &ControlMsg::Ready)).unwrap();
        tx.send(msg(1, &ControlMsg::CpuOffer(model(&["sse2", "nx", "lm"]))))
            .unwrap();
        let sent = Mutex::new(Vec::new());
        let send = |to: u16, m: &ControlMsg| sent.lock().unwrap().push((to, m.clone()));
        let ours = model(&["sse2", "avx2", "nx", "lm", "ssse3"]);
        let j = agree_cpu(
            0,
            3,
            ours,
            &send,
            &rx,
            Instant::now() + Duration::from_secs(5),
        )
        .unwrap();
        assert_eq!(j.cpu.features.names(), ["sse2", "nx"]);
        assert_eq!(j.early.len(), 1);
        let sent = sent.into_inner().unwrap();
        assert_eq!(
            sent,
            [
                (1, ControlMsg::CpuAgreed(j.cpu)),
                (2, ControlMsg::CpuAgreed(j.cpu))
            ]
        );
        let line = dropped_line(&[
            ours,
            model(&["sse2", "nx", "lm"]),
            model(&["sse2", "avx2", "nx"]),
        ])
        .unwrap();
        assert!(
            line.ends_with(
                "ssse3 (not offered by nodes 1, 2), avx2 (not offered by node 1), \
                 lm (not offered by node 2)"
            ),
            "{line}"
        );
        assert_eq!(dropped_line(&[ours, ours]), None);
    }

    #[test]
    fn another_node_offers_and_takes_node_0s_answer() {
        let (tx, rx) = mpsc::channel();
        let agreed = model(&["sse2"]);
        tx.send(msg(0, &ControlMsg::CpuAgreed(agreed))).unwrap();
        let sent = Mutex::new(Vec::new());
        let send = |to: u16, m: &ControlMsg| sent.lock().unwrap().push((to, m.clone()));
        let j = agree_cpu(
            1,
            2,
            model(&["sse2", "nx"]),
            &send,
            &rx,
            Instant::now() + Duration::from_secs(5),
        )
        .unwrap();
        assert_eq!(j.cpu, agreed);
        assert_eq!(
            sent.into_inner().unwrap(),
            [(0, ControlMsg::CpuOffer(model(&["sse2", "nx"])))]
        );
    }

    #[test]
    fn unlike_vendors_stop_every_node_with_the_reason() {
        let (tx, rx) = mpsc::channel();
        let mut amd = model(&["sse2"]);
        amd.vendor = *b"AuthenticAMD";
        tx.send(msg(1, &ControlMsg::CpuOffer(amd))).unwrap();
        let sent = Mutex::new(Vec::new());
        let send = |to: u16, m: &ControlMsg| sent.lock().unwrap().push((to, m.clone()));
        let e = agree_cpu(
            0,
            2,
            model(&["sse2"]),
            &send,
            &rx,
            Instant::now() + Duration::from_secs(5),
        )
        .err()
        .unwrap();
        assert!(matches!(e, JoinError::UnlikeVendors { node: 1, .. }), "{e}");
        assert!(e.to_string().contains("AuthenticAMD"), "{e}");
        let sent = sent.into_inner().unwrap();
        assert!(
            matches!(&sent[..], [(1, ControlMsg::Stop { code: StopCode::Failed, reason })] if reason.contains("different vendors")),
            "{sent:?}"
        );
    }

    #[test]
    fn a_silent_or_lost_peer_ends_the_join_with_its_name() {
        let (tx, rx) = mpsc::channel::<Event>();
        let send = |_: u16, _: &ControlMsg| {};
        let e = agree_cpu(
            0,
            2,
            model(&[]),
            &send,
            &rx,
            Instant::now() + Duration::from_millis(50),
        )
        .err()
        .unwrap();
        assert!(matches!(e, JoinError::Silent { node: 1, .. }), "{e}");
        tx.send(Event::PeerLost {
            node: 0,
            reason: "closed".into(),
        })
        .unwrap();
        let e = agree_cpu(
            1,
            2,
            model(&[]),
            &send,
            &rx,
            Instant::now() + Duration::from_secs(5),
        )
        .err()
        .unwrap();
        assert!(matches!(e, JoinError::PeerLost { node: 0, .. }), "{e}");
    }
}
