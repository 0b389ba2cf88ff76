//! Pure decisions a speaker takes from its caches: which IPs are VIPs, whether this node may
//! announce one and on which interface, who goes first, and where the traffic goes.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::hash::{Hash, Hasher};
use std::net::IpAddr;

use k8s_openapi::api::discovery::v1::EndpointSlice;

use crate::dataplane::addr::Interface;
use crate::dataplane::nft::{Endpoint, PortMap};
use crate::pool::{Pool, Pools};
use crate::service::ServiceInfo;

/// Nodes with this label never announce (the Kubernetes convention).
pub const EXCLUDE_LABEL: &str = "node.kubernetes.io/exclude-from-external-load-balancers";

/// The VIPs to announce: assigned IPs of our Services that lie in a valid pool (anything
/// else in a status is ignored, whoever wrote it), each with its Services, oldest first: the
/// oldest, and those that may share the IP with every one before them (the same sharing
/// key, disjoint ports).
pub fn vips<'a>(
    services: &'a [ServiceInfo],
    pools: &'a Pools,
) -> BTreeMap<IpAddr, (Vec<&'a ServiceInfo>, &'a Pool)> {
    let mut sorted: Vec<&ServiceInfo> = services.iter().collect();
    sorted.sort_by(|a, b| (&a.created, &a.key).cmp(&(&b.created, &b.key)));
    let mut out: BTreeMap<IpAddr, (Vec<&ServiceInfo>, &Pool)> = BTreeMap::new();
    for s in sorted {
        for ip in &s.assigned {
            if let Some(pool) = pools.pool_of(*ip) {
                let (on, _) = out.entry(*ip).or_insert((Vec::new(), pool));
                if on.iter().all(|o| s.may_share_with(o).is_ok()) {
                    on.push(s);
                }
            }
        }
    }
    out
}

/// The interface to announce `ip` on: the pool's, or the one whose subnet holds it. It must
/// be up (carrier): an owner without a working link must not keep the IP.
pub fn interface_for(ip: IpAddr, pool: &Pool, ifaces: &[Interface]) -> Result<Interface, String> {
    let found = match &pool.interface {
        Some(name) => ifaces.iter().find(|i| &i.name == name).ok_or_else(|| {
            format!(
                "pool {} names interface {name}, which this node lacks",
                pool.name
            )
        })?,
        None => ifaces
            .iter()
            .find(|i| i.holds(ip))
            .ok_or_else(|| format!("no interface on a subnet holding {ip}"))?,
    };
    if !found.up {
        return Err(format!("interface {} is down", found.name));
    }
    if found.mac.is_none() {
        return Err(format!("interface {} has no MAC address", found.name));
    }
    Ok(found.clone())
}

/// Addresses this node must never bind, with what they are: every address on its interfaces
/// that l2speaker did not add (`ifaces` list only those), and its gateways — except a host
/// address on a no-ARP link ([`other_agents_copies`]).
pub fn local_refusals(
    node: &str,
    ifaces: &[Interface],
    gateways: &[IpAddr],
) -> BTreeMap<IpAddr, String> {
    let mut out = BTreeMap::new();
    for g in gateways {
        out.insert(*g, format!("a gateway of {node}"));
    }
    for i in ifaces {
        for n in &i.nets {
            if is_other_agents_copy(i, n) {
                continue;
            }
            out.entry(n.addr()).or_insert_with(|| {
                format!(
                    "an address on {node}'s {} that l2speaker did not add",
                    i.name
                )
            });
        }
        if let Some(ll) = i.link_local {
            out.entry(IpAddr::V6(ll))
                .or_insert_with(|| format!("{node}'s link-local address on {}", i.name));
        }
    }
    out
}

/// A host address (/32, /128) on a link that answers no ARP: what kube-proxy in IPVS mode puts
/// on `kube-ipvs0` for every LoadBalancer IP on every node. Not a node address: refusing it
/// would make every node refuse every Service IP.
fn is_other_agents_copy(i: &Interface, n: &ipnet::IpNet) -> bool {
    i.noarp && n.prefix_len() == n.max_prefix_len()
}

/// The host addresses another agent put on a no-ARP link of this node, with the link's name:
/// reported (kube-proxy needs strict ARP beside l2speaker), never refused.
pub fn other_agents_copies(ifaces: &[Interface]) -> BTreeMap<IpAddr, String> {
    ifaces
        .iter()
        .flat_map(|i| {
            i.nets
                .iter()
                .filter(|n| is_other_agents_copy(i, n))
                .map(|n| (n.addr(), i.name.clone()))
        })
        .collect()
}

