//! `l2speaker status`: who owns which IP, from the Leases (readable with `get`/`list` on
//! Leases in the speaker's namespace; no cluster-admin needed), and which nodes serve each
//! node-IP Service (from the Services and Nodes, when those may be listed).

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Node, Service};
use kube::ResourceExt;
use kube::api::{Api, ListParams};
use serde::Serialize;

use crate::lease::{
    ANNOTATION_INTERFACE, ANNOTATION_IP, ANNOTATION_MAC, ANNOTATION_SERVICE, LABEL_MANAGED_BY,
    MANAGED_BY,
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
    /// Seconds until the Lease expires if not renewed (negative: expired).
    pub expires_in: Option<f64>,
    pub transitions: i32,
    /// `vip` (a pool address and its Lease) or `node` (a node's own address, node-IP mode).
    pub mode: &'static str,
}

/// The rows of the VIP Leases, by IP.
pub fn rows(leases: &[Lease], now: k8s_openapi::jiff::Timestamp) -> Vec<Row> {
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
            Row {
                ip: get(ANNOTATION_IP),
                service: get(ANNOTATION_SERVICE),
                since: owner
                    .as_ref()
                    .and(spec.acquire_time.as_ref())
                    .map(|t| t.0.to_string()),
                expires_in: owner.as_ref().and(expires_in),
                owner,
                interface: get(ANNOTATION_INTERFACE),
                mac: get(ANNOTATION_MAC),
                transitions: spec.lease_transitions.unwrap_or(0),
                mode: "vip",
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
                transitions: 0,
                mode: "node",
            });
        }
    }
    rows.sort_by(|a, b| {
        (&a.service, a.ip.parse::<std::net::IpAddr>().ok()).cmp(&(&b.service, b.ip.parse().ok()))
    });
    rows
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
    for r in rows {
        lines.push(vec![
            r.ip.clone(),
            r.service.clone(),
            r.owner.clone().unwrap_or_else(|| "<none>".into()),
            r.interface.clone(),
            r.mac.clone(),
            r.since.clone().unwrap_or_else(|| "-".into()),
            match r.expires_in {
                Some(s) if s >= 0.0 => format!("in {s:.1}s"),
                Some(s) => format!("{:.1}s ago", -s),
                None => "-".into(),
            },
            r.transitions.to_string(),
            r.mode.to_string(),
        ]);
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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

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
