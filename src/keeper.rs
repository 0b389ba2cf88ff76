//! The node keeper task (LAN mode): every heartbeat interval — and at once when a peer falls
//! silent for dead-after or a peer's declarations change — it reads the peer table and the
//! node Leases, steps the [`NodeKeeper`](crate::ownership::node::NodeKeeper), renews this
//! node's Lease when due, refreshes the kernel gate, and works out which nodes a majority has
//! declared dead — what the coordinator hands the VIP holders.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use kube::api::Api;
use kube::runtime::reflector::ObjectRef;
use kube::{Resource, ResourceExt};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tracing::{error, info, warn};

use crate::context::Shared;
use crate::dataplane::addr::{AddrOps, KernelAddr, LifetimeRefresher};
use crate::dataplane::gate::{self, Netlink, Op};
use crate::dataplane::nft_watch;
use crate::node_lease::{self, NodeWriteError};
use crate::ownership::gate_health::{self, Change, GateHealth};
use crate::ownership::machine::HolderNode;
use crate::ownership::node::{NodeAction, NodeInput, NodeKeeper, NodeReply, NodeTiming};
use crate::ownership::quorum;
use crate::ownership::timing::{
    LAN_ADDRESS_LIFETIME, LAN_ADDRESS_LIFETIME_V6, LAN_ADDRESS_REFRESH, LAN_ADDRESS_REFRESH_V6,
};
use kube::runtime::events::EventType;

/// What the keeper tells the coordinator (and through it every VIP holder).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LanState {
    /// This node may take VIPs now.
    pub may_take: bool,
    /// Moves each time this node's generation was fenced: every holder withdraws.
    pub fenced_epoch: u64,
    /// The other nodes as liveness sees them.
    pub nodes: BTreeMap<String, HolderNode>,
    /// The nodes whose speakers we hear on the LAN now (candidates are only these and us).
    pub alive: BTreeSet<String>,
    /// Why this node's kernel gate cannot be shown to work (see
    /// [`crate::ownership::gate_health`]): it gives up its VIPs and takes none.
    pub gate_broken: Option<String>,
}

/// The kernel gate of this node: its table, the interfaces it covers, the VIPs in it.
///
/// Every write goes through one netlink socket, kept for the speaker's life: the table is
/// owned by that socket (see [`gate::TABLE_F_OWNER`]), so another socket could not change it.
pub struct Gate {
    netlink: Option<Netlink>,
    interfaces: Vec<String>,
    vips: BTreeSet<IpAddr>,
    /// The VIP addresses bound here (by interface index) whose lifetimes the keeper extends:
    /// marked by a holder after its bind, unmarked before its unbind, under this lock, so a
    /// refresh never puts back an address being removed.
    bound: BTreeMap<IpAddr, u32>,
    refresher: Option<LifetimeRefresher>,
    /// The flags the table is created with: owned and persistent, or none on kernels
    /// without them (older than 6.9; found out once, then logged).
    table_flags: u32,
}

impl Gate {
    pub fn new() -> Self {
        Gate {
            netlink: None,
            interfaces: Vec::new(),
            vips: BTreeSet::new(),
            bound: BTreeMap::new(),
            refresher: None,
            table_flags: gate::TABLE_F_OWNER | gate::TABLE_F_PERSIST,
        }
    }

    fn netlink(&mut self) -> std::io::Result<&mut Netlink> {
        if self.netlink.is_none() {
            self.netlink = Some(Netlink::open()?);
        }
        Ok(self.netlink.as_mut().expect("opened"))
    }

    /// One transaction of element operations. An error is the kernel refusing it; the
    /// socket (the table's owner) is kept.
    fn apply(&mut self, ops: &[Op]) -> std::io::Result<()> {
        self.netlink()?.apply(ops)
    }

