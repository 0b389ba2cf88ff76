//! DNAT in the speaker's own nftables table: the desired rules are a pure function of the
//! owned VIPs and their endpoints ([`render`]); [`Nft`] applies them with `nft -f` as one
//! atomic transaction.
//!
//! The `nftables` crate cannot declare the named verdict maps used here (and fails to read
//! rulesets that have them), so the rules are nft's own text, snapshot-tested.

use std::fmt::Write;
use std::net::IpAddr;

use thiserror::Error;

use crate::service::Protocol;

pub const TABLE: &str = "l2speaker";
/// The packet mark bit that asks for masquerade (traffic DNATed to a pod on another node,
/// whose replies must come back through this node). kube-proxy uses 0x4000 and 0x8000.
pub const MASQ_MARK: u32 = 0x0000_2000;

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
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

fn chain_name(vip: IpAddr, p: &PortMap) -> String {
    let v = vip.to_string().replace(['.', ':'], "_");
    format!("vip_{v}_{}_{}", p.protocol.as_str(), p.port)
}

fn ep_addr(ip: IpAddr, port: u16) -> String {
    match ip {
        IpAddr::V4(v4) => format!("{v4}:{port}"),
        IpAddr::V6(v6) => format!("[{v6}]:{port}"),
    }
}

/// The whole table for `entries`, as one transaction that replaces the previous table
/// (`table` + `delete table` + `table {…}`: creating it first makes the delete safe).
pub fn render(entries: &[Dnat]) -> String {
    let mut entries = entries.to_vec();
    entries.sort();
    let mut elements4 = Vec::new();
    let mut elements6 = Vec::new();
    let mut chains = String::new();
    for e in &entries {
        for p in &e.ports {
            let eps: Vec<&Endpoint> = p
                .endpoints
                .iter()
                .filter(|ep| ep.ip.is_ipv4() == e.vip.is_ipv4())
                .collect();
            if eps.is_empty() {
                continue;
            }
            let chain = chain_name(e.vip, p);
            let element = format!(
                "{} . {} . {} : goto {chain}",
                e.vip,
                p.protocol.as_str(),
                p.port
            );
            if e.vip.is_ipv4() {
                elements4.push(element)
            } else {
                elements6.push(element)
            }
            let family = if e.vip.is_ipv4() { "ip" } else { "ip6" };
            let proto = p.protocol.as_str();
            let _ = writeln!(chains, "\tchain {chain} {{");
            if eps.len() == 1 {
                let _ = writeln!(chains, "\t\tgoto {chain}_0");
            } else {
                let arms: Vec<String> = (0..eps.len())
                    .map(|i| format!("{i} : goto {chain}_{i}"))
                    .collect();
                let _ = writeln!(
                    chains,
                    "\t\tnumgen random mod {} vmap {{ {} }}",
                    eps.len(),
                    arms.join(", ")
                );
            }
            let _ = writeln!(chains, "\t}}");
            for (i, ep) in eps.iter().enumerate() {
                let mark = if ep.local {
                    String::new()
                } else {
                    format!("meta mark set meta mark | {MASQ_MARK:#010x} ")
                };
                let _ = writeln!(chains, "\tchain {chain}_{i} {{");
                let _ = writeln!(
                    chains,
                    "\t\t{mark}meta l4proto {proto} dnat {family} to {}",
                    ep_addr(ep.ip, ep.port)
                );
                let _ = writeln!(chains, "\t}}");
            }
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
}

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
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()?;
        let mut stdin = child.stdin.take().expect("piped");
        stdin.write_all(script.as_bytes()).await?;
        drop(stdin);
        let out = child.wait_with_output().await?;
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
