//! Fault schedules: a seeded generator, and the shrinker that cuts a failing schedule down
//! to the faults that matter.

use std::fmt;
use std::time::Duration;

use l2speaker::ownership::timing::Timing;

/// splitmix64: tiny, and the same sequence for a seed on every build and platform, which a
/// replay command needs (a general-purpose crate's generator may change between versions).
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }

    pub fn ms(&mut self, lo: u64, hi: u64) -> Duration {
        Duration::from_millis(lo + self.below(hi - lo + 1))
    }

    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outage {
    /// Requests vanish (a black hole).
    Hang,
    /// Requests fail at once (503).
    Refuse,
    /// Requests wait and are served when the outage ends (a frozen API server).
    Frozen,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dir {
    /// Requests from the node never arrive.
    Out,
    /// Replies and watch events to the node are lost.
    In,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FaultKind {
    /// `kill -9` of the speaker; the DaemonSet restarts it when the fault ends.
    Kill { node: usize },
    /// SIGSTOP, then SIGCONT when the fault ends.
    Freeze { node: usize },
    /// The node's link is down: off the LAN and the API.
    LinkCut { node: usize },
    /// Partitioned from the API server only, in one direction.
    ApiCut { node: usize, dir: Dir },
    /// The API server is out for everyone.
    ApiOutage { mode: Outage },
    /// Replies (to one node, or all) take this much longer.
    SlowReplies {
        node: Option<usize>,
        extra: Duration,
    },
    /// Writes go through but their replies are lost.
    LostReplies { node: usize },
    /// The node's watch breaks; when the fault ends it relists (as after a 410).
    WatchRestart { node: usize },
    /// The VIP leaves its Service, and comes back when the fault ends.
    ServiceGone { vip: usize },
    /// A drill asks the VIP's holder to step down.
    StepDown { vip: usize },
    /// A host that is no speaker starts using the VIP (it answers probes for it).
    ForeignClaim { vip: usize },
    /// Heartbeats from `from` to `to` are lost (None: any node), in that direction only.
    HbLoss {
        from: Option<usize>,
        to: Option<usize>,
    },
    /// A rolling upgrade reaches the node: its speaker is stopped (as a DaemonSet update
    /// deletes the pod) and, when the fault ends, started again as the current release.
    Upgrade { node: usize },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fault {
    pub at: Duration,
    pub duration: Duration,
    pub kind: FaultKind,
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "at {:>6} ms for {:>5} ms: {:?}",
            self.at.as_millis(),
            self.duration.as_millis(),
            self.kind
        )
    }
}

/// Test-only changes to the shell that bring back holes closed since, to show the
/// simulator finds them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mutation {
    /// Bind and announce even when the action is past its not-after time.
    IgnoreNotAfter,
    /// The old address lifetime: the renew deadline rounded up, from the reply.
    LifetimeFromDeadline,
    /// No probe before a bind: every probe comes back clean.
    SkipProbe,
    /// LAN mode: a take-over skips fencing the holder's generation.
    SkipFence,
    /// LAN mode: acks keep an owner confirmed three times longer than a declaration takes.
    LongAck,
    /// LAN mode: a LAN-kept Lease says the per-IP lease duration instead of ten years, so
    /// a previous-release speaker sees it expire.
    ShortLanLease,
}

/// The heartbeat timings of a LAN-mode schedule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LanTiming {
    pub interval: Duration,
    pub dead_after: Duration,
    /// How long a new member waits before it counts (the speaker's `MEMBER_SETTLE`,
    /// shortened so that schedules of seconds exercise take-overs).
    pub settle: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Schedule {
    pub seed: u64,
    pub nodes: usize,
    pub vips: usize,
    pub timing: Timing,
    pub faults: Vec<Fault>,
    pub mutations: Vec<Mutation>,
    /// VIPs kept through node liveness on the LAN (None: renewed per IP).
    pub lan: Option<LanTiming>,
    /// LAN mode: nodes that run the previous release (each VIP's Lease renewed per IP, no
    /// heartbeats, no node Lease, no gate) until an [`FaultKind::Upgrade`] reaches them.
    pub previous: Vec<usize>,
}

