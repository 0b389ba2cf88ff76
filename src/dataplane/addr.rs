//! Interfaces and addresses through rtnetlink: a thin adapter behind [`AddrOps`].
//!
//! VIPs are bound as /32 or /128 with a valid lifetime, refreshed on every renewal (lease
//! mode) or every second ([`LifetimeRefresher`], LAN mode), so the kernel drops the address
//! by itself when the speaker dies; IPv6 ones with no DAD (or they
//! stay tentative for a second or two) and preferred lifetime 0 (or the kernel picks the VIP
//! as the node's source address). Each carries IFA_PROTO [`PROTO`] so a restarted speaker can
//! find and remove exactly its own leftovers.

use std::net::{IpAddr, Ipv6Addr};
use std::time::Duration;

use futures::TryStreamExt;
use ipnet::IpNet;
use rtnetlink::packet_route::AddressFamily;
use rtnetlink::packet_route::address::{
    AddressAttribute, AddressFlags, AddressHeaderFlags, AddressProtocol, CacheInfo,
};
use rtnetlink::packet_route::link::{LinkAttribute, State};
use thiserror::Error;

use super::packet::Mac;

/// The IFA_PROTO value marking addresses l2speaker added ('L').
pub const PROTO: u8 = 0x4c;

#[derive(Debug, Error)]
pub enum AddrError {
    #[error("{what}: {source}")]
    Netlink {
        what: String,
        source: rtnetlink::Error,
    },
    #[error("opening a netlink socket: {0}")]
    Connect(std::io::Error),
    /// The address exists on this node and l2speaker did not add it: it is left alone.
    #[error("{ip} is already on interface {index} and was not added by l2speaker: left alone")]
    NotOurs { ip: IpAddr, index: u32 },
}

/// A local interface, as the speaker needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Interface {
    pub name: String,
    pub index: u32,
    pub mac: Option<Mac>,
    /// Operationally up (has carrier).
    pub up: bool,
    /// Its addresses with their prefixes (the subnets it is on), VIPs excluded.
    pub nets: Vec<IpNet>,
    pub link_local: Option<Ipv6Addr>,
    /// The link answers no ARP itself (IFF_NOARP: a dummy such as kube-proxy's `kube-ipvs0`).
    /// An address there is another agent's copy of a Service IP, not a node address.
    pub noarp: bool,
}

impl Interface {
    /// Whether `ip` is on one of this interface's subnets.
    pub fn holds(&self, ip: IpAddr) -> bool {
        self.nets
            .iter()
            .any(|n| n.prefix_len() < n.max_prefix_len() && n.contains(&ip))
    }
}

/// An address as the kernel reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelAddr {
    pub index: u32,
    pub ip: IpAddr,
    pub prefix_len: u8,
    pub ours: bool,
    /// Valid lifetime in seconds (u32::MAX: forever).
    pub valid: u32,
}

/// What the dataplane asks of the kernel's addresses.
pub trait AddrOps: Send + Sync {
    fn interfaces(&self) -> impl Future<Output = Result<Vec<Interface>, AddrError>> + Send;
    fn addresses(&self) -> impl Future<Output = Result<Vec<KernelAddr>, AddrError>> + Send;
    /// The gateways of this node's routes (next hops), both families.
    fn gateways(&self) -> impl Future<Output = Result<Vec<IpAddr>, AddrError>> + Send;
    /// Adds or refreshes (replace) `ip` as a host address on `index`, valid for `valid` —
    /// refused with [`AddrError::NotOurs`] when the node already has `ip` and l2speaker did
    /// not add it (IFA_PROTO), so a node's own address is never rewritten.
    fn bind(
        &self,
        index: u32,
        ip: IpAddr,
        valid: Duration,
    ) -> impl Future<Output = Result<(), AddrError>> + Send;
    /// Removes `ip` from `index` if l2speaker added it; a missing address is not an error,
    /// and an address someone else added is never removed ([`AddrError::NotOurs`]).
    fn unbind(&self, index: u32, ip: IpAddr) -> impl Future<Output = Result<(), AddrError>> + Send;
}

/// The real kernel.
pub struct Netlink {
    handle: rtnetlink::Handle,
}

