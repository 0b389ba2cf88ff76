//! The allocation loop: one speaker at a time (the holder of [`ALLOCATOR_LEASE`], held by
//! the same state machine as a VIP's Lease) assigns pool IPs to Services and writes their
//! status; the assignment itself is the pure [`crate::allocator::allocate`].

use std::collections::{BTreeMap, HashSet};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Service;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::events::EventType;
use kube::{Resource, ResourceExt};
use serde_json::json;
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{info, warn};

use crate::allocator;
use crate::context::Shared;
use crate::node_lease;
use crate::ownership::machine::{Stop, View};
use crate::ownership::shell::{self, Feed, Target};
use crate::pool::Pools;

/// The allocator's own Lease: one speaker assigns IPs at a time.
pub const ALLOCATOR_LEASE: &str = "l2speaker-allocator";

/// Runs until `stop` says so; then releases the allocator's Lease (bounded).
pub async fn run(shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let since = Instant::now();
    let feed = |seen: &mut Option<crate::ownership::machine::Observed>| {
        let lease = shared
            .cluster
            .leases
            .state()
            .into_iter()
            .find(|l| l.name_any() == ALLOCATOR_LEASE);
        let observed = lease
            .as_ref()
            .map(|l| crate::lease::observe(l, seen.as_ref(), Instant::now()));
        *seen = observed.clone();
        Feed {
            view: View {
                eligible: Ok(0),
                delay: Duration::ZERO,
                lease: observed,
                absent_since: since,
            },
            lease: lease.map(|l| (*l).clone()),
            interface: None,
            service: String::new(),
        }
    };
    let mut seen = None;
    let (feed_tx, feed_rx) = watch::channel(feed(&mut seen));
    let (stop_tx, stop_rx) = watch::channel(None);
    let (holds_tx, mut holds) = watch::channel(None);
    let holder = tokio::spawn(shell::run(
        shared.clone(),
        Target::Allocator,
        ALLOCATOR_LEASE.to_string(),
        feed_rx,
        stop_rx,
        Some(holds_tx),
    ));
    let mut reported: HashSet<(String, String)> = HashSet::new();
    let mut changed = shared.cluster.changed.clone();
    loop {
        let f = feed(&mut seen);
        feed_tx.send_if_modified(|old| {
            let differs = *old != f;
            if differs {
                *old = f;
            }
            differs
        });
        let holding = holds
            .borrow_and_update()
            .is_some_and(|t| Instant::now() < t);
        if holding {
            allocate_once(&shared, &mut reported, &holds).await;
        }
        tokio::select! {
            _ = changed.changed() => {}
            _ = holds.changed() => {}
            _ = tokio::time::sleep(shared.config.renew_interval) => {}
            _ = stop.changed() => break,
        }
    }
    let _ = stop_tx.send(Some(Stop::Shutdown));
    let _ = holder.await;
}

/// Writes the assignment to Service status, reports refusals and invalid pools once each,
/// and deletes Leases of IPs no Service has any more.
async fn allocate_once(
    shared: &Arc<Shared>,
    reported: &mut HashSet<(String, String)>,
    holds: &watch::Receiver<Option<Instant>>,
) {
    let pool_objs = shared.cluster.pools.state();
    let pools = Pools::from_objects(&pool_objs);
    for r in &pools.rejected {
        if reported.insert((format!("pool/{}", r.name), r.reason.clone())) {
            warn!(pool = %r.name, reason = %r.reason, "IPPool rejected");
            if let Some(p) = pool_objs
                .iter()
                .find(|p| p.metadata.name.as_deref() == Some(r.name.as_str()))
            {
                shared.events.post(
                    p.object_ref(&()),
                    EventType::Warning,
                    "InvalidPool",
                    format!("IPPool ignored: {}", r.reason),
                    "Validate",
                );
            }
        }
    }
    let services = shared.services();
    // Never assigned: the Nodes' addresses, and what each node's speaker refuses locally.
    let mut reserved: BTreeMap<IpAddr, String> = BTreeMap::new();
    for l in shared.cluster.leases.state() {
        if l.name_any().starts_with(node_lease::PREFIX) {
            reserved.extend(node_lease::refused(&l));
        }
    }
    for n in shared.cluster.nodes.state() {
        let name = n.name_any();
        for a in n.status.iter().flat_map(|s| s.addresses.iter().flatten()) {
            if let Ok(ip) = a.address.parse::<IpAddr>() {
                reserved.insert(ip, format!("{name}'s own address ({})", a.type_));
            }
        }
    }
    let (class, unclassed) = (
        shared.config.load_balancer_class.clone(),
        shared.config.claim_unclassed,
    );
    let alloc = allocator::allocate(
        &services,
        |s| s.is_ours(&class, unclassed),
        &pools,
        &reserved,
    );
    for r in &alloc.refusals {
        if reported.insert((r.service.clone(), r.message.clone())) {
            warn!(service = %r.service, reason = r.reason, message = %r.message, "refused");
            if let Some(reference) = shared.events.service_ref(&r.service) {
                shared.events.post(
                    reference,
                    EventType::Warning,
                    r.reason,
                    r.message.clone(),
                    "Allocate",
                );
            }
        }
    }
    for s in &services {
        let Some(want) = alloc.desired.get(&s.key) else {
            continue;
        };
        let mut have = s.assigned.clone();
        have.sort_by_key(|ip| (!ip.is_ipv4(), *ip));
        if *want == have {
            continue;
        }
        let ingress: Vec<serde_json::Value> = want
            .iter()
            .map(|ip| json!({"ip": ip.to_string(), "ipMode": "VIP"}))
            .collect();
        let patch = if ingress.is_empty() {
            json!({"status": {"loadBalancer": {"ingress": null}}})
        } else {
            json!({"status": {"loadBalancer": {"ingress": ingress}}})
        };
        // Only while we hold the allocator's Lease, and no later than its fence time.
        let Some(until) = *holds.borrow() else {
            return;
        };
        if Instant::now() >= until {
            return;
        }
        let api: Api<Service> = Api::namespaced(shared.client.clone(), &s.namespace);
        let (pp, patch) = (PatchParams::default(), Patch::Merge(patch));
        match tokio::time::timeout_at(until, api.patch_status(&s.name, &pp, &patch)).await {
            Ok(Ok(_)) => info!(service = %s.key, ips = ?want, "assigned"),
            Ok(Err(e)) => {
                warn!(service = %s.key, error = %e, "could not write the Service status");
                continue;
            }
            Err(_) => {
                warn!(service = %s.key, "writing the Service status timed out");
                return;
            }
        }
        if let Some(reference) = shared.events.service_ref(&s.key) {
            let note = if want.is_empty() {
                "no IP assigned".to_string()
            } else {
                format!(
                    "assigned {}",
                    want.iter()
                        .map(|i| i.to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            };
            shared.events.post(
                reference,
                EventType::Normal,
                "IPAllocated",
                note,
                "Allocate",
            );
        }
    }
    crate::lease_gc::collect(shared, &services, &pools, holds).await;
}
