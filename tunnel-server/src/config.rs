//! Server configuration, validated when built.
//!
//! [`ServerSettings`] is what an operator (or a test) asks for, with
//! defaults; [`ServerConfig::try_new`] checks it once, and only a checked
//! [`ServerConfig`] reaches [`crate::Server::bind`]. The code that uses the
//! configuration never re-checks it.

use std::net::SocketAddr;
use std::ops::Deref;
use std::path::PathBuf;
use std::time::Duration;

use transport::quic::{QuicSettings, QuicSettingsError};
use transport::window::{BudgetLimits, FLOOR};

use crate::admission::{HandshakeLimits, HandshakeLimitsError};

/// Every server setting, unchecked.
#[derive(Clone, Debug)]
pub struct ServerSettings {
    /// QUIC endpoint for agents.
    pub listen: SocketAddr,
    /// Directory with `tls.crt`, `tls.key`, `ca.crt`.
    pub cert_dir: PathBuf,
    /// Serve agents over HTTP/2-over-TLS on TCP too. Default on.
    pub h2: bool,
    /// TCP address for HTTP/2 agents. Default: the QUIC endpoint's
    /// address and port.
    pub h2_listen: Option<SocketAddr>,
    pub connect_listen: Option<SocketAddr>,
    /// The CONNECT ingress on a Unix socket too (for an apiserver on the
    /// same host): its mode (default 0600) and group decide who may use it.
    pub connect_uds: Option<PathBuf>,
    pub connect_uds_mode: u32,
    pub connect_uds_group: Option<u32>,
    /// `name:token` lines; TCP CONNECT requests must prove one
    /// (`Proxy-Authorization`). Reloaded when the file changes.
    pub connect_token_file: Option<PathBuf>,
    /// The CONNECT ingress over TLS, with client certificates: the
    /// server's own certificate, clients verified against
    /// `connect_client_ca` (a certificate is optional when a token file
    /// is given). Beside `connect_listen`, which stays plain HTTP.
    pub connect_tls_listen: Option<SocketAddr>,
    /// CA bundle for the clients of `connect_tls_listen`.
    pub connect_client_ca: Option<PathBuf>,
    /// Ranges the server dials itself when no agent serves a CONNECT or
    /// forward target (webhooks, aggregated APIs). Default none: 503.
    pub direct_cidrs: Vec<crate::dnat::rules::Prefix>,
    /// Proxy TCP CONNECT requests without a credential on a listener that
    /// is not loopback. Default off: such a configuration is refused.
    pub connect_allow_unauthenticated: bool,
    pub transparent_listen: Option<SocketAddr>,
    pub admin_listen: Option<SocketAddr>,
    /// Connections the admin listener serves at once.
    pub admin_max_connections: u16,
    /// TLS listener serving the agent list to the standalone DNAT helper
    /// (client certificate required, CN `edge-tunnel:dnat-helper`).
    pub feed_listen: Option<SocketAddr>,
    /// Connections on `feed_listen` at once; more are closed at once.
    /// Default 64 (a helper per control-plane host polls every few seconds).
    pub feed_max_connections: usize,
    /// Of those, from one source (an address, an IPv6 /64). Default 4.
    pub feed_max_connections_per_source: usize,
    /// Id of this replica, sent to agents in `Welcome`: agents hold each id
    /// once. Default: the host name and a random suffix.
    pub server_id: String,
    /// On shutdown, how long open tunneled connections may take to finish:
    /// the server fails readiness, tells its agents it is draining (they
    /// hold another replica meanwhile), keeps serving, and closes when the
    /// last stream ends or this passes. 0: close at once.
    pub drain_grace: Duration,
    /// How many replicas exist, told to agents in `Welcome` so an agent
    /// given one address (a load balancer) keeps dialing it until it holds
    /// that many. 0: unknown (or taken from `peers_dns`).
    pub server_count: u16,
    /// A DNS name listing every replica (a headless Service): resolved
    /// every [`PEERS_DNS_INTERVAL`], the number of addresses is the
    /// replica count. Overrides `server_count` while it resolves.
    pub peers_dns: Option<String>,
    /// How long an agent may take from its finished handshake to `Hello`.
    /// Default 10 s.
    pub register_timeout: Duration,
    /// How long a QUIC or TLS-over-TCP handshake may take, from the
    /// peer's first packet to a verified client certificate. Until then the
    /// peer is unauthenticated, so this is how long a peer that never
    /// finishes holds a handshake slot. Default 5 s: several round trips
    /// and retransmissions on a lossy WAN link.
    pub handshake_timeout: Duration,
    /// Handshakes in flight per listener (QUIC, TLS over TCP): cap, Retry
    /// threshold, per source.
    pub handshake_limits: HandshakeLimits,
    /// How long the agent may take to connect to a target. Default 10 s;
    /// the server waits 2 s more for its answer.
    pub dial_timeout: Duration,
    /// Most client connections (CONNECT and transparent ingress together)
    /// open at once; more wait in the listen backlog. Each holds one file
    /// descriptor and up to two relay buffers. Default 8192; the binary
    /// sizes it from the open-files limit unless `--max-client-connections`
    /// is given.
    pub max_client_connections: usize,
    /// Tunneled connections open to one node at once through this server.
    /// Default 8192, the streams an agent accepts by default: past it a
    /// dial fails at once (CONNECT 503, transparent reset) instead of
    /// waiting for a stream the agent will not grant (504 after 12 s).
    pub max_streams_per_node: usize,
    /// Of those, how many only the transparent ingress may use (the
    /// apiserver's default route to kubelets). Default 256.
    pub transparent_stream_reserve: usize,
    /// Reset a tunneled connection whose client has not taken one relay
    /// chunk (up to 64 KiB) for this long: a client that stopped reading
    /// otherwise pins the stream's window and the agent's memory for good.
    /// Default 2 min; `None`: never.
    pub client_stall_timeout: Option<Duration>,
    /// The same, sooner, for a client that stopped reading when no stall
    /// credit is left for its stream (the receive budget, the agent
    /// connection's quarter of it or the client's part is spent): under
    /// overload the streams that do not read are shed, so they cannot
    /// take the window the reading ones need. Default 2 s; `None`: such
    /// streams share their connection's window until
    /// `client_stall_timeout`.
    pub stall_shed_timeout: Option<Duration>,
    /// Reset a tunneled connection on which nothing has moved either way
    /// for this long. Default `None` (never): `kubectl logs -f`, `exec`
    /// and `attach` are often quiet for hours, and TCP keep-alive already
    /// finds clients that vanished.
    pub relay_idle_timeout: Option<Duration>,
    /// Tunneled connections one client (an IPv4 address or an IPv6 /64)
    /// may have open at once through each ingress (counted apart):
    /// one client cannot take every client slot or node stream. Default
    /// 4096; past it the connection is refused at once (CONNECT 429,
    /// transparent reset).
    pub max_streams_per_client: usize,
    /// Every receive window of this server together (the data agents may
    /// send ahead of the clients reading it), and what the stalled streams
    /// of one client may be lent of it; see `transport::window`. Default
    /// 256 MiB and 32 MiB.
    pub receive_budget: BudgetLimits,
    /// What the relay buffers of all tunneled connections may grow into
    /// beyond their first 4 KiB per direction (`--relay-buffer-budget`).
    pub relay_buffer_budget: u64,
    /// Which addresses agents may register (and DNAT may redirect):
    /// never loopback (unless allowed), unspecified, link-local,
    /// multicast or this host's own; within `--agent-address-cidr` when
    /// given. Default: any other address.
    pub addresses: crate::addresses::AddressPolicy,
    pub quic: QuicSettings,
    /// Enrollment: the signing CA (`ca.crt`, `ca.key`) and the bootstrap
    /// tokens file (`tunnel-certs token create`), both or neither. With
    /// them, agents without a certificate may enroll on the agent port,
    /// and agents renew there.
    pub enroll_ca_dir: Option<PathBuf>,
    pub enroll_tokens_file: Option<PathBuf>,
    /// Where this server records token uses when the tokens file is
    /// read-only (a Secret). Default: in the tokens file.
    pub enroll_state_file: Option<PathBuf>,
    /// Validity of the certificates enrollment and renewal issue. Default
    /// 30 days, at most [`MAX_ENROLL_VALIDITY`].
    pub enroll_validity: Duration,
    /// Agent certificates refused by node name or serial (`node=NAME`,
    /// `serial=HEX` lines); reloaded with the certificates.
    pub deny_list: Option<PathBuf>,
    /// PEM CRLs from the agents' CAs (`tunnel-certs crl`): revoked
    /// certificates fail the handshake; reloaded with the certificates.
    pub crl: Option<PathBuf>,
    /// How often the certificate directory and the deny-list are checked
    /// for changes, and live agents for revoked or expired certificates.
    /// Default 10 s.
    pub reload_interval: Duration,
}

