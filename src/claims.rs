//! Watching the LAN for other hosts that claim pool addresses: one listening thread per
//! interface with a bound VIP or a pool's subnet, reading every frame and classifying it with
//! [`crate::dataplane::packet::claim`]. A foreign claim gets a Warning `IPConflict` on the
//! Service and a metric, and the owner defends once (one more announcement round, as RFC 5227
//! describes) — at most once per [`DEFEND_EVERY`] per IP. A claim on a pool address this
//! node does not own is remembered (for 30 s), and the node does not take that address
//! meanwhile: a take-over then reads known state. The owner keeps its IP: it was assigned
//! from the pool and probed clean before it was bound, so the other host is the one to fix,
//! and clients may flip between the two until it is.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use kube::runtime::events::EventType;
use pnet_datalink::Channel;
use tracing::warn;

use crate::context::Shared;
use crate::dataplane::addr::Interface;
use crate::dataplane::packet::{self, format_mac};

/// At most one report and one defense per IP this often.
pub const DEFEND_EVERY: Duration = Duration::from_secs(10);

/// Keeps one watcher running per interface that has a bound VIP, until `stop`.
pub async fn run(shared: Arc<Shared>, stop: Arc<AtomicBool>) {
    let mut watching: HashMap<u32, tokio::task::JoinHandle<()>> = HashMap::new();
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    while !stop.load(Ordering::SeqCst) {
        tick.tick().await;
        watching.retain(|_, h| !h.is_finished());
        for iface in shared.owned_interfaces() {
            if watching.contains_key(&iface.index) {
                continue;
            }
            let (s, st) = (shared.clone(), stop.clone());
            let index = iface.index;
            let h = tokio::task::spawn_blocking(move || {
                if let Err(e) = watch(&s, &iface, &st) {
                    warn!(interface = %iface.name, error = %e, "cannot watch for conflicting claims");
                }
            });
            watching.insert(index, h);
        }
    }
}

fn watch(shared: &Shared, iface: &Interface, stop: &AtomicBool) -> std::io::Result<()> {
    let own = iface.mac.ok_or_else(|| std::io::Error::other("no MAC"))?;
    let dev = pnet_datalink::interfaces()
        .into_iter()
        .find(|i| i.name == iface.name)
        .ok_or_else(|| std::io::Error::other("no such interface"))?;
    let config = pnet_datalink::Config {
        read_timeout: Some(Duration::from_millis(200)),
        // Broadcast ARP and multicast NA are what claims travel in.
        promiscuous: false,
        ..Default::default()
    };
    let Channel::Ethernet(_, mut rx) = pnet_datalink::channel(&dev, config)? else {
        return Err(std::io::Error::other("not an Ethernet channel"));
    };
    let mut last: HashMap<IpAddr, Instant> = HashMap::new();
    let rt = tokio::runtime::Handle::current();
    while !stop.load(Ordering::SeqCst) {
        let Ok(frame) = rx.next() else { continue };
        let Some((ip, mac)) = packet::claim(frame, own) else {
            continue;
        };
        let Some((service, bound_on)) = shared.owner_of(ip) else {
            // Not ours: remembered if it is a pool address and the MAC no speaker's, so this
            // node does not take that address (see the coordinator).
            shared.note_claim(ip, mac);
            continue;
        };
        if bound_on.index != iface.index
            || last.get(&ip).is_some_and(|t| t.elapsed() < DEFEND_EVERY)
        {
            continue;
        }
        last.insert(ip, Instant::now());
        let mac = format_mac(&mac);
        shared.metrics.conflict_while_owning();
        warn!(ip = %ip, mac = %mac, service = %service, "another host claims an IP this node owns; defending it");
        let router = crate::dataplane::forwards_v6(&iface.name);
        if let Err(e) = shared.dataplane.announce(iface, ip, router) {
            warn!(ip = %ip, error = %e, "could not defend the IP");
        }
        if let Some(r) = shared.events.service_ref(&service) {
            let _guard = rt.enter();
            shared.events.post(
                r,
                EventType::Warning,
                "IPConflict",
                format!(
                    "{mac} claims {ip}, which {} owns; {} keeps it and announced it again",
                    shared.config.node_name, shared.config.node_name
                ),
                "Defend",
            );
        }
    }
    Ok(())
}