impl Netlink {
    /// Opens a netlink socket; its connection runs on the current runtime.
    pub fn connect() -> Result<Self, AddrError> {
        let (conn, handle, _) = rtnetlink::new_connection().map_err(AddrError::Connect)?;
        tokio::spawn(conn);
        Ok(Netlink { handle })
    }
}

/// The rtnetlink multicast groups (the legacy bit mask of `linux/rtnetlink.h`): links,
/// IPv4 and IPv6 addresses and routes.
const CHANGE_GROUPS: u32 = 0x1 | 0x10 | 0x40 | 0x100 | 0x400;

/// A counter that moves each time the kernel announces a change of a link (carrier
/// included), an address or a route in this network namespace: the interface list is read
/// again on change instead of polled. The kernel drops announcements when the socket's
/// buffer overflows, so a reader still re-reads now and then.
pub fn watch_changes() -> Result<tokio::sync::watch::Receiver<u64>, AddrError> {
    use futures::StreamExt;
    use rtnetlink::sys::{AsyncSocket, SocketAddr};
    let (mut conn, handle, mut messages) =
        rtnetlink::new_connection().map_err(AddrError::Connect)?;
    conn.socket_mut()
        .socket_mut()
        .bind(&SocketAddr::new(0, CHANGE_GROUPS))
        .map_err(AddrError::Connect)?;
    tokio::spawn(conn);
    let (tx, rx) = tokio::sync::watch::channel(0);
    tokio::spawn(async move {
        let _handle = handle; // the connection lives as long as a handle does
        while let Some((m, _)) = messages.next().await {
            if is_own_refresh(&m) {
                continue;
            }
            tx.send_modify(|n| *n += 1);
            if tx.is_closed() {
                break;
            }
        }
    });
    Ok(rx)
}

/// A new or refreshed address of l2speaker's own, or a change of a local route (which the
/// kernel makes for every local address, alongside an address notification of its own):
/// nothing to re-read for. The keeper extends hundreds of lifetimes a second, each
/// announced, and an IPv6 one with its local route too.
fn is_own_refresh(
    m: &rtnetlink::packet_core::NetlinkMessage<rtnetlink::packet_route::RouteNetlinkMessage>,
) -> bool {
    use rtnetlink::packet_core::NetlinkPayload;
    use rtnetlink::packet_route::RouteNetlinkMessage;
    use rtnetlink::packet_route::route::RouteType;
    match &m.payload {
        NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewAddress(a)) => {
            a.attributes.iter().any(|x| matches!(x, AddressAttribute::Protocol(AddressProtocol::Other(p)) if *p == PROTO))
        }
        NetlinkPayload::InnerMessage(
            RouteNetlinkMessage::NewRoute(r) | RouteNetlinkMessage::DelRoute(r),
        ) => r.header.kind == RouteType::Local,
        _ => false,
    }
}

fn host_prefix(ip: IpAddr) -> u8 {
    if ip.is_ipv4() { 32 } else { 128 }
}

/// The kernel gave up on a dump because the list changed while it was read (EBUSY, as
/// rtnetlink reports an interrupted dump): read it again.
fn is_interrupted(e: &AddrError) -> bool {
    matches!(e, AddrError::Netlink { source: rtnetlink::Error::NetlinkError(m), .. } if m.raw_code() == -libc::EBUSY)
}

/// How many times an interrupted dump is read again before the error is reported.
const DUMP_ATTEMPTS: usize = 5;

fn is_missing(e: &rtnetlink::Error) -> bool {
    matches!(e, rtnetlink::Error::NetlinkError(m) if m.raw_code() == -libc::EADDRNOTAVAIL || m.raw_code() == -libc::ENODEV)
}

