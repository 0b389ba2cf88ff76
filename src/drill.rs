//! `l2speaker drill`: planned handovers, measured from where the command runs. The owner of
//! each IP is asked to step down (an annotation on its Lease, visible in `kubectl describe
//! lease`), a TCP connection is tried every 10 ms, and the outage is the time from the first
//! failed attempt to the next successful one.

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Service;
use kube::api::{Api, Patch, PatchParams};
use serde::Serialize;
use serde_json::json;
use thiserror::Error;
use tokio::time::Instant;

use crate::lease::{ANNOTATION_STEP_DOWN, lease_name};
use crate::service::ServiceInfo;

#[derive(Debug, Error)]
pub enum DrillError {
    #[error("Service {0} not found")]
    NoService(String),
    #[error("Service {0} has no IP yet (status.loadBalancer.ingress is empty)")]
    NoIp(String),
    #[error("cannot probe {0} with ICMP (needs CAP_NET_RAW): {1}")]
    Icmp(IpAddr, std::io::Error),
    #[error("no node owns {0} (its Lease has no holder)")]
    NoOwner(IpAddr),
    #[error("{0} does not answer from here ({1:?}), so an outage could not be measured")]
    Unreachable(IpAddr, Probe),
    #[error(
        "not allowed to {what}: the drill needs get/list on Services and get/patch on Leases in {namespace} ({source})"
    )]
    Forbidden {
        what: String,
        namespace: String,
        source: kube::Error,
    },
    #[error("{what}: {source}")]
    Api { what: String, source: kube::Error },
    #[error("{0}")]
    Timeout(String),
    #[error(
        "{ip} moved from {from} to {to} but did not answer again within 10 s: an outage of at least {outage_ms} ms that had not ended"
    )]
    NotRecovered {
        ip: IpAddr,
        from: String,
        to: String,
        outage_ms: u64,
    },
}

fn api_err(what: impl Into<String>, namespace: &str) -> impl FnOnce(kube::Error) -> DrillError {
    let what = what.into();
    let namespace = namespace.to_string();
    move |source| match &source {
        kube::Error::Api(s) if s.code == 403 || s.code == 401 => DrillError::Forbidden {
            what,
            namespace,
            source,
        },
        _ => DrillError::Api { what, source },
    }
}

/// One handover.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Drill {
    pub ip: IpAddr,
    pub from: String,
    pub to: String,
    /// The attempts (ms since the drill's start, answered) and when the step-down was asked
    /// and the Lease moved: what the SVG timeline draws.
    #[serde(skip)]
    pub attempts: Vec<(Duration, bool)>,
    #[serde(skip)]
    pub asked_at: Duration,
    #[serde(skip)]
    pub moved_at: Duration,
    /// From the step-down request to the Lease naming the new owner.
    pub handover_ms: u64,
    /// What the client saw: first failed attempt to the next success (0: none failed).
    pub outage_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Summary {
    pub drills: usize,
    pub p50_ms: u64,
    pub p99_ms: u64,
    pub max_ms: u64,
}

/// Nearest-rank percentile.
pub fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil().max(1.0) as usize;
    sorted[rank.min(sorted.len()) - 1]
}

pub fn summarize(drills: &[Drill]) -> Summary {
    let mut o: Vec<u64> = drills.iter().map(|d| d.outage_ms).collect();
    o.sort_unstable();
    Summary {
        drills: o.len(),
        p50_ms: percentile(&o, 50.0),
        p99_ms: percentile(&o, 99.0),
        max_ms: o.last().copied().unwrap_or(0),
    }
}

/// Whether the last attempt answered (an outage still going on has not ended).
pub fn recovered(samples: &[(Duration, bool)]) -> bool {
    samples
        .iter()
        .max_by_key(|(t, _)| *t)
        .is_some_and(|(_, ok)| *ok)
}

