//! l2speaker end to end, in the lab: three nodes, pods on two of them, the real kernel, the
//! real nft and kubectl. Needs root.

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use l2speaker_e2e::lab::Pod;
use l2speaker_e2e::testbed::{Testbed, Timing, dns_endpoints, endpoints, eventually, service};

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
    for n in tb.node_names() {
        let log = tb.speaker(&n).output();
        assert!(
            !log.contains("withdrawn"),
            "no node took the IP and gave it up again (a flap):\n{log}"
        );
    }
    println!("via {ip} (owner {owner}): {answers:?}");

    let lease = tb
        .kubectl
        .run(&[
            "describe",
            "lease",
            "-n",
            "l2speaker-system",
            &l2speaker::lease::lease_name(ip),
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
    let events = tb
        .wait_describe_svc("web", &format!("{node} announces {ip} via eth0"))
        .await;
    assert!(
        events.contains(&format!("{node} announces {ip} via eth0")),
        "the Service's events say who announces:\n{events}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ipv6_and_dual_stack_services_get_one_owner_per_address_and_reach_the_pods() {
    let tb = Testbed::new(vec![1, 1, 0], Timing::DEFAULT).await;
    let all = pods(&tb);
    tb.apply(&endpoints("v6", &all)).await;
    tb.apply(&endpoints("ds", &all)).await;
    tb.apply(&service(
        "v6",
        "  ipFamilies: [IPv6]\n  ipFamilyPolicy: SingleStack\n",
        "",
    ))
    .await;
    tb.apply(&service(
        "ds",
        "  ipFamilies: [IPv4, IPv6]\n  ipFamilyPolicy: RequireDualStack\n",
        "",
    ))
    .await;
    let v6 = tb.wait_ips("default", "v6", 1).await;
    assert!(v6[0].is_ipv6());
    let ds = tb.wait_ips("default", "ds", 2).await;
    assert!(ds[0].is_ipv4() && ds[1].is_ipv6(), "{ds:?}");
    let want: BTreeSet<String> = all.iter().map(|p| p.name.clone()).collect();
    for ip in v6.iter().chain(&ds) {
        let owner = tb.wait_owner(*ip).await;
        let answers = reaches(&tb, *ip, &want).await;
        println!(
            "{ip}: owner {owner}, answers {:?}",
            answers.iter().collect::<BTreeSet<_>>()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_the_service_removes_address_rules_and_lease_everywhere() {
    let tb = Testbed::new(vec![1, 1, 0], Timing::DEFAULT).await;
    tb.apply(&endpoints("gone", &pods(&tb))).await;
    tb.apply(&service("gone", "", "")).await;
    let ip = tb.wait_ips("default", "gone", 1).await[0];
    let owner = tb.wait_owner(ip).await;
    assert!(
        tb.rules(&owner).contains(&ip.to_string()),
        "the owner has DNAT rules for {ip}"
    );
    tb.kubectl.run(&["delete", "svc", "gone"]).await.ok();
    eventually(
        Duration::from_secs(20),
        "address, rules and lease gone",
        async || {
            let rules_left = tb
                .node_names()
                .iter()
                .any(|n| tb.rules(n).contains(&ip.to_string()));
            (tb.bound_on(ip).is_empty() && !rules_left && tb.lease(ip).await.is_none())
                .then_some(())
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_requests_get_an_event_and_nothing_is_bound() {
    let tb = Testbed::new(vec![1, 1, 0], Timing::DEFAULT).await;
    // A careless pool that covers the nodes' own addresses (192.0.2.11-13).
    tb.apply("apiVersion: l2speaker.io/v1alpha1\nkind: IPPool\nmetadata:\n  name: careless\nspec:\n  addresses: [192.0.2.8/29]\n  autoAssign: false\n").await;
    tb.apply(&endpoints("outside", &pods(&tb))).await;
    tb.apply(&service("outside", "  loadBalancerIP: 203.0.113.7\n", ""))
        .await;
    tb.apply(&service(
        "nodeip",
        "",
        "l2speaker.io/load-balancer-ips: 192.0.2.11",
    ))
    .await;
    // a Service that is fine, so we know the allocator has run
    tb.apply(&service("fine", "", "")).await;
    tb.wait_ips("default", "fine", 1).await;
    for (svc, reason) in [("outside", "IPNotInPool"), ("nodeip", "IPIsNodeAddress")] {
        let out = tb.wait_describe_svc(svc, reason).await;
        assert!(out.contains("Warning"), "{out}");
        let ips = tb
            .kubectl
            .run(&[
                "get",
                "svc",
                svc,
                "-o",
                "jsonpath={.status.loadBalancer.ingress}",
            ])
            .await
            .ok();
        assert_eq!(ips, "", "{svc} got no IP");
    }
    // An invalid pool is refused whole, with a Warning Event on it.
    tb.apply("apiVersion: l2speaker.io/v1alpha1\nkind: IPPool\nmetadata:\n  name: reversed\nspec:\n  addresses: [198.51.100.200-198.51.100.100]\n").await;
    let out = eventually(
        Duration::from_secs(20),
        "an InvalidPool event",
        async || {
            let out = tb
                .kubectl
                .run(&["describe", "ippool", "reversed"])
                .await
                .ok();
            out.contains("InvalidPool").then_some(out)
        },
    )
    .await;
    assert!(
        out.contains("reversed (first address after the last)"),
        "{out}"
    );
    for ip in ["203.0.113.7", "192.0.2.11"] {
        let ip: IpAddr = ip.parse().unwrap();
        assert!(tb.lease(ip).await.is_none(), "no lease for {ip}");
        let extra: Vec<String> = tb
            .bound_on(ip)
            .into_iter()
            .filter(|h| tb.lab.host(h).unwrap().ipv4.to_string() != ip.to_string())
            .collect();
        assert!(extra.is_empty(), "{ip} bound on {extra:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_traffic_policy_puts_the_ip_on_a_node_with_a_local_endpoint_and_keeps_the_client_address()
 {
    let tb = Testbed::new(vec![1, 0, 0], Timing::DEFAULT).await;
    tb.apply(&endpoints("local", &pods(&tb))).await;
    tb.apply(&service("local", "  externalTrafficPolicy: Local\n", ""))
        .await;
    let ip = tb.wait_ips("default", "local", 1).await[0];
    let owner = tb.wait_owner(ip).await;
    assert_eq!(owner, "n1", "only n1 runs an endpoint");
    let answer = tb.lab.connect("client", SocketAddr::new(ip, 80)).unwrap();
    assert_eq!(
        answer,
        format!("n1-p0 {}", tb.lab.client().ipv4),
        "the pod sees the client's own address"
    );
}

use l2speaker_e2e::lab::probe::Timeline;

/// A Service over every pod, its IP and its owner.
async fn web(tb: &Testbed, name: &str) -> (IpAddr, String) {
    tb.apply(&endpoints(name, &pods(tb))).await;
    tb.apply(&service(name, "", "")).await;
    let ip = tb.wait_ips("default", name, 1).await[0];
    let owner = tb.wait_owner(ip).await;
    (ip, owner)
}

fn report(what: &str, t: &Timeline, after: Duration) -> Duration {
    let outage = t.outage_after(after);
    let (ok, failed) = (t.successes_after(after), t.failures_after(after));
    println!(
        "{what}: outage {} ms ({ok} answers and {failed} failures after the fault)",
        outage.as_millis()
    );
    outage
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hard_failure_moves_the_ip_to_another_node_and_traffic_resumes() {
    hard_failure(Timing::DEFAULT).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hard_failure_with_the_short_profile_moves_the_ip_too() {
    hard_failure(Timing::SHORT).await;
}

/// A sample's value from a speaker's /metrics (0 when absent).
fn metric(tb: &Testbed, host: &str, name: &str) -> f64 {
    let addr = SocketAddr::new(IpAddr::V4(tb.lab.host(host).unwrap().ipv4), 9473);
    let (code, body) = tb.lab.http_get("client", addr, "/metrics").unwrap();
    assert_eq!(code, 200);
    body.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or(0.0)
}

async fn hard_failure(timing: Timing) {
    let tb = Testbed::new(vec![1, 1, 0], timing).await;
    let (ip, owner) = web(&tb, "web").await;
    // The gauge follows the bind by a moment.
    eventually(
        Duration::from_secs(5),
        "the owner's owned_ips gauge at 1",
        async || (metric(&tb, &owner, "l2speaker_owned_ips") == 1.0).then_some(()),
    )
    .await;
    let others: Vec<String> = tb
        .node_names()
        .into_iter()
        .filter(|n| *n != owner)
        .collect();
    for n in &others {
        assert_eq!(metric(&tb, n, "l2speaker_owned_ips"), 0.0);
        assert_eq!(metric(&tb, n, "l2speaker_failover_seconds_count"), 0.0);
        let ready = tb
            .lab
            .http_get(
                "client",
                SocketAddr::new(IpAddr::V4(tb.lab.host(n).unwrap().ipv4), 9473),
                "/readyz",
            )
            .unwrap();
        assert_eq!(ready.0, 200, "{n} is ready");
    }
    let prober = tb.probe(ip).unwrap();
    let fault = prober.now();
    tb.lab.cut_link(&owner).unwrap();
    tb.speaker(&owner).kill();
    let new_owner = tb.wait_new_owner(ip, &owner).await;
    prober
        .wait_for(Duration::from_secs(20), "answers after the failover", |t| {
            t.successes_after(fault) >= 20
        })
        .unwrap();
    let IpAddr::V4(v4) = ip else { unreachable!() };
    assert_eq!(
        tb.arp_answers(v4),
        vec![tb.lab.mac(&new_owner).unwrap()],
        "only the new owner answers"
    );
    let t = prober.stop();
    let outage = report(
        &format!(
            "hard failover {owner} → {new_owner} (lease {} s)",
            tb.timing.lease_seconds
        ),
        &t,
        fault,
    );
    assert!(outage > Duration::ZERO, "the fault was seen");
    // The new owner's metrics moved.
    assert_eq!(metric(&tb, &new_owner, "l2speaker_owned_ips"), 1.0);
    assert!(metric(&tb, &new_owner, "l2speaker_lease_acquisitions_total") >= 1.0);
    assert_eq!(
        metric(&tb, &new_owner, "l2speaker_failover_seconds_count"),
        1.0,
        "one failover timed"
    );
    let took = metric(&tb, &new_owner, "l2speaker_failover_seconds_sum");
    println!(
        "the new owner measured {} ms from the lease seen expired to its first announcement",
        (took * 1000.0) as u64
    );
    assert!(
        metric(
            &tb,
            &new_owner,
            "l2speaker_announcements_total{kind=\"arp_request\"}"
        ) >= 1.0
    );
    assert!(
        metric(
            &tb,
            &new_owner,
            "l2speaker_announcements_total{kind=\"arp_reply\"}"
        ) >= 1.0
    );
    assert!(
        metric(
            &tb,
            &new_owner,
            "l2speaker_api_request_duration_seconds_count{verb=\"PUT\"}"
        ) >= 1.0,
        "Lease writes are timed"
    );
    assert!(
        metric(
            &tb,
            &new_owner,
            "l2speaker_api_request_duration_seconds_count{verb=\"WATCH\"}"
        ) >= 1.0,
        "watches are timed"
    );
    let old_node = tb.lab.host(&owner).unwrap().node_name();
    let events = tb.wait_describe_svc("web", "FailedOver").await;
    assert!(
        events.contains(&format!("taking over from {old_node}")),
        "{events}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gracefully_stopped_owner_hands_over_well_within_the_lease_duration() {
    let tb = Testbed::new(vec![1, 1, 0], Timing::DEFAULT).await;
    let (ip, owner) = web(&tb, "web").await;
    let prober = tb.probe(ip).unwrap();
    let stop = prober.now();
    let speaker = tb.speaker(&owner);
    speaker.signal(nix::sys::signal::Signal::SIGTERM).unwrap();
    let status = speaker
        .wait_timeout(Duration::from_secs(10))
        .expect("the speaker exits after SIGTERM");
    assert!(status.success(), "clean exit: {status:?}");
    assert_eq!(
        tb.rules(&owner),
        "",
        "the stopped speaker removed its rules"
    );
    let new_owner = tb.wait_owner(ip).await;
    assert_ne!(new_owner, owner);
    prober
        .wait_for(Duration::from_secs(20), "answers after the handover", |t| {
            t.successes_after(stop) >= 20
        })
        .unwrap();
    let t = prober.stop();
    let outage = report(
        &format!("graceful handover {owner} → {new_owner}"),
        &t,
        stop,
    );
    assert!(
        outage < Duration::from_secs(tb.timing.lease_seconds),
        "the handover does not wait for the lease to expire"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_speakers_address_expires_by_itself_and_a_restart_leaves_nothing_stale() {
    let tb = Testbed::new(vec![1, 1, 0], Timing::DEFAULT).await;
    let (ip, owner) = web(&tb, "web").await;
    // The owner binds first and programs DNAT right after: wait for both before the kill.
    eventually(
        Duration::from_secs(10),
        "the owner's DNAT rules",
        async || tb.rules(&owner).contains(&ip.to_string()).then_some(()),
    )
    .await;
    tb.speaker(&owner).kill();
    eventually(
        Duration::from_secs(10),
        "the dead speaker's address to expire",
        async || (!tb.bound_on(ip).contains(&owner)).then_some(()),
    )
    .await;
    let new_owner = tb.wait_owner(ip).await;
    assert_ne!(new_owner, owner);
    assert!(
        tb.rules(&owner).contains(&ip.to_string()),
        "the killed speaker's rules are still there"
    );
    tb.start_speaker(&owner);
    eventually(
        Duration::from_secs(10),
        "the restarted speaker to clean up",
        async || (!tb.rules(&owner).contains(&ip.to_string())).then_some(()),
    )
    .await;
    assert_eq!(
        tb.wait_owner(ip).await,
        new_owner,
        "ownership is sticky: no move back"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_speakers_started_at_once_never_share_an_ip_and_spread_twenty_services() {
    let tb = Testbed::without_speakers(vec![1, 1, 0], Timing::DEFAULT).await;
    let yaml: Vec<String> = (0..20)
        .map(|i| {
            format!(
                "{}---\n{}",
                endpoints(&format!("race-{i}"), &pods(&tb)),
                service(&format!("race-{i}"), "", "")
            )
        })
        .collect();
    tb.apply(&yaml.join("---\n")).await;
    // Every pool address, sampled every 10 ms from before the speakers start: ARP from the
    // client and every node's address list, so every change of ownership is recorded.
    let pool: Vec<IpAddr> = (200..=250u8)
        .map(|o| IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, o)))
        .collect();
    let sampler = tb.sample_every(&pool, Duration::from_millis(10));
    for n in tb.node_names() {
        tb.start_speaker(&n);
    }
    let mut ips = Vec::new();
    for i in 0..20 {
        ips.push(tb.wait_ips("default", &format!("race-{i}"), 1).await[0]);
    }
    let mut owners: std::collections::BTreeMap<String, usize> = Default::default();
    for ip in &ips {
        assert!(pool.contains(ip), "{ip} is from the pool");
        *owners.entry(tb.wait_owner(*ip).await).or_default() += 1;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let s = sampler.stop().unwrap();
    let v = s.violations();
    assert!(v.is_empty(), "two nodes answered:\n{}", v.join("\n"));
    let macs: std::collections::BTreeMap<String, String> = tb
        .node_names()
        .into_iter()
        .map(|n| (tb.lab.mac(&n).unwrap(), n))
        .collect();
    let mut changes = 0;
    for ip in &ips {
        let one = s.of(*ip);
        // The answering node only ever changes to the Lease's holder: the last MAC heard is
        // the owner's, and the kernels agree.
        let owner = tb.wait_owner(*ip).await;
        let last = one.rounds.iter().rev().find(|r| !r.macs.is_empty());
        assert_eq!(
            last.and_then(|r| macs.get(&r.macs[0])),
            Some(&owner),
            "{ip}: the last ARP answer comes from its owner"
        );
        changes += one.answerers().len();
        assert!(one.answered() > 0, "{ip} answered");
    }
    println!(
        "{} ARP rounds per IP; {changes} answering nodes over 20 IPs; owners per node: {owners:?}",
        s.of(ips[0]).rounds.len()
    );
    assert_eq!(owners.values().sum::<usize>(), 20);
    assert!(
        owners.values().all(|n| *n <= 9),
        "ownership is spread: {owners:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_that_stops_being_a_load_balancer_gives_its_ip_back() {
    let tb = Testbed::new(vec![1, 1, 0], Timing::DEFAULT).await;
    let (ip, _) = web(&tb, "web").await;
    tb.kubectl
        .run(&[
            "patch",
            "svc",
            "web",
            "-p",
            r#"{"spec":{"type":"ClusterIP"}}"#,
        ])
        .await
        .ok();
    eventually(Duration::from_secs(20), "the IP released", async || {
        let status = tb
            .kubectl
            .run(&[
                "get",
                "svc",
                "web",
                "-o",
                "jsonpath={.status.loadBalancer.ingress}",
            ])
            .await
            .ok();
        (status.is_empty() && tb.bound_on(ip).is_empty() && tb.lease(ip).await.is_none())
            .then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_owner_cut_off_from_the_api_server_withdraws_before_another_node_takes_over() {
    let tb = Testbed::new(vec![1, 1, 0], Timing::DEFAULT).await;
    let (ip, owner) = web(&tb, "web").await;
    let IpAddr::V4(v4) = ip else { unreachable!() };
    tb.lab.isolate_from_api(&owner).unwrap();
    // Until someone else owns it, at most the old owner answers; never two.
    let new_owner = eventually(Duration::from_secs(20), "a new owner", async || {
        let bound = tb.bound_on(ip);
        assert!(bound.len() <= 1, "{ip} bound on {bound:?}");
        assert!(tb.arp_answers(v4).len() <= 1, "two nodes answer for {ip}");
        let holder = tb.holder(ip).await.map(|h| tb.host_of(&h))?;
        (holder != owner && bound == [holder.clone()]).then_some(holder)
    })
    .await;
    assert!(
        !tb.bound_on(ip).contains(&owner),
        "the isolated owner fenced itself"
    );
    assert!(
        !tb.rules(&owner).contains(&ip.to_string()),
        "the isolated owner withdrew (its DNAT is gone too, not just the address)"
    );
    tb.lab.heal_api(&owner).unwrap();
    assert_eq!(
        tb.wait_owner(ip).await,
        new_owner,
        "no move back after healing"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_manifests_parse_and_the_api_server_accepts_them_through_kubectl_apply() {
    let server = l2speaker_e2e::apiserver::serve_local(Default::default()).unwrap();
    let kc = l2speaker_e2e::kubectl::Kubectl::new(&server.url()).unwrap();
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../manifests");
    for f in [
        "namespace.yaml",
        "crd.yaml",
        "rbac.yaml",
        "daemonset.yaml",
        "example.yaml",
    ] {
        let out = kc.run(&["apply", "-f", &format!("{dir}/{f}")]).await.ok();
        assert!(out.contains("created"), "{f}: {out}");
    }
    let ds = kc
        .run(&[
            "get",
            "ds",
            "-n",
            "l2speaker-system",
            "l2speaker",
            "-o",
            "json",
        ])
        .await
        .ok();
    let ds: serde_json::Value = serde_json::from_str(&ds).unwrap();
    let pod = &ds["spec"]["template"]["spec"];
    assert_eq!(pod["hostNetwork"], true);
    let sc = &pod["containers"][0]["securityContext"];
    assert_eq!(
        sc["capabilities"]["add"],
        serde_json::json!(["NET_ADMIN", "NET_RAW"])
    );
    assert_eq!(sc["capabilities"]["drop"], serde_json::json!(["ALL"]));
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    assert_eq!(
        pod["containers"][0]["env"][0]["valueFrom"]["fieldRef"]["fieldPath"],
        "spec.nodeName"
    );
    let role = kc
        .run(&[
            "get",
            "role",
            "-n",
            "l2speaker-system",
            "l2speaker-leases",
            "-o",
            "jsonpath={.rules[0].resources}",
        ])
        .await
        .ok();
    assert_eq!(
        role, r#"["leases"]"#,
        "Leases only in the speaker's namespace"
    );
    let pools = kc.run(&["get", "ippools"]).await.ok();
    assert!(pools.contains("lan"), "{pools}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoint_changes_reach_the_dnat_of_the_owner() {
    let tb = Testbed::new(vec![2, 1, 0], Timing::DEFAULT).await;
    let all = pods(&tb);
    let (ip, owner) = web(&tb, "web").await;
    let names = |ps: &[Pod]| {
        ps.iter()
            .map(|p| p.name.clone())
            .collect::<BTreeSet<String>>()
    };
    reaches(&tb, ip, &names(&all)).await;
    // One pod leaves the Service: new connections only reach the others.
    let fewer: Vec<Pod> = all.iter().filter(|p| p.name != "n1-p0").cloned().collect();
    tb.apply(&endpoints("web", &fewer)).await;
    eventually(Duration::from_secs(20), "n1-p0's rule gone", async || {
        (!tb.rules(&owner).contains(&all[0].ipv4.to_string())).then_some(())
    })
    .await;
    for _ in 0..30 {
        let a = tb.lab.connect("client", SocketAddr::new(ip, 80)).unwrap();
        assert!(
            !a.starts_with("n1-p0 "),
            "a removed endpoint still answers: {a}"
        );
    }
    // And comes back.
    tb.apply(&endpoints("web", &all)).await;
    reaches(&tb, ip, &names(&all)).await;
    let log = tb.speaker(&owner).output();
    assert!(
        !log.contains("incremental DNAT update failed"),
        "nft accepted every incremental update:\n{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_and_drill_show_owners_and_measure_planned_handovers_from_the_client() {
    let tb = Testbed::new(vec![1, 1, 0], Timing::DEFAULT).await;
    let (ip, owner) = web(&tb, "web").await;
    let node = tb.lab.host(&owner).unwrap().node_name();

    let (ok, out) = tb.l2speaker("client", &["status"], Duration::from_secs(20));
    assert!(ok, "{out}");
    let row: Vec<&str> = out
        .lines()
        .find(|l| l.starts_with(&ip.to_string()))
        .expect("a row for the IP")
        .split_whitespace()
        .collect();
    assert_eq!(
        &row[..5],
        [
            ip.to_string().as_str(),
            "default/web",
            node.as_str(),
            "eth0",
            tb.lab.mac(&owner).unwrap().as_str()
        ],
        "{out}"
    );

    let svg = tb.lab.log_dir().join("drill.svg");
    let (ok, out) = tb.l2speaker(
        "client",
        &[
            "drill",
            "web",
            "--count",
            "3",
            "--output",
            "json",
            "--svg",
            svg.to_str().unwrap(),
        ],
        Duration::from_secs(120),
    );
    assert!(ok, "{out}");
    let json: serde_json::Value = serde_json::from_str(&out[out.find('{').unwrap()..]).unwrap();
    let drills = json["drills"].as_array().unwrap();
    assert_eq!(drills.len(), 3);
    for d in drills {
        assert_ne!(d["from"], d["to"], "each drill moved the IP: {d}");
        assert_eq!(d["ip"], ip.to_string());
    }
    println!("drills: {}", json["summary"]);
    let new_owner = tb.wait_owner(ip).await;
    let last = drills.last().unwrap()["to"].as_str().unwrap().to_string();
    assert_eq!(
        tb.lab.host(&new_owner).unwrap().node_name(),
        last,
        "the last drill's new owner holds the IP"
    );
    let (_, status) = tb.l2speaker("client", &["status"], Duration::from_secs(20));
    assert!(
        status
            .lines()
            .any(|l| l.starts_with(&ip.to_string()) && l.split_whitespace().last() >= Some("3")),
        "transitions counted:\n{status}"
    );

    let picture = std::fs::read_to_string(&svg).unwrap();
    assert!(
        picture.starts_with("<svg") && picture.contains("asked to step down"),
        "the drill drew its timeline"
    );
    // A whole pool.
    let (ok, out) = tb.l2speaker(
        "client",
        &["drill", "--pool", "lan", "--count", "1"],
        Duration::from_secs(60),
    );
    assert!(ok && out.contains("1 drills: outage p50"), "{out}");
    // A Service whose port nobody answers is probed with ICMP instead.
    tb.apply(&service("silent", "", "")).await;
    tb.wait_owner(tb.wait_ips("default", "silent", 1).await[0])
        .await;
    let (ok, out) = tb.l2speaker(
        "client",
        &["drill", "silent", "--count", "1"],
        Duration::from_secs(60),
    );
    assert!(ok && out.contains("1 drills: outage p50"), "{out}");
    // Without permission to patch Leases, the drill says what it needs.
    tb.lab
        .api
        .as_ref()
        .unwrap()
        .server
        .forbid("patch", "leases.coordination.k8s.io");
    let (ok, out) = tb.l2speaker(
        "client",
        &["drill", "web", "--count", "1"],
        Duration::from_secs(30),
    );
    assert!(
        !ok && out.contains("not allowed to annotate lease")
            && out.contains("get/patch on Leases in l2speaker-system"),
        "{out}"
    );
    // Refusals are clear.
    tb.apply(&service(
        "pending",
        "  loadBalancerClass: someone-else\n",
        "",
    ))
    .await;
    let (ok, out) = tb.l2speaker("client", &["drill", "pending"], Duration::from_secs(20));
    assert!(
        !ok && out.contains("Service default/pending has no IP yet"),
        "{out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_left_by_a_dead_owner_of_a_deleted_service_is_cleaned_up() {
    let tb = Testbed::new(vec![1, 1, 0], Timing::SHORT).await;
    let (ip, owner) = web(&tb, "web").await;
    tb.lab.cut_link(&owner).unwrap();
    tb.speaker(&owner).kill();
    tb.kubectl.run(&["delete", "svc", "web"]).await.ok();
    eventually(
        Duration::from_secs(30),
        "the orphaned lease deleted",
        async || tb.lease(ip).await.is_none().then_some(()),
    )
    .await;
    assert!(tb.bound_on(ip).is_empty(), "nobody kept the IP");
}

/// Whether a TCP connection from the client to `vip` goes unanswered (dropped on the way:
/// the attempt times out), as opposed to answered or refused.
fn dropped(tb: &Testbed, vip: SocketAddr) -> bool {
    matches!(
        tb.lab.connect("client", vip),
        Err(l2speaker_e2e::lab::LabError::Io { source, .. })
            if source.kind() == std::io::ErrorKind::TimedOut
    )
}

/// `loadBalancerSourceRanges` on the kernel: the client reaches the pod while its address
/// is listed; once the ranges leave it out its connections are dropped (they time out, while
/// the owner still holds the VIP and reaches the pod through it itself: the filter, not a
/// missing rule, stops them); listed again, it is answered again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_balancer_source_ranges_let_only_the_listed_clients_through() {
    let tb = Testbed::new(vec![1, 0, 0], Timing::DEFAULT).await;
    tb.apply(&endpoints("ranged", &pods(&tb))).await;
    let client = tb.lab.client().ipv4;
    let ranged = |ranges: &str| {
        service(
            "ranged",
            &format!("  loadBalancerSourceRanges: [{ranges}]\n"),
            "",
        )
    };
    tb.apply(&ranged(&format!("\"{client}/32\", \"198.51.100.0/24\"")))
        .await;
    let ip = tb.wait_ips("default", "ranged", 1).await[0];
    let owner = tb.wait_owner(ip).await;
    let vip = SocketAddr::new(ip, 80);
    let reaches = async |what: &str| {
        eventually(Duration::from_secs(10), what, async || {
            let answer = tb.lab.connect("client", vip).ok()?;
            (answer == format!("n1-p0 {client}")).then_some(())
        })
        .await
    };
    reaches("the listed client reaching the pod").await;
    tb.apply(&ranged("\"198.51.100.0/24\"")).await;
    eventually(
        Duration::from_secs(10),
        "the client, no longer listed, dropped",
        async || dropped(&tb, vip).then_some(()),
    )
    .await;
    for _ in 0..3 {
        assert!(dropped(&tb, vip), "an unlisted client stays dropped");
        assert_eq!(
            tb.bound_on(ip),
            std::slice::from_ref(&owner),
            "the owner still holds {ip}"
        );
        let own = tb.lab.connect(&owner, vip);
        assert!(
            own.as_ref().is_ok_and(|a| a.starts_with("n1-p0 ")),
            "the owner's own traffic is not filtered: {own:?}"
        );
    }
    tb.apply(&ranged(&format!("\"{client}/32\""))).await;
    reaches("the client, listed again, reaching the pod").await;
}

/// `sessionAffinity: ClientIP` on the kernel: over two pods on two nodes, the client is
/// spread over both without it, and with it every connection reaches the same pod.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_ip_affinity_keeps_a_client_on_one_pod() {
    let tb = Testbed::new(vec![1, 1, 0], Timing::DEFAULT).await;
    tb.apply(&endpoints("sticky", &pods(&tb))).await;
    tb.apply(&service("sticky", "", "")).await;
    let ip = tb.wait_ips("default", "sticky", 1).await[0];
    let owner = tb.wait_owner(ip).await;
    let vip = SocketAddr::new(ip, 80);
    let pod = || {
        tb.lab
            .connect("client", vip)
            .ok()
            .and_then(|a| a.split_whitespace().next().map(str::to_string))
    };
    let mut seen = BTreeSet::new();
    eventually(
        Duration::from_secs(10),
        "both pods answering without affinity",
        async || {
            seen.extend(pod());
            (seen.len() == 2).then_some(())
        },
    )
    .await;
    tb.apply(&service(
        "sticky",
        "  sessionAffinity: ClientIP\n  sessionAffinityConfig: {clientIP: {timeoutSeconds: 600}}\n",
        "",
    ))
    .await;
    // Once the owner's rules record clients, the first answer decides the pod.
    let ns = tb.lab.host(&owner).unwrap().ns.clone();
    eventually(
        Duration::from_secs(10),
        "the owner's DNAT remembering clients for 600 s",
        async || {
            l2speaker_e2e::lab::netns::exec(
                &ns,
                "nft",
                &["list", "table", "inet", "l2speaker"],
                None,
            )
            .ok()
            .filter(|t| t.contains("_aff600"))
            .map(|_| ())
        },
    )
    .await;
    let first = pod().expect("an answer");
    for _ in 0..20 {
        assert_eq!(
            pod().as_deref(),
            Some(first.as_str()),
            "the client keeps its pod"
        );
    }
}

/// IP sharing, DNS-style: a TCP and a UDP Service with one sharing key get one pool IP, one
/// Lease and one owner, and both answer through it; a third Service with the key but a port
/// already used is refused with a Warning; deleting one keeps the IP for the other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn services_with_one_sharing_key_share_one_ip_lease_and_owner() {
    let tb = Testbed::new(vec![1, 1, 0], Timing::DEFAULT).await;
    let shared = |name: &str, protocol: &str| {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: default\n  annotations: {{l2speaker.io/allow-shared-ip: dns}}\nspec:\n  type: LoadBalancer\n  ports:\n  - {{name: dns, port: 53, targetPort: 8080, protocol: {protocol}}}\n"
        )
    };
    for (name, protocol) in [("dns-tcp", "TCP"), ("dns-udp", "UDP")] {
        tb.apply(&dns_endpoints(name, &pods(&tb), protocol)).await;
        tb.apply(&shared(name, protocol)).await;
    }
    let ip = tb.wait_ips("default", "dns-tcp", 1).await[0];
    assert_eq!(tb.wait_ips("default", "dns-udp", 1).await, [ip], "one IP");
    let owner = tb.wait_owner(ip).await;
    let vip = SocketAddr::new(ip, 53);
    let tcp = async |what: &str| {
        eventually(Duration::from_secs(10), what, async || {
            tb.lab
                .connect("client", vip)
                .ok()
                .filter(|a| a.contains("-p0 "))
        })
        .await
    };
    tcp("TCP through the shared IP").await;
    let udp = async |what: &str| {
        eventually(Duration::from_secs(10), what, async || {
            tb.lab
                .udp_exchange("client", vip)
                .ok()?
                .filter(|a| a.contains("-p0 "))
        })
        .await
    };
    udp("UDP through the shared IP").await;
    let api: kube::Api<k8s_openapi::api::coordination::v1::Lease> =
        kube::Api::namespaced(tb.client.clone(), l2speaker_e2e::testbed::NAMESPACE);
    let vip_leases = api
        .list(&Default::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|l| {
            l.metadata
                .name
                .as_deref()
                .is_some_and(|n| n.starts_with("vip-"))
        })
        .count();
    assert_eq!(vip_leases, 1, "one Lease for the two Services");

    // A third Service with the key and a port already used: refused until the port is free.
    tb.apply(&dns_endpoints("dns-clash", &pods(&tb), "TCP"))
        .await;
    tb.apply(&shared("dns-clash", "TCP")).await;
    let said = tb.wait_describe_svc("dns-clash", "IPSharingRefused").await;
    assert!(said.contains("uses tcp/53 too"), "{said}");

    // dns-tcp deleted: dns-udp keeps the IP and its owner, and dns-clash joins it on tcp/53.
    tb.kubectl.run(&["delete", "service", "dns-tcp"]).await.ok();
    assert_eq!(tb.wait_ips("default", "dns-clash", 1).await, [ip], "joined");
    tcp("TCP through the shared IP for dns-clash").await;
    udp("UDP still answered after the TCP Service went").await;
    assert_eq!(
        tb.wait_ips("default", "dns-udp", 1).await,
        [ip],
        "the IP stays"
    );
    assert_eq!(tb.bound_on(ip), [owner], "and its owner");
}
