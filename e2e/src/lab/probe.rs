//! The prober: from a host of the lab (the client), a TCP exchange with `target` every 10 ms,
//! and the host's neighbor entry for the target's IP watched at the same pace. The result
//! is a timeline: when connections failed, which pod answered, which MAC the client used.

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::TryStreamExt;
use rtnetlink::packet_route::neighbour::{NeighbourAddress, NeighbourAttribute};
use serde::Serialize;
use tokio::io::AsyncBufReadExt;

use super::LabError;
use super::netns::{self, InNs};

#[derive(Debug, Clone)]
pub struct ProbeConfig {
    pub target: SocketAddr,
    /// A new attempt starts every `interval` (attempts overlap when the target is slow).
    pub interval: Duration,
    /// An attempt that has not read its answer by then failed.
    pub timeout: Duration,
}

impl ProbeConfig {
    pub fn new(target: SocketAddr) -> Self {
        ProbeConfig {
            target,
            interval: Duration::from_millis(10),
            timeout: Duration::from_millis(200),
        }
    }
}

/// One connection attempt.
#[derive(Debug, Clone, Serialize)]
pub struct Sample {
    /// When the attempt started, since the prober started.
    pub at: Duration,
    pub ok: bool,
    /// The answer's first line (`<pod> <client address seen>` from the lab's echo servers).
    pub answer: Option<String>,
}

impl Sample {
    /// The pod that answered.
    pub fn pod(&self) -> Option<&str> {
        self.answer.as_deref()?.split_whitespace().next()
    }

    /// The client address the pod saw.
    pub fn seen_client(&self) -> Option<&str> {
        self.answer.as_deref()?.split_whitespace().nth(1)
    }
}

/// The client's neighbor entry for the target IP changed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NeighborChange {
    pub at: Duration,
    /// `aa:bb:…`, or None when there is no entry or no link-layer address.
    pub mac: Option<String>,
}

/// A run of failed attempts, from the first failure to the next success.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Outage {
    pub start: Duration,
    pub end: Duration,
}

impl Outage {
    pub fn duration(&self) -> Duration {
        self.end - self.start
    }
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Timeline {
    pub samples: Vec<Sample>,
    pub neighbors: Vec<NeighborChange>,
}

impl Timeline {
    fn sorted(&self) -> Vec<&Sample> {
        let mut s: Vec<&Sample> = self.samples.iter().collect();
        s.sort_by_key(|s| s.at);
        s
    }

    pub fn successes(&self) -> usize {
        self.samples.iter().filter(|s| s.ok).count()
    }

    pub fn failures(&self) -> usize {
        self.samples.iter().filter(|s| !s.ok).count()
    }

    /// Runs of failures that ended in a success (an outage still going on has no end yet).
    pub fn outages(&self) -> Vec<Outage> {
        let mut out = Vec::new();
        let mut start = None;
        for s in self.sorted() {
            match (s.ok, start) {
                (false, None) => start = Some(s.at),
                (true, Some(st)) => {
                    out.push(Outage {
                        start: st,
                        end: s.at,
                    });
                    start = None;
                }
                _ => {}
            }
        }
        out
    }

    /// The outage still going on at the last attempt: from its first failure to that attempt.
    pub fn unfinished(&self) -> Option<Outage> {
        let s = self.sorted();
        let last = s.last().filter(|l| !l.ok)?;
        let start = s.iter().rev().take_while(|x| !x.ok).last()?.at;
        Some(Outage {
            start,
            end: last.at,
        })
    }

    /// The longest outage that ended after `t` (a fault at `t`), counting one that has not
    /// ended up to the last attempt; zero if none.
    pub fn outage_after(&self, t: Duration) -> Duration {
        self.outages()
            .into_iter()
            .chain(self.unfinished())
            .filter(|o| o.end > t)
            .map(|o| o.duration())
            .max()
            .unwrap_or_default()
    }

    pub fn longest_outage(&self) -> Option<Duration> {
        self.outages().iter().map(Outage::duration).max()
    }

    /// Whether the last attempt failed (the outage has not ended).
    pub fn failing_now(&self) -> bool {
        self.sorted().last().is_some_and(|s| !s.ok)
    }

    /// Pods that answered at some point.
    pub fn pods(&self) -> BTreeSet<String> {
        self.samples
            .iter()
            .filter_map(|s| s.pod().map(str::to_string))
            .collect()
    }

    /// Successes after `t`.
    pub fn successes_after(&self, t: Duration) -> usize {
        self.samples.iter().filter(|s| s.ok && s.at > t).count()
    }

    /// Failures after `t`.
    pub fn failures_after(&self, t: Duration) -> usize {
        self.samples.iter().filter(|s| !s.ok && s.at > t).count()
    }
}

/// A running prober; [`Prober::stop`] ends it and returns the timeline.
pub struct Prober {
    started: Instant,
    stop: Arc<AtomicBool>,
    timeline: Arc<Mutex<Timeline>>,
    thread: Option<InNs<()>>,
}

impl Prober {
    /// Starts probing from inside namespace `ns`.
    pub fn start(ns: &str, config: ProbeConfig) -> Result<Prober, LabError> {
        let stop = Arc::new(AtomicBool::new(false));
        let timeline = Arc::new(Mutex::new(Timeline::default()));
        let started = Instant::now();
        let (st, tl) = (stop.clone(), timeline.clone());
        let thread = netns::enter_thread(ns, move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime");
            rt.block_on(run(config, started, st, tl));
        })?;
        Ok(Prober {
            started,
            stop,
            timeline,
            thread: Some(thread),
        })
    }

