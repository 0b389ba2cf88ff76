//! The speaker's view of the cluster: one reflector per kind, and a counter that moves on
//! every change so the loops that depend on them wake up.

use std::collections::HashMap;
use std::sync::Arc;

use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, Resource};
use tokio::sync::watch;

use crate::lease::{LABEL_MANAGED_BY, MANAGED_BY};
use crate::metrics::Metrics;
use crate::pool::IPPool;

#[derive(Clone)]
pub struct Cluster {
    pub services: Store<Service>,
    pub slices: Store<EndpointSlice>,
    pub nodes: Store<Node>,
    pub pools: Store<IPPool>,
    pub leases: Store<Lease>,
    /// Moves on every change of any of the above (except node Lease renewals).
    pub changed: watch::Receiver<u64>,
}

/// What of an object the loops act on, when that is less than the whole object: a change
/// that leaves it alone does not wake them. None: every change counts.
type Digest<K> = fn(&K) -> Option<u64>;

fn reflect<K>(
    api: Api<K>,
    config: watcher::Config,
    bump: watch::Sender<u64>,
    digest: Digest<K>,
    trim: fn(&mut K),
    metrics: Arc<Metrics>,
) -> Store<K>
where
    K: Resource + Clone + std::fmt::Debug + serde::de::DeserializeOwned + Send + Sync + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone,
{
    let (reader, writer) = reflector::store();
    let kind = K::kind(&K::DynamicType::default()).to_string();
    tokio::spawn(async move {
        let mut events = watcher(api, config)
            .default_backoff()
            .modify(trim)
            .reflect(writer)
            .boxed();
        let mut seen: HashMap<String, u64> = HashMap::new();
        while let Some(ev) = events.next().await {
            if let Ok(
                watcher::Event::Apply(_) | watcher::Event::Delete(_) | watcher::Event::InitApply(_),
            ) = &ev
            {
                metrics.watch_event(&kind);
            }
            match ev {
                Ok(watcher::Event::Apply(o)) => {
                    let name = o.meta().name.clone().unwrap_or_default();
                    if let Some(d) = digest(&o)
                        && seen.insert(name, d) == Some(d)
                    {
                        continue;
                    }
                    bump.send_modify(|n| *n += 1)
                }
                Ok(watcher::Event::Delete(o)) => {
                    seen.remove(o.meta().name.as_deref().unwrap_or_default());
                    bump.send_modify(|n| *n += 1)
                }
                Ok(_) => bump.send_modify(|n| *n += 1),
                Err(e) => tracing::warn!(kind = %kind, error = %e, "watch failed; retrying"),
            }
        }
    });
    reader
}

/// Drops what no loop reads before an object enters the cache: the field managers' records
/// (often larger than the object) and the copy `kubectl apply` keeps in an annotation.
fn trim<K: Resource>(o: &mut K) {
    o.meta_mut().managed_fields = None;
    if let Some(a) = o.meta_mut().annotations.as_mut() {
        a.remove("kubectl.kubernetes.io/last-applied-configuration");
    }
}

/// [`trim`], and a Node's list of container images (it can run to hundreds of entries).
fn trim_node(n: &mut Node) {
    trim(n);
    if let Some(status) = n.status.as_mut() {
        status.images = None;
    }
}

fn every_change<K>(_: &K) -> Option<u64> {
    None
}

/// A node Lease or the allocator's Lease without its renewal time: their renewals (every
/// node and the allocator, every renew interval) wake no loop — the node keeper and the
/// allocation loop read them on their own clocks, at least every renew interval (a renewal
/// seen late only makes a standby's expiry later). Every VIP Lease, and every other change of
/// these (holder, generation, fence, refused addresses), counts.
fn lease_digest(l: &Lease) -> Option<u64> {
    use std::hash::{Hash, Hasher};
    if !l.metadata.name.as_deref().is_some_and(|n| {
        n.starts_with(crate::node_lease::PREFIX) || n == crate::lease::ALLOCATOR_LEASE
    }) {
        return None;
    }
    let mut spec = l.spec.clone().unwrap_or_default();
    spec.renew_time = None;
    let mut h = std::collections::hash_map::DefaultHasher::new();
    serde_json::to_string(&spec).ok()?.hash(&mut h);
    l.metadata.annotations.hash(&mut h);
    l.metadata.labels.hash(&mut h);
    Some(h.finish())
}

impl Cluster {
    /// Starts the reflectors (they run until the process ends).
    pub fn start(client: &Client, namespace: &str, metrics: &Arc<Metrics>) -> Cluster {
        let (bump, changed) = watch::channel(0);
        let all = watcher::Config::default();
        Cluster {
            services: reflect(
                Api::<Service>::all(client.clone()),
                all.clone(),
                bump.clone(),
                every_change,
                trim,
                metrics.clone(),
            ),
            slices: reflect(
                Api::<EndpointSlice>::all(client.clone()),
                all.clone(),
                bump.clone(),
                every_change,
                trim,
                metrics.clone(),
            ),
            nodes: reflect(
                Api::<Node>::all(client.clone()),
                all.clone(),
                bump.clone(),
                every_change,
                trim_node,
                metrics.clone(),
            ),
            pools: reflect(
                Api::<IPPool>::all(client.clone()),
                all,
                bump.clone(),
                every_change,
                trim,
                metrics.clone(),
            ),
            leases: reflect(
                Api::<Lease>::namespaced(client.clone(), namespace),
                watcher::Config::default().labels(&format!("{LABEL_MANAGED_BY}={MANAGED_BY}")),
                bump,
                lease_digest,
                trim,
                metrics.clone(),
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

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{ContainerImage, NodeStatus};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ManagedFieldsEntry;

    #[test]
    fn the_cache_keeps_what_the_loops_read_and_drops_the_rest() {
        let mut n = Node::default();
        n.metadata.name = Some("a".into());
        n.metadata.managed_fields = Some(vec![ManagedFieldsEntry::default()]);
        n.metadata.labels = Some([("zone".to_string(), "x".to_string())].into());
        n.status = Some(NodeStatus {
            images: Some(vec![ContainerImage::default(); 3]),
            ..Default::default()
        });
        trim_node(&mut n);
        assert_eq!(n.metadata.managed_fields, None);
        assert_eq!(n.status.as_ref().unwrap().images, None);
        assert_eq!(n.metadata.labels.as_ref().unwrap()["zone"], "x");

        let mut s = Service::default();
        s.metadata.annotations = Some(
            [
                ("l2speaker.io/pool".to_string(), "p".to_string()),
                (
                    "kubectl.kubernetes.io/last-applied-configuration".to_string(),
                    "{}".to_string(),
                ),
            ]
            .into(),
        );
        trim(&mut s);
        let a = s.metadata.annotations.unwrap();
        assert_eq!(a.len(), 1);
        assert_eq!(a["l2speaker.io/pool"], "p");
    }
}
