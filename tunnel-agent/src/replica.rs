//! The reconnect loop that holds one replica address: connect (the
//! [`TransportSelector`] says over what), serve until the connection ends,
//! wait (backoff, or longer when another agent replaced this one), again —
//! until `stop`, then drain. While on HTTP/2 in `auto` it re-probes QUIC
//! and, when QUIC registers, moves over without dropping streams: the
//! HTTP/2 connection drains in the background.
//!
//! The loop is generic over a [`Connector`], so its policy is tested with
//! fakes (see the tests below); [`ServerConnector`] is the real one.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot, watch};
use tracing::Instrument;

use crate::backoff::Backoff;
use crate::config::{AgentConfig, TransportChoice, REPROBE_FIRST};
use crate::connection::ServerConnection;
use crate::error::{ConnectError, SessionEnd};
use crate::register::Registration;
use crate::replicas::HeldReplicas;
use crate::resolve::Target;
use crate::selector::{Transport, TransportSelector};
use crate::telemetry::{AgentMetrics, ReprobeResult};

/// Opens registered connections to one replica address.
pub trait Connector: Clone + Send + Sync + 'static {
    type Link: Link;
    /// Connects and registers over `transport` (unbounded: the loop bounds
    /// it). `handover`: this connection takes over from the previous one.
    /// `previous`: the server id this loop's last connection was lost to
    /// (empty if none), sent in `Hello` so that server replaces the stale
    /// connection it may still hold, while any other server refuses a
    /// second connection from this process instead of replacing its live
    /// one.
    fn connect(
        &self,
        transport: Transport,
        handover: bool,
        previous: String,
    ) -> impl Future<Output = Result<Self::Link, ConnectError>> + Send;
}

/// A registered connection, as the loop sees it.
pub trait Link: Send + 'static {
    fn server_id(&self) -> &str;
    /// How many replicas the server says exist (0: unknown).
    fn replicas(&self) -> u16 {
        0
    }
    fn transport(&self) -> Transport;
    /// Serves streams until the connection ends, or `drain` turns true.
    /// `server_draining` fires when the server says it is shutting down
    /// (the connection serves on until the server closes it); `replicas`
    /// takes each replica count the server says later (`Replicas`).
    fn serve(
        self,
        drain: watch::Receiver<bool>,
        server_draining: oneshot::Sender<()>,
        replicas: watch::Sender<u16>,
    ) -> impl Future<Output = SessionEnd> + Send + 'static;
    /// Closes it unserved: the replica is already held through another address.
    fn close_duplicate(self) -> impl Future<Output = ()> + Send;
}

/// The loop's settings, taken from [`AgentConfig`].
#[derive(Clone, Debug)]
pub struct LoopSettings {
    pub choice: TransportChoice,
    /// Bound on a QUIC attempt in `auto` (then HTTP/2 is tried).
    pub quic_timeout: Duration,
    /// Bound on any other attempt.
    pub connect_timeout: Duration,
    pub idle_timeout: Duration,
    pub reprobe_first: Duration,
    pub reprobe_max: Duration,
    /// Wait before trying again an address that leads to a replica already
    /// held, and the least wait after being replaced by another agent.
    pub resolve_interval: Duration,
    /// Changes when enrollment or renewal wrote a new certificate: a
    /// connection registered with the old one is replaced (handover, its
    /// streams finish within the drain grace), before the old expires.
    pub renewed: watch::Receiver<u64>,
}

impl LoopSettings {
    pub fn from_config(config: &AgentConfig) -> Self {
        LoopSettings {
            choice: config.transport,
            quic_timeout: config.quic_timeout,
            connect_timeout: config.connect_timeout,
            idle_timeout: config.quic.idle_timeout,
            reprobe_first: REPROBE_FIRST,
            reprobe_max: config.reprobe_interval,
            resolve_interval: config.resolve_interval,
            renewed: config.renewed.subscribe(),
        }
    }

    /// After being replaced by another agent with this identity, wait at
    /// least this long: do not fight it.
    fn replaced_wait(&self) -> Duration {
        self.resolve_interval.max(Duration::from_secs(30))
    }
}

