//! Addresses someone else uses, in the lab (needs root): a pool that covers a node's gateway,
//! the API server and a node's own address; an address a person adds to a node by hand.

use std::net::IpAddr;
use std::time::Duration;

use l2speaker_e2e::lab::{Pod, netns};
use l2speaker_e2e::testbed::{Testbed, Timing, endpoints, eventually, service};

fn pods(tb: &Testbed) -> Vec<Pod> {
    tb.lab.pods().cloned().collect()
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

async fn refused_by(tb: &Testbed, node: &str, addr: IpAddr) {
    let name = l2speaker::node_lease::name(node);
    eventually(
        Duration::from_secs(10),
        &format!("{node} publishes {addr} as refused"),
        async || {
            let api: kube::Api<k8s_openapi::api::coordination::v1::Lease> =
                kube::Api::namespaced(tb.client.clone(), "l2speaker-system");
            let l = api.get_opt(&name).await.ok()??;
            l2speaker::node_lease::refused(&l)
                .contains_key(&addr)
                .then_some(())
        },
    )
    .await;
}

async fn status_ips(tb: &Testbed, svc: &str) -> Vec<String> {
    let api: kube::Api<k8s_openapi::api::core::v1::Service> =
        kube::Api::namespaced(tb.client.clone(), "default");
    api.get(svc)
        .await
        .unwrap()
        .status
        .and_then(|s| s.load_balancer?.ingress)
        .unwrap_or_default()
        .into_iter()
        .filter_map(|i| i.ip)
        .collect()
}

/// The typo: a second pool `192.0.2.0/28` over the LAN, with Services asking for the
/// gateway of n1, the API server's address and n1's own address. None is assigned or bound;
/// each Service is told why; a Service without a wish gets a harmless address; the Service on
/// the main pool keeps working throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_over_the_gateway_the_api_server_and_a_node_binds_none_of_them() {
    let tb = Testbed::new(vec![1, 1, 0], Timing::DEFAULT).await;
    tb.apply(&endpoints("web", &pods(&tb))).await;
    tb.apply(&service("web", "", "")).await;
    let web_ip = tb.wait_ips("default", "web", 1).await[0];
    tb.wait_owner(web_ip).await;
    let prober = tb.probe(web_ip).unwrap();
    let n1 = tb.lab.host("n1").unwrap();
    netns::ip(&n1.ns, &["route", "add", "default", "via", "192.0.2.1"]).unwrap();
    refused_by(&tb, &n1.node_name(), ip("192.0.2.1")).await;
    let cp = tb.lab.host("cp").unwrap().ipv4;
    refused_by(&tb, &n1.node_name(), IpAddr::V4(cp)).await;

    let watched = [
        ip("192.0.2.0"),
        ip("192.0.2.1"),
        IpAddr::V4(cp),
        IpAddr::V4(n1.ipv4),
    ];
    let sampler = tb.sample(&watched);
    tb.apply(
        "apiVersion: l2speaker.io/v1alpha1\nkind: IPPool\nmetadata:\n  name: typo\nspec:\n  addresses: [192.0.2.0/28]\n  autoAssign: false\n",
    )
    .await;
    let asks = [
        ("gw", "192.0.2.1", "a gateway of node-1"),
        ("api", &cp.to_string(), "the API server's address"),
        ("node", &n1.ipv4.to_string(), "node-1's own address"),
    ];
    for (name, addr, _) in &asks {
        tb.apply(&endpoints(name, &pods(&tb))).await;
        tb.apply(&service(
            name,
            "",
            &format!("l2speaker.io/load-balancer-ips: \"{addr}\""),
        ))
        .await;
    }
    tb.apply(&endpoints("auto", &pods(&tb))).await;
    tb.apply(&service("auto", "", "l2speaker.io/pool: typo"))
        .await;
    let auto = tb.wait_ips("default", "auto", 1).await[0];
    let forbidden = [
        ip("192.0.2.0"),
        ip("192.0.2.1"),
        IpAddr::V4(cp),
        ip("192.0.2.15"),
    ];
    assert!(
        !forbidden.contains(&auto) && !tb.lab.nodes().any(|h| IpAddr::V4(h.ipv4) == auto),
        "the Service without a wish got {auto}"
    );
    for (name, addr, why) in &asks {
        let events = tb.wait_describe_svc(name, "IPIsNodeAddress").await;
        assert!(
            events.contains(why),
            "{name} ({addr}) is told it is {why}: {events}"
        );
        assert!(status_ips(&tb, name).await.is_empty(), "{name} got no IP");
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let s = sampler.stop().unwrap();
    for addr in &watched {
        // `bound` counts only addresses the speaker added (IFA_PROTO): n1's own address is
        // on n1 from the start, and the speaker must never have added it or taken it over.
        for (node, reads) in &s.of(*addr).kernels {
            assert!(
                reads.iter().all(|r| !r.bound),
                "{addr} on {node}: bound by l2speaker"
            );
        }
    }
    let kept = netns::ip(&n1.ns, &["-o", "addr", "show"]).unwrap();
    assert!(
        kept.contains(&format!("inet {}/", n1.ipv4)),
        "n1 keeps its own address: {kept}"
    );
    let t = prober.stop();
    println!(
        "prober: {} answers, outages {:?}, failures at {:?}",
        t.successes(),
        t.outages(),
        t.samples
            .iter()
            .filter(|s| !s.ok)
            .map(|s| s.at)
            .collect::<Vec<_>>()
    );
    assert_eq!(t.failures(), 0, "the Service on the main pool kept working");
}

/// Someone adds the VIP of a Service to another node by hand: that node refuses it, the
/// Service is told and gets a new IP, the owner gives the old one up, and the hand-made
/// address is left exactly as it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_address_added_by_hand_is_never_touched_and_the_service_moves_off_it() {
    let tb = Testbed::new(vec![1, 1, 0], Timing::DEFAULT).await;
    tb.apply(&endpoints("web", &pods(&tb))).await;
    tb.apply(&service("web", "", "")).await;
    let old = tb.wait_ips("default", "web", 1).await[0];
    let owner = tb.wait_owner(old).await;
    let other = tb.node_names().into_iter().find(|n| *n != owner).unwrap();
    let other_ns = tb.lab.host(&other).unwrap().ns.clone();
    netns::ip(
        &other_ns,
        &[
            "addr",
            "add",
            &format!("{old}/32"),
            "dev",
            "eth0",
            "valid_lft",
            "forever",
        ],
    )
    .unwrap();
    let events = tb.wait_describe_svc("web", "withdrawn").await;
    assert!(events.contains(&old.to_string()), "{events}");
    let new = eventually(Duration::from_secs(20), "a new IP for web", async || {
        let ips = status_ips(&tb, "web").await;
        ips.first().map(|s| ip(s)).filter(|ip| *ip != old)
    })
    .await;
    tb.wait_owner(new).await;
    eventually(
        Duration::from_secs(10),
        "the owner gave the old IP up",
        async || (tb.bound_on(old) == [other.clone()]).then_some(()),
    )
    .await;
    let out = netns::ip(&other_ns, &["-o", "addr", "show", "dev", "eth0"]).unwrap();
    let line = out
        .lines()
        .find(|l| l.contains(&format!("{old}/32")))
        .expect("the hand-made address is still there");
    assert!(
        line.contains("valid_lft forever")
            && !line.contains("proto 0x4c")
            && !line.contains("proto 76"),
        "untouched: {line}"
    );
}

