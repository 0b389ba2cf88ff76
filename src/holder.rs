//! The async shell around a [`Holder`]: it feeds the machine views, timers, replies and
//! stop requests, and performs the actions it returns. It makes no decisions of its own
//! except one: an action that would take effect after its not-after time is dropped.
//!
//! API requests run as their own tasks, each cut off at its deadline, and report back over
//! a channel, so a hanging request never keeps the machine from its fence timer.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use futures::channel::mpsc;
use k8s_openapi::api::coordination::v1::Lease;
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{error, info, warn};

use crate::context::Shared;
use crate::dataplane::addr::Interface;
use crate::dataplane::packet::format_mac;
use crate::dataplane::probe::PROBE_WAIT;
use crate::lease::{Description, LeaseError};
use crate::ownership::machine::{Action, Holder, Input, Kind, Reply, Report, ReqId, Stop, View};
use crate::ownership::timing;

/// A failed unbind is tried again after this, doubling up to [`UNBIND_RETRY_MAX`], until the
/// address is gone (the holder's next step, a release, waits for it).
const UNBIND_RETRY_MIN: Duration = Duration::from_millis(50);
const UNBIND_RETRY_MAX: Duration = Duration::from_secs(1);
/// What the coordinator tells a holder: the machine's view, plus what the shell needs to
/// perform actions (the full Lease for CAS writes, the interface, the Service).
#[derive(Debug, Clone, PartialEq)]
pub struct Feed {
    pub view: View,
    /// The watch cache's copy, shared (a thousand VIPs would otherwise copy a thousand
    /// Leases on every pass that changes their views).
    pub lease: Option<Arc<Lease>>,
    pub interface: Option<Interface>,
    pub service: String,
    /// LAN mode: moves each time this node's generation was fenced (withdraw at once).
    pub fenced_epoch: u64,
    /// Moves each time the kernel was read without this VIP's address while it is owned
    /// here (someone else removed it): the holder binds it again.
    pub address_lost: u64,
}

/// Which Lease a holder holds.
#[derive(Debug, Clone)]
pub enum Target {
    Vip(IpAddr),
    /// The allocator's Lease: no dataplane, only "may act until".
    Allocator,
}

impl Target {
    fn kind(&self) -> Kind {
        match self {
            Target::Vip(_) => Kind::Vip,
            Target::Allocator => Kind::Plain,
        }
    }
}

/// How long a new owner waits for its DNAT rules before announcing anyway.
pub const DNAT_WAIT: Duration = Duration::from_millis(500);

/// What a background task reports back: an API request's result, or a probe's.
enum Done {
    Api(ReqId, Box<Result<Option<Lease>, LeaseError>>),
    /// A request whose reply the machine takes as is (a fence).
    Reply(ReqId, Reply),
    Probe(ReqId, Option<String>),
}

