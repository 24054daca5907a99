//! The connection to one agent, whatever transport carries it, and the
//! dial exchange that opens a tunneled stream over it.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use proto::{DialCode, DialRequest, Message};
use transport::{read_message, write_message, TunnelStream};

/// An agent connection.
#[derive(Clone)]
pub enum AgentLink {
    Quic(quinn::Connection),
    H2(H2Link),
}

/// The cloud (HTTP/2 client) side of an HTTP/2-over-TLS agent connection.
#[derive(Clone)]
pub struct H2Link {
    pub send: h2::client::SendRequest<bytes::Bytes>,
    pub remote: SocketAddr,
    /// Tells the connection task to drop the connection.
    pub shutdown: std::sync::Arc<tokio::sync::Notify>,
    /// Turns true when the connection is gone.
    pub closed: tokio::sync::watch::Receiver<bool>,
    /// Lends receive window to stalled streams; the connection task
    /// applies it.
    pub stall: transport::stall::StallCredit,
}

impl AgentLink {
    pub fn remote_address(&self) -> SocketAddr {
        match self {
            AgentLink::Quic(c) => c.remote_address(),
            AgentLink::H2(h) => h.remote,
        }
    }

    /// Round-trip time (QUIC's estimate; not measured over HTTP/2).
    pub fn rtt(&self) -> Option<Duration> {
        match self {
            AgentLink::Quic(c) => Some(c.rtt()),
            AgentLink::H2(_) => None,
        }
    }

    pub fn transport(&self) -> &'static str {
        match self {
            AgentLink::Quic(_) => "quic",
            AgentLink::H2(_) => "h2",
        }
    }

    pub fn close(&self, code: u32, reason: &str) {
        match self {
            AgentLink::Quic(c) => c.close(quinn::VarInt::from_u32(code), reason.as_bytes()),
            AgentLink::H2(h) => h.shutdown.notify_one(),
        }
    }

    /// Completes when the connection is gone.
    pub async fn closed(&self) -> String {
        match self {
            AgentLink::Quic(c) => c.closed().await.to_string(),
            AgentLink::H2(h) => {
                let mut closed = h.closed.clone();
                let _ = closed.wait_for(|c| *c).await;
                "HTTP/2 connection closed".to_owned()
            }
        }
    }

    /// Opens the raw stream for a control exchange or a tunneled connection.
    pub async fn open(&self, path: &'static str) -> Result<TunnelStream, String> {
        match self {
            AgentLink::Quic(c) => {
                let (send, recv) = c.open_bi().await.map_err(|e| e.to_string())?;
                Ok(TunnelStream::new(send, recv))
            }
            AgentLink::H2(h) => {
                let mut send = h.send.clone().ready().await.map_err(|e| e.to_string())?;
                let request = http::Request::post(path)
                    .body(())
                    .map_err(|e| e.to_string())?;
                let (response, body) = send
                    .send_request(request, false)
                    .map_err(|e| e.to_string())?;
                Ok(TunnelStream::new(
                    transport::h2::H2Send::new(body),
                    transport::h2::H2Recv::Pending(response),
                ))
            }
        }
    }
}

/// Why a tunneled connection could not be established.
#[derive(Debug, thiserror::Error)]
pub enum DialError {
    #[error("no live agent for {0}")]
    NoAgent(String),
    #[error("the agent of node {0} is draining")]
    Draining(String),
    #[error("cannot open a stream to node {node}: {reason}")]
    Open { node: String, reason: String },
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
    #[error("node {node} broke the protocol while dialing {target}: {reason}")]
    Protocol {
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
            DialError::Open { .. } => "open_failed",
            DialError::Refused { code, .. } => code.label(),
            DialError::Timeout { .. } => "timeout",
            DialError::Protocol { .. } => "protocol",
        }
    }
}

/// How long to wait for a `DialResult`: the agent's connect deadline plus
/// a margin for the round trip.
pub fn answer_bound(deadline: Duration) -> Duration {
    deadline + Duration::from_secs(2)
}

/// Opens a stream to `node` and writes the `Dial`, without waiting for the
/// answer (the caller reads it: [`dial`], or a `ResultGate`).
pub async fn request(
    link: &AgentLink,
    node: &str,
    target: SocketAddr,
    deadline: Duration,
) -> Result<TunnelStream, DialError> {
    let mut stream = link
        .open("/stream")
        .await
        .map_err(|reason| DialError::Open {
            node: node.to_owned(),
            reason,
        })?;
    let request = Message::Dial(DialRequest {
        target,
        deadline_ms: deadline.as_millis().min(u32::MAX as u128) as u32,
    });
    write_message(&mut stream.send, &request)
        .await
        .map_err(|e| DialError::Protocol {
            node: node.to_owned(),
            target,
            reason: e.to_string(),
        })?;
    Ok(stream)
}

/// Opens a stream to `node` over `link`, asks the agent to dial `target`
/// and waits for its answer, at most `deadline` plus a margin for the
/// round trip. On success the stream is ready for raw bytes.
pub async fn dial(
    link: &AgentLink,
    node: &str,
    target: SocketAddr,
    deadline: Duration,
) -> Result<(TunnelStream, Duration), DialError> {
    let started = Instant::now();
    let bound = answer_bound(deadline);
    let exchange = async {
        let mut stream = request(link, node, target, deadline).await?;
        let protocol = |reason: String| DialError::Protocol {
            node: node.to_owned(),
            target,
            reason,
        };
        let mut buf = Vec::new();
        match read_message(&mut stream.recv, &mut buf).await {
            Ok(Message::DialResult(r)) if r.code == DialCode::Ok => Ok(stream),
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
            Err(e) => Err(protocol(e.to_string())),
        }
    };
    match tokio::time::timeout(bound, exchange).await {
        Ok(Ok(stream)) => Ok((stream, started.elapsed())),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(DialError::Timeout {
            node: node.to_owned(),
            target,
            after: bound,
        }),
    }
}
