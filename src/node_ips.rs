//! Node-IP mode, as k3s ServiceLB does it: a Service is published on the addresses of the
//! nodes themselves, and each serving node DNATs its own address and the Service's ports to
//! the endpoints. Nothing is bound or announced: a node answers for its own address anyway.
//!
//! Pure decisions: which Services are in node-IP mode, which nodes serve each (alive, allowed
//! by labels, a ready local endpoint for `externalTrafficPolicy: Local`, the ports free on
//! the node and not served there for an older Service), and what goes in the status.

use std::collections::{BTreeMap, BTreeSet};
use std::hash::{Hash, Hasher};
use std::net::IpAddr;

use k8s_openapi::api::core::v1::Node;

use crate::allocator::Refusal;
use crate::service::{NodeIps, Protocol, ServiceInfo};

/// k3s ServiceLB's node label: when any node has it, only nodes with `true` serve.
pub const LABEL_K3S_ENABLELB: &str = "svccontroller.k3s.cattle.io/enablelb";
/// The node label matching a Service's `lbpool` label.
pub use crate::service::LABEL_K3S_LBPOOL;

/// A protocol and port, `tcp/80`.
pub type Port = (Protocol, u16);

pub fn format_port((proto, port): &Port) -> String {
    format!("{}/{port}", proto.as_str())
}

pub fn parse_port(s: &str) -> Option<Port> {
    let (proto, port) = s.split_once('/')?;
    let proto = match proto {
        "tcp" => Protocol::Tcp,
        "udp" => Protocol::Udp,
        "sctp" => Protocol::Sctp,
        _ => return None,
    };
    Some((proto, port.parse().ok()?))
}

/// What decides whether a Service is in node-IP mode besides the Service itself.
#[derive(Debug, Clone, Default)]
pub struct Context {
    /// No IPPool exists at all.
    pub no_pools: bool,
    /// Every address of every Node (any type).
    pub node_addresses: BTreeSet<IpAddr>,
    /// The mode of Services that do not say (None: the automatic mode is off).
    pub default: Option<NodeIps>,
}

/// Whether `ip` in `svc`'s status is a pool address: no node's address now, and not published
/// on a node (ipMode Proxy), also once that node is gone.
pub fn pool_address(svc: &ServiceInfo, ctx: &Context, ip: &IpAddr) -> bool {
    !ctx.node_addresses.contains(ip) && !svc.proxied.contains(ip)
}

/// Whether `svc` is in node-IP mode, and how: its annotation says so (an unreadable value
/// counts as no annotation), or no IPPool exists at all and nothing about the Service asks for a pool
/// address (a wanted IP, a pool name, an address in its status that is no node's, or a pool
/// address withdrawn while no pool existed: deleting the last pool does not move Services
/// onto the nodes). A status holding node addresses only, as k3s ServiceLB leaves it, does
/// not count.
pub fn mode(svc: &ServiceInfo, ctx: &Context) -> Option<NodeIps> {
    // An unreadable annotation counts as none (the allocator says so in a Warning).
    if let Some(Ok(m)) = &svc.node_ips {
        return Some(*m);
    }
    let asks_for_a_pool = !svc.requested.is_empty()
        || !svc.bad_requests.is_empty()
        || svc.pool.is_some()
        || svc.assigned.iter().any(|ip| pool_address(svc, ctx, ip))
        || svc.pool_withdrawn;
    if ctx.no_pools && !asks_for_a_pool {
        return ctx.default;
    }
    None
}

/// Every address of every Node.
pub fn all_node_addresses<'a>(nodes: impl IntoIterator<Item = &'a Node>) -> BTreeSet<IpAddr> {
    nodes
        .into_iter()
        .flat_map(|n| n.status.iter().flat_map(|s| s.addresses.iter().flatten()))
        .filter_map(|a| a.address.parse().ok())
        .collect()
}

