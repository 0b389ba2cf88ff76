//! l2speaker end to end, in the lab: three nodes, pods on two of them, the real kernel, the
//! real nft and kubectl. Needs root.

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use l2speaker_e2e::lab::Pod;
use l2speaker_e2e::testbed::{Testbed, Timing, endpoints, eventually, service};

fn pods(tb: &Testbed) -> Vec<Pod> {
    tb.lab.pods().cloned().collect()
}

/// Connects to `ip:80` from the client until every pod of `want` answered.
async fn reaches(tb: &Testbed, ip: IpAddr, want: &BTreeSet<String>) -> Vec<String> {
    let mut answers = Vec::new();
    eventually(
        Duration::from_secs(20),
        &format!("answers from {want:?} via {ip}"),
        async || {
            if let Ok(a) = tb.lab.connect("client", SocketAddr::new(ip, 80)) {
                answers.push(a);
            }
            let seen: BTreeSet<String> = answers
                .iter()
                .filter_map(|a| a.split_whitespace().next().map(str::to_string))
                .collect();
            want.is_subset(&seen).then_some(())
        },
    )
    .await;
    answers
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_gets_a_pool_ip_that_exactly_one_node_answers_for() {
    let tb = Testbed::new(vec![2, 1, 0], Timing::DEFAULT).await;
    tb.apply(&endpoints("web", &pods(&tb))).await;
    tb.apply(&service("web", "", "")).await;
    let ip = tb.wait_ips("default", "web", 1).await[0];
    let IpAddr::V4(v4) = ip else {
        panic!("an IPv4 Service gets an IPv4 address")
    };
    assert!(
        (200..=250).contains(&v4.octets()[3]) && v4.octets()[..3] == [192, 0, 2],
        "{ip} is from the pool"
    );
    let owner = tb.wait_owner(ip).await;
    assert_eq!(
        tb.arp_answers(v4),
        vec![tb.lab.mac(&owner).unwrap()],
        "exactly the owner answers ARP for {ip}"
    );

    let out = tb
        .kubectl
        .run(&[
            "get",
            "svc",
            "web",
            "-o",
            "jsonpath={.status.loadBalancer.ingress[0].ip}",
        ])
        .await
        .ok();
    assert_eq!(out, ip.to_string(), "kubectl shows the external IP");

    let want: BTreeSet<String> = pods(&tb).iter().map(|p| p.name.clone()).collect();
    let answers = reaches(&tb, ip, &want).await;
    println!("via {ip} (owner {owner}): {answers:?}");

    let lease = tb
        .kubectl
        .run(&[
            "describe",
            "lease",
            "-n",
            "l2speaker-system",
            &format!("vip-{}", ip.to_string().replace('.', "-")),
        ])
        .await
        .ok();
    let node = tb.lab.host(&owner).unwrap().node_name();
    for want in [
        format!("Holder Identity:         {node}"),
        format!("l2speaker.io/ip: {ip}"),
        "l2speaker.io/service: default/web".into(),
        "l2speaker.io/interface: eth0".into(),
        format!("l2speaker.io/mac: {}", tb.lab.mac(&owner).unwrap()),
    ] {
        assert!(
            lease.contains(&want),
            "describe lease shows {want:?}:\n{lease}"
        );
    }
    let events = tb.kubectl.run(&["describe", "svc", "web"]).await.ok();
    assert!(
        events.contains(&format!("{node} announces {ip} via eth0")),
        "the Service's events say who announces:\n{events}"
    );
}
