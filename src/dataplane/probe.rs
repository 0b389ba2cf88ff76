//! Is anyone on the LAN using an address? One ARP probe (RFC 5227) or IPv6 DAD probe on the
//! interface, and every frame for `wait` read and classified by [`super::packet::claimant`].
//! Blocking (an AF_PACKET socket through pnet); the shell runs it on a blocking thread.

use std::net::IpAddr;
use std::time::{Duration, Instant};

use pnet_datalink::Channel;

use super::addr::Interface;
use super::packet::{self, Mac};

/// How long a probe listens for an answer. Answers on a LAN come within a millisecond or two;
/// this is the price a first bind or a take-over pays (measured in BENCHMARKS.md).
pub const PROBE_WAIT: Duration = Duration::from_millis(30);

/// The MAC of a host that answered for `ip` on `iface` within `wait`, if any.
pub fn probe(iface: &Interface, ip: IpAddr, wait: Duration) -> std::io::Result<Option<Mac>> {
    let own = iface
        .mac
        .ok_or_else(|| std::io::Error::other(format!("{} has no MAC", iface.name)))?;
    let dev = pnet_datalink::interfaces()
        .into_iter()
        .find(|i| i.name == iface.name)
        .ok_or_else(|| std::io::Error::other(format!("no interface {}", iface.name)))?;
    let config = pnet_datalink::Config {
        read_timeout: Some(Duration::from_millis(5)),
        promiscuous: false,
        ..Default::default()
    };
    let Channel::Ethernet(mut tx, mut rx) = pnet_datalink::channel(&dev, config)? else {
        return Err(std::io::Error::other("not an Ethernet channel"));
    };
    let frame = match ip {
        IpAddr::V4(v4) => packet::arp_probe(own, v4),
        IpAddr::V6(v6) => packet::dad_probe(own, v6),
    };
    tx.send_to(&frame, None)
        .ok_or_else(|| std::io::Error::other("send buffer"))??;
    let deadline = Instant::now() + wait;
    while Instant::now() < deadline {
        let Ok(f) = rx.next() else { continue };
        if let Some(m) = packet::claimant(f, ip, own) {
            return Ok(Some(m));
        }
    }
    Ok(None)
}