impl Netlink {
    async fn links(&self) -> Result<Vec<Interface>, AddrError> {
        let nl = |what: &str| {
            let what = what.to_string();
            move |source| AddrError::Netlink { what, source }
        };
        let mut links = self.handle.link().get().execute();
        let mut out = Vec::new();
        while let Some(l) = links.try_next().await.map_err(nl("listing links"))? {
            let mut iface = Interface {
                name: String::new(),
                index: l.header.index,
                mac: None,
                up: false,
                nets: vec![],
                link_local: None,
                noarp: l
                    .header
                    .flags
                    .contains(rtnetlink::packet_route::link::LinkFlags::Noarp),
            };
            for a in &l.attributes {
                match a {
                    LinkAttribute::IfName(n) => iface.name = n.clone(),
                    LinkAttribute::Address(m) if m.len() == 6 => {
                        iface.mac = Some([m[0], m[1], m[2], m[3], m[4], m[5]])
                    }
                    LinkAttribute::OperState(s) => iface.up = *s == State::Up,
                    _ => {}
                }
            }
            out.push(iface);
        }
        Ok(out)
    }

    async fn addresses_once(&self) -> Result<Vec<KernelAddr>, AddrError> {
        let mut addrs = self.handle.address().get().execute();
        let mut out = Vec::new();
        while let Some(m) = addrs
            .try_next()
            .await
            .map_err(|source| AddrError::Netlink {
                what: "listing addresses".into(),
                source,
            })?
        {
            let mut ip = None;
            let mut ours = false;
            let mut valid = u32::MAX;
            for a in &m.attributes {
                match a {
                    AddressAttribute::Address(x) if m.header.family == AddressFamily::Inet6 => {
                        ip = Some(*x)
                    }
                    AddressAttribute::Local(x) => ip = Some(*x),
                    AddressAttribute::Address(x) if ip.is_none() => ip = Some(*x),
                    AddressAttribute::Protocol(AddressProtocol::Other(p)) => ours = *p == PROTO,
                    AddressAttribute::CacheInfo(c) => valid = c.ifa_valid,
                    _ => {}
                }
            }
            if let Some(ip) = ip {
                out.push(KernelAddr {
                    index: m.header.index,
                    ip,
                    prefix_len: m.header.prefix_len,
                    ours,
                    valid,
                });
            }
        }
        Ok(out)
    }

    /// Our address `ip` on interface `index` (if there), and whether anything else holds
    /// `ip` there.
    async fn lookup(
        &self,
        index: u32,
        ip: IpAddr,
    ) -> Result<
        (
            Option<rtnetlink::packet_route::address::AddressMessage>,
            bool,
        ),
        AddrError,
    > {
        let mut req = self
            .handle
            .address()
            .get()
            .set_link_index_filter(index)
            .set_address_filter(ip)
            .execute();
        let mut found = None;
        let mut foreign = false;
        loop {
            match req.try_next().await {
                Ok(Some(m)) => {
                    let ours = m.attributes.iter().any(|a| {
                        matches!(a, AddressAttribute::Protocol(AddressProtocol::Other(p)) if *p == PROTO)
                    });
                    if ours && m.header.prefix_len == host_prefix(ip) {
                        found = Some(m);
                    } else {
                        foreign = true;
                    }
                }
                Ok(None) => break,
                Err(e) if is_missing(&e) => break,
                Err(source) => {
                    return Err(AddrError::Netlink {
                        what: format!("looking up {ip} on interface {index}"),
                        source,
                    });
                }
            }
        }
        Ok((found, foreign))
    }

    async fn gateways_once(&self) -> Result<Vec<IpAddr>, AddrError> {
        use rtnetlink::RouteMessageBuilder;
        use rtnetlink::packet_route::route::{RouteAddress, RouteAttribute};
        let mut out = Vec::new();
        for msg in [
            RouteMessageBuilder::<std::net::Ipv4Addr>::new().build(),
            RouteMessageBuilder::<Ipv6Addr>::new().build(),
        ] {
            let mut routes = self.handle.route().get(msg).execute();
            while let Some(r) = routes
                .try_next()
                .await
                .map_err(|source| AddrError::Netlink {
                    what: "listing routes".into(),
                    source,
                })?
            {
                for a in &r.attributes {
                    let gw = match a {
                        RouteAttribute::Gateway(RouteAddress::Inet(v4)) => IpAddr::V4(*v4),
                        RouteAttribute::Gateway(RouteAddress::Inet6(v6)) => IpAddr::V6(*v6),
                        _ => continue,
                    };
                    if !out.contains(&gw) {
                        out.push(gw);
                    }
                }
            }
        }
        Ok(out)
    }
}

