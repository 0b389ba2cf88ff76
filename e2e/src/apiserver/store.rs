//! The object store: every kind in one map, one global resourceVersion counter, a bounded
//! history of changes for watch replay, and a broadcast of live changes.
//!
//! All writes take one mutex, so the counter, the map, the history and the broadcast move
//! together: a watcher that copies the history and subscribes under the same lock neither
//! misses nor repeats a change.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use serde_json::{Value, json};
use tokio::sync::{broadcast, watch};

use super::events;
use super::patch::{self, PatchError, PatchType};
use super::resources::{self, EVENTS_STORE, ResourceType};
use super::selector::{FieldSelector, LabelSelector};
use super::status::ApiError;
use super::validation;

/// How many changes are kept for watch replay.
const HISTORY: usize = 10_000;
/// Live changes a slow watcher may fall behind before it is told 410 and must relist.
const BROADCAST: usize = 16_384;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangeKind {
    Added,
    Modified,
    Deleted,
}

impl ChangeKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ChangeKind::Added => "ADDED",
            ChangeKind::Modified => "MODIFIED",
            ChangeKind::Deleted => "DELETED",
        }
    }
}

/// One committed change, as stored (core shape for Events).
#[derive(Debug)]
pub struct Change {
    pub rv: u64,
    pub kind: ChangeKind,
    pub store: String,
    pub namespace: String,
    pub object: Value,
    /// The object before a modification, so a selector-filtered watch can turn a change that
    /// leaves (or enters) its selection into DELETED (or ADDED).
    pub old: Option<Value>,
}

type Key = (String, String);

struct Inner {
    rv: u64,
    /// Watches from a resourceVersion below this get 410 Expired.
    compacted: u64,
    objects: BTreeMap<String, BTreeMap<Key, Value>>,
    history: VecDeque<Arc<Change>>,
    types: Vec<ResourceType>,
    requests: BTreeMap<String, u64>,
}

pub struct Store {
    inner: Mutex<Inner>,
    live: broadcast::Sender<Arc<Change>>,
    /// Bumped to end every open watch stream (a test forcing clients to re-watch).
    watch_epoch: watch::Sender<u64>,
}

/// What a watch starts with: the changes to replay, and the live feed after them.
pub struct WatchStart {
    pub initial: Vec<Arc<Change>>,
    pub live: broadcast::Receiver<Arc<Change>>,
    pub epoch: watch::Receiver<u64>,
    pub rv: u64,
}

pub struct Selectors {
    pub label: LabelSelector,
    pub field: FieldSelector,
}

impl Selectors {
    pub fn matches(&self, obj: &Value) -> bool {
        self.label.matches(obj) && self.field.matches(obj)
    }
}

fn now_seconds() -> String {
    chrono::Utc::now().format("%Y-%m-%dT%H:%M:%SZ").to_string()
}

fn meta_str<'a>(obj: &'a Value, field: &str) -> Option<&'a str> {
    obj.get("metadata")
        .and_then(|m| m.get(field))
        .and_then(Value::as_str)
}

/// MicroTime fields are written with exactly six fractional digits and `Z`.
fn normalize_micro_time(obj: &mut Value, pointer: &str) -> Result<(), String> {
    let Some(v) = obj.pointer_mut(pointer) else {
        return Ok(());
    };
    let Some(s) = v.as_str() else {
        return if v.is_null() {
            Ok(())
        } else {
            Err(format!("{pointer}: expected a time string"))
        };
    };
    let t = chrono::DateTime::parse_from_rfc3339(s).map_err(|e| {
        format!(
            "{}: invalid time {s:?}: {e}",
            &pointer[1..].replace('/', ".")
        )
    })?;
    *v = json!(
        t.with_timezone(&chrono::Utc)
            .format("%Y-%m-%dT%H:%M:%S%.6fZ")
            .to_string()
    );
    Ok(())
}

impl Default for Store {
    fn default() -> Self {
        Self::new()
    }
}

