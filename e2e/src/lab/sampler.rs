//! Who answers for a VIP, sampled every few milliseconds without starting a process per
//! sample:
//!
//! - on the wire: from the client's segment, an ARP request every `every`, each from its own
//!   source MAC (and sender address 0.0.0.0, an RFC 5227 probe, so no node learns anything
//!   from it); every reply names the request it answers, so two MACs answering one request
//!   are two nodes answering at the same moment;
//! - in the kernels: each node's address list and its gate (the `live` element of the
//!   speaker's kernel switch; no gate table means nothing is gated) read over netlink from a
//!   thread inside its namespace; two nodes holding the address with the gate open over
//!   overlapping stretches of samples are two owners at once. (A killed speaker's node may
//!   keep the address with its gate closed: it does not answer, and does not count.)

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use l2speaker::dataplane::addr::{AddrOps, Netlink};
use pnet_datalink::{Channel, MacAddr};
use pnet_packet::Packet;
use pnet_packet::arp::{ArpOperations, ArpPacket};
use pnet_packet::ethernet::{EtherTypes, EthernetPacket};

use super::LabError;
use super::netns::{self, InNs};

/// One ARP request for a VIP and the MACs that answered it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Round {
    pub at: Duration,
    pub macs: Vec<String>,
}

/// One read of a node's addresses: whether the VIP was there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Read {
    pub at: Duration,
    pub bound: bool,
    /// The gate lets the node answer (open, or no gate at all).
    pub open: bool,
}

/// Everything sampled, per VIP.
#[derive(Debug, Clone, Default)]
pub struct AllSamples {
    pub vips: BTreeMap<IpAddr, Samples>,
}

impl AllSamples {
    /// The one VIP's samples (panics if it was not sampled).
    pub fn of(&self, ip: IpAddr) -> &Samples {
        &self.vips[&ip]
    }

    /// Every VIP with two answering MACs in one round or two nodes holding it at once,
    /// with what was seen.
    pub fn violations(&self) -> Vec<String> {
        let mut out = Vec::new();
        for (ip, s) in &self.vips {
            for r in s.double_answers() {
                out.push(format!("{ip}: at {:?} ARP answered by {:?}", r.at, r.macs));
            }
            for (a, b, from, to) in s.double_binds() {
                out.push(format!(
                    "{ip}: bound with the gate open on {a} and {b} from {from:?} to {to:?}"
                ));
            }
        }
        out
    }