/// Runs the dump `f` again while the kernel reports it interrupted (at most
/// [`DUMP_ATTEMPTS`] times).
async fn dump<T, F: Future<Output = Result<T, AddrError>>>(
    mut f: impl FnMut() -> F,
) -> Result<T, AddrError> {
    let mut attempt = 1;
    loop {
        match f().await {
            Err(e) if is_interrupted(&e) && attempt < DUMP_ATTEMPTS => attempt += 1,
            r => return r,
        }
    }
}

impl AddrOps for Netlink {
    async fn interfaces(&self) -> Result<Vec<Interface>, AddrError> {
        let mut out = dump(|| self.links()).await?;
        for a in self.addresses().await? {
            if a.ours {
                continue;
            }
            if let Some(i) = out.iter_mut().find(|i| i.index == a.index) {
                if let IpAddr::V6(v6) = a.ip
                    && v6.is_unicast_link_local()
                {
                    i.link_local = Some(v6);
                    continue;
                }
                if let Ok(net) = IpNet::new(a.ip, a.prefix_len) {
                    i.nets.push(net);
                }
            }
        }
        Ok(out)
    }

    async fn addresses(&self) -> Result<Vec<KernelAddr>, AddrError> {
        dump(|| self.addresses_once()).await
    }

    async fn gateways(&self) -> Result<Vec<IpAddr>, AddrError> {
        dump(|| self.gateways_once()).await
    }

    async fn bind(&self, index: u32, ip: IpAddr, valid: Duration) -> Result<(), AddrError> {
        let foreign: Vec<KernelAddr> = self
            .addresses()
            .await?
            .into_iter()
            .filter(|a| a.ip == ip && !a.ours)
            .collect();
        if !foreign.is_empty() {
            // Another agent's host copy on a no-ARP link (kube-proxy's kube-ipvs0) is no
            // node address; anything else is.
            let links = dump(|| self.links()).await?;
            let copy = |a: &KernelAddr| {
                a.index != index
                    && a.prefix_len == host_prefix(ip)
                    && links.iter().any(|l| l.index == a.index && l.noarp)
            };
            if let Some(a) = foreign.iter().find(|a| !copy(a)) {
                return Err(AddrError::NotOurs { ip, index: a.index });
            }
        }
        let mut req = self
            .handle
            .address()
            .add(index, ip, host_prefix(ip))
            .replace();
        lifetime_attributes(req.message_mut(), ip, valid);
        req.execute().await.map_err(|source| AddrError::Netlink {
            what: format!("binding {ip}/{} to interface {index}", host_prefix(ip)),
            source,
        })
    }

    async fn unbind(&self, index: u32, ip: IpAddr) -> Result<(), AddrError> {
        let (found, foreign) = dump(|| self.lookup(index, ip)).await?;
        let Some(m) = found else {
            return if foreign {
                Err(AddrError::NotOurs { ip, index })
            } else {
                Ok(())
            };
        };
        match self.handle.address().del(m).execute().await {
            Ok(()) => Ok(()),
            Err(e) if is_missing(&e) => Ok(()),
            Err(source) => Err(AddrError::Netlink {
                what: format!("removing {ip} from interface {index}"),
                source,
            }),
        }
    }
}

/// How many requests one send carries: their acknowledgements must fit the socket's
/// receive buffer (each takes about 1 KiB of it in the kernel's accounting).
const REFRESH_CHUNK: usize = 64;

/// Extends the valid lifetime of addresses l2speaker bound, many per system call and with
/// no dump (a refresh is a `RTM_NEWADDR` replace of an address already bound): what keeps
/// LAN-mode VIP addresses' lifetimes short at a few hundred refreshes a second.
///
/// A replace creates the address when it is missing, so the caller sends only addresses it
/// has just seen bound (the node keeper, under the gate's lock).
pub struct LifetimeRefresher {
    socket: rtnetlink::sys::Socket,
    seq: u32,
}

