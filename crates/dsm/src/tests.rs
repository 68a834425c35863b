use super::*;
use std::collections::HashMap;

/// Page `p` has home `p % nodes`.
fn node(id: NodeId, nodes: u16) -> Node {
    Node::new(id, nodes, move |p| (p % u64::from(nodes)) as NodeId)
}

/// Nodes plus FIFO channels that the test delivers by hand.
struct Cluster {
    nodes: Vec<Node>,
    chans: HashMap<(NodeId, NodeId), VecDeque<Msg>>,
}

impl Cluster {
    fn new(n: u16) -> Cluster {
        Cluster {
            nodes: (0..n).map(|i| node(i, n)).collect(),
            chans: HashMap::new(),
        }
    }

    /// Queues the sends, returns the other actions.
    fn route(&mut self, from: NodeId, actions: Vec<Action>) -> Vec<Action> {
        let mut local = Vec::new();
        for a in actions {
            match a {
                Action::Send { to, msg } => {
                    assert_ne!(to, from, "never send to self");
                    self.chans.entry((from, to)).or_default().push_back(msg);
                }
                other => local.push(other),
            }
        }
        local
    }

    fn fault(&mut self, n: NodeId, page: PageNo, a: Access) -> Vec<Action> {
        let actions = self.nodes[n as usize].fault(page, a);
        self.route(n, actions)
    }

    fn peek(&self, from: NodeId, to: NodeId) -> Option<Msg> {
        self.chans.get(&(from, to)).and_then(|c| c.front().copied())
    }

    fn deliver(&mut self, from: NodeId, to: NodeId) -> Vec<Action> {
        let msg = self
            .chans
            .get_mut(&(from, to))
            .unwrap()
            .pop_front()
            .unwrap();
        let actions = self.nodes[to as usize].receive(from, msg);
        self.route(to, actions)
    }

    fn idle(&self) -> bool {
        self.chans.values().all(VecDeque::is_empty)
    }

    fn state(&self, n: NodeId, page: PageNo) -> PageState {
        self.nodes[n as usize].state(page)
    }
}

// Page 1 has home node 1 in a cluster of 3.
const P: PageNo = 1;

#[test]
fn zero_page_read_is_granted_without_data() {
    let mut c = Cluster::new(3);
    assert!(c.fault(0, P, Access::Read).is_empty());
    assert_eq!(c.state(0, P), PageState::ReadPending);
    assert_eq!(c.peek(0, 1), Some(Msg::ReadReq { page: P }));
    assert!(c.deliver(0, 1).is_empty());
    let grant = c.peek(1, 0).unwrap();
    assert_eq!(
        grant,
        Msg::ReadGrant {
            page: P,
            zero: true
        }
    );
    assert!(!grant.has_data());
    assert_eq!(
        c.deliver(1, 0),
        vec![
            Action::InstallReadOnly { page: P },
            Action::WakeFaulters { page: P }
        ]
    );
    assert_eq!(c.state(0, P), PageState::ReadOnly);
    assert_eq!(c.nodes[1].directory(P).unwrap().copyset, vec![0]);
    assert!(c.idle());
}

#[test]
fn first_writer_of_zero_page_gets_ownership_without_data() {
    let mut c = Cluster::new(3);
    c.fault(2, P, Access::Write);
    c.deliver(2, 1);
    assert_eq!(
        c.peek(1, 2),
        Some(Msg::WriteGrant {
            page: P,
            has_data: false,
            zero: true
        })
    );
    assert_eq!(
        c.deliver(1, 2),
        vec![
            Action::InstallWritable { page: P },
            Action::WakeFaulters { page: P }
        ]
    );
    let d = c.nodes[1].directory(P).unwrap();
    assert_eq!((d.written, d.owner, d.busy), (true, Some(2), false));
}

#[test]
fn home_faults_are_local_messages() {
    let mut c = Cluster::new(3);
    assert_eq!(
        c.fault(1, P, Access::Write),
        vec![
            Action::InstallWritable { page: P },
            Action::WakeFaulters { page: P }
        ]
    );
    assert_eq!(c.state(1, P), PageState::Writable);
    assert!(c.idle());
    // A remote read downgrades the home locally, then grants with data.
    c.fault(0, P, Access::Read);
    assert_eq!(c.deliver(0, 1), vec![Action::Downgrade { page: P }]);
    assert_eq!(c.state(1, P), PageState::ReadOnly);
    assert_eq!(
        c.peek(1, 0),
        Some(Msg::ReadGrant {
            page: P,
            zero: false
        })
    );
}

