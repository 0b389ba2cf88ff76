//! The speaker's view of the cluster: one reflector per kind, and a counter that moves on
//! every change so the loops that depend on them wake up.

use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, Resource};
use tokio::sync::watch;

use crate::lease::{LABEL_MANAGED_BY, MANAGED_BY};
use crate::pool::IPPool;

#[derive(Clone)]
pub struct Cluster {
    pub services: Store<Service>,
    pub slices: Store<EndpointSlice>,
    pub nodes: Store<Node>,
    pub pools: Store<IPPool>,
    pub leases: Store<Lease>,
    /// Moves on every change of any of the above.
    pub changed: watch::Receiver<u64>,
}

fn reflect<K>(api: Api<K>, config: watcher::Config, bump: watch::Sender<u64>) -> Store<K>
where
    K: Resource + Clone + std::fmt::Debug + serde::de::DeserializeOwned + Send + Sync + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone,
{
    let (reader, writer) = reflector::store();
    let kind = K::kind(&K::DynamicType::default()).to_string();
    tokio::spawn(async move {
        let mut events = watcher(api, config)
            .default_backoff()
            .reflect(writer)
            .boxed();
        while let Some(ev) = events.next().await {
            match ev {
                Ok(_) => bump.send_modify(|n| *n += 1),
                Err(e) => tracing::warn!(kind = %kind, error = %e, "watch failed; retrying"),
            }
        }
    });
    reader
}

impl Cluster {
    /// Starts the reflectors (they run until the process ends).
    pub fn start(client: &Client, namespace: &str) -> Cluster {
        let (bump, changed) = watch::channel(0);
        let all = watcher::Config::default();
        Cluster {
            services: reflect(
                Api::<Service>::all(client.clone()),
                all.clone(),
                bump.clone(),
            ),
            slices: reflect(
                Api::<EndpointSlice>::all(client.clone()),
                all.clone(),
                bump.clone(),
            ),
            nodes: reflect(Api::<Node>::all(client.clone()), all.clone(), bump.clone()),
            pools: reflect(Api::<IPPool>::all(client.clone()), all, bump.clone()),
            leases: reflect(
                Api::<Lease>::namespaced(client.clone(), namespace),
                watcher::Config::default().labels(&format!("{LABEL_MANAGED_BY}={MANAGED_BY}")),
                bump,
            ),
            changed,
        }
    }

    /// Waits until every reflector has listed once.
    pub async fn ready(&self) {
        let _ = futures::join!(
            self.services.wait_until_ready(),
            self.slices.wait_until_ready(),
            self.nodes.wait_until_ready(),
            self.pools.wait_until_ready(),
            self.leases.wait_until_ready(),
        );
    }
}
