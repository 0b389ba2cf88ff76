//! The kernel dead man's switch on the real kernel (needs root): a node answers for a VIP only
//! while the gate's timeout is fresh, whoever sends — the kernel's ARP and neighbor
//! advertisements, raw frames (as the speaker's announcements are), traffic to the VIP.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::{Duration, Instant};

use l2speaker::dataplane::gate::{self, Netlink, Op};
use l2speaker::dataplane::packet;
use l2speaker_e2e::lab::{self, Lab, LabConfig, arp, netns};

const VIP4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 201);
const VIP6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x201);

fn lab() -> Lab {
    Lab::new(LabConfig::new(env!("CARGO_BIN_EXE_l2s-lab"), vec![0]))
        .expect("the lab comes up (run the tests as root)")
}

/// Runs gate operations inside `ns`.
fn apply(ns: &str, ops: Vec<Op>) {
    netns::run_in(ns, move || Netlink::open()?.apply(&ops))
        .unwrap()
        .expect("the kernel takes the batch");
}

fn vip_ops() -> Vec<Op> {
    [IpAddr::V4(VIP4), IpAddr::V6(VIP6)]
        .into_iter()
        .flat_map(gate::vip_keys)
        .map(|(set, key)| Op::Add {
            set,
            key,
            timeout: None,
        })
        .collect()
}

/// Node n1 holds both VIPs, with its gate installed.
fn setup(lab: &Lab) -> String {
    let ns = lab.host("n1").unwrap().ns.clone();
    netns::ip(&ns, &["addr", "add", &format!("{VIP4}/32"), "dev", "eth0"]).unwrap();
    netns::ip(
        &ns,
        &[
            "addr",
            "add",
            &format!("{VIP6}/128"),
            "dev",
            "eth0",
            "nodad",
        ],
    )
    .unwrap();
    // An ordinary table here (flags 0), so that each step below may use its own socket;
    // the owned table the speaker makes is tested on its own further down.
    let vips = [IpAddr::V4(VIP4), IpAddr::V6(VIP6)];
    netns::run_in(&ns, move || {
        Netlink::open()?.transact(&gate::table_msgs(&["eth0".into()], &vips, 0))
    })
    .unwrap()
    .expect("the kernel takes the gate table");
    assert_gate_rules(&ns);
    // The table puts the VIPs in with the very keys the holders add and remove.
    let keys = netns::run_in(&ns, || {
        let mut nl = gate::Netlink::open().unwrap();
        [gate::VIPS4, gate::VIPS6, gate::TARGETS6].map(|set| nl.set_keys(set).unwrap().unwrap())
    })
    .unwrap();
    let want: Vec<Vec<u8>> = vips
        .into_iter()
        .flat_map(gate::vip_keys)
        .map(|(_, k)| k)
        .collect();
    assert_eq!(keys.concat(), want, "table elements = holders' keys");
    apply(&ns, vip_ops());
    ns
}

/// What `nft list` shows of the gate (as an admin reads it): the rules the netlink batch
/// meant to make.
fn assert_gate_rules(ns: &str) {
    let listed = netns::exec(ns, "nft", &["list", "table", "netdev", gate::TABLE], None)
        .expect("nft lists the gate table");
    for rule in [
        "type filter hook egress device \"eth0\" priority filter; policy accept;",
        "oifname @live accept",
        "arp saddr ip @vips4 drop",
        "ip6 saddr @vips6 icmpv6 type nd-neighbor-solicit drop",
        "ip6 saddr @vips6 icmpv6 type nd-neighbor-advert drop",
        "icmpv6 type nd-neighbor-advert @th,64,128 @targets6 drop",
        "type filter hook ingress device \"eth0\" priority filter; policy accept;",
        "iifname @live accept",
        "ip daddr @vips4 drop",
        "ip6 daddr @vips6 drop",
    ] {
        assert!(listed.contains(rule), "the gate lacks `{rule}`:\n{listed}");
    }
}

fn arp_answers(lab: &Lab) -> Vec<String> {
    arp::claims(
        &lab.client().ns,
        |own| vec![packet::arp_probe(own, VIP4)],
        vec![IpAddr::V4(VIP4)],
        Duration::from_millis(50),
    )
    .unwrap()
}

