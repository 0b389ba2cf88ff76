//! `l2speaker status`: who owns which IP, from the Leases (readable with `get`/`list` on
//! Leases in the speaker's namespace; no cluster-admin needed), and which nodes serve each
//! node-IP Service (from the Services and Nodes, when those may be listed).

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Node, Service};
use kube::ResourceExt;
use kube::api::{Api, ListParams};
use serde::Serialize;

use crate::lease::{
    ANNOTATION_INTERFACE, ANNOTATION_IP, ANNOTATION_LAN_HOLDER, ANNOTATION_MAC, ANNOTATION_SERVICE,
    LABEL_MANAGED_BY, MANAGED_BY,
};

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Row {
    pub ip: String,
    pub service: String,
    pub owner: Option<String>,
    pub interface: String,
    pub mac: String,
    /// When the current owner took it (RFC 3339).
    pub since: Option<String>,
    /// Seconds until the Lease expires if not renewed (negative: expired). None for a VIP kept
    /// through node liveness (LAN mode), whose Lease has no expiry that means anything.
    pub expires_in: Option<f64>,
    /// LAN mode: the owner keeps the VIP while its heartbeats are heard on the LAN; this is
    /// how long ago its node Lease was last renewed (None: no node Lease, or lease mode).
    pub owner_heartbeat_age: Option<f64>,
    /// `lan` (kept through node liveness) or `lease` (renewed per VIP); None without owner.
    pub kept: Option<&'static str>,
    pub transitions: i32,
    /// `vip` (a pool address and its Lease) or `node` (a node's own address, node-IP mode).
    pub mode: &'static str,
    /// Why no node answers for an assigned IP (None: some node does, or it is not known).
    pub unannounced: Option<String>,
}

/// The rows of the VIP Leases, by IP.
pub fn rows(leases: &[Lease], now: k8s_openapi::jiff::Timestamp) -> Vec<Row> {
    let node_leases: std::collections::BTreeMap<String, &Lease> = leases
        .iter()
        .filter_map(|l| Some((l.metadata.name.clone()?, l)))
        .filter(|(n, _)| n.starts_with(crate::node_lease::PREFIX))
        .collect();
    let mut rows: Vec<Row> = leases
        .iter()
        .filter(|l| {
            l.metadata
                .name
                .as_deref()
                .is_some_and(|n| n.starts_with("vip-"))
        })
        .map(|l| {
            let a = l.metadata.annotations.clone().unwrap_or_default();
            let get = |k: &str| a.get(k).cloned().unwrap_or_default();
            let spec = l.spec.clone().unwrap_or_default();
            let owner = spec.holder_identity.clone().filter(|h| !h.is_empty());
            let expires_in = spec.renew_time.as_ref().map(|r| {
                let left = r.0.as_millisecond()
                    + i64::from(spec.lease_duration_seconds.unwrap_or(0)) * 1000
                    - now.as_millisecond();
                left as f64 / 1000.0
            });
            let lan = owner.is_some() && a.get(ANNOTATION_LAN_HOLDER) == owner.as_ref();
            let heartbeat_age = owner
                .as_ref()
                .filter(|_| lan)
                .and_then(|o| node_leases.get(&crate::node_lease::name(o)))
                .and_then(|l| l.spec.as_ref()?.renew_time.as_ref())
                .map(|r| (now.as_millisecond() - r.0.as_millisecond()) as f64 / 1000.0);
            Row {
                ip: get(ANNOTATION_IP),
                service: get(ANNOTATION_SERVICE),
                since: owner
                    .as_ref()
                    .and(spec.acquire_time.as_ref())
                    .map(|t| t.0.to_string()),
                expires_in: owner.as_ref().and(expires_in).filter(|_| !lan),
                owner_heartbeat_age: heartbeat_age,
                kept: owner.as_ref().map(|_| if lan { "lan" } else { "lease" }),
                interface: get(ANNOTATION_INTERFACE),
                mac: get(ANNOTATION_MAC),
                transitions: spec.lease_transitions.unwrap_or(0),
                mode: "vip",
                // Free because the last holder could not bind it.
                unannounced: owner
                    .is_none()
                    .then(|| a.get(crate::lease::ANNOTATION_FAILED))
                    .flatten()
                    .map(|f| format!("given up by {f}")),
                owner,
            }
        })
        .collect();
    rows.sort_by(|a, b| {
        (a.ip.parse::<std::net::IpAddr>().ok(), &a.ip).cmp(&(b.ip.parse().ok(), &b.ip))
    });
    rows
}

