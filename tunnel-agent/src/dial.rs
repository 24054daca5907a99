//! One tunneled stream on the agent: `Dial` → allow-list → connect →
//! `DialResult` → relay.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, LazyLock, OnceLock};
use std::time::{Duration, Instant};

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
    /// The server replica this connection goes to.
    pub server: SocketAddr,
    /// Every open stream of the agent (`/v1/streams`).
    pub open: Arc<OpenStreams>,
}

/// How the agent serves a new stream.
pub struct StreamMode {
    /// The agent is draining: answer `Draining` instead of dialing.
    pub draining: bool,
    /// The connection's receive window, which lends credit to stalled
    /// streams (`None`: never lend).
    pub stall: Option<transport::window::ReceiveWindow>,
    /// Where the stream says what it is doing, for the drain log.
    pub trace: Arc<StreamTrace>,
}

/// What one stream is doing, for an operator asking why a drain waits:
/// written by the stream at each step (a few times in its life, never per
/// chunk), read by its connection's task when it reports.
#[derive(Debug)]
pub struct StreamTrace {
    /// The stream's id within its connection.
    pub stream: String,
    /// The server replica whose connection carries it.
    server: SocketAddr,
    opened: Instant,
    target: OnceLock<SocketAddr>,
    step: AtomicU8,
    relay: transport::RelayProgress,
}

/// One stream in `/v1/streams`.
#[derive(Debug, serde::Serialize)]
pub struct StreamInfo {
    pub server: String,
    pub stream: String,
    /// `null` until the server's `Dial` names it.
    pub target: Option<String>,
    /// `awaiting_dial`, `dialing`, `answering` or `relaying`.
    pub step: &'static str,
    pub open_secs: f64,
    /// Whether the target's FIN has gone into the tunnel.
    pub target_to_tunnel_finished: bool,
    /// Whether the server's FIN has reached the target.
    pub tunnel_to_target_finished: bool,
}

/// Every stream the agent has open, over all its connections: one insert
/// and one removal per stream (a guard removes it however the stream's
/// task ends), nothing per chunk.
#[derive(Debug, Default)]
pub struct OpenStreams {
    next: std::sync::atomic::AtomicU64,
    map: dashmap::DashMap<u64, Arc<StreamTrace>>,
}

/// Streams `/v1/streams` lists one by one, oldest first; it counts them
/// all.
pub const STREAMS_LISTED: usize = 1_000;

/// The `/v1/streams` page.
#[derive(Debug, serde::Serialize)]
pub struct StreamsPage {
    pub open: usize,
    pub oldest: Vec<StreamInfo>,
}

impl OpenStreams {
    /// Lists `trace` until the returned guard is dropped.
    pub fn register(&self, trace: Arc<StreamTrace>) -> OpenStream<'_> {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        self.map.insert(id, trace);
        OpenStream { streams: self, id }
    }

    /// How many are open, and the oldest [`STREAMS_LISTED`] of them.
    pub fn page(&self) -> StreamsPage {
        let open = oldest_first(self.map.iter().map(|e| e.value().clone()));
        StreamsPage {
            open: open.len(),
            oldest: open.iter().take(STREAMS_LISTED).map(|t| t.info()).collect(),
        }
    }
}

/// `traces`, oldest first (the drain log and `/v1/streams`).
pub fn oldest_first(traces: impl Iterator<Item = Arc<StreamTrace>>) -> Vec<Arc<StreamTrace>> {
    let mut open: Vec<Arc<StreamTrace>> = traces.collect();
    open.sort_by_key(|t| std::cmp::Reverse(t.age()));
    open
}

/// A stream's entry in [`OpenStreams`].
pub struct OpenStream<'a> {
    streams: &'a OpenStreams,
    id: u64,
}

impl Drop for OpenStream<'_> {
    fn drop(&mut self) {
        self.streams.map.remove(&self.id);
    }
}

/// The steps of [`StreamTrace::step`], in order.
const AWAITING_DIAL: u8 = 0;
const DIALING: u8 = 1;
const ANSWERING: u8 = 2;
const RELAYING: u8 = 3;

impl StreamTrace {
    pub fn new(stream: String, server: SocketAddr) -> Self {
        StreamTrace {
            stream,
            server,
            opened: Instant::now(),
            target: OnceLock::new(),
            step: AtomicU8::new(AWAITING_DIAL),
            relay: transport::RelayProgress::default(),
        }
    }

    fn step(&self, step: u8) {
        self.step.store(step, Ordering::Relaxed);
    }

    /// How long the stream has been open.
    pub fn age(&self) -> Duration {
        self.opened.elapsed()
    }

    /// This stream as `/v1/streams` lists it.
    pub fn info(&self) -> StreamInfo {
        let step = self.step.load(Ordering::Relaxed);
        StreamInfo {
            server: self.server.to_string(),
            stream: self.stream.clone(),
            target: self.target.get().map(ToString::to_string),
            step: match step {
                AWAITING_DIAL => "awaiting_dial",
                DIALING => "dialing",
                ANSWERING => "answering",
                _ => "relaying",
            },
            open_secs: self.age().as_secs_f64(),
            target_to_tunnel_finished: self.relay.is_finished(transport::Direction::TcpToTunnel),
            tunnel_to_target_finished: self.relay.is_finished(transport::Direction::TunnelToTcp),
        }
    }

    /// What the stream is doing, in words: its step, its target and, while
    /// it relays, which directions are still open.
    pub fn state(&self) -> String {
        let target = match self.target.get() {
            Some(t) => t.to_string(),
            None => "?".to_owned(),
        };
        match self.step.load(Ordering::Relaxed) {
            AWAITING_DIAL => "waiting for the server's Dial".to_owned(),
            DIALING => format!("dialing {target}"),
            ANSWERING => format!("sending the dial's answer for {target}"),
            _ => format!("relaying with {target}: {}", self.relay.describe("target")),
        }
    }
}

/// Serves one stream opened by the server.
pub async fn serve_stream<S: TunnelSend, R: TunnelRecv>(
    policy: Arc<DialPolicy>,
    mut send: S,
    mut recv: R,
    mode: StreamMode,
) {
    let StreamMode {
        draining,
        stall,
        trace,
    } = mode;
    let _listed = policy.open.register(trace.clone());
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
    let _ = trace.target.set(target);
    trace.step(DIALING);
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
    trace.step(ANSWERING);
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
    trace.step(RELAYING);
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
            progress: Some(&trace.relay),
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
