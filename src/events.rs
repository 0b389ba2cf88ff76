//! Kubernetes Events, posted in the background with a deadline: a slow or hanging Event
//! POST never holds up a decision (an Event is for people; losing one is acceptable).

use std::net::IpAddr;
use std::time::Duration;

use k8s_openapi::api::core::v1::{ObjectReference, Service};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::Store;
use kube::{Client, Resource, ResourceExt};
use tracing::warn;

use crate::dataplane::addr::Interface;
use crate::dataplane::packet::format_mac;

/// How long an Event POST may take before it is dropped.
pub const EVENT_DEADLINE: Duration = Duration::from_secs(5);

#[derive(Clone)]
pub struct Events {
    recorder: Recorder,
    services: Store<Service>,
    node: String,
}

impl Events {
    pub fn new(client: Client, node: &str, services: Store<Service>) -> Self {
        Events {
            recorder: Recorder::new(
                client,
                Reporter {
                    controller: "l2speaker".into(),
                    instance: Some(node.to_string()),
                },
            ),
            services,
            node: node.to_string(),
        }
    }

    /// The Service `namespace/name`, from the cache.
    pub fn service_ref(&self, key: &str) -> Option<ObjectReference> {
        let (ns, name) = key.split_once('/')?;
        let svc = self
            .services
            .state()
            .into_iter()
            .find(|s| s.namespace().as_deref() == Some(ns) && s.name_any() == name)?;
        Some(svc.object_ref(&()))
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
        let ev = Event {
            type_,
            reason: reason.into(),
            note: Some(note),
            action: action.into(),
            secondary: None,
        };
        let recorder = self.recorder.clone();
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
