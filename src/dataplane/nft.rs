//! DNAT in the speaker's own nftables table: the desired rules are a pure function of the
//! owned VIPs and their endpoints ([`render`]); [`Nft`] applies them with `nft -f` as one
//! atomic transaction.
//!
//! The `nftables` crate cannot declare the named verdict maps used here (and fails to read
//! rulesets that have them), so the rules are nft's own text, snapshot-tested.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::net::IpAddr;

use ipnet::IpNet;
use thiserror::Error;

use crate::service::Protocol;

pub const TABLE: &str = "l2speaker";
/// The packet mark bit that asks for masquerade (traffic DNATed to a pod on another node,
/// whose replies must come back through this node). kube-proxy uses 0x4000 and 0x8000.
pub const MASQ_MARK: u32 = 0x0000_2000;

#[derive(Debug, Clone, Hash, PartialEq, Eq, PartialOrd, Ord)]
pub struct Endpoint {
    pub ip: IpAddr,
    pub port: u16,
    /// A pod on this node (no masquerade needed: its replies route back through us).
    pub local: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct PortMap {
    pub protocol: Protocol,
    pub port: u16,
    pub endpoints: Vec<Endpoint>,
}

/// One VIP this node owns, and where its traffic goes.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Dnat {
    pub vip: IpAddr,
    pub ports: Vec<PortMap>,
    /// `spec.loadBalancerSourceRanges`: when set, only these sources reach the endpoints;
    /// the rest is dropped (ranges of the other family allow nothing of this one).
    pub sources: Option<Vec<IpNet>>,
    /// `sessionAffinity: ClientIP`: how many seconds a client keeps its endpoint.
    pub affinity: Option<u32>,
}

/// Where one VIP port leads, and from where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// The allowed sources of the VIP's family (None: any).
    pub sources: Option<Vec<IpNet>>,
    /// Seconds a client keeps its endpoint (None: each connection drawn anew).
    pub affinity: Option<u32>,
    pub endpoints: Vec<Endpoint>,
}

/// One VIP port and where it leads: what the table holds, per VIP port.
pub type Desired = BTreeMap<(IpAddr, Protocol, u16), Target>;

/// The desired state: each VIP port with its endpoints of the VIP's family (ports without
/// endpoints get no rule: the traffic then reaches the node itself and is refused).
pub fn desired(entries: &[Dnat]) -> Desired {
    let mut d = Desired::new();
    for e in entries {
        for p in &e.ports {
            let mut eps: Vec<Endpoint> = p
                .endpoints
                .iter()
                .filter(|ep| ep.ip.is_ipv4() == e.vip.is_ipv4())
                .cloned()
                .collect();
            if eps.is_empty() {
                continue;
            }
            eps.sort();
            let sources = e.sources.as_ref().map(|s| {
                let mut s: Vec<IpNet> = s
                    .iter()
                    .filter(|n| n.addr().is_ipv4() == e.vip.is_ipv4())
                    .copied()
                    .collect();
                s.sort();
                s.dedup();
                s
            });
            d.insert(
                (e.vip, p.protocol, p.port),
                Target {
                    sources,
                    affinity: e.affinity,
                    endpoints: eps,
                },
            );
        }
    }
    d
}

fn chain_name(vip: IpAddr, proto: Protocol, port: u16) -> String {
    let v = vip.to_string().replace(['.', ':'], "_");
    format!("vip_{v}_{}_{port}", proto.as_str())
}

fn ep_addr(ip: IpAddr, port: u16) -> String {
    match ip {
        IpAddr::V4(v4) => format!("{v4}:{port}"),
        IpAddr::V6(v6) => format!("[{v6}]:{port}"),
    }
}

fn element(vip: IpAddr, proto: Protocol, port: u16) -> String {
    format!("{vip} . {} . {port}", proto.as_str())
}

/// nft's name of the VIP's address family in a match (`ip saddr`, `ip6 saddr`, `dnat ip to`).
fn family(vip: IpAddr) -> &'static str {
    if vip.is_ipv4() { "ip" } else { "ip6" }
}

fn map_of(vip: IpAddr) -> &'static str {
    if vip.is_ipv4() { "vips4" } else { "vips6" }
}

