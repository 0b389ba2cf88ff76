//! `l2s-lab`: the network-namespace lab by hand, and the small programs that run inside it.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use l2speaker_e2e::lab::{self, Lab, LabConfig, echo, probe};

#[derive(Parser, Debug)]
#[command(version, about = "The l2speaker network-namespace lab")]
struct Args {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Build a lab (switch, control plane with the test API server, nodes, pods, client) and
    /// keep it until Ctrl-C; prints the hosts and a kubeconfig.
    Up {
        /// Pods on each node, comma-separated: `2,1,0` is three nodes.
        #[arg(long, default_value = "2,1,0", value_delimiter = ',')]
        pods: Vec<usize>,
    },
    /// Remove lab namespaces whose creating process is gone (`--all`: every lab namespace).
    Sweep {
        #[arg(long)]
        all: bool,
    },
    /// A pod's echo server: answers each connection with `<name> <client address>`.
    Echo {
        #[arg(long)]
        name: String,
        #[arg(long, default_values_t = [lab::ECHO_PORT])]
        port: Vec<u16>,
    },
    /// Probe ADDR:PORT from a lab namespace every 10 ms and print the outages seen.
    Probe {
        /// The namespace to probe from (the lab's client: `l2s-<pid>-<n>-client`).
        #[arg(long)]
        netns: String,
        #[arg(long)]
        target: SocketAddr,
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        /// Print the whole timeline as JSON.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> std::process::ExitCode {
    match run(Args::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("l2s-lab: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> anyhow::Result<()> {
    match args.cmd {
        Cmd::Echo { name, port } => echo::serve(&name, &port).context("serving"),
        Cmd::Sweep { all } => {
            for ns in lab::sweep_with(all) {
                println!("removed {ns}");
            }
            Ok(())
        }
        Cmd::Probe {
            netns,
            target,
            seconds,
            json,
        } => {
            let p = probe::Prober::start(&netns, probe::ProbeConfig::new(target))?;
            std::thread::sleep(Duration::from_secs(seconds));
            let t = p.stop();
            if json {
                println!("{}", serde_json::to_string_pretty(&t)?);
            }
            println!(
                "{} ok, {} failed, pods {:?}",
                t.successes(),
                t.failures(),
                t.pods()
            );
            for o in t.outages() {
                println!(
                    "outage {} ms (at {} ms)",
                    o.duration().as_millis(),
                    o.start.as_millis()
                );
            }
            Ok(())
        }
        Cmd::Up { pods } => {
            let bin = std::env::current_exe().context("locating l2s-lab")?;
            let lab = Lab::new(LabConfig::new(bin, pods))?;
            let api = lab.api.as_ref().expect("the lab serves the API");
            let kubeconfig = lab.log_dir().join("kubeconfig");
            std::fs::write(
                &kubeconfig,
                l2speaker_e2e::apiserver::kubeconfig(&api.local_url),
            )?;
            println!(
                "lab {} is up; API server {} (in the lab: {})",
                lab.id, api.local_url, api.lab_url
            );
            println!("kubectl --kubeconfig {} get ns", kubeconfig.display());
            for h in &lab.hosts {
                println!("{:7} {:16} {:18} netns {}", h.name, h.ipv4, h.ipv6, h.ns);
                for p in &h.pods {
                    println!(
                        "  pod {:7} {:16} {:18} netns {}",
                        p.name, p.ipv4, p.ipv6, p.ns
                    );
                }
            }
            println!("Ctrl-C tears it down.");
            let (tx, rx) = std::sync::mpsc::channel();
            ctrlc_channel(tx)?;
            let _ = rx.recv();
            drop(lab);
            Ok(())
        }
    }
}

/// Ctrl-C or SIGTERM → one message.
fn ctrlc_channel(tx: std::sync::mpsc::Sender<()>) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    std::thread::spawn(move || {
        rt.block_on(async {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                    .expect("SIGTERM handler");
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        });
        let _ = tx.send(());
    });
    Ok(())
}
