//! `l2s-demo`: l2speaker in a three-node lab, start to finish, as a user would see it.
//! Run it through `sudo ./scripts/demo.sh` (floating IPs from a pool), or
//! `sudo ./scripts/demo.sh --node-ips` (no pool: the nodes' own addresses, as k3s ServiceLB).

use std::net::SocketAddr;
use std::time::Duration;

use l2speaker_e2e::lab::probe::{ProbeConfig, Prober};
use l2speaker_e2e::testbed::{Testbed, Timing, endpoints, service};

async fn show(tb: &Testbed, args: &[&str]) {
    println!("\n$ kubectl {}", args.join(" "));
    let out = tb.kubectl.run(args).await;
    print!("{}{}", out.stdout, out.stderr);
}

fn list_hosts(tb: &Testbed) {
    for h in &tb.lab.hosts {
        let pods: Vec<String> = h
            .pods
            .iter()
            .map(|p| format!("{} {}", p.name, p.ipv4))
            .collect();
        println!(
            "  {:7} {:14} {}",
            h.name,
            h.ipv4,
            if pods.is_empty() {
                String::new()
            } else {
                format!("pods: {}", pods.join(", "))
            }
        );
    }
}

/// Node-IP mode: the Service is published on every node's address and reachable on each; a
/// node that loses the LAN leaves the status.
async fn node_ips_demo(tb: Testbed) -> std::process::ExitCode {
    let pods: Vec<_> = tb.lab.pods().cloned().collect();
    tb.apply(&endpoints("web", &pods)).await;
    tb.apply(&service("web", "", "")).await;
    let addrs = tb.wait_ips("default", "web", 3).await;
    show(&tb, &["get", "svc", "web"]).await;
    println!("\n== The client connects to each node's address on port 80");
    for ip in &addrs {
        match tb.lab.connect("client", SocketAddr::new(*ip, 80)) {
            Ok(a) => println!("  {ip}: {a}"),
            Err(e) => println!("  {ip}: error: {e}"),
        }
    }
    let (_, out) = tb.l2speaker("n1", &["status"], Duration::from_secs(20));
    println!("\n$ l2speaker status\n{out}");
    println!(
        "\n== Waiting 10 s: a new speaker counts for take-overs 10 s after its node Lease appeared"
    );
    tokio::time::sleep(Duration::from_secs(10)).await;
    let n3 = tb.lab.host("n3").expect("n3").ipv4.to_string();
    println!("\n== n3 loses its link: its address leaves the Service's status");
    let t0 = std::time::Instant::now();
    if let Err(e) = tb.lab.cut_link("n3") {
        eprintln!("l2s-demo: error: {e}");
        return std::process::ExitCode::FAILURE;
    }
    let api: kube::Api<k8s_openapi::api::core::v1::Service> =
        kube::Api::namespaced(tb.client.clone(), "default");
    l2speaker_e2e::testbed::eventually(
        Duration::from_secs(30),
        "n3 out of the status",
        async || {
            let s = api.get_opt("web").await.ok()??;
            let ing = s.status?.load_balancer?.ingress?;
            (ing.len() == 2 && ing.iter().all(|i| i.ip.as_deref() != Some(n3.as_str())))
                .then_some(())
        },
    )
    .await;
    println!("  out of the status after {} ms", t0.elapsed().as_millis());
    show(&tb, &["get", "svc", "web"]).await;
    println!("\n== Tearing the lab down");
    drop(tb);
    std::process::ExitCode::SUCCESS
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("l2s-demo: the lab needs root: run sudo ./scripts/demo.sh");
        return std::process::ExitCode::FAILURE;
    }
    let node_ips = std::env::args().any(|a| a == "--node-ips");
    println!(
        "== A lab: switch, control plane (test API server), 3 nodes with speakers, pods on two nodes, a client{}",
        if node_ips { "; no IPPool" } else { "" }
    );
    let tb = if node_ips {
        Testbed::without_pool(vec![2, 1, 0], Timing::LAN).await
    } else {
        Testbed::new(vec![2, 1, 0], Timing::LAN).await
    };
    list_hosts(&tb);
    if node_ips {
        return node_ips_demo(tb).await;
    }
    let pods: Vec<_> = tb.lab.pods().cloned().collect();
    tb.apply(&endpoints("web", &pods)).await;
    tb.apply(&service("web", "", "")).await;
    show(&tb, &["get", "ippools"]).await;
    let ip = tb.wait_ips("default", "web", 1).await[0];
    let owner = tb.wait_owner(ip).await;
    show(&tb, &["get", "svc", "web"]).await;

    println!(
        "\n== The client connects to {ip}:80 (each pod answers with its name and the address it saw)"
    );
    for _ in 0..6 {
        match tb.lab.connect("client", SocketAddr::new(ip, 80)) {
            Ok(a) => println!("  {a}"),
            Err(e) => println!("  error: {e}"),
        }
    }
    show(
        &tb,
        &[
            "describe",
            "lease",
            "-n",
            "l2speaker-system",
            &l2speaker::lease::lease_name(ip),
        ],
    )
    .await;

    println!(
        "\n== Waiting 10 s: a new speaker counts for take-overs 10 s after its node Lease appeared"
    );
    tokio::time::sleep(Duration::from_secs(10)).await;
    println!("\n== Failover drill: the owner {owner} loses its link and its speaker is killed");
    let prober = match Prober::start(
        &tb.lab.client().ns,
        ProbeConfig::new(SocketAddr::new(ip, 80)),
    ) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("l2s-demo: error: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    if prober
        .wait_for(Duration::from_secs(10), "answers before the drill", |t| {
            t.successes() >= 20
        })
        .is_err()
    {
        eprintln!("l2s-demo: error: no answers before the drill");
        return std::process::ExitCode::FAILURE;
    }
    let fault = prober.now();
    let cut = tb.lab.cut_link(&owner);
    tb.speaker(&owner).kill();
    if let Err(e) = cut {
        eprintln!("l2s-demo: error: {e}");
        return std::process::ExitCode::FAILURE;
    }
    let new_owner = tb.wait_new_owner_lan(ip, &owner).await;
    if prober
        .wait_for(Duration::from_secs(20), "answers after the failover", |t| {
            t.successes_after(fault) >= 20
        })
        .is_err()
    {
        eprintln!("l2s-demo: error: traffic did not resume");
        return std::process::ExitCode::FAILURE;
    }
    let t = prober.stop();
    let outage = t.outage_after(fault);
    println!(
        "  {owner} → {new_owner}; the client's connection attempts every 10 ms failed from the first to the last miss:"
    );
    println!("failover outage: {} ms", outage.as_millis());
    show(&tb, &["get", "lease", "-n", "l2speaker-system"]).await;
    println!("\n== Tearing the lab down");
    drop(tb);
    std::process::ExitCode::SUCCESS
}
