//! LAN mode in the lab (needs root): speakers started with `--liveness lan`, faults from the
//! fault table, a sampler on the client's segment asking ARP for the VIP every 5 ms and
//! counting every reply to each request, and reading every node's addresses and gate over
//! netlink just as often. At no sample may two nodes answer, and never may two nodes hold the
//! address with their gates open over overlapping stretches of reads.
//!
//! The kernel-sharing tests at the end run in lease mode too.
//!
//! (In LAN mode an address may stay bound on a node whose gate is closed — a killed
//! speaker's, until the speaker restarts: it answers nothing and does not count.)

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use l2speaker_e2e::lab::Pod;
use l2speaker_e2e::lab::sampler::AllSamples;
use l2speaker_e2e::testbed::{Testbed, Timing, dns_endpoints, endpoints, eventually, service};
use nix::sys::signal::Signal;
use serde_json::json;

fn pods(tb: &Testbed) -> Vec<Pod> {
    tb.lab.pods().cloned().collect()
}

async fn web(tb: &Testbed) -> (IpAddr, String) {
    tb.apply(&endpoints("web", &pods(tb))).await;
    tb.apply(&service("web", "", "")).await;
    let ip = tb.wait_ips("default", "web", 1).await[0];
    let owner = lan_owner(tb, ip, None).await;
    (ip, owner)
}

/// Waits until the Lease of `ip` names a node (other than `not`) and that node, alone,
/// answers ARP for it (its gate open): that node's lab host.
async fn lan_owner(tb: &Testbed, ip: IpAddr, not: Option<&str>) -> String {
    let IpAddr::V4(v4) = ip else { panic!("IPv4") };
    eventually(
        Duration::from_secs(30),
        &format!("one node answering for {ip}"),
        async || {
            let host = tb.host_of(&tb.holder(ip).await?);
            if not == Some(host.as_str()) {
                return None;
            }
            let mac = tb.lab.mac(&host).ok()?;
            (tb.arp_answers(v4) == [mac]).then_some(host)
        },
    )
    .await
}

async fn ready(tb: &Testbed) {
    for n in tb.node_names() {
        let addr = SocketAddr::new(IpAddr::V4(tb.lab.host(&n).unwrap().ipv4), 9473);
        eventually(Duration::from_secs(10), &format!("{n} ready"), async || {
            tb.lab
                .http_get("client", addr, "/readyz")
                .is_ok_and(|(c, _)| c == 200)
                .then_some(())
        })
        .await;
    }
}

/// Three speakers with the Service's IP owned and answering, past the 10 s settle time of
/// new members (so every node counts for take-overs).
async fn settled(timing: Timing) -> (Testbed, IpAddr, String) {
    let tb = Testbed::new(vec![1, 1, 0], timing).await;
    ready(&tb).await;
    let (ip, owner) = web(&tb).await;
    tokio::time::sleep(Duration::from_secs(10)).await;
    (tb, ip, owner)
}

/// Fails with every round in which two MACs answered.
fn assert_never_two(what: &str, s: &AllSamples) {
    println!("{what}:\n{}", s.summary());
    for (ip, one) in &s.vips {
        let doubles = one.double_answers();
        assert!(
            doubles.is_empty(),
            "{what}: {ip} answered by two nodes in {} rounds, first {:?}",
            doubles.len(),
            doubles.first()
        );
        let kernels = one.double_binds();
        assert!(
            kernels.is_empty(),
            "{what}: {ip} bound with the gate open on two nodes {} times, first {:?}",
            kernels.len(),
            kernels.first()
        );
        assert!(
            one.kernels.values().map(Vec::len).sum::<usize>() > 0,
            "{ip}: the sampler read the kernels"
        );
        assert!(one.answered() > 0, "{ip}: the sampler saw answers");
    }
}

/// The client reaches the VIP's port 80 now (one connection, 500 ms).
fn assert_served(tb: &Testbed, ip: IpAddr, when: &str) {
    let client = tb.lab.client().ns.clone();
    let answer = l2speaker_e2e::lab::connect_from(
        &client,
        SocketAddr::new(ip, 80),
        Duration::from_millis(500),
    );
    assert!(answer.is_ok(), "{when}: {answer:?}");
}

/// The longest run of unanswered rounds after `from` (the outage a client sees).
fn outage(s: &AllSamples, ip: IpAddr, from: Duration) -> Duration {
    s.of(ip).longest_silence_after(from)
}

