//! One store for Events: kept in the core `v1` shape, converted for `events.k8s.io/v1`
//! (kube-runtime's Recorder writes that one; `kubectl describe` reads the core one).

use serde_json::{Map, Value, json};

/// Field renames between the two shapes: (events.k8s.io/v1, core v1).
const RENAMES: &[(&str, &str)] = &[
    ("regarding", "involvedObject"),
    ("note", "message"),
    ("reportingController", "reportingComponent"),
    ("deprecatedSource", "source"),
    ("deprecatedFirstTimestamp", "firstTimestamp"),
    ("deprecatedLastTimestamp", "lastTimestamp"),
    ("deprecatedCount", "count"),
];

/// events.k8s.io/v1 → core v1, filling what `kubectl describe` shows (timestamps, count,
/// source) from the new fields.
pub fn to_core(mut ev: Value) -> Value {
    let Some(m) = ev.as_object_mut() else {
        return ev;
    };
    for (new, old) in RENAMES {
        if let Some(v) = m.remove(*new) {
            m.insert(old.to_string(), v);
        }
    }
    let event_time = m.get("eventTime").and_then(Value::as_str).map(seconds);
    let last_seen = m
        .get("series")
        .and_then(|s| s.get("lastObservedTime"))
        .and_then(Value::as_str)
        .map(seconds);
    if let Some(t) = &event_time {
        m.entry("firstTimestamp").or_insert(json!(t));
    }
    if let Some(t) = last_seen.or(event_time)
        && m.get("lastTimestamp").is_none_or(Value::is_null)
    {
        m.insert("lastTimestamp".into(), json!(t));
    }
    if m.get("count").is_none_or(Value::is_null) {
        let count = m
            .get("series")
            .and_then(|s| s.get("count"))
            .cloned()
            .unwrap_or(json!(1));
        m.insert("count".into(), count);
    }
    if m.get("source").is_none_or(Value::is_null)
        && let Some(c) = m.get("reportingComponent").cloned()
    {
        let mut src = Map::new();
        src.insert("component".into(), c);
        if let Some(h) = m.get("reportingInstance").cloned() {
            src.insert("host".into(), h);
        }
        m.insert("source".into(), Value::Object(src));
    }
    m.insert("apiVersion".into(), json!("v1"));
    m.insert("kind".into(), json!("Event"));
    ev
}

/// core v1 → events.k8s.io/v1.
pub fn to_new(mut ev: Value) -> Value {
    let Some(m) = ev.as_object_mut() else {
        return ev;
    };
    for (new, old) in RENAMES {
        if let Some(v) = m.remove(*old) {
            m.insert(new.to_string(), v);
        }
    }
    m.insert("apiVersion".into(), json!("events.k8s.io/v1"));
    m.insert("kind".into(), json!("Event"));
    ev
}

/// A MicroTime or Time cut to whole seconds (`2026-01-01T00:00:00.123456Z` → `…:00Z`).
fn seconds(t: &str) -> String {
    match chrono::DateTime::parse_from_rfc3339(t) {
        Ok(d) => d
            .with_timezone(&chrono::Utc)
            .format("%Y-%m-%dT%H:%M:%SZ")
            .to_string(),
        Err(_) => t.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recorder_event_becomes_a_describable_core_event_and_back() {
        let new = json!({
            "apiVersion": "events.k8s.io/v1", "kind": "Event",
            "metadata": {"name": "e1", "namespace": "default"},
            "regarding": {"kind": "Lease", "name": "l", "namespace": "default"},
            "note": "won", "reason": "Acquired", "type": "Normal",
            "eventTime": "2026-11-26T07:00:00.123456Z",
            "reportingController": "l2speaker", "reportingInstance": "node-1", "action": "Acquire"
        });
        let core = to_core(new.clone());
        assert_eq!(core["apiVersion"], "v1");
        assert_eq!(core["involvedObject"]["name"], "l");
        assert_eq!(core["message"], "won");
        assert_eq!(core["firstTimestamp"], "2026-11-26T07:00:00Z");
        assert_eq!(core["lastTimestamp"], "2026-11-26T07:00:00Z");
        assert_eq!(core["count"], 1);
        assert_eq!(
            core["source"],
            json!({"component": "l2speaker", "host": "node-1"})
        );
        let back = to_new(core);
        assert_eq!(back["regarding"], new["regarding"]);
        assert_eq!(back["note"], "won");
        assert_eq!(back["reportingController"], "l2speaker");
    }
}
