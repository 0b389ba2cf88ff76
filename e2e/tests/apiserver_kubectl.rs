//! The real kubectl against the test API server: the command list of k8s-api-subset.md, each
//! output checked as a user would read it. Run for the oldest and the newest kubectl installed.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::ObjectReference;
use kube::api::{Api, PostParams};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use l2speaker_e2e::apiserver::{self, Config};
use l2speaker_e2e::kubectl::Kubectl;
use tokio::io::{AsyncBufReadExt, BufReader};

const LEASE: &str = "apiVersion: coordination.k8s.io/v1
kind: Lease
metadata:
  name: vip-192-0-2-200
  namespace: default
  labels: {l2speaker.io/ip: 192.0.2.200}
spec:
  holderIdentity: node-1
  leaseDurationSeconds: 3
";

const SVC: &str = "apiVersion: v1
kind: Service
metadata:
  name: web
  namespace: default
spec:
  type: LoadBalancer
  selector: {app: web}
  ports:
  - {name: http, port: 80, targetPort: 8080}
";

const SLICE: &str = "apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-abc
  namespace: default
  labels: {kubernetes.io/service-name: web}
addressType: IPv4
ports:
- {name: http, port: 8080, protocol: TCP}
endpoints:
- addresses: [198.51.100.18]
  conditions: {ready: true}
  nodeName: node-1
";

const NODE: &str = "apiVersion: v1
kind: Node
metadata:
  name: node-1
  labels: {kubernetes.io/hostname: node-1}
status:
  addresses:
  - {type: InternalIP, address: 192.0.2.11}
";

fn cm(value: &str) -> String {
    format!(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: settings\n  namespace: default\ndata:\n  mode: \"{value}\"\n"
    )
}