/// The addresses a node is published with: per family, its first ExternalIP, else its
/// first InternalIP.
pub fn node_addresses(node: &Node) -> Vec<IpAddr> {
    let all: Vec<(&str, IpAddr)> = node
        .status
        .iter()
        .flat_map(|s| s.addresses.iter().flatten())
        .filter_map(|a| Some((a.type_.as_str(), a.address.parse().ok()?)))
        .collect();
    let mut out = Vec::new();
    for v4 in [true, false] {
        let pick = ["ExternalIP", "InternalIP"].iter().find_map(|kind| {
            all.iter()
                .find(|(t, ip)| t == kind && ip.is_ipv4() == v4)
                .map(|(_, ip)| *ip)
        });
        out.extend(pick);
    }
    out
}

/// A node as the allocator sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct Candidate {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    /// See [`node_addresses`].
    pub addresses: Vec<IpAddr>,
    /// Its speaker is alive (heard on the LAN, not declared dead).
    pub alive: bool,
    /// Ports something on the node listens on, as its speaker publishes them.
    pub busy: BTreeSet<Port>,
}

impl Candidate {
    pub fn from_node(node: &Node, alive: bool, busy: BTreeSet<Port>) -> Candidate {
        use kube::ResourceExt;
        Candidate {
            name: node.name_any(),
            labels: node.labels().clone(),
            addresses: node_addresses(node),
            alive,
            busy,
        }
    }
}

/// A Service in node-IP mode, with the nodes running a ready endpoint of it.
pub struct Request<'a> {
    pub svc: &'a ServiceInfo,
    pub mode: NodeIps,
    pub ready: BTreeSet<String>,
}

#[derive(Debug, Default, PartialEq)]
pub struct Assignment {
    /// Each Service's ingress addresses (IPv4 first), and the nodes serving it.
    pub desired: BTreeMap<String, Vec<IpAddr>>,
    pub serving: BTreeMap<String, Vec<String>>,
    pub refusals: Vec<Refusal>,
}

fn spread(key: &str, node: &str) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (key, node).hash(&mut h);
    h.finish()
}