fn na_answers(lab: &Lab) -> Vec<String> {
    arp::claims(
        &lab.client().ns,
        |own| vec![packet::dad_probe(own, VIP6)],
        vec![IpAddr::V6(VIP6)],
        Duration::from_millis(50),
    )
    .unwrap()
}

/// n1 sends a gratuitous ARP and an unsolicited NA for the VIPs from a raw socket, as the
/// speaker announces; returns the MACs the client heard claiming either.
fn raw_announcements_heard(lab: &Lab, node_ns: &str) -> Vec<String> {
    let client = lab.client().ns.clone();
    let listen = std::thread::spawn(move || {
        arp::claims(
            &client,
            |_| vec![],
            vec![IpAddr::V4(VIP4), IpAddr::V6(VIP6)],
            Duration::from_millis(300),
        )
        .unwrap()
    });
    std::thread::sleep(Duration::from_millis(100));
    netns::run_in(node_ns, || {
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
        let ll: Ipv6Addr = "fe80::1".parse().unwrap();
        for f in [
            packet::garp_request(mac, VIP4),
            packet::garp_reply(mac, VIP4),
            packet::unsolicited_na(mac, ll, VIP6, false),
        ] {
            // A closed gate makes the send fail (ENOBUFS): the frame never left.
            let _ = tx.send_to(&f, None);
        }
    })
    .unwrap();
    listen.join().unwrap()
}

#[test]
fn a_node_answers_for_its_vips_only_while_the_gate_is_fresh() {
    let lab = lab();
    let ns = setup(&lab);
    let mac = lab.mac("n1").unwrap();

    // Closed from the start: the VIPs are in the gate, no interface is live.
    assert!(
        arp_answers(&lab).is_empty(),
        "ARP answered through a closed gate"
    );
    assert!(
        na_answers(&lab).is_empty(),
        "NA answered through a closed gate"
    );
    assert!(
        raw_announcements_heard(&lab, &ns).is_empty(),
        "a raw announcement got out"
    );
    let echo = SocketAddr::new(IpAddr::V4(VIP4), lab::ECHO_PORT);

    // Open for 600 ms.
    let opened = Instant::now();
    apply(
        &ns,
        gate::refresh_ops(&["eth0".into()], Duration::from_millis(600)),
    );
    assert_eq!(arp_answers(&lab), std::slice::from_ref(&mac));
    assert_eq!(na_answers(&lab), std::slice::from_ref(&mac));
    let heard = raw_announcements_heard(&lab, &ns);
    assert_eq!(heard.len(), 1, "{heard:?}");
    let open_for = opened.elapsed();

    // Then silent on its own, within the timeout: nobody refreshed.
    lab::wait_until(Duration::from_secs(2), "the gate closes", || {
        arp_answers(&lab).is_empty()
    })
    .unwrap();
    let silent_after = opened.elapsed();
    println!(
        "gate opened for 600 ms: answered for at least {open_for:?}, silent after {silent_after:?}"
    );
    assert!(na_answers(&lab).is_empty());
    assert!(raw_announcements_heard(&lab, &ns).is_empty());
    // The client with the node's MAC cached: traffic to the VIP is dropped on the way in.
    netns::ip(
        &lab.client().ns,
        &[
            "neigh",
            "replace",
            &VIP4.to_string(),
            "lladdr",
            &mac,
            "dev",
            "eth0",
        ],
    )
    .unwrap();
    assert!(!lab.can_connect("client", echo).unwrap_or(false));

    // A refresh re-opens at once; destroying the element closes at once.
    apply(
        &ns,
        gate::refresh_ops(&["eth0".into()], Duration::from_secs(5)),
    );
    assert_eq!(arp_answers(&lab), std::slice::from_ref(&mac));
    apply(
        &ns,
        vec![Op::Destroy {
            set: gate::LIVE,
            key: gate::ifname_key("eth0"),
        }],
    );
    assert!(arp_answers(&lab).is_empty());
}