impl Store {
    pub fn new() -> Self {
        let (live, _) = broadcast::channel(BROADCAST);
        let (watch_epoch, _) = watch::channel(0);
        let store = Store {
            inner: Mutex::new(Inner {
                rv: 1,
                compacted: 0,
                objects: BTreeMap::new(),
                history: VecDeque::new(),
                types: resources::builtin(),
                requests: BTreeMap::new(),
            }),
            live,
            watch_epoch,
        };
        let ns_type = store.find("", "v1", "namespaces").expect("built in");
        for ns in ["default", "kube-system", "kube-public", "kube-node-lease"] {
            store
                .create(&ns_type, "", json!({"metadata": {"name": ns}}))
                .expect("fresh store");
        }
        store
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock would be a bug in this file; the state is still
        // consistent at every await-free step, so carry on rather than poison every request.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn find(&self, group: &str, version: &str, plural: &str) -> Option<ResourceType> {
        self.lock()
            .types
            .iter()
            .find(|t| t.group == group && t.version == version && t.plural == plural)
            .cloned()
    }

    pub fn types(&self) -> Vec<ResourceType> {
        self.lock().types.clone()
    }

    pub fn resource_version(&self) -> u64 {
        self.lock().rv
    }

    pub fn count_request(&self, verb: &str, rt: &ResourceType) {
        *self
            .lock()
            .requests
            .entry(format!("{verb} {}", rt.qualified()))
            .or_default() += 1;
    }

    /// Requests served, by `"<verb> <resource>"`.
    pub fn requests(&self) -> BTreeMap<String, u64> {
        self.lock().requests.clone()
    }

    /// Forgets the history and ends every watch: clients that re-watch from a resourceVersion
    /// they had get 410 Expired and must relist, as after an etcd compaction.
    pub fn expire_watches(&self) {
        let mut g = self.lock();
        g.rv += 1;
        g.compacted = g.rv;
        g.history.clear();
        drop(g);
        self.end_watches();
    }

    /// Ends every open watch stream as a server-side timeout would.
    pub fn end_watches(&self) {
        self.watch_epoch.send_modify(|e| *e += 1);
    }

    /// The object as a client of `rt` sees it.
    pub fn present(rt: &ResourceType, obj: &Value) -> Value {
        let mut out = if rt.group == "events.k8s.io" {
            events::to_new(obj.clone())
        } else {
            obj.clone()
        };
        out["apiVersion"] = json!(rt.api_version());
        out["kind"] = json!(rt.kind);
        out
    }

    /// The object as stored, from what a client of `rt` sent.
    fn accept(rt: &ResourceType, mut obj: Value) -> Result<Value, ApiError> {
        if !obj.is_object() {
            return Err(ApiError::bad_request(
                "the request body must be a JSON object",
            ));
        }
        if let Some(av) = obj.get("apiVersion").and_then(Value::as_str)
            && av != rt.api_version()
            && !(rt.custom && av.starts_with(&format!("{}/", rt.group)))
        {
            return Err(ApiError::bad_request(format!(
                "the API version in the data ({av}) does not match the expected API version ({})",
                rt.api_version()
            )));
        }
        if let Some(k) = obj.get("kind").and_then(Value::as_str)
            && k != rt.kind
        {
            return Err(ApiError::bad_request(format!(
                "the kind in the data ({k}) does not match the expected kind ({})",
                rt.kind
            )));
        }
        if obj.get("metadata").is_some_and(|m| !m.is_object()) {
            return Err(ApiError::bad_request("metadata must be an object"));
        }
        if obj.get("metadata").is_none() {
            obj["metadata"] = json!({});
        }
        if rt.group == "events.k8s.io" {
            obj = events::to_core(obj);
        }
        let micro: &[&str] = match rt.store.as_str() {
            "coordination.k8s.io/leases" => &["/spec/acquireTime", "/spec/renewTime"],
            EVENTS_STORE => &["/eventTime", "/series/lastObservedTime"],
            _ => &[],
        };
        for p in micro {
            normalize_micro_time(&mut obj, p).map_err(ApiError::bad_request)?;
        }
        obj["apiVersion"] = json!(rt.api_version());
        obj["kind"] = json!(rt.kind);
        Ok(obj)
    }

