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
            metrics: self.metrics.clone(),
            buffers: self.config.relay_buffers.clone(),
        })
    }

    fn hello(&self) -> Message {
        let capabilities = if self.handover {
            proto::capability::HANDOVER
        } else {
            0
        };
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
        let local = |e: &dyn std::fmt::Display| self.err(t, FailureKind::Local, e.to_string());
        let tls = self.credentials.tls(proto::ALPN).map_err(|e| local(&e))?;
        let client = self.config.quic.client_config(tls).map_err(|e| local(&e))?;
        let quic_err = |e: &quinn::ConnectionError| {
            let (kind, detail) = diagnose::quic(e);
            self.err(t, kind, detail)
        };
        let conn = endpoint
            .connect_with(client, self.target.addr, &self.target.server_name)
            .map_err(|e| local(&e))?
            .await
            .map_err(|e| quic_err(&e))?;
        let (mut send, mut recv) = conn.open_bi().await.map_err(|e| quic_err(&e))?;
        match self.hello_exchange(t, &mut send, &mut recv).await {
            Ok(welcome) => Ok(ServerConnection {
                window: transport::window::ReceiveWindow::quic(
                    &conn,
                    &self.config.quic,
                    &self.config.receive_budget,
                ),
                carrier: Carrier::Quic(conn, endpoint.clone()),
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
        let connector = tokio_rustls::TlsConnector::from(Arc::new(tls));
        let name = rustls::pki_types::ServerName::try_from(self.target.server_name.clone())
            .map_err(|e| {
                let detail = format!("server name {:?}: {e}", self.target.server_name);
                self.err(t, FailureKind::Local, detail)
            })?;
        let tcp = TcpStream::connect(self.target.addr).await.map_err(|e| {
            let (kind, detail) = diagnose::tcp_connect(&e);
            self.err(t, kind, detail)
        })?;
        let _ = tcp.set_nodelay(true);
        let quic = &self.config.quic;
        transport::net::set_liveness(&tcp, quic.keepalive, quic.idle_timeout);
        let tls_err = |e: &std::io::Error| {
            let (kind, detail) = diagnose::tls_io(e);
            self.err(t, kind, detail)
        };
        let tls = connector
            .connect(name, tcp)
            .await
            .map_err(|e| tls_err(&e))?;
        // In TLS 1.3 the server checks our certificate after our side of
        // the handshake is done: a rejection arrives as an alert here.
        let settings = H2Settings {
            max_streams: self.config.quic.max_streams,
            ..H2Settings::default()
        };
        let mut conn: H2Conn =
            settings
                .server()
                .handshake(tls)
                .await
                .map_err(|e| match e.get_io() {
                    Some(io) => tls_err(io),
                    None => self.err(t, FailureKind::Protocol, format!("HTTP/2 handshake: {e}")),
                })?;
        let protocol = |detail: String| self.err(t, FailureKind::Protocol, detail);
        let (request, mut respond) = match conn.accept().await {
            Some(Ok(r)) => r,
            Some(Err(e)) => {
                return Err(match e.get_io() {
                    Some(io) => tls_err(io),
                    None => protocol(format!("HTTP/2: {e}")),
                })
            }
            None => {
                return Err(self.err(
                    t,
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
        let mut send = H2Send::new(send);
        let mut recv = H2Recv::body(request.into_body());
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
