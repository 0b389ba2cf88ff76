//! Lease garbage collection (done by the allocator): Leases of IPs that no Service has any
//! more are deleted once nobody holds them, or once their holder stopped renewing.

use std::collections::BTreeSet;
use std::sync::Arc;

use kube::ResourceExt;
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::info;

use crate::context::Shared;
use crate::lease;
use crate::plan;
use crate::pool::Pools;
use crate::service::ServiceInfo;

/// Whether a Lease of an IP no Service has is garbage: free, or not renewed for twice its
/// duration by the wall clock (it is garbage either way; staleness only decides when).
pub fn is_garbage(spec: &k8s_openapi::api::coordination::v1::LeaseSpec, now_ms: i64) -> bool {
    let free = spec.holder_identity.as_deref().is_none_or(str::is_empty);
    let stale = spec.renew_time.as_ref().is_some_and(|r| {
        let age_ms = now_ms - r.0.as_millisecond();
        age_ms > 2 * 1000 * i64::from(spec.lease_duration_seconds.unwrap_or(0))
    });
    free || stale
}

pub async fn collect(
    shared: &Arc<Shared>,
    services: &[ServiceInfo],
    pools: &Pools,
    holds: &watch::Receiver<Option<Instant>>,
) {
    let (class, unclassed) = (
        shared.config.load_balancer_class.clone(),
        shared.config.claim_unclassed,
    );
    let ours: Vec<ServiceInfo> = services
        .iter()
        .filter(|s| s.is_ours(&class, unclassed))
        .cloned()
        .collect();
    let vips: BTreeSet<String> = plan::vips(&ours, pools)
        .keys()
        .map(|ip| lease::lease_name(*ip))
        .collect();
    for l in shared.cluster.leases.state() {
        let name = l.name_any();
        if !name.starts_with("vip-") || vips.contains(&name) {
            continue;
        }
        let spec = l.spec.clone().unwrap_or_default();
        if !is_garbage(&spec, k8s_openapi::jiff::Timestamp::now().as_millisecond()) {
            continue;
        }
        let Some(until) = *holds.borrow() else { return };
        info!(lease = %name, "deleting the lease of an IP no Service has");
        let rv = l.metadata.resource_version.clone().unwrap_or_default();
        let _ = tokio::time::timeout_at(until, shared.leases.delete(&name, &rv)).await;
    }
}