/// The longest run of failures that started at or after `after`: to the next success, or to
/// the last attempt for one that never ended (see [`recovered`]).
pub fn outage(samples: &[(Duration, bool)], after: Duration) -> Duration {
    let mut s: Vec<(Duration, bool)> = samples
        .iter()
        .copied()
        .filter(|(t, _)| *t >= after)
        .collect();
    s.sort_by_key(|(t, _)| *t);
    let (mut worst, mut start, mut last) = (Duration::ZERO, None, Duration::ZERO);
    for (t, ok) in s {
        match (ok, start) {
            (false, None) => start = Some(t),
            (true, Some(st)) => {
                worst = worst.max(t - st);
                start = None;
            }
            _ => {}
        }
        last = t;
    }
    if let Some(st) = start {
        worst = worst.max(last - st);
    }
    worst
}

type Samples = Arc<Mutex<Vec<(Duration, bool)>>>;

/// How an attempt is made: a TCP connection to the Service's port, or an ICMP echo (the
/// owner's kernel answers for a bound VIP) when nothing answers on that port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Probe {
    Tcp(u16),
    Icmp,
}

const ATTEMPT_TIMEOUT: Duration = Duration::from_millis(200);

/// Makes an attempt every 10 ms until `stop`.
fn probe(
    ip: IpAddr,
    how: Probe,
    start: Instant,
    samples: Samples,
    stop: tokio::sync::watch::Receiver<bool>,
) -> Result<tokio::task::JoinHandle<()>, std::io::Error> {
    let icmp = match how {
        Probe::Icmp => {
            let kind = if ip.is_ipv4() {
                surge_ping::ICMP::V4
            } else {
                surge_ping::ICMP::V6
            };
            let config = surge_ping::Config::builder()
                .kind(kind)
                .sock_type_hint(socket2::Type::RAW)
                .build();
            Some(Arc::new(surge_ping::Client::new(&config)?))
        }
        Probe::Tcp(_) => None,
    };
    Ok(tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(10));
        let mut tries = tokio::task::JoinSet::new();
        let ident = surge_ping::PingIdentifier(std::process::id() as u16);
        let mut seq: u16 = 0;
        while !*stop.borrow() {
            tick.tick().await;
            let (samples, at, icmp) = (samples.clone(), start.elapsed(), icmp.clone());
            seq = seq.wrapping_add(1);
            let sequence = surge_ping::PingSequence(seq);
            tries.spawn(async move {
                let ok = match (how, icmp) {
                    (Probe::Tcp(port), _) => matches!(
                        tokio::time::timeout(
                            ATTEMPT_TIMEOUT,
                            tokio::net::TcpStream::connect(SocketAddr::new(ip, port))
                        )
                        .await,
                        Ok(Ok(_))
                    ),
                    (Probe::Icmp, Some(client)) => {
                        let mut pinger = client.pinger(ip, ident).await;
                        pinger.timeout(ATTEMPT_TIMEOUT);
                        pinger.ping(sequence, &[0u8; 16]).await.is_ok()
                    }
                    (Probe::Icmp, None) => false,
                };
                samples
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push((at, ok));
            });
            while tries.try_join_next().is_some() {}
        }
        while tries.join_next().await.is_some() {}
    }))
}

async fn holder(leases: &Api<Lease>, ip: IpAddr, ns: &str) -> Result<Option<String>, DrillError> {
    let l = leases
        .get_opt(&lease_name(ip))
        .await
        .map_err(api_err(format!("read lease {}", lease_name(ip)), ns))?;
    Ok(l.and_then(|l| l.spec?.holder_identity)
        .filter(|h| !h.is_empty()))
}

/// What to drill: one Service, or every Service with an IP from a pool.
pub enum Target<'a> {
    Service { namespace: &'a str, name: &'a str },
    Pool(&'a str),
}

