//! The speaker's wiring: the shared context, the DNAT task, the coordinator and allocator
//! loops, and a bounded shutdown.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kube::Client;
use kube::api::Api;
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{error, info, warn};

use crate::cluster::Cluster;
use crate::config::Config;
pub use crate::context::Shared;
use crate::coordinator::Coordinator;
use crate::dataplane::addr::Netlink;
use crate::dataplane::nft::Nft;
use crate::dataplane::sink::Pnet;
use crate::dataplane::{self, Dataplane};
use crate::events::Events;
use crate::lease::Leases;
use crate::metrics::Metrics;
use crate::ownership::machine::Stop;
use crate::ownership::timing::RELEASE_DEADLINE;

pub use crate::allocation::ALLOCATOR_LEASE;
pub use crate::coordinator::{FAIR_SHARE_WAIT, INITIAL_RANK_STEP, INTERFACE_REFRESH, RANK_STEP};

/// How long after a kernel change announcement the interfaces are read (a burst of changes
/// made by one command is over by then).
pub const KERNEL_SETTLE: Duration = Duration::from_millis(20);

/// Passes over all VIPs are at least this far apart.
pub const PASS_SPACING: Duration = Duration::from_millis(20);

/// Keeps DNAT in step with ownership and endpoints, apart from the holders: a slow `nft`
/// never delays a holder's decisions.
///
/// Level-triggered: when someone else changes the table (a firewall reload flushes the whole
/// ruleset) or the periodic check finds it gone, the table is put back whole, from the
/// ownership and endpoints of now, in one transaction.
async fn dnat_loop(shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let mut wake = shared.dnat_wake.subscribe();
    let mut changed = shared.cluster.changed.clone();
    // Nodes declared dead on the LAN leave the endpoints (LAN mode).
    let mut lan = shared.lan_state.subscribe();
    let mut nft = shared.nft_changes.clone();
    let mut check = tokio::time::interval(dataplane::nft_watch::CHECK_EVERY);
    check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    check.tick().await;
    let mut repairing: Option<Instant> = None;
    let mut following = true;
    // After a failed update: when to try again, and the failures in a row.
    let mut retry: Option<(Instant, u32)> = None;
    loop {
        let generation = *wake.borrow_and_update();
        if shared.sync_dnat().await {
            retry = None;
            if let Some(since) = repairing.take() {
                shared.metrics.kernel_repaired("dnat");
                info!(
                    took_ms = since.elapsed().as_millis() as u64,
                    "the DNAT table is back"
                );
            }
        } else {
            let failures = retry.map_or(1, |(_, n)| n + 1);
            retry = Some((Instant::now() + dnat_retry(failures), failures));
        }
        shared.dnat_done.send_replace(generation);
        tokio::select! {
            _ = tokio::time::sleep_until(retry.map_or_else(Instant::now, |(at, _)| at)), if retry.is_some() => {}
            _ = wake.changed() => {}
            _ = changed.changed() => {}
            _ = lan.changed() => {}
            r = nft.changed(), if following => {
                if r.is_err() {
                    warn!("stopped following nftables changes; checking the DNAT table every {} s", dataplane::nft_watch::CHECK_EVERY.as_secs());
                    following = false;
                    continue;
                }
                warn!("someone else changed the DNAT table: putting it back whole");
                repairing = Some(Instant::now());
                shared.dataplane.invalidate().await;
                continue;
            }
            _ = check.tick() => match shared.dataplane.verify().await {
                Ok(true) => {}
                Ok(false) => {
                    warn!("the DNAT table is gone: putting it back whole");
                    repairing = Some(Instant::now());
                    continue;
                }
                Err(e) => warn!(error = %e, "cannot check the DNAT table"),
            },
            _ = stop.changed() => return,
        }
        // Fold a burst of changes into one transaction.
        tokio::time::sleep(PASS_SPACING).await;
    }
}

