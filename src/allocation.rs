//! The allocation loop: one speaker at a time (the holder of [`ALLOCATOR_LEASE`], held by
//! the same state machine as a VIP's Lease) assigns pool IPs to Services and writes their
//! status; the assignment itself is the pure [`crate::allocator::allocate`].

use std::collections::{BTreeMap, BTreeSet, HashSet};
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
use crate::holder::{self, Feed, Target};
use crate::node_ips;
use crate::node_lease;
use crate::ownership::machine::{Stop, View};
use crate::plan;
use crate::pool::{IPPool, IPPoolSpec, IPPoolStatus, PoolCondition, Pools};
use crate::service::{CONDITION_POOL_WITHDRAWN, NodeIps};

pub use crate::lease::ALLOCATOR_LEASE;

/// With nothing changed, the allocator still goes over everything this often.
pub const ALLOCATE_EVERY: Duration = Duration::from_secs(10);

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
            address_lost: 0,
            fenced_epoch: 0,
            view: View {
                serving: true,
                holder_node: None,
                eligible: Ok(0),
                delay: Duration::ZERO,
                lease: observed,
                absent_since: since,
            },
            lease,
            interface: None,
            service: String::new(),
        }
    };
    let mut seen = None;
    let (feed_tx, feed_rx) = watch::channel(feed(&mut seen));
    let (stop_tx, stop_rx) = watch::channel(None);
    let (holds_tx, mut holds) = watch::channel(None);
    let holder = tokio::spawn(holder::run(
        shared.clone(),
        Target::Allocator,
        ALLOCATOR_LEASE.to_string(),
        feed_rx,
        stop_rx,
        Some(holds_tx),
    ));
    let mut reported: HashSet<(String, String)> = HashSet::new();
    let mut changed = shared.cluster.changed.clone();
    // What the last assignment pass saw: another one runs when the cluster changed, when
    // this speaker just became the allocator, or every ALLOCATE_EVERY (retries, and Leases
    // that became garbage by age).
    let mut last: Option<(u64, BTreeSet<String>, bool, Instant)> = None;
    let mut was_holding = false;
    let mut lan = shared.lan_state.subscribe();
    // Lease mode has no keeper to say when a node dies: the live nodes are read this often.
    let live_every = if shared.config.liveness == crate::config::Liveness::Lan {
        shared.config.renew_interval
    } else {
        shared.config.heartbeat_interval
    };
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
        let counter = *changed.borrow_and_update();
        lan.borrow_and_update();
        // Node-IP Services list the nodes whose speakers are alive: a change is a pass.
        let live = shared.live_nodes();
        // A speaker that just started has not heard its peers yet (node-IP statuses wait).
        let settled = since.elapsed() >= shared.config.heartbeat_dead_after * 2;
        let due = !was_holding
            || last.as_ref().is_none_or(|(c, l, s, t)| {
                *c != counter || *l != live || *s != settled || t.elapsed() >= ALLOCATE_EVERY
            });
        was_holding = holding;
        if holding && due {
            last = Some((counter, live.clone(), settled, Instant::now()));
            allocate_once(&shared, &mut reported, &holds, &live, settled).await;
        }
        tokio::select! {
            _ = changed.changed() => {}
            _ = holds.changed() => {}
            _ = lan.changed() => {}
            _ = tokio::time::sleep(live_every) => {}
            _ = stop.changed() => break,
        }
    }
    let _ = stop_tx.send(Some(Stop::Shutdown));
    let _ = holder.await;
}

