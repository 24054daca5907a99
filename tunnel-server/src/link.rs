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
}

impl AgentLink {
    pub fn remote_address(&self) -> SocketAddr {
        match self {
            AgentLink::Quic(c) => c.remote_address(),
        }
    }

    pub fn rtt(&self) -> Duration {
        match self {
            AgentLink::Quic(c) => c.rtt(),
        }
    }

    pub fn transport(&self) -> &'static str {
        match self {
            AgentLink::Quic(_) => "quic",
        }
    }

    pub fn close(&self, code: u32, reason: &str) {
        match self {
            AgentLink::Quic(c) => c.close(quinn::VarInt::from_u32(code), reason.as_bytes()),
        }
    }

    async fn open(&self) -> Result<TunnelStream, String> {
        match self {
            AgentLink::Quic(c) => {
                let (send, recv) = c.open_bi().await.map_err(|e| e.to_string())?;
                Ok(TunnelStream::new(send, recv))
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
    let bound = deadline + Duration::from_secs(2);
    let exchange = async {
        let mut stream = link.open().await.map_err(|reason| DialError::Open {
            node: node.to_owned(),
            reason,
        })?;
        let request = Message::Dial(DialRequest {
            target,
            deadline_ms: deadline.as_millis().min(u32::MAX as u128) as u32,
        });
        let protocol = |reason: String| DialError::Protocol {
            node: node.to_owned(),
            target,
            reason,
        };
        write_message(&mut stream.send, &request)
            .await
            .map_err(|e| protocol(e.to_string()))?;
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
