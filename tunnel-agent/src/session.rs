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
use transport::{read_message, write_message};

use crate::backoff::Backoff;
use crate::config::{AgentConfig, ConfigError};
use crate::dial::serve_stream;

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
}

/// How a registered session ended.
pub(crate) enum SessionEnd {
    /// Shutdown was asked for and the session drained.
    Drained,
    /// The connection was lost or closed by the server.
    Lost(String),
    /// This address leads to a replica already held through another one.
    Duplicate(String),
}

/// The replicas this agent holds: address → server id once registered.
pub(crate) type Held = Arc<Mutex<HashMap<SocketAddr, String>>>;

/// One server address: keeps a registered connection to it, reconnecting
/// with backoff, until `stop` turns true (then drains).
pub(crate) async fn replica_loop(
    config: Arc<AgentConfig>,
    endpoint: quinn::Endpoint,
    target: Target,
    stop: watch::Receiver<bool>,
    lost: mpsc::Sender<()>,
    held: Held,
) {
    let mut backoff = Backoff::new();
    loop {
        let started = Instant::now();
        let span = tracing::info_span!("session", node = %config.node, server = %target.addr);
        let result = session(&config, &endpoint, &target, stop.clone(), &held)
            .instrument(span)
            .await;
        let server = target.addr;
        match result {
            Ok(SessionEnd::Drained) => return,
            Ok(SessionEnd::Lost(reason)) => {
                tracing::warn!(%server, "connection to the server lost: {reason}");
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
    let bound = config.connect_timeout;
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
        let hello = Message::Hello(Hello {
            version_major: proto::VERSION_MAJOR,
            version_minor: proto::VERSION_MINOR,
            node: config.node.clone(),
            addresses: config.identity.addresses.clone(),
            capabilities: proto::capability::DRAIN,
        });
        write_message(&mut send, &hello)
            .await
            .map_err(|e| SessionError::Register(e.to_string()))?;
        let mut buf = Vec::new();
        match read_message(&mut recv, &mut buf).await {
            Ok(Message::Welcome(welcome)) => Ok(Registered {
                conn,
                addr,
                welcome,
                control_send: send,
                control_recv: recv,
            }),
            Ok(Message::Refuse(r)) => {
                conn.close(quinn::VarInt::from_u32(close::REFUSED), b"refused");
                Err(SessionError::Refused {
                    code: r.code.label(),
                    reason: r.reason,
                })
            }
            Ok(other) => Err(SessionError::Register(format!(
                "expected Welcome, got {}",
                other.kind()
            ))),
            Err(e) => Err(SessionError::Register(match conn.close_reason() {
                Some(reason) => format!(
                    "the server closed the connection: {}",
                    describe_close(&reason)
                ),
                None => e.to_string(),
            })),
        }
    };
    match tokio::time::timeout(bound, register).await {
        Ok(r) => r,
        Err(_) => Err(SessionError::Timeout { addr, after: bound }),
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

async fn session(
    config: &Arc<AgentConfig>,
    endpoint: &quinn::Endpoint,
    target: &Target,
    mut stop: watch::Receiver<bool>,
    held: &Held,
) -> Result<SessionEnd, SessionError> {
    let Registered {
        conn,
        addr,
        welcome,
        mut control_send,
        mut control_recv,
    } = tokio::select! {
        r = register(config, endpoint, target) => r?,
        _ = stop.wait_for(|s| *s) => return Ok(SessionEnd::Drained),
    };
    let holding = {
        let mut map = held.lock().expect("held replicas lock");
        let duplicate = map
            .iter()
            .any(|(other, id)| *other != addr && *id == welcome.server_id);
        if duplicate {
            None
        } else {
            map.insert(addr, welcome.server_id.clone());
            let mut ids: Vec<&String> = map.values().collect();
            ids.sort();
            Some(format!("{ids:?}"))
        }
    };
    let Some(holding) = holding else {
        conn.close(quinn::VarInt::from_u32(close::NORMAL), b"duplicate replica");
        return Ok(SessionEnd::Duplicate(welcome.server_id));
    };
    let _held = HeldGuard { held, addr };
    tracing::info!(
        server_id = %welcome.server_id,
        %addr,
        allow = %config.allow,
        replicas = %holding,
        "registered"
    );

    let mut streams = JoinSet::new();
    let mut control_buf = Vec::new();
    let end = loop {
        tokio::select! {
            _ = stop.wait_for(|s| *s) => break None,
            accepted = conn.accept_bi() => match accepted {
                Ok((send, recv)) => spawn_stream(&mut streams, config, send, recv, false),
                Err(e) => break Some(e.to_string()),
            },
            Some(_) = streams.join_next(), if !streams.is_empty() => {}
            msg = read_message(&mut control_recv, &mut control_buf) => {
                // The server sends nothing after Welcome today; an end or an
                // error of the control stream ends the session.
                match msg {
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
                Ok((send, recv)) => spawn_stream(&mut streams, config, send, recv, true),
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
struct HeldGuard<'a> {
    held: &'a Held,
    addr: SocketAddr,
}

impl Drop for HeldGuard<'_> {
    fn drop(&mut self) {
        if let Ok(mut map) = self.held.lock() {
            map.remove(&self.addr);
        }
    }
}

fn spawn_stream(
    streams: &mut JoinSet<()>,
    config: &Arc<AgentConfig>,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    draining: bool,
) {
    let span = tracing::debug_span!("stream", node = %config.node, stream = %send.id());
    streams.spawn(serve_stream(config.clone(), send, recv, draining).instrument(span));
}
