//! Agent configuration, validated when built.

use std::path::{Path, PathBuf};
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
    #[error("--node-name {flag:?} does not match the certificate's common name {cert:?}; refusing to start (the certificate is the identity)")]
    NodeMismatch { flag: String, cert: String },
    #[error(transparent)]
    Allow(#[from] AllowParseError),
    #[error("--server {0:?} must be HOST:PORT")]
    Server(String),
    #[error(transparent)]
    Tls(#[from] certs::tls::TlsConfigError),
}

#[derive(Clone, Debug)]
pub struct AgentConfig {
    /// `HOST:PORT` of the server (resolved at every connect).
    pub server: String,
    /// Name to verify the server certificate against (default: HOST).
    pub server_name: String,
    pub cert_dir: PathBuf,
    pub node: String,
    pub identity: Identity,
    pub allow: AllowList,
    /// Longest local connect the agent attempts. Default 10 s; the server's
    /// deadline applies when shorter.
    pub dial_timeout: Duration,
    /// Bound on TLS handshake plus registration. Default 10 s.
    pub connect_timeout: Duration,
    /// On shutdown, how long active streams may run on. Default 30 s.
    pub drain_grace: Duration,
    pub quic: QuicSettings,
}

impl AgentConfig {
    /// Loads the certificate, checks `node` against its CN and builds the
    /// allow-list (`allow` entries, or the default for the certificate's
    /// addresses when empty).
    pub fn try_new(
        server: &str,
        cert_dir: &Path,
        node: &str,
        allow: &[String],
    ) -> Result<AgentConfig, ConfigError> {
        let (host, port) = server
            .rsplit_once(':')
            .ok_or_else(|| ConfigError::Server(server.to_owned()))?;
        if host.is_empty() || port.parse::<u16>().is_err() {
            return Err(ConfigError::Server(server.to_owned()));
        }
        let dir = CertDir::load(cert_dir)?;
        let identity = Identity::from_der(dir.leaf())?;
        if identity.common_name != node {
            return Err(ConfigError::NodeMismatch {
                flag: node.to_owned(),
                cert: identity.common_name,
            });
        }
        let allow = if allow.is_empty() {
            AllowList::default_for(&identity.addresses)
        } else {
            let mut list = AllowList::default();
            for entry in allow {
                list.add_entry(entry)?;
            }
            list
        };
        Ok(AgentConfig {
            server: server.to_owned(),
            server_name: host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_owned(),
            cert_dir: cert_dir.to_owned(),
            node: node.to_owned(),
            identity,
            allow,
            dial_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(10),
            drain_grace: Duration::from_secs(30),
            quic: QuicSettings::default(),
        })
    }

    /// The TLS client configuration (reloaded from disk at every connect,
    /// so rotated certificates are picked up on the next reconnect).
    pub fn tls(&self) -> Result<rustls::ClientConfig, ConfigError> {
        let dir = CertDir::load(&self.cert_dir)?;
        Ok(certs::tls::client_config(&dir, proto::ALPN)?)
    }
}