/// The rows of node-IP Services (ingress with `ipMode: Proxy`): one per address, the node
/// whose address it is as the owner.
pub fn node_ip_rows(services: &[Service], nodes: &[Node]) -> Vec<Row> {
    let mut rows = Vec::new();
    for svc in services {
        let ingress = svc
            .status
            .as_ref()
            .and_then(|s| s.load_balancer.as_ref())
            .and_then(|lb| lb.ingress.clone())
            .unwrap_or_default();
        for i in ingress
            .iter()
            .filter(|i| i.ip_mode.as_deref() == Some("Proxy"))
        {
            let Some(ip) = i.ip.clone() else { continue };
            let owner = nodes
                .iter()
                .find(|n| {
                    n.status
                        .iter()
                        .flat_map(|s| s.addresses.iter().flatten())
                        .any(|a| a.address == ip)
                })
                .and_then(|n| n.metadata.name.clone());
            rows.push(Row {
                ip,
                service: format!("{}/{}", svc.namespace().unwrap_or_default(), svc.name_any()),
                owner,
                interface: "-".into(),
                mac: "-".into(),
                since: None,
                expires_in: None,
                owner_heartbeat_age: None,
                kept: None,
                transitions: 0,
                mode: "node",
                unannounced: None,
            });
        }
    }
    rows.sort_by(|a, b| {
        (&a.service, a.ip.parse::<std::net::IpAddr>().ok()).cmp(&(&b.service, b.ip.parse().ok()))
    });
    rows
}

/// Rows for pool IPs in Services' statuses that no node answers for: no VIP Lease with a
/// holder. The reason is the pool's `Announceable` condition when that is not True, else what
/// keeps every node from taking it.
pub fn unannounced_rows(
    vip_rows: &[Row],
    services: &[Service],
    pools: &[crate::pool::IPPool],
) -> Vec<Row> {
    let held: std::collections::BTreeSet<&str> = vip_rows
        .iter()
        .filter(|r| r.mode == "vip" && (r.owner.is_some() || r.unannounced.is_some()))
        .map(|r| r.ip.as_str())
        .collect();
    let parsed = crate::pool::Pools::from_objects(
        &pools
            .iter()
            .cloned()
            .map(std::sync::Arc::new)
            .collect::<Vec<_>>(),
    );
    let mut rows = Vec::new();
    for svc in services {
        let ingress = svc
            .status
            .as_ref()
            .and_then(|s| s.load_balancer.as_ref())
            .and_then(|lb| lb.ingress.clone())
            .unwrap_or_default();
        for i in ingress
            .iter()
            .filter(|i| i.ip_mode.as_deref() != Some("Proxy"))
        {
            let Some(ip) = i.ip.clone() else { continue };
            let Some(pool) = ip.parse().ok().and_then(|a| parsed.pool_of(a)) else {
                continue;
            };
            if held.contains(ip.as_str()) {
                continue;
            }
            let condition = pools
                .iter()
                .find(|p| p.metadata.name.as_deref() == Some(pool.name.as_str()))
                .and_then(|p| p.status.as_ref())
                .and_then(|s| s.conditions.iter().find(|c| c.type_ == "Announceable"))
                .filter(|c| c.status != "True");
            let why = match condition {
                Some(c) => format!("pool {}: {}", pool.name, c.message),
                None => "no node is eligible yet (the pool's node selector, node labels, Local policy without a ready endpoint, or links down; see the Service's Events)".into(),
            };
            rows.push(Row {
                ip,
                service: format!("{}/{}", svc.namespace().unwrap_or_default(), svc.name_any()),
                owner: None,
                interface: "-".into(),
                mac: "-".into(),
                since: None,
                expires_in: None,
                owner_heartbeat_age: None,
                kept: None,
                transitions: 0,
                mode: "vip",
                unannounced: Some(why),
            });
        }
    }
    rows
}

