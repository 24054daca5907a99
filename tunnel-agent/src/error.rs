//! How connection attempts fail and how registered connections end, as
//! types the reconnect loop and the transport selector decide on.

use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

use proto::codes::close;

use crate::config::ConfigError;
use crate::selector::{FailureKind, Transport};

/// Why the agent as a whole could not start.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("cannot bind the QUIC client socket: {0}")]
    Endpoint(String),
    #[error("cannot listen on the admin address {addr}: {reason}")]
    Admin { addr: SocketAddr, reason: String },
    #[error(transparent)]
    InstanceLock(#[from] crate::instance_lock::LockError),
    #[error("no --server address resolved: {0}")]
    Resolve(String),
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error(transparent)]
    Config(#[from] ConfigError),
}

/// A connection attempt that did not end in a registration.
#[derive(Debug, thiserror::Error)]
#[error("{transport} to {addr}: {detail}")]
pub struct ConnectError {
    pub transport: Transport,
    pub addr: SocketAddr,
    pub kind: FailureKind,
    /// What happened, for a person.
    pub detail: String,
    /// The server's refusal code, when it refused the registration.
    pub refusal: Option<proto::RefuseCode>,
}

impl ConnectError {
    pub fn new(
        transport: Transport,
        addr: SocketAddr,
        kind: FailureKind,
        detail: impl Into<String>,
    ) -> Self {
        ConnectError {
            transport,
            addr,
            kind,
            detail: detail.into(),
            refusal: None,
        }
    }

    /// The attempt took longer than `after`.
    pub fn timeout(transport: Transport, addr: SocketAddr, after: Duration) -> Self {
        let hint = match transport {
            Transport::Quic => "UDP blocked or server down?",
            Transport::H2 => "TCP filtered or server down?",
        };
        Self::new(
            transport,
            addr,
            FailureKind::Timeout,
            format!("no answer from {addr} within {after:?} ({hint})"),
        )
    }

    /// The server refused the registration (`code` names why).
    pub fn refused(transport: Transport, addr: SocketAddr, refusal: proto::Refusal) -> Self {
        ConnectError {
            refusal: Some(refusal.code),
            ..Self::new(
                transport,
                addr,
                FailureKind::Refused,
                format!(
                    "registration refused by the server ({}): {}",
                    refusal.code.label(),
                    refusal.reason
                ),
            )
        }
    }
}

/// Why a registered connection ended without being drained.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LostReason {
    /// Nothing arrived for the idle timeout (QUIC), or TCP gave up.
    IdleTimeout,
    /// The server said why before closing (`GoAway`).
    GoAway(proto::GoAway),
    /// The server closed the connection with an application code.
    ClosedByServer { code: u32, reason: String },
    /// The server no longer knows the connection (it restarted).
    Reset,
    /// Anything else: the connection or its control stream failed.
    Failed(String),
}

impl LostReason {
    /// Another agent with this node's identity took over.
    pub fn replaced(&self) -> bool {
        match self {
            LostReason::GoAway(g) => g.code == close::REPLACED,
            LostReason::ClosedByServer { code, .. } => *code == close::REPLACED,
            _ => false,
        }
    }

    pub fn from_quic(e: &quinn::ConnectionError) -> Self {
        use quinn::ConnectionError as E;
        match e {
            E::TimedOut => LostReason::IdleTimeout,
            E::Reset => LostReason::Reset,
            E::ApplicationClosed(c) => LostReason::ClosedByServer {
                code: u32::try_from(c.error_code.into_inner()).unwrap_or(u32::MAX),
                reason: String::from_utf8_lossy(&c.reason).into_owned(),
            },
            other => LostReason::Failed(other.to_string()),
        }
    }
}

impl fmt::Display for LostReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LostReason::IdleTimeout => f.write_str("no packet within the idle timeout"),
            LostReason::GoAway(g) => write!(f, "the server closes the connection: {}", g.reason),
            LostReason::ClosedByServer { code, reason } => {
                write!(
                    f,
                    "the server closed the connection (code {code}): {reason}"
                )
            }
            LostReason::Reset => {
                f.write_str("the server no longer knows this connection (it restarted)")
            }
            LostReason::Failed(why) => f.write_str(why),
        }
    }
}

/// How a registered session ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SessionEnd {
    /// Drain was asked for and the session drained.
    Drained,
    /// The connection ended for this reason.
    Lost(LostReason),
}
