//! Node-IP mode in the lab (needs root): with no IPPool at all, or with the
//! `l2speaker.io/node-ips` annotation, a Service is published on the nodes' own addresses and
//! every serving node DNATs its address to the pods. Nothing is bound, no Lease is taken.

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Service;
use kube::api::Api;
use l2speaker_e2e::lab::Pod;
use l2speaker_e2e::testbed::{
    NAMESPACE, Testbed, Timing, dns_endpoints, endpoints, eventually, service,
};

fn pods(tb: &Testbed) -> Vec<Pod> {
    tb.lab.pods().cloned().collect()
}

/// The Service's ingress: address and ipMode.
async fn ingress(tb: &Testbed, name: &str) -> Vec<(IpAddr, Option<String>)> {
    let api: Api<Service> = Api::namespaced(tb.client.clone(), "default");
    let Ok(Some(s)) = api.get_opt(name).await else {
        return vec![];
    };
    s.status
        .and_then(|s| s.load_balancer?.ingress)
        .unwrap_or_default()
        .into_iter()
        .filter_map(|i| Some((i.ip?.parse().ok()?, i.ip_mode)))
        .collect()
}

/// Waits until the Service's ingress is exactly `want` (all with ipMode Proxy); returns
/// how long that took.
async fn wait_ingress(tb: &Testbed, name: &str, want: &BTreeSet<IpAddr>) -> Duration {
    let t0 = Instant::now();
    eventually(
        Duration::from_secs(40),
        &format!("{name}'s ingress to be {want:?}"),
        async || {
            let got = ingress(tb, name).await;
            let ips: BTreeSet<IpAddr> = got.iter().map(|(ip, _)| *ip).collect();
            let proxy = got.iter().all(|(_, m)| m.as_deref() == Some("Proxy"));
            (ips == *want && proxy && got.len() == want.len()).then_some(())
        },
    )
    .await;
    t0.elapsed()
}

fn v4_of(tb: &Testbed, hosts: &[&str]) -> BTreeSet<IpAddr> {
    hosts
        .iter()
        .map(|h| IpAddr::V4(tb.lab.host(h).unwrap().ipv4))
        .collect()
}

/// Waits until the client, connecting to `addr`, is answered by a pod; returns the answer.
async fn reach(tb: &Testbed, addr: SocketAddr) -> String {
    eventually(
        Duration::from_secs(15),
        &format!("a pod answering on {addr}"),
        async || {
            tb.lab
                .connect("client", addr)
                .ok()
                .filter(|a| a.contains("-p"))
        },
    )
    .await
}

/// The lab host of the speaker holding the allocator's Lease.
async fn allocator(tb: &Testbed) -> String {
    let api: Api<Lease> = Api::namespaced(tb.client.clone(), NAMESPACE);
    let node = eventually(Duration::from_secs(20), "an allocator", async || {
        api.get_opt("l2speaker-allocator")
            .await
            .ok()??
            .spec?
            .holder_identity
            .filter(|h| !h.is_empty())
    })
    .await;
    tb.host_of(&node)
}