/// The rules of a VIP port's chain: traffic from sources outside the Service's
/// `loadBalancerSourceRanges` dropped, then straight to its one endpoint, or spread over
/// several.
fn port_rules(vip: IpAddr, chain: &str, t: &Target) -> Vec<String> {
    let mut rules = Vec::new();
    // The node's own traffic (its source an address of this node, the VIP included) is not
    // filtered, as kube-proxy does not filter it.
    match &t.sources {
        None => {}
        Some(s) if s.is_empty() => rules.push("fib saddr type != local drop".to_string()),
        Some(s) => {
            let list: Vec<String> = s.iter().map(|n| n.trunc().to_string()).collect();
            rules.push(format!(
                "fib saddr type != local {} saddr != {{ {} }} drop",
                family(vip),
                list.join(", ")
            ));
        }
    }
    let n = t.endpoints.len();
    // A client seen lately goes back to its endpoint (each endpoint chain records the
    // clients it took in its own set).
    if let Some(secs) = affinity_sets(t) {
        for i in 0..n {
            rules.push(format!(
                "{} saddr @{} goto {chain}_{i}",
                family(vip),
                affinity_set(chain, i, secs)
            ));
        }
    }
    rules.push(if n == 1 {
        format!("goto {chain}_0")
    } else {
        let arms: Vec<String> = (0..n).map(|i| format!("{i} : goto {chain}_{i}")).collect();
        format!("numgen random mod {n} vmap {{ {} }}", arms.join(", "))
    });
    rules
}

/// The set of the clients endpoint `i` of a VIP port took lately (its name carries the
/// timeout, so a changed timeout is a new set).
fn affinity_set(chain: &str, i: usize, secs: u32) -> String {
    format!("{chain}_{i}_aff{secs}")
}

/// Whether the endpoint chains of `t` record their clients (affinity over several endpoints).
fn affinity_sets(t: &Target) -> Option<u32> {
    t.affinity.filter(|_| t.endpoints.len() > 1)
}

/// The declaration of an affinity set (inside `table … { }`, or after `add set inet TABLE`).
fn affinity_set_body(vip: IpAddr, secs: u32) -> String {
    let ty = if vip.is_ipv4() {
        "ipv4_addr"
    } else {
        "ipv6_addr"
    };
    format!("type {ty}; flags dynamic,timeout; timeout {secs}s;")
}

/// The rules of an endpoint chain: record the client when the VIP port has affinity (a rule
/// of its own: when the set is full the update fails and ends only that rule), mark remote
/// endpoints for masquerade, then DNAT.
fn endpoint_rules(vip: IpAddr, proto: Protocol, ep: &Endpoint, aff: Option<String>) -> Vec<String> {
    let family = family(vip);
    let mut rules: Vec<String> = aff
        .map(|set| format!("update @{set} {{ {family} saddr }}"))
        .into_iter()
        .collect();
    let mark = if ep.local {
        String::new()
    } else {
        format!("meta mark set meta mark | {MASQ_MARK:#010x} ")
    };
    rules.push(format!(
        "{mark}meta l4proto {} dnat {family} to {}",
        proto.as_str(),
        ep_addr(ep.ip, ep.port)
    ));
    rules
}

