//! The speaker: caches, the per-VIP election tasks, DNAT, the allocator, and shutdown.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ObjectReference, Service};
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::{Client, Resource, ResourceExt};
use serde_json::json;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::{error, info, warn};

use crate::allocator;
use crate::cluster::Cluster;
use crate::config::Config;
use crate::dataplane::addr::{AddrOps, Interface, Netlink};
use crate::dataplane::nft::{Dnat, Nft};
use crate::dataplane::sink::Pnet;
use crate::dataplane::{self, Dataplane};
use crate::election::{self, Stop, VipView};
use crate::lease::{self, Candidate, Description, Leases, Seen};
use crate::metrics::Metrics;
use crate::plan;
use crate::pool::Pools;
use crate::service::ServiceInfo;

/// The allocator's own Lease: one speaker assigns IPs at a time.
pub const ALLOCATOR_LEASE: &str = "l2speaker-allocator";
/// How stale the interface list may get (a lost carrier is noticed within this).
pub const INTERFACE_REFRESH: Duration = Duration::from_millis(250);
/// Passes over all VIPs are at least this far apart.
pub const PASS_SPACING: Duration = Duration::from_millis(20);
/// How much later each next-ranked candidate tries to take a Lease that was released or
/// expired (a takeover: the first-ranked candidate is normally alive and goes at once).
pub const RANK_STEP: Duration = Duration::from_millis(300);
/// The same for a VIP that has no Lease yet (first placement: not urgent, and speakers that
/// start together need a moment to see it, so the spread stays even).
pub const INITIAL_RANK_STEP: Duration = Duration::from_secs(1);
/// Extra wait before a node that already holds its fair share takes a VIP first meant for
/// another node (that node's speaker may just be starting).
pub const FAIR_SHARE_WAIT: Duration = Duration::from_secs(5);

pub struct Shared {
    pub config: Config,
    pub client: Client,
    pub cluster: Cluster,
    pub leases: Leases,
    pub dataplane: Dataplane<Netlink, Nft, Pnet>,
    pub metrics: Arc<Metrics>,
    /// VIPs bound here now, with their Service key.
    owned: Mutex<BTreeMap<IpAddr, String>>,
    recorder: Recorder,
}

impl Shared {
    pub fn own(&self, ip: IpAddr, service: &str, _iface: &Interface) {
        let mut o = self.owned.lock().unwrap_or_else(|e| e.into_inner());
        o.insert(ip, service.to_string());
        self.metrics.set_owned(o.len());
    }

    pub fn disown(&self, ip: IpAddr) {
        let mut o = self.owned.lock().unwrap_or_else(|e| e.into_inner());
        o.remove(&ip);
        self.metrics.set_owned(o.len());
    }

    fn services(&self) -> Vec<ServiceInfo> {
        self.cluster
            .services
            .state()
            .iter()
            .map(|s| ServiceInfo::from_service(s))
            .collect()
    }

    /// Programs DNAT for the VIPs owned now, from the current Services and EndpointSlices.
    pub async fn sync_dnat(&self) {
        let owned = self.owned.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let services = self.services();
        let slices = self.cluster.slices.state();
        let by_service = plan::slices_by_service(&slices);
        let entries: Vec<Dnat> = owned
            .iter()
            .filter_map(|(ip, key)| {
                let svc = services.iter().find(|s| &s.key == key)?;
                let mine = plan::slices_of(svc, &by_service);
                Some(Dnat {
                    vip: *ip,
                    ports: plan::port_maps(*ip, svc, &mine, &self.config.node_name),
                })
            })
            .collect();
        if let Err(e) = self.dataplane.program(&entries).await {
            self.metrics.dataplane_error(&e);
            error!(error = %e, "could not program DNAT");
        }
    }

    fn service_ref(&self, key: &str) -> Option<ObjectReference> {
        let (ns, name) = key.split_once('/')?;
        let svc = self
            .cluster
            .services
            .state()
            .into_iter()
            .find(|s| s.namespace().as_deref() == Some(ns) && s.name_any() == name)?;
        Some(svc.object_ref(&()))
    }

    async fn event(
        &self,
        reference: &ObjectReference,
        type_: EventType,
        reason: &str,
        note: String,
        action: &str,
    ) {
        let ev = Event {
            type_,
            reason: reason.into(),
            note: Some(note),
            action: action.into(),
            secondary: None,
        };
        if let Err(e) = self.recorder.publish(&ev, reference).await {
            warn!(reason, error = %e, "could not record an event");
        }
    }