/// No IPPool: the Service gets every node's address (IPv4, and IPv6 too when dual-stack),
/// with ipMode Proxy, is reachable through each of them, takes no Lease, and `l2speaker
/// status` lists the nodes serving it. With `externalTrafficPolicy: Local` only nodes with a
/// ready pod are listed, and the pod sees the client's own address.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_with_no_pool_gets_the_nodes_addresses_and_is_reachable_on_each() {
    let tb = Testbed::without_pool(vec![1, 1, 0], Timing::DEFAULT).await;
    tb.apply(&endpoints("web", &pods(&tb))).await;
    tb.apply(&service("web", "", "")).await;
    let all = v4_of(&tb, &["n1", "n2", "n3"]);
    wait_ingress(&tb, "web", &all).await;
    for ip in &all {
        let answer = reach(&tb, SocketAddr::new(*ip, 80)).await;
        assert!(
            answer.starts_with("n1-p0 ") || answer.starts_with("n2-p0 "),
            "{answer}"
        );
        assert!(tb.lease(*ip).await.is_none(), "no Lease for {ip}");
    }
    let (ok, out) = tb.l2speaker("n1", &["status"], Duration::from_secs(20));
    assert!(ok, "{out}");
    for n in ["node-1", "node-2", "node-3"] {
        assert!(
            out.lines()
                .any(|l| l.contains("default/web") && l.contains(n) && l.ends_with("node")),
            "status lists {n} serving default/web:\n{out}"
        );
    }

    tb.apply(&endpoints("ds", &pods(&tb))).await;
    // Other ports: on a node, one port serves one Service.
    tb.apply(
        &service(
            "ds",
            "  ipFamilyPolicy: PreferDualStack\n  ipFamilies: [IPv4, IPv6]\n",
            "",
        )
        .replace("port: 80,", "port: 81,"),
    )
    .await;
    let mut both = all.clone();
    both.extend(tb.lab.nodes().map(|h| IpAddr::V6(h.ipv6)));
    wait_ingress(&tb, "ds", &both).await;
    let n3v6 = IpAddr::V6(tb.lab.host("n3").unwrap().ipv6);
    reach(&tb, SocketAddr::new(n3v6, 81)).await;

    tb.apply(&endpoints("local", &pods(&tb))).await;
    tb.apply(
        &service("local", "  externalTrafficPolicy: Local\n", "").replace("port: 80,", "port: 82,"),
    )
    .await;
    wait_ingress(&tb, "local", &v4_of(&tb, &["n1", "n2"])).await;
    let client = tb.lab.client().ipv4;
    let n1 = IpAddr::V4(tb.lab.host("n1").unwrap().ipv4);
    let answer = reach(&tb, SocketAddr::new(n1, 82)).await;
    assert_eq!(
        answer,
        format!("n1-p0 {client}"),
        "the pod on n1 sees the client"
    );
}

/// LAN mode: a node whose speaker loses the LAN leaves the status and returns when it is
/// back; so does the allocator's own node when its speaker is killed (another speaker takes
/// the allocator's Lease first). The times are printed. (The other node-IP tests run in lease
/// mode.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_dies_leaves_the_status_and_comes_back_when_healthy() {
    let tb = Testbed::without_pool(vec![1, 1, 1], Timing::LAN).await;
    tb.apply(&endpoints("web", &pods(&tb))).await;
    tb.apply(&service("web", "", "")).await;
    let hosts = ["n1", "n2", "n3"];
    let all = v4_of(&tb, &hosts);
    wait_ingress(&tb, "web", &all).await;
    // LAN mode: a speaker counts for declaring another dead 10 s after it appeared.
    tokio::time::sleep(Duration::from_secs(10)).await;
    wait_ingress(&tb, "web", &all).await;

    let boss = allocator(&tb).await;
    let victim = *hosts.iter().find(|h| **h != boss).unwrap();
    let t0 = Instant::now();
    tb.lab.cut_link(victim).unwrap();
    let rest: Vec<&str> = hosts.iter().copied().filter(|h| *h != victim).collect();
    wait_ingress(&tb, "web", &v4_of(&tb, &rest)).await;
    println!(
        "node-IP: {victim} cut from the LAN, out of the status after {} ms",
        t0.elapsed().as_millis()
    );
    for ip in v4_of(&tb, &rest) {
        reach(&tb, SocketAddr::new(ip, 80)).await;
    }
    tb.lab.heal_link(victim).unwrap();
    let back = wait_ingress(&tb, "web", &all).await;
    println!(
        "node-IP: {victim} back in the status {} ms after its link returned",
        back.as_millis()
    );

    let boss = allocator(&tb).await;
    let t0 = Instant::now();
    tb.speaker(&boss).kill();
    let rest: Vec<&str> = hosts.iter().copied().filter(|h| *h != boss).collect();
    wait_ingress(&tb, "web", &v4_of(&tb, &rest)).await;
    println!(
        "node-IP: the allocator's node {boss} killed, out of the status after {} ms",
        t0.elapsed().as_millis()
    );
    assert_ne!(allocator(&tb).await, boss);
}

