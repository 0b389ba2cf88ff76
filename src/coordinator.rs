//! The coordinator: on every change of the caches, works out for each VIP whether this node
//! is eligible, its rank among the candidates and what the Lease says, and feeds that to the
//! VIP's holder (one task each, started and stopped here).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;
use k8s_openapi::api::coordination::v1::Lease;
use kube::runtime::events::EventType;
use kube::{Api, ResourceExt};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::{info, warn};

use crate::context::Shared;
use crate::dataplane::addr::{AddrOps, Interface};
use crate::dataplane::packet::format_mac;
use crate::holder::{self, Feed, Target};
use crate::lease;
use crate::node_ips;
use crate::node_lease;
use crate::ownership::machine::{Observed, Stop, View};
use crate::plan;
use crate::pool::{self, Pools};
use crate::service::ServiceInfo;

/// How stale the interface list may get when the kernel's change announcements are not
/// available (a lost carrier is noticed within this).
pub const INTERFACE_REFRESH: Duration = Duration::from_millis(250);
/// With change announcements (the speaker's own address refreshes are not announced as
/// changes), the interface list is read again at least this long after the last read when
/// something changed: an address someone else removed is noticed within it, and a storm of
/// foreign changes costs at most one read per spacing.
pub const CHANGE_READ_SPACING: Duration = Duration::from_millis(50);
/// ... and at least this often (announcements the kernel dropped on overflow).
pub const INTERFACE_BACKSTOP: Duration = Duration::from_secs(5);
/// How often the listening sockets are read while node-IP Services exist.
pub const PORTS_EVERY: Duration = Duration::from_secs(2);
/// How much later each next-ranked candidate tries to take a Lease that was released or
/// expired (a takeover: the first-ranked candidate is normally alive and goes at once).
pub const RANK_STEP: Duration = Duration::from_millis(300);
/// The same for a VIP that has no Lease yet (first placement: not urgent, and speakers that
/// start together need a moment to see it, so the spread stays even).
pub const INITIAL_RANK_STEP: Duration = Duration::from_secs(1);
/// Extra wait before a node that already holds its fair share takes a VIP first meant for
/// another node (that node's speaker may just be starting).
pub const FAIR_SHARE_WAIT: Duration = Duration::from_secs(5);

/// How long `me` waits, after the VIP's Lease is free or expired, before trying to take it:
/// its place among `candidates` (the round-robin first by `index`, then rendezvous; the
/// holder, or the node that stepped down from a released Lease, ranked out), turned into a
/// delay. The coordinator and the simulator both decide with this.
pub fn delay_for(
    me: &str,
    ip: IpAddr,
    index: u128,
    candidates: &BTreeSet<String>,
    observed: Option<&Observed>,
    over_fair_share: bool,
) -> Duration {
    let stepped_down = observed
        .filter(|o| o.holder.is_none())
        .and_then(|o| o.stepped_down_from.clone());
    let holder = observed
        .and_then(|o| o.holder.clone())
        .or(stepped_down.clone());
    let order = plan::ranking(ip, index, candidates, holder.as_deref());
    let rank = order.iter().position(|n| n == me).unwrap_or(order.len());
    rank_delay(
        rank,
        observed.is_some(),
        stepped_down.as_deref() == Some(me),
        over_fair_share,
    )
}

/// The rank delay: how long after the Lease is free this node waits before trying.
pub fn rank_delay(
    rank: usize,
    has_lease: bool,
    stepped_down_here: bool,
    over_fair_share: bool,
) -> Duration {
    let r = rank as u32;
    match (has_lease, rank) {
        _ if stepped_down_here => FAIR_SHARE_WAIT,
        (_, 0) => Duration::ZERO,
        (false, _) if over_fair_share => INITIAL_RANK_STEP * r + FAIR_SHARE_WAIT,
        (false, _) => INITIAL_RANK_STEP * r,
        (true, _) => RANK_STEP * r,
    }
}

