//! The agent's top level: one connection to every server replica.
//!
//! `--server` names resolve (periodically, and soon after any connection
//! loss or registration) to a set of addresses — a headless Service lists
//! every replica. Each address gets its own [`ReplicaLoop`] with its own
//! backoff; addresses that disappear are drained and dropped; a replica
//! reachable through two addresses is held once (by its server id).
//!
//! Fewer addresses than replicas (one load balancer, a NAT'd cloud with
//! one public address): each server says in `Welcome` how many replicas
//! exist, and the agent runs that many loops (at most `--max-replicas`),
//! the extra ones as further *slots* on the addresses it has. Every
//! connection dials from a UDP port of its own, and a slot that reaches a
//! replica already held closes that connection and dials again soon, from
//! a new port, so the balancer spreads the slots until every replica is
//! held — and again whenever one drops.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use tracing::Instrument;

use crate::config::AgentConfig;
use crate::error::AgentError;
use crate::replica::{LoopSettings, ReplicaLoop, ServerConnector};
use crate::replicas::HeldReplicas;
use crate::resolve::{Resolver, Target};
use crate::telemetry::{AgentAdmin, AgentMetrics};

/// After a connection loss, wait this long before resolving again (many
/// sessions may report the same outage at once).
const LOSS_DEBOUNCE: Duration = Duration::from_millis(500);