async fn kubectl_suite(minor: u32) {
    let server = apiserver::serve_local(Config {
        minor,
        ..Config::default()
    })
    .expect("server starts");
    let kc = Kubectl::new(&server.url()).expect("kubectl is installed");

    let version: serde_json::Value =
        serde_json::from_str(&kc.run(&["version", "-o", "json"]).await.ok()).unwrap();
    assert_eq!(
        version["clientVersion"]["minor"],
        minor.to_string(),
        "the dispatcher picks kubectl 1.{minor}: {version}"
    );
    assert_eq!(version["serverVersion"]["minor"], minor.to_string());

    let resources = kc.run(&["api-resources"]).await.ok();
    for line in [
        ["leases", "coordination.k8s.io/v1", "true", "Lease"].as_slice(),
        &["services", "svc", "v1", "true", "Service"],
        &[
            "endpointslices",
            "discovery.k8s.io/v1",
            "true",
            "EndpointSlice",
        ],
        &["nodes", "no", "v1", "false", "Node"],
        &["configmaps", "cm", "v1", "true", "ConfigMap"],
        &["events", "ev", "v1", "true", "Event"],
        &["namespaces", "ns", "v1", "false", "Namespace"],
        &[
            "customresourcedefinitions",
            "crd,crds",
            "apiextensions.k8s.io/v1",
            "false",
        ],
    ] {
        assert!(
            resources
                .lines()
                .any(|l| l.split_whitespace().collect::<Vec<_>>() == line
                    || l.split_whitespace()
                        .take(line.len())
                        .eq(line.iter().copied())),
            "api-resources lists {line:?}:\n{resources}"
        );
    }

    // create, twice
    let out = kc
        .run_with_stdin(&["create", "-f", "-"], Some(LEASE))
        .await
        .ok();
    assert_eq!(
        out.trim(),
        "lease.coordination.k8s.io/vip-192-0-2-200 created"
    );
    let err = kc
        .run_with_stdin(&["create", "-f", "-"], Some(LEASE))
        .await
        .err();
    assert!(
        err.contains("AlreadyExists") && err.contains("\"vip-192-0-2-200\" already exists"),
        "{err}"
    );

    // get, -A, -o yaml
    let out = kc.run(&["get", "lease"]).await.ok();
    assert!(
        out.lines()
            .nth(1)
            .is_some_and(|l| l.starts_with("vip-192-0-2-200")),
        "{out}"
    );
    let out = kc.run(&["get", "leases", "-A"]).await.ok();
    assert!(
        out.lines().any(|l| l
            .split_whitespace()
            .take(2)
            .eq(["default", "vip-192-0-2-200"])),
        "{out}"
    );
    let yaml = kc
        .run(&["get", "lease", "vip-192-0-2-200", "-o", "yaml"])
        .await
        .ok();
    for want in [
        "holderIdentity: node-1",
        "leaseDurationSeconds: 3",
        "resourceVersion: \"",
        "uid: ",
        "creationTimestamp: \"",
    ] {
        assert!(yaml.contains(want), "get -o yaml shows {want}:\n{yaml}");
    }

    // describe lease, with an Event a kube-rs Recorder wrote (events.k8s.io → core v1)
    let client = apiserver::client(&server.url()).unwrap();
    let lease = Api::<Lease>::namespaced(client.clone(), "default")
        .get("vip-192-0-2-200")
        .await
        .unwrap();
    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: "l2speaker".into(),
            instance: Some("node-1".into()),
        },
    );
    let reference = ObjectReference {
        api_version: Some("coordination.k8s.io/v1".into()),
        kind: Some("Lease".into()),
        name: lease.metadata.name.clone(),
        namespace: lease.metadata.namespace.clone(),
        uid: lease.metadata.uid.clone(),
        ..Default::default()
    };
    recorder
        .publish(
            &Event {
                type_: EventType::Normal,
                reason: "Acquired".into(),
                note: Some("node-1 announces 192.0.2.200 on eth0".into()),
                action: "Acquire".into(),
                secondary: None,
            },
            &reference,
        )
        .await
        .expect("the recorder writes events.k8s.io/v1");
    let out = kc.run(&["describe", "lease", "vip-192-0-2-200"]).await.ok();
    for want in [
        "Name:         vip-192-0-2-200",
        "l2speaker.io/ip=192.0.2.200",
        "Holder Identity:",
        "node-1",
        "Acquired",
        "node-1 announces 192.0.2.200 on eth0",
    ] {
        assert!(out.contains(want), "describe lease shows {want:?}:\n{out}");
    }

    // describe svc (with its EndpointSlice) and node
    kc.run_with_stdin(&["create", "-f", "-"], Some(SVC))
        .await
        .ok();
    kc.run_with_stdin(&["create", "-f", "-"], Some(SLICE))
        .await
        .ok();
    kc.run_with_stdin(&["create", "-f", "-"], Some(NODE))
        .await
        .ok();
    let out = kc.run(&["describe", "svc", "web"]).await.ok();
    for want in [
        "Type:                     LoadBalancer",
        "Port:                     http  80/TCP",
    ] {
        assert!(out.contains(want), "describe svc shows {want:?}:\n{out}");
    }
    // kubectl before 1.28 reads core Endpoints (not served here); later ones read EndpointSlices.
    if minor >= 28 {
        assert!(
            out.contains("198.51.100.18:8080"),
            "describe svc lists the EndpointSlice's endpoint:\n{out}"
        );
    }
    let out = kc.run(&["describe", "node", "node-1"]).await.ok();
    assert!(
        out.contains("InternalIP:  192.0.2.11")
            && out.contains("Non-terminated Pods:          (0 in total)"),
        "{out}"
    );

    // apply: created, unchanged, configured
    let out = kc
        .run_with_stdin(&["apply", "-f", "-"], Some(&cm("a")))
        .await
        .ok();
    assert_eq!(out.trim(), "configmap/settings created");
    let out = kc
        .run_with_stdin(&["apply", "-f", "-"], Some(&cm("a")))
        .await
        .ok();
    assert_eq!(out.trim(), "configmap/settings unchanged");
    let out = kc
        .run_with_stdin(&["apply", "-f", "-"], Some(&cm("b")))
        .await
        .ok();
    assert_eq!(out.trim(), "configmap/settings configured");
    let out = kc
        .run(&["get", "cm", "settings", "-o", "jsonpath={.data.mode}"])
        .await
        .ok();
    assert_eq!(out, "b");

    // a status patch leaves spec alone
    let before = kc
        .run(&["get", "svc", "web", "-o", "jsonpath={.spec}"])
        .await
        .ok();
    let out = kc
        .run(&["patch", "svc", "web", "--subresource=status", "--type=merge", "-p",
               r#"{"status":{"loadBalancer":{"ingress":[{"ip":"192.0.2.200"}]}},"spec":{"type":"ClusterIP"}}"#])
        .await
        .ok();
    assert_eq!(out.trim(), "service/web patched");
    let after = kc
        .run(&["get", "svc", "web", "-o", "jsonpath={.spec}"])
        .await
        .ok();
    assert_eq!(before, after, "a status patch must not change spec");
    let ip = kc
        .run(&[
            "get",
            "svc",
            "web",
            "-o",
            "jsonpath={.status.loadBalancer.ingress[0].ip}",
        ])
        .await
        .ok();
    assert_eq!(ip, "192.0.2.200");
    // Server-side printing: the columns a real cluster shows.
    let out = kc.run(&["get", "svc", "web"]).await.ok();
    let header: Vec<&str> = out
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect();
    assert_eq!(
        header,
        [
            "NAME",
            "TYPE",
            "CLUSTER-IP",
            "EXTERNAL-IP",
            "PORT(S)",
            "AGE"
        ],
        "{out}"
    );
    let row: Vec<&str> = out
        .lines()
        .nth(1)
        .unwrap_or("")
        .split_whitespace()
        .collect();
    assert_eq!(
        &row[..5],
        ["web", "LoadBalancer", "<none>", "192.0.2.200", "80/TCP"],
        "{out}"
    );
    let out = kc.run(&["get", "lease"]).await.ok();
    assert!(
        out.lines()
            .next()
            .is_some_and(|h| h.split_whitespace().eq(["NAME", "HOLDER", "AGE"])),
        "{out}"
    );
    assert!(
        out.lines().nth(1).is_some_and(|l| l
            .split_whitespace()
            .take(2)
            .eq(["vip-192-0-2-200", "node-1"])),
        "{out}"
    );

    // get -w sees a MODIFIED written by kube-rs
    let mut watch = kc.command();
    watch
        .args([
            "get",
            "lease",
            "vip-192-0-2-200",
            "-w",
            "-o",
            "jsonpath={.spec.holderIdentity}{\"\\n\"}",
        ])
        .stdout(std::process::Stdio::piped());
    let mut child = watch.spawn().unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let first = tokio::time::timeout(Duration::from_secs(20), lines.next_line())
        .await
        .expect("get -w prints the lease")
        .unwrap();
    assert_eq!(first.as_deref(), Some("node-1"));
    // kubectl prints the object it got, then watches from resourceVersion 0 and skips the
    // watch's first (initial) event as the one it printed: a change made before its watch
    // starts would be skipped with it (kubectl's race, on real clusters too). So the change
    // waits for the watch.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while server
        .server
        .store
        .requests()
        .get("watch leases.coordination.k8s.io")
        .copied()
        .unwrap_or(0)
        == 0
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "kubectl get -w never watched"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let leases = Api::<Lease>::namespaced(client.clone(), "default");
    let mut l = leases.get("vip-192-0-2-200").await.unwrap();
    l.spec.as_mut().unwrap().holder_identity = Some("node-2".into());
    leases
        .replace("vip-192-0-2-200", &PostParams::default(), &l)
        .await
        .unwrap();
    let next = tokio::time::timeout(Duration::from_secs(20), lines.next_line())
        .await
        .expect("get -w sees the change")
        .unwrap();
    assert_eq!(
        next.as_deref(),
        Some("node-2"),
        "get -w prints the holder kube-rs wrote"
    );
    child.kill().await.unwrap();

    // replace with a stale object → Conflict
    let stale = yaml.clone();
    let err = kc
        .run_with_stdin(&["replace", "-f", "-"], Some(&stale))
        .await
        .err();
    assert!(
        err.contains("Conflict") && err.contains("the object has been modified"),
        "{err}"
    );

    // delete, then get → NotFound
    let out = kc.run(&["delete", "lease", "vip-192-0-2-200"]).await.ok();
    assert_eq!(
        out.trim(),
        "lease.coordination.k8s.io \"vip-192-0-2-200\" deleted"
    );
    let err = kc.run(&["get", "lease", "vip-192-0-2-200"]).await.err();
    assert!(
        err.contains("NotFound")
            && err.contains("leases.coordination.k8s.io \"vip-192-0-2-200\" not found"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_1_27_runs_the_whole_command_list() {
    kubectl_suite(27).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_1_33_runs_the_whole_command_list() {
    kubectl_suite(33).await;
}