/// The longest validity enrollment and renewal may give a certificate.
pub const MAX_ENROLL_VALIDITY: Duration = Duration::from_secs(365 * 86_400);
/// The shortest (a renewal at two thirds of it must still be possible).
pub const MIN_ENROLL_VALIDITY: Duration = Duration::from_secs(10);

impl ServerSettings {
    /// Defaults for everything but the endpoint and certificates.
    pub fn new(listen: SocketAddr, cert_dir: PathBuf) -> Self {
        ServerSettings {
            listen,
            cert_dir,
            h2: true,
            h2_listen: None,
            connect_listen: None,
            connect_uds: None,
            connect_uds_mode: 0o600,
            connect_uds_group: None,
            connect_token_file: None,
            connect_tls_listen: None,
            connect_client_ca: None,
            direct_cidrs: Vec::new(),
            connect_allow_unauthenticated: false,
            transparent_listen: None,
            admin_listen: None,
            admin_max_connections: daemon::admin::DEFAULT_MAX_CONNECTIONS,
            feed_listen: None,
            feed_max_connections: 64,
            feed_max_connections_per_source: 4,
            server_id: default_server_id(),
            server_count: 0,
            peers_dns: None,
            drain_grace: Duration::from_secs(20),
            register_timeout: Duration::from_secs(10),
            handshake_timeout: Duration::from_secs(5),
            handshake_limits: HandshakeLimits::default(),
            dial_timeout: Duration::from_secs(10),
            max_client_connections: 8192,
            max_streams_per_node: 8192,
            client_stall_timeout: Some(Duration::from_secs(120)),
            stall_shed_timeout: Some(Duration::from_secs(2)),
            transparent_stream_reserve: 256,
            relay_idle_timeout: None,
            max_streams_per_client: 4096,
            receive_budget: BudgetLimits::SERVER,
            relay_buffer_budget: transport::relay::GROWTH_BUDGET as u64,
            addresses: crate::addresses::AddressPolicy::default(),
            quic: QuicSettings::default(),
            enroll_ca_dir: None,
            enroll_tokens_file: None,
            enroll_state_file: None,
            enroll_validity: Duration::from_secs(30 * 86_400),
            deny_list: None,
            crl: None,
            reload_interval: Duration::from_secs(10),
        }
    }
}

