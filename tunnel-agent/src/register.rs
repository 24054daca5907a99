//! Connecting to one replica and registering: the handshake of either
//! transport, then `Hello` → `Welcome` (or `Refuse`) on the control
//! stream. The caller bounds the whole attempt.

use std::future::poll_fn;
use std::sync::Arc;

use proto::codes::close;
use proto::{Hello, Message};
use tokio::net::TcpStream;
use transport::h2::{H2Recv, H2Send, H2Settings};
use transport::{read_message, write_message, TunnelRecv, TunnelSend};

use crate::config::{AgentConfig, Credentials};
use crate::connection::{Carrier, H2Conn, ServerConnection};
use crate::diagnose;
use crate::dial::DialPolicy;
use crate::error::ConnectError;
use crate::resolve::Target;
use crate::selector::{FailureKind, Transport};
use crate::telemetry::AgentMetrics;

/// What a registration needs besides the transport.
pub struct Registration<'a> {
    pub config: &'a AgentConfig,
    pub credentials: Credentials,
    pub metrics: &'a Arc<AgentMetrics>,
    pub target: &'a Target,
    /// Ask the server to let this agent's previous connection finish its
    /// streams (a transport switch).
    pub handover: bool,
    /// This agent process's random id (`Hello.instance`).
    pub instance: u64,
    /// The server id this connection's predecessor was lost to
    /// (`Hello.previous`; empty if none).
    pub previous: String,
}

impl Registration<'_> {
    fn err(&self, transport: Transport, kind: FailureKind, detail: String) -> ConnectError {
        ConnectError::new(transport, self.target.addr, kind, detail)
    }

    fn policy(&self) -> Arc<DialPolicy> {
        Arc::new(DialPolicy {
            node: self.credentials.node.clone(),
            allow: self.credentials.allow.clone(),
            dial_timeout: self.config.dial_timeout,
            result_hold: self.config.result_hold,
            metrics: self.metrics.clone(),
            buffers: self.config.relay_buffers.clone(),
            stream_order: self.config.quic.stream_order,
            server: self.target.addr,
            connection: self.config.open_streams.connection(),
            open: self.config.open_streams.clone(),
            max_open: usize::try_from(self.config.quic.max_streams).unwrap_or(usize::MAX),
        })
    }

    fn hello(&self) -> Message {
        let mut capabilities = 0;
        if self.handover {
            capabilities |= proto::capability::HANDOVER;
        }
        if self.config.predecessor.alive() {
            capabilities |= proto::capability::SUCCESSOR;
        }
        Message::Hello(Hello {
            version_major: proto::VERSION_MAJOR,
            version_minor: proto::VERSION_MINOR,
            node: self.credentials.node.clone(),
            addresses: self.credentials.addresses.clone(),
            capabilities,
            instance: self.instance,
            previous: self.previous.clone(),
        })
    }

    /// Registers over QUIC.
    pub async fn quic(self, endpoint: &quinn::Endpoint) -> Result<ServerConnection, ConnectError> {
        let t = Transport::Quic;
        let tls = self
            .credentials
            .tls(proto::ALPN)
            .map_err(|e| self.err(t, FailureKind::Local, e.to_string()))?;
        let (conn, mut send, mut recv) = open_quic(self.config, self.target, endpoint, tls).await?;
        let quic_err = |e: &quinn::ConnectionError| {
            let (kind, detail) = diagnose::quic(e);
            self.err(t, kind, detail)
        };
        match self.hello_exchange(t, &mut send, &mut recv).await {
            Ok(welcome) => Ok(ServerConnection {
                window: transport::window::ReceiveWindow::quic(
                    &conn,
                    &self.config.quic,
                    &self.config.receive_budget,
                ),
                carrier: Carrier::Quic(
                    conn,
                    endpoint.clone(),
                    transport::quic::StreamLimit::new(self.config.quic.max_streams),
                ),
                control_send: Box::new(send),
                control_recv: Box::new(recv),
                policy: self.policy(),
                drain_grace: self.config.drain_grace,
                welcome,
                addr: self.target.addr,
            }),
            Err(e) => {
                // A close during registration says more than the stream error.
                let e = match (e.kind, conn.close_reason()) {
                    (FailureKind::Protocol, Some(reason)) => quic_err(&reason),
                    (_, _) => e,
                };
                conn.close(quinn::VarInt::from_u32(close::REFUSED), b"not registered");
                Err(e)
            }
        }
    }

    /// Registers over HTTP/2 over TLS: dial TCP + TLS, then serve HTTP/2
    /// on it; the server's first request is `/control`.
    pub async fn h2(self) -> Result<ServerConnection, ConnectError> {
        let t = Transport::H2;
        let tls = self
            .credentials
            .tls(proto::ALPN_H2)
            .map_err(|e| self.err(t, FailureKind::Local, e.to_string()))?;
        let (mut conn, mut send, mut recv, settings, _) =
            open_h2(self.config, self.target, tls).await?;
        // The connection must be driven while the control exchange runs.
        let welcome = tokio::select! {
            r = self.hello_exchange(t, &mut send, &mut recv) => r?,
            r = poll_fn(|cx| conn.poll_closed(cx)) => {
                let detail = format!("the server closed the HTTP/2 connection: {r:?}");
                return Err(self.err(t, FailureKind::Refused, detail));
            }
        };
        let (receive, window) =
            transport::window::ReceiveWindow::h2(&settings, &self.config.receive_budget);
        Ok(ServerConnection {
            carrier: Carrier::H2 {
                conn: Box::new(conn),
                window,
                accepted: 0,
            },
            control_send: Box::new(send),
            control_recv: Box::new(recv),
            window: receive,
            policy: self.policy(),
            drain_grace: self.config.drain_grace,
            welcome,
            addr: self.target.addr,
        })
    }

    /// Sends `Hello` on the control stream and reads the answer.
    async fn hello_exchange<S: TunnelSend, R: TunnelRecv>(
        &self,
        t: Transport,
        send: &mut S,
        recv: &mut R,
    ) -> Result<proto::Welcome, ConnectError> {
        let protocol = |detail: String| self.err(t, FailureKind::Protocol, detail);
        write_message(send, &self.hello())
            .await
            .map_err(|e| protocol(format!("registration failed: {e}")))?;
        let mut buf = Vec::new();
        match read_message(recv, &mut buf).await {
            Ok(Message::Welcome(welcome)) => Ok(welcome),
            Ok(Message::Refuse(r)) => Err(ConnectError::refused(t, self.target.addr, r)),
            Ok(other) => Err(protocol(format!(
                "registration failed: expected Welcome, got {}",
                other.kind()
            ))),
            Err(e) => Err(protocol(format!("registration failed: {e}"))),
        }
    }
}

