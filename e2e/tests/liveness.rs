//! Heartbeats on the LAN, in the lab (needs root): speakers find each other with no manual
//! step, ignore what a host without the key sends, and survive a key rotation.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::time::Duration;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use l2speaker::liveness::DEFAULT_PORT;
use l2speaker::liveness::keys::SECRET;
use l2speaker::liveness::wire::{self, Heartbeat, Key};
use l2speaker_e2e::lab::netns;
use l2speaker_e2e::testbed::{Testbed, Timing, eventually};

/// The lab LAN's broadcast address (the client has no route to 255.255.255.255).
const LAN_BROADCAST: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 255);

/// Every sample of `name` (any labels) in a speaker's /metrics, as `labels → value` (none
/// while the speaker does not serve them yet).
fn metrics(tb: &Testbed, host: &str, name: &str) -> BTreeMap<String, f64> {
    let addr = SocketAddr::new(IpAddr::V4(tb.lab.host(host).unwrap().ipv4), 9473);
    let Ok((200, body)) = tb.lab.http_get("client", addr, "/metrics") else {
        return BTreeMap::new();
    };
    body.lines()
        .filter_map(|l| {
            let rest = l.strip_prefix(name)?;
            if !(rest.starts_with('{') || rest.starts_with(' ')) {
                return None;
            }
            let (labels, value) = rest.rsplit_once(' ')?;
            Some((labels.trim().to_string(), value.parse().ok()?))
        })
        .collect()
}

fn metric(tb: &Testbed, host: &str, name: &str) -> f64 {
    metrics(tb, host, name).values().sum()
}

async fn all_hear_each_other(tb: &Testbed, what: &str) {
    let hosts = tb.node_names();
    let others = (hosts.len() - 1) as f64;
    eventually(Duration::from_secs(10), what, async || {
        hosts
            .iter()
            .all(|h| {
                metric(tb, h, "l2speaker_peers_alive") == others
                    && metric(tb, h, "l2speaker_peers_hearing_us") == others
            })
            .then_some(())
    })
    .await;
}

fn rejected(tb: &Testbed, host: &str, kind: &str) -> f64 {
    metrics(tb, host, "l2speaker_heartbeats_rejected_total")
        .get(&format!("{{kind=\"{kind}\"}}"))
        .copied()
        .unwrap_or(0.0)
}

/// From the client's namespace: waits for one speaker's heartbeat, then sends `make(it)`'s
/// frames to the LAN's broadcast address on the heartbeat port.
fn from_the_client(tb: &Testbed, make: impl FnOnce(Vec<u8>) -> Vec<Vec<u8>> + Send + 'static) {
    let ns = tb.lab.client().ns.clone();
    netns::run_in(&ns, move || {
        let s = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, DEFAULT_PORT)).unwrap();
        s.set_broadcast(true).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut buf = [0u8; 2048];
        let (n, _) = s
            .recv_from(&mut buf)
            .expect("a speaker's heartbeat reaches the client");
        for f in make(buf[..n].to_vec()) {
            s.send_to(&f, (LAN_BROADCAST, DEFAULT_PORT)).unwrap();
        }
    })
    .unwrap();
}

async fn secret(tb: &Testbed) -> Secret {
    let api: kube::Api<Secret> = kube::Api::namespaced(tb.client.clone(), "l2speaker-system");
    api.get(SECRET)
        .await
        .expect("the speakers created the key Secret")
}