async fn pool_condition(tb: &Testbed, path: &str) -> String {
    tb.kubectl
        .run(&["get", "ippool", "lan", "-o", &format!("jsonpath={path}")])
        .await
        .stdout
}

/// A pool edited into an invalid state while in use keeps serving its last valid addresses:
/// no outage, the IP does not change, and the pool's status and a Warning Event name the bad
/// entry. Shrinking the pool under a Service's IP tells the Service which IP leaves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_edited_into_an_invalid_state_keeps_serving_and_says_why() {
    let tb = Testbed::new(vec![1, 1, 0], Timing::DEFAULT).await;
    tb.apply(&endpoints("web", &pods(&tb))).await;
    tb.apply(&service("web", "", "")).await;
    let ip = tb.wait_ips("default", "web", 1).await[0];
    tb.wait_owner(ip).await;
    eventually(Duration::from_secs(10), "the pool is Valid", async || {
        (pool_condition(&tb, "{.status.conditions[0].status}").await == "True").then_some(())
    })
    .await;
    let prober = tb.probe(ip).unwrap();
    let edited = prober.now();
    // A malformed entry is refused at admission, as kubectl shows it.
    let out = tb
        .kubectl
        .run_with_stdin(
            &["apply", "-f", "-"],
            Some("apiVersion: l2speaker.io/v1alpha1\nkind: IPPool\nmetadata:\n  name: lan\nspec:\n  addresses:\n  - 192.0.2.200-192.0.2.250\n  - 2001:db8::200/120\n  - 192.0.2.300\n"),
        )
        .await;
    assert!(!out.success, "refused: {}", out.stdout);
    assert!(
        out.stderr
            .contains("spec.addresses[2]: Invalid value: \"192.0.2.300\""),
        "{}",
        out.stderr
    );
    // A well-formed but invalid one (host bits set) gets in, and the status says why.
    tb.apply(
        "apiVersion: l2speaker.io/v1alpha1\nkind: IPPool\nmetadata:\n  name: lan\nspec:\n  addresses:\n  - 192.0.2.200-192.0.2.250\n  - 2001:db8::200/120\n  - 198.51.100.1/24\n",
    )
    .await;
    let message = eventually(
        Duration::from_secs(10),
        "the pool says it is invalid",
        async || {
            let m = pool_condition(&tb, "{.status.conditions[0].message}").await;
            m.contains("198.51.100.1/24").then_some(m)
        },
    )
    .await;
    assert!(message.contains("host bits"), "{message}");
    assert!(message.contains("stay in effect"), "{message}");
    assert_eq!(
        pool_condition(&tb, "{.status.conditions[0].status}").await,
        "False"
    );
    let generation = pool_condition(&tb, "{.metadata.generation}").await;
    assert_eq!(
        pool_condition(&tb, "{.status.observedGeneration}").await,
        generation
    );
    let events = tb
        .kubectl
        .run(&[
            "get",
            "events",
            "--field-selector",
            "involvedObject.name=lan",
            "-o",
            "yaml",
        ])
        .await
        .stdout;
    assert!(
        events.contains("InvalidPool") && events.contains("198.51.100.1/24"),
        "{events}"
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        status_ips(&tb, "web").await,
        [ip.to_string()],
        "the IP stays"
    );
    let t = prober.stop();
    assert_eq!(t.failures_after(edited), 0, "no outage");

    // Shrunk under the Service's IP: the Service is told which IP leaves, and gets another.
    tb.apply(
        "apiVersion: l2speaker.io/v1alpha1\nkind: IPPool\nmetadata:\n  name: lan\nspec:\n  addresses:\n  - 192.0.2.230-192.0.2.250\n  - 2001:db8::200/120\n",
    )
    .await;
    let events = tb.wait_describe_svc("web", "IPLeftPool").await;
    assert!(events.contains(&ip.to_string()), "{events}");
    eventually(
        Duration::from_secs(20),
        "a new IP from the shrunk pool",
        async || {
            status_ips(&tb, "web")
                .await
                .first()
                .filter(|s| s.as_str() != ip.to_string() && s.starts_with("192.0.2.2"))
                .cloned()
        },
    )
    .await;
    assert_eq!(
        pool_condition(&tb, "{.status.conditions[0].status}").await,
        "True"
    );
}

