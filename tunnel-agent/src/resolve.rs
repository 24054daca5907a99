//! Turning `--server` entries into the addresses to hold a connection to.

use std::collections::HashMap;
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
#[error("cannot resolve server {server}: {reason}{}", keeping(*kept))]
pub struct ResolveError {
    pub server: String,
    pub reason: String,
    /// How many addresses of its last lookup stand in for it.
    pub kept: usize,
}

fn keeping(kept: usize) -> String {
    match kept {
        0 => String::new(),
        1 => "; keeping its last address".into(),
        n => format!("; keeping its last {n} addresses"),
    }
}

/// Resolves every `--server` entry; an entry that fails is reported, the
/// others still count.
pub async fn resolve_all(config: &AgentConfig) -> (Vec<Target>, Vec<ResolveError>) {
    merge(lookup_all(config).await, None)
}

/// [`resolve_all`] for the agent's lifetime: an entry that fails to
/// resolve this time (a DNS timeout, a resolver restarting) keeps the
/// addresses it resolved to last, so the connections to them are not
/// drained over one failed lookup; it is still reported.
#[derive(Default)]
pub struct Resolver {
    last: HashMap<String, Vec<Target>>,
}

impl Resolver {
    pub async fn resolve(&mut self, config: &AgentConfig) -> (Vec<Target>, Vec<ResolveError>) {
        merge(lookup_all(config).await, Some(&mut self.last))
    }
}

/// Each entry's lookup, in `--server` order.
async fn lookup_all(config: &AgentConfig) -> Vec<(String, Result<Vec<Target>, String>)> {
    let mut results = Vec::new();
    for spec in &config.servers {
        let name = config
            .server_name
            .clone()
            .unwrap_or_else(|| spec.host.clone());
        let result =
            match tokio::time::timeout(LOOKUP_TIMEOUT, tokio::net::lookup_host(&spec.spec)).await {
                Ok(Ok(addrs)) => Ok(addrs
                    .map(|addr| Target {
                        addr,
                        server_name: name.clone(),
                    })
                    .collect()),
                Ok(Err(e)) => Err(e.to_string()),
                Err(_) => Err(format!("DNS lookup took longer than {LOOKUP_TIMEOUT:?}")),
            };
        results.push((spec.spec.clone(), result));
    }
    results
}

/// The targets of every entry (each once), and the entries that failed;
/// with `last`, a failed entry's previous addresses stand in for it and
/// a resolved one's are remembered.
fn merge(
    results: Vec<(String, Result<Vec<Target>, String>)>,
    mut last: Option<&mut HashMap<String, Vec<Target>>>,
) -> (Vec<Target>, Vec<ResolveError>) {
    let mut targets: Vec<Target> = Vec::new();
    let mut errors = Vec::new();
    fn add(targets: &mut Vec<Target>, list: &[Target]) {
        for t in list {
            if !targets.contains(t) {
                targets.push(t.clone());
            }
        }
    }
    for (server, result) in results {
        let reason = match result {
            Ok(list) if !list.is_empty() => {
                add(&mut targets, &list);
                if let Some(last) = last.as_deref_mut() {
                    last.insert(server, list);
                }
                continue;
            }
            Ok(_) => "no addresses".to_owned(),
            Err(reason) => reason,
        };
        let kept = match last.as_deref().and_then(|l| l.get(&server)) {
            Some(prev) => {
                add(&mut targets, prev);
                prev.len()
            }
            None => 0,
        };
        errors.push(ResolveError {
            server,
            reason,
            kept,
        });
    }
    (targets, errors)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(last: u8) -> Target {
        Target {
            addr: SocketAddr::from(([198, 18, 0, last], 8443)),
            server_name: "tunnel".into(),
        }
    }

    #[test]
    fn a_failed_lookup_keeps_the_entrys_last_addresses() {
        let mut last = HashMap::new();
        let ok = |l: Vec<Target>| Ok::<_, String>(l);
        let (targets, errors) = merge(
            vec![
                ("a:8443".into(), ok(vec![t(1), t(2)])),
                ("b:8443".into(), ok(vec![t(3)])),
            ],
            Some(&mut last),
        );
        assert_eq!(targets, vec![t(1), t(2), t(3)]);
        assert!(errors.is_empty());
        // a's lookup times out: its connections stay wanted, and it is reported.
        let (targets, errors) = merge(
            vec![
                (
                    "a:8443".into(),
                    Err("DNS lookup took longer than 5s".into()),
                ),
                ("b:8443".into(), ok(vec![t(3)])),
            ],
            Some(&mut last),
        );
        assert_eq!(targets, vec![t(1), t(2), t(3)]);
        assert_eq!(errors.len(), 1);
        assert_eq!(errors[0].kept, 2);
        assert!(
            errors[0]
                .to_string()
                .contains("keeping its last 2 addresses"),
            "{}",
            errors[0]
        );
        // An empty answer is a failure too; a smaller answer is not.
        let (targets, _) = merge(
            vec![
                ("a:8443".into(), ok(vec![])),
                ("b:8443".into(), ok(vec![t(3)])),
            ],
            Some(&mut last),
        );
        assert_eq!(targets, vec![t(1), t(2), t(3)]);
        let (targets, errors) = merge(
            vec![
                ("a:8443".into(), ok(vec![t(2)])),
                ("b:8443".into(), ok(vec![t(3)])),
            ],
            Some(&mut last),
        );
        assert_eq!(targets, vec![t(2), t(3)]);
        assert!(errors.is_empty());
    }

    #[test]
    fn without_memory_a_failed_entry_adds_nothing() {
        let (targets, errors) = merge(vec![("a:8443".into(), Err("nxdomain".into()))], None);
        assert!(targets.is_empty());
        assert_eq!(errors[0].kept, 0);
        assert_eq!(
            errors[0].to_string(),
            "cannot resolve server a:8443: nxdomain"
        );
    }
}
