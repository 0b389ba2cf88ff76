//! The node keeper, a pure state machine: this node's generation, the renewals of its node
//! Lease, and until when its gate may be open (see [`super::quorum`] for the rules).
//!
//! ```text
//!  Suspended ──CAS to generation+1 succeeds──▶ Confirming ──a majority acks──▶ Serving
//!      ▲          (fails: fenced → drop every VIP, try again)                     │
//!      └──────────────────────── confirmation lapses ─────────────────────────────┘
//! ```
//! A speaker starts Suspended: a new process always takes a new generation before answering.
//!
//! **The API path.** A node that a majority cannot confirm — a lone speaker, the survivor of
//! a two-node cluster, a node whose peers died — may still answer on the strength of its node
//! Lease renewals (open until the last successful one was sent + the renew deadline), but
//! only after a renewal that *says so* on the Lease went through. A candidate reads that mark
//! when it fences the node and then waits out the renew deadline before taking over. A node
//! with acks to spare does not set it (and stops relying on it the moment it sends a renewal
//! without it), so the usual take-over needs no wait.

use std::time::Duration;

use tokio::time::Instant;

use super::machine::ReqId;
use super::quorum;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NodeTiming {
    pub renew_interval: Duration,
    pub renew_deadline: Duration,
    /// The heartbeats' dead-after time.
    pub dead_after: Duration,
}

