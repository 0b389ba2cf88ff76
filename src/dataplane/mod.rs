//! The dataplane of one node: what the owner of a VIP does to the kernel.
//!
//! - [`addr`]: bind and unbind VIPs, list interfaces (rtnetlink);
//! - [`packet`]: gratuitous ARP and unsolicited NA frames, probes and the claim classifier (pure);
//! - [`probe`]: whether another host answers for an address (ARP probe / DAD);
//! - [`sink`]: sending frames (pnet);
//! - [`nft`]: DNAT rules (pure rendering, applied with `nft -f`);
//! - [`nft_watch`]: notices when someone else changes our nftables tables;
//! - [`listening`]: the sockets listening on the node (node-IP mode keeps off their ports).
//!
//! Order on gain: probe the LAN, program DNAT, bind, announce. On loss: stop announcing,
//! unbind, reprogram.

pub mod addr;
pub mod gate;
pub mod listening;
pub mod nft;
pub mod nft_watch;
pub mod packet;
pub mod probe;
pub mod sink;

use std::net::IpAddr;
use std::time::Duration;

use thiserror::Error;

use addr::{AddrError, AddrOps, Interface};
use nft::{Dnat, NftApply, NftError};
use sink::FrameSink;

#[derive(Debug, Error)]
pub enum DataplaneError {
    #[error(transparent)]
    Addr(#[from] AddrError),
    #[error(transparent)]
    Nft(#[from] NftError),
    #[error("announcing {ip} on {interface}: {source}")]
    Announce {
        ip: IpAddr,
        interface: String,
        source: std::io::Error,
    },
    #[error("interface {0} has no MAC address")]
    NoMac(String),
    #[error("interface {0} has no IPv6 link-local address to announce from")]
    NoLinkLocal(String),
}

impl DataplaneError {
    pub fn metric_label(&self) -> &'static str {
        match self {
            DataplaneError::Addr(_) => "address",
            DataplaneError::Nft(_) => "nftables",
            DataplaneError::Announce { .. }
            | DataplaneError::NoMac(_)
            | DataplaneError::NoLinkLocal(_) => "announce",
        }
    }
}

/// How many frames one announcement round sends, by kind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Sent {
    pub arp_request: u32,
    pub arp_reply: u32,
    pub na: u32,
}

pub struct Dataplane<A, N, S> {
    pub addrs: A,
    nft: N,
    sink: S,
    dnat: bool,
    /// What the kernel holds, as far as we know (None: unknown, replace the table whole).
    applied: tokio::sync::Mutex<Option<nft::Desired>>,
}

impl<A: AddrOps, N: NftApply, S: FrameSink> Dataplane<A, N, S> {
    pub fn new(addrs: A, nft: N, sink: S, dnat: bool) -> Self {
        Dataplane {
            addrs,
            nft,
            sink,
            dnat,
            applied: tokio::sync::Mutex::new(None),
        }
    }

    /// Binds (or refreshes) `ip` on `iface`, valid for `valid`.
    pub async fn bind(
        &self,
        iface: &Interface,
        ip: IpAddr,
        valid: Duration,
    ) -> Result<(), DataplaneError> {
        Ok(self.addrs.bind(iface.index, ip, valid).await?)
    }

    pub async fn unbind(&self, iface: &Interface, ip: IpAddr) -> Result<(), DataplaneError> {
        Ok(self.addrs.unbind(iface.index, ip).await?)
    }

    /// Makes the DNAT table match `entries`: one atomic transaction that touches only what
    /// changed (the whole table the first time, and after any failure); nothing when unchanged.
    pub async fn program(&self, entries: &[Dnat]) -> Result<(), DataplaneError> {
        if !self.dnat {
            return Ok(());
        }
        let want = nft::desired(entries);
        let mut applied = self.applied.lock().await;
        let script = match applied.as_ref() {
            Some(have) if *have == want => return Ok(()),
            Some(have) => nft::render_diff(have, &want).unwrap_or_else(|| nft::render_full(&want)),
            None => nft::render_full(&want),
        };
        let incremental = applied.is_some();
        // Until it succeeds, we do not know what the kernel holds.
        *applied = None;
        match self.nft.apply(&script).await {
            Ok(()) => {}
            // The failed transaction changed nothing; start over from a clean table.
            Err(e) if incremental => {
                tracing::warn!(error = %e, "incremental DNAT update failed; replacing the table");
                self.nft.apply(&nft::render_full(&want)).await?;
            }
            Err(e) => return Err(e.into()),
        }
        *applied = Some(want);
        Ok(())
    }

    /// Forgets what the kernel holds: the next [`Dataplane::program`] replaces the table
    /// whole (someone else changed it).
    pub async fn invalidate(&self) {
        *self.applied.lock().await = None;
    }