/// How precisely the kernel closes the gate, and what a refresh costs (printed): 20 rounds,
/// each opened for 200 ms and then asked every few milliseconds until ARP stops.
#[test]
fn the_gate_closes_within_milliseconds_of_its_timeout() {
    let lab = lab();
    let ns = setup(&lab);
    let mut late = Vec::new();
    for _ in 0..20 {
        let t0 = Instant::now();
        apply(
            &ns,
            gate::refresh_ops(&["eth0".into()], Duration::from_millis(200)),
        );
        let c = lab.client().clone();
        let mut last_answer = Duration::ZERO;
        while t0.elapsed() < Duration::from_millis(400) {
            // Timed from before the request: a slow request can only make this look earlier.
            let asked = t0.elapsed();
            let a = l2speaker_e2e::lab::arp::who_has(&c.ns, c.ipv4, VIP4, Duration::from_millis(3))
                .unwrap();
            if !a.is_empty() {
                last_answer = asked;
            }
        }
        late.push(last_answer.as_millis() as i64 - 200);
    }
    late.sort();
    println!("last answer relative to the 200 ms timeout (ms), 20 rounds: {late:?}");
    assert!(
        *late.last().unwrap() <= 20,
        "answered long after the timeout: {late:?}"
    );
    // A slow or unanswered probe under load can only make a round look early, so a single
    // early round says nothing; a timeout set in the wrong unit would move every round.
    assert!(
        late[late.len() / 2] >= -100,
        "most rounds closed long before the timeout: {late:?}"
    );

    // Cost of a refresh: one netlink batch, no process.
    let n = 1000;
    let took = netns::run_in(&ns, move || {
        let mut nl = Netlink::open().unwrap();
        let ops = gate::refresh_ops(&["eth0".into()], Duration::from_millis(300));
        let t = Instant::now();
        for _ in 0..n {
            nl.apply(&ops).unwrap();
        }
        t.elapsed()
    })
    .unwrap();
    println!("refresh: {:?} per netlink batch ({n} batches)", took / n);
}

/// A refresh carries a ticket taken before the clock was read: one that lands after the
/// ticket ran out (a speaker frozen between reading its clock and sending) fails in the
/// kernel and opens nothing; one on time opens the gate. And the gate the speaker reads back
/// (what the lab sampler reads) says so.
#[test]
fn a_refresh_that_lands_after_its_ticket_ran_out_opens_nothing() {
    let lab = lab();
    let ns = setup(&lab);
    let live = |ns: &str| {
        netns::run_in(ns, || Netlink::open()?.set_keys(gate::LIVE))
            .unwrap()
            .expect("the gate reads back")
            .expect("the gate table is there")
    };
    // Late: the ticket is taken, then the "freeze" outlasts it.
    apply(&ns, gate::ticket_ops());
    std::thread::sleep(gate::TICKET_LIFE * 5);
    let late = netns::run_in(&ns, || {
        Netlink::open()?.apply(&gate::ticketed_refresh_ops(
            &["eth0".into()],
            Duration::from_secs(5),
        ))
    })
    .unwrap();
    assert_eq!(
        late.as_ref().err().and_then(|e| e.raw_os_error()),
        Some(libc::ENOENT),
        "a late refresh is refused: {late:?}"
    );
    assert!(live(&ns).is_empty(), "the late refresh opened nothing");
    assert!(arp_answers(&lab).is_empty(), "and the node stays silent");
    // On time: ticket, then refresh at once.
    netns::run_in(&ns, || {
        let mut nl = Netlink::open()?;
        nl.apply(&gate::ticket_ops())?;
        nl.apply(&gate::ticketed_refresh_ops(
            &["eth0".into()],
            Duration::from_secs(5),
        ))
    })
    .unwrap()
    .expect("a refresh on time goes through");
    assert_eq!(live(&ns), vec![gate::ifname_key("eth0")]);
    assert!(!arp_answers(&lab).is_empty(), "the node answers");
}

