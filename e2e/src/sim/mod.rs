//! A deterministic simulator for ownership: N speakers run the real Lease holder state
//! machine (`l2speaker::ownership::machine`) against a simulated API server (CAS, watches
//! with delay and order, relists, slow, lost and refused replies, outages), simulated
//! kernels (addresses whose lifetimes expire on a coarse one-second timer, like the real
//! one, and DNAT state) and a simulated LAN, on a simulated clock, under a fault schedule.
//!
//! Invariants, checked after every event:
//! - at most one node on the LAN has the VIP's address (so at most one answers ARP/NS), and
//!   no node announces a VIP while another answers for it;
//! - once faults heal, every VIP has exactly one owner within [`settle_bound`];
//! - a VIP never moves while its owner is undisturbed (stickiness);
//! - in the end no address or DNAT entry is left that no Lease justifies.
//!
//! The simulated shell performs actions as the real one does: API requests cut off at their
//! deadline, binds and announcements dropped after their not-after time, lifetimes from
//! `timing::lifetime`. Model-checked and randomized, not proven.

pub mod schedule;

use std::cmp::Reverse;
use std::collections::{BTreeSet, BinaryHeap, HashMap};
use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use l2speaker::coordinator::{FAIR_SHARE_WAIT, INITIAL_RANK_STEP, RANK_STEP, delay_for};
use l2speaker::dataplane::probe::PROBE_WAIT;
use l2speaker::lease;
use l2speaker::liveness::peers::Peers;
use l2speaker::liveness::wire::Heartbeat;
use l2speaker::ownership::machine::CONFLICT_RETRY;
use l2speaker::ownership::machine::{
    Action, Holder, HolderNode, Input, Kind, Observed, Reply, Report, ReqId, Stop, View,
};
use l2speaker::ownership::node::{
    NodeAction, NodeInput, NodeKeeper, NodeLeaseState, NodeReply, NodeTiming,
};
use l2speaker::ownership::quorum;
use l2speaker::ownership::timing::{self, KERNEL_GRANULARITY};
use tokio::time::Instant;

pub use schedule::{Dir, Fault, FaultKind, LanTiming, Mutation, Outage, Rng, Schedule};

/// The longest a gate refresh opens it for (the speaker's `GATE_MAX`).
const GATE_MAX: Duration = Duration::from_millis(500);
/// The wall clock of simulated time zero, in microseconds (heartbeat seqs carry it).
const WALL0: u64 = 1_764_000_000_000_000;

/// Simulated time since the start.
type T = Duration;

/// How long after the last fault heals every VIP must have exactly one owner.
pub fn settle_bound(s: &Schedule) -> Duration {
    let n = s.nodes as u32;
    s.timing.lease
        + s.timing.renew_deadline
        + timing::RELEASE_DEADLINE
        + INITIAL_RANK_STEP * n
        + RANK_STEP * n
        + FAIR_SHARE_WAIT
        + CONFLICT_RETRY
        + PROBE_WAIT
        + Duration::from_secs(2)
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    pub at: Duration,
    pub what: String,
}

#[derive(Debug, Clone, Default)]
pub struct Outcome {
    pub violation: Option<Violation>,
    pub events: u64,
    /// Ownership changes seen in the API (holder A → B, also by way of a release).
    pub moves: u64,
    /// Take-overs by a previous-release node of a Lease that a LAN-mode node holds.
    pub previous_took_lan: u64,
    /// How long, summed over VIPs, no node answered for a VIP that is in a Service and had
    /// answered before (the outage a client would see, give or take its ARP cache).
    pub unanswered: Duration,
    pub trace: Vec<String>,
}

#[derive(Debug, Clone)]
enum Op {
    Acquire(Option<u64>),
    Renew(u64),
    Release { rv: u64, step_down: bool },
    Delete(u64),
    Fence { target: usize, generation: u32 },
}

#[derive(Debug, Clone)]
enum NodeOp {
    Write {
        rv: Option<u64>,
        generation: u32,
        api_path: bool,
    },
}

/// A node Lease in the simulated API.
#[derive(Debug, Clone, PartialEq, Eq)]
struct NodeObj {
    rv: u64,
    generation: u32,
    fenced: Option<u32>,
    api_path: bool,
    created: T,
}

impl NodeObj {
    fn state(&self) -> NodeLeaseState {
        NodeLeaseState {
            resource_version: self.rv.to_string(),
            generation: self.generation,
            fenced: self.fenced,
            api_path: self.api_path,
        }
    }
}

