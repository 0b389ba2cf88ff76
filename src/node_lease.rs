//! The per-node Lease `node-<node name>`: what a node's speaker publishes about the node.
//! The pool addresses it refuses to bind — addresses on its interfaces that l2speaker did not
//! add, and its gateways — so the allocator never assigns them; its MACs; the ports of
//! node-IP Services something on the node listens on; the subnets it can announce on.
//! Written only when those change.

use std::collections::BTreeMap;
use std::net::IpAddr;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use kube::api::{Api, ObjectMeta, PostParams};

use crate::lease::{LABEL_MANAGED_BY, MANAGED_BY};

pub const PREFIX: &str = "node-";
/// JSON object: refused address → what it is.
pub const ANNOTATION_REFUSED: &str = "l2speaker.io/refused";
/// JSON list: the MACs of the node's interfaces (whose ARP/NA are a speaker's, not a
/// foreign host's).
pub const ANNOTATION_MACS: &str = "l2speaker.io/macs";
/// JSON list: the ports of node-IP Services something on the node listens on (`tcp/22`):
/// the node does not serve those Services.
pub const ANNOTATION_BUSY_PORTS: &str = "l2speaker.io/busy-ports";
/// JSON list: the subnets of the node's ARP-capable interfaces (`192.0.2.0/24`), where its
/// speaker can announce a pool IP without a `spec.interface`. The allocator assigns no IP
/// that no node can announce.
pub const ANNOTATION_SUBNETS: &str = "l2speaker.io/subnets";
/// The speaker's generation (see `ownership::quorum`): changed only by compare-and-swap.
pub const ANNOTATION_GENERATION: &str = "l2speaker.io/generation";
/// The generation a candidate fenced (it then takes the node's VIPs), and who fenced it.
pub const ANNOTATION_FENCED: &str = "l2speaker.io/fenced";
pub const ANNOTATION_FENCED_BY: &str = "l2speaker.io/fenced-by";
/// Set while the node may answer on its renewals alone (see `ownership::node`).
pub const ANNOTATION_API_PATH: &str = "l2speaker.io/api-path";
/// How long a node Lease says its speaker is alive after a renewal (API-side liveness).
pub const NODE_LEASE_SECONDS: i32 = 10;
/// At most this many addresses are published (the rest are still refused locally).
pub const MAX_REFUSED: usize = 256;

pub fn name(node: &str) -> String {
    format!("{PREFIX}{node}")
}

/// The refused addresses a node Lease publishes (empty when absent or unreadable).
pub fn refused(lease: &Lease) -> BTreeMap<IpAddr, String> {
    lease
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(ANNOTATION_REFUSED))
        .and_then(|v| serde_json::from_str::<BTreeMap<IpAddr, String>>(v).ok())
        .unwrap_or_default()
}

/// A JSON list of strings in annotation `key` (empty when absent or unreadable).
fn strings(lease: &Lease, key: &str) -> Vec<String> {
    lease
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(key))
        .and_then(|v| serde_json::from_str::<Vec<String>>(v).ok())
        .unwrap_or_default()
}

/// The subnets a node Lease publishes; None when it publishes none (a speaker of an older
/// release, or one that has not read its interfaces yet).
pub fn subnets(lease: &Lease) -> Option<Vec<ipnet::IpNet>> {
    let v = lease
        .metadata
        .annotations
        .as_ref()?
        .get(ANNOTATION_SUBNETS)?;
    let list: Vec<String> = serde_json::from_str(v).ok()?;
    Some(list.iter().filter_map(|n| n.parse().ok()).collect())
}

/// The MACs a node Lease publishes.
pub fn macs(lease: &Lease) -> Vec<String> {
    strings(lease, ANNOTATION_MACS)
}

/// The busy ports a node Lease publishes.
pub fn busy_ports(lease: &Lease) -> std::collections::BTreeSet<crate::node_ips::Port> {
    strings(lease, ANNOTATION_BUSY_PORTS)
        .iter()
        .filter_map(|p| crate::node_ips::parse_port(p))
        .collect()
}

