//! Compare-and-swap Leases: one per floating IP (and one for the allocator).
//!
//! Every write is a PUT (or a POST for a Lease that does not exist yet) carrying the
//! resourceVersion that was read, so of two speakers that both saw a Lease expire exactly
//! one wins; the other gets 409. kube-leader-election acquires with a merge patch and no
//! precondition, which lets both win: that is why this module exists.
//!
//! Expiry is judged by local observation: a Lease is expired when `leaseDurationSeconds`
//! have passed on *our* monotonic clock since we last saw it change, never by comparing its
//! `renewTime` with our wall clock, so clock skew between nodes cannot cause two owners.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::api::{Api, ObjectMeta, PostParams};
use thiserror::Error;
use tokio::time::Instant;

use crate::ownership::machine::Observed;

/// The allocator's own Lease: one speaker assigns IPs at a time (see `allocation`).
pub const ALLOCATOR_LEASE: &str = "l2speaker-allocator";
pub const LABEL_MANAGED_BY: &str = "app.kubernetes.io/managed-by";
pub const MANAGED_BY: &str = "l2speaker";
/// The IP, spelled as a label value (`192-0-2-200`, `2001-db8--200`).
pub const LABEL_IP: &str = "l2speaker.io/ip";
pub const ANNOTATION_IP: &str = "l2speaker.io/ip";
pub const ANNOTATION_SERVICE: &str = "l2speaker.io/service";
pub const ANNOTATION_INTERFACE: &str = "l2speaker.io/interface";
pub const ANNOTATION_MAC: &str = "l2speaker.io/mac";
/// Set (to any value) by `l2speaker drill`: the holder is asked to hand the IP over.
pub const ANNOTATION_STEP_DOWN: &str = "l2speaker.io/step-down";
/// Written by a holder that gave the IP up because it could not bind it (the node, the
/// error, when); removed by the next holder.
pub const ANNOTATION_FAILED: &str = "l2speaker.io/failed";
/// Set by a holder that stepped down: that node lets the others take the IP first.
pub const ANNOTATION_STEPPED_DOWN_FROM: &str = "l2speaker.io/stepped-down-from";
/// Written with the holder's name by a speaker that keeps the VIP through node liveness
/// and does not renew the Lease: the Lease is such a Lease while this names its holder (a
/// speaker of the previous release that takes the Lease over leaves it naming someone else).
pub const ANNOTATION_LAN_HOLDER: &str = "l2speaker.io/lan-holder";
/// `leaseDurationSeconds` of such Leases (ten years): speakers of the previous release judge
/// expiry by it, so they never take over a Lease that is simply not renewed — however long
/// its holder keeps it.
pub const LAN_LEASE_SECONDS: i32 = 10 * 365 * 24 * 3600;

fn annotation<'a>(lease: &'a Lease, key: &str) -> Option<&'a str> {
    lease
        .metadata
        .annotations
        .as_ref()?
        .get(key)
        .map(String::as_str)
}

/// Whether someone asked the holder of `lease` to step down.
pub fn step_down_requested(lease: &Lease) -> bool {
    annotation(lease, ANNOTATION_STEP_DOWN).is_some()
}

/// The node that stepped down from a released `lease`.
pub fn stepped_down_from(lease: &Lease) -> Option<&str> {
    annotation(lease, ANNOTATION_STEPPED_DOWN_FROM)
}

/// `vip-192-0-2-200`, `vip-2001-db8--200`.
pub fn lease_name(ip: IpAddr) -> String {
    format!("vip-{}", label_value(ip))
}

/// The IP spelled with `-` for `.` and `:` (`192-0-2-200`, `2001-db8--200`): a valid label
/// value and name part for every address. Where that spelling would start or end with `-`
/// (`::1`, `2001:db8::`, `::ffff:192.0.2.1`), a `0` is added on that side (`0--1`,
/// `2001-db8--0`): a canonical address never prints as `0::…` or `…::0`, so the mapping stays
/// one-to-one, and every name that was valid before is unchanged (a rolling upgrade never
/// sees two Leases for one IP).
pub fn label_value(ip: IpAddr) -> String {
    let mut v = ip.to_string().replace(['.', ':'], "-");
    if v.starts_with('-') {
        v.insert(0, '0');
    }
    if v.ends_with('-') {
        v.push('0');
    }
    v
}

/// Whether `s` is a valid label value: at most 63 characters of `[A-Za-z0-9._-]`, starting
/// and ending with an alphanumeric (empty is valid).
pub fn is_label_value(s: &str) -> bool {
    s.is_empty()
        || (s.len() <= 63
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
            && s.starts_with(|c: char| c.is_ascii_alphanumeric())
            && s.ends_with(|c: char| c.is_ascii_alphanumeric()))
}