#[test]
fn read_miss_fetches_from_remote_owner_via_home() {
    let mut c = Cluster::new(3);
    c.fault(0, P, Access::Write);
    c.deliver(0, 1);
    c.deliver(1, 0);
    c.fault(2, P, Access::Read);
    c.deliver(2, 1);
    assert_eq!(c.peek(1, 0), Some(Msg::Fetch { page: P }));
    assert_eq!(c.deliver(1, 0), vec![Action::Downgrade { page: P }]);
    assert_eq!(c.state(0, P), PageState::ReadOnly);
    let reply = c.peek(0, 1).unwrap();
    assert!(reply.has_data());
    c.deliver(0, 1);
    assert_eq!(
        c.peek(1, 2),
        Some(Msg::ReadGrant {
            page: P,
            zero: false
        })
    );
    c.deliver(1, 2);
    let d = c.nodes[1].directory(P).unwrap();
    assert_eq!((d.owner, d.copyset, d.busy), (None, vec![0, 2], false));
    assert!(c.idle());
}

#[test]
fn upgrade_invalidates_others_and_grants_without_data() {
    let mut c = Cluster::new(3);
    c.fault(1, P, Access::Write); // page becomes written
    for n in [0, 2] {
        c.fault(n, P, Access::Read);
        c.deliver(n, 1);
        c.deliver(1, n);
    }
    assert_eq!(c.state(1, P), PageState::ReadOnly);
    c.fault(0, P, Access::Write);
    assert_eq!(c.state(0, P), PageState::WritePending { has_copy: true });
    // The home invalidates itself locally and node 2 remotely.
    assert_eq!(c.deliver(0, 1), vec![Action::Invalidate { page: P }]);
    assert_eq!(c.state(1, P), PageState::Invalid);
    assert!(c.nodes[1].directory(P).unwrap().busy);
    assert_eq!(c.deliver(1, 2), vec![Action::Invalidate { page: P }]);
    c.deliver(2, 1);
    assert_eq!(
        c.peek(1, 0),
        Some(Msg::WriteGrant {
            page: P,
            has_data: false,
            zero: false
        })
    );
    c.deliver(1, 0);
    assert_eq!(c.state(0, P), PageState::Writable);
    assert!(c.idle());
}

#[test]
fn race_two_nodes_fault_same_page_home_serializes() {
    let mut c = Cluster::new(3);
    c.fault(0, P, Access::Write);
    c.fault(2, P, Access::Write);
    c.deliver(0, 1);
    c.deliver(2, 1);
    // Node 0's zero grant went out at once; node 2's request must revoke it.
    assert_eq!(
        c.peek(1, 0),
        Some(Msg::WriteGrant {
            page: P,
            has_data: false,
            zero: true
        })
    );
    assert_eq!(c.nodes[1].directory(P).unwrap().owner, Some(0));
    c.deliver(1, 0);
    assert_eq!(c.peek(1, 0), Some(Msg::Revoke { page: P }));
    assert_eq!(c.deliver(1, 0), vec![Action::Invalidate { page: P }]);
    c.deliver(0, 1);
    assert_eq!(
        c.peek(1, 2),
        Some(Msg::WriteGrant {
            page: P,
            has_data: true,
            zero: false
        })
    );
    c.deliver(1, 2);
    assert_eq!(c.state(2, P), PageState::Writable);
    assert_eq!(c.state(0, P), PageState::Invalid);
}

#[test]
fn race_read_queued_behind_write_is_served_after_it() {
    let mut c = Cluster::new(3);
    c.fault(1, P, Access::Write);
    c.fault(0, P, Access::Read);
    c.fault(2, P, Access::Write);
    // The write revokes the home's own copy locally and completes at once.
    assert_eq!(c.deliver(2, 1), vec![Action::Invalidate { page: P }]);
    assert_eq!(
        c.peek(1, 2),
        Some(Msg::WriteGrant {
            page: P,
            has_data: true,
            zero: false
        })
    );
    assert!(!c.nodes[1].directory(P).unwrap().busy);
    // The read is granted before node 2 even installed its copy.
    c.deliver(0, 1);
    assert!(c.nodes[1].directory(P).unwrap().busy);
    // The read fetches from the new owner; FIFO 1->2 puts the grant before the fetch.
    c.deliver(1, 2);
    assert_eq!(c.peek(1, 2), Some(Msg::Fetch { page: P }));
    c.deliver(1, 2);
    c.deliver(2, 1);
    c.deliver(1, 0);
    assert_eq!(c.state(0, P), PageState::ReadOnly);
    assert_eq!(c.state(2, P), PageState::ReadOnly);
    assert!(c.idle());
}

