//! `tunnel-server` command line.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Args as ClapArgs, Parser, Subcommand};
use daemon::cli::{duration_in, size_in};
use tunnel_server::addresses::AddressPolicy;
use tunnel_server::dnat::agent_list::{self, AgentList};
use tunnel_server::dnat::metrics::DnatMetrics;
use tunnel_server::dnat::reconciler::{self, Dnat, DnatConfig};
use tunnel_server::dnat::remembered::Remembered;
use tunnel_server::dnat::rules::Prefix;
use tunnel_server::{Server, ServerConfig, ServerSettings};

const DURATIONS: &str =
    "Durations take a unit, as in Kubernetes (500ms, 10s, 5m, 1h); a plain number is seconds.";

const fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

#[derive(Parser, Debug)]
#[command(
    name = "tunnel-server",
    version,
    about = "edge-tunnel server: the cloud end agents dial",
    after_help = DURATIONS,
    args_conflicts_with_subcommands = true
)]
struct Args {
    #[command(subcommand)]
    command: Option<Command>,
    /// QUIC (UDP) address agents dial.
    #[arg(long, env = "TUNNEL_LISTEN", default_value = "0.0.0.0:8443")]
    listen: SocketAddr,
    /// Directory with tls.crt, tls.key and ca.crt (Kubernetes Secret layout).
    #[arg(long, env = "TUNNEL_CERT_DIR")]
    cert_dir: Option<PathBuf>,
    /// TCP address for agents on the HTTP/2-over-TLS fallback (default:
    /// the same address and port as --listen).
    #[arg(long, env = "TUNNEL_H2_LISTEN")]
    h2_listen: Option<SocketAddr>,
    /// Do not serve the HTTP/2 fallback.
    #[arg(long, env = "TUNNEL_NO_H2")]
    no_h2: bool,
    /// HTTP CONNECT ingress (egress selector, Prometheus proxy_url, curl -x).
    /// Plain HTTP: anywhere but loopback it needs --connect-token-file (or
    /// --connect-allow-unauthenticated).
    #[arg(long, env = "TUNNEL_CONNECT_LISTEN")]
    connect_listen: Option<SocketAddr>,
    /// The CONNECT ingress on a Unix socket too, for a kube-apiserver on
    /// the same host (a stale socket is replaced at start).
    #[arg(long, env = "TUNNEL_CONNECT_UDS")]
    connect_uds: Option<PathBuf>,
    /// File mode of --connect-uds, in octal; the owner must keep read and
    /// write.
    #[arg(long, env = "TUNNEL_CONNECT_UDS_MODE", default_value = "0600", value_parser = parse_mode)]
    connect_uds_mode: u32,
    /// Group (numeric id) given --connect-uds, for a mode like 0660.
    #[arg(long, env = "TUNNEL_CONNECT_UDS_GROUP")]
    connect_uds_group: Option<u32>,
    /// `name:token` lines: TCP CONNECT requests must carry one in
    /// Proxy-Authorization (Basic name:token, as Prometheus sends for
    /// proxy_url: http://name:token@host:port, or Bearer token); reloaded
    /// when the file changes.
    #[arg(long, env = "TUNNEL_CONNECT_TOKEN_FILE")]
    connect_token_file: Option<PathBuf>,
    /// The CONNECT ingress over TLS (the server's --cert-dir certificate),
    /// for clients with certificates chaining to --connect-client-ca
    /// (kube-apiserver's egress selector over TCP, the redirector); with
    /// --connect-token-file too, a client without one must send a token.
    #[arg(
        long,
        env = "TUNNEL_CONNECT_TLS_LISTEN",
        requires = "connect_client_ca"
    )]
    connect_tls_listen: Option<SocketAddr>,
    /// CA bundle (PEM) the clients of --connect-tls-listen must chain to.
    /// Tunnel-CA certificates are accepted only from `tunnel-certs
    /// connect-client` and the DNAT helper, never an agent's.
    #[arg(
        long,
        env = "TUNNEL_CONNECT_CLIENT_CA",
        requires = "connect_tls_listen"
    )]
    connect_client_ca: Option<PathBuf>,
    /// Ranges (CIDR, comma-separated or repeated) the server dials itself
    /// when no agent serves a CONNECT target: the cloud's service and pod
    /// ranges, so kube-apiserver's whole `cluster` egress (webhooks,
    /// aggregated APIs) can go through the ingress. Node names no agent
    /// serves are resolved and dialed if they fall inside. Never
    /// loopback. Default: none (503).
    #[arg(long, env = "TUNNEL_DIRECT_CIDR", value_delimiter = ',')]
    direct_cidr: Vec<Prefix>,
    /// Proxy TCP CONNECT requests that carry no credential on a listener
    /// that is not loopback (something else must keep clients out).
    #[arg(long, env = "TUNNEL_CONNECT_ALLOW_UNAUTHENTICATED")]
    connect_allow_unauthenticated: bool,
    /// Transparent ingress for DNAT-redirected connections.
    #[arg(long, env = "TUNNEL_TRANSPARENT_LISTEN")]
    transparent_listen: Option<SocketAddr>,
    /// Admin endpoints: /healthz /readyz /metrics /v1/agents.
    #[arg(long, env = "TUNNEL_ADMIN_LISTEN")]
    admin_listen: Option<SocketAddr>,
    /// TLS listener serving the agent list (/v1/agents) to the standalone
    /// DNAT helper (`tunnel-server dnat --server-feed`): the server's
    /// certificate from --cert-dir; a client certificate chaining to its
    /// ca.crt with CN edge-tunnel:dnat-helper (`tunnel-certs dnat-helper`)
    /// is required. Off by default.
    #[arg(long, env = "TUNNEL_FEED_LISTEN")]
    feed_listen: Option<SocketAddr>,
    /// Connections on --feed-listen at once; more are closed at once.
    #[arg(long, env = "TUNNEL_FEED_MAX_CONNECTIONS", default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    feed_max_connections: u32,
    /// Connections on --feed-listen one source (an address, an IPv6 /64)
    /// may have open; more are closed at once (a helper reads one at a
    /// time).
    #[arg(long, env = "TUNNEL_FEED_MAX_CONNECTIONS_PER_SOURCE", default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    feed_max_connections_per_source: u32,
    /// Id of this replica, unique among the replicas (default: the host
    /// name and a random suffix; the manifests use the pod name).
    #[arg(long, env = "TUNNEL_SERVER_ID")]
    server_id: Option<String>,
    /// On SIGTERM: fail readiness, tell agents this replica is draining
    /// (they hold another meanwhile), keep serving, and exit once the last
    /// tunneled connection ends or this passes (0s-1h; 0: at once). Keep
    /// terminationGracePeriodSeconds above it.
    #[arg(long, env = "TUNNEL_DRAIN_GRACE", default_value = "20s", value_parser = duration_in(Duration::ZERO, secs(3600)))]
    drain_grace: Duration,
    /// How many replicas exist (0: unknown). Told to agents, so one given
    /// a single address (a load balancer) keeps dialing it until it holds
    /// this many distinct replicas.
    #[arg(long, env = "TUNNEL_SERVER_COUNT", default_value_t = 0)]
    server_count: u16,
    /// A DNS name that lists every replica (a headless Service): the
    /// number of its addresses is the replica count told to agents;
    /// resolved every 10 s (it wins over --server-count while it resolves).
    #[arg(long, env = "TUNNEL_PEERS_DNS")]
    peers_dns: Option<String>,
    /// Enroll agents that have no certificate yet: the CA (ca.crt and
    /// ca.key) that signs their certificates. Needs --enroll-tokens-file.
    /// Client certificates become optional on the agent port (a peer
    /// without one may only enroll), and agents renew there.
    #[arg(long, env = "TUNNEL_ENROLL_CA_DIR", requires = "enroll_tokens_file")]
    enroll_ca_dir: Option<PathBuf>,
    /// Bootstrap tokens (`tunnel-certs token create`); read at every
    /// enrollment, which records its use in it (the server must be able to
    /// write it) unless --enroll-state-file is given.
    #[arg(long, env = "TUNNEL_ENROLL_TOKENS_FILE", requires = "enroll_ca_dir")]
    enroll_tokens_file: Option<PathBuf>,
    /// Record token uses here instead of in --enroll-tokens-file, which may
    /// then be read-only (a mounted Secret; new and revoked tokens apply at
    /// the next enrollment). Each replica counts the uses it saw.
    #[arg(
        long,
        env = "TUNNEL_ENROLL_STATE_FILE",
        requires = "enroll_tokens_file"
    )]
    enroll_state_file: Option<PathBuf>,
    /// Validity of the certificates enrollment and renewal issue (10s-365d);
    /// agents renew at two thirds of it.
    #[arg(long, env = "TUNNEL_ENROLL_VALIDITY", default_value = "30d", value_parser = duration_in(secs(10), secs(365 * 86_400)))]
    enroll_validity: Duration,
    /// Agent certificates refused by node name or serial: `node=NAME` and
    /// `serial=HEX` lines. Checked at every registration and renewal;
    /// a change closes the affected live connections within
    /// --reload-interval.
    #[arg(long, env = "TUNNEL_DENY_LIST")]
    deny_list: Option<PathBuf>,
    /// PEM CRLs of the agents' CAs (`tunnel-certs crl`): certificates they
    /// revoke fail the handshake, and their live connections are closed
    /// within --reload-interval.
    #[arg(long, env = "TUNNEL_CRL")]
    crl: Option<PathBuf>,
    /// How often tls.crt, tls.key, ca.crt and the deny-list are checked for
    /// changes (new handshakes use changed files at once; broken ones are
    /// refused and the old kept), and live agents for revoked or expired
    /// certificates (1s-1h).
    #[arg(long, env = "TUNNEL_RELOAD_INTERVAL", default_value = "10s", value_parser = duration_in(secs(1), secs(3600)))]
    reload_interval: Duration,
    /// QUIC congestion controller for what this server sends: cubic, bbr
    /// or new-reno.
    #[arg(long, env = "TUNNEL_CONGESTION", default_value = "bbr")]
    congestion: transport::quic::Congestion,
    /// How an agent connection orders its streams' data (what this server
    /// sends): least-served (a stream that sent less lately goes first,
    /// the others take turns in 64 KiB runs) or round-robin (quinn's:
    /// packet by packet).
    #[arg(long, env = "TUNNEL_STREAM_ORDER", default_value = "least-served")]
    stream_order: transport::StreamOrder,
    /// How long an agent may take to register after its handshake (1s-10m).
    #[arg(long, env = "TUNNEL_REGISTER_TIMEOUT", default_value = "10s", value_parser = duration_in(secs(1), secs(600)))]
    register_timeout: Duration,
    /// How long a QUIC or TLS-over-TCP handshake may take, until the
    /// agent's certificate is verified (500ms-1m): how long a peer that
    /// never finishes holds a handshake slot.
    #[arg(long, env = "TUNNEL_HANDSHAKE_TIMEOUT", default_value = "5s", value_parser = duration_in(Duration::from_millis(500), secs(60)))]
    handshake_timeout: Duration,
    /// Agent handshakes in flight at most, per listener (QUIC, TLS over
    /// TCP); more are dropped. Each QUIC handshake holds ~35 KiB.
    #[arg(long, env = "TUNNEL_MAX_HANDSHAKES", default_value_t = 1024, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    max_handshakes: u32,
    /// From this many QUIC handshakes in flight on, a source that has not
    /// proven its address gets a Retry first (0: always; at most
    /// --max-handshakes).
    #[arg(long, env = "TUNNEL_HANDSHAKE_RETRY_ABOVE", default_value_t = 256)]
    handshake_retry_above: u32,
    /// Agent handshakes in flight from one source address (IPv6: one /64),
    /// per listener (at most --max-handshakes).
    #[arg(long, env = "TUNNEL_MAX_HANDSHAKES_PER_SOURCE", default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    max_handshakes_per_source: u32,
    /// How long an agent may take to connect to a target (100ms-10m); the
    /// server waits 2s more for its answer.
    #[arg(long, env = "TUNNEL_DIAL_TIMEOUT", default_value = "10s", value_parser = duration_in(Duration::from_millis(100), secs(600)))]
    dial_timeout: Duration,
    /// QUIC keep-alive interval (1s-1h).
    #[arg(long, env = "TUNNEL_KEEPALIVE", default_value = "10s", value_parser = duration_in(secs(1), secs(3600)))]
    keepalive: Duration,
    /// QUIC idle timeout (2s-1h; must exceed --keepalive).
    #[arg(long, env = "TUNNEL_IDLE_TIMEOUT", default_value = "30s", value_parser = duration_in(secs(2), secs(3600)))]
    idle_timeout: Duration,
    /// Manage iptables DNAT rules that send traffic for agents' addresses
    /// into the transparent ingress (needs CAP_NET_ADMIN).
    #[arg(long, env = "TUNNEL_DNAT")]
    dnat: bool,
    /// Where the DNAT rules point (default: --transparent-listen).
    #[arg(long, env = "TUNNEL_DNAT_TO")]
    dnat_to: Option<SocketAddr>,
    #[command(flatten)]
    dnat_rules: DnatRuleArgs,
    /// Register agents whose certificate addresses are loopback (a tunnel
    /// and its agents on one machine, as in the quickstart). Loopback is
    /// never redirected by DNAT.
    #[arg(long, env = "TUNNEL_ALLOW_LOOPBACK_AGENTS")]
    allow_loopback_agents: bool,
    /// Most client connections (CONNECT and transparent together) open at
    /// once; more wait in the listen backlog. Default: the open-files
    /// limit (raised to the hard limit at start) minus --fd-reserve.
    #[arg(long, env = "TUNNEL_MAX_CLIENT_CONNECTIONS", value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    max_client_connections: Option<u64>,
    /// File descriptors kept free for everything but client connections:
    /// the admin listener, HTTP/2 agents, certificate reloads, logs.
    #[arg(long, env = "TUNNEL_FD_RESERVE", default_value_t = 256, value_parser = clap::value_parser!(u64).range(16..=1_000_000))]
    fd_reserve: u64,
    /// Tunneled connections open to one node at once through this server;
    /// past it a dial fails at once (CONNECT 503, transparent reset).
    #[arg(long, env = "TUNNEL_MAX_STREAMS_PER_NODE", default_value_t = 8192, value_parser = clap::value_parser!(u64).range(2..=1_000_000))]
    max_streams_per_node: u64,
    /// Reset a tunneled connection whose client has not taken one relay
    /// chunk (up to 64 KiB) for this long; 0 turns it off (0-1h).
    #[arg(long, env = "TUNNEL_CLIENT_STALL_TIMEOUT", default_value = "2m", value_parser = duration_in(Duration::ZERO, secs(3600)))]
    client_stall_timeout: Duration,
    /// Reset a tunneled connection whose client stopped reading after this
    /// long when no stall credit is left for it (--receive-budget, the
    /// agent connection's quarter of it, or --stall-credit-per-client is
    /// spent), so that under overload non-reading clients are shed, not
    /// the reading ones; 0 turns it off (0-1h).
    #[arg(long, env = "TUNNEL_STALL_SHED_TIMEOUT", default_value = "2s", value_parser = duration_in(Duration::ZERO, secs(3600)))]
    stall_shed_timeout: Duration,
    /// Of --max-streams-per-node, how many only the transparent ingress
    /// (the apiserver's route to kubelets) may use.
    #[arg(long, env = "TUNNEL_TRANSPARENT_STREAM_RESERVE", default_value_t = 256, value_parser = clap::value_parser!(u64).range(0..=1_000_000))]
    transparent_stream_reserve: u64,
    /// Tunneled connections one client (an IPv4 address or an IPv6 /64)
    /// may have open at once on each ingress (counted apart); past it a
    /// connection is refused at once (CONNECT 429, transparent reset).
    #[arg(long, env = "TUNNEL_MAX_STREAMS_PER_CLIENT", default_value_t = 4096, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    max_streams_per_client: u64,
    /// Reset a tunneled connection on which nothing moved either way for
    /// this long; 0 (the default) never does: `kubectl logs -f` and `exec`
    /// sessions are often quiet for hours (0-7d).
    #[arg(long, env = "TUNNEL_RELAY_IDLE_TIMEOUT", default_value = "0", value_parser = duration_in(Duration::ZERO, secs(7 * 24 * 3600)))]
    relay_idle_timeout: Duration,
    /// All receive windows of this server together: the most data agents
    /// may send ahead of the clients reading it. Windows shrink as agents
    /// connect and as stalled streams are lent credit (1Mi-64Gi).
    #[arg(long, env = "TUNNEL_RECEIVE_BUDGET", default_value = "256Mi", value_parser = size_in(1 << 20, 64 << 30))]
    receive_budget: u64,
    /// Of --receive-budget, the most lent to the stalled streams of one
    /// client (an IPv4 address or an IPv6 /64) across all agents. Default:
    /// 32Mi, or the budget when that is smaller.
    #[arg(long, env = "TUNNEL_STALL_CREDIT_PER_CLIENT", value_parser = size_in(0, 64 << 30))]
    stall_credit_per_client: Option<u64>,
    #[command(flatten)]
    relay: daemon::cli::Relay,
    #[command(flatten)]
    windows: daemon::cli::QuicWindows,
    #[command(flatten)]
    common: daemon::cli::Common,
}

