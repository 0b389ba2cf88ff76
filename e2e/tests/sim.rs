//! The ownership simulator in the test command: randomized fault schedules against the real
//! state machine, directed schedules for each hole closed, and proof that the simulator finds
//! those holes when they are put back (mutations of the simulated shell).
//!
//! `L2S_SIM_SCHEDULES` and `L2S_SIM_SEED` change the count and the first seed; a longer soak
//! is `cargo run --release -p l2speaker-e2e --bin l2s-sim -- --duration 600`.

use std::time::Duration;

use l2speaker::ownership::timing::Timing;
use l2speaker_e2e::sim::{self, Fault, FaultKind, Mutation, Schedule};

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

const DEFAULT: Timing = Timing {
    lease: Duration::from_secs(4),
    renew_interval: Duration::from_secs(1),
    renew_deadline: Duration::from_secs(2),
};

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn directed(seed: u64, nodes: usize, timing: Timing, faults: Vec<Fault>) -> Schedule {
    Schedule {
        seed,
        nodes,
        vips: 1,
        timing,
        faults,
        mutations: vec![],
        lan: None,
        previous: vec![],
    }
}

fn fault(at: u64, duration: u64, kind: FaultKind) -> Fault {
    Fault {
        at: ms(at),
        duration: ms(duration),
        kind,
    }
}

/// Asserts the schedule keeps every invariant, with the shrunk trace if not.
fn passes(s: &Schedule) {
    let o = sim::run(s, false);
    assert!(o.violation.is_none(), "{}", sim::report(s));
}

#[test]
fn ten_thousand_randomized_fault_schedules_keep_every_ownership_invariant() {
    let count = env_u64("L2S_SIM_SCHEDULES", 10_000);
    let first = env_u64("L2S_SIM_SEED", 1);
    let started = std::time::Instant::now();
    let (failed, totals) = sim::run_many(first, count, 2);
    if let Some((s, _)) = failed {
        panic!("{}", sim::report(&s));
    }
    assert_eq!(totals.schedules, count);
    assert!(
        totals.faults > count,
        "the schedules carry faults ({} in all)",
        totals.faults
    );
    assert!(totals.moves > 0, "some schedules move VIPs");
    println!(
        "{} schedules from seed {first}: {} faults, {} ownership moves, {} events, {:.1} s",
        totals.schedules,
        totals.faults,
        totals.moves,
        totals.events,
        started.elapsed().as_secs_f64()
    );
}

/// The owner is node-0 (first in rank for VIP 0); every schedule here does something to it.
#[test]
fn directed_schedules_for_each_closed_hole_keep_every_invariant() {
    for seed in 0..40 {
        // kill -9 of the owner's speaker while its node stays on the LAN
        passes(&directed(
            seed,
            3,
            DEFAULT,
            vec![fault(3000, 10_000, FaultKind::Kill { node: 0 })],
        ));
        // the owner's renewals answered just before the deadline, for a long while
        passes(&directed(
            seed,
            3,
            DEFAULT,
            vec![fault(
                2000,
                20_000,
                FaultKind::SlowReplies {
                    node: Some(0),
                    extra: DEFAULT.renew_deadline - ms(5 + seed),
                },
            )],
        ));
        // every acquire's reply delayed past the lease
        passes(&directed(
            seed,
            3,
            DEFAULT,
            vec![fault(
                0,
                15_000,
                FaultKind::SlowReplies {
                    node: None,
                    extra: DEFAULT.lease + ms(1000),
                },
            )],
        ));
        // the owner frozen for 5 s and for 1 s, at moments spread over its first renewals
        for (at, len) in [(1200 + 37 * seed, 5000), (900 + 53 * seed, 1000)] {
            passes(&directed(
                seed,
                3,
                DEFAULT,
                vec![fault(at, len, FaultKind::Freeze { node: 0 })],
            ));
        }
        // the API server frozen while the owner is killed
        passes(&directed(
            seed,
            3,
            DEFAULT,
            vec![
                fault(
                    3000,
                    8000,
                    FaultKind::ApiOutage {
                        mode: sim::Outage::Frozen,
                    },
                ),
                fault(4000, 10_000, FaultKind::Kill { node: 0 }),
            ],
        ));
    }
}