    /// Replaces the table with one for `interfaces` with every VIP under it, in one
    /// transaction (the gate closed until the next refresh).
    fn install(&mut self, interfaces: &[String]) -> std::io::Result<()> {
        let vips: Vec<IpAddr> = self.vips.iter().copied().collect();
        let flags = self.table_flags;
        let r = self
            .netlink()?
            .transact(&gate::table_msgs(interfaces, &vips, flags));
        let r = match r {
            Err(e) if flags != 0 && e.raw_os_error() == Some(libc::EOPNOTSUPP) => {
                warn!(
                    "this kernel has no owned, persistent nftables tables (Linux 6.9 or later): the gate is an ordinary table, which `nft flush ruleset` removes (the speaker puts it back) and which a flush after the speaker died leaves open"
                );
                self.table_flags = 0;
                self.netlink()?
                    .transact(&gate::table_msgs(interfaces, &vips, 0))
            }
            r => r,
        };
        if r.is_ok() {
            self.interfaces = interfaces.to_vec();
        }
        r
    }

    /// Removes the table (ours, or one a dead speaker left).
    pub fn remove_table(&mut self) -> std::io::Result<()> {
        self.interfaces.clear();
        self.netlink()?.transact(&gate::remove_msgs())
    }

    /// A holder bound `ip` on interface `index`: its lifetime is extended from now on.
    pub fn bound(&mut self, index: u32, ip: IpAddr) {
        self.bound.insert(ip, index);
    }

    /// A holder is about to unbind `ip`: its lifetime is no longer extended.
    pub fn unbinding(&mut self, ip: IpAddr) {
        self.bound.remove(&ip);
    }

    /// Extends to its family's LAN lifetime ([`LAN_ADDRESS_LIFETIME`], and with `v6`
    /// [`LAN_ADDRESS_LIFETIME_V6`] for IPv6 too) the lifetime of every bound VIP address
    /// that `present` (a dump read just before) shows still there, on its interface and ours.
    /// A refresh is a replace, which would create a missing address: one removed by someone
    /// else is left to its holder, which binds it again gate first. What stays is the
    /// moment between the dump and this send. Returns how many it extended.
    fn extend_lifetimes(&mut self, present: &[KernelAddr], v6: bool) -> std::io::Result<usize> {
        let want: Vec<(u32, IpAddr)> = present
            .iter()
            .filter(|a| a.ours && self.bound.get(&a.ip) == Some(&a.index))
            .filter(|a| v6 || a.ip.is_ipv4())
            .map(|a| (a.index, a.ip))
            .collect();
        if want.is_empty() {
            return Ok(0);
        }
        if self.refresher.is_none() {
            self.refresher = Some(LifetimeRefresher::open()?);
        }
        let refresher = self.refresher.as_mut().expect("opened");
        let v4s: Vec<(u32, IpAddr)> = want
            .iter()
            .copied()
            .filter(|(_, ip)| ip.is_ipv4())
            .collect();
        let v6s: Vec<(u32, IpAddr)> = want
            .iter()
            .copied()
            .filter(|(_, ip)| ip.is_ipv6())
            .collect();
        let mut refused = refresher.refresh(&v4s, LAN_ADDRESS_LIFETIME)?;
        refused.extend(refresher.refresh(&v6s, LAN_ADDRESS_LIFETIME_V6)?);
        for (ip, e) in &refused {
            warn!(ip = %ip, error = %e, "cannot extend the VIP address's lifetime");
        }
        Ok(want.len() - refused.len())
    }

    /// Puts `ip` under the gate (before it is bound).
    pub fn add_vip(&mut self, ip: IpAddr) -> std::io::Result<()> {
        self.vips.insert(ip);
        let ops: Vec<Op> = gate::vip_keys(ip)
            .into_iter()
            .map(|(set, key)| Op::Add {
                set,
                key,
                timeout: None,
            })
            .collect();
        self.apply(&ops)
    }

    /// Takes `ip` out of the gate (after it is unbound).
    pub fn remove_vip(&mut self, ip: IpAddr) -> std::io::Result<()> {
        self.vips.remove(&ip);
        let ops: Vec<Op> = gate::vip_keys(ip)
            .into_iter()
            .map(|(set, key)| Op::Destroy { set, key })
            .collect();
        self.apply(&ops)
    }