/// What the DNAT rules match; shared by `--dnat` and `dnat`.
#[derive(ClapArgs, Debug, Clone)]
struct DnatRuleArgs {
    /// Ports redirected on every edge address.
    #[arg(
        long,
        env = "TUNNEL_DNAT_PORTS",
        value_delimiter = ',',
        default_value = "10250,10255"
    )]
    dnat_ports: Vec<u16>,
    /// Static edge range (CIDR) redirected even with no agent connected; repeatable.
    #[arg(long, env = "TUNNEL_DNAT_CIDR", value_delimiter = ',')]
    dnat_cidr: Vec<Prefix>,
    /// Edge range (CIDR) agent addresses must lie in, to be registered and
    /// redirected; repeatable. Default: any address that is not loopback,
    /// unspecified, link-local, multicast or this host's own.
    #[arg(long, env = "TUNNEL_AGENT_ADDRESS_CIDR", value_delimiter = ',')]
    agent_address_cidr: Vec<Prefix>,
    /// Interval between full re-checks that repair drift (1s-1h).
    #[arg(long, env = "TUNNEL_DNAT_RESYNC", default_value = "30s", value_parser = duration_in(secs(1), secs(3600)))]
    dnat_resync: Duration,
}

impl DnatRuleArgs {
    fn config(&self, to: SocketAddr) -> Result<DnatConfig> {
        let mut config = DnatConfig::try_new(to, self.dnat_ports.clone(), self.dnat_cidr.clone())
            .map_err(anyhow::Error::msg)?;
        config.resync = self.dnat_resync;
        config.policy = AddressPolicy::new(self.agent_address_cidr.clone());
        Ok(config)
    }
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run only the DNAT helper, on a control-plane host that runs no
    /// server: follow a server's agent feed (its --feed-listen, over
    /// mutually authenticated TLS) and point rules at it.
    #[command(after_help = DURATIONS)]
    Dnat {
        /// The server's agent feed, https://HOST:PORT (its --feed-listen).
        /// Plain http:// is refused.
        #[arg(long, env = "TUNNEL_SERVER_FEED", required_unless_present_any = ["cleanup", "server_admin"])]
        server_feed: Option<String>,
        /// PEM file with the CA the server's certificate must chain to
        /// (default: ca.crt in --cert-dir).
        #[arg(long, env = "TUNNEL_SERVER_CA")]
        server_ca: Option<PathBuf>,
        /// Name the server's certificate must carry (default: the host of
        /// --server-feed).
        #[arg(long, env = "TUNNEL_SERVER_NAME")]
        server_name: Option<String>,
        /// This helper's client certificate: tls.crt, tls.key (CN
        /// edge-tunnel:dnat-helper, `tunnel-certs dnat-helper`) and ca.crt.
        #[arg(long, env = "TUNNEL_CERT_DIR", required_unless_present_any = ["cleanup", "server_admin"])]
        cert_dir: Option<PathBuf>,
        /// Bound on one read of the feed: connect, TLS, request and body
        /// (1s-5m).
        #[arg(long, env = "TUNNEL_FEED_TIMEOUT", default_value = "10s", value_parser = duration_in(secs(1), secs(300)))]
        feed_timeout: Duration,
        /// Largest agent list accepted, in bytes (64 KiB-1 GiB; the default
        /// 16 MiB is ~5 times a 10,000-node listing).
        #[arg(long, env = "TUNNEL_FEED_MAX_BODY", default_value_t = 16 << 20, value_parser = clap::value_parser!(u64).range(65_536..=1 << 30))]
        feed_max_body: u64,
        /// Admin endpoints of the helper: /healthz, /metrics. Off by default.
        #[arg(long, env = "TUNNEL_ADMIN_LISTEN")]
        admin_listen: Option<SocketAddr>,
        /// Removed: the plain-HTTP feed was unauthenticated. Use
        /// --server-feed.
        #[arg(long, hide = true)]
        server_admin: Option<String>,
        /// The transparent ingress the rules point at (default:
        /// --redirect-listen).
        #[arg(long, env = "TUNNEL_DNAT_TO", required_unless_present_any = ["cleanup", "redirect_listen"])]
        to: Option<SocketAddr>,
        /// Be a redirector: serve the redirected connections on this local
        /// address (the rules point here) and forward each through the
        /// server's CONNECT ingress, --connect-url. Edges never need to
        /// reach this host.
        #[arg(long, env = "TUNNEL_REDIRECT_LISTEN", requires = "connect_url")]
        redirect_listen: Option<SocketAddr>,
        /// The server's CONNECT ingress with client certificates
        /// (https://HOST:PORT; the server runs --connect-client-ca, which
        /// accepts this helper's certificate).
        #[arg(long, env = "TUNNEL_CONNECT_URL", requires = "redirect_listen")]
        connect_url: Option<String>,
        /// Redirected connections open at once; more wait in the backlog.
        #[arg(long, env = "TUNNEL_MAX_CLIENT_CONNECTIONS", default_value_t = 1024, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
        max_client_connections: u32,
        /// Redirected connections one client (an address, an IPv6 /64) may
        /// have open; past it a connection is reset at once, so one pod
        /// cannot take every slot from the apiserver (0: half of
        /// --max-client-connections).
        #[arg(long, env = "TUNNEL_MAX_CONNECTIONS_PER_CLIENT", default_value_t = 0, value_parser = clap::value_parser!(u32).range(0..=1_000_000))]
        max_connections_per_client: u32,
        /// Bound on reaching the CONNECT ingress for one redirected
        /// connection: TCP, TLS and its answer (1s-5m).
        #[arg(long, env = "TUNNEL_DIAL_TIMEOUT", default_value = "10s", value_parser = duration_in(secs(1), secs(300)))]
        dial_timeout: Duration,
        /// Remove every rule this helper owns (after a crash) and exit.
        #[arg(long)]
        cleanup: bool,
        /// Interval between polls of /v1/agents (1s-1h).
        #[arg(long, env = "TUNNEL_DNAT_POLL", default_value = "5s", value_parser = duration_in(secs(1), secs(3600)))]
        poll: Duration,
        /// Remove the rules on exit (default). --keep-rules leaves them.
        #[arg(long)]
        keep_rules: bool,
        /// How long an address stays redirected once reads of the feed no
        /// longer have it (0s-1h): a read that lands on a replica that has
        /// just started, and knows few agents yet, must not take the other
        /// nodes' rules away (0s: the last read alone decides).
        #[arg(long, env = "TUNNEL_DNAT_KEEP_MISSING", default_value = "2m", value_parser = duration_in(Duration::ZERO, secs(3600)))]
        keep_missing: Duration,
        #[command(flatten)]
        rules: DnatRuleArgs,
        #[command(flatten)]
        common: daemon::cli::Common,
    },
}

