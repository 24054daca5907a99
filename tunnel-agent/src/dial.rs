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
    /// This connection's number among the agent's connections
    /// ([`OpenStreams::connection`]): what tells its streams from those
    /// of a connection to the same replica still draining.
    pub connection: u64,
    /// Every open stream of the agent (`/v1/streams`, the drain log).
    pub open: Arc<OpenStreams>,
    /// The most streams the whole agent serves at once, over all its
    /// connections (each holds a socket to its target): what one
    /// connection grants, so N replicas cannot open N times the open-files
    /// budget. Past it a dial is refused before a socket is opened.
    pub max_open: usize,
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
    /// Which of the agent's connections ([`DialPolicy::connection`]).
    connection: u64,
    opened: Instant,
    target: OnceLock<SocketAddr>,
    step: AtomicU8,
    relay: transport::RelayProgress,
}

/// One stream in `/v1/streams`.
#[derive(Debug, serde::Serialize)]
pub struct StreamInfo {
    pub server: String,
    /// The connection's number: a connection draining after a transport
    /// switch or a handover goes to the same server as its successor.
    pub connection: u64,
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
/// task ends), nothing per chunk. `/v1/streams` lists them all; a
/// connection's drain log lists its own.
#[derive(Debug, Default)]
pub struct OpenStreams {
    next: std::sync::atomic::AtomicU64,
    connections: std::sync::atomic::AtomicU64,
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
    /// How many are open now (all connections).
    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Lists `trace` until the returned guard is dropped.
    pub fn register(&self, trace: Arc<StreamTrace>) -> OpenStream<'_> {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        self.map.insert(id, trace);
        OpenStream { streams: self, id }
    }

    /// A number for a new connection, distinct from every other of this
    /// agent's ([`DialPolicy::connection`]).
    pub fn connection(&self) -> u64 {
        self.connections.fetch_add(1, Ordering::Relaxed)
    }

    /// How many are open, and the oldest [`STREAMS_LISTED`] of them.
    pub fn page(&self) -> StreamsPage {
        let open = self.oldest_first(|_| true);
        StreamsPage {
            open: open.len(),
            oldest: open.iter().take(STREAMS_LISTED).map(|t| t.info()).collect(),
        }
    }

    /// The streams of connection `connection`, oldest first (its drain
    /// log).
    pub fn of_connection(&self, connection: u64) -> Vec<Arc<StreamTrace>> {
        self.oldest_first(|t| t.connection == connection)
    }

    fn oldest_first(&self, keep: impl Fn(&StreamTrace) -> bool) -> Vec<Arc<StreamTrace>> {
        let mut open: Vec<Arc<StreamTrace>> = self
            .map
            .iter()
            .filter(|e| keep(e.value()))
            .map(|e| e.value().clone())
            .collect();
        // By the fixed instant, never by the age: `elapsed()` moves while
        // the sort compares, and an order that changes under it makes the
        // standard sort panic.
        open.sort_by_key(|t| t.opened);
        open
    }
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
    /// Stream `stream` of connection `connection` to `server`.
    pub fn new(stream: String, server: SocketAddr, connection: u64) -> Self {
        StreamTrace {
            stream,
            server,
            connection,
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
            connection: self.connection,
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
    // This stream is registered already, hence `>`.
    let at_limit = policy.open.len() > policy.max_open;
    let result = if draining {
        Err(DialResult::error(
            DialCode::Draining,
            "the agent is shutting down",
        ))
    } else if at_limit {
        Err(DialResult::error(
            DialCode::Refused,
            format!(
                "the agent on node {} has {} tunneled connections open, as many as its \
                 open-files limit allows",
                policy.node, policy.max_open
            ),
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
            let label = if at_limit && !draining {
                "stream_limit"
            } else {
                answer.code.label()
            };
            AgentMetrics::count(&metrics.dials, "result", label);
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
            stop: None,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_connection_reports_its_own_streams_oldest_first() {
        let open = OpenStreams::default();
        let server: SocketAddr = "198.18.0.1:8443".parse().unwrap();
        let (old, new) = (open.connection(), open.connection());
        assert_ne!(old, new);
        let trace = |stream: &str, connection| {
            Arc::new(StreamTrace::new(stream.into(), server, connection))
        };
        let first = open.register(trace("0", old));
        std::thread::sleep(Duration::from_millis(2));
        let _second = open.register(trace("4", new));
        std::thread::sleep(Duration::from_millis(2));
        let _third = open.register(trace("8", old));

        let names =
            |t: Vec<Arc<StreamTrace>>| t.iter().map(|t| t.stream.clone()).collect::<Vec<_>>();
        assert_eq!(names(open.of_connection(old)), ["0", "8"]);
        assert_eq!(names(open.of_connection(new)), ["4"]);
        let page = open.page();
        assert_eq!(page.open, 3);
        let listed: Vec<_> = page
            .oldest
            .iter()
            .map(|i| (i.stream.as_str(), i.connection))
            .collect();
        assert_eq!(listed, [("0", old), ("4", new), ("8", old)]);
        assert_eq!(page.oldest[0].step, "awaiting_dial");
        assert_eq!(page.oldest[0].server, "198.18.0.1:8443");

        // The guard unlists its stream however the stream ends.
        drop(first);
        assert_eq!(names(open.of_connection(old)), ["8"]);
        assert_eq!(open.page().open, 2);
    }

    /// Streams opened nanoseconds apart, listed again and again: sorted by
    /// their ages (which move while the sort compares) the standard sort
    /// found its order inconsistent and panicked, in `/v1/streams` and in
    /// the drain log.
    #[test]
    fn streams_list_oldest_first_however_close_their_starts() {
        let open = OpenStreams::default();
        let server: SocketAddr = "198.18.0.1:8443".parse().unwrap();
        let connection = open.connection();
        let traces: Vec<_> = (0..2_000)
            .map(|i| Arc::new(StreamTrace::new(i.to_string(), server, connection)))
            .collect();
        let _listed: Vec<_> = traces.iter().map(|t| open.register(t.clone())).collect();
        for _ in 0..50 {
            let page = open.page();
            assert_eq!(page.open, 2_000);
            assert_eq!(page.oldest.len(), STREAMS_LISTED);
            let first = traces.iter().map(|t| t.opened).min().unwrap();
            let oldest: Vec<_> = traces
                .iter()
                .filter(|t| t.opened == first)
                .map(|t| t.stream.as_str())
                .collect();
            assert!(oldest.contains(&page.oldest[0].stream.as_str()));
            let mine = open.of_connection(connection);
            assert!(mine.windows(2).all(|w| w[0].opened <= w[1].opened));
        }
    }
}
