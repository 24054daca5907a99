//! Opening a tunneled connection: routing, then one dial procedure under
//! one deadline.
//!
//! [`route`] maps a target to an agent and the address to dial without any
//! network I/O, so a target that no live agent serves fails at once.
//! [`dial`] then opens a stream to that agent, writes `Dial` and, in
//! [`DialMode::AwaitResult`], reads the `DialResult`: all of it before one
//! deadline, the dial timeout plus a margin for the round trip. In
//! [`DialMode::Optimistic`] it returns once the `Dial` is written; a
//! [`transport::gate::ResultGate`] on the receive half reads the answer in front of the
//! target's bytes, bounded by what is left of the same deadline.
//!
//! Dial outcomes (`dial_failures` by reason, `dial_duration_seconds`) are
//! counted in one place, `record`.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use proto::{DialCode, DialRequest, Message};
use tokio::time::Instant;
use transport::gate::{gate, OnResult};
use transport::net::canonical_ip;
use transport::{read_message, write_message, FrameError, TunnelStream};

use crate::link::OpenError;
use crate::metrics::Metrics;
use crate::registry::{AgentHandle, AgentRegistry, Route};
use crate::Shared;

#[cfg(test)]
mod tests;

/// Where a client wants to go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// A node address and port (transparent ingress, CONNECT by address).
    Address(SocketAddr),
    /// A node name and port (CONNECT by name).
    Node { name: String, port: u16 },
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Address(a) => write!(f, "{a}"),
            Target::Node { name, port } => write!(f, "{name}:{port}"),
        }
    }
}

/// How a dial treats the agent's answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DialMode {
    /// Return after the agent's `DialResult` (CONNECT: the status line
    /// depends on it).
    AwaitResult,
    /// Return once the `Dial` is written, so the client's first bytes
    /// travel right behind it; the receive half reads the answer first and
    /// turns a failure into a read error (transparent ingress: one round
    /// trip less, and a failure is a reset either way).
    Optimistic,
}

/// A dialed stream, ready to relay.
pub struct Dialed {
    pub agent: Arc<AgentHandle>,
    pub target: SocketAddr,
    pub stream: TunnelStream,
    /// The stream's place in its node's stream limit, held until the
    /// relay ends.
    pub slot: StreamSlot,
}

/// One stream counted against a node's limit (`AgentHandle::streams_active`);
/// given back when dropped.
pub struct StreamSlot(Arc<AgentHandle>);

impl StreamSlot {
    /// Takes a slot on `agent` if fewer than `limit` streams are open.
    pub fn take(agent: &Arc<AgentHandle>, limit: usize) -> Result<StreamSlot, DialError> {
        let limit_i = i64::try_from(limit).unwrap_or(i64::MAX);
        let before = agent.streams_active.fetch_add(1, Ordering::AcqRel);
        if before >= limit_i {
            agent.streams_active.fetch_sub(1, Ordering::AcqRel);
            return Err(DialError::NodeBusy {
                node: agent.node.clone(),
                limit,
            });
        }
        Ok(StreamSlot(agent.clone()))
    }
}

impl std::fmt::Debug for StreamSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "StreamSlot({})", self.0.node)
    }
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        self.0.streams_active.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Why a tunneled connection could not be established.
#[derive(Debug, thiserror::Error)]
pub enum DialError {
    #[error("no live agent for {0}")]
    NoAgent(String),
    #[error("the agent of node {0} is draining")]
    Draining(String),
    #[error("node {node} has {limit} tunneled connections open through this ingress, its limit")]
    NodeBusy { node: String, limit: usize },
    #[error("cannot open a stream to node {node}: {source}")]
    Open {
        node: String,
        #[source]
        source: OpenError,
    },
    #[error("cannot send the dial for {target} to node {node}: {source}")]
    Send {
        node: String,
        target: SocketAddr,
        #[source]
        source: FrameError,
    },
    #[error("node {node} refused the dial to {target} ({code}): {message}")]
    Refused {
        node: String,
        target: SocketAddr,
        code: DialCode,
        message: String,
    },
    #[error("node {node} did not answer the dial to {target} within {after:?}")]
    Timeout {
        node: String,
        target: SocketAddr,
        after: Duration,
    },
    #[error("cannot connect to {target} directly (--direct-cidr): {source}")]
    Direct {
        target: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("no direct connection to {target} (--direct-cidr) within {after:?}")]
    DirectTimeout { target: String, after: Duration },
    #[error("node {node} broke the protocol while dialing {target}: {reason}")]
    Protocol {
        node: String,
        target: SocketAddr,
        reason: String,
    },
    #[error("the connection to node {node} was lost while dialing {target}: {reason}")]
    ConnectionLost {
        node: String,
        target: SocketAddr,
        reason: String,
    },
}