fn main() -> Result<()> {
    let args = Args::parse();
    match args.command {
        Some(Command::Dnat {
            server_feed,
            server_ca,
            server_name,
            cert_dir,
            feed_timeout,
            feed_max_body,
            admin_listen,
            server_admin,
            to,
            redirect_listen,
            connect_url,
            max_client_connections,
            max_connections_per_client,
            dial_timeout,
            cleanup,
            poll,
            keep_rules,
            keep_missing,
            rules,
            common,
        }) => {
            daemon::cli::init_logging(common.log_format);
            if let Some(url) = server_admin {
                anyhow::bail!(
                    "--server-admin {url} is no longer supported: the plain-HTTP /v1/agents \
                     was unauthenticated, and every address in it becomes a DNAT rule. Serve the \
                     feed with the server's --feed-listen and follow it with --server-feed \
                     https://HOST:PORT, --server-ca and --cert-dir (a certificate from \
                     `tunnel-certs dnat-helper`)"
                );
            }
            let runtime = common.runtime(Some(1))?;
            runtime.block_on(standalone_dnat(Standalone {
                server_feed,
                server_ca,
                server_name,
                cert_dir,
                feed_timeout,
                feed_max_body,
                admin_listen,
                admin_max_connections: common.admin_max_connections,
                to,
                redirect: redirect_listen
                    .zip(connect_url)
                    .map(|(listen, url)| Redirect {
                        listen,
                        url,
                        max_connections: max_client_connections as usize,
                        per_client: match max_connections_per_client {
                            0 => (max_client_connections as usize / 2).max(1),
                            n => n as usize,
                        },
                        dial_timeout,
                    }),
                cleanup,
                poll,
                keep_rules,
                keep_missing,
                rules,
            }))
        }
        None => serve(args),
    }
}

