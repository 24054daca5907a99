//! One registered connection to a server replica, whatever transport
//! carries it: the agent-side twin of the server's `AgentLink`.
//!
//! Over QUIC the server opens one bidirectional stream per tunneled
//! connection. Over HTTP/2 the agent *serves* HTTP/2 on the TLS
//! connection it dialed, and the server opens one `/stream` request per
//! tunneled connection; the HTTP/2 connection only moves while it is
//! polled, which [`Carrier::accept`] does (and it applies the window the
//! stall credit asks for). Everything above — the serve and drain loop in
//! [`crate::serve`] — is written once.

use std::future::poll_fn;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use proto::codes::close;
use tokio::net::TcpStream;
use transport::h2::{H2Recv, H2Send};
use transport::quic::StreamLimit;
use transport::window::{H2Window, ReceiveWindow};
use transport::{TunnelRecv, TunnelSend};

use crate::dial::DialPolicy;
use crate::error::LostReason;
use crate::selector::Transport;

/// The agent's (server) side of an HTTP/2 connection it dialed.
pub(crate) type H2Conn = h2::server::Connection<tokio_rustls::client::TlsStream<TcpStream>, Bytes>;

/// How long a closed QUIC connection's socket is kept for the close to
/// leave (quinn holds it until the peer acknowledges or 3 PTOs pass).
const QUIC_CLOSE_TIMEOUT: Duration = Duration::from_secs(1);

/// How long a closing HTTP/2 connection may take to say goodbye.
const H2_CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

/// A registered connection, ready to serve tunneled streams.
pub struct ServerConnection {
    pub(crate) carrier: Carrier,
    pub(crate) control_send: Box<dyn TunnelSend>,
    pub(crate) control_recv: Box<dyn TunnelRecv>,
    /// Lends connection credit to streams whose target stopped reading.
    pub(crate) window: ReceiveWindow,
    /// What streams of this connection may dial.
    pub(crate) policy: Arc<DialPolicy>,
    /// How long open streams may run on once draining starts.
    pub(crate) drain_grace: Duration,
    pub welcome: proto::Welcome,
    pub addr: SocketAddr,
}

impl ServerConnection {
    pub fn transport(&self) -> Transport {
        self.carrier.transport()
    }

    /// Closes the connection at once with `code` (no drain).
    pub async fn close(self, code: u32, reason: &'static str) {
        self.carrier.close(code, reason).await
    }
}

/// The transport under a [`ServerConnection`].
pub(crate) enum Carrier {
    /// The connection and its own endpoint (a UDP socket of its own; see
    /// [`crate::replica::ServerConnector`]).
    Quic(quinn::Connection, quinn::Endpoint, StreamLimit),
    H2 {
        conn: Box<H2Conn>,
        /// Window changes asked for by the stall credit.
        window: H2Window,
        /// Streams accepted so far (stream ids for logs).
        accepted: u64,
    },
}

/// A tunneled stream the server opened.
pub(crate) enum Incoming {
    Quic(transport::QuicSend, quinn::RecvStream),
    /// With the number of streams accepted on the connection so far.
    H2(H2Send, H2Recv, u64),
}

impl Incoming {
    /// An id for the stream's log span.
    pub(crate) fn id(&self) -> String {
        match self {
            Incoming::Quic(send, _) => send.id().to_string(),
            Incoming::H2(_, _, n) => format!("h2-{n}"),
        }
    }
}

impl Carrier {
    pub(crate) fn transport(&self) -> Transport {
        match self {
            Carrier::Quic(..) => Transport::Quic,
            Carrier::H2 { .. } => Transport::H2,
        }
    }

    /// The next stream the server opens, or why the connection ended.
    /// Cancel-safe.
    pub(crate) async fn accept(&mut self) -> Result<Incoming, LostReason> {
        match self {
            Carrier::Quic(conn, ..) => match conn.accept_bi().await {
                Ok((send, recv)) => Ok(Incoming::Quic(transport::QuicSend::new(send), recv)),
                Err(e) => Err(LostReason::from_quic(&e)),
            },
            Carrier::H2 {
                conn,
                window,
                accepted,
            } => loop {
                tokio::select! {
                    request = conn.accept() => {
                        let (request, mut respond) = match request {
                            Some(Ok(r)) => r,
                            Some(Err(e)) => return Err(lost_h2(&e)),
                            None => return Err(LostReason::ClosedByServer {
                                code: close::NORMAL,
                                reason: "the server closed the HTTP/2 connection".into(),
                            }),
                        };
                        if request.uri().path() != "/stream" {
                            respond.send_reset(h2::Reason::REFUSED_STREAM);
                            continue;
                        }
                        match respond.send_response(http::Response::new(()), false) {
                            Ok(send) => {
                                *accepted += 1;
                                return Ok(Incoming::H2(
                                    H2Send::new(send),
                                    H2Recv::body(request.into_body()),
                                    *accepted,
                                ));
                            }
                            Err(e) => tracing::debug!("cannot answer a stream: {e}"),
                        }
                    }
                    size = window.next() => conn.set_target_window_size(size),
                }
            },
        }
    }

    /// Tells the transport how many streams are open now: over QUIC the
    /// grant grows with them ([`StreamLimit`]). HTTP/2 grants its limit
    /// at once (h2 allocates nothing for it).
    pub(crate) fn streams_open(&mut self, open: usize) {
        if let Carrier::Quic(conn, _, limit) = self {
            if let Some(granted) = limit.grow(open) {
                conn.set_max_concurrent_bi_streams(quinn::VarInt::from_u32(granted));
                tracing::info!(open, granted, "raised the server's stream limit");
            }
        }
    }

    /// Why the connection ended, if the transport knows.
    pub(crate) fn lost_reason(&self) -> Option<LostReason> {
        match self {
            Carrier::Quic(conn, ..) => conn.close_reason().map(|e| LostReason::from_quic(&e)),
            Carrier::H2 { .. } => None,
        }
    }

    /// Closes the connection: QUIC at once with `code` (and a bounded wait
    /// for the close to leave its socket, so an exiting agent's close
    /// reaches the server), HTTP/2 with a GOAWAY and a bounded wait for
    /// the server to see it.
    pub(crate) async fn close(self, code: u32, reason: &'static str) {
        match self {
            Carrier::Quic(conn, endpoint, _) => {
                conn.close(quinn::VarInt::from_u32(code), reason.as_bytes());
                drop(conn);
                let _ = tokio::time::timeout(QUIC_CLOSE_TIMEOUT, endpoint.wait_idle()).await;
            }
            Carrier::H2 { mut conn, .. } => {
                conn.graceful_shutdown();
                let _ = tokio::time::timeout(H2_CLOSE_TIMEOUT, poll_fn(|cx| conn.poll_closed(cx)))
                    .await;
            }
        }
    }
}

fn lost_h2(e: &h2::Error) -> LostReason {
    if let Some(io) = e.get_io() {
        if io.kind() == std::io::ErrorKind::TimedOut {
            return LostReason::IdleTimeout;
        }
    }
    // An HTTP/2 GOAWAY code is not a `proto::codes::close` value (the
    // server says why on the control stream, `GoAway`, before it closes).
    LostReason::Failed(format!("HTTP/2: {e}"))
}
