//! The HTTP/2-over-TLS listener for agents whose network blocks UDP.
//!
//! Same port number as the QUIC endpoint, on TCP. After the mutual-TLS
//! handshake the roles reverse: the agent serves HTTP/2 and this side is
//! the client. It opens `/control` (the agent answers `Hello` on the
//! response, this side `Welcome` on the request body) and then one
//! `/stream` request per tunneled connection. From the control stream on,
//! everything is [`crate::agents::serve_agent`], shared with QUIC.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tracing::Instrument;
use transport::h2::H2Settings;

use crate::admission::{Admission, Permit};
use crate::agents::{serve_agent, AgentError};
use crate::link::{AgentLink, H2Link};
use crate::Shared;

/// Accepts TCP connections from agents until the task is dropped.
///
/// Each passes the HTTP/2 listener's [`HandshakeGate`] first: over the
/// cap of TLS handshakes in flight, or over its source's share, the TCP
/// connection is closed at once (its source address is proven by the TCP
/// handshake, so there is nothing to Retry). Closing frees the socket and
/// its buffers immediately; a real agent retries with backoff.
///
/// [`HandshakeGate`]: crate::handshake::HandshakeGate
pub async fn serve(listener: TcpListener, acceptor: TlsAcceptor, shared: Arc<Shared>) {
    loop {
        let (tcp, remote) = transport::net::accept(&listener, "h2 agent").await;
        let permit = match shared.h2_handshakes.admit(&shared.metrics, remote, true) {
            Admission::Admit(permit) => permit,
            Admission::Retry(_) | Admission::Shed(_) => {
                drop(tcp);
                continue;
            }
        };
        let shared = shared.clone();
        let acceptor = acceptor.clone();
        let span =
            tracing::info_span!("agent", %remote, transport = "h2", node = tracing::field::Empty);
        tokio::spawn(
            async move {
                match handle(tcp, remote, permit, acceptor, shared).await {
                    // Counted and logged (at a bounded rate) by the gate.
                    Ok(()) | Err(AgentError::Handshake(_)) => {}
                    Err(e) => tracing::warn!("agent connection ended: {e}"),
                }
            }
            .instrument(span),
        );
    }
}

async fn handle(
    tcp: TcpStream,
    remote: SocketAddr,
    permit: Permit,
    acceptor: TlsAcceptor,
    shared: Arc<Shared>,
) -> Result<(), AgentError> {
    let timeout = shared.config.register_timeout;
    let _ = tcp.set_nodelay(true);
    let quic = &shared.config.quic;
    transport::net::set_liveness(&tcp, quic.keepalive, quic.idle_timeout);
    let tls = shared
        .h2_handshakes
        .run(&shared.metrics, permit, acceptor.accept(tcp))
        .await?;
    let certs = tls
        .get_ref()
        .1
        .peer_certificates()
        .map(<[_]>::to_vec)
        .unwrap_or_default();
    // A peer without a certificate (enrollment on) is counted against the
    // enrollment caps before anything else, and has less time.
    let (unauthenticated, timeout) = match (&shared.enroller, certs.is_empty()) {
        (Some(enroller), true) => match enroller.admit_unauthenticated(&shared, remote) {
            Ok(permit) => (
                Some(permit),
                timeout.min(crate::enroll::Enroller::ENROLL_TIMEOUT),
            ),
            Err(reason) => {
                return Err(AgentError::Refused(proto::Refusal {
                    code: proto::RefuseCode::EnrollmentRefused,
                    reason,
                }))
            }
        },
        _ => (None, timeout),
    };
    let settings = H2Settings::default();
    let share = shared.receive_budget.stats().share;
    let builder = settings.client_for_share(share);
    let (send, mut connection) = match tokio::time::timeout(timeout, builder.handshake(tls)).await {
        Ok(Ok(v)) => v,
        Ok(Err(e)) => return Err(AgentError::Control(format!("HTTP/2 handshake: {e}"))),
        Err(_) => return Err(AgentError::Control("HTTP/2 handshake timed out".into())),
    };
    let shutdown = Arc::new(tokio::sync::Notify::new());
    let (closed_tx, closed) = tokio::sync::watch::channel(false);
    let stop = shutdown.clone();
    let (window, mut h2_window) =
        transport::window::ReceiveWindow::h2(&settings, &shared.receive_budget);
    let task_shared = shared.clone();
    tokio::spawn(async move {
        loop {
            tokio::select! {
                r = &mut connection => {
                    match r {
                        // Our h2 closed it for a violation (a push promise,
                        // an oversized header list, a flood): counted, and
                        // logged once per connection.
                        Err(e) if e.is_go_away() && e.is_library() => {
                            task_shared.metrics.agent_protocol_error("h2_protocol");
                            tracing::warn!("HTTP/2 protocol violation by the agent: {e}");
                        }
                        Err(e) => tracing::debug!("HTTP/2 connection ended: {e}"),
                        Ok(()) => {}
                    }
                    break;
                }
                _ = stop.notified() => break,
                size = h2_window.next() => connection.set_target_window_size(size),
            }
        }
        let _ = closed_tx.send(true);
    });
    let link = AgentLink::H2(H2Link {
        send,
        remote,
        shutdown,
        closed,
        window,
        chain: Arc::new(certs.clone()),
    });
    let control = {
        let link = link.clone();
        async move { link.open_control().await.map_err(|e| e.to_string()) }
    };
    serve_agent(shared, &certs, link, control, unauthenticated).await
}