/// Two Services on one port: the older is served, the newer is left out with a Warning
/// until the older goes. A port something on the nodes listens on (the speaker's own
/// metrics port here) is refused with a Warning, and no node DNATs it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_older_service_keeps_a_port_and_ports_the_node_listens_on_are_refused() {
    let tb = Testbed::without_pool(vec![1, 1, 0], Timing::DEFAULT).await;
    let all = v4_of(&tb, &["n1", "n2", "n3"]);
    for name in ["old", "new"] {
        tb.apply(&endpoints(name, &pods(&tb))).await;
    }
    tb.apply(&service("old", "", "")).await;
    wait_ingress(&tb, "old", &all).await;
    tb.apply(&service("new", "", "")).await;
    tb.wait_describe_svc("new", "PortConflict").await;
    assert!(ingress(&tb, "new").await.is_empty(), "new is not published");
    tb.kubectl.run(&["delete", "service", "old"]).await.ok();
    wait_ingress(&tb, "new", &all).await;
    reach(&tb, SocketAddr::new(*all.first().unwrap(), 80)).await;

    // With pods behind it, so a DNAT would have something to point at.
    tb.apply(&endpoints("busy", &pods(&tb))).await;
    tb.apply(&service("busy", "", "").replace("port: 80,", "port: 9473,"))
        .await;
    let said = tb.wait_describe_svc("busy", "PortInUse").await;
    assert!(said.contains("listens on tcp/9473"), "{said}");
    tb.wait_describe_svc("busy", "NoNode").await;
    eventually(Duration::from_secs(10), "busy not published", async || {
        ingress(&tb, "busy").await.is_empty().then_some(())
    })
    .await;
    for h in ["n1", "n2", "n3"] {
        assert!(!tb.rules(h).contains("9473"), "{h} DNATs nothing on 9473");
        let metrics = SocketAddr::new(IpAddr::V4(tb.lab.host(h).unwrap().ipv4), 9473);
        let answer = tb.lab.http_get("client", metrics, "/healthz");
        assert!(
            answer.is_ok(),
            "{h}'s own listener still answers: {answer:?}"
        );
    }
}

/// k3s ServiceLB's labels: once a node is labelled `enablelb`, only nodes labelled `true`
/// serve; a Service labelled with an `lbpool` is served only by nodes of that pool.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn k3s_enablelb_and_lbpool_labels_choose_the_serving_nodes() {
    let tb = Testbed::without_pool(vec![1, 1, 0], Timing::DEFAULT).await;
    let label = async |node: &str, labels: &[&str]| {
        let mut args = vec!["label", "node", node];
        args.extend_from_slice(labels);
        tb.kubectl.run(&args).await.ok();
    };
    label("node-1", &["svccontroller.k3s.cattle.io/enablelb=true"]).await;
    label(
        "node-2",
        &[
            "svccontroller.k3s.cattle.io/enablelb=true",
            "svccontroller.k3s.cattle.io/lbpool=blue",
        ],
    )
    .await;
    label("node-3", &["svccontroller.k3s.cattle.io/enablelb=false"]).await;
    for name in ["web", "blue"] {
        tb.apply(&endpoints(name, &pods(&tb))).await;
    }
    tb.apply(&service("web", "", "")).await;
    wait_ingress(&tb, "web", &v4_of(&tb, &["n1", "n2"])).await;
    tb.apply(
        &service("blue", "", "")
            .replace("port: 80,", "port: 81,")
            .replace(
                "  namespace: default\n",
                "  namespace: default\n  labels: {svccontroller.k3s.cattle.io/lbpool: blue}\n",
            ),
    )
    .await;
    wait_ingress(&tb, "blue", &v4_of(&tb, &["n2"])).await;
    label(
        "node-3",
        &["svccontroller.k3s.cattle.io/enablelb=true", "--overwrite"],
    )
    .await;
    let all = v4_of(&tb, &["n1", "n2", "n3"]);
    wait_ingress(&tb, "web", &all).await;
    // What ServiceLB leaves behind on a 1.30 API server: the nodes' addresses, ipMode VIP.
    // It stays on the nodes (rewritten with ipMode Proxy), not taken for a pool address.
    let leftover: Vec<serde_json::Value> = all
        .iter()
        .map(|ip| serde_json::json!({"ip": ip.to_string(), "ipMode": "VIP"}))
        .collect();
    let patch = serde_json::json!({"status": {"loadBalancer": {"ingress": leftover}}});
    tb.kubectl
        .run(&[
            "patch",
            "service",
            "web",
            "--subresource=status",
            "--type=merge",
            "-p",
            &patch.to_string(),
        ])
        .await
        .ok();
    wait_ingress(&tb, "web", &all).await;
    let api: Api<Service> = Api::namespaced(tb.client.clone(), "default");
    let unmarked = async || {
        let s = api.get("web").await.unwrap();
        s.status
            .and_then(|s| s.conditions)
            .unwrap_or_default()
            .is_empty()
    };
    assert!(unmarked().await, "not marked as a withdrawn pool address");
    // A Node deleted (drained and removed, its speaker still running): its address leaves
    // the status; the Service stays on the other nodes.
    tb.kubectl.run(&["delete", "node", "node-3"]).await.ok();
    wait_ingress(&tb, "web", &v4_of(&tb, &["n1", "n2"])).await;
    assert!(unmarked().await, "still not taken for a pool Service");
}

