//! What every loop of the speaker shares: configuration, the API client and caches, the
//! Lease writer, the dataplane, metrics, Events, and the set of VIPs whose DNAT should be in
//! place. It depends on no loop, so none of them import each other through it.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Mutex;

use kube::Client;
use tokio::sync::watch;
use tracing::error;

use crate::cluster::Cluster;
use crate::config::Config;
use crate::dataplane::Dataplane;
use crate::dataplane::addr::{Interface, Netlink};
use crate::dataplane::nft::{Dnat, Nft};
use crate::dataplane::sink::Pnet;
use crate::events::Events;
use crate::lease::Leases;
use crate::metrics::Metrics;
use crate::plan;
use crate::service::ServiceInfo;

/// The LAN as the claims watcher sees it: where to listen, which addresses matter (the
/// pools), which MACs are speakers', and the pool addresses other hosts were seen claiming.
#[derive(Default)]
pub struct LanView {
    pub pools: Vec<crate::pool::Range>,
    pub speaker_macs: std::collections::HashSet<crate::dataplane::packet::Mac>,
    pub watch: Vec<Interface>,
    pub foreign: std::collections::HashMap<IpAddr, (String, std::time::Instant)>,
}

/// How long a claim by another host keeps a pool address from being taken here.
pub const FOREIGN_CLAIM_TTL: std::time::Duration = std::time::Duration::from_secs(30);

pub struct Shared {
    pub config: Config,
    pub client: Client,
    pub cluster: Cluster,
    pub leases: Leases,
    pub dataplane: Dataplane<Netlink, Nft, Pnet>,
    pub metrics: std::sync::Arc<Metrics>,
    pub events: Events,
    /// The API server's address, when the kubeconfig names it by IP: never bound.
    pub api_server: Option<IpAddr>,
    /// Who is alive on the LAN (heartbeats).
    pub liveness: std::sync::Arc<crate::liveness::Lan>,
    /// LAN mode: the writer of VIP Leases (marked, not renewed), the kernel gate, and what
    /// the node keeper says.
    pub vip_leases: Leases,
    pub gate: crate::keeper::SharedGate,
    pub lan_state: watch::Sender<crate::keeper::LanState>,
    /// VIPs whose DNAT should be in place here, with their Service key.
    pub(crate) owned: Mutex<BTreeMap<IpAddr, (String, Interface)>>,
    /// Moves when `owned` changes: the DNAT task wakes up.
    pub(crate) dnat_wake: watch::Sender<u64>,
    /// The last `dnat_wake` generation the DNAT task has applied (or tried to).
    pub(crate) dnat_done: watch::Sender<u64>,
    /// What the claims watcher needs to know and what it has seen.
    pub(crate) lan: Mutex<LanView>,
    /// Moves when someone else changed one of our nftables tables (see
    /// [`crate::dataplane::nft_watch`]); never moves when the notifications cannot be followed
    /// (the periodic check still runs).
    pub nft_changes: watch::Receiver<u64>,
    /// Ports of node-IP Services checked against this node's listening sockets, and those
    /// in use: only ports checked and free are DNATed here.
    pub(crate) busy_ports: Mutex<crate::node_ips::PortCheck>,
}

impl Shared {
    /// Marks `ip` as owned here; returns the DNAT generation that will include it (see
    /// [`Shared::dnat_applied`]).
    pub fn own(&self, ip: IpAddr, service: &str, iface: &Interface) -> u64 {
        let mut o = self.owned.lock().unwrap_or_else(|e| e.into_inner());
        o.insert(ip, (service.to_string(), iface.clone()));
        self.metrics.set_owned(o.len());
        self.dnat_wake.send_modify(|n| *n += 1);
        *self.dnat_wake.borrow()
    }

    /// Waits until the DNAT task has applied generation `generation` (bounded by `until`):
    /// an owner announces only once its rules are in place, so the first client it attracts
    /// is not refused.
    pub async fn dnat_applied(&self, generation: u64, until: tokio::time::Instant) {
        let mut done = self.dnat_done.subscribe();
        let _ = tokio::time::timeout_at(until, done.wait_for(|g| *g >= generation)).await;
    }

