//! HTTP: routing of Kubernetes API paths onto the store, discovery, and watch streams.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{ConnectInfo, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri, header};
use axum::response::Response;
use serde_json::{Value, json};
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;

use super::patch::PatchType;
use super::resources::ResourceType;
use super::selector::{FieldSelector, LabelSelector};
use super::status::ApiError;
use super::store::{Change, ChangeKind, Selectors, Store};
use super::table;

/// What the server is, beyond its objects.
#[derive(Debug, Clone)]
pub struct Config {
    /// The `minor` version reported at `/version` (the kubectl dispatcher picks by it).
    pub minor: u32,
    /// Watches that asked for a timeout end after at most this long (kube-rs asks for 290 s;
    /// tests shorten it to exercise re-watching).
    pub watch_timeout_cap: Option<Duration>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            minor: 29,
            watch_timeout_cap: None,
        }
    }
}

pub struct Server {
    pub store: Store,
    pub config: Config,
    /// `"<verb> <resource>"` pairs answered 403 Forbidden, as RBAC would (tests of refusals).
    pub forbidden: std::sync::Mutex<std::collections::BTreeSet<String>>,
    /// Injected faults (see [`super::faults`]).
    pub faults: super::faults::Faults,
}

impl Server {
    pub fn new(config: Config) -> Self {
        Server {
            store: Store::new(),
            config,
            forbidden: Default::default(),
            faults: Default::default(),
        }
    }

    /// Answers `verb` on `resource` (`patch leases.coordination.k8s.io`) with 403 from now on.
    pub fn forbid(&self, verb: &str, resource: &str) {
        self.forbidden
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(format!("{verb} {resource}"));
    }
}

pub fn router(server: Arc<Server>) -> Router {
    Router::new().fallback(handle).with_state(server)
}

fn json_response(code: u16, v: &Value) -> Response {
    Response::builder()
        .status(code)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(v.to_string()))
        .expect("static headers")
}

fn error_response(e: &ApiError) -> Response {
    json_response(e.code, &e.to_status())
}

type Query = HashMap<String, String>;

fn parse_query(uri: &Uri) -> Query {
    form_urlencoded::parse(uri.query().unwrap_or("").as_bytes())
        .filter(|(k, _)| !k.is_empty())
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect()
}

/// Where a request points inside a resource.
struct Target {
    rt: ResourceType,
    namespace: Option<String>,
    name: Option<String>,
    status: bool,
}

/// Applies an injected fault, if one matches, around [`serve_request`].
async fn handle(
    State(s): State<Arc<Server>>,
    ConnectInfo(peer): ConnectInfo<std::net::SocketAddr>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    use super::faults::{Action, Phase};
    let watching = uri
        .query()
        .is_some_and(|q| q.split('&').any(|kv| kv == "watch=true" || kv == "watch=1"));
    let shown = if watching { "WATCH" } else { method.as_str() };
    let rule = if uri.path().starts_with("/_test/") {
        None
    } else {
        s.faults.take(shown, uri.path(), Some(peer.ip()))
    };
    let Some(rule) = rule else {
        return serve_request(s, method, uri, headers, body).await;
    };
    let hold = Duration::from_millis(rule.ms);
    match (rule.action, rule.phase) {
        (Action::Blackhole, _) => std::future::pending().await,
        (Action::Fail, _) => {
            let code = rule.code.unwrap_or(503);
            let mut r = error_response(&ApiError::injected(code));
            if let Some(secs) = rule.retry_after {
                r.headers_mut().insert(
                    header::RETRY_AFTER,
                    header::HeaderValue::from_str(&secs.to_string()).expect("digits"),
                );
            }
            r
        }
        (Action::Delay, Phase::Before) => {
            tokio::time::sleep(hold).await;
            serve_request(s, method, uri, headers, body).await
        }
        (Action::Delay, Phase::After) => {
            let r = serve_request(s, method, uri, headers, body).await;
            tokio::time::sleep(hold).await;
            r
        }
        (Action::Hang, _) => {
            let _served = serve_request(s, method, uri, headers, body).await;
            std::future::pending().await
        }
    }
}