/// A task that ends with its owner (every return of [`run`]).
struct AbortOnDrop<T>(JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

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
    // Held until this returns (the process's life): a successor started
    // meanwhile sees it.
    let _instance_lock = match &config.instance_lock {
        Some(path) => {
            let lock = crate::instance_lock::Lock::take(path, &config.predecessor)?;
            if config.predecessor.alive() {
                tracing::info!(
                    lock = %path.display(),
                    "another agent process runs on this node: this one succeeds it (rolling \
                     update); servers route new streams here and let the other finish its own"
                );
            }
            Some(AbortOnDrop(tokio::spawn(
                lock.hold(config.predecessor.clone(), path.clone()),
            )))
        }
        None => None,
    };
    let config = Arc::new(config);
    let held = HeldReplicas::default();
    // Written from the start: an agent still enrolling is alive, not ready.
    let _status = config.status_file.clone().map(|path| {
        AbortOnDrop(tokio::spawn(crate::status::keep_writing(
            path,
            held.clone(),
            config.max_replicas,
        )))
    });
    let (stop_tx, mut stop_rx) = watch::channel(false);
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    });
    if let Some(bootstrap) = &config.bootstrap {
        if let Some(why) = crate::enroll::needs_enrollment(&config) {
            tracing::info!("enrolling with the bootstrap token: {why}");
            if !crate::enroll::enroll_until_done(&config, bootstrap, stop_rx.clone()).await {
                return Ok(());
            }
        }
    }
    // The certificate must be usable now (enrolled, or given).
    config.credentials()?.tls(proto::ALPN)?;
    if config.renew {
        tokio::spawn(crate::enroll::renew_loop(
            config.clone(),
            config.bootstrap.clone(),
            stop_rx.clone(),
        ));
    }
    let metrics = Arc::new(AgentMetrics::default());
    let admin = match config.admin_listen {
        Some(addr) => {
            let listener = match transport::net::bind_tcp(addr) {
                Ok(listener) => Some(listener),
                // The agent process this one succeeds serves it until it
                // ends (one too old to take the lock, too).
                Err(e)
                    if e.kind() == std::io::ErrorKind::AddrInUse
                        && config.instance_lock.is_some() =>
                {
                    config.predecessor.set_admin_held(true);
                    tracing::info!(
                        %addr,
                        "the admin address is in use, by the agent process this one succeeds; \
                         serving it once that one ends"
                    );
                    None
                }
                Err(e) => {
                    return Err(AgentError::Admin {
                        addr,
                        reason: e.to_string(),
                    })
                }
            };
            let routes = Arc::new(AgentAdmin {
                metrics: metrics.clone(),
                held: held.clone(),
                receive_budget: config.receive_budget.clone(),
                relay_buffers: config.relay_buffers.clone(),
                open_streams: config.open_streams.clone(),
            });
            let (max, admin_metrics) = (config.admin_max_connections, metrics.admin.clone());
            let predecessor = config.predecessor.clone();
            Some(tokio::spawn(async move {
                let listener = match listener {
                    Some(listener) => listener,
                    None => bind_when_free(addr, predecessor).await,
                };
                daemon::admin::serve(listener, routes, max, admin_metrics).await
            }))
        }
        None => None,
    };
    let (lost_tx, mut lost_rx) = mpsc::channel::<()>(64);
    let mut replicas: HashMap<(Target, u16), Replica> = HashMap::new();
    let mut retiring = Vec::new();
    // The replica count servers last told (kept while none is held).
    let mut expected = 0u16;
    // This process's id in every Hello: a server refuses a second
    // connection from it rather than replacing the first.
    let instance = fastrand::u64(1..);
    let mut resolver = Resolver::default();
    loop {
        let (targets, errors) = resolver.resolve(&config).await;
        for e in &errors {
            tracing::warn!("{e}");
        }
        if targets.is_empty() {
            tracing::warn!(
                held = replicas.len(),
                "no server address resolved; keeping the current connections"
            );
        } else {
            if held.expected() > 0 {
                expected = held.expected();
            }
            let wanted = slots(&targets, expected, config.max_replicas);
            let existing: Vec<(Target, u16)> = replicas.keys().cloned().collect();
            let holding: HashSet<(SocketAddr, u16)> =
                held.list().into_iter().map(|r| (r.addr, r.slot)).collect();
            let (start, gone) = reconcile(&existing, &holding, &wanted);
            for (target, slot) in &start {
                if let std::collections::hash_map::Entry::Vacant(entry) =
                    replicas.entry((target.clone(), *slot))
                {
                    if *slot == 0 {
                        tracing::info!(server = %target.addr, name = %target.server_name, "new server address");
                    } else {
                        tracing::info!(server = %target.addr, slot, expected, "dialing a shared address again for the replicas not held yet");
                    }
                    let (stop, stopped) = watch::channel(false);
                    let replica = ReplicaLoop {
                        connector: ServerConnector {
                            config: config.clone(),
                            metrics: metrics.clone(),
                            target: target.clone(),
                            instance,
                        },
                        addr: target.addr,
                        slot: *slot,
                        settings: LoopSettings::from_config(&config),
                        held: held.clone(),
                        metrics: metrics.clone(),
                        stop: stopped,
                        changed: lost_tx.clone(),
                        lost_to: Default::default(),
                    };
                    let span = tracing::info_span!("session", node = %config.node, server = %target.addr, slot);
                    let task = tokio::spawn(replica.run().instrument(span));
                    entry.insert(Replica { stop, task });
                }
            }
            for key in gone {
                if !targets.contains(&key.0) {
                    tracing::info!(server = %key.0.addr, "server address no longer resolves; draining its connection");
                } else {
                    tracing::info!(server = %key.0.addr, slot = key.1, expected, "fewer replicas now; draining this slot's connection");
                }
                let r = replicas.remove(&key).expect("present");
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
        // Gone with its listener when this returns: a successor waits to
        // bind the address.
        let _ = admin.await;
    }
    Ok(())
}

/// The loops to run: slot 0 on every address, and, when the servers say
/// more replicas exist than there are addresses, further slots on the
/// addresses in turn until there are that many loops (at most `max`).
pub(crate) fn slots(targets: &[Target], expected: u16, max: u16) -> Vec<(Target, u16)> {
    let mut wanted: Vec<(Target, u16)> = targets.iter().map(|t| (t.clone(), 0)).collect();
    let n = usize::from(expected.min(max));
    if !targets.is_empty() {
        for k in targets.len()..n {
            let slot = u16::try_from(k / targets.len()).unwrap_or(u16::MAX);
            wanted.push((targets[k % targets.len()].clone(), slot));
        }
    }
    wanted
}

/// A replica loop: the address it dials and its slot there.
pub(crate) type Loop = (Target, u16);

/// Which loops to start and which to stop for `wanted` ([`slots`]), given
/// the loops running (`existing`) and the slots that hold a replica now
/// (`holding`). Per address it is the number of loops that counts: when
/// there are too many (the servers say fewer replicas exist), loops that
/// hold nothing stop first, so a scale-down never drains a connection to
/// a replica that stays while an idle slot goes on; when too few, new
/// loops take the lowest free slot numbers.
pub(crate) fn reconcile(
    existing: &[Loop],
    holding: &HashSet<(SocketAddr, u16)>,
    wanted: &[Loop],
) -> (Vec<Loop>, Vec<Loop>) {
    let mut want: HashMap<&Target, usize> = HashMap::new();
    for (t, _) in wanted {
        *want.entry(t).or_default() += 1;
    }
    let mut have: HashMap<&Target, Vec<u16>> = HashMap::new();
    for (t, slot) in existing {
        have.entry(t).or_default().push(*slot);
    }
    let (mut start, mut stop) = (Vec::new(), Vec::new());
    for (target, slots) in &mut have {
        let n = want.get(target).copied().unwrap_or(0);
        if slots.len() <= n {
            continue;
        }
        // Unheld first, then the highest numbers.
        slots.sort_by_key(|s| (holding.contains(&(target.addr, *s)), std::cmp::Reverse(*s)));
        let excess = slots.len() - n;
        for s in slots.drain(..excess) {
            stop.push(((*target).clone(), s));
        }
    }
    for (target, n) in want {
        let running = have.get(target).map_or(&[][..], |v| v.as_slice());
        let mut free = (0u16..).filter(|s| !running.contains(s));
        for _ in running.len()..n {
            if let Some(s) = free.next() {
                start.push((target.clone(), s));
            }
        }
    }
    start.sort_by_key(|(t, s)| (t.addr, *s));
    stop.sort_by_key(|(t, s)| (t.addr, *s));
    (start, stop)
}

/// A QUIC client endpoint (one per connection): dual-stack when the host
/// has IPv6, else IPv4 only.
pub(crate) fn bind_endpoint(config: &AgentConfig) -> Result<quinn::Endpoint, AgentError> {
    let dual = SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, 0));
    let v4 = SocketAddr::from((std::net::Ipv4Addr::UNSPECIFIED, 0));
    config
        .quic
        .client_endpoint(dual)
        .or_else(|_| config.quic.client_endpoint(v4))
        .map_err(|e| AgentError::Endpoint(e.to_string()))
}

