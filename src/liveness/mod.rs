//! Liveness on the LAN: every speaker broadcasts a small signed heartbeat on each interface
//! it announces on (UDP, [`DEFAULT_PORT`], to 255.255.255.255 on that interface only), and
//! each heartbeat acks the newest heartbeat heard from every peer. So each speaker knows who
//! is alive on its LAN, who hears it, and whom its peers hear, on the same path as the
//! clients' traffic and with no API request.
//!
//! - [`wire`]: the frame and its MACs (pure).
//! - [`peers`]: who is alive, who hears us, replays (pure, clock passed in).
//! - [`keys`]: the keys from one Secret, created if missing, rotated by editing it.
//! - this module: the sockets, the send timer and the receivers.

pub mod keys;
pub mod peers;
pub mod wire;

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use futures::StreamExt;
use k8s_openapi::api::core::v1::Secret;
use kube::api::Api;
use kube::runtime::watcher;
use tokio::net::UdpSocket;
use tokio::sync::{Notify, watch};
use tracing::{debug, info, warn};

use crate::dataplane::addr::Interface;
use crate::metrics::Metrics;
use keys::Keyring;
use peers::{Peers, Received};

pub const DEFAULT_PORT: u16 = 7947;

/// The heartbeat settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Heartbeat {
    pub port: u16,
    pub interval: Duration,
    pub dead_after: Duration,
}

impl Heartbeat {
    pub fn check(&self) -> Result<(), String> {
        if self.interval.is_zero() || self.interval > Duration::from_millis(u16::MAX as u64) {
            return Err(format!(
                "heartbeat interval {:?} must be between 1 ms and 65 s",
                self.interval
            ));
        }
        if self.dead_after < self.interval * 2 {
            return Err(format!(
                "heartbeat dead-after {:?} must be at least two intervals ({:?}): one lost frame must not kill a peer",
                self.dead_after,
                self.interval * 2
            ));
        }
        Ok(())
    }
}

fn wall_micros() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// The speaker's view of the LAN, shared with whoever decides on it.
pub struct Lan {
    pub settings: Heartbeat,
    pub peers: Mutex<Peers>,
    /// Signalled when a peer appears or changes whom it declares dead (see
    /// [`Peers::take_news`]): the keeper weighs the evidence then, not at its next tick.
    pub news: Notify,
    /// Signalled when our own declarations changed: a frame goes out at once, so the others
    /// count them without waiting for the next interval.
    pub send_now: Notify,
    keys: Mutex<Keyring>,
    metrics: Arc<Metrics>,
}

impl Lan {
    pub fn new(node: &str, settings: Heartbeat, metrics: Arc<Metrics>) -> Self {
        Lan {
            settings,
            peers: Mutex::new(Peers::new(node, settings.dead_after)),
            news: Notify::new(),
            send_now: Notify::new(),
            keys: Mutex::new(Keyring::default()),
            metrics,
        }
    }

    fn peers(&self) -> std::sync::MutexGuard<'_, Peers> {
        self.peers.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// One signed frame for the next send, or none while there is no key.
    fn next_frame(&self) -> Option<Vec<u8>> {
        let keys = self
            .keys
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .signing()
            .to_vec();
        if keys.is_empty() {
            return None;
        }
        let now = Instant::now();
        let mut peers = self.peers();
        let hb = wire::Heartbeat {
            node: peers.me().to_string(),
            seq: peers.next_seq(now, wall_micros()),
            generation: peers.generation(),
            interval_ms: self.settings.interval.as_millis() as u16,
            acks: peers.acks(now),
            dead: peers.dead_list(),
        };
        Some(wire::encode(&hb, &keys).0)
    }

    /// Takes in one frame received on `ifindex`.
    fn receive(&self, ifindex: u32, frame: &[u8]) {
        let keys = self
            .keys
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .checking(Instant::now());
        let verdict = match wire::decode(frame, &keys) {
            Err(e) => Err(e.label()),
            Ok(hb) => {
                let mut peers = self.peers();
                let r = peers.receive(ifindex, &hb, Instant::now(), wall_micros());
                if peers.take_news() {
                    self.news.notify_one();
                }
                match r {
                    Received::Accepted => Ok(true),
                    Received::Own | Received::Dead => Ok(false),
                    Received::Replayed => Err("replayed"),
                }
            }
        };
        match verdict {
            Ok(true) => self.metrics.heartbeat_received(frame.len(), true),
            Ok(false) => {}
            Err(reason) => {
                self.metrics.heartbeat_received(frame.len(), false);
                self.metrics.heartbeat_rejected(reason);
            }
        }
    }

    fn publish(&self) {
        let now = Instant::now();
        let mut peers = self.peers();
        peers.forget_silent(now);
        let alive = peers.alive(now).len();
        // "Hears us" counts acks of frames sent within dead-after.
        let hearing = peers.hearing_us(now, self.settings.dead_after).len();
        self.metrics.set_peers(alive, hearing);
    }
}