    fn validate(rt: &ResourceType, name: &str, obj: &Value) -> Result<(), ApiError> {
        let mut causes = validation::metadata(obj, rt.store == "/namespaces");
        if let Some(schema) = &rt.schema {
            causes.extend(validation::custom_resource(schema, obj));
        }
        if !causes.is_empty() {
            return Err(ApiError::invalid_causes(rt, name, &causes));
        }
        if rt.store == "coordination.k8s.io/leases"
            && let Some(d) = obj.pointer("/spec/leaseDurationSeconds")
            && d.as_i64().is_none_or(|d| d <= 0)
        {
            return Err(ApiError::invalid(
                rt,
                name,
                "spec.leaseDurationSeconds",
                &format!("Invalid value: {d}: must be greater than 0"),
            ));
        }
        if rt.store == "apiextensions.k8s.io/customresourcedefinitions" {
            resources::from_crd(obj).map_err(|e| ApiError::invalid(rt, name, "spec", &e))?;
        }
        Ok(())
    }

    fn default_fields(rt: &ResourceType, obj: &mut Value) {
        match rt.store.as_str() {
            "/services" => {
                let spec = &mut obj["spec"];
                if !spec.is_object() {
                    *spec = json!({});
                }
                let ty = spec
                    .get("type")
                    .and_then(Value::as_str)
                    .unwrap_or("ClusterIP")
                    .to_string();
                spec["type"] = json!(ty);
                if spec.get("sessionAffinity").is_none() {
                    spec["sessionAffinity"] = json!("None");
                }
                if (ty == "LoadBalancer" || ty == "NodePort")
                    && spec.get("externalTrafficPolicy").is_none()
                {
                    spec["externalTrafficPolicy"] = json!("Cluster");
                }
                if let Some(ports) = spec.get_mut("ports").and_then(Value::as_array_mut) {
                    for p in ports {
                        if p.get("protocol").is_none() {
                            p["protocol"] = json!("TCP");
                        }
                        if p.get("targetPort").is_none() {
                            p["targetPort"] = p.get("port").cloned().unwrap_or(Value::Null);
                        }
                    }
                }
            }
            "/namespaces" => obj["status"] = json!({"phase": "Active"}),
            "apiextensions.k8s.io/customresourcedefinitions" => {
                let names = obj.pointer("/spec/names").cloned().unwrap_or(json!({}));
                let now = now_seconds();
                obj["status"] = json!({
                    "acceptedNames": names,
                    "storedVersions": obj.pointer("/spec/versions").and_then(Value::as_array)
                        .map(|vs| vs.iter().filter_map(|v| v.get("name").cloned()).collect::<Vec<_>>())
                        .unwrap_or_default(),
                    "conditions": [
                        {"type": "NamesAccepted", "status": "True", "reason": "NoConflicts",
                         "message": "no conflicts found", "lastTransitionTime": now},
                        {"type": "Established", "status": "True", "reason": "InitialNamesAccepted",
                         "message": "the initial names have been accepted", "lastTransitionTime": now},
                    ],
                });
            }
            _ => {}
        }
    }

    fn check_namespace(g: &Inner, rt: &ResourceType, ns: &str) -> Result<(), ApiError> {
        if rt.namespaced
            && !g
                .objects
                .get("/namespaces")
                .is_some_and(|m| m.contains_key(&(String::new(), ns.to_string())))
        {
            return Err(ApiError::namespace_not_found(ns));
        }
        Ok(())
    }

    pub fn get(&self, rt: &ResourceType, ns: &str, name: &str) -> Result<Value, ApiError> {
        let g = self.lock();
        g.objects
            .get(&rt.store)
            .and_then(|m| m.get(&(ns.to_string(), name.to_string())))
            .map(|o| Self::present(rt, o))
            .ok_or_else(|| ApiError::not_found(rt, name))
    }

    /// The matching objects (all namespaces when `ns` is None) and the list resourceVersion.
    pub fn list(&self, rt: &ResourceType, ns: Option<&str>, sel: &Selectors) -> (Vec<Value>, u64) {
        let g = self.lock();
        let items = g
            .objects
            .get(&rt.store)
            .into_iter()
            .flat_map(|m| m.iter())
            .filter(|((ons, _), o)| ns.is_none_or(|n| n == ons) && sel.matches(o))
            .map(|(_, o)| Self::present(rt, o))
            .collect();
        (items, g.rv)
    }

