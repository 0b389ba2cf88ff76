//! One task per VIP: compete for its Lease, and while holding it keep the dataplane
//! programmed and the Lease renewed.
//!
//! ```text
//!   Standby ──(eligible, Lease free/expired, our turn; CAS write wins)──▶ Owner
//!   Owner ──(renew lost | not eligible | renew deadline passed | stop)──▶ withdraw ─▶ Standby
//! ```
//! Withdrawal unbinds before the Lease is released, so two nodes never answer at once.

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{info, warn};

use crate::dataplane::addr::Interface;
use crate::lease::{self, Candidate, Description, LeaseError, Seen};
use crate::speaker::Shared;

/// When the announcement burst is sent, after taking a VIP.
pub const BURST: [Duration; 6] = [
    Duration::ZERO,
    Duration::from_millis(200),
    Duration::from_millis(500),
    Duration::from_secs(1),
    Duration::from_secs(2),
    Duration::from_secs(4),
];

/// Everything a VIP's task needs to decide, recomputed by the speaker on every change.
#[derive(Debug, Clone, PartialEq)]
pub struct VipView {
    pub ip: IpAddr,
    pub service: String,
    /// The interface to announce on, or why this node may not.
    pub eligible: Result<Interface, String>,
    /// How long after the Lease becomes free this node waits (its rank).
    pub delay: Duration,
    pub lease: Option<(Seen, Lease)>,
    pub absent_since: Instant,
}

/// Why a VIP's task ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    Running,
    /// The VIP left every Service: delete its Lease.
    Gone,
    /// The speaker shuts down: release the Lease so a standby takes over at once.
    Shutdown,
}

struct Owned {
    lease: Lease,
    iface: Interface,
    last_renewed: Instant,
    next_renew: Instant,
    announcing: Arc<AtomicBool>,
}

