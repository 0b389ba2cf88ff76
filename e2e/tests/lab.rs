//! The lab on the real kernel. Needs root (namespaces, veths, nftables): run as root; without
//! it these tests fail with a message saying so, they never pass by skipping.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use l2speaker_e2e::lab::probe::{ProbeConfig, Prober};
use l2speaker_e2e::lab::{self, ECHO_PORT, Lab, LabConfig, netns};

fn lab(pods: Vec<usize>) -> Lab {
    Lab::new(LabConfig::new(env!("CARGO_BIN_EXE_l2s-lab"), pods))
        .expect("the lab comes up (run the tests as root)")
}

fn lab_namespaces(id: &str) -> Vec<String> {
    netns::list()
        .into_iter()
        .filter(|n| n.starts_with(&format!("{id}-")))
        .collect()
}

#[test]
fn client_reaches_every_pod_through_its_node_over_ipv4_and_ipv6() {
    let lab = lab(vec![2, 1, 0]);
    let client = lab.client().clone();
    assert_eq!(lab.pods().count(), 3);
    for pod in lab.pods() {
        for (ip, client_ip) in [
            (IpAddr::V4(pod.ipv4), IpAddr::V4(client.ipv4)),
            (IpAddr::V6(pod.ipv6), IpAddr::V6(client.ipv6)),
        ] {
            let answer = lab
                .connect("client", SocketAddr::new(ip, ECHO_PORT))
                .expect("the client reaches the pod");
            assert_eq!(
                answer,
                format!("{} {client_ip}", pod.name),
                "the pod saw the client's own address"
            );
        }
    }
    // node to a pod behind another node, and a pod to a pod across nodes
    let far = lab.pods().find(|p| p.node == "n2").unwrap().clone();
    let answer = lab
        .connect("n3", SocketAddr::new(IpAddr::V4(far.ipv4), ECHO_PORT))
        .unwrap();
    assert_eq!(
        answer,
        format!("{} {}", far.name, lab.host("n3").unwrap().ipv4)
    );
    let near = lab.pods().find(|p| p.node == "n1").unwrap().clone();
    let answer = lab::connect_from(
        &near.ns,
        SocketAddr::new(IpAddr::V6(far.ipv6), ECHO_PORT),
        Duration::from_millis(500),
    )
    .unwrap();
    assert_eq!(answer, format!("{} {}", far.name, near.ipv6));
}

#[test]
fn faults_show_up_in_the_probers_timeline_and_heal() {
    let lab = lab(vec![1, 1]);
    let n2 = lab.host("n2").unwrap().clone();
    // A server on the node itself, so the client's neighbor entry is the node's.
    let server = lab
        .spawn(
            "n2",
            "echo-n2",
            env!("CARGO_BIN_EXE_l2s-lab").as_ref(),
            &["echo", "--name", "n2"],
            &[],
        )
        .unwrap();
    let target = SocketAddr::new(IpAddr::V4(n2.ipv4), ECHO_PORT);
    lab::wait_until(Duration::from_secs(10), "the node's echo server", || {
        lab.connect("client", target).is_ok()
    })
    .unwrap();
    let prober = Prober::start(&lab.client().ns, ProbeConfig::new(target)).unwrap();
    prober
        .wait_for(Duration::from_secs(10), "first answers", |t| {
            t.successes() >= 10
        })
        .unwrap();
    let mac = lab.mac("n2").unwrap();
    prober
        .wait_for(Duration::from_secs(5), "the client's neighbor entry", |t| {
            t.neighbors
                .last()
                .is_some_and(|n| n.mac.as_deref() == Some(&mac))
        })
        .unwrap();

    // the link
    let cut = prober.now();
    lab.cut_link("n2").unwrap();
    prober
        .wait_for(Duration::from_secs(10), "failures after the cut", |t| {
            t.failures_after(cut) >= 5 && t.failing_now()
        })
        .unwrap();
    let heal = prober.now();
    lab.heal_link("n2").unwrap();
    prober
        .wait_for(Duration::from_secs(20), "answers after healing", |t| {
            t.successes_after(heal) >= 10
        })
        .unwrap();
    let outage = prober
        .snapshot()
        .longest_outage()
        .expect("an outage that ended");
    println!(
        "link cut for {} ms; the prober saw an outage of {} ms",
        (heal - cut).as_millis(),
        outage.as_millis()
    );
    assert!(
        outage + Duration::from_millis(50) >= heal - cut,
        "the outage covers the cut"
    );

    // the process
    let killed = prober.now();
    server.kill();
    assert!(!server.is_running());
    prober
        .wait_for(Duration::from_secs(10), "failures after the kill", |t| {
            t.failures_after(killed) >= 5 && t.failing_now()
        })
        .unwrap();
    let t = prober.stop();
    assert_eq!(t.pods(), ["n2".to_string()].into());
}