/// Runs one holder until it has stopped. `holds` is told until when this node may act as
/// the holder (the allocator checks it before every write).
pub async fn run(
    shared: Arc<Shared>,
    target: Target,
    name: String,
    mut feed: watch::Receiver<Feed>,
    mut stop: watch::Receiver<Option<Stop>>,
    holds: Option<watch::Sender<Option<Instant>>>,
) {
    let me = shared.config.node_name.clone();
    let first = feed.borrow_and_update().clone();
    let mut holder = Holder::new(
        &me,
        shared.config.timing(),
        target.kind(),
        first.view.clone(),
    );
    let lan = shared.config.liveness == crate::config::Liveness::Lan;
    if lan && matches!(target, Target::Vip(_)) {
        holder = holder.lan();
    }
    let mut fenced_epoch = first.fenced_epoch;
    let mut address_lost = first.address_lost;
    let mut queued: Vec<Input> = Vec::new();
    let mut shell = Shell {
        shared: shared.clone(),
        target,
        name,
        feed: first,
        held: None,
        interfaces: HashMap::new(),
        bound: None,
        done: mpsc::unbounded(),
    };
    let mut input = Input::Tick;
    loop {
        let now = Instant::now();
        let step = holder.step(input, now);
        let mut outcomes = Vec::new();
        for action in step.actions {
            // Boxed: the actions' futures (netlink, retries) would otherwise sit inside every
            // VIP's task for its whole life, a few KiB each.
            if let Some(outcome) = Box::pin(shell.perform(action)).await {
                outcomes.push(outcome);
            }
        }
        // Taken before anything queued meanwhile (`queued` is a stack).
        queued.extend(outcomes.into_iter().rev());
        if let Some(h) = &holds {
            h.send_if_modified(|v| {
                let new = holder.holds_until(Instant::now());
                let changed = *v != new;
                *v = new;
                changed
            });
        }
        if holder.is_stopped() {
            return;
        }
        if let Some(next) = queued.pop() {
            input = next;
            continue;
        }
        let wake = step.wake.unwrap_or_else(|| now + Duration::from_secs(3600));
        input = tokio::select! {
            biased;
            _ = tokio::time::sleep_until(wake) => Input::Tick,
            Some(done) = shell.done.1.next() => match done {
                Done::Api(req, result) => shell.reply(req, *result),
                Done::Probe(req, answered_by) => Input::Probed { req, answered_by },
                Done::Reply(req, reply) => Input::Reply { req, reply },
            },
            r = stop.changed() => match (r, *stop.borrow_and_update()) {
                (Ok(()), Some(s)) => Input::Stop(s),
                (Err(_), _) => Input::Stop(Stop::Shutdown),
                _ => Input::Tick,
            },
            r = feed.changed() => {
                if r.is_err() {
                    Input::Stop(Stop::Shutdown)
                } else {
                    shell.feed = feed.borrow_and_update().clone();
                    if let Some(i) = &shell.feed.interface {
                        shell.interfaces.insert(i.index, i.clone());
                    }
                    if shell.feed.address_lost != address_lost {
                        address_lost = shell.feed.address_lost;
                        // After the new view (which may say the node can no longer hold it).
                        queued.push(Input::AddressLost);
                    }
                    if shell.feed.fenced_epoch != fenced_epoch {
                        // Withdraw first, then look at the new view.
                        fenced_epoch = shell.feed.fenced_epoch;
                        queued.push(Input::View(shell.feed.view.clone()));
                        Input::Fenced
                    } else {
                        Input::View(shell.feed.view.clone())
                    }
                }
            }
        };
    }
}

struct Shell {
    shared: Arc<Shared>,
    target: Target,
    name: String,
    feed: Feed,
    /// What our last successful write returned (renewals and releases CAS on it).
    held: Option<Box<Lease>>,
    /// Interfaces by index, as last seen (an action names the one it was decided on).
    interfaces: HashMap<u32, Interface>,
    /// The interface of the last bind.
    bound: Option<u32>,
    /// futures' channel, not tokio's: it allocates per message, where tokio's allocates a
    /// block of 32 up front (over a KiB per VIP, on every speaker, for a rare message).
    done: (mpsc::UnboundedSender<Done>, mpsc::UnboundedReceiver<Done>),
}

impl Shell {
    fn ip(&self) -> Option<IpAddr> {
        match self.target {
            Target::Vip(ip) => Some(ip),
            Target::Allocator => None,
        }
    }

    fn reply(&mut self, req: ReqId, result: Result<Option<Lease>, LeaseError>) -> Input {
        let reply = match result {
            Ok(lease) => {
                let resource_version = lease
                    .as_ref()
                    .and_then(|l| l.metadata.resource_version.clone())
                    .unwrap_or_default();
                if lease.is_some() {
                    self.held = lease.map(Box::new);
                }
                Reply::Written { resource_version }
            }
            Err(LeaseError::Lost(_)) => Reply::Lost,
            Err(e) => Reply::Failed(e.to_string()),
        };
        Input::Reply { req, reply }
    }

