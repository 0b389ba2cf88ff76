//! Bounded fuzzing of the speaker's parsers of hostile input (pools, Services, Lease names,
//! and the classifier of LAN frames), run by the test command
//! (proptest, 2,000 cases per target; `PROPTEST_CASES=1000000 cargo test --test fuzz` runs
//! longer). Each target must never panic, and what it accepts must make sense.
//!
//! Crashes found so far are kept as regression cases at the end.

use std::net::IpAddr;

use k8s_openapi::api::core::v1::Service;
use l2speaker::pool::{IPPoolSpec, PoolInput, Pools, parse_entry};
use l2speaker::service::ServiceInfo;
use proptest::prelude::*;

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: std::env::var("PROPTEST_CASES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(2000),
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// Strings that look like pool entries, broken in the ways people break them.
fn entry() -> impl Strategy<Value = String> {
    prop_oneof![
        "[0-9a-fA-F:./ -]{0,40}",
        (any::<u32>(), 0u8..40).prop_map(|(a, p)| format!("{}/{p}", std::net::Ipv4Addr::from(a))),
        (any::<u128>(), 0u8..140).prop_map(|(a, p)| format!("{}/{p}", std::net::Ipv6Addr::from(a))),
        (any::<u32>(), any::<u32>()).prop_map(|(a, b)| format!(
            "{}-{}",
            std::net::Ipv4Addr::from(a),
            std::net::Ipv4Addr::from(b)
        )),
        (any::<u128>(), any::<u32>()).prop_map(|(a, b)| format!(
            "{} - {}",
            std::net::Ipv6Addr::from(a),
            std::net::Ipv4Addr::from(b)
        )),
        ".{0,30}",
    ]
}

proptest! {
    #![proptest_config(config())]

    /// The pool parser: never panics; an accepted entry is an ordered range of one family.
    #[test]
    fn pool_entries(s in entry(), avoid in any::<bool>()) {
        if let Ok(r) = parse_entry(&s, avoid) {
            prop_assert_eq!(r.first.is_ipv4(), r.last.is_ipv4());
            prop_assert!(r.contains(r.first) && r.contains(r.last));
            prop_assert!(r.iter().next().is_some());
        }
    }

    /// Whole pools: never panic; nothing special (loopback, multicast…) is ever in a pool,
    /// and offsets of addresses in it never overflow.
    #[test]
    fn pools(entries in proptest::collection::vec(entry(), 0..6), avoid in any::<bool>()) {
        let spec = IPPoolSpec {
            addresses: entries,
            avoid_network_and_broadcast: Some(avoid),
            ..Default::default()
        };
        let built = Pools::build(vec![PoolInput { name: "p", age_key: "1".into(), spec: &spec, last_valid: None }]);
        for p in &built.pools {
            for r in &p.ranges {
                for ip in [r.first, r.last] {
                    prop_assert!(l2speaker::pool::assignable(ip), "{} in a pool", ip);
                    prop_assert!(p.offset(ip).is_some());
                }
            }
        }
    }

    /// The wanted-IP annotation and the rest of a Service: whatever a user writes, reading
    /// it never panics and wanted IPs are IPs.
    #[test]
    fn services(
        ips in "[0-9a-f:., ]{0,80}",
        lb_ip in "[0-9a-f:.]{0,20}",
        ports in proptest::collection::vec((any::<i32>(), "[A-Za-z]{0,4}", any::<i32>()), 0..8),
        families in proptest::collection::vec("[A-Za-z0-9]{0,6}", 0..3),
        policy in "[A-Za-z]{0,16}",
        ingress in proptest::collection::vec("[0-9a-f:.]{0,20}", 0..3),
    ) {
        let ports: Vec<serde_json::Value> = ports
            .iter()
            .map(|(p, proto, np)| serde_json::json!({"port": p, "protocol": proto, "nodePort": np}))
            .collect();
        let svc = serde_json::json!({
            "metadata": {"name": "s", "namespace": "default",
                "annotations": {l2speaker::service::ANNOTATION_IPS: ips}},
            "spec": {"type": "LoadBalancer", "loadBalancerIP": lb_ip, "ports": ports,
                "ipFamilies": families, "ipFamilyPolicy": policy,
                "externalTrafficPolicy": policy},
            "status": {"loadBalancer": {"ingress": ingress.iter().map(|i| serde_json::json!({"ip": i})).collect::<Vec<_>>()}}
        });
        if let Ok(svc) = serde_json::from_value::<Service>(svc) {
            let info = ServiceInfo::from_service(&svc);
            prop_assert!(info.requested.len() <= l2speaker::service::MAX_WANTED);
            for ip in &info.requested {
                prop_assert!(ip.to_string().parse::<IpAddr>().is_ok());
            }
        }
    }

    /// The frame classifier the claims watcher and the probe run on every frame of the LAN:
    /// never panics on any bytes, and a claim it reports is one the frame really makes.
    #[test]
    fn frames(bytes in proptest::collection::vec(any::<u8>(), 0..120), own in any::<[u8; 6]>()) {
        if let Some((ip, mac)) = l2speaker::dataplane::packet::claim(&bytes, own) {
            prop_assert!(mac != own || bytes.len() >= 14);
            prop_assert!(!ip.is_unspecified());
        }
    }

    /// Real announcement frames are claims of exactly their address, by their sender.
    #[test]
    fn announcements_are_claims(a in any::<u32>(), b in any::<u128>(), m in any::<[u8; 6]>()) {
        use l2speaker::dataplane::packet::{claim, garp_reply, garp_request, unsolicited_na};
        let other = [0x02, 0, 0, 0, 0, 0x77];
        prop_assume!(m != other);
        let v4 = std::net::Ipv4Addr::from(a);
        prop_assume!(!v4.is_unspecified());
        prop_assert_eq!(claim(&garp_request(m, v4), other), Some((v4.into(), m)));
        prop_assert_eq!(claim(&garp_reply(m, v4), other), Some((v4.into(), m)));
        prop_assert_eq!(claim(&garp_reply(m, v4), m), None, "our own frames are no claim");
        let v6 = std::net::Ipv6Addr::from(b);
        let ll: std::net::Ipv6Addr = "fe80::1".parse().unwrap();
        prop_assert_eq!(claim(&unsolicited_na(m, ll, v6, false), other), Some((v6.into(), m)));
        prop_assert_eq!(claim(&l2speaker::dataplane::packet::arp_probe(m, v4), other), None);
    }

    /// Lease names and label values for any address stay valid.
    #[test]
    fn lease_names(a in any::<u128>(), v4 in any::<bool>()) {
        let ip = if v4 { IpAddr::V4((a as u32).into()) } else { IpAddr::V6(a.into()) };
        prop_assert!(l2speaker::lease::is_dns1123_subdomain(&l2speaker::lease::lease_name(ip)));
        prop_assert!(l2speaker::lease::is_label_value(&l2speaker::lease::label_value(ip)));
    }
}

/// Regression cases: inputs that crashed or misbehaved before a fix.
#[test]
fn regressions() {
    // `::/0` overflowed the offset computation (a panic in debug builds).
    let spec = IPPoolSpec {
        addresses: vec!["::/0".into()],
        avoid_network_and_broadcast: Some(false),
        ..Default::default()
    };
    let built = Pools::build(vec![PoolInput {
        name: "all",
        age_key: "1".into(),
        spec: &spec,
        last_valid: None,
    }]);
    assert!(
        built.pools.is_empty(),
        "refused: it holds loopback and more"
    );
    // `2001:db8::` gave the Lease name `vip-2001-db8--`, which a real API server refuses.
    assert_eq!(
        l2speaker::lease::lease_name("2001:db8::".parse().unwrap()),
        "vip-2001-db8--0"
    );
}

/// A Service with 1,000 ports: read and rendered into one nft transaction in bounded time
/// (printed), one map element per port.
#[test]
fn a_service_with_a_thousand_ports_renders_in_bounded_work() {
    use l2speaker::dataplane::nft::{self, Dnat, Endpoint, PortMap};
    use l2speaker::service::Protocol;
    let ports: Vec<serde_json::Value> = (0..1000)
        .map(|i| serde_json::json!({"name": format!("p{i}"), "port": 1000 + i, "protocol": if i % 2 == 0 { "TCP" } else { "UDP" }}))
        .collect();
    let svc: Service = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "wide", "namespace": "default"},
        "spec": {"type": "LoadBalancer", "ports": ports}
    }))
    .unwrap();
    let t0 = std::time::Instant::now();
    let info = ServiceInfo::from_service(&svc);
    assert_eq!(info.ports.len(), 1000);
    let entry = Dnat {
        vip: "192.0.2.200".parse().unwrap(),
        ports: info
            .ports
            .iter()
            .map(|p| PortMap {
                protocol: p.protocol,
                port: p.port,
                endpoints: vec![Endpoint {
                    ip: "198.51.100.10".parse().unwrap(),
                    port: p.port,
                    local: false,
                }],
            })
            .collect(),
        sources: None,
        affinity: None,
    };
    let script = nft::render_full(&nft::desired(&[entry]));
    println!(
        "1,000 ports read and rendered in {:?} ({} KiB of nft)",
        t0.elapsed(),
        script.len() / 1024
    );
    assert_eq!(script.matches(" : goto ").count(), 1000);
    assert!(info.ports.iter().any(|p| p.protocol == Protocol::Udp));
}