#[test]
fn a_node_cut_off_from_the_api_server_stays_on_the_lan() {
    let lab = lab(vec![0, 1]);
    let api = SocketAddr::new(IpAddr::V4(lab.host("cp").unwrap().ipv4), lab::API_PORT);
    let pod = lab.pods().next().unwrap().clone();
    let pod_addr = SocketAddr::new(IpAddr::V4(pod.ipv4), ECHO_PORT);
    assert!(
        lab.can_connect("n1", api).unwrap(),
        "n1 reaches the API server"
    );
    lab.isolate_from_api("n1").unwrap();
    assert!(
        !lab.can_connect("n1", api).unwrap(),
        "n1 no longer reaches the API server"
    );
    assert!(lab.can_connect("n2", api).unwrap(), "other nodes still do");
    assert_eq!(
        lab.connect("n1", pod_addr).unwrap(),
        format!("{} {}", pod.name, lab.host("n1").unwrap().ipv4),
        "n1 is still on the LAN"
    );
    lab.heal_api("n1").unwrap();
    assert!(lab.can_connect("n1", api).unwrap(), "healed");
}

#[test]
fn a_panicking_test_leaves_no_namespace_or_process_behind() {
    let (tx, rx) = std::sync::mpsc::channel();
    let result = std::panic::catch_unwind(move || {
        let mut lab = lab(vec![1]);
        lab.keep_logs_on_panic = false;
        tx.send((lab.id.clone(), echo_pids(&lab))).unwrap();
        panic!("a test fails with its lab up");
    });
    assert!(result.is_err());
    let (id, pids) = rx.recv().unwrap();
    assert!(!pids.is_empty());
    assert_eq!(
        lab_namespaces(&id),
        Vec::<String>::new(),
        "the lab's namespaces are gone"
    );
    for pid in pids {
        assert!(
            nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), None).is_err(),
            "process {pid} is gone"
        );
    }
}

/// The pids of the lab's echo servers (from its process logs' owners).
fn echo_pids(lab: &Lab) -> Vec<u32> {
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if cmdline.contains("l2s-lab")
            && cmdline.contains(" echo ")
            && let Ok(link) = std::fs::read_link(format!("/proc/{pid}/ns/net"))
        {
            let pod_ns = &lab.pods().next().unwrap().ns;
            let want = std::fs::metadata(netns::path(pod_ns))
                .map(|m| std::os::unix::fs::MetadataExt::ino(&m))
                .unwrap_or(0);
            if link.to_string_lossy().contains(&want.to_string()) {
                pids.push(pid);
            }
        }
    }
    pids
}

#[test]
fn sweep_removes_leftovers_of_dead_processes_only() {
    let live = lab(vec![0]);
    let mut dead = std::process::Command::new("true").spawn().unwrap();
    let dead_pid = dead.id();
    dead.wait().unwrap();
    let leftover = format!("{}{dead_pid}-0-sw", lab::PREFIX);
    netns::add(&leftover).unwrap();
    let removed = lab::sweep();
    assert!(removed.contains(&leftover), "{removed:?}");
    assert!(!netns::list().contains(&leftover));
    assert!(
        !lab_namespaces(&live.id).is_empty(),
        "a live lab is left alone"
    );
}

