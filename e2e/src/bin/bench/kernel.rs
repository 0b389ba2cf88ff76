//! Kernel repair: what someone else removes from the owner's kernel, how long the speaker
//! takes to put it back, and what a client connecting every 10 ms sees meanwhile, at a few
//! Service counts; and the CPU of that speaker while another agent keeps committing nftables
//! transactions to a table of its own.
//!
//! One node (node-1) is the only one eligible for the pool, so it holds every VIP: the
//! faults hit the speaker with the most to repair. The probed Service (IPv4, pods on n1 and
//! n2) is one of them; the others are IPv6 Services without endpoints.

use std::net::IpAddr;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::Api;
use kube::api::PostParams;
use l2speaker_e2e::lab::netns;
use l2speaker_e2e::testbed::{Testbed, Timing, endpoints, eventually, service};
use serde_json::{Value, json};

use super::{stats, usage};

const POOL: &str = "apiVersion: l2speaker.io/v1alpha1
kind: IPPool
metadata:
  name: many
spec:
  addresses: [192.0.2.160/28, 2001:db8::1:0/112]
  autoAssign: false
  nodeSelector: {l2speaker.io/many: \"yes\"}
";

/// How often the kernel is read while waiting for a repair.
const POLL: Duration = Duration::from_millis(5);

pub async fn kernel_repair(counts: &[usize], runs: usize, window: Duration) -> Value {
    let mut out = Vec::new();
    for &n in counts {
        out.push(at(n, runs, window).await);
    }
    json!(out)
}

async fn at(n: usize, runs: usize, window: Duration) -> Value {
    let tb = Testbed::new(vec![1, 1, 0], Timing::LAN).await;
    tb.kubectl
        .run(&["label", "node", "node-1", "l2speaker.io/many=yes"])
        .await
        .ok();
    tb.apply(POOL).await;
    let pods: Vec<_> = tb.lab.pods().cloned().collect();
    tb.apply(&endpoints("web", &pods)).await;
    tb.apply(&service(
        "web",
        "  ipFamilyPolicy: SingleStack\n  ipFamilies: [IPv4]\n",
        "l2speaker.io/pool: many",
    ))
    .await;
    let ip = tb.wait_ips("default", "web", 1).await[0];
    let api: Api<Service> = Api::namespaced(tb.client.clone(), "default");
    let slices: Api<EndpointSlice> = Api::namespaced(tb.client.clone(), "default");
    for i in 1..n {
        // Endpoints too: a VIP port without any has no DNAT chain to repair.
        let docs = endpoints(&format!("s{i}"), &pods);
        for doc in docs.split("---\n").filter(|d| !d.trim().is_empty()) {
            let slice: EndpointSlice = serde_yaml::from_str(doc).unwrap();
            slices.create(&PostParams::default(), &slice).await.unwrap();
        }
        let s: Service = serde_yaml::from_str(&service(
            &format!("s{i}"),
            "  ipFamilyPolicy: SingleStack\n  ipFamilies: [IPv6]\n",
            "l2speaker.io/pool: many",
        ))
        .unwrap();
        api.create(&PostParams::default(), &s).await.unwrap();
    }
    let owner = tb.host_of("node-1");
    let ns = tb.lab.host(&owner).unwrap().ns.clone();
    // Every VIP bound on node-1 and in its DNAT table (one chain per VIP port).
    eventually(
        Duration::from_secs(600),
        &format!("{n} VIPs bound and programmed on node-1"),
        async || (bound(&ns) >= n && chains(&tb, &owner) >= n).then_some(()),
    )
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let want_chains = chains(&tb, &owner);
    let prober = tb.probe(ip).unwrap();
    prober
        .wait_for(Duration::from_secs(30), "the Service answers", |t| {
            t.successes_after(Duration::ZERO) >= 20
        })
        .unwrap();

    let mut faults = serde_json::Map::new();
    let kinds: [(&str, &[&str]); 2] = [
        ("nft flush ruleset", &["flush", "ruleset"]),
        (
            "nft delete table inet l2speaker",
            &["delete", "table", "inet", l2speaker::dataplane::nft::TABLE],
        ),
    ];
    for (what, args) in kinds {
        let (mut repair, mut outage) = (Vec::new(), Vec::new());
        for _ in 0..runs {
            let at = prober.now();
            let t0 = Instant::now();
            netns::exec(&ns, "nft", args, None).expect(what);
            // The table comes back whole in one transaction: one small chain showing is the
            // moment of the repair (listing the whole table every 5 ms would load the cores
            // the speaker needs); the whole table is checked after.
            while !table_back(&ns) {
                assert!(
                    t0.elapsed() < Duration::from_secs(30),
                    "{what}: not repaired"
                );
                std::thread::sleep(POLL);
            }
            repair.push(t0.elapsed().as_millis() as u64);
            assert_eq!(
                chains(&tb, &owner),
                want_chains,
                "{what}: the whole table is back"
            );
            outage.push(served_again(&prober, at, what));
        }
        println!(
            "kernel repair, {n} Services: {what}: repaired p50 {} ms, max {} ms",
            percentile(&repair, 50.0),
            repair.iter().max().unwrap()
        );
        faults.insert(
            what.into(),
            json!({"repair": stats(&repair), "client_outage": stats(&outage)}),
        );
    }

    // `ip addr del` of the probed VIP, and a client that must ask ARP for it again.
    let client = tb.lab.client().ns.clone();
    let (mut repair, mut outage) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        let at = prober.now();
        let t0 = Instant::now();
        netns::ip(&ns, &["addr", "del", &format!("{ip}/32"), "dev", "eth0"]).unwrap();
        netns::ip(&client, &["neigh", "flush", "dev", "eth0"]).unwrap();
        while !has(&ns, ip) {
            assert!(
                t0.elapsed() < Duration::from_secs(30),
                "address not put back"
            );
            std::thread::sleep(POLL);
        }
        repair.push(t0.elapsed().as_millis() as u64);
        outage.push(served_again(&prober, at, "ip addr del"));
    }
    println!(
        "kernel repair, {n} Services: ip addr del of a VIP: repaired p50 {} ms, max {} ms",
        percentile(&repair, 50.0),
        repair.iter().max().unwrap()
    );
    faults.insert(
        "ip addr del of a VIP (client neighbor cache flushed)".into(),
        json!({"repair": stats(&repair), "client_outage": stats(&outage)}),
    );
    drop(prober);

    // CPU of node-1's speaker: idle, then beside an agent committing 10 transactions a second.
    let pid = tb.speaker(&owner).pid;
    let cpu = |during: &dyn Fn()| {
        let (_, c0) = usage(pid);
        let t0 = Instant::now();
        during();
        let secs = t0.elapsed().as_secs_f64();
        let (_, c1) = usage(pid);
        ((c1 - c0) / secs * 1000.0).round() / 10.0
    };
    let idle = cpu(&|| std::thread::sleep(window));
    netns::exec(
        &ns,
        "nft",
        &["add table inet l2s_bench_agent; add set inet l2s_bench_agent s { type inet_service; }"],
        None,
    )
    .unwrap();
    let tx = std::cell::Cell::new(0u64);
    let busy = cpu(&|| {
        let t0 = Instant::now();
        let mut k = 0u32;
        while t0.elapsed() < window {
            let next = t0 + Duration::from_millis(100) * (k + 1);
            let el = format!("add element inet l2s_bench_agent s {{ {} }}", k % 60000);
            if netns::exec(&ns, "nft", &[&el], None).is_ok() {
                tx.set(tx.get() + 1);
            }
            k += 1;
            std::thread::sleep(next.saturating_duration_since(Instant::now()));
        }
    });
    let tx = tx.get();
    let _ = netns::exec(&ns, "nft", &["delete table inet l2s_bench_agent"], None);
    println!(
        "kernel repair, {n} Services: node-1's speaker used {idle} % of a core idle, {busy} % beside an agent committing 10 nft transactions a second"
    );
    json!({
        "services": n,
        "vips_on_node_1": bound(&ns),
        "poll_ms": POLL.as_millis() as u64,
        "faults": faults,
        "cpu_percent": {"idle": idle, "foreign_nft_agent_10_tx_per_s": busy, "transactions": tx, "window_s": window.as_secs()},
    })
}

