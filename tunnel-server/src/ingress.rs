//! What the CONNECT and transparent ingresses share: find the agent for a
//! target, dial through it, relay, and count.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tokio::net::TcpStream;
use tracing::Instrument;
use transport::net::canonical_ip;
use transport::{Direction, TunnelStream};

use crate::link::{self, DialError};
use crate::registry::{AgentHandle, Route};
use crate::Shared;

/// Where a client wants to go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// A node address and port (transparent ingress, CONNECT by address).
    Address(SocketAddr),
    /// A node name and port (CONNECT by name).
    Node { name: String, port: u16 },
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Address(a) => write!(f, "{a}"),
            Target::Node { name, port } => write!(f, "{name}:{port}"),
        }
    }
}

/// A dialed stream, ready to relay.
pub struct Dialed {
    pub agent: Arc<AgentHandle>,
    pub target: SocketAddr,
    pub stream: TunnelStream,
}

/// Finds the agent for `target` and asks it to dial. Fails fast (no
/// network round trip) when no live agent serves the target.
pub async fn dial(shared: &Shared, target: &Target) -> Result<Dialed, DialError> {
    let result = dial_inner(shared, target).await;
    if let Err(e) = &result {
        shared.metrics.dial_failed(e.label());
    }
    result
}

/// Like [`dial`], but returns as soon as the `Dial` is written: the relay
/// sends the client's first bytes right behind it, and the stream's
/// receive half reads the agent's answer before anything else (a refusal
/// or timeout then resets the client). One tunnel round trip less per new
/// connection; for the transparent ingress, where a failure is a reset
/// anyway.
pub async fn dial_optimistic(shared: &Arc<Shared>, target: &Target) -> Result<Dialed, DialError> {
    let result: Result<Dialed, DialError> = async {
        let (agent, addr) = route(shared, target)?;
        let deadline = shared.config.dial_timeout;
        let stream = link::request(&agent.link, &agent.node, addr, deadline).await?;
        let metrics = shared.clone();
        let node = agent.node.clone();
        let on_result: transport::gate::OnResult = Box::new(move |r| match r {
            Ok(took) => metrics.metrics.dial_duration.observe(took.as_secs_f64()),
            Err(e) => {
                tracing::info!(%node, target = %addr, "dial failed: {e:?}");
                metrics.metrics.dial_failed(e.label());
            }
        });
        let recv =
            transport::gate::ResultGate::new(stream.recv, link::answer_bound(deadline), on_result);
        Ok(Dialed {
            agent,
            target: addr,
            stream: TunnelStream {
                send: stream.send,
                recv: Box::new(recv),
            },
        })
    }
    .await;
    if let Err(e) = &result {
        shared.metrics.dial_failed(e.label());
    }
    result
}

/// The agent for `target` and the address to dial, without network I/O.
fn route(shared: &Shared, target: &Target) -> Result<(Arc<AgentHandle>, SocketAddr), DialError> {
    let (route, addr) = match target {
        Target::Address(a) => (shared.registry.by_address(canonical_ip(a.ip())), Some(*a)),
        Target::Node { name, .. } => (shared.registry.by_node(name), None),
    };
    let agent = match route {
        Route::Agent(agent) => agent,
        Route::Draining(node) => return Err(DialError::Draining(node)),
        Route::NoAgent => return Err(DialError::NoAgent(target.to_string())),
    };
    let addr = match (addr, target) {
        (Some(a), _) => SocketAddr::new(canonical_ip(a.ip()), a.port()),
        (None, Target::Node { port, .. }) => match agent.addresses.first() {
            Some(ip) => SocketAddr::new(*ip, *port),
            None => {
                return Err(DialError::NoAgent(format!(
                    "{target} (the node's certificate carries no address)"
                )))
            }
        },
        (None, Target::Address(_)) => unreachable!("address targets carry their address"),
    };
    Ok((agent, addr))
}

async fn dial_inner(shared: &Shared, target: &Target) -> Result<Dialed, DialError> {
    let (agent, addr) = route(shared, target)?;
    let (stream, took) =
        link::dial(&agent.link, &agent.node, addr, shared.config.dial_timeout).await?;
    shared.metrics.dial_duration.observe(took.as_secs_f64());
    Ok(Dialed {
        agent,
        target: addr,
        stream,
    })
}

static STREAM_IDS: AtomicU64 = AtomicU64::new(1);

/// Relays `tcp` over a dialed stream until both sides are done.
pub async fn relay(shared: Arc<Shared>, dialed: Dialed, tcp: TcpStream, ingress: &'static str) {
    let Dialed {
        agent,
        target,
        stream,
    } = dialed;
    let id = STREAM_IDS.fetch_add(1, Ordering::Relaxed);
    let span = tracing::debug_span!("stream", node = %agent.node, stream = id, %target, ingress);
    let metrics = &shared.metrics;
    metrics.streams.get_or_create(&[("ingress", ingress)]).inc();
    metrics.streams_active.inc();
    agent.streams_active.fetch_add(1, Ordering::Relaxed);
    let to_agent = metrics
        .bytes
        .get_or_create(&[("direction", "to_agent")])
        .clone();
    let from_agent = metrics
        .bytes
        .get_or_create(&[("direction", "from_agent")])
        .clone();
    let stats = transport::relay(
        tcp,
        stream.send,
        stream.recv,
        |dir, n| match dir {
            Direction::TcpToTunnel => {
                to_agent.inc_by(n as u64);
            }
            Direction::TunnelToTcp => {
                from_agent.inc_by(n as u64);
            }
        },
        Some(&agent.stall),
    )
    .instrument(span.clone())
    .await;
    span.in_scope(|| tracing::debug!(?stats, "stream ended"));
    agent.streams_active.fetch_sub(1, Ordering::Relaxed);
    metrics.streams_active.dec();
}
