//! IP pools: the `IPPool` custom resource, and the validated set of addresses the speakers
//! may hand out and announce. An address outside every valid pool is never assigned nor bound.

use std::collections::BTreeMap;
use std::net::IpAddr;

use ipnet::IpNet;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A pool of floating IPs for LoadBalancer Services.
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "l2speaker.io",
    version = "v1alpha1",
    kind = "IPPool",
    plural = "ippools",
    shortname = "ipp",
    status = "IPPoolStatus",
    printcolumn = r#"{"name":"Valid","type":"string","jsonPath":".status.conditions[?(@.type==\"Valid\")].status"}"#,
    printcolumn = r#"{"name":"Announceable","type":"string","jsonPath":".status.conditions[?(@.type==\"Announceable\")].status"}"#,
    printcolumn = r#"{"name":"In effect","type":"string","jsonPath":".status.addresses"}"#,
    doc = "A pool of floating IPs that l2speaker assigns to LoadBalancer Services and announces on L2"
)]
#[serde(rename_all = "camelCase")]
pub struct IPPoolSpec {
    /// CIDRs (`192.0.2.200/29`, `2001:db8::200/125`), inclusive ranges
    /// (`192.0.2.210-192.0.2.215`) and single addresses, IPv4 and IPv6.
    #[schemars(inner(pattern(ADDRESS_PATTERN)))]
    pub addresses: Vec<String>,
    /// The interface to announce on. Default: the interface whose subnet holds the IP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interface: Option<String>,
    /// Only nodes whose labels match may announce this pool's IPs (`matchLabels`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_selector: Option<BTreeMap<String, String>>,
    /// Hand out addresses to Services that did not ask for one. Default: true.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auto_assign: Option<bool>,
    /// Leave out each CIDR's first address (IPv4: the network address; IPv6: the
    /// subnet-router anycast address) and, for IPv4, its last (the broadcast address), as many
    /// clients and routers treat them specially. Ranges (`a-b`) are used as written, and /31,
    /// /32, /127 and /128 whole. Default: true.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub avoid_network_and_broadcast: Option<bool>,
}

/// What the allocator last found of a pool. While the spec is invalid, the addresses (and
/// interface) last found valid stay in effect, so a bad edit never takes working IPs away.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct IPPoolStatus {
    /// The `metadata.generation` these fields describe.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// The addresses in effect: the spec's when valid, else the last valid ones.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub addresses: Vec<String>,
    /// The interface in effect with those addresses.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interface: Option<String>,
    /// `Valid`: whether the spec as written is in effect, and if not, why.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<PoolCondition>,
}

/// A condition, shaped as Kubernetes' `metav1.Condition`.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PoolCondition {
    #[serde(rename = "type")]
    pub type_: String,
    /// `True`, `False` or `Unknown`.
    pub status: String,
    pub reason: String,
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_transition_time: Option<String>,
}

/// Address blocks a pool may never include, with what they are.
const SPECIAL: &[(&str, &str)] = &[
    (
        "0.0.0.0/8",
        "\"this network\" (0.0.0.0/8, with the unspecified address)",
    ),
    ("127.0.0.0/8", "loopback"),
    ("169.254.0.0/16", "link-local"),
    ("224.0.0.0/4", "multicast"),
    (
        "240.0.0.0/4",
        "reserved (240.0.0.0/4, with the broadcast address)",
    ),
    ("::/128", "the unspecified address"),
    ("::1/128", "loopback"),
    ("::ffff:0:0/96", "IPv4-mapped"),
    ("fe80::/10", "link-local"),
    ("ff00::/8", "multicast"),
];

/// Whether a pool may contain `ip` at all (it is in none of the special blocks).
pub fn assignable(ip: IpAddr) -> bool {
    special(&Range {
        first: ip,
        last: ip,
    })
    .is_none()
}

