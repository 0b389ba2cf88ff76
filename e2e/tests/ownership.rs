//! Ownership under process and API faults, in the lab (needs root): a sampler on the
//! client's segment asks ARP for every VIP every 5 ms (each request answered only by the
//! nodes that hold the address at that moment) and every node's address list is read over
//! netlink every 5 ms. At no sample may two nodes answer.

use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use l2speaker_e2e::lab::Pod;
use l2speaker_e2e::lab::sampler::AllSamples;
use l2speaker_e2e::testbed::{Testbed, Timing, endpoints, eventually, service};
use nix::sys::signal::Signal;
use serde_json::json;

fn pods(tb: &Testbed) -> Vec<Pod> {
    tb.lab.pods().cloned().collect()
}

async fn web(tb: &Testbed, name: &str) -> (IpAddr, String) {
    tb.apply(&endpoints(name, &pods(tb))).await;
    tb.apply(&service(name, "", "")).await;
    let ip = tb.wait_ips("default", name, 1).await[0];
    let owner = tb.wait_owner(ip).await;
    (ip, owner)
}

fn ipv4_of(tb: &Testbed, host: &str) -> Ipv4Addr {
    tb.lab.host(host).unwrap().ipv4
}

/// Fails with every sample that saw two nodes answering.
fn assert_never_two(what: &str, s: &AllSamples) {
    println!("{what}:\n{}", s.summary());
    let v = s.violations();
    assert!(
        v.is_empty(),
        "{what}: two nodes answered:\n{}",
        v.join("\n")
    );
    for (ip, one) in &s.vips {
        assert!(
            !one.kernels.values().all(Vec::is_empty),
            "{ip}: the kernels were read"
        );
        if ip.is_ipv4() {
            assert!(one.answered() > 0, "{ip}: the sampler saw answers");
        }
    }
}