    /// Event on the Service: which node announces which IP via which interface, and whom it
    /// took the IP over from (a failover or a planned handover).
    pub async fn record_announce(
        &self,
        ip: IpAddr,
        service: &str,
        iface: &Interface,
        previous: Option<&str>,
    ) {
        if let Some(r) = self.service_ref(service) {
            let mac = iface
                .mac
                .map(|m| dataplane::packet::format_mac(&m))
                .unwrap_or_default();
            let mut note = format!(
                "{} announces {ip} via {} ({mac})",
                self.config.node_name, iface.name
            );
            let reason = match previous {
                Some(p) => {
                    note.push_str(&format!(", taking over from {p}"));
                    "FailedOver"
                }
                None => "Announcing",
            };
            self.event(&r, EventType::Normal, reason, note, "Announce")
                .await;
        }
    }
}

struct VipTask {
    view: watch::Sender<VipView>,
    stop: watch::Sender<Stop>,
    handle: JoinHandle<()>,
}

/// Runs the speaker until `shutdown` resolves, then withdraws and releases everything.
pub async fn run(
    config: Config,
    kube_config: kube::Config,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let metrics = Arc::new(Metrics::new());
    // Every API request is timed into l2speaker_api_request_duration_seconds.
    let client: Client = kube::client::ClientBuilder::try_from(kube_config)?
        .with_layer(&crate::metrics::TimedLayer(metrics.clone()))
        .build();
    let metrics_addr = config.metrics_address;
    let m = metrics.clone();
    tokio::spawn(async move {
        if let Err(e) = crate::metrics::serve(metrics_addr, m).await {
            error!(address = %metrics_addr, error = %e, "could not serve metrics and health");
        }
    });
    let cluster = Cluster::start(&client, &config.namespace);
    let netlink = Netlink::connect()?;
    let dataplane = Dataplane::new(netlink, Nft, Pnet::default(), config.dnat);
    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: "l2speaker".into(),
            instance: Some(config.node_name.clone()),
        },
    );
    let shared = Arc::new(Shared {
        leases: Leases::new(
            Api::namespaced(client.clone(), &config.namespace),
            &config.node_name,
            config.lease_duration,
        ),
        config,
        client,
        cluster,
        dataplane,
        metrics,
        owned: Mutex::new(BTreeMap::new()),
        recorder,
    });

    tokio::pin!(shutdown);
    tokio::select! {
        _ = shared.cluster.ready() => {}
        _ = &mut shutdown => return Ok(()),
    }
    info!(node = %shared.config.node_name, "caches synced");
    // Nothing is ours until a Lease says so: leftovers of a killed speaker go.
    if let Err(e) = shared.dataplane.remove_rules().await {
        error!(error = %e, "could not remove stale DNAT rules");
    }
    match shared.dataplane.remove_stale_addresses(|_| false).await {
        Ok(removed) if !removed.is_empty() => info!(?removed, "removed stale addresses"),
        Ok(_) => {}
        Err(e) => error!(error = %e, "could not remove stale addresses"),
    }
    if shared.config.dnat && !dataplane::forwards_v4() {
        warn!(
            "net.ipv4.ip_forward is 0: DNAT to pods on other nodes will not work (not changed; that is the node's owner's call)"
        );
    }

    let (stop_alloc, stop_alloc_rx) = watch::channel(false);
    let alloc = tokio::spawn(allocator_loop(shared.clone(), stop_alloc_rx));
    let mut coord = Coordinator::new(shared.clone());
    let mut changed = shared.cluster.changed.clone();
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let started = Instant::now();
        coord.pass().await;
        shared
            .metrics
            .ready
            .store(true, std::sync::atomic::Ordering::SeqCst);
        tokio::select! {
            _ = changed.changed() => {}
            _ = tick.tick() => {}
            _ = &mut shutdown => break,
        }
        // The first change after a quiet spell is acted on at once; a burst of changes (every
        // renewal of every Lease is one) is folded into one pass per PASS_SPACING.
        tokio::select! {
            _ = tokio::time::sleep_until(started + PASS_SPACING) => {}
            _ = &mut shutdown => break,
        }
    }

    info!("shutting down: withdrawing and releasing");
    shared
        .metrics
        .ready
        .store(false, std::sync::atomic::Ordering::SeqCst);
    let _ = stop_alloc.send(true);
    coord.stop_all(Stop::Shutdown).await;
    let _ = tokio::time::timeout(Duration::from_secs(3), alloc).await;
    if let Err(e) = shared.dataplane.remove_rules().await {
        error!(error = %e, "could not remove DNAT rules");
    }
    Ok(())
}