/// Why `r` may not be in a pool, if it includes a special block.
fn special(r: &Range) -> Option<String> {
    SPECIAL.iter().find_map(|(cidr, what)| {
        let net: IpNet = cidr.parse().expect("static CIDR");
        let block = Range {
            first: net.network(),
            last: net.broadcast(),
        };
        r.overlaps(&block)
            .then(|| format!("{what} addresses ({cidr})"))
    })
}

/// The shape of one `spec.addresses` entry, checked at admission by the CRD's schema: an
/// IPv4 or IPv6 address with an optional prefix length, or two addresses joined by `-`.
/// (Host bits, reversed ranges and overlaps need more than a pattern: they are reported in
/// the pool's status.)
pub const ADDRESS_PATTERN: &str = concat!(
    r"^ *(",
    r"((25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])\.){3}(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])(/([0-9]|[12][0-9]|3[0-2]))?",
    r"|((25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])\.){3}(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9]) *- *((25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])\.){3}(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])",
    r"|([0-9A-Fa-f]{0,4}:){2,7}([0-9A-Fa-f]{0,4}|((25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])\.){3}(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9]))(/([0-9]|[1-9][0-9]|1[01][0-9]|12[0-8]))?",
    r"|([0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{0,4} *- *([0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{0,4}",
    r") *$"
);

/// An inclusive range of addresses of one family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Range {
    pub first: IpAddr,
    pub last: IpAddr,
}

fn to_u128(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(v4) => u32::from(v4) as u128,
        IpAddr::V6(v6) => u128::from(v6),
    }
}

fn from_u128(like: IpAddr, n: u128) -> IpAddr {
    match like {
        IpAddr::V4(_) => IpAddr::V4((n as u32).into()),
        IpAddr::V6(_) => IpAddr::V6(n.into()),
    }
}

impl Range {
    pub fn contains(&self, ip: IpAddr) -> bool {
        ip.is_ipv4() == self.first.is_ipv4()
            && to_u128(self.first) <= to_u128(ip)
            && to_u128(ip) <= to_u128(self.last)
    }

    fn overlaps(&self, other: &Range) -> bool {
        self.first.is_ipv4() == other.first.is_ipv4()
            && to_u128(self.first) <= to_u128(other.last)
            && to_u128(other.first) <= to_u128(self.last)
    }

    /// The part of the range inside `net`, if any.
    pub fn within(&self, net: &IpNet) -> Option<Range> {
        if net.addr().is_ipv4() != self.first.is_ipv4() {
            return None;
        }
        let first = to_u128(self.first).max(to_u128(net.network()));
        let last = to_u128(self.last).min(to_u128(net.broadcast()));
        (first <= last).then(|| Range {
            first: from_u128(self.first, first),
            last: from_u128(self.first, last),
        })
    }

    /// The addresses of the range, in order.
    pub fn iter(&self) -> impl Iterator<Item = IpAddr> + '_ {
        self.iter_from(self.first)
    }

    /// The addresses of the range from `from` on (the whole range if `from` is before it).
    pub fn iter_from(&self, from: IpAddr) -> impl Iterator<Item = IpAddr> + '_ {
        let start = to_u128(from).max(to_u128(self.first));
        (start..=to_u128(self.last)).map(|n| from_u128(self.first, n))
    }
}

/// Parses one entry of `spec.addresses` (CIDRs whole).
pub fn parse_range(s: &str) -> Result<Range, String> {
    parse_entry(s, false)
}