/// How long after the `failures`-th failed DNAT update in a row the next is tried: 100 ms,
/// doubling up to the periodic check's period (the table is replaced whole each time).
fn dnat_retry(failures: u32) -> Duration {
    let d = Duration::from_millis(100).saturating_mul(1 << failures.saturating_sub(1).min(16));
    d.min(dataplane::nft_watch::CHECK_EVERY)
}

/// How long the API server may take to start answering a request (its status and headers;
/// a watch's events stream on afterwards). kube's client sets no such limit: a LIST or the
/// start of a watch sent to an API server that accepts the connection and never answers
/// (black-holed) would wait forever, and that watch's cache would never be updated again.
pub const API_REPLY_TIMEOUT: Duration = Duration::from_secs(30);

/// The kube client the speaker uses: every request is timed into
/// `l2speaker_api_request_duration_seconds`, and given up (an error: the caller retries)
/// when the API server has not started answering within `reply_timeout`.
pub fn api_client(
    kube_config: kube::Config,
    metrics: Arc<Metrics>,
    reply_timeout: Duration,
) -> anyhow::Result<Client> {
    Ok(kube::client::ClientBuilder::try_from(kube_config)?
        .with_layer(&crate::metrics::TimedLayer(metrics))
        .with_layer(&tower::timeout::TimeoutLayer::new(reply_timeout))
        .build())
}

