//! The ownership simulator from the command line: replay one seed with its trace, or soak
//! for a number of schedules or a duration.
//!
//! ```text
//! l2s-sim --seed 1234 --trace          # replay one schedule, print every event
//! l2s-sim --schedules 1000000          # soak by count
//! l2s-sim --duration 600               # soak for ten minutes
//! l2s-sim --lan --schedules 10000      # LAN mode (node liveness, arbitration in the API)
//! ```

use std::time::{Duration, Instant};

use clap::Parser;
use l2speaker_e2e::sim;

#[derive(Parser)]
struct Args {
    /// Replay this one schedule.
    #[arg(long)]
    seed: Option<u64>,
    /// With --seed: print the whole trace.
    #[arg(long)]
    trace: bool,
    /// Soak: how many schedules (from --first-seed).
    #[arg(long, default_value_t = 10_000)]
    schedules: u64,
    /// Soak: keep going for this many seconds instead of a count.
    #[arg(long)]
    duration: Option<u64>,
    #[arg(long, default_value_t = 1)]
    first_seed: u64,
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// LAN-mode schedules (node liveness on the LAN, arbitration in the API).
    #[arg(long)]
    lan: bool,
}

fn main() {
    let a = Args::parse();
    if let Some(seed) = a.seed {
        let s = if a.lan {
            sim::Schedule::generate_lan(seed)
        } else {
            sim::Schedule::generate(seed)
        };
        print!("{s}");
        let o = sim::run(&s, a.trace);
        for line in &o.trace {
            println!("{line}");
        }
        match o.violation {
            Some(_) => {
                println!("{}", sim::report(&s));
                std::process::exit(1);
            }
            None => println!("ok: {} events, {} moves", o.events, o.moves),
        }
        return;
    }
    let started = Instant::now();
    let deadline = a.duration.map(|d| started + Duration::from_secs(d));
    let batch = if deadline.is_some() {
        10_000
    } else {
        a.schedules
    };
    let mut seed = a.first_seed;
    let mut total = sim::Totals::default();
    loop {
        let (failed, t) = if a.lan {
            sim::run_many_lan(seed, batch, a.threads)
        } else {
            sim::run_many(seed, batch, a.threads)
        };
        total.schedules += t.schedules;
        total.events += t.events;
        total.moves += t.moves;
        total.faults += t.faults;
        if let Some((s, _)) = failed {
            println!("{}", sim::report(&s));
            std::process::exit(1);
        }
        seed += batch;
        if deadline.is_none_or(|d| Instant::now() >= d) {
            break;
        }
    }
    println!(
        "{} schedules passed ({} faults, {} ownership moves, {} events) in {:.1} s",
        total.schedules,
        total.faults,
        total.moves,
        total.events,
        started.elapsed().as_secs_f64()
    );
}
