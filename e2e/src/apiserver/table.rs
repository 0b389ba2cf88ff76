//! Server-side printing: the `Table` kubectl asks for (`Accept: …;as=Table;…`), so `kubectl
//! get` shows what it shows against a real cluster (EXTERNAL-IP, HOLDER, …).

use serde_json::{Value, json};

use super::resources::ResourceType;

/// Whether the request asked for a Table.
pub fn wanted(accept: &str) -> bool {
    accept.split(',').any(|part| part.contains("as=Table"))
}

fn columns(rt: &ResourceType) -> Vec<(&'static str, &'static str)> {
    let mut c = vec![("Name", "name")];
    c.extend(match rt.store.as_str() {
        "/services" => vec![
            ("Type", ""),
            ("Cluster-IP", ""),
            ("External-IP", ""),
            ("Port(s)", ""),
        ],
        "coordination.k8s.io/leases" => vec![("Holder", "")],
        "/nodes" => vec![("Status", ""), ("Internal-IP", "")],
        "discovery.k8s.io/endpointslices" => {
            vec![("AddressType", ""), ("Ports", ""), ("Endpoints", "")]
        }
        "l2speaker.io/ippools" => vec![("Addresses", ""), ("Interface", "")],
        _ => vec![],
    });
    c.push(("Age", ""));
    c
}

fn join(v: Option<&Value>, f: impl Fn(&Value) -> Option<String>) -> String {
    let items: Vec<String> = v
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(&f).collect())
        .unwrap_or_default();
    if items.is_empty() {
        "<none>".into()
    } else {
        items.join(",")
    }
}

fn s(v: &Value) -> Option<String> {
    v.as_str().map(str::to_string)
}

/// `5s`, `3m`, `7h`, `2d`, as kubectl prints ages.
pub fn age(created: Option<&str>) -> String {
    let Some(t) = created.and_then(|c| chrono::DateTime::parse_from_rfc3339(c).ok()) else {
        return "<unknown>".into();
    };
    let secs = (chrono::Utc::now() - t.with_timezone(&chrono::Utc))
        .num_seconds()
        .max(0);
    match secs {
        s if s < 120 => format!("{s}s"),
        s if s < 3600 => format!("{}m", s / 60),
        s if s < 48 * 3600 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86400),
    }
}

fn cells(rt: &ResourceType, o: &Value) -> Vec<Value> {
    let name = o.pointer("/metadata/name").cloned().unwrap_or(Value::Null);
    let mut c = vec![name];
    let text = |v: String| Value::String(v);
    match rt.store.as_str() {
        "/services" => {
            let spec = &o["spec"];
            c.push(text(spec["type"].as_str().unwrap_or("ClusterIP").into()));
            c.push(text(spec["clusterIP"].as_str().unwrap_or("<none>").into()));
            let ext = join(o.pointer("/status/loadBalancer/ingress"), |i| {
                s(&i["ip"]).or_else(|| s(&i["hostname"]))
            });
            let ext = if ext == "<none>" && spec["type"] == "LoadBalancer" {
                "<pending>".into()
            } else {
                ext
            };
            c.push(text(ext));
            c.push(text(join(spec.get("ports"), |p| {
                Some(format!(
                    "{}/{}",
                    p["port"],
                    p["protocol"].as_str().unwrap_or("TCP")
                ))
            })));
        }
        "coordination.k8s.io/leases" => c.push(text(
            o.pointer("/spec/holderIdentity")
                .and_then(Value::as_str)
                .unwrap_or("")
                .into(),
        )),
        "/nodes" => {
            let ready = o
                .pointer("/status/conditions")
                .and_then(Value::as_array)
                .and_then(|cs| cs.iter().find(|c| c["type"] == "Ready"))
                .map(|c| c["status"] == "True");
            c.push(text(
                match ready {
                    Some(true) => "Ready",
                    Some(false) => "NotReady",
                    None => "Unknown",
                }
                .into(),
            ));
            c.push(text(join(o.pointer("/status/addresses"), |a| {
                if a["type"] == "InternalIP" {
                    s(&a["address"])
                } else {
                    None
                }
            })));
        }
        "discovery.k8s.io/endpointslices" => {
            c.push(text(o["addressType"].as_str().unwrap_or("").into()));
            c.push(text(join(o.get("ports"), |p| {
                p["port"].as_i64().map(|n| n.to_string())
            })));
            c.push(text(join(o.get("endpoints"), |e| {
                e["addresses"].get(0).and_then(s)
            })));
        }
        "l2speaker.io/ippools" => {
            c.push(text(join(o.pointer("/spec/addresses"), s)));
            c.push(text(
                o.pointer("/spec/interface")
                    .and_then(Value::as_str)
                    .unwrap_or("<any>")
                    .into(),
            ));
        }
        _ => {}
    }
    c.push(text(age(o
        .pointer("/metadata/creationTimestamp")
        .and_then(Value::as_str))));
    c
}

/// A Table of `items`; `with_columns` false for watch events after the first.
pub fn table(
    rt: &ResourceType,
    items: &[Value],
    resource_version: &str,
    with_columns: bool,
) -> Value {
    let defs: Vec<Value> = if with_columns {
        columns(rt)
            .into_iter()
            .map(|(name, format)| json!({"name": name, "type": "string", "format": format, "description": "", "priority": 0}))
            .collect()
    } else {
        Vec::new()
    };
    let rows: Vec<Value> = items
        .iter()
        .map(|o| {
            json!({"cells": cells(rt, o), "object": {
                "kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1", "metadata": o["metadata"].clone()}})
        })
        .collect();
    json!({"kind": "Table", "apiVersion": "meta.k8s.io/v1", "metadata": {"resourceVersion": resource_version},
           "columnDefinitions": defs, "rows": rows})
}