/// What to do after a session or attempt.
enum Next<L> {
    Stop,
    /// Serve this connection at once (a QUIC re-probe registered); the
    /// connection it replaces drains in this task, if it is still open.
    Serve(L, Option<tokio::task::JoinHandle<SessionEnd>>),
    /// The server is draining this connection: it finishes in the
    /// background, and the loop connects again at once.
    Retire(tokio::task::JoinHandle<SessionEnd>),
    Wait(Duration),
    Backoff,
}

/// Holds one replica address until `stop`.
pub struct ReplicaLoop<C: Connector> {
    pub connector: C,
    pub addr: SocketAddr,
    /// Which connection to `addr` this loop holds (see
    /// [`crate::supervisor`]): slot 0 is the address's own; higher slots
    /// dial a shared (load-balanced) address again for replicas not held
    /// yet, and retry a duplicate soon, with a new local port.
    pub slot: u16,
    pub settings: LoopSettings,
    pub held: HeldReplicas,
    pub metrics: Arc<AgentMetrics>,
    pub stop: watch::Receiver<bool>,
    /// Told about every lost connection and every registration (the
    /// supervisor resolves again and recounts the slots it needs).
    pub changed: mpsc::Sender<()>,
    /// The server id this loop's last connection was lost to, until the
    /// next registration (`Hello.previous`).
    pub lost_to: std::sync::Mutex<String>,
}

impl<C: Connector> ReplicaLoop<C> {
    pub async fn run(self) {
        let s = &self.settings;
        let mut selector =
            TransportSelector::new(s.choice, s.idle_timeout, s.reprobe_first, s.reprobe_max);
        let mut backoff = Backoff::new();
        // For a shared address: waits after reaching a replica already held.
        let mut duplicates = duplicate_backoff();
        let mut ready: Option<C::Link> = None;
        // Connections left behind by a transport switch, still draining.
        let mut retiring = Vec::new();
        loop {
            let started = Instant::now();
            let next = match ready.take() {
                Some(link) => {
                    self.serve(link, &mut selector, &mut backoff, &mut duplicates, started)
                        .await
                }
                None => match self.connect(&mut selector).await {
                    Some(Ok(link)) => {
                        self.serve(link, &mut selector, &mut backoff, &mut duplicates, started)
                            .await
                    }
                    Some(Err(e)) if reached_a_replica(&e) => {
                        // A replica on its way out, or one this agent holds
                        // already (a balancer picked it): another is a dial
                        // away.
                        let wait = self.duplicate_wait(&mut duplicates);
                        tracing::info!("{e}; dialing again in {:.1}s", wait.as_secs_f64());
                        Next::Wait(wait)
                    }
                    Some(Err(e)) if e.refusal == Some(proto::RefuseCode::Superseded) => {
                        // A newer agent process on this node took over;
                        // this one is being replaced. Do not fight it.
                        let wait = self.settings.replaced_wait();
                        tracing::warn!(
                            "{e}; trying again in {}s (if no rolling update runs on this \
                             node, something else holds this node's certificate: revoke it)",
                            wait.as_secs()
                        );
                        Next::Wait(wait)
                    }
                    Some(Err(e)) => {
                        tracing::warn!("{e}");
                        Next::Backoff
                    }
                    None => Next::Stop,
                },
            };
            retiring.retain(|t: &tokio::task::JoinHandle<SessionEnd>| !t.is_finished());
            let wait = match next {
                Next::Stop => break,
                Next::Serve(link, old) => {
                    ready = Some(link);
                    retiring.extend(old);
                    continue;
                }
                Next::Retire(old) => {
                    retiring.push(old);
                    continue;
                }
                Next::Wait(d) => d,
                Next::Backoff => {
                    let d = backoff.next_delay();
                    let attempt = backoff.failures();
                    tracing::info!(attempt, "reconnecting in {:.1}s", d.as_secs_f64());
                    d
                }
            };
            if !self.sleep(wait).await {
                break;
            }
        }
        // Their streams get the rest of their grace period.
        for old in retiring {
            let _ = old.await;
        }
    }

    /// Sleeps `d`; false if `stop` came first.
    async fn sleep(&self, d: Duration) -> bool {
        let mut stop = self.stop.clone();
        tokio::select! {
            _ = tokio::time::sleep(d) => true,
            _ = stopped(&mut stop) => false,
        }
    }