/// The old address lifetime (the renew deadline rounded up, counted from the reply) with the
/// old fast profile: a killed owner's address outlives its Lease. The simulator must see two
/// nodes answering.
#[test]
fn the_simulator_finds_the_old_address_lifetime_hole() {
    let old_fast = Timing {
        lease: Duration::from_secs(1),
        renew_interval: ms(250),
        renew_deadline: ms(750),
    };
    let found = (0..100).find(|seed| {
        let mut s = directed(
            *seed,
            3,
            old_fast,
            vec![fault(3000 + 7 * seed, 10_000, FaultKind::Kill { node: 0 })],
        );
        s.mutations = vec![Mutation::LifetimeFromDeadline, Mutation::SkipProbe];
        sim::run(&s, false)
            .violation
            .is_some_and(|v| v.what.contains("answered by") || v.what.contains("announced"))
    });
    assert!(found.is_some(), "the simulator misses the lifetime hole");
    assert!(
        old_fast.check().is_err(),
        "and start-up refuses that profile"
    );
}

/// A speaker frozen between deciding to announce and sending: with the not-after check taken
/// out of the shell, it announces after a peer took over.
#[test]
fn the_simulator_finds_a_late_announcement_when_not_after_is_ignored() {
    let schedules = |mutation: Option<Mutation>| {
        (0..200u64).map(move |seed| {
            let mut s = directed(
                seed,
                3,
                DEFAULT,
                vec![fault(300 + 23 * seed, 9000, FaultKind::Freeze { node: 0 })],
            );
            s.mutations = mutation.into_iter().collect();
            s
        })
    };
    let found = schedules(Some(Mutation::IgnoreNotAfter)).any(|s| {
        sim::run(&s, false)
            .violation
            .is_some_and(|v| v.what.contains("announced"))
    });
    assert!(found, "the simulator misses a late announcement");
    for s in schedules(None) {
        passes(&s);
    }
}

#[test]
fn a_failing_schedule_is_replayable_by_seed_and_shrinks() {
    // Same seed, same run: the simulator is deterministic.
    let s = Schedule::generate(4242);
    let (a, b) = (sim::run(&s, true), sim::run(&s, true));
    assert_eq!(a.events, b.events);
    assert_eq!(a.trace, b.trace);
    // The shrinker keeps only what the failure needs.
    let noisy = |seed| {
        let mut s = directed(
            seed,
            3,
            Timing {
                lease: Duration::from_secs(1),
                renew_interval: ms(250),
                renew_deadline: ms(750),
            },
            vec![
                fault(1000, 300, FaultKind::WatchRestart { node: 2 }),
                fault(3000, 10_000, FaultKind::Kill { node: 0 }),
                fault(5000, 200, FaultKind::StepDown { vip: 0 }),
            ],
        );
        s.mutations = vec![Mutation::LifetimeFromDeadline, Mutation::SkipProbe];
        s
    };
    let fails = |x: &Schedule| sim::run(x, false).violation.is_some();
    let noisy = (0..50)
        .map(noisy)
        .find(|s| fails(s))
        .expect("a mutated schedule that fails");
    let small = sim::schedule::shrink(&noisy, fails);
    assert!(fails(&small));
    assert_eq!(
        small.faults.iter().map(|f| &f.kind).collect::<Vec<_>>(),
        [&FaultKind::Kill { node: 0 }],
        "{small}"
    );
    assert!(sim::report(&noisy).contains(&format!("--seed {}", noisy.seed)));
}

/// A host that is no speaker uses a pool IP: no speaker binds it while it does (each probe
/// is answered), and once it stops one speaker owns the IP within the settle bound. Without
/// the probe the simulator sees the bind.
#[test]
fn a_foreign_host_using_the_ip_is_never_displaced() {
    for seed in 0..30 {
        let claim = vec![fault(
            0,
            12_000 + 97 * seed,
            FaultKind::ForeignClaim { vip: 0 },
        )];
        passes(&directed(seed, 3, DEFAULT, claim.clone()));
        let mut blind = directed(seed, 3, DEFAULT, claim);
        blind.mutations = vec![Mutation::SkipProbe];
        let v = sim::run(&blind, false)
            .violation
            .expect("found without the probe");
        assert!(v.what.contains("foreign host"), "{v:?}");
    }
}