    /// Starts a watch at `from` (None: now, with a synthetic ADDED for every object).
    pub fn watch(&self, rt: &ResourceType, from: Option<u64>) -> Result<WatchStart, ApiError> {
        let g = self.lock();
        let initial = match from {
            None => g
                .objects
                .get(&rt.store)
                .into_iter()
                .flat_map(|m| m.iter())
                .map(|((ns, _), o)| {
                    Arc::new(Change {
                        rv: g.rv,
                        kind: ChangeKind::Added,
                        store: rt.store.clone(),
                        namespace: ns.clone(),
                        object: o.clone(),
                        old: None,
                    })
                })
                .collect(),
            Some(n) if n < g.compacted => return Err(ApiError::expired(n, g.compacted)),
            Some(n) => g
                .history
                .iter()
                .filter(|c| c.rv > n && c.store == rt.store)
                .cloned()
                .collect(),
        };
        Ok(WatchStart {
            initial,
            live: self.live.subscribe(),
            epoch: self.watch_epoch.subscribe(),
            rv: g.rv,
        })
    }

    fn commit(
        &self,
        g: &mut Inner,
        kind: ChangeKind,
        rt: &ResourceType,
        ns: &str,
        obj: Value,
        old: Option<Value>,
    ) {
        let change = Arc::new(Change {
            rv: g.rv,
            kind,
            store: rt.store.clone(),
            namespace: ns.to_string(),
            object: obj,
            old,
        });
        if g.history.len() >= HISTORY
            && let Some(dropped) = g.history.pop_front()
        {
            g.compacted = dropped.rv;
        }
        g.history.push_back(change.clone());
        // No receivers is fine: nobody is watching.
        let _ = self.live.send(change);
    }

    pub fn create(&self, rt: &ResourceType, ns: &str, body: Value) -> Result<Value, ApiError> {
        let mut obj = Self::accept(rt, body)?;
        let mut g = self.lock();
        self.create_locked(&mut g, rt, ns, &mut obj)?;
        Ok(Self::present(rt, &obj))
    }

    fn create_locked(
        &self,
        g: &mut Inner,
        rt: &ResourceType,
        ns: &str,
        obj: &mut Value,
    ) -> Result<(), ApiError> {
        let body_ns = meta_str(obj, "namespace").unwrap_or("").to_string();
        if rt.namespaced {
            if !body_ns.is_empty() && body_ns != ns {
                return Err(ApiError::bad_request(format!(
                    "the namespace of the provided object does not match the namespace sent on the request ({body_ns} != {ns})"
                )));
            }
            Self::check_namespace(g, rt, ns)?;
        }
        let name = match meta_str(obj, "name").filter(|n| !n.is_empty()) {
            Some(n) => n.to_string(),
            None => match meta_str(obj, "generateName").filter(|n| !n.is_empty()) {
                Some(prefix) => format!(
                    "{prefix}{}",
                    &uuid::Uuid::new_v4().simple().to_string()[..5]
                ),
                None => {
                    return Err(ApiError::invalid(
                        rt,
                        "",
                        "metadata.name",
                        "Required value: name or generateName is required",
                    ));
                }
            },
        };
        Self::validate(rt, &name, obj)?;
        let key = (
            if rt.namespaced {
                ns.to_string()
            } else {
                String::new()
            },
            name.clone(),
        );
        if g.objects
            .get(&rt.store)
            .is_some_and(|m| m.contains_key(&key))
        {
            return Err(ApiError::already_exists(rt, &name));
        }
        if rt.status_subresource
            && rt.store != "/nodes"
            && let Some(m) = obj.as_object_mut()
        {
            m.remove("status");
        }
        Self::default_fields(rt, obj);
        g.rv += 1;
        let meta = &mut obj["metadata"];
        meta["name"] = json!(name);
        if rt.namespaced {
            meta["namespace"] = json!(ns);
        } else if let Some(m) = meta.as_object_mut() {
            m.remove("namespace");
        }
        meta["uid"] = json!(uuid::Uuid::new_v4().to_string());
        meta["creationTimestamp"] = json!(now_seconds());
        meta["resourceVersion"] = json!(g.rv.to_string());
        if rt.custom || rt.store == "apiextensions.k8s.io/customresourcedefinitions" {
            meta["generation"] = json!(1);
        }
        if let Some(m) = meta.as_object_mut() {
            m.remove("deletionTimestamp");
        }
        g.objects
            .entry(rt.store.clone())
            .or_default()
            .insert(key.clone(), obj.clone());
        self.commit(g, ChangeKind::Added, rt, &key.0, obj.clone(), None);
        if rt.store == "apiextensions.k8s.io/customresourcedefinitions" {
            let new_types = resources::from_crd(obj).expect("validated above");
            g.types.extend(new_types);
        }
        Ok(())
    }

