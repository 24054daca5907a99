//! A session over HTTP/2 over TLS, for networks that block UDP.
//!
//! The agent dials TCP + mutual TLS (ALPN `edge-tunnel-h2/1`) and then
//! *serves* HTTP/2 on that connection: the server opens `/control` (the
//! agent answers `Hello` on the response body, reads `Welcome` from the
//! request body) and one `/stream` request per tunneled connection, which
//! goes to the same [`serve_stream`](crate::dial::serve_stream) as QUIC
//! streams. In `auto` mode the session re-probes QUIC every
//! `reprobe_interval`; when QUIC registers (with `HANDOVER`, so the server
//! lets this connection finish its streams), the session hands the QUIC
//! connection back and drains itself in the background.

use std::future::poll_fn;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use proto::Message;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use transport::h2::{H2Recv, H2Send, H2Settings};
use transport::{read_message, write_message};

use crate::config::AgentConfig;
use crate::dial::StreamMode;
use crate::session::{
    hello_exchange, hold, register_with, spawn_stream, Held, Registered, SessionEnd, SessionError,
    Target,
};
use crate::telemetry::AgentMetrics;

type Conn = h2::server::Connection<tokio_rustls::client::TlsStream<TcpStream>, Bytes>;

struct RegisteredH2 {
    conn: Conn,
    /// What the connection was made with (its base windows).
    settings: H2Settings,
    welcome: proto::Welcome,
    control_send: H2Send,
    control_recv: H2Recv,
}

async fn register(config: &AgentConfig, target: &Target) -> Result<RegisteredH2, SessionError> {
    let addr = target.addr;
    let err = |reason: String| SessionError::Connect { addr, reason };
    let tls = config.tls_with(proto::ALPN_H2)?;
    let connector = tokio_rustls::TlsConnector::from(Arc::new(tls));
    let name =
        rustls::pki_types::ServerName::try_from(target.server_name.clone()).map_err(|e| {
            SessionError::Register(format!("server name {:?}: {e}", target.server_name))
        })?;
    let tcp = TcpStream::connect(addr)
        .await
        .map_err(|e| err(format!("TCP: {e}")))?;
    let _ = tcp.set_nodelay(true);
    transport::net::set_liveness(&tcp, config.quic.keepalive, config.quic.idle_timeout);
    let tls = connector
        .connect(name, tcp)
        .await
        .map_err(|e| err(describe_tls(&e)))?;
    // In TLS 1.3 the server checks our certificate after our side of the
    // handshake is done: a rejection arrives as an alert on the first read.
    let settings = H2Settings::default();
    let mut conn: Conn = settings.server().handshake(tls).await.map_err(|e| {
        err(e
            .get_io()
            .map(describe_tls)
            .unwrap_or_else(|| format!("HTTP/2 handshake: {e}")))
    })?;
    let (request, mut respond) = match conn.accept().await {
        Some(Ok(r)) => r,
        Some(Err(e)) => return Err(SessionError::Register(format!("HTTP/2: {e}"))),
        None => {
            return Err(SessionError::Register(
                "the server closed the connection before /control".into(),
            ))
        }
    };
    if request.uri().path() != "/control" {
        return Err(SessionError::Register(format!(
            "expected /control, got {}",
            request.uri().path()
        )));
    }
    let send = respond
        .send_response(http::Response::new(()), false)
        .map_err(|e| SessionError::Register(e.to_string()))?;
    let mut control_send = H2Send::new(send);
    let mut control_recv = H2Recv::body(request.into_body());
    // The connection must be driven while the control exchange runs.
    let welcome = tokio::select! {
        r = hello_exchange(config, &mut control_send, &mut control_recv, false) => r?,
        r = poll_fn(|cx| conn.poll_closed(cx)) => {
            return Err(SessionError::Register(format!("the server closed the HTTP/2 connection: {r:?}")))
        }
    };
    Ok(RegisteredH2 {
        conn,
        settings,
        welcome,
        control_send,
        control_recv,
    })
}

/// Says which side refused the TLS handshake, if the error tells.
fn describe_tls(e: &std::io::Error) -> String {
    match e.get_ref().and_then(|inner| inner.downcast_ref::<rustls::Error>()) {
        Some(rustls::Error::AlertReceived(alert)) => format!(
            "the server rejected this agent's certificate (TLS alert {alert:?}); check that tls.crt is signed by the CA the server trusts"
        ),
        Some(rustls::Error::InvalidCertificate(why)) => format!(
            "this agent did not accept the server's certificate ({why:?}); check ca.crt and --server-name"
        ),
        _ => format!("TLS: {e}"),
    }
}

