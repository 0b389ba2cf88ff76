//! DNAT in the speaker's own nftables table: the desired rules are a pure function of the
//! owned VIPs and their endpoints ([`render`]); [`Nft`] applies them with `nft -f` as one
//! atomic transaction.
//!
//! The `nftables` crate cannot declare the named verdict maps used here (and fails to read
//! rulesets that have them), so the rules are nft's own text, snapshot-tested.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::net::IpAddr;

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
}

/// One VIP port and where it leads: what the table holds, per VIP port.
pub type Desired = BTreeMap<(IpAddr, Protocol, u16), Vec<Endpoint>>;

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
            d.insert((e.vip, p.protocol, p.port), eps);
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

fn map_of(vip: IpAddr) -> &'static str {
    if vip.is_ipv4() { "vips4" } else { "vips6" }
}

/// The rule of a VIP port's chain: straight to its one endpoint, or spread over several.
fn spread_rule(chain: &str, n: usize) -> String {
    if n == 1 {
        format!("goto {chain}_0")
    } else {
        let arms: Vec<String> = (0..n).map(|i| format!("{i} : goto {chain}_{i}")).collect();
        format!("numgen random mod {n} vmap {{ {} }}", arms.join(", "))
    }
}

/// The rule of an endpoint chain: mark remote endpoints for masquerade, then DNAT.
fn endpoint_rule(vip: IpAddr, proto: Protocol, ep: &Endpoint) -> String {
    let family = if vip.is_ipv4() { "ip" } else { "ip6" };
    let mark = if ep.local {
        String::new()
    } else {
        format!("meta mark set meta mark | {MASQ_MARK:#010x} ")
    };
    format!(
        "{mark}meta l4proto {} dnat {family} to {}",
        proto.as_str(),
        ep_addr(ep.ip, ep.port)
    )
}

/// The whole table, as one transaction that replaces the previous one (`table` + `delete
/// table` + `table {…}`: creating it first makes the delete safe; `flush table` would not do,
/// it keeps map elements and chains).
pub fn render_full(d: &Desired) -> String {
    let mut elements4 = Vec::new();
    let mut elements6 = Vec::new();
    let mut chains = String::new();
    for ((vip, proto, port), eps) in d {
        let chain = chain_name(*vip, *proto, *port);
        let el = format!("{} : goto {chain}", element(*vip, *proto, *port));
        if vip.is_ipv4() {
            elements4.push(el)
        } else {
            elements6.push(el)
        }
        let _ = writeln!(
            chains,
            "\tchain {chain} {{\n\t\t{}\n\t}}",
            spread_rule(&chain, eps.len())
        );
        for (i, ep) in eps.iter().enumerate() {
            let _ = writeln!(
                chains,
                "\tchain {chain}_{i} {{\n\t\t{}\n\t}}",
                endpoint_rule(*vip, *proto, ep)
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
        "table inet {TABLE}\ndelete table inet {TABLE}\ntable inet {TABLE} {{\n{}{}\
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
    for (key @ (vip, proto, port), eps) in old {
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
    }
    for (key @ (vip, proto, port), eps) in new {
        let before = old.get(key);
        if before == Some(eps) {
            continue;
        }
        let chain = chain_name(*vip, *proto, *port);
        let had = before.map_or(0, Vec::len);
        for (i, ep) in eps.iter().enumerate() {
            if i < had {
                let _ = writeln!(s, "flush chain inet {TABLE} {chain}_{i}");
            } else {
                let _ = writeln!(s, "add chain inet {TABLE} {chain}_{i}");
            }
            let _ = writeln!(
                s,
                "add rule inet {TABLE} {chain}_{i} {}",
                endpoint_rule(*vip, *proto, ep)
            );
        }
        if before.is_some() {
            let _ = writeln!(s, "flush chain inet {TABLE} {chain}");
        } else {
            let _ = writeln!(s, "add chain inet {TABLE} {chain}");
        }
        let _ = writeln!(
            s,
            "add rule inet {TABLE} {chain} {}",
            spread_rule(&chain, eps.len())
        );
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
}

/// `nft -f -`.
pub struct Nft;

impl NftApply for Nft {
    async fn apply(&self, script: &str) -> Result<(), NftError> {
        use tokio::io::AsyncWriteExt;
        let mut child = tokio::process::Command::new("nft")
            .args(["-f", "-"])
            .kill_on_drop(true)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()?;
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
        };
        let r = render(&[e]);
        assert!(!r.contains("192.0.2.200"));
        assert!(!r.contains("elements"));
    }
}