pub async fn run(
    shared: Arc<Shared>,
    mut view: watch::Receiver<VipView>,
    mut stop: watch::Receiver<Stop>,
) {
    let ip = view.borrow().ip;
    let name = lease::lease_name(ip);
    let me = shared.config.node_name.clone();
    let mut owned: Option<Owned> = None;
    loop {
        let v = view.borrow_and_update().clone();
        let stopping = *stop.borrow_and_update();
        if stopping != Stop::Running {
            if let Some(o) = owned.take() {
                // On shutdown the DNAT stays until the Lease is released (the speaker removes
                // its table last): clients whose ARP entry still points here keep being
                // served while the next owner takes over.
                if stopping == Stop::Shutdown {
                    unbind(&shared, ip, &o).await;
                } else {
                    withdraw(&shared, ip, &o, "stopping").await;
                }
                let result = match stopping {
                    Stop::Gone => {
                        info!(ip = %ip, lease = %name, "the IP left every Service: deleting its lease");
                        shared
                            .leases
                            .delete(
                                &name,
                                o.lease.metadata.resource_version.as_deref().unwrap_or(""),
                            )
                            .await
                    }
                    _ => shared.leases.release(&name, &o.lease).await,
                };
                if let Err(e) = result {
                    warn!(ip = %ip, lease = %name, error = %e, "could not release the lease; it will expire");
                }
            }
            return;
        }
        match owned.as_mut() {
            None => {
                let Ok(iface) = v.eligible.clone() else {
                    wait_change(&mut view, &mut stop, None).await;
                    continue;
                };
                let now = Instant::now();
                match lease::candidate(
                    v.lease.as_ref().map(|l| &l.0),
                    &me,
                    now,
                    v.absent_since,
                    v.delay,
                ) {
                    Candidate::WaitUntil(t) => wait_change(&mut view, &mut stop, Some(t)).await,
                    Candidate::Acquire | Candidate::Adopt => {
                        let mac = iface
                            .mac
                            .map(|m| crate::dataplane::packet::format_mac(&m))
                            .unwrap_or_default();
                        let desc = Description::for_vip(ip, &v.service, &iface.name, &mac);
                        match shared
                            .leases
                            .acquire(&name, v.lease.as_ref().map(|l| &l.1), &desc)
                            .await
                        {
                            Ok(l) => {
                                shared.metrics.lease_acquired(ip, &v);
                                // Whom we take over from, for the Service's event.
                                let previous = v.lease.as_ref().and_then(|(seen, l)| {
                                    seen.holder
                                        .clone()
                                        .or_else(|| lease::stepped_down_from(l).map(str::to_string))
                                });
                                let previous = previous.filter(|p| *p != me);
                                owned = Some(
                                    take(&shared, ip, &v.service, iface, l, previous.as_deref())
                                        .await,
                                );
                            }
                            Err(LeaseError::Lost(_)) => {
                                // Someone else moved first; our watch will show who.
                                wait_change(
                                    &mut view,
                                    &mut stop,
                                    Some(Instant::now() + shared.config.renew_interval),
                                )
                                .await;
                            }
                            Err(e) => {
                                warn!(ip = %ip, lease = %name, error = %e, "could not take the lease");
                                wait_change(
                                    &mut view,
                                    &mut stop,
                                    Some(Instant::now() + shared.config.renew_interval),
                                )
                                .await;
                            }
                        }
                    }
                }
            }
            Some(o) => {
                let mut lost_reason = match (&v.eligible, &v.lease) {
                    (Err(why), _) => Some(format!("no longer eligible: {why}")),
                    (Ok(i), _) if i.index != o.iface.index => {
                        Some(format!("interface changed to {}", i.name))
                    }
                    _ => None,
                };
                let lease_looks_lost = match &v.lease {
                    None => true,
                    Some((seen, l)) => {
                        seen.holder.as_deref() != Some(&me)
                            && l.metadata.resource_version != o.lease.metadata.resource_version
                    }
                };
                if lost_reason.is_none() && lease_looks_lost {
                    // The watch may not have delivered our own last write yet (right after we
                    // took the Lease it still shows the old one): ask the API server before
                    // giving the IP up. If it cannot be asked, the renewal decides.
                    match shared.leases.get(&name).await {
                        Ok(Some(l))
                            if l.spec.as_ref().and_then(|s| s.holder_identity.as_deref())
                                == Some(me.as_str()) =>
                        {
                            o.lease = l;
                        }
                        Ok(Some(l)) => {
                            let to = l
                                .spec
                                .and_then(|s| s.holder_identity)
                                .unwrap_or_else(|| "nobody".into());
                            lost_reason = Some(format!("the lease moved to {to}"));
                        }
                        Ok(None) => lost_reason = Some("the lease was deleted".into()),
                        Err(e) => {
                            warn!(ip = %ip, lease = %name, error = %e, "could not check the lease")
                        }
                    }
                }
                // A drill asked us to hand over: withdraw, then release naming ourselves.
                if let Some((_, l)) = &v.lease
                    && lease::step_down_requested(l)
                    && l.spec.as_ref().and_then(|s| s.holder_identity.as_deref())
                        == Some(me.as_str())
                {
                    let o = owned.take().expect("matched Some");
                    withdraw(&shared, ip, &o, "asked to step down").await;
                    if let Err(e) = shared.leases.step_down(&name, l).await {
                        warn!(ip = %ip, lease = %name, error = %e, "could not step down; the lease will expire");
                    }
                    continue;
                }
                if let Some(reason) = lost_reason {
                    let o = owned.take().expect("matched Some");
                    withdraw(&shared, ip, &o, &reason).await;
                    if v.eligible.is_err()
                        && v.lease
                            .as_ref()
                            .is_some_and(|(s, _)| s.holder.as_deref() == Some(&me))
                        && let Err(e) = shared.leases.release(&name, &o.lease).await
                    {
                        warn!(ip = %ip, lease = %name, error = %e, "could not release the lease; it will expire");
                    }
                    continue;
                }
                let due = o.next_renew;
                tokio::select! {
                    _ = tokio::time::sleep_until(due) => {
                        // A renewal may hang (the API server unreachable): it must not hold
                        // the owner past its deadline.
                        let fence_at = o.last_renewed + shared.config.renew_deadline;
                        let renewal = tokio::time::timeout_at(fence_at, shared.leases.renew(&name, &o.lease)).await;
                        let renewal = renewal.unwrap_or_else(|_| Err(LeaseError::Timeout(name.clone())));
                        match renewal {
                            Ok(l) => {
                                o.lease = l;
                                o.last_renewed = Instant::now();
                                o.next_renew = o.last_renewed + shared.config.renew_interval;
                                if let Err(e) = shared.dataplane.bind(&o.iface, ip, shared.config.address_lifetime()).await {
                                    shared.metrics.dataplane_error(&e);
                                    warn!(ip = %ip, error = %e, "could not refresh the address");
                                }
                            }
                            Err(LeaseError::Lost(_)) => {
                                shared.metrics.lease_lost();
                                let o = owned.take().expect("matched Some");
                                withdraw(&shared, ip, &o, "the lease was taken").await;
                            }
                            Err(e) => {
                                shared.metrics.renew_failed();
                                if o.last_renewed.elapsed() >= shared.config.renew_deadline {
                                    // Self-fencing: withdraw before anyone may legally take over.
                                    let o = owned.take().expect("matched Some");
                                    withdraw(&shared, ip, &o, &format!("could not renew within the deadline: {e}")).await;
                                } else {
                                    o.next_renew = Instant::now() + shared.config.renew_interval / 4;
                                }
                            }
                        }
                    }
                    _ = view.changed() => {}
                    _ = stop.changed() => {}
                }
            }
        }
    }
}

