//! The per-node Lease `node-<node name>`: what a node's speaker publishes about the node.
//! Today that is the pool addresses it refuses to bind — addresses on its interfaces that
//! l2speaker did not add, and its gateways — so the allocator never assigns them. Written only
//! when that set changes.

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

/// The MACs a node Lease publishes.
pub fn macs(lease: &Lease) -> Vec<String> {
    lease
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(ANNOTATION_MACS))
        .and_then(|v| serde_json::from_str::<Vec<String>>(v).ok())
        .unwrap_or_default()
}

fn encode(refused: &BTreeMap<IpAddr, String>) -> String {
    let capped: BTreeMap<&IpAddr, &String> = refused.iter().take(MAX_REFUSED).collect();
    serde_json::to_string(&capped).expect("a map of strings")
}

/// Makes the node's Lease publish `refused`: created if missing, replaced (CAS) if different.
pub async fn publish(
    api: &Api<Lease>,
    node: &str,
    refused: &BTreeMap<IpAddr, String>,
    macs: &[String],
) -> Result<(), kube::Error> {
    let name = name(node);
    let value = encode(refused);
    let macs = serde_json::to_string(macs).expect("strings");
    match api.get_opt(&name).await? {
        None => {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(name),
                    labels: Some([(LABEL_MANAGED_BY.to_string(), MANAGED_BY.to_string())].into()),
                    annotations: Some(
                        [
                            (ANNOTATION_REFUSED.to_string(), value),
                            (ANNOTATION_MACS.to_string(), macs),
                        ]
                        .into(),
                    ),
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
            if a.get(ANNOTATION_REFUSED) == Some(&value) && a.get(ANNOTATION_MACS) == Some(&macs) {
                return Ok(());
            }
            a.insert(ANNOTATION_REFUSED.to_string(), value);
            a.insert(ANNOTATION_MACS.to_string(), macs);
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
