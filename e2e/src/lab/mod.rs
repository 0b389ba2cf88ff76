//! The lab: real hosts on one machine, made of network namespaces on the real kernel.
//!
//! ```text
//!                    ┌──────────── switch (bridge br0, namespace "sw") ────────────┐
//!                    │                                                              │
//!   cp 192.0.2.2     n1 192.0.2.11      n2 192.0.2.12     …     client 192.0.2.100
//!   test API server   │ vp0 vp1           │ vp0
//!                    pods 198.51.100.18…  pods 198.51.100.34…
//! ```
//!
//! - one LAN, 192.0.2.0/24 and 2001:db8::/64, through a bridge that lives in its own
//!   namespace (never in the root namespace);
//! - nodes route their pods' /32 and /128 addresses over point-to-point veths, as a CNI's ptp
//!   plugin does, and know each other's pod ranges (host-gw style); the client has the same
//!   static routes, so it can reach a pod through its node;
//! - the control-plane host serves the test API server on 192.0.2.2:6443 (and on a loopback
//!   port of the root namespace for the test itself and kubectl);
//! - names carry the creating pid (`l2s-<pid>-<n>-<host>`), so parallel labs never collide
//!   and [`sweep`] can remove what a killed test left behind without touching a live lab.
//!
//! Documentation ranges only: 192.0.2.0/24, 198.51.100.0/24, 2001:db8::/32.

pub mod arp;
pub mod echo;
pub mod netns;
pub mod probe;
pub mod process;
pub mod sampler;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use thiserror::Error;

use crate::apiserver;
pub use netns::NetnsError;
pub use process::Proc;

/// The prefix of everything the lab names (namespaces, temp dirs).
pub const PREFIX: &str = "l2s-";
/// The port the test API server listens on inside the lab.
pub const API_PORT: u16 = 6443;
/// The port pods' echo servers listen on.
pub const ECHO_PORT: u16 = 8080;

#[derive(Debug, Error)]
pub enum LabError {
    #[error(
        "the lab needs root (it creates network namespaces, veths and nftables rules): \
         run the tests as root, e.g. `sudo ./scripts/test.sh`"
    )]
    NotRoot,
    #[error(transparent)]
    Netns(#[from] NetnsError),
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("timed out after {0:?} waiting for {1}")]
    Timeout(Duration, String),
    #[error("no host named {0:?} in this lab")]
    NoHost(String),
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> LabError {
    let what = what.into();
    move |source| LabError::Io { what, source }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    ControlPlane,
    Node,
    Client,
}

/// A host on the LAN.
#[derive(Debug, Clone)]
pub struct Host {
    /// Short name: `cp`, `n1`…, `client`; nodes' Kubernetes names are `node-1`….
    pub name: String,
    pub ns: String,
    pub role: Role,
    pub ipv4: Ipv4Addr,
    pub ipv6: Ipv6Addr,
    /// The switch-side end of the host's link (what [`Lab::cut_link`] pulls).
    pub switch_port: String,
    pub pods: Vec<Pod>,
}

impl Host {
    /// The Kubernetes node name (`node-1` for `n1`).
    pub fn node_name(&self) -> String {
        self.name
            .strip_prefix('n')
            .map(|i| format!("node-{i}"))
            .unwrap_or_else(|| self.name.clone())
    }
}

/// A pod behind a node.
#[derive(Debug, Clone)]
pub struct Pod {
    /// `n1-p0`: what its echo server answers with.
    pub name: String,
    pub ns: String,
    pub node: String,
    pub ipv4: Ipv4Addr,
    pub ipv6: Ipv6Addr,
}

/// What to build.
#[derive(Debug, Clone)]
pub struct LabConfig {
    /// Pods on each node: `vec![2, 1, 0]` is three nodes, two pods on the first.
    pub pods_per_node: Vec<usize>,
    /// Serve the test API server on the control-plane host.
    pub api_server: bool,
    pub api_config: apiserver::Config,
    /// The `l2s-lab` binary (its `echo` subcommand runs in pods).
    pub lab_bin: PathBuf,
}

impl LabConfig {
    pub fn new(lab_bin: impl Into<PathBuf>, pods_per_node: Vec<usize>) -> Self {
        LabConfig {
            pods_per_node,
            api_server: true,
            api_config: apiserver::Config::default(),
            lab_bin: lab_bin.into(),
        }
    }
}

