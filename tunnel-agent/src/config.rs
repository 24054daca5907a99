//! Agent configuration, checked when built ([`AgentConfig::try_new`]), and
//! the credentials loaded from `--cert-dir` at every connection attempt
//! ([`Credentials`]).

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use certs::{CertDir, Identity};
use transport::quic::QuicSettings;

use crate::allow::{AllowList, AllowParseError};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(transparent)]
    Certs(#[from] certs::CertError),
    #[error("tls.crt: {0}")]
    Identity(#[from] certs::IdentityError),
    #[error("--node-name: {0}")]
    NodeName(certs::IdentityError),
    #[error("--node-name {flag:?} does not match the certificate's common name {cert:?}; refusing to start (the certificate is the identity)")]
    NodeMismatch { flag: String, cert: String },
    #[error(transparent)]
    Allow(#[from] AllowParseError),
    #[error("--server {0:?} must be HOST:PORT (or a comma-separated list of them)")]
    Server(String),
    #[error(transparent)]
    Tls(#[from] certs::tls::TlsConfigError),
    #[error(transparent)]
    Quic(#[from] transport::quic::QuicSettingsError),
    #[error("{name} must be longer than zero")]
    ZeroDuration { name: &'static str },
    #[error("{0}")]
    Recover(String),
}

/// Default [`AgentConfig::result_hold`]: long enough for a local target's
/// first answer (a TLS ServerHello, an HTTP response), short against any
/// tunnel round trip.
pub const RESULT_HOLD: Duration = Duration::from_millis(2);

#[derive(Clone, Debug)]
pub struct AgentConfig {
    /// The servers: each `HOST:PORT` is resolved periodically, and the
    /// agent holds one connection to every address found (every replica).
    pub servers: Vec<ServerSpec>,
    /// Name to verify server certificates against (default: each HOST).
    pub server_name: Option<String>,
    /// How often the server names are resolved again (and after any
    /// connection loss). Default 30 s.
    pub resolve_interval: Duration,
    /// The most server connections the agent holds when the servers say
    /// more replicas exist than `--server` resolves to addresses (a load
    /// balancer in front of them). Default 16.
    pub max_replicas: u16,
    pub cert_dir: PathBuf,
    pub node: String,
    /// `--allow` entries; `None`: the certificate's addresses on the
    /// kubelet ports, taken from the certificate loaded for each
    /// connection (so a renewed certificate with new addresses applies).
    pub allow: Option<AllowList>,
    /// Longest local connect the agent attempts. Default 10 s; the server's
    /// deadline applies when shorter.
    pub dial_timeout: Duration,
    /// How long the `ok` of a dial the server does not wait on may wait
    /// for the target's first bytes, to travel with them in one packet.
    /// Default 2 ms; zero sends it at once.
    pub result_hold: Duration,
    /// Bound on TLS handshake plus registration. Default 10 s.
    pub connect_timeout: Duration,
    /// On shutdown, how long active streams may run on. Default 30 s.
    pub drain_grace: Duration,
    pub quic: QuicSettings,
    pub transport: TransportChoice,
    /// Admin endpoint (`/healthz`, `/readyz`, `/metrics`, `/v1/replicas`). Default off.
    pub admin_listen: Option<std::net::SocketAddr>,
    /// Connections the admin listener serves at once. Default 64.
    pub admin_max_connections: u16,
    /// In `auto`, how long a QUIC handshake + registration may take before
    /// falling back to HTTP/2. Default 5 s.
    pub quic_timeout: Duration,
    /// In `auto`, the longest wait between QUIC re-probes while on HTTP/2;
    /// the first comes after [`REPROBE_FIRST`] and the waits double up to
    /// this. Default 5 min.
    pub reprobe_interval: Duration,
    /// Every receive window of this agent's connections together, with
    /// the credit lent to stalled streams (runtime state shared by all its
    /// connections; see `transport::window`). Default 64 MiB.
    pub receive_budget: Arc<transport::window::ReceiveBudget>,
    /// What the relay buffers of all this agent's streams may grow into
    /// (runtime state shared by all its connections).
    pub relay_buffers: Arc<transport::BufferBudget>,
    /// Every open stream, for the admin port's `/v1/streams` (runtime
    /// state shared by all its connections).
    pub open_streams: Arc<crate::dial::OpenStreams>,
    /// Renew the certificate at two thirds of its lifetime over a
    /// connection it authenticates (servers with `--enroll-ca-dir`).
    /// Default on.
    pub renew: bool,
    /// Enroll with a bootstrap token when `--cert-dir` holds no usable
    /// certificate (at start, and once it has expired).
    pub bootstrap: Option<crate::enroll::Bootstrap>,
    /// Bumped each time enrollment or renewal writes a new certificate:
    /// the replica loops move their connections to it (handover).
    pub renewed: Arc<tokio::sync::watch::Sender<u64>>,
    /// A file whose lock this process holds while it runs; finding it held
    /// makes this process a successor (see [`crate::instance_lock`]).
    /// Default off.
    pub instance_lock: Option<PathBuf>,
    /// Whether another agent process holds `instance_lock` now (runtime
    /// state shared by all its connections).
    pub predecessor: crate::instance_lock::Predecessor,
    /// Where to write the agent's status for exec probes
    /// ([`crate::status`]). Default off.
    pub status_file: Option<PathBuf>,
}

/// Held to read `--cert-dir`, and exclusively to replace its files (an
/// enrollment or renewal), so a connection attempt never loads a new
/// certificate with the old key.
pub(crate) static CERT_FILES: std::sync::RwLock<()> = std::sync::RwLock::new(());

/// In `auto`, the first QUIC re-probe after a fall back to HTTP/2 (at most
/// `reprobe_interval`).
pub const REPROBE_FIRST: Duration = Duration::from_secs(5);

/// What one connection attempt presents, loaded from `--cert-dir` for each
/// attempt: a rotated certificate changes the TLS identity, the `Hello`
/// addresses and the default allow-list together.
#[derive(Debug)]
pub struct Credentials {
    /// The node name sent in `Hello` (the certificate's CN).
    pub node: String,
    /// The addresses sent in `Hello` (the certificate's IP SANs).
    pub addresses: Vec<IpAddr>,
    /// Targets this connection's streams may dial.
    pub allow: AllowList,
    /// The certificate's validity and purposes.
    pub identity: Identity,
    dir: CertDir,
}

impl Credentials {
    /// The TLS client configuration for `alpn` (QUIC or HTTP/2).
    pub fn tls(&self, alpn: &[u8]) -> Result<rustls::ClientConfig, ConfigError> {
        Ok(certs::tls::client_config(&self.dir, alpn)?)
    }
}

/// Which transport the agent uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum TransportChoice {
    /// QUIC first; HTTP/2 over TLS when QUIC does not get through, with
    /// periodic re-probes of QUIC.
    Auto,
    Quic,
    H2,
}

/// One `--server` entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerSpec {
    /// `HOST:PORT`, as given.
    pub spec: String,
    /// HOST without brackets: the default TLS server name.
    pub host: String,
}

impl ServerSpec {
    pub fn parse(spec: &str) -> Result<ServerSpec, ConfigError> {
        let bad = || ConfigError::Server(spec.to_owned());
        let (host, port) = spec.rsplit_once(':').ok_or_else(bad)?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() || port.parse::<u16>().map_or(true, |p| p == 0) {
            return Err(bad());
        }
        Ok(ServerSpec {
            spec: spec.to_owned(),
            host: host.to_owned(),
        })
    }
}

impl AgentConfig {
    /// `server` is `HOST:PORT` or a comma-separated list of them.
    /// Loads the certificate, checks `node` against its CN and builds the
    /// allow-list (`allow` entries, or the default for the certificate's
    /// addresses when empty).
    pub fn try_new(
        server: &str,
        cert_dir: &Path,
        node: &str,
        allow: &[String],
    ) -> Result<AgentConfig, ConfigError> {
        let config = AgentConfig::without_certificate(server, cert_dir, node, allow)?;
        // A renewal a crash interrupted is finished or undone first, with
        // or without a bootstrap token: otherwise the new key would meet
        // the old certificate at every start.
        crate::enroll::recover(cert_dir).map_err(ConfigError::Recover)?;
        // Fail at start, not at the first connect, on unusable certificates.
        config.credentials()?.tls(proto::ALPN)?;
        Ok(config)
    }

    /// [`AgentConfig::try_new`] without loading the certificate: for an
    /// agent that enrolls first (`--bootstrap-token`).
    pub fn without_certificate(
        server: &str,
        cert_dir: &Path,
        node: &str,
        allow: &[String],
    ) -> Result<AgentConfig, ConfigError> {
        certs::identity::validate_node_name(node).map_err(ConfigError::NodeName)?;
        let servers = server
            .split(',')
            .map(|s| ServerSpec::parse(s.trim()))
            .collect::<Result<Vec<_>, _>>()?;
        let allow = if allow.is_empty() {
            None
        } else {
            let mut list = AllowList::default();
            for entry in allow {
                list.add_entry(entry)?;
            }
            Some(list)
        };
        let config = AgentConfig {
            servers,
            server_name: None,
            resolve_interval: Duration::from_secs(30),
            max_replicas: 16,
            cert_dir: cert_dir.to_owned(),
            node: node.to_owned(),
            allow,
            dial_timeout: Duration::from_secs(10),
            result_hold: RESULT_HOLD,
            connect_timeout: Duration::from_secs(10),
            drain_grace: Duration::from_secs(30),
            quic: QuicSettings::default(),
            transport: TransportChoice::Auto,
            admin_listen: None,
            admin_max_connections: daemon::admin::DEFAULT_MAX_CONNECTIONS,
            quic_timeout: Duration::from_secs(5),
            reprobe_interval: Duration::from_secs(300),
            receive_budget: transport::window::ReceiveBudget::new(
                transport::window::BudgetLimits::AGENT,
            ),
            relay_buffers: Arc::default(),
            open_streams: Arc::default(),
            renew: true,
            bootstrap: None,
            renewed: Arc::new(tokio::sync::watch::Sender::new(0)),
            instance_lock: None,
            predecessor: Default::default(),
            status_file: None,
        };
        config.validate()?;
        Ok(config)
    }

    /// Checks the settings that can be wrong together or silently: the
    /// QUIC keep-alive against the idle timeout, and bounds that must not
    /// be zero. [`crate::run`] refuses a configuration that fails this, so
    /// a caller that changed fields after [`AgentConfig::try_new`] cannot
    /// start with an unchecked one.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.quic.validate()?;
        for (name, d) in [
            ("--resolve-interval", self.resolve_interval),
            ("--dial-timeout", self.dial_timeout),
            ("--connect-timeout", self.connect_timeout),
            ("--quic-timeout", self.quic_timeout),
            ("--reprobe-interval", self.reprobe_interval),
        ] {
            if d.is_zero() {
                return Err(ConfigError::ZeroDuration { name });
            }
        }
        Ok(())
    }

    /// Loads the certificate files (at every connection attempt, so rotated
    /// certificates are picked up at the next reconnect) and checks that
    /// the certificate still names this node.
    pub fn credentials(&self) -> Result<Credentials, ConfigError> {
        let dir = {
            // Not halfway through a renewal's writes.
            let _files = CERT_FILES.read().unwrap_or_else(|e| e.into_inner());
            CertDir::load(&self.cert_dir)?
        };
        let identity = Identity::from_der(dir.leaf())?;
        if identity.common_name != self.node {
            return Err(ConfigError::NodeMismatch {
                flag: self.node.clone(),
                cert: identity.common_name,
            });
        }
        let allow = match &self.allow {
            Some(list) => list.clone(),
            None => AllowList::default_for(&identity.addresses),
        };
        Ok(Credentials {
            node: identity.common_name.clone(),
            addresses: identity.addresses.clone(),
            allow,
            identity,
            dir,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keepalive_must_be_shorter_than_idle_and_bounds_not_zero() {
        let dir = tempfile::tempdir().unwrap();
        let ca = certs::issue::Ca::generate("test CA", 1).unwrap();
        let leaf = ca
            .issue_agent("edge-1", &["127.0.0.1".parse().unwrap()], 1)
            .unwrap();
        certs::files::write_leaf_dir(dir.path(), &leaf, &ca.pem().cert, true).unwrap();
        let mut c = AgentConfig::try_new("127.0.0.1:8443", dir.path(), "edge-1", &[]).unwrap();
        c.validate().unwrap();
        c.quic.idle_timeout = c.quic.keepalive;
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("keep"), "{err}");
        c.quic.idle_timeout = Duration::from_secs(30);
        c.connect_timeout = Duration::ZERO;
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("--connect-timeout"), "{err}");
    }

    #[test]
    fn server_specs() {
        let s = ServerSpec::parse("tunnel.example.com:8443").unwrap();
        assert_eq!(s.host, "tunnel.example.com");
        assert_eq!(ServerSpec::parse("[fd00::1]:8443").unwrap().host, "fd00::1");
        for bad in ["tunnel", ":8443", "tunnel:0", "tunnel:http"] {
            assert!(ServerSpec::parse(bad).is_err(), "{bad}");
        }
    }
}