/// The standalone helper's settings.
struct Standalone {
    server_feed: Option<String>,
    server_ca: Option<PathBuf>,
    server_name: Option<String>,
    cert_dir: Option<PathBuf>,
    feed_timeout: Duration,
    feed_max_body: u64,
    admin_listen: Option<SocketAddr>,
    admin_max_connections: u16,
    to: Option<SocketAddr>,
    redirect: Option<Redirect>,
    cleanup: bool,
    poll: Duration,
    keep_rules: bool,
    keep_missing: Duration,
    rules: DnatRuleArgs,
}

/// The redirector's settings.
struct Redirect {
    listen: SocketAddr,
    url: String,
    max_connections: usize,
    per_client: usize,
    dial_timeout: Duration,
}

/// Failed reads of the feed in a row after which the standalone helper
/// says it is not ready.
const FEED_FAILURES_UNREADY: u32 = 3;

/// The standalone helper's admin endpoints: /healthz, /readyz (the last
/// rule sync succeeded, and the feed was read within the last
/// [`FEED_FAILURES_UNREADY`] polls) and its metrics.
struct HelperAdmin(prometheus_client::registry::Registry, DnatMetrics);

impl daemon::admin::AdminRoutes for HelperAdmin {
    fn get(&self, path: &str) -> daemon::admin::Reply {
        use daemon::admin::{Reply, OPENMETRICS, TEXT};
        match path {
            "/healthz" => Reply::new(200, TEXT, "ok\n"),
            "/readyz" if self.1.is_in_sync() => Reply::new(200, TEXT, "ready: rules in sync\n"),
            "/readyz" => Reply::new(
                503,
                TEXT,
                "not ready: the rules are not in sync, or the feed could not be read (see the log)\n",
            ),
            "/metrics" => {
                let mut out = String::new();
                match prometheus_client::encoding::text::encode(&mut out, &self.0) {
                    Ok(()) => Reply::new(200, OPENMETRICS, out),
                    Err(_) => Reply::new(500, TEXT, "encoding the metrics failed\n"),
                }
            }
            _ => Reply::not_found(),
        }
    }
}

