//! Kubernetes Events, posted in the background with a deadline: a slow or hanging Event
//! POST never holds up a decision (an Event is for people; losing one is acceptable).
//! Repeats of one Event are aggregated into a series by kube's recorder (one PATCH with a
//! count), and each object's Events are rate-limited as client-go's spam filter does (a burst
//! of 25, then one per 5 minutes), so hostile amounts never flood the API server.
//!
//! kube's recorder keeps every Event it posted for six minutes, to aggregate repeats. A
//! take-over of a thousand VIPs posts a thousand Events, about 3 MiB held for nothing: this
//! module starts a fresh recorder after [`RECORDER_EVENTS`] Events, so a repeat is aggregated
//! unless that many other Events came between (then it is posted as a new Event).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{ObjectReference, Service};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::Store;
use kube::{Client, Resource};
use tracing::{debug, warn};

use crate::dataplane::addr::Interface;
use crate::dataplane::packet::format_mac;

/// How long an Event POST may take before it is dropped.
pub const EVENT_DEADLINE: Duration = Duration::from_secs(5);
/// client-go's spam filter: per object, a burst of 25 Events, then one per 5 minutes.
pub const SPAM_BURST: f64 = 25.0;
pub const SPAM_REFILL: Duration = Duration::from_secs(300);
/// How many Events one recorder posts before a fresh one (with an empty cache) replaces it.
pub const RECORDER_EVENTS: u32 = 128;

/// A token bucket per object.
#[derive(Debug, Default)]
pub struct SpamFilter {
    buckets: HashMap<String, (f64, Instant)>,
}

impl SpamFilter {
    /// Whether an Event on `object` may be posted at `now`.
    pub fn allow(&mut self, object: &str, now: Instant) -> bool {
        if self.buckets.len() > 10_000 {
            // Forget objects whose bucket has refilled anyway.
            self.buckets
                .retain(|_, (_, t)| now.duration_since(*t) < SPAM_REFILL.mul_f64(SPAM_BURST));
        }
        let (tokens, last) = self
            .buckets
            .entry(object.to_string())
            .or_insert((SPAM_BURST, now));
        let refill = now.duration_since(*last).as_secs_f64() / SPAM_REFILL.as_secs_f64();
        *tokens = (*tokens + refill).min(SPAM_BURST);
        *last = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[derive(Clone)]
pub struct Events {
    client: Client,
    /// The recorder in use, and how many Events it has posted.
    recorder: Arc<Mutex<(Recorder, u32)>>,
    services: Store<Service>,
    node: String,
    spam: Arc<Mutex<SpamFilter>>,
}

impl Events {
    pub fn new(client: Client, node: &str, services: Store<Service>) -> Self {
        Events {
            recorder: Arc::new(Mutex::new((recorder(client.clone(), node), 0))),
            client,
            services,
            node: node.to_string(),
            spam: Arc::default(),
        }
    }

    /// The Service `namespace/name`, from the cache.
    pub fn service_ref(&self, key: &str) -> Option<ObjectReference> {
        let (ns, name) = key.split_once('/')?;
        let svc = self
            .services
            .get(&kube::runtime::reflector::ObjectRef::new(name).within(ns))?;
        Some(svc.object_ref(&()))
    }

    /// The recorder for the next Event: a fresh one every [`RECORDER_EVENTS`] Events (the old
    /// one's cache goes with the last of its posts).
    fn recorder(&self) -> Recorder {
        let mut r = self.recorder.lock().unwrap_or_else(|e| e.into_inner());
        if r.1 >= RECORDER_EVENTS {
            *r = (recorder(self.client.clone(), &self.node), 0);
        }
        r.1 += 1;
        r.0.clone()
    }

    /// Posts in the background, dropped after [`EVENT_DEADLINE`].
    pub fn post(
        &self,
        reference: ObjectReference,
        type_: EventType,
        reason: &str,
        note: String,
        action: &str,
    ) {
        let object = format!(
            "{}/{}/{}",
            reference.kind.as_deref().unwrap_or(""),
            reference.namespace.as_deref().unwrap_or(""),
            reference.name.as_deref().unwrap_or("")
        );
        if !self
            .spam
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .allow(&object, Instant::now())
        {
            debug!(object, reason, "event dropped by the rate limit");
            return;
        }
        let ev = Event {
            type_,
            reason: reason.into(),
            note: Some(note),
            action: action.into(),
            secondary: None,
        };
        let recorder = self.recorder();
        let reason = reason.to_string();
        tokio::spawn(async move {
            match tokio::time::timeout(EVENT_DEADLINE, recorder.publish(&ev, &reference)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => warn!(reason, error = %e, "could not record an event"),
                Err(_) => warn!(reason, "recording an event timed out"),
            }
        });
    }

    /// Event on the Service: which node announces which IP via which interface, and whom it
    /// took the IP over from (a failover or a planned handover).
    pub fn announced(&self, ip: IpAddr, service: &str, iface: &Interface, previous: Option<&str>) {
        let Some(r) = self.service_ref(service) else {
            return;
        };
        let mac = iface.mac.map(|m| format_mac(&m)).unwrap_or_default();
        let mut note = format!("{} announces {ip} via {} ({mac})", self.node, iface.name);
        let reason = match previous {
            Some(p) => {
                note.push_str(&format!(", taking over from {p}"));
                "FailedOver"
            }
            None => "Announcing",
        };
        self.post(r, EventType::Normal, reason, note, "Announce");
    }
}

fn recorder(client: Client, node: &str) -> Recorder {
    Recorder::new(
        client,
        Reporter {
            controller: "l2speaker".into(),
            instance: Some(node.to_string()),
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_object_gets_a_burst_of_25_then_one_per_five_minutes() {
        let mut f = SpamFilter::default();
        let t0 = Instant::now();
        let allowed = (0..100)
            .filter(|_| f.allow("Service/default/web", t0))
            .count();
        assert_eq!(allowed, 25);
        assert!(f.allow("Service/default/other", t0), "per object");
        assert!(!f.allow("Service/default/web", t0 + Duration::from_secs(299)));
        assert!(f.allow("Service/default/web", t0 + Duration::from_secs(300)));
        assert!(!f.allow("Service/default/web", t0 + Duration::from_secs(301)));
    }
}
