//! Protocol messages.
//!
//! The control stream (opened by the agent) carries `Hello` → `Welcome` or
//! `Refuse`, and later `Drain`, `GoAway` and `Replicas`. Every tunneled connection is one stream
//! opened by the server that starts with a `Dial`, answered by a
//! `DialResult`; after that the stream carries raw bytes both ways.

use std::fmt;
use std::net::{IpAddr, SocketAddr};

/// One protocol message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Message {
    Hello(Hello),
    Welcome(Welcome),
    Refuse(Refusal),
    Dial(DialRequest),
    DialResult(DialResult),
    /// On the control stream, either way. Agent → server: route no new
    /// streams to me; the streams already open will finish. Server →
    /// agent (minor version 1): this server is shutting down; its open
    /// streams finish (it may still open a few), then it closes the
    /// connection: hold another replica meanwhile. Older agents ignore it.
    Drain,
    /// Server → agent on the control stream, just before it closes the
    /// connection: why (a `codes::close` value), so the agent can react
    /// (for example not fight another agent with the same identity).
    GoAway(GoAway),
    /// Minor version 2. Agent → server, the first message on the control
    /// stream of a connection that presented no client certificate: a
    /// bootstrap token and a CSR. Answered by `Issued` or `Refuse`.
    Enroll(Enroll),
    /// Minor version 2. Agent → server, the first message on the control
    /// stream of a connection authenticated by the agent's current
    /// certificate, instead of `Hello`: a CSR for the same identity.
    /// Answered by `Issued` or `Refuse`.
    Renew(Renew),
    /// Server → agent: the certificate signed for an `Enroll` or `Renew`,
    /// and the CA bundle to verify servers with.
    Issued(Issued),
    /// Minor version 5. Server → agent on the control stream, after
    /// `Welcome`, to agents whose `Hello` says minor 5 or later: how many
    /// replicas exist now (as `Welcome.replicas`), sent when the count
    /// changes, so an agent behind a load balancer holds as many
    /// connections as there are replicas without reconnecting.
    Replicas(u16),
}

/// A request to enroll: a bootstrap token and a certificate signing
/// request (DER, PKCS#10) for the node name and addresses.
#[derive(Clone, PartialEq, Eq)]
pub struct Enroll {
    pub version_major: u8,
    pub version_minor: u8,
    /// `ID.SECRET`.
    pub token: String,
    /// DER-encoded PKCS#10 request: CN = node name, IP SANs = addresses.
    pub csr: Vec<u8>,
}

impl fmt::Debug for Enroll {
    /// Never prints the token's secret.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let id = self.token.split('.').next().unwrap_or("");
        f.debug_struct("Enroll")
            .field("version_major", &self.version_major)
            .field("version_minor", &self.version_minor)
            .field("token_id", &id)
            .field("csr_len", &self.csr.len())
            .finish()
    }
}

/// A renewal: a CSR (DER) for the identity of the certificate the
/// connection was authenticated with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Renew {
    pub csr: Vec<u8>,
}

/// A signed certificate (PEM, leaf first) and the CA bundle (PEM) the
/// agent verifies servers with from now on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Issued {
    pub certificate: String,
    pub ca: String,
}

/// Why the server is about to close the connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GoAway {
    pub code: u32,
    pub reason: String,
}

impl Message {
    /// A short name for logs and errors.
    pub fn kind(&self) -> &'static str {
        match self {
            Message::Hello(_) => "Hello",
            Message::Welcome(_) => "Welcome",
            Message::Refuse(_) => "Refuse",
            Message::Dial(_) => "Dial",
            Message::DialResult(_) => "DialResult",
            Message::Drain => "Drain",
            Message::GoAway(_) => "GoAway",
            Message::Enroll(_) => "Enroll",
            Message::Renew(_) => "Renew",
            Message::Issued(_) => "Issued",
            Message::Replicas(_) => "Replicas",
        }
    }
}