/// Waits until the prober has 20 successes after `at`; the longest outage it saw since.
fn served_again(prober: &l2speaker_e2e::lab::probe::Prober, at: Duration, what: &str) -> u64 {
    prober
        .wait_for(Duration::from_secs(30), what, |t| {
            t.successes_after(at) >= 20
        })
        .unwrap();
    prober.snapshot().outage_after(at).as_millis() as u64
}

fn percentile(v: &[u64], q: f64) -> u64 {
    let mut s = v.to_vec();
    s.sort_unstable();
    l2speaker::drill::percentile(&s, q)
}

/// The DNAT table's postrouting chain is in the kernel.
fn table_back(ns: &str) -> bool {
    netns::exec(
        ns,
        "nft",
        &[
            "list",
            "chain",
            "inet",
            l2speaker::dataplane::nft::TABLE,
            "postrouting",
        ],
        None,
    )
    .is_ok()
}

/// The speaker's DNAT chains on `host` (one per VIP port, plus one per endpoint).
fn chains(tb: &Testbed, host: &str) -> usize {
    tb.rules(host).matches("\tchain ").count()
}

/// Addresses on the node's eth0 that are host routes (VIPs).
fn bound(ns: &str) -> usize {
    netns::ip(ns, &["-o", "addr", "show", "dev", "eth0"])
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("/32 ") || l.contains("/128 "))
        .count()
}

fn has(ns: &str, ip: IpAddr) -> bool {
    let prefix = if ip.is_ipv4() { 32 } else { 128 };
    netns::ip(ns, &["-o", "addr", "show", "dev", "eth0"])
        .unwrap_or_default()
        .contains(&format!(" {ip}/{prefix} "))
}