/// Why a configuration cannot work.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error(transparent)]
    Quic(#[from] QuicSettingsError),
    #[error(transparent)]
    HandshakeLimits(#[from] HandshakeLimitsError),
    #[error("the {0} must be above zero")]
    ZeroTimeout(&'static str),
    #[error(
        "the server id must be 1 to {max} bytes long (it is sent to every agent), not {len}",
        max = proto::MAX_NODE_NAME
    )]
    ServerId { len: usize },
    #[error("an HTTP/2 listen address ({0}) is set, but the HTTP/2 fallback is turned off")]
    H2ListenWithoutH2(SocketAddr),
    #[error("--max-client-connections must be at least 1")]
    NoClientConnections,
    #[error(
        "--transparent-stream-reserve ({reserve}) must be below --max-streams-per-node ({max})"
    )]
    StreamReserve { reserve: usize, max: usize },
    #[error(
        "the CONNECT listener on {0} would proxy anyone who reaches it: give \
         --connect-token-file, serve it on loopback, on --connect-uds or as --connect-tls-listen, or pass \
         --connect-allow-unauthenticated if something else keeps clients out"
    )]
    UnauthenticatedConnect(SocketAddr),
    #[error("--connect-tls-listen {0} needs --connect-client-ca: the CA its clients' certificates must chain to")]
    TlsListenWithoutCa(SocketAddr),
    #[error("--connect-client-ca is for the TLS CONNECT listener: give --connect-tls-listen too")]
    CaWithoutTlsListen,
    #[error("--connect-uds-mode {0:o} must be an octal file mode (at most 0777) that lets the owner read and write")]
    UdsMode(u32),
    #[error("--max-streams-per-client must be at least 1")]
    NoStreamsPerClient,
    #[error(
        "--receive-budget ({budget} bytes) must be at least {min} bytes (16 connections at the \
         64 KiB floor)"
    )]
    ReceiveBudget { budget: u64, min: u64 },
    #[error(
        "--stall-credit-per-client ({per_client} bytes) must not exceed --receive-budget \
         ({budget} bytes)"
    )]
    StallCreditPerClient { per_client: u64, budget: u64 },
    #[error("--feed-max-connections must be at least 1")]
    NoFeedConnections,
    #[error("--enroll-ca-dir and --enroll-tokens-file go together: give both or neither")]
    EnrollHalf,
    #[error("--enroll-validity must be between 10s and 365 days, not {0:?}")]
    EnrollValidity(Duration),
}