struct Coordinator {
    shared: Arc<Shared>,
    tasks: HashMap<IpAddr, VipTask>,
    seen: HashMap<String, Seen>,
    absent_since: HashMap<IpAddr, Instant>,
    interfaces: Vec<Interface>,
    interfaces_read: Option<Instant>,
}

impl Coordinator {
    fn new(shared: Arc<Shared>) -> Self {
        Coordinator {
            shared,
            tasks: HashMap::new(),
            seen: HashMap::new(),
            absent_since: HashMap::new(),
            interfaces: Vec::new(),
            interfaces_read: None,
        }
    }

    async fn pass(&mut self) {
        let s = self.shared.clone();
        let now = Instant::now();
        // Interfaces (carrier, subnets) are re-read at most every INTERFACE_REFRESH, not on
        // every pass: passes follow every Lease renewal.
        if self
            .interfaces_read
            .is_none_or(|t| now - t >= INTERFACE_REFRESH)
        {
            match s.dataplane.addrs.interfaces().await {
                Ok(i) => {
                    self.interfaces = i;
                    self.interfaces_read = Some(now);
                }
                Err(e) => warn!(error = %e, "could not list interfaces"),
            }
        }
        let pools = Pools::from_objects(&s.cluster.pools.state());
        let services: Vec<ServiceInfo> = s
            .services()
            .into_iter()
            .filter(|x| x.is_ours(&s.config.load_balancer_class, s.config.claim_unclassed))
            .collect();
        let vips = plan::vips(&services, &pools);
        let slices = s.cluster.slices.state();
        let by_service = plan::slices_by_service(&slices);
        let nodes = s.cluster.nodes.state();
        let me = s.config.node_name.clone();
        let my_labels = nodes
            .iter()
            .find(|n| n.name_any() == me)
            .map(|n| n.labels().clone())
            .unwrap_or_default();

        // Lease sightings, for expiry by local observation.
        let leases: HashMap<String, Arc<Lease>> = s
            .cluster
            .leases
            .state()
            .into_iter()
            .map(|l| (l.name_any(), l))
            .collect();
        self.seen.retain(|name, _| leases.contains_key(name));
        for (name, l) in &leases {
            let seen = Seen::observe(l, self.seen.get(name), now);
            self.seen.insert(name.clone(), seen);
        }

        let held_here = leases
            .values()
            .filter(|l| {
                l.spec.as_ref().and_then(|s| s.holder_identity.as_deref()) == Some(me.as_str())
            })
            .count();
        let node_count = nodes.len().max(1);
        let fair_share = vips.len().div_ceil(node_count);
        for (ip, (svc, pool)) in vips.iter() {
            let index = pool.offset(*ip).unwrap_or(0);
            let svc_slices = plan::slices_of(svc, &by_service);
            let eligible = plan::node_may_announce(&me, &my_labels, pool, svc, &svc_slices)
                .and_then(|()| plan::interface_for(*ip, pool, &self.interfaces));
            let mut candidates: BTreeSet<String> = nodes
                .iter()
                .filter(|n| {
                    plan::node_may_announce(&n.name_any(), n.labels(), pool, svc, &svc_slices)
                        .is_ok()
                })
                .map(|n| n.name_any())
                .collect();
            if eligible.is_ok() {
                candidates.insert(me.clone());
            }
            let name = lease::lease_name(*ip);
            let lease = leases
                .get(&name)
                .map(|l| (self.seen[&name].clone(), (**l).clone()));
            // A node that stepped down lets the others go first.
            let stepped_down = lease
                .as_ref()
                .filter(|(seen, _)| seen.holder.is_none())
                .and_then(|(_, l)| lease::stepped_down_from(l).map(str::to_string));
            let holder = lease
                .as_ref()
                .and_then(|(seen, _)| seen.holder.clone())
                .or(stepped_down.clone());
            let order = plan::ranking(*ip, index, &candidates, holder.as_deref());
            let rank = order.iter().position(|n| *n == me).unwrap_or(order.len());
            let absent_since = *self.absent_since.entry(*ip).or_insert(now);
            let view = VipView {
                ip: *ip,
                service: svc.key.clone(),
                eligible,
                delay: match (&lease, rank) {
                    _ if stepped_down.as_deref() == Some(me.as_str()) => FAIR_SHARE_WAIT,
                    (_, 0) => Duration::ZERO,
                    (None, r) if held_here >= fair_share => {
                        INITIAL_RANK_STEP * r as u32 + FAIR_SHARE_WAIT
                    }
                    (None, r) => INITIAL_RANK_STEP * r as u32,
                    (Some(_), r) => RANK_STEP * r as u32,
                },
                lease,
                absent_since,
            };
            match self.tasks.get(ip) {
                Some(t) if !t.handle.is_finished() => {
                    t.view.send_if_modified(|v| {
                        if *v == view {
                            false
                        } else {
                            *v = view;
                            true
                        }
                    });
                }
                _ => {
                    let (view_tx, view_rx) = watch::channel(view);
                    let (stop_tx, stop_rx) = watch::channel(Stop::Running);
                    let handle = tokio::spawn(election::run(s.clone(), view_rx, stop_rx));
                    self.tasks.insert(
                        *ip,
                        VipTask {
                            view: view_tx,
                            stop: stop_tx,
                            handle,
                        },
                    );
                }
            }
        }
        let gone: Vec<IpAddr> = self
            .tasks
            .keys()
            .filter(|ip| !vips.contains_key(ip))
            .copied()
            .collect();
        for ip in gone {
            if let Some(t) = self.tasks.remove(&ip) {
                let _ = t.stop.send(Stop::Gone);
                tokio::spawn(async move {
                    let _ = t.handle.await;
                });
            }
            self.absent_since.remove(&ip);
        }
        // Endpoints may have changed under VIPs we own.
        s.sync_dnat().await;
    }