struct Task {
    feed: watch::Sender<Feed>,
    stop: watch::Sender<Option<Stop>>,
    handle: JoinHandle<()>,
}

pub struct Coordinator {
    shared: Arc<Shared>,
    tasks: HashMap<IpAddr, Task>,
    seen: HashMap<String, Observed>,
    absent_since: HashMap<IpAddr, Instant>,
    interfaces: Vec<Interface>,
    gateways: Vec<IpAddr>,
    interfaces_read: Option<Instant>,
    /// What this node's Lease publishes now (None: not yet, or the last write failed).
    published: Option<node_lease::Published>,
    /// The interfaces were read once: before that, nothing is published (an empty list of
    /// subnets would say this node can announce nothing).
    interfaces_known: bool,
    publishing: Option<JoinHandle<bool>>,
    /// When this node's listening sockets were last read (node-IP Services' ports), and
    /// whether that read failed.
    ports_read: Option<Instant>,
    ports_failed: bool,
    /// The node-IP Services' ports, for the cluster change counter they were read at.
    ports_wanted: Option<(u64, BTreeSet<node_ips::Port>)>,
    /// (Service, IP) pairs already told that this node refuses the IP.
    reported: HashSet<(String, IpAddr)>,
    /// Service IPs reported once as also on a no-ARP link (see [`plan::other_agents_copies`]).
    copies_reported: HashSet<(String, IpAddr)>,
    /// What the last full pass was computed from: a pass with the same inputs would feed
    /// every holder the same view again, so it stops early (the periodic pass of an idle
    /// speaker with a thousand VIPs costs an interface listing, not a thousand views).
    last_inputs: Option<PassInputs>,
    /// Moves on every link, address or route change the kernel announces (None: polled).
    kernel_changes: Option<watch::Receiver<u64>>,
    /// The VIP addresses this speaker added that the kernel holds, as of the last read.
    bound: BTreeSet<(u32, IpAddr)>,
    /// Per VIP: how many times its owner's address was found missing on a fresh read (the
    /// holder binds it again each time the count moves).
    address_lost: HashMap<IpAddr, u64>,
}

/// Everything a pass's views depend on besides the clock (nothing in a view does; holders
/// keep their own timers).
#[derive(Debug, Clone, PartialEq)]
struct PassInputs {
    /// Moves on every relevant change of a watched object.
    cluster: u64,
    lan: crate::keeper::LanState,
    interfaces: Vec<Interface>,
    gateways: Vec<IpAddr>,
    /// Pool addresses other hosts claimed lately (they expire with time).
    foreign: Vec<(IpAddr, String)>,
    /// Moves when the VIPs bound here change.
    owned: u64,
    /// The VIP addresses the kernel holds (someone else may remove one).
    bound: BTreeSet<(u32, IpAddr)>,
}

impl Coordinator {
    pub fn new(shared: Arc<Shared>) -> Self {
        Coordinator {
            shared,
            tasks: HashMap::new(),
            seen: HashMap::new(),
            absent_since: HashMap::new(),
            interfaces: Vec::new(),
            gateways: Vec::new(),
            interfaces_read: None,
            published: None,
            interfaces_known: false,
            publishing: None,
            ports_read: None,
            ports_failed: false,
            ports_wanted: None,
            reported: HashSet::new(),
            copies_reported: HashSet::new(),
            last_inputs: None,
            kernel_changes: None,
            bound: BTreeSet::new(),
            address_lost: HashMap::new(),
        }
    }

    /// Reads the interfaces when the kernel announces a change (at most every
    /// [`CHANGE_READ_SPACING`], and at least every [`INTERFACE_BACKSTOP`]) instead of every
    /// [`INTERFACE_REFRESH`].
    pub fn read_interfaces_on(&mut self, changes: watch::Receiver<u64>) {
        self.kernel_changes = Some(changes);
    }