/// Keeps the keyring in step with the Secret (created if missing) until `stop`.
async fn keep_keys(lan: Arc<Lan>, api: Api<Secret>, mut stop: watch::Receiver<bool>) {
    let mut delay = Duration::from_millis(200);
    loop {
        let ensured = tokio::select! {
            r = tokio::time::timeout(Duration::from_secs(5), keys::ensure(&api)) => r,
            _ = stop.changed() => return,
        };
        match ensured {
            Ok(Ok(secret)) => {
                apply_secret(&lan, &secret);
                break;
            }
            Ok(Err(e)) => {
                warn!(secret = keys::SECRET, error = %e, "cannot read or create the heartbeat key Secret; no heartbeats until it can")
            }
            Err(_) => warn!(
                secret = keys::SECRET,
                "reading the heartbeat key Secret timed out"
            ),
        }
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = stop.changed() => return,
        }
        delay = (delay * 2).min(Duration::from_secs(10));
    }
    let cfg = watcher::Config::default().fields(&format!("metadata.name={}", keys::SECRET));
    let mut events = std::pin::pin!(watcher::watcher(api, cfg));
    loop {
        let ev = tokio::select! {
            ev = events.next() => ev,
            _ = stop.changed() => return,
        };
        match ev {
            Some(Ok(watcher::Event::Apply(s) | watcher::Event::InitApply(s))) => {
                apply_secret(&lan, &s)
            }
            // Deleted: the keys in use stay (a speaker never stops heartbeats on its own);
            // the next speaker to start creates a new Secret, and everyone takes that one.
            Some(Ok(_)) => {}
            Some(Err(e)) => {
                debug!(error = %e, "heartbeat key watch");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            None => return,
        }
    }
}

fn apply_secret(lan: &Lan, secret: &Secret) {
    let (found, refused) = keys::keys_from(&secret.data.clone().unwrap_or_default());
    for r in &refused {
        warn!(secret = keys::SECRET, entry = %r, "heartbeat key entry ignored");
    }
    if found.is_empty() {
        warn!(
            secret = keys::SECRET,
            "the heartbeat key Secret holds no usable key; keeping the keys in use"
        );
        return;
    }
    let ids: Vec<String> = found.iter().map(|k| format!("{:08x}", k.id)).collect();
    let mut ring = lan.keys.lock().unwrap_or_else(|e| e.into_inner());
    let before: Vec<u32> = ring.signing().iter().map(|k| k.id).collect();
    if before != found.iter().map(|k| k.id).collect::<Vec<_>>() {
        info!(keys = ?ids, "heartbeat keys loaded");
    }
    ring.update(found, Instant::now());
}

fn open(iface: &Interface, port: u16) -> std::io::Result<UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let s = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
    s.set_reuse_address(true)?;
    s.set_broadcast(true)?;
    s.bind_device(Some(iface.name.as_bytes()))?;
    s.set_nonblocking(true)?;
    s.bind(&SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port)).into())?;
    UdpSocket::from_std(s.into())
}

async fn receive_on(lan: Arc<Lan>, sock: Arc<UdpSocket>, ifindex: u32) {
    let mut buf = vec![0u8; 2048];
    loop {
        match sock.recv_from(&mut buf).await {
            Ok((n, _)) => lan.receive(ifindex, &buf[..n]),
            Err(e) => {
                debug!(error = %e, "heartbeat receive");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}

/// Sends and receives heartbeats on every interface `interfaces()` names (re-read every
/// interval) until `stop`: every interval, and at once when [`Lan::send_now`] is signalled.
pub async fn run(
    lan: Arc<Lan>,
    secrets: Api<Secret>,
    interfaces: impl Fn() -> Vec<Interface>,
    mut stop: watch::Receiver<bool>,
) {
    let keys = tokio::spawn(keep_keys(lan.clone(), secrets, stop.clone()));
    let port = lan.settings.port;
    let mut open_on: HashMap<u32, (Arc<UdpSocket>, tokio::task::JoinHandle<()>, String)> =
        HashMap::new();
    let mut failed: HashMap<u32, Instant> = HashMap::new();
    let mut tick = tokio::time::interval(lan.settings.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let to = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::BROADCAST, port));
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = lan.send_now.notified() => {}
            _ = stop.changed() => break,
        }
        let want = interfaces();
        open_on.retain(|index, (_, task, _)| {
            let keep = want.iter().any(|i| i.index == *index);
            if !keep {
                task.abort();
            }
            keep
        });
        for iface in &want {
            if open_on.contains_key(&iface.index)
                || failed
                    .get(&iface.index)
                    .is_some_and(|t| t.elapsed() < Duration::from_secs(10))
            {
                continue;
            }
            match open(iface, port) {
                Ok(s) => {
                    info!(interface = %iface.name, port, "heartbeats on");
                    let s = Arc::new(s);
                    let task = tokio::spawn(receive_on(lan.clone(), s.clone(), iface.index));
                    open_on.insert(iface.index, (s, task, iface.name.clone()));
                }
                Err(e) => {
                    warn!(interface = %iface.name, port, error = %e, "cannot open the heartbeat socket");
                    failed.insert(iface.index, Instant::now());
                }
            }
        }
        for (sock, _, name) in open_on.values() {
            let Some(frame) = lan.next_frame() else { break };
            match sock.try_send_to(&frame, to) {
                Ok(_) => lan.metrics.heartbeat_sent(frame.len()),
                Err(e) => debug!(interface = %name, error = %e, "heartbeat not sent"),
            }
        }
        lan.publish();
    }
    keys.abort();
    for (_, task, _) in open_on.values() {
        task.abort();
    }
}
