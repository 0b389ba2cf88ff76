//! The kinds the test API server serves: the built-in ones the speaker and kubectl touch, and
//! the custom kinds that CustomResourceDefinitions add at run time.

use serde_json::{Value, json};

/// One served resource (a plural name in one group/version).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResourceType {
    /// API group, "" for the core group.
    pub group: String,
    pub version: String,
    pub plural: String,
    pub singular: String,
    pub kind: String,
    pub namespaced: bool,
    pub short_names: Vec<String>,
    /// Has a `/status` subresource: the main path ignores `.status`, `/status` only writes it.
    pub status_subresource: bool,
    /// PUT must carry a resourceVersion (the real server's `AllowUnconditionalUpdate() == false`).
    pub conditional_update: bool,
    /// A custom resource (defined by a CRD): bumps `metadata.generation`, no strategic merge.
    pub custom: bool,
    /// Where objects live: kinds that share one store (core and events.k8s.io Events) share it.
    pub store: String,
    /// A custom resource's OpenAPI v3 schema (from its CRD), checked on every write.
    pub schema: Option<Value>,
}

impl ResourceType {
    fn builtin(
        group: &str,
        version: &str,
        plural: &str,
        kind: &str,
        namespaced: bool,
        short: &[&str],
    ) -> Self {
        ResourceType {
            group: group.into(),
            version: version.into(),
            plural: plural.into(),
            singular: kind.to_lowercase(),
            kind: kind.into(),
            namespaced,
            short_names: short.iter().map(|s| s.to_string()).collect(),
            status_subresource: false,
            conditional_update: false,
            custom: false,
            store: store_key(group, plural),
            schema: None,
        }
    }

    /// `v1` or `coordination.k8s.io/v1`.
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.clone()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    /// `services` or `leases.coordination.k8s.io`, as error messages name a resource.
    pub fn qualified(&self) -> String {
        if self.group.is_empty() {
            self.plural.clone()
        } else {
            format!("{}.{}", self.plural, self.group)
        }
    }

    /// `Lease.coordination.k8s.io`, as 422 messages name a kind.
    pub fn qualified_kind(&self) -> String {
        if self.group.is_empty() {
            self.kind.clone()
        } else {
            format!("{}.{}", self.kind, self.group)
        }
    }

    /// The APIResource entries of discovery: the resource and its subresources.
    pub fn discovery_entries(&self) -> Vec<Value> {
        let mut out = vec![json!({
            "name": self.plural,
            "singularName": self.singular,
            "namespaced": self.namespaced,
            "kind": self.kind,
            "verbs": ["create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"],
            "shortNames": self.short_names,
        })];
        if self.status_subresource {
            out.push(json!({
                "name": format!("{}/status", self.plural),
                "singularName": "",
                "namespaced": self.namespaced,
                "kind": self.kind,
                "verbs": ["get", "patch", "update"],
            }));
        }
        out
    }
}

pub fn store_key(group: &str, plural: &str) -> String {
    format!("{group}/{plural}")
}

pub const EVENTS_STORE: &str = "/events";