/// Another host on the LAN already uses a pool IP: every speaker's probe before binding is
/// answered, so none binds it; the Service is told who answers (IPConflict with the MAC), the
/// metric counts it, and once the host lets the address go a speaker takes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ip_another_host_uses_is_never_bound_and_the_service_is_told() {
    let tb = Testbed::new(vec![1, 1, 0], Timing::DEFAULT).await;
    let client = tb.lab.client().clone();
    let taken = ip("192.0.2.220");
    netns::ip(
        &client.ns,
        &["addr", "add", "192.0.2.220/32", "dev", "eth0"],
    )
    .unwrap();
    let sampler = tb.sample(&[taken]);
    tb.apply(&endpoints("web", &pods(&tb))).await;
    tb.apply(&service(
        "web",
        "",
        "l2speaker.io/load-balancer-ips: \"192.0.2.220\"",
    ))
    .await;
    let events = tb.wait_describe_svc("web", "IPConflict").await;
    let client_mac = tb.lab.mac("client").unwrap();
    assert!(
        events.contains(&client_mac),
        "the Event names the MAC: {events}"
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    let s = sampler.stop().unwrap();
    for (node, reads) in &s.of(taken).kernels {
        assert!(reads.iter().all(|r| !r.bound), "{node} never bound {taken}");
    }
    // (The sampler runs on the client itself, so it does not hear the client's own answers.)
    let node_macs: Vec<String> = tb
        .node_names()
        .iter()
        .map(|n| tb.lab.mac(n).unwrap())
        .collect();
    assert!(
        s.of(taken)
            .answerers()
            .iter()
            .all(|m| !node_macs.contains(m)),
        "no node answered: {:?}",
        s.of(taken).answerers()
    );
    let counted: f64 = tb
        .node_names()
        .iter()
        .map(|n| {
            let addr = std::net::SocketAddr::new(IpAddr::V4(tb.lab.host(n).unwrap().ipv4), 9473);
            tb.lab
                .http_get("client", addr, "/metrics")
                .map(|(_, b)| {
                    b.lines()
                        .find_map(|l| {
                            l.strip_prefix("l2speaker_ip_conflicts_total ")?
                                .parse()
                                .ok()
                        })
                        .unwrap_or(0.0)
                })
                .unwrap_or(0.0)
        })
        .sum();
    // Either a probe was answered (counted), or — when the listening speakers heard the
    // host's claim first, as happens under load — no speaker even took the Lease and the
    // Event says the address is used on the LAN. Both keep the address unbound.
    assert!(
        counted >= 1.0 || events.contains("is used by"),
        "l2speaker_ip_conflicts_total counts it, or the Event says who uses it: {events}"
    );
    // The host lets it go: a speaker takes it after its wait.
    netns::ip(
        &client.ns,
        &["addr", "del", "192.0.2.220/32", "dev", "eth0"],
    )
    .unwrap();
    let freed = std::time::Instant::now();
    // The speakers remember the host's answers for 30 s, then one takes the address.
    let owner = eventually(
        Duration::from_secs(60),
        "an owner once the host let go",
        async || {
            let h = tb.holder(taken).await?;
            let host = tb.host_of(&h);
            (tb.bound_on(taken) == [host.clone()]).then_some(host)
        },
    )
    .await;
    println!(
        "{owner} owns {taken} {} s after the other host let it go",
        freed.elapsed().as_secs()
    );
}

