//! The speaker's configuration: flags, each with an environment twin.

use std::net::SocketAddr;
use std::time::Duration;

use clap::{Parser, ValueEnum};

use crate::ownership::timing::Timing;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Floating IPs for Kubernetes LoadBalancer Services on L2 networks. Without a subcommand,
/// runs the speaker.
#[derive(Parser, Debug)]
#[command(
    version,
    about,
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub run: Config,
}

/// How an owner keeps its VIPs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Liveness {
    /// Node liveness on the LAN (heartbeats), arbitration in the API (VIP Leases written on
    /// change only), a kernel switch per node.
    Lan,
    /// Every VIP's Lease renewed through the API (the previous release's way).
    Lease,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Text,
    Json,
}

#[derive(clap::Subcommand, Debug)]
pub enum Command {
    /// Every floating IP with its Service, owner, interface, since when, lease expiry and
    /// transitions (reads the Leases only).
    Status {
        #[arg(long, env = "L2SPEAKER_NAMESPACE", default_value = "l2speaker-system")]
        namespace: String,
        #[arg(long, short, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
    /// Planned handovers of a Service's IPs, probed from here: prints each outage and
    /// p50/p99/max.
    Drill {
        /// The Service, `NAME` or `NAMESPACE/NAME` (or use --pool).
        #[arg(required_unless_present = "pool")]
        service: Option<String>,
        /// Drill every Service with an IP from this pool instead.
        #[arg(long, conflicts_with = "service")]
        pool: Option<String>,
        /// Write the SVG timeline of the worst drill here.
        #[arg(long)]
        svg: Option<std::path::PathBuf>,
        /// How many handovers of each IP.
        #[arg(long, short = 'n', default_value_t = 3)]
        count: usize,
        /// The speaker's namespace (its Leases).
        #[arg(long, env = "L2SPEAKER_NAMESPACE", default_value = "l2speaker-system")]
        namespace: String,
        #[arg(long, short, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
}

/// The speaker's flags.
#[derive(Parser, Debug, Clone)]
pub struct Config {
    /// This node's name (from the downward API: spec.nodeName). Required.
    #[arg(long, env = "NODE_NAME", default_value = "", hide_default_value = true)]
    pub node_name: String,
    /// The namespace holding the speaker's Leases.
    #[arg(long, env = "L2SPEAKER_NAMESPACE", default_value = "l2speaker-system")]
    pub namespace: String,
    /// Lease duration in whole seconds: how long a silent owner keeps an IP.
    #[arg(long, env = "L2SPEAKER_LEASE_DURATION", default_value = "4", value_parser = parse_seconds)]
    pub lease_duration: Duration,
    /// How often the owner renews, in milliseconds.
    #[arg(long, env = "L2SPEAKER_RENEW_INTERVAL", default_value = "1000", value_parser = parse_millis)]
    pub renew_interval: Duration,
    /// An owner whose last successful renewal was *sent* this long ago (ms) withdraws the IP
    /// (self-fencing). Must be below the lease duration, so it withdraws before anyone may
    /// take over.
    #[arg(long, env = "L2SPEAKER_RENEW_DEADLINE", default_value = "2000", value_parser = parse_millis)]
    pub renew_deadline: Duration,
    /// The `spec.loadBalancerClass` this speaker serves.
    #[arg(
        long,
        env = "L2SPEAKER_LOAD_BALANCER_CLASS",
        default_value = "l2speaker.io/l2"
    )]
    pub load_balancer_class: String,
    /// Also serve LoadBalancer Services that name no class.
    #[arg(long, env = "L2SPEAKER_CLAIM_UNCLASSED", default_value_t = true, action = clap::ArgAction::Set)]
    pub claim_unclassed: bool,
    /// Program DNAT to the Service's endpoints (off: another component, e.g. kube-proxy, does it).
    #[arg(long, env = "L2SPEAKER_DNAT", default_value_t = true, action = clap::ArgAction::Set)]
    pub dnat: bool,
    /// Where to serve /metrics, /healthz and /readyz.
    #[arg(
        long,
        env = "L2SPEAKER_METRICS_ADDRESS",
        default_value = "0.0.0.0:9473"
    )]
    pub metrics_address: SocketAddr,
    /// How owners keep their VIPs: `lan` (heartbeats on the LAN decide who is alive, the API
    /// only who owns what) or `lease` (every VIP's Lease renewed through the API).
    #[arg(long, env = "L2SPEAKER_LIVENESS", value_enum, default_value_t = Liveness::Lan)]
    pub liveness: Liveness,
    /// The UDP port of the heartbeats speakers broadcast on the LAN (open it between nodes).
    #[arg(long, env = "L2SPEAKER_HEARTBEAT_PORT", default_value_t = crate::liveness::DEFAULT_PORT)]
    pub heartbeat_port: u16,
    /// How often each speaker sends a heartbeat on each interface, in milliseconds.
    #[arg(long, env = "L2SPEAKER_HEARTBEAT_INTERVAL", default_value = "100", value_parser = parse_millis)]
    pub heartbeat_interval: Duration,
    /// A peer not heard for this long (ms) is no longer alive (at least two intervals).
    #[arg(long, env = "L2SPEAKER_HEARTBEAT_DEAD_AFTER", default_value = "400", value_parser = parse_millis)]
    pub heartbeat_dead_after: Duration,
    /// Node-IP mode for Services that do not choose (it applies while no IPPool exists at
    /// all): publish the addresses of `all` eligible nodes, of `one` (with failover), or
    /// `off` (only Services annotated `l2speaker.io/node-ips` are published on nodes).
    #[arg(long, env = "L2SPEAKER_NODE_IPS", value_enum, default_value_t = NodeIpsDefault::All)]
    pub node_ips: NodeIpsDefault,
    #[arg(long, env = "L2SPEAKER_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum NodeIpsDefault {
    All,
    One,
    Off,
}