/// The subnets this node can announce a pool IP on when the pool names no interface: the
/// networks of its interfaces with a MAC that answer ARP (host routes, link-local and no-ARP
/// links carry none), as CIDRs, for its node Lease.
pub fn announce_subnets(ifaces: &[Interface]) -> Vec<String> {
    let nets: BTreeSet<ipnet::IpNet> = ifaces
        .iter()
        .filter(|i| !i.noarp && i.mac.is_some_and(|m| m != [0; 6]))
        .flat_map(|i| i.nets.iter())
        .filter(|n| n.prefix_len() < n.max_prefix_len())
        .filter(|n| !matches!(n.addr(), IpAddr::V6(v6) if v6.is_unicast_link_local()))
        .map(|n| n.trunc())
        .collect();
    nets.iter().map(ToString::to_string).collect()
}

/// Whether a node may announce the IPs of `pool` for `svc` (its labels; for
/// `externalTrafficPolicy: Local`, a ready endpoint on it).
pub fn node_may_announce(
    node: &str,
    labels: &BTreeMap<String, String>,
    pool: &Pool,
    svc: &ServiceInfo,
    slices: &[&EndpointSlice],
) -> Result<(), String> {
    if labels.contains_key(EXCLUDE_LABEL) {
        return Err(format!("node is labelled {EXCLUDE_LABEL}"));
    }
    if !pool.selects(labels) {
        return Err(format!(
            "pool {}'s node selector does not match the node",
            pool.name
        ));
    }
    if svc.local_traffic && !ready_nodes(slices).contains(node) {
        return Err("externalTrafficPolicy is Local and no ready endpoint runs here".into());
    }
    Ok(())
}

/// EndpointSlices by Service (`namespace/name`), indexed once so each VIP finds its own
/// without scanning them all.
pub fn slices_by_service(
    all: &[std::sync::Arc<EndpointSlice>],
) -> HashMap<String, Vec<&EndpointSlice>> {
    let mut by: HashMap<String, Vec<&EndpointSlice>> = HashMap::new();
    for s in all {
        let name = s
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get("kubernetes.io/service-name"));
        if let (Some(ns), Some(name)) = (s.metadata.namespace.as_deref(), name) {
            by.entry(format!("{ns}/{name}"))
                .or_default()
                .push(s.as_ref());
        }
    }
    by
}

/// The EndpointSlices of a Service, from the index.
pub fn slices_of<'a>(
    svc: &ServiceInfo,
    index: &HashMap<String, Vec<&'a EndpointSlice>>,
) -> Vec<&'a EndpointSlice> {
    index.get(&svc.key).cloned().unwrap_or_default()
}

fn ready(ep: &k8s_openapi::api::discovery::v1::Endpoint) -> bool {
    ep.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true)
}

/// Nodes running a ready endpoint.
pub fn ready_nodes(slices: &[&EndpointSlice]) -> BTreeSet<String> {
    slices
        .iter()
        .flat_map(|s| s.endpoints.iter())
        .filter(|e| ready(e))
        .filter_map(|e| e.node_name.clone())
        .collect()
}

/// Where the VIP's ports lead: ready endpoints of the VIP's family (only this node's for
/// `externalTrafficPolicy: Local`), matched to the Service's ports by port name. Endpoints
/// on `gone` nodes (a majority on the LAN declared their speakers dead) are left out before
/// Kubernetes marks them not ready, which takes it 40 s or more.
pub fn port_maps(
    vip: IpAddr,
    svc: &ServiceInfo,
    slices: &[&EndpointSlice],
    me: &str,
    gone: &BTreeSet<String>,
) -> Vec<PortMap> {
    let family = if vip.is_ipv4() { "IPv4" } else { "IPv6" };
    svc.ports
        .iter()
        .map(|sp| {
            let mut endpoints = BTreeSet::new();
            for s in slices.iter().filter(|s| s.address_type == family) {
                let Some(port) = s
                    .ports
                    .iter()
                    .flatten()
                    .find(|p| p.name.clone().unwrap_or_default() == sp.name)
                    .and_then(|p| p.port)
                else {
                    continue;
                };
                for e in s.endpoints.iter().filter(|e| ready(e)) {
                    if e.node_name.as_ref().is_some_and(|n| gone.contains(n)) {
                        continue;
                    }
                    let local = e.node_name.as_deref() == Some(me);
                    if svc.local_traffic && !local {
                        continue;
                    }
                    for a in &e.addresses {
                        if let (Ok(ip), Ok(port)) = (a.parse::<IpAddr>(), u16::try_from(port)) {
                            endpoints.insert(Endpoint { ip, port, local });
                        }
                    }
                }
            }
            PortMap {
                protocol: sp.protocol,
                port: sp.port,
                endpoints: endpoints.into_iter().collect(),
            }
        })
        .collect()
}

fn rendezvous(ip: IpAddr, node: &str) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (ip, node).hash(&mut h);
    h.finish()
}

