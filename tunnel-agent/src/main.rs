//! `tunnel-agent` command line.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Result;
use clap::Parser;
use tunnel_agent::AgentConfig;

#[derive(Parser, Debug)]
#[command(
    name = "tunnel-agent",
    version,
    about = "edge-tunnel agent: dials out to tunnel-server and serves the node's kubelet"
)]
struct Args {
    /// Server to dial, HOST:PORT; a name that resolves to several
    /// addresses (a headless Service) gets one connection per address, so
    /// every replica can reach this node. A comma-separated list also works.
    #[arg(long, env = "TUNNEL_SERVER")]
    server: String,
    /// Seconds between resolutions of --server (also after any connection loss).
    #[arg(long, env = "TUNNEL_RESOLVE_INTERVAL", default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=3600))]
    resolve_interval: u64,
    /// Transport: auto (QUIC, falling back to HTTP/2 over TLS when UDP does
    /// not get through, re-probing QUIC later), quic, or h2.
    #[arg(long, env = "TUNNEL_TRANSPORT", value_enum, default_value_t = tunnel_agent::config::TransportChoice::Auto)]
    transport: tunnel_agent::config::TransportChoice,
    /// In auto mode: seconds a QUIC handshake may take before falling back.
    #[arg(long, env = "TUNNEL_QUIC_TIMEOUT", default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=120))]
    quic_timeout: u64,
    /// In auto mode: seconds between QUIC re-probes while on HTTP/2.
    #[arg(long, env = "TUNNEL_REPROBE_INTERVAL", default_value_t = 300, value_parser = clap::value_parser!(u64).range(1..=86400))]
    reprobe_interval: u64,
    /// Name to verify the server certificate against (default: HOST of --server).
    #[arg(long, env = "TUNNEL_SERVER_NAME")]
    server_name: Option<String>,
    /// Directory with tls.crt, tls.key and ca.crt (Kubernetes Secret layout).
    #[arg(long, env = "TUNNEL_CERT_DIR")]
    cert_dir: PathBuf,
    /// This node's name; must equal the certificate's common name.
    #[arg(long, env = "TUNNEL_NODE_NAME")]
    node_name: String,
    /// Allowed target HOST:PORT[,PORT...]; repeatable. Default: the
    /// certificate's addresses on ports 10250 and 10255.
    #[arg(long = "allow", env = "TUNNEL_ALLOW", value_delimiter = ' ')]
    allow: Vec<String>,
    /// Seconds a local connect may take.
    #[arg(long, env = "TUNNEL_DIAL_TIMEOUT", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=600))]
    dial_timeout: u64,
    /// Seconds the handshake plus registration may take.
    #[arg(long, env = "TUNNEL_CONNECT_TIMEOUT", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=600))]
    connect_timeout: u64,
    /// QUIC keep-alive interval in seconds.
    #[arg(long, env = "TUNNEL_KEEPALIVE", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=3600))]
    keepalive: u64,
    /// QUIC idle timeout in seconds (must exceed the keep-alive).
    #[arg(long, env = "TUNNEL_IDLE_TIMEOUT", default_value_t = 30, value_parser = clap::value_parser!(u64).range(2..=3600))]
    idle_timeout: u64,
    /// Admin endpoint: /healthz, /readyz, /metrics, /v1/replicas.
    #[arg(long, env = "TUNNEL_ADMIN_LISTEN")]
    admin_listen: Option<std::net::SocketAddr>,
    /// Seconds active streams may run on after SIGTERM.
    #[arg(long, env = "TUNNEL_DRAIN_GRACE", default_value_t = 30, value_parser = clap::value_parser!(u64).range(0..=3600))]
    drain_grace: u64,
    #[command(flatten)]
    common: transport::cli::Common,
}

fn main() -> Result<()> {
    let args = Args::parse();
    transport::cli::init_logging(args.common.log_format);
    if args.idle_timeout <= args.keepalive {
        anyhow::bail!(
            "--idle-timeout ({}s) must be longer than --keepalive ({}s)",
            args.idle_timeout,
            args.keepalive
        );
    }
    let mut config =
        AgentConfig::try_new(&args.server, &args.cert_dir, &args.node_name, &args.allow)?;
    config.server_name = args.server_name;
    config.transport = args.transport;
    config.admin_listen = args.admin_listen;
    config.quic_timeout = Duration::from_secs(args.quic_timeout);
    config.reprobe_interval = Duration::from_secs(args.reprobe_interval);
    config.resolve_interval = Duration::from_secs(args.resolve_interval);
    config.dial_timeout = Duration::from_secs(args.dial_timeout);
    config.connect_timeout = Duration::from_secs(args.connect_timeout);
    config.drain_grace = Duration::from_secs(args.drain_grace);
    config.quic.keepalive = Duration::from_secs(args.keepalive);
    config.quic.idle_timeout = Duration::from_secs(args.idle_timeout);
    let credentials = config.credentials()?;
    for host in credentials.allow.hosts() {
        if !credentials.addresses.contains(host) && !host.is_loopback() {
            tracing::warn!(%host, "allow-list host is not in the certificate; the server routes only certificate addresses to this node");
        }
    }
    tracing::info!(node = %config.node, allow = %credentials.allow, "starting");
    // One worker: an agent shares its node with kubelet and workloads, and
    // on the benchmark one worker relays faster than two (fewer cross-thread
    // wake-ups; see benches/RESULTS.md).
    let runtime = args.common.runtime(Some(1))?;
    runtime.block_on(async {
        let shutdown = transport::cli::shutdown_signal();
        tunnel_agent::run(config, shutdown).await
    })?;
    tracing::info!("drained; exiting");
    Ok(())
}