    /// Records that `mac`, no speaker's, claimed pool address `ip` (seen on the LAN).
    pub fn note_claim(&self, ip: IpAddr, mac: crate::dataplane::packet::Mac) {
        let mut lan = self.lan.lock().unwrap_or_else(|e| e.into_inner());
        // Every claim on a pool address is kept; whether the MAC is a speaker's is decided
        // when it is read (a new owner's announcement can come before its Lease is seen).
        let in_pool = lan.pools.iter().any(|r| r.contains(ip));
        if in_pool {
            let mac = crate::dataplane::packet::format_mac(&mac);
            lan.foreign.insert(ip, (mac, std::time::Instant::now()));
        }
    }

    /// A recent claim on `ip` by a MAC that is no speaker's: the MAC and how long ago.
    pub fn foreign_claim(&self, ip: IpAddr) -> Option<(String, std::time::Duration)> {
        let lan = self.lan.lock().unwrap_or_else(|e| e.into_inner());
        lan.foreign
            .get(&ip)
            .filter(|(m, _)| {
                crate::dataplane::packet::parse_mac(m)
                    .is_none_or(|m| !lan.speaker_macs.contains(&m))
            })
            .map(|(m, t)| (m.clone(), t.elapsed()))
            .filter(|(_, ago)| *ago < FOREIGN_CLAIM_TTL)
    }

    /// Every pool address another host claimed within [`FOREIGN_CLAIM_TTL`], with its MAC.
    pub fn fresh_foreign_claims(&self) -> Vec<(IpAddr, String)> {
        let lan = self.lan.lock().unwrap_or_else(|e| e.into_inner());
        let mut v: Vec<(IpAddr, String)> = lan
            .foreign
            .iter()
            .filter(|(_, (_, t))| t.elapsed() < FOREIGN_CLAIM_TTL)
            .map(|(ip, (m, _))| (*ip, m.clone()))
            .collect();
        v.sort();
        v
    }

