//! Who answers ARP for an address: from a lab host, broadcast one ARP request and collect
//! the MACs of every reply. Two MACs for one VIP is the failure this project exists to avoid.

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use pnet_datalink::Channel;
use pnet_datalink::MacAddr;
use pnet_packet::Packet;
use pnet_packet::arp::{ArpHardwareTypes, ArpOperations, ArpPacket, MutableArpPacket};
use pnet_packet::ethernet::{EtherTypes, EthernetPacket, MutableEthernetPacket};

use super::LabError;
use super::netns;

/// MACs that answered an ARP request for `target` sent from `ns`'s `eth0` (with source
/// `source`) within `wait`.
pub fn who_has(
    ns: &str,
    source: Ipv4Addr,
    target: Ipv4Addr,
    wait: Duration,
) -> Result<Vec<String>, LabError> {
    let r = netns::run_in(ns, move || -> std::io::Result<Vec<String>> {
        let iface = pnet_datalink::interfaces()
            .into_iter()
            .find(|i| i.name == "eth0")
            .ok_or_else(|| std::io::Error::other("no eth0"))?;
        let my_mac = iface
            .mac
            .ok_or_else(|| std::io::Error::other("eth0 has no MAC"))?;
        let config = pnet_datalink::Config {
            read_timeout: Some(Duration::from_millis(20)),
            ..Default::default()
        };
        let Channel::Ethernet(mut tx, mut rx) = pnet_datalink::channel(&iface, config)? else {
            return Err(std::io::Error::other("not an Ethernet channel"));
        };
        let mut buf = [0u8; 42];
        {
            let mut eth = MutableEthernetPacket::new(&mut buf).expect("sized");
            eth.set_destination(MacAddr::broadcast());
            eth.set_source(my_mac);
            eth.set_ethertype(EtherTypes::Arp);
            let mut a = MutableArpPacket::new(&mut buf[14..]).expect("sized");
            a.set_hardware_type(ArpHardwareTypes::Ethernet);
            a.set_protocol_type(EtherTypes::Ipv4);
            a.set_hw_addr_len(6);
            a.set_proto_addr_len(4);
            a.set_operation(ArpOperations::Request);
            a.set_sender_hw_addr(my_mac);
            a.set_sender_proto_addr(source);
            a.set_target_hw_addr(MacAddr::zero());
            a.set_target_proto_addr(target);
        }
        tx.send_to(&buf, None)
            .ok_or_else(|| std::io::Error::other("send buffer"))??;
        let deadline = Instant::now() + wait;
        let mut macs = Vec::new();
        while Instant::now() < deadline {
            let Ok(frame) = rx.next() else { continue };
            let Some(eth) = EthernetPacket::new(frame) else {
                continue;
            };
            if eth.get_ethertype() != EtherTypes::Arp {
                continue;
            }
            let Some(a) = ArpPacket::new(eth.payload()) else {
                continue;
            };
            if a.get_operation() == ArpOperations::Reply
                && a.get_sender_proto_addr() == target
                && a.get_target_hw_addr() == my_mac
            {
                let m = a.get_sender_hw_addr().to_string();
                if !macs.contains(&m) {
                    macs.push(m);
                }
            }
        }
        Ok(macs)
    })?;
    r.map_err(|source| LabError::Io {
        what: format!("ARP probe for {target} from {ns}"),
        source,
    })
}

/// MACs heard claiming any of `ips` (ARP of any operation from it, or an advertisement for it) on
/// `ns`'s `eth0` within `wait`, after sending `frames` from there (probes to ask; none to
/// only listen). Frames from `ns` itself do not count.
pub fn claims(
    ns: &str,
    frames: impl FnOnce(l2speaker::dataplane::packet::Mac) -> Vec<Vec<u8>> + Send + 'static,
    ips: Vec<std::net::IpAddr>,
    wait: Duration,
) -> Result<Vec<String>, LabError> {
    let what = format!("claims on {ips:?} heard from {ns}");
    let r = netns::run_in(ns, move || -> std::io::Result<Vec<String>> {
        let iface = pnet_datalink::interfaces()
            .into_iter()
            .find(|i| i.name == "eth0")
            .ok_or_else(|| std::io::Error::other("no eth0"))?;
        let own = iface
            .mac
            .ok_or_else(|| std::io::Error::other("eth0 has no MAC"))?
            .octets();
        let config = pnet_datalink::Config {
            read_timeout: Some(Duration::from_millis(10)),
            ..Default::default()
        };
        let Channel::Ethernet(mut tx, mut rx) = pnet_datalink::channel(&iface, config)? else {
            return Err(std::io::Error::other("not an Ethernet channel"));
        };
        for f in frames(own) {
            tx.send_to(&f, None)
                .ok_or_else(|| std::io::Error::other("send buffer"))??;
        }
        let deadline = Instant::now() + wait;
        let mut macs = Vec::new();
        while Instant::now() < deadline {
            let Ok(frame) = rx.next() else { continue };
            let Some((ip, m)) = l2speaker::dataplane::packet::claim(frame, own) else {
                continue;
            };
            if ips.contains(&ip) {
                let m = l2speaker::dataplane::packet::format_mac(&m);
                if !macs.contains(&m) {
                    macs.push(m);
                }
            }
        }
        Ok(macs)
    })?;
    r.map_err(|source| LabError::Io { what, source })
}
