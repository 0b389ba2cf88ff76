//! What the speaker reads from a `Service`: whether it is ours, which IPs it asks for and
//! has, its ports and traffic policy.

use std::net::IpAddr;

use k8s_openapi::api::core::v1::Service;
use kube::ResourceExt;

/// Lists wanted IPs, one per family, comma-separated (needed for dual-stack, where the
/// single-valued `spec.loadBalancerIP` cannot say it).
pub const ANNOTATION_IPS: &str = "l2speaker.io/load-balancer-ips";
/// At most this many wanted IPs are read from a Service (only one per family is allowed, but a
/// short list gets an Event per bad entry); a longer list is refused whole with one Event.
pub const MAX_WANTED: usize = 16;
/// Names the pool to take an address from.
pub const ANNOTATION_POOL: &str = "l2speaker.io/pool";
/// Services with the same value (a sharing key) and disjoint ports share one pool IP, one
/// Lease and one owner. MetalLB's annotations are read too, so its users keep theirs.
pub const ANNOTATION_SHARED_IP: &str = "l2speaker.io/allow-shared-ip";
const METALLB_SHARED_IP: [&str; 2] = [
    "metallb.io/allow-shared-ip",
    "metallb.universe.tf/allow-shared-ip",
];
/// Exposes the Service on node addresses (`all` eligible nodes, or `one`) whether or not
/// IPPools exist.
pub const ANNOTATION_NODE_IPS: &str = "l2speaker.io/node-ips";
/// k3s ServiceLB's Service label: only nodes labelled with the same pool serve it.
pub const LABEL_K3S_LBPOOL: &str = "svccontroller.k3s.cattle.io/lbpool";
/// The Service condition the allocator sets when it withdrew a pool address while no IPPool
/// exists: such a Service is not moved to node addresses behind the operator's back.
pub const CONDITION_POOL_WITHDRAWN: &str = "l2speaker.io/PoolAddressWithdrawn";

/// How a Service in node-IP mode is published: on every eligible node, or on one at a time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum NodeIps {
    All,
    One,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
            Protocol::Sctp => "sctp",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct ServicePort {
    pub name: String,
    pub protocol: Protocol,
    pub port: u16,
}

/// `sessionAffinityConfig.clientIP.timeoutSeconds` when unset (Kubernetes' default).
pub const DEFAULT_AFFINITY_SECONDS: u32 = 10_800;

/// The parts of a Service the speaker acts on.
#[derive(Debug, Clone, PartialEq)]
pub struct ServiceInfo {
    /// `namespace/name`.
    pub key: String,
    pub namespace: String,
    pub name: String,
    pub uid: String,
    /// Orders services by age (`creationTimestamp`, then key).
    pub created: String,
    pub load_balancer: bool,
    /// `spec.loadBalancerClass`.
    pub class: Option<String>,
    /// Wanted IPs, parsed; entries that do not parse are in `bad_requests`.
    pub requested: Vec<IpAddr>,
    pub bad_requests: Vec<String>,
    pub pool: Option<String>,
    /// Families to assign, in order (`spec.ipFamilies` and `spec.ipFamilyPolicy`).
    pub want_v4: bool,
    pub want_v6: bool,
    /// IPs in `status.loadBalancer.ingress`.
    pub assigned: Vec<IpAddr>,
    pub local_traffic: bool,
    pub ports: Vec<ServicePort>,
    /// `spec.loadBalancerSourceRanges` (None when unset or empty: any source). Entries that
    /// are neither a CIDR nor an address are left out (the API server refuses them); a list
    /// of nothing but such entries allows no source rather than every source.
    pub source_ranges: Option<Vec<ipnet::IpNet>>,
    /// `sessionAffinity: ClientIP`: seconds a client keeps its endpoint (the Service's
    /// `timeoutSeconds`, 10800 by default, at most a day).
    pub affinity: Option<u32>,
    /// The node-IP annotation: its mode, or the unreadable value.
    pub node_ips: Option<Result<NodeIps, String>>,
    /// The IP-sharing key (see [`ANNOTATION_SHARED_IP`]).
    pub sharing: Option<String>,
    /// k3s' `lbpool` label.
    pub lbpool: Option<String>,
    /// The `ipMode`s the status's ingress names (API servers before 1.30 drop the field).
    pub ip_modes: std::collections::BTreeSet<String>,
    /// Ingress addresses published with `ipMode: Proxy` (on nodes).
    pub proxied: Vec<IpAddr>,
    /// `spec.selector` (IP sharing with `Local` needs the same pods).
    pub selector: std::collections::BTreeMap<String, String>,
    /// The allocator withdrew a pool address while no pool existed (see
    /// [`CONDITION_POOL_WITHDRAWN`]).
    pub pool_withdrawn: bool,
}