/// Host `name` (namespace `ns`) routes each other node's pod range via that node.
fn pod_routes(name: &str, ns: &str, nodes: usize) -> Result<(), LabError> {
    for k in 1..=nodes {
        if name == format!("n{k}") {
            continue;
        }
        let (via4, via6) = (lan_v4(node_octet(k)), lan_v6(node_octet(k)));
        netns::ip(
            ns,
            &[
                "route",
                "add",
                &format!("{}/28", pod_v4(k, 0)),
                "via",
                &via4.to_string(),
            ],
        )?;
        netns::ip(
            ns,
            &[
                "-6",
                "route",
                "add",
                &format!("{}/64", pod_v6(k, 0)),
                "via",
                &via6.to_string(),
            ],
        )?;
    }
    Ok(())
}

/// LAN addresses: the control plane, node `i` (1-based), the client.
pub fn lan_v4(host: u8) -> Ipv4Addr {
    Ipv4Addr::new(192, 0, 2, host)
}
/// The IPv6 twin reads like the IPv4 one: host 11 is `2001:db8::11`.
pub fn lan_v6(host: u8) -> Ipv6Addr {
    Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, same_digits(host as usize))
}
/// `11` → `0x11`, so decimal host numbers read the same in IPv6 addresses.
fn same_digits(n: usize) -> u16 {
    u16::from_str_radix(&n.to_string(), 16).expect("small numbers")
}
const CP: u8 = 2;
const CLIENT: u8 = 100;
fn node_octet(i: usize) -> u8 {
    10 + i as u8
}
/// Node `i`'s pod range: 198.51.100.(16·i)/28, gateway .16i+1, pods from .16i+2.
fn pod_v4(node: usize, idx: usize) -> Ipv4Addr {
    Ipv4Addr::new(198, 51, 100, (16 * node + idx) as u8)
}
/// Node `i`'s pod range: 2001:db8:100:i::/64, gateway ::1, pods from ::2.
fn pod_v6(node: usize, idx: usize) -> Ipv6Addr {
    Ipv6Addr::new(
        0x2001,
        0xdb8,
        0x100,
        same_digits(node),
        0,
        0,
        0,
        same_digits(idx),
    )
}

