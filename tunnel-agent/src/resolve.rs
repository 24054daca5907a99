//! Turning `--server` entries into the addresses to hold a connection to.

use std::net::SocketAddr;
use std::time::Duration;

use crate::config::AgentConfig;

/// Bound on one DNS lookup.
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(5);

/// One address to connect to, and the name its certificate must carry.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Target {
    pub addr: SocketAddr,
    pub server_name: String,
}

/// A `--server` entry that did not resolve.
#[derive(Debug, thiserror::Error)]
#[error("cannot resolve server {server}: {reason}")]
pub struct ResolveError {
    pub server: String,
    pub reason: String,
}

/// Resolves every `--server` entry; an entry that fails is reported, the
/// others still count.
pub async fn resolve_all(config: &AgentConfig) -> (Vec<Target>, Vec<ResolveError>) {
    let mut targets = Vec::new();
    let mut errors = Vec::new();
    for spec in &config.servers {
        let err = |reason: String| ResolveError {
            server: spec.spec.clone(),
            reason,
        };
        let name = config
            .server_name
            .clone()
            .unwrap_or_else(|| spec.host.clone());
        match tokio::time::timeout(LOOKUP_TIMEOUT, tokio::net::lookup_host(&spec.spec)).await {
            Ok(Ok(addrs)) => {
                let before = targets.len();
                for addr in addrs {
                    let t = Target {
                        addr,
                        server_name: name.clone(),
                    };
                    if !targets.contains(&t) {
                        targets.push(t);
                    }
                }
                if targets.len() == before {
                    errors.push(err("no addresses".into()));
                }
            }
            Ok(Err(e)) => errors.push(err(e.to_string())),
            Err(_) => errors.push(err(format!(
                "DNS lookup took longer than {LOOKUP_TIMEOUT:?}"
            ))),
        }
    }
    (targets, errors)
}
