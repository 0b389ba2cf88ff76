//! `l2s-bench`: the numbers behind BENCHMARKS.md, measured in the lab. Not a test: it prints
//! what it measured and writes `<out>/results.json` and `<out>/failover-timeline.svg`.
//!
//! Build in release first: `cargo build --release --workspace`, then
//! `sudo ./target/release/l2s-bench --drills 20 --out bench-results`.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::Parser;
use k8s_openapi::api::core::v1::Service;
use kube::Api;
use kube::api::PostParams;
use l2speaker::svg::{Mark, timeline};
use l2speaker_e2e::lab::{Lab, LabConfig, netns};
use l2speaker_e2e::testbed::{Testbed, Timing, endpoints, eventually, lab_bin, service};
use serde_json::{Value, json};

mod kernel;

#[derive(Parser, Debug)]
#[command(about = "Failover, API load, DNAT and footprint benchmarks in the lab")]
struct Args {
    /// Drills per failover kind (see also --default-drills).
    #[arg(long, default_value_t = 20)]
    drills: usize,
    /// Seconds over which idle CPU and memory are measured.
    #[arg(long, default_value_t = 10)]
    window: u64,
    /// How long each false-declaration run lasts (idle, then both cores busy), per profile.
    #[arg(long, default_value_t = 120)]
    load_seconds: u64,
    /// Hard drills of the default LAN profile over IPv4 (the headline number).
    #[arg(long, default_value_t = 100)]
    default_drills: usize,
    /// Where results.json and the SVG go.
    #[arg(long, default_value = "bench-results")]
    out: PathBuf,
    /// IP counts for the API-load runs.
    #[arg(long, value_delimiter = ',', default_value = "10,100,1000")]
    ips: Vec<usize>,
    /// How long each API outage lasts (api-outage).
    #[arg(long, default_value_t = 60)]
    outage_seconds: u64,
    /// Service counts for the kernel-repair runs.
    #[arg(long, value_delimiter = ',', default_value = "10,1000")]
    repair_services: Vec<usize>,
    /// Runs per fault in the kernel-repair runs.
    #[arg(long, default_value_t = 10)]
    repair_runs: usize,
    /// Only these parts (failover, failover-lease, api-outage, node-ips, shutdown, api,
    /// api-lease, heartbeat, false-declarations, dnat, kernel); all by default.
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
}

/// A pool only n1 and n2 may announce, and a Service on it whose one pod runs on n3: killing
/// the owner never kills the pod, so the outage is the failover alone.
const DRILL_POOL: &str = "apiVersion: l2speaker.io/v1alpha1
kind: IPPool
metadata:
  name: drill
