//! `tunnel-server` command line.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Result;
use clap::Parser;
use tunnel_server::{Server, ServerConfig};

#[derive(Parser, Debug)]
#[command(
    name = "tunnel-server",
    version,
    about = "edge-tunnel server: the cloud end agents dial"
)]
struct Args {
    /// QUIC (UDP) address agents dial.
    #[arg(long, env = "TUNNEL_LISTEN", default_value = "0.0.0.0:8443")]
    listen: SocketAddr,
    /// Directory with tls.crt, tls.key and ca.crt (Kubernetes Secret layout).
    #[arg(long, env = "TUNNEL_CERT_DIR")]
    cert_dir: PathBuf,
    /// HTTP CONNECT ingress (egress selector, Prometheus proxy_url, curl -x).
    #[arg(long, env = "TUNNEL_CONNECT_LISTEN")]
    connect_listen: Option<SocketAddr>,
    /// Transparent ingress for DNAT-redirected connections.
    #[arg(long, env = "TUNNEL_TRANSPARENT_LISTEN")]
    transparent_listen: Option<SocketAddr>,
    /// Admin endpoints: /healthz /readyz /metrics /v1/agents.
    #[arg(long, env = "TUNNEL_ADMIN_LISTEN")]
    admin_listen: Option<SocketAddr>,
    /// Stable id of this replica (default: the host name).
    #[arg(long, env = "TUNNEL_SERVER_ID")]
    server_id: Option<String>,
    /// Seconds an agent may take to register after connecting.
    #[arg(long, env = "TUNNEL_REGISTER_TIMEOUT", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=600))]
    register_timeout: u64,
    /// Seconds an agent may take to connect to a target.
    #[arg(long, env = "TUNNEL_DIAL_TIMEOUT", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=600))]
    dial_timeout: u64,
    /// QUIC keep-alive interval in seconds.
    #[arg(long, env = "TUNNEL_KEEPALIVE", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=3600))]
    keepalive: u64,
    /// QUIC idle timeout in seconds (must exceed the keep-alive).
    #[arg(long, env = "TUNNEL_IDLE_TIMEOUT", default_value_t = 30, value_parser = clap::value_parser!(u64).range(2..=3600))]
    idle_timeout: u64,
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
    let mut config = ServerConfig::new(args.listen, args.cert_dir);
    config.connect_listen = args.connect_listen;
    config.transparent_listen = args.transparent_listen;
    config.admin_listen = args.admin_listen;
    if let Some(id) = args.server_id {
        config.server_id = id;
    }
    config.register_timeout = Duration::from_secs(args.register_timeout);
    config.dial_timeout = Duration::from_secs(args.dial_timeout);
    config.quic.keepalive = Duration::from_secs(args.keepalive);
    config.quic.idle_timeout = Duration::from_secs(args.idle_timeout);
    let runtime = args.common.runtime()?;
    runtime.block_on(async move {
        let server = Server::bind(config)?;
        let addrs = server.local_addrs();
        tracing::info!(?addrs, "listeners bound");
        server.run(transport::cli::shutdown_signal()).await;
        Ok(())
    })
}