/// The smallest receive budget: 16 connections at the floor.
pub const MIN_RECEIVE_BUDGET: u64 = 16 * FLOOR;

/// Checked server settings; read them through `Deref`. No `DerefMut`: a
/// checked configuration cannot be changed into an unchecked one.
#[derive(Clone, Debug)]
pub struct ServerConfig(ServerSettings);

impl ServerConfig {
    /// Checks `settings`; the only way to make a `ServerConfig`.
    pub fn try_new(settings: ServerSettings) -> Result<Self, ConfigError> {
        settings.quic.validate()?;
        if settings.register_timeout.is_zero() {
            return Err(ConfigError::ZeroTimeout("register timeout"));
        }
        if settings.dial_timeout.is_zero() {
            return Err(ConfigError::ZeroTimeout("dial timeout"));
        }
        if settings.handshake_timeout.is_zero() {
            return Err(ConfigError::ZeroTimeout("handshake timeout"));
        }
        settings.handshake_limits.validate()?;
        let len = settings.server_id.len();
        if len == 0 || len > proto::MAX_NODE_NAME {
            return Err(ConfigError::ServerId { len });
        }
        if let (false, Some(addr)) = (settings.h2, settings.h2_listen) {
            return Err(ConfigError::H2ListenWithoutH2(addr));
        }
        if settings.max_client_connections == 0 {
            return Err(ConfigError::NoClientConnections);
        }
        if settings.feed_max_connections == 0 {
            return Err(ConfigError::NoFeedConnections);
        }
        if settings.transparent_stream_reserve >= settings.max_streams_per_node {
            return Err(ConfigError::StreamReserve {
                reserve: settings.transparent_stream_reserve,
                max: settings.max_streams_per_node,
            });
        }
        if let Some(addr) = settings.connect_listen {
            if !addr.ip().is_loopback()
                && settings.connect_token_file.is_none()
                && !settings.connect_allow_unauthenticated
            {
                return Err(ConfigError::UnauthenticatedConnect(addr));
            }
        }
        match (settings.connect_tls_listen, &settings.connect_client_ca) {
            (Some(addr), None) => return Err(ConfigError::TlsListenWithoutCa(addr)),
            (None, Some(_)) => return Err(ConfigError::CaWithoutTlsListen),
            _ => {}
        }
        if settings.connect_uds_mode > 0o777 || settings.connect_uds_mode & 0o600 != 0o600 {
            return Err(ConfigError::UdsMode(settings.connect_uds_mode));
        }
        if settings.enroll_ca_dir.is_some() != settings.enroll_tokens_file.is_some() {
            return Err(ConfigError::EnrollHalf);
        }
        if !(MIN_ENROLL_VALIDITY..=MAX_ENROLL_VALIDITY).contains(&settings.enroll_validity) {
            return Err(ConfigError::EnrollValidity(settings.enroll_validity));
        }
        if settings.reload_interval.is_zero() {
            return Err(ConfigError::ZeroTimeout("reload interval"));
        }
        if settings.max_streams_per_client == 0 {
            return Err(ConfigError::NoStreamsPerClient);
        }
        let budget = settings.receive_budget;
        if budget.total < MIN_RECEIVE_BUDGET {
            return Err(ConfigError::ReceiveBudget {
                budget: budget.total,
                min: MIN_RECEIVE_BUDGET,
            });
        }
        if budget.per_client > budget.total {
            return Err(ConfigError::StallCreditPerClient {
                per_client: budget.per_client,
                budget: budget.total,
            });
        }
        Ok(ServerConfig(settings))
    }
}

impl Deref for ServerConfig {
    type Target = ServerSettings;

    fn deref(&self) -> &ServerSettings {
        &self.0
    }
}

/// How often `peers_dns` is resolved.
pub const PEERS_DNS_INTERVAL: Duration = Duration::from_secs(10);