fn number(lease: &Lease, key: &str) -> Option<u32> {
    lease.metadata.annotations.as_ref()?.get(key)?.parse().ok()
}

/// Whether the node's speaker takes part in LAN mode: its Lease records a generation. A
/// speaker of the previous release (which wrote node Leases for refused addresses only) or
/// one in lease mode does not: it never acks, declares or holds a VIP through the LAN, so it
/// is no member and counts in no majority.
pub fn is_member(lease: &Lease) -> bool {
    number(lease, ANNOTATION_GENERATION).is_some()
}

/// The generation and fence a node Lease records.
pub fn state(lease: &Lease) -> crate::ownership::node::NodeLeaseState {
    crate::ownership::node::NodeLeaseState {
        resource_version: lease.metadata.resource_version.clone().unwrap_or_default(),
        generation: number(lease, ANNOTATION_GENERATION).unwrap_or(0),
        fenced: number(lease, ANNOTATION_FENCED),
        api_path: lease
            .metadata
            .annotations
            .as_ref()
            .is_some_and(|a| a.get(ANNOTATION_API_PATH).is_some_and(|v| v == "true")),
    }
}

/// Why a node Lease write did not go through.
#[derive(Debug, thiserror::Error)]
pub enum NodeWriteError {
    /// 409 or 404: the Lease is not what we wrote last; here it is now.
    #[error("the node lease changed")]
    Changed(Option<Box<Lease>>),
    #[error("{0}")]
    Api(kube::Error),
}

fn is_conflict(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 409 || s.code == 404)
}

/// The node keeper's write: our Lease, renewed, in `generation`, by compare-and-swap on
/// `last` (what our last write returned; None: create it). Annotations others wrote (refused
/// addresses, MACs) are kept, since the CAS fails if they changed since `last`.
pub async fn renew(
    api: &Api<Lease>,
    node: &str,
    last: Option<&Lease>,
    generation: u32,
    api_path: bool,
) -> Result<Lease, NodeWriteError> {
    let name = name(node);
    let now = crate::lease::now_micro();
    let mut lease = last.cloned().unwrap_or_else(|| Lease {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            labels: Some([(LABEL_MANAGED_BY.to_string(), MANAGED_BY.to_string())].into()),
            ..Default::default()
        },
        spec: Some(LeaseSpec {
            holder_identity: Some(node.to_string()),
            acquire_time: Some(now.clone()),
            ..Default::default()
        }),
    });
    let spec = lease.spec.get_or_insert_default();
    spec.holder_identity = Some(node.to_string());
    spec.lease_duration_seconds = Some(NODE_LEASE_SECONDS);
    spec.renew_time = Some(now);
    let a = lease.metadata.annotations.get_or_insert_default();
    a.insert(ANNOTATION_GENERATION.into(), generation.to_string());
    if api_path {
        a.insert(ANNOTATION_API_PATH.into(), "true".into());
    } else {
        a.remove(ANNOTATION_API_PATH);
    }
    let result = if last.is_none() {
        api.create(&PostParams::default(), &lease).await
    } else {
        api.replace(&name, &PostParams::default(), &lease).await
    };
    match result {
        Ok(l) => Ok(l),
        Err(e) if is_conflict(&e) || matches!(&e, kube::Error::Api(s) if s.code == 409) => {
            let now = api.get_opt(&name).await.map_err(NodeWriteError::Api)?;
            Err(NodeWriteError::Changed(now.map(Box::new)))
        }
        Err(e) => Err(NodeWriteError::Api(e)),
    }
}

