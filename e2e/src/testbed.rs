//! A cluster in the lab: the test API server, Nodes, the CRD and a pool applied with the
//! real kubectl, one `l2speaker` process per node, and helpers to see what the kernel and the
//! API say about each VIP.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Service;
use kube::Api;

use crate::kubectl::Kubectl;
use crate::lab::probe::{ProbeConfig, Prober};
use crate::lab::{Lab, LabConfig, Pod, Proc, arp, netns};

pub const NAMESPACE: &str = "l2speaker-system";
/// The pool every testbed starts with: inside the LAN subnet.
pub const POOL: &str = "apiVersion: l2speaker.io/v1alpha1
kind: IPPool
metadata:
  name: lan
spec:
  addresses:
  - 192.0.2.200-192.0.2.250
  - 2001:db8::200/120
";

/// Lease timing given to the speakers.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    pub lease_seconds: u64,
    pub renew_ms: u64,
    pub deadline_ms: u64,
    /// LAN mode (`--liveness lan`) with this heartbeat interval and dead-after time (ms).
    pub lan: Option<(u64, u64)>,
}

impl Timing {
    /// The speaker's defaults.
    pub const DEFAULT: Timing = Timing {
        lease_seconds: 4,
        renew_ms: 1000,
        deadline_ms: 2000,
        lan: None,
    };
    /// LAN mode with the default heartbeat profile.
    pub const LAN: Timing = Timing {
        lease_seconds: 4,
        renew_ms: 1000,
        deadline_ms: 2000,
        lan: Some((100, 400)),
    };
    /// LAN mode with the fast heartbeat profile.
    pub const LAN_FAST: Timing = Timing {
        lease_seconds: 4,
        renew_ms: 1000,
        deadline_ms: 2000,
        lan: Some((50, 200)),
    };
    /// The shortest lease the start-up timing check accepts.
    pub const SHORT: Timing = Timing {
        lease_seconds: 3,
        renew_ms: 500,
        deadline_ms: 1500,
        lan: None,
    };
}

pub struct Testbed {
    pub lab: Lab,
    pub kubectl: Kubectl,
    pub client: kube::Client,
    pub timing: Timing,
    speakers: Mutex<BTreeMap<String, Arc<Proc>>>,
    lab_kubeconfig: PathBuf,
    speaker_bin: PathBuf,
}

/// The `l2speaker` binary next to the test binaries (`scripts/test.sh` builds the whole
/// workspace first), or the one `L2S_SPEAKER_BIN` names (to run the lab against another
/// build, such as a previous release).
pub fn speaker_bin() -> PathBuf {
    if let Some(bin) = std::env::var_os("L2S_SPEAKER_BIN") {
        return PathBuf::from(bin);
    }
    let exe = std::env::current_exe().expect("the test binary's path");
    let dir = exe
        .parent()
        .and_then(|d| {
            if d.ends_with("deps") {
                d.parent()
            } else {
                Some(d)
            }
        })
        .expect("a target dir");
    let bin = dir.join("l2speaker");
    assert!(
        bin.is_file(),
        "{} is missing: build the workspace first (`cargo build --workspace`; scripts/test.sh does)",
        bin.display()
    );
    bin
}

/// The speaker of the previous release (VIP Leases renewed per IP), for the rolling-upgrade
/// test: `<target>/previous/l2speaker`, which `scripts/build-previous.sh` builds from the
/// repository's history (`scripts/test.sh` runs it first).
pub fn previous_speaker_bin() -> PathBuf {
    let bin = lab_bin()
        .parent()
        .and_then(|d| d.parent())
        .expect("a target dir")
        .join("previous/l2speaker");
    assert!(
        bin.is_file(),
        "{} is missing: run scripts/build-previous.sh (scripts/test.sh does)",
        bin.display()
    );
    bin
}

pub fn lab_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("the test binary's path");
    let dir = exe.parent().expect("a target dir");
    let dir = if dir.ends_with("deps") {
        dir.parent().expect("a target dir")
    } else {
        dir
    };
    dir.join("l2s-lab")
}