async fn standalone_dnat(s: Standalone) -> Result<()> {
    // Before any rule is written, so SIGTERM always leads to cleanup.
    let shutdown = daemon::cli::shutdown_signal();
    // Cleanup needs no target; any concrete address of the right family does.
    let to =
        s.to.or(s.redirect.as_ref().map(|r| r.listen))
            .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 1)));
    let mut config = s.rules.config(to)?;
    config.resync = s.poll;
    let metrics = DnatMetrics::default();
    if s.cleanup {
        Dnat::start(config, metrics).await?.cleanup().await?;
        return Ok(());
    }
    // Every flag is checked before any rule is written.
    let url = s.server_feed.context("--server-feed is required")?;
    agent_list::parse_feed_url(&url)?;
    let cert_dir = s.cert_dir.context("--cert-dir is required")?;
    let tls = agent_list::client_config(&cert_dir, s.server_ca.as_deref())?;
    let connect_tls = tls.0.clone();
    let mut agents = AgentList::try_new(&url, s.server_name.as_deref(), tls)?;
    agents.timeout = s.feed_timeout;
    agents.max_body = usize::try_from(s.feed_max_body).unwrap_or(usize::MAX);
    let admin = match s.admin_listen {
        Some(addr) => Some(
            transport::net::bind_tcp(addr)
                .with_context(|| format!("cannot bind --admin-listen {addr}"))?,
        ),
        None => None,
    };
    let redirect_metrics = tunnel_server::redirect::RedirectMetrics::default();
    let redirector = match &s.redirect {
        Some(r) => {
            let (authority, host) = agent_list::parse_feed_url(&r.url)
                .with_context(|| format!("--connect-url {}", r.url))?;
            let name = s.server_name.clone().unwrap_or(host);
            let server_name = rustls::pki_types::ServerName::try_from(name.clone())
                .with_context(|| format!("{name:?} is not a server name"))?;
            let listener = transport::net::bind_tcp(r.listen)
                .with_context(|| format!("cannot bind --redirect-listen {}", r.listen))?;
            let upstream = tunnel_server::redirect::Upstream {
                authority,
                server_name,
                tls: tokio_rustls::TlsConnector::from(connect_tls.clone()),
                dial_timeout: r.dial_timeout,
            };
            let limits = tunnel_server::redirect::Limits {
                connections: r.max_connections,
                per_client: r.per_client,
            };
            Some((listener, upstream, limits))
        }
        None => None,
    };
    let dnat = Dnat::start(config, metrics.clone()).await?;
    if let Some((listener, upstream, max)) = redirector {
        tracing::info!(listen = %to, upstream = %upstream.authority, "redirector: DNAT-redirected connections go through the CONNECT ingress");
        tokio::spawn(tunnel_server::redirect::serve(
            listener,
            upstream,
            max,
            redirect_metrics.clone(),
        ));
    }
    if let Some(listener) = admin {
        let mut registry = prometheus_client::registry::Registry::with_prefix("edge_tunnel");
        metrics.register(&mut registry);
        redirect_metrics.register(&mut registry);
        let admin_metrics = daemon::admin::AdminMetrics::default();
        admin_metrics.register(&mut registry);
        tokio::spawn(daemon::admin::serve(
            listener,
            std::sync::Arc::new(HelperAdmin(registry, metrics.clone())),
            s.admin_max_connections,
            admin_metrics,
        ));
    }
    tracing::info!(url = agents.url(), %to, "DNAT helper following the server's agent feed");
    let remembered = std::sync::Mutex::new(Remembered::new(s.keep_missing));
    // Reads failed in a row: past FEED_FAILURES_UNREADY the helper is not
    // ready, whatever its last sync did (its rules follow nothing now).
    let failures = std::sync::atomic::AtomicU32::new(0);
    let fetch = || async {
        let result = agents.fetch().await;
        metrics.feed_read(match &result {
            Ok(_) => "ok",
            Err(e) => e.reason(),
        });
        if result.is_err() {
            let n = failures.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
            if n >= FEED_FAILURES_UNREADY {
                metrics
                    .in_sync
                    .store(false, std::sync::atomic::Ordering::Relaxed);
            }
        } else {
            failures.store(0, std::sync::atomic::Ordering::Relaxed);
        }
        let read = result?;
        let (addresses, missing) = remembered
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .merge(&read, std::time::Instant::now());
        metrics.kept_missing.set(missing as i64);
        if missing > 0 {
            tracing::debug!(
                missing,
                "the feed lacks addresses it had less than --keep-missing ago; still redirected"
            );
        }
        Ok(addresses)
    };
    // Nothing signals a change here: the feed is read every `--poll`.
    if s.keep_rules {
        // Same loop, but skip the cleanup by never finishing shutdown.
        tokio::select! {
            _ = reconciler::run(dnat, None, fetch, std::future::pending()) => {}
            _ = shutdown => {}
        }
    } else {
        reconciler::run(dnat, None, fetch, shutdown).await;
    }
    Ok(())
}