#[derive(Debug, Clone)]
enum Ev {
    Tick {
        node: usize,
        slot: u64,
        generation: u64,
    },
    ApiArrive {
        node: usize,
        inc: u32,
        slot: u64,
        req: ReqId,
        vip: usize,
        op: Op,
    },
    ReplyArrive {
        node: usize,
        inc: u32,
        slot: u64,
        req: ReqId,
        reply: Reply,
        rv: Option<u64>,
    },
    Deadline {
        node: usize,
        inc: u32,
        slot: u64,
        req: ReqId,
    },
    Watch {
        node: usize,
        conn: u64,
        vip: usize,
        state: Option<LeaseObj>,
    },
    KernelGc {
        node: usize,
    },
    Carrier {
        node: usize,
    },
    FaultStart(usize),
    FaultEnd(usize),
    Synced {
        node: usize,
        inc: u32,
    },
    Presence {
        node: usize,
        vip: usize,
        present: bool,
    },
    ProbeDone {
        node: usize,
        inc: u32,
        slot: u64,
        req: ReqId,
    },
    /// LAN mode: the node's heartbeat timer (keeper step, gate refresh, one frame out).
    Hb {
        node: usize,
        inc: u32,
        chain: u64,
    },
    HbArrive {
        node: usize,
        inc: u32,
        frame: Heartbeat,
    },
    /// LAN mode: the keeper woken between ticks (a peer fell silent for dead-after, or a
    /// peer's declarations changed); a frame goes out only if ours changed.
    HbWake {
        node: usize,
        inc: u32,
        /// For a peer falling silent (stale once a later deadline replaced it).
        silence: bool,
    },
    NodeArrive {
        node: usize,
        inc: u32,
        req: ReqId,
        op: NodeOp,
    },
    NodeReplyArrive {
        node: usize,
        inc: u32,
        req: ReqId,
        reply: NodeReply,
    },
    NodeDeadline {
        node: usize,
        inc: u32,
        req: ReqId,
    },
    NodeWatch {
        node: usize,
        conn: u64,
        of: usize,
        state: Option<NodeObj>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct LeaseObj {
    rv: u64,
    lan: bool,
    holder: Option<String>,
    duration_s: u64,
    step_down: bool,
    stepped_down_from: Option<String>,
}

struct Slot {
    id: u64,
    vip: usize,
    h: Holder,
    generation: u64,
    pending: HashMap<ReqId, ()>,
    /// The resourceVersion of what our last write returned (the shell's `held`).
    held: Option<u64>,
    /// The resourceVersion the view showed (the CAS base of an acquire).
    last_view: Option<View>,
}

/// What a node's views depend on in LAN mode: whether it may take VIPs, and for each node
/// Lease (generation, fenced, declared dead since).
type LanSummary = (bool, Vec<Option<(u32, bool, Option<T>)>>);

struct Node {
    name: String,
    /// Runs the previous release: VIP Leases renewed per IP, no LAN liveness, no gate.
    previous: bool,
    alive: bool,
    inc: u32,
    frozen: bool,
    /// SIGSTOP lands in the middle of the next step: its actions wait for SIGCONT.
    stalling: bool,
    deferred: Vec<(u64, usize, Action)>,
    synced: bool,
    /// Inputs that arrived while frozen: (slot or watch), replayed on resume.
    queued: Vec<Ev>,
    link_up: bool,
    carrier_seen: bool,
    api_out: bool,
    api_in: bool,
    lost_replies: bool,
    slow: Duration,
    watch_conn: u64,
    watch_ok: bool,
    last_delivery: Vec<T>,
    seen: Vec<Option<Observed>>,
    /// The Lease objects as this node's cache holds them.
    cache: Vec<Option<LeaseObj>>,
    absent_since: Vec<T>,
    present: Vec<bool>,
    slots: Vec<Slot>,
    /// Address on the interface: when its lifetime ends (removed at the next GC tick).
    kernel: Vec<Option<T>>,
    dnat: Vec<bool>,
    /// When this node was disturbed (fault intervals), for the stickiness check.
    disturbed: Vec<(T, T)>,
    /// LAN mode: the real peer table and node keeper, the kernel gate, the node Leases as
    /// this node's cache holds them, and since when a majority declared each node dead.
    peers: Peers,
    keeper: Option<NodeKeeper>,
    gate_until: T,
    ncache: Vec<Option<NodeObj>>,
    /// When this node saw each node Lease change last.
    nseen: Vec<T>,
    dead_since: Vec<Option<T>>,
    started: T,
    node_pending: Option<ReqId>,
    hb_chain: u64,
    /// When the keeper is woken next for a peer falling silent.
    silence_at: Option<T>,
    lan_summary: Option<LanSummary>,
}

pub struct Sim {
    s: Schedule,
    now: T,
    base: Instant,
    seq: u64,
    queue: BinaryHeap<Reverse<(T, u64, usize)>>,
    evs: Vec<Option<Ev>>,
    rng: Rng,
    nodes: Vec<Node>,
    api: Vec<Option<LeaseObj>>,
    rv: u64,
    outage: Option<Outage>,
    frozen_requests: Vec<Ev>,
    slow_all: Duration,
    holder_since: Vec<T>,
    /// Whether each VIP is in a Service now (the truth; nodes learn it with a delay).
    present: Vec<bool>,
    /// Whether a host that is no speaker uses each VIP now.
    foreign: Vec<bool>,
    vip_disturbed: Vec<Vec<(T, T)>>,
    global_disturbed: Vec<(T, T)>,
    next_slot: u64,
    out: Outcome,
    tracing: bool,
    /// LAN mode: node Leases in the API, and the heartbeat losses in force.
    napi: Vec<Option<NodeObj>>,
    hb_loss: Vec<(usize, Option<usize>, Option<usize>)>,
    last_holder: Vec<Option<String>>,
    /// Whether each VIP has been answered for yet (its outage counts from then on).
    answered_once: Vec<bool>,
}

fn ip(vip: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(192, 0, 2, 200 + vip as u8))
}

fn k8s_lease(o: &LeaseObj) -> Lease {
    let mut l = Lease::default();
    l.metadata.resource_version = Some(o.rv.to_string());
    l.spec = Some(LeaseSpec {
        holder_identity: o.holder.clone(),
        lease_duration_seconds: Some(o.duration_s as i32),
        ..Default::default()
    });
    let mut a = std::collections::BTreeMap::new();
    if o.step_down {
        a.insert(lease::ANNOTATION_STEP_DOWN.to_string(), "drill".to_string());
    }
    if let Some(f) = &o.stepped_down_from {
        a.insert(lease::ANNOTATION_STEPPED_DOWN_FROM.to_string(), f.clone());
    }
    if o.lan
        && let Some(h) = &o.holder
    {
        a.insert(lease::ANNOTATION_LAN_HOLDER.to_string(), h.clone());
    }
    if !a.is_empty() {
        l.metadata.annotations = Some(a);
    }
    l
}

/// Runs one schedule to its end (the last fault healed plus [`settle_bound`]).
pub fn run(s: &Schedule, tracing: bool) -> Outcome {
    let mut sim = Sim::new(s.clone(), tracing);
    sim.run();
    sim.out
}

impl Sim {
    fn new(s: Schedule, tracing: bool) -> Sim {
        let rng = Rng::new(s.seed);
        let nodes = (0..s.nodes)
            .map(|i| Node {
                name: format!("node-{i}"),
                previous: s.previous.contains(&i),
                alive: true,
                inc: 0,
                frozen: false,
                stalling: false,
                deferred: vec![],
                synced: false,
                queued: vec![],
                link_up: true,
                carrier_seen: true,
                api_out: true,
                api_in: true,
                lost_replies: false,
                slow: Duration::ZERO,
                watch_conn: 0,
                watch_ok: true,
                last_delivery: vec![T::ZERO; s.vips],
                seen: vec![None; s.vips],
                cache: vec![None; s.vips],
                absent_since: vec![T::ZERO; s.vips],
                present: vec![true; s.vips],
                slots: vec![],
                kernel: vec![None; s.vips],
                dnat: vec![false; s.vips],
                disturbed: vec![],
                peers: Peers::new(
                    &format!("node-{i}"),
                    s.lan
                        .map(|l| l.dead_after)
                        .unwrap_or(Duration::from_secs(1)),
                ),
                keeper: None,
                gate_until: T::ZERO,
                ncache: vec![None; s.nodes],
                nseen: vec![T::ZERO; s.nodes],
                dead_since: vec![None; s.nodes],
                started: T::ZERO,
                node_pending: None,
                hb_chain: 0,
                silence_at: None,
                lan_summary: None,
            })
            .collect();
        Sim {
            now: T::ZERO,
            base: Instant::now(),
            seq: 0,
            queue: BinaryHeap::new(),
            evs: vec![],
            rng,
            nodes,
            api: vec![None; s.vips],
            rv: 0,
            outage: None,
            frozen_requests: vec![],
            slow_all: Duration::ZERO,
            holder_since: vec![T::ZERO; s.vips],
            present: vec![true; s.vips],
            foreign: vec![false; s.vips],
            vip_disturbed: vec![vec![]; s.vips],
            global_disturbed: vec![],
            next_slot: 0,
            out: Outcome::default(),
            tracing,
            napi: vec![None; s.nodes],
            hb_loss: vec![],
            last_holder: vec![None; s.vips],
            answered_once: vec![false; s.vips],
            s,
        }
    }

    fn node_timing(&self) -> NodeTiming {
        let l = self.s.lan.expect("LAN mode");
        NodeTiming {
            renew_interval: self.s.timing.renew_interval,
            renew_deadline: self.s.timing.renew_deadline,
            dead_after: if self.s.mutations.contains(&Mutation::LongAck) {
                l.dead_after * 3
            } else {
                l.dead_after
            },
        }
    }

    fn gate_open(&self, node: usize) -> bool {
        self.s.lan.is_none() || self.nodes[node].previous || self.now < self.nodes[node].gate_until
    }

    /// A (re)started speaker in LAN mode: a fresh peer table and keeper (from its node Lease
    /// as it is now), its heartbeat timer.
    fn start_lan(&mut self, node: usize) {
        let Some(l) = self.s.lan else { return };
        if self.nodes[node].previous {
            return;
        }
        let inst = self.instant(self.now);
        let timing = self.node_timing();
        let state = self.napi[node].as_ref().map(NodeObj::state);
        let n = &mut self.nodes[node];
        n.peers = Peers::new(&n.name, l.dead_after);
        n.keeper = Some(NodeKeeper::new(timing, state, inst));
        n.started = self.now;
        n.node_pending = None;
        n.dead_since = vec![None; self.s.nodes];
        n.ncache = self.napi.clone();
        n.nseen = vec![self.now; self.s.nodes];
        n.lan_summary = None;
        n.hb_chain += 1;
        n.silence_at = None;
        let (inc, chain) = (n.inc, n.hb_chain);
        let d = self.rng.ms(0, l.interval.as_millis() as u64);
        self.at(self.now + d, Ev::Hb { node, inc, chain });
    }

    fn at(&mut self, t: T, ev: Ev) {
        self.seq += 1;
        self.evs.push(Some(ev));
        self.queue.push(Reverse((t, self.seq, self.evs.len() - 1)));
    }

    fn trace(&mut self, msg: impl FnOnce() -> String) {
        if self.tracing {
            let m = msg();
            self.out
                .trace
                .push(format!("{:>7.3}s {m}", self.now.as_secs_f64()));
        }
    }

    fn instant(&self, t: T) -> Instant {
        self.base + t
    }

    fn violate(&mut self, what: String) {
        if self.out.violation.is_none() {
            self.trace(|| format!("VIOLATION: {what}"));
            self.out.violation = Some(Violation { at: self.now, what });
        }
    }

    fn end_of_faults(&self) -> T {
        self.s
            .faults
            .iter()
            .map(|f| f.at + f.duration)
            .max()
            .unwrap_or(T::ZERO)
    }

    fn run(&mut self) {
        for i in 0..self.s.nodes {
            let start = self.rng.ms(0, 500);
            let inc = self.nodes[i].inc;
            self.at(start, Ev::Synced { node: i, inc });
            let phase = self.rng.ms(0, 999);
            self.at(phase, Ev::KernelGc { node: i });
            self.start_lan(i);
        }
        for (i, f) in self.s.faults.clone().iter().enumerate() {
            self.at(f.at, Ev::FaultStart(i));
            self.at(f.at + f.duration, Ev::FaultEnd(i));
        }
        let healed = self.end_of_faults();
        let end = healed.max(Duration::from_secs(5)) + settle_bound(&self.s);
        while let Some(Reverse((t, _, idx))) = self.queue.pop() {
            if t > end {
                break;
            }
            self.count_unanswered(t);
            self.now = t;
            let ev = self.evs[idx].take().expect("each event once");
            self.out.events += 1;
            self.handle(ev);
            self.check_safety();
            if self.out.violation.is_some() {
                return;
            }
        }
        self.count_unanswered(end);
        self.now = end;
        self.check_settled();
    }