    /// PUT, on the main path or `/status`.
    pub fn update(
        &self,
        rt: &ResourceType,
        ns: &str,
        name: &str,
        body: Value,
        status: bool,
    ) -> Result<Value, ApiError> {
        let obj = Self::accept(rt, body)?;
        if meta_str(&obj, "name").is_some_and(|n| n != name) {
            return Err(ApiError::bad_request(format!(
                "the name of the object ({}) does not match the name on the URL ({name})",
                meta_str(&obj, "name").unwrap_or_default()
            )));
        }
        let precondition = meta_str(&obj, "resourceVersion")
            .filter(|s| !s.is_empty())
            .map(str::to_string);
        if precondition.is_none() && rt.conditional_update {
            return Err(ApiError::invalid(
                rt,
                name,
                "metadata.resourceVersion",
                "Invalid value: 0x0: must be specified for an update",
            ));
        }
        let mut g = self.lock();
        let out = self.update_locked(&mut g, rt, ns, name, obj, status, precondition.as_deref())?;
        Ok(Self::present(rt, &out))
    }

    #[allow(clippy::too_many_arguments)]
    fn update_locked(
        &self,
        g: &mut Inner,
        rt: &ResourceType,
        ns: &str,
        name: &str,
        mut new: Value,
        status: bool,
        precondition: Option<&str>,
    ) -> Result<Value, ApiError> {
        let body_ns = meta_str(&new, "namespace").unwrap_or("");
        if rt.namespaced && !body_ns.is_empty() && body_ns != ns {
            return Err(ApiError::bad_request(format!(
                "the namespace of the provided object does not match the namespace sent on the request ({body_ns} != {ns})"
            )));
        }
        let key = (ns.to_string(), name.to_string());
        let old = g
            .objects
            .get(&rt.store)
            .and_then(|m| m.get(&key))
            .cloned()
            .ok_or_else(|| ApiError::not_found(rt, name))?;
        if let Some(p) = precondition
            && meta_str(&old, "resourceVersion") != Some(p)
        {
            return Err(ApiError::conflict(rt, name));
        }
        if status {
            // Only .status changes through the subresource.
            let st = new.get("status").cloned();
            new = old.clone();
            match st {
                Some(s) => new["status"] = s,
                None => {
                    if let Some(m) = new.as_object_mut() {
                        m.remove("status");
                    }
                }
            }
        } else if rt.status_subresource {
            match old.get("status") {
                Some(s) => new["status"] = s.clone(),
                None => {
                    if let Some(m) = new.as_object_mut() {
                        m.remove("status");
                    }
                }
            }
        }
        Self::validate(rt, name, &new)?;
        // Fields the server owns.
        for f in [
            "uid",
            "creationTimestamp",
            "deletionTimestamp",
            "generation",
            "namespace",
            "name",
        ] {
            match old["metadata"].get(f) {
                Some(v) => new["metadata"][f] = v.clone(),
                None => {
                    if let Some(m) = new["metadata"].as_object_mut() {
                        m.remove(f);
                    }
                }
            }
        }
        if rt.store == "/services" || rt.store == "/namespaces" {
            Self::default_fields(rt, &mut new);
        }
        new["metadata"]["resourceVersion"] = old["metadata"]["resourceVersion"].clone();
        if new == old {
            return Ok(old);
        }
        let spec_changed = {
            let strip = |v: &Value| {
                let mut v = v.clone();
                if let Some(m) = v.as_object_mut() {
                    m.remove("metadata");
                    m.remove("status");
                }
                v
            };
            strip(&new) != strip(&old)
        };
        if spec_changed
            && (rt.custom || rt.store == "apiextensions.k8s.io/customresourcedefinitions")
        {
            let gen_ = old["metadata"]["generation"].as_i64().unwrap_or(1);
            new["metadata"]["generation"] = json!(gen_ + 1);
        }
        g.rv += 1;
        new["metadata"]["resourceVersion"] = json!(g.rv.to_string());
        let finalizing = new["metadata"].get("deletionTimestamp").is_some()
            && new["metadata"]["finalizers"]
                .as_array()
                .is_none_or(|f| f.is_empty());
        if finalizing {
            self.remove_locked(g, rt, &key, new.clone());
            return Ok(new);
        }
        g.objects
            .entry(rt.store.clone())
            .or_default()
            .insert(key.clone(), new.clone());
        self.commit(g, ChangeKind::Modified, rt, ns, new.clone(), Some(old));
        Ok(new)
    }