/// Three speakers started at once with no Secret: one creates it, all use it and hear each
/// other. A host on the LAN without the key sends frames signed with a key of its own, a
/// real frame with one byte changed, and a real frame again: each is counted under its
/// reason by every speaker and changes nobody's view of who is alive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn speakers_hear_each_other_and_ignore_forged_and_replayed_heartbeats() {
    let tb = Testbed::new(vec![1, 1, 0], Timing::DEFAULT).await;
    all_hear_each_other(
        &tb,
        "every speaker hears the two others and is heard by them",
    )
    .await;
    let s = secret(&tb).await;
    assert_eq!(s.data.as_ref().unwrap()["key"].0.len(), 32, "a 256-bit key");

    from_the_client(&tb, |real| {
        let mine = Key::new(b"a key the attacker made up itself");
        let (made_up, _) = wire::encode(
            &Heartbeat {
                node: "n9".into(),
                seq: u64::MAX / 2,
                generation: 0,
                interval_ms: 100,
                acks: vec![],
                dead: vec![],
            },
            &[mine],
        );
        let mut changed = real.clone();
        changed[15] ^= 1; // the seq's last byte
        vec![made_up, changed, real]
    });
    let hosts = tb.node_names();
    for kind in ["unknown_key", "forged"] {
        eventually(
            Duration::from_secs(5),
            &format!("every speaker counts the {kind} frame"),
            async || {
                hosts
                    .iter()
                    .all(|h| rejected(&tb, h, kind) >= 1.0)
                    .then_some(())
            },
        )
        .await;
    }
    // The replayed frame is its sender's own (ignored as such); every other speaker counts it.
    eventually(
        Duration::from_secs(5),
        "every speaker but the frame's sender counts the replay",
        async || {
            (hosts
                .iter()
                .filter(|h| rejected(&tb, h, "replayed") >= 1.0)
                .count()
                == hosts.len() - 1)
                .then_some(())
        },
    )
    .await;
    for h in &hosts {
        assert_eq!(
            metric(&tb, h, "l2speaker_peers_alive"),
            2.0,
            "{h}: no peer added or lost"
        );
    }
}

/// Rotating the key as the README says (add the new key, then remove the old one) costs no
/// heartbeat: no speaker refuses a single frame of its peers on the way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_key_rotates_without_a_refused_heartbeat() {
    let tb = Testbed::new(vec![1, 1, 0], Timing::DEFAULT).await;
    all_hear_each_other(&tb, "every speaker hears the two others").await;
    let hosts = tb.node_names();
    let refused = |tb: &Testbed| -> f64 {
        hosts
            .iter()
            .map(|h| metric(tb, h, "l2speaker_heartbeats_rejected_total"))
            .sum()
    };
    let received = |tb: &Testbed| -> f64 {
        hosts
            .iter()
            .map(|h| metric(tb, h, "l2speaker_heartbeats_received_total"))
            .sum()
    };
    assert_eq!(refused(&tb), 0.0);
    let api: kube::Api<Secret> = kube::Api::namespaced(tb.client.clone(), "l2speaker-system");
    let mut s = secret(&tb).await;
    let old = s.data.as_ref().unwrap()["key"].clone();
    let new = ByteString(b"the new key, thirty-two bytes ok".to_vec());
    s.data = Some(BTreeMap::from([
        ("key".to_string(), old),
        ("key-2".to_string(), new.clone()),
    ]));
    api.replace(SECRET, &Default::default(), &s).await.unwrap();
    // Long enough for every speaker to have read the new key (a watch event, milliseconds).
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut s = secret(&tb).await;
    s.data = Some(BTreeMap::from([("key-2".to_string(), new)]));
    api.replace(SECRET, &Default::default(), &s).await.unwrap();
    let before = received(&tb);
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(received(&tb) > before + 20.0, "heartbeats keep flowing");
    assert_eq!(refused(&tb), 0.0, "no frame refused during the rotation");
    all_hear_each_other(&tb, "still").await;
    // The speakers took the new key: a frame signed with it alone makes a new peer.
    let key = Key::new(b"the new key, thirty-two bytes ok");
    let ns = tb.lab.client().ns.clone();
    let frame = wire::encode(
        &Heartbeat {
            node: "n9".into(),
            seq: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_micros() as u64,
            generation: 0,
            interval_ms: 100,
            acks: vec![],
            dead: vec![],
        },
        &[key],
    )
    .0;
    netns::run_in(&ns, move || {
        let s = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).unwrap();
        s.set_broadcast(true).unwrap();
        s.send_to(&frame, (LAN_BROADCAST, DEFAULT_PORT)).unwrap();
    })
    .unwrap();
    eventually(
        Duration::from_secs(5),
        "a frame with the new key makes a new peer",
        async || {
            hosts
                .iter()
                .all(|h| metric(&tb, h, "l2speaker_peers_alive") == 3.0)
                .then_some(())
        },
    )
    .await;
}
