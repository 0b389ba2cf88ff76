//! The Lease holder as a pure state machine: `step(input, now)` returns the actions to
//! perform and when to be woken next. It does no I/O and reads no clock, so the same code
//! runs in the speaker (driven by [`super::shell`]) and in the deterministic simulator.
//!
//! ```text
//!  Standby ──candidate: our turn──▶ Acquiring ──written before its deadline──▶ Owner
//!     ▲                                 │ lost / failed / deadline passed          │
//!     └─────────────────────────────────┘                                          │
//!     ▲   fence time passed (timer) | renewal lost | Lease moved | not eligible    │
//!     └──────────────────────────── withdraw: unbind first ◀──────────────────────┘
//!  Owner ──stop / step-down──▶ Leaving (unbound; release or delete in flight) ──▶ Stopped / Standby
//! ```
//!
//! Safety rests on three facts (see [`super::timing`]): every write is compare-and-swap; a
//! candidate takes over only after seeing the Lease unchanged for its duration on its own
//! clock; and everything an owner does on the strength of a write sent at `s` carries the
//! not-after time `s + renew_deadline`, after which the owner has withdrawn (a timer fires
//! then, reply or not), while its address expires by `s + lease - margin` on its own.

use std::time::Duration;

use tokio::time::Instant;

use super::timing::{RELEASE_DEADLINE, Timing};
use crate::announce;

/// After another host answered a probe for the VIP, how long before this node tries again.
pub const CONFLICT_RETRY: Duration = Duration::from_secs(10);

/// A failed bind is tried again after this, doubling with each failure up to
/// [`BIND_RETRY_MAX`].
pub const BIND_RETRY_MIN: Duration = Duration::from_millis(100);
pub const BIND_RETRY_MAX: Duration = Duration::from_secs(1);
/// How long an owner keeps failing to bind its VIP before it gives the VIP up, so that
/// another node serves it.
pub const BIND_GIVE_UP: Duration = Duration::from_secs(3);
/// After giving a VIP up, how long before this node tries to take it again: doubled with
/// each consecutive give-up, up to [`HOLD_DOWN_MAX`], so that a VIP no node can bind does
/// not ping-pong between them.
pub const HOLD_DOWN: Duration = Duration::from_secs(30);
pub const HOLD_DOWN_MAX: Duration = Duration::from_secs(300);

/// The wait before bind attempt `failures + 1`.
pub fn bind_backoff(failures: u32) -> Duration {
    let doublings = failures.saturating_sub(1).min(16);
    (BIND_RETRY_MIN * 2u32.pow(doublings)).min(BIND_RETRY_MAX)
}

/// The hold-down after the `n`th consecutive give-up (0-based).
pub fn hold_down(n: u32) -> Duration {
    (HOLD_DOWN * 2u32.pow(n.min(16))).min(HOLD_DOWN_MAX)
}

/// Identifies one API request, so a late reply to an abandoned request is ignored.
pub type ReqId = u64;

/// The Lease as this speaker's watch shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observed {
    pub holder: Option<String>,
    pub resource_version: String,
    pub duration: Duration,
    /// When this speaker saw it change last (its own clock).
    pub since: Instant,
    /// Someone (a drill) asked the holder to hand the IP over.
    pub step_down: bool,
    /// The node that stepped down from a released Lease.
    pub stepped_down_from: Option<String>,
    /// Written by a speaker that arbitrates with node liveness (not renewed per IP).
    pub lan: bool,
}

impl Observed {
    pub fn expires_at(&self) -> Instant {
        self.since + self.duration
    }
}

/// Everything the holder needs from the caches, recomputed by the coordinator on change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct View {
    /// The interface (index) to announce on, or why this node may not.
    pub eligible: Result<u32, String>,
    /// How long after the Lease becomes free this node waits (its rank).
    pub delay: Duration,
    pub lease: Option<Observed>,
    /// When the VIP was first seen without a Lease.
    pub absent_since: Instant,
    /// This node may take, adopt and answer for VIPs now (its node keeper serves). Always
    /// true in [`Mode::Lease`].
    pub serving: bool,
    /// The node the Lease names, as liveness sees it ([`Mode::Lan`], Leases marked `lan`).
    pub holder_node: Option<HolderNode>,
}

/// What liveness says about the node a Lease names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HolderNode {
    pub generation: u32,
    /// Its node Lease records a fence of `generation`.
    pub fenced: bool,
    /// Since when a majority has declared it dead at `generation` (None: it has not).
    pub dead_since: Option<Instant>,
}

/// How an owner keeps a VIP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Renews the VIP's Lease and fences itself at the renew deadline.
    Lease,
    /// Writes the VIP's Lease only on change; the node keeper and the kernel switch decide
    /// whether the node answers (see [`super::quorum`]).
    Lan,
}

/// A [`Mode::Lan`] holder's own horizon: in this mode the Lease is written on change only and
/// nothing else ends an ownership, so the holder moves it on every [`LAN_ADDRESS_REFRESH`]
/// with no API request, binding again as it does. The kernel's lifetime of the address is
/// much shorter and extended by the node keeper ([`super::timing::LAN_ADDRESS_LIFETIME`]).
pub const LAN_ADDRESS_BACKSTOP: Duration = Duration::from_secs(24 * 3600);
/// How often a [`Mode::Lan`] holder moves its horizon on (and binds again).
pub const LAN_ADDRESS_REFRESH: Duration = Duration::from_secs(3600);

/// Why the holder should end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// The VIP left every Service: delete its Lease.
    Gone,
    /// The speaker shuts down: release the Lease so a standby takes over at once.
    Shutdown,
}

/// How an API request ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// The write went through; the Lease's new resourceVersion.
    Written { resource_version: String },
    /// 409 or 404: someone else moved first.
    Lost,
    /// Any other error, including the request's deadline passing.
    Failed(String),
    /// A fence went through; the holder may still answer for `wait` (it was on the API
    /// path, see [`super::node`]).
    Fenced { wait: Duration },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Input {
    View(View),
    /// The wake-up time asked for has come (or any other reason to look again).
    Tick,
    Reply {
        req: ReqId,
        reply: Reply,
    },
    /// A probe's outcome: the MAC of a host that answered for the VIP, if any.
    Probed {
        req: ReqId,
        answered_by: Option<String>,
    },
    Stop(Stop),
    /// This node's generation was fenced: withdraw now ([`Mode::Lan`]).
    Fenced,
    /// The kernel was read without the VIP's address while we own it (someone else removed
    /// it): bind it again, if we still own it.
    AddressLost,
    /// The outcome of the last [`Action::Bind`] the shell carried out (none for one it
    /// dropped as too late).
    BindDone(Result<(), String>),
}

/// What the shell does. Every action that makes this node answer for the VIP carries a
/// `not_after`: the shell drops it when it would take effect later than that.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Write the Lease naming us: POST when `resource_version` is None, else a CAS PUT.
    Acquire {
        req: ReqId,
        resource_version: Option<String>,
        deadline: Instant,
    },
    /// Fence `node`'s `generation`: a CAS on its node Lease ([`Mode::Lan`] take-overs).
    Fence {
        req: ReqId,
        node: String,
        generation: u32,
        deadline: Instant,
    },
    /// Renew the Lease we hold (CAS on what our last write returned).
    Renew {
        req: ReqId,
        deadline: Instant,
    },
    /// Clear the holder (CAS); `step_down` marks it as a drill's hand-over; `failure` is
    /// written on the Lease for users to see (why this node gave the VIP up).
    Release {
        req: ReqId,
        step_down: bool,
        deadline: Instant,
        failure: Option<String>,
    },
    /// Delete the Lease (CAS): its IP left every Service.
    Delete {
        req: ReqId,
        deadline: Instant,
    },
    /// Bind or refresh the address on `iface`, gone by `until` even if we die now.
    Bind {
        iface: u32,
        until: Instant,
        not_after: Instant,
    },
    Unbind {
        iface: u32,
    },
    /// Ask the LAN whether anyone answers for the VIP (ARP probe / DAD) before binding it.
    Probe {
        req: ReqId,
        iface: u32,
    },
    /// One round of gratuitous ARP / unsolicited NA.
    Announce {
        iface: u32,
        round: usize,
        not_after: Instant,
    },
    /// Whether DNAT for the VIP should be in place on this node.
    Dnat(bool),
    /// For Events, logs and metrics.
    Report(Report),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Report {
    /// We hold the Lease now; `previous` is whom we took it from (a failover or hand-over).
    /// `waited_since` is when the Lease became free or expired in our view.
    Took {
        previous: Option<String>,
        waited_since: Option<Instant>,
    },
    /// We no longer answer for the VIP.
    Withdrew {
        reason: String,
        fenced: bool,
    },
    /// Another host answered the probe: the VIP is not bound (and is retried later).
    Conflict {
        mac: String,
    },
    /// The address was found removed by someone else and is bound again.
    Rebinding,
    /// A bind failed (`attempt` in a row); the VIP is given up at `gives_up_at` unless one
    /// succeeds before.
    BindFailed {
        error: String,
        attempt: u32,
        gives_up_at: Instant,
    },
    /// A bind succeeded after `attempts` failures.
    BindRecovered {
        attempts: u32,
    },
    /// Binding failed for [`BIND_GIVE_UP`]: the VIP is withdrawn and its Lease released; this
    /// node takes it again no sooner than `hold_down` from now.
    GaveUp {
        error: String,
        hold_down: Duration,
    },
    RenewFailed(String),
    AcquireFailed(String),
    ReleaseFailed(String),
}