/// Whether `s` is a valid DNS-1123 subdomain (object names such as a Lease's): at most 253
/// characters, dot-separated labels of lowercase alphanumerics and `-`, each starting and
/// ending with an alphanumeric.
pub fn is_dns1123_subdomain(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|l| {
            !l.is_empty()
                && l.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        })
}

/// What this speaker sees of `lease`: `since` is kept from `prev` while the Lease has not
/// changed (same resourceVersion), else it is `now`. Expiry counts from `since` on our own
/// clock.
pub fn observe(lease: &Lease, prev: Option<&Observed>, now: Instant) -> Observed {
    let rv = lease.metadata.resource_version.clone().unwrap_or_default();
    let spec = lease.spec.clone().unwrap_or_default();
    let since = match prev {
        Some(p) if p.resource_version == rv => p.since,
        _ => now,
    };
    let holder = spec.holder_identity.filter(|h| !h.is_empty());
    let lan = holder.is_some() && annotation(lease, ANNOTATION_LAN_HOLDER) == holder.as_deref();
    Observed {
        lan,
        holder,
        resource_version: rv,
        duration: Duration::from_secs(spec.lease_duration_seconds.unwrap_or(0).max(0) as u64),
        since,
        step_down: step_down_requested(lease),
        stepped_down_from: stepped_down_from(lease).map(str::to_string),
    }
}

/// How a write went.
#[derive(Debug, Error)]
pub enum LeaseError {
    /// Someone else moved first (409), or the Lease is gone: we do not hold it.
    #[error("lease {0} is held by someone else")]
    Lost(String),
    /// The write did not finish in time.
    #[error("writing lease {0} timed out")]
    Timeout(String),
    /// The API could not be reached or refused for another reason: try again.
    #[error("writing lease {name}: {source}")]
    Api { name: String, source: kube::Error },
}

impl LeaseError {
    pub fn metric_label(&self) -> &'static str {
        match self {
            LeaseError::Lost(_) => "lost",
            LeaseError::Api { .. } => "api",
            LeaseError::Timeout(_) => "timeout",
        }
    }
}

pub fn now_micro() -> MicroTime {
    MicroTime(k8s_openapi::jiff::Timestamp::now())
}

fn is_conflict(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 409 || s.code == 404)
}

/// The holder's description of what it announces, shown by `kubectl describe lease`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Description {
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
}

impl Description {
    /// Only the managed-by label (the allocator's Lease).
    pub fn managed() -> Self {
        Description {
            labels: [(LABEL_MANAGED_BY.to_string(), MANAGED_BY.to_string())].into(),
            annotations: BTreeMap::new(),
        }
    }

    pub fn for_vip(ip: IpAddr, service: &str, interface: &str, mac: &str) -> Self {
        Description {
            labels: [
                (LABEL_MANAGED_BY.to_string(), MANAGED_BY.to_string()),
                (LABEL_IP.to_string(), label_value(ip)),
            ]
            .into(),
            annotations: [
                (ANNOTATION_IP.to_string(), ip.to_string()),
                (ANNOTATION_SERVICE.to_string(), service.to_string()),
                (ANNOTATION_INTERFACE.to_string(), interface.to_string()),
                (ANNOTATION_MAC.to_string(), mac.to_string()),
            ]
            .into(),
        }
    }
}

/// Lease writes for one identity (the node name).
#[derive(Clone)]
pub struct Leases {
    api: Api<Lease>,
    identity: String,
    duration_seconds: i32,
    lan: bool,
}

impl Leases {
    pub fn new(api: Api<Lease>, identity: &str, duration: Duration) -> Self {
        Leases {
            api,
            identity: identity.to_string(),
            duration_seconds: duration.as_secs().max(1) as i32,
            lan: false,
        }
    }

    /// Writes for VIPs kept through node liveness: marked, with [`LAN_LEASE_SECONDS`].
    pub fn lan(api: Api<Lease>, identity: &str) -> Self {
        Leases {
            api,
            identity: identity.to_string(),
            duration_seconds: LAN_LEASE_SECONDS,
            lan: true,
        }
    }

    pub fn identity(&self) -> &str {
        &self.identity
    }

    /// Reads the Lease from the API server (not the cache).
    pub async fn get(&self, name: &str) -> Result<Option<Lease>, LeaseError> {
        self.api
            .get_opt(name)
            .await
            .map_err(|source| LeaseError::Api {
                name: name.into(),
                source,
            })
    }

