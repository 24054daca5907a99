//! What the CONNECT and transparent ingresses share once a stream is
//! dialed ([`crate::dial`]): relay it to the client's socket, and count.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tracing::Instrument;
use transport::Direction;

use crate::dial::Dialed;
use crate::proxy_auth::Credential;
use crate::Shared;

static STREAM_IDS: AtomicU64 = AtomicU64::new(1);

/// TCP keep-alive on client sockets: a client that vanished without a FIN
/// or RST (a rebooted apiserver node, a dropped NAT binding) is noticed
/// after about [`CLIENT_IDLE_DEAD`] instead of holding its slot, its
/// descriptor and its agent stream forever.
pub const CLIENT_KEEPALIVE: std::time::Duration = std::time::Duration::from_secs(30);
/// See [`CLIENT_KEEPALIVE`]: probes (or unacknowledged data) unanswered
/// this long fail the connection.
pub const CLIENT_IDLE_DEAD: std::time::Duration = std::time::Duration::from_secs(120);

/// Sets [`CLIENT_KEEPALIVE`] on a client socket.
pub fn watch_client<S: std::os::fd::AsFd>(socket: &S) {
    transport::net::set_liveness(socket, CLIENT_KEEPALIVE, CLIENT_IDLE_DEAD);
}

/// Sets [`CLIENT_KEEPALIVE`] and `TCP_NODELAY` on a client listener, once:
/// Linux copies both to every socket it accepts (`transport::net`'s test
/// checks it), which then costs no `setsockopt` of its own.
pub fn watch_clients(listener: &tokio::net::TcpListener) {
    if let Err(e) = socket2::SockRef::from(listener).set_nodelay(true) {
        tracing::debug!("TCP_NODELAY not set on a listener: {e}");
    }
    watch_client(listener);
}

/// Counts a connection refused by `--max-streams-per-client`, and logs
/// the 1st, 2nd, 4th, 8th ... one (a client over its limit usually keeps
/// trying).
pub fn client_busy(shared: &Shared, busy: &crate::slots::ClientBusy, ingress: &'static str) {
    let hits = shared.metrics.client_stream_limit_hits.inc() + 1;
    if hits.is_power_of_two() {
        tracing::warn!(client = %busy.client, limit = busy.limit, ingress, hits, "{busy}; refused");
    }
}

/// Relays the client's socket over a dialed stream until both sides are
/// done, or until `credential` (what admitted the client) is revoked.
/// `client`: its address, where it has one (the unit of the per-client
/// stall credit).
pub async fn relay<C: transport::ClientSocket>(
    shared: Arc<Shared>,
    dialed: Dialed,
    tcp: C,
    client: Option<std::net::IpAddr>,
    ingress: &'static str,
    credential: Credential,
) {
    let Dialed {
        agent,
        target,
        stream,
        slot: _slot,
    } = dialed;
    let id = STREAM_IDS.fetch_add(1, Ordering::Relaxed);
    let open = OpenRelay::register(&shared, id, &agent, target, client, ingress);
    let span = tracing::debug_span!("stream", node = %agent.node, stream = id, %target, ingress);
    let metrics = &shared.metrics;
    metrics.streams.get_or_create(&[("ingress", ingress)]).inc();
    metrics.streams_active.inc();
    let to_agent = metrics
        .bytes
        .get_or_create(&[("direction", "to_agent")])
        .clone();
    let from_agent = metrics
        .bytes
        .get_or_create(&[("direction", "from_agent")])
        .clone();
    let revocation = credential.watch(&shared);
    let stats = transport::relay(
        tcp,
        stream.send,
        stream.recv,
        |dir, n| match dir {
            Direction::TcpToTunnel => {
                to_agent.inc_by(n as u64);
            }
            Direction::TunnelToTcp => {
                from_agent.inc_by(n as u64);
            }
        },
        transport::RelayLimits {
            stall: Some(&agent.window),
            client,
            buffers: &shared.relay_buffers,
            reader_gone_after: shared.config.client_stall_timeout,
            unlent_gone_after: shared.config.stall_shed_timeout,
            idle_after: shared.config.relay_idle_timeout,
            opening: None,
            order: shared.config.quic.stream_order,
            progress: Some(&open.trace.progress),
            stop: revocation.as_ref().map(|r| &*r.signal),
        },
    )
    .instrument(span.clone())
    .await;
    span.in_scope(|| tracing::debug!(?stats, "stream ended"));
    match stats.outcome {
        transport::RelayOutcome::ReaderGone { unlent: false } => {
            metrics.client_stall_resets.inc();
            span.in_scope(|| tracing::info!("the client stopped reading; both sides were reset"));
        }
        transport::RelayOutcome::ReaderGone { unlent: true } => {
            metrics.stalled_streams_shed.inc();
            span.in_scope(|| {
                tracing::debug!(
                    "the client stopped reading and no stall credit was left; both sides were reset"
                )
            });
        }
        transport::RelayOutcome::Idle => {
            metrics.relay_idle_resets.inc();
            span.in_scope(|| {
                tracing::info!("nothing moved for --relay-idle-timeout; both sides were reset")
            });
        }
        transport::RelayOutcome::Stopped => {
            let why = revocation.as_ref().map_or("revoked", |r| r.reason());
            span.in_scope(|| tracing::warn!("{why}; both sides were reset"));
        }
        _ => {}
    }
    metrics.streams_active.dec();
}

