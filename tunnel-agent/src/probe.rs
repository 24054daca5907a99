//! A one-shot registration: checks that a configuration would be accepted
//! by the first server address, and says why not. Used by tests and for
//! troubleshooting; the running agent never calls it.

use std::sync::Arc;
use std::time::Duration;

use proto::codes::close;

use crate::config::{AgentConfig, Credentials, TransportChoice};
use crate::error::{AgentError, ConnectError};
use crate::register::Registration;
use crate::resolve::resolve_all;
use crate::selector::Transport;
use crate::supervisor::bind_endpoint;
use crate::telemetry::AgentMetrics;

/// Connects, registers and disconnects over the configured transport
/// (QUIC for `auto`), with the credentials in `--cert-dir`.
pub async fn probe(config: &AgentConfig) -> Result<proto::Welcome, AgentError> {
    probe_with(config, config.credentials()?).await
}

/// [`probe`] presenting `credentials` (which a test may have altered, to
/// see what the server makes of a `Hello` that lies).
pub async fn probe_with(
    config: &AgentConfig,
    credentials: Credentials,
) -> Result<proto::Welcome, AgentError> {
    let endpoint = bind_endpoint(config)?;
    let (targets, errors) = resolve_all(config).await;
    let Some(target) = targets.into_iter().next() else {
        let why = errors
            .iter()
            .map(|e| e.to_string())
            .collect::<Vec<_>>()
            .join("; ");
        return Err(AgentError::Resolve(why));
    };
    let transport = match config.transport {
        TransportChoice::H2 => Transport::H2,
        TransportChoice::Auto | TransportChoice::Quic => Transport::Quic,
    };
    let metrics = Arc::new(AgentMetrics::default());
    let registration = Registration {
        config,
        credentials,
        metrics: &metrics,
        target: &target,
        handover: false,
        instance: fastrand::u64(1..),
        previous: String::new(),
    };
    let attempt = async {
        match transport {
            Transport::Quic => registration.quic(&endpoint).await,
            Transport::H2 => registration.h2().await,
        }
    };
    let bound = config.connect_timeout;
    let conn = match tokio::time::timeout(bound, attempt).await {
        Ok(r) => r?,
        Err(_) => return Err(ConnectError::timeout(transport, target.addr, bound).into()),
    };
    let welcome = conn.welcome.clone();
    conn.close(close::NORMAL, "probe done").await;
    let _ = tokio::time::timeout(Duration::from_secs(1), endpoint.wait_idle()).await;
    Ok(welcome)
}
