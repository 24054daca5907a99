//! `tunnel-agent` command line.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Parser;
use daemon::cli::duration_in;
use tunnel_agent::AgentConfig;

const DURATIONS: &str =
    "Durations take a unit, as in Kubernetes (500ms, 10s, 5m, 1h); a plain number is seconds.";

/// Descriptors kept free for everything but tunneled streams: the admin
/// listener, server connections over HTTP/2, certificate reloads, logs.
const FD_RESERVE: u64 = 64;

const fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

#[derive(Parser, Debug)]
#[command(
    name = "tunnel-agent",
    version,
    about = "edge-tunnel agent: dials out to tunnel-server and serves the node's kubelet",
    after_help = DURATIONS
)]
struct Args {
    /// Server to dial, HOST:PORT; a name that resolves to several
    /// addresses (a headless Service) gets one connection per address, so
    /// every replica can reach this node. A comma-separated list also works.
    #[arg(long, env = "TUNNEL_SERVER")]
    server: String,
    /// Time between resolutions of --server (also after any connection loss; 1s-1h).
    #[arg(long, env = "TUNNEL_RESOLVE_INTERVAL", default_value = "30s", value_parser = duration_in(secs(1), secs(3600)))]
    resolve_interval: Duration,
    /// The most server connections held when the servers say more replicas
    /// exist than --server has addresses (one load-balanced address): the
    /// agent dials that address again, from new ports, until it holds
    /// every replica (1-256).
    #[arg(long, env = "TUNNEL_MAX_REPLICAS", default_value_t = 16, value_parser = clap::value_parser!(u16).range(1..=256))]
    max_replicas: u16,
    /// Tunneled connections open at once, over all server connections
    /// together; past it a dial is refused (502 to the client). Each holds
    /// a socket to its target (and up to ~128 KiB of kernel buffers when
    /// its reader stalls): size it to the pod's memory limit (16-1000000;
    /// lowered to what the open-files limit allows).
    #[arg(long, env = "TUNNEL_MAX_STREAMS", default_value_t = 8192, value_parser = clap::value_parser!(u32).range(16..=1_000_000))]
    max_streams: u32,
    /// Transport: auto (QUIC, falling back to HTTP/2 over TLS when UDP does
    /// not get through, re-probing QUIC later), quic, or h2.
    #[arg(long, env = "TUNNEL_TRANSPORT", value_enum, default_value_t = tunnel_agent::config::TransportChoice::Auto)]
    transport: tunnel_agent::config::TransportChoice,
    /// In auto mode: how long QUIC may take to answer before HTTP/2 is
    /// tried (100ms-2m).
    #[arg(long, env = "TUNNEL_QUIC_TIMEOUT", default_value = "5s", value_parser = duration_in(Duration::from_millis(100), secs(120)))]
    quic_timeout: Duration,
    /// In auto mode: the longest wait between QUIC re-probes while on
    /// HTTP/2; the first comes after 5s and the waits double (1s-24h).
    #[arg(long, env = "TUNNEL_REPROBE_INTERVAL", default_value = "5m", value_parser = duration_in(secs(1), secs(86400)))]
    reprobe_interval: Duration,
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
    /// How long a local connect may take (100ms-10m).
    #[arg(long, env = "TUNNEL_DIAL_TIMEOUT", default_value = "10s", value_parser = duration_in(Duration::from_millis(100), secs(600)))]
    dial_timeout: Duration,
    /// How long the answer to a transparent dial may wait for the target's
    /// first bytes, to go in the same packet (0-100ms; 0: at once).
    #[arg(long, env = "TUNNEL_DIAL_RESULT_HOLD", default_value = "2ms", value_parser = duration_in(Duration::ZERO, Duration::from_millis(100)))]
    dial_result_hold: Duration,
    /// How long the handshake plus registration may take (1s-10m).
    #[arg(long, env = "TUNNEL_CONNECT_TIMEOUT", default_value = "10s", value_parser = duration_in(secs(1), secs(600)))]
    connect_timeout: Duration,
    /// QUIC keep-alive interval (1s-1h).
    #[arg(long, env = "TUNNEL_KEEPALIVE", default_value = "10s", value_parser = duration_in(secs(1), secs(3600)))]
    keepalive: Duration,
    /// QUIC idle timeout (2s-1h; must exceed --keepalive).
    #[arg(long, env = "TUNNEL_IDLE_TIMEOUT", default_value = "30s", value_parser = duration_in(secs(2), secs(3600)))]
    idle_timeout: Duration,
    /// Admin endpoint: /healthz, /readyz, /metrics, /v1/replicas.
    #[arg(long, env = "TUNNEL_ADMIN_LISTEN")]
    admin_listen: Option<std::net::SocketAddr>,
    /// A file to hold a lock on while the agent runs (on the node, e.g. in
    /// --cert-dir). An agent that finds it held by another process (a
    /// rolling update with surge) is that one's successor: servers route
    /// new streams to it and let the other's connections finish theirs.
    #[arg(long, env = "TUNNEL_INSTANCE_LOCK")]
    instance_lock: Option<std::path::PathBuf>,
    /// A file the agent rewrites every 2s with its readiness, for exec
    /// probes (`tunnel-agent check-status FILE [--ready]`) that must reach
    /// this process even when another agent holds the admin address.
    #[arg(long, env = "TUNNEL_STATUS_FILE")]
    status_file: Option<std::path::PathBuf>,
    /// How long active streams may run on after SIGTERM (0s-1h).
    #[arg(long, env = "TUNNEL_DRAIN_GRACE", default_value = "30s", value_parser = duration_in(Duration::ZERO, secs(3600)))]
    drain_grace: Duration,
    /// All receive windows of this agent's connections together: the most
    /// data the server replicas may send ahead of the local targets
    /// reading it (1Mi-16Gi).
    #[arg(long, env = "TUNNEL_RECEIVE_BUDGET", default_value = "64Mi", value_parser = daemon::cli::size_in(1 << 20, 16 << 30))]
    receive_budget: u64,
    #[command(flatten)]
    relay: daemon::cli::Relay,
    #[command(flatten)]
    windows: daemon::cli::QuicWindows,
    /// Enroll with this bootstrap token (`tunnel-certs token create`) when
    /// --cert-dir holds no usable certificate for --node-name: the key is
    /// made here and never leaves the node. Prefer --bootstrap-token-file
    /// (or the environment) to keep it out of the process list.
    #[arg(
        long,
        env = "TUNNEL_BOOTSTRAP_TOKEN",
        hide_env_values = true,
        conflicts_with = "bootstrap_token_file"
    )]
    bootstrap_token: Option<String>,
    /// File holding the bootstrap token (a mounted Secret), read at every
    /// enrollment attempt.
    #[arg(long, env = "TUNNEL_BOOTSTRAP_TOKEN_FILE")]
    bootstrap_token_file: Option<PathBuf>,
    /// `sha256:HEX` pin of the CA that issued the server certificate
    /// (`tunnel-certs ca-hash`): how an enrolling agent without a ca.crt
    /// authenticates the server.
    #[arg(long, env = "TUNNEL_CA_CERT_HASH")]
    ca_cert_hash: Option<String>,
    /// This node's address to put in the enrolled certificate (the
    /// InternalIP kube-apiserver dials); repeatable.
    #[arg(long = "node-ip", env = "TUNNEL_NODE_IP", value_delimiter = ',')]
    node_ips: Vec<std::net::IpAddr>,
    /// QUIC congestion controller for what this agent sends (downloads
    /// from the edge): cubic, bbr or new-reno.
    #[arg(long, env = "TUNNEL_CONGESTION", default_value = "bbr")]
    congestion: transport::quic::Congestion,
    /// How the connection orders its streams' data (what this agent
    /// sends): least-served or round-robin (see the server's).
    #[arg(long, env = "TUNNEL_STREAM_ORDER", default_value = "least-served")]
    stream_order: transport::StreamOrder,
    /// Do not renew the certificate (by default it is renewed at two
    /// thirds of its lifetime, with servers that enroll).
    #[arg(long, env = "TUNNEL_NO_RENEW")]
    no_renew: bool,
    #[command(flatten)]
    common: daemon::cli::Common,
}

