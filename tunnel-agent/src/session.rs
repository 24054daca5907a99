//! The agent's connection to the server, and the reconnect loop around it.
//!
//! A session (one per replica address): QUIC + mutual-TLS handshake, open the
//! control stream, `Hello` → `Welcome` (or `Refuse`, which is logged with
//! its reason and retried with backoff), then accept one stream per
//! tunneled connection until the connection ends. On shutdown the agent
//! sends `Drain`, answers new dials with `Draining`, lets open streams
//! finish within the grace period, and closes.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use proto::codes::close;
use proto::{Hello, Message};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tracing::Instrument;
use transport::{read_message, write_message, TunnelRecv, TunnelSend};

use crate::backoff::Backoff;
use crate::config::{AgentConfig, ConfigError, TransportChoice};
use crate::dial::{serve_stream, StreamMode};
use crate::telemetry::AgentMetrics;

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("cannot resolve server {server}: {reason}")]
    Resolve { server: String, reason: String },
    #[error("cannot load certificates: {0}")]
    Config(#[from] ConfigError),
    #[error("QUIC connect to {addr} failed: {reason}")]
    Connect { addr: SocketAddr, reason: String },
    #[error("no answer from {addr} within {after:?} (UDP blocked or server down?)")]
    Timeout { addr: SocketAddr, after: Duration },
    #[error("registration refused by the server ({code}): {reason}")]
    Refused { code: &'static str, reason: String },
    #[error("registration failed: {0}")]
    Register(String),
    #[error("cannot listen on the admin address {addr}: {reason}")]
    Admin { addr: SocketAddr, reason: String },
}

impl SessionError {
    /// Whether QUIC itself did not get through (a reason to try HTTP/2), as
    /// opposed to a refusal or a local problem that HTTP/2 would share.
    pub fn quic_unreachable(&self) -> bool {
        matches!(
            self,
            SessionError::Timeout { .. } | SessionError::Connect { .. }
        )
    }
}

/// How a registered session ended.
pub(crate) enum SessionEnd {
    /// Shutdown was asked for and the session drained.
    Drained,
    /// The connection was lost or closed by the server.
    Lost(String),
    /// This address leads to a replica already held through another one.
    Duplicate(String),
    /// The server said why it closes the connection (`GoAway`).
    GoneAway(proto::GoAway),
    /// On HTTP/2, a QUIC re-probe registered: serve it (the HTTP/2
    /// connection finishes its streams in the background).
    Upgraded(Box<Registered>),
}

/// The replicas this agent holds: address → server id once registered.
pub type Held = Arc<Mutex<HashMap<SocketAddr, (String, &'static str)>>>;

/// One server address: keeps a registered connection to it, reconnecting
/// with backoff, until `stop` turns true (then drains).
pub(crate) async fn replica_loop(
    config: Arc<AgentConfig>,
    endpoint: quinn::Endpoint,
    target: Target,
    stop: watch::Receiver<bool>,
    lost: mpsc::Sender<()>,
    held: Held,
    metrics: Arc<AgentMetrics>,
) {
    let mut backoff = Backoff::new();
    // In `auto`: sticky on HTTP/2 once QUIC failed, until a re-probe works.
    let mut on_h2 = config.transport == TransportChoice::H2;
    let mut upgraded: Option<Registered> = None;
    loop {
        let started = Instant::now();
        let span = tracing::info_span!("session", node = %config.node, server = %target.addr);
        let server = target.addr;
        let attempt = async {
            if let Some(registered) = upgraded.take() {
                return serve_quic(&config, registered, stop.clone(), &held, &metrics).await;
            }
            if on_h2 {
                let probe = config.transport == TransportChoice::Auto;
                return crate::h2_session::session(
                    &config,
                    &endpoint,
                    &target,
                    stop.clone(),
                    &held,
                    probe,
                    &metrics,
                )
                .await;
            }
            let bound = if config.transport == TransportChoice::Auto {
                config.quic_timeout
            } else {
                config.connect_timeout
            };
            let mut stop_wait = stop.clone();
            let registered = tokio::select! {
                r = register_with(&config, &endpoint, &target, bound, false) => r,
                _ = stop_wait.wait_for(|s| *s) => return Ok(SessionEnd::Drained),
            };
            match registered {
                Ok(r) => serve_quic(&config, r, stop.clone(), &held, &metrics).await,
                Err(e) if config.transport == TransportChoice::Auto && e.quic_unreachable() => {
                    tracing::warn!(%server, "QUIC did not get through ({e}); falling back to HTTP/2 over TLS");
                    let reason = if matches!(e, SessionError::Timeout { .. }) {
                        "quic_timeout"
                    } else {
                        "quic_connect_failed"
                    };
                    AgentMetrics::count(&metrics.fallbacks, "reason", reason);
                    on_h2 = true;
                    crate::h2_session::session(
                        &config,
                        &endpoint,
                        &target,
                        stop.clone(),
                        &held,
                        true,
                        &metrics,
                    )
                    .await
                }
                Err(e) => Err(e),
            }
        };
        let result = attempt.instrument(span).await;
        match result {
            Ok(SessionEnd::Drained) => return,
            Ok(SessionEnd::Upgraded(registered)) => {
                tracing::info!(%server, "QUIC works again: moved over from HTTP/2");
                on_h2 = false;
                upgraded = Some(*registered);
                continue;
            }
            Ok(SessionEnd::GoneAway(g)) if g.code == close::REPLACED => {
                // Another agent with this node's identity (a new pod, or a
                // copy of the certificate) took over: do not fight it.
                let wait = config.resolve_interval.max(Duration::from_secs(30));
                tracing::warn!(%server, "{}; another agent with this node's identity is connected; retrying in {}s", g.reason, wait.as_secs());
                let mut stop = stop.clone();
                tokio::select! {
                    _ = tokio::time::sleep(wait) => continue,
                    _ = stop.wait_for(|s| *s) => return,
                }
            }
            Ok(SessionEnd::GoneAway(g)) => {
                tracing::warn!(%server, code = g.code, "the server closes the connection: {}", g.reason);
                backoff.connection_ended(started.elapsed());
                let _ = lost.try_send(());
            }
            Ok(SessionEnd::Lost(reason)) => {
                tracing::warn!(%server, "connection to the server lost: {reason}");
                // A QUIC connection that dies of idle timeout right after
                // connecting: UDP is filtered after the handshake.
                if config.transport == TransportChoice::Auto
                    && !on_h2
                    && reason.contains("timed out")
                    && started.elapsed() < config.quic.idle_timeout * 2
                {
                    AgentMetrics::count(&metrics.fallbacks, "reason", "quic_idle_after_connect");
                    tracing::warn!(%server, "QUIC died of idle timeout right after connecting; falling back to HTTP/2");
                    AgentMetrics::count(&metrics.fallbacks, "reason", "quic_idle_after_connect");
                    on_h2 = true;
                }
                backoff.connection_ended(started.elapsed());
                let _ = lost.try_send(());
            }
            Ok(SessionEnd::Duplicate(id)) => {
                tracing::info!(%server, server_id = %id, "this address reaches a replica already held; not connecting twice");
                let mut stop = stop.clone();
                tokio::select! {
                    _ = tokio::time::sleep(config.resolve_interval) => continue,
                    _ = stop.wait_for(|s| *s) => return,
                }
            }
            Err(e) => tracing::warn!(%server, "{e}"),
        }
        if *stop.borrow() {
            return;
        }
        let delay = backoff.next_delay();
        tracing::info!(
            %server,
            attempt = backoff.failures(),
            "reconnecting in {:.1}s",
            delay.as_secs_f64()
        );
        let mut stop = stop.clone();
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
    }
}

pub(crate) fn bind_endpoint(config: &AgentConfig) -> Result<quinn::Endpoint, SessionError> {
    // Dual-stack when the host has IPv6, else IPv4 only.
    let dual: SocketAddr = "[::]:0".parse().expect("literal");
    let v4: SocketAddr = "0.0.0.0:0".parse().expect("literal");
    config
        .quic
        .client_endpoint(dual)
        .or_else(|_| config.quic.client_endpoint(v4))
        .map_err(|e| SessionError::Connect {
            addr: v4,
            reason: e.to_string(),
        })
}

/// One address to connect to, and the name its certificate must carry.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Target {
    pub addr: SocketAddr,
    pub server_name: String,
}

/// Resolves every `--server` entry; an entry that fails is reported, the
/// others still count.
pub(crate) async fn resolve_all(config: &AgentConfig) -> (Vec<Target>, Vec<SessionError>) {
    let mut targets = Vec::new();
    let mut errors = Vec::new();
    for spec in &config.servers {
        let err = |reason: String| SessionError::Resolve {
            server: spec.spec.clone(),
            reason,
        };
        let name = config
            .server_name
            .clone()
            .unwrap_or_else(|| spec.host.clone());
        match tokio::time::timeout(Duration::from_secs(5), tokio::net::lookup_host(&spec.spec))
            .await
        {
            Ok(Ok(addrs)) => {
                let before = targets.len();
                for addr in addrs {
                    let t = Target {
                        addr,
                        server_name: name.clone(),
                    };
                    if !targets.contains(&t) {
                        targets.push(t);
                    }
                }
                if targets.len() == before {
                    errors.push(err("no addresses".into()));
                }
            }
            Ok(Err(e)) => errors.push(err(e.to_string())),
            Err(_) => errors.push(err("DNS lookup took longer than 5s".into())),
        }
    }
    (targets, errors)
}

/// A registered connection, ready to accept streams.
pub struct Registered {
    pub conn: quinn::Connection,
    pub addr: SocketAddr,
    pub welcome: proto::Welcome,
    control_send: quinn::SendStream,
    control_recv: quinn::RecvStream,
}

/// Connects and registers once, within `config.connect_timeout`.
pub async fn register(
    config: &AgentConfig,
    endpoint: &quinn::Endpoint,
    target: &Target,
) -> Result<Registered, SessionError> {
    register_with(config, endpoint, target, config.connect_timeout, false).await
}

/// [`register`] with its own bound; `handover` asks the server to let this
/// agent's previous connection finish its streams (a transport switch).
pub async fn register_with(
    config: &AgentConfig,
    endpoint: &quinn::Endpoint,
    target: &Target,
    bound: Duration,
    handover: bool,
) -> Result<Registered, SessionError> {
    let addr = target.addr;
    let client = config
        .quic
        .client_config(config.tls()?)
        .map_err(|e| SessionError::Connect {
            addr,
            reason: e.to_string(),
        })?;
    let connect_err = |e: quinn::ConnectionError| SessionError::Connect {
        addr,
        reason: describe_close(&e),
    };
    let register = async {
        let conn = endpoint
            .connect_with(client, addr, &target.server_name)
            .map_err(|e| SessionError::Connect {
                addr,
                reason: e.to_string(),
            })?
            .await
            .map_err(connect_err)?;
        let (mut send, mut recv) = conn.open_bi().await.map_err(connect_err)?;
        match hello_exchange(config, &mut send, &mut recv, handover).await {
            Ok(welcome) => Ok(Registered {
                conn,
                addr,
                welcome,
                control_send: send,
                control_recv: recv,
            }),
            Err(e) => {
                let e = match (e, conn.close_reason()) {
                    (SessionError::Register(_), Some(reason)) => SessionError::Register(format!(
                        "the server closed the connection: {}",
                        describe_close(&reason)
                    )),
                    (e, _) => e,
                };
                conn.close(quinn::VarInt::from_u32(close::REFUSED), b"not registered");
                Err(e)
            }
        }
    };
    match tokio::time::timeout(bound, register).await {
        Ok(r) => r,
        Err(_) => Err(SessionError::Timeout { addr, after: bound }),
    }
}

/// Sends `Hello` on a control stream and reads the answer.
pub(crate) async fn hello_exchange<S: TunnelSend, R: TunnelRecv>(
    config: &AgentConfig,
    send: &mut S,
    recv: &mut R,
    handover: bool,
) -> Result<proto::Welcome, SessionError> {
    let mut capabilities = proto::capability::DRAIN;
    if handover {
        capabilities |= proto::capability::HANDOVER;
    }
    let hello = Message::Hello(Hello {
        version_major: proto::VERSION_MAJOR,
        version_minor: proto::VERSION_MINOR,
        node: config.node.clone(),
        addresses: config.identity.addresses.clone(),
        capabilities,
    });
    write_message(send, &hello)
        .await
        .map_err(|e| SessionError::Register(e.to_string()))?;
    let mut buf = Vec::new();
    match read_message(recv, &mut buf).await {
        Ok(Message::Welcome(welcome)) => Ok(welcome),
        Ok(Message::Refuse(r)) => Err(SessionError::Refused {
            code: r.code.label(),
            reason: r.reason,
        }),
        Ok(other) => Err(SessionError::Register(format!(
            "expected Welcome, got {}",
            other.kind()
        ))),
        Err(e) => Err(SessionError::Register(e.to_string())),
    }
}

/// Explains why the server closed the connection during registration. In
/// TLS 1.3 the client finishes its handshake before the server has checked
/// the client certificate, so a rejected certificate shows up here.
fn describe_close(reason: &quinn::ConnectionError) -> String {
    match reason {
        quinn::ConnectionError::ConnectionClosed(c) if is_tls_alert(c.error_code) => format!(
            "the server rejected this agent's certificate ({reason}); check that tls.crt is signed by the CA the server trusts"
        ),
        quinn::ConnectionError::TransportError(t) if is_tls_alert(t.code) => format!(
            "this agent did not accept the server's certificate ({reason}); check ca.crt and --server-name"
        ),
        _ => reason.to_string(),
    }
}

/// QUIC carries TLS alerts as transport error codes 0x100-0x1ff.
fn is_tls_alert(code: quinn::TransportErrorCode) -> bool {
    (0x100..0x200).contains(&u64::from(code))
}

/// Connects, registers and disconnects: checks that this configuration
/// would be accepted, and says why not.
pub async fn probe(config: &AgentConfig) -> Result<proto::Welcome, SessionError> {
    let endpoint = bind_endpoint(config)?;
    let (targets, mut errors) = resolve_all(config).await;
    let target = match targets.into_iter().next() {
        Some(t) => t,
        None => {
            return Err(errors
                .pop()
                .unwrap_or(SessionError::Register("no --server given".into())))
        }
    };
    let registered = register(config, &endpoint, &target).await?;
    registered
        .conn
        .close(quinn::VarInt::from_u32(close::NORMAL), b"probe done");
    let _ = tokio::time::timeout(Duration::from_secs(1), endpoint.wait_idle()).await;
    Ok(registered.welcome)
}

/// Records a registered replica; `None` if another address already holds
/// the same server id. Returns the guard and the list of held ids.
pub(crate) fn hold(
    held: &Held,
    addr: SocketAddr,
    server_id: &str,
    transport: &'static str,
) -> Option<(HeldGuard, String)> {
    let mut map = held.lock().expect("held replicas lock");
    if map
        .iter()
        .any(|(other, (id, _))| *other != addr && id == server_id)
    {
        return None;
    }
    map.insert(addr, (server_id.to_owned(), transport));
    let mut ids: Vec<&String> = map.values().map(|(id, _)| id).collect();
    ids.sort();
    let list = format!("{ids:?}");
    Some((
        HeldGuard {
            held: held.clone(),
            addr,
        },
        list,
    ))
}

/// Serves a registered QUIC connection until it ends or `stop` (drain).
pub(crate) async fn serve_quic(
    config: &Arc<AgentConfig>,
    registered: Registered,
    mut stop: watch::Receiver<bool>,
    held: &Held,
    metrics: &Arc<AgentMetrics>,
) -> Result<SessionEnd, SessionError> {
    let Registered {
        conn,
        addr,
        welcome,
        mut control_send,
        mut control_recv,
    } = registered;
    let Some((_held, holding)) = hold(held, addr, &welcome.server_id, "quic") else {
        conn.close(quinn::VarInt::from_u32(close::NORMAL), b"duplicate replica");
        return Ok(SessionEnd::Duplicate(welcome.server_id));
    };
    tracing::info!(
        server_id = %welcome.server_id,
        %addr,
        transport = "quic",
        allow = %config.allow,
        replicas = %holding,
        "registered"
    );

    let stall = transport::stall::StallCredit::quic(&conn, &config.quic, &config.stall_budget);
    let mut streams = JoinSet::new();
    let mut control_buf = Vec::new();
    let end = loop {
        tokio::select! {
            _ = stop.wait_for(|s| *s) => break None,
            accepted = conn.accept_bi() => match accepted {
                Ok((send, recv)) => {
                    let id = send.id().to_string();
                    let mode = StreamMode { draining: false, stall: Some(stall.clone()) };
                    spawn_stream(&mut streams, config, metrics, send, recv, mode, id)
                }
                Err(e) => break Some(e.to_string()),
            },
            Some(_) = streams.join_next(), if !streams.is_empty() => {}
            msg = read_message(&mut control_recv, &mut control_buf) => {
                // After Welcome the server only says GoAway; an end or an
                // error of the control stream ends the session.
                match msg {
                    Ok(Message::GoAway(g)) => return Ok(SessionEnd::GoneAway(g)),
                    Ok(m) => tracing::debug!("ignoring {} on the control stream", m.kind()),
                    Err(e) => break Some(format!("control stream ended: {e}")),
                }
            }
        }
    };
    if let Some(reason) = end {
        let reason = conn.close_reason().map(|r| r.to_string()).unwrap_or(reason);
        return Ok(SessionEnd::Lost(reason));
    }

    // Drain: no new streams, open ones finish within the grace period.
    tracing::info!(active = streams.len(), grace = ?config.drain_grace, "draining");
    let _ = write_message(&mut control_send, &Message::Drain).await;
    let deadline = tokio::time::sleep(config.drain_grace);
    tokio::pin!(deadline);
    loop {
        if streams.is_empty() {
            break;
        }
        tokio::select! {
            accepted = conn.accept_bi() => match accepted {
                Ok((send, recv)) => {
                    let id = send.id().to_string();
                    let mode = StreamMode { draining: true, stall: Some(stall.clone()) };
                    spawn_stream(&mut streams, config, metrics, send, recv, mode, id)
                }
                Err(_) => break,
            },
            _ = streams.join_next() => {}
            _ = &mut deadline => {
                tracing::warn!(active = streams.len(), "grace period over; resetting the remaining streams");
                break;
            }
        }
    }
    streams.abort_all();
    conn.close(
        quinn::VarInt::from_u32(close::AGENT_DRAINED),
        b"agent drained",
    );
    Ok(SessionEnd::Drained)
}

/// Forgets a replica when its session ends, however it ends.
pub(crate) struct HeldGuard {
    held: Held,
    addr: SocketAddr,
}

impl Drop for HeldGuard {
    fn drop(&mut self) {
        if let Ok(mut map) = self.held.lock() {
            map.remove(&self.addr);
        }
    }
}

pub(crate) fn spawn_stream<S: TunnelSend + 'static, R: TunnelRecv + 'static>(
    streams: &mut JoinSet<()>,
    config: &Arc<AgentConfig>,
    metrics: &Arc<AgentMetrics>,
    send: S,
    recv: R,
    mode: StreamMode,
    id: String,
) {
    let span = tracing::debug_span!("stream", node = %config.node, stream = %id);
    streams.spawn(serve_stream(config.clone(), metrics.clone(), send, recv, mode).instrument(span));
}