/// Polls `f` every 20 ms until it returns Some, or panics after `timeout` naming `what`.
pub async fn eventually<T>(
    timeout: Duration,
    what: &str,
    mut f: impl AsyncFnMut() -> Option<T>,
) -> T {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

impl Testbed {
    /// Builds the lab (`pods_per_node`), registers the nodes, the CRD, the namespace and the
    /// pool, and starts a speaker on every node.
    pub async fn new(pods_per_node: Vec<usize>, timing: Timing) -> Testbed {
        let tb = Self::without_speakers(pods_per_node, timing).await;
        for n in tb.node_names() {
            tb.start_speaker(&n);
        }
        tb
    }

    /// The same with no IPPool at all: Services are published on the nodes' addresses.
    pub async fn without_pool(pods_per_node: Vec<usize>, timing: Timing) -> Testbed {
        let tb = Self::build(pods_per_node, timing, false).await;
        for n in tb.node_names() {
            tb.start_speaker(&n);
        }
        tb
    }

    pub async fn without_speakers(pods_per_node: Vec<usize>, timing: Timing) -> Testbed {
        Self::build(pods_per_node, timing, true).await
    }

    async fn build(pods_per_node: Vec<usize>, timing: Timing, pool: bool) -> Testbed {
        let config = LabConfig::new(lab_bin(), pods_per_node);
        let lab = tokio::task::spawn_blocking(move || Lab::new(config))
            .await
            .unwrap()
            .expect("the lab comes up (run as root)");
        let api = lab.api.as_ref().expect("the lab serves the API");
        let kubectl = Kubectl::new(&api.local_url).expect("kubectl is installed");
        let client = crate::apiserver::client(&api.local_url).unwrap();
        let lab_kubeconfig = lab.log_dir().join("kubeconfig-lab");
        std::fs::write(&lab_kubeconfig, crate::apiserver::kubeconfig(&api.lab_url)).unwrap();
        let manifests = concat!(env!("CARGO_MANIFEST_DIR"), "/../manifests");
        for f in ["namespace.yaml", "crd.yaml"] {
            kubectl
                .run(&["apply", "-f", &format!("{manifests}/{f}")])
                .await
                .ok();
        }
        let mut nodes = String::new();
        for h in lab.nodes() {
            nodes.push_str(&format!(
                "---\napiVersion: v1\nkind: Node\nmetadata:\n  name: {}\n  labels: {{kubernetes.io/hostname: {}}}\nstatus:\n  addresses:\n  - {{type: InternalIP, address: {}}}\n  - {{type: InternalIP, address: \"{}\"}}\n",
                h.node_name(),
                h.node_name(),
                h.ipv4,
                h.ipv6
            ));
        }
        kubectl
            .run_with_stdin(&["create", "-f", "-"], Some(&nodes))
            .await
            .ok();
        if pool {
            kubectl
                .run_with_stdin(&["apply", "-f", "-"], Some(POOL))
                .await
                .ok();
        }
        Testbed {
            lab,
            kubectl,
            client,
            timing,
            speakers: Mutex::new(BTreeMap::new()),
            lab_kubeconfig,
            speaker_bin: speaker_bin(),
        }
    }

    /// `n1`, `n2`, … (lab host names of the nodes).
    pub fn node_names(&self) -> Vec<String> {
        self.lab.nodes().map(|h| h.name.clone()).collect()
    }

    /// Starts (or restarts) the speaker on lab host `host`.
    pub fn start_speaker(&self, host: &str) -> Arc<Proc> {
        self.start_speaker_with(host, &[])
    }

    /// The same, with extra flags (`--dnat=false`).
    pub fn start_speaker_with(&self, host: &str, extra: &[&str]) -> Arc<Proc> {
        let bin = self.speaker_bin.clone();
        self.spawn_speaker(host, &bin, extra, true)
    }

    /// Starts the speaker build `bin` of the previous release on `host` (its flags only: the
    /// Lease timing; no heartbeat settings).
    pub fn start_previous_speaker(&self, host: &str, bin: &std::path::Path) -> Arc<Proc> {
        self.spawn_speaker(host, bin, &[], false)
    }

    fn spawn_speaker(
        &self,
        host: &str,
        bin: &std::path::Path,
        extra: &[&str],
        heartbeat_flags: bool,
    ) -> Arc<Proc> {
        let h = self.lab.host(host).unwrap().clone();
        let t = self.timing;
        let (lease, renew, deadline) = (
            t.lease_seconds.to_string(),
            t.renew_ms.to_string(),
            t.deadline_ms.to_string(),
        );
        let kubeconfig = self.lab_kubeconfig.to_string_lossy().to_string();
        // The speakers' log filter: `info`, or L2S_SPEAKER_LOG (`l2speaker=debug`) to debug a test.
        let log_filter = std::env::var("L2S_SPEAKER_LOG").unwrap_or_else(|_| "info".into());
        let n = self.speakers.lock().unwrap().len();
        let lan: Vec<String> = match t.lan.filter(|_| heartbeat_flags) {
            Some((interval, dead)) => vec![
                "--heartbeat-interval".into(),
                interval.to_string(),
                "--heartbeat-dead-after".into(),
                dead.to_string(),
            ],
            None => vec![],
        };
        let lan: Vec<&str> = lan.iter().map(String::as_str).collect();
        let p = self
            .lab
            .spawn(
                host,
                &format!("speaker-{host}-{n}"),
                bin,
                &[
                    [
                        "--lease-duration",
                        lease.as_str(),
                        "--renew-interval",
                        renew.as_str(),
                        "--renew-deadline",
                        deadline.as_str(),
                    ]
                    .as_slice(),
                    lan.as_slice(),
                    extra,
                ]
                .concat(),
                &[
                    ("NODE_NAME", &h.node_name()),
                    ("KUBECONFIG", &kubeconfig),
                    ("L2SPEAKER_NAMESPACE", NAMESPACE),
                    ("RUST_LOG", &log_filter),
                    // An environment variable, not a flag: a build of the previous release
                    // (L2S_SPEAKER_BIN) ignores it.
                    (
                        "L2SPEAKER_LIVENESS",
                        if t.lan.is_some() { "lan" } else { "lease" },
                    ),
                ],
            )
            .expect("the speaker starts");
        self.speakers
            .lock()
            .unwrap()
            .insert(host.to_string(), p.clone());
        p
    }

    /// Runs `l2speaker ARGS…` (e.g. `status`, `drill`) on lab host `host` with the lab's
    /// kubeconfig, to completion: success and what it printed.
    pub fn l2speaker(&self, host: &str, args: &[&str], timeout: Duration) -> (bool, String) {
        static RUNS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = RUNS.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let kubeconfig = self.lab_kubeconfig.to_string_lossy().to_string();
        let p = self
            .lab
            .spawn(
                host,
                &format!("cli-{n}"),
                &self.speaker_bin,
                args,
                &[
                    ("KUBECONFIG", &kubeconfig),
                    ("L2SPEAKER_NAMESPACE", NAMESPACE),
                ],
            )
            .expect("l2speaker starts");
        let status = p.wait_timeout(timeout);
        if status.is_none() {
            p.kill();
        }
        (status.is_some_and(|s| s.success()), p.output())
    }

    pub fn speaker(&self, host: &str) -> Arc<Proc> {
        self.speakers.lock().unwrap()[host].clone()
    }

    /// `kubectl apply -f -`.
    pub async fn apply(&self, yaml: &str) {
        self.kubectl
            .run_with_stdin(&["apply", "-f", "-"], Some(yaml))
            .await
            .ok();
    }

    /// Hosts (`n1`…) that have `ip` bound, from the kernel.
    pub fn bound_on(&self, ip: IpAddr) -> Vec<String> {
        let prefix = if ip.is_ipv4() { 32 } else { 128 };
        self.lab
            .nodes()
            .filter(|h| {
                netns::ip(&h.ns, &["-o", "addr", "show", "dev", "eth0"]).is_ok_and(|out| {
                    out.split_whitespace()
                        .any(|w| w == format!("{ip}/{prefix}"))
                })
            })
            .map(|h| h.name.clone())
            .collect()
    }

    /// Starts sampling who answers for `ips` every 5 ms: ARP from the client, and every
    /// node's kernel address list.
    pub fn sample(&self, ips: &[IpAddr]) -> crate::lab::sampler::Sampler {
        self.sample_every(ips, Duration::from_millis(5))
    }

    /// The same, every `every`.
    pub fn sample_every(&self, ips: &[IpAddr], every: Duration) -> crate::lab::sampler::Sampler {
        let nodes: Vec<(String, String)> = self
            .lab
            .nodes()
            .map(|h| (h.name.clone(), h.ns.clone()))
            .collect();
        crate::lab::sampler::Sampler::start(&self.lab.client().ns, &nodes, ips, every)
            .expect("the sampler starts")
    }

    /// Adds a fault rule to the test API server (see `apiserver::faults`).
    pub fn api_fault(&self, rule: serde_json::Value) {
        let cp = self.lab.host("cp").unwrap();
        let addr = SocketAddr::new(IpAddr::V4(cp.ipv4), crate::lab::API_PORT);
        let (code, body) = self
            .lab
            .http("cp", "POST", addr, "/_test/faults", &rule.to_string())
            .unwrap();
        assert_eq!(code, 201, "fault rule refused: {body}");
    }

    /// Removes every fault rule.
    pub fn clear_api_faults(&self) {
        let cp = self.lab.host("cp").unwrap();
        let addr = SocketAddr::new(IpAddr::V4(cp.ipv4), crate::lab::API_PORT);
        let (code, _) = self
            .lab
            .http("cp", "DELETE", addr, "/_test/faults", "")
            .unwrap();
        assert_eq!(code, 200);
    }

    /// The MACs answering ARP for `ip`, asked from the client.
    pub fn arp_answers(&self, ip: Ipv4Addr) -> Vec<String> {
        let c = self.lab.client();
        arp::who_has(&c.ns, c.ipv4, ip, Duration::from_millis(100)).unwrap()
    }

    /// The Lease of `ip`, if any.
    pub async fn lease(&self, ip: IpAddr) -> Option<Lease> {
        let api: Api<Lease> = Api::namespaced(self.client.clone(), NAMESPACE);
        api.get_opt(&l2speaker::lease::lease_name(ip))
            .await
            .unwrap()
    }

    /// How many times the Lease of `ip` changed hands (0 without a Lease).
    pub async fn transitions(&self, ip: IpAddr) -> i32 {
        self.lease(ip)
            .await
            .and_then(|l| l.spec?.lease_transitions)
            .unwrap_or(0)
    }

    pub async fn holder(&self, ip: IpAddr) -> Option<String> {
        self.lease(ip)
            .await
            .and_then(|l| l.spec?.holder_identity)
            .filter(|h| !h.is_empty())
    }

    /// The Service's `status.loadBalancer.ingress` IPs, once there are `n`.
    pub async fn wait_ips(&self, ns: &str, svc: &str, n: usize) -> Vec<IpAddr> {
        let api: Api<Service> = Api::namespaced(self.client.clone(), ns);
        eventually(
            Duration::from_secs(30),
            &format!("{n} IPs on {ns}/{svc}"),
            async || {
                let s = api.get_opt(svc).await.ok()??;
                let ips: Vec<IpAddr> = s
                    .status?
                    .load_balancer?
                    .ingress?
                    .iter()
                    .filter_map(|i| i.ip.as_deref()?.parse().ok())
                    .collect();
                (ips.len() == n).then_some(ips)
            },
        )
        .await
    }

    /// Waits until exactly one node has `ip` bound and its Lease names that node.
    pub async fn wait_owner(&self, ip: IpAddr) -> String {
        eventually(
            Duration::from_secs(30),
            &format!("one owner of {ip}"),
            async || {
                let bound = self.bound_on(ip);
                let holder = self.holder(ip).await?;
                let host = self
                    .lab
                    .nodes()
                    .find(|h| h.node_name() == holder)?
                    .name
                    .clone();
                (bound == [host.clone()]).then_some(host)
            },
        )
        .await
    }

    /// If another node than `old` holds `ip` and is the only one with it bound: that host.
    pub async fn other_owner(&self, ip: IpAddr, old: &str) -> Option<String> {
        let host = self.host_of(&self.holder(ip).await?);
        (host != old && self.bound_on(ip) == [host.clone()]).then_some(host)
    }

    /// LAN mode: waits until the Lease of `ip` names a node other than `old` that has it
    /// bound (a killed `old` keeps its address, silenced by its closed gate).
    pub async fn wait_new_owner_lan(&self, ip: IpAddr, old: &str) -> String {
        eventually(
            Duration::from_secs(30),
            &format!("a new owner of {ip}"),
            async || {
                let host = self.host_of(&self.holder(ip).await?);
                (host != old && self.bound_on(ip).contains(&host)).then_some(host)
            },
        )
        .await
    }

    /// Waits until a node other than `old` owns `ip` (see [`Testbed::other_owner`]).
    pub async fn wait_new_owner(&self, ip: IpAddr, old: &str) -> String {
        eventually(
            Duration::from_secs(30),
            &format!("a new owner of {ip}"),
            async || self.other_owner(ip, old).await,
        )
        .await
    }

    /// A prober from the client to `ip:80`, once it has seen 20 answers (the baseline).
    pub fn probe(&self, ip: IpAddr) -> Result<Prober, crate::lab::LabError> {
        let prober = Prober::start(
            &self.lab.client().ns,
            ProbeConfig::new(std::net::SocketAddr::new(ip, 80)),
        )?;
        prober.wait_for(
            Duration::from_secs(10),
            &format!("answers from {ip} before the fault"),
            |t| t.successes() >= 20,
        )?;
        Ok(prober)
    }

    /// `kubectl describe svc NAME` once it shows `text` (an Event reason, say).
    pub async fn wait_describe_svc(&self, svc: &str, text: &str) -> String {
        eventually(
            Duration::from_secs(20),
            &format!("{text:?} in describe svc {svc}"),
            async || {
                let out = self.kubectl.run(&["describe", "svc", svc]).await.ok();
                out.contains(text).then_some(out)
            },
        )
        .await
    }

    /// The lab host (`n1`) whose Kubernetes name is `node`.
    pub fn host_of(&self, node: &str) -> String {
        self.lab
            .nodes()
            .find(|h| h.node_name() == node)
            .map(|h| h.name.clone())
            .unwrap_or_default()
    }

    /// The nft ruleset of a node's speaker table (empty if none).
    pub fn rules(&self, host: &str) -> String {
        let ns = self.lab.host(host).unwrap().ns.clone();
        netns::exec(&ns, "nft", &["list", "table", "inet", "l2speaker"], None).unwrap_or_default()
    }
}

/// A LoadBalancer Service `name` on port 80 → 8080, with extra spec lines (indented 2).
pub fn service(name: &str, extra_spec: &str, annotations: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: default\n  annotations: {{{annotations}}}\nspec:\n  type: LoadBalancer\n  selector: {{app: {name}}}\n  ports:\n  - {{name: http, port: 80, targetPort: 8080}}\n{extra_spec}"
    )
}