/// The test API server of a lab, on its own runtime thread.
pub struct LabApi {
    pub server: Arc<apiserver::Server>,
    /// For the test process and kubectl (root namespace loopback).
    pub local_url: String,
    /// For speakers in the lab.
    pub lab_url: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for LabApi {
    fn drop(&mut self) {
        self.stop.take().map(|s| s.send(()));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

pub struct Lab {
    pub id: String,
    pub switch_ns: String,
    pub hosts: Vec<Host>,
    pub api: Option<LabApi>,
    /// Keep the process logs when the lab is dropped during a panic (a failing test).
    pub keep_logs_on_panic: bool,
    namespaces: Vec<String>,
    spawner: process::Spawner,
    procs: Mutex<Vec<Arc<Proc>>>,
    logdir: tempfile::TempDir,
    lab_bin: PathBuf,
}

static SEQ: AtomicU32 = AtomicU32::new(0);

impl Lab {
    /// Builds the lab; on any failure, removes what it had made and says why.
    pub fn new(config: LabConfig) -> Result<Lab, LabError> {
        if !nix::unistd::geteuid().is_root() {
            return Err(LabError::NotRoot);
        }
        sweep();
        let id = format!(
            "{PREFIX}{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::SeqCst)
        );
        let logdir = tempfile::Builder::new()
            .prefix(&format!("{id}-logs-"))
            .tempdir()
            .map_err(io("creating the log dir"))?;
        let mut lab = Lab {
            switch_ns: format!("{id}-sw"),
            id,
            hosts: Vec::new(),
            api: None,
            keep_logs_on_panic: true,
            namespaces: Vec::new(),
            spawner: process::Spawner::new(),
            procs: Mutex::new(Vec::new()),
            logdir,
            lab_bin: config.lab_bin.clone(),
        };
        // Dropping `lab` on error tears down whatever was made.
        lab.build(&config)?;
        Ok(lab)
    }

    fn add_ns(&mut self, ns: &str) -> Result<(), LabError> {
        netns::add(ns)?;
        self.namespaces.push(ns.to_string());
        netns::ip(ns, &["link", "set", "lo", "up"])?;
        // No duplicate address detection: link-local addresses are usable at once (a
        // tentative one stalls neighbor discovery for a second or two).
        for scope in ["all", "default"] {
            netns::sysctl(ns, &format!("net/ipv6/conf/{scope}/accept_dad"), "0")?;
        }
        Ok(())
    }

    fn build(&mut self, config: &LabConfig) -> Result<(), LabError> {
        let sw = self.switch_ns.clone();
        self.add_ns(&sw)?;
        netns::ip(
            &sw,
            &[
                "link",
                "add",
                "br0",
                "type",
                "bridge",
                "mcast_snooping",
                "0",
            ],
        )?;
        netns::ip(&sw, &["link", "set", "br0", "up"])?;

        let mut hosts = vec![(String::from("cp"), Role::ControlPlane, CP)];
        for i in 1..=config.pods_per_node.len() {
            hosts.push((format!("n{i}"), Role::Node, node_octet(i)));
        }
        hosts.push(("client".into(), Role::Client, CLIENT));
        for (name, role, octet) in hosts {
            let ns = format!("{}-{name}", self.id);
            self.add_ns(&ns)?;
            let port = format!("p-{name}");
            netns::veth(&sw, &port, &ns)?;
            netns::ip(&sw, &["link", "set", &port, "master", "br0"])?;
            let (v4, v6) = (lan_v4(octet), lan_v6(octet));
            netns::ip(&ns, &["addr", "add", &format!("{v4}/24"), "dev", "eth0"])?;
            netns::ip(
                &ns,
                &["addr", "add", &format!("{v6}/64"), "dev", "eth0", "nodad"],
            )?;
            self.hosts.push(Host {
                name,
                ns,
                role,
                ipv4: v4,
                ipv6: v6,
                switch_port: port,
                pods: Vec::new(),
            });
        }

        for (i, &npods) in config.pods_per_node.iter().enumerate() {
            self.build_node(i + 1, npods)?;
        }
        self.add_pod_routes(config.pods_per_node.len())?;
        if config.api_server {
            self.api = Some(self.start_api(config.api_config.clone())?);
        }
        let pods: Vec<Pod> = self.pods().cloned().collect();
        for pod in &pods {
            let args = [
                "echo",
                "--name",
                &pod.name,
                "--port",
                &ECHO_PORT.to_string(),
            ];
            self.spawn_in(&pod.ns, &pod.name, &self.lab_bin.clone(), &args, &[])?;
        }
        for pod in &pods {
            let addr = SocketAddr::new(IpAddr::V4(pod.ipv4), ECHO_PORT);
            let ns = pod.ns.clone();
            wait_until(
                Duration::from_secs(10),
                &format!("the echo server of {}", pod.name),
                || connect_from(&ns, addr, Duration::from_millis(200)).is_ok(),
            )?;
        }
        Ok(())
    }

    fn build_node(&mut self, i: usize, npods: usize) -> Result<(), LabError> {
        let ns = self.host(&format!("n{i}"))?.ns.clone();
        netns::sysctl(&ns, "net/ipv4/ip_forward", "1")?;
        netns::sysctl(&ns, "net/ipv6/conf/all/forwarding", "1")?;
        let (gw4, gw6) = (pod_v4(i, 1), pod_v6(i, 1));
        for j in 0..npods {
            let pod_ns = format!("{ns}p{j}");
            self.add_ns(&pod_ns)?;
            let dev = format!("vp{j}");
            netns::veth(&ns, &dev, &pod_ns)?;
            let (p4, p6) = (pod_v4(i, 2 + j), pod_v6(i, 2 + j));
            // Node side: the gateway address, and a host route to the pod.
            netns::ip(&ns, &["addr", "add", &format!("{gw4}/32"), "dev", &dev])?;
            netns::ip(
                &ns,
                &["addr", "add", &format!("{gw6}/128"), "dev", &dev, "nodad"],
            )?;
            netns::ip(&ns, &["route", "add", &format!("{p4}/32"), "dev", &dev])?;
            netns::ip(
                &ns,
                &["-6", "route", "add", &format!("{p6}/128"), "dev", &dev],
            )?;
            // Pod side: its address, the gateway on-link, default via the gateway.
            netns::ip(
                &pod_ns,
                &["addr", "add", &format!("{p4}/32"), "dev", "eth0"],
            )?;
            netns::ip(
                &pod_ns,
                &["addr", "add", &format!("{p6}/128"), "dev", "eth0", "nodad"],
            )?;
            netns::ip(
                &pod_ns,
                &["route", "add", &format!("{gw4}/32"), "dev", "eth0"],
            )?;
            netns::ip(
                &pod_ns,
                &[
                    "route",
                    "add",
                    "default",
                    "via",
                    &gw4.to_string(),
                    "dev",
                    "eth0",
                ],
            )?;
            netns::ip(
                &pod_ns,
                &["-6", "route", "add", &format!("{gw6}/128"), "dev", "eth0"],
            )?;
            netns::ip(
                &pod_ns,
                &[
                    "-6",
                    "route",
                    "add",
                    "default",
                    "via",
                    &gw6.to_string(),
                    "dev",
                    "eth0",
                ],
            )?;
            let pod = Pod {
                name: format!("n{i}-p{j}"),
                ns: pod_ns,
                node: format!("n{i}"),
                ipv4: p4,
                ipv6: p6,
            };
            self.host_mut(&format!("n{i}"))?.pods.push(pod);
        }
        Ok(())
    }

    /// Every node and the client route each node's pod range via that node.
    fn add_pod_routes(&mut self, nodes: usize) -> Result<(), LabError> {
        let routers: Vec<(String, String)> = self
            .hosts
            .iter()
            .filter(|h| h.role != Role::ControlPlane)
            .map(|h| (h.name.clone(), h.ns.clone()))
            .collect();
        for (name, ns) in &routers {
            pod_routes(name, ns, nodes)?;
        }
        Ok(())
    }

    /// Fault: deletes the host's LAN interface, as a network manager rebuilding a VLAN or a
    /// bridge does (the host sees its link and every address and route on it go).
    pub fn delete_link(&self, host: &str) -> Result<(), LabError> {
        let ns = self.host(host)?.ns.clone();
        netns::ip(&ns, &["link", "del", "eth0"])?;
        Ok(())
    }

    /// Makes the host's LAN interface again after [`Lab::delete_link`]: the same name, a new
    /// index and MAC, its addresses and routes put back as the network manager would.
    pub fn recreate_link(&self, host: &str) -> Result<(), LabError> {
        let h = self.host(host)?;
        let (ns, port) = (h.ns.clone(), h.switch_port.clone());
        let (v4, v6) = (h.ipv4, h.ipv6);
        netns::veth(&self.switch_ns, &port, &ns)?;
        netns::ip(&self.switch_ns, &["link", "set", &port, "master", "br0"])?;
        netns::ip(&ns, &["addr", "add", &format!("{v4}/24"), "dev", "eth0"])?;
        netns::ip(
            &ns,
            &["addr", "add", &format!("{v6}/64"), "dev", "eth0", "nodad"],
        )?;
        let nodes = self.hosts.iter().filter(|h| h.role == Role::Node).count();
        pod_routes(host, &ns, nodes)?;
        Ok(())
    }

    fn start_api(&self, config: apiserver::Config) -> Result<LabApi, LabError> {
        let cp = self.host("cp")?;
        let lab_addr = SocketAddr::new(IpAddr::V4(cp.ipv4), API_PORT);
        let lab_listener = netns::run_in(&cp.ns, move || std::net::TcpListener::bind(lab_addr))?
            .map_err(io(format!(
                "listening on {lab_addr} in the control-plane host"
            )))?;
        let local =
            std::net::TcpListener::bind("127.0.0.1:0").map_err(io("listening on loopback"))?;
        let (server_tx, server_rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("lab-apiserver".into())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("a runtime");
                rt.block_on(async move {
                    let running = apiserver::serve(config, vec![local, lab_listener]);
                    match running {
                        Ok(r) => {
                            let _ = server_tx.send(Ok((r.server.clone(), r.addrs.clone())));
                            let _ = stop_rx.await;
                        }
                        Err(e) => {
                            let _ = server_tx.send(Err(e));
                        }
                    }
                });
            })
            .map_err(io("starting the API server thread"))?;
        let (server, addrs) = server_rx
            .recv()
            .map_err(|_| LabError::Io {
                what: "the API server thread died".into(),
                source: std::io::Error::other("gone"),
            })?
            .map_err(io("serving the test API"))?;
        Ok(LabApi {
            server,
            local_url: format!("http://{}", addrs[0]),
            lab_url: format!("http://{}", addrs[1]),
            stop: Some(stop_tx),
            thread: Some(thread),
        })
    }

    pub fn host(&self, name: &str) -> Result<&Host, LabError> {
        self.hosts
            .iter()
            .find(|h| h.name == name)
            .ok_or_else(|| LabError::NoHost(name.into()))
    }

    fn host_mut(&mut self, name: &str) -> Result<&mut Host, LabError> {
        self.hosts
            .iter_mut()
            .find(|h| h.name == name)
            .ok_or_else(|| LabError::NoHost(name.into()))
    }

    pub fn nodes(&self) -> impl Iterator<Item = &Host> {
        self.hosts.iter().filter(|h| h.role == Role::Node)
    }

    pub fn pods(&self) -> impl Iterator<Item = &Pod> {
        self.hosts.iter().flat_map(|h| h.pods.iter())
    }

    pub fn client(&self) -> &Host {
        self.hosts
            .iter()
            .find(|h| h.role == Role::Client)
            .expect("every lab has a client")
    }

    pub fn log_dir(&self) -> &Path {
        self.logdir.path()
    }

    /// Starts `program args…` inside namespace `ns`, output to `<logdir>/<name>.log`.
    pub fn spawn_in(
        &self,
        ns: &str,
        name: &str,
        program: &Path,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Result<Arc<Proc>, LabError> {
        let log_path = self.logdir.path().join(format!("{name}.log"));
        let log = std::fs::File::create(&log_path)
            .map_err(io(format!("creating {}", log_path.display())))?;
        let log2 = log.try_clone().map_err(io("duplicating a log file"))?;
        let mut cmd = netns::command_in(ns, program)?;
        cmd.args(args)
            .stdin(std::process::Stdio::null())
            .stdout(log)
            .stderr(log2);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = self
            .spawner
            .spawn(cmd)
            .map_err(io(format!("starting {} in {ns}", program.display())))?;
        let host = self
            .hosts
            .iter()
            .find(|h| h.ns == ns || h.pods.iter().any(|p| p.ns == ns))
            .map(|h| h.name.clone());
        let p = Arc::new(Proc::new(
            name.into(),
            host.unwrap_or_default(),
            log_path,
            child,
        ));
        self.procs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(p.clone());
        Ok(p)
    }

    /// Starts a process on host `host` (see [`Lab::spawn_in`]).
    pub fn spawn(
        &self,
        host: &str,
        name: &str,
        program: &Path,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Result<Arc<Proc>, LabError> {
        let ns = self.host(host)?.ns.clone();
        self.spawn_in(&ns, name, program, args, env)
    }

    /// Fault: pulls the host's cable (its switch port goes down; the host sees no carrier).
    pub fn cut_link(&self, host: &str) -> Result<(), LabError> {
        let port = self.host(host)?.switch_port.clone();
        netns::ip(&self.switch_ns, &["link", "set", &port, "down"])?;
        Ok(())
    }

    pub fn heal_link(&self, host: &str) -> Result<(), LabError> {
        let port = self.host(host)?.switch_port.clone();
        netns::ip(&self.switch_ns, &["link", "set", &port, "up"])?;
        Ok(())
    }

    /// Fault: the host can no longer talk to the API server, but stays on the L2 network.
    pub fn isolate_from_api(&self, host: &str) -> Result<(), LabError> {
        let h = self.host(host)?;
        let cp = self.host("cp")?;
        let rules = format!(
            "table inet {PREFIX}fault {{\n\
             chain input {{ type filter hook input priority -200; ip saddr {v4} drop; ip6 saddr {v6} drop; }}\n\
             chain output {{ type filter hook output priority -200; ip daddr {v4} drop; ip6 daddr {v6} drop; }}\n}}\n",
            v4 = cp.ipv4,
            v6 = cp.ipv6
        );
        netns::exec(&h.ns, "nft", &["-f", "-"], Some(&rules))?;
        Ok(())
    }

    /// Fault: `host` drops heartbeats — all it sends (`from: None`), or those it receives
    /// from `from` — and keeps everything else.
    pub fn drop_heartbeats(&self, host: &str, from: Option<&str>) -> Result<(), LabError> {
        let h = self.host(host)?;
        let rule = match from {
            None => format!(
                "chain output {{ type filter hook output priority -200; udp dport {p} drop; }}",
                p = l2speaker::liveness::DEFAULT_PORT
            ),
            Some(peer) => format!(
                "chain input {{ type filter hook input priority -200; ip saddr {a} udp dport {p} drop; }}",
                a = self.host(peer)?.ipv4,
                p = l2speaker::liveness::DEFAULT_PORT
            ),
        };
        let name = format!(
            "{PREFIX}hb{}",
            from.map(|p| format!("-{p}")).unwrap_or_default()
        );
        let rules = format!("table inet {name} {{\n{rule}\n}}\n");
        netns::exec(&h.ns, "nft", &["-f", "-"], Some(&rules))?;
        Ok(())
    }

    /// Undoes [`Lab::drop_heartbeats`].
    pub fn pass_heartbeats(&self, host: &str, from: Option<&str>) -> Result<(), LabError> {
        let h = self.host(host)?;
        let name = format!(
            "{PREFIX}hb{}",
            from.map(|p| format!("-{p}")).unwrap_or_default()
        );
        netns::exec(&h.ns, "nft", &["delete", "table", "inet", &name], None)?;
        Ok(())
    }

    pub fn heal_api(&self, host: &str) -> Result<(), LabError> {
        let h = self.host(host)?;
        netns::exec(
            &h.ns,
            "nft",
            &["delete", "table", "inet", &format!("{PREFIX}fault")],
            None,
        )?;
        Ok(())
    }

    /// A TCP connection from `host` to `addr`: what the server answered (one line).
    pub fn connect(&self, host: &str, addr: SocketAddr) -> Result<String, LabError> {
        let ns = self.host(host)?.ns.clone();
        connect_from(&ns, addr, Duration::from_millis(500))
    }

    /// One UDP datagram from `host` to `addr`: the first reply within 500 ms (None: none).
    pub fn udp_exchange(&self, host: &str, addr: SocketAddr) -> Result<Option<String>, LabError> {
        let ns = self.host(host)?.ns.clone();
        let what = format!("UDP to {addr} from {host}");
        netns::run_in(&ns, move || -> std::io::Result<Option<String>> {
            let any: SocketAddr = if addr.is_ipv4() {
                "0.0.0.0:0".parse().expect("an address")
            } else {
                "[::]:0".parse().expect("an address")
            };
            let s = std::net::UdpSocket::bind(any)?;
            s.set_read_timeout(Some(Duration::from_millis(500)))?;
            s.send_to(b"ping", addr)?;
            let mut buf = [0u8; 1500];
            match s.recv_from(&mut buf) {
                Ok((n, _)) => Ok(Some(String::from_utf8_lossy(&buf[..n]).into_owned())),
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    Ok(None)
                }
                // An ICMP port unreachable from a node without the rule: no answer either.
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => Ok(None),
                Err(e) => Err(e),
            }
        })?
        .map_err(io(what))
    }

    /// Whether a TCP connection from `host` to `addr` is accepted within 500 ms.
    pub fn can_connect(&self, host: &str, addr: SocketAddr) -> Result<bool, LabError> {
        let ns = self.host(host)?.ns.clone();
        Ok(netns::run_in(&ns, move || {
            std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(500)).is_ok()
        })?)
    }

    /// A plain HTTP GET from `host` (e.g. a speaker's `/metrics`): status code and body.
    pub fn http_get(
        &self,
        host: &str,
        addr: SocketAddr,
        path: &str,
    ) -> Result<(u16, String), LabError> {
        self.http(host, "GET", addr, path, "")
    }

    /// A plain HTTP/1.0 request from `host` with a JSON body: status code and body.
    pub fn http(
        &self,
        host: &str,
        method: &str,
        addr: SocketAddr,
        path: &str,
        body: &str,
    ) -> Result<(u16, String), LabError> {
        use std::io::{Read, Write};
        let ns = self.host(host)?.ns.clone();
        let (path, body, method) = (path.to_string(), body.to_string(), method.to_string());
        let what = format!("{method} http://{addr}{path} from {host}");
        let raw = netns::run_in(&ns, move || -> std::io::Result<String> {
            let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
            s.set_read_timeout(Some(Duration::from_secs(5)))?;
            write!(
                s,
                "{method} {path} HTTP/1.0\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            )?;
            let mut out = String::new();
            s.read_to_string(&mut out)?;
            Ok(out)
        })?
        .map_err(io(what.clone()))?;
        let code = raw
            .get(9..12)
            .and_then(|c| c.parse().ok())
            .ok_or_else(|| LabError::Io {
                what,
                source: std::io::Error::other(raw.clone()),
            })?;
        let body = raw
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default();
        Ok((code, body))
    }

    /// The MAC address of a host's LAN interface.
    pub fn mac(&self, host: &str) -> Result<String, LabError> {
        let ns = self.host(host)?.ns.clone();
        let out = netns::ip(&ns, &["-o", "link", "show", "eth0"])?;
        out.split_whitespace()
            .skip_while(|w| *w != "link/ether")
            .nth(1)
            .map(str::to_string)
            .ok_or_else(|| LabError::Io {
                what: format!("reading the MAC of {host}"),
                source: std::io::Error::other(out.clone()),
            })
    }

    /// Removes everything; keeps going past failures and reports them all.
    pub fn teardown(&mut self) -> Vec<String> {
        let mut errors = Vec::new();
        for p in self
            .procs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
        {
            p.kill();
        }
        self.api.take();
        for ns in self.namespaces.drain(..).rev() {
            if let Err(e) = netns::delete(&ns) {
                errors.push(e.to_string());
            }
        }
        errors
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let panicking = std::thread::panicking();
        let errors = self.teardown();
        for e in &errors {
            eprintln!("lab {}: teardown: {e}", self.id);
        }
        if panicking && self.keep_logs_on_panic {
            // Keep the logs of a failed test.
            let dir = std::mem::replace(
                &mut self.logdir,
                tempfile::TempDir::new().expect("a temp dir"),
            );
            eprintln!(
                "lab {}: process logs kept in {}",
                self.id,
                dir.keep().display()
            );
        }
    }
}

/// One TCP exchange from namespace `ns`: connect, read one line.
pub fn connect_from(ns: &str, addr: SocketAddr, timeout: Duration) -> Result<String, LabError> {
    use std::io::BufRead;
    let what = format!("connecting to {addr} from {ns}");
    netns::run_in(ns, move || -> std::io::Result<String> {
        let s = std::net::TcpStream::connect_timeout(&addr, timeout)?;
        s.set_read_timeout(Some(timeout))?;
        let mut line = String::new();
        std::io::BufReader::new(s).read_line(&mut line)?;
        Ok(line.trim_end().to_string())
    })?
    .map_err(io(what))
}

/// Polls `f` every 10 ms until it holds or `timeout` passes.
pub fn wait_until(
    timeout: Duration,
    what: &str,
    mut f: impl FnMut() -> bool,
) -> Result<(), LabError> {
    let deadline = std::time::Instant::now() + timeout;
    while !f() {
        if std::time::Instant::now() >= deadline {
            return Err(LabError::Timeout(timeout, what.into()));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

/// Removes lab namespaces whose creating process is gone (a test that was killed). With
/// `all`, removes every lab namespace (for use by hand when no lab is running). Returns what
/// it removed. Touches only names starting with [`PREFIX`].
pub fn sweep_with(all: bool) -> Vec<String> {
    let mut removed = Vec::new();
    for ns in netns::list() {
        let Some(rest) = ns.strip_prefix(PREFIX) else {
            continue;
        };
        let pid = rest.split('-').next().and_then(|p| p.parse::<i32>().ok());
        let alive = pid
            .is_some_and(|p| nix::sys::signal::kill(nix::unistd::Pid::from_raw(p), None).is_ok());
        if (all || !alive) && netns::delete(&ns).is_ok() {
            removed.push(ns);
        }
    }
    removed
}

/// [`sweep_with`] for leftovers of dead processes only.
pub fn sweep() -> Vec<String> {
    sweep_with(false)
}