    /// PATCH. `field_manager` is required for apply patches (as by the real server).
    #[allow(clippy::too_many_arguments)]
    pub fn patch(
        &self,
        rt: &ResourceType,
        ns: &str,
        name: &str,
        kind: PatchType,
        body: &[u8],
        status: bool,
        field_manager: Option<&str>,
    ) -> Result<Value, ApiError> {
        if kind == PatchType::Strategic && rt.custom {
            return Err(ApiError::unsupported_media_type(
                "application/strategic-merge-patch+json",
            ));
        }
        if kind == PatchType::Apply && field_manager.is_none_or(str::is_empty) {
            return Err(ApiError::invalid(
                rt,
                name,
                "metadata.managedFields",
                "Required value: fieldManager is required for apply requests",
            ));
        }
        // A resourceVersion inside a merge-style patch is a precondition.
        let precondition = match kind {
            PatchType::Json => None,
            _ => {
                let doc = patch::parse_object(body, kind).map_err(patch_error)?;
                doc.pointer("/metadata/resourceVersion")
                    .and_then(Value::as_str)
                    .map(str::to_string)
            }
        };
        let mut g = self.lock();
        let key = (ns.to_string(), name.to_string());
        let current = g.objects.get(&rt.store).and_then(|m| m.get(&key)).cloned();
        let Some(current) = current else {
            if kind == PatchType::Apply && !status {
                let doc = patch::parse_object(body, kind).map_err(patch_error)?;
                let mut obj = Self::accept(rt, doc)?;
                if meta_str(&obj, "name").is_some_and(|n| n != name) {
                    return Err(ApiError::bad_request(
                        "the name of the object does not match the name on the URL",
                    ));
                }
                obj["metadata"]["name"] = json!(name);
                self.create_locked(&mut g, rt, ns, &mut obj)?;
                return Ok(Self::present(rt, &obj));
            }
            return Err(ApiError::not_found(rt, name));
        };
        let mut doc = Self::present(rt, &current);
        patch::apply(kind, &mut doc, body).map_err(|e| match e {
            PatchError::NotApplicable(m) => ApiError::invalid(rt, name, "patch", &m),
            e => patch_error(e),
        })?;
        let mut new = Self::accept(rt, doc)?;
        // The patch cannot move the object.
        new["metadata"]["name"] = json!(name);
        new["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"].clone();
        let out = self.update_locked(&mut g, rt, ns, name, new, status, precondition.as_deref())?;
        Ok(Self::present(rt, &out))
    }