/// The DNAT transactions the speaker sends, fed to the real `nft` in a node's namespace one
/// after another: the full table, then changes that add and drop source ranges and client
/// affinity (sets created before the rules that use them, deleted after), change the
/// affinity timeout, replace an endpoint, and remove the VIP port. Each is accepted, and the
/// table ends as the full render of the last state says.
#[test]
fn the_kernel_accepts_every_dnat_change_with_source_ranges_and_affinity() {
    use l2speaker::dataplane::nft::{
        Dnat, Endpoint, PortMap, desired, render_delete, render_diff, render_full,
    };
    use l2speaker::service::Protocol;
    let lab = Lab::new(LabConfig {
        api_server: false,
        ..LabConfig::new(env!("CARGO_BIN_EXE_l2s-lab"), vec![0])
    })
    .expect("the lab comes up (run the tests as root)");
    let ns = lab.host("n1").unwrap().ns.clone();
    let nft = |script: &str| {
        netns::exec(&ns, "nft", &["-f", "-"], Some(script))
            .unwrap_or_else(|e| panic!("nft refused:\n{script}\n{e}"));
    };
    let list = || {
        netns::exec(&ns, "nft", &["list", "table", "inet", "l2speaker"], None)
            .expect("the table is there")
    };
    // One VIP port over remote endpoints (port 8080).
    let dnat = |vip: &str,
                (protocol, port): (Protocol, u16),
                eps: &[&str],
                sources: Option<&[&str]>,
                affinity: Option<u32>| {
        desired(&[Dnat {
            vip: vip.parse().unwrap(),
            ports: vec![PortMap {
                protocol,
                port,
                endpoints: eps
                    .iter()
                    .map(|e| Endpoint {
                        ip: e.parse().unwrap(),
                        port: 8080,
                        local: false,
                    })
                    .collect(),
            }],
            sources: sources.map(|s| s.iter().map(|n| n.parse().unwrap()).collect()),
            affinity,
        }])
    };
    let state = |eps: &[&str], sources: Option<&[&str]>, affinity: Option<u32>| {
        dnat("192.0.2.200", (Protocol::Tcp, 80), eps, sources, affinity)
    };
    let two = ["198.51.100.18", "198.51.100.34"];
    let steps = [
        state(&two, None, None),
        state(&two, Some(&["203.0.113.0/24"]), None),
        state(&two, Some(&["203.0.113.0/24"]), Some(60)),
        state(&two, None, Some(90)),
        state(&two, None, None),
        state(&two, None, Some(90)),
        state(
            &["198.51.100.18", "198.51.100.50", "198.51.100.66"],
            None,
            Some(90),
        ),
        state(&["198.51.100.18"], Some(&["2001:db8::/32"]), Some(90)),
        state(&two, None, Some(90)),
        state(&[], None, None),
    ];
    nft(&render_full(&steps[0]));
    for w in steps.windows(2) {
        if let Some(script) = render_diff(&w[0], &w[1]) {
            nft(&script);
        }
    }
    let listed = list();
    assert!(
        !listed.contains("vip_192_0_2_200") && !listed.contains("aff"),
        "the last state has no VIP port, so no chain or set is left:\n{listed}"
    );
    // And a state with everything, from scratch.
    nft(&render_full(&state(
        &two,
        Some(&["203.0.113.0/24"]),
        Some(60),
    )));
    let listed = list();
    assert!(
        listed.contains("vip_192_0_2_200_tcp_80_1_aff60"),
        "{listed}"
    );
    // IPv6: ranges and affinity over IPv6 endpoints.
    let v6 = dnat(
        "2001:db8::200",
        (Protocol::Udp, 53),
        &["2001:db8:100:1::2", "2001:db8:100:2::2"],
        Some(&["2001:db8:ffff::/48"]),
        Some(30),
    );
    nft(&render_full(&v6));
    nft(&render_diff(&v6, &Default::default()).expect("a change"));
    nft(&render_delete());
}
