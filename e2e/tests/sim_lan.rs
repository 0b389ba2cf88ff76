//! The simulator in LAN mode (node liveness on the LAN, arbitration in the API, the kernel
//! gate): randomized schedules with heartbeat loss in either direction, one directed schedule
//! per row of the fault table, and proof that the simulator finds the holes the rules close
//! when they are put back.
//!
//! `L2S_SIM_LAN_SCHEDULES` changes the count; a longer soak is
//! `cargo run --release -p l2speaker-e2e --bin l2s-sim -- --lan --duration 600`.

use std::time::Duration;

use l2speaker::ownership::timing::Timing;
use l2speaker_e2e::sim::{self, Dir, Fault, FaultKind, LanTiming, Mutation, Outage, Schedule};

const TIMING: Timing = Timing {
    lease: Duration::from_secs(4),
    renew_interval: Duration::from_secs(1),
    renew_deadline: Duration::from_secs(2),
};

const DEFAULT: LanTiming = LanTiming {
    interval: Duration::from_millis(100),
    dead_after: Duration::from_millis(400),
    settle: Duration::from_secs(1),
};

const FAST: LanTiming = LanTiming {
    interval: Duration::from_millis(50),
    dead_after: Duration::from_millis(200),
    settle: Duration::from_secs(1),
};

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn fault(at: u64, duration: u64, kind: FaultKind) -> Fault {
    Fault {
        at: ms(at),
        duration: ms(duration),
        kind,
    }
}

/// Node 0 is the owner of VIP 0 (first in rank) in every directed schedule.
fn directed(seed: u64, nodes: usize, lan: LanTiming, faults: Vec<Fault>) -> Schedule {
    Schedule {
        seed,
        nodes,
        vips: 1,
        timing: TIMING,
        faults,
        mutations: vec![],
        lan: Some(lan),
        previous: vec![],
    }
}

fn run(s: &Schedule) -> sim::Outcome {
    let o = sim::run(s, false);
    assert!(o.violation.is_none(), "{}", sim::report(s));
    o
}