#[test]
fn race_requests_queue_while_busy() {
    let mut c = Cluster::new(3);
    c.fault(0, P, Access::Write);
    c.deliver(0, 1);
    c.deliver(1, 0); // node 0 owns
    c.fault(2, P, Access::Read);
    c.deliver(2, 1);
    // The home's own fault queues behind node 2's read like any request.
    assert!(c.fault(1, P, Access::Write).is_empty());
    let d = c.nodes[1].directory(P).unwrap();
    assert_eq!((d.busy, d.queued), (true, 1));
    c.deliver(1, 0); // fetch
    c.deliver(0, 1); // reply: read grant to 2 and the queued write invalidates 0 and 2
    assert_eq!(
        c.peek(1, 2),
        Some(Msg::ReadGrant {
            page: P,
            zero: false
        })
    );
    assert_eq!(c.peek(1, 0), Some(Msg::Invalidate { page: P }));
    c.deliver(1, 2);
    assert_eq!(c.peek(1, 2), Some(Msg::Invalidate { page: P }));
    c.deliver(1, 2);
    c.deliver(1, 0);
    c.deliver(2, 1);
    assert_eq!(
        c.deliver(0, 1),
        vec![
            Action::InstallWritable { page: P },
            Action::WakeFaulters { page: P }
        ]
    );
    assert_eq!(c.state(1, P), PageState::Writable);
    assert!(c.idle());
}

#[test]
fn race_invalidation_overtakes_upgrade() {
    let mut c = Cluster::new(3);
    c.fault(1, P, Access::Write);
    for n in [0, 2] {
        c.fault(n, P, Access::Read);
        c.deliver(n, 1);
        c.deliver(1, n);
    }
    c.fault(0, P, Access::Write);
    c.fault(2, P, Access::Write);
    c.deliver(2, 1); // node 2's upgrade wins: invalidate 0
    c.deliver(0, 1); // node 0's upgrade queues
    assert_eq!(c.peek(1, 0), Some(Msg::Invalidate { page: P }));
    assert_eq!(c.deliver(1, 0), vec![Action::Invalidate { page: P }]);
    assert_eq!(c.state(0, P), PageState::WritePending { has_copy: false });
    c.deliver(0, 1); // ack: node 2 granted without data, then node 0's txn revokes it
    assert_eq!(
        c.peek(1, 2),
        Some(Msg::WriteGrant {
            page: P,
            has_data: false,
            zero: false
        })
    );
    c.deliver(1, 2);
    c.deliver(1, 2); // revoke
    c.deliver(2, 1);
    // Node 0 lost its copy, so its grant carries data.
    assert_eq!(
        c.peek(1, 0),
        Some(Msg::WriteGrant {
            page: P,
            has_data: true,
            zero: false
        })
    );
    c.deliver(1, 0);
    assert_eq!(c.state(0, P), PageState::Writable);
    assert_eq!(c.state(2, P), PageState::Invalid);
}

#[test]
fn fault_on_page_in_transfer_waits_without_duplicate_request() {
    let mut c = Cluster::new(3);
    c.fault(0, P, Access::Read);
    assert!(c.fault(0, P, Access::Read).is_empty());
    assert!(c.fault(0, P, Access::Write).is_empty());
    assert_eq!(c.chans[&(0, 1)].len(), 1);
    c.deliver(0, 1);
    c.deliver(1, 0);
    // Spurious faults on a satisfied page just wake the vCPU.
    assert_eq!(
        c.fault(0, P, Access::Read),
        vec![Action::WakeFaulters { page: P }]
    );
}

