//! What the CONNECT and transparent ingresses share once a stream is
//! dialed ([`crate::dial`]): relay it to the client's socket, and count.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tokio::net::TcpStream;
use tracing::Instrument;
use transport::Direction;

use crate::dial::Dialed;
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

/// Sets [`CLIENT_KEEPALIVE`] on an accepted client socket.
pub fn watch_client(tcp: &TcpStream) {
    transport::net::set_liveness(tcp, CLIENT_KEEPALIVE, CLIENT_IDLE_DEAD);
}

/// Relays `tcp` over a dialed stream until both sides are done.
pub async fn relay(shared: Arc<Shared>, dialed: Dialed, tcp: TcpStream, ingress: &'static str) {
    let Dialed {
        agent,
        target,
        stream,
        slot: _slot,
    } = dialed;
    let id = STREAM_IDS.fetch_add(1, Ordering::Relaxed);
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
            stall: Some(&agent.stall),
            buffers: &shared.relay_buffers,
            reader_gone_after: shared.config.client_stall_timeout,
        },
    )
    .instrument(span.clone())
    .await;
    span.in_scope(|| tracing::debug!(?stats, "stream ended"));
    if stats.outcome == transport::RelayOutcome::ReaderGone {
        metrics.client_stall_resets.inc();
        span.in_scope(|| tracing::info!("the client stopped reading; both sides were reset"));
    }
    metrics.streams_active.dec();
}