/// `l2speaker.io/node-ips: one`, with a pool present: one node's address is published;
/// when that node's speaker is killed, another node's address replaces it and answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_node_mode_fails_over_to_another_nodes_address() {
    let tb = Testbed::new(vec![1, 1, 1], Timing::DEFAULT).await;
    tb.apply(&endpoints("one", &pods(&tb))).await;
    tb.apply(&service("one", "", "l2speaker.io/node-ips: one"))
        .await;
    let nodes: BTreeSet<IpAddr> = v4_of(&tb, &["n1", "n2", "n3"]);
    let first = eventually(Duration::from_secs(30), "one node address", async || {
        let got = ingress(&tb, "one").await;
        (got.len() == 1 && nodes.contains(&got[0].0) && got[0].1.as_deref() == Some("Proxy"))
            .then(|| got[0].0)
    })
    .await;
    reach(&tb, SocketAddr::new(first, 80)).await;
    let host = tb
        .lab
        .nodes()
        .find(|h| IpAddr::V4(h.ipv4) == first)
        .unwrap()
        .name
        .clone();
    // Settled, so the failover is measured from a cluster where everyone hears everyone.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let t0 = Instant::now();
    tb.speaker(&host).kill();
    let second = eventually(
        Duration::from_secs(40),
        "another node address",
        async || {
            let got = ingress(&tb, "one").await;
            (got.len() == 1 && got[0].0 != first && nodes.contains(&got[0].0)).then(|| got[0].0)
        },
    )
    .await;
    println!(
        "node-IP one-node mode: {host}'s speaker killed, {second} published after {} ms",
        t0.elapsed().as_millis()
    );
    reach(&tb, SocketAddr::new(second, 80)).await;
}