impl DialError {
    /// Stable label for the dial failure metric.
    pub fn label(&self) -> &'static str {
        match self {
            DialError::NoAgent(_) => "no_agent",
            DialError::Draining(_) => "draining",
            DialError::NodeBusy { .. } => "node_stream_limit",
            DialError::Open { .. } | DialError::Send { .. } => "open_failed",
            DialError::Refused { code, .. } => code.label(),
            DialError::Timeout { .. } => "timeout",
            DialError::Protocol { .. } => "protocol",
            DialError::ConnectionLost { .. } => "connection_lost",
            DialError::Direct { .. } => "direct_failed",
            DialError::DirectTimeout { .. } => "direct_timeout",
        }
    }
}

/// Added to the dial timeout (the agent's connect bound) for the round
/// trip to the agent and the stream open.
const ROUND_TRIP_MARGIN: Duration = Duration::from_secs(2);

/// Routes `target`, opens a stream to its agent and asks it to dial; see
/// the module doc for the deadline. Counts the outcome.
pub async fn dial(
    shared: &Arc<Shared>,
    target: &Target,
    mode: DialMode,
) -> Result<Dialed, DialError> {
    let started = Instant::now();
    let result: Result<Dialed, DialError> = async {
        let (agent, addr) = route(&shared.registry, target)?;
        // CONNECT leaves a reserve for the transparent path (the
        // apiserver's default route to kubelets), so a client holding idle
        // CONNECT tunnels cannot lock the apiserver out of a node.
        let limit = match mode {
            DialMode::Optimistic => shared.config.max_streams_per_node,
            DialMode::AwaitResult => shared
                .config
                .max_streams_per_node
                .saturating_sub(shared.config.transparent_stream_reserve),
        };
        let slot = StreamSlot::take(&agent, limit)?;
        let answer = match mode {
            DialMode::AwaitResult => Answer::Read,
            DialMode::Optimistic => {
                let shared = shared.clone();
                let node = agent.node.clone();
                Answer::Gate(Box::new(move |r| {
                    if let Err(e) = &r {
                        tracing::info!(%node, target = %addr, "dial failed: {e:?}");
                    }
                    // From the open, as for a waited-for dial, not from the gate.
                    let r = r.map(|_| started.elapsed()).map_err(|e| e.label());
                    record(&shared.metrics, r);
                }))
            }
        };
        let open = agent.link.open_stream();
        let stream = exchange(open, &agent.node, addr, shared.config.dial_timeout, answer).await?;
        Ok(Dialed {
            agent,
            target: addr,
            stream,
            slot,
        })
    }
    .await;
    match &result {
        // The gate reports the answer when it arrives.
        Ok(_) if mode == DialMode::Optimistic => {}
        Ok(_) => record(&shared.metrics, Ok(started.elapsed())),
        Err(e) => record(&shared.metrics, Err(e.label())),
    }
    result
}

