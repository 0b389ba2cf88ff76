//! kube-rs against the test API server: CRUD, status, watchers that survive timeouts and
//! 410s, custom resources, exact errors, and compare-and-swap under contention.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::api::core::v1::{ConfigMap, Service};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{
    Api, ApiResource, DeleteParams, DynamicObject, GroupVersionKind, ListParams, Patch,
    PatchParams, PostParams,
};
use kube::runtime::wait::Condition;
use kube::runtime::watcher::{self, Event};
use kube::runtime::{WatchStreamExt, reflector};
use l2speaker_e2e::apiserver::{self, Config, Running};
use serde_json::json;

fn server(cap: Option<Duration>) -> (Running, kube::Client) {
    let s = apiserver::serve_local(Config {
        watch_timeout_cap: cap,
        ..Config::default()
    })
    .unwrap();
    let c = apiserver::client(&s.url()).unwrap();
    (s, c)
}

fn lease(name: &str, holder: Option<&str>) -> Lease {
    Lease {
        metadata: kube::api::ObjectMeta {
            name: Some(name.into()),
            ..Default::default()
        },
        spec: Some(LeaseSpec {
            holder_identity: holder.map(str::to_string),
            lease_duration_seconds: Some(3),
            ..Default::default()
        }),
    }
}

fn cm(name: &str, v: &str) -> ConfigMap {
    serde_json::from_value(json!({"metadata": {"name": name}, "data": {"v": v}})).unwrap()
}

fn api_error(e: kube::Error) -> (u16, String) {
    match e {
        kube::Error::Api(s) => (s.code, s.reason.clone()),
        other => panic!("expected an API error, got {other:?}"),
    }
}

/// Waits (bounded) until `f` holds.
async fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !f() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn crud_round_trips_and_errors_carry_reason_and_code() {
    let (_s, client) = server(None);
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    let created = cms
        .create(&PostParams::default(), &cm("a", "1"))
        .await
        .unwrap();
    let rv1: u64 = created
        .metadata
        .resource_version
        .as_deref()
        .unwrap()
        .parse()
        .unwrap();
    assert!(created.metadata.uid.is_some() && created.metadata.creation_timestamp.is_some());
    assert_eq!(
        api_error(
            cms.create(&PostParams::default(), &cm("a", "1"))
                .await
                .unwrap_err()
        ),
        (409, "AlreadyExists".into())
    );

    let mut got = cms.get("a").await.unwrap();
    got.data.as_mut().unwrap().insert("v".into(), "2".into());
    let replaced = cms
        .replace("a", &PostParams::default(), &got)
        .await
        .unwrap();
    let rv2: u64 = replaced
        .metadata
        .resource_version
        .as_deref()
        .unwrap()
        .parse()
        .unwrap();
    assert!(rv2 > rv1, "every write takes the next resourceVersion");
    // a stale PUT
    assert_eq!(
        api_error(
            cms.replace("a", &PostParams::default(), &got)
                .await
                .unwrap_err()
        ),
        (409, "Conflict".into())
    );

    let patched = cms
        .patch(
            "a",
            &PatchParams::default(),
            &Patch::Merge(json!({"data": {"w": "3"}})),
        )
        .await
        .unwrap();
    assert_eq!(
        patched.data.unwrap(),
        BTreeMap::from([("v".into(), "2".into()), ("w".into(), "3".into())])
    );
    let applied = cms
        .patch("b", &PatchParams::apply("test").force(), &Patch::Apply(json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "b"}, "data": {"x": "1"}})))
        .await
        .unwrap();
    assert_eq!(
        applied.data.unwrap()["x"],
        "1",
        "apply creates a missing object"
    );

    let list = cms.list(&ListParams::default().labels("")).await.unwrap();
    assert_eq!(
        list.items
            .iter()
            .map(|c| c.metadata.name.clone().unwrap())
            .collect::<Vec<_>>(),
        ["a", "b"]
    );
    assert!(list.metadata.resource_version.is_some());

    cms.delete("a", &DeleteParams::default()).await.unwrap();
    assert!(cms.get_opt("a").await.unwrap().is_none());
    assert_eq!(
        api_error(cms.delete("a", &DeleteParams::default()).await.unwrap_err()),
        (404, "NotFound".into())
    );

    // a namespace that does not exist, and a namespace mismatch
    let other: Api<ConfigMap> = Api::namespaced(client.clone(), "nope");
    assert_eq!(
        api_error(
            other
                .create(&PostParams::default(), &cm("x", "1"))
                .await
                .unwrap_err()
        ),
        (404, "NotFound".into())
    );
    let mut wrong = cm("y", "1");
    wrong.metadata.namespace = Some("kube-system".into());
    assert_eq!(
        api_error(
            cms.create(&PostParams::default(), &wrong)
                .await
                .unwrap_err()
        )
        .0,
        400
    );
}