    /// Takes the Lease: POST if `current` is None, else a PUT with `current`'s
    /// resourceVersion. 409 → [`LeaseError::Lost`].
    pub async fn acquire(
        &self,
        name: &str,
        current: Option<&Lease>,
        desc: &Description,
    ) -> Result<Lease, LeaseError> {
        let now = now_micro();
        let mut desc = desc.clone();
        if self.lan {
            desc.annotations
                .insert(ANNOTATION_LAN_HOLDER.into(), self.identity.clone());
        }
        let desc = &desc;
        let result = match current {
            None => {
                let lease = Lease {
                    metadata: ObjectMeta {
                        name: Some(name.to_string()),
                        labels: Some(desc.labels.clone()),
                        annotations: Some(desc.annotations.clone()),
                        ..Default::default()
                    },
                    spec: Some(LeaseSpec {
                        holder_identity: Some(self.identity.clone()),
                        lease_duration_seconds: Some(self.duration_seconds),
                        acquire_time: Some(now.clone()),
                        renew_time: Some(now),
                        lease_transitions: Some(0),
                        ..Default::default()
                    }),
                };
                self.api.create(&PostParams::default(), &lease).await
            }
            Some(cur) => {
                let mut lease = cur.clone();
                let mut spec = lease.spec.take().unwrap_or_default();
                let was_mine = spec.holder_identity.as_deref() == Some(&self.identity);
                if !was_mine {
                    spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
                    spec.acquire_time = Some(now.clone());
                }
                spec.holder_identity = Some(self.identity.clone());
                spec.lease_duration_seconds = Some(self.duration_seconds);
                spec.renew_time = Some(now);
                lease.spec = Some(spec);
                lease
                    .metadata
                    .labels
                    .get_or_insert_default()
                    .extend(desc.labels.clone());
                let annotations = lease.metadata.annotations.get_or_insert_default();
                annotations.extend(desc.annotations.clone());
                // A new holder starts clean of hand-over marks.
                annotations.remove(ANNOTATION_STEP_DOWN);
                annotations.remove(ANNOTATION_STEPPED_DOWN_FROM);
                annotations.remove(ANNOTATION_FAILED);
                self.api.replace(name, &PostParams::default(), &lease).await
            }
        };
        result.map_err(|e| self.classify(name, e))
    }

    /// Renews a Lease we hold (`held` is what our last write returned). If someone else
    /// only touched its metadata, renews on top of that; if the holder changed, we lost.
    pub async fn renew(&self, name: &str, held: &Lease) -> Result<Lease, LeaseError> {
        let mut lease = held.clone();
        for attempt in 0..2 {
            if let Some(spec) = lease.spec.as_mut() {
                spec.renew_time = Some(now_micro());
            }
            match self.api.replace(name, &PostParams::default(), &lease).await {
                Ok(l) => return Ok(l),
                Err(e) if is_conflict(&e) && attempt == 0 => {
                    let fresh = self
                        .api
                        .get_opt(name)
                        .await
                        .map_err(|source| LeaseError::Api {
                            name: name.into(),
                            source,
                        })?;
                    match fresh {
                        Some(f)
                            if f.spec.as_ref().and_then(|s| s.holder_identity.as_deref())
                                == Some(&self.identity) =>
                        {
                            lease = f
                        }
                        _ => return Err(LeaseError::Lost(name.into())),
                    }
                }
                Err(e) => return Err(self.classify(name, e)),
            }
        }
        Err(LeaseError::Lost(name.into()))
    }

    /// Gives the Lease up (holder cleared, CAS): a watching standby takes it at once.
    /// `failure`: why this node could not serve it, for users ([`ANNOTATION_FAILED`]).
    pub async fn release(
        &self,
        name: &str,
        held: &Lease,
        failure: Option<&str>,
    ) -> Result<(), LeaseError> {
        let mut held = held.clone();
        if let Some(f) = failure {
            held.metadata
                .annotations
                .get_or_insert_default()
                .insert(ANNOTATION_FAILED.into(), f.to_string());
        }
        self.release_with(name, &held, false).await
    }

    /// Gives the Lease up because a drill asked (see [`ANNOTATION_STEP_DOWN`]): the Lease then
    /// names this node, which lets another node go first.
    pub async fn step_down(&self, name: &str, held: &Lease) -> Result<(), LeaseError> {
        self.release_with(name, held, true).await
    }

