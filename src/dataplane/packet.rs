//! Announcement frames, built by pure functions so tests can compare bytes.
//!
//! Both ARP forms the kernel treats as gratuitous (sender IP = target IP = the VIP): a
//! broadcast *request* with an empty target MAC, and a *reply* whose target MAC is the
//! sender's own. (A reply with target ff:ff:ff:ff:ff:ff is ignored by Linux clients whose
//! entry changed within `locktime`.) IPv6: an unsolicited neighbor advertisement to ff02::1
//! from the node's link-local address, hop limit 255, Override set, Solicited clear, Router
//! as the node forwards, with the target link-layer option and a correct checksum.

use std::net::{Ipv4Addr, Ipv6Addr};

use pnet_base::MacAddr;
use pnet_packet::MutablePacket;
use pnet_packet::arp::{ArpHardwareTypes, ArpOperation, ArpOperations, MutableArpPacket};
use pnet_packet::ethernet::{EtherTypes, MutableEthernetPacket};
use pnet_packet::icmpv6::ndp::{
    MutableNeighborAdvertPacket, NdpOption, NdpOptionTypes, NeighborAdvertFlags,
};
use pnet_packet::icmpv6::{Icmpv6Types, MutableIcmpv6Packet};
use pnet_packet::ip::IpNextHeaderProtocols;
use pnet_packet::ipv6::MutableIpv6Packet;

pub type Mac = [u8; 6];

const BROADCAST: Mac = [0xff; 6];
/// ff02::1 on Ethernet.
const ALL_NODES_MAC: Mac = [0x33, 0x33, 0, 0, 0, 1];
const ALL_NODES: Ipv6Addr = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1);

/// `02:00:00:00:00:11`.
pub fn format_mac(m: &Mac) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Parses `02:00:00:00:00:11`.
pub fn parse_mac(s: &str) -> Option<Mac> {
    let parts: Vec<u8> = s
        .split(':')
        .map(|p| u8::from_str_radix(p, 16).ok())
        .collect::<Option<_>>()?;
    parts.try_into().ok()
}

fn mac(m: Mac) -> MacAddr {
    MacAddr::new(m[0], m[1], m[2], m[3], m[4], m[5])
}

fn arp(sender: Mac, ip: Ipv4Addr, op: ArpOperation, target_mac: Mac) -> Vec<u8> {
    let mut buf = vec![0u8; 42];
    let mut eth = MutableEthernetPacket::new(&mut buf).expect("42 bytes hold an ARP frame");
    eth.set_destination(mac(BROADCAST));
    eth.set_source(mac(sender));
    eth.set_ethertype(EtherTypes::Arp);
    let mut a = MutableArpPacket::new(eth.payload_mut()).expect("28 bytes of ARP");
    a.set_hardware_type(ArpHardwareTypes::Ethernet);
    a.set_protocol_type(EtherTypes::Ipv4);
    a.set_hw_addr_len(6);
    a.set_proto_addr_len(4);
    a.set_operation(op);
    a.set_sender_hw_addr(mac(sender));
    a.set_sender_proto_addr(ip);
    a.set_target_hw_addr(mac(target_mac));
    a.set_target_proto_addr(ip);
    buf
}

/// Gratuitous ARP request: broadcast, SPA = TPA = `ip`, THA = 0.
pub fn garp_request(sender: Mac, ip: Ipv4Addr) -> Vec<u8> {
    arp(sender, ip, ArpOperations::Request, [0; 6])
}

/// Gratuitous ARP reply: broadcast, SPA = TPA = `ip`, THA = SHA.
pub fn garp_reply(sender: Mac, ip: Ipv4Addr) -> Vec<u8> {
    arp(sender, ip, ArpOperations::Reply, sender)
}

/// Unsolicited neighbor advertisement for `target` from `source` (the node's link-local).
pub fn unsolicited_na(sender: Mac, source: Ipv6Addr, target: Ipv6Addr, router: bool) -> Vec<u8> {
    const NA_LEN: usize = 24 + 8; // header + target, then one 8-byte option
    let mut buf = vec![0u8; 14 + 40 + NA_LEN];
    let mut eth = MutableEthernetPacket::new(&mut buf).expect("sized above");
    eth.set_destination(mac(ALL_NODES_MAC));
    eth.set_source(mac(sender));
    eth.set_ethertype(EtherTypes::Ipv6);
    let mut ip6 = MutableIpv6Packet::new(eth.payload_mut()).expect("sized above");
    ip6.set_version(6);
    ip6.set_payload_length(NA_LEN as u16);
    ip6.set_next_header(IpNextHeaderProtocols::Icmpv6);
    ip6.set_hop_limit(255);
    ip6.set_source(source);
    ip6.set_destination(ALL_NODES);
    {
        let mut na = MutableNeighborAdvertPacket::new(ip6.payload_mut()).expect("sized above");
        na.set_icmpv6_type(Icmpv6Types::NeighborAdvert);
        na.set_flags(
            NeighborAdvertFlags::Override
                | if router {
                    NeighborAdvertFlags::Router
                } else {
                    0
                },
        );
        na.set_target_addr(target);
        na.set_options(&[NdpOption {
            option_type: NdpOptionTypes::TargetLLAddr,
            length: 1,
            data: sender.to_vec(),
        }]);
    }
    let mut icmp = MutableIcmpv6Packet::new(ip6.payload_mut()).expect("sized above");
    let sum = pnet_packet::icmpv6::checksum(&icmp.to_immutable(), &source, &ALL_NODES);
    icmp.set_checksum(sum);
    buf
}