/// The client sends a gratuitous ARP for `v4`, as a host that takes an address does.
fn send_garp(tb: &Testbed, v4: std::net::Ipv4Addr) {
    let client = tb.lab.client().clone();
    netns::run_in(&client.ns, move || {
        let iface = pnet_datalink::interfaces()
            .into_iter()
            .find(|i| i.name == "eth0")
            .unwrap();
        let mac = iface.mac.unwrap().octets();
        let pnet_datalink::Channel::Ethernet(mut tx, _) =
            pnet_datalink::channel(&iface, Default::default()).unwrap()
        else {
            panic!("an Ethernet channel")
        };
        let frame = l2speaker::dataplane::packet::garp_request(mac, v4);
        tx.send_to(&frame, None).unwrap().unwrap();
    })
    .unwrap();
}

/// A host announced a pool address before any Service wanted it: every speaker heard it (the
/// speakers listen on interfaces on a pool's subnet), so when a Service asks for that address
/// no speaker even takes its Lease, and the Service is told who uses it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_ip_another_host_announced_is_not_taken_at_all() {
    let tb = Testbed::new(vec![1, 1, 0], Timing::DEFAULT).await;
    // The watchers start within a pass of the speakers' start.
    tokio::time::sleep(Duration::from_millis(800)).await;
    let used = std::net::Ipv4Addr::new(192, 0, 2, 230);
    send_garp(&tb, used);
    tokio::time::sleep(Duration::from_millis(300)).await;
    tb.apply(&endpoints("web", &pods(&tb))).await;
    tb.apply(&service(
        "web",
        "",
        "l2speaker.io/load-balancer-ips: \"192.0.2.230\"",
    ))
    .await;
    let events = tb.wait_describe_svc("web", "on the LAN").await;
    let client_mac = tb.lab.mac("client").unwrap();
    assert!(events.contains(&client_mac), "{events}");
    tokio::time::sleep(Duration::from_secs(3)).await;
    let holder = tb.holder(IpAddr::V4(used)).await;
    assert_eq!(holder, None, "no speaker took the Lease");
    assert!(tb.bound_on(IpAddr::V4(used)).is_empty(), "nobody bound it");
}