    pub fn summary(&self) -> String {
        self.vips
            .iter()
            .map(|(ip, s)| format!("{ip}: {}", s.summary()))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

#[derive(Debug, Clone, Default)]
pub struct Samples {
    pub rounds: Vec<Round>,
    /// Per node (lab host name): its reads, in order.
    pub kernels: BTreeMap<String, Vec<Read>>,
}

impl Samples {
    /// ARP rounds answered by more than one MAC.
    pub fn double_answers(&self) -> Vec<&Round> {
        self.rounds.iter().filter(|r| r.macs.len() > 1).collect()
    }

    /// Stretches during which two nodes surely both held the address: between a node's
    /// first and last read of a run of bound reads it held it, so overlapping runs are two
    /// owners at once.
    pub fn double_binds(&self) -> Vec<(String, String, Duration, Duration)> {
        let runs: Vec<(String, Duration, Duration)> = self
            .kernels
            .iter()
            .flat_map(|(node, reads)| {
                let mut runs = Vec::new();
                let mut start: Option<Duration> = None;
                let mut last = Duration::ZERO;
                for r in reads {
                    match (r.bound && r.open, start) {
                        (true, None) => start = Some(r.at),
                        (false, Some(s)) => {
                            runs.push((node.clone(), s, last));
                            start = None;
                        }
                        _ => {}
                    }
                    last = r.at;
                }
                if let Some(s) = start {
                    runs.push((node.clone(), s, last));
                }
                runs
            })
            .collect();
        let mut out = Vec::new();
        for (i, a) in runs.iter().enumerate() {
            for b in &runs[i + 1..] {
                if a.0 != b.0 && a.1 <= b.2 && b.1 <= a.2 {
                    out.push((a.0.clone(), b.0.clone(), a.1.max(b.1), a.2.min(b.2)));
                }
            }
        }
        out
    }

    /// ARP rounds answered at all.
    pub fn answered(&self) -> usize {
        self.rounds.iter().filter(|r| !r.macs.is_empty()).count()
    }

    /// The distinct MACs that answered, in the order they first did.
    pub fn answerers(&self) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for r in &self.rounds {
            for m in &r.macs {
                if !out.contains(m) {
                    out.push(m.clone());
                }
            }
        }
        out
    }

    /// The longest stretch without an ARP answer after `from`, counting one that never ends.
    pub fn longest_silence_after(&self, from: Duration) -> Duration {
        self.longest_silence_between(from, Duration::MAX)
    }

    /// The same, in the rounds from `from` to before `to`.
    pub fn longest_silence_between(&self, from: Duration, to: Duration) -> Duration {
        let mut longest = Duration::ZERO;
        let mut silent_since: Option<Duration> = None;
        let rounds: Vec<_> = self
            .rounds
            .iter()
            .filter(|r| r.at >= from && r.at < to)
            .collect();
        for r in &rounds {
            match (r.macs.is_empty(), silent_since) {
                (true, None) => silent_since = Some(r.at),
                (false, Some(s)) => {
                    longest = longest.max(r.at - s);
                    silent_since = None;
                }
                _ => {}
            }
        }
        if let (Some(s), Some(last)) = (silent_since, rounds.last()) {
            longest = longest.max(last.at - s);
        }
        longest
    }

    /// A summary for test output.
    pub fn summary(&self) -> String {
        format!(
            "{} ARP rounds ({} answered, {} by two MACs), {} kernel reads on {} nodes ({} times bound with the gate open on two)",
            self.rounds.len(),
            self.answered(),
            self.double_answers().len(),
            self.kernels.values().map(Vec::len).sum::<usize>(),
            self.kernels.len(),
            self.double_binds().len()
        )
    }
}

/// A running sampler; [`Sampler::stop`] ends it and returns what it saw.
pub struct Sampler {
    stop: Arc<AtomicBool>,
    vips: Vec<IpAddr>,
    arp: Option<InNs<std::io::Result<Vec<Vec<Round>>>>>,
    kernels: Vec<(String, InNs<Vec<Vec<Read>>>)>,
    started: Instant,
}

impl Sampler {
    /// Samples `vips` every `every`: ARP from `client_ns` (IPv4 VIPs) and the kernels of
    /// `nodes` (lab host name, namespace).
    pub fn start(
        client_ns: &str,
        nodes: &[(String, String)],
        vips: &[IpAddr],
        every: Duration,
    ) -> Result<Sampler, LabError> {
        let stop = Arc::new(AtomicBool::new(false));
        let started = Instant::now();
        let v4: Vec<Ipv4Addr> = vips
            .iter()
            .filter_map(|ip| match ip {
                IpAddr::V4(v) => Some(*v),
                IpAddr::V6(_) => None,
            })
            .collect();
        let arp = if v4.is_empty() {
            None
        } else {
            let st = stop.clone();
            Some(netns::enter_thread(client_ns, move || {
                arp_rounds(&v4, every, started, st)
            })?)
        };
        let mut kernels = Vec::new();
        for (name, ns) in nodes {
            let st = stop.clone();
            let all = vips.to_vec();
            let t = netns::enter_thread(ns, move || kernel_reads(&all, every, started, st))?;
            kernels.push((name.clone(), t));
        }
        Ok(Sampler {
            stop,
            vips: vips.to_vec(),
            arp,
            kernels,
            started,
        })
    }

    /// Time since the sampler started (its clock).
    pub fn now(&self) -> Duration {
        self.started.elapsed()
    }