async fn serve_request(
    s: Arc<Server>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let path = uri.path().to_string();
    let segs: Vec<&str> = path
        .trim_matches('/')
        .split('/')
        .filter(|s| !s.is_empty())
        .collect();
    let query = parse_query(&uri);
    tracing::debug!(method = %method, uri = %uri, "request");
    match (method.clone(), segs.as_slice()) {
        (Method::GET, ["version"]) => json_response(200, &version(&s.config)),
        (Method::GET, ["healthz" | "readyz" | "livez"]) => Response::new(Body::from("ok")),
        (Method::GET, ["openapi", "v2"]) => Response::new(Body::empty()),
        (Method::GET, ["api"]) => json_response(
            200,
            &json!({"kind": "APIVersions", "versions": ["v1"],
                    "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": ""}]}),
        ),
        (Method::GET, ["apis"]) => json_response(200, &group_list(&s.store)),
        (Method::GET, ["api", "v1"]) => json_response(200, &resource_list(&s.store, "", "v1")),
        (Method::GET, ["apis", g]) => match group_list(&s.store)["groups"]
            .as_array()
            .and_then(|gs| gs.iter().find(|x| x["name"] == *g))
        {
            Some(grp) => {
                let mut grp = grp.clone();
                grp["kind"] = json!("APIGroup");
                grp["apiVersion"] = json!("v1");
                json_response(200, &grp)
            }
            None => error_response(&ApiError::no_route(&path)),
        },
        (Method::GET, ["apis", g, v]) => {
            let list = resource_list(&s.store, g, v);
            if list["resources"].as_array().is_some_and(|r| r.is_empty()) {
                error_response(&ApiError::no_route(&path))
            } else {
                json_response(200, &list)
            }
        }
        (Method::GET, ["_test", "requests"]) => json_response(200, &json!(s.store.requests())),
        (Method::POST, ["_test", "expire-watches"]) => {
            s.store.expire_watches();
            json_response(
                200,
                &json!({"resourceVersion": s.store.resource_version().to_string()}),
            )
        }
        (Method::GET, ["_test", "faults"]) => json_response(200, &json!(s.faults.list())),
        (Method::DELETE, ["_test", "faults"]) => {
            s.faults.clear();
            json_response(200, &json!({}))
        }
        (Method::POST, ["_test", "faults"]) => {
            match serde_json::from_slice::<super::faults::Rule>(&body) {
                Ok(rule) => {
                    s.faults.add(rule);
                    json_response(201, &json!(s.faults.list()))
                }
                Err(e) => error_response(&ApiError::bad_request(format!("fault rule: {e}"))),
            }
        }
        (Method::POST, ["_test", "end-watches"]) => {
            s.store.end_watches();
            json_response(200, &json!({}))
        }
        (_, ["api", "v1", rest @ ..]) => {
            resource(&s, method, &path, "", "v1", rest, &query, &headers, &body)
        }
        (_, ["apis", g, v, rest @ ..]) => {
            resource(&s, method, &path, g, v, rest, &query, &headers, &body)
        }
        _ => error_response(&ApiError::no_route(&path)),
    }
}

fn version(c: &Config) -> Value {
    json!({
        "major": "1", "minor": c.minor.to_string(), "gitVersion": format!("v1.{}.0", c.minor),
        "gitCommit": "0000000000000000000000000000000000000000", "gitTreeState": "clean",
        "buildDate": "2026-01-01T00:00:00Z", "goVersion": "go1.22.0", "compiler": "gc",
        "platform": "linux/amd64",
    })
}

