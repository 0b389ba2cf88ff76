//! LAN mode in the lab (needs root): speakers started with `--liveness lan`, faults from the
//! fault table, a sampler on the client's segment asking ARP for the VIP every 5 ms and
//! counting every reply to each request. At no sample may two nodes answer.
//!
//! (In LAN mode an address may stay bound on a node whose gate is closed — a killed
//! speaker's, until the speaker restarts — so the check is on what answers, not on what is
//! bound.)

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use l2speaker_e2e::lab::Pod;
use l2speaker_e2e::lab::sampler::AllSamples;
use l2speaker_e2e::testbed::{Testbed, Timing, endpoints, eventually, service};
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
        assert!(one.answered() > 0, "{ip}: the sampler saw answers");
    }
}

/// The longest run of unanswered rounds after `from` (the outage a client sees).
fn outage(s: &AllSamples, ip: IpAddr, from: Duration) -> Duration {
    s.of(ip).longest_silence_after(from)
}

async fn hard_failover(timing: Timing, kill: bool) {
    let tb = Testbed::new(vec![1, 1, 0], timing).await;
    ready(&tb).await;
    let (ip, owner) = web(&tb).await;
    // Past the settle time of new members, so every node counts.
    tokio::time::sleep(Duration::from_secs(10)).await;
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

/// The API server stops answering everyone (requests hang) for 20 s: the owner keeps
/// answering throughout, and nothing moves, then or when it comes back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lan_an_api_server_that_hangs_for_everyone_costs_no_answer_and_moves_nothing() {
    let tb = Testbed::new(vec![1, 1, 0], Timing::LAN).await;
    ready(&tb).await;
    let (ip, owner) = web(&tb).await;
    tokio::time::sleep(Duration::from_secs(10)).await;
    let transitions = tb
        .lease(ip)
        .await
        .and_then(|l| l.spec?.lease_transitions)
        .unwrap_or(0);
    let sampler = tb.sample(&[ip]);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let fault = sampler.now();
    tb.api_fault(json!({"action": "hang"}));
    tokio::time::sleep(Duration::from_secs(20)).await;
    tb.clear_api_faults();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let s = sampler.stop().unwrap();
    assert_never_two("API server hanging for 20 s", &s);
    let worst = outage(&s, ip, fault);
    println!(
        "API server hanging for 20 s: longest ARP silence {} ms",
        worst.as_millis()
    );
    assert!(
        worst < Duration::from_millis(50),
        "the VIP went silent for {worst:?} while the API server hung"
    );
    assert_eq!(tb.host_of(&tb.holder(ip).await.unwrap()), owner);
    let after = tb
        .lease(ip)
        .await
        .and_then(|l| l.spec?.lease_transitions)
        .unwrap_or(0);
    assert_eq!(after, transitions, "nothing moved");
}

/// SIGSTOP of the owner for 5 s, then SIGCONT: another node answers within the failover
/// bound, and the old owner never answers again after resuming.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lan_a_frozen_owner_is_replaced_and_stays_silent_after_resuming() {
    let tb = Testbed::new(vec![1, 1, 0], Timing::LAN).await;
    ready(&tb).await;
    let (ip, owner) = web(&tb).await;
    tokio::time::sleep(Duration::from_secs(10)).await;
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