/// Runs the speaker until `shutdown` resolves, then withdraws and releases everything.
pub async fn run(
    config: Config,
    kube_config: kube::Config,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let metrics = Arc::new(Metrics::new());
    let api_server = kube_config
        .cluster_url
        .host()
        .and_then(|h| h.trim_matches(['[', ']']).parse().ok());
    let client = api_client(kube_config, metrics.clone(), API_REPLY_TIMEOUT)?;
    let metrics_addr = config.metrics_address;
    let m = metrics.clone();
    tokio::spawn(async move {
        if let Err(e) = crate::metrics::serve(metrics_addr, m).await {
            error!(address = %metrics_addr, error = %e, "could not serve metrics and health");
        }
    });
    let cluster = Cluster::start(&client, &config.namespace, &metrics);
    let trim = tokio::spawn(crate::memory::trim_periodically());
    let netlink = Netlink::connect()?;
    let dataplane = Dataplane::new(netlink, Nft, Pnet::default(), config.dnat);
    let events = Events::new(client.clone(), &config.node_name, cluster.services.clone());
    let (dnat_wake, _) = watch::channel(0);
    let (dnat_done, _) = watch::channel(0);
    let liveness = Arc::new(crate::liveness::Lan::new(
        &config.node_name,
        config.heartbeat(),
        metrics.clone(),
    ));
    let lan_mode = config.liveness == crate::config::Liveness::Lan;
    let vip_leases = if lan_mode {
        Leases::lan(
            Api::namespaced(client.clone(), &config.namespace),
            &config.node_name,
        )
    } else {
        Leases::new(
            Api::namespaced(client.clone(), &config.namespace),
            &config.node_name,
            config.lease_duration,
        )
    };
    let (lan_state, _) = watch::channel(crate::keeper::LanState::default());
    let nft_changes = dataplane::nft_watch::watch_changes().unwrap_or_else(|e| {
        warn!(error = %e, "cannot follow nftables changes; checking our tables every {} s instead", dataplane::nft_watch::CHECK_EVERY.as_secs());
        // Kept open so the receiver never ends.
        let (tx, rx) = watch::channel(0);
        std::mem::forget(tx);
        rx
    });
    let shared = Arc::new(Shared {
        liveness,
        vip_leases,
        gate: std::sync::Mutex::new(crate::keeper::Gate::new()),
        lan_state,
        leases: Leases::new(
            Api::namespaced(client.clone(), &config.namespace),
            &config.node_name,
            config.lease_duration,
        ),
        config,
        client,
        cluster,
        dataplane,
        metrics,
        events,
        api_server,
        owned: Mutex::new(BTreeMap::new()),
        dnat_wake,
        dnat_done,
        lan: Mutex::new(Default::default()),
        busy_ports: Mutex::new(Default::default()),
        nft_changes,
    });

    tokio::pin!(shutdown);
    tokio::select! {
        _ = shared.cluster.ready() => {}
        _ = &mut shutdown => return Ok(()),
    }
    info!(node = %shared.config.node_name, "caches synced");
    // Nothing is ours until a Lease says so: leftovers of a killed speaker go.
    if let Err(e) = shared.dataplane.remove_rules().await {
        error!(error = %e, "could not remove stale DNAT rules");
    }
    // Until the leftovers are gone the speaker does not serve (and keeps the old gate,
    // which holds a dead speaker's addresses silent).
    loop {
        match shared.dataplane.remove_stale_addresses(|_| false).await {
            Ok(removed) => {
                if !removed.is_empty() {
                    info!(?removed, "removed stale addresses");
                }
                break;
            }
            Err(e) => {
                error!(error = %e, "could not remove stale addresses; not serving until they are gone (retrying every second)")
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = &mut shutdown => return Ok(()),
        }
    }
    if lan_mode {
        crate::keeper::remove_table(&shared);
    }
    if !shared.config.dnat && shared.config.node_ips.mode().is_some() {
        warn!(
            "--dnat=false: Services in node-IP mode (no IPPool, or annotated) are published on node addresses that nothing here serves; set --node-ips=off unless another component does"
        );
    }
    if shared.config.dnat && !dataplane::forwards_v4() {
        warn!(
            "net.ipv4.ip_forward is 0: DNAT to pods on other nodes will not work (not changed; that is the node's owner's call)"
        );
    }

    let (stop_loops, stop_rx) = watch::channel(false);
    let alloc = tokio::spawn(crate::allocation::run(shared.clone(), stop_rx.clone()));
    let dnat = tokio::spawn(dnat_loop(shared.clone(), stop_rx.clone()));
    // The keeper runs until every holder has withdrawn (it keeps the gate open meanwhile:
    // unbinding is what stops a graceful owner answering).
    let (stop_keeper, keeper_rx) = watch::channel(false);
    let lifetimes = lan_mode.then(|| {
        tokio::spawn(crate::keeper::extend_address_lifetimes(
            shared.clone(),
            keeper_rx.clone(),
        ))
    });
    let keeper = lan_mode.then(|| tokio::spawn(crate::keeper::run(shared.clone(), keeper_rx)));
    let mut lan_changed = shared.lan_state.subscribe();
    let s = shared.clone();
    let heartbeats = tokio::spawn(crate::liveness::run(
        shared.liveness.clone(),
        Api::namespaced(shared.client.clone(), &shared.config.namespace),
        move || s.owned_interfaces(),
        stop_rx.clone(),
    ));
    let claims_stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let claims = tokio::spawn(crate::claims::run(shared.clone(), claims_stop.clone()));
    let mut coord = Coordinator::new(shared.clone());
    let mut kernel = match crate::dataplane::addr::watch_changes() {
        Ok(c) => {
            coord.read_interfaces_on(c.clone());
            Some(c)
        }
        Err(e) => {
            warn!(error = %e, "cannot follow link and address changes; polling them instead");
            None
        }
    };
    let mut changed = shared.cluster.changed.clone();
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let started = Instant::now();
        coord.pass().await;
        shared
            .metrics
            .ready
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let kernel_changed = tokio::select! {
            _ = changed.changed() => false,
            _ = lan_changed.changed() => false,
            _ = tick.tick() => false,
            _ = kernel_change(&mut kernel) => true,
            _ = &mut shutdown => break,
        };
        // The first change after a quiet spell is acted on at once; a burst of changes (every
        // renewal of every Lease is one) is folded into one pass per PASS_SPACING. A kernel
        // change is acted on when the interfaces may be read again.
        let mut next = started + PASS_SPACING;
        if kernel_changed && let Some(at) = coord.change_read_at() {
            // Not in the middle of a burst (`ip addr flush` removes the link's addresses one
            // by one): a read between two of its deletions could see the node's own address
            // still there and bind the VIP back just before it goes too.
            next = next.max(at).max(Instant::now() + KERNEL_SETTLE);
        }
        tokio::select! {
            _ = tokio::time::sleep_until(next) => {}
            _ = &mut shutdown => break,
        }
    }

    // Bounded: every holder unbinds at once and gets one release attempt with its own
    // deadline; a speaker that owns nothing is done as soon as its tasks see the stop.
    info!("shutting down: withdrawing and releasing");
    shared
        .metrics
        .ready
        .store(false, std::sync::atomic::Ordering::SeqCst);
    let _ = stop_loops.send(true);
    let within = RELEASE_DEADLINE + Duration::from_millis(100);
    let (_, alloc_done) = tokio::join!(
        coord.stop_all(Stop::Shutdown, within),
        tokio::time::timeout(within, alloc)
    );
    if alloc_done.is_err() {
        warn!("the allocator did not stop in time");
    }
    dnat.abort();
    let _ = stop_keeper.send(true);
    if let Some(l) = lifetimes {
        l.abort();
    }
    if let Some(k) = keeper {
        let _ = tokio::time::timeout(Duration::from_millis(500), k).await;
        crate::keeper::remove_table(&shared);
    }
    heartbeats.abort();
    trim.abort();
    claims_stop.store(true, std::sync::atomic::Ordering::SeqCst);
    claims.abort();
    if let Err(e) = tokio::time::timeout(Duration::from_secs(2), shared.dataplane.remove_rules())
        .await
        .unwrap_or_else(|_| Err(dataplane::nft::NftError::Timeout.into()))
    {
        error!(error = %e, "could not remove DNAT rules");
    }
    Ok(())
}