#[tokio::test]
async fn lease_put_without_resource_version_is_invalid() {
    let (_s, client) = server(None);
    let leases: Api<Lease> = Api::namespaced(client, "default");
    let lease = lease("l", Some("n1"));
    leases.create(&PostParams::default(), &lease).await.unwrap();
    assert_eq!(
        api_error(
            leases
                .replace("l", &PostParams::default(), &lease)
                .await
                .unwrap_err()
        ),
        (422, "Invalid".into())
    );
}

#[tokio::test]
async fn raw_error_bodies_match_the_real_status_shape() {
    let (s, _client) = server(None);
    let http = reqwest_free_get(&format!(
        "{}/apis/coordination.k8s.io/v1/namespaces/default/leases/x",
        s.url()
    ))
    .await;
    assert_eq!(http.0, 404);
    assert_eq!(
        http.1,
        json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
               "message": "leases.coordination.k8s.io \"x\" not found", "reason": "NotFound",
               "details": {"name": "x", "group": "coordination.k8s.io", "kind": "leases"}, "code": 404})
    );
    let bad = raw(
        &s.url(),
        "POST",
        "/api/v1/namespaces/default/configmaps",
        "application/json",
        "{not json",
    )
    .await;
    assert_eq!((bad.0, bad.1["reason"].clone()), (400, json!("BadRequest")));
}

/// A minimal HTTP/1.1 client over a TcpStream, so raw bodies can be checked byte for byte.
async fn raw(
    url: &str,
    method: &str,
    path: &str,
    ct: &str,
    body: &str,
) -> (u16, serde_json::Value) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = url.trim_start_matches("http://");
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: {ct}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    let code = out[9..12].parse().unwrap();
    let (head, body) = out.split_once("\r\n\r\n").unwrap();
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: application/json"),
        "{head}"
    );
    (code, serde_json::from_str(body).unwrap())
}

async fn reqwest_free_get(url: &str) -> (u16, serde_json::Value) {
    let (base, path) = url.split_at(url[7..].find('/').unwrap() + 7);
    raw(base, "GET", path, "application/json", "").await
}

#[tokio::test]
async fn patch_status_changes_only_status() {
    let (_s, client) = server(None);
    let svcs: Api<Service> = Api::namespaced(client, "default");
    let svc: Service = serde_json::from_value(json!({"metadata": {"name": "web"},
        "spec": {"type": "LoadBalancer", "ports": [{"port": 80}]},
        "status": {"loadBalancer": {"ingress": [{"ip": "203.0.113.9"}]}}}))
    .unwrap();
    let created = svcs.create(&PostParams::default(), &svc).await.unwrap();
    assert!(
        created
            .status
            .is_none_or(|s| s.load_balancer.is_none_or(|l| l.ingress.is_none())),
        "create ignores status"
    );
    let patched = svcs
        .patch_status(
            "web",
            &PatchParams::default(),
            &Patch::Merge(json!({
            "spec": {"type": "ClusterIP"},
            "status": {"loadBalancer": {"ingress": [{"ip": "192.0.2.200"}]}}})),
        )
        .await
        .unwrap();
    assert_eq!(
        patched.spec.as_ref().unwrap().type_.as_deref(),
        Some("LoadBalancer")
    );
    assert_eq!(
        patched
            .status
            .unwrap()
            .load_balancer
            .unwrap()
            .ingress
            .unwrap()[0]
            .ip
            .as_deref(),
        Some("192.0.2.200")
    );
    // and the main path ignores status
    let mut s = svcs.get("web").await.unwrap();
    s.status = None;
    s.spec.as_mut().unwrap().external_traffic_policy = Some("Local".into());
    let replaced = svcs
        .replace("web", &PostParams::default(), &s)
        .await
        .unwrap();
    assert_eq!(
        replaced.spec.unwrap().external_traffic_policy.as_deref(),
        Some("Local")
    );
    assert_eq!(
        replaced
            .status
            .unwrap()
            .load_balancer
            .unwrap()
            .ingress
            .unwrap()[0]
            .ip
            .as_deref(),
        Some("192.0.2.200")
    );
}

