//! A test API server: the subset of the Kubernetes API that l2speaker, kube-rs and kubectl
//! use, in memory, over plain HTTP: discovery, CRUD with one global resourceVersion and 409 on
//! a stale write, watches with replay, 410 and timeouts, patches, Table printing, and the
//! test-only endpoints under `/_test/`.
//!
//! - [`resources`]: the kinds served, built-in and CRD-defined;
//! - [`store`]: objects, the resourceVersion counter, history and live changes;
//! - [`http`]: paths, verbs, discovery and watch streams;
//! - [`patch`], [`selector`], [`events`], [`status`]: the pieces of the API's semantics;
//! - [`faults`]: injected delays, errors, hangs and black holes, set over HTTP;
//! - [`validation`]: names, labels, annotations and custom resources checked as kube-apiserver does.

pub mod events;
pub mod faults;
pub mod http;
pub mod patch;
pub mod resources;
pub mod selector;
pub mod status;
pub mod store;
pub mod table;
pub mod validation;

use std::net::SocketAddr;
use std::sync::Arc;

pub use http::{Config, Server};

/// A running server; dropping it stops serving.
pub struct Running {
    pub server: Arc<Server>,
    pub addrs: Vec<SocketAddr>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Running {
    /// `http://ADDR:PORT` of the first listener.
    pub fn url(&self) -> String {
        format!("http://{}", self.addrs[0])
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Serves one store on every listener given (e.g. loopback for tests and a lab address).
pub fn serve(config: Config, listeners: Vec<std::net::TcpListener>) -> std::io::Result<Running> {
    let server = Arc::new(Server::new(config));
    let mut addrs = Vec::new();
    let mut tasks = Vec::new();
    for l in listeners {
        l.set_nonblocking(true)?;
        addrs.push(l.local_addr()?);
        let l = tokio::net::TcpListener::from_std(l)?;
        let app = http::router(server.clone())
            .into_make_service_with_connect_info::<std::net::SocketAddr>();
        tasks.push(tokio::spawn(async move {
            if let Err(e) = axum::serve(l, app).await {
                tracing::error!(error = %e, "test API server stopped");
            }
        }));
    }
    Ok(Running {
        server,
        addrs,
        tasks,
    })
}

/// A kubeconfig pointing at `url` with no credentials.
pub fn kubeconfig(url: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: l2s\n  cluster:\n    server: {url}\n\
         contexts:\n- name: l2s\n  context:\n    cluster: l2s\n    user: l2s\n    namespace: default\n\
         current-context: l2s\nusers:\n- name: l2s\n  user: {{}}\n"
    )
}

/// A server on a free loopback port, for tests.
pub fn serve_local(config: Config) -> std::io::Result<Running> {
    serve(config, vec![std::net::TcpListener::bind("127.0.0.1:0")?])
}

/// A kube-rs client for `url` (plain HTTP, no credentials).
pub fn client(url: &str) -> Result<kube::Client, kube::Error> {
    let uri = url
        .parse()
        .map_err(|e| kube::Error::Service(format!("bad URL {url}: {e}").into()))?;
    kube::Client::try_from(kube::Config::new(uri))
}
