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
use crate::dataplane::addr::Netlink;
use crate::dataplane::nft::{Dnat, Nft};
use crate::dataplane::sink::Pnet;
use crate::events::Events;
use crate::lease::Leases;
use crate::metrics::Metrics;
use crate::plan;
use crate::service::ServiceInfo;

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
    /// VIPs whose DNAT should be in place here, with their Service key.
    pub(crate) owned: Mutex<BTreeMap<IpAddr, String>>,
    /// Moves when `owned` changes: the DNAT task wakes up.
    pub(crate) dnat_wake: watch::Sender<u64>,
}

impl Shared {
    pub fn own(&self, ip: IpAddr, service: &str) {
        let mut o = self.owned.lock().unwrap_or_else(|e| e.into_inner());
        o.insert(ip, service.to_string());
        self.metrics.set_owned(o.len());
        self.dnat_wake.send_modify(|n| *n += 1);
    }

    pub fn disown(&self, ip: IpAddr) {
        let mut o = self.owned.lock().unwrap_or_else(|e| e.into_inner());
        o.remove(&ip);
        self.metrics.set_owned(o.len());
        self.dnat_wake.send_modify(|n| *n += 1);
    }

    pub fn services(&self) -> Vec<ServiceInfo> {
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
}