/// The node Lease as read from the API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeLeaseState {
    pub resource_version: String,
    pub generation: u32,
    /// The generation a candidate fenced, if any.
    pub fenced: Option<u32>,
    /// The node may answer on the strength of this renewal alone (see [`NodeKeeper`]).
    pub api_path: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeReply {
    Written {
        resource_version: String,
    },
    /// The Lease is not as we last wrote it (409 or 404): here it is as it is now.
    Changed(Option<NodeLeaseState>),
    Failed(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeInput {
    Tick,
    /// What the LAN says: members (node Leases, us included), when we sent the newest frame
    /// of our generation each other member acked, and whether a member declared us dead.
    Lan {
        members: usize,
        acked: Vec<Instant>,
        declared_dead: bool,
        /// How many other members we hear now.
        hearing: usize,
    },
    /// The node Lease as a watch shows it.
    Observed(NodeLeaseState),
    Reply {
        req: ReqId,
        reply: NodeReply,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeAction {
    /// Write our node Lease by compare-and-swap on `resource_version` (None: create it),
    /// naming us in `generation`, cut off at `deadline`.
    Write {
        req: ReqId,
        resource_version: Option<String>,
        generation: u32,
        /// Says on the Lease that the node may answer on its renewals alone (a candidate
        /// that fences it then waits out the renew deadline).
        api_path: bool,
        deadline: Instant,
    },
    /// A candidate fenced our generation: withdraw every VIP at once.
    DropAll { fenced: u32 },
    /// We are in `generation` now (heartbeats carry it; acks of older frames count no more).
    Generation(u32),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Suspended,
    Confirming,
    Serving,
}

#[derive(Debug, Clone)]
pub struct NodeKeeper {
    timing: NodeTiming,
    phase: Phase,
    generation: u32,
    resource_version: Option<String>,
    /// (request, sent, deadline, generation written, API path).
    writing: Option<(ReqId, Instant, Instant, u32, bool)>,
    /// The API path mark as last written (or being written).
    api_path_written: bool,
    next_write: Instant,
    /// When the last successful renewal that set the API path mark was sent (None once a
    /// renewal without it was sent).
    api_since: Option<Instant>,
    members: usize,
    acked: Vec<Instant>,
    declared_dead: bool,
    hearing: usize,
    next_req: ReqId,
}

impl NodeKeeper {
    /// `lease`: the node Lease as read at start (None: there is none yet).
    pub fn new(timing: NodeTiming, lease: Option<NodeLeaseState>, now: Instant) -> Self {
        let (rv, generation) = match &lease {
            Some(l) => (
                Some(l.resource_version.clone()),
                l.generation.max(l.fenced.unwrap_or(0)),
            ),
            None => (None, 0),
        };
        NodeKeeper {
            timing,
            phase: Phase::Suspended,
            generation,
            resource_version: rv,
            writing: None,
            api_path_written: false,
            next_write: now,
            api_since: None,
            members: 1,
            acked: Vec::new(),
            declared_dead: false,
            hearing: 0,
            next_req: 1 << 32,
        }
    }

    pub fn phase(&self) -> Phase {
        self.phase
    }

    pub fn generation(&self) -> u32 {
        self.generation
    }

    /// Whether the node serves (its gate may be open).
    pub fn serving(&self) -> bool {
        self.phase == Phase::Serving
    }

    /// Whether the node may take VIPs now: it serves, and either a majority confirms it on
    /// the LAN or it hears nobody at all (a lone speaker, the survivor of a two-node
    /// cluster). A node that others cannot hear — its heartbeats blocked on the way out —
    /// keeps what it has on the API path but takes nothing new: the others would have to
    /// take it back.
    pub fn may_take(&self, now: Instant) -> bool {
        let lan = quorum::lan_until(
            self.members,
            &self.acked,
            quorum::t_ack(self.timing.dead_after),
        );
        self.serving() && (lan.is_some_and(|u| u > now) || self.hearing == 0)
    }

    /// Until when the gate may be open (None: closed).
    pub fn open_until(&self, now: Instant) -> Option<Instant> {
        if self.phase != Phase::Serving {
            return None;
        }
        self.confirmed_until().filter(|u| *u > now)
    }

    fn confirmed_until(&self) -> Option<Instant> {
        let lan = quorum::lan_until(
            self.members,
            &self.acked,
            quorum::t_ack(self.timing.dead_after),
        );
        let api = self.api_since.map(|s| s + self.timing.renew_deadline);
        lan.max(api)
    }

    /// Whether the next renewal should set the API path mark: nobody to confirm us, or no
    /// ack to spare (losing one more peer would lose the majority).
    fn wants_api_path(&self, now: Instant) -> bool {
        let need = quorum::majority(self.members).saturating_sub(1);
        let t_ack = quorum::t_ack(self.timing.dead_after);
        let fresh = self.acked.iter().filter(|a| **a + t_ack > now).count();
        need == 0 || fresh <= need
    }

    pub fn step(&mut self, input: NodeInput, now: Instant) -> (Vec<NodeAction>, Option<Instant>) {
        let mut out = Vec::new();
        match input {
            NodeInput::Tick => {}
            NodeInput::Lan {
                members,
                acked,
                declared_dead,
                hearing,
            } => {
                self.members = members.max(1);
                self.acked = acked;
                self.declared_dead = declared_dead;
                self.hearing = hearing;
            }
            NodeInput::Observed(l) => self.seen(l, &mut out),
            NodeInput::Reply { req, reply } => self.reply(req, reply, now, &mut out),
        }
        // Serving lapses the moment confirmation does.
        match self.phase {
            Phase::Serving if self.confirmed_until().is_none_or(|u| u <= now) => {
                self.phase = Phase::Suspended;
            }
            Phase::Confirming if self.confirmed_until().is_some_and(|u| u > now) => {
                self.phase = Phase::Serving;
            }
            _ => {}
        }
        // A new generation when suspended (at once), or at the next renewal when someone
        // declared this one dead (that member would never ack us again in it).
        let suspended = self.phase == Phase::Suspended;
        let bump = suspended || self.declared_dead;
        // A change of the API path mark is written at once: a candidate that fences this
        // node waits out the renew deadline only while the Lease carries it.
        let mark_changed =
            self.phase == Phase::Serving && self.wants_api_path(now) != self.api_path_written;
        if self.writing.is_none() && (now >= self.next_write || suspended || mark_changed) {
            self.next_req += 1;
            let generation = self.generation + u32::from(bump);
            let deadline = now + self.timing.renew_deadline;
            let api_path = self.wants_api_path(now);
            if !api_path {
                // From the moment a renewal without the mark may land, a candidate may skip
                // the wait: stop relying on the API path now.
                self.api_since = None;
            }
            self.api_path_written = api_path;
            out.push(NodeAction::Write {
                req: self.next_req,
                resource_version: self.resource_version.clone(),
                generation,
                api_path,
                deadline,
            });
            self.writing = Some((self.next_req, now, deadline, generation, api_path));
            self.next_write = now + self.timing.renew_interval;
        }
        let mut wake = self.next_write;
        if let Some((_, _, d, _, _)) = self.writing {
            wake = wake.min(d);
        }
        if self.phase == Phase::Serving
            && let Some(u) = self.confirmed_until()
        {
            wake = wake.min(u);
        }
        (out, Some(wake))
    }

    fn seen(&mut self, l: NodeLeaseState, out: &mut Vec<NodeAction>) {
        if let Some(f) = l.fenced
            && f >= self.generation
        {
            self.fenced(f, out);
        }
    }

    fn fenced(&mut self, f: u32, out: &mut Vec<NodeAction>) {
        if self.generation <= f {
            out.push(NodeAction::DropAll { fenced: f });
            self.generation = f;
            self.phase = Phase::Suspended;
            self.api_since = None;
        }
    }

    fn reply(&mut self, req: ReqId, reply: NodeReply, now: Instant, out: &mut Vec<NodeAction>) {
        let Some((r, sent, deadline, generation, api_path)) = self.writing else {
            return;
        };
        if r != req {
            return;
        }
        self.writing = None;
        match reply {
            NodeReply::Written { resource_version } => {
                self.resource_version = Some(resource_version);
                if now >= deadline {
                    return;
                }
                if api_path {
                    self.api_since = Some(sent);
                }
                if generation > self.generation {
                    self.generation = generation;
                    self.declared_dead = false;
                    // Acks of the old generation's frames count no more.
                    self.acked.clear();
                    out.push(NodeAction::Generation(generation));
                    if self.phase == Phase::Suspended {
                        self.phase = Phase::Confirming;
                    }
                }
            }
            NodeReply::Changed(None) => {
                // Collected while we were away: we count as gone; start over.
                self.resource_version = None;
                out.push(NodeAction::DropAll {
                    fenced: self.generation,
                });
                self.phase = Phase::Suspended;
                self.next_write = now;
            }
            NodeReply::Changed(Some(l)) => {
                self.resource_version = Some(l.resource_version.clone());
                self.seen(l, out);
                self.next_write = now;
            }
            NodeReply::Failed(_) => {
                self.next_write = now + self.timing.renew_interval / 4;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: NodeTiming = NodeTiming {
        renew_interval: Duration::from_secs(1),
        renew_deadline: Duration::from_secs(2),
        dead_after: Duration::from_millis(400),
    };

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn write(actions: &[NodeAction]) -> (ReqId, u32) {
        actions
            .iter()
            .find_map(|a| match a {
                NodeAction::Write {
                    req, generation, ..
                } => Some((*req, *generation)),
                _ => None,
            })
            .expect("a write")
    }

    fn serving(now: Instant) -> NodeKeeper {
        let mut k = NodeKeeper::new(
            T,
            Some(NodeLeaseState {
                resource_version: "5".into(),
                generation: 3,
                fenced: None,
                api_path: false,
            }),
            now,
        );
        let (a, _) = k.step(
            NodeInput::Lan {
                members: 3,
                acked: vec![now, now],
                declared_dead: false,
                hearing: 2,
            },
            now,
        );
        let (req, g) = write(&a);
        assert_eq!(g, 4, "a new process takes a new generation");
        assert!(
            a.iter().any(|x| matches!(
                x,
                NodeAction::Write {
                    api_path: false,
                    ..
                }
            )),
            "acks to spare: no API path"
        );
        let (a, _) = k.step(
            NodeInput::Reply {
                req,
                reply: NodeReply::Written {
                    resource_version: "6".into(),
                },
            },
            now,
        );
        assert!(a.contains(&NodeAction::Generation(4)));
        assert_eq!(k.phase(), Phase::Confirming);
        assert_eq!(
            k.open_until(now),
            None,
            "closed until the LAN confirms the new generation"
        );
        k.step(
            NodeInput::Lan {
                members: 3,
                acked: vec![now, now],
                declared_dead: false,
                hearing: 2,
            },
            now,
        );
        assert_eq!(k.phase(), Phase::Serving);
        k
    }

    #[test]
    fn with_no_ack_to_spare_the_node_marks_the_api_path_and_rides_out_losing_its_last_peer() {
        let t0 = Instant::now();
        let mut k = serving(t0);
        // One of the two peers is gone: the next renewal sets the mark.
        let (a, _) = k.step(
            NodeInput::Lan {
                members: 3,
                acked: vec![t0 + ms(900)],
                declared_dead: false,
                hearing: 2,
            },
            t0 + ms(1000),
        );
        let (req, _) = write(&a);
        assert!(
            a.iter()
                .any(|x| matches!(x, NodeAction::Write { api_path: true, .. }))
        );
        k.step(
            NodeInput::Reply {
                req,
                reply: NodeReply::Written {
                    resource_version: "7".into(),
                },
            },
            t0 + ms(1005),
        );
        // The last peer goes too: the renewals carry it until the deadline.
        k.step(
            NodeInput::Lan {
                members: 3,
                acked: vec![],
                declared_dead: false,
                hearing: 2,
            },
            t0 + ms(1500),
        );
        assert_eq!(k.open_until(t0 + ms(1500)), Some(t0 + ms(3000)));
        assert_eq!(k.phase(), Phase::Serving);
    }

    #[test]
    fn the_gate_is_open_while_a_majority_acks_then_suspended_until_a_new_generation() {
        let t0 = Instant::now();
        let mut k = serving(t0);
        assert_eq!(k.open_until(t0), Some(t0 + ms(380)));
        // No fresh ack: at t0 + 380 ms it is over, and a new generation is asked for at once.
        let (a, _) = k.step(NodeInput::Tick, t0 + ms(380));
        assert_eq!(k.phase(), Phase::Suspended);
        assert_eq!(k.open_until(t0 + ms(380)), None);
        // (a renewal may be in flight; the bump follows it)
        let _ = a;
        // Acks alone do not reopen a suspended node.
        k.step(
            NodeInput::Lan {
                members: 3,
                acked: vec![t0 + ms(390)],
                declared_dead: false,
                hearing: 2,
            },
            t0 + ms(400),
        );
        assert_eq!(k.open_until(t0 + ms(400)), None);
    }

    #[test]
    fn a_fence_of_our_generation_drops_every_vip() {
        let t0 = Instant::now();
        let mut k = serving(t0);
        let (a, _) = k.step(
            NodeInput::Lan {
                members: 3,
                acked: vec![t0 + ms(900), t0 + ms(900)],
                declared_dead: false,
                hearing: 2,
            },
            t0 + ms(1000),
        );
        let (req, g) = write(&a);
        assert_eq!(g, 4, "a plain renewal keeps the generation");
        let (a, _) = k.step(
            NodeInput::Reply {
                req,
                reply: NodeReply::Changed(Some(NodeLeaseState {
                    resource_version: "9".into(),
                    generation: 4,
                    fenced: Some(4),
                    api_path: false,
                })),
            },
            t0 + ms(1001),
        );
        assert!(a.contains(&NodeAction::DropAll { fenced: 4 }));
        assert_eq!(k.phase(), Phase::Suspended);
        let (req, g) = write(&a);
        assert_eq!(g, 5, "and it starts over in a new generation");
        let _ = req;
    }

    #[test]
    fn a_lone_member_answers_on_its_node_lease() {
        let t0 = Instant::now();
        let mut k = NodeKeeper::new(T, None, t0);
        let (a, _) = k.step(NodeInput::Tick, t0);
        let (req, g) = write(&a);
        assert_eq!(g, 1);
        k.step(
            NodeInput::Reply {
                req,
                reply: NodeReply::Written {
                    resource_version: "1".into(),
                },
            },
            t0 + ms(5),
        );
        k.step(NodeInput::Tick, t0 + ms(5));
        assert_eq!(k.phase(), Phase::Serving);
        assert_eq!(k.open_until(t0 + ms(5)), Some(t0 + ms(2000)));
        // Its renewals fail (API down): the gate closes at the deadline.
        k.step(NodeInput::Tick, t0 + ms(2000));
        assert_eq!(k.open_until(t0 + ms(2000)), None);
    }
}