/// Never a fallback: when the last IPPool is deleted, a Service that had a pool address loses
/// it and is marked, and stays pending while a new Service (which never had one) is published
/// on the nodes; with a pool again, it gets a pool address and the mark goes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_the_last_pool_does_not_move_its_services_onto_the_nodes() {
    let tb = Testbed::new(vec![1, 1, 0], Timing::DEFAULT).await;
    for name in ["web", "fresh"] {
        tb.apply(&endpoints(name, &pods(&tb))).await;
    }
    tb.apply(&service("web", "", "")).await;
    tb.wait_ips("default", "web", 1).await;
    tb.kubectl.run(&["delete", "ippool", "lan"]).await.ok();
    let api: Api<Service> = Api::namespaced(tb.client.clone(), "default");
    let marked = async || {
        let s = api.get_opt("web").await.ok()??;
        let st = s.status?;
        let mark = st
            .conditions
            .unwrap_or_default()
            .into_iter()
            .any(|c| c.type_ == "l2speaker.io/PoolAddressWithdrawn" && c.status == "True");
        let empty = st
            .load_balancer
            .and_then(|lb| lb.ingress)
            .unwrap_or_default()
            .is_empty();
        Some((mark, empty))
    };
    eventually(
        Duration::from_secs(30),
        "web's pool address withdrawn and marked",
        async || (marked().await? == (true, true)).then_some(()),
    )
    .await;
    tb.apply(&service("fresh", "", "").replace("port: 80,", "port: 81,"))
        .await;
    wait_ingress(&tb, "fresh", &v4_of(&tb, &["n1", "n2", "n3"])).await;
    assert_eq!(
        marked().await,
        Some((true, true)),
        "web stays pending while fresh is on the nodes"
    );
    tb.wait_describe_svc("web", "IPLeftPool").await;
    tb.apply(l2speaker_e2e::testbed::POOL).await;
    let again = tb.wait_ips("default", "web", 1).await[0];
    let pool: std::ops::RangeInclusive<IpAddr> =
        "192.0.2.200".parse().unwrap()..="192.0.2.250".parse().unwrap();
    assert!(pool.contains(&again), "a pool address again: {again}");
    eventually(Duration::from_secs(10), "the mark gone", async || {
        (marked().await? == (false, false)).then_some(())
    })
    .await;
}

/// Node-IP mode's DNAT filters and protocols too: `loadBalancerSourceRanges` drops a client
/// left out on a node's address (its connection times out: dropped, not refused for want of
/// a rule), and answers it once listed; a UDP port reaches a pod through a node's address.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_ip_services_honour_source_ranges_and_carry_udp() {
    let tb = Testbed::without_pool(vec![1, 0, 0], Timing::DEFAULT).await;
    let all = v4_of(&tb, &["n1", "n2", "n3"]);
    tb.apply(&endpoints("ranged", &pods(&tb))).await;
    let ranged = |ranges: &str| {
        service(
            "ranged",
            &format!("  loadBalancerSourceRanges: [{ranges}]\n"),
            "",
        )
    };
    tb.apply(&ranged("\"198.51.100.0/24\"")).await;
    wait_ingress(&tb, "ranged", &all).await;
    let n2 = SocketAddr::new(IpAddr::V4(tb.lab.host("n2").unwrap().ipv4), 80);
    eventually(
        Duration::from_secs(15),
        "the unlisted client dropped on n2's address",
        async || {
            matches!(
                tb.lab.connect("client", n2),
                Err(l2speaker_e2e::lab::LabError::Io { source, .. })
                    if source.kind() == std::io::ErrorKind::TimedOut
            )
            .then_some(())
        },
    )
    .await;
    let client = tb.lab.client().ipv4;
    tb.apply(&ranged(&format!("\"{client}/32\""))).await;
    let answer = reach(&tb, n2).await;
    assert!(answer.starts_with("n1-p0 "), "{answer}");

    tb.apply(&dns_endpoints("dns", &pods(&tb), "UDP")).await;
    tb.apply(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: dns\n  namespace: default\nspec:\n  type: LoadBalancer\n  ports:\n  - {name: dns, port: 53, targetPort: 8080, protocol: UDP}\n",
    )
    .await;
    wait_ingress(&tb, "dns", &all).await;
    let n3 = SocketAddr::new(IpAddr::V4(tb.lab.host("n3").unwrap().ipv4), 53);
    let reply = eventually(
        Duration::from_secs(15),
        "UDP through n3's address",
        async || tb.lab.udp_exchange("client", n3).ok()?,
    )
    .await;
    assert!(reply.starts_with("n1-p0 "), "{reply}");
}