/// The IPs to drill, and how to probe each.
async fn targets(
    client: &kube::Client,
    target: &Target<'_>,
) -> Result<Vec<(IpAddr, Probe)>, DrillError> {
    match target {
        Target::Service { namespace, name } => {
            let svcs: Api<Service> = Api::namespaced(client.clone(), namespace);
            let key = format!("{namespace}/{name}");
            let svc = svcs
                .get_opt(name)
                .await
                .map_err(api_err(format!("read Service {key}"), namespace))?
                .ok_or_else(|| DrillError::NoService(key.clone()))?;
            let info = ServiceInfo::from_service(&svc);
            if info.assigned.is_empty() {
                return Err(DrillError::NoIp(key));
            }
            let how = info
                .ports
                .first()
                .map_or(Probe::Icmp, |p| Probe::Tcp(p.port));
            Ok(info.assigned.iter().map(|ip| (*ip, how)).collect())
        }
        Target::Pool(pool) => {
            let pools: Api<crate::pool::IPPool> = Api::all(client.clone());
            let p = pools
                .get_opt(pool)
                .await
                .map_err(api_err(format!("read IPPool {pool}"), "the cluster"))?
                .ok_or_else(|| DrillError::NoService(format!("IPPool {pool}")))?;
            let built = crate::pool::Pools::build(vec![crate::pool::PoolInput {
                name: pool,
                age_key: String::new(),
                spec: &p.spec,
                last_valid: p
                    .status
                    .as_ref()
                    .map(|s| (s.addresses.clone(), s.interface.clone())),
            }]);
            let svcs: Api<Service> = Api::all(client.clone());
            let list = svcs
                .list(&Default::default())
                .await
                .map_err(api_err("list Services", "every namespace"))?;
            let mut out = Vec::new();
            for s in list.items.iter().map(ServiceInfo::from_service) {
                let how = s.ports.first().map_or(Probe::Icmp, |p| Probe::Tcp(p.port));
                out.extend(
                    s.assigned
                        .iter()
                        .filter(|ip| built.pool_of(**ip).is_some())
                        .map(|ip| (*ip, how)),
                );
            }
            if out.is_empty() {
                return Err(DrillError::NoIp(format!(
                    "no Service has an IP from pool {pool}"
                )));
            }
            Ok(out)
        }
    }
}