    /// Whether the gate's table is in the kernel with exactly our VIPs under it.
    pub fn intact(&mut self) -> std::io::Result<bool> {
        let mut want: BTreeMap<&'static str, BTreeSet<Vec<u8>>> = BTreeMap::new();
        for set in [gate::VIPS4, gate::VIPS6, gate::TARGETS6] {
            want.insert(set, BTreeSet::new());
        }
        for ip in &self.vips {
            for (set, key) in gate::vip_keys(*ip) {
                want.entry(set).or_default().insert(key);
            }
        }
        let nl = self.netlink()?;
        for (set, keys) in want {
            match nl.set_keys(set)? {
                Some(have) if have.iter().cloned().collect::<BTreeSet<_>>() == keys => {}
                _ => return Ok(false),
            }
        }
        Ok(true)
    }

    /// Opens the gate until `until` at the latest (at most `max` from now), or closes it.
    /// Opening takes a ticket first, then reads the clock, then sends the refresh with the
    /// ticket: a refresh that would land more than [`gate::TICKET_LIFE`] after its clock
    /// (the speaker frozen in between) fails in the kernel and opens nothing.
    fn refresh(&mut self, until: Option<Instant>, max: Duration) -> std::io::Result<()> {
        if self.interfaces.is_empty() {
            return Ok(());
        }
        for attempt in 1..=2 {
            let Some(u) = until else { break };
            self.apply(&gate::ticket_ops())?;
            let left = u.saturating_duration_since(Instant::now());
            if left <= gate::TICKET_SLACK + Duration::from_millis(1) {
                break;
            }
            let timeout = (left - gate::TICKET_SLACK).min(max);
            match self.apply(&gate::ticketed_refresh_ops(&self.interfaces, timeout)) {
                // The ticket ran out: this refresh came late and opened nothing. Once more;
                // after that the gate keeps what the last timely refresh set.
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                    if attempt == 2 {
                        return Ok(());
                    }
                }
                r => return r,
            }
        }
        // Closing is always safe: no ticket.
        let ops: Vec<Op> = self
            .interfaces
            .iter()
            .map(|i| Op::Destroy {
                set: gate::LIVE,
                key: gate::ifname_key(i),
            })
            .collect();
        self.apply(&ops)
    }
}

impl Default for Gate {
    fn default() -> Self {
        Self::new()
    }
}

/// A node Lease as seen here: its state, its creation time, and when we saw it change last.
struct Member {
    lease: Lease,
    since: Instant,
}