    /// Events for a node's process: dropped when it is not the incarnation they were meant
    /// for, kept for later while it is frozen.
    fn for_the_process(&mut self, ev: Ev) -> Option<Ev> {
        let (node, inc) = match &ev {
            Ev::ReplyArrive { node, inc, .. }
            | Ev::Deadline { node, inc, .. }
            | Ev::ProbeDone { node, inc, .. }
            | Ev::HbArrive { node, inc, .. }
            | Ev::HbWake { node, inc, .. }
            | Ev::NodeReplyArrive { node, inc, .. }
            | Ev::NodeDeadline { node, inc, .. } => (*node, *inc),
            _ => return Some(ev),
        };
        let n = &mut self.nodes[node];
        if !n.alive || n.inc != inc {
            return None;
        }
        if n.frozen {
            n.queued.push(ev);
            return None;
        }
        Some(ev)
    }

    fn handle(&mut self, ev: Ev) {
        let Some(ev) = self.for_the_process(ev) else {
            return;
        };
        match ev {
            Ev::Tick {
                node,
                slot,
                generation,
            } => {
                let n = &self.nodes[node];
                // A frozen process's timers fire when it resumes (every holder is ticked then).
                if n.frozen {
                    return;
                }
                if n.slots
                    .iter()
                    .any(|s| s.id == slot && s.generation == generation)
                {
                    self.input(node, slot, Input::Tick);
                }
            }
            Ev::Synced { node, inc } => {
                let n = &mut self.nodes[node];
                if !n.alive || n.inc != inc {
                    return;
                }
                if n.frozen {
                    n.queued.push(Ev::Synced { node, inc });
                    return;
                }
                n.synced = true;
                n.cache = self.api.clone();
                for v in 0..self.s.vips {
                    self.nodes[node].absent_since[v] = self.now;
                    self.nodes[node].seen[v] = None;
                }
                self.refresh_views(node);
            }
            Ev::KernelGc { node } => {
                let now = self.now;
                let n = &mut self.nodes[node];
                for v in 0..n.kernel.len() {
                    if n.kernel[v].is_some_and(|until| until <= now) {
                        n.kernel[v] = None;
                        if self.tracing {
                            self.out.trace.push(format!(
                                "{:>7.3}s node-{node}: kernel expired the address of VIP {v}",
                                now.as_secs_f64()
                            ));
                        }
                    }
                }
                self.at(now + KERNEL_GRANULARITY, Ev::KernelGc { node });
            }
            Ev::Carrier { node } => {
                let n = &mut self.nodes[node];
                if n.alive && n.frozen {
                    n.queued.push(Ev::Carrier { node });
                    return;
                }
                if n.carrier_seen != n.link_up {
                    n.carrier_seen = n.link_up;
                    if n.alive && n.synced {
                        self.refresh_views(node);
                    }
                }
            }
            Ev::ApiArrive {
                node,
                inc,
                slot,
                req,
                vip,
                op,
            } => self.api_arrive(node, inc, slot, req, vip, op),
            Ev::ReplyArrive {
                node,
                inc: _,
                slot,
                req,
                reply,
                rv,
            } => {
                let n = &mut self.nodes[node];
                let Some(sl) = n.slots.iter_mut().find(|s| s.id == slot) else {
                    return;
                };
                if sl.pending.remove(&req).is_none() {
                    return; // the deadline came first
                }
                if let Some(rv) = rv {
                    sl.held = Some(rv);
                }
                self.input(node, slot, Input::Reply { req, reply });
            }
            Ev::Deadline {
                node,
                inc: _,
                slot,
                req,
            } => {
                let n = &mut self.nodes[node];
                let Some(sl) = n.slots.iter_mut().find(|s| s.id == slot) else {
                    return;
                };
                if sl.pending.remove(&req).is_some() {
                    self.input(
                        node,
                        slot,
                        Input::Reply {
                            req,
                            reply: Reply::Failed("deadline".into()),
                        },
                    );
                }
            }
            Ev::Watch {
                node,
                conn,
                vip,
                state,
            } => {
                let n = &mut self.nodes[node];
                if !n.alive || n.watch_conn != conn || !n.watch_ok {
                    return;
                }
                if n.frozen {
                    n.queued.push(Ev::Watch {
                        node,
                        conn,
                        vip,
                        state,
                    });
                    return;
                }
                n.cache[vip] = state;
                if n.synced {
                    self.refresh_views(node);
                }
            }
            Ev::Presence { node, vip, present } => {
                let n = &mut self.nodes[node];
                if !n.alive {
                    n.present[vip] = present;
                    return;
                }
                if n.frozen {
                    n.queued.push(Ev::Presence { node, vip, present });
                    return;
                }
                self.set_presence(node, vip, present);
            }
            Ev::ProbeDone {
                node,
                inc: _,
                slot,
                req,
            } => {
                let n = &self.nodes[node];
                let Some(vip) = n.slots.iter().find(|s| s.id == slot).map(|s| s.vip) else {
                    return;
                };
                // Whoever holds the VIP when the probe's wait ends has answered it.
                let answered_by = if self.s.mutations.contains(&Mutation::SkipProbe) {
                    None
                } else if self.foreign[vip] {
                    Some("foreign".to_string())
                } else {
                    (0..self.nodes.len())
                        .find(|i| *i != node && self.answers(*i, vip))
                        .map(|i| self.nodes[i].name.clone())
                };
                self.input(node, slot, Input::Probed { req, answered_by });
            }
            Ev::FaultStart(i) => self.fault(i, true),
            Ev::FaultEnd(i) => self.fault(i, false),
            Ev::Hb { node, inc, chain } => {
                let n = &self.nodes[node];
                if !n.alive || n.inc != inc || n.frozen || n.hb_chain != chain {
                    return;
                }
                self.heartbeat(node, false);
                let every = self.s.lan.expect("LAN mode").interval;
                let jitter = self.rng.ms(0, 3);
                self.at(self.now + every + jitter, Ev::Hb { node, inc, chain });
            }
            // The previous release does not listen for heartbeats.
            Ev::HbArrive { node, .. } if self.nodes[node].previous => {}
            Ev::HbArrive { node, inc, frame } => {
                let wall = WALL0 + self.now.as_micros() as u64;
                let at = self.instant(self.now).into_std();
                self.nodes[node].peers.receive(1, &frame, at, wall);
                if self.nodes[node].peers.take_news() {
                    let lat = self.rng.ms(0, 2);
                    self.at(
                        self.now + lat,
                        Ev::HbWake {
                            node,
                            inc,
                            silence: false,
                        },
                    );
                }
            }
            Ev::HbWake { node, silence, .. } => {
                // A silence timer the keeper has since moved (the peer was heard) is no wake.
                if !silence || self.nodes[node].silence_at == Some(self.now) {
                    self.heartbeat(node, true);
                }
            }
            Ev::NodeArrive { node, inc, req, op } => self.node_arrive(node, inc, req, op),
            Ev::NodeReplyArrive {
                node, req, reply, ..
            } => {
                if self.nodes[node].node_pending == Some(req) {
                    self.nodes[node].node_pending = None;
                    self.keeper_step(node, NodeInput::Reply { req, reply });
                }
            }
            Ev::NodeDeadline { node, req, .. } => {
                if self.nodes[node].node_pending == Some(req) {
                    self.nodes[node].node_pending = None;
                    let reply = NodeReply::Failed("deadline".into());
                    self.keeper_step(node, NodeInput::Reply { req, reply });
                }
            }
            Ev::NodeWatch {
                node,
                conn,
                of,
                state,
            } => {
                let n = &mut self.nodes[node];
                if !n.alive || n.watch_conn != conn || !n.watch_ok {
                    return;
                }
                if n.frozen {
                    n.queued.push(Ev::NodeWatch {
                        node,
                        conn,
                        of,
                        state,
                    });
                    return;
                }
                if n.ncache[of] != state {
                    n.nseen[of] = self.now;
                }
                n.ncache[of] = state.clone();
                if of == node
                    && let Some(st) = state
                {
                    self.keeper_step(node, NodeInput::Observed(st.state()));
                }
            }
        }
    }