/// Dials `target` over QUIC with `tls` and opens the control stream.
pub(crate) async fn open_quic(
    config: &AgentConfig,
    target: &Target,
    endpoint: &quinn::Endpoint,
    tls: rustls::ClientConfig,
) -> Result<(quinn::Connection, transport::QuicSend, quinn::RecvStream), ConnectError> {
    let t = Transport::Quic;
    let local = |e: &dyn std::fmt::Display| {
        ConnectError::new(t, target.addr, FailureKind::Local, e.to_string())
    };
    let client = config.quic.client_config(tls).map_err(|e| local(&e))?;
    let quic_err = |e: &quinn::ConnectionError| {
        let (kind, detail) = diagnose::quic(e);
        ConnectError::new(t, target.addr, kind, detail)
    };
    let conn = endpoint
        .connect_with(client, target.addr, &target.server_name)
        .map_err(|e| local(&e))?
        .await
        .map_err(|e| quic_err(&e))?;
    let (send, recv) = conn.open_bi().await.map_err(|e| quic_err(&e))?;
    transport::mark_control(&send);
    Ok((conn, transport::QuicSend::new(send), recv))
}

/// The server's certificate chain, as verified in the handshake.
pub(crate) type ServerChain = Vec<rustls::pki_types::CertificateDer<'static>>;