/// Serves one HTTP/2 session until it ends, `stop` (drain), or — with
/// `probe` — a QUIC re-probe registers.
pub(crate) async fn session(
    config: &Arc<AgentConfig>,
    endpoint: &quinn::Endpoint,
    target: &Target,
    mut stop: watch::Receiver<bool>,
    held: &Held,
    probe: bool,
    metrics: &Arc<AgentMetrics>,
) -> Result<SessionEnd, SessionError> {
    let registered = tokio::select! {
        r = tokio::time::timeout(config.connect_timeout, register(config, target)) => match r {
            Ok(r) => r?,
            Err(_) => return Err(SessionError::Timeout { addr: target.addr, after: config.connect_timeout }),
        },
        _ = stop.wait_for(|s| *s) => return Ok(SessionEnd::Drained),
    };
    let RegisteredH2 {
        mut conn,
        settings,
        welcome,
        control_send,
        mut control_recv,
    } = registered;
    let Some((held_guard, holding)) = hold(held, target.addr, &welcome.server_id, "h2") else {
        return Ok(SessionEnd::Duplicate(welcome.server_id));
    };
    tracing::info!(
        server_id = %welcome.server_id,
        addr = %target.addr,
        transport = "h2",
        allow = %config.allow,
        replicas = %holding,
        "registered"
    );
    let (stall, mut window) = transport::stall::StallCredit::h2(&settings, &config.stall_budget);
    let mut streams = JoinSet::new();
    let mut control_buf = Vec::new();
    let mut next_id = 0u64;
    let period = config.reprobe_interval;
    let mut probe_tick = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    let (probe_tx, mut probe_rx) = mpsc::channel::<Result<Registered, SessionError>>(1);
    let mut probing = false;
    enum End {
        Stop,
        Lost(String),
        GoneAway(proto::GoAway),
        Upgrade(Registered),
    }
    let end = loop {
        tokio::select! {
            _ = stop.wait_for(|s| *s) => break End::Stop,
            accepted = conn.accept() => match accepted {
                Some(Ok((request, respond))) => {
                    next_id += 1;
                    let mode = StreamMode { draining: false, stall: Some(stall.clone()) };
                    accept_stream(&mut streams, config, metrics, request, respond, mode, next_id);
                }
                Some(Err(e)) => break End::Lost(format!("HTTP/2: {e}")),
                None => break End::Lost("the server closed the HTTP/2 connection".into()),
            },
            Some(_) = streams.join_next(), if !streams.is_empty() => {}
            size = window.next() => conn.set_target_window_size(size),
            msg = read_message(&mut control_recv, &mut control_buf) => match msg {
                Ok(Message::GoAway(g)) => break End::GoneAway(g),
                Ok(m) => tracing::debug!("ignoring {} on the control stream", m.kind()),
                Err(e) => break End::Lost(format!("control stream ended: {e}")),
            },
            _ = probe_tick.tick(), if probe && !probing => {
                probing = true;
                let (config, endpoint, target, tx) = (config.clone(), endpoint.clone(), target.clone(), probe_tx.clone());
                tokio::spawn(async move {
                    let r = register_with(&config, &endpoint, &target, config.quic_timeout, true).await;
                    let _ = tx.send(r).await;
                });
            }
            Some(r) = probe_rx.recv() => {
                probing = false;
                match r {
                    Ok(registered) => {
                        AgentMetrics::count(&metrics.reprobes, "result", "quic_back");
                        break End::Upgrade(registered);
                    }
                    Err(e) => {
                        AgentMetrics::count(&metrics.reprobes, "result", "failed");
                        tracing::info!(addr = %target.addr, "QUIC re-probe failed ({e}); staying on HTTP/2");
                    }
                }
            }
        }
    };
    match end {
        End::Lost(reason) => Ok(SessionEnd::Lost(reason)),
        End::GoneAway(g) => Ok(SessionEnd::GoneAway(g)),
        End::Stop => {
            drain(
                config.clone(),
                metrics.clone(),
                conn,
                control_send,
                streams,
                next_id,
                (stall, window),
            )
            .await;
            drop(held_guard);
            Ok(SessionEnd::Drained)
        }
        End::Upgrade(registered) => {
            // The QUIC session records the replica again under this address.
            drop(held_guard);
            tokio::spawn(drain(
                config.clone(),
                metrics.clone(),
                conn,
                control_send,
                streams,
                next_id,
                (stall, window),
            ));
            Ok(SessionEnd::Upgraded(Box::new(registered)))
        }
    }
}

fn accept_stream(
    streams: &mut JoinSet<()>,
    config: &Arc<AgentConfig>,
    metrics: &Arc<AgentMetrics>,
    request: http::Request<h2::RecvStream>,
    mut respond: h2::server::SendResponse<Bytes>,
    mode: StreamMode,
    id: u64,
) {
    if request.uri().path() != "/stream" {
        respond.send_reset(h2::Reason::REFUSED_STREAM);
        return;
    }
    match respond.send_response(http::Response::new(()), false) {
        Ok(send) => spawn_stream(
            streams,
            config,
            metrics,
            H2Send::new(send),
            H2Recv::body(request.into_body()),
            mode,
            format!("h2-{id}"),
        ),
        Err(e) => tracing::debug!("cannot answer a stream: {e}"),
    }
}

/// Sends `Drain`, answers new dials `draining`, lets open streams finish
/// within the grace period, then closes the connection gracefully.
async fn drain(
    config: Arc<AgentConfig>,
    metrics: Arc<AgentMetrics>,
    mut conn: Conn,
    mut control_send: H2Send,
    mut streams: JoinSet<()>,
    mut next_id: u64,
    (stall, mut window): (transport::stall::StallCredit, transport::stall::H2Window),
) {
    tracing::info!(active = streams.len(), transport = "h2", "draining");
    let _ = write_message(&mut control_send, &Message::Drain).await;
    let deadline = tokio::time::sleep(config.drain_grace);
    tokio::pin!(deadline);
    while !streams.is_empty() {
        tokio::select! {
            accepted = conn.accept() => match accepted {
                Some(Ok((request, respond))) => {
                    next_id += 1;
                    let mode = StreamMode { draining: true, stall: Some(stall.clone()) };
                    accept_stream(&mut streams, &config, &metrics, request, respond, mode, next_id);
                }
                _ => break,
            },
            _ = streams.join_next() => {}
            size = window.next() => conn.set_target_window_size(size),
            _ = &mut deadline => {
                tracing::warn!(active = streams.len(), "grace period over; resetting the remaining streams");
                break;
            }
        }
    }
    streams.abort_all();
    conn.graceful_shutdown();
    let _ = tokio::time::timeout(Duration::from_secs(2), poll_fn(|cx| conn.poll_closed(cx))).await;
}