/// The agent for `target` and the address to dial, without network I/O.
pub fn route(
    registry: &AgentRegistry,
    target: &Target,
) -> Result<(Arc<AgentHandle>, SocketAddr), DialError> {
    let found = |route: Route| match route {
        Route::Agent(agent) => Ok(agent),
        Route::Draining(node) => Err(DialError::Draining(node)),
        Route::NoAgent => Err(DialError::NoAgent(target.to_string())),
    };
    match target {
        Target::Address(a) => {
            // Registered addresses are canonical (IPv4, not IPv4-mapped).
            let addr = SocketAddr::new(canonical_ip(a.ip()), a.port());
            Ok((found(registry.by_address(addr.ip()))?, addr))
        }
        Target::Node { name, port } => {
            let agent = found(registry.by_node(name))?;
            let ip = agent.addresses.first().copied().ok_or_else(|| {
                DialError::NoAgent(format!(
                    "{target} (the node's certificate carries no address)"
                ))
            })?;
            Ok((agent, SocketAddr::new(ip, *port)))
        }
    }
}

/// How [`exchange`] takes the agent's answer.
enum Answer {
    /// Read the `DialResult` before returning.
    Read,
    /// Gate the halves ([`transport::gate::gate`]), reporting to this.
    Gate(OnResult),
}

/// The dial exchange on the stream `open` yields, under one deadline
/// (`dial_timeout` plus [`ROUND_TRIP_MARGIN`], from now): open, write
/// `Dial`, then read the answer or gate the receive half with what is left
/// of the deadline. Generic over the open so tests can use a fake stream.
async fn exchange(
    open: impl Future<Output = Result<TunnelStream, OpenError>>,
    node: &str,
    target: SocketAddr,
    dial_timeout: Duration,
    answer: Answer,
) -> Result<TunnelStream, DialError> {
    let bound = dial_timeout + ROUND_TRIP_MARGIN;
    let deadline = Instant::now() + bound;
    let steps = async {
        let mut stream = open.await.map_err(|source| DialError::Open {
            node: node.to_owned(),
            source,
        })?;
        let request = Message::Dial(DialRequest {
            target,
            deadline_ms: dial_timeout.as_millis().min(u32::MAX as u128) as u32,
            optimistic: matches!(answer, Answer::Gate(_)),
        });
        write_message(&mut stream.send, &request)
            .await
            .map_err(|source| DialError::Send {
                node: node.to_owned(),
                target,
                source,
            })?;
        match answer {
            Answer::Read => {
                read_answer(&mut stream, node, target).await?;
                Ok(stream)
            }
            Answer::Gate(on_result) => {
                let left = deadline.saturating_duration_since(Instant::now());
                let (recv, send) = gate(stream.recv, stream.send, left, on_result);
                Ok(TunnelStream {
                    send: Box::new(send),
                    recv: Box::new(recv),
                })
            }
        }
    };
    match tokio::time::timeout_at(deadline, steps).await {
        Ok(result) => result,
        Err(_) => Err(DialError::Timeout {
            node: node.to_owned(),
            target,
            after: bound,
        }),
    }
}

/// Reads the `DialResult`; anything but `ok` is an error.
async fn read_answer(
    stream: &mut TunnelStream,
    node: &str,
    target: SocketAddr,
) -> Result<(), DialError> {
    let protocol = |reason: String| DialError::Protocol {
        node: node.to_owned(),
        target,
        reason,
    };
    let mut buf = Vec::new();
    match read_message(&mut stream.recv, &mut buf).await {
        Ok(Message::DialResult(r)) if r.code == DialCode::Ok => Ok(()),
        Ok(Message::DialResult(r)) => Err(DialError::Refused {
            node: node.to_owned(),
            target,
            code: r.code,
            message: r.message,
        }),
        Ok(other) => Err(protocol(format!(
            "expected DialResult, got {}",
            other.kind()
        ))),
        Err(FrameError::Io(e)) if transport::gate::is_connection_lost(&e) => {
            Err(DialError::ConnectionLost {
                node: node.to_owned(),
                target,
                reason: e.to_string(),
            })
        }
        Err(e) => Err(protocol(e.to_string())),
    }
}

/// Counts one dial outcome: its duration, or the failure's label. The one
/// place the dial metrics are written.
fn record(metrics: &Metrics, outcome: Result<Duration, &'static str>) {
    match outcome {
        Ok(took) => metrics.dial_duration.observe(took.as_secs_f64()),
        Err(label) => metrics.dial_failed(label),
    }
}