/// First message of the agent on its control stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hello {
    pub version_major: u8,
    pub version_minor: u8,
    /// The node name the agent believes it serves. The server checks it
    /// against the certificate: the certificate is the identity.
    pub node: String,
    /// Addresses the agent wants to serve; each must be in its certificate.
    pub addresses: Vec<IpAddr>,
    /// Bit set of [`crate::capability`] flags.
    pub capabilities: u32,
    /// Minor version 1 (absent from an older agent's `Hello`: 0 and
    /// empty). A random id of the agent process: a server that has a live
    /// connection of this node from the same process refuses a second one
    /// with [`RefuseCode::AlreadyConnected`] (a load balancer sent another
    /// of the agent's connections here) instead of replacing it, as it
    /// replaces a connection of a restarted agent. 0: unknown.
    pub instance: u64,
    /// The server id this connection's predecessor was registered with
    /// and lost (empty if none): a server with that id replaces its stale
    /// connection from the same process (a path cut it saw no end of).
    /// With [`crate::capability::HANDOVER`]: the server id of the live
    /// connection this one takes over from (empty from agents before
    /// 2026-12-07); another server refuses the handover as a duplicate.
    pub previous: String,
}

/// The server's acceptance of a [`Hello`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Welcome {
    pub version_major: u8,
    pub version_minor: u8,
    /// Stable id of this server replica.
    pub server_id: String,
    /// How many replicas the server knows exist (`--server-count`, or its
    /// peers in DNS), so an agent given one address (a load balancer)
    /// keeps dialing it until it holds that many distinct `server_id`s.
    /// 0: unknown. Minor version 1; absent from an older server's
    /// `Welcome`, read as 0.
    pub replicas: u16,
}

/// Why a registration was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RefuseCode {
    /// The agent speaks a major version the server does not.
    UnsupportedVersion,
    /// The node name in the Hello is not the certificate's common name.
    NodeMismatch,
    /// The Hello claims an address the certificate does not carry.
    AddressNotInCertificate,
    /// The Hello claims an address this server never routes to an edge
    /// (loopback, link-local, its own, outside the allowed edge range).
    AddressNotAllowed,
    /// The certificate carries no usable identity.
    BadCertificate,
    /// Another node's live agent serves one of the claimed addresses (two
    /// certificates carry it); the reason names the address and that node.
    AddressInUse,
    /// The server is shutting down (draining): try another replica.
    ServerDraining,
    /// The same agent process has a live connection to this server
    /// already: this one is a duplicate (a load balancer picked a replica
    /// the agent holds, or two of its dials met here); try again for
    /// another.
    AlreadyConnected,
    /// An `Enroll` or `Renew` was refused (bad, expired or used-up token,
    /// a CSR for another node or for addresses outside the allowed range,
    /// enrollment not configured); the reason says which.
    EnrollmentRefused,
    /// A newer agent process on the same node took this node over from
    /// this process ([`capability::SUCCESSOR`]) and is still connected:
    /// this process is on its way out (a rolling update).
    ///
    /// [`capability::SUCCESSOR`]: crate::capability::SUCCESSOR
    Superseded,
    /// A code this build does not know; carried through, not rejected.
    Other(u16),
}

impl RefuseCode {
    pub fn to_wire(self) -> u16 {
        match self {
            RefuseCode::UnsupportedVersion => 1,
            RefuseCode::NodeMismatch => 2,
            RefuseCode::AddressNotInCertificate => 3,
            RefuseCode::AddressNotAllowed => 6,
            RefuseCode::BadCertificate => 4,
            RefuseCode::AddressInUse => 5,
            RefuseCode::ServerDraining => 7,
            RefuseCode::AlreadyConnected => 8,
            RefuseCode::EnrollmentRefused => 9,
            RefuseCode::Superseded => 10,
            RefuseCode::Other(c) => c,
        }
    }

