//! `l2speaker`: parses flags, sets up logging, runs the speaker until SIGTERM or Ctrl-C, or
//! one of the operator's commands (`status`, `drill`).

use std::process::ExitCode;

use clap::Parser;
use l2speaker::config::{Cli, Command, Config, LogFormat, Output};

fn main() -> ExitCode {
    l2speaker::memory::limit_arenas();
    match tokio::runtime::Runtime::new() {
        Ok(rt) => rt.block_on(run()),
        Err(e) => fail(format!("starting the runtime: {e}")),
    }
}

async fn run() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        None => speaker(cli.run).await,
        Some(cmd) => {
            let client = match kube::Client::try_default().await {
                Ok(c) => c,
                Err(e) => return fail(format!("connecting to the API server: {e}")),
            };
            match cmd {
                Command::Status { namespace, output } => status(client, &namespace, output).await,
                Command::Drill {
                    service,
                    pool,
                    svg,
                    count,
                    namespace,
                    output,
                } => {
                    drill(
                        client,
                        service.as_deref(),
                        pool.as_deref(),
                        svg,
                        count,
                        &namespace,
                        output,
                    )
                    .await
                }
            }
        }
    }
}

fn fail(msg: impl std::fmt::Display) -> ExitCode {
    eprintln!("l2speaker: error: {msg}");
    ExitCode::FAILURE
}

async fn speaker(config: Config) -> ExitCode {
    if let Err(e) = config.validate() {
        eprintln!("l2speaker: error: {e}");
        return ExitCode::from(2);
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
            .with_writer(std::io::stderr)
            .with_env_filter(filter)
            .init(),
    }
    let kube_config = match kube::Config::infer().await {
        Ok(c) => c,
        Err(e) => {
            return fail(format!(
                "finding the API server (in-cluster or KUBECONFIG): {e}"
            ));
        }
    };
    match l2speaker::speaker::run(config, kube_config, shutdown_signal()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(format!("{e:#}")),
    }
}

async fn status(client: kube::Client, namespace: &str, output: Output) -> ExitCode {
    match l2speaker::status::fetch(client.clone(), namespace).await {
        Ok(leases) => {
            let mut rows = l2speaker::status::rows(&leases, k8s_openapi::jiff::Timestamp::now());
            match l2speaker::status::fetch_node_ips(client.clone()).await {
                Ok((services, nodes)) => {
                    match l2speaker::status::fetch_pools(client).await {
                        Ok(pools) => {
                            let silent =
                                l2speaker::status::unannounced_rows(&rows, &services, &pools);
                            rows.extend(silent);
                        }
                        Err(e) => eprintln!("unannounced IPs not shown (listing IPPools: {e})"),
                    }
                    rows.extend(l2speaker::status::node_ip_rows(&services, &nodes));
                }
                Err(e) => eprintln!("node-IP Services not shown (listing Services and Nodes: {e})"),
            }
            match output {
                Output::Text => print!("{}", l2speaker::status::table(&rows)),
                Output::Json => println!(
                    "{}",
                    serde_json::to_string_pretty(&rows).expect("rows serialize")
                ),
            }
            ExitCode::SUCCESS
        }
        Err(kube::Error::Api(s)) if s.code == 403 => fail(format!(
            "not allowed to list Leases in {namespace}: {}",
            s.message
        )),
        Err(e) => fail(format!("listing Leases in {namespace}: {e}")),
    }
}

async fn drill(
    client: kube::Client,
    service: Option<&str>,
    pool: Option<&str>,
    svg: Option<std::path::PathBuf>,
    count: usize,
    lease_ns: &str,
    output: Output,
) -> ExitCode {
    use l2speaker::drill::Target;
    let target = match (service, pool) {
        (_, Some(p)) => Target::Pool(p),
        (Some(s), None) => {
            let (namespace, name) = s.split_once('/').unwrap_or(("default", s));
            Target::Service { namespace, name }
        }
        (None, None) => return fail("name a Service or a --pool"),
    };
    let text = output == Output::Text;
    let mut n = 0;
    let result = l2speaker::drill::run(client, lease_ns, target, count, |d| {
        n += 1;
        if text {
            println!(
                "drill {n}: {} {} → {}: outage {} ms (handover {} ms)",
                d.ip, d.from, d.to, d.outage_ms, d.handover_ms
            );
        }
    })
    .await;
    match result {
        Ok(drills) => {
            let s = l2speaker::drill::summarize(&drills);
            if let (Some(path), Some(worst)) = (svg, drills.iter().max_by_key(|d| d.outage_ms))
                && let Err(e) = std::fs::write(&path, l2speaker::drill::svg(worst))
            {
                return fail(format!("writing {}: {e}", path.display()));
            }
            match output {
                Output::Text => println!(
                    "{} drills: outage p50 {} ms, p99 {} ms, max {} ms",
                    s.drills, s.p50_ms, s.p99_ms, s.max_ms
                ),
                Output::Json => println!(
                    "{}",
                    serde_json::to_string_pretty(
                        &serde_json::json!({"drills": drills, "summary": s})
                    )
                    .expect("serializes")
                ),
            }
            ExitCode::SUCCESS
        }
        Err(e) => fail(e),
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