impl ServiceInfo {
    pub fn from_service(svc: &Service) -> ServiceInfo {
        let spec = svc.spec.clone().unwrap_or_default();
        let annotations = svc.annotations();
        let mut requested = Vec::new();
        let mut bad_requests = Vec::new();
        let wanted = annotations
            .get(ANNOTATION_IPS)
            .map(|s| {
                s.split(',')
                    .map(|x| x.trim().to_string())
                    .filter(|x| !x.is_empty())
                    .collect::<Vec<_>>()
            })
            .unwrap_or_else(|| {
                spec.load_balancer_ip
                    .iter()
                    .filter(|s| !s.is_empty())
                    .cloned()
                    .collect()
            });
        if wanted.len() > MAX_WANTED {
            // One refusal for the lot, not one per entry (an annotation can list thousands).
            bad_requests.push(format!(
                "{} addresses listed; at most one per family is allowed",
                wanted.len()
            ));
        } else {
            for w in wanted {
                match w.parse::<IpAddr>() {
                    Ok(ip) => requested.push(ip),
                    Err(_) => bad_requests.push(w.chars().take(64).collect()),
                }
            }
        }
        let families = spec.ip_families.clone().unwrap_or_default();
        let dual = matches!(
            spec.ip_family_policy.as_deref(),
            Some("PreferDualStack" | "RequireDualStack")
        );
        let (want_v4, want_v6) = match (families.first().map(String::as_str), dual) {
            (_, true) => (true, true),
            (Some("IPv6"), false) => (false, true),
            _ => (true, false),
        };
        let ingress: &[k8s_openapi::api::core::v1::LoadBalancerIngress] = svc
            .status
            .as_ref()
            .and_then(|s| s.load_balancer.as_ref())
            .and_then(|lb| lb.ingress.as_deref())
            .unwrap_or_default();
        let ip =
            |i: &k8s_openapi::api::core::v1::LoadBalancerIngress| i.ip.as_deref()?.parse().ok();
        let assigned = ingress.iter().filter_map(ip).collect();
        let ports = spec
            .ports
            .unwrap_or_default()
            .into_iter()
            .filter_map(|p| {
                let protocol = match p.protocol.as_deref().unwrap_or("TCP") {
                    "TCP" => Protocol::Tcp,
                    "UDP" => Protocol::Udp,
                    "SCTP" => Protocol::Sctp,
                    _ => return None,
                };
                Some(ServicePort {
                    name: p.name.unwrap_or_default(),
                    protocol,
                    port: u16::try_from(p.port).ok()?,
                })
            })
            .collect();
        let source_ranges = spec
            .load_balancer_source_ranges
            .as_ref()
            .filter(|r| !r.is_empty())
            .map(|r| {
                r.iter()
                    .filter_map(|x| {
                        let x = x.trim();
                        x.parse::<ipnet::IpNet>()
                            .ok()
                            .or_else(|| x.parse::<IpAddr>().ok().map(ipnet::IpNet::from))
                    })
                    .collect()
            });
        let affinity = (spec.session_affinity.as_deref() == Some("ClientIP")).then(|| {
            spec.session_affinity_config
                .as_ref()
                .and_then(|c| c.client_ip.as_ref())
                .and_then(|c| c.timeout_seconds)
                .map_or(DEFAULT_AFFINITY_SECONDS, |t| t.clamp(1, 86_400) as u32)
        });
        let node_ips = annotations
            .get(ANNOTATION_NODE_IPS)
            .map(|v| match v.trim() {
                "all" | "true" => Ok(NodeIps::All),
                "one" => Ok(NodeIps::One),
                other => Err(format!(
                    "{ANNOTATION_NODE_IPS}: {:?} is neither \"all\" nor \"one\"",
                    other.chars().take(64).collect::<String>()
                )),
            });
        let pool_withdrawn = svc
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|c| {
                c.iter()
                    .any(|c| c.type_ == CONDITION_POOL_WITHDRAWN && c.status == "True")
            });
        let namespace = svc.namespace().unwrap_or_default();
        let name = svc.name_any();
        ServiceInfo {
            node_ips,
            lbpool: svc.labels().get(LABEL_K3S_LBPOOL).cloned(),
            sharing: std::iter::once(ANNOTATION_SHARED_IP)
                .chain(METALLB_SHARED_IP)
                .find_map(|k| annotations.get(k))
                .map(|v| v.trim().to_string())
                .filter(|v| !v.is_empty()),
            ip_modes: ingress.iter().filter_map(|i| i.ip_mode.clone()).collect(),
            proxied: ingress
                .iter()
                .filter(|i| i.ip_mode.as_deref() == Some("Proxy"))
                .filter_map(ip)
                .collect(),
            selector: svc
                .spec
                .as_ref()
                .and_then(|s| s.selector.clone())
                .unwrap_or_default(),
            pool_withdrawn,
            key: format!("{namespace}/{name}"),
            uid: svc.uid().unwrap_or_default(),
            created: svc
                .creation_timestamp()
                .map(|t| t.0.to_string())
                .unwrap_or_default(),
            load_balancer: spec.type_.as_deref() == Some("LoadBalancer"),
            class: spec.load_balancer_class.clone(),
            requested,
            bad_requests,
            pool: annotations.get(ANNOTATION_POOL).cloned(),
            want_v4,
            want_v6,
            assigned,
            local_traffic: spec.external_traffic_policy.as_deref() == Some("Local"),
            ports,
            source_ranges,
            affinity,
            namespace,
            name,
        }
    }

    /// Whether `self` may share an IP with `other`: the same sharing key, the same traffic
    /// policy, and no port (protocol and number) in common. Err says why not.
    pub fn may_share_with(&self, other: &ServiceInfo) -> Result<(), String> {
        match (&self.sharing, &other.sharing) {
            (Some(a), Some(b)) if a == b => {}
            (Some(_), Some(_)) => return Err(format!("{} has another sharing key", other.key)),
            _ => return Err(format!("it is assigned to {}", other.key)),
        }
        if self.local_traffic != other.local_traffic {
            return Err(format!("{} has another externalTrafficPolicy", other.key));
        }
        // With Local, the owner must run a ready endpoint of each: the same pods.
        if self.local_traffic && self.selector != other.selector {
            return Err(format!(
                "{} selects other pods (with externalTrafficPolicy: Local only Services with one selector share)",
                other.key
            ));
        }
        let clash: Vec<String> = self
            .ports
            .iter()
            .filter(|p| {
                other
                    .ports
                    .iter()
                    .any(|o| o.protocol == p.protocol && o.port == p.port)
            })
            .map(|p| format!("{}/{}", p.protocol.as_str(), p.port))
            .collect();
        if !clash.is_empty() {
            return Err(format!("{} uses {} too", other.key, clash.join(", ")));
        }
        Ok(())
    }

    /// Whether this speaker handles the Service: a LoadBalancer of our class (or of no class
    /// when we claim those).
    pub fn is_ours(&self, class: &str, claim_unclassed: bool) -> bool {
        self.load_balancer
            && match &self.class {
                Some(c) => c == class,
                None => claim_unclassed,
            }
    }
}

