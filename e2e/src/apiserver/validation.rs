//! What kube-apiserver refuses with 422 before storing an object, as far as the project's
//! clients can run into it: object names (RFC 1123), label keys and values, the annotations'
//! total size, and custom resources checked against their CRD's OpenAPI v3 schema (types,
//! `required`, `pattern`, `enum`, `items`, `properties`, `additionalProperties`, `nullable`,
//! `x-kubernetes-preserve-unknown-fields`). Messages follow kube-apiserver's wording.

use serde_json::Value;

/// One failed check: (cause reason, field path, message after the field).
pub type Cause = (&'static str, String, String);

const DNS1123_SUBDOMAIN: &str = "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character (e.g. 'example.com', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')";
const DNS1123_LABEL: &str = "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must start and end with an alphanumeric character (e.g. 'my-name',  or '123-abc', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?')";
const LABEL_VALUE: &str = "a valid label must be an empty string or consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character (e.g. 'MyValue',  or 'my_value',  or '12345', regex used for validation is '(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?')";
const QUALIFIED_NAME: &str = "name part must consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character (e.g. 'MyName',  or 'my.name',  or '123-abc', regex used for validation is '([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]')";
/// kube-apiserver's limit on all annotations of one object.
pub const ANNOTATIONS_MAX: usize = 256 * 1024;

fn dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

fn dns_subdomain(s: &str) -> bool {
    s.len() <= 253 && s.split('.').all(dns_label)
}

fn name_part(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && s.starts_with(|c: char| c.is_ascii_alphanumeric())
        && s.ends_with(|c: char| c.is_ascii_alphanumeric())
}

fn quote(v: &Value) -> String {
    match v {
        Value::String(s) => format!("{s:?}"),
        other => other.to_string(),
    }
}

/// `metadata` checks for every kind; `label_name` for kinds named by an RFC 1123 label
/// (Namespaces), the rest by a subdomain.
pub fn metadata(obj: &Value, label_name: bool) -> Vec<Cause> {
    let mut out = Vec::new();
    let meta = &obj["metadata"];
    if let Some(name) = meta.get("name").and_then(Value::as_str)
        && !name.is_empty()
    {
        let (ok, why) = if label_name {
            (dns_label(name), DNS1123_LABEL)
        } else {
            (dns_subdomain(name), DNS1123_SUBDOMAIN)
        };
        if !ok {
            out.push((
                "FieldValueInvalid",
                "metadata.name".to_string(),
                format!("Invalid value: {name:?}: {why}"),
            ));
        }
    }
    let key_ok = |k: &str| match k.rsplit_once('/') {
        Some((prefix, name)) => dns_subdomain(prefix) && name_part(name),
        None => name_part(k),
    };
    if let Some(labels) = meta.get("labels").and_then(Value::as_object) {
        for (k, v) in labels {
            if !key_ok(k) {
                out.push((
                    "FieldValueInvalid",
                    "metadata.labels".to_string(),
                    format!("Invalid value: {k:?}: {QUALIFIED_NAME}"),
                ));
            }
            let v = v.as_str().unwrap_or("");
            if !(v.is_empty() || name_part(v)) {
                out.push((
                    "FieldValueInvalid",
                    "metadata.labels".to_string(),
                    format!("Invalid value: {v:?}: {LABEL_VALUE}"),
                ));
            }
        }
    }
    if let Some(annotations) = meta.get("annotations").and_then(Value::as_object) {
        let mut size = 0;
        for (k, v) in annotations {
            size += k.len() + v.as_str().map_or(0, str::len);
            if !key_ok(k) {
                out.push((
                    "FieldValueInvalid",
                    "metadata.annotations".to_string(),
                    format!("Invalid value: {k:?}: {QUALIFIED_NAME}"),
                ));
            }
        }
        if size > ANNOTATIONS_MAX {
            out.push((
                "FieldValueTooLong",
                "metadata.annotations".to_string(),
                format!("Too long: must have at most {ANNOTATIONS_MAX} bytes"),
            ));
        }
    }
    out
}

/// Checks `v` at `path` against an OpenAPI v3 `schema`, appending what fails.
pub fn against_schema(schema: &Value, v: &Value, path: &str, out: &mut Vec<Cause>) {
    if v.is_null() && schema.get("nullable").and_then(Value::as_bool) == Some(true) {
        return;
    }
    if let Some(t) = schema.get("type").and_then(Value::as_str) {
        let ok = match t {
            "object" => v.is_object(),
            "array" => v.is_array(),
            "string" => v.is_string(),
            "integer" => v.is_i64() || v.is_u64(),
            "number" => v.is_number(),
            "boolean" => v.is_boolean(),
            _ => true,
        };
        if !ok {
            let actual = match v {
                Value::Null => "null",
                Value::Bool(_) => "boolean",
                Value::Number(n) if n.is_f64() => "number",
                Value::Number(_) => "integer",
                Value::String(_) => "string",
                Value::Array(_) => "array",
                Value::Object(_) => "object",
            };
            out.push((
                "FieldValueTypeInvalid",
                path.to_string(),
                format!(
                    "Invalid value: \"{actual}\": {path} in body must be of type {t}: \"{actual}\""
                ),
            ));
            return;
        }
    }
    if let Some(allowed) = schema.get("enum").and_then(Value::as_array)
        && !allowed.contains(v)
    {
        let list: Vec<String> = allowed.iter().map(quote).collect();
        out.push((
            "FieldValueNotSupported",
            path.to_string(),
            format!(
                "Unsupported value: {}: supported values: {}",
                quote(v),
                list.join(", ")
            ),
        ));
    }
    if let (Some(p), Some(s)) = (schema.get("pattern").and_then(Value::as_str), v.as_str()) {
        match regex::Regex::new(p) {
            Ok(re) if re.is_match(s) => {}
            _ => out.push((
                "FieldValueInvalid",
                path.to_string(),
                format!("Invalid value: {s:?}: {path} in body should match '{p}'"),
            )),
        }
    }
    if let Some(obj) = v.as_object() {
        if schema
            .get("x-kubernetes-preserve-unknown-fields")
            .and_then(Value::as_bool)
            == Some(true)
            && schema.get("properties").is_none()
        {
            return;
        }
        let props = schema.get("properties").and_then(Value::as_object);
        for req in required(schema) {
            if !obj.contains_key(req) {
                out.push((
                    "FieldValueRequired",
                    join(path, req),
                    "Required value".to_string(),
                ));
            }
        }
        for (k, child) in obj {
            let sub = props
                .and_then(|p| p.get(k))
                .or_else(|| schema.get("additionalProperties").filter(|a| a.is_object()));
            if let Some(sub) = sub {
                against_schema(sub, child, &join(path, k), out);
            }
        }
    }
    if let (Some(items), Some(arr)) = (schema.get("items"), v.as_array()) {
        for (i, x) in arr.iter().enumerate() {
            against_schema(items, x, &format!("{path}[{i}]"), out);
        }
    }
}

/// The names a schema's `required` lists.
fn required(schema: &Value) -> impl Iterator<Item = &str> {
    schema
        .get("required")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
}

fn join(path: &str, k: &str) -> String {
    if path.is_empty() {
        k.to_string()
    } else {
        format!("{path}.{k}")
    }
}

/// A custom resource against its schema; `apiVersion`, `kind` and `metadata` are the
/// server's business and are not checked against it.
pub fn custom_resource(schema: &Value, obj: &Value) -> Vec<Cause> {
    let mut out = Vec::new();
    let Some(props) = obj.as_object() else {
        return out;
    };
    for (k, v) in props {
        if matches!(k.as_str(), "apiVersion" | "kind" | "metadata") {
            continue;
        }
        if let Some(sub) = schema.pointer(&format!("/properties/{k}")) {
            against_schema(sub, v, k, &mut out);
        }
    }
    for req in required(schema) {
        if !props.contains_key(req) {
            out.push((
                "FieldValueRequired",
                req.to_string(),
                "Required value".into(),
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn names_labels_and_annotations_are_checked_like_kube_apiserver() {
        assert!(metadata(&json!({"metadata": {"name": "vip-192-0-2-1"}}), false).is_empty());
        let bad = metadata(&json!({"metadata": {"name": "vip-2001-db8--"}}), false);
        assert_eq!(bad[0].1, "metadata.name");
        assert!(bad[0].2.contains("RFC 1123 subdomain"));
        assert!(!metadata(&json!({"metadata": {"name": "a.b"}}), true).is_empty());
        let bad = metadata(
            &json!({"metadata": {"labels": {"l2speaker.io/ip": "-1", "ok": ""}}}),
            false,
        );
        assert_eq!(bad.len(), 1, "{bad:?}");
        assert!(bad[0].2.contains("valid label"));
        let big = "x".repeat(ANNOTATIONS_MAX);
        let bad = metadata(&json!({"metadata": {"annotations": {"a": big}}}), false);
        assert_eq!(bad[0].0, "FieldValueTooLong");
    }

    #[test]
    fn custom_resources_are_checked_against_their_schema() {
        let schema = json!({"type": "object", "required": ["spec"], "properties": {
            "spec": {"type": "object", "required": ["addresses"], "properties": {
                "addresses": {"type": "array", "items": {"type": "string", "pattern": "^[0-9.]+$"}},
                "mode": {"type": "string", "enum": ["a", "b"]},
                "n": {"type": "integer", "nullable": true}
            }}
        }});
        let ok = json!({"spec": {"addresses": ["192.0.2.1"], "mode": "a", "n": null}});
        assert!(custom_resource(&schema, &ok).is_empty());
        let bad = json!({"spec": {"addresses": ["192.0.2.1", "x"], "mode": "c", "n": "1"}});
        let causes = custom_resource(&schema, &bad);
        let fields: Vec<&str> = causes.iter().map(|c| c.1.as_str()).collect();
        assert_eq!(
            fields,
            ["spec.addresses[1]", "spec.mode", "spec.n"],
            "{causes:?}"
        );
        assert!(causes[0].2.contains("should match '^[0-9.]+$'"));
        assert!(causes[1].2.contains("supported values: \"a\", \"b\""));
        assert!(causes[2].2.contains("must be of type integer"));
        let causes = custom_resource(&schema, &json!({"spec": {}}));
        assert_eq!(causes[0].1, "spec.addresses");
        assert_eq!(causes[0].2, "Required value");
        assert_eq!(custom_resource(&schema, &json!({}))[0].1, "spec");
    }
}

#[cfg(test)]
mod pool_pattern {
    use l2speaker::pool::{ADDRESS_PATTERN, parse_range};

    /// The IPPool CRD's admission pattern, run by a real regex engine: it accepts what the
    /// speaker's parser accepts and refuses malformed entries.
    #[test]
    fn the_ippool_address_pattern_agrees_with_the_parser() {
        let re = regex::Regex::new(ADDRESS_PATTERN).unwrap();
        for ok in [
            "192.0.2.200/29",
            "192.0.2.210-192.0.2.215",
            "192.0.2.210 - 192.0.2.215",
            "2001:db8::200/125",
            "2001:db8::200-2001:db8::2ff",
            "::ffff:192.0.2.0/120",
            "2001:db8::",
            "10.0.0.1",
        ] {
            assert!(re.is_match(ok), "{ok} matches");
            assert!(parse_range(ok).is_ok(), "{ok} parses");
        }
        for bad in [
            "192.0.2.300",
            "192.0.2.0/33",
            "192.0.2",
            "nonsense",
            "192.0.2.1-",
            "2001:db8::/129",
            "192.0.2.1/24/1",
            "",
        ] {
            assert!(!re.is_match(bad), "{bad} does not match");
            assert!(parse_range(bad).is_err(), "{bad} does not parse");
        }
        // Every well-formed IPv4 CIDR and range the parser takes also matches.
        let mut x: u32 = 0x1234_5678;
        for _ in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            let a = std::net::Ipv4Addr::from(x);
            let b = std::net::Ipv4Addr::from(x.rotate_left(7));
            for e in [format!("{a}/32"), format!("{a}-{b}"), a.to_string()] {
                assert!(re.is_match(&e), "{e}");
            }
        }
    }
}