    /// Steps the node keeper and performs its actions.
    fn keeper_step(&mut self, node: usize, input: NodeInput) {
        let inst = self.instant(self.now);
        let n = &mut self.nodes[node];
        if !n.alive {
            return;
        }
        let Some(k) = n.keeper.as_mut() else { return };
        let (actions, _wake) = k.step(input, inst);
        for a in actions {
            match a {
                NodeAction::Write {
                    req,
                    resource_version,
                    generation,
                    api_path,
                    deadline,
                } => {
                    let inc = self.nodes[node].inc;
                    self.nodes[node].node_pending = Some(req);
                    let d = deadline.saturating_duration_since(self.base).max(self.now);
                    self.at(d, Ev::NodeDeadline { node, inc, req });
                    let n = &self.nodes[node];
                    if n.link_up && n.api_out {
                        let lat = self.latency();
                        let rv = resource_version.map(|r| r.parse::<u64>().expect("numeric"));
                        self.at(
                            self.now + lat,
                            Ev::NodeArrive {
                                node,
                                inc,
                                req,
                                op: NodeOp::Write {
                                    rv,
                                    generation,
                                    api_path,
                                },
                            },
                        );
                    }
                }
                NodeAction::DropAll { fenced } => {
                    let name = self.nodes[node].name.clone();
                    self.trace(|| {
                        format!("{name}: fenced in generation {fenced}: dropping every VIP")
                    });
                    let ids: Vec<u64> = self.nodes[node].slots.iter().map(|s| s.id).collect();
                    for id in ids {
                        self.input(node, id, Input::Fenced);
                    }
                }
                NodeAction::Generation(g) => {
                    let name = self.nodes[node].name.clone();
                    self.trace(|| format!("{name}: now in generation {g}"));
                    self.nodes[node].peers.set_generation(g);
                }
            }
        }
    }

    /// One heartbeat tick (or a wake between ticks): declarations, the keeper, the gate
    /// refresh, a frame to every peer (on a wake only when our declarations changed), and the
    /// take-over evidence.
    fn heartbeat(&mut self, node: usize, wake: bool) {
        let l = self.s.lan.expect("LAN mode");
        let now = self.now;
        let inst = self.instant(now);
        let at = inst.into_std();
        let wall = WALL0 + now.as_micros() as u64;
        let members: Vec<usize> = (0..self.s.nodes)
            .filter(|i| self.nodes[node].ncache[*i].is_some())
            .collect();
        let names: Vec<String> = members
            .iter()
            .map(|i| self.nodes[*i].name.clone())
            .collect();
        let n = &mut self.nodes[node];
        let gens: Vec<(&str, u32)> = members
            .iter()
            .zip(&names)
            .map(|(i, name)| {
                let g = n.ncache[*i].as_ref().map(|o| o.generation).unwrap_or(0);
                (name.as_str(), g)
            })
            .collect();
        let before = n.peers.dead_list();
        n.peers
            .declare_silent_members(&gens, now >= n.started + l.dead_after, at);
        let send = !wake || n.peers.dead_list() != before;
        let silence = n.peers.next_silence(at).map(|t| {
            Instant::from_std(t).saturating_duration_since(self.base) + Duration::from_millis(1)
        });
        if let Some(t) = silence
            && silence != n.silence_at
        {
            n.silence_at = silence;
            let inc = n.inc;
            self.at(
                t,
                Ev::HbWake {
                    node,
                    inc,
                    silence: true,
                },
            );
        }
        let n = &mut self.nodes[node];
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        let acked: Vec<Instant> = n
            .peers
            .acked_times(&refs, at)
            .into_iter()
            .map(Instant::from_std)
            .collect();
        let declared_dead = n.peers.declared_us(at);
        let hearing = members
            .iter()
            .filter(|i| **i != node && n.peers.is_alive(&format!("node-{i}"), at))
            .count();
        let count = members.len().max(1);
        self.keeper_step(
            node,
            NodeInput::Lan {
                members: count,
                acked,
                declared_dead,
                hearing,
            },
        );
        // The gate refresh: open until what the keeper allows, at most GATE_MAX from now.
        let n = &mut self.nodes[node];
        let open = n.keeper.as_ref().and_then(|k| k.open_until(inst));
        if open.is_none() && n.gate_until > now {
            let name = n.name.clone();
            self.trace(|| format!("{name}: gate not refreshed (the keeper does not confirm us)"));
        }
        let n = &mut self.nodes[node];
        n.gate_until = match open {
            Some(u) => (u.saturating_duration_since(self.base)).min(now + GATE_MAX),
            None => now.min(n.gate_until),
        };
        // One frame to every peer that can hear it.
        let frame = send.then(|| Heartbeat {
            node: n.name.clone(),
            seq: n.peers.next_seq(at, wall),
            generation: n.peers.generation(),
            interval_ms: l.interval.as_millis() as u16,
            acks: n.peers.acks(at),
            dead: n.peers.dead_list(),
        });
        for to in 0..self.s.nodes {
            let Some(frame) = &frame else { break };
            if to == node
                || !self.nodes[to].alive
                || !self.nodes[node].link_up
                || !self.nodes[to].link_up
            {
                continue;
            }
            if self
                .hb_loss
                .iter()
                .any(|(_, f, t)| f.is_none_or(|f| f == node) && t.is_none_or(|t| t == to))
            {
                continue;
            }
            let inc = self.nodes[to].inc;
            let lat = if self.rng.chance(5) {
                self.rng.ms(2, 20)
            } else {
                Duration::from_micros(200)
            };
            self.at(
                now + lat,
                Ev::HbArrive {
                    node: to,
                    inc,
                    frame: frame.clone(),
                },
            );
        }
        // Take-over evidence against every other member, at its generation.
        let settled: Vec<String> = members
            .iter()
            .filter(|i| {
                self.nodes[node].ncache[**i]
                    .as_ref()
                    .is_some_and(|o| now >= o.created + l.settle)
            })
            .map(|i| self.nodes[*i].name.clone())
            .collect();
        let settled: Vec<&str> = settled.iter().map(String::as_str).collect();
        let mut dead_since = self.nodes[node].dead_since.clone();
        let hears_someone = members
            .iter()
            .any(|i| *i != node && self.nodes[node].peers.is_alive(&self.nodes[*i].name, at));
        let stale_after = self.s.timing.renew_interval * quorum::STALE_RENEWALS;
        for i in &members {
            if *i == node {
                continue;
            }
            let Some(o) = self.nodes[node].ncache[*i].clone() else {
                continue;
            };
            let d =
                self.nodes[node]
                    .peers
                    .declarers(&self.nodes[*i].name, o.generation, &settled, at);
            let stale = now >= self.nodes[node].nseen[*i] + stale_after;
            let dead = settled.contains(&self.nodes[node].name.as_str())
                && quorum::dead_by_majority(count, d)
                && (hears_someone || stale);
            if dead != dead_since[*i].is_some() {
                let (me, them) = (self.nodes[node].name.clone(), self.nodes[*i].name.clone());
                let g = o.generation;
                self.trace(|| {
                    format!("{me}: {them}@{g} declared dead by {d} of {count} members: {dead}")
                });
            }
            dead_since[*i] = match (dead, dead_since[*i]) {
                (true, Some(t)) => Some(t),
                (true, None) => Some(now),
                (false, _) => None,
            };
        }
        self.nodes[node].dead_since = dead_since;
        let serving = self.nodes[node]
            .keeper
            .as_ref()
            .is_some_and(|k| k.may_take(inst));
        let summary: Vec<_> = (0..self.s.nodes)
            .map(|i| {
                self.nodes[node].ncache[i].as_ref().map(|o| {
                    (
                        o.generation,
                        o.fenced.is_some_and(|f| f >= o.generation),
                        self.nodes[node].dead_since[i],
                    )
                })
            })
            .collect();
        let summary = Some((serving, summary));
        if self.nodes[node].lan_summary != summary && self.nodes[node].synced {
            self.nodes[node].lan_summary = summary;
            self.refresh_views(node);
        }
    }

    fn node_arrive(&mut self, node: usize, inc: u32, req: ReqId, op: NodeOp) {
        match self.outage {
            Some(Outage::Hang) => return,
            Some(Outage::Refuse) => {
                let lat = self.latency();
                self.node_reply(node, inc, req, NodeReply::Failed("503".into()), lat);
                return;
            }
            Some(Outage::Frozen) => {
                self.frozen_requests
                    .push(Ev::NodeArrive { node, inc, req, op });
                return;
            }
            None => {}
        }
        let NodeOp::Write {
            rv,
            generation,
            api_path,
        } = op;
        let cur = self.napi[node].clone();
        let ok = match (&rv, &cur) {
            (None, None) => true,
            (Some(rv), Some(c)) => c.rv == *rv,
            _ => false,
        };
        let reply = if ok {
            let new = NodeObj {
                rv: 0,
                generation,
                api_path,
                fenced: cur.as_ref().and_then(|c| c.fenced),
                created: cur.as_ref().map(|c| c.created).unwrap_or(self.now),
            };
            let rv = self.write_node(node, new);
            NodeReply::Written {
                resource_version: rv.to_string(),
            }
        } else {
            NodeReply::Changed(cur.map(|c| c.state()))
        };
        let lat = self.latency();
        self.node_reply(node, inc, req, reply, lat);
    }

