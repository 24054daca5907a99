//! The connection to one agent, whatever transport carries it.
//!
//! The transports differ only in how a stream is opened: QUIC opens a
//! bidirectional stream, HTTP/2 sends a `POST` whose path says what the
//! stream is for. Callers name the kind of stream ([`AgentLink::open_stream`],
//! [`AgentLink::open_control`]); only the HTTP/2 arm turns it into a path.

use std::net::SocketAddr;

use transport::TunnelStream;

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
    /// The agent's certificate chain (leaf first), as the handshake
    /// verified it: checked again when `ca.crt` changes. (A QUIC link asks
    /// its TLS session.)
    pub chain: std::sync::Arc<Vec<rustls::pki_types::CertificateDer<'static>>>,
    /// The connection's receive window (its share of the budget, lent
    /// credit); the connection task applies it.
    pub window: transport::window::ReceiveWindow,
}

impl AgentLink {
    /// The certificate chain the agent presented (leaf first).
    pub fn peer_chain(&self) -> Option<Vec<rustls::pki_types::CertificateDer<'static>>> {
        match self {
            AgentLink::Quic(c) => c
                .peer_identity()?
                .downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
                .ok()
                .map(|b| *b),
            AgentLink::H2(h) => Some(h.chain.as_ref().clone()),
        }
    }

    pub fn remote_address(&self) -> SocketAddr {
        match self {
            AgentLink::Quic(c) => c.remote_address(),
            AgentLink::H2(h) => h.remote,
        }
    }

    /// QUIC's view of the path now, its RTT estimate included (not
    /// measured over HTTP/2).
    pub fn path(&self) -> Option<quinn::PathStats> {
        match self {
            AgentLink::Quic(c) => Some(c.stats().path),
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

    /// Whether the connection is still up (closing counts as gone).
    pub fn is_open(&self) -> bool {
        match self {
            AgentLink::Quic(c) => c.close_reason().is_none(),
            AgentLink::H2(h) => !*h.closed.borrow(),
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

    /// Opens a stream for one tunneled connection (it starts with `Dial`).
    pub async fn open_stream(&self) -> Result<TunnelStream, OpenError> {
        self.open(StreamKind::Tunnel).await
    }

    /// Opens the control stream (HTTP/2 only: over QUIC the agent opens it).
    pub async fn open_control(&self) -> Result<TunnelStream, OpenError> {
        self.open(StreamKind::Control).await
    }

    async fn open(&self, kind: StreamKind) -> Result<TunnelStream, OpenError> {
        match self {
            AgentLink::Quic(c) => {
                let (send, recv) = c.open_bi().await?;
                Ok(TunnelStream::new(transport::QuicSend::new(send), recv))
            }
            AgentLink::H2(h) => {
                let mut send = h.send.clone().ready().await?;
                let mut request = http::Request::new(());
                *request.method_mut() = http::Method::POST;
                *request.uri_mut() = http::Uri::from_static(kind.h2_path());
                let (response, body) = send.send_request(request, false)?;
                Ok(TunnelStream::new(
                    transport::h2::H2Send::new(body),
                    transport::h2::H2Recv::Pending(response),
                ))
            }
        }
    }
}

/// What a stream the server opens is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum StreamKind {
    Control,
    Tunnel,
}

impl StreamKind {
    /// The request path that names the stream's purpose over HTTP/2.
    fn h2_path(self) -> &'static str {
        match self {
            StreamKind::Control => "/control",
            StreamKind::Tunnel => "/stream",
        }
    }
}

/// Why a stream could not be opened: the connection is gone or refuses
/// new streams.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("QUIC: {0}")]
    Quic(#[from] quinn::ConnectionError),
    #[error("HTTP/2: {0}")]
    H2(#[from] h2::Error),
}
