//! Which Service gets which pool IP: a pure function of the Services, the pools and the
//! addresses reserved by nodes (their own addresses, and what the speakers refuse locally:
//! other addresses on their interfaces and their gateways). The elected allocator writes its result to
//! `status.loadBalancer.ingress` and turns its refusals into Warning Events.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use crate::pool::{Pool, Pools, Range};
use crate::service::ServiceInfo;

/// Why a Service did not get (all) the IPs it wanted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub service: String,
    /// An Event reason: `IPNotInPool`, `IPInUse`, `IPSharingRefused`, `IPIsNodeAddress`,
    /// `InvalidIP`, `PoolExhausted`, `NoPool`, `UnknownPool`, `IPLeftPool`, `IPNotAnnounceable`;
    /// in node-IP mode
    /// `PortInUse`, `PortConflict`, `NoNode`, `InvalidNodeIPs`.
    pub reason: &'static str,
    pub message: String,
}

/// Where pool IPs can be announced. An IP of a pool that names `spec.interface` can be
/// (the speakers put it on that interface); any other only on a subnet some node's speaker
/// publishes. Decided before an IP is first assigned; an IP a Service has is never taken
/// away for it (no node being eligible for a while is not this).
#[derive(Debug, Clone, Default)]
pub struct Reach {
    /// The subnets the speakers publish; None while some speaker publishes none (an older
    /// release, or one starting up): then every IP counts as announceable, as it did before.
    pub subnets: Option<Vec<ipnet::IpNet>>,
}

impl Reach {
    /// Every IP counts as announceable.
    pub fn anywhere() -> Reach {
        Reach { subnets: None }
    }

    /// Why no node can announce `ip` of `pool`, if none can.
    pub fn why_not(&self, ip: IpAddr, pool: &Pool) -> Option<String> {
        let nets = self.subnets.as_ref().filter(|_| pool.interface.is_none())?;
        (!nets.iter().any(|n| n.contains(&ip))).then(|| {
            format!(
                "{ip} is on no node's subnet and IPPool {} names no spec.interface, so no node could announce it",
                pool.name
            )
        })
    }