    fn node_reply(&mut self, node: usize, inc: u32, req: ReqId, reply: NodeReply, lat: Duration) {
        let n = &self.nodes[node];
        if !n.link_up || !n.api_in || n.lost_replies {
            return;
        }
        let extra = n.slow.max(self.slow_all);
        self.at(
            self.now + lat + extra,
            Ev::NodeReplyArrive {
                node,
                inc,
                req,
                reply,
            },
        );
    }

    fn write_node(&mut self, of: usize, mut new: NodeObj) -> u64 {
        self.rv += 1;
        new.rv = self.rv;
        self.napi[of] = Some(new.clone());
        for node in 0..self.nodes.len() {
            let n = &self.nodes[node];
            if !n.link_up || !n.api_in || !n.watch_ok || self.outage.is_some() {
                continue;
            }
            let conn = n.watch_conn;
            let d = self.rng.ms(1, 40);
            self.at(
                self.now + d,
                Ev::NodeWatch {
                    node,
                    conn,
                    of,
                    state: Some(new.clone()),
                },
            );
        }
        self.rv
    }

    fn set_presence(&mut self, node: usize, vip: usize, present: bool) {
        let was = self.nodes[node].present[vip];
        self.nodes[node].present[vip] = present;
        if was == present || !self.nodes[node].synced {
            return;
        }
        if present {
            self.nodes[node].absent_since[vip] = self.now;
            self.refresh_views(node);
        } else {
            let ids: Vec<u64> = self.nodes[node]
                .slots
                .iter()
                .filter(|s| s.vip == vip)
                .map(|s| s.id)
                .collect();
            for id in ids {
                self.input(node, id, Input::Stop(Stop::Gone));
            }
        }
    }

    /// The coordinator's pass: new views for every VIP (holders started as needed).
    fn refresh_views(&mut self, node: usize) {
        let now = self.now;
        let inst = self.instant(now);
        let names: BTreeSet<String> = self.nodes.iter().map(|n| n.name.clone()).collect();
        let names_idx: Vec<String> = self.nodes.iter().map(|n| n.name.clone()).collect();
        for vip in 0..self.s.vips {
            let n = &mut self.nodes[node];
            // Expiry by local observation, through the real `observe`. The previous release
            // does not know the LAN annotation: to it a LAN-kept Lease is one renewed per IP
            // whose duration (ten years) has not run out.
            let observed = n.cache[vip].as_ref().map(|o| {
                let o = if n.previous {
                    &LeaseObj {
                        lan: false,
                        ..o.clone()
                    }
                } else {
                    o
                };
                lease::observe(&k8s_lease(o), n.seen[vip].as_ref(), inst)
            });
            n.seen[vip] = observed.clone();
            if !n.present[vip] {
                continue;
            }
            let view = View {
                eligible: if n.carrier_seen {
                    Ok(1)
                } else {
                    Err("carrier down".into())
                },
                delay: delay_for(
                    &n.name,
                    ip(vip),
                    vip as u128,
                    &names,
                    observed.as_ref(),
                    false,
                ),
                serving: n.keeper.as_ref().is_none_or(|k| k.may_take(inst)),
                holder_node: observed
                    .as_ref()
                    .filter(|o| o.lan)
                    .and_then(|o| o.holder.as_deref())
                    .and_then(|h| names_idx.iter().position(|x| x == h))
                    .and_then(|i| {
                        n.ncache[i].as_ref().map(|c| HolderNode {
                            generation: c.generation,
                            fenced: c.fenced.is_some_and(|f| f >= c.generation),
                            dead_since: n.dead_since[i].map(|t| self.base + t),
                        })
                    }),
                lease: observed,
                absent_since: self.base + n.absent_since[vip],
            };
            let live = n.slots.iter().find(|s| s.vip == vip && !s.h.is_stopping());
            match live {
                Some(s) if s.last_view.as_ref() == Some(&view) => {}
                Some(s) => {
                    let id = s.id;
                    self.input(node, id, Input::View(view));
                }
                None => {
                    self.next_slot += 1;
                    let id = self.next_slot;
                    let name = n.name.clone();
                    n.slots.push(Slot {
                        id,
                        vip,
                        h: {
                            let h = Holder::new(&name, self.s.timing, Kind::Vip, view.clone());
                            if self.s.lan.is_some() && !n.previous {
                                h.lan()
                            } else {
                                h
                            }
                        },
                        generation: 0,
                        pending: HashMap::new(),
                        held: None,
                        last_view: None,
                    });
                    self.input(node, id, Input::View(view));
                }
            }
        }
        let _ = now;
        // Views computed here (on a watch event, a carrier change…) used the keeper's state
        // of this moment: the next heartbeat tick compares afresh, so a change back is
        // not missed (the speaker re-feeds every view on each pass anyway).
        self.nodes[node].lan_summary = None;
    }

    /// Steps one holder and performs its actions as the shell would.
    fn input(&mut self, node: usize, slot: u64, input: Input) {
        let inst = self.instant(self.now);
        let n = &mut self.nodes[node];
        if !n.alive {
            return;
        }
        let Some(sl) = n.slots.iter_mut().find(|s| s.id == slot) else {
            return;
        };
        if let Input::View(v) = &input {
            sl.last_view = Some(v.clone());
        }
        let vip = sl.vip;
        let step = sl.h.step(input, inst);
        sl.generation += 1;
        let generation = sl.generation;
        let stopped = sl.h.is_stopped();
        if n.stalling && !step.actions.is_empty() {
            // Decided now, takes effect only after the process is resumed.
            n.stalling = false;
            n.frozen = true;
            n.deferred = step.actions.into_iter().map(|a| (slot, vip, a)).collect();
            self.trace(|| format!("node-{node} frozen in the middle of a step"));
        } else {
            for a in step.actions {
                self.perform(node, slot, vip, a);
            }
        }
        if stopped {
            self.nodes[node].slots.retain(|s| s.id != slot);
            return;
        }
        if let Some(w) = step.wake {
            let t = w.saturating_duration_since(self.base).max(self.now);
            self.at(
                t,
                Ev::Tick {
                    node,
                    slot,
                    generation,
                },
            );
        }
    }

    fn latency(&mut self) -> Duration {
        // Mostly a few ms, sometimes tens.
        if self.rng.chance(10) {
            self.rng.ms(20, 120)
        } else {
            self.rng.ms(1, 15)
        }
    }