/// The whole table, as one transaction that replaces the previous one (`table` + `delete
/// table` + `table {…}`: creating it first makes the delete safe; `flush table` would not do,
/// it keeps map elements and chains).
pub fn render_full(d: &Desired) -> String {
    let mut elements4 = Vec::new();
    let mut elements6 = Vec::new();
    let mut chains = String::new();
    let mut sets = String::new();
    for ((vip, proto, port), t) in d {
        let eps = &t.endpoints;
        let chain = chain_name(*vip, *proto, *port);
        let aff = affinity_sets(t);
        if let Some(secs) = aff {
            for i in 0..eps.len() {
                let _ = writeln!(
                    sets,
                    "\tset {} {{ {} }}",
                    affinity_set(&chain, i, secs),
                    affinity_set_body(*vip, secs)
                );
            }
        }
        let el = format!("{} : goto {chain}", element(*vip, *proto, *port));
        if vip.is_ipv4() {
            elements4.push(el)
        } else {
            elements6.push(el)
        }
        let _ = writeln!(
            chains,
            "\tchain {chain} {{\n\t\t{}\n\t}}",
            port_rules(*vip, &chain, t).join("\n\t\t")
        );
        for (i, ep) in eps.iter().enumerate() {
            let _ = writeln!(
                chains,
                "\tchain {chain}_{i} {{\n\t\t{}\n\t}}",
                endpoint_rules(*vip, *proto, ep, aff.map(|s| affinity_set(&chain, i, s)))
                    .join("\n\t\t")
            );
        }
    }
    let map = |name: &str, ty: &str, elements: &[String]| {
        let mut s =
            format!("\tmap {name} {{\n\t\ttype {ty} . inet_proto . inet_service : verdict\n");
        if !elements.is_empty() {
            let _ = writeln!(
                s,
                "\t\telements = {{ {} }}",
                elements.join(",\n\t\t\t     ")
            );
        }
        s.push_str("\t}\n");
        s
    };
    let lookup = "\t\tip daddr . meta l4proto . th dport vmap @vips4\n\t\tip6 daddr . meta l4proto . th dport vmap @vips6\n";
    format!(
        "table inet {TABLE}\ndelete table inet {TABLE}\ntable inet {TABLE} {{\n{}{}{sets}\
         \tchain prerouting {{\n\t\ttype nat hook prerouting priority -100; policy accept;\n{lookup}\t}}\n\
         \tchain output {{\n\t\ttype nat hook output priority -100; policy accept;\n{lookup}\t}}\n\
         \tchain postrouting {{\n\t\ttype nat hook postrouting priority 100; policy accept;\n\
         \t\tmeta mark & {MASQ_MARK:#010x} == {MASQ_MARK:#010x} masquerade\n\t}}\n{chains}}}\n",
        map("vips4", "ipv4_addr", &elements4),
        map("vips6", "ipv6_addr", &elements6),
    )
}

/// The whole table for `entries` (see [`render_full`]).
pub fn render(entries: &[Dnat]) -> String {
    render_full(&desired(entries))
}

/// The changes from `old` to `new` as one transaction touching only the VIP ports that
/// changed; None when nothing did. Endpoint chains are reused by index: flushed and refilled,
/// surplus ones deleted after the rule that jumps to them is gone.
pub fn render_diff(old: &Desired, new: &Desired) -> Option<String> {
    let mut s = String::new();
    // Affinity sets no rule uses any more: deleted last, once every chain that used them has
    // been flushed or deleted.
    let mut stale_sets = Vec::new();
    for (key @ (vip, proto, port), t) in old {
        let eps = &t.endpoints;
        if new.contains_key(key) {
            continue;
        }
        let chain = chain_name(*vip, *proto, *port);
        let _ = writeln!(
            s,
            "delete element inet {TABLE} {} {{ {} }}",
            map_of(*vip),
            element(*vip, *proto, *port)
        );
        let _ = writeln!(s, "delete chain inet {TABLE} {chain}");
        for i in 0..eps.len() {
            let _ = writeln!(s, "delete chain inet {TABLE} {chain}_{i}");
        }
        if let Some(secs) = affinity_sets(t) {
            stale_sets.extend((0..eps.len()).map(|i| affinity_set(&chain, i, secs)));
        }
    }
    for (key @ (vip, proto, port), t) in new {
        let eps = &t.endpoints;
        let before = old.get(key);
        if before == Some(t) {
            continue;
        }
        let chain = chain_name(*vip, *proto, *port);
        let had = before.map_or(0, |b| b.endpoints.len());
        let (old_aff, new_aff) = (before.and_then(affinity_sets), affinity_sets(t));
        if let Some(secs) = new_aff {
            for (i, ep) in eps.iter().enumerate() {
                let set = affinity_set(&chain, i, secs);
                if old_aff == Some(secs) && i < had {
                    // Kept; its clients start over only if the endpoint changed.
                    if before.and_then(|b| b.endpoints.get(i)) != Some(ep) {
                        let _ = writeln!(s, "flush set inet {TABLE} {set}");
                    }
                } else {
                    let _ = writeln!(
                        s,
                        "add set inet {TABLE} {set} {{ {} }}",
                        affinity_set_body(*vip, secs)
                    );
                }
            }
        }
        if let Some(secs) = old_aff {
            stale_sets.extend(
                (0..had)
                    .filter(|i| new_aff != Some(secs) || *i >= eps.len())
                    .map(|i| affinity_set(&chain, i, secs)),
            );
        }
        for (i, ep) in eps.iter().enumerate() {
            if i < had {
                let _ = writeln!(s, "flush chain inet {TABLE} {chain}_{i}");
            } else {
                let _ = writeln!(s, "add chain inet {TABLE} {chain}_{i}");
            }
            let aff = new_aff.map(|a| affinity_set(&chain, i, a));
            for rule in endpoint_rules(*vip, *proto, ep, aff) {
                let _ = writeln!(s, "add rule inet {TABLE} {chain}_{i} {rule}");
            }
        }
        if before.is_some() {
            let _ = writeln!(s, "flush chain inet {TABLE} {chain}");
        } else {
            let _ = writeln!(s, "add chain inet {TABLE} {chain}");
        }
        for rule in port_rules(*vip, &chain, t) {
            let _ = writeln!(s, "add rule inet {TABLE} {chain} {rule}");
        }
        for i in eps.len()..had {
            let _ = writeln!(s, "delete chain inet {TABLE} {chain}_{i}");
        }
        if before.is_none() {
            let _ = writeln!(
                s,
                "add element inet {TABLE} {} {{ {} : goto {chain} }}",
                map_of(*vip),
                element(*vip, *proto, *port)
            );
        }
    }
    for set in stale_sets {
        let _ = writeln!(s, "delete set inet {TABLE} {set}");
    }
    (!s.is_empty()).then_some(s)
}