/// Which nodes serve which Service, oldest Service first (of two created in the same second,
/// the one already published): a node serves a Service when its
/// speaker is alive, its labels allow it (not excluded; k3s `enablelb` and `lbpool`), it
/// has an address of a family the Service wants, it runs a ready endpoint when the traffic
/// policy is Local, nothing on it listens on the Service's ports, and no older Service is
/// served there on one of them. In `one` mode the node already published keeps the Service
/// while it can; otherwise one is picked by a hash of the Service (spread over the nodes).
pub fn assign(requests: &[Request], nodes: &[Candidate]) -> Assignment {
    let mut out = Assignment::default();
    let k3s_opt_in = nodes
        .iter()
        .any(|n| n.labels.contains_key(LABEL_K3S_ENABLELB));
    let mut order: Vec<&Request> = requests.iter().collect();
    // Creation times have whole seconds: between two of the same age, the one published
    // already keeps its ports (no flapping), then the name decides.
    order.sort_by(|a, b| {
        (&a.svc.created, a.svc.assigned.is_empty(), &a.svc.key).cmp(&(
            &b.svc.created,
            b.svc.assigned.is_empty(),
            &b.svc.key,
        ))
    });
    // Node → port → the Service served there on it.
    let mut taken: BTreeMap<&str, BTreeMap<Port, &str>> = BTreeMap::new();
    for r in order {
        let s = r.svc;
        let refuse = |out: &mut Assignment, reason: &'static str, message: String| {
            out.refusals.push(Refusal {
                service: s.key.clone(),
                reason,
                message,
            });
        };
        let ports: BTreeSet<Port> = s.ports.iter().map(|p| (p.protocol, p.port)).collect();
        let families = |n: &Candidate| -> Vec<IpAddr> {
            n.addresses
                .iter()
                .copied()
                .filter(|ip| if ip.is_ipv4() { s.want_v4 } else { s.want_v6 })
                .collect()
        };
        let (mut alive, mut allowed, mut local, mut busy_on, mut clash_on) = (0, 0, 0, 0, 0);
        let mut fit: Vec<&Candidate> = Vec::new();
        for n in nodes {
            if !n.alive {
                continue;
            }
            alive += 1;
            let label = |k: &str| n.labels.get(k).map(String::as_str);
            if n.labels.contains_key(crate::plan::EXCLUDE_LABEL)
                || (k3s_opt_in && label(LABEL_K3S_ENABLELB) != Some("true"))
                || s.lbpool
                    .as_deref()
                    .is_some_and(|p| label(LABEL_K3S_LBPOOL) != Some(p))
                || families(n).is_empty()
            {
                continue;
            }
            allowed += 1;
            if s.local_traffic && !r.ready.contains(&n.name) {
                continue;
            }
            local += 1;
            let busy: Vec<String> = ports.intersection(&n.busy).map(format_port).collect();
            if !busy.is_empty() {
                busy_on += 1;
                refuse(
                    &mut out,
                    "PortInUse",
                    format!(
                        "{} listens on {} itself; it does not serve this Service",
                        n.name,
                        busy.join(", ")
                    ),
                );
                continue;
            }
            let on_node = taken.get(n.name.as_str());
            let clash: Vec<String> = ports
                .iter()
                .filter_map(|p| {
                    let by = on_node.and_then(|t| t.get(p))?;
                    Some(format!("{} for {by}", format_port(p)))
                })
                .collect();
            if !clash.is_empty() {
                clash_on += 1;
                refuse(
                    &mut out,
                    "PortConflict",
                    format!(
                        "{} serves {}, an older Service; it does not serve this one",
                        n.name,
                        clash.join(", ")
                    ),
                );
                continue;
            }
            fit.push(n);
        }
        let chosen: Vec<&Candidate> = match r.mode {
            NodeIps::All => fit,
            NodeIps::One => {
                let kept = fit
                    .iter()
                    .find(|n| families(n).iter().any(|ip| s.assigned.contains(ip)));
                kept.or_else(|| {
                    fit.iter()
                        .min_by_key(|n| (spread(&s.key, &n.name), n.name.clone()))
                })
                .map(|n| vec![*n])
                .unwrap_or_default()
            }
        };
        if chosen.is_empty() {
            refuse(
                &mut out,
                "NoNode",
                format!(
                    "no node can serve it: of {} nodes, {alive} have a live speaker, {allowed} of those are allowed by their labels and have an address of the Service's family{}; on {busy_on} a port is in use by the node itself, on {clash_on} by an older Service",
                    nodes.len(),
                    if s.local_traffic {
                        format!(
                            ", {local} of those run a ready endpoint (externalTrafficPolicy: Local)"
                        )
                    } else {
                        String::new()
                    }
                ),
            );
        }
        let mut ips: Vec<IpAddr> = Vec::new();
        for n in &chosen {
            for p in &ports {
                taken.entry(n.name.as_str()).or_default().insert(*p, &s.key);
            }
            ips.extend(families(n));
        }
        ips.sort_by_key(|ip| (!ip.is_ipv4(), *ip));
        out.desired.insert(s.key.clone(), ips);
        out.serving.insert(
            s.key.clone(),
            chosen.iter().map(|n| n.name.clone()).collect(),
        );
    }
    out
}

/// The ports of node-IP Services a speaker has checked against its node's sockets, and the
/// ones found in use.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PortCheck {
    pub checked: BTreeSet<Port>,
    pub busy: BTreeSet<Port>,
}

impl PortCheck {
    /// Checked, and nothing listens on it.
    pub fn free(&self, p: &Port) -> bool {
        self.checked.contains(p) && !self.busy.contains(p)
    }
}