/// Parses one entry of `spec.addresses`; `avoid_ends` leaves out a CIDR's network (and, for
/// IPv4, broadcast) address.
pub fn parse_entry(s: &str, avoid_ends: bool) -> Result<Range, String> {
    let s = s.trim();
    if let Some((a, b)) = s.split_once('-') {
        let first: IpAddr = a
            .trim()
            .parse()
            .map_err(|_| format!("{s:?}: {a:?} is not an IP address"))?;
        let last: IpAddr = b
            .trim()
            .parse()
            .map_err(|_| format!("{s:?}: {b:?} is not an IP address"))?;
        if first.is_ipv4() != last.is_ipv4() {
            return Err(format!("{s:?}: the range mixes IPv4 and IPv6"));
        }
        if to_u128(first) > to_u128(last) {
            return Err(format!(
                "{s:?}: the range is reversed (first address after the last)"
            ));
        }
        return Ok(Range { first, last });
    }
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Ok(Range {
            first: ip,
            last: ip,
        });
    }
    let net: IpNet = s
        .parse()
        .map_err(|_| format!("{s:?} is neither an address, a CIDR nor a range"))?;
    if net.trunc() != net {
        return Err(format!(
            "{s:?} has host bits set (did you mean {}?)",
            net.trunc()
        ));
    }
    let (mut first, mut last) = (to_u128(net.network()), to_u128(net.broadcast()));
    if avoid_ends && net.prefix_len() + 1 < net.max_prefix_len() {
        first += 1;
        if net.network().is_ipv4() {
            last -= 1;
        }
    }
    Ok(Range {
        first: from_u128(net.network(), first),
        last: from_u128(net.network(), last),
    })
}

/// A pool that passed validation.
#[derive(Debug, Clone, PartialEq)]
pub struct Pool {
    pub name: String,
    pub ranges: Vec<Range>,
    pub interface: Option<String>,
    pub node_selector: BTreeMap<String, String>,
    pub auto_assign: bool,
}

impl Pool {
    pub fn contains(&self, ip: IpAddr) -> bool {
        self.ranges.iter().any(|r| r.contains(ip))
    }

    /// The position of `ip` among the pool's addresses (ranges in order). The allocator hands
    /// addresses out from the start, so positions are dense: a good key for spreading.
    pub fn offset(&self, ip: IpAddr) -> Option<u128> {
        let mut before: u128 = 0;
        for r in &self.ranges {
            if r.contains(ip) {
                return Some(before.saturating_add(to_u128(ip) - to_u128(r.first)));
            }
            before = before.saturating_add((to_u128(r.last) - to_u128(r.first)).saturating_add(1));
        }
        None
    }

    /// Whether a node with these labels may announce this pool's IPs.
    pub fn selects(&self, labels: &BTreeMap<String, String>) -> bool {
        self.node_selector
            .iter()
            .all(|(k, v)| labels.get(k) == Some(v))
    }
}

/// A pool that was refused, and why (reported as a Warning Event on it).
#[derive(Debug, Clone, PartialEq)]
pub struct Rejected {
    pub name: String,
    pub reason: String,
}

/// The valid pools, in order of age; the rest are rejected whole, never half-used. A pool
/// whose spec is invalid but whose status holds addresses last found valid is in `pools` with
/// those, and in `degraded` with the reason its spec is not in effect.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Pools {
    pub pools: Vec<Pool>,
    pub rejected: Vec<Rejected>,
    pub degraded: Vec<Rejected>,
}

/// One pool as read from the API: name, creation order key, spec, and the last valid
/// addresses and interface from its status.
pub struct PoolInput<'a> {
    pub name: &'a str,
    /// Sorts older pools first (`creationTimestamp`, then name).
    pub age_key: String,
    pub spec: &'a IPPoolSpec,
    pub last_valid: Option<(Vec<String>, Option<String>)>,
}

impl Pools {
    /// Validates every pool; a pool overlapping an older valid pool is rejected.
    pub fn build(mut inputs: Vec<PoolInput<'_>>) -> Pools {
        inputs.sort_by(|a, b| (&a.age_key, a.name).cmp(&(&b.age_key, b.name)));
        let mut out = Pools::default();
        for p in inputs {
            match validate(p.name, p.spec, &out.pools) {
                Ok(pool) => out.pools.push(pool),
                Err(reason) => {
                    let fallback = p.last_valid.as_ref().and_then(|(addresses, interface)| {
                        let spec = IPPoolSpec {
                            addresses: addresses.clone(),
                            interface: interface.clone(),
                            ..p.spec.clone()
                        };
                        validate(p.name, &spec, &out.pools).ok()
                    });
                    let r = Rejected {
                        name: p.name.to_string(),
                        reason,
                    };
                    match fallback {
                        Some(pool) if !pool.ranges.is_empty() => {
                            out.pools.push(pool);
                            out.degraded.push(r);
                        }
                        _ => out.rejected.push(r),
                    }
                }
            }
        }
        out
    }