    /// Checks that the table the last [`Dataplane::program`] applied is still in the kernel;
    /// when it is not, forgets it (the next program puts it back whole) and says so.
    pub async fn verify(&self) -> Result<bool, DataplaneError> {
        if !self.dnat {
            return Ok(true);
        }
        let mut applied = self.applied.lock().await;
        if applied.is_none() {
            return Ok(true);
        }
        let present = self.nft.table_exists().await?;
        if !present {
            *applied = None;
        }
        Ok(present)
    }

    /// Removes the DNAT table.
    pub async fn remove_rules(&self) -> Result<(), DataplaneError> {
        if !self.dnat {
            return Ok(());
        }
        let mut applied = self.applied.lock().await;
        *applied = None;
        self.nft.apply(&nft::render_delete()).await?;
        Ok(())
    }

    /// One announcement round for `ip` on `iface`: both gratuitous ARP forms, or one NA.
    pub fn announce(
        &self,
        iface: &Interface,
        ip: IpAddr,
        router: bool,
    ) -> Result<Sent, DataplaneError> {
        let mac = iface
            .mac
            .ok_or_else(|| DataplaneError::NoMac(iface.name.clone()))?;
        let send = |frame: Vec<u8>| {
            self.sink
                .send(&iface.name, iface.index, &frame)
                .map_err(|source| DataplaneError::Announce {
                    ip,
                    interface: iface.name.clone(),
                    source,
                })
        };
        match ip {
            IpAddr::V4(v4) => {
                send(packet::garp_request(mac, v4))?;
                send(packet::garp_reply(mac, v4))?;
                Ok(Sent {
                    arp_request: 1,
                    arp_reply: 1,
                    na: 0,
                })
            }
            IpAddr::V6(v6) => {
                let ll = iface
                    .link_local
                    .ok_or_else(|| DataplaneError::NoLinkLocal(iface.name.clone()))?;
                send(packet::unsolicited_na(mac, ll, v6, router))?;
                Ok(Sent {
                    na: 1,
                    ..Sent::default()
                })
            }
        }
    }

    /// Removes every address this speaker added (IFA_PROTO) that `keep` does not claim.
    pub async fn remove_stale_addresses(
        &self,
        keep: impl Fn(IpAddr) -> bool,
    ) -> Result<Vec<IpAddr>, DataplaneError> {
        let mut removed = Vec::new();
        for a in self.addrs.addresses().await? {
            if a.ours && !keep(a.ip) {
                self.addrs.unbind(a.index, a.ip).await?;
                removed.push(a.ip);
            }
        }
        Ok(removed)
    }
}

/// Whether the node forwards IPv6 on `interface` (the NA's Router flag).
pub fn forwards_v6(interface: &str) -> bool {
    std::fs::read_to_string(format!("/proc/sys/net/ipv6/conf/{interface}/forwarding"))
        .is_ok_and(|s| s.trim() == "1")
}

/// Whether IPv4 forwarding is on (DNAT to pods on other nodes needs it). Reported, never
/// changed: that is the node's owner's decision.
pub fn forwards_v4() -> bool {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward").is_ok_and(|s| s.trim() == "1")
}

#[cfg(test)]
pub mod fake {
    //! Recording fakes: what would have reached the kernel.
    use std::sync::Mutex;

    use super::*;
    use addr::KernelAddr;

    #[derive(Default)]
    pub struct Kernel {
        pub log: Mutex<Vec<String>>,
        pub addrs: Mutex<Vec<KernelAddr>>,
    }

    impl AddrOps for Kernel {
        async fn interfaces(&self) -> Result<Vec<Interface>, AddrError> {
            Ok(vec![])
        }
        async fn addresses(&self) -> Result<Vec<KernelAddr>, AddrError> {
            Ok(self.addrs.lock().unwrap().clone())
        }
        async fn gateways(&self) -> Result<Vec<IpAddr>, AddrError> {
            Ok(vec![])
        }
        async fn bind(&self, index: u32, ip: IpAddr, valid: Duration) -> Result<(), AddrError> {
            self.log
                .lock()
                .unwrap()
                .push(format!("bind {ip} on {index} for {}s", valid.as_secs()));
            Ok(())
        }
        async fn unbind(&self, index: u32, ip: IpAddr) -> Result<(), AddrError> {
            self.log
                .lock()
                .unwrap()
                .push(format!("unbind {ip} from {index}"));
            Ok(())
        }
    }

    #[derive(Default)]
    pub struct Nft {
        pub scripts: Mutex<Vec<String>>,
        /// Someone else removed the table.
        pub gone: std::sync::atomic::AtomicBool,
    }

    impl NftApply for Nft {
        async fn table_exists(&self) -> Result<bool, NftError> {
            Ok(!self.gone.load(std::sync::atomic::Ordering::SeqCst))
        }
        async fn apply(&self, script: &str) -> Result<(), NftError> {
            self.scripts.lock().unwrap().push(script.to_string());
            Ok(())
        }
    }