/// Writes the assignment to Service status, reports refusals and invalid pools once each,
/// and deletes Leases of IPs no Service has any more. Node-IP Services get the addresses of
/// the nodes serving them, among `live` (left as they are until `settled`).
async fn allocate_once(
    shared: &Arc<Shared>,
    reported: &mut HashSet<(String, String)>,
    holds: &watch::Receiver<Option<Instant>>,
    live: &BTreeSet<String>,
    settled: bool,
) {
    let pool_objs = shared.cluster.pools.state();
    let pools = Pools::from_objects(&pool_objs);
    for (r, kept) in pools
        .rejected
        .iter()
        .map(|r| (r, false))
        .chain(pools.degraded.iter().map(|r| (r, true)))
    {
        if reported.insert((format!("pool/{}", r.name), r.reason.clone())) {
            warn!(pool = %r.name, reason = %r.reason, kept, "IPPool spec not in effect");
            if let Some(p) = pool_objs
                .iter()
                .find(|p| p.metadata.name.as_deref() == Some(r.name.as_str()))
            {
                let note = if kept {
                    let last = p
                        .status
                        .as_ref()
                        .map(|s| s.addresses.join(", "))
                        .unwrap_or_default();
                    format!(
                        "{}; the last valid addresses stay in effect: {last}",
                        r.reason
                    )
                } else {
                    format!("IPPool ignored: {}", r.reason)
                };
                shared.events.post(
                    p.object_ref(&()),
                    EventType::Warning,
                    "InvalidPool",
                    note,
                    "Validate",
                );
            }
        }
    }
    let reach = reach(&shared.cluster.leases.state());
    write_pool_statuses(shared, &pool_objs, &pools, &reach, holds).await;
    let services = shared.services();
    // Never assigned: the Nodes' addresses, and what each node's speaker refuses locally.
    let mut reserved: BTreeMap<IpAddr, String> = BTreeMap::new();
    let mut busy: BTreeMap<String, BTreeSet<node_ips::Port>> = BTreeMap::new();
    for l in shared.cluster.leases.state() {
        if let Some(node) = l.name_any().strip_prefix(node_lease::PREFIX) {
            reserved.extend(node_lease::refused(&l));
            busy.insert(node.to_string(), node_lease::busy_ports(&l));
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
    let ctx = shared.node_ip_context();
    let mut node_mode: BTreeMap<&str, NodeIps> = BTreeMap::new();
    for s in &services {
        if let Some(mode) = shared.node_ip_mode(s, &ctx) {
            node_mode.insert(s.key.as_str(), mode);
        }
    }
    let mut alloc = allocator::allocate(
        &services,
        |s| s.is_ours(&class, unclassed) && !node_mode.contains_key(s.key.as_str()),
        &pools,
        &reserved,
        &reach,
    );
    // An unreadable annotation counts as none; the Service is told.
    for s in services.iter().filter(|s| s.is_ours(&class, unclassed)) {
        if let Some(Err(why)) = &s.node_ips {
            alloc.refusals.push(allocator::Refusal {
                service: s.key.clone(),
                reason: "InvalidNodeIPs",
                message: format!("{why}; ignored"),
            });
        }
    }
    let nodes = shared.cluster.nodes.state();
    // Lease mode knows the live nodes from what this speaker hears alone: while it hears
    // fewer than most speakers, it adds nodes to node-IP statuses but removes none, so an
    // allocator cut off from the LAN does not strip every other node (LAN mode's live set
    // needs a majority already).
    let speakers: BTreeSet<String> = nodes
        .iter()
        .map(|n| n.name_any())
        .filter(|n| n == &shared.config.node_name || busy.contains_key(n))
        .collect();
    let heard = speakers.iter().filter(|n| live.contains(*n)).count();
    let lease_mode = shared.config.liveness == crate::config::Liveness::Lease;
    let quorate = !lease_mode || heard * 2 > speakers.len();
    let quorum_note = ("allocator".to_string(), "no majority heard".to_string());
    if quorate {
        reported.remove(&quorum_note);
    } else if reported.insert(quorum_note) {
        warn!(
            heard,
            speakers = speakers.len(),
            "hearing too few speakers on the LAN: no node is taken out of node-IP statuses"
        );
    }
    let listed: BTreeSet<IpAddr> = services
        .iter()
        .filter(|s| node_mode.contains_key(s.key.as_str()))
        .flat_map(|s| s.assigned.iter().copied())
        .collect();
    let candidates: Vec<node_ips::Candidate> = nodes
        .iter()
        .map(|n| {
            let name = n.name_any();
            let b = busy.remove(&name).unwrap_or_default();
            let kept = !quorate
                && node_ips::node_addresses(n)
                    .iter()
                    .any(|ip| listed.contains(ip));
            node_ips::Candidate::from_node(n, live.contains(&name) || kept, b)
        })
        .collect();
    let slices = shared.cluster.slices.state();
    let by_service = plan::slices_by_service(&slices);
    let requests: Vec<node_ips::Request> = services
        .iter()
        .filter_map(|s| {
            Some(node_ips::Request {
                svc: s,
                mode: *node_mode.get(s.key.as_str())?,
                ready: plan::ready_nodes(&plan::slices_of(s, &by_service)),
            })
        })
        .collect();
    if settled {
        let on_nodes = node_ips::assign(&requests, &candidates);
        alloc.desired.extend(on_nodes.desired);
        alloc.refusals.extend(on_nodes.refusals);
    }
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
        let on_nodes = node_mode.contains_key(s.key.as_str());
        let mut have = s.assigned.clone();
        have.sort_by_key(|ip| (!ip.is_ipv4(), *ip));
        // A pool address withdrawn while no pool exists is remembered (see node_ips::mode).
        let had_pool_address = s
            .assigned
            .iter()
            .any(|ip| node_ips::pool_address(s, &ctx, ip));
        let mark = ctx.no_pools && want.is_empty() && !on_nodes && had_pool_address;
        let unmark = s.pool_withdrawn && !want.is_empty();
        let ip_mode = if on_nodes { "Proxy" } else { "VIP" };
        // Ingress written before with the other ipMode is rewritten (an API server before
        // 1.30 keeps no ipMode: nothing to compare).
        let modes_right = want.is_empty() || s.ip_modes.iter().all(|m| m == ip_mode);
        if *want == have && modes_right && !mark && !unmark {
            continue;
        }
        let ingress: Vec<serde_json::Value> = want
            .iter()
            .map(|ip| json!({"ip": ip.to_string(), "ipMode": ip_mode}))
            .collect();
        let mut patch = if ingress.is_empty() {
            json!({"status": {"loadBalancer": {"ingress": null}}})
        } else {
            json!({"status": {"loadBalancer": {"ingress": ingress}}})
        };
        if mark || unmark {
            patch["status"]["conditions"] = conditions(shared, s, mark);
        }
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

/// The Service's conditions with [`CONDITION_POOL_WITHDRAWN`] set (`mark`) or removed;
/// others' conditions are kept.
fn conditions(shared: &Shared, s: &crate::service::ServiceInfo, mark: bool) -> serde_json::Value {
    let mut list: Vec<serde_json::Value> = shared
        .cluster
        .services
        .state()
        .iter()
        .find(|x| x.namespace().as_deref() == Some(s.namespace.as_str()) && x.name_any() == s.name)
        .and_then(|x| x.status.as_ref()?.conditions.clone())
        .unwrap_or_default()
        .into_iter()
        .filter(|c| c.type_ != CONDITION_POOL_WITHDRAWN)
        .filter_map(|c| serde_json::to_value(c).ok())
        .collect();
    if mark {
        list.push(json!({
            "type": CONDITION_POOL_WITHDRAWN,
            "status": "True",
            "reason": "NoIPPool",
            "message": "its pool address was withdrawn when no IPPool was left; it is not moved to node addresses (create an IPPool, or annotate it l2speaker.io/node-ips)",
            "lastTransitionTime": k8s_openapi::jiff::Timestamp::now().to_string(),
        }));
    }
    if list.is_empty() {
        serde_json::Value::Null
    } else {
        serde_json::Value::Array(list)
    }
}

/// Where IPs can be announced: the union of the subnets the speakers publish on their node
/// Leases; unknown while there are none or any speaker publishes none.
fn reach(leases: &[Arc<k8s_openapi::api::coordination::v1::Lease>]) -> allocator::Reach {
    let mut all: BTreeSet<ipnet::IpNet> = BTreeSet::new();
    let mut nodes = 0;
    for l in leases {
        if l.name_any().starts_with(node_lease::PREFIX) {
            let Some(nets) = node_lease::subnets(l) else {
                return allocator::Reach::anywhere();
            };
            all.extend(nets);
            nodes += 1;
        }
    }
    allocator::Reach {
        subnets: (nodes > 0).then(|| all.into_iter().collect()),
    }
}

/// Each pool's status: the addresses and interface in effect, and the `Valid` condition,
/// written when they change (merge patch of `/status`, only while holding the allocator's
/// Lease and before its fence time).
async fn write_pool_statuses(
    shared: &Arc<Shared>,
    objects: &[Arc<IPPool>],
    pools: &Pools,
    reach: &allocator::Reach,
    holds: &watch::Receiver<Option<Instant>>,
) {
    let api: Api<IPPool> = Api::all(shared.client.clone());
    for p in objects {
        let name = p.name_any();
        let old = p.status.clone().unwrap_or_default();
        let problem = pools
            .rejected
            .iter()
            .chain(&pools.degraded)
            .find(|r| r.name == name);
        let want = pool_status(
            &p.spec,
            &old,
            p.metadata.generation,
            problem.map(|r| r.reason.as_str()),
            pools.get(&name).map(|p| announceable(p, reach)),
            &k8s_openapi::jiff::Timestamp::now().to_string(),
        );
        if want == old {
            continue;
        }
        let Some(until) = *holds.borrow() else { return };
        let patch = Patch::Merge(json!({ "status": want }));
        let pp = PatchParams::default();
        match tokio::time::timeout_at(until, api.patch_status(&name, &pp, &patch)).await {
            Ok(Ok(_)) => info!(pool = %name, valid = problem.is_none(), "pool status written"),
            Ok(Err(e)) => warn!(pool = %name, error = %e, "could not write the pool's status"),
            Err(_) => return,
        }
    }
}

/// The status a pool should have: with no `problem` its spec is in effect; otherwise the
/// addresses in `old` stay (the last valid ones) and the condition says why.
pub fn pool_status(
    spec: &IPPoolSpec,
    old: &IPPoolStatus,
    generation: Option<i64>,
    problem: Option<&str>,
    announceable: Option<Announceable>,
    now: &str,
) -> IPPoolStatus {
    let (addresses, interface, status, reason, message) = match problem {
        None => (
            spec.addresses.clone(),
            spec.interface.clone(),
            "True",
            "Valid",
            "the spec is in effect".to_string(),
        ),
        Some(why) if !old.addresses.is_empty() => (
            old.addresses.clone(),
            old.interface.clone(),
            "False",
            "InvalidSpec",
            format!("{why}; the addresses in status.addresses stay in effect"),
        ),
        Some(why) => (
            vec![],
            None,
            "False",
            "InvalidSpec",
            format!("{why}; no address of this pool is in effect"),
        ),
    };
    let condition = |type_: &str, status: &str, reason: &str, message: String| {
        let since = old
            .conditions
            .iter()
            .find(|c| c.type_ == type_ && c.status == status)
            .and_then(|c| c.last_transition_time.clone())
            .unwrap_or_else(|| now.to_string());
        PoolCondition {
            type_: type_.into(),
            status: status.into(),
            reason: reason.into(),
            message,
            observed_generation: generation,
            last_transition_time: Some(since),
        }
    };
    let mut conditions = vec![condition("Valid", status, reason, message)];
    if let Some(a) = announceable {
        conditions.push(condition("Announceable", a.status, a.reason, a.message));
    }
    IPPoolStatus {
        observed_generation: generation,
        addresses,
        interface,
        conditions,
    }
}

/// The pool's `Announceable` condition: whether some node could announce its addresses.
#[derive(Debug, Clone, PartialEq)]
pub struct Announceable {
    pub status: &'static str,
    pub reason: &'static str,
    pub message: String,
}

/// Whether the addresses of `pool` can be announced, given where the speakers can.
pub fn announceable(pool: &crate::pool::Pool, reach: &allocator::Reach) -> Announceable {
    // A range that is one CIDR is shown as that CIDR.
    let show = |r: &crate::pool::Range| {
        let nets: Vec<ipnet::IpNet> = match (r.first, r.last) {
            (IpAddr::V4(a), IpAddr::V4(b)) => {
                ipnet::Ipv4Subnets::new(a, b, 0).map(Into::into).collect()
            }
            (IpAddr::V6(a), IpAddr::V6(b)) => {
                ipnet::Ipv6Subnets::new(a, b, 0).map(Into::into).collect()
            }
            _ => vec![],
        };
        match nets.as_slice() {
            [one] if r.first != r.last => one.to_string(),
            _ if r.first == r.last => r.first.to_string(),
            _ => format!("{}-{}", r.first, r.last),
        }
    };
    if let Some(i) = &pool.interface {
        return Announceable {
            status: "True",
            reason: "Interface",
            message: format!("announced on {i} of the nodes the pool selects"),
        };
    }
    if reach.subnets.is_none() {
        return Announceable {
            status: "Unknown",
            reason: "SubnetsUnknown",
            message: "not every speaker publishes the subnets it can announce on yet".into(),
        };
    }
    let off: Vec<String> = pool
        .ranges
        .iter()
        .filter(|r| !covers(&reach.parts(r, pool), r))
        .map(show)
        .collect();
    let on = pool.ranges.iter().any(|r| !reach.parts(r, pool).is_empty());
    match (off.is_empty(), on) {
        (true, _) => Announceable {
            status: "True",
            reason: "OnNodeSubnets",
            message: "every address is on a subnet of some node".into(),
        },
        (false, false) => Announceable {
            status: "False",
            reason: "NoNodeSubnet",
            message: format!(
                "{} on no node's subnet and the pool names no spec.interface: no node could announce its addresses, so none is assigned",
                off.join(", ")
            ),
        },
        (false, true) => Announceable {
            status: "False",
            reason: "PartlyOffNodeSubnets",
            message: format!(
                "not all on a node's subnet: {}; only addresses on some node's subnet are assigned",
                off.join(", ")
            ),
        },
    }
}

/// Whether sorted `parts` cover all of `r`.
fn covers(parts: &[crate::pool::Range], r: &crate::pool::Range) -> bool {
    let mut next = Some(r.first);
    for p in parts {
        match next {
            Some(n) if p.contains(n) => next = successor(p.last),
            _ => {}
        }
        if next.is_none_or(|n| !r.contains(n)) {
            return true;
        }
    }
    false
}

fn successor(ip: IpAddr) -> Option<IpAddr> {
    match ip {
        IpAddr::V4(v4) => u32::from(v4).checked_add(1).map(|n| IpAddr::V4(n.into())),
        IpAddr::V6(v6) => u128::from(v6).checked_add(1).map(|n| IpAddr::V6(n.into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pool_says_whether_some_node_could_announce_its_addresses() {
        let pool = |addresses: &[&str], interface: Option<&str>| crate::pool::Pool {
            name: "p".into(),
            ranges: addresses
                .iter()
                .map(|a| crate::pool::parse_range(a).unwrap())
                .collect(),
            interface: interface.map(String::from),
            node_selector: Default::default(),
            auto_assign: true,
        };
        let reach = allocator::Reach {
            subnets: Some(vec![
                "192.0.2.0/25".parse().unwrap(),
                "192.0.2.128/25".parse().unwrap(),
                "2001:db8::/64".parse().unwrap(),
            ]),
        };
        let on = announceable(
            &pool(&["192.0.2.100-192.0.2.200", "2001:db8::/120"], None),
            &reach,
        );
        assert_eq!(
            (on.status, on.reason),
            ("True", "OnNodeSubnets"),
            "two adjacent subnets cover it"
        );
        let off = announceable(&pool(&["2001:db8:5::/64"], None), &reach);
        assert_eq!((off.status, off.reason), ("False", "NoNodeSubnet"));
        assert!(
            off.message.contains("2001:db8:5::/64 on no node's subnet"),
            "{}",
            off.message
        );
        let part = announceable(&pool(&["192.0.2.250-192.0.3.5"], None), &reach);
        assert_eq!(
            (part.status, part.reason),
            ("False", "PartlyOffNodeSubnets")
        );
        let wired = announceable(&pool(&["2001:db8:5::/64"], Some("eth1")), &reach);
        assert_eq!((wired.status, wired.reason), ("True", "Interface"));
        let unknown = announceable(
            &pool(&["2001:db8:5::/64"], None),
            &allocator::Reach::anywhere(),
        );
        assert_eq!(unknown.status, "Unknown");

        // Written beside Valid; its transition time kept while its status stays.
        let spec = IPPoolSpec {
            addresses: vec!["2001:db8:5::/64".into()],
            ..Default::default()
        };
        let s1 = pool_status(
            &spec,
            &IPPoolStatus::default(),
            Some(1),
            None,
            Some(off.clone()),
            "t1",
        );
        assert_eq!(s1.conditions[1].type_, "Announceable");
        assert_eq!(s1.conditions[1].status, "False");
        let s2 = pool_status(&spec, &s1, Some(1), None, Some(off), "t2");
        assert_eq!(s2, s1);
        let s3 = pool_status(&spec, &s1, Some(1), None, Some(wired), "t3");
        assert_eq!(s3.conditions[1].last_transition_time.as_deref(), Some("t3"));
        assert_eq!(s3.conditions[0].last_transition_time.as_deref(), Some("t1"));
    }

    #[test]
    fn a_valid_spec_is_recorded_and_an_invalid_edit_keeps_the_last_valid_addresses() {
        let good = IPPoolSpec {
            addresses: vec!["192.0.2.200-192.0.2.209".into()],
            ..Default::default()
        };
        let s1 = pool_status(&good, &IPPoolStatus::default(), Some(1), None, None, "t1");
        assert_eq!(s1.addresses, good.addresses);
        assert_eq!(s1.conditions[0].status, "True");
        assert_eq!(s1.conditions[0].last_transition_time.as_deref(), Some("t1"));
        // Unchanged: the same status (nothing to write), transition time kept.
        assert_eq!(pool_status(&good, &s1, Some(1), None, None, "t2"), s1);
        let bad = IPPoolSpec {
            addresses: vec!["192.0.2.300".into()],
            ..Default::default()
        };
        let s2 = pool_status(
            &bad,
            &s1,
            Some(2),
            Some("\"192.0.2.300\" is neither a CIDR nor a range"),
            None,
            "t3",
        );
        assert_eq!(s2.addresses, good.addresses, "still in effect");
        assert_eq!(s2.observed_generation, Some(2));
        assert_eq!(s2.conditions[0].status, "False");
        assert!(s2.conditions[0].message.contains("192.0.2.300"));
        assert_eq!(s2.conditions[0].last_transition_time.as_deref(), Some("t3"));
    }
}