    /// [`Pools::build`] over IPPool objects as the API returns them (age: creationTimestamp).
    pub fn from_objects(objects: &[std::sync::Arc<IPPool>]) -> Pools {
        Pools::build(
            objects
                .iter()
                .map(|p| PoolInput {
                    name: p.metadata.name.as_deref().unwrap_or(""),
                    age_key: p
                        .metadata
                        .creation_timestamp
                        .as_ref()
                        .map(|t| t.0.to_string())
                        .unwrap_or_default(),
                    spec: &p.spec,
                    last_valid: p
                        .status
                        .as_ref()
                        .filter(|s| !s.addresses.is_empty())
                        .map(|s| (s.addresses.clone(), s.interface.clone())),
                })
                .collect(),
        )
    }

    pub fn pool_of(&self, ip: IpAddr) -> Option<&Pool> {
        self.pools.iter().find(|p| p.contains(ip))
    }

    pub fn get(&self, name: &str) -> Option<&Pool> {
        self.pools.iter().find(|p| p.name == name)
    }
}

fn validate(name: &str, spec: &IPPoolSpec, older: &[Pool]) -> Result<Pool, String> {
    if spec.addresses.is_empty() {
        return Err("spec.addresses is empty".into());
    }
    let mut ranges = Vec::new();
    let avoid_ends = spec.avoid_network_and_broadcast.unwrap_or(true);
    for a in &spec.addresses {
        let r = parse_entry(a, avoid_ends)?;
        if let Some(what) = special(&r) {
            return Err(format!("{a:?} includes {what}, which are never assigned"));
        }
        if let Some(prev) = ranges.iter().find(|x: &&Range| x.overlaps(&r)) {
            return Err(format!(
                "{a:?} overlaps {}-{} of the same pool",
                prev.first, prev.last
            ));
        }
        ranges.push(r);
    }
    for o in older {
        for r in &ranges {
            if let Some(x) = o.ranges.iter().find(|x| x.overlaps(r)) {
                return Err(format!(
                    "{}-{} overlaps {}-{} of pool {:?}, which is older",
                    r.first, r.last, x.first, x.last, o.name
                ));
            }
        }
    }
    if let Some(i) = &spec.interface
        && (i.is_empty() || i.len() > 15 || i.contains('/') || i.contains(char::is_whitespace))
    {
        return Err(format!("spec.interface {i:?} is not an interface name"));
    }
    Ok(Pool {
        name: name.to_string(),
        ranges,
        interface: spec.interface.clone(),
        node_selector: spec.node_selector.clone().unwrap_or_default(),
        auto_assign: spec.auto_assign.unwrap_or(true),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(addrs: &[&str]) -> IPPoolSpec {
        IPPoolSpec {
            addresses: addrs.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
    }

    fn build(pools: &[(&str, &str, IPPoolSpec)]) -> Pools {
        Pools::build(
            pools
                .iter()
                .map(|(n, age, s)| PoolInput {
                    name: n,
                    age_key: age.to_string(),
                    spec: s,
                    last_valid: None,
                })
                .collect(),
        )
    }

    #[test]
    fn cidrs_and_ranges_of_both_families_parse() {
        let r = parse_range("192.0.2.200/30").unwrap();
        assert_eq!(
            r.iter().map(|i| i.to_string()).collect::<Vec<_>>(),
            ["192.0.2.200", "192.0.2.201", "192.0.2.202", "192.0.2.203"]
        );
        let r = parse_range("2001:db8::200-2001:db8::201").unwrap();
        assert_eq!(r.iter().count(), 2);
        assert!(r.contains("2001:db8::201".parse().unwrap()));
        assert!(!r.contains("192.0.2.200".parse().unwrap()));
        assert_eq!(parse_range("192.0.2.7/32").unwrap().iter().count(), 1);
    }

    #[test]
    fn bad_entries_say_what_is_wrong() {
        assert!(
            parse_range("192.0.2.300/32")
                .unwrap_err()
                .contains("neither an address, a CIDR nor a range")
        );
        assert!(
            parse_range("192.0.2.20-192.0.2.10")
                .unwrap_err()
                .contains("reversed")
        );
        assert!(
            parse_range("192.0.2.1-2001:db8::1")
                .unwrap_err()
                .contains("mixes")
        );
        assert_eq!(
            parse_range("192.0.2.201/29").unwrap_err(),
            "\"192.0.2.201/29\" has host bits set (did you mean 192.0.2.200/29?)"
        );
    }

    #[test]
    fn an_invalid_or_overlapping_pool_is_rejected_whole_and_the_older_one_kept() {
        let pools = build(&[
            ("new", "2026-02", spec(&["192.0.2.204/30"])),
            ("old", "2026-01", spec(&["192.0.2.200/29"])),
            ("bad", "2026-03", spec(&["198.51.100.0/30", "nonsense"])),
            ("v6", "2026-04", spec(&["2001:db8::200/126"])),
        ]);
        assert_eq!(
            pools
                .pools
                .iter()
                .map(|p| p.name.as_str())
                .collect::<Vec<_>>(),
            ["old", "v6"]
        );
        assert_eq!(pools.rejected.len(), 2);
        assert!(
            pools
                .rejected
                .iter()
                .any(|r| r.name == "new" && r.reason.contains("of pool \"old\", which is older"))
        );
        assert!(pools.rejected.iter().any(|r| r.name == "bad"));
        assert!(
            pools.pool_of("198.51.100.1".parse().unwrap()).is_none(),
            "nothing of a rejected pool is used"
        );
        assert_eq!(
            pools.pool_of("192.0.2.205".parse().unwrap()).unwrap().name,
            "old"
        );
    }

    #[test]
    fn cidrs_leave_out_their_network_and_broadcast_addresses_unless_told_not_to() {
        let first_last = |p: &Pools| {
            let r = p.pools[0].ranges[0];
            (r.first.to_string(), r.last.to_string())
        };
        let p = build(&[("p", "1", spec(&["192.0.2.0/28"]))]);
        assert_eq!(first_last(&p), ("192.0.2.1".into(), "192.0.2.14".into()));
        let p = build(&[("p", "1", spec(&["2001:db8::/64"]))]);
        assert_eq!(
            first_last(&p),
            ("2001:db8::1".into(), "2001:db8::ffff:ffff:ffff:ffff".into())
        );
        // Ranges as written; /31 and /32 whole.
        let p = build(&[("p", "1", spec(&["192.0.2.0-192.0.2.3", "198.51.100.0/31"]))]);
        assert_eq!(p.pools[0].ranges[0].first.to_string(), "192.0.2.0");
        assert_eq!(p.pools[0].ranges[1].iter().count(), 2);
        let mut whole = spec(&["192.0.2.0/30"]);
        whole.avoid_network_and_broadcast = Some(false);
        let p = build(&[("p", "1", whole)]);
        assert_eq!(first_last(&p), ("192.0.2.0".into(), "192.0.2.3".into()));
    }

    #[test]
    fn special_addresses_are_refused_with_what_they_are() {
        for (entry, what) in [
            ("127.0.0.0/8", "loopback"),
            ("127.0.0.1-127.0.0.9", "loopback"),
            ("224.0.0.0/4", "multicast"),
            ("239.1.1.1/32", "multicast"),
            ("169.254.0.0/24", "link-local"),
            ("0.0.0.0/32", "this network"),
            ("255.255.255.255/32", "broadcast"),
            ("::/0", "loopback"),
            ("::/128", "unspecified"),
            ("::1/128", "loopback"),
            ("fe80::/64", "link-local"),
            ("ff02::1/128", "multicast"),
            ("::ffff:192.0.2.0/120", "IPv4-mapped"),
            ("0.0.0.0/0", "this network"),
        ] {
            let p = build(&[("p", "1", spec(&[entry]))]);
            assert!(p.pools.is_empty(), "{entry} refused");
            assert!(
                p.rejected[0].reason.contains(what),
                "{entry}: {}",
                p.rejected[0].reason
            );
        }
    }

    #[test]
    fn offsets_never_overflow() {
        let mut s = spec(&["2001:db8::/32", "2001:db9::/32"]);
        s.avoid_network_and_broadcast = Some(false);
        let p = build(&[("p", "1", s)]);
        let far: IpAddr = "2001:db9::5".parse().unwrap();
        assert_eq!(p.pools[0].offset(far), Some((1u128 << 96) + 5));
        let whole = Pool {
            name: "all".into(),
            ranges: vec![
                Range {
                    first: "::".parse().unwrap(),
                    last: "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff".parse().unwrap(),
                },
                Range {
                    first: "192.0.2.0".parse().unwrap(),
                    last: "192.0.2.9".parse().unwrap(),
                },
            ],
            interface: None,
            node_selector: BTreeMap::new(),
            auto_assign: true,
        };
        assert_eq!(
            whole.offset("192.0.2.3".parse().unwrap()),
            Some(u128::MAX),
            "saturates instead of overflowing"
        );
    }

    #[test]
    fn an_invalid_edit_keeps_the_last_valid_addresses_in_effect() {
        let bad = spec(&["192.0.2.200-192.0.2.209", "192.0.2.300"]);
        let p = Pools::build(vec![PoolInput {
            name: "lan",
            age_key: "1".into(),
            spec: &bad,
            last_valid: Some((vec!["192.0.2.200-192.0.2.209".into()], None)),
        }]);
        assert_eq!(p.pools.len(), 1, "still serving");
        assert!(p.pool_of("192.0.2.205".parse().unwrap()).is_some());
        assert!(p.rejected.is_empty());
        assert_eq!(p.degraded[0].name, "lan");
        assert!(
            p.degraded[0].reason.contains("192.0.2.300"),
            "{:?}",
            p.degraded
        );
        // Without a last valid state there is nothing to keep.
        let p = Pools::build(vec![PoolInput {
            name: "lan",
            age_key: "1".into(),
            spec: &bad,
            last_valid: None,
        }]);
        assert!(p.pools.is_empty());
        assert!(p.rejected[0].reason.contains("192.0.2.300"));
    }

    #[test]
    fn node_selectors_match_labels() {
        let mut s = spec(&["192.0.2.200/32"]);
        s.node_selector = Some([("zone".to_string(), "a".to_string())].into());
        let pools = build(&[("p", "1", s)]);
        let p = &pools.pools[0];
        assert!(p.selects(&[("zone".to_string(), "a".to_string())].into()));
        assert!(!p.selects(&BTreeMap::new()));
    }
}

#[cfg(test)]
mod manifest {
    use kube::CustomResourceExt;

    /// The CRD in manifests/ is generated from the Rust type: this keeps them equal.
    /// `UPDATE_MANIFESTS=1 cargo test` rewrites it.
    #[test]
    fn the_checked_in_crd_matches_the_type() {
        let generated = format!(
            "# Generated from src/pool.rs by `UPDATE_MANIFESTS=1 cargo test`.\n{}",
            serde_yaml::to_string(&super::IPPool::crd()).unwrap()
        );
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/manifests/crd.yaml");
        if std::env::var_os("UPDATE_MANIFESTS").is_some() {
            std::fs::write(path, &generated).unwrap();
        }
        let on_disk = std::fs::read_to_string(path).unwrap_or_default();
        assert_eq!(
            on_disk, generated,
            "manifests/crd.yaml is stale: run UPDATE_MANIFESTS=1 cargo test"
        );
    }
}
