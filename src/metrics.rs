//! Prometheus metrics, and the HTTP endpoints that serve them with health and readiness.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use tokio::time::Instant;

use crate::dataplane::{DataplaneError, Sent};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct VerbLabel {
    /// The HTTP method, or WATCH for watch requests (timed to the response headers).
    pub verb: String,
}

fn api_histogram() -> Histogram {
    Histogram::new([
        0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    ])
}

pub struct Metrics {
    registry: Registry,
    owned: Gauge<i64, AtomicI64>,
    acquisitions: Counter,
    losses: Counter,
    renew_failures: Counter,
    fences: Counter,
    conflicts: Counter,
    conflicts_owning: Counter,
    given_up: Counter,
    probe_seconds: Histogram,
    late_actions: Family<KindLabel, Counter>,
    announcements: Family<KindLabel, Counter>,
    dataplane_errors: Family<KindLabel, Counter>,
    watch_events: Family<KindLabel, Counter>,
    kernel_repairs: Family<KindLabel, Counter>,
    gate_healthy: Gauge<i64, AtomicI64>,
    vips_on_noarp_links: Gauge<i64, AtomicI64>,
    failover: Histogram,
    heartbeats_sent: Counter,
    heartbeat_bytes_sent: Counter,
    heartbeats_received: Counter,
    heartbeat_bytes_received: Counter,
    heartbeats_rejected: Family<KindLabel, Counter>,
    declarations: Counter,
    peers_alive: Gauge<i64, AtomicI64>,
    peers_hearing_us: Gauge<i64, AtomicI64>,
    api_latency: Family<VerbLabel, Histogram, fn() -> Histogram>,
    /// Takeovers in progress: when the previous owner's Lease was seen to expire.
    takeovers: Mutex<HashMap<IpAddr, Instant>>,
    pub ready: AtomicBool,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("l2speaker");
        let owned = Gauge::default();
        registry.register(
            "owned_ips",
            "Floating IPs this node owns now",
            owned.clone(),
        );
        let acquisitions = Counter::default();
        registry.register("lease_acquisitions", "Leases taken", acquisitions.clone());
        let losses = Counter::default();
        registry.register(
            "lease_losses",
            "Leases lost to another node while we held them",
            losses.clone(),
        );
        let renew_failures = Counter::default();
        registry.register(
            "lease_renew_failures",
            "Lease renewals that failed",
            renew_failures.clone(),
        );
        let fences = Counter::default();
        registry.register(
            "self_fences",
            "Times an owner withdrew because it could not renew within the deadline",
            fences.clone(),
        );
        let conflicts = Counter::default();
        registry.register(
            "ip_conflicts",
            "Probes before a bind that another host answered (the IP was not bound)",
            conflicts.clone(),
        );
        let given_up = Counter::default();
        registry.register(
            "vips_given_up",
            "VIPs this node gave up because it could not bind them for the give-up time (it \
             released them for another node and holds off before trying them again)",
            given_up.clone(),
        );
        let conflicts_owning = Counter::default();
        registry.register(
            "ip_conflicts_while_owning",
            "Claims by another host on an IP this node owns (each defended once)",
            conflicts_owning.clone(),
        );
        let probe_seconds = Histogram::new([0.001, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25]);
        registry.register(
            "probe_seconds",
            "ARP/DAD probes before binding an IP, from start to answer or timeout",
            probe_seconds.clone(),
        );
        let late_actions = Family::<KindLabel, Counter>::default();
        registry.register(
            "late_actions_dropped",
            "Binds and announcements dropped because they would have come after the owner's fence time",
            late_actions.clone(),
        );
        let announcements = Family::<KindLabel, Counter>::default();
        registry.register(
            "announcements",
            "Announcement frames sent, by kind",
            announcements.clone(),
        );
        let dataplane_errors = Family::<KindLabel, Counter>::default();
        registry.register(
            "dataplane_errors",
            "Dataplane operations that failed, by kind",
            dataplane_errors.clone(),
        );
        let watch_events = Family::<KindLabel, Counter>::default();
        registry.register(
            "watch_events",
            "Objects received from the API server's watches (listed or changed), by kind",
            watch_events.clone(),
        );
        let failover = Histogram::new([0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0]);
        registry.register(
            "failover_seconds",
            "From the previous owner's Lease seen expired (or released) to our first announcement",
            failover.clone(),
        );
        let api_latency =
            Family::<VerbLabel, Histogram, fn() -> Histogram>::new_with_constructor(api_histogram);
        registry.register(
            "api_request_duration_seconds",
            "API server requests, by verb, until the response headers",
            api_latency.clone(),
        );
        let heartbeats_sent = Counter::default();
        registry.register(
            "heartbeats_sent",
            "Heartbeat frames sent (one per interval per interface)",
            heartbeats_sent.clone(),
        );
        let heartbeat_bytes_sent = Counter::default();
        registry.register(
            "heartbeat_sent_bytes",
            "UDP payload bytes of the heartbeats sent",
            heartbeat_bytes_sent.clone(),
        );
        let heartbeats_received = Counter::default();
        registry.register(
            "heartbeats_received",
            "Authentic, fresh heartbeat frames received from peers",
            heartbeats_received.clone(),
        );
        let heartbeat_bytes_received = Counter::default();
        registry.register(
            "heartbeat_received_bytes",
            "UDP payload bytes of every frame received on the heartbeat port",
            heartbeat_bytes_received.clone(),
        );
        let heartbeats_rejected = Family::<KindLabel, Counter>::default();
        registry.register(
            "heartbeats_rejected",
            "Frames on the heartbeat port ignored, by why: forged, unknown_key, replayed, malformed",
            heartbeats_rejected.clone(),
        );
        let declarations = Counter::default();
        registry.register(
            "peers_declared_dead",
            "Peers this speaker declared dead (silent for the dead-after time); on a healthy LAN \
             every one is a node that really stopped, a stray one a heartbeat setting too short",
            declarations.clone(),
        );
        let kernel_repairs = Family::<KindLabel, Counter>::default();
        registry.register(
            "kernel_repairs",
            "Kernel state put back after someone else removed or changed it (dnat: the DNAT \
             table; gate: the gate table; address: a VIP's address), by kind",
            kernel_repairs.clone(),
        );
        let gate_healthy = Gauge::default();
        gate_healthy.set(1);
        registry.register(
            "gate_healthy",
            "LAN mode: 1 while this node's gate table is in place and refreshed, 0 while it \
             cannot be (the node then gives up its VIPs and takes none)",
            gate_healthy.clone(),
        );
        let vips_on_noarp_links = Gauge::default();
        registry.register(
            "vips_on_noarp_links",
            "Service IPs this node also has on a no-ARP link, put there by another agent \
             (kube-proxy in IPVS mode on kube-ipvs0): not refused, but every node answers ARP \
             for them unless kube-proxy's strictARP is set",
            vips_on_noarp_links.clone(),
        );
        let peers_alive = Gauge::default();
        registry.register(
            "peers_alive",
            "Speakers heard on the LAN within the dead-after time",
            peers_alive.clone(),
        );
        let peers_hearing_us = Gauge::default();
        registry.register(
            "peers_hearing_us",
            "Alive speakers whose heartbeats ack a recent heartbeat of ours",
            peers_hearing_us.clone(),
        );
        Metrics {
            heartbeats_sent,
            heartbeat_bytes_sent,
            heartbeats_received,
            heartbeat_bytes_received,
            heartbeats_rejected,
            declarations,
            peers_alive,
            peers_hearing_us,
            api_latency,
            registry,
            owned,
            acquisitions,
            losses,
            renew_failures,
            fences,
            conflicts,
            conflicts_owning,
            given_up,
            probe_seconds,
            late_actions,
            announcements,
            dataplane_errors,
            watch_events,
            kernel_repairs,
            gate_healthy,
            vips_on_noarp_links,
            failover,
            takeovers: Mutex::new(HashMap::new()),
            ready: AtomicBool::new(false),
        }
    }

    pub fn set_owned(&self, n: usize) {
        self.owned.set(n as i64);
    }

    /// A Lease taken; if it was someone else's, a failover is timed to the first announcement.
    pub fn lease_acquired(&self, ip: Option<IpAddr>, waited_since: Option<Instant>) {
        self.acquisitions.inc();
        if let (Some(ip), Some(start)) = (ip, waited_since) {
            self.takeovers
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(ip, start);
        }
    }

    /// An owner withdrew because it could not renew in time.
    pub fn fenced(&self) {
        self.fences.inc();
    }

    /// This speaker declared `n` more peers dead.
    pub fn declared_dead(&self, n: usize) {
        self.declarations.inc_by(n as u64);
    }

    /// Another host answered a probe before a bind.
    pub fn conflict(&self) {
        self.conflicts.inc();
    }

    /// A VIP given up because binds kept failing.
    pub fn gave_up(&self) {
        self.given_up.inc();
    }

    pub fn conflict_while_owning(&self) {
        self.conflicts_owning.inc();
    }

    pub fn probed(&self, took: std::time::Duration) {
        self.probe_seconds.observe(took.as_secs_f64());
    }

    /// An action dropped because it would have taken effect after its not-after time.
    pub fn late_action(&self, kind: &str) {
        self.late_actions
            .get_or_create(&KindLabel { kind: kind.into() })
            .inc();
    }

    pub fn lease_lost(&self) {
        self.losses.inc();
    }

    pub fn renew_failed(&self) {
        self.renew_failures.inc();
    }

    pub fn announced(&self, ip: IpAddr, sent: Sent, first: bool) {
        for (kind, n) in [
            ("arp_request", sent.arp_request),
            ("arp_reply", sent.arp_reply),
            ("na", sent.na),
        ] {
            if n > 0 {
                self.announcements
                    .get_or_create(&KindLabel { kind: kind.into() })
                    .inc_by(n as u64);
            }
        }
        if first
            && let Some(start) = self
                .takeovers
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&ip)
        {
            self.failover.observe(start.elapsed().as_secs_f64());
        }
    }

    pub fn dataplane_error(&self, e: &DataplaneError) {
        self.dataplane_errors
            .get_or_create(&KindLabel {
                kind: e.metric_label().into(),
            })
            .inc();
    }

    pub fn kernel_repaired(&self, kind: &str) {
        self.kernel_repairs
            .get_or_create(&KindLabel { kind: kind.into() })
            .inc();
    }

    pub fn set_vips_on_noarp_links(&self, n: usize) {
        self.vips_on_noarp_links.set(n as i64);
    }

    pub fn set_gate_healthy(&self, healthy: bool) {
        self.gate_healthy.set(i64::from(healthy));
    }

    pub fn watch_event(&self, kind: &str) {
        self.watch_events
            .get_or_create(&KindLabel { kind: kind.into() })
            .inc();
    }

    pub fn heartbeat_sent(&self, bytes: usize) {
        self.heartbeats_sent.inc();
        self.heartbeat_bytes_sent.inc_by(bytes as u64);
    }

    pub fn heartbeat_received(&self, bytes: usize, accepted: bool) {
        self.heartbeat_bytes_received.inc_by(bytes as u64);
        if accepted {
            self.heartbeats_received.inc();
        }
    }

    pub fn heartbeat_rejected(&self, reason: &str) {
        self.heartbeats_rejected
            .get_or_create(&KindLabel {
                kind: reason.into(),
            })
            .inc();
    }

    pub fn set_peers(&self, alive: usize, hearing_us: usize) {
        self.peers_alive.set(alive as i64);
        self.peers_hearing_us.set(hearing_us as i64);
    }

    pub fn api_request(&self, verb: &str, took: std::time::Duration) {
        self.api_latency
            .get_or_create(&VerbLabel {
                verb: verb.to_string(),
            })
            .observe(took.as_secs_f64());
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// Serves /metrics, /healthz and /readyz until the process ends.
pub async fn serve(addr: SocketAddr, metrics: std::sync::Arc<Metrics>) -> std::io::Result<()> {
    use axum::http::StatusCode;
    use axum::routing::get;
    let m1 = metrics.clone();
    let app = axum::Router::new()
        .route("/metrics", get(move || async move { m1.encode() }))
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/readyz",
            get(move || async move {
                if metrics.ready.load(Ordering::SeqCst) {
                    (StatusCode::OK, "ready")
                } else {
                    (
                        StatusCode::SERVICE_UNAVAILABLE,
                        "caches not synced or dataplane not programmed yet",
                    )
                }
            }),
        );
    let listener = tokio::net::TcpListener::bind(addr).await?;
    axum::serve(listener, app).await
}

/// A tower layer for the kube client that times every API request into
/// `l2speaker_api_request_duration_seconds`.
#[derive(Clone)]
pub struct TimedLayer(pub std::sync::Arc<Metrics>);

impl<S> tower::Layer<S> for TimedLayer {
    type Service = Timed<S>;
    fn layer(&self, inner: S) -> Timed<S> {
        Timed {
            inner,
            metrics: self.0.clone(),
        }
    }
}

#[derive(Clone)]
pub struct Timed<S> {
    inner: S,
    metrics: std::sync::Arc<Metrics>,
}

impl<S, B> tower::Service<http::Request<B>> for Timed<S>
where
    S: tower::Service<http::Request<B>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = futures::future::BoxFuture<'static, Result<S::Response, S::Error>>;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let watch = req
            .uri()
            .query()
            .is_some_and(|q| q.split('&').any(|p| p == "watch=true" || p == "watch=1"));
        let verb = if watch {
            "WATCH".to_string()
        } else {
            req.method().as_str().to_string()
        };
        let metrics = self.metrics.clone();
        let started = std::time::Instant::now();
        let fut = self.inner.call(req);
        Box::pin(async move {
            let r = fut.await;
            metrics.api_request(&verb, started.elapsed());
            r
        })
    }
}