    /// DELETE, with an optional resourceVersion/uid precondition. Objects with finalizers
    /// are marked and stay until the last finalizer goes.
    pub fn delete(
        &self,
        rt: &ResourceType,
        ns: &str,
        name: &str,
        preconditions: &Value,
    ) -> Result<Value, ApiError> {
        let mut g = self.lock();
        let key = (ns.to_string(), name.to_string());
        let old = g
            .objects
            .get(&rt.store)
            .and_then(|m| m.get(&key))
            .cloned()
            .ok_or_else(|| ApiError::not_found(rt, name))?;
        for (field, meta) in [("resourceVersion", "resourceVersion"), ("uid", "uid")] {
            if let Some(want) = preconditions.get(field).and_then(Value::as_str)
                && meta_str(&old, meta) != Some(want)
            {
                return Err(ApiError::conflict(rt, name));
            }
        }
        let has_finalizers = old["metadata"]["finalizers"]
            .as_array()
            .is_some_and(|f| !f.is_empty());
        g.rv += 1;
        let mut new = old.clone();
        new["metadata"]["resourceVersion"] = json!(g.rv.to_string());
        if has_finalizers {
            if old["metadata"].get("deletionTimestamp").is_none() {
                new["metadata"]["deletionTimestamp"] = json!(now_seconds());
                new["metadata"]["deletionGracePeriodSeconds"] = json!(0);
                g.objects
                    .entry(rt.store.clone())
                    .or_default()
                    .insert(key, new.clone());
                self.commit(&mut g, ChangeKind::Modified, rt, ns, new.clone(), Some(old));
            } else {
                g.rv -= 1;
                return Ok(Self::present(rt, &old));
            }
        } else {
            self.remove_locked(&mut g, rt, &key, new.clone());
        }
        Ok(Self::present(rt, &new))
    }

    pub fn delete_collection(
        &self,
        rt: &ResourceType,
        ns: Option<&str>,
        sel: &Selectors,
    ) -> Vec<Value> {
        let (items, _) = self.list(rt, ns, sel);
        items
            .into_iter()
            .filter_map(|o| {
                let ns = meta_str(&o, "namespace").unwrap_or("").to_string();
                let name = meta_str(&o, "name")?.to_string();
                self.delete(rt, &ns, &name, &Value::Null).ok()
            })
            .collect()
    }

    /// Removes an object for good (its DELETED change carries `last`, with the new RV), and
    /// what hangs on it: a namespace's objects, a CRD's custom resources and served kinds.
    fn remove_locked(&self, g: &mut Inner, rt: &ResourceType, key: &Key, last: Value) {
        if let Some(m) = g.objects.get_mut(&rt.store) {
            m.remove(key);
        }
        self.commit(g, ChangeKind::Deleted, rt, &key.0, last.clone(), None);
        let dependants: Vec<(ResourceType, Key)> = match rt.store.as_str() {
            "/namespaces" => g
                .types
                .iter()
                .filter(|t| t.namespaced && t.group != "events.k8s.io")
                .flat_map(|t| {
                    g.objects
                        .get(&t.store)
                        .into_iter()
                        .flat_map(|m| m.keys())
                        .filter(|(ns, _)| *ns == key.1)
                        .map(move |k| (t.clone(), k.clone()))
                })
                .collect(),
            "apiextensions.k8s.io/customresourcedefinitions" => {
                let store = resources::from_crd(&last)
                    .ok()
                    .and_then(|ts| ts.first().map(|t| t.store.clone()));
                let dropped: Vec<ResourceType> = g
                    .types
                    .iter()
                    .filter(|t| Some(&t.store) == store.as_ref())
                    .cloned()
                    .collect();
                g.types.retain(|t| Some(&t.store) != store.as_ref());
                dropped
                    .first()
                    .map(|t| {
                        g.objects
                            .get(&t.store)
                            .into_iter()
                            .flat_map(|m| m.keys())
                            .map(|k| (t.clone(), k.clone()))
                            .collect()
                    })
                    .unwrap_or_default()
            }
            _ => Vec::new(),
        };
        let mut seen = std::collections::BTreeSet::new();
        for (t, k) in dependants {
            if !seen.insert((t.store.clone(), k.clone())) {
                continue;
            }
            let Some(mut obj) = g.objects.get(&t.store).and_then(|m| m.get(&k)).cloned() else {
                continue;
            };
            g.rv += 1;
            obj["metadata"]["resourceVersion"] = json!(g.rv.to_string());
            self.remove_locked(g, &t, &k, obj);
        }
    }
}

fn patch_error(e: PatchError) -> ApiError {
    match e {
        PatchError::Malformed(m) | PatchError::NotApplicable(m) => ApiError::bad_request(m),
    }
}
