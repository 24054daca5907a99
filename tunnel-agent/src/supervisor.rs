//! The agent's top level: one connection to every server replica.
//!
//! `--server` names resolve (periodically, and soon after any connection
//! loss) to a set of addresses — a headless Service lists every replica.
//! Each address gets its own [`ReplicaLoop`] with its own backoff;
//! addresses that disappear are drained and dropped; a replica
//! reachable through two addresses is held once (by its server id).

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use proto::codes::close;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use tracing::Instrument;

use crate::config::AgentConfig;
use crate::error::AgentError;
use crate::replica::{LoopSettings, ReplicaLoop, ServerConnector};
use crate::replicas::HeldReplicas;
use crate::resolve::{resolve_all, Target};
use crate::telemetry::{AgentAdmin, AgentMetrics};

/// After a connection loss, wait this long before resolving again (many
/// sessions may report the same outage at once).
const LOSS_DEBOUNCE: Duration = Duration::from_millis(500);

struct Replica {
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

/// Runs the agent until `shutdown` completes and every connection drained.
pub async fn run(
    config: AgentConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), AgentError> {
    config.validate()?;
    let config = Arc::new(config);
    let (stop_tx, mut stop_rx) = watch::channel(false);
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    });
    let endpoint = bind_endpoint(&config)?;
    let held = HeldReplicas::default();
    let metrics = Arc::new(AgentMetrics::default());
    let admin = match config.admin_listen {
        Some(addr) => {
            let listener = transport::net::bind_tcp(addr).map_err(|e| AgentError::Admin {
                addr,
                reason: e.to_string(),
            })?;
            let routes = Arc::new(AgentAdmin {
                metrics: metrics.clone(),
                held: held.clone(),
                receive_budget: config.receive_budget.clone(),
            });
            Some(tokio::spawn(daemon::admin::serve(listener, routes)))
        }
        None => None,
    };
    let (lost_tx, mut lost_rx) = mpsc::channel::<()>(64);
    let mut replicas: HashMap<Target, Replica> = HashMap::new();
    let mut retiring = Vec::new();
    loop {
        let (targets, errors) = resolve_all(&config).await;
        for e in &errors {
            tracing::warn!("{e}");
        }
        if targets.is_empty() {
            tracing::warn!(
                held = replicas.len(),
                "no server address resolved; keeping the current connections"
            );
        } else {
            for target in &targets {
                if !replicas.contains_key(target) {
                    tracing::info!(server = %target.addr, name = %target.server_name, "new server address");
                    let (stop, stopped) = watch::channel(false);
                    let replica = ReplicaLoop {
                        connector: ServerConnector {
                            config: config.clone(),
                            metrics: metrics.clone(),
                            endpoint: endpoint.clone(),
                            target: target.clone(),
                        },
                        addr: target.addr,
                        settings: LoopSettings::from_config(&config),
                        held: held.clone(),
                        metrics: metrics.clone(),
                        stop: stopped,
                        lost: lost_tx.clone(),
                    };
                    let span =
                        tracing::info_span!("session", node = %config.node, server = %target.addr);
                    let task = tokio::spawn(replica.run().instrument(span));
                    replicas.insert(target.clone(), Replica { stop, task });
                }
            }
            let gone: Vec<Target> = replicas
                .keys()
                .filter(|t| !targets.contains(t))
                .cloned()
                .collect();
            for target in gone {
                tracing::info!(server = %target.addr, "server address no longer resolves; draining its connection");
                let r = replicas.remove(&target).expect("present");
                let _ = r.stop.send(true);
                retiring.push(r.task);
            }
            retiring.retain(|t: &JoinHandle<()>| !t.is_finished());
        }
        let lost = tokio::select! {
            _ = tokio::time::sleep(config.resolve_interval) => false,
            Some(()) = lost_rx.recv() => true,
            _ = stop_rx.wait_for(|s| *s) => break,
        };
        if lost {
            tokio::time::sleep(LOSS_DEBOUNCE).await;
            while lost_rx.try_recv().is_ok() {}
        }
    }
    tracing::info!(
        connections = replicas.len(),
        "shutting down: draining every server connection"
    );
    for r in replicas.values() {
        let _ = r.stop.send(true);
    }
    for task in replicas.into_values().map(|r| r.task).chain(retiring) {
        let _ = task.await;
    }
    if let Some(admin) = admin {
        admin.abort();
    }
    endpoint.close(
        quinn::VarInt::from_u32(close::AGENT_DRAINED),
        b"agent drained",
    );
    let _ = tokio::time::timeout(Duration::from_secs(2), endpoint.wait_idle()).await;
    Ok(())
}

/// The agent's one QUIC client endpoint: dual-stack when the host has
/// IPv6, else IPv4 only.
pub(crate) fn bind_endpoint(config: &AgentConfig) -> Result<quinn::Endpoint, AgentError> {
    let dual = SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, 0));
    let v4 = SocketAddr::from((std::net::Ipv4Addr::UNSPECIFIED, 0));
    config
        .quic
        .client_endpoint(dual)
        .or_else(|_| config.quic.client_endpoint(v4))
        .map_err(|e| AgentError::Endpoint(e.to_string()))
}