/// A tunneled connection being relayed, as the drain log names it.
pub struct RelayTrace {
    agent: Arc<crate::registry::AgentHandle>,
    target: std::net::SocketAddr,
    client: Option<std::net::IpAddr>,
    ingress: &'static str,
    opened: std::time::Instant,
    progress: transport::RelayProgress,
}

impl RelayTrace {
    /// How long it has been open.
    pub fn age(&self) -> std::time::Duration {
        self.opened.elapsed()
    }

    /// Where it goes and which directions are still open, in words.
    pub fn state(&self) -> String {
        let client = self
            .client
            .map_or_else(|| "a local client".to_owned(), |c| c.to_string());
        format!(
            "{client} to {} on node {} ({}): {}",
            self.target,
            self.agent.node,
            self.ingress,
            self.progress.describe("client")
        )
    }

    /// This connection as `/v1/connections` lists it.
    pub fn info(&self) -> RelayInfo {
        RelayInfo {
            node: self.agent.node.clone(),
            target: self.target.to_string(),
            client: self.client.map(|c| c.to_string()),
            ingress: self.ingress,
            open_secs: self.age().as_secs_f64(),
            client_to_tunnel_finished: self.progress.is_finished(transport::Direction::TcpToTunnel),
            tunnel_to_client_finished: self.progress.is_finished(transport::Direction::TunnelToTcp),
        }
    }
}

/// The tunneled connections being relayed, oldest first (the drain log
/// and `/v1/connections`).
pub fn open_relays_oldest_first(shared: &Shared) -> Vec<Arc<RelayTrace>> {
    let mut open: Vec<Arc<RelayTrace>> = shared
        .open_relays
        .iter()
        .map(|e| e.value().clone())
        .collect();
    // By the fixed instant, never by the age: `elapsed()` moves while the
    // sort compares, and an order that changes under it makes the
    // standard sort panic.
    open.sort_by_key(|t| t.opened);
    open
}

/// One tunneled connection in `/v1/connections`.
#[derive(serde::Serialize)]
pub struct RelayInfo {
    pub node: String,
    pub target: String,
    /// The client's address; `null` for a client on a Unix socket.
    pub client: Option<String>,
    pub ingress: &'static str,
    pub open_secs: f64,
    /// Whether the client's FIN has gone into the tunnel.
    pub client_to_tunnel_finished: bool,
    /// Whether the edge's FIN has reached the client.
    pub tunnel_to_client_finished: bool,
}

/// A relay's entry in [`Shared::open_relays`], removed when dropped (the
/// relay ended, or its task was cancelled): one insert and one removal per
/// tunneled connection, nothing per chunk.
struct OpenRelay<'a> {
    shared: &'a Shared,
    id: u64,
    trace: Arc<RelayTrace>,
}

impl<'a> OpenRelay<'a> {
    fn register(
        shared: &'a Shared,
        id: u64,
        agent: &Arc<crate::registry::AgentHandle>,
        target: std::net::SocketAddr,
        client: Option<std::net::IpAddr>,
        ingress: &'static str,
    ) -> Self {
        let trace = Arc::new(RelayTrace {
            agent: agent.clone(),
            target,
            client,
            ingress,
            opened: std::time::Instant::now(),
            progress: transport::RelayProgress::default(),
        });
        shared.open_relays.insert(id, trace.clone());
        OpenRelay { shared, id, trace }
    }
}

impl Drop for OpenRelay<'_> {
    fn drop(&mut self) {
        self.shared.open_relays.remove(&self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shared() -> Shared {
        let settings = crate::ServerSettings::new("127.0.0.1:0".parse().unwrap(), "/none".into());
        Shared::new(crate::ServerConfig::try_new(settings).unwrap())
    }

    /// Relays opened nanoseconds apart, listed again and again: sorted by
    /// their ages (which move while the sort compares) the standard sort
    /// found its order inconsistent and panicked, in the drain and on the
    /// admin port.
    #[tokio::test]
    async fn open_relays_list_oldest_first_however_close_their_starts() {
        let shared = shared();
        let agent = crate::registry::testing::handle(1, "edge-1", &["198.18.1.2"]).await;
        let target: std::net::SocketAddr = "198.18.1.2:10250".parse().unwrap();
        let open: Vec<OpenRelay<'_>> = (0..2_000)
            .map(|id| OpenRelay::register(&shared, id, &agent, target, None, "transparent"))
            .collect();
        for _ in 0..50 {
            let listed = open_relays_oldest_first(&shared);
            assert_eq!(listed.len(), open.len());
            assert!(listed.windows(2).all(|w| w[0].opened <= w[1].opened));
        }
        let first = &open[0].trace;
        assert!(Arc::ptr_eq(&open_relays_oldest_first(&shared)[0], first));
        drop(open);
        assert!(open_relays_oldest_first(&shared).is_empty());
    }
}