    /// Runs an API request as its own task, cut off at `deadline`.
    fn request<F>(&self, req: ReqId, deadline: Instant, f: F)
    where
        F: Future<Output = Result<Option<Lease>, LeaseError>> + Send + 'static,
    {
        let tx = self.done.0.clone();
        let name = self.name.clone();
        tokio::spawn(async move {
            let result = tokio::time::timeout_at(deadline, f)
                .await
                .unwrap_or(Err(LeaseError::Timeout(name)));
            let _ = tx.unbounded_send(Done::Api(req, Box::new(result)));
        });
    }

    /// The Lease to release: the watch's copy when it names us and is newer than our last
    /// write (someone wrote it since: a drill's step-down mark, or it is a Lease from before a
    /// restart or a fence), else our last write.
    fn newest_held(&self) -> Lease {
        let me = self.shared.config.node_name.as_str();
        let rv = |l: &Lease| {
            l.metadata
                .resource_version
                .as_deref()
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0)
        };
        let seen = self
            .feed
            .lease
            .as_deref()
            .filter(|l| l.spec.as_ref().and_then(|s| s.holder_identity.as_deref()) == Some(me))
            .cloned();
        match (seen, self.held.as_deref().cloned()) {
            (Some(a), Some(b)) => {
                if rv(&a) > rv(&b) {
                    a
                } else {
                    b
                }
            }
            (a, b) => a.or(b).unwrap_or_default(),
        }
    }

    fn interface(&self, index: u32) -> Option<Interface> {
        self.interfaces
            .get(&index)
            .cloned()
            .or_else(|| self.feed.interface.clone().filter(|i| i.index == index))
    }

    fn description(&self, index: u32) -> Description {
        match self.ip() {
            Some(ip) => {
                let iface = self.interface(index);
                let mac = iface
                    .as_ref()
                    .and_then(|i| i.mac)
                    .map(|m| format_mac(&m))
                    .unwrap_or_default();
                let iname = iface.map(|i| i.name).unwrap_or_default();
                Description::for_vip(ip, &self.feed.service, &iname, &mac)
            }
            None => Description::managed(),
        }
    }

    /// Carries out `action`; what the machine must learn of its outcome comes back (a bind's).
    async fn perform(&mut self, action: Action) -> Option<Input> {
        let s = self.shared.clone();
        let leases = match self.target {
            Target::Vip(_) => s.vip_leases.clone(),
            Target::Allocator => s.leases.clone(),
        };
        let lan = s.config.liveness == crate::config::Liveness::Lan;
        let name = self.name.clone();
        match action {
            Action::Acquire {
                req,
                resource_version,
                deadline,
            } => {
                // CAS on exactly what the machine decided on.
                let current = resource_version.map(|rv| {
                    let mut l = self.feed.lease.as_deref().cloned().unwrap_or_default();
                    l.metadata.resource_version = Some(rv);
                    l
                });
                let index = match &self.feed.view.eligible {
                    Ok(i) => *i,
                    Err(_) => 0,
                };
                let desc = self.description(index);
                self.request(req, deadline, async move {
                    leases
                        .acquire(&name, current.as_ref(), &desc)
                        .await
                        .map(Some)
                });
            }
            Action::Fence {
                req,
                node,
                generation,
                deadline,
            } => {
                let api: kube::Api<Lease> =
                    kube::Api::namespaced(s.client.clone(), &s.config.namespace);
                let me = s.config.node_name.clone();
                info!(node = %node, generation, "fencing a node a majority declared dead");
                let wait = s.config.renew_deadline + crate::ownership::quorum::CLOCK_MARGIN;
                let tx = self.done.0.clone();
                tokio::spawn(async move {
                    let r = tokio::time::timeout_at(
                        deadline,
                        crate::node_lease::fence(&api, &node, generation, &me),
                    )
                    .await;
                    let reply = match r {
                        Ok(Ok(Some(api_path))) => Reply::Fenced {
                            wait: if api_path { wait } else { Duration::ZERO },
                        },
                        Ok(Ok(None)) => Reply::Lost,
                        Ok(Err(e)) => Reply::Failed(e.to_string()),
                        Err(_) => Reply::Failed("fencing timed out".into()),
                    };
                    let _ = tx.unbounded_send(Done::Reply(req, reply));
                });
            }
            Action::Renew { req, deadline } => {
                let held = self.held.as_deref().cloned().unwrap_or_default();
                self.request(req, deadline, async move {
                    leases.renew(&name, &held).await.map(Some)
                });
            }
            Action::Release {
                req,
                step_down,
                deadline,
                failure,
            } => {
                let held = self.newest_held();
                let failure = failure.map(|e| {
                    format!(
                        "{}: {e} ({})",
                        s.config.node_name,
                        k8s_openapi::jiff::Timestamp::now()
                    )
                });
                self.request(req, deadline, async move {
                    if step_down {
                        leases.step_down(&name, &held).await.map(|_| None)
                    } else {
                        leases
                            .release(&name, &held, failure.as_deref())
                            .await
                            .map(|_| None)
                    }
                });
            }
            Action::Delete { req, deadline } => {
                let rv = self
                    .held
                    .as_ref()
                    .and_then(|l| l.metadata.resource_version.clone())
                    .unwrap_or_default();
                if let Some(ip) = self.ip() {
                    info!(ip = %ip, lease = %name, "the IP left every Service: deleting its lease");
                }
                self.request(req, deadline, async move {
                    leases.delete(&name, &rv).await.map(|_| None)
                });
            }
            Action::Bind {
                iface,
                until,
                not_after,
            } => {
                let (Some(ip), Some(i)) = (self.ip(), self.interface(iface)) else {
                    return None;
                };
                let now = Instant::now();
                if now >= not_after {
                    s.metrics.late_action("bind");
                    warn!(ip = %ip, "dropped a bind decided too long ago");
                    return None;
                }
                // The lifetime is computed at the last moment, from the absolute bound; in LAN
                // mode it is short and the keeper extends it (see timing::LAN_ADDRESS_LIFETIME).
                let valid = if lan {
                    Some(timing::lan_address_lifetime(ip))
                } else {
                    timing::lifetime(now, until, Duration::ZERO)
                };
                let Some(valid) = valid else {
                    s.metrics.late_action("bind");
                    warn!(ip = %ip, "no safe address lifetime left: not refreshing");
                    return None;
                };
                self.bound = Some(iface);
                // One attempt; the machine tries again with backoff and gives the VIP up
                // when binds keep failing (see machine::BIND_GIVE_UP).
                if lan {
                    // Under the gate before the kernel can answer for it.
                    let r = s.gate.lock().unwrap_or_else(|e| e.into_inner()).add_vip(ip);
                    if let Err(e) = r {
                        return Some(Input::BindDone(Err(format!(
                            "cannot put the VIP under the gate: {e}"
                        ))));
                    }
                }
                let outcome =
                    match tokio::time::timeout_at(not_after, s.dataplane.bind(&i, ip, valid)).await
                    {
                        Ok(Ok(())) => {
                            if lan {
                                s.gate
                                    .lock()
                                    .unwrap_or_else(|e| e.into_inner())
                                    .bound(i.index, ip);
                            }
                            Ok(())
                        }
                        Ok(Err(e)) => {
                            s.metrics.dataplane_error(&e);
                            Err(format!("binding it to {}: {e}", i.name))
                        }
                        Err(_) => Err(format!("binding it to {} timed out", i.name)),
                    };
                return Some(Input::BindDone(outcome));
            }
            Action::Probe { req, iface } => {
                let (Some(ip), Some(i)) = (self.ip(), self.interface(iface)) else {
                    let _ = self.done.0.unbounded_send(Done::Probe(req, None));
                    return None;
                };
                let tx = self.done.0.clone();
                let metrics = s.metrics.clone();
                tokio::task::spawn_blocking(move || {
                    let t0 = std::time::Instant::now();
                    let answered = match crate::dataplane::probe::probe(&i, ip, PROBE_WAIT) {
                        Ok(m) => m.map(|m| format_mac(&m)),
                        Err(e) => {
                            // A probe that cannot run is no evidence of a conflict.
                            warn!(ip = %ip, interface = %i.name, error = %e, "could not probe");
                            None
                        }
                    };
                    metrics.probed(t0.elapsed());
                    let _ = tx.unbounded_send(Done::Probe(req, answered));
                });
            }
            Action::Unbind { iface } => {
                let (Some(ip), Some(i)) = (self.ip(), self.interface(iface)) else {
                    return None;
                };
                let mut unbound = false;
                if lan {
                    // No lifetime refresh from here on: it could put the address back.
                    s.gate
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .unbinding(ip);
                }
                // Until it is gone: what comes next (a release) lets another node bind it.
                // Bounded by the address's own lifetime, after which the kernel has removed it.
                let gone_by = Instant::now()
                    + if lan {
                        timing::lan_address_lifetime(ip) + Duration::from_secs(1)
                    } else {
                        s.config.lease_duration + Duration::from_secs(1)
                    };
                let mut wait = UNBIND_RETRY_MIN;
                for attempt in 1u32.. {
                    let unbind =
                        tokio::time::timeout(Duration::from_secs(1), s.dataplane.unbind(&i, ip));
                    let error = match unbind.await {
                        Ok(Ok(())) => {
                            unbound = true;
                            break;
                        }
                        Ok(Err(e)) => {
                            s.metrics.dataplane_error(&e);
                            e.to_string()
                        }
                        Err(_) => "timed out".to_string(),
                    };
                    if attempt == 1 {
                        warn!(ip = %ip, interface = %i.name, error = %error, "could not unbind: retrying until it is gone");
                    }
                    if Instant::now() + wait >= gone_by {
                        error!(ip = %ip, interface = %i.name, error = %error, attempt, "could not unbind: the address's lifetime has run out by now");
                        break;
                    }
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(UNBIND_RETRY_MAX);
                }

                // Out of the gate only once unbound: an address left bound stays gated (and
                // keeps this node's gate closed: see the keeper), never answering ungated.
                if lan
                    && unbound
                    && let Err(e) = s
                        .gate
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .remove_vip(ip)
                {
                    warn!(ip = %ip, error = %e, "cannot take the VIP out of the gate");
                }
            }
            Action::Announce {
                iface,
                round,
                not_after,
            } => {
                let (Some(ip), Some(i)) = (self.ip(), self.interface(iface)) else {
                    return None;
                };
                if Instant::now() >= not_after {
                    s.metrics.late_action("announce");
                    return None;
                }
                let router = crate::dataplane::forwards_v6(&i.name);
                match s.dataplane.announce(&i, ip, router) {
                    Ok(sent) => s.metrics.announced(ip, sent, round == 0),
                    Err(e) => {
                        s.metrics.dataplane_error(&e);
                        warn!(ip = %ip, interface = %i.name, error = %e, "could not announce");
                    }
                }
            }
            Action::Dnat(on) => {
                let ip = self.ip()?;
                if on {
                    let index = self.bound.or(self.feed.view.eligible.clone().ok());
                    let i = index.and_then(|x| self.interface(x))?;
                    let generation = s.own(ip, &self.feed.service, &i);
                    // DNAT, bind, then announce: wait (briefly) for the rules.
                    let until = Instant::now() + DNAT_WAIT;
                    s.dnat_applied(generation, until).await;
                } else {
                    s.disown(ip);
                }
            }
            Action::Report(r) => self.report(r),
        }
        None
    }

    /// A Warning Event about binding this VIP on its Service (none for the allocator).
    fn warn_service(&self, reason: &str, message: impl FnOnce(IpAddr) -> String) {
        let s = &self.shared;
        if let Some(ip) = self.ip()
            && let Some(r) = s.events.service_ref(&self.feed.service)
        {
            s.events.post(
                r,
                kube::runtime::events::EventType::Warning,
                reason,
                message(ip),
                "Bind",
            );
        }
    }

    fn report(&self, r: Report) {
        let s = &self.shared;
        let what = match self.ip() {
            Some(ip) => ip.to_string(),
            None => "allocator".to_string(),
        };
        match r {
            Report::Took {
                previous,
                waited_since,
            } => {
                s.metrics.lease_acquired(self.ip(), waited_since);
                match self.ip() {
                    Some(ip) => {
                        let iface = self.feed.interface.clone();
                        info!(ip = %ip, service = %self.feed.service, interface = ?iface.as_ref().map(|i| &i.name), "owner: bound and announcing");
                        if let Some(iface) = iface {
                            s.events
                                .announced(ip, &self.feed.service, &iface, previous.as_deref());
                        }
                    }
                    None => info!("this speaker is the allocator"),
                }
            }
            Report::Withdrew { reason, fenced } => {
                if fenced {
                    s.metrics.fenced();
                }
                if reason.contains("taken") || reason.contains("moved") {
                    s.metrics.lease_lost();
                }
                info!(lease = %self.name, what = %what, reason = %reason, "withdrawn");
            }
            Report::Conflict { mac } => {
                s.metrics.conflict();
                warn!(lease = %self.name, what = %what, mac = %mac, "another host answers for the IP: not binding it");
                self.warn_service("IPConflict", |ip| {
                    format!(
                        "{} did not bind {ip}: {mac} answers for it on the LAN; retrying in {} s",
                        s.config.node_name,
                        crate::ownership::machine::CONFLICT_RETRY.as_secs()
                    )
                });
            }
            Report::Rebinding => {
                s.metrics.kernel_repaired("address");
                warn!(lease = %self.name, what = %what, "someone else removed the address: binding it again");
            }
            Report::BindFailed {
                error,
                attempt,
                gives_up_at,
            } => {
                // One line when it starts failing, not one per attempt.
                if attempt == 1 {
                    warn!(
                        lease = %self.name, what = %what, error = %error,
                        gives_up_in_ms = gives_up_at.saturating_duration_since(Instant::now()).as_millis() as u64,
                        "could not bind: retrying with backoff"
                    );
                }
            }
            Report::BindRecovered { attempts } => {
                info!(lease = %self.name, what = %what, failed = attempts, "bound after all");
            }
            Report::GaveUp { error, hold_down } => {
                s.metrics.gave_up();
                error!(
                    lease = %self.name, what = %what, error = %error, hold_down_s = hold_down.as_secs(),
                    "could not bind for {} s: giving the VIP up for another node",
                    crate::ownership::machine::BIND_GIVE_UP.as_secs()
                );
                self.warn_service("BindFailed", |ip| {
                    format!(
                        "{} could not bind {ip} for {} s ({error}): it released {ip} for another node and tries it again in {} s at the earliest",
                        s.config.node_name,
                        crate::ownership::machine::BIND_GIVE_UP.as_secs(),
                        hold_down.as_secs()
                    )
                });
            }
            Report::RenewFailed(e) => {
                s.metrics.renew_failed();
                warn!(lease = %self.name, error = %e, "could not renew");
            }
            Report::AcquireFailed(e) => {
                warn!(lease = %self.name, error = %e, "could not take the lease")
            }
            Report::ReleaseFailed(e) => {
                warn!(lease = %self.name, error = %e, "could not release the lease; it will expire")
            }
        }
    }
}