/// `kill -9` of the owner's speaker while its node stays on the LAN, with ten VIPs on it:
/// the kernel must drop every address (lifetime) before another node may take any over.
async fn killed_owner_with_ten_vips(timing: Timing) {
    let tb = Testbed::without_speakers(vec![1, 1, 0], timing).await;
    tb.start_speaker("n1");
    let mut ips = Vec::new();
    for i in 0..10 {
        let (ip, owner) = web(&tb, &format!("web-{i}")).await;
        assert_eq!(owner, "n1", "the only speaker owns {ip}");
        ips.push(ip);
    }
    tb.start_speaker("n2");
    tb.start_speaker("n3");
    // The newcomers are ready (caches synced) before the fault.
    for n in ["n2", "n3"] {
        let addr = std::net::SocketAddr::new(IpAddr::V4(ipv4_of(&tb, n)), 9473);
        eventually(Duration::from_secs(10), &format!("{n} ready"), async || {
            tb.lab
                .http_get("client", addr, "/readyz")
                .is_ok_and(|(c, _)| c == 200)
                .then_some(())
        })
        .await;
    }
    let sampler = tb.sample(&ips);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let fault = sampler.now();
    tb.speaker("n1").kill();
    for ip in &ips {
        tb.wait_new_owner(*ip, "n1").await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let s = sampler.stop().unwrap();
    assert_never_two(
        &format!(
            "kill -9 of the owner of ten VIPs (lease {} s)",
            timing.lease_seconds
        ),
        &s,
    );
    let worst = ips
        .iter()
        .map(|ip| s.of(*ip).longest_silence_after(fault))
        .max()
        .unwrap();
    println!(
        "worst ARP silence over the ten VIPs: {} ms",
        worst.as_millis()
    );
    let n1_mac = tb.lab.mac("n1").unwrap();
    for ip in &ips {
        assert!(
            !tb.bound_on(*ip).contains(&"n1".to_string()),
            "n1 dropped {ip}"
        );
        let last = s.of(*ip).rounds.iter().rev().find(|r| !r.macs.is_empty());
        assert!(
            last.is_some_and(|r| !r.macs.contains(&n1_mac)),
            "{ip}: the last answer is not from n1"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_owner_with_ten_vips_never_answers_beside_the_new_owners() {
    killed_owner_with_ten_vips(Timing::DEFAULT).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_owner_with_ten_vips_never_answers_beside_the_new_owners_short_profile() {
    killed_owner_with_ten_vips(Timing::SHORT).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_owner_that_resumes_never_answers_beside_the_new_owner() {
    frozen_owner(Timing::DEFAULT).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_owner_that_resumes_never_answers_beside_the_new_owner_short_profile() {
    frozen_owner(Timing::SHORT).await;
}

/// SIGSTOP of the owner's speaker for longer than the lease, then SIGCONT: another node
/// takes over meanwhile, and the resumed speaker never answers again.
async fn frozen_owner(timing: Timing) {
    let tb = Testbed::new(vec![1, 1, 0], timing).await;
    let (ip, owner) = web(&tb, "web").await;
    let sampler = tb.sample(&[ip]);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let old = tb.speaker(&owner);
    old.signal(Signal::SIGSTOP).unwrap();
    let new_owner = tb.wait_new_owner(ip, &owner).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let resumed = sampler.now();
    old.signal(Signal::SIGCONT).unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let s = sampler.stop().unwrap();
    assert_never_two(&format!("{owner} frozen, {new_owner} took over"), &s);
    let old_mac = tb.lab.mac(&owner).unwrap();
    let after: Vec<_> = s
        .of(ip)
        .rounds
        .iter()
        .filter(|r| r.at > resumed && r.macs.contains(&old_mac))
        .collect();
    assert!(after.is_empty(), "the resumed {owner} answered: {after:?}");
    assert_eq!(
        tb.holder(ip).await.as_deref(),
        Some(tb.lab.host(&new_owner).unwrap().node_name().as_str())
    );
}

/// The owner's renewals are served at once but answered just under the renew deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renewals_answered_just_under_the_deadline_never_leave_two_owners() {
    let tb = Testbed::new(vec![1, 1, 0], Timing::DEFAULT).await;
    let (ip, owner) = web(&tb, "web").await;
    let sampler = tb.sample(&[ip]);
    tb.api_fault(json!({
        "method": "PUT", "path": "/leases/vip-", "client": ipv4_of(&tb, &owner).to_string(),
        "action": "delay", "ms": Timing::DEFAULT.deadline_ms - 100, "phase": "after"
    }));
    tokio::time::sleep(Duration::from_secs(10)).await;
    tb.clear_api_faults();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let s = sampler.stop().unwrap();
    assert_never_two("renewals answered 1.9 s late", &s);
    let holder = tb.holder(ip).await;
    println!(
        "holder after: {holder:?}; ARP answered by {:?}",
        s.of(ip).answerers()
    );
}

/// Every Lease write is applied but answered 5 s late (past the 4 s lease): a node whose
/// acquire reply comes after its deadline never binds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_acquire_answered_after_the_lease_never_binds() {
    let tb = Testbed::new(vec![1, 1, 0], Timing::DEFAULT).await;
    let (ip, owner) = web(&tb, "web").await;
    let sampler = tb.sample(&[ip]);
    let started = sampler.now();
    tb.api_fault(json!({
        "method": "PUT", "path": "/leases/vip-", "action": "delay", "ms": 5000, "phase": "after"
    }));
    // The owner cannot renew in time and withdraws at its deadline; from then on nobody
    // may bind, though acquires land in the API.
    eventually(Duration::from_secs(10), "the owner withdrew", async || {
        tb.bound_on(ip).is_empty().then_some(())
    })
    .await;
    let withdrawn = sampler.now();
    tokio::time::sleep(Duration::from_secs(12)).await;
    let lease = tb.lease(ip).await.unwrap();
    let spec = lease.spec.unwrap();
    println!(
        "after 12 s of late replies the Lease names {:?} ({} transitions)",
        spec.holder_identity,
        spec.lease_transitions.unwrap_or(0)
    );
    let fault_over = sampler.now();
    tb.clear_api_faults();
    let new_owner = tb.wait_owner(ip).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let s = sampler.stop().unwrap();
    assert_never_two("lease writes answered after the lease", &s);
    for (node, reads) in &s.of(ip).kernels {
        let late: Vec<_> = reads
            .iter()
            .filter(|r| r.bound && r.at > withdrawn && r.at < fault_over)
            .collect();
        assert!(
            late.is_empty(),
            "{node} bound on a late reply at {:?}",
            late[0].at
        );
    }
    println!(
        "{owner} withdrew {} ms after the fault began; {new_owner} owns after the fault",
        (withdrawn - started).as_millis()
    );
}

/// Event POSTs hang: a failover still completes and the IP stays put (no flap).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hanging_event_post_never_flaps_an_ip() {
    let tb = Testbed::new(vec![1, 1, 0], Timing::DEFAULT).await;
    let (ip, owner) = web(&tb, "web").await;
    tb.api_fault(json!({"method": "POST", "path": "/events", "action": "hang"}));
    let sampler = tb.sample(&[ip]);
    tb.lab.cut_link(&owner).unwrap();
    tb.speaker(&owner).kill();
    let new_owner = tb.wait_new_owner(ip, &owner).await;
    let took = sampler.now();
    let transitions = tb.transitions(ip).await;
    tokio::time::sleep(Duration::from_secs(8)).await;
    let s = sampler.stop().unwrap();
    assert_never_two("failover with hanging Event POSTs", &s);
    let new_mac = tb.lab.mac(&new_owner).unwrap();
    let settled = took + Duration::from_millis(500);
    let rounds: Vec<_> = s.of(ip).rounds.iter().filter(|r| r.at > settled).collect();
    assert!(
        rounds.iter().all(|r| r.macs == [new_mac.clone()]),
        "only {new_owner} answered, every time, after taking over"
    );
    assert_eq!(tb.transitions(ip).await, transitions, "no further moves");
}

/// The owner's carrier goes down while its speaker keeps running: it withdraws on its own
/// (the interface is no longer eligible), another node takes over once the Lease expires,
/// and when the link comes back the old owner does not answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn carrier_loss_withdraws_the_owner_before_another_node_takes_over() {
    let tb = Testbed::new(vec![1, 1, 0], Timing::DEFAULT).await;
    let (ip, owner) = web(&tb, "web").await;
    let sampler = tb.sample(&[ip]);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let cut = sampler.now();
    tb.lab.cut_link(&owner).unwrap();
    let new_owner = tb.wait_new_owner(ip, &owner).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    tb.lab.heal_link(&owner).unwrap();
    let healed = sampler.now();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let s = sampler.stop().unwrap();
    assert_never_two("carrier loss of the owner", &s);
    let one = s.of(ip);
    let unbound = one.kernels[&owner]
        .iter()
        .find(|r| r.at > cut && !r.bound)
        .map(|r| r.at - cut)
        .expect("the old owner unbound");
    let taken = one.kernels[&new_owner]
        .iter()
        .find(|r| r.at > cut && r.bound)
        .map(|r| r.at - cut)
        .expect("the new owner bound");
    println!(
        "{owner} unbound {} ms after losing carrier; {new_owner} bound after {} ms",
        unbound.as_millis(),
        taken.as_millis()
    );
    assert!(unbound < taken);
    let old_mac = tb.lab.mac(&owner).unwrap();
    assert!(
        one.rounds
            .iter()
            .filter(|r| r.at > healed)
            .all(|r| !r.macs.contains(&old_mac)),
        "{owner} does not answer after its link is back"
    );
    assert!(
        speaker_running(&tb, &owner),
        "the speaker kept running through it"
    );
}

fn speaker_running(tb: &Testbed, host: &str) -> bool {
    tb.speaker(host).is_running()
}

/// IPv6: after a hard failover the client's neighbour entry for the VIP moves to the new
/// owner's MAC (an unsolicited NA with Override) and never back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ipv6_failover_moves_the_clients_neighbour_entry_to_the_new_owner() {
    let tb = Testbed::new(vec![1, 1, 0], Timing::DEFAULT).await;
    tb.apply(&endpoints("v6", &pods(&tb))).await;
    tb.apply(&service(
        "v6",
        "  ipFamilies: [IPv6]\n  ipFamilyPolicy: SingleStack\n",
        "",
    ))
    .await;
    let ip = tb.wait_ips("default", "v6", 1).await[0];
    assert!(ip.is_ipv6());
    let owner = tb.wait_owner(ip).await;
    let sampler = tb.sample(&[ip]);
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
    let t = prober.stop();
    let s = sampler.stop().unwrap();
    assert_never_two("IPv6 hard failover", &s);
    let (old_mac, new_mac) = (tb.lab.mac(&owner).unwrap(), tb.lab.mac(&new_owner).unwrap());
    let after: Vec<_> = t.neighbors.iter().filter(|n| n.at > fault).collect();
    println!(
        "outage {} ms; neighbour changes after the fault: {after:?}",
        t.outage_after(fault).as_millis()
    );
    let first_new = after
        .iter()
        .position(|n| n.mac.as_deref() == Some(new_mac.as_str()))
        .expect("the client's entry moved to the new owner");
    assert!(
        after[first_new..]
            .iter()
            .all(|n| n.mac.as_deref() != Some(old_mac.as_str())),
        "the entry never points back at {owner}"
    );
    assert_eq!(
        after.last().and_then(|n| n.mac.clone()),
        Some(new_mac),
        "it ends on {new_owner}"
    );
}

/// `--dnat=false`: the owner binds and announces, and leaves the forwarding to another
/// component (no nft table of ours).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_dnat_the_owner_binds_and_announces_and_installs_no_rules() {
    let tb = Testbed::without_speakers(vec![1, 1, 0], Timing::DEFAULT).await;
    for n in tb.node_names() {
        tb.start_speaker_with(&n, &["--dnat=false"]);
    }
    let (ip, owner) = web(&tb, "web").await;
    let IpAddr::V4(v4) = ip else { panic!("IPv4") };
    assert_eq!(tb.arp_answers(v4), vec![tb.lab.mac(&owner).unwrap()]);
    for n in tb.node_names() {
        assert_eq!(tb.rules(&n), "", "{n} has no l2speaker table");
    }
}

/// A speaker that owns nothing exits promptly on SIGTERM (a rolling update pays this per
/// node); the time is printed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_speaker_that_owns_nothing_exits_promptly_on_sigterm() {
    let tb = Testbed::new(vec![1, 1, 0], Timing::DEFAULT).await;
    let (_ip, owner) = web(&tb, "web").await;
    let idle = tb.node_names().into_iter().find(|n| *n != owner).unwrap();
    let p = tb.speaker(&idle);
    let t0 = std::time::Instant::now();
    p.signal(Signal::SIGTERM).unwrap();
    let status = p
        .wait_timeout(Duration::from_secs(3))
        .expect("exits within 3 s of SIGTERM");
    println!(
        "{idle} (owning nothing) exited {} ms after SIGTERM",
        t0.elapsed().as_millis()
    );
    assert!(status.success(), "{status:?}");
}