/// The host name (the pod name under Kubernetes), else "tunnel-server",
/// with a random suffix: unique per process, so two replicas on one host
/// (hostNetwork pods on one node, a test) are never taken for one by the
/// agents, which hold each server id once.
pub fn default_server_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "tunnel-server".to_owned());
    // Room for the suffix within the id's limit.
    let host: String = host.chars().take(proto::MAX_NODE_NAME - 9).collect();
    format!("{host}-{:08x}", fastrand::u32(..))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> ServerSettings {
        ServerSettings::new("127.0.0.1:0".parse().unwrap(), "/nonexistent".into())
    }

    #[test]
    fn defaults_are_valid() {
        ServerConfig::try_new(settings()).unwrap();
    }

    #[test]
    fn an_open_connect_listener_needs_loopback_or_a_credential() {
        let open = |tune: &dyn Fn(&mut ServerSettings)| {
            let mut s = settings();
            s.connect_listen = Some("0.0.0.0:8080".parse().unwrap());
            tune(&mut s);
            ServerConfig::try_new(s)
        };
        let e = open(&|_| {}).unwrap_err();
        assert!(matches!(e, ConfigError::UnauthenticatedConnect(_)), "{e}");
        assert!(e.to_string().contains("--connect-tls-listen"), "{e}");
        open(&|s| s.connect_token_file = Some("/tokens".into())).unwrap();
        open(&|s| s.connect_allow_unauthenticated = true).unwrap();
        open(&|s| s.connect_listen = Some("127.0.0.1:8080".parse().unwrap())).unwrap();
        open(&|s| s.connect_listen = Some("[::1]:8080".parse().unwrap())).unwrap();
        // The TLS listener and its CA come together.
        let tls = |s: &mut ServerSettings| {
            s.connect_listen = None;
            s.connect_tls_listen = Some("0.0.0.0:8090".parse().unwrap());
        };
        assert!(matches!(
            open(&tls),
            Err(ConfigError::TlsListenWithoutCa(_))
        ));
        open(&|s| {
            tls(s);
            s.connect_client_ca = Some("/ca.crt".into());
        })
        .unwrap();
        assert_eq!(
            open(&|s| {
                s.connect_listen = None;
                s.connect_client_ca = Some("/ca.crt".into());
            })
            .unwrap_err(),
            ConfigError::CaWithoutTlsListen
        );
        assert_eq!(
            open(&|s| {
                s.connect_listen = None;
                s.connect_uds_mode = 0o400;
            })
            .unwrap_err(),
            ConfigError::UdsMode(0o400)
        );
    }

    #[test]
    fn keepalive_not_below_idle_timeout_is_refused() {
        let mut s = settings();
        s.quic.keepalive = Duration::from_secs(30);
        let e = ServerConfig::try_new(s).unwrap_err();
        assert!(matches!(
            e,
            ConfigError::Quic(QuicSettingsError::IdleNotAboveKeepalive { .. })
        ));
        assert!(e.to_string().contains("must be longer than the keep-alive"));
    }

    #[test]
    fn the_receive_budget_is_checked() {
        let mut s = settings();
        s.receive_budget.total = MIN_RECEIVE_BUDGET - 1;
        assert!(matches!(
            ServerConfig::try_new(s.clone()).unwrap_err(),
            ConfigError::ReceiveBudget { .. }
        ));
        s.receive_budget.total = 16 << 20;
        s.receive_budget.per_client = 32 << 20;
        let e = ServerConfig::try_new(s).unwrap_err();
        assert!(
            e.to_string().contains("must not exceed --receive-budget"),
            "{e}"
        );
    }

    #[test]
    fn each_rule_names_what_to_fix() {
        let mut s = settings();
        s.dial_timeout = Duration::ZERO;
        assert_eq!(
            ServerConfig::try_new(s).unwrap_err().to_string(),
            "the dial timeout must be above zero"
        );
        let mut s = settings();
        s.register_timeout = Duration::ZERO;
        assert_eq!(
            ServerConfig::try_new(s).unwrap_err(),
            ConfigError::ZeroTimeout("register timeout")
        );
        let mut s = settings();
        s.server_id = "x".repeat(proto::MAX_NODE_NAME + 1);
        assert_eq!(
            ServerConfig::try_new(s).unwrap_err(),
            ConfigError::ServerId { len: 254 }
        );
        let mut s = settings();
        s.handshake_timeout = Duration::ZERO;
        assert_eq!(
            ServerConfig::try_new(s).unwrap_err(),
            ConfigError::ZeroTimeout("handshake timeout")
        );
        let mut s = settings();
        s.handshake_limits.retry_above = s.handshake_limits.max_in_flight + 1;
        assert!(matches!(
            ServerConfig::try_new(s).unwrap_err(),
            ConfigError::HandshakeLimits(HandshakeLimitsError::RetryAboveCap { .. })
        ));
        let mut s = settings();
        s.h2 = false;
        s.h2_listen = Some("127.0.0.1:8443".parse().unwrap());
        assert!(ServerConfig::try_new(s)
            .unwrap_err()
            .to_string()
            .contains("HTTP/2 fallback is turned off"));
    }
}