/// Runs `count` handovers of every IP of the target.
pub async fn run(
    client: kube::Client,
    lease_ns: &str,
    target: Target<'_>,
    count: usize,
    mut report: impl FnMut(&Drill),
) -> Result<Vec<Drill>, DrillError> {
    let mut ips = targets(&client, &target).await?;
    let leases: Api<Lease> = Api::namespaced(client, lease_ns);
    let mut out = Vec::new();
    for _ in 0..count {
        for (ip, how) in ips.iter_mut() {
            let d = match one(&leases, lease_ns, *ip, *how).await {
                // No TCP answer (no endpoints, or the port is closed): ICMP, which the owner's
                // kernel answers for the bound VIP. Nothing was asked of the owner yet.
                Err(DrillError::Unreachable(_, Probe::Tcp(_))) => {
                    *how = Probe::Icmp;
                    one(&leases, lease_ns, *ip, Probe::Icmp).await?
                }
                r => r?,
            };
            report(&d);
            out.push(d);
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
    Ok(out)
}

/// The SVG timeline of one drill.
pub fn svg(d: &Drill) -> String {
    use crate::svg::{Mark, timeline};
    let marks = [
        Mark {
            at: d.asked_at,
            label: format!("{} asked to step down", d.from),
            kind: "fault",
        },
        Mark {
            at: d.moved_at,
            label: format!("Lease holder: {}", d.to),
            kind: "lease",
        },
    ];
    let from = d.asked_at.saturating_sub(Duration::from_millis(300));
    let to = d
        .attempts
        .iter()
        .map(|(t, _)| *t)
        .max()
        .unwrap_or(d.moved_at);
    let title = format!(
        "drill of {}: {} → {}, outage {} ms",
        d.ip, d.from, d.to, d.outage_ms
    );
    timeline(&title, &d.attempts, &marks, from, to)
}

async fn one(leases: &Api<Lease>, ns: &str, ip: IpAddr, how: Probe) -> Result<Drill, DrillError> {
    let from = holder(leases, ip, ns)
        .await?
        .ok_or(DrillError::NoOwner(ip))?;
    let start = Instant::now();
    let samples: Samples = Arc::default();
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let prober =
        probe(ip, how, start, samples.clone(), stop_rx).map_err(|e| DrillError::Icmp(ip, e))?;
    let finish = |stop_tx: tokio::sync::watch::Sender<bool>,
                  prober: tokio::task::JoinHandle<()>| async move {
        let _ = stop_tx.send(true);
        let _ = prober.await;
    };
    // A baseline: the IP must answer from here before the drill means anything.
    let deadline = Instant::now() + Duration::from_secs(5);
    while !samples
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .any(|(_, ok)| *ok)
    {
        if Instant::now() > deadline {
            finish(stop_tx, prober).await;
            return Err(DrillError::Unreachable(ip, how));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let asked = start.elapsed();
    let patch = json!({"metadata": {"annotations": {ANNOTATION_STEP_DOWN: k8s_openapi::jiff::Timestamp::now().to_string()}}});
    if let Err(e) = leases
        .patch(
            &lease_name(ip),
            &PatchParams::default(),
            &Patch::Merge(patch),
        )
        .await
    {
        finish(stop_tx, prober).await;
        return Err(api_err(format!("annotate lease {}", lease_name(ip)), ns)(e));
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    let (to, handover) = loop {
        if let Some(h) = holder(leases, ip, ns).await?
            && h != from
        {
            break (h, start.elapsed() - asked);
        }
        if Instant::now() > deadline {
            finish(stop_tx, prober).await;
            return Err(DrillError::Timeout(format!(
                "{from} did not hand {ip} over within 30 s"
            )));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let changed = start.elapsed();
    let deadline = Instant::now() + Duration::from_secs(10);
    while samples
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .filter(|(t, ok)| *ok && *t > changed)
        .count()
        < 10
    {
        if Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    finish(stop_tx, prober).await;
    let samples = samples.lock().unwrap_or_else(|e| e.into_inner()).clone();
    if !recovered(&samples) {
        return Err(DrillError::NotRecovered {
            ip,
            from,
            to,
            outage_ms: outage(&samples, asked).as_millis() as u64,
        });
    }
    Ok(Drill {
        ip,
        outage_ms: outage(&samples, asked).as_millis() as u64,
        handover_ms: handover.as_millis() as u64,
        from,
        to,
        attempts: samples,
        asked_at: asked,
        moved_at: changed,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_use_the_nearest_rank() {
        let v: Vec<u64> = (1..=100).collect();
        assert_eq!(
            (
                percentile(&v, 50.0),
                percentile(&v, 99.0),
                percentile(&v, 100.0)
            ),
            (50, 99, 100)
        );
        assert_eq!(percentile(&[7], 99.0), 7);
        assert_eq!(percentile(&[], 50.0), 0);
    }

    #[test]
    fn the_outage_runs_from_the_first_failure_after_the_request_to_the_next_success() {
        let ms = Duration::from_millis;
        let s = [
            (ms(0), false),
            (ms(10), true),
            (ms(20), false),
            (ms(30), false),
            (ms(50), true),
            (ms(60), false),
        ];
        assert_eq!(
            outage(&s, ms(15)),
            ms(30),
            "the failure before the request does not count"
        );
        assert_eq!(outage(&s[..2], ms(5)), Duration::ZERO);
        assert!(!recovered(&s), "the last attempt failed");
        assert!(recovered(&s[..5]));
        // An outage that never ends counts to the last attempt, not as zero.
        let never = [
            (ms(0), true),
            (ms(10), false),
            (ms(20), false),
            (ms(90), false),
        ];
        assert_eq!(outage(&never, ms(5)), ms(80));
    }
}
