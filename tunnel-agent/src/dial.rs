//! One tunneled stream on the agent: `Dial` → allow-list → connect →
//! `DialResult` → relay.

use std::io;
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use proto::{DialCode, DialResult, Message};
use tokio::net::TcpStream;
use transport::{read_message, write_message, TunnelRecv, TunnelSend};

use crate::allow::AllowList;
use crate::telemetry::AgentMetrics;

/// `DialResult{ok}`, encoded once.
static OK_FRAME: LazyLock<Vec<u8>> = LazyLock::new(|| {
    let mut frame = Vec::with_capacity(8);
    proto::encode(&Message::DialResult(DialResult::ok()), &mut frame)
        .expect("an ok DialResult has no field that can be too long");
    frame
});

/// How long the server may take to send `Dial` after opening a stream.
const DIAL_FRAME_TIMEOUT: Duration = Duration::from_secs(10);

/// What the streams of one connection may do: taken from the
/// credentials that connection registered with.
pub struct DialPolicy {
    /// The node name (for refusal messages).
    pub node: String,
    pub allow: AllowList,
    /// Longest local connect; the server's deadline applies when shorter.
    pub dial_timeout: Duration,
    /// How long the `ok` of an optimistic dial waits for the target's
    /// first bytes (`AgentConfig::result_hold`).
    pub result_hold: Duration,
    pub metrics: Arc<AgentMetrics>,
    /// What relay buffers may grow into (shared by the whole agent).
    pub buffers: Arc<transport::BufferBudget>,
    /// How the agent's QUIC connections order their streams' data.
    pub stream_order: transport::StreamOrder,
}

/// How the agent serves a new stream.
pub struct StreamMode {
    /// The agent is draining: answer `Draining` instead of dialing.
    pub draining: bool,
    /// The connection's receive window, which lends credit to stalled
    /// streams (`None`: never lend).
    pub stall: Option<transport::window::ReceiveWindow>,
}

/// Serves one stream opened by the server.
pub async fn serve_stream<S: TunnelSend, R: TunnelRecv>(
    policy: Arc<DialPolicy>,
    mut send: S,
    mut recv: R,
    mode: StreamMode,
) {
    let StreamMode { draining, stall } = mode;
    let metrics = &policy.metrics;
    let mut buf = Vec::new();
    let request =
        match tokio::time::timeout(DIAL_FRAME_TIMEOUT, read_message(&mut recv, &mut buf)).await {
            Ok(Ok(Message::Dial(d))) => d,
            Ok(Ok(other)) => {
                tracing::warn!("expected Dial, got {}", other.kind());
                return abort(send, recv, proto::codes::stream::PROTOCOL);
            }
            Ok(Err(e)) => {
                tracing::warn!("bad Dial frame: {e}");
                return abort(send, recv, proto::codes::stream::PROTOCOL);
            }
            Err(_) => {
                tracing::warn!("no Dial frame within {DIAL_FRAME_TIMEOUT:?}");
                return abort(send, recv, proto::codes::stream::PROTOCOL);
            }
        };
    let target = request.target;
    let result = if draining {
        Err(DialResult::error(
            DialCode::Draining,
            "the agent is shutting down",
        ))
    } else if !policy.allow.permits(target) {
        tracing::warn!(%target, allow = %policy.allow, "dial refused: target is not on the allow-list");
        // The message reaches CONNECT clients: it names the target, never
        // the allow-list (which says what else on the node is reachable).
        Err(DialResult::error(
            DialCode::NotAllowed,
            format!("{target} is not on the allow-list of node {}", policy.node),
        ))
    } else {
        let deadline = Duration::from_millis(request.deadline_ms.into()).min(policy.dial_timeout);
        connect(target, deadline).await
    };
    let tcp = match result {
        Ok(tcp) => tcp,
        Err(answer) => {
            AgentMetrics::count(&metrics.dials, "result", answer.code.label());
            tracing::info!(%target, code = %answer.code, "dial failed: {}", answer.message);
            let _ = write_message(&mut send, &Message::DialResult(answer)).await;
            let _ = tokio::io::AsyncWriteExt::shutdown(&mut send).await;
            recv.stop(proto::codes::stream::CANCELLED);
            return;
        }
    };
    // A server that relays without waiting for the answer gets it with the
    // target's first bytes, one packet and one wake-up fewer per connection
    // (`transport::Opening`); one that waits (CONNECT) gets it now.
    let hold = (request.optimistic && !policy.result_hold.is_zero()).then_some(policy.result_hold);
    if hold.is_none() {
        if let Err(e) = tokio::io::AsyncWriteExt::write_all(&mut send, &OK_FRAME).await {
            tracing::debug!(%target, "server went away before the dial result: {e}");
            return;
        }
    }
    AgentMetrics::count(&metrics.dials, "result", "ok");
    metrics.streams_active.inc();
    let stats = transport::relay(
        tcp,
        send,
        recv,
        |_, _| {},
        transport::RelayLimits {
            stall: stall.as_ref(),
            // The agent's one client is the cloud.
            client: None,
            buffers: &policy.buffers,
            // The target is a local service; the server side bounds clients
            // and idle connections.
            reader_gone_after: None,
            unlent_gone_after: None,
            idle_after: None,
            opening: hold.map(|hold| transport::Opening {
                frame: &OK_FRAME,
                hold,
            }),
            order: policy.stream_order,
        },
    )
    .await;
    metrics.streams_active.dec();
    if let Some(sent) = stats.opening {
        AgentMetrics::count(&metrics.held_results, "sent", sent.label());
    }
    tracing::debug!(%target, ?stats, "stream ended");
}

async fn connect(
    target: std::net::SocketAddr,
    deadline: Duration,
) -> Result<TcpStream, DialResult> {
    match tokio::time::timeout(deadline, TcpStream::connect(target)).await {
        Ok(Ok(tcp)) => Ok(tcp),
        Ok(Err(e)) => Err(match e.kind() {
            io::ErrorKind::ConnectionRefused => DialResult::error(
                DialCode::Refused,
                format!("{target} refused the connection"),
            ),
            _ => DialResult::error(
                DialCode::Unreachable,
                format!("cannot connect to {target}: {e}"),
            ),
        }),
        Err(_) => Err(DialResult::error(
            DialCode::Timeout,
            format!("connecting to {target} took longer than {deadline:?}"),
        )),
    }
}

fn abort<S: TunnelSend, R: TunnelRecv>(mut send: S, mut recv: R, code: u32) {
    send.reset(code);
    recv.stop(code);
}