    #[derive(Default)]
    pub struct Sink {
        pub frames: Mutex<Vec<(String, Vec<u8>)>>,
    }

    impl FrameSink for Sink {
        fn send(&self, interface: &str, _index: u32, frame: &[u8]) -> std::io::Result<()> {
            self.frames
                .lock()
                .unwrap()
                .push((interface.to_string(), frame.to_vec()));
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::service::Protocol;

    fn iface() -> Interface {
        Interface {
            name: "eth0".into(),
            index: 2,
            mac: Some([2, 0, 0, 0, 0, 0x11]),
            up: true,
            nets: vec![],
            link_local: Some("fe80::11".parse().unwrap()),
            noarp: false,
        }
    }

    fn dp() -> Dataplane<fake::Kernel, fake::Nft, fake::Sink> {
        Dataplane::new(
            fake::Kernel::default(),
            fake::Nft::default(),
            fake::Sink::default(),
            true,
        )
    }

    #[tokio::test]
    async fn unchanged_dnat_is_not_applied_twice() {
        let d = dp();
        let e = Dnat {
            vip: "192.0.2.200".parse().unwrap(),
            ports: vec![nft::PortMap {
                protocol: Protocol::Tcp,
                port: 80,
                endpoints: vec![],
            }],
            sources: None,
            affinity: None,
        };
        d.program(std::slice::from_ref(&e)).await.unwrap();
        d.program(&[e]).await.unwrap();
        d.program(&[]).await.unwrap();
        assert_eq!(
            d.nft.scripts.lock().unwrap().len(),
            1,
            "the same table, rendered twice, is applied once"
        );
        d.remove_rules().await.unwrap();
        assert_eq!(
            d.nft.scripts.lock().unwrap().last().unwrap(),
            &nft::render_delete()
        );
    }

    #[tokio::test]
    async fn a_table_removed_by_someone_else_is_put_back_whole() {
        let d = dp();
        let e = Dnat {
            vip: "192.0.2.200".parse().unwrap(),
            ports: vec![nft::PortMap {
                protocol: Protocol::Tcp,
                port: 80,
                endpoints: vec![],
            }],
            sources: None,
            affinity: None,
        };
        d.program(std::slice::from_ref(&e)).await.unwrap();
        assert!(d.verify().await.unwrap(), "still there");
        d.nft.gone.store(true, std::sync::atomic::Ordering::SeqCst);
        assert!(!d.verify().await.unwrap(), "found gone");
        d.nft.gone.store(false, std::sync::atomic::Ordering::SeqCst);
        d.program(std::slice::from_ref(&e)).await.unwrap();
        let scripts = d.nft.scripts.lock().unwrap();
        assert_eq!(scripts.len(), 2, "the same entries, applied again");
        assert_eq!(scripts[1], nft::render_full(&nft::desired(&[e])));
    }

    #[tokio::test]
    async fn an_ipv4_round_sends_both_gratuitous_forms_and_ipv6_one_na() {
        let d = dp();
        let sent = d
            .announce(&iface(), "192.0.2.200".parse().unwrap(), false)
            .unwrap();
        assert_eq!(
            sent,
            Sent {
                arp_request: 1,
                arp_reply: 1,
                na: 0
            }
        );
        let sent = d
            .announce(&iface(), "2001:db8::200".parse().unwrap(), true)
            .unwrap();
        assert_eq!(sent.na, 1);
        let frames = d.sink.frames.lock().unwrap();
        assert_eq!(
            frames[0].1,
            packet::garp_request([2, 0, 0, 0, 0, 0x11], "192.0.2.200".parse().unwrap())
        );
        assert_eq!(
            frames[1].1,
            packet::garp_reply([2, 0, 0, 0, 0, 0x11], "192.0.2.200".parse().unwrap())
        );
        assert_eq!(frames.len(), 3);
    }

    #[tokio::test]
    async fn only_our_own_stale_addresses_are_removed() {
        let d = dp();
        *d.addrs.addrs.lock().unwrap() = vec![
            addr::KernelAddr {
                index: 2,
                ip: "192.0.2.200".parse().unwrap(),
                prefix_len: 32,
                ours: true,
                valid: 3,
            },
            addr::KernelAddr {
                index: 2,
                ip: "192.0.2.201".parse().unwrap(),
                prefix_len: 32,
                ours: true,
                valid: 3,
            },
            addr::KernelAddr {
                index: 2,
                ip: "192.0.2.11".parse().unwrap(),
                prefix_len: 24,
                ours: false,
                valid: u32::MAX,
            },
        ];
        let removed = d
            .remove_stale_addresses(|ip| ip == "192.0.2.201".parse::<IpAddr>().unwrap())
            .await
            .unwrap();
        assert_eq!(removed, vec!["192.0.2.200".parse::<IpAddr>().unwrap()]);
        assert_eq!(*d.addrs.log.lock().unwrap(), ["unbind 192.0.2.200 from 2"]);
    }
}