#[test]
fn unexpected_messages_are_counted_not_fatal() {
    let mut n = node(0, 3);
    // Grant without a request, from the right home (page 1 -> home 1).
    assert!(n
        .receive(
            1,
            Msg::ReadGrant {
                page: 1,
                zero: false
            }
        )
        .is_empty());
    // A request for a page we are not home of.
    assert!(n.receive(2, Msg::ReadReq { page: 1 }).is_empty());
    // An invalidation from a non-home.
    assert!(n.receive(2, Msg::Invalidate { page: 1 }).is_empty());
    // Unknown sender.
    assert!(n.receive(7, Msg::ReadReq { page: 0 }).is_empty());
    // Stray acks and replies at the home.
    assert!(n.receive(1, Msg::InvalidateAck { page: 0 }).is_empty());
    assert!(n.receive(1, Msg::RevokeAck { page: 3 }).is_empty());
    assert_eq!(n.protocol_errors(), 6);
    let errs = n.take_protocol_errors();
    assert_eq!(errs.len(), 6);
    assert!(matches!(errs[1], ProtocolError::NotHome { from: 2, .. }));
    assert!(matches!(
        errs[3],
        ProtocolError::UnknownNode { from: 7, nodes: 3 }
    ));
    assert!(n.take_protocol_errors().is_empty());
    // An unexpected invalidation is still acked so the home cannot hang.
    assert_eq!(
        n.receive(1, Msg::Invalidate { page: 1 }),
        vec![Action::Send {
            to: 1,
            msg: Msg::InvalidateAck { page: 1 }
        }]
    );
}

#[test]
fn write_grant_without_data_to_copyless_node_is_refused() {
    let mut n = node(0, 3);
    n.fault(1, Access::Write);
    assert!(n
        .receive(
            1,
            Msg::WriteGrant {
                page: 1,
                has_data: false,
                zero: false
            }
        )
        .is_empty());
    assert_eq!(n.state(1), PageState::WritePending { has_copy: false });
    assert_eq!(n.protocol_errors(), 1);
}

#[test]
fn directory_only_at_home() {
    let n = node(0, 3);
    assert!(n.directory(1).is_none());
    let d = n.directory(3).unwrap();
    assert_eq!(
        (d.written, d.owner, d.busy, d.queued),
        (false, None, false, 0)
    );
}

#[test]
fn seeded_page_is_read_only_everywhere_and_first_write_invalidates_the_others() {
    let mut c = Cluster::new(3);
    for n in &mut c.nodes {
        n.seed_shared(P, &[0, 1, 2]).unwrap();
    }
    for n in 0..3 {
        assert_eq!(c.state(n, P), PageState::ReadOnly);
        // A read is already satisfied: no message.
        assert_eq!(
            c.fault(n, P, Access::Read),
            vec![Action::WakeFaulters { page: P }]
        );
    }
    assert!(c.idle());
    let d = c.nodes[1].directory(P).unwrap();
    assert_eq!((d.written, d.copyset.clone()), (true, vec![0, 1, 2]));
    // Node 2 writes: the home (1) invalidates 0 and itself; 2 keeps its copy, no data.
    assert!(c.fault(2, P, Access::Write).is_empty());
    c.deliver(2, 1);
    assert_eq!(c.peek(1, 0), Some(Msg::Invalidate { page: P }));
    assert_eq!(c.state(1, P), PageState::Invalid);
    assert_eq!(c.deliver(1, 0), vec![Action::Invalidate { page: P }]);
    c.deliver(0, 1);
    assert_eq!(
        c.peek(1, 2),
        Some(Msg::WriteGrant {
            page: P,
            has_data: false,
            zero: false
        })
    );
    c.deliver(1, 2);
    assert_eq!(c.state(2, P), PageState::Writable);
    assert_eq!(c.state(0, P), PageState::Invalid);
    assert!(c.idle());
}

#[test]
fn seeding_refuses_used_pages_and_unknown_holders() {
    let mut n = node(0, 3);
    assert_eq!(
        n.seed_shared(P, &[0, 7]),
        Err(SeedError::UnknownNode {
            page: P,
            node: 7,
            nodes: 3
        })
    );
    n.fault(P, Access::Read);
    assert_eq!(
        n.seed_shared(P, &[0, 1, 2]),
        Err(SeedError::PageInUse { page: P })
    );
    // A home seeds its directory even when it is not a holder itself.
    let mut h = node(1, 3);
    h.seed_shared(P, &[0, 2]).unwrap();
    assert_eq!(h.state(P), PageState::Invalid);
    assert_eq!(h.directory(P).unwrap().copyset, vec![0, 2]);
}