/// Fences `node`'s `generation` (a take-over's first write): a compare-and-swap on its node
/// Lease as just read. `Ok(None)` when the node has moved on to another generation (or has
/// no Lease): nothing to fence, the take-over starts over. `Ok(Some(api_path))` once fenced:
/// whether the Lease said the node may answer on its renewals alone (then the candidate waits
/// out the renew deadline).
pub async fn fence(
    api: &Api<Lease>,
    node: &str,
    generation: u32,
    by: &str,
) -> Result<Option<bool>, kube::Error> {
    let name = name(node);
    let Some(mut lease) = api.get_opt(&name).await? else {
        return Ok(None);
    };
    let st = state(&lease);
    if st.fenced.is_some_and(|f| f >= generation) {
        return Ok(Some(st.api_path));
    }
    if st.generation != generation {
        return Ok(None);
    }
    let a = lease.metadata.annotations.get_or_insert_default();
    a.insert(ANNOTATION_FENCED.into(), generation.to_string());
    a.insert(ANNOTATION_FENCED_BY.into(), by.to_string());
    match api.replace(&name, &PostParams::default(), &lease).await {
        Ok(_) => Ok(Some(st.api_path)),
        Err(e) if is_conflict(&e) => Ok(None),
        Err(e) => Err(e),
    }
}

fn encode(refused: &BTreeMap<IpAddr, String>) -> String {
    let capped: BTreeMap<&IpAddr, &String> = refused.iter().take(MAX_REFUSED).collect();
    serde_json::to_string(&capped).expect("a map of strings")
}

/// What a node's speaker publishes on its Lease besides its liveness.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Published {
    pub refused: BTreeMap<IpAddr, String>,
    pub macs: Vec<String>,
    pub busy: Vec<String>,
    pub subnets: Vec<String>,
}

impl Published {
    fn annotations(&self) -> [(String, String); 4] {
        let json = |v: &[String]| serde_json::to_string(v).expect("strings");
        [
            (ANNOTATION_REFUSED.to_string(), encode(&self.refused)),
            (ANNOTATION_MACS.to_string(), json(&self.macs)),
            (ANNOTATION_BUSY_PORTS.to_string(), json(&self.busy)),
            (ANNOTATION_SUBNETS.to_string(), json(&self.subnets)),
        ]
    }
}

/// Makes the node's Lease publish `what`: created if missing, replaced (CAS) if different.
pub async fn publish(api: &Api<Lease>, node: &str, what: &Published) -> Result<(), kube::Error> {
    let name = name(node);
    let want = what.annotations();
    match api.get_opt(&name).await? {
        None => {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(name),
                    labels: Some([(LABEL_MANAGED_BY.to_string(), MANAGED_BY.to_string())].into()),
                    annotations: Some(want.into()),
                    ..Default::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(node.to_string()),
                    ..Default::default()
                }),
            };
            api.create(&PostParams::default(), &lease).await.map(drop)
        }
        Some(mut l) => {
            let a = l.metadata.annotations.get_or_insert_default();
            if want.iter().all(|(k, v)| a.get(k) == Some(v)) {
                return Ok(());
            }
            a.extend(want);
            api.replace(&name, &PostParams::default(), &l)
                .await
                .map(drop)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refused_addresses_round_trip_and_garbage_reads_as_none() {
        let m: BTreeMap<IpAddr, String> = [
            (
                "192.0.2.1".parse().unwrap(),
                "a gateway of node-1".to_string(),
            ),
            (
                "2001:db8::1".parse().unwrap(),
                "an address on node-1's eth0".to_string(),
            ),
        ]
        .into();
        let mut l = Lease::default();
        l.metadata.annotations = Some([(ANNOTATION_REFUSED.to_string(), encode(&m))].into());
        assert_eq!(refused(&l), m);
        l.metadata.annotations = Some([(ANNOTATION_REFUSED.to_string(), "{nope".into())].into());
        assert!(refused(&l).is_empty());
        let many: BTreeMap<IpAddr, String> = (0..1000u32)
            .map(|i| (IpAddr::V4((0xc000_0200 + i).into()), "x".to_string()))
            .collect();
        assert_eq!(
            serde_json::from_str::<BTreeMap<IpAddr, String>>(&encode(&many))
                .unwrap()
                .len(),
            MAX_REFUSED
        );
    }
}