/// Removes the table (on shutdown, and at start-up before the first full apply).
pub fn render_delete() -> String {
    format!("table inet {TABLE}\ndelete table inet {TABLE}\n")
}

#[derive(Debug, Error)]
pub enum NftError {
    #[error("running nft: {0}")]
    Spawn(#[from] std::io::Error),
    #[error("nft rejected the ruleset: {0}")]
    Rejected(String),
    #[error("nft did not finish within {} s", NFT_DEADLINE.as_secs())]
    Timeout,
}

/// How long one `nft` run may take (a full replace of 1,000 Services takes ~250 ms); the
/// process is killed after that and the table is replaced whole next time.
pub const NFT_DEADLINE: std::time::Duration = std::time::Duration::from_secs(5);

/// Applies nft scripts (a thin adapter; tests use a recording fake).
pub trait NftApply: Send + Sync {
    fn apply(&self, script: &str)
    -> impl std::future::Future<Output = Result<(), NftError>> + Send;
    /// Whether the DNAT table is in the kernel now.
    fn table_exists(&self) -> impl std::future::Future<Output = Result<bool, NftError>> + Send;
}

/// `nft -f -`.
pub struct Nft;

impl NftApply for Nft {
    async fn table_exists(&self) -> Result<bool, NftError> {
        // One netlink request, on a blocking thread (it waits for the kernel's answer).
        tokio::task::spawn_blocking(|| {
            super::gate::Netlink::open()?.table_exists(super::nft_watch::FAMILY_INET, TABLE)
        })
        .await
        .map_err(|e| NftError::Spawn(std::io::Error::other(e)))?
        .map_err(NftError::Spawn)
    }