fn group_list(store: &Store) -> Value {
    let mut groups: Vec<(String, Vec<String>)> = Vec::new();
    for t in store.types() {
        if t.group.is_empty() {
            continue;
        }
        match groups.iter_mut().find(|(g, _)| *g == t.group) {
            Some((_, vs)) if !vs.contains(&t.version) => vs.push(t.version.clone()),
            Some(_) => {}
            None => groups.push((t.group.clone(), vec![t.version.clone()])),
        }
    }
    let groups: Vec<Value> = groups
        .into_iter()
        .map(|(g, vs)| {
            let versions: Vec<Value> = vs
                .iter()
                .map(|v| json!({"groupVersion": format!("{g}/{v}"), "version": v}))
                .collect();
            json!({"name": g, "versions": versions, "preferredVersion": versions[0]})
        })
        .collect();
    json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
}

fn resource_list(store: &Store, group: &str, version: &str) -> Value {
    let resources: Vec<Value> = store
        .types()
        .iter()
        .filter(|t| t.group == group && t.version == version)
        .flat_map(ResourceType::discovery_entries)
        .collect();
    let gv = if group.is_empty() {
        version.to_string()
    } else {
        format!("{group}/{version}")
    };
    json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv, "resources": resources})
}

fn parse_target(
    store: &Store,
    path: &str,
    group: &str,
    version: &str,
    rest: &[&str],
) -> Result<Target, ApiError> {
    let find = |plural: &str| {
        store
            .find(group, version, plural)
            .ok_or_else(|| ApiError::no_route(path))
    };
    let (namespace, rest) = match rest {
        ["namespaces", ns, "status"] if group.is_empty() => {
            return Ok(Target {
                rt: find("namespaces")?,
                namespace: None,
                name: Some(ns.to_string()),
                status: true,
            });
        }
        ["namespaces", ns, r, more @ ..] => (Some(ns.to_string()), {
            let mut v = vec![*r];
            v.extend_from_slice(more);
            v
        }),
        other => (None, other.to_vec()),
    };
    let (rt, name, status) = match rest.as_slice() {
        [res] => (find(res)?, None, false),
        [res, name] => (find(res)?, Some(name.to_string()), false),
        [res, name, "status"] => {
            let rt = find(res)?;
            if !rt.status_subresource {
                return Err(ApiError::no_route(path));
            }
            (rt, Some(name.to_string()), true)
        }
        _ => return Err(ApiError::no_route(path)),
    };
    if namespace.is_some() && !rt.namespaced {
        return Err(ApiError::no_route(path));
    }
    if name.is_some() && namespace.is_none() && rt.namespaced {
        return Err(ApiError::no_route(path));
    }
    Ok(Target {
        rt,
        namespace,
        name,
        status,
    })
}

fn selectors(rt: &ResourceType, q: &Query) -> Result<Selectors, ApiError> {
    let label = LabelSelector::parse(q.get("labelSelector").map(String::as_str).unwrap_or(""))
        .map_err(ApiError::bad_request)?;
    let field = FieldSelector::parse(
        q.get("fieldSelector").map(String::as_str).unwrap_or(""),
        &rt.store,
        rt.group == "events.k8s.io",
    )
    .map_err(ApiError::bad_request)?;
    Ok(Selectors { label, field })
}

fn parse_body(body: &Bytes) -> Result<Value, ApiError> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("invalid request body: {e}")))
}