impl LifetimeRefresher {
    pub fn open() -> std::io::Result<Self> {
        let mut socket = rtnetlink::sys::Socket::new(rtnetlink::sys::protocols::NETLINK_ROUTE)?;
        socket.bind_auto()?;
        socket.connect(&rtnetlink::sys::SocketAddr::new(0, 0))?;
        Ok(LifetimeRefresher { socket, seq: 0 })
    }

    /// Gives each `(interface index, ip)` the valid lifetime `valid`; returns the ones the
    /// kernel refused, with why.
    pub fn refresh(
        &mut self,
        addrs: &[(u32, IpAddr)],
        valid: Duration,
    ) -> std::io::Result<Vec<(IpAddr, std::io::Error)>> {
        use rtnetlink::packet_core::{
            NLM_F_ACK, NLM_F_CREATE, NLM_F_REPLACE, NLM_F_REQUEST, NetlinkMessage, NetlinkPayload,
        };
        use rtnetlink::packet_route::RouteNetlinkMessage;
        let mut refused = Vec::new();
        for chunk in addrs.chunks(REFRESH_CHUNK) {
            let first = self.seq.wrapping_add(1);
            let mut buf = Vec::new();
            for (index, ip) in chunk {
                self.seq = self.seq.wrapping_add(1);
                let mut m = NetlinkMessage::from(RouteNetlinkMessage::NewAddress(address_message(
                    *index, *ip, valid,
                )));
                m.header.flags = NLM_F_REQUEST | NLM_F_ACK | NLM_F_REPLACE | NLM_F_CREATE;
                m.header.sequence_number = self.seq;
                m.finalize();
                let at = buf.len();
                buf.resize(at + m.buffer_len(), 0);
                m.serialize(&mut buf[at..]);
            }
            self.socket.send(&buf, 0)?;
            // The kernel handled every request inside the send; their answers are queued.
            let mut answered = 0;
            let mut rx = vec![0u8; 64 * 1024];
            while answered < chunk.len() {
                let n = self.socket.recv(&mut &mut rx[..], 0)?;
                let mut at = 0;
                while at < n {
                    let msg = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&rx[at..n])
                        .map_err(|e| std::io::Error::other(e.to_string()))?;
                    let len = msg.header.length as usize;
                    let seq = msg.header.sequence_number;
                    if let NetlinkPayload::Error(e) = msg.payload {
                        let i = seq.wrapping_sub(first) as usize;
                        if i < chunk.len() {
                            answered += 1;
                            if e.code.is_some() {
                                refused.push((chunk[i].1, e.to_io()));
                            }
                        }
                    }
                    if len == 0 {
                        break;
                    }
                    at += (len + 3) & !3;
                }
            }
        }
        Ok(refused)
    }
}

/// The `RTM_NEWADDR` body that binds `ip` as l2speaker's host address on `index`.
fn address_message(
    index: u32,
    ip: IpAddr,
    valid: Duration,
) -> rtnetlink::packet_route::address::AddressMessage {
    let mut msg = rtnetlink::packet_route::address::AddressMessage::default();
    msg.header.index = index;
    msg.header.prefix_len = host_prefix(ip);
    msg.header.family = if ip.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    };
    if ip.is_ipv4() {
        msg.attributes.push(AddressAttribute::Local(ip));
    }
    msg.attributes.push(AddressAttribute::Address(ip));
    lifetime_attributes(&mut msg, ip, valid);
    msg
}

/// Lifetimes, l2speaker's IFA_PROTO and, for IPv6, no DAD: what every bind and refresh sets.
fn lifetime_attributes(
    msg: &mut rtnetlink::packet_route::address::AddressMessage,
    ip: IpAddr,
    valid: Duration,
) {
    let secs = valid.as_secs().max(1) as u32;
    let mut lifetimes = CacheInfo::default();
    lifetimes.ifa_preferred = if ip.is_ipv6() { 0 } else { secs };
    lifetimes.ifa_valid = secs;
    msg.attributes.push(AddressAttribute::CacheInfo(lifetimes));
    msg.attributes
        .push(AddressAttribute::Protocol(AddressProtocol::Other(PROTO)));
    if ip.is_ipv6() {
        msg.header.flags |= AddressHeaderFlags::Nodad;
        msg.attributes
            .push(AddressAttribute::Flags(AddressFlags::Nodad));
    }
}