async fn wait_change(
    view: &mut watch::Receiver<VipView>,
    stop: &mut watch::Receiver<Stop>,
    until: Option<Instant>,
) {
    let sleep = async {
        match until {
            Some(t) => tokio::time::sleep_until(t).await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = sleep => {}
        r = view.changed() => { if r.is_err() { std::future::pending::<()>().await } }
        _ = stop.changed() => {}
    }
}

/// Bind, program DNAT, announce.
async fn take(
    shared: &Arc<Shared>,
    ip: IpAddr,
    service: &str,
    iface: Interface,
    lease: Lease,
    previous: Option<&str>,
) -> Owned {
    let now = Instant::now();
    if let Err(e) = shared
        .dataplane
        .bind(&iface, ip, shared.config.address_lifetime())
        .await
    {
        shared.metrics.dataplane_error(&e);
        warn!(ip = %ip, interface = %iface.name, error = %e, "could not bind");
    }
    shared.own(ip, service, &iface);
    shared.sync_dnat().await;
    let announcing = Arc::new(AtomicBool::new(true));
    tokio::spawn(burst(shared.clone(), ip, iface.clone(), announcing.clone()));
    info!(ip = %ip, service = %service, interface = %iface.name, "owner: bound and announcing");
    shared.record_announce(ip, service, &iface, previous).await;
    Owned {
        lease,
        iface,
        last_renewed: now,
        next_renew: now + shared.config.renew_interval,
        announcing,
    }
}

/// Stop announcing and unbind: the node no longer answers for the VIP.
async fn unbind(shared: &Arc<Shared>, ip: IpAddr, o: &Owned) {
    o.announcing.store(false, Ordering::SeqCst);
    if let Err(e) = shared.dataplane.unbind(&o.iface, ip).await {
        shared.metrics.dataplane_error(&e);
        warn!(ip = %ip, error = %e, "could not unbind");
    }
    shared.disown(ip);
}

/// Stop announcing, unbind, reprogram DNAT without the VIP.
async fn withdraw(shared: &Arc<Shared>, ip: IpAddr, o: &Owned, reason: &str) {
    unbind(shared, ip, o).await;
    shared.sync_dnat().await;
    info!(ip = %ip, interface = %o.iface.name, reason = %reason, "withdrawn");
}

/// The announcement burst; ownership is checked before every round.
async fn burst(shared: Arc<Shared>, ip: IpAddr, iface: Interface, announcing: Arc<AtomicBool>) {
    let start = Instant::now();
    let router = crate::dataplane::forwards_v6(&iface.name);
    for at in BURST {
        tokio::time::sleep_until(start + at).await;
        if !announcing.load(Ordering::SeqCst) {
            return;
        }
        match shared.dataplane.announce(&iface, ip, router) {
            Ok(sent) => shared.metrics.announced(ip, sent, at.is_zero()),
            Err(e) => {
                shared.metrics.dataplane_error(&e);
                warn!(ip = %ip, interface = %iface.name, error = %e, "could not announce");
            }
        }
    }
}