/// [`endpoints`] with the port named `dns` and of `protocol` (`TCP`, `UDP`).
pub fn dns_endpoints(name: &str, pods: &[Pod], protocol: &str) -> String {
    endpoints(name, pods).replace(
        "{name: http, port: 8080, protocol: TCP}",
        &format!("{{name: dns, port: 8080, protocol: {protocol}}}"),
    )
}

/// EndpointSlices (IPv4 and IPv6) putting `pods` behind Service `name`.
pub fn endpoints(name: &str, pods: &[Pod]) -> String {
    let mut out = String::new();
    for (family, suffix) in [("IPv4", "v4"), ("IPv6", "v6")] {
        let eps: Vec<String> = pods
            .iter()
            .map(|p| {
                let addr = if family == "IPv4" { p.ipv4.to_string() } else { p.ipv6.to_string() };
                let node = p.node.strip_prefix('n').map(|i| format!("node-{i}")).unwrap_or_default();
                format!("- addresses: [\"{addr}\"]\n  nodeName: {node}\n  conditions: {{ready: true}}\n  targetRef: {{kind: Pod, name: {}, namespace: default}}\n", p.name)
            })
            .collect();
        out.push_str(&format!(
            "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}-{suffix}\n  namespace: default\n  labels: {{kubernetes.io/service-name: {name}}}\naddressType: {family}\nports:\n- {{name: http, port: 8080, protocol: TCP}}\nendpoints:\n{}",
            eps.join("")
        ));
    }
    out
}