    pub fn stop(self) -> Result<AllSamples, LabError> {
        self.stop.store(true, Ordering::SeqCst);
        let mut rounds = match self.arp {
            Some(t) => t.join().map_err(|source| LabError::Io {
                what: "ARP sampler".into(),
                source,
            })?,
            None => vec![],
        }
        .into_iter();
        let kernels: Vec<(String, Vec<Vec<Read>>)> = self
            .kernels
            .into_iter()
            .map(|(n, t)| (n, t.join()))
            .collect();
        let mut out = AllSamples::default();
        for (i, ip) in self.vips.iter().enumerate() {
            let r = if ip.is_ipv4() {
                rounds.next().unwrap_or_default()
            } else {
                vec![]
            };
            let k = kernels
                .iter()
                .map(|(n, per)| (n.clone(), per.get(i).cloned().unwrap_or_default()))
                .collect();
            out.vips.insert(
                *ip,
                Samples {
                    rounds: r,
                    kernels: k,
                },
            );
        }
        Ok(out)
    }
}

fn arp_rounds(
    targets: &[Ipv4Addr],
    every: Duration,
    started: Instant,
    stop: Arc<AtomicBool>,
) -> std::io::Result<Vec<Vec<Round>>> {
    let iface = pnet_datalink::interfaces()
        .into_iter()
        .find(|i| i.name == "eth0")
        .ok_or_else(|| std::io::Error::other("no eth0"))?;
    let config = pnet_datalink::Config {
        read_timeout: Some(Duration::from_millis(1)),
        promiscuous: true,
        ..Default::default()
    };
    let Channel::Ethernet(mut tx, mut rx) = pnet_datalink::channel(&iface, config)? else {
        return Err(std::io::Error::other("not an Ethernet channel"));
    };
    // Locally administered source MACs, one per round (02:6c:32:RR:RR:RR).
    let mac_of = |n: u32| MacAddr::new(0x02, 0x6c, 0x32, (n >> 16) as u8, (n >> 8) as u8, n as u8);
    let mut rounds: Vec<Vec<Round>> = vec![Vec::new(); targets.len()];
    let mut n: u32 = 0;
    while !stop.load(Ordering::SeqCst) {
        n = n.wrapping_add(1) & 0x00ff_ffff;
        let me = mac_of(n);
        let at = started.elapsed();
        for (k, target) in targets.iter().enumerate() {
            // An RFC 5227 probe (sender 0.0.0.0) from this round's MAC.
            let buf = l2speaker::dataplane::packet::arp_probe(me.octets(), *target);
            tx.send_to(&buf, None)
                .ok_or_else(|| std::io::Error::other("send buffer"))??;
            rounds[k].push(Round { at, macs: vec![] });
        }
        let next = Instant::now() + every;
        while Instant::now() < next {
            let Ok(frame) = rx.next() else { continue };
            let Some(eth) = EthernetPacket::new(frame) else {
                continue;
            };
            if eth.get_ethertype() != EtherTypes::Arp {
                continue;
            }
            let Some(a) = ArpPacket::new(eth.payload()) else {
                continue;
            };
            if a.get_operation() != ArpOperations::Reply {
                continue;
            }
            let Some(k) = targets.iter().position(|t| *t == a.get_sender_proto_addr()) else {
                continue;
            };
            let rounds = &mut rounds[k];
            // The round this reply answers, from the MAC it was sent to.
            let t = a.get_target_hw_addr();
            if t.0 != 0x02 || t.1 != 0x6c || t.2 != 0x32 {
                continue;
            }
            let id = (u32::from(t.3) << 16) | (u32::from(t.4) << 8) | u32::from(t.5);
            let back = n.wrapping_sub(id) as usize;
            if back >= rounds.len() {
                continue;
            }
            let i = rounds.len() - 1 - back;
            let m = a.get_sender_hw_addr().to_string();
            if !rounds[i].macs.contains(&m) {
                rounds[i].macs.push(m);
            }
        }
    }
    Ok(rounds)
}

fn kernel_reads(
    ips: &[IpAddr],
    every: Duration,
    started: Instant,
    stop: Arc<AtomicBool>,
) -> Vec<Vec<Read>> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    rt.block_on(async move {
        let Ok(nl) = Netlink::connect() else {
            return vec![];
        };
        let mut gate = l2speaker::dataplane::gate::Netlink::open().ok();
        let eth0 = l2speaker::dataplane::gate::ifname_key("eth0");
        let mut reads = vec![Vec::new(); ips.len()];
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        while !stop.load(Ordering::SeqCst) {
            tick.tick().await;
            let at = started.elapsed();
            // Unreadable counts as open: the check can only get stricter.
            let open = match gate
                .as_mut()
                .map(|g| g.set_keys(l2speaker::dataplane::gate::LIVE))
            {
                Some(Ok(Some(keys))) => keys.contains(&eth0),
                _ => true,
            };
            if let Ok(addrs) = nl.addresses().await {
                for (k, ip) in ips.iter().enumerate() {
                    reads[k].push(Read {
                        at,
                        bound: addrs.iter().any(|a| a.ip == *ip && a.ours),
                        open,
                    });
                }
            }
        }
        reads
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn overlapping_runs_of_bound_reads_are_double_binds_and_a_handover_is_not() {
        let reads = |v: &[(u64, bool)]| {
            v.iter()
                .map(|(t, b)| Read {
                    at: ms(*t),
                    bound: *b,
                    open: true,
                })
                .collect::<Vec<_>>()
        };
        let mut s = Samples::default();
        s.kernels.insert(
            "n1".into(),
            reads(&[(0, true), (5, true), (10, false), (15, false)]),
        );
        s.kernels.insert(
            "n2".into(),
            reads(&[(2, false), (7, false), (12, true), (17, true)]),
        );
        assert!(s.double_binds().is_empty(), "a clean hand-over");
        s.kernels
            .insert("n3".into(), reads(&[(1, false), (4, true), (9, true)]));
        assert_eq!(s.double_binds().len(), 1);
        // Bound behind a closed gate: it does not answer.
        for r in s.kernels.get_mut("n3").unwrap() {
            r.open = false;
        }
        assert!(s.double_binds().is_empty());
    }

    #[test]
    fn an_outage_that_never_ends_counts() {
        let s = Samples {
            rounds: (0..10)
                .map(|i| Round {
                    at: ms(i * 5),
                    macs: if i < 3 { vec!["a".into()] } else { vec![] },
                })
                .collect(),
            kernels: BTreeMap::new(),
        };
        assert_eq!(s.longest_silence_after(Duration::ZERO), ms(30));
        assert_eq!(s.answerers(), ["a"]);
    }
}