    async fn stop_all(&mut self, why: Stop) {
        let tasks: Vec<VipTask> = self.tasks.drain().map(|(_, t)| t).collect();
        for t in &tasks {
            let _ = t.stop.send(why);
        }
        let all = futures::future::join_all(tasks.into_iter().map(|t| t.handle));
        if tokio::time::timeout(Duration::from_secs(5), all)
            .await
            .is_err()
        {
            warn!("some VIPs did not withdraw within 5 s");
        }
    }
}

/// One speaker at a time assigns IPs: it holds [`ALLOCATOR_LEASE`].
async fn allocator_loop(shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let me = shared.config.node_name.clone();
    let desc = Description {
        labels: [(
            lease::LABEL_MANAGED_BY.to_string(),
            lease::MANAGED_BY.to_string(),
        )]
        .into(),
        annotations: BTreeMap::new(),
    };
    let mut held: Option<Lease> = None;
    let mut last_renewed = Instant::now();
    let mut seen: Option<Seen> = None;
    let mut reported: HashSet<(String, String)> = HashSet::new();
    let mut changed = shared.cluster.changed.clone();
    let since = Instant::now();
    loop {
        if *stop.borrow() {
            if let Some(l) = held.take() {
                let _ = shared.leases.release(ALLOCATOR_LEASE, &l).await;
            }
            return;
        }
        let current = shared
            .cluster
            .leases
            .state()
            .into_iter()
            .find(|l| l.name_any() == ALLOCATOR_LEASE);
        seen = current
            .as_ref()
            .map(|l| Seen::observe(l, seen.as_ref(), Instant::now()));
        let next = match &held {
            Some(l) => {
                let due = last_renewed + shared.config.renew_interval;
                if Instant::now() >= due {
                    match shared.leases.renew(ALLOCATOR_LEASE, l).await {
                        Ok(l) => {
                            held = Some(l);
                            last_renewed = Instant::now();
                        }
                        Err(e) => {
                            if matches!(e, lease::LeaseError::Lost(_))
                                || last_renewed.elapsed() >= shared.config.renew_deadline
                            {
                                warn!(error = %e, "no longer the allocator");
                                held = None;
                            }
                        }
                    }
                }
                if held.is_some() {
                    allocate_once(&shared, &mut reported).await;
                }
                Some(last_renewed + shared.config.renew_interval)
            }
            None => {
                match lease::candidate(seen.as_ref(), &me, Instant::now(), since, Duration::ZERO) {
                    Candidate::Acquire | Candidate::Adopt => {
                        match shared
                            .leases
                            .acquire(ALLOCATOR_LEASE, current.as_deref(), &desc)
                            .await
                        {
                            Ok(l) => {
                                info!("this speaker is the allocator");
                                held = Some(l);
                                last_renewed = Instant::now();
                                allocate_once(&shared, &mut reported).await;
                            }
                            Err(e) => info!(error = %e, "another speaker is the allocator"),
                        }
                        Some(Instant::now() + shared.config.renew_interval)
                    }
                    Candidate::WaitUntil(t) => Some(t),
                }
            }
        };
        let sleep = tokio::time::sleep_until(
            next.unwrap_or_else(|| Instant::now() + shared.config.renew_interval),
        );
        tokio::select! {
            _ = sleep => {}
            _ = changed.changed() => {}
            _ = stop.changed() => {}
        }
    }
}

