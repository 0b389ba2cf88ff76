//! The four PATCH flavours: JSON merge (RFC 7386), strategic merge (kubectl's client-side
//! apply for built-in kinds), JSON patch (RFC 6902, `test` included) and server-side apply
//! (create-or-merge here; field ownership is not tracked).

use serde_json::{Map, Value};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PatchType {
    Merge,
    Strategic,
    Json,
    Apply,
}

impl PatchType {
    pub fn from_content_type(ct: &str) -> Option<Self> {
        match ct.split(';').next().unwrap_or("").trim() {
            "application/merge-patch+json" => Some(PatchType::Merge),
            "application/strategic-merge-patch+json" => Some(PatchType::Strategic),
            "application/json-patch+json" => Some(PatchType::Json),
            "application/apply-patch+yaml" | "application/apply-patch+cbor" => {
                Some(PatchType::Apply)
            }
            _ => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum PatchError {
    /// The body is not a patch of this type.
    Malformed(String),
    /// The patch is well formed but cannot be applied (a failed `test`, a missing path).
    NotApplicable(String),
}

/// Applies `body` to `target`. Apply patches are merged like merge patches.
pub fn apply(kind: PatchType, target: &mut Value, body: &[u8]) -> Result<(), PatchError> {
    match kind {
        PatchType::Json => {
            let p: json_patch::Patch = serde_json::from_slice(body)
                .map_err(|e| PatchError::Malformed(format!("invalid JSON patch: {e}")))?;
            json_patch::patch(target, &p).map_err(|e| PatchError::NotApplicable(e.to_string()))
        }
        PatchType::Merge | PatchType::Apply => {
            let p = parse_object(body, kind)?;
            json_patch::merge(target, &p);
            Ok(())
        }
        PatchType::Strategic => {
            let p = parse_object(body, kind)?;
            strategic_merge(target, &p, &mut Vec::new());
            Ok(())
        }
    }
}

/// Parses a patch document: JSON, or for apply patches YAML too (JSON is YAML).
pub fn parse_object(body: &[u8], kind: PatchType) -> Result<Value, PatchError> {
    let parsed: Result<Value, String> = match serde_json::from_slice(body) {
        Ok(v) => Ok(v),
        Err(e) if kind == PatchType::Apply => {
            serde_yaml::from_slice(body).map_err(|ye| format!("{e}; as YAML: {ye}"))
        }
        Err(e) => Err(e.to_string()),
    };
    match parsed {
        Ok(v @ Value::Object(_)) => Ok(v),
        Ok(_) => Err(PatchError::Malformed("the patch must be an object".into())),
        Err(e) => Err(PatchError::Malformed(format!("invalid patch body: {e}"))),
    }
}

/// The list merge keys this server knows, by the path of the list field.
fn merge_key(path: &[String]) -> Option<&'static str> {
    match path.join(".").as_str() {
        "spec.ports" => Some("port"),
        "metadata.ownerReferences" => Some("uid"),
        "status.conditions" | "status.addresses" => Some("type"),
        _ => None,
    }
}

/// Lists of scalars merged as sets rather than replaced (`patchStrategy: merge`).
fn is_set_list(path: &[String]) -> bool {
    path.join(".") == "metadata.finalizers"
}

fn directive(v: &Value) -> Option<&str> {
    v.get("$patch").and_then(Value::as_str)
}

/// Removes every `$…` directive from a value that is taken as it stands.
fn strip_directives(v: &Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(
            m.iter()
                .filter(|(k, _)| !k.starts_with('$'))
                .map(|(k, v)| (k.clone(), strip_directives(v)))
                .collect(),
        ),
        Value::Array(a) => Value::Array(a.iter().map(strip_directives).collect()),
        other => other.clone(),
    }
}

pub fn strategic_merge(target: &mut Value, patch: &Value, path: &mut Vec<String>) {
    let Value::Object(pm) = patch else {
        *target = patch.clone();
        return;
    };
    if matches!(directive(patch), Some("replace") | Some("delete")) {
        *target = strip_directives(patch);
        return;
    }
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    for (k, v) in pm {
        if let Some(field) = k.strip_prefix("$deleteFromPrimitiveList/") {
            if let (Some(Value::Array(have)), Value::Array(drop)) = (target.get_mut(field), v) {
                have.retain(|x| !drop.contains(x));
            }
            continue;
        }
        if k.starts_with('$') {
            continue;
        }
        let tm = target.as_object_mut().expect("made an object above");
        if v.is_null() || directive(v) == Some("delete") {
            tm.remove(k);
            continue;
        }
        path.push(k.clone());
        match v {
            Value::Array(items) => {
                let cur = tm.remove(k);
                tm.insert(k.clone(), merge_list(cur, items, path));
            }
            Value::Object(_) => {
                let slot = tm.entry(k.clone()).or_insert(Value::Null);
                strategic_merge(slot, v, path);
            }
            _ => {
                tm.insert(k.clone(), v.clone());
            }
        }
        path.pop();
    }
    if let Some(Value::Array(keep)) = pm.get("$retainKeys") {
        let keep: Vec<&str> = keep.iter().filter_map(Value::as_str).collect();
        if let Value::Object(tm) = target {
            tm.retain(|k, _| keep.contains(&k.as_str()));
        }
    }
}

fn merge_list(cur: Option<Value>, items: &[Value], path: &mut Vec<String>) -> Value {
    let replace = items.iter().any(|i| directive(i) == Some("replace"));
    let items: Vec<&Value> = items
        .iter()
        .filter(|i| directive(i) != Some("replace"))
        .collect();
    let mut have = match cur {
        Some(Value::Array(a)) if !replace => a,
        _ => Vec::new(),
    };
    if let Some(key) = merge_key(path) {
        for item in items {
            let id = item.get(key);
            let pos = have.iter().position(|h| id.is_some() && h.get(key) == id);
            match (directive(item), pos) {
                (Some("delete"), Some(p)) => {
                    have.remove(p);
                }
                (Some("delete"), None) => {}
                (_, Some(p)) => strategic_merge(&mut have[p], item, path),
                (_, None) => have.push(strip_directives(item)),
            }
        }
        Value::Array(have)
    } else if is_set_list(path) && !replace {
        for item in items {
            if !have.contains(item) {
                have.push(item.clone());
            }
        }
        Value::Array(have)
    } else {
        Value::Array(items.into_iter().map(strip_directives).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn smp(target: Value, patch: Value) -> Value {
        let mut t = target;
        apply(PatchType::Strategic, &mut t, patch.to_string().as_bytes()).unwrap();
        t
    }

    #[test]
    fn strategic_merge_merges_service_ports_by_port() {
        let svc = json!({"spec": {"ports": [{"port": 80, "name": "http"}, {"port": 443, "name": "https"}]}});
        let out = smp(
            svc,
            json!({"spec": {
            "$setElementOrder/ports": [{"port": 80}, {"port": 443}, {"port": 8080}],
            "ports": [{"port": 80, "name": "web"}, {"port": 8080, "name": "alt"}, {"port": 443, "$patch": "delete"}]}}),
        );
        assert_eq!(
            out,
            json!({"spec": {"ports": [{"port": 80, "name": "web"}, {"port": 8080, "name": "alt"}]}})
        );
    }

    #[test]
    fn strategic_merge_replaces_unkeyed_lists_and_deletes_nulls() {
        let cm = json!({"data": {"a": "1", "b": "2"}, "x": [1, 2]});
        let out = smp(cm, json!({"data": {"a": null, "c": "3"}, "x": [3]}));
        assert_eq!(out, json!({"data": {"b": "2", "c": "3"}, "x": [3]}));
    }

    #[test]
    fn strategic_merge_honours_replace_delete_and_primitive_list_directives() {
        let o = json!({"metadata": {"finalizers": ["a", "b"], "labels": {"x": "1", "y": "2"}},
                       "spec": {"keep": {"a": 1}, "gone": {"b": 2}}});
        let out = smp(
            o,
            json!({
            "metadata": {"$deleteFromPrimitiveList/finalizers": ["a"], "labels": {"$patch": "replace", "z": "3"}},
            "spec": {"gone": {"$patch": "delete"}}}),
        );
        assert_eq!(
            out,
            json!({"metadata": {"finalizers": ["b"], "labels": {"z": "3"}}, "spec": {"keep": {"a": 1}}})
        );
    }

    #[test]
    fn strategic_merge_merges_node_conditions_by_type() {
        let node = json!({"status": {"conditions": [{"type": "Ready", "status": "False"}, {"type": "DiskPressure", "status": "False"}]}});
        let out = smp(
            node,
            json!({"status": {"conditions": [{"type": "Ready", "status": "True"}]}}),
        );
        assert_eq!(
            out["status"]["conditions"],
            json!([{"type": "Ready", "status": "True"}, {"type": "DiskPressure", "status": "False"}])
        );
    }

    #[test]
    fn json_patch_test_failure_is_not_applicable() {
        let mut o = json!({"metadata": {"finalizers": ["x"]}});
        let p = json!([{"op": "test", "path": "/metadata/finalizers/0", "value": "y"},
                       {"op": "remove", "path": "/metadata/finalizers/0"}]);
        let err = apply(PatchType::Json, &mut o, p.to_string().as_bytes()).unwrap_err();
        assert!(matches!(err, PatchError::NotApplicable(_)));
        assert_eq!(o, json!({"metadata": {"finalizers": ["x"]}}));
    }

    #[test]
    fn apply_patch_accepts_yaml() {
        let mut o = json!({"data": {"a": "1"}});
        apply(PatchType::Apply, &mut o, b"data:\n  b: \"2\"\n").unwrap();
        assert_eq!(o, json!({"data": {"a": "1", "b": "2"}}));
    }

    #[test]
    fn malformed_patch_bodies_are_reported() {
        let mut o = json!({});
        assert!(matches!(
            apply(PatchType::Merge, &mut o, b"[1]"),
            Err(PatchError::Malformed(_))
        ));
        assert!(matches!(
            apply(PatchType::Json, &mut o, b"{}"),
            Err(PatchError::Malformed(_))
        ));
    }
}