type Seen = std::sync::Arc<std::sync::Mutex<Vec<Event<ConfigMap>>>>;

/// Watches ConfigMaps in `ns` and records every event, by kind.
fn record(client: kube::Client, ns: &str) -> (Seen, tokio::task::JoinHandle<()>) {
    let api: Api<ConfigMap> = Api::namespaced(client, ns);
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let s2 = seen.clone();
    let task = tokio::spawn(async move {
        let mut w = watcher::watcher(api, watcher::Config::default())
            .default_backoff()
            .boxed();
        while let Some(ev) = w.next().await {
            match ev {
                Ok(ev) => s2.lock().unwrap().push(ev),
                Err(e) => panic!("watcher error: {e}"),
            }
        }
    });
    (seen, task)
}

fn applied(events: &[Event<ConfigMap>]) -> Vec<(String, String)> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::Apply(c) | Event::InitApply(c) => Some((
                c.metadata.name.clone().unwrap(),
                c.metadata.resource_version.clone().unwrap(),
            )),
            _ => None,
        })
        .collect()
}

fn inits(events: &[Event<ConfigMap>]) -> usize {
    events.iter().filter(|e| matches!(e, Event::Init)).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watcher_survives_server_side_timeouts_without_losing_or_repeating_events() {
    let (s, client) = server(Some(Duration::from_secs(1)));
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    let (seen, task) = record(client, "default");
    eventually("the initial list", || inits(&seen.lock().unwrap()) == 1).await;
    let mut written = Vec::new();
    // Writes spread over several 1 s watch windows, so some land while no watch is open.
    for i in 0..8 {
        let c = cms
            .create(&PostParams::default(), &cm(&format!("x{i}"), "1"))
            .await
            .unwrap();
        written.push((
            c.metadata.name.unwrap(),
            c.metadata.resource_version.unwrap(),
        ));
        tokio::time::sleep(Duration::from_millis(350)).await;
    }
    eventually("all writes seen", || {
        applied(&seen.lock().unwrap()).len() >= written.len()
    })
    .await;
    let watches = s.server.store.requests()["watch configmaps"];
    assert!(
        watches >= 3,
        "the server ended watches and kube-rs re-watched ({watches} watches)"
    );
    let events = seen.lock().unwrap();
    assert_eq!(
        inits(&events),
        1,
        "re-watching after a timeout needs no relist"
    );
    assert_eq!(
        applied(&events),
        written,
        "each write seen exactly once, in order"
    );
    task.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watcher_relists_after_410_and_ends_up_with_the_exact_state() {
    let (s, client) = server(None);
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    for n in ["a", "b"] {
        cms.create(&PostParams::default(), &cm(n, "1"))
            .await
            .unwrap();
    }
    let (reader, writer) = reflector::store::<ConfigMap>();
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let errors = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let (s2, e2) = (seen.clone(), errors.clone());
    let task = tokio::spawn(
        watcher::watcher(cms.clone(), watcher::Config::default())
            .default_backoff()
            .reflect(writer)
            .for_each(move |e| {
                // kube-rs reports the in-stream 410 as an error, then relists.
                match e {
                    Ok(e) => s2.lock().unwrap().push(e),
                    Err(e) => e2.lock().unwrap().push(e.to_string()),
                }
                futures::future::ready(())
            }),
    );
    eventually("a and b listed", || reader.state().len() == 2).await;

    // Compact the history and drop every watch: the watcher's resourceVersion is now too old.
    s.server.store.expire_watches();
    cms.delete("a", &DeleteParams::default()).await.unwrap();
    cms.patch(
        "b",
        &PatchParams::default(),
        &Patch::Merge(json!({"data": {"v": "2"}})),
    )
    .await
    .unwrap();
    cms.create(&PostParams::default(), &cm("c", "1"))
        .await
        .unwrap();

    let want: BTreeMap<String, String> = cms
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .map(|c| {
            (
                c.metadata.name.unwrap(),
                c.metadata.resource_version.unwrap(),
            )
        })
        .collect();
    let state = || -> BTreeMap<String, String> {
        reader
            .state()
            .iter()
            .map(|c| {
                (
                    c.metadata.name.clone().unwrap(),
                    c.metadata.resource_version.clone().unwrap(),
                )
            })
            .collect()
    };
    eventually("the reflector matches the server", || state() == want).await;
    let events = seen.lock().unwrap();
    assert_eq!(inits(&events), 2, "the 410 made kube-rs relist");
    let all = applied(&events);
    let unique: BTreeSet<_> = all.iter().collect();
    assert_eq!(
        unique.len(),
        all.len(),
        "no object version delivered twice: {all:?}"
    );
    assert!(s.server.store.requests()["list configmaps"] >= 2);
    let errors = errors.lock().unwrap();
    assert!(
        !errors.is_empty()
            && errors
                .iter()
                .all(|e| e.contains("too old resource version")),
        "the only errors are the 410: {errors:?}"
    );
    task.abort();
}

#[tokio::test]
async fn custom_resources_work_once_their_crd_exists() {
    let (_s, client) = server(None);
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let crd: CustomResourceDefinition = serde_json::from_value(json!({
        "metadata": {"name": "ippools.l2speaker.io"},
        "spec": {"group": "l2speaker.io", "scope": "Cluster",
                 "names": {"plural": "ippools", "singular": "ippool", "kind": "IPPool", "shortNames": ["ipp"]},
                 "versions": [{"name": "v1alpha1", "served": true, "storage": true,
                               "schema": {"openAPIV3Schema": {"type": "object", "x-kubernetes-preserve-unknown-fields": true}},
                               "subresources": {"status": {}}}]}})).unwrap();
    crds.create(&PostParams::default(), &crd).await.unwrap();
    let established = crds.get("ippools.l2speaker.io").await.unwrap();
    assert!(kube::runtime::conditions::is_crd_established().matches_object(Some(&established)));

    let ar = ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("l2speaker.io", "v1alpha1", "IPPool"),
        "ippools",
    );
    let pools: Api<DynamicObject> = Api::all_with(client.clone(), &ar);
    let mut pool =
        DynamicObject::new("lan", &ar).data(json!({"spec": {"addresses": ["192.0.2.200/29"]}}));
    let created = pools.create(&PostParams::default(), &pool).await.unwrap();
    assert_eq!(created.metadata.generation, Some(1));
    pool.metadata = created.metadata.clone();
    pool.data["spec"]["addresses"] = json!(["192.0.2.208/29"]);
    let replaced = pools
        .replace("lan", &PostParams::default(), &pool)
        .await
        .unwrap();
    assert_eq!(
        replaced.metadata.generation,
        Some(2),
        "a spec change bumps generation"
    );
    // a CR PUT without resourceVersion, and strategic merge, are refused like the real server does
    pool.metadata.resource_version = None;
    assert_eq!(
        api_error(
            pools
                .replace("lan", &PostParams::default(), &pool)
                .await
                .unwrap_err()
        )
        .0,
        422
    );
    let smp = pools
        .patch(
            "lan",
            &PatchParams::default(),
            &Patch::Strategic(json!({"spec": {}})),
        )
        .await
        .unwrap_err();
    assert_eq!(api_error(smp), (415, "UnsupportedMediaType".into()));
    let st = pools
        .patch_status(
            "lan",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"assigned": 1}})),
        )
        .await
        .unwrap();
    assert_eq!(st.data["status"]["assigned"], 1);
    assert_eq!(
        st.metadata.generation,
        Some(2),
        "status writes leave generation alone"
    );

    crds.delete("ippools.l2speaker.io", &DeleteParams::default())
        .await
        .unwrap();
    assert_eq!(
        api_error(pools.get("lan").await.unwrap_err()).0,
        404,
        "the kind is gone with its CRD"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_concurrent_puts_with_one_resource_version_have_exactly_one_winner() {
    let (_s, client) = server(None);
    let leases: Api<Lease> = Api::namespaced(client, "default");
    let lease = lease("vip", None);
    let base = leases.create(&PostParams::default(), &lease).await.unwrap();
    let tries = (0..50).map(|i| {
        let leases = leases.clone();
        let mut l = base.clone();
        l.spec.as_mut().unwrap().holder_identity = Some(format!("node-{i}"));
        tokio::spawn(async move { leases.replace("vip", &PostParams::default(), &l).await })
    });
    let results = futures::future::join_all(tries).await;
    let (mut won, mut conflicts) = (Vec::new(), 0);
    for r in results {
        match r.unwrap() {
            Ok(l) => won.push(l.spec.unwrap().holder_identity.unwrap()),
            Err(e) => {
                assert_eq!(api_error(e), (409, "Conflict".into()));
                conflicts += 1;
            }
        }
    }
    assert_eq!((won.len(), conflicts), (1, 49));
    let now = leases.get("vip").await.unwrap();
    assert_eq!(
        now.spec.unwrap().holder_identity.as_ref(),
        Some(&won[0]),
        "the stored holder is the winner"
    );
}

/// Names, labels and custom resources are checked as kube-apiserver checks them: 422 with the
/// field and kube-apiserver's wording, so a test catches what a real cluster would refuse.
#[tokio::test]
async fn invalid_names_labels_and_custom_resources_get_422_with_the_field() {
    let (_s, client) = server(None);
    let leases: Api<Lease> = Api::namespaced(client.clone(), "default");
    let e = leases
        .create(&PostParams::default(), &lease("vip-2001-db8--", Some("n")))
        .await
        .unwrap_err();
    let kube::Error::Api(st) = e else {
        panic!("an API error")
    };
    assert_eq!((st.code, st.reason.as_str()), (422, "Invalid"));
    assert!(
        st.message
            .starts_with("Lease.coordination.k8s.io \"vip-2001-db8--\" is invalid: metadata.name: Invalid value: \"vip-2001-db8--\": a lowercase RFC 1123 subdomain"),
        "{}",
        st.message
    );
    let mut labelled = lease("ok", Some("n"));
    labelled.metadata.labels = Some([("l2speaker.io/ip".to_string(), "--1".to_string())].into());
    let (code, _) = api_error(
        leases
            .create(&PostParams::default(), &labelled)
            .await
            .unwrap_err(),
    );
    assert_eq!(code, 422);

    // A CRD with a schema; an object breaking it is refused, naming every field.
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let crd: CustomResourceDefinition = serde_json::from_value(json!({
        "metadata": {"name": "widgets.example.io"},
        "spec": {"group": "example.io", "scope": "Namespaced",
            "names": {"plural": "widgets", "singular": "widget", "kind": "Widget"},
            "versions": [{"name": "v1", "served": true, "storage": true, "schema": {"openAPIV3Schema": {
                "type": "object", "properties": {"spec": {"type": "object", "required": ["size"], "properties": {
                    "size": {"type": "integer"},
                    "color": {"type": "string", "enum": ["red", "blue"]},
                    "tags": {"type": "array", "items": {"type": "string", "pattern": "^[a-z]+$"}}}}}}}}]}
    }))
    .unwrap();
    crds.create(&PostParams::default(), &crd).await.unwrap();
    let ar = ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("example.io", "v1", "Widget"),
        "widgets",
    );
    let widgets: Api<DynamicObject> = Api::namespaced_with(client.clone(), "default", &ar);
    let bad: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "example.io/v1", "kind": "Widget", "metadata": {"name": "w"},
        "spec": {"color": "green", "tags": ["ok", "NOT"]}
    }))
    .unwrap();
    let kube::Error::Api(st) = widgets
        .create(&PostParams::default(), &bad)
        .await
        .unwrap_err()
    else {
        panic!("an API error")
    };
    assert_eq!(st.code, 422);
    for part in [
        "spec.size: Required value",
        "spec.color: Unsupported value: \"green\": supported values: \"red\", \"blue\"",
        "spec.tags[1]: Invalid value: \"NOT\": spec.tags[1] in body should match '^[a-z]+$'",
    ] {
        assert!(st.message.contains(part), "{part} in {}", st.message);
    }
    let good: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "example.io/v1", "kind": "Widget", "metadata": {"name": "w"},
        "spec": {"size": 3, "color": "red", "tags": ["a"]}
    }))
    .unwrap();
    widgets.create(&PostParams::default(), &good).await.unwrap();
}
