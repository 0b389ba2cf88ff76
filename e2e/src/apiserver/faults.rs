//! API faults for tests, set over HTTP like the request counter: delay replies, fail with a
//! status (and Retry-After), hang after serving, or black-hole, for requests matching a
//! method, a path fragment and the client's address.
//!
//! ```text
//! POST   /_test/faults   {"method":"PUT","path":"/leases/vip-","client":"192.0.2.11",
//!                         "action":"delay","ms":1900,"phase":"after","count":null}
//! DELETE /_test/faults   (clears every rule)
//! GET    /_test/faults
//! ```
//! `phase: "after"` serves the request (a write is applied) and holds the reply back;
//! `"before"` holds the request back, then serves it.

use std::net::IpAddr;
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    Before,
    #[default]
    After,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    /// Hold the request or its reply for `ms`.
    Delay,
    /// Answer `code` (500, 503, 429…) without serving; `retry_after` seconds if set.
    Fail,
    /// Serve the request, never answer (the write is applied).
    Hang,
    /// Never serve, never answer.
    Blackhole,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Rule {
    /// HTTP method (`GET`, `PUT`…), or `WATCH` for watch requests; any when absent.
    #[serde(default)]
    pub method: Option<String>,
    /// A fragment the path must contain (`/leases/vip-`, `/events`); any when absent.
    #[serde(default)]
    pub path: Option<String>,
    /// The client's address; any when absent.
    #[serde(default)]
    pub client: Option<IpAddr>,
    pub action: Action,
    #[serde(default)]
    pub ms: u64,
    #[serde(default)]
    pub phase: Phase,
    #[serde(default)]
    pub code: Option<u16>,
    #[serde(default)]
    pub retry_after: Option<u64>,
    /// How many requests this rule applies to (forever when absent).
    #[serde(default)]
    pub count: Option<u64>,
}

#[derive(Default)]
pub struct Faults {
    rules: Mutex<Vec<Rule>>,
}

impl Faults {
    pub fn add(&self, rule: Rule) {
        self.rules
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(rule);
    }

    pub fn clear(&self) {
        self.rules.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }

    pub fn list(&self) -> Vec<Rule> {
        self.rules.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The first rule matching the request, counted down (rules used up are removed).
    pub fn take(&self, method: &str, path: &str, client: Option<IpAddr>) -> Option<Rule> {
        let mut rules = self.rules.lock().unwrap_or_else(|e| e.into_inner());
        let i = rules.iter().position(|r| {
            r.method
                .as_deref()
                .is_none_or(|m| m.eq_ignore_ascii_case(method))
                && r.path.as_deref().is_none_or(|p| path.contains(p))
                && r.client.is_none_or(|c| Some(c) == client)
        })?;
        let rule = rules[i].clone();
        if let Some(n) = rules[i].count.as_mut() {
            *n = n.saturating_sub(1);
            if *n == 0 {
                rules.remove(i);
            }
        }
        Some(rule)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(json: &str) -> Rule {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn rules_match_by_method_path_and_client_and_run_out() {
        let f = Faults::default();
        f.add(rule(
            r#"{"method":"PUT","path":"/leases/vip-","client":"192.0.2.11","action":"delay","ms":5,"count":1}"#,
        ));
        f.add(rule(r#"{"path":"/events","action":"hang"}"#));
        let me: Option<IpAddr> = Some("192.0.2.11".parse().unwrap());
        let other: Option<IpAddr> = Some("192.0.2.12".parse().unwrap());
        assert!(
            f.take(
                "PUT",
                "/apis/coordination.k8s.io/v1/namespaces/x/leases/vip-1",
                other
            )
            .is_none()
        );
        let r = f
            .take(
                "put",
                "/apis/coordination.k8s.io/v1/namespaces/x/leases/vip-1",
                me,
            )
            .unwrap();
        assert_eq!((r.action, r.ms, r.phase), (Action::Delay, 5, Phase::After));
        assert!(f.take("PUT", "/leases/vip-1", me).is_none(), "used up");
        assert_eq!(
            f.take("POST", "/api/v1/namespaces/default/events", None)
                .unwrap()
                .action,
            Action::Hang
        );
        f.clear();
        assert!(f.list().is_empty());
    }
}
