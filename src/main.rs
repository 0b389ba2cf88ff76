//! `l2speaker`: parses flags, sets up logging, runs the speaker until SIGTERM.

use clap::Parser;

/// Floating IPs for Kubernetes LoadBalancer Services on L2 networks.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// This node's name (from the downward API: spec.nodeName).
    #[arg(long, env = "NODE_NAME")]
    node_name: String,
    /// The namespace holding the speaker's Leases.
    #[arg(long, env = "L2SPEAKER_NAMESPACE", default_value = "l2speaker-system")]
    namespace: String,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = Args::parse();
    tracing_subscriber::fmt().init();
    tracing::info!(node = %args.node_name, namespace = %args.namespace, "l2speaker starting");
    match kube::Client::try_default().await {
        Ok(_) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("l2speaker: error: connecting to the API server: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