async fn hard_failover(timing: Timing, kill: bool) {
    let (tb, ip, owner) = settled(timing).await;
    let sampler = tb.sample(&[ip]);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let fault = sampler.now();
    if kill {
        tb.speaker(&owner).kill();
    } else {
        tb.lab.cut_link(&owner).unwrap();
    }
    let new = lan_owner(&tb, ip, Some(&owner)).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let s = sampler.stop().unwrap();
    let what = format!(
        "{} of the owner {owner} (heartbeat {:?}), {new} took over",
        if kill { "kill -9" } else { "link cut" },
        timing.lan
    );
    assert_never_two(&what, &s);
    println!("{what}: outage {} ms", outage(&s, ip, fault).as_millis());
    let old_mac = tb.lab.mac(&owner).unwrap();
    let last = s.of(ip).rounds.iter().rev().find(|r| !r.macs.is_empty());
    assert!(
        last.is_some_and(|r| !r.macs.contains(&old_mac)),
        "the last answer is not from the old owner"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lan_kill_9_of_the_owner_moves_the_vip_and_never_two_answer() {
    hard_failover(Timing::LAN, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lan_fast_profile_link_cut_of_the_owner_moves_the_vip_and_never_two_answer() {
    hard_failover(Timing::LAN_FAST, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lan_an_api_server_black_holed_for_everyone_for_60_s_costs_no_answer() {
    no_outage_no_move("API server black-holed for 60 s", async |tb, _| {
        tb.api_fault(json!({"action": "blackhole"}));
        tokio::time::sleep(Duration::from_secs(60)).await;
        tb.clear_api_faults();
    })
    .await;
}

/// SIGSTOP of the owner for 5 s, then SIGCONT: another node answers within the failover
/// bound, and the old owner never answers again after resuming.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lan_a_frozen_owner_is_replaced_and_stays_silent_after_resuming() {
    let (tb, ip, owner) = settled(Timing::LAN).await;
    let sampler = tb.sample(&[ip]);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let fault = sampler.now();
    let p = tb.speaker(&owner);
    p.signal(Signal::SIGSTOP).unwrap();
    let new = lan_owner(&tb, ip, Some(&owner)).await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    p.signal(Signal::SIGCONT).unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let s = sampler.stop().unwrap();
    let what = format!("SIGSTOP of {owner} for 5 s, {new} took over");
    assert_never_two(&what, &s);
    println!("{what}: outage {} ms", outage(&s, ip, fault).as_millis());
    let old_mac = tb.lab.mac(&owner).unwrap();
    let resumed = s
        .of(ip)
        .rounds
        .iter()
        .filter(|r| r.at > fault + Duration::from_secs(5));
    for r in resumed {
        assert!(
            !r.macs.contains(&old_mac),
            "the old owner answered after resuming: {r:?}"
        );
    }
}

/// Samples the VIP around `fault` (after settling), returns the samples, when the fault
/// started, and the Lease's transitions before and after.
async fn around<F: AsyncFnOnce(&Testbed, &str)>(
    tb: &Testbed,
    ip: IpAddr,
    owner: &str,
    fault: F,
) -> (AllSamples, Duration, i32, i32) {
    let before = tb.transitions(ip).await;
    let sampler = tb.sample(&[ip]);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let at = sampler.now();
    fault(tb, owner).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let s = sampler.stop().unwrap();
    (s, at, before, tb.transitions(ip).await)
}

/// A row whose expected result is "no outage, no move".
async fn no_outage_no_move<F: AsyncFnOnce(&Testbed, &str)>(what: &str, fault: F) {
    let (tb, ip, owner) = settled(Timing::LAN).await;
    let (s, at, before, after) = around(&tb, ip, &owner, fault).await;
    assert_never_two(what, &s);
    let worst = outage(&s, ip, at);
    println!("{what}: longest ARP silence {} ms", worst.as_millis());
    assert!(
        worst < Duration::from_millis(50),
        "{what}: silent for {worst:?}"
    );
    assert_eq!(after, before, "{what}: the VIP moved");
    assert_eq!(tb.host_of(&tb.holder(ip).await.unwrap()), owner);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lan_an_api_server_frozen_for_everyone_for_60_s_costs_no_answer() {
    no_outage_no_move(
        "API server frozen (replies held) for 60 s",
        async |tb, _| {
            tb.api_fault(json!({"action": "delay", "ms": 60_000, "phase": "before"}));
            tokio::time::sleep(Duration::from_secs(60)).await;
            tb.clear_api_faults();
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lan_an_api_server_refusing_everyone_for_60_s_costs_no_answer() {
    no_outage_no_move("API server refusing (503) for 60 s", async |tb, _| {
        tb.api_fault(json!({"action": "fail", "code": 503}));
        tokio::time::sleep(Duration::from_secs(60)).await;
        tb.clear_api_faults();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lan_the_owner_cut_from_the_api_for_60_s_keeps_answering() {
    no_outage_no_move("owner cut from the API only, 60 s", async |tb, owner| {
        tb.lab.isolate_from_api(owner).unwrap();
        tokio::time::sleep(Duration::from_secs(60)).await;
        tb.lab.heal_api(owner).unwrap();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lan_every_api_reply_delayed_1_s_costs_nothing() {
    no_outage_no_move("every API reply delayed 1 s, 20 s", async |tb, _| {
        tb.api_fault(json!({"action": "delay", "ms": 1000, "phase": "after"}));
        tokio::time::sleep(Duration::from_secs(20)).await;
        tb.clear_api_faults();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lan_heartbeats_lost_between_the_owner_and_one_candidate_move_nothing() {
    no_outage_no_move(
        "heartbeats between the owner and one candidate lost both ways, 10 s",
        async |tb, owner| {
            let other = tb.node_names().into_iter().find(|n| n != owner).unwrap();
            tb.lab.drop_heartbeats(owner, Some(&other)).unwrap();
            tb.lab.drop_heartbeats(&other, Some(owner)).unwrap();
            tokio::time::sleep(Duration::from_secs(10)).await;
            tb.lab.pass_heartbeats(owner, Some(&other)).unwrap();
            tb.lab.pass_heartbeats(&other, Some(owner)).unwrap();
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lan_forged_heartbeats_from_another_host_move_nothing() {
    no_outage_no_move(
        "forged heartbeats from the client, 5 s",
        async |tb, owner| {
            // Frames naming the other nodes and the owner, in new generations, declaring the
            // owner dead: signed with a key the attacker made up.
            let ns = tb.lab.client().ns.clone();
            let names: Vec<String> = tb
                .node_names()
                .iter()
                .map(|h| tb.lab.host(h).unwrap().node_name())
                .collect();
            let target = tb.lab.host(owner).unwrap().node_name();
            l2speaker_e2e::lab::netns::run_in(&ns, move || {
                use l2speaker::liveness::wire::{self, Heartbeat, Key};
                let s = std::net::UdpSocket::bind(("0.0.0.0", 0)).unwrap();
                s.set_broadcast(true).unwrap();
                let key = Key::new(b"a key the attacker made up itself");
                let t0 = std::time::Instant::now();
                while t0.elapsed() < Duration::from_secs(5) {
                    for n in &names {
                        let seq = std::time::SystemTime::now()
                            .duration_since(std::time::UNIX_EPOCH)
                            .unwrap()
                            .as_micros() as u64;
                        let hb = Heartbeat {
                            node: n.clone(),
                            seq,
                            generation: 1000,
                            interval_ms: 100,
                            acks: vec![],
                            dead: vec![(wire::node_id(&target), 1000)],
                        };
                        let (f, _) = wire::encode(&hb, std::slice::from_ref(&key));
                        s.send_to(&f, ("192.0.2.255", l2speaker::liveness::DEFAULT_PORT))
                            .unwrap();
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
            })
            .unwrap();
        },
    )
    .await;
}

/// The owner's heartbeats stop getting out (a firewall on its output), while it hears the
/// others: the others declare it dead and take over; it stops answering before they do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lan_an_owner_whose_heartbeats_do_not_get_out_is_replaced_and_never_two_answer() {
    let (tb, ip, owner) = settled(Timing::LAN).await;
    let (s, at, before, after) = around(&tb, ip, &owner, async |tb, owner| {
        tb.lab.drop_heartbeats(owner, None).unwrap();
        let _ = lan_owner(tb, ip, Some(owner)).await;
        tokio::time::sleep(Duration::from_secs(3)).await;
        tb.lab.pass_heartbeats(owner, None).unwrap();
    })
    .await;
    let what = "the owner's outgoing heartbeats lost";
    assert_never_two(what, &s);
    assert!(after > before, "{what}: the VIP moved");
    println!("{what}: outage {} ms", outage(&s, ip, at).as_millis());
}

/// The owner's speaker is killed while the API server is down: nothing can move until the
/// API server is back (a take-over needs a write), then the VIP moves within the failover
/// bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lan_an_owner_that_dies_during_an_api_outage_is_replaced_once_the_api_is_back() {
    let (tb, ip, owner) = settled(Timing::LAN).await;
    let sampler = tb.sample(&[ip]);
    tb.api_fault(json!({"action": "hang"}));
    tokio::time::sleep(Duration::from_secs(1)).await;
    tb.speaker(&owner).kill();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let back = sampler.now();
    tb.clear_api_faults();
    let new = lan_owner(&tb, ip, Some(&owner)).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let s = sampler.stop().unwrap();
    let what = format!("owner {owner} killed during an API outage, {new} took over after it");
    assert_never_two(&what, &s);
    let first = s
        .of(ip)
        .rounds
        .iter()
        .find(|r| r.at > back && !r.macs.is_empty())
        .map(|r| r.at - back);
    println!("{what}: answered again {first:?} after the API server came back");
}

/// Planned moves: a graceful stop (SIGTERM) and a drill step-down never have two nodes
/// answering; their outage is printed (the goal, 100 ms, is measured by `l2s-bench`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lan_a_graceful_stop_and_a_drill_hand_over_with_one_answering_node() {
    let (tb, ip, owner) = settled(Timing::LAN).await;
    let (s, at, _, _) = around(&tb, ip, &owner, async |tb, owner| {
        tb.speaker(owner).signal(Signal::SIGTERM).unwrap();
        let _ = lan_owner(tb, ip, Some(owner)).await;
    })
    .await;
    assert_never_two("graceful stop", &s);
    let stop = outage(&s, ip, at);
    // Printed, not asserted: the goal (100 ms) is a benchmark number (`l2s-bench`), and
    // under a loaded test run this sits right at it.
    println!("graceful stop: outage {} ms", stop.as_millis());
    let (ok, out) = tb.l2speaker(
        "client",
        &["drill", "web", "--count", "3"],
        Duration::from_secs(60),
    );
    println!("{out}");
    assert!(ok, "the drill ran: {out}");
}

/// SIGSTOP of the owner for 1 s (shorter than any address lifetime): it may keep the VIP or
/// lose it, but it never answers beside another node, and after resuming it answers only
/// once it has moved to a new generation through the API.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lan_an_owner_frozen_for_1_s_never_answers_beside_another_node() {
    let (tb, ip, owner) = settled(Timing::LAN).await;
    let (s, at, _, _) = around(&tb, ip, &owner, async |tb, owner| {
        let p = tb.speaker(owner);
        p.signal(Signal::SIGSTOP).unwrap();
        tokio::time::sleep(Duration::from_secs(1)).await;
        p.signal(Signal::SIGCONT).unwrap();
        let _ = lan_owner(tb, ip, None).await;
    })
    .await;
    assert_never_two("owner frozen 1 s", &s);
    println!(
        "owner frozen 1 s: outage {} ms",
        outage(&s, ip, at).as_millis()
    );
}

/// A node with one of the Service's two pods dies (its link is cut; it is not the owner):
/// once a majority has declared its speaker dead on the LAN, the owner's DNAT sends no
/// connection to that node's pod — every request succeeds, long before Kubernetes would mark
/// the pod not ready (the lab's EndpointSlices keep it ready throughout, as they would for
/// 40 s or more).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lan_a_dead_nodes_endpoints_leave_the_dnat_at_once() {
    let (tb, ip, owner) = settled(Timing::LAN).await;
    let victim = ["n1", "n2"].into_iter().find(|n| *n != owner).unwrap();
    let vip = SocketAddr::new(ip, 80);
    let pod_of = |answer: &str| answer.split_whitespace().next().unwrap_or("").to_string();
    let victim_pod = tb
        .lab
        .pods()
        .find(|p| p.node == victim)
        .unwrap()
        .name
        .clone();
    // Before: connections are spread over both pods.
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..40 {
        if let Ok(a) = tb.lab.connect("client", vip) {
            seen.insert(pod_of(&a));
        }
    }
    assert!(
        seen.contains(&victim_pod),
        "both pods serve before: {seen:?}"
    );
    tb.lab.cut_link(victim).unwrap();
    // Declared dead within the dead-after time and one heartbeat; then every request works.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut failed = 0;
    for _ in 0..60 {
        match tb.lab.connect("client", vip) {
            Ok(a) => assert_ne!(pod_of(&a), victim_pod, "a connection went to the dead node"),
            Err(_) => failed += 1,
        }
    }
    println!("after {victim} died: {failed} of 60 requests failed");
    assert_eq!(
        failed, 0,
        "requests failed after the dead node was declared"
    );
    tb.lab.heal_link(victim).unwrap();
}

/// A rolling upgrade from the previous release (VIP Leases renewed per IP): n3 runs the
/// previous release's speaker, n1 and n2 this one, with six Services spread over all three.
/// - The old speaker never takes a Lease the new ones keep without renewing it (held for
///   several of its lease durations, and when their holder dies).
/// - A new speaker killed: its VIPs go to the other new one (the old one is no member).
/// - The old speaker stopped and replaced by a new one, the killed one restarted: every VIP
///   is owned again. At no sample do two nodes answer for any VIP.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lan_a_rolling_upgrade_from_the_previous_release_never_has_two_owners() {
    let previous = l2speaker_e2e::testbed::previous_speaker_bin();
    let tb = Testbed::without_speakers(vec![1, 1, 0], Timing::LAN).await;
    // The old speaker first, with two Services (so it owns both), then the new ones and
    // four more Services (the old one holds its fair share already).
    tb.start_previous_speaker("n3", &previous);
    let mut ips = Vec::new();
    for i in 0..6 {
        if i == 2 {
            tb.start_speaker("n1");
            tb.start_speaker("n2");
            ready(&tb).await;
        }
        let name = format!("up{i}");
        tb.apply(&endpoints(&name, &pods(&tb))).await;
        tb.apply(&service(&name, "", "")).await;
        ips.push(tb.wait_ips("default", &name, 1).await[0]);
        if i < 2 {
            lan_owner(&tb, ips[i], None).await;
        }
    }
    let owners = async || {
        let mut v = Vec::new();
        for ip in &ips {
            v.push(lan_owner(&tb, *ip, None).await);
        }
        v
    };
    let before = owners().await;
    println!("owners at the start: {before:?}");
    assert!(
        before.iter().any(|o| o == "n3") && before.iter().any(|o| o != "n3"),
        "the old and the new speakers each own VIPs: {before:?}"
    );
    // New members count after they settle.
    tokio::time::sleep(Duration::from_secs(11)).await;
    let sampler = tb.sample(&ips);

    // Three lease durations of the old release: no Lease changes hands.
    tokio::time::sleep(Duration::from_secs(3 * Timing::LAN.lease_seconds)).await;
    assert_eq!(owners().await, before, "an unrenewed Lease was taken over");

    // A new owner dies: its VIPs go to the other new speaker, never to the old one.
    let victim = if before.iter().any(|o| o == "n1") {
        "n1"
    } else {
        "n2"
    };
    let heir = if victim == "n1" { "n2" } else { "n1" };
    tb.speaker(victim).kill();
    for (ip, was) in ips.iter().zip(&before) {
        if was == victim {
            let now = lan_owner(&tb, *ip, Some(victim)).await;
            assert_eq!(now, heir, "{ip} of the killed {victim} went to {now}");
        }
    }

    // The old speaker is upgraded, the killed one restarted.
    tb.speaker("n3").signal(Signal::SIGTERM).unwrap();
    eventually(
        Duration::from_secs(10),
        "the old speaker exits",
        async || tb.speaker("n3").wait_timeout(Duration::ZERO).map(|_| ()),
    )
    .await;
    tb.start_speaker("n3");
    tb.start_speaker(victim);
    let after = owners().await;
    println!("owners after the upgrade: {after:?}");
    tokio::time::sleep(Duration::from_secs(1)).await;
    let s = sampler.stop().unwrap();
    assert_never_two("rolling upgrade from the previous release", &s);
}

/// A UDP port (as DNS would use) through the VIP, on the kernel: a pod answers before a hard
/// failover (the owner's link cut and its speaker killed) and again after it, through the
/// new owner's DNAT. A TCP connection to the same port number gets nothing: the rule is the
/// UDP one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lan_udp_reaches_a_pod_through_the_vip_before_and_after_a_failover() {
    let tb = Testbed::new(vec![1, 1, 0], Timing::LAN).await;
    ready(&tb).await;
    let pods = pods(&tb);
    let names: std::collections::BTreeSet<String> = pods.iter().map(|p| p.name.clone()).collect();
    let slices = dns_endpoints("dns", &pods, "UDP");
    assert!(
        slices.contains("protocol: UDP"),
        "the slices name a UDP port"
    );
    tb.apply(&slices).await;
    tb.apply(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: dns\n  namespace: default\nspec:\n  type: LoadBalancer\n  selector: {app: dns}\n  ports:\n  - {name: dns, port: 53, targetPort: 8080, protocol: UDP}\n",
    )
    .await;
    let ip = tb.wait_ips("default", "dns", 1).await[0];
    let owner = lan_owner(&tb, ip, None).await;
    let vip = SocketAddr::new(ip, 53);
    let ask = async |what: &str| {
        eventually(Duration::from_secs(10), what, async || {
            let reply = tb.lab.udp_exchange("client", vip).ok()??;
            let pod = reply.split_whitespace().next()?.to_string();
            names.contains(&pod).then_some(pod)
        })
        .await
    };
    let before = ask("a pod answering UDP through the VIP").await;
    assert!(
        !tb.lab.can_connect("client", vip).unwrap(),
        "TCP to {vip} is not forwarded: only the UDP port is"
    );
    // New members count for take-overs after 10 s.
    tokio::time::sleep(Duration::from_secs(10)).await;
    let cut = std::time::Instant::now();
    tb.lab.cut_link(&owner).unwrap();
    tb.speaker(&owner).kill();
    let new = lan_owner(&tb, ip, Some(&owner)).await;
    let after = ask("a pod answering UDP through the VIP after the failover").await;
    println!(
        "UDP {vip}: {before} answered via {owner}; after the failover to {new}, {after} answered ({} ms after the cut)",
        cut.elapsed().as_millis()
    );
}

// ---- the kernel shared with firewalls and network managers ------------------------------

/// Runs `nft flush ruleset` on `hosts` at once (a firewall reload everywhere).
fn flush_ruleset(tb: &Testbed, hosts: &[String]) {
    let mut children: Vec<std::process::Child> = hosts
        .iter()
        .map(|h| {
            let ns = tb.lab.host(h).unwrap().ns.clone();
            let mut c = l2speaker_e2e::lab::netns::command_in(&ns, "nft").unwrap();
            c.args(["flush", "ruleset"]);
            c.spawn().unwrap()
        })
        .collect();
    for c in &mut children {
        assert!(c.wait().unwrap().success(), "nft flush ruleset");
    }
}

fn gate_table(tb: &Testbed, host: &str) -> Option<String> {
    let ns = tb.lab.host(host).unwrap().ns.clone();
    l2speaker_e2e::lab::netns::exec(
        &ns,
        "nft",
        &["list", "table", "netdev", l2speaker::dataplane::gate::TABLE],
        None,
    )
    .ok()
}

/// Both of the speaker's tables are back on `host`, the DNAT one with `ip` in it.
async fn tables_back(tb: &Testbed, host: &str, ip: IpAddr) {
    eventually(
        Duration::from_secs(5),
        "the speaker's tables are back",
        async || {
            (tb.rules(host).contains(&ip.to_string()) && gate_table(tb, host).is_some())
                .then_some(())
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lan_a_firewall_reload_on_the_owner_is_healed_and_never_two_answer() {
    let (tb, ip, owner) = settled(Timing::LAN).await;
    let prober = tb.probe(ip).unwrap();
    let fault = std::sync::Mutex::new(Duration::ZERO);
    let (s, _, before, after) = around(&tb, ip, &owner, async |tb: &Testbed, owner: &str| {
        *fault.lock().unwrap() = prober.now();
        flush_ruleset(tb, &[owner.to_string()]);
    })
    .await;
    let fault = *fault.lock().unwrap();
    prober
        .wait_for(Duration::from_secs(10), "answers after the flush", |t| {
            t.successes_after(fault) >= 20
        })
        .unwrap();
    let t = prober.stop();
    let outage = t.outage_after(fault);
    println!(
        "flush ruleset on the owner: client outage {} ms",
        outage.as_millis()
    );
    assert_never_two("flush ruleset on the owner", &s);
    tables_back(&tb, &owner, ip).await;
    assert!(
        outage < Duration::from_secs(1),
        "the Service answered again only after {outage:?}"
    );
    assert_eq!(after, before, "the VIP moved");
    assert_eq!(tb.host_of(&tb.holder(ip).await.unwrap()), owner);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lan_a_firewall_reload_on_every_node_at_once_moves_nothing() {
    let (tb, ip, owner) = settled(Timing::LAN).await;
    let hosts: Vec<String> = tb.lab.nodes().map(|h| h.name.clone()).collect();
    let (s, _, before, after) = around(&tb, ip, &owner, async |tb: &Testbed, _: &str| {
        flush_ruleset(tb, &hosts);
    })
    .await;
    assert_never_two("flush ruleset on every node", &s);
    tables_back(&tb, &owner, ip).await;
    assert_eq!(after, before, "the VIP moved");
    assert_eq!(tb.host_of(&tb.holder(ip).await.unwrap()), owner);
    assert_served(&tb, ip, "served after the flush");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lan_a_vip_address_removed_by_someone_else_is_bound_again() {
    let (tb, ip, owner) = settled(Timing::LAN).await;
    let ns = tb.lab.host(&owner).unwrap().ns.clone();
    let client = tb.lab.client().ns.clone();
    use l2speaker_e2e::lab::netns;
    netns::ip(&ns, &["addr", "del", &format!("{ip}/32"), "dev", "eth0"]).unwrap();
    // A client that has not talked to the VIP yet: it must ask ARP, so only a bound
    // address (or nothing) answers it.
    netns::ip(&client, &["neigh", "flush", "dev", "eth0"]).unwrap();
    let t0 = std::time::Instant::now();
    let served = eventually(Duration::from_secs(10), "served again", async || {
        let c = client.clone();
        tokio::task::spawn_blocking(move || {
            l2speaker_e2e::lab::connect_from(
                &c,
                SocketAddr::new(ip, 80),
                Duration::from_millis(100),
            )
        })
        .await
        .unwrap()
        .ok()
    })
    .await;
    let took = t0.elapsed();
    println!(
        "ip addr del of the VIP: a new client served after {} ms ({served})",
        took.as_millis()
    );
    assert!(
        netns::ip(&ns, &["-br", "addr", "show", "dev", "eth0"])
            .unwrap()
            .contains(&ip.to_string()),
        "bound again on the owner"
    );
    assert!(
        took < Duration::from_secs(2),
        "served again only after {took:?}"
    );
    assert_eq!(tb.host_of(&tb.holder(ip).await.unwrap()), owner);
}

/// `nft flush ruleset; kill -9` of the owner's speaker, as one command would: another node
/// serves the VIP within the failover bound, and at no sample do two nodes answer (the
/// dead speaker's gate is an owned, persistent table: the flush passed it by, and its
/// timeout closed it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lan_a_flush_then_kill_9_of_the_owner_fails_over_and_never_two_answer() {
    let (tb, ip, owner) = settled(Timing::LAN).await;
    let sampler = tb.sample(&[ip]);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let fault = sampler.now();
    flush_ruleset(&tb, std::slice::from_ref(&owner));
    tb.speaker(&owner).kill();
    let new = lan_owner(&tb, ip, Some(&owner)).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let s = sampler.stop().unwrap();
    let what = format!("flush ruleset; kill -9 of the owner {owner}, {new} took over");
    assert_never_two(&what, &s);
    let worst = outage(&s, ip, fault);
    println!("{what}: outage {} ms", worst.as_millis());
    assert!(
        worst < Duration::from_secs(2),
        "{what}: silent for {worst:?}"
    );
    assert_served(&tb, ip, "served after the take-over");
}

/// `kill -9` of the owner's speaker, the VIP taken over, then `nft flush ruleset` on the
/// dead node, right away. The flush removes the dead speaker's gate (an orphaned table is an
/// ordinary one), so its node may answer beside the new owner — but only until its VIP
/// address expires: the lifetime the keeper kept short, plus the kernel's second, plus the
/// one refresh interval it may have been extended just before the kill. After that the dead
/// node answers nothing, and the address is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lan_a_flush_on_a_dead_node_reopens_it_only_until_its_address_expires() {
    let (tb, ip, owner) = settled(Timing::LAN).await;
    // A live owner keeps its short-lived address: longer than a lifetime and the kernel's
    // second later, it is still there, with a lifetime of at most LAN_ADDRESS_LIFETIME.
    tokio::time::sleep(l2speaker::ownership::timing::LAN_ADDRESS_LIFETIME + Duration::from_secs(1))
        .await;
    let ns = tb.lab.host(&owner).unwrap().ns.clone();
    let shown = l2speaker_e2e::lab::netns::ip(&ns, &["-o", "addr", "show", "dev", "eth0"]).unwrap();
    let line = shown
        .lines()
        .find(|l| l.contains(&format!(" {ip}/")))
        .unwrap_or_else(|| panic!("a live owner lost its VIP address: {shown}"));
    let valid: u64 = line
        .split_whitespace()
        .skip_while(|w| *w != "valid_lft")
        .nth(1)
        .and_then(|w| w.strip_suffix("sec"))
        .and_then(|w| w.parse().ok())
        .unwrap_or_else(|| panic!("no finite lifetime on the VIP address: {line}"));
    assert!(
        valid <= l2speaker::ownership::timing::LAN_ADDRESS_LIFETIME.as_secs(),
        "the VIP address lives {valid} s: {line}"
    );
    let sampler = tb.sample(&[ip]);
    let killed = sampler.now();
    tb.speaker(&owner).kill();
    let new = lan_owner(&tb, ip, Some(&owner)).await;
    flush_ruleset(&tb, std::slice::from_ref(&owner));
    let flushed = sampler.now();
    let bound = l2speaker::ownership::timing::LAN_ADDRESS_LIFETIME
        + l2speaker::ownership::timing::LAN_ADDRESS_REFRESH
        + Duration::from_secs(1);
    eventually(
        Duration::from_secs(10),
        "the dead node's address expired",
        async || (!tb.bound_on(ip).contains(&owner)).then_some(()),
    )
    .await;
    let expired = sampler.now();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let s = sampler.stop().unwrap();
    let old_mac = tb.lab.mac(&owner).unwrap();
    let dead_answers: Vec<Duration> = s
        .of(ip)
        .rounds
        .iter()
        .filter(|r| r.macs.contains(&old_mac))
        .map(|r| r.at)
        .collect();
    let last = dead_answers.iter().max().copied();
    println!(
        "flush ruleset on {owner} {} ms after its speaker died ({new} took over): its address \
         expired {} ms after the kill; it answered in {} rounds, the last {} ms after the kill \
         (bound {} ms)",
        (flushed - killed).as_millis(),
        (expired - killed).as_millis(),
        dead_answers.len(),
        last.map_or(0, |l| l.saturating_sub(killed).as_millis()),
        bound.as_millis()
    );
    assert!(
        expired - killed <= bound + Duration::from_millis(500),
        "the dead node's VIP address outlived the bound: {:?} after the kill",
        expired - killed
    );
    assert!(
        last.is_none_or(|l| l <= killed + bound + Duration::from_millis(500)),
        "the dead node answered {:?} after the kill",
        last.map(|l| l.saturating_sub(killed))
    );
    assert_served(&tb, ip, &format!("served by {new}"));
}

/// kube-proxy in IPVS mode binds every LoadBalancer IP to `kube-ipvs0` (a dummy, no-ARP link)
/// on every node, and with its `strictARP` sets `arp_ignore=1` and `arp_announce=2`. The
/// Service's IP found there is reported (a Warning Event), not refused: the owner keeps it,
/// and when the owner's speaker is killed another node takes it over; never two answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lan_service_ips_on_kube_ipvs0_of_every_node_are_reported_not_refused() {
    use l2speaker_e2e::lab::netns;
    let (tb, ip, owner) = settled(Timing::LAN).await;
    for h in tb.lab.nodes() {
        netns::sysctl(&h.ns, "net/ipv4/conf/all/arp_ignore", "1").unwrap();
        netns::sysctl(&h.ns, "net/ipv4/conf/all/arp_announce", "2").unwrap();
        // A dummy link where the kernel has the module; else a veth end (its peer in the
        // same namespace) with ARP off: what matters is IFF_NOARP. Left down, as kube-proxy
        // leaves kube-ipvs0: the kernel treats its addresses as local all the same.
        let dummy = netns::ip(&h.ns, &["link", "add", "kube-ipvs0", "type", "dummy"]);
        if dummy.is_err() {
            netns::ip(
                &h.ns,
                &[
                    "link",
                    "add",
                    "kube-ipvs0",
                    "type",
                    "veth",
                    "peer",
                    "name",
                    "l2s-ipvs-peer",
                ],
            )
            .unwrap();
            netns::ip(&h.ns, &["link", "set", "kube-ipvs0", "arp", "off"]).unwrap();
        }
        netns::ip(
            &h.ns,
            &["addr", "add", &format!("{ip}/32"), "dev", "kube-ipvs0"],
        )
        .unwrap();
    }
    let sampler = tb.sample(&[ip]);
    let said = tb.wait_describe_svc("web", "IPOnNoArpLink").await;
    assert!(said.contains("kube-ipvs0"), "{said}");
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        tb.host_of(&tb.holder(ip).await.unwrap()),
        owner,
        "the owner kept the VIP"
    );
    let fault = sampler.now();
    tb.speaker(&owner).kill();
    let new = lan_owner(&tb, ip, Some(&owner)).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let s = sampler.stop().unwrap();
    let what = format!("kube-ipvs0 holding {ip} on every node; {owner} killed, {new} took over");
    assert_never_two(&what, &s);
    println!("{what}: outage {} ms", outage(&s, ip, fault).as_millis());
    assert_served(&tb, ip, &format!("served by {new}"));
}

/// `ip addr flush dev eth0` on the owner, as a network manager reconfiguring the link does:
/// the node's own addresses are gone, so it must not answer for the VIP (the VIP would become
/// its only source address, for its API and heartbeat traffic too). Another node serves the
/// VIP, at no sample do two answer, and at no read does the flushed node hold the VIP without
/// its own address. With its addresses back it takes part again, and nothing moves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lan_ip_addr_flush_on_the_owner_moves_the_vip_and_never_binds_it_alone() {
    use l2speaker_e2e::lab::netns;
    let (tb, ip, owner) = settled(Timing::LAN).await;
    let h = tb.lab.host(&owner).unwrap().clone();
    let sampler = tb.sample(&[ip]);
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Reads the flushed node's eth0 every 10 ms until told to stop: the VIP alone is a failure.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watcher = {
        let (ns, stop, own) = (h.ns.clone(), stop.clone(), h.ipv4.to_string());
        let vip = format!("inet {ip}/");
        std::thread::spawn(move || {
            let mut alone = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                let shown =
                    netns::ip(&ns, &["-o", "addr", "show", "dev", "eth0"]).unwrap_or_default();
                if shown.contains(&vip) && !shown.contains(&format!("inet {own}/")) {
                    alone.push(shown);
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            alone
        })
    };
    let fault = sampler.now();
    netns::ip(&h.ns, &["addr", "flush", "dev", "eth0"]).unwrap();
    let new = lan_owner(&tb, ip, Some(&owner)).await;
    let moved = sampler.now() - fault;
    tokio::time::sleep(Duration::from_secs(2)).await;

    // The addresses back, and the routes to the other nodes' pods that went with them.
    netns::ip(
        &h.ns,
        &["addr", "add", &format!("{}/24", h.ipv4), "dev", "eth0"],
    )
    .unwrap();
    netns::ip(
        &h.ns,
        &[
            "addr",
            "add",
            &format!("{}/64", h.ipv6),
            "dev",
            "eth0",
            "nodad",
        ],
    )
    .unwrap();
    for pod in tb.lab.pods().filter(|p| p.node != owner) {
        let via = tb.lab.host(&pod.node).unwrap();
        netns::ip(
            &h.ns,
            &[
                "route",
                "replace",
                &format!("{}/32", pod.ipv4),
                "via",
                &via.ipv4.to_string(),
            ],
        )
        .unwrap();
        netns::ip(
            &h.ns,
            &[
                "-6",
                "route",
                "replace",
                &format!("{}/128", pod.ipv6),
                "via",
                &via.ipv6.to_string(),
            ],
        )
        .unwrap();
    }
    ready(&tb).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let alone = watcher.join().unwrap();
    let s = sampler.stop().unwrap();
    let what = format!("ip addr flush dev eth0 on the owner {owner}, {new} took over");
    assert_never_two(&what, &s);
    println!(
        "{what}: outage {} ms, moved after {} ms",
        outage(&s, ip, fault).as_millis(),
        moved.as_millis()
    );
    assert!(
        alone.is_empty(),
        "{owner} held the VIP without its own address {} times, first: {:?}",
        alone.len(),
        alone.first()
    );
    assert_eq!(
        tb.host_of(&tb.holder(ip).await.unwrap()),
        new,
        "nothing moved back when {owner}'s addresses returned"
    );
    assert_served(&tb, ip, &format!("served by {new}"));
}

/// `nft delete table` of each of the speaker's tables on the owner, as an admin or a
/// configuration manager cleaning up would: the DNAT table is put back and the Service
/// answers again within a second; the gate is an owned table, which the kernel refuses to
/// let anyone but the speaker delete (on a kernel without owned tables it is put back).
/// Nothing moves, and at no sample do two nodes answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lan_nft_delete_table_of_each_speaker_table_on_the_owner_is_healed_or_refused() {
    use l2speaker_e2e::lab::netns;
    let (tb, ip, owner) = settled(Timing::LAN).await;
    let ns = tb.lab.host(&owner).unwrap().ns.clone();
    let prober = tb.probe(ip).unwrap();
    let before = tb.transitions(ip).await;
    let sampler = tb.sample(&[ip]);
    tokio::time::sleep(Duration::from_millis(300)).await;

    let fault = prober.now();
    netns::exec(
        &ns,
        "nft",
        &["delete", "table", "inet", l2speaker::dataplane::nft::TABLE],
        None,
    )
    .expect("an ordinary table can be deleted");
    prober
        .wait_for(
            Duration::from_secs(10),
            "answers after the DNAT table was deleted",
            |t| t.successes_after(fault) >= 20,
        )
        .unwrap();
    tables_back(&tb, &owner, ip).await;

    let gate = netns::exec(
        &ns,
        "nft",
        &[
            "delete",
            "table",
            "netdev",
            l2speaker::dataplane::gate::TABLE,
        ],
        None,
    );
    match &gate {
        Err(e) => assert!(
            e.to_string().contains("Operation not permitted"),
            "deleting the gate failed for another reason: {e}"
        ),
        Ok(_) => println!("this kernel let the gate table be deleted: it must come back"),
    }
    tables_back(&tb, &owner, ip).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let t = prober.stop();
    let s = sampler.stop().unwrap();
    let worst = t.outage_after(fault);
    println!(
        "nft delete table inet {}: client outage {} ms; nft delete table netdev {}: {}",
        l2speaker::dataplane::nft::TABLE,
        worst.as_millis(),
        l2speaker::dataplane::gate::TABLE,
        match &gate {
            Err(_) => "refused (owned table)",
            Ok(_) => "deleted and put back",
        }
    );
    assert_never_two("nft delete table of each table on the owner", &s);
    assert!(
        worst < Duration::from_secs(1),
        "the Service answered again only after {worst:?}"
    );
    assert_eq!(tb.transitions(ip).await, before, "the VIP moved");
    assert_eq!(tb.host_of(&tb.holder(ip).await.unwrap()), owner);
}

/// The owner's LAN interface deleted (a VLAN or a bridge being rebuilt): a withdrawal and a
/// failover, not a repair; another node serves the VIP and at no sample do two answer. The
/// interface made again (a new index and MAC) takes part again: the node publishes its
/// subnet, nothing moves back, and when the new owner's link is cut the VIP moves once more
/// with never two answering.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lan_the_owners_interface_deleted_and_made_again_fails_over_and_takes_part_again() {
    let (tb, ip, owner) = settled(Timing::LAN).await;
    let sampler = tb.sample(&[ip]);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let fault = sampler.now();
    tb.lab.delete_link(&owner).unwrap();
    let new = lan_owner(&tb, ip, Some(&owner)).await;
    let moved = sampler.now() - fault;
    tokio::time::sleep(Duration::from_secs(1)).await;
    tb.lab.recreate_link(&owner).unwrap();
    ready(&tb).await;
    let node = tb.lab.host(&owner).unwrap().node_name();
    // Its node Lease names the new interface's MAC and the LAN subnet again.
    let mac = tb.lab.mac(&owner).unwrap();
    let leases: kube::Api<k8s_openapi::api::coordination::v1::Lease> =
        kube::Api::namespaced(tb.client.clone(), l2speaker_e2e::testbed::NAMESPACE);
    eventually(
        Duration::from_secs(10),
        &format!("{node} publishes its new MAC {mac} and its LAN subnet"),
        async || {
            let lease = leases
                .get_opt(&l2speaker::node_lease::name(&node))
                .await
                .ok()??;
            let subnets = l2speaker::node_lease::subnets(&lease)?;
            (l2speaker::node_lease::macs(&lease).contains(&mac)
                && subnets.iter().any(|n| n.to_string() == "192.0.2.0/24"))
            .then_some(())
        },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        tb.host_of(&tb.holder(ip).await.unwrap()),
        new,
        "nothing moved back when {owner}'s interface returned"
    );
    assert_served(
        &tb,
        ip,
        &format!("served by {new} after {owner}'s link returned"),
    );
    let cut = sampler.now();
    tb.lab.cut_link(&new).unwrap();
    let third = lan_owner(&tb, ip, Some(&new)).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let s = sampler.stop().unwrap();
    let what = format!(
        "eth0 of the owner {owner} deleted ({new} took over), made again, then {new}'s link cut ({third} took over)"
    );
    assert_never_two(&what, &s);
    println!(
        "{what}: moved after {} ms, outage {} ms; after the cut, outage {} ms",
        moved.as_millis(),
        s.of(ip).longest_silence_between(fault, cut).as_millis(),
        outage(&s, ip, cut).as_millis()
    );
    assert_served(&tb, ip, &format!("served by {third}"));
}

/// Lease mode (no gate: the Lease bounds the VIP address's lifetime). `nft flush ruleset` on
/// the owner, then on every node at once, puts the DNAT table back within a second and moves
/// nothing; then `nft flush ruleset; kill -9` of the owner's speaker moves the VIP within the
/// lease plus a second. At no sample do two nodes answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_mode_firewall_reloads_move_nothing_and_a_flush_then_kill_9_fails_over() {
    let tb = Testbed::new(vec![1, 1, 0], Timing::DEFAULT).await;
    ready(&tb).await;
    let (ip, owner) = web(&tb).await;
    let dnat_back = async |host: &str| {
        eventually(
            Duration::from_secs(5),
            "the DNAT table is back",
            async || tb.rules(host).contains(&ip.to_string()).then_some(()),
        )
        .await
    };
    let prober = tb.probe(ip).unwrap();
    let before = tb.transitions(ip).await;
    let sampler = tb.sample(&[ip]);
    tokio::time::sleep(Duration::from_millis(300)).await;

    let fault = prober.now();
    flush_ruleset(&tb, std::slice::from_ref(&owner));
    prober
        .wait_for(Duration::from_secs(10), "answers after the flush", |t| {
            t.successes_after(fault) >= 20
        })
        .unwrap();
    dnat_back(&owner).await;
    let everywhere = prober.now();
    let hosts: Vec<String> = tb.lab.nodes().map(|h| h.name.clone()).collect();
    flush_ruleset(&tb, &hosts);
    prober
        .wait_for(
            Duration::from_secs(10),
            "answers after the flush everywhere",
            |t| t.successes_after(everywhere) >= 20,
        )
        .unwrap();
    dnat_back(&owner).await;
    let t = prober.stop();
    let (on_owner, on_all) = (t.outage_after(fault), t.outage_after(everywhere));
    println!(
        "lease mode: flush ruleset on the owner: client outage {} ms; on every node: {} ms",
        on_owner.as_millis(),
        on_all.as_millis()
    );
    assert!(
        on_owner < Duration::from_secs(1) && on_all < Duration::from_secs(1),
        "the Service answered again only after {on_owner:?} / {on_all:?}"
    );
    assert_eq!(tb.transitions(ip).await, before, "a flush moved the VIP");

    let killed = sampler.now();
    flush_ruleset(&tb, std::slice::from_ref(&owner));
    tb.speaker(&owner).kill();
    let new = lan_owner(&tb, ip, Some(&owner)).await;
    let took = sampler.now() - killed;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let s = sampler.stop().unwrap();
    let what = format!("lease mode: flush ruleset; kill -9 of the owner {owner}, {new} took over");
    assert_never_two(&what, &s);
    println!(
        "{what} after {} ms, outage {} ms",
        took.as_millis(),
        outage(&s, ip, killed).as_millis()
    );
    let lease = Duration::from_secs(tb.timing.lease_seconds);
    assert!(
        took <= lease + Duration::from_secs(1),
        "{what}: only after {took:?}"
    );
    assert_served(&tb, ip, &format!("served by {new}"));
}