/// The ports of `wanted` that something on this node listens on: a socket bound to the
/// wildcard address or to one of `mine`.
pub fn busy_ports(
    listening: &[(Protocol, IpAddr, u16)],
    mine: &[IpAddr],
    wanted: &BTreeSet<Port>,
) -> BTreeSet<Port> {
    listening
        .iter()
        .filter(|(_, ip, _)| ip.is_unspecified() || mine.contains(ip))
        .map(|(proto, _, port)| (*proto, *port))
        .filter(|p| wanted.contains(p))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::service::ServicePort;
    use serde_json::json;

    fn svc(name: &str, created: &str, ports: &[u16]) -> ServiceInfo {
        ServiceInfo {
            ports: ports
                .iter()
                .map(|p| ServicePort {
                    name: String::new(),
                    protocol: Protocol::Tcp,
                    port: *p,
                })
                .collect(),
            ..crate::service::fixture(name, created)
        }
    }

    fn node(i: u8, labels: &[(&str, &str)]) -> Candidate {
        Candidate {
            name: format!("node-{i}"),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            addresses: vec![
                format!("192.0.2.{i}").parse().unwrap(),
                format!("2001:db8::{i}").parse().unwrap(),
            ],
            alive: true,
            busy: BTreeSet::new(),
        }
    }

    fn req(svc: &ServiceInfo, mode: NodeIps) -> Request<'_> {
        Request {
            svc,
            mode,
            ready: BTreeSet::new(),
        }
    }

    fn ips(v: &[&str]) -> Vec<IpAddr> {
        v.iter().map(|s| s.parse().unwrap()).collect()
    }

    fn ctx(no_pools: bool, default: Option<NodeIps>) -> Context {
        Context {
            no_pools,
            node_addresses: ips(&["192.0.2.1", "192.0.2.2"]).into_iter().collect(),
            default,
        }
    }

    #[test]
    fn the_mode_comes_from_the_annotation_or_from_there_being_no_pool_at_all() {
        let all = ctx(true, Some(NodeIps::All));
        let plain = svc("a", "1", &[80]);
        assert_eq!(mode(&plain, &all), Some(NodeIps::All));
        let pools = ctx(false, Some(NodeIps::All));
        assert_eq!(mode(&plain, &pools), None, "pools exist");
        assert_eq!(mode(&plain, &ctx(true, None)), None, "automatic mode off");
        let mut wants = plain.clone();
        wants.requested = ips(&["192.0.2.200"]);
        assert_eq!(mode(&wants, &all), None);
        let mut had_one = plain.clone();
        had_one.assigned = ips(&["192.0.2.200"]);
        assert_eq!(mode(&had_one, &all), None, "a pool address in the status");
        let mut from_k3s = plain.clone();
        from_k3s.assigned = ips(&["192.0.2.1", "192.0.2.2"]);
        assert_eq!(
            mode(&from_k3s, &all),
            Some(NodeIps::All),
            "node addresses in the status (ServiceLB's) do not ask for a pool"
        );
        let mut withdrawn = plain.clone();
        withdrawn.pool_withdrawn = true;
        assert_eq!(
            mode(&withdrawn, &all),
            None,
            "a Service whose pool was deleted is not moved to the nodes"
        );
        let mut one = plain.clone();
        one.node_ips = Some(Ok(NodeIps::One));
        assert_eq!(mode(&one, &ctx(false, None)), Some(NodeIps::One));
        let mut node_gone = plain.clone();
        node_gone.assigned = ips(&["192.0.2.9"]);
        node_gone.proxied = ips(&["192.0.2.9"]);
        assert_eq!(
            mode(&node_gone, &all),
            Some(NodeIps::All),
            "an address published on a node that is gone now is no pool address"
        );
        let s = ServiceInfo::from_service(
            &serde_json::from_value(json!({"metadata": {"name": "x", "annotations": {crate::service::ANNOTATION_NODE_IPS: "some"}}, "spec": {"type": "LoadBalancer"}})).unwrap(),
        );
        let err = s.node_ips.clone().unwrap().unwrap_err();
        assert!(err.contains("\"some\""), "{err}");
        assert_eq!(mode(&s, &ctx(false, None)), None, "as if not annotated");
        assert_eq!(mode(&s, &all), Some(NodeIps::All), "as if not annotated");
    }

    #[test]
    fn every_live_allowed_node_serves_and_the_external_address_wins() {
        let s = svc("web", "1", &[80]);
        let mut dead = node(3, &[]);
        dead.alive = false;
        let excluded = node(4, &[(crate::plan::EXCLUDE_LABEL, "")]);
        let a = assign(
            &[req(&s, NodeIps::All)],
            &[node(1, &[]), node(2, &[]), dead, excluded],
        );
        assert_eq!(a.desired["default/web"], ips(&["192.0.2.1", "192.0.2.2"]));
        assert_eq!(a.serving["default/web"], ["node-1", "node-2"]);
        let n: Node = serde_json::from_value(json!({"metadata": {"name": "n"}, "status": {"addresses": [
            {"type": "InternalIP", "address": "198.51.100.1"}, {"type": "Hostname", "address": "n"},
            {"type": "ExternalIP", "address": "203.0.113.1"}, {"type": "InternalIP", "address": "2001:db8::1"}]}}))
        .unwrap();
        assert_eq!(node_addresses(&n), ips(&["203.0.113.1", "2001:db8::1"]));
    }

    #[test]
    fn k3s_labels_pick_the_nodes() {
        let s = svc("web", "1", &[80]);
        let mut pooled = svc("pooled", "2", &[81]);
        pooled.lbpool = Some("blue".into());
        let nodes = [
            node(1, &[(LABEL_K3S_ENABLELB, "true")]),
            node(2, &[(LABEL_K3S_ENABLELB, "false")]),
            node(3, &[]),
            node(
                4,
                &[(LABEL_K3S_ENABLELB, "true"), (LABEL_K3S_LBPOOL, "blue")],
            ),
        ];
        let a = assign(&[req(&s, NodeIps::All), req(&pooled, NodeIps::All)], &nodes);
        assert_eq!(a.serving["default/web"], ["node-1", "node-4"]);
        assert_eq!(a.serving["default/pooled"], ["node-4"]);
        let plain = [node(1, &[]), node(2, &[])];
        assert_eq!(
            assign(&[req(&s, NodeIps::All)], &plain).serving["default/web"],
            ["node-1", "node-2"],
            "without any enablelb label every node serves"
        );
    }

    #[test]
    fn the_older_service_keeps_a_port_and_busy_ports_are_refused() {
        let old = svc("old", "1", &[80]);
        let new = svc("new", "2", &[80, 443]);
        let other = svc("other", "3", &[8443]);
        let mut ssh = node(2, &[]);
        ssh.busy.insert((Protocol::Tcp, 443));
        let a = assign(
            &[
                req(&new, NodeIps::All),
                req(&old, NodeIps::All),
                req(&other, NodeIps::All),
            ],
            &[node(1, &[]), ssh, node(3, &[])],
        );
        assert_eq!(a.serving["default/old"], ["node-1", "node-2", "node-3"]);
        assert!(a.serving["default/new"].is_empty());
        assert_eq!(
            a.serving["default/other"].len(),
            3,
            "other ports do not clash"
        );
        let said: Vec<(&str, &str)> = a
            .refusals
            .iter()
            .map(|r| (r.reason, r.message.as_str()))
            .collect();
        assert!(said.contains(&(
            "PortInUse",
            "node-2 listens on tcp/443 itself; it does not serve this Service"
        )));
        assert!(said.contains(&(
            "PortConflict",
            "node-1 serves tcp/80 for default/old, an older Service; it does not serve this one"
        )));
        assert!(said.iter().any(|(r, _)| *r == "NoNode"));
    }

    #[test]
    fn of_two_services_created_in_one_second_the_published_one_keeps_the_port() {
        let mut old = svc("old", "1", &[80]);
        old.assigned = ips(&["192.0.2.1"]);
        let new = svc("new", "1", &[80]);
        let a = assign(
            &[req(&new, NodeIps::All), req(&old, NodeIps::All)],
            &[node(1, &[])],
        );
        assert_eq!(a.serving["default/old"], ["node-1"]);
        assert!(
            a.serving["default/new"].is_empty(),
            "\"new\" sorts first by name only"
        );
    }

    #[test]
    fn one_node_mode_keeps_its_node_and_fails_over_when_it_dies() {
        let mut s = svc("web", "1", &[80]);
        let nodes = [node(1, &[]), node(2, &[]), node(3, &[])];
        let first = assign(&[req(&s, NodeIps::One)], &nodes);
        let chosen = first.serving["default/web"].clone();
        assert_eq!(chosen.len(), 1);
        s.assigned = first.desired["default/web"].clone();
        assert_eq!(
            assign(&[req(&s, NodeIps::One)], &nodes).serving["default/web"],
            chosen
        );
        let survivors: Vec<Candidate> = nodes
            .iter()
            .cloned()
            .map(|mut n| {
                n.alive = n.name != chosen[0];
                n
            })
            .collect();
        let after = assign(&[req(&s, NodeIps::One)], &survivors);
        assert_eq!(after.serving["default/web"].len(), 1);
        assert_ne!(after.serving["default/web"], chosen);
    }

    #[test]
    fn local_traffic_needs_a_ready_endpoint_and_no_node_is_explained() {
        let mut s = svc("web", "1", &[80]);
        s.local_traffic = true;
        s.want_v6 = true;
        let r = Request {
            svc: &s,
            mode: NodeIps::All,
            ready: ["node-2".to_string()].into(),
        };
        let a = assign(&[r], &[node(1, &[]), node(2, &[])]);
        assert_eq!(a.desired["default/web"], ips(&["192.0.2.2", "2001:db8::2"]));
        let none = assign(
            &[Request {
                svc: &s,
                mode: NodeIps::All,
                ready: BTreeSet::new(),
            }],
            &[node(1, &[])],
        );
        assert!(none.desired["default/web"].is_empty());
        assert_eq!(
            none.refusals[0].message,
            "no node can serve it: of 1 nodes, 1 have a live speaker, 1 of those are allowed by their labels and have an address of the Service's family, 0 of those run a ready endpoint (externalTrafficPolicy: Local); on 0 a port is in use by the node itself, on 0 by an older Service"
        );
    }

    #[test]
    fn busy_ports_are_listeners_on_the_wildcard_or_a_node_address() {
        let mine = ips(&["192.0.2.1"]);
        let wanted: BTreeSet<Port> = [
            (Protocol::Tcp, 22),
            (Protocol::Tcp, 80),
            (Protocol::Udp, 53),
        ]
        .into();
        let listening = [
            (Protocol::Tcp, "0.0.0.0".parse().unwrap(), 22),
            (Protocol::Tcp, "127.0.0.1".parse().unwrap(), 80),
            (Protocol::Udp, "192.0.2.1".parse().unwrap(), 53),
            (Protocol::Tcp, "::".parse().unwrap(), 8080),
        ];
        assert_eq!(
            busy_ports(&listening, &mine, &wanted),
            [(Protocol::Tcp, 22), (Protocol::Udp, 53)].into()
        );
        assert_eq!(parse_port("udp/53"), Some((Protocol::Udp, 53)));
        assert_eq!(format_port(&(Protocol::Tcp, 22)), "tcp/22");
        assert_eq!(parse_port("tcp/x"), None);
    }
}