    fn perform(&mut self, node: usize, slot: u64, vip: usize, a: Action) {
        let now = self.now;
        let inst = self.instant(now);
        let name = self.nodes[node].name.clone();
        let request = |sim: &mut Sim, req: ReqId, deadline: Instant, op: Op| {
            let inc = sim.nodes[node].inc;
            if let Some(sl) = sim.nodes[node].slots.iter_mut().find(|s| s.id == slot) {
                sl.pending.insert(req, ());
            }
            let d = deadline.saturating_duration_since(sim.base).max(now);
            sim.at(
                d,
                Ev::Deadline {
                    node,
                    inc,
                    slot,
                    req,
                },
            );
            let n = &sim.nodes[node];
            if n.link_up && n.api_out {
                let lat = sim.latency();
                sim.at(
                    now + lat,
                    Ev::ApiArrive {
                        node,
                        inc,
                        slot,
                        req,
                        vip,
                        op,
                    },
                );
            }
        };
        let held = self.nodes[node]
            .slots
            .iter()
            .find(|s| s.id == slot)
            .and_then(|s| {
                // The Lease as the watch shows it when it names us (someone may have written
                // it since our last write: a drill's step-down mark), else our last write.
                let seen = s
                    .last_view
                    .as_ref()
                    .and_then(|v| v.lease.as_ref())
                    .filter(|l| l.holder.as_deref() == Some(name.as_str()))
                    .and_then(|l| l.resource_version.parse::<u64>().ok());
                match (seen, s.held) {
                    (Some(a), Some(b)) => Some(a.max(b)),
                    (a, b) => a.or(b),
                }
            });
        match a {
            Action::Acquire {
                req,
                resource_version,
                deadline,
            } => {
                let rv = resource_version.map(|r| r.parse::<u64>().expect("numeric rv"));
                self.trace(|| format!("{name}: acquire VIP {vip} on rv {rv:?}"));
                request(self, req, deadline, Op::Acquire(rv));
            }
            Action::Renew { req, deadline } => {
                request(self, req, deadline, Op::Renew(held.unwrap_or(0)));
            }
            Action::Fence {
                req,
                node: target,
                generation,
                deadline,
            } => {
                let target = self
                    .nodes
                    .iter()
                    .position(|n| n.name == target)
                    .expect("a node");
                self.trace(|| format!("{name}: fence node-{target} in generation {generation}"));
                if self.s.mutations.contains(&Mutation::SkipFence) {
                    let inc = self.nodes[node].inc;
                    if let Some(sl) = self.nodes[node].slots.iter_mut().find(|s| s.id == slot) {
                        sl.pending.insert(req, ());
                    }
                    self.at(
                        now + Duration::from_millis(1),
                        Ev::ReplyArrive {
                            node,
                            inc,
                            slot,
                            req,
                            reply: Reply::Written {
                                resource_version: "0".into(),
                            },
                            rv: None,
                        },
                    );
                    return;
                }
                request(self, req, deadline, Op::Fence { target, generation });
            }
            Action::Release {
                req,
                step_down,
                deadline,
                ..
            } => {
                self.trace(|| format!("{name}: release VIP {vip} (step down: {step_down})"));
                request(
                    self,
                    req,
                    deadline,
                    Op::Release {
                        rv: held.unwrap_or(0),
                        step_down,
                    },
                );
            }
            Action::Delete { req, deadline } => {
                self.trace(|| format!("{name}: delete the lease of VIP {vip}"));
                request(self, req, deadline, Op::Delete(held.unwrap_or(0)));
            }
            Action::Bind {
                until, not_after, ..
            } => {
                let mutations = &self.s.mutations;
                if inst >= not_after && !mutations.contains(&Mutation::IgnoreNotAfter) {
                    self.trace(|| format!("{name}: dropped a late bind of VIP {vip}"));
                    return;
                }
                let life = if mutations.contains(&Mutation::LifetimeFromDeadline) {
                    Some(Duration::from_secs(
                        self.s.timing.renew_deadline.as_millis().div_ceil(1000) as u64,
                    ))
                } else {
                    timing::lifetime(inst, until, Duration::ZERO)
                };
                let Some(life) = life else {
                    self.trace(|| format!("{name}: no safe lifetime left for VIP {vip}"));
                    return;
                };
                let first = self.nodes[node].kernel[vip].is_none();
                if first && self.foreign[vip] {
                    self.violate(format!("{name} bound VIP {vip}, which a foreign host uses"));
                }
                self.nodes[node].kernel[vip] = Some(now + life);
                if first {
                    self.trace(|| format!("{name}: bound VIP {vip} for {} s", life.as_secs()));
                }
            }
            Action::Probe { req, .. } => {
                if !self.nodes[node].link_up {
                    // Nothing can answer a probe on a dead link.
                    let inc = self.nodes[node].inc;
                    self.at(
                        now + PROBE_WAIT,
                        Ev::ProbeDone {
                            node,
                            inc,
                            slot,
                            req,
                        },
                    );
                    return;
                }
                let inc = self.nodes[node].inc;
                self.at(
                    now + PROBE_WAIT,
                    Ev::ProbeDone {
                        node,
                        inc,
                        slot,
                        req,
                    },
                );
            }
            Action::Unbind { .. } => {
                self.trace(|| format!("{name}: unbound VIP {vip}"));
                self.nodes[node].kernel[vip] = None;
            }
            Action::Announce {
                not_after, round, ..
            } => {
                if inst >= not_after && !self.s.mutations.contains(&Mutation::IgnoreNotAfter) {
                    return;
                }
                // The gate drops a closed node's raw frames on the egress hook.
                if !self.nodes[node].link_up || !self.gate_open(node) {
                    return;
                }
                let others: Vec<String> = (0..self.nodes.len())
                    .filter(|i| *i != node && self.answers(*i, vip))
                    .map(|i| self.nodes[i].name.clone())
                    .collect();
                if !others.is_empty() {
                    self.violate(format!(
                        "{name} announced VIP {vip} (round {round}) while {others:?} answer for it"
                    ));
                }
            }
            Action::Dnat(on) => self.nodes[node].dnat[vip] = on,
            Action::Report(r) => {
                let base = self.base;
                self.trace(|| match r {
                    Report::Took {
                        previous,
                        waited_since,
                    } => format!(
                        "{name}: VIP {vip}: took the lease from {previous:?} (free since {:?})",
                        waited_since.map(|w| w.saturating_duration_since(base))
                    ),
                    r => format!("{name}: VIP {vip}: {r:?}"),
                })
            }
        }
    }

    fn api_arrive(&mut self, node: usize, inc: u32, slot: u64, req: ReqId, vip: usize, op: Op) {
        match self.outage {
            Some(Outage::Hang) => return,
            Some(Outage::Refuse) => {
                let lat = self.latency();
                self.reply(
                    (node, inc, slot, req),
                    Reply::Failed("503".into()),
                    None,
                    lat,
                );
                return;
            }
            Some(Outage::Frozen) => {
                self.frozen_requests.push(Ev::ApiArrive {
                    node,
                    inc,
                    slot,
                    req,
                    vip,
                    op,
                });
                return;
            }
            None => {}
        }
        let me = self.nodes[node].name.clone();
        let lan = self.s.lan.is_some() && !self.nodes[node].previous;
        let dur = if lan && !self.s.mutations.contains(&Mutation::ShortLanLease) {
            lease::LAN_LEASE_SECONDS as u64
        } else {
            self.s.timing.lease.as_secs()
        };
        let cur = self.api[vip].clone();
        if let Op::Fence { target, generation } = op {
            let wait = |api_path: bool| {
                if api_path {
                    self.s.timing.renew_deadline + quorum::CLOCK_MARGIN
                } else {
                    Duration::ZERO
                }
            };
            let reply = match self.napi[target].clone() {
                Some(c) if c.fenced.is_some_and(|f| f >= generation) => Reply::Fenced {
                    wait: wait(c.api_path),
                },
                Some(c) if c.generation == generation => {
                    let w = wait(c.api_path);
                    self.write_node(
                        target,
                        NodeObj {
                            fenced: Some(generation),
                            ..c
                        },
                    );
                    self.trace(|| {
                        format!(
                            "api: {me} fenced node-{target} in generation {generation}, wait {w:?}"
                        )
                    });
                    Reply::Fenced { wait: w }
                }
                _ => Reply::Lost,
            };
            let lat = self.latency();
            self.reply((node, inc, slot, req), reply, None, lat);
            return;
        }
        let result: Result<Option<LeaseObj>, ()> = match (&op, &cur) {
            (Op::Acquire(None), None) => Ok(Some(LeaseObj {
                rv: 0,
                lan,
                holder: Some(me.clone()),
                duration_s: dur,
                step_down: false,
                stepped_down_from: None,
            })),
            (Op::Acquire(Some(rv)), Some(c)) if c.rv == *rv => Ok(Some(LeaseObj {
                rv: 0,
                lan,
                holder: Some(me.clone()),
                duration_s: dur,
                step_down: false,
                stepped_down_from: None,
            })),
            // A renewal retries once on a Lease that still names us (metadata changed).
            (Op::Renew(rv), Some(c)) if c.rv == *rv || c.holder.as_deref() == Some(me.as_str()) => {
                Ok(Some(LeaseObj { rv: 0, ..c.clone() }))
            }
            (Op::Release { rv, step_down }, Some(c)) if c.rv == *rv => Ok(Some(LeaseObj {
                rv: 0,
                holder: None,
                step_down: false,
                stepped_down_from: step_down.then(|| me.clone()),
                ..c.clone()
            })),
            (Op::Delete(rv), Some(c)) if c.rv == *rv => Ok(None),
            _ => Err(()),
        };
        if result.is_ok()
            && self.nodes[node].previous
            && matches!(op, Op::Acquire(_))
            && cur.as_ref().is_some_and(|c| c.lan && c.holder.is_some())
        {
            self.out.previous_took_lan += 1;
            self.trace(|| format!("api: {me} (previous release) took a LAN-kept Lease"));
        }
        let (reply, rv) = match result {
            Ok(new) => {
                let rv = self.write(vip, new);
                (
                    Reply::Written {
                        resource_version: rv.to_string(),
                    },
                    Some(rv),
                )
            }
            Err(()) => (Reply::Lost, None),
        };
        let lat = self.latency();
        self.reply((node, inc, slot, req), reply, rv, lat);
    }