/// A host on the LAN starts claiming an IP a node owns (it sends a gratuitous ARP for it):
/// the owner reports it (IPConflict naming the MAC, a metric), defends once, and keeps it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_foreign_claim_on_an_owned_ip_is_reported_and_defended() {
    let tb = Testbed::new(vec![1, 1, 0], Timing::DEFAULT).await;
    tb.apply(&endpoints("web", &pods(&tb))).await;
    tb.apply(&service("web", "", "")).await;
    let vip = tb.wait_ips("default", "web", 1).await[0];
    let owner = tb.wait_owner(vip).await;
    let IpAddr::V4(v4) = vip else { panic!("IPv4") };
    let client_mac = tb.lab.mac("client").unwrap();
    // The owner's watcher starts within a moment of the bind.
    tokio::time::sleep(Duration::from_millis(600)).await;
    send_garp(&tb, v4);
    let events = tb.wait_describe_svc("web", "keeps it").await;
    assert!(events.contains(&client_mac), "{events}");
    let addr = std::net::SocketAddr::new(IpAddr::V4(tb.lab.host(&owner).unwrap().ipv4), 9473);
    let (_, body) = tb.lab.http_get("client", addr, "/metrics").unwrap();
    assert!(
        body.contains("l2speaker_ip_conflicts_while_owning_total 1"),
        "the owner counted it"
    );
    assert_eq!(tb.bound_on(vip), [owner], "the owner kept the IP");
}