    /// The VIP bound here now on `index`, with its Service, if any.
    pub fn owner_of(&self, ip: IpAddr) -> Option<(String, Interface)> {
        self.owned
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&ip)
            .cloned()
    }

    /// The interfaces to watch: where VIPs are bound now, and where pool addresses live.
    pub fn owned_interfaces(&self) -> Vec<Interface> {
        let mut out: Vec<Interface> = self
            .lan
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .watch
            .clone();
        for (_, i) in self
            .owned
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
        {
            if !out.iter().any(|x| x.index == i.index) {
                out.push(i.clone());
            }
        }
        out
    }

    pub fn disown(&self, ip: IpAddr) {
        let mut o = self.owned.lock().unwrap_or_else(|e| e.into_inner());
        o.remove(&ip);
        self.metrics.set_owned(o.len());
        self.dnat_wake.send_modify(|n| *n += 1);
    }

    /// Whether a Service of ours is in node-IP mode (see [`crate::node_ips::mode`]).
    pub fn node_ip_mode(
        &self,
        svc: &ServiceInfo,
        ctx: &crate::node_ips::Context,
    ) -> Option<crate::service::NodeIps> {
        if !svc.is_ours(
            &self.config.load_balancer_class,
            self.config.claim_unclassed,
        ) {
            return None;
        }
        crate::node_ips::mode(svc, ctx)
    }

    pub fn on_nodes(&self, svc: &ServiceInfo, ctx: &crate::node_ips::Context) -> bool {
        self.node_ip_mode(svc, ctx).is_some()
    }

    /// What node-IP mode depends on, from the caches now.
    pub fn node_ip_context(&self) -> crate::node_ips::Context {
        crate::node_ips::Context {
            no_pools: self.cluster.pools.state().is_empty(),
            node_addresses: crate::node_ips::all_node_addresses(
                self.cluster.nodes.state().iter().map(|n| n.as_ref()),
            ),
            default: self.config.node_ips.mode(),
        }
    }

    /// This node's own addresses (every address its Node lists).
    pub fn my_node_addresses(&self) -> Vec<IpAddr> {
        let me = &self.config.node_name;
        self.cluster
            .nodes
            .state()
            .iter()
            .filter(|n| n.metadata.name.as_deref() == Some(me.as_str()))
            .flat_map(|n| crate::node_ips::all_node_addresses([n.as_ref()]))
            .collect()
    }

    /// The nodes whose speakers are alive as far as this one can tell: itself, and in LAN
    /// mode every member a majority has not declared dead (and every node heard now); in
    /// lease mode, the nodes heard on the LAN now.
    pub fn live_nodes(&self) -> std::collections::BTreeSet<String> {
        let mut live = std::collections::BTreeSet::from([self.config.node_name.clone()]);
        if self.config.liveness == crate::config::Liveness::Lan {
            let lan = self.lan_state.borrow();
            live.extend(
                lan.nodes
                    .iter()
                    .filter(|(_, n)| n.dead_since.is_none())
                    .map(|(name, _)| name.clone()),
            );
            live.extend(lan.alive.iter().cloned());
        } else {
            let peers = self
                .liveness
                .peers
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            live.extend(
                peers
                    .alive(std::time::Instant::now())
                    .into_iter()
                    .map(str::to_string),
            );
        }
        live
    }

    pub fn services(&self) -> Vec<ServiceInfo> {
        self.cluster
            .services
            .state()
            .iter()
            .map(|s| ServiceInfo::from_service(s))
            .collect()
    }

    /// Programs DNAT for the VIPs owned now and for this node's addresses in node-IP mode,
    /// from the current Services and EndpointSlices. False when nft refused or failed (the
    /// caller tries again).
    pub async fn sync_dnat(&self) -> bool {
        let owned: BTreeMap<IpAddr, String> = self
            .owned
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(ip, (svc, _))| (*ip, svc.clone()))
            .collect();
        let services = self.services();
        let slices = self.cluster.slices.state();
        let by_service = plan::slices_by_service(&slices);
        // Nodes a majority declared dead on the LAN (LAN mode): their endpoints leave now.
        let gone: std::collections::BTreeSet<String> = self
            .lan_state
            .borrow()
            .nodes
            .iter()
            .filter(|(_, n)| n.dead_since.is_some())
            .map(|(name, _)| name.clone())
            .collect();
        // Each owned VIP's Services: all that share it now (the one its holder took it for
        // may have gone since, leaving the IP to the others).
        let pools = crate::pool::Pools::from_objects(&self.cluster.pools.state());
        let ctx = self.node_ip_context();
        let ours: Vec<ServiceInfo> = services
            .iter()
            .filter(|s| {
                s.is_ours(
                    &self.config.load_balancer_class,
                    self.config.claim_unclassed,
                )
            })
            .filter(|s| !self.on_nodes(s, &ctx))
            .cloned()
            .collect();
        let vips = plan::vips(&ours, &pools);
        let mut entries: Vec<Dnat> = Vec::new();
        for (ip, key) in &owned {
            let sharing: Vec<&ServiceInfo> = match vips.get(ip) {
                Some((on, _)) => on.clone(),
                None => services.iter().filter(|s| &s.key == key).collect(),
            };
            for svc in sharing {
                let mine = plan::slices_of(svc, &by_service);
                entries.push(Dnat {
                    vip: *ip,
                    ports: plan::port_maps(*ip, svc, &mine, &self.config.node_name, &gone),
                    sources: svc.source_ranges.clone(),
                    affinity: svc.affinity,
                });
            }
        }
        // Node-IP mode: where a Service's status lists this node, every address of the node
        // (of the Service's families: a 1:1 NAT delivers traffic for the ExternalIP to the
        // InternalIP), on the ports checked free here.
        let mine = self.my_node_addresses();
        let ports = self
            .busy_ports
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        for svc in services.iter().filter(|s| self.on_nodes(s, &ctx)) {
            if !svc.assigned.iter().any(|ip| mine.contains(ip)) {
                continue;
            }
            let slices = plan::slices_of(svc, &by_service);
            let wanted = mine.iter().filter(|ip| {
                if ip.is_ipv4() {
                    svc.want_v4
                } else {
                    svc.want_v6
                }
            });
            for ip in wanted {
                let mut maps = plan::port_maps(*ip, svc, &slices, &self.config.node_name, &gone);
                maps.retain(|p| ports.free(&(p.protocol, p.port)));
                entries.push(Dnat {
                    vip: *ip,
                    ports: maps,
                    sources: svc.source_ranges.clone(),
                    affinity: svc.affinity,
                });
            }
        }
        match self.dataplane.program(&entries).await {
            Ok(()) => true,
            Err(e) => {
                self.metrics.dataplane_error(&e);
                error!(error = %e, "could not program DNAT");
                false
            }
        }
    }
}