/// Runs until `stop`.
pub async fn run(shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let s = shared;
    let me = s.config.node_name.clone();
    let hb = s.config.heartbeat();
    let timing = NodeTiming {
        renew_interval: s.config.renew_interval,
        renew_deadline: s.config.renew_deadline,
        dead_after: hb.dead_after,
    };
    let gate_max = quorum::t_ack(hb.dead_after);
    let api: Api<Lease> = Api::namespaced(s.client.clone(), &s.config.namespace);
    let mine = node_lease::name(&me);
    // The node Lease as it is now: a new process starts from it (and in a new generation).
    let mut last: Option<Lease> = loop {
        match tokio::time::timeout(Duration::from_secs(5), api.get_opt(&mine)).await {
            Ok(Ok(l)) => break l,
            Ok(Err(e)) => warn!(error = %e, "cannot read this node's Lease; retrying"),
            Err(_) => warn!("reading this node's Lease timed out; retrying"),
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = stop.changed() => return,
        }
    };
    let started = Instant::now();
    let mut keeper = NodeKeeper::new(timing, last.as_ref().map(node_lease::state), started);
    let (reply_tx, mut reply_rx) = mpsc::unbounded_channel();
    let mut members: HashMap<String, Member> = HashMap::new();
    let mut own_rv: Option<String> = None;
    let mut tick = tokio::time::interval(hb.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut dead_since: HashMap<String, (u32, Instant)> = HashMap::new();
    // When the next peer falls silent for dead-after: it is declared then, not at the tick.
    let mut next_silence: Option<Instant> = None;
    // The node Leases' names, as of the watched objects' change counter `scanned`.
    let mut node_leases: Vec<String> = Vec::new();
    let mut scanned: Option<u64> = None;
    // After a fence: the VIPs that were under the gate then. The gate stays closed until the
    // holders have unbound every one of them (taken it out of the gate): a new generation
    // must not reopen the gate for an address another node now owns.
    let mut withdrawing: BTreeSet<IpAddr> = BTreeSet::new();
    // The gate's health; a check of its table is due (someone else changed our tables, or
    // the periodic check).
    let mut health = GateHealth::default();
    let mut gate_failing = false;
    let mut gate_suspect = false;
    let mut next_check = Instant::now() + nft_watch::CHECK_EVERY;
    let mut nft = s.nft_changes.clone();
    let mut following = true;
    loop {
        let mut inputs = Vec::new();
        let silence = next_silence.map(|t| t + Duration::from_millis(1));
        tokio::select! {
            _ = tick.tick() => {}
            _ = s.liveness.news.notified() => {}
            _ = sleep_until_some(silence) => {}
            Some((req, reply, lease)) = reply_rx.recv() => {
                if let Some(l) = lease {
                    last = Some(l);
                }
                inputs.push(NodeInput::Reply { req, reply });
            }
            r = nft.changed(), if following => match r {
                Ok(()) => gate_suspect = true,
                Err(_) => following = false,
            },
            _ = stop.changed() => break,
        }
        let now = Instant::now();
        let at = now.into_std();
        // Members: the node Leases in the cache. All Leases are gone through only when the
        // watched objects changed (a node Lease appeared, went or changed more than its
        // renewal time); otherwise the known node Leases are looked up by name, so a tick
        // costs the same with a thousand VIP Leases as with none.
        let counter = *s.cluster.changed.borrow();
        let leases: Vec<Arc<Lease>> = if scanned != Some(counter) {
            scanned = Some(counter);
            let found: Vec<Arc<Lease>> = s
                .cluster
                .leases
                .state()
                .into_iter()
                .filter(|l| {
                    l.metadata
                        .name
                        .as_deref()
                        .is_some_and(|n| n.starts_with(node_lease::PREFIX))
                })
                .collect();
            node_leases = found.iter().map(|l| l.name_any()).collect();
            found
        } else {
            node_leases
                .iter()
                .filter_map(|n| {
                    s.cluster
                        .leases
                        .get(&ObjectRef::new(n).within(&s.config.namespace))
                })
                .collect()
        };
        let mut present = BTreeSet::new();
        for l in leases {
            let name = l.name_any();
            let Some(node) = name.strip_prefix(node_lease::PREFIX) else {
                continue;
            };
            if node != me && !node_lease::is_member(&l) {
                continue;
            }
            present.insert(node.to_string());
            let rv = l.resource_version();
            match members.get_mut(node) {
                Some(m) if m.lease.resource_version() == rv => {}
                Some(m) => {
                    m.lease = (*l).clone();
                    m.since = now;
                }
                None => {
                    members.insert(
                        node.to_string(),
                        Member {
                            lease: (*l).clone(),
                            since: now,
                        },
                    );
                }
            }
        }
        members.retain(|n, _| present.contains(n));
        if let Some(m) = members.get(&me)
            && own_rv.as_deref() != m.lease.resource_version().as_deref()
        {
            own_rv = m.lease.resource_version();
            inputs.push(NodeInput::Observed(node_lease::state(&m.lease)));
        }
        let mut names: Vec<String> = members.keys().cloned().collect();
        if !names.contains(&me) {
            names.push(me.clone());
        }
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        let (acked, declared_dead, hearing) = {
            let mut peers = s.liveness.peers.lock().unwrap_or_else(|e| e.into_inner());
            let gens: Vec<(&str, u32)> = members
                .iter()
                .map(|(n, m)| (n.as_str(), node_lease::state(&m.lease).generation))
                .collect();
            let before = peers.dead_list();
            peers.declare_silent_members(&gens, now >= started + hb.dead_after, at);
            let after = peers.dead_list();
            if after != before {
                s.liveness.send_now.notify_one();
                let new = after.iter().filter(|d| !before.contains(d)).count();
                s.metrics.declared_dead(new);
            }
            next_silence = peers.next_silence(at).map(Instant::from_std);
            let acked: Vec<Instant> = peers
                .acked_times(&refs, at)
                .into_iter()
                .map(Instant::from_std)
                .collect();
            let hearing = refs
                .iter()
                .filter(|n| **n != me && peers.is_alive(n, at))
                .count();
            (acked, peers.declared_us(at), hearing)
        };
        inputs.push(NodeInput::Lan {
            members: names.len(),
            acked,
            declared_dead,
            hearing,
        });
        let mut fenced = false;
        for input in inputs {
            let (actions, _) = keeper.step(input, Instant::now());
            for a in actions {
                match a {
                    NodeAction::Write {
                        req,
                        generation,
                        api_path,
                        deadline,
                        ..
                    } => {
                        let (api, me, base, tx) =
                            (api.clone(), me.clone(), last.clone(), reply_tx.clone());
                        tokio::spawn(async move {
                            let r = tokio::time::timeout_at(
                                deadline,
                                node_lease::renew(&api, &me, base.as_ref(), generation, api_path),
                            )
                            .await;
                            let (reply, lease) = match r {
                                Ok(Ok(l)) => (
                                    NodeReply::Written {
                                        resource_version: l.resource_version().unwrap_or_default(),
                                    },
                                    Some(l),
                                ),
                                Ok(Err(NodeWriteError::Changed(now))) => (
                                    NodeReply::Changed(now.as_deref().map(node_lease::state)),
                                    now.map(|b| *b),
                                ),
                                Ok(Err(NodeWriteError::Api(e))) => {
                                    (NodeReply::Failed(e.to_string()), None)
                                }
                                Err(_) => (NodeReply::Failed("timed out".into()), None),
                            };
                            let _ = tx.send((req, reply, lease));
                        });
                    }
                    NodeAction::DropAll { fenced: g } => {
                        warn!(
                            generation = g,
                            "a majority declared this node dead and fenced it: withdrawing every VIP"
                        );
                        s.metrics.fenced();
                        fenced = true;
                        withdrawing = s
                            .gate
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .vips
                            .clone();
                    }
                    NodeAction::Generation(g) => {
                        info!(generation = g, "now in a new generation");
                        s.liveness
                            .peers
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .set_generation(g);
                    }
                }
            }
        }
        // The gate: installed for the interfaces, put back when someone else removed or
        // changed it (checked on their nftables changes and every CHECK_EVERY), then the
        // refresh, computed and sent right here with no queue in between.
        let until = {
            let g = s.gate.lock().unwrap_or_else(|e| e.into_inner());
            withdrawing.retain(|ip| g.vips.contains(ip));
            if withdrawing.is_empty() {
                keeper.open_until(Instant::now())
            } else {
                None
            }
        };
        let check = std::mem::take(&mut gate_suspect) || Instant::now() >= next_check;
        if check {
            next_check = Instant::now() + nft_watch::CHECK_EVERY;
        }
        let outcome = tend_gate(&s, check, until, gate_max).await;
        if let Err(e) = &outcome {
            if !gate_failing {
                error!(error = %e, "the gate does not work: retrying every heartbeat");
            }
            gate_failing = true;
        } else {
            gate_failing = false;
        }
        match health.observe(outcome, Instant::now()) {
            Some(Change::Broken(why)) => {
                error!(
                    error = %why,
                    "the gate has not worked for {} ms: giving up every VIP and taking none until it does",
                    gate_health::REPAIR_BOUND.as_millis()
                );
                s.metrics.set_gate_healthy(false);
                node_event(
                    &s,
                    EventType::Warning,
                    "GateBroken",
                    format!(
                        "{me} cannot install or refresh its kernel gate (table netdev {}): it gives up its VIPs and takes none until the gate works: {why}",
                        gate::TABLE
                    ),
                );
            }
            Some(Change::Restored) => {
                info!("the gate works again: taking VIPs again");
                s.metrics.set_gate_healthy(true);
                node_event(
                    &s,
                    EventType::Normal,
                    "GateRestored",
                    format!("{me}'s kernel gate works again: it takes VIPs again"),
                );
            }
            None => {}
        }
        // Who a majority has declared dead (counting only settled members).
        let settled: Vec<&str> = refs
            .iter()
            .copied()
            .filter(|n| {
                members.get(*n).is_some_and(|m| {
                    m.lease
                        .metadata
                        .creation_timestamp
                        .as_ref()
                        .is_none_or(|c| {
                            let age = k8s_openapi::jiff::Timestamp::now().duration_since(c.0);
                            age.as_secs() >= quorum::MEMBER_SETTLE.as_secs() as i64
                        })
                })
            })
            .collect();
        let stale_after = s.config.renew_interval * quorum::STALE_RENEWALS;
        let mut nodes = BTreeMap::new();
        let alive: BTreeSet<String>;
        {
            let peers = s.liveness.peers.lock().unwrap_or_else(|e| e.into_inner());
            alive = peers.alive(at).into_iter().map(str::to_string).collect();
            for (n, m) in &members {
                if *n == me {
                    continue;
                }
                let st = node_lease::state(&m.lease);
                let d = peers.declarers(n, st.generation, &settled, at);
                let dead = settled.contains(&me.as_str())
                    && quorum::dead_by_majority(names.len(), d)
                    && (hearing > 0 || now >= m.since + stale_after);
                let since = match (dead, dead_since.get(n)) {
                    (true, Some((g, t))) if *g == st.generation => Some(*t),
                    (true, _) => Some(now),
                    (false, _) => None,
                };
                let was = match since {
                    Some(t) => dead_since.insert(n.clone(), (st.generation, t)),
                    None => dead_since.remove(n),
                };
                match (was, since) {
                    (None, Some(_)) => {
                        info!(node = %n, generation = st.generation, declarers = d, "a majority declares this node dead")
                    }
                    (Some((g, _)), None) => {
                        info!(node = %n, generation = st.generation, was = g, "this node counts as alive again")
                    }
                    _ => {}
                }
                nodes.insert(
                    n.clone(),
                    HolderNode {
                        generation: st.generation,
                        fenced: st.fenced.is_some_and(|f| f >= st.generation),
                        dead_since: since,
                    },
                );
            }
        }
        let state = LanState {
            // Not while addresses of a fenced generation are still bound (their unbind is
            // being retried): the gate stays closed until they are gone, so VIPs taken
            // meanwhile could not be answered for.
            may_take: keeper.may_take(Instant::now()) && withdrawing.is_empty(),
            fenced_epoch: s.lan_state.borrow().fenced_epoch + u64::from(fenced),
            nodes,
            alive,
            gate_broken: health.broken().map(str::to_string),
        };
        s.lan_state.send_if_modified(|cur| {
            if *cur == state {
                false
            } else {
                *cur = state;
                true
            }
        });
    }
    let mut g = s.gate.lock().unwrap_or_else(|e| e.into_inner());
    let _ = g.refresh(None, gate_max);
}

/// Installs the gate when its interfaces changed, puts it back when `check` finds it gone or
/// changed (or a refresh finds it gone), and refreshes it: Ok when the gate works now.
async fn tend_gate(
    s: &Shared,
    check: bool,
    until: Option<Instant>,
    gate_max: Duration,
) -> Result<(), String> {
    let want: Vec<String> = s.owned_interfaces().into_iter().map(|i| i.name).collect();
    let have = s
        .gate
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .interfaces
        .clone();
    let t0 = Instant::now();
    let mut install = want != have;
    if !install && check && !want.is_empty() {
        let intact = s.gate.lock().unwrap_or_else(|e| e.into_inner()).intact();
        match intact {
            Ok(true) => {}
            Ok(false) => {
                warn!("the gate table is gone or changed: putting it back");
                install = true;
            }
            Err(e) => {
                warn!(error = %e, "cannot read the gate table: putting it back");
                install = true;
            }
        }
    }
    let repair = install && want == have;
    if install {
        install_gate(s, &want).await?;
    }
    let refreshed = s
        .gate
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .refresh(until, gate_max);
    let refreshed = match refreshed {
        // The table or one of its sets is gone (someone else's flush): put it back whole.
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) && !install => {
            warn!("the gate table is gone: putting it back");
            install_gate(s, &want).await?;
            s.metrics.kernel_repaired("gate");
            info!(
                took_ms = t0.elapsed().as_millis() as u64,
                "the gate table is back"
            );
            s.gate
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .refresh(until, gate_max)
        }
        r => {
            if repair {
                s.metrics.kernel_repaired("gate");
                info!(
                    took_ms = t0.elapsed().as_millis() as u64,
                    "the gate table is back"
                );
            }
            r
        }
    };
    refreshed.map_err(|e| format!("refreshing the gate: {e}"))
}