    /// When a pass should next read the interfaces for a change announced since the last
    /// read (None: nothing announced, or no announcements followed).
    pub fn change_read_at(&self) -> Option<Instant> {
        let c = self.kernel_changes.as_ref()?;
        if !c.has_changed().unwrap_or(false) {
            return None;
        }
        Some(self.interfaces_read? + CHANGE_READ_SPACING)
    }

    /// One pass over every VIP.
    pub async fn pass(&mut self) {
        let s = self.shared.clone();
        let now = Instant::now();
        if self
            .kernel_changes
            .as_ref()
            .is_some_and(|c| c.has_changed().is_err())
        {
            warn!("stopped following link and address changes; polling them instead");
            self.kernel_changes = None;
        }
        let due = match (&self.kernel_changes, self.interfaces_read) {
            (_, None) => true,
            (Some(c), Some(t)) => {
                let age = now - t;
                (age >= CHANGE_READ_SPACING && c.has_changed().unwrap_or(true))
                    || age >= INTERFACE_BACKSTOP
            }
            (None, Some(t)) => now - t >= INTERFACE_REFRESH,
        };
        let mut fresh = false;
        if due {
            // A change announced while the list is read makes the next pass read it again.
            if let Some(c) = &mut self.kernel_changes {
                c.borrow_and_update();
            }
            let read = async {
                let i = s.dataplane.addrs.interfaces().await?;
                let g = s.dataplane.addrs.gateways().await?;
                let a = s.dataplane.addrs.addresses().await?;
                Ok::<_, crate::dataplane::addr::AddrError>((i, g, a))
            };
            match tokio::time::timeout(Duration::from_secs(1), read).await {
                Ok(Ok((i, g, a))) => {
                    self.interfaces = i;
                    self.gateways = g;
                    self.interfaces_read = Some(now);
                    self.interfaces_known = true;
                    self.bound = a
                        .into_iter()
                        .filter(|a| a.ours)
                        .map(|a| (a.index, a.ip))
                        .collect();
                    fresh = true;
                }
                // Read again at the next pass.
                Ok(Err(e)) => {
                    warn!(error = %e, "could not list interfaces and routes");
                    self.interfaces_read = None;
                }
                Err(_) => {
                    warn!("listing interfaces and routes timed out");
                    self.interfaces_read = None;
                }
            }
        }
        let pools = Pools::from_objects(&s.cluster.pools.state());
        let me = s.config.node_name.clone();
        // Addresses this node refuses to bind, published on its Lease (pools or not, so a
        // pool created later never hands them out first).
        let mut refusals = plan::local_refusals(&me, &self.interfaces, &self.gateways);
        if let Some(a) = s.api_server {
            refusals
                .entry(a)
                .or_insert_with(|| "the API server's address".to_string());
        }
        let copies = plan::other_agents_copies(&self.interfaces);
        let mut on_noarp = 0usize;
        let published: BTreeMap<IpAddr, String> = refusals
            .iter()
            .filter(|(ip, _)| pool::assignable(**ip))
            .map(|(ip, why)| (*ip, why.clone()))
            .collect();
        let my_macs: Vec<String> = self
            .interfaces
            .iter()
            .filter_map(|i| i.mac)
            .filter(|m| *m != [0; 6])
            .map(|m| format_mac(&m))
            .collect();
        let busy = self.busy_ports(now);
        if self.interfaces_known {
            self.publish(node_lease::Published {
                refused: published,
                macs: my_macs.clone(),
                busy,
                subnets: plan::announce_subnets(&self.interfaces),
            });
        }
        let inputs = PassInputs {
            cluster: *s.cluster.changed.borrow(),
            lan: s.lan_state.borrow().clone(),
            interfaces: self.interfaces.clone(),
            gateways: self.gateways.clone(),
            foreign: s.fresh_foreign_claims(),
            owned: *s.dnat_wake.borrow(),
            bound: self.bound.clone(),
        };
        // An owned VIP whose address the kernel does not hold is looked at on every fresh
        // read, changed or not (its holder binds it again).
        let missing = fresh
            && s.owned
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .iter()
                .any(|(ip, (_, i))| !self.bound.contains(&(i.index, *ip)));
        if self.last_inputs.as_ref() == Some(&inputs)
            && !missing
            && !self.tasks.values().any(|t| t.handle.is_finished())
        {
            return;
        }
        self.last_inputs = Some(inputs);
        let ctx = s.node_ip_context();
        let (on_nodes, services): (Vec<ServiceInfo>, Vec<ServiceInfo>) = s
            .services()
            .into_iter()
            .filter(|x| x.is_ours(&s.config.load_balancer_class, s.config.claim_unclassed))
            .partition(|x| s.on_nodes(x, &ctx));
        // Heartbeats go out on the nodes' own subnets as soon as node-IP mode may be used,
        // so the allocator has heard every speaker by the time a Service needs them.
        let node_ips_possible = !on_nodes.is_empty() || (ctx.no_pools && ctx.default.is_some());
        self.update_lan_view(&pools, &my_macs, node_ips_possible);
        let vips = plan::vips(&services, &pools);
        let slices = s.cluster.slices.state();
        let by_service = plan::slices_by_service(&slices);
        let nodes = s.cluster.nodes.state();
        let my_labels = nodes
            .iter()
            .find(|n| n.name_any() == me)
            .map(|n| n.labels().clone())
            .unwrap_or_default();

        let leases: HashMap<String, Arc<Lease>> = s
            .cluster
            .leases
            .state()
            .into_iter()
            .map(|l| (l.name_any(), l))
            .collect();
        self.seen.retain(|name, _| leases.contains_key(name));
        for (name, l) in &leases {
            let seen = lease::observe(l, self.seen.get(name), now);
            self.seen.insert(name.clone(), seen);
        }
        let held_here = leases
            .values()
            .filter(|l| {
                l.spec.as_ref().and_then(|s| s.holder_identity.as_deref()) == Some(me.as_str())
            })
            .count();
        let fair_share = vips.len().div_ceil(nodes.len().max(1));
        let lan = s.lan_state.borrow().clone();
        let lan_mode = s.config.liveness == crate::config::Liveness::Lan;
        for (ip, (sharing, pool)) in vips.iter() {
            // The oldest Service names the VIP; a node may announce it only if it may for
            // every Service sharing it.
            let svc = sharing[0];
            let index = pool.offset(*ip).unwrap_or(0);
            let each_slices: Vec<_> = sharing
                .iter()
                .map(|x| plan::slices_of(x, &by_service))
                .collect();
            let may_announce = |node: &str, labels: &BTreeMap<String, String>| {
                sharing
                    .iter()
                    .zip(&each_slices)
                    .try_for_each(|(x, sl)| plan::node_may_announce(node, labels, pool, x, sl))
            };
            if let Some(link) = copies.get(ip) {
                on_noarp += 1;
                if self.copies_reported.insert((svc.key.clone(), *ip)) {
                    warn!(ip = %ip, service = %svc.key, link = %link, "the Service IP is also on a no-ARP link of this node (another agent's copy, such as kube-proxy's in IPVS mode): announcing it anyway");
                    if let Some(r) = s.events.service_ref(&svc.key) {
                        s.events.post(
                            r,
                            EventType::Warning,
                            "IPOnNoArpLink",
                            format!("{ip} is also on {me}'s {link}, a no-ARP link (kube-proxy in IPVS mode puts every LoadBalancer IP on kube-ipvs0): l2speaker still announces it, but unless kube-proxy's strictARP is set every node answers ARP for it"),
                            "Bind",
                        );
                    }
                }
            }
            let refused = refusals.get(ip).map(|why| format!("{ip} is {why}"));
            if let Some(why) = &refused
                && self.reported.insert((svc.key.clone(), *ip))
            {
                warn!(ip = %ip, service = %svc.key, reason = %why, "refusing to bind");
                if let Some(r) = s.events.service_ref(&svc.key) {
                    s.events.post(
                        r,
                        EventType::Warning,
                        "IPRefused",
                        format!("{me} will not bind {why}"),
                        "Bind",
                    );
                }
            }
            // Another host was heard claiming it lately: not taken here (unless it is ours,
            // which the claims watcher defends).
            let foreign = s
                .foreign_claim(*ip)
                .filter(|_| s.owner_of(*ip).is_none())
                .map(|(mac, ago)| {
                    format!(
                        "{ip} is used by {mac} on the LAN (heard {} s ago)",
                        ago.as_secs()
                    )
                });
            if let Some(why) = &foreign
                && self.reported.insert((svc.key.clone(), *ip))
            {
                warn!(ip = %ip, service = %svc.key, reason = %why, "not taking an IP another host uses");
                if let Some(r) = s.events.service_ref(&svc.key) {
                    s.events.post(
                        r,
                        EventType::Warning,
                        "IPConflict",
                        format!("{me} will not take it: {why}"),
                        "Bind",
                    );
                }
            }
            // A node whose gate does not work gives up its VIPs and takes none.
            let gate = match (&lan.gate_broken, lan_mode) {
                (Some(why), true) => Err(format!("this node's kernel gate does not work: {why}")),
                _ => Ok(()),
            };
            let eligible = may_announce(&me, &my_labels)
                .and_then(|()| refused.map_or(Ok(()), Err))
                .and_then(|()| foreign.map_or(Ok(()), Err))
                .and_then(|()| gate.clone())
                .and_then(|()| plan::interface_for(*ip, pool, &self.interfaces));
            let mut candidates: BTreeSet<String> = nodes
                .iter()
                .filter(|n| may_announce(&n.name_any(), n.labels()).is_ok())
                .map(|n| n.name_any())
                .collect();
            if lan_mode {
                // Only nodes whose speakers are alive on the LAN: a dead node ranked first
                // would hold every take-over up by a rank step.
                candidates.retain(|c| lan.alive.contains(c));
            }
            if eligible.is_ok() {
                candidates.insert(me.clone());
            }
            let name = lease::lease_name(*ip);
            let observed = self.seen.get(&name).cloned();
            let absent_since = *self.absent_since.entry(*ip).or_insert(now);
            let holder_node = observed
                .as_ref()
                .and_then(|o| o.holder.as_ref())
                .and_then(|h| lan.nodes.get(h).cloned());
            // Owned here, yet the kernel (read just now) does not hold the address: someone
            // else removed it (a network manager reconfiguring the link, an admin). The
            // holder binds it again, gate first, if it still owns the VIP.
            let lost = self.address_lost.entry(*ip).or_insert(0);
            if fresh
                && let Some((_, i)) = s.owner_of(*ip)
                && !self.bound.contains(&(i.index, *ip))
            {
                *lost += 1;
            }
            let feed = Feed {
                address_lost: *lost,
                fenced_epoch: lan.fenced_epoch,
                view: View {
                    serving: !lan_mode || lan.may_take,
                    holder_node,
                    eligible: eligible.as_ref().map(|i| i.index).map_err(Clone::clone),
                    delay: delay_for(
                        &me,
                        *ip,
                        index,
                        &candidates,
                        observed.as_ref(),
                        held_here >= fair_share,
                    ),
                    lease: observed,
                    absent_since,
                },
                lease: leases.get(&name).cloned(),
                interface: eligible.ok(),
                service: svc.key.clone(),
            };
            match self.tasks.get(ip) {
                Some(t) if !t.handle.is_finished() => {
                    t.feed.send_if_modified(|f| {
                        if *f == feed {
                            false
                        } else {
                            *f = feed;
                            true
                        }
                    });
                }
                _ => {
                    let (feed_tx, feed_rx) = watch::channel(feed);
                    let (stop_tx, stop_rx) = watch::channel(None);
                    let handle = tokio::spawn(holder::run(
                        s.clone(),
                        Target::Vip(*ip),
                        name,
                        feed_rx,
                        stop_rx,
                        None,
                    ));
                    self.tasks.insert(
                        *ip,
                        Task {
                            feed: feed_tx,
                            stop: stop_tx,
                            handle,
                        },
                    );
                }
            }
        }
        s.metrics.set_vips_on_noarp_links(on_noarp);
        let gone: Vec<IpAddr> = self
            .tasks
            .keys()
            .filter(|ip| !vips.contains_key(ip))
            .copied()
            .collect();
        for ip in gone {
            if let Some(t) = self.tasks.remove(&ip) {
                let _ = t.stop.send(Some(Stop::Gone));
                tokio::spawn(async move {
                    let _ = t.handle.await;
                });
            }
            self.absent_since.remove(&ip);
            self.address_lost.remove(&ip);
        }
    }