    pub fn from_wire(code: u16) -> Self {
        match code {
            1 => RefuseCode::UnsupportedVersion,
            2 => RefuseCode::NodeMismatch,
            3 => RefuseCode::AddressNotInCertificate,
            6 => RefuseCode::AddressNotAllowed,
            4 => RefuseCode::BadCertificate,
            5 => RefuseCode::AddressInUse,
            7 => RefuseCode::ServerDraining,
            8 => RefuseCode::AlreadyConnected,
            9 => RefuseCode::EnrollmentRefused,
            10 => RefuseCode::Superseded,
            c => RefuseCode::Other(c),
        }
    }

    /// A stable label for metrics.
    pub fn label(self) -> &'static str {
        match self {
            RefuseCode::UnsupportedVersion => "unsupported_version",
            RefuseCode::NodeMismatch => "node_mismatch",
            RefuseCode::AddressNotInCertificate => "address_not_in_certificate",
            RefuseCode::AddressNotAllowed => "address_not_allowed",
            RefuseCode::BadCertificate => "bad_certificate",
            RefuseCode::AddressInUse => "address_in_use",
            RefuseCode::ServerDraining => "server_draining",
            RefuseCode::AlreadyConnected => "already_connected",
            RefuseCode::EnrollmentRefused => "enrollment_refused",
            RefuseCode::Superseded => "superseded",
            RefuseCode::Other(_) => "other",
        }
    }
}

/// A refused registration, with a reason a person can act on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    pub code: RefuseCode,
    pub reason: String,
}

/// Server → agent, first frame of a tunneled stream: connect to `target`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DialRequest {
    pub target: SocketAddr,
    /// How long the agent may spend connecting, in milliseconds.
    pub deadline_ms: u32,
    /// The server relays the client's bytes without waiting for the
    /// `DialResult` (a transparent connection): the agent may send an `ok`
    /// together with the target's first bytes. Added in minor version 3;
    /// an older server's `Dial` has no flags, and means `false`.
    pub optimistic: bool,
}

/// Bits of the `Dial` flags byte.
pub mod dial_flags {
    /// [`super::DialRequest::optimistic`].
    pub const OPTIMISTIC: u8 = 1;
}

/// Outcome of a dial, as reported by the agent.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DialCode {
    Ok,
    /// The target is not on the agent's allow-list.
    NotAllowed,
    /// The target refused the connection.
    Refused,
    /// The connect did not complete before the deadline.
    Timeout,
    /// No route, host down, or another network error.
    Unreachable,
    /// The agent is draining and takes no new streams.
    Draining,
    /// A code this build does not know.
    Other(u8),
}

impl DialCode {
    pub fn to_wire(self) -> u8 {
        match self {
            DialCode::Ok => 0,
            DialCode::NotAllowed => 1,
            DialCode::Refused => 2,
            DialCode::Timeout => 3,
            DialCode::Unreachable => 4,
            DialCode::Draining => 5,
            DialCode::Other(c) => c,
        }
    }

    pub fn from_wire(code: u8) -> Self {
        match code {
            0 => DialCode::Ok,
            1 => DialCode::NotAllowed,
            2 => DialCode::Refused,
            3 => DialCode::Timeout,
            4 => DialCode::Unreachable,
            5 => DialCode::Draining,
            c => DialCode::Other(c),
        }
    }

    /// A stable label for metrics.
    pub fn label(self) -> &'static str {
        match self {
            DialCode::Ok => "ok",
            DialCode::NotAllowed => "not_allowed",
            DialCode::Refused => "refused",
            DialCode::Timeout => "timeout",
            DialCode::Unreachable => "unreachable",
            DialCode::Draining => "draining",
            DialCode::Other(_) => "other",
        }
    }
}

impl fmt::Display for DialCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.label())
    }
}

/// Agent → server answer to a [`DialRequest`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DialResult {
    pub code: DialCode,
    /// Empty on success; otherwise why, for the person at the other end.
    pub message: String,
}

impl DialResult {
    pub fn ok() -> Self {
        DialResult {
            code: DialCode::Ok,
            message: String::new(),
        }
    }

    pub fn error(code: DialCode, message: impl Into<String>) -> Self {
        DialResult {
            code,
            message: message.into(),
        }
    }
}