/// The EXPIRES column: when a lease-mode VIP's Lease runs out; for a LAN-mode VIP, that it
/// stays while its owner is alive on the LAN, with the age of the owner's node Lease (a node
/// whose heartbeats stop is replaced within the dead-after time, whatever that age).
fn expires(r: &Row) -> String {
    match (r.kept, r.expires_in, r.owner_heartbeat_age) {
        (Some("lan"), _, Some(age)) => format!("while owner alive (node lease {age:.1}s ago)"),
        (Some("lan"), _, None) => "while owner alive (no node lease)".into(),
        (_, Some(s), _) if s >= 0.0 => format!("in {s:.1}s"),
        (_, Some(s), _) => format!("{:.1}s ago", -s),
        _ => "-".into(),
    }
}

/// A table for people.
pub fn table(rows: &[Row]) -> String {
    let mut lines = vec![
        [
            "IP",
            "SERVICE",
            "OWNER",
            "INTERFACE",
            "MAC",
            "SINCE",
            "EXPIRES",
            "TRANSITIONS",
            "MODE",
        ]
        .map(String::from)
        .to_vec(),
    ];
    let notes = rows.iter().any(|r| r.unannounced.is_some());
    if notes {
        lines[0].push("NOT ANNOUNCED BECAUSE".into());
    }
    for r in rows {
        let mut line = vec![
            r.ip.clone(),
            r.service.clone(),
            r.owner.clone().unwrap_or_else(|| "<none>".into()),
            r.interface.clone(),
            r.mac.clone(),
            r.since.clone().unwrap_or_else(|| "-".into()),
            expires(r),
            r.transitions.to_string(),
            r.mode.to_string(),
        ];
        if notes {
            line.push(r.unannounced.clone().unwrap_or_default());
        }
        lines.push(line);
    }
    let widths: Vec<usize> = (0..lines[0].len())
        .map(|i| lines.iter().map(|l| l[i].len()).max().unwrap_or(0))
        .collect();
    lines
        .iter()
        .map(|l| {
            l.iter()
                .zip(&widths)
                .map(|(c, w)| format!("{c:<w$}"))
                .collect::<Vec<_>>()
                .join("   ")
                .trim_end()
                .to_string()
                + "\n"
        })
        .collect()
}

/// Lists the speaker's Leases in `namespace`.
pub async fn fetch(client: kube::Client, namespace: &str) -> Result<Vec<Lease>, kube::Error> {
    let api: Api<Lease> = Api::namespaced(client, namespace);
    Ok(api
        .list(&ListParams::default().labels(&format!("{LABEL_MANAGED_BY}={MANAGED_BY}")))
        .await?
        .items)
}

/// Lists the Services (all namespaces) and the Nodes, for the node-IP rows.
pub async fn fetch_node_ips(
    client: kube::Client,
) -> Result<(Vec<Service>, Vec<Node>), kube::Error> {
    let services = Api::<Service>::all(client.clone())
        .list(&ListParams::default())
        .await?
        .items;
    let nodes = Api::<Node>::all(client)
        .list(&ListParams::default())
        .await?
        .items;
    Ok((services, nodes))
}