impl NodeIpsDefault {
    pub fn mode(self) -> Option<crate::service::NodeIps> {
        match self {
            NodeIpsDefault::All => Some(crate::service::NodeIps::All),
            NodeIpsDefault::One => Some(crate::service::NodeIps::One),
            NodeIpsDefault::Off => None,
        }
    }
}

fn parse_seconds(s: &str) -> Result<Duration, String> {
    let n: u64 = s
        .parse()
        .map_err(|_| format!("{s:?} is not a whole number of seconds"))?;
    if n == 0 {
        return Err("must be at least 1 second".into());
    }
    Ok(Duration::from_secs(n))
}

fn parse_millis(s: &str) -> Result<Duration, String> {
    let n: u64 = s
        .parse()
        .map_err(|_| format!("{s:?} is not a whole number of milliseconds"))?;
    if n == 0 {
        return Err("must be above 0".into());
    }
    Ok(Duration::from_millis(n))
}

impl Config {
    /// Checks what clap cannot: the timings' order and the node name.
    pub fn validate(&self) -> Result<(), String> {
        if self.node_name.trim().is_empty() {
            return Err(
                "--node-name (NODE_NAME) is empty: set it from the downward API (spec.nodeName)"
                    .into(),
            );
        }
        self.timing().check()?;
        self.heartbeat().check()?;
        Ok(())
    }

    pub fn heartbeat(&self) -> crate::liveness::Heartbeat {
        crate::liveness::Heartbeat {
            port: self.heartbeat_port,
            interval: self.heartbeat_interval,
            dead_after: self.heartbeat_dead_after,
        }
    }

    /// The Lease holders' timings.
    pub fn timing(&self) -> Timing {
        Timing {
            lease: self.lease_duration,
            renew_interval: self.renew_interval,
            renew_deadline: self.renew_deadline,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Config, String> {
        let mut all = vec!["l2speaker"];
        all.extend_from_slice(args);
        let c = Config::try_parse_from(all).map_err(|e| e.to_string())?;
        c.validate()?;
        Ok(c)
    }

    #[test]
    fn the_defaults_are_valid_and_the_old_fast_profile_is_refused() {
        let c = parse(&["--node-name", "node-1"]).unwrap();
        assert_eq!(
            (c.lease_duration, c.renew_interval, c.renew_deadline),
            (
                Duration::from_secs(4),
                Duration::from_secs(1),
                Duration::from_secs(2)
            )
        );
        let e = parse(&[
            "--node-name",
            "n",
            "--lease-duration",
            "1",
            "--renew-interval",
            "250",
            "--renew-deadline",
            "750",
        ])
        .unwrap_err();
        assert!(e.contains("no safe address lifetime"), "{e}");
        parse(&[
            "--node-name",
            "n",
            "--lease-duration",
            "3",
            "--renew-interval",
            "500",
            "--renew-deadline",
            "1500",
        ])
        .unwrap();
    }

    #[test]
    fn timings_out_of_order_or_a_missing_node_name_are_refused() {
        assert!(
            parse(&["--node-name", "n", "--renew-deadline", "4000"])
                .unwrap_err()
                .contains("renew deadline")
        );
        assert!(
            parse(&["--node-name", " "])
                .unwrap_err()
                .contains("NODE_NAME")
        );
        assert!(parse(&["--node-name", "n", "--lease-duration", "0"]).is_err());
        assert!(
            parse(&["--node-name", "n", "--heartbeat-dead-after", "150"])
                .unwrap_err()
                .contains("two intervals")
        );
    }
}