/// ARP probe (RFC 5227): a broadcast request for `ip` with sender address 0.0.0.0 and no
/// target MAC, so nobody learns anything from it; whoever has `ip` answers.
pub fn arp_probe(sender: Mac, ip: Ipv4Addr) -> Vec<u8> {
    let mut f = arp(sender, ip, ArpOperations::Request, [0; 6]);
    // SPA (bytes 28..32 of the frame) = 0.0.0.0
    f[28..32].copy_from_slice(&[0, 0, 0, 0]);
    f
}

/// IPv6 duplicate address detection probe: a neighbor solicitation for `target` from the
/// unspecified address to its solicited-node multicast group (no link-layer option, as RFC
/// 4862 requires from `::`); whoever has `target` answers with an advertisement to ff02::1.
pub fn dad_probe(sender: Mac, target: Ipv6Addr) -> Vec<u8> {
    use pnet_packet::icmpv6::ndp::MutableNeighborSolicitPacket;
    const NS_LEN: usize = 24;
    let t = target.octets();
    let group = Ipv6Addr::new(
        0xff02,
        0,
        0,
        0,
        0,
        1,
        0xff00 | u16::from(t[13]),
        (u16::from(t[14]) << 8) | u16::from(t[15]),
    );
    let mut buf = vec![0u8; 14 + 40 + NS_LEN];
    let mut eth = MutableEthernetPacket::new(&mut buf).expect("sized above");
    eth.set_destination(mac([0x33, 0x33, 0xff, t[13], t[14], t[15]]));
    eth.set_source(mac(sender));
    eth.set_ethertype(EtherTypes::Ipv6);
    let mut ip6 = MutableIpv6Packet::new(eth.payload_mut()).expect("sized above");
    ip6.set_version(6);
    ip6.set_payload_length(NS_LEN as u16);
    ip6.set_next_header(IpNextHeaderProtocols::Icmpv6);
    ip6.set_hop_limit(255);
    ip6.set_source(Ipv6Addr::UNSPECIFIED);
    ip6.set_destination(group);
    {
        let mut ns = MutableNeighborSolicitPacket::new(ip6.payload_mut()).expect("sized above");
        ns.set_icmpv6_type(Icmpv6Types::NeighborSolicit);
        ns.set_target_addr(target);
    }
    let mut icmp = MutableIcmpv6Packet::new(ip6.payload_mut()).expect("sized above");
    let sum = pnet_packet::icmpv6::checksum(&icmp.to_immutable(), &Ipv6Addr::UNSPECIFIED, &group);
    icmp.set_checksum(sum);
    buf
}

/// If `frame` shows some host claiming an address — an ARP packet of any operation (its
/// sender address; not a probe's 0.0.0.0), or a neighbor advertisement (its target) — that
/// address and the claimant's MAC. Frames from `own` are ignored. Never panics on any input.
pub fn claim(frame: &[u8], own: Mac) -> Option<(std::net::IpAddr, Mac)> {
    use pnet_packet::Packet;
    use pnet_packet::arp::ArpPacket;
    use pnet_packet::ethernet::EthernetPacket;
    use pnet_packet::icmpv6::Icmpv6Packet;
    use pnet_packet::icmpv6::ndp::NeighborAdvertPacket;
    use pnet_packet::ipv6::Ipv6Packet;
    let eth = EthernetPacket::new(frame)?;
    let src: Mac = eth.get_source().octets();
    if src == own {
        return None;
    }
    let t = eth.get_ethertype();
    if t == EtherTypes::Arp {
        let a = ArpPacket::new(eth.payload())?;
        let spa = a.get_sender_proto_addr();
        return (!spa.is_unspecified()).then(|| (spa.into(), a.get_sender_hw_addr().octets()));
    }
    if t == EtherTypes::Ipv6 {
        let ip6 = Ipv6Packet::new(eth.payload())?;
        if ip6.get_next_header() != IpNextHeaderProtocols::Icmpv6 {
            return None;
        }
        let icmp = Icmpv6Packet::new(ip6.payload())?;
        if icmp.get_icmpv6_type() != Icmpv6Types::NeighborAdvert {
            return None;
        }
        let na = NeighborAdvertPacket::new(ip6.payload())?;
        return Some((na.get_target_addr().into(), src));
    }
    None
}