/// `tunnel-agent check-status FILE`: the exec probe of `--status-file`.
#[derive(Parser, Debug)]
#[command(
    name = "tunnel-agent check-status",
    about = "exit 0 if the agent's --status-file is fresh (and, with --ready, says ready); \
             for exec probes",
    after_help = DURATIONS
)]
struct CheckStatus {
    /// The file the agent writes (--status-file).
    file: PathBuf,
    /// Require a registered server replica, not only a running agent.
    #[arg(long)]
    ready: bool,
    /// How old the file may be (the agent rewrites it every 2s; 1s-1h).
    #[arg(long, default_value = "30s", value_parser = duration_in(secs(1), secs(3600)))]
    max_age: Duration,
}

fn main() -> Result<()> {
    if std::env::args_os()
        .nth(1)
        .is_some_and(|a| a == "check-status")
    {
        let check = CheckStatus::parse_from(std::env::args_os().skip(1));
        match tunnel_agent::status::check(&check.file, check.ready, check.max_age) {
            Ok(fine) => {
                println!("{fine}");
                return Ok(());
            }
            Err(why) => {
                eprintln!("{why}");
                std::process::exit(1);
            }
        }
    }
    let args = Args::parse();
    daemon::cli::init_logging(args.common.log_format);
    let fds = daemon::fds::raise_nofile_logged();
    let token = match (&args.bootstrap_token, &args.bootstrap_token_file) {
        (Some(t), _) => Some(tunnel_agent::enroll::TokenSource::Value(t.clone())),
        (None, Some(f)) => Some(tunnel_agent::enroll::TokenSource::File(f.clone())),
        (None, None) => None,
    };
    // From a Secret key the pin may end in a newline.
    let ca_cert_hash = args
        .ca_cert_hash
        .as_deref()
        .map(|p| p.trim().to_ascii_lowercase());
    if let Some(pin) = &ca_cert_hash {
        certs::bootstrap::parse_ca_cert_hash(pin).context("--ca-cert-hash")?;
    }
    let bootstrap = token.map(|token| tunnel_agent::enroll::Bootstrap {
        token,
        ca_cert_hash: ca_cert_hash.clone(),
        addresses: args.node_ips.clone(),
    });
    if bootstrap.is_some() && args.node_ips.is_empty() {
        anyhow::bail!(
            "--bootstrap-token needs --node-ip: the address(es) to enroll this node with"
        );
    }
    let mut config = if bootstrap.is_some() {
        AgentConfig::without_certificate(
            &args.server,
            &args.cert_dir,
            &args.node_name,
            &args.allow,
        )?
    } else {
        AgentConfig::try_new(&args.server, &args.cert_dir, &args.node_name, &args.allow)?
    };
    config.renew = !args.no_renew;
    config.server_name = args.server_name;
    config.transport = args.transport;
    config.admin_listen = args.admin_listen;
    config.admin_max_connections = args.common.admin_max_connections;
    config.quic_timeout = args.quic_timeout;
    config.reprobe_interval = args.reprobe_interval;
    config.resolve_interval = args.resolve_interval;
    config.max_replicas = args.max_replicas;
    config.dial_timeout = args.dial_timeout;
    config.result_hold = args.dial_result_hold;
    config.connect_timeout = args.connect_timeout;
    config.drain_grace = args.drain_grace;
    config.instance_lock = args.instance_lock;
    config.status_file = args.status_file;
    config.quic.keepalive = args.keepalive;
    config.quic.congestion = args.congestion;
    config.quic.stream_order = args.stream_order;
    args.windows.apply(&mut config.quic);
    config.quic.idle_timeout = args.idle_timeout;
    config.relay_buffers = std::sync::Arc::new(args.relay.buffers());
    config.receive_budget =
        transport::window::ReceiveBudget::new(transport::window::BudgetLimits {
            total: args.receive_budget,
            per_client: args.receive_budget,
        });
    // Each tunneled stream holds one socket to its target: never let the
    // server open more streams than there are descriptors for.
    let fit = u32::try_from(fds.share(FD_RESERVE, 16)).unwrap_or(u32::MAX);
    config.quic.max_streams = args.max_streams;
    if config.quic.max_streams > fit {
        tracing::warn!(
            open_files = fds.soft,
            streams = fit,
            "the open-files limit allows only this many tunneled streams at once (all connections together)"
        );
        config.quic.max_streams = fit;
    }
    config.validate()?;
    let enrolling = bootstrap
        .as_ref()
        .and_then(|_| tunnel_agent::enroll::needs_enrollment(&config));
    config.bootstrap = bootstrap;
    if enrolling.is_none() {
        let credentials = config.credentials()?;
        for host in credentials.allow.hosts() {
            if host.is_loopback() {
                tracing::warn!(%host, "the allow-list lets the server reach this node's loopback services; allow only the ports it needs");
            } else if !credentials.addresses.contains(host) {
                tracing::warn!(%host, "allow-list host is not in the certificate; the server routes only certificate addresses to this node");
            }
        }
        tracing::info!(node = %config.node, allow = %credentials.allow, "starting");
    } else {
        tracing::info!(node = %config.node, "starting; enrolling first");
    }
    // One worker: an agent shares its node with kubelet and workloads, and
    // on the benchmark one worker relays faster than two (fewer cross-thread
    // wake-ups); `--runtime auto` makes that a current-thread runtime, which
    // peaked ~40% lower in memory (see benches/RESULTS.md).
    let runtime = args.common.runtime(Some(1))?;
    runtime.block_on(async {
        let shutdown = daemon::cli::shutdown_signal();
        tunnel_agent::run(config, shutdown).await
    })?;
    tracing::info!("drained; exiting");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(extra: &[&str]) -> Result<Args, clap::Error> {
        let mut argv = vec![
            "tunnel-agent",
            "--server",
            "tunnel.example:8443",
            "--cert-dir",
            "/nonexistent",
            "--node-name",
            "edge-1",
        ];
        argv.extend_from_slice(extra);
        Args::try_parse_from(argv)
    }

    #[test]
    fn the_dial_result_hold_defaults_to_the_config_default_and_is_bounded() {
        assert_eq!(
            parse(&[]).unwrap().dial_result_hold,
            tunnel_agent::config::RESULT_HOLD
        );
        assert!(parse(&["--dial-result-hold", "0"])
            .unwrap()
            .dial_result_hold
            .is_zero());
        let e = parse(&["--dial-result-hold", "1s"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("longer than the maximum"), "{e}");
    }
}