/// The built-in kinds.
pub fn builtin() -> Vec<ResourceType> {
    let mut v = Vec::new();
    let mut svc = ResourceType::builtin("", "v1", "services", "Service", true, &["svc"]);
    svc.status_subresource = true;
    v.push(svc);
    let mut node = ResourceType::builtin("", "v1", "nodes", "Node", false, &["no"]);
    node.status_subresource = true;
    v.push(node);
    v.push(ResourceType::builtin(
        "",
        "v1",
        "configmaps",
        "ConfigMap",
        true,
        &["cm"],
    ));
    let mut ns = ResourceType::builtin("", "v1", "namespaces", "Namespace", false, &["ns"]);
    ns.status_subresource = true;
    v.push(ns);
    v.push(ResourceType::builtin(
        "",
        "v1",
        "secrets",
        "Secret",
        true,
        &[],
    ));
    v.push(ResourceType::builtin(
        "",
        "v1",
        "events",
        "Event",
        true,
        &["ev"],
    ));
    let mut pods = ResourceType::builtin("", "v1", "pods", "Pod", true, &["po"]);
    pods.status_subresource = true;
    v.push(pods);
    let mut lease =
        ResourceType::builtin("coordination.k8s.io", "v1", "leases", "Lease", true, &[]);
    lease.conditional_update = true;
    v.push(lease);
    v.push(ResourceType::builtin(
        "discovery.k8s.io",
        "v1",
        "endpointslices",
        "EndpointSlice",
        true,
        &[],
    ));
    let mut ev2 = ResourceType::builtin("events.k8s.io", "v1", "events", "Event", true, &["ev"]);
    ev2.store = EVENTS_STORE.into();
    v.push(ev2);
    // What the project's own manifests contain, so `kubectl apply -f manifests/` works.
    v.push(ResourceType::builtin(
        "",
        "v1",
        "serviceaccounts",
        "ServiceAccount",
        true,
        &["sa"],
    ));
    let mut ds = ResourceType::builtin("apps", "v1", "daemonsets", "DaemonSet", true, &["ds"]);
    ds.status_subresource = true;
    v.push(ds);
    for (plural, kind, namespaced) in [
        ("clusterroles", "ClusterRole", false),
        ("clusterrolebindings", "ClusterRoleBinding", false),
        ("roles", "Role", true),
        ("rolebindings", "RoleBinding", true),
    ] {
        v.push(ResourceType::builtin(
            "rbac.authorization.k8s.io",
            "v1",
            plural,
            kind,
            namespaced,
            &[],
        ));
    }
    let mut crd = ResourceType::builtin(
        "apiextensions.k8s.io",
        "v1",
        "customresourcedefinitions",
        "CustomResourceDefinition",
        false,
        &["crd", "crds"],
    );
    crd.status_subresource = true;
    v.push(crd);
    v
}

/// The resource types a CustomResourceDefinition defines (one per served version), or why
/// the definition is unusable.
pub fn from_crd(crd: &Value) -> Result<Vec<ResourceType>, String> {
    let spec = crd.get("spec").ok_or("spec is required")?;
    let s = |v: Option<&Value>, what: &str| -> Result<String, String> {
        v.and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .ok_or(format!("spec.{what} is required"))
    };
    let group = s(spec.get("group"), "group")?;
    let names = spec.get("names").ok_or("spec.names is required")?;
    let plural = s(names.get("plural"), "names.plural")?;
    let kind = s(names.get("kind"), "names.kind")?;
    let singular = names
        .get("singular")
        .and_then(Value::as_str)
        .map(str::to_string)
        .unwrap_or_else(|| kind.to_lowercase());
    let short_names: Vec<String> = names
        .get("shortNames")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|s| s.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    let namespaced = match spec.get("scope").and_then(Value::as_str) {
        Some("Namespaced") => true,
        Some("Cluster") => false,
        _ => return Err("spec.scope must be Namespaced or Cluster".into()),
    };
    if crd.pointer("/metadata/name").and_then(Value::as_str) != Some(&format!("{plural}.{group}")) {
        return Err(format!("metadata.name must be {plural}.{group}"));
    }
    let versions = spec
        .get("versions")
        .and_then(Value::as_array)
        .filter(|v| !v.is_empty())
        .ok_or("spec.versions must list at least one version")?;
    let mut out = Vec::new();
    for v in versions {
        if v.get("served").and_then(Value::as_bool) == Some(false) {
            continue;
        }
        let version = s(v.get("name"), "versions[].name")?;
        out.push(ResourceType {
            group: group.clone(),
            version,
            plural: plural.clone(),
            singular: singular.clone(),
            kind: kind.clone(),
            namespaced,
            short_names: short_names.clone(),
            status_subresource: v.pointer("/subresources/status").is_some(),
            conditional_update: true,
            custom: true,
            store: store_key(&group, &plural),
            schema: v.pointer("/schema/openAPIV3Schema").cloned(),
        });
    }
    Ok(out)
}