/// Binds the admin address once the process holding it lets go, trying
/// every [`crate::instance_lock::RETRY`], and then stops counting it as a
/// sign of a predecessor. Still failing after a minute (an agent drains
/// within its grace), it warns once a minute: something else may hold it.
async fn bind_when_free(
    addr: SocketAddr,
    predecessor: crate::instance_lock::Predecessor,
) -> tokio::net::TcpListener {
    let since = tokio::time::Instant::now();
    let mut warned = since;
    loop {
        tokio::time::sleep(crate::instance_lock::RETRY).await;
        match transport::net::bind_tcp(addr) {
            Ok(listener) => {
                predecessor.set_admin_held(false);
                tracing::info!(%addr, "serving the admin address");
                return listener;
            }
            Err(e) if warned.elapsed() >= Duration::from_secs(60) => {
                tracing::warn!(
                    %addr,
                    waited_s = since.elapsed().as_secs(),
                    "cannot listen on the admin address yet: {e}"
                );
                warned = tokio::time::Instant::now();
            }
            Err(_) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(last: u8) -> Target {
        Target {
            addr: SocketAddr::from(([198, 18, 0, last], 8443)),
            server_name: "tunnel".into(),
        }
    }

    #[test]
    fn fewer_replicas_stop_the_slots_that_hold_nothing_first() {
        let lb = [target(10)];
        let addr = target(10).addr;
        let running = slots(&lb, 3, 16);
        // Slot 1 lost its replica (the one scaled away); 0 and 2 hold.
        let holding: HashSet<_> = [(addr, 0), (addr, 2)].into();
        let (start, stop) = reconcile(&running, &holding, &slots(&lb, 2, 16));
        assert!(start.is_empty());
        assert_eq!(stop, vec![(target(10), 1)]);
        // Nothing held: the highest goes.
        let (_, stop) = reconcile(&running, &HashSet::new(), &slots(&lb, 2, 16));
        assert_eq!(stop, vec![(target(10), 2)]);
        // More replicas again: the free numbers fill in.
        let now = vec![(target(10), 0), (target(10), 2)];
        let (start, stop) = reconcile(&now, &holding, &slots(&lb, 4, 16));
        assert_eq!(start, vec![(target(10), 1), (target(10), 3)]);
        assert!(stop.is_empty());
        // An address that left the name: all of its loops stop.
        let (start, stop) = reconcile(&now, &holding, &slots(&[target(11)], 0, 16));
        assert_eq!(start, vec![(target(11), 0)]);
        assert_eq!(stop, now);
    }

    #[test]
    fn one_address_gets_a_slot_per_replica_up_to_the_bound() {
        let lb = [target(10)];
        assert_eq!(slots(&lb, 0, 16), vec![(target(10), 0)]);
        assert_eq!(slots(&lb, 1, 16), vec![(target(10), 0)]);
        assert_eq!(
            slots(&lb, 3, 16),
            vec![(target(10), 0), (target(10), 1), (target(10), 2)]
        );
        // A server claiming 60,000 replicas gets --max-replicas loops.
        assert_eq!(slots(&lb, 60_000, 4).len(), 4);
    }

    #[test]
    fn addresses_enough_for_every_replica_get_one_slot_each() {
        let three = [target(1), target(2), target(3)];
        assert_eq!(slots(&three, 3, 16).len(), 3);
        assert!(slots(&three, 2, 16).iter().all(|(_, s)| *s == 0));
        // Two addresses, five replicas: the extra slots go round.
        let two = [target(1), target(2)];
        assert_eq!(
            slots(&two, 5, 16),
            vec![
                (target(1), 0),
                (target(2), 0),
                (target(1), 1),
                (target(2), 1),
                (target(1), 2)
            ]
        );
        assert!(slots(&[], 3, 16).is_empty());
    }
}