#[test]
fn randomized_lan_mode_fault_schedules_keep_every_invariant() {
    let count = std::env::var("L2S_SIM_LAN_SCHEDULES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300);
    let (failed, totals) = sim::run_many_lan(1, count, 2);
    if let Some((s, _)) = failed {
        panic!("{}", sim::report(&s));
    }
    assert_eq!(totals.schedules, count);
    assert!(totals.moves > 0, "some schedules move VIPs");
    println!(
        "{} LAN-mode schedules: {} faults, {} ownership moves, {} events",
        totals.schedules, totals.faults, totals.moves, totals.events
    );
}

/// Each row of the fault table, on 3 nodes (and 2 where it says), both heartbeat profiles,
/// several seeds: never two answering (checked after every event), one owner once the
/// faults heal, a move exactly where the row expects one, and no time without an answering
/// node where the row expects no move.
#[test]
fn every_row_of_the_fault_table_holds_in_the_simulator() {
    let owner = 0;
    let rows: Vec<(&str, usize, Vec<Fault>, Option<bool>)> = vec![
        (
            "owner's link cut",
            3,
            vec![fault(3000, 5000, FaultKind::LinkCut { node: owner })],
            Some(true),
        ),
        (
            "owner's speaker killed",
            3,
            vec![fault(3000, 8000, FaultKind::Kill { node: owner })],
            Some(true),
        ),
        (
            "owner frozen 5 s",
            3,
            vec![fault(3000, 5000, FaultKind::Freeze { node: owner })],
            Some(true),
        ),
        (
            "owner cut from the API only, 60 s",
            3,
            vec![
                fault(
                    3000,
                    60_000,
                    FaultKind::ApiCut {
                        node: owner,
                        dir: Dir::Out,
                    },
                ),
                fault(
                    3000,
                    60_000,
                    FaultKind::ApiCut {
                        node: owner,
                        dir: Dir::In,
                    },
                ),
            ],
            Some(false),
        ),
        (
            "API server frozen for everyone, 60 s",
            3,
            vec![fault(
                3000,
                60_000,
                FaultKind::ApiOutage {
                    mode: Outage::Frozen,
                },
            )],
            Some(false),
        ),
        (
            "API server refusing for everyone, 60 s",
            3,
            vec![fault(
                3000,
                60_000,
                FaultKind::ApiOutage {
                    mode: Outage::Refuse,
                },
            )],
            Some(false),
        ),
        (
            "API server black-holed for everyone, 60 s",
            3,
            vec![fault(
                3000,
                60_000,
                FaultKind::ApiOutage { mode: Outage::Hang },
            )],
            Some(false),
        ),
        (
            "every API reply delayed 1 s",
            3,
            vec![fault(
                3000,
                30_000,
                FaultKind::SlowReplies {
                    node: None,
                    extra: ms(1000),
                },
            )],
            Some(false),
        ),
        (
            "owner's outgoing heartbeats lost",
            3,
            vec![fault(
                3000,
                8000,
                FaultKind::HbLoss {
                    from: Some(owner),
                    to: None,
                },
            )],
            Some(true),
        ),
        (
            "owner dies during an API outage",
            3,
            vec![
                fault(3000, 20_000, FaultKind::ApiOutage { mode: Outage::Hang }),
                fault(8000, 30_000, FaultKind::Kill { node: owner }),
            ],
            Some(true),
        ),
        (
            "heartbeats between the owner and one candidate lost, both hear a third",
            3,
            vec![
                fault(
                    3000,
                    10_000,
                    FaultKind::HbLoss {
                        from: Some(owner),
                        to: Some(1),
                    },
                ),
                fault(
                    3000,
                    10_000,
                    FaultKind::HbLoss {
                        from: Some(1),
                        to: Some(owner),
                    },
                ),
            ],
            Some(false),
        ),
        (
            "a node hears no heartbeats (its incoming lost), 20 s",
            3,
            vec![fault(
                3000,
                20_000,
                FaultKind::HbLoss {
                    from: None,
                    to: Some(2),
                },
            )],
            Some(false),
        ),
        (
            "the owner hears no heartbeats (its incoming lost), 20 s",
            3,
            vec![fault(
                3000,
                20_000,
                FaultKind::HbLoss {
                    from: None,
                    to: Some(owner),
                },
            )],
            Some(false),
        ),
        (
            "owner frozen 1 s",
            3,
            vec![fault(3000, 1000, FaultKind::Freeze { node: owner })],
            None,
        ),
        (
            "drill step-down",
            3,
            vec![fault(3000, 100, FaultKind::StepDown { vip: 0 })],
            Some(true),
        ),
        (
            "two nodes: owner killed",
            2,
            vec![fault(3000, 15_000, FaultKind::Kill { node: owner })],
            Some(true),
        ),
        (
            "two nodes: owner's link cut",
            2,
            vec![fault(3000, 8000, FaultKind::LinkCut { node: owner })],
            None,
        ),
    ];
    for (what, nodes, faults, moves) in rows {
        for lan in [DEFAULT, FAST] {
            for seed in 0..6 {
                let s = directed(seed, nodes, lan, faults.clone());
                let o = run(&s);
                match moves {
                    Some(true) => assert!(
                        o.moves > 0,
                        "{what}: the VIP never moved\n{s}{}",
                        sim::run(&s, true).trace.join("\n")
                    ),
                    Some(false) => {
                        assert_eq!(o.moves, 0, "{what}: the VIP moved\n{s}");
                        // No outage; an owner that stops hearing everyone has one gap of
                        // at most a few heartbeat intervals while it moves to the API path.
                        let bound = if what.starts_with("the owner hears no") {
                            lan.dead_after
                        } else {
                            Duration::ZERO
                        };
                        assert!(
                            o.unanswered <= bound,
                            "{what}: nobody answered for {:?}\n{s}",
                            o.unanswered
                        );
                    }
                    None => {}
                }
            }
        }
    }
}

/// Acks that outlive a declaration (the ack lifetime three times the dead-after time) let an
/// owner whose heartbeats stopped reaching the others — and that cannot see the fence, its
/// watch cut — keep answering after a take-over: the simulator sees two nodes answering.
/// (The candidate's probe before binding would see the old owner answer and back off, so the
/// probe is left out to show the rule itself.) With the real lifetime it does not.
#[test]
fn the_simulator_finds_acks_that_outlive_a_declaration() {
    let schedules = |mutation: Option<Mutation>| {
        (0..40u64).map(move |seed| {
            let mut s = directed(
                seed,
                3,
                DEFAULT,
                vec![
                    fault(
                        3000 + 37 * seed,
                        6000,
                        FaultKind::HbLoss {
                            from: Some(0),
                            to: None,
                        },
                    ),
                    fault(
                        2000,
                        12_000,
                        FaultKind::ApiCut {
                            node: 0,
                            dir: Dir::In,
                        },
                    ),
                ],
            );
            s.mutations = mutation.into_iter().collect();
            s
        })
    };
    let found = schedules(Some(Mutation::LongAck)).any(|mut s| {
        s.mutations.push(Mutation::SkipProbe);
        // Two nodes answering, or a new owner announcing while the old one answers.
        sim::run(&s, false)
            .violation
            .is_some_and(|v| v.what.contains("answer"))
    });
    assert!(
        found,
        "the simulator misses an owner confirmed by stale acks"
    );
    for s in schedules(None) {
        run(&s);
    }
}

/// A take-over that skips fencing the holder's generation: a holder that comes back from a
/// freeze, cut from the API's watch, moves to a new generation and reopens its gate on a
/// VIP that was taken meanwhile. The fence makes that new generation impossible.
#[test]
fn the_simulator_finds_a_take_over_without_a_fence() {
    let schedules = |mutation: Option<Mutation>| {
        (0..60u64).map(move |seed| {
            let mut s = directed(
                seed,
                3,
                DEFAULT,
                vec![
                    fault(3000, 3000 + 53 * seed, FaultKind::Freeze { node: 0 }),
                    fault(2500, 20_000, FaultKind::WatchRestart { node: 0 }),
                ],
            );
            s.mutations = mutation.into_iter().collect();
            s
        })
    };
    let found =
        schedules(Some(Mutation::SkipFence)).any(|s| sim::run(&s, false).violation.is_some());
    assert!(found, "the simulator misses a take-over without a fence");
    for s in schedules(None) {
        run(&s);
    }
}

/// The mixed-version row: one node still runs the previous release (each VIP's Lease renewed
/// per IP, no heartbeats, no gate). It never takes a Lease a LAN-mode node keeps; its own
/// Leases move when it dies (never away from it while it is undisturbed: the simulator's
/// stickiness check); and it is upgraded in place, never two answering.
#[test]
fn a_rolling_upgrade_from_the_previous_release_holds_in_the_simulator() {
    let rows: Vec<(&str, usize, Vec<Fault>, bool)> = vec![
        (
            "an old standby: the new owner killed, then the old node upgraded",
            2,
            vec![
                fault(3000, 8000, FaultKind::Kill { node: 0 }),
                fault(14_000, 2000, FaultKind::Upgrade { node: 2 }),
            ],
            true,
        ),
        (
            "an old owner killed",
            0,
            vec![fault(3000, 8000, FaultKind::Kill { node: 0 })],
            true,
        ),
        // Back within the old Lease's duration, it may keep or give back its VIP.
        (
            "an old owner upgraded",
            0,
            vec![fault(3000, 2000, FaultKind::Upgrade { node: 0 })],
            false,
        ),
    ];
    for (what, old, faults, moves) in rows {
        for lan in [DEFAULT, FAST] {
            for seed in 0..6 {
                let mut s = directed(seed, 3, lan, faults.clone());
                s.previous = vec![old];
                let o = run(&s);
                assert!(!moves || o.moves > 0, "{what}: the VIP never moved\n{s}");
                assert_eq!(
                    o.previous_took_lan,
                    0,
                    "{what}: the previous release took a LAN-kept Lease\n{s}{}",
                    sim::run(&s, true).trace.join("\n")
                );
            }
        }
    }
}

/// Without the long `leaseDurationSeconds` on LAN-kept Leases, a previous-release speaker
/// sees the unrenewed Lease expire and takes it from a healthy holder. (The probe
/// before binding would hear the holder and back off, so it is left out to show the rule
/// itself.)
#[test]
fn the_simulator_finds_an_old_speaker_taking_a_lan_kept_lease() {
    let schedule = |seed: u64, mutations: Vec<Mutation>| {
        let mut s = directed(seed, 3, DEFAULT, vec![]);
        s.previous = vec![1];
        s.mutations = mutations;
        s
    };
    let found = (0..10).any(|seed| {
        let o = sim::run(
            &schedule(seed, vec![Mutation::ShortLanLease, Mutation::SkipProbe]),
            false,
        );
        // A move away from an undisturbed owner (then two answering).
        o.previous_took_lan > 0 && o.violation.is_some()
    });
    assert!(
        found,
        "the simulator misses an old speaker taking a LAN Lease"
    );
    for seed in 0..10 {
        let o = run(&schedule(seed, vec![Mutation::SkipProbe]));
        assert_eq!(o.previous_took_lan, 0);
    }
}
