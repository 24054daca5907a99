//! How many replicas exist, for `Welcome` (`--peers-dns`): a headless
//! Service lists one address per ready replica, so the number of distinct
//! addresses its name resolves to is the count agents should hold. A name
//! that fails to resolve, or resolves to nothing, leaves the last count
//! (`--server-count` until the first success): an agent that already
//! holds every replica is not told to drop any because DNS hiccuped. A
//! changed count goes to the connected agents at once (`Replicas`), so
//! those behind a load balancer follow a scale-up or scale-down without
//! reconnecting.

use std::collections::HashSet;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use crate::config::PEERS_DNS_INTERVAL;
use crate::Shared;

/// Bound on one resolution.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(5);

/// Resolves `name` every [`PEERS_DNS_INTERVAL`] and publishes the count.
pub async fn follow(name: String, shared: Arc<Shared>) {
    let mut last_error: Option<String> = None;
    loop {
        match resolve(&name).await {
            Ok(count) if count > 0 => {
                let count = u16::try_from(count).unwrap_or(u16::MAX);
                let before = *shared.replicas_expected.borrow();
                if before != count {
                    tracing::info!(peers_dns = %name, replicas = count, before, "replica count changed; telling the agents");
                    shared.replicas_expected.send_replace(count);
                }
                last_error = None;
            }
            Ok(_) => note(&name, &mut last_error, "it resolves to no address".into()),
            Err(e) => note(&name, &mut last_error, e),
        }
        tokio::time::sleep(PEERS_DNS_INTERVAL).await;
    }
}

/// Logs a failure once until it changes or resolution works again.
fn note(name: &str, last: &mut Option<String>, error: String) {
    if last.as_deref() != Some(error.as_str()) {
        tracing::warn!(peers_dns = %name, "cannot count the replicas: {error}; keeping the last count");
        *last = Some(error);
    }
}

/// How many distinct addresses `name` resolves to.
pub async fn resolve(name: &str) -> Result<usize, String> {
    let lookup = tokio::net::lookup_host((name, 0));
    let addrs = match tokio::time::timeout(RESOLVE_TIMEOUT, lookup).await {
        Ok(Ok(addrs)) => addrs,
        Ok(Err(e)) => return Err(e.to_string()),
        Err(_) => return Err(format!("no answer within {RESOLVE_TIMEOUT:?}")),
    };
    let distinct: HashSet<IpAddr> = addrs.map(|a| a.ip()).collect();
    Ok(distinct.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn counts_distinct_addresses() {
        // "localhost" is 127.0.0.1 and maybe ::1; both count once.
        let n = resolve("localhost").await.unwrap();
        assert!((1..=2).contains(&n), "{n}");
        assert!(resolve("no-such-name.invalid").await.is_err());
    }
}