#[allow(clippy::too_many_arguments)]
fn resource(
    s: &Arc<Server>,
    method: Method,
    path: &str,
    group: &str,
    version: &str,
    rest: &[&str],
    q: &Query,
    headers: &HeaderMap,
    body: &Bytes,
) -> Response {
    let t = match parse_target(&s.store, path, group, version, rest) {
        Ok(t) => t,
        Err(e) => return error_response(&e),
    };
    let rt = &t.rt;
    let ns = t.namespace.clone().unwrap_or_default();
    let watching = matches!(q.get("watch").map(String::as_str), Some("true" | "1"));
    let verb = match (&method, &t.name, watching) {
        (&Method::GET, None, true) => "watch",
        (&Method::GET, None, false) => "list",
        (&Method::GET, Some(_), _) => "get",
        (&Method::POST, None, _) => "create",
        (&Method::PUT, Some(_), _) => "update",
        (&Method::PATCH, Some(_), _) => "patch",
        (&Method::DELETE, Some(_), _) => "delete",
        (&Method::DELETE, None, _) => "deletecollection",
        _ => return error_response(&ApiError::method_not_allowed(method.as_str())),
    };
    let mut counted = rt.clone();
    if t.status {
        counted.plural = format!("{}/status", rt.plural);
    }
    s.store.count_request(verb, &counted);
    let key = format!("{verb} {}", counted.qualified());
    if s.forbidden
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .contains(&key)
    {
        return error_response(&ApiError::forbidden(verb, &counted, t.namespace.as_deref()));
    }
    let name = t.name.as_deref().unwrap_or("");
    let as_table = table::wanted(
        headers
            .get(header::ACCEPT)
            .and_then(|v| v.to_str().ok())
            .unwrap_or(""),
    );
    let result: Result<(u16, Value), ApiError> = (|| match verb {
        "watch" => Err(ApiError::bad_request("unreachable")),
        "list" => {
            let sel = selectors(rt, q)?;
            let (items, rv) = s.store.list(rt, t.namespace.as_deref(), &sel);
            if as_table {
                return Ok((200, table::table(rt, &items, &rv.to_string(), true)));
            }
            Ok((
                200,
                json!({"kind": format!("{}List", rt.kind), "apiVersion": rt.api_version(),
                       "metadata": {"resourceVersion": rv.to_string()}, "items": items}),
            ))
        }
        "get" => s.store.get(rt, &ns, name).map(|o| {
            if as_table && !t.status {
                let rv = o
                    .pointer("/metadata/resourceVersion")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_string();
                (200, table::table(rt, std::slice::from_ref(&o), &rv, true))
            } else {
                (200, o)
            }
        }),
        "create" => {
            let obj = parse_body(body)?;
            let ns = match (&t.namespace, rt.namespaced) {
                (Some(ns), _) => ns.clone(),
                (None, false) => String::new(),
                (None, true) => obj
                    .pointer("/metadata/namespace")
                    .and_then(Value::as_str)
                    .map(str::to_string)
                    .ok_or_else(|| {
                        ApiError::bad_request("a namespaced object needs a namespace")
                    })?,
            };
            s.store.create(rt, &ns, obj).map(|o| (201, o))
        }
        "update" => s
            .store
            .update(rt, &ns, name, parse_body(body)?, t.status)
            .map(|o| (200, o)),
        "patch" => {
            let ct = headers
                .get(header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("");
            let kind = PatchType::from_content_type(ct)
                .ok_or_else(|| ApiError::unsupported_media_type(ct))?;
            let fm = q.get("fieldManager").map(String::as_str);
            s.store
                .patch(rt, &ns, name, kind, body, t.status, fm)
                .map(|o| (200, o))
        }
        "delete" => {
            let opts = if body.is_empty() {
                Value::Null
            } else {
                parse_body(body)?
            };
            let pre = opts.get("preconditions").cloned().unwrap_or(Value::Null);
            s.store.delete(rt, &ns, name, &pre).map(|o| (200, o))
        }
        "deletecollection" => {
            let sel = selectors(rt, q)?;
            let items = s.store.delete_collection(rt, t.namespace.as_deref(), &sel);
            Ok((
                200,
                json!({"kind": format!("{}List", rt.kind), "apiVersion": rt.api_version(),
                       "metadata": {"resourceVersion": s.store.resource_version().to_string()}, "items": items}),
            ))
        }
        _ => unreachable!("verbs are matched above"),
    })();
    if verb == "watch" {
        return watch(s, rt.clone(), t.namespace, q, as_table);
    }
    match result {
        Ok((code, v)) => json_response(code, &v),
        Err(e) => error_response(&e),
    }
}

/// What a watcher is told about a change, given its selection (None: nothing).
fn translate(
    c: &Change,
    rt: &ResourceType,
    ns: Option<&str>,
    sel: &Selectors,
) -> Option<(&'static str, Value)> {
    if c.store != rt.store || ns.is_some_and(|n| n != c.namespace) {
        return None;
    }
    let now = sel.matches(&c.object);
    let kind = match (c.kind, &c.old) {
        (ChangeKind::Modified, Some(old)) => match (sel.matches(old), now) {
            (true, true) => "MODIFIED",
            (false, true) => "ADDED",
            (true, false) => "DELETED",
            (false, false) => return None,
        },
        (k, _) if now => k.as_str(),
        _ => return None,
    };
    Some((kind, Store::present(rt, &c.object)))
}

fn event_line(kind: &str, object: &Value) -> Bytes {
    let mut line = json!({"type": kind, "object": object}).to_string();
    line.push('\n');
    Bytes::from(line)
}

fn watch(
    s: &Arc<Server>,
    rt: ResourceType,
    ns: Option<String>,
    q: &Query,
    as_table: bool,
) -> Response {
    let sel = match selectors(&rt, q) {
        Ok(sel) => sel,
        Err(e) => return error_response(&e),
    };
    let from = match q.get("resourceVersion").map(String::as_str) {
        None | Some("") | Some("0") => None,
        Some(v) => match v.parse::<u64>() {
            Ok(n) => Some(n),
            Err(_) => {
                return error_response(&ApiError::bad_request(format!(
                    "invalid resourceVersion {v:?}"
                )));
            }
        },
    };
    let initial_end = matches!(q.get("sendInitialEvents").map(String::as_str), Some("true"));
    let timeout = q
        .get("timeoutSeconds")
        .and_then(|t| t.parse::<u64>().ok())
        .map(|t| {
            let t = Duration::from_secs(t);
            s.config.watch_timeout_cap.map_or(t, |cap| t.min(cap))
        });
    let (tx, rx) = mpsc::channel::<Result<Bytes, Infallible>>(256);
    let start = s.store.watch(&rt, from);
    tokio::spawn(async move {
        let mut start = match start {
            Ok(st) => st,
            Err(e) => {
                let _ = tx.send(Ok(event_line("ERROR", &e.to_status()))).await;
                return;
            }
        };
        // Tables carry their column definitions in the first event only, as the real server's.
        let mut first = true;
        let mut render = |kind: &str, obj: Value, rv: u64| {
            if !as_table {
                return event_line(kind, &obj);
            }
            let t = table::table(&rt, std::slice::from_ref(&obj), &rv.to_string(), first);
            first = false;
            event_line(kind, &t)
        };
        for c in &start.initial {
            if let Some((kind, obj)) = translate(c, &rt, ns.as_deref(), &sel)
                && tx.send(Ok(render(kind, obj, c.rv))).await.is_err()
            {
                return;
            }
        }
        if initial_end {
            let bookmark = json!({"apiVersion": rt.api_version(), "kind": rt.kind, "metadata": {
                "resourceVersion": start.rv.to_string(),
                "annotations": {"k8s.io/initial-events-end": "true"}}});
            if tx
                .send(Ok(event_line("BOOKMARK", &bookmark)))
                .await
                .is_err()
            {
                return;
            }
        }
        let deadline = timeout.map(|t| tokio::time::Instant::now() + t);
        let sleep = async {
            match deadline {
                Some(d) => tokio::time::sleep_until(d).await,
                None => std::future::pending().await,
            }
        };
        tokio::pin!(sleep);
        loop {
            tokio::select! {
                _ = &mut sleep => return,
                _ = start.epoch.changed() => return,
                _ = tx.closed() => return,
                r = start.live.recv() => match r {
                    Ok(c) => {
                        if let Some((kind, obj)) = translate(&c, &rt, ns.as_deref(), &sel)
                            && tx.send(Ok(render(kind, obj, c.rv))).await.is_err() {
                                return;
                            }
                    }
                    Err(broadcast::error::RecvError::Lagged(_)) => {
                        let e = ApiError::expired(start.rv, start.rv);
                        let _ = tx.send(Ok(event_line("ERROR", &e.to_status()))).await;
                        return;
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                },
            }
        }
    });
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::CACHE_CONTROL, "no-cache, private")
        .body(Body::from_stream(ReceiverStream::new(rx)))
        .expect("static headers")
}