    /// Sends `reply` back to the request `to` = (node, incarnation, holder, request).
    fn reply(
        &mut self,
        to: (usize, u32, u64, ReqId),
        reply: Reply,
        rv: Option<u64>,
        lat: Duration,
    ) {
        let (node, inc, slot, req) = to;
        let n = &self.nodes[node];
        if !n.link_up || !n.api_in || n.lost_replies {
            return;
        }
        let extra = n.slow.max(self.slow_all);
        self.at(
            self.now + lat + extra,
            Ev::ReplyArrive {
                node,
                inc,
                slot,
                req,
                reply,
                rv,
            },
        );
    }

    /// Applies a write (None: delete), checks stickiness, fans it out to the watches.
    fn write(&mut self, vip: usize, new: Option<LeaseObj>) -> u64 {
        self.rv += 1;
        let rv = self.rv;
        let new = new.map(|mut o| {
            o.rv = rv;
            o
        });
        let old_holder = self.api[vip].as_ref().and_then(|o| o.holder.clone());
        let new_holder = new.as_ref().and_then(|o| o.holder.clone());
        if let Some(h) = &new_holder {
            if self.last_holder[vip].as_ref().is_some_and(|l| l != h) {
                self.out.moves += 1;
            }
            self.last_holder[vip] = Some(h.clone());
        }
        if old_holder != new_holder {
            if let Some(a) = &old_holder {
                let ai = self.nodes.iter().position(|n| n.name == *a).expect("node");
                let since = self.holder_since[vip];
                let touched = |iv: &[(T, T)]| iv.iter().any(|(s, e)| *s <= self.now && *e >= since);
                let excused = touched(&self.nodes[ai].disturbed)
                    || touched(&self.global_disturbed)
                    || touched(&self.vip_disturbed[vip]);
                if !excused {
                    let what = format!(
                        "VIP {vip} moved from {a} to {new_holder:?} though {a} was undisturbed since {:.3}s",
                        since.as_secs_f64()
                    );
                    self.violate(what);
                }
            }
            self.holder_since[vip] = self.now;
            self.trace(|| format!("api: VIP {vip} holder {old_holder:?} -> {new_holder:?}"));
        }
        self.api[vip] = new.clone();
        for i in 0..self.nodes.len() {
            self.watch_send(i, vip, new.clone());
        }
        rv
    }

    fn watch_send(&mut self, node: usize, vip: usize, state: Option<LeaseObj>) {
        let n = &self.nodes[node];
        if !n.link_up || !n.api_in || !n.watch_ok || self.outage.is_some() {
            return;
        }
        let conn = n.watch_conn;
        // In order per resource: never before the previous delivery.
        let d = self.rng.ms(1, 40);
        let t = (self.now + d).max(self.nodes[node].last_delivery[vip]);
        self.nodes[node].last_delivery[vip] = t;
        self.at(
            t,
            Ev::Watch {
                node,
                conn,
                vip,
                state,
            },
        );
    }

    /// A broken watch: everything in flight is dropped; `relist` at the end.
    fn break_watch(&mut self, node: usize) {
        let n = &mut self.nodes[node];
        n.watch_conn += 1;
        n.watch_ok = false;
    }

    fn relist(&mut self, node: usize) {
        let n = &mut self.nodes[node];
        n.watch_conn += 1;
        n.watch_ok = true;
        if !(n.link_up && n.api_in) {
            return;
        }
        for v in 0..self.s.vips {
            let state = self.api[v].clone();
            self.watch_send(node, v, state);
        }
        if self.outage.is_none() {
            let conn = self.nodes[node].watch_conn;
            for of in 0..self.napi.len() {
                let d = self.rng.ms(1, 40);
                let state = self.napi[of].clone();
                self.at(
                    self.now + d,
                    Ev::NodeWatch {
                        node,
                        conn,
                        of,
                        state,
                    },
                );
            }
        }
    }

    fn disturb(&mut self, node: usize, f: &Fault) {
        // Until the effect has surely passed: a lease and a rank later.
        let tail = self.s.timing.lease + RANK_STEP * self.s.nodes as u32 + FAIR_SHARE_WAIT;
        self.nodes[node]
            .disturbed
            .push((f.at, f.at + f.duration + tail));
    }

    fn fault(&mut self, i: usize, start: bool) {
        let f = self.s.faults[i].clone();
        let tail = self.s.timing.lease + RANK_STEP * self.s.nodes as u32 + FAIR_SHARE_WAIT;
        self.trace(|| format!("fault {} : {f}", if start { "starts" } else { "ends" }));
        match f.kind {
            FaultKind::Kill { node } | FaultKind::Upgrade { node } => {
                if start {
                    self.disturb(node, &f);
                    let n = &mut self.nodes[node];
                    n.alive = false;
                    n.synced = false;
                    n.frozen = false;
                    n.stalling = false;
                    n.deferred.clear();
                    n.queued.clear();
                    n.slots.clear();
                    n.inc += 1;
                    n.watch_conn += 1;
                } else if !self.nodes[node].alive {
                    // The DaemonSet restarts it: leftovers removed, caches synced anew.
                    let n = &mut self.nodes[node];
                    if matches!(f.kind, FaultKind::Upgrade { .. }) {
                        n.previous = false;
                    }
                    n.alive = true;
                    n.kernel = vec![None; self.s.vips];
                    n.dnat = vec![false; self.s.vips];
                    n.present = self.present.clone();
                    n.seen = vec![None; self.s.vips];
                    n.watch_ok = true;
                    let inc = n.inc;
                    let d = self.rng.ms(20, 300);
                    self.at(self.now + d, Ev::Synced { node, inc });
                    self.relist(node);
                    self.start_lan(node);
                }
            }
            FaultKind::Freeze { node } => {
                if start {
                    self.disturb(node, &f);
                    if !self.nodes[node].alive {
                        return;
                    }
                    if self.rng.chance(50) {
                        self.nodes[node].frozen = true;
                    } else {
                        self.nodes[node].stalling = true;
                    }
                } else if self.nodes[node].stalling {
                    self.nodes[node].stalling = false;
                } else if self.nodes[node].frozen {
                    self.nodes[node].frozen = false;
                    let deferred = std::mem::take(&mut self.nodes[node].deferred);
                    for (slot, vip, a) in deferred {
                        if self.nodes[node].slots.iter().any(|s| s.id == slot) {
                            self.perform(node, slot, vip, a);
                        }
                    }
                    self.check_safety();
                    // Timers first (the shell's select is biased to them), then the backlog.
                    let ids: Vec<u64> = self.nodes[node].slots.iter().map(|s| s.id).collect();
                    for id in ids {
                        self.input(node, id, Input::Tick);
                    }
                    let queued = std::mem::take(&mut self.nodes[node].queued);
                    for ev in queued {
                        self.handle(ev);
                        self.check_safety();
                    }
                    if self.s.lan.is_some() && self.nodes[node].alive && !self.nodes[node].previous
                    {
                        let n = &mut self.nodes[node];
                        n.hb_chain += 1;
                        let (inc, chain) = (n.inc, n.hb_chain);
                        self.at(self.now, Ev::Hb { node, inc, chain });
                    }
                }
            }
            FaultKind::HbLoss { from, to } => {
                let tail = self.s.timing.lease + RANK_STEP * self.s.nodes as u32 + FAIR_SHARE_WAIT;
                for n in 0..self.nodes.len() {
                    if from.is_none_or(|x| x == n) || to.is_none_or(|x| x == n) {
                        self.nodes[n]
                            .disturbed
                            .push((f.at, f.at + f.duration + tail));
                    }
                }
                if start {
                    self.hb_loss.push((i, from, to));
                } else {
                    self.hb_loss.retain(|(x, _, _)| *x != i);
                }
            }
            FaultKind::LinkCut { node } => {
                self.disturb(node, &f);
                self.nodes[node].link_up = !start;
                let d = self.rng.ms(0, 250);
                self.at(self.now + d, Ev::Carrier { node });
                if start {
                    self.break_watch(node);
                } else {
                    self.relist(node);
                }
            }
            FaultKind::ApiCut { node, dir } => {
                self.disturb(node, &f);
                match dir {
                    Dir::Out => self.nodes[node].api_out = !start,
                    Dir::In => {
                        self.nodes[node].api_in = !start;
                        if start {
                            self.break_watch(node);
                        } else {
                            self.relist(node);
                        }
                    }
                }
            }
            FaultKind::ApiOutage { mode } => {
                self.global_disturbed.push((f.at, f.at + f.duration + tail));
                if start {
                    self.outage = Some(mode);
                } else {
                    self.outage = None;
                    let queued = std::mem::take(&mut self.frozen_requests);
                    for ev in queued {
                        self.handle(ev);
                    }
                    for n in 0..self.nodes.len() {
                        self.relist(n);
                    }
                }
            }
            FaultKind::SlowReplies { node, extra } => match node {
                Some(n) => {
                    self.disturb(n, &f);
                    self.nodes[n].slow = if start { extra } else { Duration::ZERO };
                }
                None => {
                    self.global_disturbed.push((f.at, f.at + f.duration + tail));
                    self.slow_all = if start { extra } else { Duration::ZERO };
                }
            },
            FaultKind::LostReplies { node } => {
                self.disturb(node, &f);
                self.nodes[node].lost_replies = start;
            }
            FaultKind::WatchRestart { node } => {
                if start {
                    self.break_watch(node);
                } else {
                    self.relist(node);
                }
            }
            FaultKind::ServiceGone { vip } => {
                self.vip_disturbed[vip].push((f.at, f.at + f.duration + tail));
                self.present[vip] = !start;
                for node in 0..self.nodes.len() {
                    let d = self.rng.ms(1, 40);
                    self.at(
                        self.now + d,
                        Ev::Presence {
                            node,
                            vip,
                            present: !start,
                        },
                    );
                }
            }
            FaultKind::ForeignClaim { vip } => {
                self.vip_disturbed[vip].push((f.at, f.at + f.duration + tail));
                self.foreign[vip] = start;
            }
            FaultKind::StepDown { vip } => {
                if start {
                    self.vip_disturbed[vip].push((f.at, f.at + tail));
                    if let Some(cur) = self.api[vip].clone()
                        && cur.holder.is_some()
                        && self.outage.is_none()
                    {
                        self.write(
                            vip,
                            Some(LeaseObj {
                                step_down: true,
                                ..cur
                            }),
                        );
                    }
                }
            }
        }
    }