fn serve(args: Args) -> Result<()> {
    daemon::cli::init_logging(args.common.log_format);
    let fds = daemon::fds::raise_nofile_logged();
    let cert_dir = args.cert_dir.context("--cert-dir is required")?;
    let dnat_config = if args.dnat {
        let to = args
            .dnat_to
            .or(args.transparent_listen)
            .context("--dnat needs --transparent-listen (or --dnat-to) to point the rules at")?;
        Some(args.dnat_rules.config(to)?)
    } else {
        None
    };
    let mut settings = ServerSettings::new(args.listen, cert_dir);
    settings.h2 = !args.no_h2;
    settings.h2_listen = args.h2_listen;
    settings.connect_listen = args.connect_listen;
    settings.connect_uds = args.connect_uds;
    settings.connect_uds_mode = args.connect_uds_mode;
    settings.connect_uds_group = args.connect_uds_group;
    settings.connect_token_file = args.connect_token_file;
    settings.connect_allow_unauthenticated = args.connect_allow_unauthenticated;
    settings.connect_tls_listen = args.connect_tls_listen;
    settings.connect_client_ca = args.connect_client_ca;
    settings.direct_cidrs = args.direct_cidr;
    settings.transparent_listen = args.transparent_listen;
    settings.admin_listen = args.admin_listen;
    settings.admin_max_connections = args.common.admin_max_connections;
    settings.feed_listen = args.feed_listen;
    settings.feed_max_connections = args.feed_max_connections as usize;
    settings.feed_max_connections_per_source = args.feed_max_connections_per_source as usize;
    settings.server_count = args.server_count;
    settings.drain_grace = args.drain_grace;
    settings.peers_dns = args.peers_dns;
    if let Some(id) = args.server_id {
        settings.server_id = id;
    }
    settings.register_timeout = args.register_timeout;
    settings.enroll_ca_dir = args.enroll_ca_dir;
    settings.enroll_tokens_file = args.enroll_tokens_file;
    settings.enroll_state_file = args.enroll_state_file;
    settings.enroll_validity = args.enroll_validity;
    settings.deny_list = args.deny_list;
    settings.crl = args.crl;
    settings.reload_interval = args.reload_interval;
    settings.handshake_timeout = args.handshake_timeout;
    settings.handshake_limits = tunnel_server::admission::HandshakeLimits {
        max_in_flight: args.max_handshakes as usize,
        retry_above: args.handshake_retry_above as usize,
        per_source: args.max_handshakes_per_source as usize,
    };
    settings.dial_timeout = args.dial_timeout;
    settings.quic.keepalive = args.keepalive;
    settings.quic.congestion = args.congestion;
    settings.quic.stream_order = args.stream_order;
    args.windows.apply(&mut settings.quic);
    settings.quic.idle_timeout = args.idle_timeout;
    settings.client_stall_timeout = Some(args.client_stall_timeout).filter(|d| !d.is_zero());
    settings.stall_shed_timeout = Some(args.stall_shed_timeout).filter(|d| !d.is_zero());
    settings.max_streams_per_node =
        usize::try_from(args.max_streams_per_node).unwrap_or(usize::MAX);
    settings.transparent_stream_reserve =
        usize::try_from(args.transparent_stream_reserve).unwrap_or(usize::MAX);
    settings.max_streams_per_client =
        usize::try_from(args.max_streams_per_client).unwrap_or(usize::MAX);
    settings.relay_idle_timeout = Some(args.relay_idle_timeout).filter(|d| !d.is_zero());
    settings.receive_budget = transport::window::BudgetLimits {
        total: args.receive_budget,
        per_client: args.stall_credit_per_client.unwrap_or(
            transport::window::BudgetLimits::SERVER
                .per_client
                .min(args.receive_budget),
        ),
    };
    settings.relay_buffer_budget = args.relay.relay_buffer_budget;
    settings.addresses = AddressPolicy::new(args.dnat_rules.agent_address_cidr.clone());
    settings.addresses.allow_loopback = args.allow_loopback_agents;
    settings.max_client_connections = match args.max_client_connections {
        Some(n) => usize::try_from(n).unwrap_or(usize::MAX),
        None => fds.share(args.fd_reserve, 16),
    };
    if settings.max_client_connections as u64 + args.fd_reserve > fds.soft {
        tracing::warn!(
            max_client_connections = settings.max_client_connections,
            fd_reserve = args.fd_reserve,
            open_files = fds.soft,
            "client connections plus the reserve exceed the open-files limit; accepts may fail with EMFILE"
        );
    }
    tracing::info!(
        max_client_connections = settings.max_client_connections,
        open_files = fds.soft,
        "client connection cap"
    );
    let config = ServerConfig::try_new(settings).context("invalid configuration")?;
    // Half the cores (at least one): relaying is mostly kernel work (TCP and
    // UDP paths, softirqs) that needs cores of its own, and each extra worker
    // adds cross-thread wake-ups per packet. On the 2-core benchmark one
    // worker beat two on every workload, and `--runtime auto` runs one
    // worker as a current-thread runtime (benches/RESULTS.md).
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let workers = u16::try_from(cores / 2).unwrap_or(u16::MAX).max(1);
    let runtime = args.common.runtime(Some(workers))?;
    runtime.block_on(async move {
        let shutdown = daemon::cli::shutdown_signal();
        let mut server = Server::bind(config)?;
        if let Some(dnat_config) = dnat_config {
            let metrics = server.shared().metrics.dnat.clone();
            server = server.with_dnat(Dnat::start(dnat_config, metrics).await?);
        }
        let addrs = server.local_addrs();
        tracing::info!(?addrs, "listeners bound");
        server.run(shutdown).await;
        Ok(())
    })
}

/// An octal file mode (`0600`, `660`).
fn parse_mode(s: &str) -> Result<u32, String> {
    u32::from_str_radix(s.trim_start_matches("0o"), 8)
        .ok()
        .filter(|m| *m <= 0o777)
        .ok_or_else(|| format!("{s:?} is not an octal file mode such as 0600 or 0660"))
}