/// Dials `target` over TCP + TLS with `tls`, serves HTTP/2 on it and
/// answers the server's `/control` request: the control stream (and the
/// chain the server presented).
pub(crate) async fn open_h2(
    config: &AgentConfig,
    target: &Target,
    tls: rustls::ClientConfig,
) -> Result<(H2Conn, H2Send, H2Recv, H2Settings, ServerChain), ConnectError> {
    let t = Transport::H2;
    let err = |kind, detail| ConnectError::new(t, target.addr, kind, detail);
    let connector = tokio_rustls::TlsConnector::from(Arc::new(tls));
    let name =
        rustls::pki_types::ServerName::try_from(target.server_name.clone()).map_err(|e| {
            let detail = format!("server name {:?}: {e}", target.server_name);
            err(FailureKind::Local, detail)
        })?;
    let tcp = TcpStream::connect(target.addr).await.map_err(|e| {
        let (kind, detail) = diagnose::tcp_connect(&e);
        err(kind, detail)
    })?;
    let _ = tcp.set_nodelay(true);
    let quic = &config.quic;
    transport::net::set_liveness(&tcp, quic.keepalive, quic.idle_timeout);
    let tls_err = |e: &std::io::Error| {
        let (kind, detail) = diagnose::tls_io(e);
        err(kind, detail)
    };
    let tls = connector
        .connect(name, tcp)
        .await
        .map_err(|e| tls_err(&e))?;
    let chain: ServerChain = tls
        .get_ref()
        .1
        .peer_certificates()
        .map(<[_]>::to_vec)
        .unwrap_or_default();
    // In TLS 1.3 the server checks our certificate after our side of
    // the handshake is done: a rejection arrives as an alert here.
    let settings = H2Settings {
        max_streams: config.quic.max_streams,
        ..H2Settings::default()
    };
    let mut conn: H2Conn =
        settings
            .server()
            .handshake(tls)
            .await
            .map_err(|e| match e.get_io() {
                Some(io) => tls_err(io),
                None => err(FailureKind::Protocol, format!("HTTP/2 handshake: {e}")),
            })?;
    let protocol = |detail: String| err(FailureKind::Protocol, detail);
    let (request, mut respond) = match conn.accept().await {
        Some(Ok(r)) => r,
        Some(Err(e)) => {
            return Err(match e.get_io() {
                Some(io) => tls_err(io),
                None => protocol(format!("HTTP/2: {e}")),
            })
        }
        None => {
            return Err(err(
                FailureKind::Refused,
                "the server closed the connection before /control".into(),
            ))
        }
    };
    if request.uri().path() != "/control" {
        return Err(protocol(format!(
            "expected /control, got {}",
            request.uri().path()
        )));
    }
    let send = respond
        .send_response(http::Response::new(()), false)
        .map_err(|e| protocol(e.to_string()))?;
    Ok((
        conn,
        H2Send::new(send),
        H2Recv::body(request.into_body()),
        settings,
        chain,
    ))
}

/// One request on a connection of its own (an enrollment or renewal):
/// dial `target` over `transport` with `tls` (made for the transport's
/// ALPN by `tls`), send `request` on the control stream, read the answer,
/// close. The answer comes with the chain the server presented. The
/// caller bounds the whole exchange.
pub(crate) async fn request_once(
    config: &AgentConfig,
    target: &Target,
    transport: Transport,
    tls: impl Fn(&[u8]) -> Result<rustls::ClientConfig, ConnectError>,
    request: &Message,
) -> Result<(Message, ServerChain), ConnectError> {
    let protocol =
        |detail: String| ConnectError::new(transport, target.addr, FailureKind::Protocol, detail);
    async fn exchange<S: TunnelSend, R: TunnelRecv>(
        send: &mut S,
        recv: &mut R,
        request: &Message,
    ) -> Result<Message, String> {
        write_message(send, request)
            .await
            .map_err(|e| e.to_string())?;
        let mut buf = Vec::new();
        read_message(recv, &mut buf)
            .await
            .map_err(|e| e.to_string())
    }
    match transport {
        Transport::Quic => {
            let endpoint = crate::supervisor::bind_endpoint(config).map_err(|e| {
                ConnectError::new(transport, target.addr, FailureKind::Local, e.to_string())
            })?;
            let (conn, mut send, mut recv) =
                open_quic(config, target, &endpoint, tls(proto::ALPN)?).await?;
            let chain: ServerChain = conn
                .peer_identity()
                .and_then(|any| any.downcast::<ServerChain>().ok())
                .map(|b| *b)
                .unwrap_or_default();
            let answer = exchange(&mut send, &mut recv, request).await;
            let answer = match (answer, conn.close_reason()) {
                (Ok(m), _) => Ok((m, chain)),
                (Err(_), Some(reason)) => {
                    let (kind, detail) = diagnose::quic(&reason);
                    Err(ConnectError::new(transport, target.addr, kind, detail))
                }
                (Err(e), None) => Err(protocol(e)),
            };
            conn.close(quinn::VarInt::from_u32(close::ENROLLED), b"done");
            let _ =
                tokio::time::timeout(std::time::Duration::from_secs(1), endpoint.wait_idle()).await;
            answer
        }
        Transport::H2 => {
            let (mut conn, mut send, mut recv, _, chain) =
                open_h2(config, target, tls(proto::ALPN_H2)?).await?;
            let answer = tokio::select! {
                r = exchange(&mut send, &mut recv, request) => r.map(|m| (m, chain)).map_err(protocol),
                r = poll_fn(|cx| conn.poll_closed(cx)) => Err(ConnectError::new(
                    transport,
                    target.addr,
                    FailureKind::Refused,
                    format!("the server closed the HTTP/2 connection: {r:?}"),
                )),
            };
            conn.graceful_shutdown();
            let _ = tokio::time::timeout(
                std::time::Duration::from_secs(1),
                poll_fn(|cx| conn.poll_closed(cx)),
            )
            .await;
            answer
        }
    }
}