    fn bound(&self, transport: Transport) -> Duration {
        match (self.settings.choice, transport) {
            (TransportChoice::Auto, Transport::Quic) => self.settings.quic_timeout,
            _ => self.settings.connect_timeout,
        }
    }

    /// One bounded connection attempt over `transport`; a future that owns
    /// what it needs, so a re-probe can run beside the served connection.
    /// `handover_from`: the server id of the connection this one takes
    /// over from (a transport switch, a renewed certificate), sent as
    /// `Hello.previous` with `HANDOVER`: through a load balancer the attempt
    /// may reach another replica, which must then refuse it as a duplicate
    /// rather than drain the connection another slot holds there.
    fn attempt(
        &self,
        transport: Transport,
        handover_from: Option<String>,
    ) -> impl Future<Output = Result<C::Link, ConnectError>> + Send + 'static {
        let (connector, addr, bound) = (self.connector.clone(), self.addr, self.bound(transport));
        let handover = handover_from.is_some();
        let previous = handover_from.unwrap_or_else(|| {
            self.lost_to
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone()
        });
        async move {
            match tokio::time::timeout(bound, connector.connect(transport, handover, previous))
                .await
            {
                Ok(r) => r,
                Err(_) => Err(ConnectError::timeout(transport, addr, bound)),
            }
        }
    }

    /// One attempt, over the transports the selector names in turn. `None`
    /// if `stop` came first.
    async fn connect(
        &self,
        selector: &mut TransportSelector,
    ) -> Option<Result<C::Link, ConnectError>> {
        let mut transport = selector.begin();
        let mut stop = self.stop.clone();
        loop {
            let result = tokio::select! {
                r = self.attempt(transport, None) => r,
                _ = stopped(&mut stop) => return None,
            };
            match result {
                Ok(link) => {
                    if let Some(reason) = selector.connected(transport) {
                        self.metrics.fallback(reason);
                        tracing::warn!(
                            reason = reason.label(),
                            "QUIC does not get through; falling back to HTTP/2 over TLS"
                        );
                    }
                    return Some(Ok(link));
                }
                Err(e) => match selector.failed(transport, e.kind) {
                    Some(other) => {
                        tracing::warn!("{e}; trying {other}");
                        transport = other;
                    }
                    None => return Some(Err(e)),
                },
            }
        }
    }

    /// Holds and serves a registered connection, re-probing QUIC while on
    /// HTTP/2 in `auto`.
    async fn serve(
        &self,
        link: C::Link,
        selector: &mut TransportSelector,
        backoff: &mut Backoff,
        duplicates: &mut Backoff,
        started: Instant,
    ) -> Next<C::Link> {
        let transport = link.transport();
        let server_id = link.server_id().to_owned();
        let key = (self.addr, self.slot);
        let said = link.replicas();
        let Some(holding) = self.held.hold(key, &server_id, transport, said) else {
            // (A server older than `Hello.instance` welcomes a duplicate.)
            link.close_duplicate().await;
            let wait = self.duplicate_wait(duplicates);
            tracing::info!(%server_id, "reached a replica already held; dialing again in {:.1}s", wait.as_secs_f64());
            return Next::Wait(wait);
        };
        *duplicates = duplicate_backoff();
        self.lost_to
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
        let _ = self.changed.try_send(());
        let held: Vec<String> = self.held.list().into_iter().map(|r| r.server_id).collect();
        tracing::info!(%server_id, slot = self.slot, transport = transport.label(), ?held, "registered");
        let (drain_tx, drain_rx) = watch::channel(false);
        let (server_draining_tx, mut server_draining) = oneshot::channel();
        let (replicas_tx, mut replicas_rx) = watch::channel(said);
        let mut serving = Box::pin(link.serve(drain_rx, server_draining_tx, replicas_tx));
        let mut server_drain_seen = false;
        let mut stop = self.stop.clone();
        let mut reprobe_at = selector.reprobe_in().map(jittered);
        type Probe<L> = Pin<Box<dyn Future<Output = Result<L, ConnectError>> + Send>>;
        let mut probe: Option<Probe<C::Link>> = None;
        // A renewed certificate: a new connection with it takes over. A
        // failed move is tried again (ROTATE_RETRY_FIRST, doubling up to
        // ROTATE_RETRY_MAX), not left until the old certificate expires
        // and the server closes this connection with its streams.
        let mut renewed = self.settings.renewed.clone();
        renewed.borrow_and_update();
        let mut rotate: Option<Probe<C::Link>> = None;
        let mut rotate_again: Option<Pin<Box<tokio::time::Sleep>>> = None;
        let mut rotate_delay = ROTATE_RETRY_FIRST;
        let end = loop {
            let probing = probe.is_some();
            tokio::select! {
                Ok(()) = renewed.changed(), if rotate.is_none() => {
                    tracing::info!(%server_id, "certificate renewed: moving to a new connection");
                    rotate_again = None;
                    rotate = Some(Box::pin(self.attempt(transport, Some(server_id.clone()))));
                }
                _ = async {
                    match rotate_again.as_mut() {
                        Some(s) => s.await,
                        None => std::future::pending().await,
                    }
                }, if rotate.is_none() => {
                    rotate_again = None;
                    tracing::info!(%server_id, "moving to the renewed certificate again");
                    rotate = Some(Box::pin(self.attempt(transport, Some(server_id.clone()))));
                }
                result = async {
                    match rotate.as_mut() {
                        Some(p) => p.await,
                        None => std::future::pending().await,
                    }
                } => {
                    rotate = None;
                    match result {
                        Ok(new) => {
                            // The server routes nothing new to the old
                            // connection (handover); its streams finish on
                            // it, however long, until the server closes it
                            // (idle, or at the old certificate's expiry),
                            // or until this loop stops (then drained).
                            let old = in_background(serving, drain_tx, self.stop.clone());
                            return Next::Serve(new, Some(old));
                        }
                        Err(e) => {
                            let wait = jittered(rotate_delay);
                            rotate_delay = (rotate_delay * 2).min(ROTATE_RETRY_MAX);
                            tracing::warn!(
                                "moving to the renewed certificate failed, trying again in {}s \
                                 (the current connection stays meanwhile): {e}",
                                wait.as_secs()
                            );
                            rotate_again = Some(Box::pin(tokio::time::sleep(wait)));
                        }
                    }
                }
                end = &mut serving => break end,
                Ok(()) = replicas_rx.changed() => {
                    let count = *replicas_rx.borrow_and_update();
                    tracing::info!(%server_id, replicas = count, "the server says the replica count changed");
                    holding.set_expected(count);
                    // The supervisor adds or stops slots for it.
                    let _ = self.changed.try_send(());
                }
                _ = stopped(&mut stop) => {
                    let _ = drain_tx.send(true);
                    break serving.await;
                }
                said = &mut server_draining, if !server_drain_seen => {
                    server_drain_seen = true;
                    if said.is_err() {
                        // The session ended without saying; `serving` tells why.
                        continue;
                    }
                    // The server is shutting down: its streams finish on
                    // this connection in the background (drained too if
                    // this loop stops), and the slot holds another replica.
                    tracing::info!(%server_id, "the server is draining; holding another replica meanwhile");
                    let old = in_background(serving, drain_tx, self.stop.clone());
                    return Next::Retire(old);
                }
                _ = async {
                    match reprobe_at {
                        Some(d) if !probing => tokio::time::sleep(d).await,
                        _ => std::future::pending().await,
                    }
                } => {
                    probe = Some(Box::pin(self.attempt(Transport::Quic, Some(server_id.clone()))));
                }
                result = async {
                    match probe.as_mut() {
                        Some(p) => p.await,
                        None => std::future::pending().await,
                    }
                } => {
                    probe = None;
                    match result {
                        Ok(quic) => {
                            self.reprobed(selector);
                            // The HTTP/2 connection finishes its streams.
                            let _ = drain_tx.send(true);
                            let old = tokio::spawn(serving.in_current_span());
                            return Next::Serve(quic, Some(old));
                        }
                        Err(e) if reached_a_replica(&e) => {
                            // QUIC got through: a balancer sent the probe to
                            // a replica another slot holds (or one on its way
                            // out). Not a failure of QUIC; try again soon.
                            let wait = self.duplicate_wait(duplicates);
                            tracing::info!("QUIC re-probe reached another replica ({e}); again in {:.1}s", wait.as_secs_f64());
                            reprobe_at = Some(wait);
                        }
                        Err(e) => {
                            self.reprobe_failed(selector, &e);
                            reprobe_at = selector.reprobe_in().map(jittered);
                        }
                    }
                }
            }
        };
        // A server that accepts the QUIC re-probe closes the HTTP/2
        // connection it replaces (handover), which may end it before the
        // probe's answer is read here: the probe decides. The same for the
        // move to a renewed certificate: the server closes the old
        // connection at once when it is idle, and that close can be read
        // before the new connection's `Welcome`.
        if let (SessionEnd::Lost(_), Some(p)) = (&end, probe.take()) {
            match p.await {
                Ok(quic) => {
                    self.reprobed(selector);
                    return Next::Serve(quic, None);
                }
                Err(e) if reached_a_replica(&e) => {}
                Err(e) => self.reprobe_failed(selector, &e),
            }
        }
        if let (SessionEnd::Lost(_), Some(r)) = (&end, rotate.take()) {
            match r.await {
                Ok(new) => return Next::Serve(new, None),
                Err(e) => tracing::warn!("moving to the renewed certificate failed: {e}"),
            }
        }
        let lived = started.elapsed();
        match end {
            SessionEnd::Drained => Next::Stop,
            SessionEnd::Lost(reason) => {
                *self.lost_to.lock().unwrap_or_else(|p| p.into_inner()) = server_id.clone();
                let _ = self.changed.try_send(());
                backoff.connection_ended(lived);
                tracing::warn!(
                    transport = transport.label(),
                    "connection to the server lost: {reason}"
                );
                let idle = matches!(reason, crate::error::LostReason::IdleTimeout);
                if selector.lost(transport, lived, idle).is_some() {
                    tracing::warn!(
                        "QUIC died of idle timeout soon after registering; trying HTTP/2 next"
                    );
                }
                if reason.replaced() {
                    let wait = self.settings.replaced_wait();
                    tracing::warn!(
                        "another agent with this node's identity is connected; retrying in {}s",
                        wait.as_secs()
                    );
                    return Next::Wait(wait);
                }
                Next::Backoff
            }
        }
    }
}