/// [`claim`] for one address: the claimant's MAC if `frame` claims `ip`.
pub fn claimant(frame: &[u8], ip: std::net::IpAddr, own: Mac) -> Option<Mac> {
    claim(frame, own).filter(|(x, _)| *x == ip).map(|(_, m)| m)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probes_and_the_claim_classifier() {
        let vip4 = Ipv4Addr::new(192, 0, 2, 210);
        let p = arp_probe(M, vip4);
        assert_eq!(&p[28..32], &[0, 0, 0, 0], "sender address 0.0.0.0");
        assert_eq!(&p[38..42], &vip4.octets(), "asks for the VIP");
        let other: Mac = [0x02, 0, 0, 0, 0, 0x22];
        // A reply from someone who has it is a claim; our own frames and other IPs are not.
        assert_eq!(
            claimant(&garp_reply(other, vip4), vip4.into(), M),
            Some(other)
        );
        assert_eq!(claimant(&garp_reply(M, vip4), vip4.into(), M), None);
        assert_eq!(
            claimant(&p, vip4.into(), other),
            None,
            "a probe claims nothing"
        );
        assert_eq!(
            claimant(
                &garp_reply(other, Ipv4Addr::new(192, 0, 2, 9)),
                vip4.into(),
                M
            ),
            None
        );
        let vip6: Ipv6Addr = "2001:db8::210".parse().unwrap();
        let ll: Ipv6Addr = "fe80::22".parse().unwrap();
        let d = dad_probe(M, vip6);
        assert_eq!(&d[0..6], &[0x33, 0x33, 0xff, 0, 0x02, 0x10]);
        assert_eq!(
            claimant(&unsolicited_na(other, ll, vip6, false), vip6.into(), M),
            Some(other)
        );
        assert_eq!(
            claimant(&d, vip6.into(), other),
            None,
            "a solicitation claims nothing"
        );
        // Garbage never panics.
        for n in 0..200 {
            let junk: Vec<u8> = (0..n).map(|i| (i * 37 % 251) as u8).collect();
            let _ = claimant(&junk, vip4.into(), M);
            let _ = claimant(&junk, vip6.into(), M);
        }
    }

    const M: Mac = [0x02, 0, 0, 0, 0, 0x11];

    #[test]
    fn garp_request_is_broadcast_with_sender_ip_as_target_and_no_target_mac() {
        let f = garp_request(M, Ipv4Addr::new(192, 0, 2, 200));
        let want: Vec<u8> = [
            &[0xff; 6][..],
            &M,
            &[0x08, 0x06],                // ethernet: broadcast, ARP
            &[0, 1, 0x08, 0, 6, 4, 0, 1], // ethernet/IPv4, request
            &M,
            &[192, 0, 2, 200],
            &[0; 6],
            &[192, 0, 2, 200], // SHA SPA THA TPA
        ]
        .concat();
        assert_eq!(f, want);
    }

    #[test]
    fn garp_reply_names_the_sender_as_target() {
        let f = garp_reply(M, Ipv4Addr::new(192, 0, 2, 200));
        assert_eq!(&f[20..22], &[0, 2], "a reply");
        assert_eq!(&f[32..38], &M, "THA = SHA, not broadcast");
        assert_eq!(&f[38..42], &[192, 0, 2, 200]);
    }

    #[test]
    fn unsolicited_na_has_override_hop_limit_255_target_option_and_valid_checksum() {
        let src: Ipv6Addr = "fe80::11".parse().unwrap();
        let target: Ipv6Addr = "2001:db8::200".parse().unwrap();
        let f = unsolicited_na(M, src, target, true);
        assert_eq!(&f[0..6], &ALL_NODES_MAC);
        assert_eq!(&f[12..14], &[0x86, 0xdd]);
        let ip = &f[14..54];
        assert_eq!(ip[6], 58, "ICMPv6");
        assert_eq!(ip[7], 255, "hop limit");
        assert_eq!(&ip[24..40], &ALL_NODES.octets());
        let icmp = &f[54..];
        assert_eq!(icmp[0], 136);
        assert_eq!(icmp[4], 0b1010_0000, "Router and Override, not Solicited");
        assert_eq!(&icmp[8..24], &target.octets());
        assert_eq!(&icmp[24..26], &[2, 1], "target link-layer address option");
        assert_eq!(&icmp[26..32], &M);
        // The one's-complement sum over pseudo-header and message is 0xffff when correct.
        let mut sum: u32 = 0;
        let mut add = |b: &[u8]| {
            for c in b.chunks(2) {
                sum += u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
            }
        };
        add(&src.octets());
        add(&ALL_NODES.octets());
        add(&(icmp.len() as u32).to_be_bytes());
        add(&[0, 0, 0, 58]);
        add(icmp);
        while sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        assert_eq!(sum, 0xffff);
        assert_eq!(
            unsolicited_na(M, src, target, false)[54 + 4],
            0b0010_0000,
            "no Router flag on a host"
        );
    }
}