/// A plain IPv4 LoadBalancer Service `default/NAME` without ports or IPs, for tests.
#[cfg(test)]
pub fn fixture(name: &str, created: &str) -> ServiceInfo {
    ServiceInfo {
        key: format!("default/{name}"),
        namespace: "default".into(),
        name: name.into(),
        uid: String::new(),
        created: created.into(),
        load_balancer: true,
        class: None,
        requested: vec![],
        bad_requests: vec![],
        pool: None,
        want_v4: true,
        want_v6: false,
        assigned: vec![],
        local_traffic: false,
        ports: vec![],
        source_ranges: None,
        affinity: None,
        node_ips: None,
        lbpool: None,
        sharing: None,
        ip_modes: Default::default(),
        proxied: vec![],
        selector: Default::default(),
        pool_withdrawn: false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn svc(v: serde_json::Value) -> ServiceInfo {
        ServiceInfo::from_service(&serde_json::from_value(v).unwrap())
    }

    #[test]
    fn source_ranges_are_cidrs_or_addresses_and_empty_means_any() {
        let s = svc(
            json!({"metadata": {"name": "a"}, "spec": {"type": "LoadBalancer",
            "loadBalancerSourceRanges": ["198.51.100.0/24", " 203.0.113.7 ", "junk", "2001:db8::/32"]}}),
        );
        let want: Vec<ipnet::IpNet> = ["198.51.100.0/24", "203.0.113.7/32", "2001:db8::/32"]
            .iter()
            .map(|n| n.parse().unwrap())
            .collect();
        assert_eq!(s.source_ranges, Some(want));
        let s = svc(
            json!({"metadata": {"name": "a"}, "spec": {"type": "LoadBalancer",
            "loadBalancerSourceRanges": []}}),
        );
        assert_eq!(s.source_ranges, None);
        let s = svc(json!({"metadata": {"name": "a"}, "spec": {"type": "LoadBalancer"}}));
        assert_eq!(s.source_ranges, None);
    }

    #[test]
    fn client_ip_affinity_keeps_its_timeout_or_the_default() {
        let s = svc(
            json!({"metadata": {"name": "a"}, "spec": {"type": "LoadBalancer",
            "sessionAffinity": "ClientIP",
            "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 60}}}}),
        );
        assert_eq!(s.affinity, Some(60));
        let s = svc(
            json!({"metadata": {"name": "a"}, "spec": {"type": "LoadBalancer",
            "sessionAffinity": "ClientIP"}}),
        );
        assert_eq!(s.affinity, Some(DEFAULT_AFFINITY_SECONDS));
        let s = svc(
            json!({"metadata": {"name": "a"}, "spec": {"type": "LoadBalancer",
            "sessionAffinity": "None"}}),
        );
        assert_eq!(s.affinity, None);
    }

    #[test]
    fn reads_requests_families_ports_and_status() {
        let s = svc(json!({
            "metadata": {"name": "web", "namespace": "default", "annotations": {ANNOTATION_IPS: "192.0.2.200, 2001:db8::200,bogus"}},
            "spec": {"type": "LoadBalancer", "ipFamilyPolicy": "PreferDualStack", "ipFamilies": ["IPv4", "IPv6"],
                     "externalTrafficPolicy": "Local", "ports": [{"name": "http", "port": 80}, {"port": 53, "protocol": "UDP"}]},
            "status": {"loadBalancer": {"ingress": [{"ip": "192.0.2.200"}]}}}));
        assert_eq!(s.key, "default/web");
        assert_eq!(
            s.requested,
            vec![
                "192.0.2.200".parse::<IpAddr>().unwrap(),
                "2001:db8::200".parse().unwrap()
            ]
        );
        assert_eq!(s.bad_requests, ["bogus"]);
        assert!(s.want_v4 && s.want_v6 && s.local_traffic);
        assert_eq!(s.assigned, vec!["192.0.2.200".parse::<IpAddr>().unwrap()]);
        assert_eq!(
            s.ports[1],
            ServicePort {
                name: String::new(),
                protocol: Protocol::Udp,
                port: 53
            }
        );
        assert!(s.is_ours("l2speaker.io/l2", true));
        assert!(!s.is_ours("l2speaker.io/l2", false));
    }

    #[test]
    fn load_balancer_ip_and_single_stack_ipv6() {
        let s = svc(json!({"metadata": {"name": "a", "namespace": "x"},
            "spec": {"type": "LoadBalancer", "loadBalancerIP": "2001:db8::7", "ipFamilies": ["IPv6"], "loadBalancerClass": "other"}}));
        assert_eq!(s.requested, vec!["2001:db8::7".parse::<IpAddr>().unwrap()]);
        assert!(!s.want_v4 && s.want_v6);
        assert!(
            !s.is_ours("l2speaker.io/l2", true),
            "another class is not ours"
        );
    }
}