impl Schedule {
    /// The randomized schedule for `seed`: 2–7 nodes, 1–3 VIPs, up to 6 faults.
    pub fn generate(seed: u64) -> Schedule {
        let mut r = Rng::new(seed ^ 0x5151_5151);
        let nodes = 2 + r.below(6) as usize;
        let vips = 1 + r.below(3) as usize;
        let timing = if r.chance(70) {
            Timing {
                lease: Duration::from_secs(4),
                renew_interval: Duration::from_secs(1),
                renew_deadline: Duration::from_secs(2),
            }
        } else {
            Timing {
                lease: Duration::from_secs(3),
                renew_interval: Duration::from_millis(500),
                renew_deadline: Duration::from_millis(1500),
            }
        };
        let n = r.below(7);
        let mut faults: Vec<Fault> = (0..n)
            .map(|_| {
                let at = r.ms(500, 20_000);
                let duration = match r.below(4) {
                    0 => r.ms(50, 500),
                    1 => r.ms(500, 2500),
                    _ => r.ms(2500, 8000),
                };
                let node = r.below(nodes as u64) as usize;
                let vip = r.below(vips as u64) as usize;
                let kind = match r.below(12) {
                    0 => FaultKind::Kill { node },
                    1 => FaultKind::Freeze { node },
                    2 => FaultKind::LinkCut { node },
                    3 => FaultKind::ApiCut {
                        node,
                        dir: if r.chance(50) { Dir::Out } else { Dir::In },
                    },
                    4 => FaultKind::ApiOutage {
                        mode: match r.below(3) {
                            0 => Outage::Hang,
                            1 => Outage::Refuse,
                            _ => Outage::Frozen,
                        },
                    },
                    5 => FaultKind::SlowReplies {
                        node: if r.chance(50) { Some(node) } else { None },
                        // Often just under the renew deadline, the worst case for fencing.
                        extra: if r.chance(50) {
                            timing.renew_deadline - r.ms(1, 100)
                        } else {
                            r.ms(0, 3000)
                        },
                    },
                    6 => FaultKind::LostReplies { node },
                    7 => FaultKind::WatchRestart { node },
                    8 => FaultKind::ServiceGone { vip },
                    9 => FaultKind::StepDown { vip },
                    10 => FaultKind::ForeignClaim { vip },
                    _ => FaultKind::Freeze { node },
                };
                Fault { at, duration, kind }
            })
            .collect();
        faults.sort_by_key(|f| f.at);
        Schedule {
            seed,
            nodes,
            vips,
            timing,
            faults,
            mutations: vec![],
            lan: None,
            previous: vec![],
        }
    }

    /// The randomized LAN-mode schedule for `seed`: the faults above plus heartbeat loss in
    /// either direction, the default or the fast heartbeat profile.
    pub fn generate_lan(seed: u64) -> Schedule {
        let mut s = Schedule::generate(seed);
        let mut r = Rng::new(seed ^ 0x1a2b_3c4d);
        s.lan = Some(if r.chance(60) {
            LanTiming {
                interval: Duration::from_millis(100),
                dead_after: Duration::from_millis(400),
                settle: Duration::from_secs(1),
            }
        } else {
            LanTiming {
                interval: Duration::from_millis(50),
                dead_after: Duration::from_millis(200),
                settle: Duration::from_secs(1),
            }
        });
        let extra = r.below(4);
        for _ in 0..extra {
            let node = |r: &mut Rng| Some(r.below(s.nodes as u64) as usize);
            let (from, to) = match r.below(3) {
                0 => (node(&mut r), None),
                1 => (None, node(&mut r)),
                _ => (node(&mut r), node(&mut r)),
            };
            s.faults.push(Fault {
                at: r.ms(500, 20_000),
                duration: r.ms(50, 6000),
                kind: FaultKind::HbLoss { from, to },
            });
        }
        // A rolling upgrade in progress: one node still runs the previous release, and is
        // sometimes upgraded during the schedule.
        if s.nodes >= 3 && r.chance(25) {
            let node = r.below(s.nodes as u64) as usize;
            s.previous = vec![node];
            if r.chance(50) {
                s.faults.push(Fault {
                    at: r.ms(500, 20_000),
                    duration: r.ms(100, 3000),
                    kind: FaultKind::Upgrade { node },
                });
            }
        }
        s.faults.sort_by_key(|f| f.at);
        s
    }
}

impl fmt::Display for Schedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "seed {}: {} nodes, {} VIPs, {}{}",
            self.seed,
            self.nodes,
            self.vips,
            match self.lan {
                Some(l) => format!(
                    "LAN mode: heartbeat {} ms / dead after {} ms, node lease renew {} ms / deadline {} ms",
                    l.interval.as_millis(),
                    l.dead_after.as_millis(),
                    self.timing.renew_interval.as_millis(),
                    self.timing.renew_deadline.as_millis()
                ),
                None => format!(
                    "lease {} s / renew {} ms / deadline {} ms",
                    self.timing.lease.as_secs(),
                    self.timing.renew_interval.as_millis(),
                    self.timing.renew_deadline.as_millis()
                ),
            },
            if self.mutations.is_empty() {
                String::new()
            } else {
                format!(", mutations {:?}", self.mutations)
            }
        )?;
        if !self.previous.is_empty() {
            writeln!(f, "  previous release on nodes {:?}", self.previous)?;
        }
        for fault in &self.faults {
            writeln!(f, "  {fault}")?;
        }
        Ok(())
    }
}

/// Removes faults one at a time while `fails` still holds; returns the smallest schedule
/// found (at most a few hundred runs).
pub fn shrink(schedule: &Schedule, fails: impl Fn(&Schedule) -> bool) -> Schedule {
    let mut best = schedule.clone();
    let mut progress = true;
    let mut runs = 0;
    while progress && runs < 300 {
        progress = false;
        for i in 0..best.faults.len() {
            let mut s = best.clone();
            s.faults.remove(i);
            runs += 1;
            if fails(&s) {
                best = s;
                progress = true;
                break;
            }
        }
        // Shorter faults are easier to read.
        for i in 0..best.faults.len() {
            let mut s = best.clone();
            s.faults[i].duration /= 2;
            runs += 1;
            if s.faults[i].duration >= Duration::from_millis(10) && fails(&s) {
                best = s;
                progress = true;
            }
        }
    }
    best
}
