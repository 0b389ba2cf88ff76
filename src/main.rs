//! `l2speaker`: parses flags, sets up logging, runs the speaker until SIGTERM or Ctrl-C.

use clap::Parser;
use l2speaker::config::{Config, LogFormat};

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let config = Config::parse();
    if let Err(e) = config.validate() {
        eprintln!("l2speaker: error: {e}");
        return std::process::ExitCode::from(2);
    }
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    match config.log_format {
        LogFormat::Text => {
            use std::io::IsTerminal;
            tracing_subscriber::fmt()
                .with_ansi(std::io::stderr().is_terminal())
                .with_writer(std::io::stderr)
                .with_env_filter(filter)
                .init()
        }
        LogFormat::Json => tracing_subscriber::fmt()
            .json()
            .with_env_filter(filter)
            .init(),
    }
    let client = match kube::Client::try_default().await {
        Ok(c) => c,
        Err(e) => {
            eprintln!("l2speaker: error: connecting to the API server: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match l2speaker::speaker::run(config, client, shutdown_signal()).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("l2speaker: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("installing a SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