/// The output of one step.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Step {
    pub actions: Vec<Action>,
    /// Call `step(Input::Tick, ..)` at this moment at the latest.
    pub wake: Option<Instant>,
}

/// Whether the holder touches the dataplane (a VIP) or only holds the Lease (the allocator).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Vip,
    Plain,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Owned {
    iface: u32,
    /// The resourceVersion our last write returned.
    resource_version: String,
    /// What a lagging watch may still show until it shows the Lease naming us: the Lease as
    /// we took it over (Some(Some(rv))), or no Lease (Some(None)) when we created it. None
    /// once caught up. A watch can lag for as long as it is broken.
    stale: Option<Option<String>>,
    fence_at: Instant,
    next_renew: Instant,
    renewing: Option<(ReqId, Instant)>,
    burst_start: Instant,
    burst_round: usize,
    /// When the write that justifies holding the Lease now was sent.
    sent: Instant,
    /// Probing the LAN before the first bind: nothing is bound, announced or DNATed yet.
    probing: Option<ReqId>,
    /// Whom we took the Lease from, and since when it was free (for the report at bind).
    previous: Option<String>,
    waited_since: Option<Instant>,
    /// Binds are failing: since when, how many in a row, the last error, the next attempt.
    bind_failing: Option<BindFailing>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct BindFailing {
    since: Instant,
    attempts: u32,
    error: String,
    retry_at: Instant,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Phase {
    Standby {
        /// No new acquire before this (after a lost or failed one), unless the Lease changes.
        retry_at: Option<(Instant, Option<String>)>,
    },
    Acquiring {
        req: ReqId,
        sent: Instant,
        deadline: Instant,
        on: Option<String>,
        iface: u32,
        previous: Option<String>,
        waited_since: Option<Instant>,
    },
    Owner(Owned),
    /// `on`: the Lease's resourceVersion when the take-over was decided; it goes on only
    /// while the Lease is still that one.
    Fencing {
        req: ReqId,
        deadline: Instant,
        on: String,
    },
    /// Fenced a holder that may answer on its node Lease alone: until then.
    FenceWait {
        until: Instant,
        on: String,
    },
    Leaving {
        req: ReqId,
        deadline: Instant,
    },
    Stopped,
}

/// One Lease holder (a VIP's or the allocator's).
#[derive(Debug, Clone)]
pub struct Holder {
    me: String,
    timing: Timing,
    kind: Kind,
    mode: Mode,
    view: View,
    phase: Phase,
    stop: Option<Stop>,
    next_req: ReqId,
    /// After a conflict, no new attempt before this.
    conflict_until: Option<Instant>,
    /// After giving the VIP up (binds kept failing), no new attempt before this; and how
    /// many times in a row it was given up.
    hold_down_until: Option<Instant>,
    gave_up: u32,
    /// The Lease's resourceVersion when we last released or deleted it: a watch still
    /// showing that version is behind our own write, not news.
    left_on: Option<String>,
}

/// What a speaker that does not hold a Lease should do next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Candidate {
    /// Try to take the Lease now.
    Acquire,
    /// The Lease names us (we restarted, or fenced while our renewal still went through):
    /// take it back with a CAS write now.
    Adopt,
    /// Nothing before this moment (unless the Lease changes).
    WaitUntil(Instant),
}

/// The candidate's decision: a free Lease after `delay` from when we saw it freed, a held one
/// `delay` after it expired in our view, a missing one `delay` after we first missed it.
pub fn candidate(
    seen: Option<&Observed>,
    me: &str,
    now: Instant,
    absent_since: Instant,
    delay: Duration,
) -> Candidate {
    let at = match seen {
        None => absent_since + delay,
        Some(s) if s.holder.as_deref() == Some(me) => return Candidate::Adopt,
        Some(s) if s.holder.is_none() => s.since + delay,
        Some(s) => s.expires_at() + delay,
    };
    if now >= at {
        Candidate::Acquire
    } else {
        Candidate::WaitUntil(at)
    }
}

impl Holder {
    pub fn new(me: &str, timing: Timing, kind: Kind, view: View) -> Self {
        Holder {
            me: me.to_string(),
            timing,
            kind,
            mode: Mode::Lease,
            view,
            phase: Phase::Standby { retry_at: None },
            stop: None,
            next_req: 1,
            conflict_until: None,
            hold_down_until: None,
            gave_up: 0,
            left_on: None,
        }
    }

    /// The same holder keeping its VIP in [`Mode::Lan`].
    pub fn lan(mut self) -> Self {
        self.mode = Mode::Lan;
        self
    }

    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// Until when this node may act as the holder (None: it is not the holder now).
    pub fn holds_until(&self, now: Instant) -> Option<Instant> {
        match &self.phase {
            Phase::Owner(o) if now < o.fence_at => Some(o.fence_at),
            _ => None,
        }
    }

    /// The interface the VIP is bound to, while owned.
    pub fn bound_iface(&self) -> Option<u32> {
        match &self.phase {
            Phase::Owner(o) => Some(o.iface),
            _ => None,
        }
    }

    /// Whether it was told to stop (it may still be releasing).
    pub fn is_stopping(&self) -> bool {
        self.stop.is_some()
    }

    pub fn is_stopped(&self) -> bool {
        self.phase == Phase::Stopped
    }

    fn req(&mut self) -> ReqId {
        self.next_req += 1;
        self.next_req
    }

    pub fn step(&mut self, input: Input, now: Instant) -> Step {
        let mut out = Step::default();
        match input {
            Input::View(v) => {
                if let Phase::Standby { retry_at } = &mut self.phase {
                    // A changed Lease is news: the wait after a failed attempt is over.
                    let rv = v.lease.as_ref().map(|l| l.resource_version.clone());
                    if retry_at.as_ref().is_some_and(|(_, seen)| *seen != rv) {
                        *retry_at = None;
                    }
                }
                self.view = v;
            }
            Input::Tick => {}
            Input::Stop(s) => {
                if self.stop.is_none() {
                    self.stop = Some(s);
                }
            }
            Input::Reply { req, reply } => self.reply(req, reply, now, &mut out),
            Input::Probed { req, answered_by } => self.probed(req, answered_by, now, &mut out),
            Input::AddressLost => {
                if let Phase::Owner(o) = &mut self.phase
                    && self.kind == Kind::Vip
                    && o.probing.is_none()
                    && o.bind_failing.is_none()
                    && now < o.fence_at
                {
                    // (While binds fail the address was never there: the retries go on.)
                    out.actions.push(Action::Report(Report::Rebinding));
                    out.actions.push(bind_action(self.mode, &self.timing, o));
                    // Announce again: clients that dropped the entry meanwhile relearn it.
                    o.burst_start = now;
                    o.burst_round = 0;
                }
            }
            Input::BindDone(result) => self.bind_done(result, now, &mut out),
            Input::Fenced => match self.phase {
                Phase::Owner(_) => {
                    self.withdraw(
                        "a majority declared this node dead and fenced it",
                        true,
                        &mut out,
                    );
                }
                // A take-over in flight is abandoned: a write that still lands names us, and
                // is then released (a fenced node never keeps a Lease it wrote before).
                Phase::Acquiring { .. } | Phase::Fencing { .. } | Phase::FenceWait { .. } => {
                    self.back_off(now);
                }
                _ => {}
            },
        }
        self.evaluate(now, &mut out);
        out
    }

    fn reply(&mut self, req: ReqId, reply: Reply, now: Instant, out: &mut Step) {
        match &mut self.phase {
            Phase::Acquiring {
                req: r,
                sent,
                deadline,
                on,
                iface,
                previous,
                waited_since,
            } if *r == req => {
                match reply {
                    // A reply that comes after the deadline is as good as none.
                    Reply::Written { resource_version } if now < *deadline => {
                        let sent = *sent;
                        let fence_at = match self.mode {
                            Mode::Lease => sent + self.timing.renew_deadline,
                            Mode::Lan => sent + LAN_ADDRESS_BACKSTOP,
                        };
                        let iface = *iface;
                        let mut owned = Owned {
                            iface,
                            resource_version,
                            stale: Some(on.clone()),
                            fence_at,
                            next_renew: match self.mode {
                                Mode::Lease => sent + self.timing.renew_interval,
                                Mode::Lan => sent + LAN_ADDRESS_REFRESH,
                            },
                            renewing: None,
                            burst_start: now,
                            burst_round: 0,
                            sent,
                            probing: None,
                            previous: previous.clone(),
                            waited_since: *waited_since,
                            bind_failing: None,
                        };
                        match self.kind {
                            // First ask the LAN whether anyone else answers for the VIP.
                            Kind::Vip => {
                                self.next_req += 1;
                                owned.probing = Some(self.next_req);
                                out.actions.push(Action::Probe {
                                    req: self.next_req,
                                    iface,
                                });
                            }
                            Kind::Plain => out.actions.push(Action::Report(Report::Took {
                                previous: previous.clone(),
                                waited_since: *waited_since,
                            })),
                        }
                        self.phase = Phase::Owner(owned);
                    }
                    Reply::Written { .. } => {
                        self.phase = Phase::Standby { retry_at: None };
                    }
                    Reply::Lost | Reply::Fenced { .. } => self.back_off(now),
                    Reply::Failed(e) => {
                        out.actions.push(Action::Report(Report::AcquireFailed(e)));
                        self.back_off(now);
                    }
                }
            }
            Phase::Owner(o) if o.renewing.is_some_and(|(r, _)| r == req) => {
                let (_, sent) = o.renewing.take().expect("matched");
                match reply {
                    Reply::Written { resource_version } if now < o.fence_at => {
                        o.resource_version = resource_version;
                        o.fence_at = sent + self.timing.renew_deadline;
                        o.next_renew = (sent + self.timing.renew_interval).max(now);
                        o.sent = sent;
                        // While binds fail they follow the backoff, renewals or not.
                        let due = o.bind_failing.as_ref().is_none_or(|f| now >= f.retry_at);
                        if self.kind == Kind::Vip && o.probing.is_none() && due {
                            out.actions.push(Action::Bind {
                                iface: o.iface,
                                until: self.timing.address_until(sent),
                                not_after: o.fence_at,
                            });
                        }
                    }
                    // Too late: the fence timer has already decided (evaluate withdraws).
                    Reply::Written { .. } | Reply::Fenced { .. } => {}
                    Reply::Lost => {
                        self.withdraw("the lease was taken", false, out);
                        self.back_off(now);
                    }
                    Reply::Failed(e) => {
                        out.actions.push(Action::Report(Report::RenewFailed(e)));
                        o.next_renew = now + self.timing.renew_interval / 4;
                    }
                }
            }
            Phase::Fencing { req: r, on, .. } if *r == req => match reply {
                // Fenced: its gate has closed already (a majority declared it dead); take
                // the Lease now, if it is still the one we decided on.
                Reply::Written { .. }
                | Reply::Fenced {
                    wait: Duration::ZERO,
                } => {
                    let on = on.clone();
                    self.phase = Phase::Standby { retry_at: None };
                    self.acquire_if_unchanged(&on, now, out);
                }
                Reply::Fenced { wait } => {
                    self.phase = Phase::FenceWait {
                        until: now + wait,
                        on: on.clone(),
                    };
                }
                Reply::Lost => self.back_off(now),
                Reply::Failed(e) => {
                    out.actions
                        .push(Action::Report(Report::AcquireFailed(format!(
                            "fencing the holder: {e}"
                        ))));
                    self.back_off(now);
                }
            },
            Phase::Leaving { req: r, .. } if *r == req => {
                if let Reply::Failed(e) = reply {
                    out.actions.push(Action::Report(Report::ReleaseFailed(e)));
                    // Not released: a view still naming us is not stale.
                    self.left_on = None;
                }
                self.phase = self.after_leaving();
            }
            // A reply to a request we gave up on.
            _ => {}
        }
    }

    fn probed(&mut self, req: ReqId, answered_by: Option<String>, now: Instant, out: &mut Step) {
        let Phase::Owner(o) = &mut self.phase else {
            return;
        };
        if o.probing != Some(req) {
            return;
        }
        o.probing = None;
        match answered_by {
            None if now < o.fence_at => {
                out.actions.push(Action::Report(Report::Took {
                    previous: o.previous.clone(),
                    waited_since: o.waited_since,
                }));
                // The rules first (harmless while nobody sends us the VIP's traffic), then
                // the address (the kernel answers ARP from then on), then announcements.
                out.actions.push(Action::Dnat(true));
                out.actions.push(bind_action(self.mode, &self.timing, o));
                o.burst_start = now;
                o.burst_round = 0;
            }
            // Too late to bind on it: the fence decides (evaluate withdraws).
            None => {}
            Some(mac) => {
                // Someone else answers for the VIP: never bind it; give the Lease back and
                // try again later (an owner that is still live, or a foreign host).
                out.actions.push(Action::Report(Report::Conflict { mac }));
                self.phase = Phase::Standby { retry_at: None };
                self.conflict_until = Some(now + CONFLICT_RETRY);
                self.leave(now, out, |req, deadline| Action::Release {
                    req,
                    step_down: false,
                    deadline,
                    failure: None,
                });
            }
        }
    }

    /// Takes a bind's outcome: a failure is tried again with backoff (see `evaluate`), and
    /// given up after [`BIND_GIVE_UP`].
    fn bind_done(&mut self, result: Result<(), String>, now: Instant, out: &mut Step) {
        let Phase::Owner(o) = &mut self.phase else {
            return;
        };
        if self.kind != Kind::Vip {
            return;
        }
        match result {
            Ok(()) => {
                self.gave_up = 0;
                if let Some(f) = o.bind_failing.take() {
                    out.actions.push(Action::Report(Report::BindRecovered {
                        attempts: f.attempts,
                    }));
                }
            }
            Err(error) => {
                let f = o.bind_failing.get_or_insert(BindFailing {
                    since: now,
                    attempts: 0,
                    error: String::new(),
                    retry_at: now,
                });
                f.attempts += 1;
                f.error = error.clone();
                f.retry_at = now + bind_backoff(f.attempts);
                out.actions.push(Action::Report(Report::BindFailed {
                    error,
                    attempt: f.attempts,
                    gives_up_at: f.since + BIND_GIVE_UP,
                }));
            }
        }
    }

    fn back_off(&mut self, now: Instant) {
        let rv = self.view.lease.as_ref().map(|l| l.resource_version.clone());
        self.phase = Phase::Standby {
            retry_at: Some((now + self.timing.renew_interval, rv)),
        };
    }

    fn after_leaving(&self) -> Phase {
        if self.stop.is_some() {
            Phase::Stopped
        } else {
            Phase::Standby { retry_at: None }
        }
    }

    /// Stop answering: unbind first, then DNAT off (not on shutdown: clients whose entry
    /// still points here are served until the speaker removes its table last).
    fn withdraw(&mut self, reason: &str, fenced: bool, out: &mut Step) {
        if let Phase::Owner(o) = &self.phase {
            if self.kind == Kind::Vip {
                out.actions.push(Action::Unbind { iface: o.iface });
                if self.stop != Some(Stop::Shutdown) {
                    out.actions.push(Action::Dnat(false));
                }
            }
            out.actions.push(Action::Report(Report::Withdrew {
                reason: reason.to_string(),
                fenced,
            }));
        }
        self.phase = Phase::Standby { retry_at: None };
    }

    fn leave(&mut self, now: Instant, out: &mut Step, make: impl FnOnce(ReqId, Instant) -> Action) {
        self.left_on = self.view.lease.as_ref().map(|l| l.resource_version.clone());
        let req = self.req();
        let deadline = now + RELEASE_DEADLINE;
        out.actions.push(make(req, deadline));
        self.phase = Phase::Leaving { req, deadline };
    }

    fn names_me(&self) -> bool {
        self.view
            .lease
            .as_ref()
            .is_some_and(|l| l.holder.as_deref() == Some(self.me.as_str()))
    }

    fn evaluate(&mut self, now: Instant, out: &mut Step) {
        // Each arm either settles (sets `out.wake`) or changes phase and loops once more.
        for _ in 0..4 {
            match self.phase.clone() {
                Phase::Stopped => return,
                Phase::Leaving { deadline, .. } => {
                    if now >= deadline {
                        self.left_on = None;
                        out.actions.push(Action::Report(Report::ReleaseFailed(
                            "no reply before the deadline".into(),
                        )));
                        self.phase = self.after_leaving();
                        continue;
                    }
                    out.wake = Some(deadline);
                    return;
                }
                Phase::Fencing { deadline, .. } => {
                    if now >= deadline {
                        self.back_off(now);
                        continue;
                    }
                    out.wake = Some(deadline);
                    return;
                }
                Phase::FenceWait { until, on } => {
                    if self.stop.is_some() {
                        self.phase = Phase::Stopped;
                        return;
                    }
                    if now >= until {
                        self.phase = Phase::Standby { retry_at: None };
                        return self.acquire_if_unchanged(&on, now, out);
                    }
                    out.wake = Some(until);
                    return;
                }
                Phase::Acquiring { deadline, .. } => {
                    if now >= deadline {
                        out.actions.push(Action::Report(Report::AcquireFailed(
                            "no reply before the deadline".into(),
                        )));
                        self.back_off(now);
                        continue;
                    }
                    if self.stop.is_some() {
                        // The write may still land: the Lease then expires unrenewed.
                        self.phase = Phase::Stopped;
                        return;
                    }
                    out.wake = Some(deadline);
                    return;
                }
                Phase::Owner(o) => {
                    if now >= o.fence_at {
                        self.withdraw(
                            "could not renew within the deadline (self-fencing)",
                            true,
                            out,
                        );
                        continue;
                    }
                    if let Some(stop) = self.stop {
                        self.withdraw("stopping", false, out);
                        match stop {
                            // Released naming us, so the others rank us out and the first
                            // of them takes it at once.
                            Stop::Shutdown => {
                                self.leave(now, out, |req, deadline| Action::Release {
                                    req,
                                    step_down: true,
                                    deadline,
                                    failure: None,
                                })
                            }
                            Stop::Gone => self
                                .leave(now, out, |req, deadline| Action::Delete { req, deadline }),
                        }
                        continue;
                    }
                    match &self.view.eligible {
                        Err(why) => {
                            let why = format!("no longer eligible: {why}");
                            let release = self.names_me();
                            self.withdraw(&why, false, out);
                            if release {
                                self.leave(now, out, |req, deadline| Action::Release {
                                    req,
                                    step_down: false,
                                    deadline,
                                    failure: None,
                                });
                            }
                            continue;
                        }
                        Ok(i) if *i != o.iface && self.kind == Kind::Vip => {
                            self.withdraw("the interface changed", false, out);
                            continue;
                        }
                        Ok(_) => {}
                    }
                    // The watch shows the Lease moved on from what we wrote: someone else
                    // holds it (or it was deleted). A stale watch can only show what we took
                    // it on, which names someone else but is not news.
                    let caught_up = self
                        .view
                        .lease
                        .as_ref()
                        .is_some_and(|l| l.holder.as_deref() == Some(self.me.as_str()));
                    if caught_up && let Phase::Owner(o) = &mut self.phase {
                        // The watch has delivered a write naming us: from here on, a Lease
                        // naming anyone else is news (a watch delivers in order).
                        o.stale = None;
                    }
                    let moved = match &self.view.lease {
                        Some(l) if l.holder.as_deref() == Some(self.me.as_str()) => false,
                        Some(l) => o.stale != Some(Some(l.resource_version.clone())),
                        None => o.stale != Some(None),
                    };
                    if moved {
                        let to = self
                            .view
                            .lease
                            .as_ref()
                            .and_then(|l| l.holder.clone())
                            .unwrap_or_else(|| "nobody".into());
                        self.withdraw(&format!("the lease moved to {to}"), false, out);
                        self.back_off(now);
                        return self.settle_standby(now, out);
                    }
                    if self.names_me() && self.view.lease.as_ref().is_some_and(|l| l.step_down) {
                        self.withdraw("asked to step down", false, out);
                        self.leave(now, out, |req, deadline| Action::Release {
                            req,
                            step_down: true,
                            deadline,
                            failure: None,
                        });
                        continue;
                    }
                    if let Some(f) = &o.bind_failing
                        && now >= f.since + BIND_GIVE_UP
                    {
                        let error = f.error.clone();
                        let hold = hold_down(self.gave_up);
                        self.gave_up = self.gave_up.saturating_add(1);
                        self.hold_down_until = Some(now + hold);
                        out.actions.push(Action::Report(Report::GaveUp {
                            error: error.clone(),
                            hold_down: hold,
                        }));
                        let release = self.names_me();
                        self.withdraw(
                            &format!("could not bind for {} s: {error}", BIND_GIVE_UP.as_secs()),
                            false,
                            out,
                        );
                        if release {
                            let failure = Some(error);
                            self.leave(now, out, |req, deadline| Action::Release {
                                req,
                                step_down: false,
                                deadline,
                                failure,
                            });
                        }
                        continue;
                    }
                    let Phase::Owner(o) = &mut self.phase else {
                        unreachable!()
                    };
                    let mut failing_wake = None;
                    let mut retry = false;
                    // A bind decided in this step already (a renewal's) is this attempt.
                    let binding = out.actions.iter().any(|a| matches!(a, Action::Bind { .. }));
                    if let Some(f) = &mut o.bind_failing {
                        if binding {
                            f.retry_at = f.retry_at.max(now + bind_backoff(f.attempts));
                        } else if now >= f.retry_at {
                            // Not again before the next backoff (a bind the shell drops as
                            // too late brings no outcome back).
                            retry = true;
                            f.retry_at = now + bind_backoff(f.attempts);
                        }
                        failing_wake = Some(f.retry_at.min(f.since + BIND_GIVE_UP));
                    }
                    if retry {
                        out.actions.push(bind_action(self.mode, &self.timing, o));
                    }
                    if self.mode == Mode::Lan && now >= o.next_renew {
                        // No API request: the address's backstop lifetime moves on.
                        o.fence_at = now + LAN_ADDRESS_BACKSTOP;
                        o.next_renew = now + LAN_ADDRESS_REFRESH;
                        if self.kind == Kind::Vip && o.probing.is_none() && !retry {
                            out.actions.push(Action::Bind {
                                iface: o.iface,
                                until: o.fence_at,
                                not_after: o.fence_at,
                            });
                        }
                    }
                    if o.renewing.is_none() && now >= o.next_renew {
                        self.next_req += 1;
                        let req = self.next_req;
                        o.renewing = Some((req, now));
                        out.actions.push(Action::Renew {
                            req,
                            deadline: o.fence_at,
                        });
                    }
                    let mut wake = o.fence_at;
                    if o.renewing.is_none() {
                        wake = wake.min(o.next_renew);
                    }
                    if self.kind == Kind::Vip && o.probing.is_none() {
                        while let Some(at) = announce::round_at(o.burst_start, o.burst_round) {
                            if now < at {
                                wake = wake.min(at);
                                break;
                            }
                            out.actions.push(Action::Announce {
                                iface: o.iface,
                                round: o.burst_round,
                                not_after: o.fence_at,
                            });
                            o.burst_round += 1;
                        }
                    }
                    out.wake = Some(failing_wake.map_or(wake, |f| f.min(wake)));
                    return;
                }
                Phase::Standby { .. } => return self.settle_standby(now, out),
            }
        }
    }

    /// Takes over only if the Lease is still at `on`; else looks again.
    fn acquire_if_unchanged(&mut self, on: &str, now: Instant, out: &mut Step) {
        let same = self
            .view
            .lease
            .as_ref()
            .is_some_and(|l| l.resource_version == on);
        if same {
            self.acquire(now, out);
        } else {
            self.settle_standby(now, out);
        }
    }

    /// Writes the Lease naming us (create, take over or adopt) and waits for the reply.
    fn acquire(&mut self, now: Instant, out: &mut Step) {
        let Ok(iface) = self.view.eligible.clone() else {
            return;
        };
        let lease = self.view.lease.clone();
        let req = self.req();
        let deadline = now + self.timing.renew_deadline;
        let previous = lease.as_ref().and_then(|l| {
            l.holder
                .clone()
                .or_else(|| l.stepped_down_from.clone())
                .filter(|p| *p != self.me)
        });
        let waited_since = lease
            .as_ref()
            .map(|l| match (&l.holder, &self.view.holder_node) {
                (None, _) => l.since,
                (
                    Some(_),
                    Some(HolderNode {
                        dead_since: Some(t),
                        ..
                    }),
                ) if l.lan => *t,
                _ => l.expires_at(),
            });
        let on = lease.as_ref().map(|l| l.resource_version.clone());
        out.actions.push(Action::Acquire {
            req,
            resource_version: on.clone(),
            deadline,
        });
        self.phase = Phase::Acquiring {
            req,
            sent: now,
            deadline,
            on,
            iface,
            previous,
            waited_since,
        };
        out.wake = Some(deadline);
    }

    fn settle_standby(&mut self, now: Instant, out: &mut Step) {
        let Phase::Standby { retry_at } = &self.phase else {
            return;
        };
        if self.stop.is_some() {
            self.phase = Phase::Stopped;
            return;
        }
        if self.view.eligible.is_err() {
            return;
        }
        if let Some((t, _)) = retry_at
            && now < *t
        {
            out.wake = Some(*t);
            return;
        }
        if let Some(t) = self.conflict_until
            && now < t
        {
            out.wake = Some(t);
            return;
        }
        if let Some(t) = self.hold_down_until
            && now < t
        {
            out.wake = Some(t);
            return;
        }
        if self.mode == Mode::Lan && !self.view.serving {
            // Suspended or not yet confirmed: no take-over, no adoption (the view changes
            // when that ends).
            return;
        }
        let lease = self.view.lease.clone();
        // A Lease that a live node holds without renewing it: only a majority's
        // declaration moves it, and the holder's generation is fenced first.
        if let Some(l) = &lease
            && l.lan
            && let Some(holder) = l.holder.as_deref()
            && holder != self.me
        {
            let Some(h) = self.view.holder_node.clone() else {
                return;
            };
            let Some(dead_since) = h.dead_since else {
                return;
            };
            let at = dead_since + self.view.delay;
            if now < at {
                out.wake = Some(at);
                return;
            }
            // Fenced already or not, through the fence: it tells whether the holder may still
            // answer on its node Lease, and then we wait that out from now.
            let on = l.resource_version.clone();
            let req = self.req();
            let deadline = now + self.timing.renew_deadline;
            out.actions.push(Action::Fence {
                req,
                node: holder.to_string(),
                generation: h.generation,
                deadline,
            });
            self.phase = Phase::Fencing { req, deadline, on };
            out.wake = Some(deadline);
            return;
        }
        let wake = match candidate(
            lease.as_ref(),
            &self.me,
            now,
            self.view.absent_since,
            self.view.delay,
        ) {
            Candidate::WaitUntil(t) => Some(t),
            // In LAN mode a Lease naming us that we do not hold in this life (a restart, a
            // fence, an abandoned take-over) is given back rather than adopted: a candidate
            // that fenced our old generation may be about to take it.
            Candidate::Adopt
                if self.mode == Mode::Lan
                    && self.left_on.as_deref()
                        == lease.as_ref().map(|l| l.resource_version.as_str()) =>
            {
                // Our own release has not reached the watch yet.
                None
            }
            Candidate::Adopt if self.mode == Mode::Lan => {
                self.leave(now, out, |req, deadline| Action::Release {
                    req,
                    step_down: false,
                    deadline,
                    failure: None,
                });
                return;
            }
            Candidate::Acquire | Candidate::Adopt => return self.acquire(now, out),
        };
        out.wake = wake;
    }
}

/// The bind (or refresh) of an owned VIP's address: in lease mode gone when the Lease could
/// have expired for the others, in LAN mode at the owner's backstop.
fn bind_action(mode: Mode, timing: &Timing, o: &Owned) -> Action {
    Action::Bind {
        iface: o.iface,
        until: match mode {
            Mode::Lease => timing.address_until(o.sent),
            Mode::Lan => o.fence_at,
        },
        not_after: o.fence_at,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ME: &str = "node-1";

    fn timing() -> Timing {
        Timing {
            lease: Duration::from_secs(4),
            renew_interval: Duration::from_secs(1),
            renew_deadline: Duration::from_secs(2),
        }
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn observed(holder: Option<&str>, rv: &str, since: Instant) -> Observed {
        Observed {
            holder: holder.map(str::to_string),
            resource_version: rv.into(),
            duration: Duration::from_secs(4),
            since,
            step_down: false,
            stepped_down_from: None,
            lan: false,
        }
    }

    fn view(lease: Option<Observed>, t0: Instant) -> View {
        View {
            eligible: Ok(2),
            delay: Duration::ZERO,
            lease,
            absent_since: t0,
            serving: true,
            holder_node: None,
        }
    }

    fn lan_lease(holder: &str, rv: &str, since: Instant) -> Observed {
        Observed {
            lan: true,
            duration: Duration::from_secs(3600),
            ..observed(Some(holder), rv, since)
        }
    }

    #[test]
    fn in_lan_mode_a_held_lease_moves_only_after_a_majority_declared_its_holder_dead_and_a_fence() {
        let t0 = Instant::now();
        let mut h = Holder::new(
            ME,
            timing(),
            Kind::Vip,
            view(Some(lan_lease("node-2", "7", t0)), t0),
        )
        .lan();
        let alive = HolderNode {
            generation: 3,
            fenced: false,
            dead_since: None,
        };
        let mut v = view(Some(lan_lease("node-2", "7", t0)), t0);
        v.holder_node = Some(alive.clone());
        // Not renewed for an hour: still no take-over while nobody declared node-2 dead.
        let s = h.step(Input::View(v.clone()), t0 + Duration::from_secs(3600));
        assert!(s.actions.is_empty(), "{s:?}");
        // Declared dead by a majority: fence first.
        v.holder_node = Some(HolderNode {
            dead_since: Some(t0 + ms(10)),
            ..alive
        });
        let s = h.step(Input::View(v.clone()), t0 + ms(20));
        let fence = s
            .actions
            .iter()
            .find_map(|a| match a {
                Action::Fence {
                    req,
                    node,
                    generation,
                    ..
                } => Some((*req, node.clone(), *generation)),
                _ => None,
            })
            .expect("a fence");
        assert_eq!((fence.1.as_str(), fence.2), ("node-2", 3));
        let s = h.step(
            Input::Reply {
                req: fence.0,
                reply: Reply::Written {
                    resource_version: "x".into(),
                },
            },
            t0 + ms(25),
        );
        let req = acquire_req(&s);
        let s = h.step(
            Input::Reply {
                req,
                reply: Reply::Written {
                    resource_version: "8".into(),
                },
            },
            t0 + ms(30),
        );
        let probe = s
            .actions
            .iter()
            .find_map(|a| match a {
                Action::Probe { req, .. } => Some(*req),
                _ => None,
            })
            .expect("a probe before binding");
        let s = h.step(
            Input::Probed {
                req: probe,
                answered_by: None,
            },
            t0 + ms(60),
        );
        assert!(s.actions.iter().any(|a| matches!(a, Action::Bind { .. })));
        // And it never writes again: three days later it still answers, with no API request,
        // and the address's backstop lifetime has kept moving on.
        v.lease = Some(Observed {
            lan: true,
            ..lan_lease(ME, "8", t0 + ms(30))
        });
        h.step(Input::View(v.clone()), t0 + ms(100));
        let mut lifetime_ends = t0 + LAN_ADDRESS_BACKSTOP;
        let days = 3 * 24 * 3600;
        for m in (1..days).step_by(60).map(|s| t0 + Duration::from_secs(s)) {
            let s = h.step(Input::Tick, m);
            assert!(
                !s.actions
                    .iter()
                    .any(|a| matches!(a, Action::Renew { .. } | Action::Unbind { .. })),
                "{s:?}"
            );
            for a in &s.actions {
                if let Action::Bind { until, .. } = a {
                    lifetime_ends = *until;
                }
            }
            assert!(
                lifetime_ends > m + LAN_ADDRESS_BACKSTOP - LAN_ADDRESS_REFRESH - ms(60_001),
                "the address would lapse by itself"
            );
        }
        // Fenced (our own node was declared dead): withdraw at once.
        let s = h.step(Input::Fenced, t0 + Duration::from_secs(days + 1));
        assert!(s.actions.iter().any(|a| matches!(a, Action::Unbind { .. })));
    }

    #[test]
    fn in_lan_mode_a_suspended_node_takes_nothing_and_a_lease_of_the_previous_release_expires_as_before()
     {
        let t0 = Instant::now();
        let mut v = view(None, t0);
        v.serving = false;
        let mut h = Holder::new(ME, timing(), Kind::Vip, v.clone()).lan();
        assert!(h.step(Input::Tick, t0 + ms(10)).actions.is_empty());
        // A Lease renewed per IP by a speaker of the previous release: taken only once expired.
        v.serving = true;
        v.lease = Some(observed(Some("node-2"), "3", t0));
        let s = h.step(Input::View(v), t0 + ms(3999));
        assert!(s.actions.is_empty());
        let s = h.step(Input::Tick, t0 + ms(4000));
        acquire_req(&s);
    }

    fn acquire_req(s: &Step) -> ReqId {
        s.actions
            .iter()
            .find_map(|a| match a {
                Action::Acquire { req, .. } => Some(*req),
                _ => None,
            })
            .expect("an acquire")
    }

    fn renew_req(s: &Step) -> Option<ReqId> {
        s.actions.iter().find_map(|a| match a {
            Action::Renew { req, .. } => Some(*req),
            _ => None,
        })
    }

    fn written(rv: &str) -> Reply {
        Reply::Written {
            resource_version: rv.into(),
        }
    }

    /// A holder that took a free Lease at t0 (request sent and answered at t0).
    fn probe_req(s: &Step) -> ReqId {
        s.actions
            .iter()
            .find_map(|a| match a {
                Action::Probe { req, .. } => Some(*req),
                _ => None,
            })
            .expect("a probe")
    }

    /// Answers the probe that `s` asked for: nobody else on the LAN.
    fn clean_probe(h: &mut Holder, s: &Step, at: Instant) -> Step {
        h.step(
            Input::Probed {
                req: probe_req(s),
                answered_by: None,
            },
            at,
        )
    }

    fn owner(t0: Instant) -> Holder {
        let mut h = Holder::new(ME, timing(), Kind::Vip, view(None, t0));
        let s = h.step(Input::Tick, t0);
        let req = acquire_req(&s);
        let s = h.step(
            Input::Reply {
                req,
                reply: written("1"),
            },
            t0,
        );
        assert!(
            !s.actions.iter().any(|a| matches!(a, Action::Bind { .. })),
            "nothing is bound before the probe"
        );
        let s = clean_probe(&mut h, &s, t0);
        assert!(s.actions.contains(&Action::Dnat(true)));
        h
    }

    #[test]
    fn an_address_someone_else_removed_is_bound_again_only_while_owned() {
        let t0 = Instant::now();
        // Before it owns anything, nothing happens.
        let mut standby = Holder::new(ME, timing(), Kind::Vip, view(None, t0));
        standby.step(Input::Tick, t0);
        let s = standby.step(Input::AddressLost, t0 + ms(1));
        assert!(
            !s.actions.iter().any(|a| matches!(a, Action::Bind { .. })),
            "{s:?}"
        );
        // The owner binds it again, within its fence, and announces again at once.
        let mut h = owner(t0);
        let s = h.step(Input::AddressLost, t0 + ms(300));
        let bind = s
            .actions
            .iter()
            .find_map(|a| match a {
                Action::Bind {
                    until, not_after, ..
                } => Some((*until, *not_after)),
                _ => None,
            })
            .expect("bound again");
        assert!(bind.0 <= bind.1 + timing().lease && bind.1 > t0 + ms(300));
        assert!(s.actions.contains(&Action::Report(Report::Rebinding)));
        assert!(
            s.actions
                .iter()
                .any(|a| matches!(a, Action::Announce { round: 0, .. })),
            "{s:?}"
        );
        // Once it has withdrawn (no longer eligible), a late report binds nothing.
        let mut v = view(None, t0);
        v.eligible = Err("link down".into());
        h.step(Input::View(v), t0 + ms(400));
        let s = h.step(Input::AddressLost, t0 + ms(410));
        assert!(
            !s.actions.iter().any(|a| matches!(a, Action::Bind { .. })),
            "{s:?}"
        );
    }

    /// Drives an owner from `from` to `to`: wakes it when it asks, answers every renewal, and
    /// answers every bind with `bind(at)`. Returns every action with when it was decided.
    fn drive(
        h: &mut Holder,
        from: Instant,
        to: Instant,
        bind: impl Fn(Instant) -> Result<(), String>,
    ) -> Vec<(Instant, Action)> {
        let mut seen = Vec::new();
        let mut rv = 10;
        let mut now = from;
        let mut queue = std::collections::VecDeque::from([Input::Tick]);
        loop {
            let mut wake = None;
            while let Some(input) = queue.pop_front() {
                let s = h.step(input, now);
                for a in s.actions {
                    match &a {
                        Action::Renew { req, .. } => {
                            rv += 1;
                            queue.push_back(Input::Reply {
                                req: *req,
                                reply: written(&rv.to_string()),
                            });
                        }
                        Action::Bind { .. } => queue.push_back(Input::BindDone(bind(now))),
                        _ => {}
                    }
                    seen.push((now, a));
                }
                wake = s.wake;
            }
            let next = wake.unwrap_or(to).max(now + ms(1));
            if next >= to {
                break;
            }
            now = next;
            queue.push_back(Input::Tick);
        }
        seen
    }

    fn mine(t0: Instant) -> View {
        view(Some(observed(Some(ME), "1", t0)), t0)
    }

    #[test]
    fn binds_that_keep_failing_are_retried_with_backoff_then_given_up_and_held_down() {
        let t0 = Instant::now();
        let mut h = owner(t0);
        h.step(Input::View(mine(t0)), t0);
        let failed = t0 + ms(10);
        let s = h.step(Input::BindDone(Err("Permission denied".into())), failed);
        assert!(
            s.actions.iter().any(|a| matches!(
                a,
                Action::Report(Report::BindFailed { attempt: 1, gives_up_at, .. })
                    if *gives_up_at == failed + BIND_GIVE_UP
            )),
            "{s:?}"
        );
        assert!(s.wake.is_some_and(|w| w <= failed + BIND_RETRY_MIN));
        // The address was never there: seeing it missing is no reason to bind out of turn.
        let s = h.step(Input::AddressLost, failed + ms(1));
        assert!(
            !s.actions
                .iter()
                .any(|a| matches!(a, Action::Bind { .. } | Action::Report(Report::Rebinding))),
            "{s:?}"
        );
        let seen = drive(&mut h, failed + BIND_RETRY_MIN, t0 + ms(5000), |_| {
            Err("Permission denied".into())
        });
        let binds: Vec<Instant> = seen
            .iter()
            .filter(|(_, a)| matches!(a, Action::Bind { .. }))
            .map(|(t, _)| *t)
            .collect();
        // 100, 200, 400, 800, 1000, ... ms apart, until the give-up.
        assert!(binds.len() >= 5 && binds.len() <= 8, "{binds:?}");
        for pair in binds.windows(2) {
            assert!(pair[1] - pair[0] >= BIND_RETRY_MIN, "{binds:?}");
            assert!(pair[1] - pair[0] <= BIND_RETRY_MAX + ms(1), "{binds:?}");
        }
        let gave_up = seen
            .iter()
            .find(|(_, a)| matches!(a, Action::Report(Report::GaveUp { .. })))
            .map(|(t, _)| *t)
            .expect("given up");
        assert!(gave_up >= failed + BIND_GIVE_UP && gave_up <= failed + BIND_GIVE_UP + ms(2));
        let after: Vec<&Action> = seen
            .iter()
            .filter(|(t, _)| *t == gave_up)
            .map(|(_, a)| a)
            .collect();
        let unbind = after
            .iter()
            .position(|a| matches!(a, Action::Unbind { .. }))
            .expect("unbinds");
        let release = after
            .iter()
            .position(|a| matches!(a, Action::Release { failure: Some(f), step_down: false, .. } if f.contains("Permission denied")))
            .expect("releases, saying why");
        assert!(
            unbind < release,
            "the address goes before the Lease: {after:?}"
        );
        assert!(
            !seen
                .iter()
                .any(|(t, a)| *t > gave_up && matches!(a, Action::Bind { .. }))
        );

        // Released; the Lease free: no new attempt for the hold-down.
        let Some(Action::Release { req, .. }) = after.last().map(|a| (*a).clone()) else {
            panic!("{after:?}")
        };
        h.step(
            Input::Reply {
                req,
                reply: written("20"),
            },
            gave_up + ms(5),
        );
        let free = view(Some(observed(None, "20", gave_up + ms(10))), t0);
        let s = h.step(Input::View(free.clone()), gave_up + ms(10));
        assert!(
            !s.actions
                .iter()
                .any(|a| matches!(a, Action::Acquire { .. })),
            "{s:?}"
        );
        assert_eq!(s.wake, Some(gave_up + HOLD_DOWN));
        let s = h.step(Input::Tick, gave_up + HOLD_DOWN - ms(1));
        assert!(
            !s.actions
                .iter()
                .any(|a| matches!(a, Action::Acquire { .. })),
            "{s:?}"
        );
        let s = h.step(Input::Tick, gave_up + HOLD_DOWN);
        assert!(
            s.actions
                .iter()
                .any(|a| matches!(a, Action::Acquire { .. })),
            "{s:?}"
        );
    }

    #[test]
    fn a_bind_that_succeeds_within_the_give_up_time_keeps_the_vip() {
        let t0 = Instant::now();
        let mut h = owner(t0);
        h.step(Input::View(mine(t0)), t0);
        h.step(
            Input::BindDone(Err("No buffer space available".into())),
            t0 + ms(10),
        );
        // Fails until 1.5 s, then works.
        let seen = drive(&mut h, t0 + ms(110), t0 + ms(6000), |at| {
            if at < t0 + ms(1500) {
                Err("No buffer space available".into())
            } else {
                Ok(())
            }
        });
        assert!(
            seen.iter()
                .any(|(_, a)| matches!(a, Action::Report(Report::BindRecovered { attempts }) if *attempts >= 3)),
            "{seen:?}"
        );
        assert!(
            !seen.iter().any(|(_, a)| matches!(
                a,
                Action::Report(Report::GaveUp { .. })
                    | Action::Unbind { .. }
                    | Action::Release { .. }
            )),
            "{seen:?}"
        );
        assert!(h.holds_until(t0 + ms(6000)).is_some());
    }

    #[test]
    fn hold_downs_double_per_consecutive_give_up_up_to_the_cap() {
        assert_eq!(hold_down(0), HOLD_DOWN);
        assert_eq!(hold_down(1), HOLD_DOWN * 2);
        assert_eq!(hold_down(30), HOLD_DOWN_MAX);
        assert_eq!(bind_backoff(1), BIND_RETRY_MIN);
        assert_eq!(bind_backoff(2), BIND_RETRY_MIN * 2);
        assert_eq!(bind_backoff(40), BIND_RETRY_MAX);
    }

    #[tokio::test(start_paused = true)]
    async fn expiry_is_counted_from_when_we_saw_the_lease_change_and_staggered_by_rank() {
        let t0 = Instant::now();
        let s = observed(Some("node-2"), "7", t0);
        let z = Duration::ZERO;
        assert_eq!(
            candidate(Some(&s), ME, t0, t0, z),
            Candidate::WaitUntil(t0 + Duration::from_secs(4))
        );
        assert_eq!(
            candidate(Some(&s), ME, t0 + Duration::from_secs(4), t0, z),
            Candidate::Acquire
        );
        assert_eq!(
            candidate(Some(&observed(Some(ME), "7", t0)), ME, t0, t0, z),
            Candidate::Adopt
        );
        assert_eq!(
            candidate(Some(&s), ME, t0 + Duration::from_secs(4), t0, ms(300)),
            Candidate::WaitUntil(t0 + ms(4300))
        );
        assert_eq!(
            candidate(Some(&observed(None, "7", t0)), ME, t0, t0, z),
            Candidate::Acquire
        );
        assert_eq!(
            candidate(None, ME, t0, t0, ms(200)),
            Candidate::WaitUntil(t0 + ms(200))
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_taken_lease_binds_with_a_lifetime_bounded_by_the_request_not_the_reply() {
        let t0 = Instant::now();
        let mut h = Holder::new(ME, timing(), Kind::Vip, view(None, t0));
        let s = h.step(Input::Tick, t0);
        let req = acquire_req(&s);
        assert_eq!(
            s.wake,
            Some(t0 + Duration::from_secs(2)),
            "woken at the deadline"
        );
        // The reply comes 1.5 s later: the fence still counts from t0.
        let s = h.step(
            Input::Reply {
                req,
                reply: written("1"),
            },
            t0 + ms(1500),
        );
        let s = clean_probe(&mut h, &s, t0 + ms(1560));
        assert_eq!(s.actions[1], Action::Dnat(true), "rules before the address");
        assert_eq!(
            s.actions[2],
            Action::Bind {
                iface: 2,
                until: t0 + ms(3900),
                not_after: t0 + Duration::from_secs(2)
            }
        );
        assert!(
            s.actions
                .iter()
                .any(|a| matches!(a, Action::Announce { round: 0, .. })),
            "{s:?}"
        );
        assert_eq!(
            h.holds_until(t0 + ms(1500)),
            Some(t0 + Duration::from_secs(2))
        );
    }

    #[tokio::test(start_paused = true)]
    async fn an_acquire_reply_after_its_deadline_never_binds() {
        let t0 = Instant::now();
        let mut h = Holder::new(ME, timing(), Kind::Vip, view(None, t0));
        let req = acquire_req(&h.step(Input::Tick, t0));
        let s = h.step(Input::Tick, t0 + Duration::from_secs(2));
        assert!(!s.actions.iter().any(|a| matches!(a, Action::Bind { .. })));
        let s = h.step(
            Input::Reply {
                req,
                reply: written("1"),
            },
            t0 + ms(2100),
        );
        assert!(
            !s.actions.iter().any(|a| matches!(a, Action::Bind { .. })),
            "{s:?}"
        );
        assert_eq!(h.holds_until(t0 + ms(2100)), None);
        // The write did land: the Lease names us, and we take it back by CAS, anew.
        let s = h.step(
            Input::View(view(Some(observed(Some(ME), "1", t0 + ms(2100))), t0)),
            t0 + ms(3200),
        );
        assert!(matches!(
            s.actions[0],
            Action::Acquire { resource_version: Some(ref rv), .. } if rv == "1"
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn the_fence_fires_at_the_deadline_counted_from_the_renewal_request() {
        let t0 = Instant::now();
        let mut h = owner(t0);
        // The first renewal is due at t0 + 1 s; its reply never comes.
        let s = h.step(Input::Tick, t0 + Duration::from_secs(1));
        let req = renew_req(&s).expect("a renewal");
        assert_eq!(
            s.actions.iter().find(|a| matches!(a, Action::Renew { .. })),
            Some(&Action::Renew {
                req,
                deadline: t0 + Duration::from_secs(2)
            })
        );
        assert_eq!(s.wake, Some(t0 + Duration::from_secs(2)), "the fence time");
        let s = h.step(Input::Tick, t0 + Duration::from_secs(2));
        assert!(s.actions.contains(&Action::Unbind { iface: 2 }));
        assert!(s.actions.contains(&Action::Dnat(false)));
        assert_eq!(h.holds_until(t0 + Duration::from_secs(2)), None);
        // The renewal's reply, had it come, changes nothing now.
        let s = h.step(
            Input::Reply {
                req,
                reply: written("2"),
            },
            t0 + ms(2001),
        );
        assert!(!s.actions.iter().any(|a| matches!(a, Action::Bind { .. })));
    }

    #[tokio::test(start_paused = true)]
    async fn a_renewal_answered_just_before_the_deadline_moves_the_fence_by_its_send_time() {
        let t0 = Instant::now();
        let mut h = owner(t0);
        let req = renew_req(&h.step(Input::Tick, t0 + ms(1000))).unwrap();
        let s = h.step(
            Input::Reply {
                req,
                reply: written("2"),
            },
            t0 + ms(1999),
        );
        assert_eq!(
            s.actions[0],
            Action::Bind {
                iface: 2,
                until: t0 + ms(4900),
                not_after: t0 + ms(3000)
            }
        );
        assert_eq!(h.holds_until(t0 + ms(1999)), Some(t0 + ms(3000)));
    }

    #[tokio::test(start_paused = true)]
    async fn announcements_stop_the_moment_ownership_is_lost() {
        let t0 = Instant::now();
        let mut h = owner(t0);
        // A freeze: nothing is stepped until well after the fence time.
        let s = h.step(Input::Tick, t0 + ms(4500));
        assert!(
            !s.actions
                .iter()
                .any(|a| matches!(a, Action::Announce { .. })),
            "{s:?}"
        );
        assert!(s.actions.contains(&Action::Unbind { iface: 2 }));
    }

    #[tokio::test(start_paused = true)]
    async fn every_announcement_carries_the_fence_time() {
        let t0 = Instant::now();
        let mut h = owner(t0);
        let s = h.step(Input::Tick, t0 + ms(200));
        assert_eq!(
            s.actions,
            [Action::Announce {
                iface: 2,
                round: 1,
                not_after: t0 + Duration::from_secs(2)
            }]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_lease_that_moved_is_withdrawn_at_once_but_a_stale_watch_is_not_news() {
        let t0 = Instant::now();
        let mut h = Holder::new(
            ME,
            timing(),
            Kind::Vip,
            view(Some(observed(Some("node-2"), "5", t0)), t0),
        );
        let req = acquire_req(&h.step(Input::Tick, t0 + Duration::from_secs(4)));
        h.step(
            Input::Reply {
                req,
                reply: written("6"),
            },
            t0 + ms(4010),
        );
        // The watch still shows rv 5 naming node-2: not news.
        let s = h.step(
            Input::View(view(Some(observed(Some("node-2"), "5", t0)), t0)),
            t0 + ms(4020),
        );
        assert!(!s.actions.iter().any(|a| matches!(a, Action::Unbind { .. })));
        // Then ours, then someone else's write: withdraw without asking.
        h.step(
            Input::View(view(Some(observed(Some(ME), "6", t0 + ms(4030))), t0)),
            t0 + ms(4030),
        );
        let s = h.step(
            Input::View(view(Some(observed(Some("node-3"), "9", t0 + ms(4100))), t0)),
            t0 + ms(4100),
        );
        assert_eq!(s.actions[0], Action::Unbind { iface: 2 });
        assert_eq!(h.holds_until(t0 + ms(4100)), None);
    }

    #[tokio::test(start_paused = true)]
    async fn a_probe_answered_by_another_host_never_binds_and_gives_the_lease_back() {
        let t0 = Instant::now();
        let mut h = Holder::new(ME, timing(), Kind::Vip, view(None, t0));
        let req = acquire_req(&h.step(Input::Tick, t0));
        let s = h.step(
            Input::Reply {
                req,
                reply: written("1"),
            },
            t0 + ms(5),
        );
        let s = h.step(
            Input::Probed {
                req: probe_req(&s),
                answered_by: Some("02:00:00:00:00:99".into()),
            },
            t0 + ms(70),
        );
        assert!(
            !s.actions.iter().any(|a| matches!(
                a,
                Action::Bind { .. } | Action::Announce { .. } | Action::Dnat(true)
            )),
            "{s:?}"
        );
        assert!(s.actions.contains(&Action::Report(Report::Conflict {
            mac: "02:00:00:00:00:99".into()
        })));
        let Some(Action::Release { req, .. }) = s.actions.last().cloned() else {
            panic!("{s:?}")
        };
        h.step(
            Input::Reply {
                req,
                reply: written("2"),
            },
            t0 + ms(80),
        );
        // A free Lease right after: not before the conflict wait is over.
        let s = h.step(
            Input::View(view(Some(observed(None, "2", t0 + ms(80))), t0)),
            t0 + ms(90),
        );
        assert!(
            !s.actions
                .iter()
                .any(|a| matches!(a, Action::Acquire { .. }))
        );
        assert_eq!(s.wake, Some(t0 + ms(70) + CONFLICT_RETRY));
    }

    /// Found by the simulator (a broken watch on the new owner): the stale view lasts across
    /// renewals, and must not make the owner give the IP up.
    #[tokio::test(start_paused = true)]
    async fn a_watch_that_lags_across_renewals_is_not_news_and_a_deletion_after_it_is() {
        let t0 = Instant::now();
        let old = || view(Some(observed(Some("node-2"), "5", t0)), t0);
        let mut h = Holder::new(ME, timing(), Kind::Vip, old());
        let req = acquire_req(&h.step(Input::Tick, t0 + Duration::from_secs(4)));
        h.step(
            Input::Reply {
                req,
                reply: written("6"),
            },
            t0 + ms(4010),
        );
        for k in 1..5u64 {
            let at = t0 + ms(4010 + 1000 * k);
            let req = renew_req(&h.step(Input::Tick, at)).expect("renewing");
            let s = h.step(
                Input::Reply {
                    req,
                    reply: written(&format!("{}", 6 + k)),
                },
                at + ms(5),
            );
            assert!(
                !s.actions.iter().any(|a| matches!(a, Action::Unbind { .. })),
                "{s:?}"
            );
            let s = h.step(Input::View(old()), at + ms(6));
            assert!(
                !s.actions.iter().any(|a| matches!(a, Action::Unbind { .. })),
                "{s:?}"
            );
        }
        h.step(
            Input::View(view(Some(observed(Some(ME), "10", t0 + ms(8100))), t0)),
            t0 + ms(8100),
        );
        let s = h.step(Input::View(view(None, t0)), t0 + ms(8200));
        assert_eq!(s.actions[0], Action::Unbind { iface: 2 }, "deleted: news");
    }

    #[tokio::test(start_paused = true)]
    async fn a_lost_renewal_withdraws_and_a_failed_one_retries_before_the_fence() {
        let t0 = Instant::now();
        let mut h = owner(t0);
        let req = renew_req(&h.step(Input::Tick, t0 + ms(1000))).unwrap();
        let s = h.step(
            Input::Reply {
                req,
                reply: Reply::Failed("503".into()),
            },
            t0 + ms(1100),
        );
        assert_eq!(s.wake, Some(t0 + ms(1350)));
        let req = renew_req(&h.step(Input::Tick, t0 + ms(1350))).unwrap();
        let s = h.step(
            Input::Reply {
                req,
                reply: Reply::Lost,
            },
            t0 + ms(1400),
        );
        assert_eq!(s.actions[0], Action::Unbind { iface: 2 });
    }

    #[tokio::test(start_paused = true)]
    async fn shutdown_unbinds_keeps_dnat_and_releases_with_a_deadline() {
        let t0 = Instant::now();
        let mut h = owner(t0);
        let s = h.step(Input::Stop(Stop::Shutdown), t0 + ms(300));
        assert_eq!(s.actions[0], Action::Unbind { iface: 2 });
        assert!(!s.actions.contains(&Action::Dnat(false)));
        let Some(Action::Release {
            req,
            step_down: true,
            deadline,
            ..
        }) = s.actions.last().cloned()
        else {
            panic!("{s:?}")
        };
        assert_eq!(deadline, t0 + ms(300) + RELEASE_DEADLINE);
        h.step(
            Input::Reply {
                req,
                reply: written("2"),
            },
            t0 + ms(310),
        );
        assert!(h.is_stopped());
        // A standby stops at once.
        let mut idle = Holder::new("node-2", timing(), Kind::Vip, view(None, t0));
        idle.step(Input::Stop(Stop::Shutdown), t0);
        assert!(idle.is_stopped());
    }

    #[tokio::test(start_paused = true)]
    async fn a_step_down_request_releases_naming_us() {
        let t0 = Instant::now();
        let mut h = owner(t0);
        let mut l = observed(Some(ME), "3", t0 + ms(100));
        l.step_down = true;
        let s = h.step(Input::View(view(Some(l), t0)), t0 + ms(100));
        assert_eq!(s.actions[0], Action::Unbind { iface: 2 });
        assert!(matches!(
            s.actions.last(),
            Some(Action::Release {
                step_down: true,
                ..
            })
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn a_plain_holder_never_touches_the_dataplane() {
        let t0 = Instant::now();
        let mut h = Holder::new(ME, timing(), Kind::Plain, view(None, t0));
        let req = acquire_req(&h.step(Input::Tick, t0));
        let s = h.step(
            Input::Reply {
                req,
                reply: written("1"),
            },
            t0,
        );
        assert!(
            s.actions.iter().all(|a| matches!(a, Action::Report(_))),
            "{s:?}"
        );
        assert_eq!(h.holds_until(t0), Some(t0 + Duration::from_secs(2)));
    }
}