/// Hostile amounts: 2,000 Services at once. The allocator keeps renewing its Lease while it
/// assigns them (it runs apart from the Lease holder), and every Service gets its own IP.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_allocator_keeps_its_lease_while_it_assigns_two_thousand_services() {
    use k8s_openapi::api::coordination::v1::Lease;
    use k8s_openapi::api::core::v1::Service;
    let tb = Testbed::new(vec![0, 0, 0], Timing::DEFAULT).await;
    // A pool on the nodes' subnet that selects no node: nobody binds these, the allocator
    // only assigns them.
    tb.apply(
        "apiVersion: l2speaker.io/v1alpha1\nkind: IPPool\nmetadata:\n  name: many\nspec:\n  addresses: [2001:db8::1:0/112]\n  nodeSelector: {l2speaker-test: nobody}\n",
    )
    .await;
    let leases: kube::Api<Lease> = kube::Api::namespaced(tb.client.clone(), "l2speaker-system");
    let renewed = async || {
        leases
            .get_opt(l2speaker::allocation::ALLOCATOR_LEASE)
            .await
            .ok()
            .flatten()
            .and_then(|l| l.spec?.renew_time)
            .map(|t| t.0)
    };
    eventually(Duration::from_secs(20), "an allocator", async || {
        renewed().await
    })
    .await;
    let first = leases
        .get(l2speaker::allocation::ALLOCATOR_LEASE)
        .await
        .unwrap()
        .spec
        .unwrap();
    let svcs: kube::Api<Service> = kube::Api::namespaced(tb.client.clone(), "default");
    let n = 2000;
    let started = std::time::Instant::now();
    for i in 0..n {
        let s: Service = serde_json::from_value(serde_json::json!({
            "metadata": {"name": format!("m{i}"), "annotations": {"l2speaker.io/pool": "many"}},
            "spec": {"type": "LoadBalancer", "ipFamilies": ["IPv6"], "ipFamilyPolicy": "SingleStack",
                     "ports": [{"port": 80}]}
        }))
        .unwrap();
        svcs.create(&Default::default(), &s).await.unwrap();
    }
    // Watch the allocator's renewals while it works, until every Service has an IP.
    let mut last = renewed().await.unwrap();
    let mut last_seen = std::time::Instant::now();
    let mut worst = Duration::ZERO;
    loop {
        if let Some(t) = renewed().await
            && t != last
        {
            worst = worst.max(last_seen.elapsed());
            last = t;
            last_seen = std::time::Instant::now();
        }
        let list = svcs.list(&Default::default()).await.unwrap();
        let with_ip = list
            .items
            .iter()
            .filter(|s| {
                s.status
                    .as_ref()
                    .and_then(|st| st.load_balancer.as_ref()?.ingress.as_ref())
                    .is_some_and(|i| !i.is_empty())
            })
            .count();
        if with_ip == n {
            let ips: std::collections::BTreeSet<String> = list
                .items
                .iter()
                .filter_map(|s| {
                    s.status
                        .as_ref()?
                        .load_balancer
                        .as_ref()?
                        .ingress
                        .as_ref()?[0]
                        .ip
                        .clone()
                })
                .collect();
            assert_eq!(ips.len(), n, "distinct IPs");
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(240),
            "only {with_ip} of {n} Services got an IP"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    worst = worst.max(last_seen.elapsed());
    println!(
        "{n} Services assigned in {:.1} s; the allocator's Lease was renewed at least every {} ms",
        started.elapsed().as_secs_f64(),
        worst.as_millis()
    );
    // (The gap as seen includes this test's own polling of 2,000 Services.)
    assert!(
        worst < Duration::from_secs(Timing::DEFAULT.lease_seconds),
        "the allocator's Lease went {worst:?} without a renewal"
    );
    let end = leases
        .get(l2speaker::allocation::ALLOCATOR_LEASE)
        .await
        .unwrap()
        .spec
        .unwrap();
    assert_eq!(
        (end.holder_identity, end.lease_transitions.unwrap_or(0)),
        (first.holder_identity, first.lease_transitions.unwrap_or(0)),
        "the same allocator held its Lease throughout"
    );
}

/// A pool's condition `type_` as kubectl shows it: `status/reason`.
async fn pool_condition_of(tb: &Testbed, pool: &str, type_: &str) -> String {
    let path = format!(
        "jsonpath={{.status.conditions[?(@.type==\"{type_}\")].status}}/{{.status.conditions[?(@.type==\"{type_}\")].reason}}"
    );
    tb.kubectl
        .run(&["get", "ippool", pool, "-o", &path])
        .await
        .stdout
}

/// A pool outside every node's subnets (`203.0.113.0/28` and `2001:db8:5::/64` while the nodes
/// are on 192.0.2.0/24 and 2001:db8::/64): no node could announce its IPs, so none is
/// assigned; each Service is told why, the pool's `Announceable` condition says so, and
/// `l2speaker status` names an assigned IP that no node is eligible for. With
/// `spec.interface` the same pool is announced there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_no_node_can_announce_assigns_nothing_and_says_why() {
    let tb = Testbed::new(vec![1, 1, 0], Timing::DEFAULT).await;
    eventually(
        Duration::from_secs(20),
        "every speaker publishes its subnets",
        async || {
            let api: kube::Api<k8s_openapi::api::coordination::v1::Lease> =
                kube::Api::namespaced(tb.client.clone(), "l2speaker-system");
            let mut all = Vec::new();
            for n in tb.lab.nodes() {
                let l = api
                    .get_opt(&l2speaker::node_lease::name(&n.node_name()))
                    .await
                    .ok()??;
                all.extend(l2speaker::node_lease::subnets(&l)?);
            }
            all.contains(&"192.0.2.0/24".parse().unwrap()).then_some(())
        },
    )
    .await;
    tb.apply(
        "apiVersion: l2speaker.io/v1alpha1\nkind: IPPool\nmetadata:\n  name: far\nspec:\n  addresses: [203.0.113.0/28, 2001:db8:5::/64]\n  autoAssign: false\n---\napiVersion: l2speaker.io/v1alpha1\nkind: IPPool\nmetadata:\n  name: nobody\nspec:\n  addresses: [192.0.2.160/29]\n  autoAssign: false\n  nodeSelector: {l2speaker-test: nobody}\n",
    )
    .await;
    for name in ["far", "far6", "idle"] {
        tb.apply(&endpoints(name, &pods(&tb))).await;
    }
    tb.apply(&service("far", "", "l2speaker.io/pool: far"))
        .await;
    tb.apply(&service(
        "far6",
        "  ipFamilies: [IPv6]\n  ipFamilyPolicy: SingleStack\n",
        "l2speaker.io/pool: far",
    ))
    .await;
    tb.apply(&service(
        "wish",
        "",
        "l2speaker.io/load-balancer-ips: \"203.0.113.5\"",
    ))
    .await;
    tb.apply(&service("idle", "", "l2speaker.io/pool: nobody"))
        .await;
    for name in ["far", "far6", "wish"] {
        let events = tb.wait_describe_svc(name, "IPNotAnnounceable").await;
        assert!(
            events.contains("subnet"),
            "{name} is told no node's subnet holds the pool: {events}"
        );
        assert!(status_ips(&tb, name).await.is_empty(), "{name} got no IP");
    }
    eventually(
        Duration::from_secs(20),
        "the pool says it cannot be announced",
        async || {
            (pool_condition_of(&tb, "far", "Announceable").await == "False/NoNodeSubnet")
                .then_some(())
        },
    )
    .await;
    eventually(
        Duration::from_secs(20),
        "a pool on the nodes' subnet says it can be announced",
        async || {
            (pool_condition_of(&tb, "nobody", "Announceable").await == "True/OnNodeSubnets")
                .then_some(())
        },
    )
    .await;

    // Assigned, but no node may announce it (the pool selects no node): status says so.
    let idle = tb.wait_ips("default", "idle", 1).await[0];
    let (ok, out) = tb.l2speaker("n1", &["status"], Duration::from_secs(20));
    let line = out
        .lines()
        .find(|l| l.starts_with(&idle.to_string()))
        .unwrap_or_else(|| panic!("status lists {idle}: {out}"));
    assert!(ok && line.contains("no node is eligible"), "{out}");

    // Named on the pool, the interface carries it: assigned and announced by one node.
    tb.apply(
        "apiVersion: l2speaker.io/v1alpha1\nkind: IPPool\nmetadata:\n  name: far\nspec:\n  addresses: [203.0.113.0/28, 2001:db8:5::/64]\n  autoAssign: false\n  interface: eth0\n",
    )
    .await;
    let far = tb.wait_ips("default", "far", 1).await[0];
    assert!(far.to_string().starts_with("203.0.113."), "far got {far}");
    tb.wait_owner(far).await;
    eventually(Duration::from_secs(10), "one node binds it", async || {
        (tb.bound_on(far).len() == 1).then_some(())
    })
    .await;
    eventually(
        Duration::from_secs(20),
        "the pool says its interface announces it",
        async || {
            (pool_condition_of(&tb, "far", "Announceable").await == "True/Interface").then_some(())
        },
    )
    .await;
}