/// Writes the assignment to Service status, reports refusals and invalid pools once each,
/// and deletes Leases of IPs no Service has any more.
async fn allocate_once(shared: &Arc<Shared>, reported: &mut HashSet<(String, String)>) {
    let pool_objs = shared.cluster.pools.state();
    let pools = Pools::from_objects(&pool_objs);
    for r in &pools.rejected {
        if reported.insert((format!("pool/{}", r.name), r.reason.clone())) {
            warn!(pool = %r.name, reason = %r.reason, "IPPool rejected");
            if let Some(p) = pool_objs
                .iter()
                .find(|p| p.metadata.name.as_deref() == Some(r.name.as_str()))
            {
                shared
                    .event(
                        &p.object_ref(&()),
                        EventType::Warning,
                        "InvalidPool",
                        format!("IPPool ignored: {}", r.reason),
                        "Validate",
                    )
                    .await;
            }
        }
    }
    let services = shared.services();
    let node_ips: BTreeSet<IpAddr> = shared
        .cluster
        .nodes
        .state()
        .iter()
        .flat_map(|n| {
            n.status
                .iter()
                .flat_map(|s| s.addresses.iter().flatten())
                .filter_map(|a| a.address.parse().ok())
                .collect::<Vec<_>>()
        })
        .collect();
    let (class, unclassed) = (
        shared.config.load_balancer_class.clone(),
        shared.config.claim_unclassed,
    );
    let alloc = allocator::allocate(
        &services,
        |s| s.is_ours(&class, unclassed),
        &pools,
        &node_ips,
    );
    for r in &alloc.refusals {
        if reported.insert((r.service.clone(), r.message.clone())) {
            warn!(service = %r.service, reason = r.reason, message = %r.message, "refused");
            if let Some(reference) = shared.service_ref(&r.service) {
                shared
                    .event(
                        &reference,
                        EventType::Warning,
                        r.reason,
                        r.message.clone(),
                        "Allocate",
                    )
                    .await;
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
        let api: Api<Service> = Api::namespaced(shared.client.clone(), &s.namespace);
        match api
            .patch_status(&s.name, &PatchParams::default(), &Patch::Merge(patch))
            .await
        {
            Ok(_) => info!(service = %s.key, ips = ?want, "assigned"),
            Err(e) => warn!(service = %s.key, error = %e, "could not write the Service status"),
        }
        if let Some(reference) = shared.service_ref(&s.key) {
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
            shared
                .event(
                    &reference,
                    EventType::Normal,
                    "IPAllocated",
                    note,
                    "Allocate",
                )
                .await;
        }
    }
    // Leases of IPs that no Service has any more, left released or expired.
    let ours: Vec<ServiceInfo> = services
        .iter()
        .filter(|s| s.is_ours(&class, unclassed))
        .cloned()
        .collect();
    let vips: BTreeSet<String> = plan::vips(&ours, &pools)
        .keys()
        .map(|ip| lease::lease_name(*ip))
        .collect();
    for l in shared.cluster.leases.state() {
        let name = l.name_any();
        if !name.starts_with("vip-") || vips.contains(&name) {
            continue;
        }
        let spec = l.spec.clone().unwrap_or_default();
        let free = spec.holder_identity.as_deref().is_none_or(str::is_empty);
        // A holder that died with its Service gone leaves a Lease nobody renews. It is only
        // garbage (no Service has the IP), so wall-clock staleness is enough to clean it up:
        // twice the duration without a renewal. The delete is CAS on the resourceVersion.
        let stale = spec.renew_time.as_ref().is_some_and(|r| {
            let age_ms =
                k8s_openapi::jiff::Timestamp::now().as_millisecond() - r.0.as_millisecond();
            age_ms > 2 * 1000 * i64::from(spec.lease_duration_seconds.unwrap_or(0))
        });
        if free || stale {
            info!(lease = %name, "deleting the lease of an IP no Service has");
            let _ = shared
                .leases
                .delete(&name, l.metadata.resource_version.as_deref().unwrap_or(""))
                .await;
        }
    }
}