/// The order in which `candidates` try to take the VIP at position `index` in its pool:
/// first the node picked round-robin (an even spread when all start together), then the rest
/// by rendezvous hash (so a dead node's VIPs spread over the survivors). `holder`, the node
/// that holds the Lease now, is left out: the order is for who takes over.
pub fn ranking(
    ip: IpAddr,
    index: u128,
    candidates: &BTreeSet<String>,
    holder: Option<&str>,
) -> Vec<String> {
    let cands: Vec<&String> = candidates
        .iter()
        .filter(|c| Some(c.as_str()) != holder)
        .collect();
    if cands.is_empty() {
        return vec![];
    }
    let first = cands[(index % cands.len() as u128) as usize].clone();
    let mut rest: Vec<&String> = cands.into_iter().filter(|c| **c != first).collect();
    rest.sort_by_key(|c| (rendezvous(ip, c), c.as_str()));
    std::iter::once(first)
        .chain(rest.into_iter().cloned())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pool::{IPPoolSpec, PoolInput};
    use crate::service::{Protocol, ServicePort};
    use serde_json::json;

    fn pools() -> Pools {
        let s = IPPoolSpec {
            addresses: vec!["192.0.2.200/29".into(), "2001:db8::200/125".into()],
            ..Default::default()
        };
        Pools::build(vec![PoolInput {
            name: "lan",
            age_key: "1".into(),
            spec: &s,
            last_valid: None,
        }])
    }

    fn svc(local: bool, assigned: &[&str]) -> ServiceInfo {
        ServiceInfo {
            want_v6: true,
            assigned: assigned.iter().map(|s| s.parse().unwrap()).collect(),
            local_traffic: local,
            ports: vec![ServicePort {
                name: "http".into(),
                protocol: Protocol::Tcp,
                port: 80,
            }],
            ..crate::service::fixture("web", "1")
        }
    }

    fn slice() -> EndpointSlice {
        serde_json::from_value(json!({
            "metadata": {"name": "web-1", "namespace": "default", "labels": {"kubernetes.io/service-name": "web"}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
            "endpoints": [
                {"addresses": ["198.51.100.18"], "nodeName": "node-1", "conditions": {"ready": true}},
                {"addresses": ["198.51.100.34"], "nodeName": "node-2"},
                {"addresses": ["198.51.100.35"], "nodeName": "node-2", "conditions": {"ready": false}},
            ]}))
        .unwrap()
    }

    fn iface(name: &str, net: &str, up: bool) -> Interface {
        Interface {
            name: name.into(),
            index: 2,
            mac: Some([2, 0, 0, 0, 0, 1]),
            up,
            nets: vec![net.parse().unwrap()],
            link_local: None,
            noarp: false,
        }
    }

    #[test]
    fn only_pool_addresses_of_our_services_are_vips() {
        let p = pools();
        let s = [svc(false, &["192.0.2.201", "203.0.113.9", "2001:db8::201"])];
        let v = vips(&s, &p);
        assert_eq!(
            v.keys().map(|k| k.to_string()).collect::<Vec<_>>(),
            ["192.0.2.201", "2001:db8::201"]
        );
    }

    #[test]
    fn the_interface_is_the_one_on_the_vips_subnet_and_must_be_up() {
        let p = &pools().pools[0];
        let ifs = [
            iface("eth1", "198.51.100.1/24", true),
            iface("eth0", "192.0.2.11/24", true),
        ];
        assert_eq!(
            interface_for("192.0.2.201".parse().unwrap(), p, &ifs)
                .unwrap()
                .name,
            "eth0"
        );
        assert!(
            interface_for("2001:db8::201".parse().unwrap(), p, &ifs)
                .unwrap_err()
                .contains("no interface")
        );
        let down = [iface("eth0", "192.0.2.11/24", false)];
        assert_eq!(
            interface_for("192.0.2.201".parse().unwrap(), p, &down).unwrap_err(),
            "interface eth0 is down"
        );
        let mut named = p.clone();
        named.interface = Some("eth1".into());
        assert_eq!(
            interface_for("192.0.2.201".parse().unwrap(), &named, &ifs)
                .unwrap()
                .name,
            "eth1"
        );
    }

    #[test]
    fn excluded_nodes_and_nodes_without_local_endpoints_may_not_announce() {
        let p = &pools().pools[0];
        let sl = slice();
        let slices = [&sl];
        let excluded: BTreeMap<String, String> =
            [(EXCLUDE_LABEL.to_string(), String::new())].into();
        assert!(node_may_announce("node-1", &excluded, p, &svc(false, &[]), &slices).is_err());
        assert!(
            node_may_announce("node-3", &BTreeMap::new(), p, &svc(false, &[]), &slices).is_ok()
        );
        assert!(
            node_may_announce("node-3", &BTreeMap::new(), p, &svc(true, &[]), &slices).is_err()
        );
        assert!(node_may_announce("node-2", &BTreeMap::new(), p, &svc(true, &[]), &slices).is_ok());
    }

    #[test]
    fn slices_are_found_by_their_services_namespace_and_name() {
        let sl = std::sync::Arc::new(slice());
        let mut other = slice();
        other.metadata.namespace = Some("elsewhere".into());
        let all = [sl, std::sync::Arc::new(other)];
        let index = slices_by_service(&all);
        assert_eq!(slices_of(&svc(false, &[]), &index).len(), 1);
        assert!(slices_of(&crate::service::fixture("nope", "1"), &index).is_empty());
    }

    #[test]
    fn port_maps_use_ready_endpoints_and_only_local_ones_for_local_traffic() {
        let sl = slice();
        let vip = "192.0.2.201".parse().unwrap();
        let none = BTreeSet::new();
        let maps = port_maps(vip, &svc(false, &[]), &[&sl], "node-1", &none);
        let eps: Vec<(String, u16, bool)> = maps[0]
            .endpoints
            .iter()
            .map(|e| (e.ip.to_string(), e.port, e.local))
            .collect();
        assert_eq!(
            eps,
            [
                ("198.51.100.18".into(), 8080, true),
                ("198.51.100.34".into(), 8080, false)
            ]
        );
        let local = port_maps(vip, &svc(true, &[]), &[&sl], "node-2", &none);
        assert_eq!(local[0].endpoints.len(), 1);
        // node-2 declared dead on the LAN: its endpoint leaves before Kubernetes says so.
        let gone = BTreeSet::from(["node-2".to_string()]);
        let maps = port_maps(vip, &svc(false, &[]), &[&sl], "node-1", &gone);
        assert_eq!(maps[0].endpoints.len(), 1);
        assert_eq!(maps[0].endpoints[0].ip.to_string(), "198.51.100.18");
        assert!(
            port_maps(
                "2001:db8::201".parse().unwrap(),
                &svc(false, &[]),
                &[&sl],
                "node-1",
                &none
            )[0]
            .endpoints
            .is_empty(),
            "no IPv6 slice"
        );
    }

    #[test]
    fn a_service_ip_on_a_no_arp_link_is_another_agents_copy_not_a_node_address() {
        let mut ipvs = iface("kube-ipvs0", "192.0.2.200/32", false);
        ipvs.noarp = true;
        ipvs.nets.push("10.9.0.1/24".parse().unwrap());
        let ifaces = [iface("eth0", "192.0.2.11/24", true), ipvs];
        let r = local_refusals("node-1", &ifaces, &[]);
        let vip: IpAddr = "192.0.2.200".parse().unwrap();
        assert!(!r.contains_key(&vip), "{r:?}");
        assert!(
            r.contains_key(&"10.9.0.1".parse::<IpAddr>().unwrap()),
            "a subnet address on a dummy link is still the node's"
        );
        assert_eq!(
            other_agents_copies(&ifaces),
            BTreeMap::from([(vip, "kube-ipvs0".to_string())])
        );
        // The same host address on an ARP link is refused as before.
        let arp = [iface("eth1", "192.0.2.200/32", true)];
        assert!(local_refusals("node-1", &arp, &[]).contains_key(&vip));
        assert!(other_agents_copies(&arp).is_empty());
    }

    #[test]
    fn a_nodes_own_addresses_and_gateways_are_refused_with_what_they_are() {
        let ifaces = [iface("eth0", "192.0.2.11/24", true)];
        let gw: IpAddr = "192.0.2.1".parse().unwrap();
        let r = local_refusals("node-1", &ifaces, &[gw]);
        assert_eq!(r[&gw], "a gateway of node-1");
        assert_eq!(
            r[&"192.0.2.11".parse::<IpAddr>().unwrap()],
            "an address on node-1's eth0 that l2speaker did not add"
        );
        assert!(!r.contains_key(&"192.0.2.200".parse::<IpAddr>().unwrap()));
    }

    #[test]
    fn ranking_spreads_round_robin_and_skips_the_holder() {
        let nodes: BTreeSet<String> = ["node-1", "node-2", "node-3"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let ip = "192.0.2.200".parse().unwrap();
        let firsts: Vec<String> = (0..6)
            .map(|i| ranking(ip, i, &nodes, None)[0].clone())
            .collect();
        assert_eq!(
            firsts,
            ["node-1", "node-2", "node-3", "node-1", "node-2", "node-3"]
        );
        let r = ranking(ip, 0, &nodes, Some("node-1"));
        assert_eq!(r.len(), 2);
        assert!(!r.contains(&"node-1".to_string()));
    }
}
