//! `l2s-apiserver`: the test API server on its own, for kubectl by hand and the demo.

use std::net::{SocketAddr, TcpListener};
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use l2speaker_e2e::apiserver::{self, Config};

/// A Kubernetes API server subset, in memory, for tests and demos. Not for production.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// Address to serve on (repeatable). Port 0 picks a free port.
    #[arg(long, env = "L2S_APISERVER_LISTEN", default_value = "127.0.0.1:6443")]
    listen: Vec<SocketAddr>,
    /// Kubernetes minor version to report at /version (kubectl 1.27 to 1.33 are installed).
    #[arg(long, env = "L2S_APISERVER_MINOR", default_value_t = 29, value_parser = clap::value_parser!(u32).range(20..=40))]
    minor: u32,
    /// End watches after at most this many seconds when the client asked for a timeout.
    #[arg(long, env = "L2S_APISERVER_WATCH_TIMEOUT_CAP")]
    watch_timeout_cap: Option<u64>,
    /// Write a kubeconfig for the first address to this file.
    #[arg(long, env = "L2S_APISERVER_KUBECONFIG")]
    kubeconfig: Option<std::path::PathBuf>,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    match run().await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("l2s-apiserver: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let args = Args::parse();
    let listeners = args
        .listen
        .iter()
        .map(|a| TcpListener::bind(a).with_context(|| format!("cannot listen on {a}")))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let config = Config {
        minor: args.minor,
        watch_timeout_cap: args.watch_timeout_cap.map(Duration::from_secs),
    };
    let running = apiserver::serve(config, listeners)?;
    for a in &running.addrs {
        println!("serving on http://{a}");
    }
    if let Some(path) = &args.kubeconfig {
        std::fs::write(path, apiserver::kubeconfig(&running.url()))
            .with_context(|| format!("writing kubeconfig {}", path.display()))?;
        println!("kubeconfig written to {}", path.display());
    }
    tokio::signal::ctrl_c()
        .await
        .context("waiting for Ctrl-C")?;
    Ok(())
}