/// Replaces the gate's table for `interfaces` with every VIP under it, in one transaction.
/// The gate is locked throughout, so no holder adds or removes a VIP meanwhile.
async fn install_gate(s: &Shared, interfaces: &[String]) -> Result<(), String> {
    s.gate
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .install(interfaces)
        .map_err(|e| format!("installing the gate table: {e}"))
}

/// An Event on this node's Node object.
fn node_event(s: &Shared, type_: EventType, reason: &str, note: String) {
    let node = s
        .cluster
        .nodes
        .state()
        .into_iter()
        .find(|n| n.name_any() == s.config.node_name);
    if let Some(n) = node {
        s.events
            .post(n.object_ref(&()), type_, reason, note, "Gate");
    }
}

/// Sleeps until `t`, or forever when there is none.
async fn sleep_until_some(t: Option<Instant>) {
    match t {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

/// Shared handle to the gate.
pub type SharedGate = Mutex<Gate>;

/// Extends LAN-mode VIP address lifetimes every [`LAN_ADDRESS_REFRESH`] until `stop`: a
/// task of its own, so a slow address dump never delays a heartbeat or a gate refresh.
pub async fn extend_address_lifetimes(s: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(LAN_ADDRESS_REFRESH);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing = false;
    // IPv6 addresses every LAN_ADDRESS_REFRESH_V6, on every so many ticks.
    let every_v6 = (LAN_ADDRESS_REFRESH_V6.as_millis() / LAN_ADDRESS_REFRESH.as_millis()).max(1);
    let mut ticks: u128 = 0;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => return,
        }
        let v6 = ticks.is_multiple_of(every_v6);
        ticks += 1;
        let outcome = match s.dataplane.addrs.addresses().await {
            Ok(present) => s
                .gate
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .extend_lifetimes(&present, v6)
                .map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        // One line per change of state, not one per second.
        match outcome {
            Err(e) if !failing => {
                error!(error = %e, "cannot extend the VIP addresses' lifetimes: they expire within {} s (IPv6: {} s) unless this recovers", LAN_ADDRESS_LIFETIME.as_secs(), LAN_ADDRESS_LIFETIME_V6.as_secs());
                failing = true;
            }
            Ok(_) if failing => {
                info!("extending the VIP addresses' lifetimes again");
                failing = false;
            }
            _ => {}
        }
    }
}

/// Removes the gate's table (at start, before anything is bound; and at the end).
pub fn remove_table(s: &Shared) {
    let r = s
        .gate
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .remove_table();
    if let Err(e) = r {
        warn!(error = %e, "could not remove the gate table");
    }
}