impl<C: Connector> ReplicaLoop<C> {
    /// How long to wait after reaching a replica held already: soon (a
    /// load balancer picks again for a new port) while fewer replicas are
    /// held than the servers say exist, else `--resolve-interval` (two
    /// addresses that lead to one replica).
    fn duplicate_wait(&self, duplicates: &mut Backoff) -> Duration {
        if self.held.len() < usize::from(self.held.expected()) {
            duplicates.next_delay()
        } else {
            self.settings.resolve_interval
        }
    }

    /// A QUIC re-probe registered.
    fn reprobed(&self, selector: &mut TransportSelector) {
        self.metrics.reprobe(ReprobeResult::QuicBack);
        selector.upgraded();
        tracing::info!("QUIC works again: moved over from HTTP/2");
    }

    /// A QUIC re-probe failed; the fallback is counted when it was the
    /// second try that confirms it.
    fn reprobe_failed(&self, selector: &mut TransportSelector, e: &ConnectError) {
        self.metrics.reprobe(ReprobeResult::Failed);
        if let Some(reason) = selector.reprobe_failed() {
            self.metrics.fallback(reason);
            tracing::warn!(
                reason = reason.label(),
                "QUIC does not get through; falling back to HTTP/2 over TLS"
            );
        }
        tracing::info!("QUIC re-probe failed ({e}); staying on HTTP/2");
    }
}