    /// Time since the prober started (the timeline's clock).
    pub fn now(&self) -> Duration {
        self.started.elapsed()
    }

    /// A copy of the timeline so far.
    pub fn snapshot(&self) -> Timeline {
        self.timeline
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Waits (bounded) until `f` holds for the timeline so far.
    pub fn wait_for(
        &self,
        timeout: Duration,
        what: &str,
        f: impl Fn(&Timeline) -> bool,
    ) -> Result<(), LabError> {
        super::wait_until(timeout, what, || f(&self.snapshot()))
    }

    pub fn stop(mut self) -> Timeline {
        self.finish();
        self.snapshot()
    }

    fn finish(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            t.join();
        }
    }
}

impl Drop for Prober {
    fn drop(&mut self) {
        self.finish();
    }
}

async fn run(
    config: ProbeConfig,
    started: Instant,
    stop: Arc<AtomicBool>,
    timeline: Arc<Mutex<Timeline>>,
) {
    let neighbors = tokio::spawn(watch_neighbor(
        config.target.ip(),
        config.interval,
        started,
        stop.clone(),
        timeline.clone(),
    ));
    let mut tick = tokio::time::interval(config.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut attempts = tokio::task::JoinSet::new();
    while !stop.load(Ordering::SeqCst) {
        tick.tick().await;
        let at = started.elapsed();
        let tl = timeline.clone();
        let (target, timeout) = (config.target, config.timeout);
        attempts.spawn(async move {
            let answer = tokio::time::timeout(timeout, exchange(target))
                .await
                .ok()
                .and_then(Result::ok);
            let sample = Sample {
                at,
                ok: answer.is_some(),
                answer,
            };
            tl.lock()
                .unwrap_or_else(|e| e.into_inner())
                .samples
                .push(sample);
        });
        while attempts.try_join_next().is_some() {}
    }
    while attempts.join_next().await.is_some() {}
    let _ = neighbors.await;
}

async fn exchange(target: SocketAddr) -> std::io::Result<String> {
    let s = tokio::net::TcpStream::connect(target).await?;
    let mut line = String::new();
    tokio::io::BufReader::new(s).read_line(&mut line).await?;
    if line.is_empty() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "closed without an answer",
        ));
    }
    Ok(line.trim_end().to_string())
}

async fn watch_neighbor(
    ip: IpAddr,
    every: Duration,
    started: Instant,
    stop: Arc<AtomicBool>,
    timeline: Arc<Mutex<Timeline>>,
) {
    let Ok((conn, handle, _)) = rtnetlink::new_connection() else {
        return;
    };
    let conn = tokio::spawn(conn);
    let mut last: Option<Option<String>> = None;
    while !stop.load(Ordering::SeqCst) {
        let mac = lookup(&handle, ip).await;
        if last.as_ref() != Some(&mac) {
            let change = NeighborChange {
                at: started.elapsed(),
                mac: mac.clone(),
            };
            timeline
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .neighbors
                .push(change);
            last = Some(mac);
        }
        tokio::time::sleep(every).await;
    }
    conn.abort();
}

async fn lookup(handle: &rtnetlink::Handle, ip: IpAddr) -> Option<String> {
    let mut dump = handle.neighbours().get().execute();
    let mut found = None;
    while let Ok(Some(msg)) = dump.try_next().await {
        let dst = msg.attributes.iter().find_map(|a| match a {
            NeighbourAttribute::Destination(NeighbourAddress::Inet(v4)) => Some(IpAddr::V4(*v4)),
            NeighbourAttribute::Destination(NeighbourAddress::Inet6(v6)) => Some(IpAddr::V6(*v6)),
            _ => None,
        });
        if dst == Some(ip) {
            found = msg.attributes.iter().find_map(|a| match a {
                NeighbourAttribute::LinkLayerAddress(mac) if mac.len() == 6 => {
                    Some(format_mac(mac))
                }
                _ => None,
            });
        }
    }
    found
}

pub fn format_mac(mac: &[u8]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(ms: u64, ok: bool) -> Sample {
        Sample {
            at: Duration::from_millis(ms),
            ok,
            answer: ok.then(|| "n1-p0 192.0.2.100".to_string()),
        }
    }

    #[test]
    fn outages_run_from_the_first_failure_to_the_next_success() {
        let t = Timeline {
            samples: vec![
                s(0, true),
                s(20, false),
                s(10, true),
                s(30, false),
                s(40, true),
                s(50, false),
            ],
            neighbors: vec![],
        };
        assert_eq!(
            t.outages(),
            vec![Outage {
                start: Duration::from_millis(20),
                end: Duration::from_millis(40)
            }]
        );
        assert_eq!(t.longest_outage(), Some(Duration::from_millis(20)));
        assert!(t.failing_now());
        assert_eq!(t.pods(), BTreeSet::from(["n1-p0".to_string()]));
        assert_eq!(t.samples[0].seen_client(), Some("192.0.2.100"));
    }

    #[test]
    fn an_outage_that_never_ends_counts_to_the_last_attempt() {
        let t = Timeline {
            samples: vec![s(0, true), s(10, false), s(20, false), s(70, false)],
            neighbors: vec![],
        };
        assert!(t.outages().is_empty(), "it has not ended");
        assert_eq!(
            t.outage_after(Duration::from_millis(5)),
            Duration::from_millis(60)
        );
    }
}