    async fn apply(&self, script: &str) -> Result<(), NftError> {
        use tokio::io::AsyncWriteExt;
        let mut child = tokio::process::Command::new("nft")
            .args(["-f", "-"])
            .kill_on_drop(true)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()?;
        if let Some(pid) = child.id() {
            super::nft_watch::started_nft(pid);
        }
        let mut stdin = child.stdin.take().expect("piped");
        let run = async {
            stdin.write_all(script.as_bytes()).await?;
            drop(stdin);
            child.wait_with_output().await
        };
        let out = tokio::time::timeout(NFT_DEADLINE, run)
            .await
            .map_err(|_| NftError::Timeout)??;
        if out.status.success() {
            Ok(())
        } else {
            Err(NftError::Rejected(
                String::from_utf8_lossy(&out.stderr).trim().to_string(),
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn renders_one_chain_per_vip_port_spreading_over_endpoints_and_marking_remote_ones() {
        let e = Dnat {
            vip: ip("192.0.2.200"),
            ports: vec![PortMap {
                protocol: Protocol::Tcp,
                port: 80,
                endpoints: vec![
                    Endpoint {
                        ip: ip("198.51.100.18"),
                        port: 8080,
                        local: true,
                    },
                    Endpoint {
                        ip: ip("198.51.100.34"),
                        port: 8080,
                        local: false,
                    },
                    Endpoint {
                        ip: ip("2001:db8:100:1::2"),
                        port: 8080,
                        local: true,
                    },
                ],
            }],
            sources: None,
            affinity: None,
        };
        let v6 = Dnat {
            vip: ip("2001:db8::200"),
            ports: vec![PortMap {
                protocol: Protocol::Udp,
                port: 53,
                endpoints: vec![Endpoint {
                    ip: ip("2001:db8:100:1::2"),
                    port: 5353,
                    local: true,
                }],
            }],
            sources: None,
            affinity: None,
        };
        let want = "table inet l2speaker
delete table inet l2speaker
table inet l2speaker {
\tmap vips4 {
\t\ttype ipv4_addr . inet_proto . inet_service : verdict
\t\telements = { 192.0.2.200 . tcp . 80 : goto vip_192_0_2_200_tcp_80 }
\t}
\tmap vips6 {
\t\ttype ipv6_addr . inet_proto . inet_service : verdict
\t\telements = { 2001:db8::200 . udp . 53 : goto vip_2001_db8__200_udp_53 }
\t}
\tchain prerouting {
\t\ttype nat hook prerouting priority -100; policy accept;
\t\tip daddr . meta l4proto . th dport vmap @vips4
\t\tip6 daddr . meta l4proto . th dport vmap @vips6
\t}
\tchain output {
\t\ttype nat hook output priority -100; policy accept;
\t\tip daddr . meta l4proto . th dport vmap @vips4
\t\tip6 daddr . meta l4proto . th dport vmap @vips6
\t}
\tchain postrouting {
\t\ttype nat hook postrouting priority 100; policy accept;
\t\tmeta mark & 0x00002000 == 0x00002000 masquerade
\t}
\tchain vip_192_0_2_200_tcp_80 {
\t\tnumgen random mod 2 vmap { 0 : goto vip_192_0_2_200_tcp_80_0, 1 : goto vip_192_0_2_200_tcp_80_1 }
\t}
\tchain vip_192_0_2_200_tcp_80_0 {
\t\tmeta l4proto tcp dnat ip to 198.51.100.18:8080
\t}
\tchain vip_192_0_2_200_tcp_80_1 {
\t\tmeta mark set meta mark | 0x00002000 meta l4proto tcp dnat ip to 198.51.100.34:8080
\t}
\tchain vip_2001_db8__200_udp_53 {
\t\tgoto vip_2001_db8__200_udp_53_0
\t}
\tchain vip_2001_db8__200_udp_53_0 {
\t\tmeta l4proto udp dnat ip6 to [2001:db8:100:1::2]:5353
\t}
}
";
        assert_eq!(render(&[v6, e]), want);
    }

    fn ep(s: &str, local: bool) -> Endpoint {
        Endpoint {
            ip: ip(s),
            port: 8080,
            local,
        }
    }

    fn state(entries: &[(&str, u16, Vec<Endpoint>)]) -> Desired {
        desired(
            &entries
                .iter()
                .map(|(v, port, eps)| Dnat {
                    vip: ip(v),
                    ports: vec![PortMap {
                        protocol: Protocol::Tcp,
                        port: *port,
                        endpoints: eps.clone(),
                    }],
                    sources: None,
                    affinity: None,
                })
                .collect::<Vec<_>>(),
        )
    }

    #[test]
    fn a_diff_adds_changes_and_removes_only_what_moved() {
        let old = state(&[
            (
                "192.0.2.200",
                80,
                vec![ep("198.51.100.18", true), ep("198.51.100.34", false)],
            ),
            ("192.0.2.201", 80, vec![ep("198.51.100.18", true)]),
        ]);
        let new = state(&[
            ("192.0.2.200", 80, vec![ep("198.51.100.18", true)]),
            ("192.0.2.202", 443, vec![ep("198.51.100.34", false)]),
        ]);
        let want = "delete element inet l2speaker vips4 { 192.0.2.201 . tcp . 80 }
delete chain inet l2speaker vip_192_0_2_201_tcp_80
delete chain inet l2speaker vip_192_0_2_201_tcp_80_0
flush chain inet l2speaker vip_192_0_2_200_tcp_80_0
add rule inet l2speaker vip_192_0_2_200_tcp_80_0 meta l4proto tcp dnat ip to 198.51.100.18:8080
flush chain inet l2speaker vip_192_0_2_200_tcp_80
add rule inet l2speaker vip_192_0_2_200_tcp_80 goto vip_192_0_2_200_tcp_80_0
delete chain inet l2speaker vip_192_0_2_200_tcp_80_1
add chain inet l2speaker vip_192_0_2_202_tcp_443_0
add rule inet l2speaker vip_192_0_2_202_tcp_443_0 meta mark set meta mark | 0x00002000 meta l4proto tcp dnat ip to 198.51.100.34:8080
add chain inet l2speaker vip_192_0_2_202_tcp_443
add rule inet l2speaker vip_192_0_2_202_tcp_443 goto vip_192_0_2_202_tcp_443_0
add element inet l2speaker vips4 { 192.0.2.202 . tcp . 443 : goto vip_192_0_2_202_tcp_443 }
";
        assert_eq!(render_diff(&old, &new).unwrap(), want);
        assert_eq!(render_diff(&new, &new), None);
    }

    #[test]
    fn a_port_without_endpoints_gets_no_rule() {
        let e = Dnat {
            vip: ip("192.0.2.200"),
            ports: vec![PortMap {
                protocol: Protocol::Tcp,
                port: 80,
                endpoints: vec![],
            }],
            sources: None,
            affinity: None,
        };
        let r = render(&[e]);
        assert!(!r.contains("192.0.2.200"));
        assert!(!r.contains("elements"));
    }

    /// TCP port 80 of `vip` over local endpoints `eps`.
    fn vip80(vip: &str, eps: &[&str], sources: Option<&[&str]>, affinity: Option<u32>) -> Dnat {
        Dnat {
            vip: ip(vip),
            ports: vec![PortMap {
                protocol: Protocol::Tcp,
                port: 80,
                endpoints: eps.iter().map(|e| ep(e, true)).collect(),
            }],
            sources: sources.map(|s| s.iter().map(|n| n.parse().unwrap()).collect()),
            affinity,
        }
    }

    fn with_sources(vip: &str, sources: Option<&[&str]>) -> Dnat {
        vip80(vip, &["198.51.100.18", "2001:db8:100:1::2"], sources, None)
    }

    #[test]
    fn source_ranges_drop_other_sources_before_the_spread() {
        let d = with_sources(
            "192.0.2.200",
            Some(&["203.0.113.7/32", "198.51.100.0/24", "2001:db8::/32"]),
        );
        let r = render(&[d]);
        assert!(
            r.contains("\tchain vip_192_0_2_200_tcp_80 {\n\t\tfib saddr type != local ip saddr != { 198.51.100.0/24, 203.0.113.7/32 } drop\n\t\tgoto vip_192_0_2_200_tcp_80_0\n\t}"),
            "{r}"
        );
        // Ranges of the other family only: nothing of this family gets through.
        let r = render(&[with_sources("192.0.2.200", Some(&["2001:db8::/32"]))]);
        assert!(
            r.contains("\tchain vip_192_0_2_200_tcp_80 {\n\t\tfib saddr type != local drop\n"),
            "{r}"
        );
        let r = render(&[with_sources("2001:db8::200", Some(&["2001:db8::/48"]))]);
        assert!(
            r.contains("fib saddr type != local ip6 saddr != { 2001:db8::/48 } drop"),
            "{r}"
        );
        // No ranges: no filter.
        assert!(!render(&[with_sources("192.0.2.200", None)]).contains("saddr"));
    }

    fn with_affinity(eps: &[&str], secs: Option<u32>) -> Dnat {
        vip80("192.0.2.200", eps, None, secs)
    }

    #[test]
    fn client_ip_affinity_sends_a_known_client_back_to_its_endpoint() {
        let r = render(&[with_affinity(&["198.51.100.18", "198.51.100.34"], Some(60))]);
        let c = "vip_192_0_2_200_tcp_80";
        for want in [
            format!("\tset {c}_0_aff60 {{ type ipv4_addr; flags dynamic,timeout; timeout 60s; }}"),
            format!(
                "\t\tip saddr @{c}_0_aff60 goto {c}_0\n\t\tip saddr @{c}_1_aff60 goto {c}_1\n\t\tnumgen random mod 2"
            ),
            format!(
                "\tchain {c}_1 {{\n\t\tupdate @{c}_1_aff60 {{ ip saddr }}\n\t\tmeta l4proto tcp dnat ip to 198.51.100.34:8080"
            ),
        ] {
            assert!(r.contains(&want), "{want}\nnot in\n{r}");
        }
        // One endpoint: nothing to remember.
        assert!(!render(&[with_affinity(&["198.51.100.18"], Some(60))]).contains("aff"));
    }

    #[test]
    fn the_source_filter_comes_before_the_affinity_lookups() {
        let mut d = with_affinity(&["198.51.100.18", "198.51.100.34"], Some(60));
        d.sources = Some(vec!["203.0.113.0/24".parse().unwrap()]);
        let r = render(&[d]);
        let c = "vip_192_0_2_200_tcp_80";
        let want = format!(
            "\tchain {c} {{\n\t\tfib saddr type != local ip saddr != {{ 203.0.113.0/24 }} drop\n\t\tip saddr @{c}_0_aff60 goto {c}_0\n"
        );
        assert!(r.contains(&want), "{want}\nnot in\n{r}");
    }

    #[test]
    fn affinity_sets_come_before_their_rules_and_go_after_them() {
        let none = desired(&[with_affinity(&["198.51.100.18", "198.51.100.34"], None)]);
        let a60 = desired(&[with_affinity(&["198.51.100.18", "198.51.100.34"], Some(60))]);
        let on = render_diff(&none, &a60).unwrap();
        let c = "vip_192_0_2_200_tcp_80";
        assert!(on.starts_with(&format!("add set inet l2speaker {c}_0_aff60 {{ type ipv4_addr; flags dynamic,timeout; timeout 60s; }}\nadd set inet l2speaker {c}_1_aff60")), "{on}");
        // A new timeout is a new set; the old ones are deleted last.
        let a90 = desired(&[with_affinity(&["198.51.100.18", "198.51.100.34"], Some(90))]);
        let change = render_diff(&a60, &a90).unwrap();
        assert!(
            change.starts_with(&format!("add set inet l2speaker {c}_0_aff90")),
            "{change}"
        );
        assert!(
            change.ends_with(&format!(
                "delete set inet l2speaker {c}_0_aff60\ndelete set inet l2speaker {c}_1_aff60\n"
            )),
            "{change}"
        );
        // One endpoint replaced: only its set starts over.
        let moved = desired(&[with_affinity(&["198.51.100.18", "198.51.100.50"], Some(60))]);
        let m = render_diff(&a60, &moved).unwrap();
        assert!(
            m.starts_with(&format!("flush set inet l2speaker {c}_1_aff60\n")),
            "{m}"
        );
        assert!(
            !m.contains(&format!("flush set inet l2speaker {c}_0_aff60")),
            "{m}"
        );
        // The VIP port gone: sets deleted after the chains.
        let off = render_diff(&a60, &Desired::new()).unwrap();
        assert!(
            off.ends_with(&format!("delete set inet l2speaker {c}_1_aff60\n")),
            "{off}"
        );
    }

    #[test]
    fn a_change_of_source_ranges_rewrites_only_that_vip_ports_chain() {
        let old = desired(&[with_sources("192.0.2.200", None)]);
        let new = desired(&[with_sources("192.0.2.200", Some(&["198.51.100.0/24"]))]);
        let want = "flush chain inet l2speaker vip_192_0_2_200_tcp_80_0
add rule inet l2speaker vip_192_0_2_200_tcp_80_0 meta l4proto tcp dnat ip to 198.51.100.18:8080
flush chain inet l2speaker vip_192_0_2_200_tcp_80
add rule inet l2speaker vip_192_0_2_200_tcp_80 fib saddr type != local ip saddr != { 198.51.100.0/24 } drop
add rule inet l2speaker vip_192_0_2_200_tcp_80 goto vip_192_0_2_200_tcp_80_0
";
        assert_eq!(render_diff(&old, &new).unwrap(), want);
        assert_eq!(render_diff(&new, &new), None);
    }
}