    /// The parts of `r` (a range of `pool`) that some node can announce, in order.
    pub fn parts(&self, r: &Range, pool: &Pool) -> Vec<Range> {
        match self.subnets.as_ref().filter(|_| pool.interface.is_none()) {
            None => vec![*r],
            Some(nets) => {
                let mut parts: Vec<Range> = nets.iter().filter_map(|n| r.within(n)).collect();
                parts.sort();
                parts.dedup();
                parts
            }
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Allocation {
    /// The ingress IPs each Service should have (an empty list clears the status).
    pub desired: BTreeMap<String, Vec<IpAddr>>,
    pub refusals: Vec<Refusal>,
}

/// Computes the assignment. `ours` filters the Services this allocator handles; `reserved`
/// maps addresses that are never assigned to what they are (`node-1's own address`); `reach`
/// says which IPs a node could announce (no other is newly assigned).
pub fn allocate(
    services: &[ServiceInfo],
    ours: impl Fn(&ServiceInfo) -> bool,
    pools: &Pools,
    reserved: &BTreeMap<IpAddr, String>,
    reach: &Reach,
) -> Allocation {
    let mut out = Allocation::default();
    let mut svcs: Vec<&ServiceInfo> = services.iter().collect();
    svcs.sort_by(|a, b| (&a.created, &a.key).cmp(&(&b.created, &b.key)));
    let refuse = |out: &mut Allocation, s: &ServiceInfo, reason: &'static str, message: String| {
        out.refusals.push(Refusal {
            service: s.key.clone(),
            reason,
            message,
        });
    };

    // Services no longer ours (type changed) give back the pool IPs in their status.
    for s in &svcs {
        if !s.load_balancer && s.assigned.iter().any(|ip| pools.pool_of(*ip).is_some()) {
            out.desired.insert(s.key.clone(), Vec::new());
        }
    }
    let handled: Vec<&ServiceInfo> = svcs.into_iter().filter(|s| ours(s)).collect();

    // Who claims which IP: a Service that already has it beats a newcomer; then the older.
    let usable = |ip: &IpAddr| pools.pool_of(*ip).is_some() && !reserved.contains_key(ip);
    let mut claims: Vec<(bool, usize, IpAddr)> = Vec::new();
    for (i, s) in handled.iter().enumerate() {
        // An IP that left every pool (shrunk, deleted) is taken away, and the Service told.
        if s.requested.is_empty() {
            // (A node's address, published in node-IP mode, was never a pool's.)
            let left = |ip: &&IpAddr| pools.pool_of(**ip).is_none() && !reserved.contains_key(ip);
            for ip in s.assigned.iter().filter(left) {
                refuse(
                    &mut out,
                    s,
                    "IPLeftPool",
                    format!(
                        "{ip} is no longer in a valid IPPool; it is withdrawn from this Service"
                    ),
                );
            }
        }
        // An IP a Service has that a node now reserves is taken away, and the Service told.
        for ip in s.assigned.iter().filter(|ip| pools.pool_of(**ip).is_some()) {
            if let Some(why) = reserved.get(ip) {
                refuse(
                    &mut out,
                    s,
                    "IPIsNodeAddress",
                    format!("{ip} is {why}; it is withdrawn from this Service"),
                );
            }
        }
        let wanted: Vec<IpAddr> = if s.requested.is_empty() && s.bad_requests.is_empty() {
            s.assigned
                .iter()
                .copied()
                .filter(|ip| {
                    usable(ip)
                        && s.pool
                            .as_ref()
                            .is_none_or(|p| pools.pool_of(*ip).is_some_and(|x| &x.name == p))
                })
                .collect()
        } else {
            s.requested.clone()
        };
        for ip in wanted {
            claims.push((!s.assigned.contains(&ip), i, ip));
        }
    }
    claims.sort();
    // Each IP's Services: one, or several that share it (same key, disjoint ports).
    let mut owner: BTreeMap<IpAddr, Vec<usize>> = BTreeMap::new();
    let mut failed: BTreeSet<usize> = BTreeSet::new();
    for (_, i, ip) in &claims {
        let s = handled[*i];
        let requested = !s.requested.is_empty();
        if requested && pools.pool_of(*ip).is_none() {
            refuse(
                &mut out,
                s,
                "IPNotInPool",
                format!("{ip} is in no IPPool; it will not be assigned"),
            );
            failed.insert(*i);
        } else if let Some(why) = reserved.get(ip).filter(|_| requested) {
            refuse(
                &mut out,
                s,
                "IPIsNodeAddress",
                format!("{ip} is {why}; it will not be assigned"),
            );
            failed.insert(*i);
        } else if let Some(why) = pools
            .pool_of(*ip)
            .filter(|_| requested && !s.assigned.contains(ip))
            .and_then(|p| reach.why_not(*ip, p))
        {
            refuse(
                &mut out,
                s,
                "IPNotAnnounceable",
                format!("{why}; it will not be assigned"),
            );
            failed.insert(*i);
        } else if let Some(others) = owner.get_mut(ip) {
            if others.contains(i) {
                continue;
            }
            match others
                .iter()
                .find_map(|o| s.may_share_with(handled[*o]).err())
            {
                None => others.push(*i),
                Some(why) => {
                    let reason = if s.sharing.is_some() {
                        "IPSharingRefused"
                    } else {
                        "IPInUse"
                    };
                    refuse(
                        &mut out,
                        s,
                        reason,
                        format!("{ip} is not shared with this Service: {why}"),
                    );
                    failed.insert(*i);
                }
            }
        } else {
            owner.insert(*ip, vec![*i]);
        }
    }
    for (i, s) in handled.iter().enumerate() {
        for bad in &s.bad_requests {
            refuse(
                &mut out,
                s,
                "InvalidIP",
                // An entry never holds a space; a sentence is the reader's own refusal.
                if bad.contains(' ') {
                    bad.clone()
                } else {
                    format!("{bad:?} is not an IP address")
                },
            );
            failed.insert(i);
        }
        let families = s
            .requested
            .iter()
            .map(|ip| ip.is_ipv4())
            .collect::<Vec<_>>();
        if families.len() != families.iter().collect::<BTreeSet<_>>().len() {
            refuse(
                &mut out,
                s,
                "InvalidIP",
                "at most one wanted IP per family".to_string(),
            );
            failed.insert(i);
        }
    }
    // A Service whose wanted IPs cannot all be had gets none of them: never half.
    for v in owner.values_mut() {
        v.retain(|i| !failed.contains(i));
    }
    owner.retain(|_, v| !v.is_empty());
    let mut has: BTreeMap<usize, Vec<IpAddr>> = BTreeMap::new();
    for (ip, v) in &owner {
        for i in v {
            has.entry(*i).or_default().push(*ip);
        }
    }

    // Fresh addresses for the families still missing.
    let mut scanned: BTreeMap<crate::pool::Range, IpAddr> = BTreeMap::new();
    for (i, s) in handled.iter().enumerate() {
        let mut ips = has.remove(&i).unwrap_or_default();
        if s.requested.is_empty() && s.bad_requests.is_empty() {
            if let Some(p) = &s.pool
                && pools.get(p).is_none()
            {
                refuse(
                    &mut out,
                    s,
                    "UnknownPool",
                    format!("IPPool {p:?} does not exist or is invalid"),
                );
            }
            for (want, v4) in [(s.want_v4, true), (s.want_v6, false)] {
                if !want || ips.iter().any(|ip| ip.is_ipv4() == v4) {
                    continue;
                }
                let candidates = || {
                    pools.pools.iter().filter(|p| match &s.pool {
                        Some(name) => &p.name == name,
                        None => p.auto_assign,
                    })
                };
                let offered = candidates()
                    .flat_map(|p| p.ranges.iter())
                    .any(|r| r.first.is_ipv4() == v4);
                // The parts of the candidate ranges some node can announce.
                let reachable: Vec<Range> = candidates()
                    .flat_map(|p| {
                        p.ranges
                            .iter()
                            .filter(|r| r.first.is_ipv4() == v4)
                            .flat_map(|r| reach.parts(r, p))
                    })
                    .collect();
                // A sharing key: the IP of the Services with the same key, if this one may
                // join them; if it may not, no IP (a Warning says why).
                if s.sharing.is_some() {
                    let group = owner.iter_mut().find(|(ip, v)| {
                        ip.is_ipv4() == v4
                            && v.iter().any(|o| handled[*o].sharing == s.sharing)
                            && candidates()
                                .any(|p| pools.pool_of(**ip).is_some_and(|x| x.name == p.name))
                    });
                    if let Some((ip, v)) = group {
                        match v.iter().find_map(|o| s.may_share_with(handled[*o]).err()) {
                            None => {
                                v.push(i);
                                ips.push(*ip);
                            }
                            Some(why) => refuse(
                                &mut out,
                                s,
                                "IPSharingRefused",
                                format!("{ip} is not shared with this Service: {why}"),
                            ),
                        }
                        continue;
                    }
                }
                // Within one pass addresses are only taken, never freed, so each range is
                // scanned from where the last search in it stopped: linear, not quadratic.
                let mut free = None;
                for r in &reachable {
                    let from = scanned.get(r).copied().unwrap_or(r.first);
                    let found = r
                        .iter_from(from)
                        .find(|ip| !owner.contains_key(ip) && !reserved.contains_key(ip));
                    match found {
                        Some(ip) => {
                            scanned.insert(*r, ip);
                            free = Some(ip);
                            break;
                        }
                        None => {
                            scanned.insert(*r, r.last);
                        }
                    }
                }
                match free {
                    Some(ip) => {
                        owner.insert(ip, vec![i]);
                        ips.push(ip);
                    }
                    None if s.pool.as_ref().is_none_or(|p| pools.get(p).is_some()) => {
                        let fam = if v4 { "IPv4" } else { "IPv6" };
                        if offered && reachable.is_empty() {
                            refuse(
                                &mut out,
                                s,
                                "IPNotAnnounceable",
                                format!(
                                    "the pools' {fam} addresses are on no node's subnet and the pools name no spec.interface, so no node could announce them; none is assigned"
                                ),
                            );
                        } else if offered {
                            refuse(
                                &mut out,
                                s,
                                "PoolExhausted",
                                format!(
                                    "no free {fam} address in the pools that a node can announce"
                                ),
                            );
                        } else {
                            let ignored: Vec<String> = pools
                                .rejected
                                .iter()
                                .map(|r| format!("{}: {}", r.name, r.reason))
                                .collect();
                            let why = if ignored.is_empty() {
                                String::new()
                            } else {
                                format!(" (ignored as invalid: {})", ignored.join("; "))
                            };
                            let what = match &s.pool {
                                Some(p) => format!("IPPool {p:?} has no {fam} addresses"),
                                None => format!(
                                    "no valid IPPool assigns {fam} addresses automatically{why}"
                                ),
                            };
                            refuse(&mut out, s, "NoPool", what);
                        }
                    }
                    None => {}
                }
            }
        }
        ips.sort_by_key(|ip| (!ip.is_ipv4(), *ip));
        out.desired.insert(s.key.clone(), ips);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Hostile amounts stay bounded: a /8 pool, 10,000 Services, and a Service listing
    /// 10,000 wanted IPs (one Event, not 10,000). Prints the time it took.
    #[test]
    fn hostile_amounts_are_refused_or_served_in_bounded_work() {
        let p = pools(&[("big", &["10.0.0.0/8"], true)]);
        let mut svcs: Vec<ServiceInfo> = (0..10_000)
            .map(|i| svc(&format!("s{i}"), &format!("{i:06}")))
            .collect();
        let many: String = (0..10_000)
            .map(|i| format!("10.1.{}.{}", i / 256, i % 256))
            .collect::<Vec<_>>()
            .join(",");
        let mut greedy: k8s_openapi::api::core::v1::Service = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "greedy", "namespace": "default", "annotations": {crate::service::ANNOTATION_IPS: many}},
            "spec": {"type": "LoadBalancer", "ports": [{"port": 80}]}
        }))
        .unwrap();
        greedy.metadata.creation_timestamp = None;
        svcs.push(ServiceInfo::from_service(&greedy));
        let t0 = std::time::Instant::now();
        let a = run(&svcs, &p, &[]);
        println!(
            "10,000 Services over a /8 and one listing 10,000 IPs: {:?}",
            t0.elapsed()
        );
        let given: BTreeSet<&IpAddr> = a.desired.values().flatten().collect();
        assert_eq!(given.len(), 10_000, "every Service got its own address");
        let greedy_refusals: Vec<&Refusal> = a
            .refusals
            .iter()
            .filter(|r| r.service == "default/greedy")
            .collect();
        assert_eq!(greedy_refusals.len(), 1, "{greedy_refusals:?}");
        assert!(
            greedy_refusals[0]
                .message
                .contains("10000 addresses listed")
        );
        assert!(a.desired["default/greedy"].is_empty());
    }

    #[test]
    fn an_invalid_pool_is_not_called_exhausted_and_an_ip_that_left_its_pool_is_named() {
        let bad = pools(&[("lan", &["192.0.2.300"], true)]);
        let a = run(&[svc("web", "1")], &bad, &[]);
        let r = &a.refusals[0];
        assert_eq!(r.reason, "NoPool", "{r:?}");
        assert!(
            r.message.contains("lan: ") && r.message.contains("192.0.2.300"),
            "{r:?}"
        );
        let p = pools(&[("lan", &["192.0.2.200-192.0.2.201"], true)]);
        let mut web = svc("web", "1");
        web.assigned = vec![ip("198.51.100.7")];
        let a = run(&[web], &p, &[]);
        assert!(
            a.refusals
                .iter()
                .any(|r| r.reason == "IPLeftPool" && r.message.contains("198.51.100.7")),
            "{:?}",
            a.refusals
        );
        assert_eq!(a.desired["default/web"], vec![ip("192.0.2.200")]);
    }
    use crate::pool::{IPPoolSpec, PoolInput};

    fn pools(specs: &[(&str, &[&str], bool)]) -> Pools {
        let specs: Vec<(String, IPPoolSpec)> = specs
            .iter()
            .map(|(n, a, auto)| {
                (
                    n.to_string(),
                    IPPoolSpec {
                        addresses: a.iter().map(|s| s.to_string()).collect(),
                        auto_assign: Some(*auto),
                        ..Default::default()
                    },
                )
            })
            .collect();
        Pools::build(
            specs
                .iter()
                .enumerate()
                .map(|(i, (n, s))| PoolInput {
                    name: n,
                    age_key: i.to_string(),
                    spec: s,
                    last_valid: None,
                })
                .collect(),
        )
    }

    fn svc(name: &str, created: &str) -> ServiceInfo {
        crate::service::fixture(name, created)
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn run(svcs: &[ServiceInfo], p: &Pools, node_ips: &[&str]) -> Allocation {
        let reserved = node_ips
            .iter()
            .map(|s| (ip(s), "node-1's own address".to_string()))
            .collect();
        allocate(svcs, |_| true, p, &reserved, &Reach::anywhere())
    }

    #[test]
    fn an_ip_no_node_can_announce_is_never_newly_assigned_and_the_service_is_told() {
        let reach = Reach {
            subnets: Some(vec!["192.0.2.0/24".parse().unwrap()]),
        };
        let none = BTreeMap::new();
        // A pool off every node's subnet, one partly on it, one off it with an interface.
        let mut p = pools(&[
            ("off", &["198.51.100.0/28"], false),
            (
                "part",
                &["198.51.100.16/28", "192.0.2.200-192.0.2.201"],
                false,
            ),
            ("wired", &["203.0.113.0/28"], false),
        ]);
        p.pools
            .iter_mut()
            .find(|p| p.name == "wired")
            .unwrap()
            .interface = Some("eth1".into());
        let in_pool = |name: &str, pool: &str| {
            let mut s = svc(name, name);
            s.pool = Some(pool.into());
            s
        };
        let a = allocate(
            &[
                in_pool("a", "off"),
                in_pool("b", "part"),
                in_pool("c", "wired"),
            ],
            |_| true,
            &p,
            &none,
            &reach,
        );
        assert!(a.desired["default/a"].is_empty());
        assert_eq!(
            a.desired["default/b"],
            vec![ip("192.0.2.200")],
            "the part on a subnet"
        );
        assert_eq!(
            a.desired["default/c"],
            vec![ip("203.0.113.1")],
            "the pool's interface"
        );
        let told: Vec<(&str, &str)> = a
            .refusals
            .iter()
            .map(|r| (r.service.as_str(), r.reason))
            .collect();
        assert_eq!(told, [("default/a", "IPNotAnnounceable")]);
        assert!(
            a.refusals[0].message.contains("no node's subnet"),
            "{:?}",
            a.refusals
        );

        // Asked for by name: refused, and said why; an IP the Service has is kept.
        let mut asks = svc("d", "d");
        asks.requested = vec![ip("198.51.100.3")];
        let mut has = svc("e", "e");
        has.assigned = vec![ip("198.51.100.4")];
        let a = allocate(&[asks, has], |_| true, &p, &none, &reach);
        assert!(a.desired["default/d"].is_empty());
        assert_eq!(
            a.desired["default/e"],
            vec![ip("198.51.100.4")],
            "never withdrawn"
        );
        assert_eq!(a.refusals.len(), 1, "{:?}", a.refusals);
        assert_eq!(a.refusals[0].reason, "IPNotAnnounceable");
        assert!(a.refusals[0].message.contains("198.51.100.3"));

        // While some speaker publishes no subnets, every IP counts as announceable.
        let a = allocate(
            &[in_pool("a", "off")],
            |_| true,
            &p,
            &none,
            &Reach::anywhere(),
        );
        assert_eq!(a.desired["default/a"], vec![ip("198.51.100.1")]);
        assert!(a.refusals.is_empty());
    }

    #[test]
    fn assigns_the_first_free_address_in_age_order_and_keeps_existing_ones() {
        let p = pools(&[("lan", &["192.0.2.200-192.0.2.203"], true)]);
        let mut old = svc("old", "1");
        old.assigned = vec![ip("192.0.2.202")];
        let a = run(&[svc("b", "3"), old, svc("a", "2")], &p, &["192.0.2.200"]);
        assert_eq!(a.desired["default/old"], vec![ip("192.0.2.202")]);
        assert_eq!(
            a.desired["default/a"],
            vec![ip("192.0.2.201")],
            "the node's address is skipped"
        );
        assert_eq!(a.desired["default/b"], vec![ip("192.0.2.203")]);
        assert!(a.refusals.is_empty());
    }

    #[test]
    fn wanted_ips_outside_pools_taken_or_of_a_node_are_refused_and_never_assigned() {
        let p = pools(&[("lan", &["192.0.2.200-192.0.2.203"], true)]);
        let mut holder = svc("holder", "1");
        holder.assigned = vec![ip("192.0.2.200")];
        let mut outside = svc("outside", "2");
        outside.requested = vec![ip("203.0.113.5")];
        let mut taken = svc("taken", "0");
        taken.requested = vec![ip("192.0.2.200")];
        let mut node = svc("node", "3");
        node.requested = vec![ip("192.0.2.201")];
        let a = run(&[holder, outside, taken, node], &p, &["192.0.2.201"]);
        assert_eq!(
            a.desired["default/holder"],
            vec![ip("192.0.2.200")],
            "the holder keeps it, though the requester is older"
        );
        for s in ["outside", "taken", "node"] {
            assert_eq!(
                a.desired[&format!("default/{s}")],
                Vec::<IpAddr>::new(),
                "{s} gets nothing"
            );
        }
        let reasons: Vec<_> = a
            .refusals
            .iter()
            .map(|r| (r.service.as_str(), r.reason))
            .collect();
        assert!(reasons.contains(&("default/outside", "IPNotInPool")));
        assert!(reasons.contains(&("default/taken", "IPInUse")));
        assert!(reasons.contains(&("default/node", "IPIsNodeAddress")));
    }

    #[test]
    fn dual_stack_gets_one_address_per_family_or_none_when_a_wanted_one_fails() {
        let p = pools(&[
            ("v4", &["192.0.2.200/31"], true),
            ("v6", &["2001:db8::200/127"], true),
        ]);
        let mut ds = svc("ds", "1");
        ds.want_v6 = true;
        let mut want = svc("want", "2");
        want.requested = vec![ip("192.0.2.201"), ip("2001:db8::999")];
        let a = run(&[ds, want], &p, &[]);
        assert_eq!(
            a.desired["default/ds"],
            vec![ip("192.0.2.200"), ip("2001:db8::200")]
        );
        assert_eq!(
            a.desired["default/want"],
            Vec::<IpAddr>::new(),
            "one wanted IP is outside the pools: none is assigned"
        );
    }

    #[test]
    fn manual_pools_are_used_only_on_request_and_exhaustion_is_reported() {
        let p = pools(&[("manual", &["192.0.2.210/32"], false)]);
        let mut named = svc("named", "1");
        named.pool = Some("manual".into());
        let a = run(&[svc("auto", "0"), named], &p, &[]);
        assert_eq!(a.desired["default/auto"], Vec::<IpAddr>::new());
        assert_eq!(a.refusals[0].reason, "NoPool", "not exhausted: not offered");
        assert_eq!(a.desired["default/named"], vec![ip("192.0.2.210")]);
        let mut second = svc("second", "2");
        second.pool = Some("manual".into());
        let mut named = svc("named", "1");
        named.pool = Some("manual".into());
        let a = run(&[named, second], &p, &[]);
        assert_eq!(a.refusals[0].reason, "PoolExhausted");
    }

    #[test]
    fn a_service_that_stops_being_a_load_balancer_gives_its_ip_back() {
        let p = pools(&[("lan", &["192.0.2.200-192.0.2.203"], true)]);
        let mut s = svc("was", "1");
        s.load_balancer = false;
        s.assigned = vec![ip("192.0.2.200")];
        let a = allocate(
            &[s],
            |s| s.load_balancer,
            &p,
            &BTreeMap::new(),
            &Reach::anywhere(),
        );
        assert_eq!(a.desired["default/was"], Vec::<IpAddr>::new());
    }

    #[test]
    fn services_with_one_sharing_key_and_disjoint_ports_share_one_ip() {
        use crate::service::{Protocol, ServicePort};
        let p = pools(&[("lan", &["192.0.2.200-192.0.2.203"], true)]);
        let port = |protocol, port| ServicePort {
            name: String::new(),
            protocol,
            port,
        };
        let dns = |name: &str, created: &str, protocol| ServiceInfo {
            sharing: Some("dns".into()),
            ports: vec![port(protocol, 53)],
            ..svc(name, created)
        };
        let tcp = dns("tcp", "1", Protocol::Tcp);
        let udp = dns("udp", "2", Protocol::Udp);
        let clash = dns("clash", "3", Protocol::Tcp);
        let mut local = dns("local", "4", Protocol::Sctp);
        local.local_traffic = true;
        let plain = svc("plain", "5");
        let a = run(&[tcp.clone(), udp.clone(), clash, local, plain], &p, &[]);
        assert_eq!(a.desired["default/tcp"], vec![ip("192.0.2.200")]);
        assert_eq!(a.desired["default/udp"], vec![ip("192.0.2.200")], "shared");
        assert_eq!(a.desired["default/plain"], vec![ip("192.0.2.201")]);
        for refused in ["clash", "local"] {
            assert!(a.desired[&format!("default/{refused}")].is_empty());
        }
        let said: Vec<(&str, &str, &str)> = a
            .refusals
            .iter()
            .map(|r| (r.service.as_str(), r.reason, r.message.as_str()))
            .collect();
        assert!(said.contains(&(
            "default/clash",
            "IPSharingRefused",
            "192.0.2.200 is not shared with this Service: default/tcp uses tcp/53 too"
        )));
        assert!(said.contains(&(
            "default/local",
            "IPSharingRefused",
            "192.0.2.200 is not shared with this Service: default/tcp has another externalTrafficPolicy"
        )));
        // The older one deleted: the other keeps the IP.
        let mut alone = udp.clone();
        alone.assigned = vec![ip("192.0.2.200")];
        let a = run(&[alone, svc("new", "9")], &p, &[]);
        assert_eq!(a.desired["default/udp"], vec![ip("192.0.2.200")]);
        assert_eq!(a.desired["default/new"], vec![ip("192.0.2.201")]);
        // Asking for the shared IP by address works too; without the key it is in use.
        let mut asks = dns("asks", "6", Protocol::Udp);
        asks.ports = vec![port(Protocol::Tcp, 853)];
        asks.requested = vec![ip("192.0.2.200")];
        let mut held = tcp.clone();
        held.assigned = vec![ip("192.0.2.200")];
        let mut stranger = svc("stranger", "7");
        stranger.requested = vec![ip("192.0.2.200")];
        let a = run(&[held, asks, stranger], &p, &[]);
        assert_eq!(a.desired["default/asks"], vec![ip("192.0.2.200")]);
        assert!(a.desired["default/stranger"].is_empty());
        assert!(
            a.refusals
                .iter()
                .any(|r| r.service == "default/stranger" && r.reason == "IPInUse")
        );
    }
}