    async fn release_with(
        &self,
        name: &str,
        held: &Lease,
        stepped_down: bool,
    ) -> Result<(), LeaseError> {
        let mut lease = held.clone();
        if stepped_down {
            let a = lease.metadata.annotations.get_or_insert_default();
            a.remove(ANNOTATION_STEP_DOWN);
            a.insert(ANNOTATION_STEPPED_DOWN_FROM.into(), self.identity.clone());
        }
        if let Some(spec) = lease.spec.as_mut() {
            spec.holder_identity = None;
            spec.renew_time = Some(now_micro());
        }
        self.api
            .replace(name, &PostParams::default(), &lease)
            .await
            .map(drop)
            .map_err(|e| self.classify(name, e))
    }

    /// Deletes a Lease nobody needs any more (its VIP left every Service). CAS on the
    /// resourceVersion, so a Lease someone just took is left alone.
    pub async fn delete(&self, name: &str, seen_rv: &str) -> Result<(), LeaseError> {
        let dp = kube::api::DeleteParams {
            preconditions: Some(kube::api::Preconditions {
                resource_version: Some(seen_rv.into()),
                uid: None,
            }),
            ..Default::default()
        };
        match self.api.delete(name, &dp).await {
            Ok(_) => Ok(()),
            Err(e) => Err(self.classify(name, e)),
        }
    }

    fn classify(&self, name: &str, e: kube::Error) -> LeaseError {
        if is_conflict(&e) {
            LeaseError::Lost(name.into())
        } else {
            LeaseError::Api {
                name: name.into(),
                source: e,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_label_values_are_valid_for_both_families() {
        let name = |s: &str| lease_name(s.parse().unwrap());
        // Unchanged where they were valid before.
        assert_eq!(name("192.0.2.200"), "vip-192-0-2-200");
        assert_eq!(name("2001:db8::200"), "vip-2001-db8--200");
        assert_eq!(name("192.0.2.0"), "vip-192-0-2-0");
        // Fixed where they were not.
        assert_eq!(name("2001:db8::"), "vip-2001-db8--0");
        assert_eq!(name("::"), "vip-0--0");
        assert_eq!(name("::1"), "vip-0--1");
        assert_eq!(name("::ffff:192.0.2.1"), "vip-0--ffff-192-0-2-1");
        for ip in [
            "2001:db8::",
            "::",
            "::1",
            "::ffff:192.0.2.1",
            "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
            "255.255.255.255",
        ] {
            let ip: IpAddr = ip.parse().unwrap();
            assert!(is_dns1123_subdomain(&lease_name(ip)), "{ip}");
            assert!(is_label_value(&label_value(ip)), "{ip}");
        }
    }

    /// Every address, of either family, gets a valid Lease name and label value, and no two
    /// addresses share one.
    #[test]
    fn random_addresses_get_valid_distinct_names() {
        let mut rng: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        let mut seen = std::collections::HashMap::new();
        for i in 0..200_000u32 {
            let r = (u128::from(next()) << 64) | u128::from(next());
            // Mostly zero-heavy addresses, where `::` compression makes edge cases.
            let mask = match i % 4 {
                0 => u128::MAX,
                1 => u128::from(u32::MAX),
                2 => 0xffff_u128 << (16 * (next() % 8)),
                _ => (u128::MAX << (next() % 128)) & r.rotate_left(64),
            };
            let ip = match i % 3 {
                0 => IpAddr::V4(std::net::Ipv4Addr::from((r & u128::from(u32::MAX)) as u32)),
                _ => IpAddr::V6(std::net::Ipv6Addr::from(r & mask)),
            };
            let (n, l) = (lease_name(ip), label_value(ip));
            assert!(is_dns1123_subdomain(&n), "{ip}: {n}");
            assert!(is_label_value(&l), "{ip}: {l}");
            if let Some(other) = seen.insert(n.clone(), ip) {
                assert_eq!(other, ip, "{n} names both {other} and {ip}");
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn an_unchanged_lease_keeps_its_first_sighting_and_a_renewal_resets_it() {
        let t0 = Instant::now();
        let mut lease = Lease::default();
        lease.metadata.resource_version = Some("5".into());
        lease.spec = Some(LeaseSpec {
            holder_identity: Some("node-1".into()),
            lease_duration_seconds: Some(3),
            ..Default::default()
        });
        let first = observe(&lease, None, t0);
        assert_eq!(first.expires_at(), t0 + Duration::from_secs(3));
        let later = t0 + Duration::from_secs(2);
        assert_eq!(
            observe(&lease, Some(&first), later).since,
            t0,
            "same resourceVersion: same sighting"
        );
        lease.metadata.resource_version = Some("6".into());
        assert_eq!(
            observe(&lease, Some(&first), later).since,
            later,
            "a renewal moves the expiry"
        );
    }
}