/// Lists the IPPools, for the unannounced rows.
pub async fn fetch_pools(client: kube::Client) -> Result<Vec<crate::pool::IPPool>, kube::Error> {
    Ok(Api::<crate::pool::IPPool>::all(client)
        .list(&ListParams::default())
        .await?
        .items)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_vip_given_up_by_a_node_that_could_not_bind_it_says_so() {
        let lease: Lease = serde_json::from_value(json!({
            "metadata": {"name": "vip-192-0-2-7", "annotations": {
                ANNOTATION_IP: "192.0.2.7", ANNOTATION_SERVICE: "default/web",
                crate::lease::ANNOTATION_FAILED: "n1: binding it to eth0: Permission denied (2026-12-07T21:00:00Z)"}},
            "spec": {"leaseDurationSeconds": 4, "renewTime": "2026-12-07T21:00:00.000000Z"}}))
        .unwrap();
        let now: k8s_openapi::jiff::Timestamp = "2026-12-07T21:00:01Z".parse().unwrap();
        let r = rows(&[lease], now);
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].owner, None);
        let why = r[0].unannounced.as_deref().unwrap_or_default();
        assert!(
            why.contains("given up by n1") && why.contains("Permission denied"),
            "{why}"
        );
        // Not listed a second time as an assigned IP without a Lease.
        let svc: Service = serde_json::from_value(json!({
            "metadata": {"name": "web", "namespace": "default"},
            "status": {"loadBalancer": {"ingress": [{"ip": "192.0.2.7"}]}}}))
        .unwrap();
        let pool: crate::pool::IPPool = serde_json::from_value(json!({
            "apiVersion": "l2speaker.io/v1alpha1", "kind": "IPPool",
            "metadata": {"name": "lan"}, "spec": {"addresses": ["192.0.2.0/28"]}}))
        .unwrap();
        assert!(unannounced_rows(&r, &[svc], &[pool]).is_empty());
        let t = table(&r);
        assert!(
            t.contains("NOT ANNOUNCED BECAUSE") && t.contains("given up by n1"),
            "{t}"
        );
    }

    #[test]
    fn rows_show_owner_expiry_and_transitions_and_sort_by_ip() {
        let lease = |name: &str, ip: &str, holder: Option<&str>| -> Lease {
            serde_json::from_value(json!({
                "metadata": {"name": name, "annotations": {ANNOTATION_IP: ip, ANNOTATION_SERVICE: "default/web", ANNOTATION_INTERFACE: "eth0", ANNOTATION_MAC: "02:00:00:00:00:11"}},
                "spec": {"holderIdentity": holder, "leaseDurationSeconds": 3, "acquireTime": "2026-11-26T08:00:00.000000Z",
                         "renewTime": "2026-11-26T08:00:10.000000Z", "leaseTransitions": 2}}))
            .unwrap()
        };
        let now: k8s_openapi::jiff::Timestamp = "2026-11-26T08:00:11Z".parse().unwrap();
        let leases = [
            lease("vip-192-0-2-210", "192.0.2.210", None),
            lease("vip-192-0-2-9", "192.0.2.9", Some("node-1")),
            lease("l2speaker-allocator", "", Some("node-2")),
        ];
        let r = rows(&leases, now);
        assert_eq!(r.len(), 2, "only VIP leases");
        assert_eq!(r[0].ip, "192.0.2.9", "numeric order");
        assert_eq!(r[0].expires_in, Some(2.0));
        assert_eq!(r[1].owner, None);
        let t = table(&r);
        assert!(t.lines().next().unwrap().starts_with("IP "));
        assert!(
            t.contains("node-1") && t.contains("in 2.0s") && t.contains("<none>"),
            "{t}"
        );
    }

    #[test]
    fn a_lan_kept_vip_shows_its_owners_heartbeat_not_a_ten_year_expiry() {
        let vip: Lease = serde_json::from_value(json!({
            "metadata": {"name": "vip-192-0-2-9", "annotations": {ANNOTATION_IP: "192.0.2.9",
                ANNOTATION_LAN_HOLDER: "node-1"}},
            "spec": {"holderIdentity": "node-1", "leaseDurationSeconds": crate::lease::LAN_LEASE_SECONDS,
                     "renewTime": "2026-11-26T08:00:00.000000Z"}}))
        .unwrap();
        let node: Lease = serde_json::from_value(json!({
            "metadata": {"name": crate::node_lease::name("node-1")},
            "spec": {"holderIdentity": "node-1", "renewTime": "2026-11-26T08:00:10.600000Z"}}))
        .unwrap();
        let now: k8s_openapi::jiff::Timestamp = "2026-11-26T08:00:11Z".parse().unwrap();
        let r = rows(&[vip.clone(), node], now);
        assert_eq!(r.len(), 1);
        assert_eq!((r[0].kept, r[0].expires_in), (Some("lan"), None));
        let t = table(&r);
        assert!(
            t.contains("while owner alive (node lease 0.4s ago)") && !t.contains("in 3153"),
            "{t}"
        );
        let alone = table(&rows(&[vip], now));
        assert!(
            alone.contains("while owner alive (no node lease)"),
            "{alone}"
        );
    }

    #[test]
    fn assigned_ips_no_node_answers_for_are_listed_with_the_reason() {
        let svc: Service = serde_json::from_value(json!({
            "metadata": {"name": "far", "namespace": "default"},
            "status": {"loadBalancer": {"ingress": [
                {"ip": "203.0.113.1", "ipMode": "VIP"}, {"ip": "192.0.2.9", "ipMode": "VIP"},
                {"ip": "192.0.2.77", "ipMode": "VIP"}]}}}))
        .unwrap();
        let pool = |name: &str, cidr: &str, cond: Option<&str>| -> crate::pool::IPPool {
            let mut status = json!({"addresses": [cidr]});
            if let Some(msg) = cond {
                status["conditions"] = json!([{"type": "Announceable", "status": "False",
                    "reason": "NoNodeSubnet", "message": msg}]);
            }
            serde_json::from_value(
                json!({"apiVersion": "l2speaker.io/v1alpha1", "kind": "IPPool",
                "metadata": {"name": name}, "spec": {"addresses": [cidr]}, "status": status}),
            )
            .unwrap()
        };
        let pools = [
            pool(
                "off",
                "203.0.113.0/28",
                Some("203.0.113.0/28 on no node's subnet"),
            ),
            pool("lan", "192.0.2.0/28", None),
        ];
        let held = Row {
            ip: "192.0.2.9".into(),
            service: "default/far".into(),
            owner: Some("node-1".into()),
            interface: "eth0".into(),
            mac: "-".into(),
            since: None,
            expires_in: None,
            owner_heartbeat_age: None,
            kept: Some("lan"),
            transitions: 1,
            mode: "vip",
            unannounced: None,
        };
        let r = unannounced_rows(std::slice::from_ref(&held), &[svc], &pools);
        let got: Vec<(&str, &str)> = r
            .iter()
            .map(|r| (r.ip.as_str(), r.unannounced.as_deref().unwrap_or("")))
            .collect();
        assert_eq!(
            got.len(),
            1,
            "192.0.2.9 is held; 192.0.2.77 is in no pool: {got:?}"
        );
        assert_eq!(got[0].0, "203.0.113.1");
        assert!(
            got[0]
                .1
                .contains("pool off: 203.0.113.0/28 on no node's subnet"),
            "{got:?}"
        );
        let t = table(&[held, r[0].clone()]);
        assert!(
            t.lines().next().unwrap().ends_with("NOT ANNOUNCED BECAUSE"),
            "{t}"
        );
    }

    #[test]
    fn node_ip_services_are_listed_with_the_nodes_serving_them() {
        let svc: Service = serde_json::from_value(json!({
            "metadata": {"name": "web", "namespace": "default"},
            "status": {"loadBalancer": {"ingress": [
                {"ip": "192.0.2.12", "ipMode": "Proxy"}, {"ip": "192.0.2.11", "ipMode": "Proxy"}]}}}))
        .unwrap();
        let vip: Service = serde_json::from_value(json!({
            "metadata": {"name": "vip", "namespace": "default"},
            "status": {"loadBalancer": {"ingress": [{"ip": "192.0.2.200", "ipMode": "VIP"}]}}}))
        .unwrap();
        let node = |name: &str, ip: &str| -> Node {
            serde_json::from_value(json!({"metadata": {"name": name},
                "status": {"addresses": [{"type": "InternalIP", "address": ip}]}}))
            .unwrap()
        };
        let r = node_ip_rows(
            &[svc, vip],
            &[node("node-1", "192.0.2.11"), node("node-2", "192.0.2.12")],
        );
        let got: Vec<(&str, &str, Option<&str>)> = r
            .iter()
            .map(|r| (r.ip.as_str(), r.service.as_str(), r.owner.as_deref()))
            .collect();
        assert_eq!(
            got,
            [
                ("192.0.2.11", "default/web", Some("node-1")),
                ("192.0.2.12", "default/web", Some("node-2"))
            ]
        );
        assert!(table(&r).contains("node"));
    }
}