/// Whether an attempt failed only because the replica it reached refused
/// it as one this agent holds already, or as shutting down: the transport
/// works (a QUIC re-probe that ends so is no sign that QUIC is blocked).
fn reached_a_replica(e: &ConnectError) -> bool {
    matches!(
        e.refusal,
        Some(proto::RefuseCode::AlreadyConnected | proto::RefuseCode::ServerDraining)
    )
}

/// The longest wait between dials of a shared address that keep reaching
/// replicas already held (one replica down, the balancer keeps picking the
/// others): its replacement is found within this.
const DUPLICATE_WAIT_MAX: Duration = Duration::from_secs(10);

/// After a failed move to a renewed certificate, the first wait before
/// trying again (jittered), doubling up to [`ROTATE_RETRY_MAX`]: a renewal
/// comes a third of the certificate's life before it expires, so there
/// is time, and a fleet that cannot move (an old server) costs one
/// handshake per agent every half hour.
const ROTATE_RETRY_FIRST: Duration = Duration::from_secs(60);
const ROTATE_RETRY_MAX: Duration = Duration::from_secs(30 * 60);

/// Waits between dials of a shared address that reach held replicas:
/// from 200 ms, doubling, at most [`DUPLICATE_WAIT_MAX`], jittered.
fn duplicate_backoff() -> Backoff {
    Backoff::with(
        Duration::from_millis(200),
        DUPLICATE_WAIT_MAX,
        Duration::from_secs(60),
    )
}