spec:
  addresses: [192.0.2.252/30, \"2001:db8::fc/126\"]
  autoAssign: false
  nodeSelector: {l2speaker.io/drill: \"yes\"}
";

fn stats(v: &[u64]) -> Value {
    let mut s = v.to_vec();
    s.sort_unstable();
    let p = |q: f64| l2speaker::drill::percentile(&s, q);
    json!({"n": s.len(), "p50_ms": p(50.0), "p99_ms": p(99.0), "max_ms": s.last().copied().unwrap_or(0), "all_ms": v})
}

fn profile(t: Timing) -> String {
    match t.lan {
        Some((i, d)) => format!("LAN mode, heartbeat {i} ms, dead after {d} ms"),
        None => format!("lease {} s per IP", t.lease_seconds),
    }
}

async fn drill_bed(timing: Timing, v6: bool) -> (Testbed, IpAddr) {
    let tb = Testbed::new(vec![0, 0, 1], timing).await;
    for n in ["node-1", "node-2"] {
        tb.kubectl
            .run(&["label", "node", n, "l2speaker.io/drill=yes"])
            .await
            .ok();
    }
    tb.apply(DRILL_POOL).await;
    let pods: Vec<_> = tb.lab.pods().cloned().collect();
    tb.apply(&endpoints("drill", &pods)).await;
    let family = if v6 {
        "  ipFamilyPolicy: SingleStack\n  ipFamilies: [IPv6]\n"
    } else {
        "  ipFamilyPolicy: SingleStack\n  ipFamilies: [IPv4]\n"
    };
    tb.apply(&service("drill", family, "l2speaker.io/pool: drill"))
        .await;
    let ip = tb.wait_ips("default", "drill", 1).await[0];
    tb.wait_owner(ip).await;
    if timing.lan.is_some() {
        // New members count after they settle (10 s).
        tokio::time::sleep(Duration::from_secs(11)).await;
    }
    (tb, ip)
}

/// The API server down for everyone for `secs` — frozen (requests held), refusing (503) and
/// black-holed (connections accepted, never answered) — then 5 s more after it is back (a
/// frozen server: until everything it held has been served, `secs` more): the
/// longest outage a client connecting every 10 ms saw, its failed attempts, and whether the
/// VIP moved (its Lease's transitions).
async fn api_outage(timing: Timing, secs: u64) -> Value {
    let (tb, ip) = drill_bed(timing, false).await;
    let faults = [
        (
            "frozen",
            json!({"action": "delay", "ms": secs * 1000, "phase": "before"}),
        ),
        ("refusing", json!({"action": "fail", "code": 503})),
        ("black-holed", json!({"action": "blackhole"})),
    ];
    let mut rows = Vec::new();
    for (what, fault) in faults {
        let owner = tb.wait_owner(ip).await;
        let before = tb.transitions(ip).await;
        let prober = tb.probe(ip).unwrap();
        tokio::time::sleep(Duration::from_millis(500)).await;
        let from = prober.now();
        tb.api_fault(fault);
        tokio::time::sleep(Duration::from_secs(secs)).await;
        tb.clear_api_faults();
        // A frozen server still holds what it received during the fault, for up to `secs`
        // after it is cleared: the drill lasts until all of it has been served.
        let tail = if what == "frozen" { secs + 5 } else { 5 };
        tokio::time::sleep(Duration::from_secs(tail)).await;
        let t = prober.stop();
        let outage = t.outage_after(from);
        let moved = tb.transitions(ip).await - before;
        let now_owner = tb.wait_owner(ip).await;
        println!(
            "API server {what} for {secs} s, {}: outage {} ms, {} of {} attempts failed, Lease moved {moved} times ({owner} -> {now_owner})",
            profile(timing),
            outage.as_millis(),
            t.failures(),
            t.failures() + t.successes()
        );
        rows.push(json!({
            "fault": what,
            "seconds": secs,
            "outage_ms": outage.as_millis() as u64,
            "failed_attempts": t.failures(),
            "attempts": t.failures() + t.successes(),
            "lease_moves": moved,
        }));
        // Whatever moved settles before the next fault.
        tokio::time::sleep(Duration::from_secs(3)).await;
    }
    json!({"profile": profile(timing), "faults": rows})
}

fn metric_sum(tb: &Testbed, host: &str, prefix: &str) -> f64 {
    let addr = SocketAddr::new(IpAddr::V4(tb.lab.host(host).unwrap().ipv4), 9473);
    tb.lab
        .http_get("client", addr, "/metrics")
        .map(|(_, body)| {
            body.lines()
                .filter(|l| l.starts_with(prefix))
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .sum()
        })
        .unwrap_or(0.0)
}

/// Hard (link cut + kill) or graceful (SIGTERM) drills; the first one is drawn.
async fn failover(kind: &str, timing: Timing, n: usize, v6: bool, out: &std::path::Path) -> Value {
    let (tb, ip) = drill_bed(timing, v6).await;
    let mut outages = Vec::new();
    for i in 0..n {
        let owner = tb.wait_owner(ip).await;
        let prober = tb.probe(ip).unwrap();
        let draw = i == 0;
        let mut marks = Vec::new();
        let before: BTreeMap<String, f64> = tb
            .node_names()
            .iter()
            .map(|h| {
                (
                    h.clone(),
                    metric_sum(&tb, h, "l2speaker_announcements_total"),
                )
            })
            .collect();
        let fault = prober.now();
        if kind == "hard" {
            tb.lab.cut_link(&owner).unwrap();
            tb.speaker(&owner).kill();
            marks.push(Mark {
                at: fault,
                label: format!("{owner}: link cut, speaker killed"),
                kind: "fault",
            });
        } else {
            tb.speaker(&owner)
                .signal(nix::sys::signal::Signal::SIGTERM)
                .unwrap();
            marks.push(Mark {
                at: fault,
                label: format!("{owner}: SIGTERM"),
                kind: "fault",
            });
        }
        let mut announced = false;
        let new_owner = eventually(Duration::from_secs(30), "a new owner", async || {
            if draw && !announced {
                for h in tb.node_names().iter().filter(|h| **h != owner) {
                    if metric_sum(&tb, h, "l2speaker_announcements_total") > before[h] {
                        marks.push(Mark {
                            at: prober.now(),
                            label: format!("{h}: first announcement seen"),
                            kind: "announce",
                        });
                        announced = true;
                    }
                }
            }
            if timing.lan.is_some() {
                // A killed owner keeps its address (its gate is closed): the new owner is the
                // holder once it has the address bound.
                let host = tb.host_of(&tb.holder(ip).await?);
                (host != owner && tb.bound_on(ip).contains(&host)).then_some(host)
            } else {
                tb.other_owner(ip, &owner).await
            }
        })
        .await;
        if draw {
            marks.push(Mark {
                at: prober.now(),
                label: format!("Lease holder: {new_owner}"),
                kind: "lease",
            });
        }
        prober
            .wait_for(Duration::from_secs(20), "answers after", |t| {
                t.successes_after(fault) >= 30
            })
            .unwrap();
        let t = prober.stop();
        let outage = t.outage_after(fault);
        println!(
            "{kind} drill {} ({}, {ip}): {owner} → {new_owner}, outage {} ms",
            i + 1,
            profile(timing),
            outage.as_millis()
        );
        outages.push(outage.as_millis() as u64);
        if draw {
            for (a, b) in t.neighbors.iter().zip(t.neighbors.iter().skip(1)) {
                if a.mac != b.mac {
                    marks.push(Mark {
                        at: b.at,
                        label: format!("client ARP → {}", b.mac.clone().unwrap_or("none".into())),
                        kind: "neighbor",
                    });
                }
            }
            let attempts: Vec<(Duration, bool)> = t.samples.iter().map(|s| (s.at, s.ok)).collect();
            let from = fault.saturating_sub(Duration::from_millis(500));
            let to = t
                .samples
                .iter()
                .filter(|s| s.ok && s.at > fault)
                .map(|s| s.at)
                .nth(20)
                .unwrap_or(fault)
                + Duration::from_millis(300);
            let title = format!(
                "{kind} failover, {}: outage {} ms seen by a client connecting every 10 ms",
                profile(timing),
                outage.as_millis()
            );
            let name = match timing.lan {
                Some((i, _)) if v6 => format!("failover-{kind}-lan{i}ms-ipv6.svg"),
                Some((i, _)) => format!("failover-{kind}-lan{i}ms.svg"),
                None => format!("failover-{kind}-lease{}s.svg", timing.lease_seconds),
            };
            std::fs::write(
                out.join(&name),
                timeline(&title, &attempts, &marks, from, to),
            )
            .unwrap();
        }
        if kind == "hard" {
            tb.lab.heal_link(&owner).unwrap();
        } else {
            tb.speaker(&owner).wait_timeout(Duration::from_secs(10));
        }
        tb.start_speaker(&owner);
        let addr = SocketAddr::new(IpAddr::V4(tb.lab.host(&owner).unwrap().ipv4), 9473);
        eventually(
            Duration::from_secs(20),
            "the restarted speaker ready",
            async || {
                tb.lab
                    .http_get("client", addr, "/readyz")
                    .ok()
                    .filter(|(c, _)| *c == 200)
            },
        )
        .await;
        if timing.lan.is_some() {
            // Steady state again before the next drill: every speaker heard by the others,
            // and no node Lease marked as answering on its renewals alone (a node the
            // returning one had not acked yet; a take-over from it would wait 2 s).
            eventually(
                Duration::from_secs(20),
                "steady state on the LAN",
                async || {
                    let all_heard = tb
                        .node_names()
                        .iter()
                        .all(|h| metric_sum(&tb, h, "l2speaker_peers_hearing_us") == 2.0);
                    let leases = l2speaker::status::fetch(tb.client.clone(), "l2speaker-system")
                        .await
                        .ok()?;
                    let marked = leases.iter().any(|l| {
                        l.metadata.annotations.as_ref().is_some_and(|a| {
                            a.get(l2speaker::node_lease::ANNOTATION_API_PATH).is_some()
                        })
                    });
                    (all_heard && !marked).then_some(())
                },
            )
            .await;
        }
    }
    stats(&outages)
}

fn counters(tb: &Testbed) -> BTreeMap<String, u64> {
    tb.lab.api.as_ref().unwrap().server.store.requests()
}

fn rates(a: &BTreeMap<String, u64>, b: &BTreeMap<String, u64>, secs: f64) -> BTreeMap<String, f64> {
    let mut by_verb: BTreeMap<String, f64> = BTreeMap::new();
    for (k, v) in b {
        let d = v - a.get(k).copied().unwrap_or(0);
        if d > 0 {
            *by_verb
                .entry(k.split(' ').next().unwrap_or("").to_string())
                .or_default() += d as f64 / secs;
        }
    }
    by_verb
        .into_iter()
        .map(|(k, v)| (k, (v * 10.0).round() / 10.0))
        .collect()
}

/// A field of /proc/PID/status in KiB (0 if the process is gone).
fn status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// Resident memory as JSON: all of it, and the part that is the process's own heap and stacks
/// (anonymous) rather than pages of the binary and libraries (file).
fn rss_json(pid: u32) -> (f64, f64, f64) {
    let mib = |k: u64| (k as f64 / 1024.0 * 10.0).round() / 10.0;
    (
        mib(status_kib(pid, "VmRSS")),
        mib(status_kib(pid, "RssAnon")),
        mib(status_kib(pid, "RssFile")),
    )
}

/// Resident memory (KiB) and CPU seconds of a process.
fn usage(pid: u32) -> (u64, f64) {
    let rss = status_kib(pid, "VmRSS");
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect();
    let ticks: f64 = fields
        .get(11)
        .and_then(|u| u.parse::<f64>().ok())
        .unwrap_or(0.0)
        + fields
            .get(12)
            .and_then(|s| s.parse::<f64>().ok())
            .unwrap_or(0.0);
    (rss, ticks / 100.0)
}

fn footprint(tb: &Testbed, window: Duration, during: impl FnOnce()) -> Value {
    let pids: Vec<(String, u32)> = tb
        .node_names()
        .iter()
        .map(|h| (h.clone(), tb.speaker(h).pid))
        .collect();
    let before: Vec<(u64, f64)> = pids.iter().map(|(_, p)| usage(*p)).collect();
    let t0 = Instant::now();
    during();
    std::thread::sleep(window.saturating_sub(t0.elapsed()));
    let secs = t0.elapsed().as_secs_f64();
    let per: Vec<Value> = pids
        .iter()
        .zip(before)
        .map(|((h, p), (_, cpu0))| {
            let (_, cpu1) = usage(*p);
            let (rss, anon, file) = rss_json(*p);
            json!({"node": h, "rss_mib": rss, "rss_anon_mib": anon, "rss_file_mib": file, "cpu_percent": ((cpu1 - cpu0) / secs * 1000.0).round() / 10.0})
        })
        .collect();
    json!(per)
}

async fn api_load(counts: &[usize], timing: Timing, window: Duration) -> Value {
    let mut out = Vec::new();
    for &n in counts {
        let tb = Testbed::new(vec![0, 0, 0], timing).await;
        tb.apply("apiVersion: l2speaker.io/v1alpha1\nkind: IPPool\nmetadata:\n  name: many\nspec:\n  addresses: [2001:db8::1:0/112]\n").await;
        let api: Api<Service> = Api::namespaced(tb.client.clone(), "default");
        let created = Instant::now();
        for i in 0..n {
            let s: Service = serde_yaml::from_str(&service(
                &format!("s{i}"),
                "  ipFamilies: [IPv6]\n",
                "l2speaker.io/pool: many",
            ))
            .unwrap();
            api.create(&PostParams::default(), &s).await.unwrap();
        }
        let what = format!("{n} IPs owned");
        let owned = eventually(Duration::from_secs(600), &what, async || {
            let leases = l2speaker::status::fetch(tb.client.clone(), "l2speaker-system")
                .await
                .ok()?;
            let held = leases
                .iter()
                .filter(|l| {
                    l.metadata
                        .name
                        .as_deref()
                        .is_some_and(|x| x.starts_with("vip-"))
                        && l.spec
                            .as_ref()
                            .and_then(|s| s.holder_identity.as_ref())
                            .is_some()
                })
                .count();
            (held == n).then_some(())
        });
        owned.await;
        let settle = created.elapsed();
        tokio::time::sleep(Duration::from_secs(3)).await;
        let watched = |tb: &Testbed| -> Vec<f64> {
            tb.node_names()
                .iter()
                .map(|h| metric_sum(tb, h, "l2speaker_watch_events_total"))
                .collect()
        };
        let w0 = watched(&tb);
        let a = counters(&tb);
        let idle = footprint(&tb, window, || {});
        let b = counters(&tb);
        let w1 = watched(&tb);
        let steady = rates(&a, &b, window.as_secs_f64());
        // Objects each speaker's watches delivered per second (the metrics scrape itself
        // falls outside the window).
        let watch_rates: Vec<f64> = w0
            .iter()
            .zip(&w1)
            .map(|(x, y)| ((y - x) / window.as_secs_f64() * 100.0).round() / 100.0)
            .collect();
        // The storm: the node with the most IPs dies.
        let leases = l2speaker::status::fetch(tb.client.clone(), "l2speaker-system")
            .await
            .unwrap();
        let mut per: BTreeMap<String, usize> = BTreeMap::new();
        for l in &leases {
            if let Some(h) = l
                .spec
                .as_ref()
                .and_then(|s| s.holder_identity.clone())
                .filter(|_| {
                    l.metadata
                        .name
                        .as_deref()
                        .is_some_and(|x| x.starts_with("vip-"))
                })
            {
                *per.entry(h).or_default() += 1;
            }
        }
        let (victim, count) = per
            .iter()
            .max_by_key(|(_, c)| **c)
            .map(|(h, c)| (h.clone(), *c))
            .unwrap();
        let victim_host = tb.host_of(&victim);
        let a = counters(&tb);
        let storm_start = Instant::now();
        tb.lab.cut_link(&victim_host).unwrap();
        tb.speaker(&victim_host).kill();
        let survivors: Vec<String> = tb
            .node_names()
            .into_iter()
            .filter(|h| *h != victim_host)
            .collect();
        let storm_pids: Vec<(String, u32)> = survivors
            .iter()
            .map(|h| (h.clone(), tb.speaker(h).pid))
            .collect();
        let cpu0: Vec<f64> = storm_pids.iter().map(|(_, p)| usage(*p).1).collect();
        eventually(
            Duration::from_secs(600),
            "every IP of the dead node moved",
            async || {
                let leases = l2speaker::status::fetch(tb.client.clone(), "l2speaker-system")
                    .await
                    .ok()?;
                let left = leases
                    .iter()
                    .filter(|l| {
                        l.metadata
                            .name
                            .as_deref()
                            .is_some_and(|x| x.starts_with("vip-"))
                            && l.spec.as_ref().and_then(|s| s.holder_identity.as_deref())
                                == Some(victim.as_str())
                    })
                    .count();
                (left == 0).then_some(())
            },
        )
        .await;
        let moved_in = storm_start.elapsed();
        let storm_secs = moved_in.as_secs_f64().max(0.1);
        let b = counters(&tb);
        let storm = rates(&a, &b, storm_secs);
        let storm_fp: Vec<Value> = storm_pids
            .iter()
            .zip(cpu0)
            .map(|((h, p), c0)| {
                let (rss, c1) = usage(*p);
                json!({"node": h, "rss_mib": (rss as f64 / 1024.0 * 10.0).round() / 10.0, "cpu_percent": ((c1 - c0) / storm_secs * 1000.0).round() / 10.0})
            })
            .collect();
        println!("  watch events per speaker per second, idle: {watch_rates:?}");
        println!(
            "API load, {n} IPs: settled in {:.1} s; steady {steady:?} req/s; storm ({count} IPs of {victim}) moved in {:.1} s, {storm:?} req/s",
            settle.as_secs_f64(),
            moved_in.as_secs_f64()
        );
        println!(
            "  footprint idle {idle}; during the storm {}",
            json!(storm_fp)
        );
        out.push(json!({"ips": n, "settle_s": settle.as_secs_f64(), "steady_req_per_s": steady, "watch_events_per_speaker_per_s": watch_rates, "storm": {"ips_moved": count, "moved_in_s": moved_in.as_secs_f64(), "req_per_s": storm}, "footprint_idle": idle, "footprint_storm": storm_fp}));
    }
    json!(out)
}

fn dnat() -> Value {
    use l2speaker::dataplane::nft::{Dnat, Endpoint, PortMap, desired, render_diff, render_full};
    use l2speaker::service::Protocol;
    let lab = Lab::new(LabConfig {
        api_server: false,
        ..LabConfig::new(lab_bin(), vec![0])
    })
    .expect("a lab (root)");
    let ns = lab.host("n1").unwrap().ns.clone();
    let svc = |i: u32, eps: u16| Dnat {
        vip: IpAddr::V6(std::net::Ipv6Addr::new(
            0x2001, 0xdb8, 0, 0, 0, 0, 2, i as u16,
        )),
        ports: vec![PortMap {
            protocol: Protocol::Tcp,
            port: 80,
            endpoints: (0..eps)
                .map(|e| Endpoint {
                    ip: IpAddr::V6(std::net::Ipv6Addr::new(
                        0x2001, 0xdb8, 0x100, 1, 0, 0, e, i as u16,
                    )),
                    port: 8080,
                    local: e % 2 == 0,
                })
                .collect(),
        }],
        sources: None,
        affinity: None,
    };
    let base: Vec<Dnat> = (0..1000).map(|i| svc(i, 3)).collect();
    let apply = |script: &str| {
        let t = Instant::now();
        netns::exec(&ns, "nft", &["-f", "-"], Some(script)).expect("nft accepts the script");
        t.elapsed().as_secs_f64() * 1000.0
    };
    let d0 = desired(&base);
    let full = apply(&render_full(&d0));
    let mut changed = base.clone();
    changed[500] = svc(500, 2);
    let d1 = desired(&changed);
    let endpoint_change = apply(&render_diff(&d0, &d1).unwrap());
    let mut more = changed.clone();
    more.push(svc(1000, 3));
    let d2 = desired(&more);
    let new_service = apply(&render_diff(&d1, &d2).unwrap());
    let resync = apply(&render_full(&d2));
    let r = json!({"services": 1000, "full_replace_ms": full, "endpoint_change_ms": endpoint_change, "new_service_ms": new_service, "full_resync_ms": resync});
    println!("DNAT with 1000 Services: {r}");
    r
}

/// The heartbeats' cost: on a lab of 3 speakers (CPU, memory, bytes per second of each),
/// then with 97 more peers on the LAN — a process on the client sends their heartbeats,
/// signed with the real key, every 100 ms, each acking the 99 others — as at 100 nodes.
/// False declarations: three speakers holding ten VIPs, left alone for `secs`, then for
/// `secs` with both cores kept busy by two spinning threads at normal priority (the API
/// server, in this process, competes too). A declaration of a live peer is a false one; a
/// VIP that moves is what a user would notice.
async fn false_declarations(secs: u64) -> Value {
    let mut out = serde_json::Map::new();
    for (name, timing) in [("default", Timing::LAN), ("fast", Timing::LAN_FAST)] {
        let tb = Testbed::new(vec![1, 1, 0], timing).await;
        let pods: Vec<_> = tb.lab.pods().cloned().collect();
        let mut ips = Vec::new();
        for i in 0..10 {
            let svc = format!("fd{i}");
            tb.apply(&endpoints(&svc, &pods)).await;
            tb.apply(&service(&svc, "", "")).await;
            ips.push(tb.wait_ips("default", &svc, 1).await[0]);
        }
        for ip in &ips {
            tb.wait_owner(*ip).await;
        }
        // New members count after they settle.
        tokio::time::sleep(Duration::from_secs(11)).await;
        let mut rows = Vec::new();
        for busy in [false, true] {
            let declared = |tb: &Testbed| -> f64 {
                tb.node_names()
                    .iter()
                    .map(|h| metric_sum(tb, h, "l2speaker_peers_declared_dead"))
                    .sum()
            };
            let transitions = async |tb: &Testbed| -> i64 {
                let mut n = 0;
                for ip in &ips {
                    n += tb.transitions(*ip).await as i64;
                }
                n
            };
            let (d0, t0) = (declared(&tb), transitions(&tb).await);
            let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
            let spinners: Vec<_> = (0..if busy { 2 } else { 0 })
                .map(|_| {
                    let stop = stop.clone();
                    std::thread::spawn(move || {
                        let mut x = 0u64;
                        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                            x = std::hint::black_box(x.wrapping_add(1));
                        }
                    })
                })
                .collect();
            tokio::time::sleep(Duration::from_secs(secs)).await;
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
            for t in spinners {
                t.join().unwrap();
            }
            let (d1, t1) = (declared(&tb), transitions(&tb).await);
            println!(
                "false declarations ({}, {}): {} declarations, {} VIP moves in {secs} s",
                profile(timing),
                if busy { "both cores busy" } else { "idle" },
                d1 - d0,
                t1 - t0
            );
            rows.push(json!({"both_cores_busy": busy, "seconds": secs, "declarations": d1 - d0, "vip_moves": t1 - t0}));
        }
        out.insert(
            name.to_string(),
            json!({"profile": profile(timing), "runs": rows}),
        );
    }
    Value::Object(out)
}

async fn heartbeat_cost(window: Duration) -> Value {
    let tb = Testbed::new(vec![0, 0, 0], Timing::LAN).await;
    let hosts = tb.node_names();
    eventually(
        Duration::from_secs(20),
        "the speakers hear each other",
        async || {
            hosts
                .iter()
                .all(|h| metric_sum(&tb, h, "l2speaker_peers_alive") == 2.0)
                .then_some(())
        },
    )
    .await;
    let sums = |tb: &Testbed| -> Vec<(f64, f64)> {
        hosts
            .iter()
            .map(|h| {
                (
                    metric_sum(tb, h, "l2speaker_heartbeat_sent_bytes_total"),
                    metric_sum(tb, h, "l2speaker_heartbeat_received_bytes_total"),
                )
            })
            .collect()
    };
    let measure = |tb: &Testbed, during: Box<dyn FnOnce()>| {
        let a = sums(tb);
        let fp = footprint(tb, window, during);
        let b = sums(tb);
        let secs = window.as_secs_f64();
        let bytes: Vec<Value> = a
            .iter()
            .zip(b)
            .map(|((s0, r0), (s1, r1))| {
                json!({"sent_bytes_per_s": ((s1 - s0) / secs).round(), "received_bytes_per_s": ((r1 - r0) / secs).round()})
            })
            .collect();
        json!({"footprint": fp, "traffic": bytes})
    };
    let three = measure(&tb, Box::new(|| {}));
    println!("heartbeats, 3 speakers: {three}");
    // 97 more peers.
    let secrets: Api<k8s_openapi::api::core::v1::Secret> =
        Api::namespaced(tb.client.clone(), "l2speaker-system");
    let secret = secrets
        .get(l2speaker::liveness::keys::SECRET)
        .await
        .unwrap();
    let (keys, _) = l2speaker::liveness::keys::keys_from(&secret.data.unwrap_or_default());
    let real: Vec<String> = hosts
        .iter()
        .map(|h| tb.lab.host(h).unwrap().node_name())
        .collect();
    let ns = tb.lab.client().ns.clone();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let st = stop.clone();
    let sender = netns::enter_thread(&ns, move || {
        use l2speaker::liveness::wire::{Heartbeat, encode, node_id};
        let s = std::net::UdpSocket::bind(("0.0.0.0", 0)).unwrap();
        s.set_broadcast(true).unwrap();
        let fake: Vec<String> = (0..97).map(|i| format!("sim-{i}")).collect();
        let everyone: Vec<u32> = fake.iter().chain(real.iter()).map(|n| node_id(n)).collect();
        let mut frames = 0u64;
        while !st.load(std::sync::atomic::Ordering::SeqCst) {
            let t0 = Instant::now();
            for n in &fake {
                let seq = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_micros() as u64;
                let me = node_id(n);
                let hb = Heartbeat {
                    node: n.clone(),
                    seq,
                    generation: 1,
                    interval_ms: 100,
                    acks: everyone
                        .iter()
                        .filter(|x| **x != me)
                        .map(|x| (*x, seq))
                        .collect(),
                    dead: vec![],
                };
                let (f, _) = encode(&hb, &keys);
                let _ = s.send_to(&f, ("192.0.2.255", l2speaker::liveness::DEFAULT_PORT));
                frames += 1;
            }
            std::thread::sleep(Duration::from_millis(100).saturating_sub(t0.elapsed()));
        }
        frames
    })
    .unwrap();
    eventually(
        Duration::from_secs(20),
        "the simulated peers are heard",
        async || {
            hosts
                .iter()
                .all(|h| metric_sum(&tb, h, "l2speaker_peers_alive") >= 99.0)
                .then_some(())
        },
    )
    .await;
    let hundred = measure(&tb, Box::new(|| {}));
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let frames = sender.join();
    println!("heartbeats, 3 speakers + 97 simulated peers ({frames} frames sent): {hundred}");
    json!({"three_nodes": three, "hundred_nodes": hundred})
}

/// Time from SIGTERM to exit: of a speaker that owns nothing, and of the owner (which
/// unbinds and releases first). The speaker is started again between runs.
/// Node-IP mode: a node whose link is cut and speaker killed, until its address is out of the
/// Service's status; `n` drills on nodes that do not run the allocator and `n_allocator` on
/// the allocator's node (another speaker takes over the allocator's Lease first).
async fn node_ip_removal(n: usize, n_allocator: usize) -> Value {
    let tb = Testbed::without_pool(vec![1, 1, 1], Timing::LAN).await;
    let pods: Vec<_> = tb.lab.pods().cloned().collect();
    tb.apply(&endpoints("web", &pods)).await;
    tb.apply(&service("web", "", "")).await;
    let api: Api<Service> = Api::namespaced(tb.client.clone(), "default");
    let leases: Api<k8s_openapi::api::coordination::v1::Lease> =
        Api::namespaced(tb.client.clone(), l2speaker_e2e::testbed::NAMESPACE);
    let published = async |count: usize, without: Option<IpAddr>| {
        eventually(Duration::from_secs(60), "the status", async || {
            let s = api.get_opt("web").await.ok()??;
            let ips: Vec<String> = s
                .status?
                .load_balancer?
                .ingress?
                .into_iter()
                .filter_map(|i| i.ip)
                .collect();
            let gone = without.is_none_or(|w| !ips.contains(&w.to_string()));
            (ips.len() == count && gone).then_some(())
        })
        .await
    };
    published(3, None).await;
    // Every speaker a settled member, so a majority may declare a node dead.
    tokio::time::sleep(Duration::from_secs(12)).await;
    let mut other = Vec::new();
    let mut allocator = Vec::new();
    for i in 0..n + n_allocator {
        let boss = leases
            .get("l2speaker-allocator")
            .await
            .ok()
            .and_then(|l| l.spec?.holder_identity)
            .map(|h| tb.host_of(&h))
            .expect("an allocator");
        let on_boss = i >= n;
        let victim = if on_boss {
            boss.clone()
        } else {
            tb.node_names()
                .into_iter()
                .filter(|h| *h != boss)
                .nth(i % 2)
                .expect("two other nodes")
        };
        let ip = IpAddr::V4(tb.lab.host(&victim).unwrap().ipv4);
        let t0 = std::time::Instant::now();
        tb.lab.cut_link(&victim).unwrap();
        tb.speaker(&victim).kill();
        published(2, Some(ip)).await;
        let ms = t0.elapsed().as_millis() as u64;
        println!(
            "node-IP drill {i}: {victim}{} out of the status after {ms} ms",
            if on_boss { " (the allocator)" } else { "" }
        );
        if on_boss {
            allocator.push(ms)
        } else {
            other.push(ms)
        }
        tb.lab.heal_link(&victim).unwrap();
        tb.start_speaker(&victim);
        published(3, None).await;
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    json!({
        "profile": profile(Timing::LAN),
        "node_not_running_the_allocator": stats(&other),
        "node_running_the_allocator": stats(&allocator),
    })
}

async fn shutdown(n: usize) -> Value {
    let (tb, ip) = drill_bed(Timing::DEFAULT, false).await;
    let mut idle = Vec::new();
    let mut owner_ms = Vec::new();
    for _ in 0..n {
        let owner = tb.wait_owner(ip).await;
        let spare = tb.host_of("node-3");
        for (host, out) in [(spare, &mut idle), (owner, &mut owner_ms)] {
            let p = tb.speaker(&host);
            let t0 = std::time::Instant::now();
            p.signal(nix::sys::signal::Signal::SIGTERM).unwrap();
            p.wait_timeout(Duration::from_secs(30))
                .expect("the speaker exits");
            out.push(t0.elapsed().as_millis() as u64);
            tb.start_speaker(&host);
        }
        tb.wait_owner(ip).await;
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    json!({"idle_exit_ms": stats(&idle), "owner_exit_ms": stats(&owner_ms)})
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let want = |p: &str| args.only.is_empty() || args.only.iter().any(|o| o == p);
    let window = Duration::from_secs(args.window);
    std::fs::create_dir_all(&args.out).unwrap();
    let mut results = json!({
        "machine": {"cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
                    "kernel": std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim(),
                    "build": if cfg!(debug_assertions) { "debug" } else { "release" }},
    });
    if want("failover") {
        let (d, n, out) = (args.default_drills, args.drills, &args.out);
        results["failover_lan"] = json!({
            "hard_default": failover("hard", Timing::LAN, d, false, out).await,
            "hard_default_ipv6": failover("hard", Timing::LAN, n, true, out).await,
            "hard_fast": failover("hard", Timing::LAN_FAST, n, false, out).await,
            "hard_fast_ipv6": failover("hard", Timing::LAN_FAST, n, true, out).await,
            "graceful": failover("graceful", Timing::LAN, n, false, out).await,
        });
    }
    if want("failover-lease") {
        results["failover"] = json!({
            "hard_short": failover("hard", Timing::SHORT, args.drills, false, &args.out).await,
            "hard_default": failover("hard", Timing::DEFAULT, args.drills, false, &args.out).await,
            "graceful": failover("graceful", Timing::DEFAULT, args.drills, false, &args.out).await,
        });
    }
    if want("api-outage") {
        results["api_outage"] = json!({
            "lan_default": api_outage(Timing::LAN, args.outage_seconds).await,
            "lease_default": api_outage(Timing::DEFAULT, args.outage_seconds).await,
        });
    }
    if want("node-ips") {
        results["node_ip_removal"] = node_ip_removal(args.drills, args.drills.min(10)).await;
    }
    if want("shutdown") {
        results["shutdown"] = shutdown(args.drills.min(10)).await;
    }
    if want("heartbeat") {
        results["heartbeat"] = heartbeat_cost(window).await;
    }
    if want("false-declarations") {
        results["false_declarations"] = false_declarations(args.load_seconds).await;
    }
    if want("dnat") {
        results["dnat"] = tokio::task::spawn_blocking(dnat).await.unwrap();
    }
    if want("kernel") {
        results["kernel_repair"] =
            kernel::kernel_repair(&args.repair_services, args.repair_runs, window).await;
    }
    if want("api") {
        results["api_load_lan"] = api_load(&args.ips, Timing::LAN, window).await;
    }
    if want("api-lease") {
        results["api_load"] = api_load(&args.ips, Timing::DEFAULT, window).await;
    }
    let path = args.out.join("results.json");
    std::fs::write(&path, serde_json::to_string_pretty(&results).unwrap()).unwrap();
    println!("{}", serde_json::to_string_pretty(&results).unwrap());
    println!("written to {}", path.display());
}
