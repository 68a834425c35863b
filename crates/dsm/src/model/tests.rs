use super::*;
use crate::Mutant;
use std::time::Instant;

fn cfg(nodes: u16, pages: u64, accesses: u8) -> ModelConfig {
    ModelConfig {
        nodes,
        pages,
        accesses_per_node: accesses,
        max_states: 20_000_000,
    }
}

fn run(c: ModelConfig) -> Report {
    let t = Instant::now();
    let r = check(&c);
    let r = match r {
        Ok(r) => r,
        Err(v) => panic!("{v}"),
    };
    eprintln!("{c:?}: {r:?} in {:?}", t.elapsed());
    assert!(r.final_states > 0);
    r
}

fn mutant(m: Mutant, c: ModelConfig) -> Violation {
    let nodes = c.nodes;
    let r = check_with(&c, &|id| {
        let mut n = Node::new(id, nodes, move |p| (p % u64::from(nodes)) as NodeId);
        n.mutant = Some(m);
        n
    });
    match r {
        Ok(r) => panic!("mutant {m:?} not caught: {r:?}"),
        Err(v) => {
            eprintln!("mutant {m:?}: {v}");
            v
        }
    }
}

#[test]
fn small_models_pass() {
    run(cfg(1, 1, 2));
    run(cfg(2, 1, 2));
    run(cfg(2, 2, 2));
}

#[test]
fn three_nodes_two_pages() {
    run(cfg(3, 2, 2));
}

#[test]
fn bad_config_is_rejected() {
    let v = check(&cfg(0, 1, 1)).unwrap_err();
    assert_eq!(v.property, Property::BadConfig);
}

#[test]
fn state_limit_is_reported() {
    let mut c = cfg(2, 1, 2);
    c.max_states = 10;
    assert_eq!(check(&c).unwrap_err().property, Property::StateLimit);
}

#[test]
fn mutant_skip_invalidate_acks_is_caught() {
    let v = mutant(Mutant::SkipInvalidateAcks, cfg(3, 1, 2));
    assert!(
        matches!(v.property, Property::SingleWriter | Property::Coherence),
        "{v}"
    );
    assert!(!v.trace.is_empty());
}

#[test]
fn mutant_no_downgrade_on_fetch_is_caught() {
    let v = mutant(Mutant::NoDowngradeOnFetch, cfg(2, 1, 2));
    assert!(
        matches!(v.property, Property::SingleWriter | Property::Coherence),
        "{v}"
    );
}

#[test]
fn mutant_forget_written_is_caught() {
    let v = mutant(Mutant::ForgetWritten, cfg(2, 1, 2));
    assert!(
        matches!(
            v.property,
            Property::ZeroPage | Property::Coherence | Property::LostWrite
        ),
        "{v}"
    );
}

/// Larger models: too slow for a debug-mode `cargo test`. Run with
/// `cargo test -p dvmm-dsm --release -- --ignored --nocapture`.
#[test]
#[ignore]
fn three_nodes_two_pages_three_accesses() {
    run(cfg(3, 2, 3));
}

/// See [`three_nodes_two_pages_three_accesses`] for how to run.
#[test]
#[ignore]
fn four_nodes_one_page() {
    run(cfg(4, 1, 2));
}