/// Completes once `stop` is true (at once if it already is).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    // A closed channel means the supervisor is gone: stop too.
    let _ = stop.wait_for(|s| *s).await;
}

/// Lets a connection the loop has left (the server drains it, or a
/// handover moved to a new one) finish its streams in a task of its own,
/// however long they take, until it ends; if the loop stops first, it is
/// drained like the others.
fn in_background(
    mut serving: Pin<Box<impl Future<Output = SessionEnd> + Send + 'static>>,
    drain_tx: watch::Sender<bool>,
    mut stop: watch::Receiver<bool>,
) -> tokio::task::JoinHandle<SessionEnd> {
    tokio::spawn(
        async move {
            tokio::select! {
                end = &mut serving => end,
                _ = stopped(&mut stop) => {
                    let _ = drain_tx.send(true);
                    serving.await
                }
            }
        }
        .in_current_span(),
    )
}

/// A re-probe wait with jitter (between half and all of it), so agents
/// that fell back together do not re-probe in lock step.
fn jittered(d: Duration) -> Duration {
    d.mul_f64(0.5 + fastrand::f64() / 2.0)
}

/// The real connector: reloads the credentials and registers over QUIC
/// (from a UDP port of its own) or HTTP/2.
#[derive(Clone)]
pub struct ServerConnector {
    pub config: Arc<AgentConfig>,
    pub metrics: Arc<AgentMetrics>,
    pub target: Target,
    /// This agent process's random id (`Hello.instance`).
    pub instance: u64,
}

impl Connector for ServerConnector {
    type Link = ServerConnection;

    fn connect(
        &self,
        transport: Transport,
        handover: bool,
        previous: String,
    ) -> impl Future<Output = Result<ServerConnection, ConnectError>> + Send {
        let this = self.clone();
        async move {
            let credentials = this.config.credentials().map_err(|e| {
                ConnectError::new(
                    transport,
                    this.target.addr,
                    crate::selector::FailureKind::Local,
                    format!("cannot load certificates: {e}"),
                )
            })?;
            this.metrics.certificate_loaded(&credentials.identity);
            let registration = Registration {
                config: &this.config,
                credentials,
                metrics: &this.metrics,
                target: &this.target,
                handover,
                instance: this.instance,
                previous,
            };
            match transport {
                Transport::Quic => {
                    // Every QUIC connection has an endpoint, a UDP port,
                    // of its own: a load balancer, like a NAT, maps UDP by
                    // 5-tuple, so connections to one shared address must
                    // not share a socket, and an attempt that reached a
                    // replica already held must come back from another
                    // port to be balanced anew. (Over TCP every connection
                    // has its own port anyway.)
                    let endpoint = crate::supervisor::bind_endpoint(&this.config).map_err(|e| {
                        ConnectError::new(
                            transport,
                            this.target.addr,
                            crate::selector::FailureKind::Local,
                            e.to_string(),
                        )
                    })?;
                    registration.quic(&endpoint).await
                }
                Transport::H2 => registration.h2().await,
            }
        }
    }
}

impl Link for ServerConnection {
    fn server_id(&self) -> &str {
        &self.welcome.server_id
    }

    fn replicas(&self) -> u16 {
        self.welcome.replicas
    }

    fn transport(&self) -> Transport {
        ServerConnection::transport(self)
    }

    fn serve(
        self,
        drain: watch::Receiver<bool>,
        server_draining: oneshot::Sender<()>,
        replicas: watch::Sender<u16>,
    ) -> impl Future<Output = SessionEnd> + Send + 'static {
        crate::serve::serve(self, drain, server_draining, replicas)
    }

    fn close_duplicate(self) -> impl Future<Output = ()> + Send {
        self.close(proto::codes::close::NORMAL, "duplicate replica")
    }
}

#[cfg(test)]
mod tests;
