//! Server configuration, validated when built.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use transport::quic::QuicSettings;

#[derive(Clone, Debug)]
pub struct ServerConfig {
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
    pub transparent_listen: Option<SocketAddr>,
    pub admin_listen: Option<SocketAddr>,
    /// Stable id of this replica, sent to agents in `Welcome`.
    pub server_id: String,
    /// How long an agent may take from QUIC handshake to `Hello`. Default 10 s.
    pub register_timeout: Duration,
    /// How long the agent may take to connect to a target. Default 10 s.
    pub dial_timeout: Duration,
    pub quic: QuicSettings,
}

impl ServerConfig {
    /// A configuration with defaults for everything but the endpoint and certificates.
    pub fn new(listen: SocketAddr, cert_dir: PathBuf) -> Self {
        ServerConfig {
            listen,
            cert_dir,
            h2: true,
            h2_listen: None,
            connect_listen: None,
            transparent_listen: None,
            admin_listen: None,
            server_id: default_server_id(),
            register_timeout: Duration::from_secs(10),
            dial_timeout: Duration::from_secs(10),
            quic: QuicSettings::default(),
        }
    }
}

/// The host name (the pod name under Kubernetes), else "tunnel-server".
pub fn default_server_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "tunnel-server".to_owned())
}