    /// Tells the claims watcher where to listen (interfaces on a pool's subnet), which
    /// addresses matter (the pools) and which MACs are speakers' (every node's, as their
    /// Leases publish them, and ours).
    /// What the claims watcher and the heartbeats need: the pool ranges, the speakers' MACs,
    /// and the interfaces to watch and send on — those on a pool's subnet, and with node-IP
    /// Services (`node_ips`) those holding this node's own addresses.
    fn update_lan_view(&self, pools: &Pools, my_macs: &[String], node_ips: bool) {
        let s = &self.shared;
        let mut macs: std::collections::HashSet<crate::dataplane::packet::Mac> = Default::default();
        let leases = s.cluster.leases.state();
        // Every node's interfaces (their Leases), every VIP holder's announced MAC, and ours.
        let published = leases.iter().flat_map(|l| {
            let mut m = node_lease::macs(l);
            if let Some(a) = l
                .metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(lease::ANNOTATION_MAC))
            {
                m.push(a.clone());
            }
            m
        });
        for m in published.chain(my_macs.iter().cloned()) {
            if let Some(mac) = crate::dataplane::packet::parse_mac(&m) {
                macs.insert(mac);
            }
        }
        let ranges: Vec<crate::pool::Range> = pools
            .pools
            .iter()
            .flat_map(|p| p.ranges.iter().copied())
            .collect();
        let node_addresses: Vec<IpAddr> = if node_ips {
            s.my_node_addresses()
        } else {
            Vec::new()
        };
        let watch: Vec<Interface> = self
            .interfaces
            .iter()
            .filter(|i| {
                i.up && i.mac.is_some()
                    && (ranges.iter().any(|r| i.holds(r.first))
                        || node_addresses.iter().any(|a| i.holds(*a)))
            })
            .cloned()
            .collect();
        let mut lan = s.lan.lock().unwrap_or_else(|e| e.into_inner());
        lan.pools = ranges;
        lan.speaker_macs = macs;
        lan.watch = watch;
        lan.foreign
            .retain(|_, (_, t)| t.elapsed() < crate::context::FOREIGN_CLAIM_TTL);
    }

    /// Writes this node's refused addresses to its Lease when they changed (in the
    /// background, with a deadline; retried on the next pass after a failure).
    /// The ports of node-IP Services something on this node listens on (read when those
    /// ports change, and every [`PORTS_EVERY`] while such Services exist), kept for the DNAT
    /// (which serves only ports checked and free) and returned for the node's Lease.
    fn busy_ports(&mut self, now: Instant) -> Vec<String> {
        let s = self.shared.clone();
        // The ports wanted change only with the cluster: not every pass parses every Service.
        let counter = *s.cluster.changed.borrow();
        let wanted = match &self.ports_wanted {
            Some((c, w)) if *c == counter => w.clone(),
            _ => {
                let ctx = s.node_ip_context();
                let w: BTreeSet<node_ips::Port> = s
                    .services()
                    .iter()
                    .filter(|x| s.on_nodes(x, &ctx))
                    .flat_map(|x| x.ports.iter().map(|p| (p.protocol, p.port)))
                    .collect();
                self.ports_wanted = Some((counter, w.clone()));
                w
            }
        };
        let current = s
            .busy_ports
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        // Read again when the ports change, or every PORTS_EVERY (also after a failed read).
        let fresh = self.ports_read.is_some_and(|t| now - t < PORTS_EVERY);
        if fresh && (current.checked == wanted || self.ports_failed) {
            return current.busy.iter().map(node_ips::format_port).collect();
        }
        self.ports_read = Some(now);
        self.ports_failed = false;
        let busy = if wanted.is_empty() {
            BTreeSet::new()
        } else {
            match crate::dataplane::listening::sockets() {
                Ok(l) => node_ips::busy_ports(&l, &s.my_node_addresses(), &wanted),
                Err(e) => {
                    // Nothing new is served until the sockets can be read.
                    warn!(error = %e, "could not read this node's listening sockets");
                    self.ports_failed = true;
                    let checked = current.checked.intersection(&wanted).copied().collect();
                    let kept = node_ips::PortCheck {
                        checked,
                        busy: current.busy.clone(),
                    };
                    *s.busy_ports.lock().unwrap_or_else(|e| e.into_inner()) = kept;
                    return current.busy.iter().map(node_ips::format_port).collect();
                }
            }
        };
        let check = node_ips::PortCheck {
            checked: wanted,
            busy: busy.clone(),
        };
        if check != current {
            if check.busy != current.busy {
                let ports: Vec<String> = busy.iter().map(node_ips::format_port).collect();
                info!(
                    ?ports,
                    "ports of node-IP Services in use on this node: not served here"
                );
            }
            *s.busy_ports.lock().unwrap_or_else(|e| e.into_inner()) = check;
            s.dnat_wake.send_modify(|n| *n += 1);
        }
        busy.iter().map(node_ips::format_port).collect()
    }

    fn publish(&mut self, want: node_lease::Published) {
        if let Some(h) = &self.publishing {
            if !h.is_finished() {
                return;
            }
            if let Some(h) = self.publishing.take()
                && h.now_or_never().and_then(Result::ok) != Some(true)
            {
                self.published = None;
            }
        }
        if self.published.as_ref() == Some(&want) {
            return;
        }
        self.published = Some(want.clone());
        let s = self.shared.clone();
        self.publishing = Some(tokio::spawn(async move {
            let api: Api<Lease> = Api::namespaced(s.client.clone(), &s.config.namespace);
            let write = node_lease::publish(&api, &s.config.node_name, &want);
            match tokio::time::timeout(Duration::from_secs(5), write).await {
                Ok(Ok(())) => true,
                Ok(Err(e)) => {
                    warn!(error = %e, "could not publish this node's refused addresses and subnets");
                    false
                }
                Err(_) => {
                    warn!("publishing this node's refused addresses and subnets timed out");
                    false
                }
            }
        }));
    }

    /// Stops every holder (owners unbind and release) and waits for them, at most `within`.
    pub async fn stop_all(&mut self, why: Stop, within: Duration) {
        let tasks: Vec<Task> = self.tasks.drain().map(|(_, t)| t).collect();
        for t in &tasks {
            let _ = t.stop.send(Some(why));
        }
        let all = futures::future::join_all(tasks.into_iter().map(|t| t.handle));
        if tokio::time::timeout(within, all).await.is_err() {
            warn!("some VIPs did not withdraw in time");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_ranked_goes_at_once_and_later_ranks_are_staggered() {
        assert_eq!(rank_delay(0, true, false, false), Duration::ZERO);
        assert_eq!(rank_delay(2, true, false, false), RANK_STEP * 2);
        assert_eq!(rank_delay(1, false, false, false), INITIAL_RANK_STEP);
        assert_eq!(
            rank_delay(1, false, false, true),
            INITIAL_RANK_STEP + FAIR_SHARE_WAIT
        );
        assert_eq!(rank_delay(0, true, true, false), FAIR_SHARE_WAIT);
    }
}