    /// Whether `node` answers ARP/NS for `vip` now: on the LAN, bound, gate open.
    fn answers(&self, node: usize, vip: usize) -> bool {
        let n = &self.nodes[node];
        n.link_up && n.kernel[vip].is_some() && self.gate_open(node)
    }

    /// Adds the time from now to `until` in which no node answers for a VIP that should be
    /// answered (a gate runs out between events).
    fn count_unanswered(&mut self, until: T) {
        for vip in 0..self.s.vips {
            if !self.present[vip] || self.foreign[vip] {
                continue;
            }
            let covered = (0..self.nodes.len())
                .filter(|i| self.answers(*i, vip))
                .map(|i| {
                    if self.s.lan.is_some() && !self.nodes[i].previous {
                        self.nodes[i].gate_until.min(until)
                    } else {
                        until
                    }
                })
                .max();
            match covered {
                Some(c) => {
                    self.answered_once[vip] = true;
                    self.out.unanswered += until - c;
                }
                None if self.answered_once[vip] => self.out.unanswered += until - self.now,
                None => {}
            }
        }
    }

    /// At most one node on the LAN answers for each VIP.
    fn check_safety(&mut self) {
        for vip in 0..self.s.vips {
            let answering: Vec<&str> = (0..self.nodes.len())
                .filter(|i| self.answers(*i, vip))
                .map(|i| self.nodes[i].name.as_str())
                .collect();
            if answering.len() > 1 {
                let what = format!("VIP {vip} answered by {answering:?}");
                self.violate(what);
                return;
            }
        }
    }

    /// Once faults have healed: exactly one owner per VIP, the one the Lease names, and no
    /// address or DNAT entry anywhere else.
    fn check_settled(&mut self) {
        if self.out.violation.is_some() {
            return;
        }
        let now = self.instant(self.now);
        for vip in 0..self.s.vips {
            let present = self.present[vip];
            let holder = self.api[vip].as_ref().and_then(|o| o.holder.clone());
            let bound: Vec<String> = self
                .nodes
                .iter()
                .filter(|n| n.kernel[vip].is_some())
                .map(|n| n.name.clone())
                .collect();
            let dnat: Vec<String> = self
                .nodes
                .iter()
                .filter(|n| n.dnat[vip])
                .map(|n| n.name.clone())
                .collect();
            if !present {
                if !bound.is_empty() || !dnat.is_empty() {
                    self.violate(format!(
                        "VIP {vip} left its Service but is bound on {bound:?}, DNAT on {dnat:?}"
                    ));
                }
                continue;
            }
            let owners: Vec<String> = self
                .nodes
                .iter()
                .filter(|n| {
                    n.slots
                        .iter()
                        .any(|s| s.vip == vip && s.h.holds_until(now).is_some())
                })
                .map(|n| n.name.clone())
                .collect();
            let gate_ok = (0..self.nodes.len())
                .filter(|i| self.nodes[*i].kernel[vip].is_some())
                .all(|i| self.gate_open(i));
            let ok = bound.len() == 1
                && gate_ok
                && holder.as_ref() == Some(&bound[0])
                && owners == bound
                && dnat == bound;
            if !ok {
                self.violate(format!(
                    "{:.1} s after the last fault healed, VIP {vip}: lease holder {holder:?}, bound on {bound:?}, owners {owners:?}, DNAT on {dnat:?}",
                    settle_bound(&self.s).as_secs_f64()
                ));
            }
        }
    }
}

/// Runs `count` randomized schedules from `first_seed` on `threads` threads; returns the
/// first failing schedule (by seed order) with its outcome, and the totals.
pub fn run_many(
    first_seed: u64,
    count: u64,
    threads: usize,
) -> (Option<(Schedule, Outcome)>, Totals) {
    run_many_with(first_seed, count, threads, Schedule::generate)
}

/// [`run_many`] with LAN-mode schedules ([`Schedule::generate_lan`]).
pub fn run_many_lan(
    first_seed: u64,
    count: u64,
    threads: usize,
) -> (Option<(Schedule, Outcome)>, Totals) {
    run_many_with(first_seed, count, threads, Schedule::generate_lan)
}

fn run_many_with(
    first_seed: u64,
    count: u64,
    threads: usize,
    generate: fn(u64) -> Schedule,
) -> (Option<(Schedule, Outcome)>, Totals) {
    let next = std::sync::atomic::AtomicU64::new(0);
    let results: Vec<(Option<(Schedule, Outcome)>, Totals)> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads.max(1))
            .map(|_| {
                scope.spawn(|| {
                    let mut totals = Totals::default();
                    let mut failed: Option<(Schedule, Outcome)> = None;
                    loop {
                        let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        if i >= count {
                            break;
                        }
                        let s = generate(first_seed + i);
                        let o = run(&s, false);
                        totals.schedules += 1;
                        totals.events += o.events;
                        totals.moves += o.moves;
                        totals.faults += s.faults.len() as u64;
                        if o.violation.is_some()
                            && failed.as_ref().is_none_or(|(f, _)| f.seed > s.seed)
                        {
                            failed = Some((s, o));
                        }
                    }
                    (failed, totals)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("no panic"))
            .collect()
    });
    let mut totals = Totals::default();
    let mut failed: Option<(Schedule, Outcome)> = None;
    for (f, t) in results {
        totals.schedules += t.schedules;
        totals.events += t.events;
        totals.moves += t.moves;
        totals.faults += t.faults;
        if let Some((s, o)) = f
            && failed.as_ref().is_none_or(|(x, _)| x.seed > s.seed)
        {
            failed = Some((s, o));
        }
    }
    (failed, totals)
}

#[derive(Debug, Clone, Copy, Default)]
pub struct Totals {
    pub schedules: u64,
    pub events: u64,
    pub moves: u64,
    pub faults: u64,
}

/// A failing schedule, shrunk, with its trace and the command that replays it.
pub fn report(s: &Schedule) -> String {
    let fails = |x: &Schedule| run(x, false).violation.is_some();
    let small = schedule::shrink(s, fails);
    let o = run(&small, true);
    let tail: Vec<&String> = o.trace.iter().rev().take(60).collect();
    let mut out = format!(
        "simulation failed: {}\nreplay: cargo run -p l2speaker-e2e --bin l2s-sim -- --seed {}{} --trace\nshrunk to:\n{small}violation: {:?}\nlast events:\n",
        o.violation
            .as_ref()
            .map(|v| v.what.clone())
            .unwrap_or_else(|| "(the shrunk schedule passes)".into()),
        s.seed,
        if s.lan.is_some() { " --lan" } else { "" },
        o.violation
    );
    for line in tail.into_iter().rev() {
        out.push_str(line);
        out.push('\n');
    }
    out
}