/// Resolves when the kernel announces a link, address or route change; never once the
/// announcements have stopped (the coordinator then polls, and says so).
async fn kernel_change(changes: &mut Option<tokio::sync::watch::Receiver<u64>>) {
    match changes {
        Some(c) => {
            if c.changed().await.is_err() {
                *changes = None;
                std::future::pending::<()>().await;
            }
        }
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod client_tests {
    use super::*;
    use k8s_openapi::api::coordination::v1::Lease;

    #[test]
    fn a_failed_dnat_update_is_tried_again_soon_then_less_often() {
        let ms = |n| Duration::from_millis(n);
        let waits: Vec<Duration> = (1..=8).map(dnat_retry).collect();
        assert_eq!(&waits[..4], &[ms(100), ms(200), ms(400), ms(800)]);
        assert!(waits.windows(2).all(|w| w[0] <= w[1]));
        assert_eq!(waits[7], dataplane::nft_watch::CHECK_EVERY);
        assert_eq!(dnat_retry(u32::MAX), dataplane::nft_watch::CHECK_EVERY);
    }

    /// A black-holed API server (it accepts connections and never answers): a LIST fails by
    /// itself after the reply timeout, so a watcher retries instead of waiting forever.
    #[tokio::test]
    async fn a_request_the_api_server_never_answers_fails_after_the_reply_timeout() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let held = tokio::spawn(async move {
            let mut open = Vec::new();
            while let Ok((c, _)) = listener.accept().await {
                open.push(c);
            }
        });
        let config = kube::Config::new(format!("http://{addr}").parse().unwrap());
        let client =
            api_client(config, Arc::new(Metrics::new()), Duration::from_millis(300)).unwrap();
        let leases: Api<Lease> = Api::namespaced(client, "l2speaker-system");
        let t0 = std::time::Instant::now();
        let r = tokio::time::timeout(Duration::from_secs(10), leases.list(&Default::default()))
            .await
            .expect("the client gave up by itself, well before 10 s");
        assert!(r.is_err(), "nothing answered, yet: {r:?}");
        assert!(
            t0.elapsed() < Duration::from_secs(3),
            "gave up after {:?}",
            t0.elapsed()
        );
        held.abort();
    }
}