/// Whether the counter `rx` moves within `within`.
fn moves(rx: &mut tokio::sync::watch::Receiver<u64>, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if rx.has_changed().unwrap_or(false) {
            rx.borrow_and_update();
            return true;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    false
}

fn nft_in(ns: &str, args: &[&str]) {
    let mut c = netns::command_in(ns, "nft").unwrap();
    c.args(args);
    assert!(c.status().unwrap().success(), "nft {args:?}");
}

#[test]
fn a_foreign_change_to_the_speakers_tables_is_noticed_and_others_are_not() {
    use l2speaker::dataplane::nft_watch;
    let lab = lab();
    let ns = setup(&lab);
    let mut rx = netns::run_in(&ns, nft_watch::watch_changes)
        .unwrap()
        .expect("the watcher subscribes");
    // Another agent's own table: not ours, nothing moves.
    nft_in(&ns, &["add", "table", "inet", "l2s-other-agent"]);
    assert!(
        !moves(&mut rx, Duration::from_millis(300)),
        "another agent's table moved it"
    );
    // A firewall reload removes ours: noticed within milliseconds.
    let t0 = Instant::now();
    nft_in(&ns, &["flush", "ruleset"]);
    assert!(
        moves(&mut rx, Duration::from_secs(2)),
        "flush ruleset went unnoticed"
    );
    println!(
        "flush ruleset noticed after {} µs",
        t0.elapsed().as_micros()
    );
}

/// Until `f` holds, at most `within`.
fn within(within: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    f()
}

#[test]
fn the_owned_gate_outlives_a_flush_and_its_owners_death_and_closes_on_time() {
    let lab = lab();
    let ns = setup(&lab);
    let vips = [IpAddr::V4(VIP4), IpAddr::V6(VIP6)];
    let owned = gate::TABLE_F_OWNER | gate::TABLE_F_PERSIST;
    // The speaker's socket: it replaces the table with an owned one and opens the gate.
    let owner = netns::run_in(&ns, move || {
        let mut nl = Netlink::open()?;
        nl.transact(&gate::table_msgs(&["eth0".into()], &vips, owned))?;
        nl.apply(&gate::refresh_ops(
            &["eth0".into()],
            Duration::from_secs(30),
        ))?;
        Ok::<_, std::io::Error>(nl)
    })
    .unwrap()
    .expect("an owned, persistent table (Linux 6.9 or later)");
    assert_gate_rules(&ns);
    assert!(!arp_answers(&lab).is_empty(), "the open gate lets ARP out");
    // Nobody else can change or remove it: not another socket, not a firewall reload.
    let foreign = netns::run_in(&ns, || Netlink::open()?.transact(&gate::remove_msgs())).unwrap();
    assert_eq!(
        foreign.map_err(|e| e.raw_os_error()),
        Err(Some(libc::EPERM)),
        "another socket removed the owned table"
    );
    nft_in(&ns, &["flush", "ruleset"]);
    assert!(
        !arp_answers(&lab).is_empty(),
        "the flush closed or removed the gate"
    );
    // The owner refreshes a short timeout, then dies (its socket closes): the table stays,
    // and the node goes silent when that timeout runs out.
    let mut owner = owner;
    owner
        .apply(&gate::refresh_ops(
            &["eth0".into()],
            Duration::from_millis(300),
        ))
        .unwrap();
    let died = Instant::now();
    drop(owner);
    let table_left = netns::run_in(&ns, || {
        Netlink::open()?.table_exists(l2speaker::dataplane::nft_watch::FAMILY_NETDEV, gate::TABLE)
    })
    .unwrap()
    .unwrap();
    assert!(table_left, "the table went with its owner's socket");
    assert!(
        within(Duration::from_secs(2), || arp_answers(&lab).is_empty()
            && na_answers(&lab).is_empty()),
        "the dead owner's node still answers"
    );
    println!(
        "silent {} ms after the owner died with 300 ms left",
        died.elapsed().as_millis()
    );
    // A new speaker takes the orphaned table over with its own socket.
    netns::run_in(&ns, move || {
        Netlink::open()?.transact(&gate::table_msgs(&["eth0".into()], &vips, owned))
    })
    .unwrap()
    .expect("a new owner replaces the orphaned table");
}
