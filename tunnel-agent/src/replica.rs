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

use tokio::sync::{mpsc, watch};
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
    fn connect(
        &self,
        transport: Transport,
        handover: bool,
    ) -> impl Future<Output = Result<Self::Link, ConnectError>> + Send;
}

/// A registered connection, as the loop sees it.
pub trait Link: Send + 'static {
    fn server_id(&self) -> &str;
    fn transport(&self) -> Transport;
    /// Serves streams until the connection ends, or `drain` turns true.
    fn serve(
        self,
        drain: watch::Receiver<bool>,
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
    /// Serve this connection at once (a QUIC re-probe registered).
    Serve(L),
    Wait(Duration),
    Backoff,
}

/// Holds one replica address until `stop`.
pub struct ReplicaLoop<C: Connector> {
    pub connector: C,
    pub addr: SocketAddr,
    pub settings: LoopSettings,
    pub held: HeldReplicas,
    pub metrics: Arc<AgentMetrics>,
    pub stop: watch::Receiver<bool>,
    /// Told about every lost connection (the supervisor resolves again).
    pub lost: mpsc::Sender<()>,
}

impl<C: Connector> ReplicaLoop<C> {
    pub async fn run(self) {
        let s = &self.settings;
        let mut selector =
            TransportSelector::new(s.choice, s.idle_timeout, s.reprobe_first, s.reprobe_max);
        let mut backoff = Backoff::new();
        let mut ready: Option<C::Link> = None;
        loop {
            let started = Instant::now();
            let next = match ready.take() {
                Some(link) => self.serve(link, &mut selector, &mut backoff, started).await,
                None => match self.connect(&mut selector).await {
                    Some(Ok(link)) => self.serve(link, &mut selector, &mut backoff, started).await,
                    Some(Err(e)) => {
                        tracing::warn!("{e}");
                        Next::Backoff
                    }
                    None => Next::Stop,
                },
            };
            let wait = match next {
                Next::Stop => return,
                Next::Serve(link) => {
                    ready = Some(link);
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
                return;
            }
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

    async fn attempt(&self, transport: Transport, handover: bool) -> Result<C::Link, ConnectError> {
        let bound = self.bound(transport);
        match tokio::time::timeout(bound, self.connector.connect(transport, handover)).await {
            Ok(r) => r,
            Err(_) => Err(ConnectError::timeout(transport, self.addr, bound)),
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
                r = self.attempt(transport, false) => r,
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
        started: Instant,
    ) -> Next<C::Link> {
        let transport = link.transport();
        let server_id = link.server_id().to_owned();
        let Some(_held) = self.held.hold(self.addr, &server_id, transport) else {
            tracing::info!(%server_id, "this address reaches a replica already held; not connecting twice");
            link.close_duplicate().await;
            return Next::Wait(self.settings.resolve_interval);
        };
        tracing::info!(%server_id, transport = transport.label(), replicas = self.held.len(), "registered");
        let (drain_tx, drain_rx) = watch::channel(false);
        let mut serving = Box::pin(link.serve(drain_rx));
        let mut stop = self.stop.clone();
        let mut reprobe_at = selector.reprobe_in().map(jittered);
        type Probe<L> = Pin<Box<dyn Future<Output = Result<L, ConnectError>> + Send>>;
        let mut probe: Option<Probe<C::Link>> = None;
        let end = loop {
            let probing = probe.is_some();
            tokio::select! {
                end = &mut serving => break end,
                _ = stopped(&mut stop) => {
                    let _ = drain_tx.send(true);
                    break serving.await;
                }
                _ = async {
                    match reprobe_at {
                        Some(d) if !probing => tokio::time::sleep(d).await,
                        _ => std::future::pending().await,
                    }
                } => {
                    let this = self.connector.clone();
                    let bound = self.bound(Transport::Quic);
                    let addr = self.addr;
                    probe = Some(Box::pin(async move {
                        match tokio::time::timeout(bound, this.connect(Transport::Quic, true)).await {
                            Ok(r) => r,
                            Err(_) => Err(ConnectError::timeout(Transport::Quic, addr, bound)),
                        }
                    }));
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
                            self.metrics.reprobe(ReprobeResult::QuicBack);
                            selector.upgraded();
                            tracing::info!("QUIC works again: moved over from HTTP/2");
                            // The HTTP/2 connection finishes its streams.
                            let _ = drain_tx.send(true);
                            tokio::spawn(serving.in_current_span());
                            return Next::Serve(quic);
                        }
                        Err(e) => {
                            self.metrics.reprobe(ReprobeResult::Failed);
                            selector.reprobe_failed();
                            reprobe_at = selector.reprobe_in().map(jittered);
                            tracing::info!("QUIC re-probe failed ({e}); staying on HTTP/2");
                        }
                    }
                }
            }
        };
        let lived = started.elapsed();
        match end {
            SessionEnd::Drained => Next::Stop,
            SessionEnd::Lost(reason) => {
                let _ = self.lost.try_send(());
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

/// Completes once `stop` is true (at once if it already is).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    // A closed channel means the supervisor is gone: stop too.
    let _ = stop.wait_for(|s| *s).await;
}

/// A re-probe wait with jitter (between half and all of it), so agents
/// that fell back together do not re-probe in lock step.
fn jittered(d: Duration) -> Duration {
    d.mul_f64(0.5 + fastrand::f64() / 2.0)
}

/// The real connector: reloads the credentials and registers over QUIC
/// (through the agent's endpoint) or HTTP/2.
#[derive(Clone)]
pub struct ServerConnector {
    pub config: Arc<AgentConfig>,
    pub metrics: Arc<AgentMetrics>,
    pub endpoint: quinn::Endpoint,
    pub target: Target,
}

impl Connector for ServerConnector {
    type Link = ServerConnection;

    fn connect(
        &self,
        transport: Transport,
        handover: bool,
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
            let registration = Registration {
                config: &this.config,
                credentials,
                metrics: &this.metrics,
                target: &this.target,
                handover,
            };
            match transport {
                Transport::Quic => registration.quic(&this.endpoint).await,
                Transport::H2 => registration.h2().await,
            }
        }
    }
}

impl Link for ServerConnection {
    fn server_id(&self) -> &str {
        &self.welcome.server_id
    }

    fn transport(&self) -> Transport {
        ServerConnection::transport(self)
    }

    fn serve(
        self,
        drain: watch::Receiver<bool>,
    ) -> impl Future<Output = SessionEnd> + Send + 'static {
        crate::serve::serve(self, drain)
    }

    fn close_duplicate(self) -> impl Future<Output = ()> + Send {
        self.close(proto::codes::close::NORMAL, "duplicate replica")
    }
}

#[cfg(test)]
mod tests {
    //! The loop's policy against a fake connector, on a paused clock.

    use std::sync::Mutex;

    use proto::codes::close;

    use super::*;
    use crate::error::LostReason;
    use crate::selector::{FailureKind, FallbackReason};

    /// What the fake server does with one connection attempt.
    #[derive(Clone, Debug)]
    enum Answer {
        /// Never answers (packets dropped).
        Hang,
        /// No answer until this long after the start, then registers (a
        /// QUIC handshake retransmits until the server is back).
        DownUntil(Duration),
        Fail(FailureKind),
        /// Registers; the connection is lost `after` this long with
        /// `reason`, or serves until drained when `None`.
        Register(Option<(Duration, LostReason)>),
    }

    #[derive(Clone, Debug, PartialEq, Eq)]
    enum Event {
        Attempt(Transport, bool),
        Served(Transport),
        Drained(Transport),
        Lost(Transport),
    }

    type Script = dyn Fn(Transport, Duration) -> Answer + Send + Sync;

    #[derive(Clone)]
    struct Fake {
        script: Arc<Script>,
        events: Arc<Mutex<Vec<Event>>>,
        start: tokio::time::Instant,
    }

    impl Fake {
        fn new(script: impl Fn(Transport, Duration) -> Answer + Send + Sync + 'static) -> Self {
            Fake {
                script: Arc::new(script),
                events: Arc::default(),
                start: tokio::time::Instant::now(),
            }
        }

        fn events(&self) -> Vec<Event> {
            self.events.lock().unwrap().clone()
        }

        fn attempts(&self, transport: Transport) -> usize {
            self.events()
                .iter()
                .filter(|e| matches!(e, Event::Attempt(t, _) if *t == transport))
                .count()
        }

        fn served(&self) -> Vec<Transport> {
            self.events()
                .iter()
                .filter_map(|e| match e {
                    Event::Served(t) => Some(*t),
                    _ => None,
                })
                .collect()
        }
    }

    struct FakeLink {
        transport: Transport,
        ends: Option<(Duration, LostReason)>,
        events: Arc<Mutex<Vec<Event>>>,
    }

    impl Connector for Fake {
        type Link = FakeLink;

        fn connect(
            &self,
            transport: Transport,
            handover: bool,
        ) -> impl Future<Output = Result<FakeLink, ConnectError>> + Send {
            let this = self.clone();
            async move {
                this.events
                    .lock()
                    .unwrap()
                    .push(Event::Attempt(transport, handover));
                let addr = SocketAddr::from(([127, 0, 0, 1], 1));
                match (this.script)(transport, this.start.elapsed()) {
                    Answer::Hang => std::future::pending().await,
                    Answer::DownUntil(up) => {
                        tokio::time::sleep_until(this.start + up).await;
                        Ok(FakeLink {
                            transport,
                            ends: None,
                            events: this.events.clone(),
                        })
                    }
                    Answer::Fail(kind) => Err(ConnectError::new(transport, addr, kind, "fake")),
                    Answer::Register(ends) => Ok(FakeLink {
                        transport,
                        ends,
                        events: this.events.clone(),
                    }),
                }
            }
        }
    }

    impl Link for FakeLink {
        fn server_id(&self) -> &str {
            "replica-1"
        }

        fn transport(&self) -> Transport {
            self.transport
        }

        async fn serve(self, mut drain: watch::Receiver<bool>) -> SessionEnd {
            let t = self.transport;
            self.events.lock().unwrap().push(Event::Served(t));
            let lose = async {
                match &self.ends {
                    Some((after, _)) => tokio::time::sleep(*after).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = async { drain.wait_for(|d| *d).await.map(|_| ()) } => {
                    // Open streams take a while to finish.
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    self.events.lock().unwrap().push(Event::Drained(t));
                    SessionEnd::Drained
                }
                _ = lose => {
                    self.events.lock().unwrap().push(Event::Lost(t));
                    SessionEnd::Lost(self.ends.clone().expect("ends").1)
                }
            }
        }

        async fn close_duplicate(self) {}
    }

    struct Running {
        fake: Fake,
        metrics: Arc<AgentMetrics>,
        held: HeldReplicas,
        stop: watch::Sender<bool>,
        task: tokio::task::JoinHandle<()>,
    }

    impl Running {
        async fn stop(self) -> Fake {
            self.stop.send(true).unwrap();
            self.task.await.unwrap();
            self.fake
        }

        fn held(&self) -> Vec<Transport> {
            self.held.list().into_iter().map(|r| r.transport).collect()
        }
    }

    fn start(choice: TransportChoice, fake: Fake) -> Running {
        let (stop, stop_rx) = watch::channel(false);
        let (lost, _lost_rx) = mpsc::channel(64);
        let metrics = Arc::new(AgentMetrics::default());
        let held = HeldReplicas::default();
        let replica = ReplicaLoop {
            connector: fake.clone(),
            addr: SocketAddr::from(([127, 0, 0, 1], 1)),
            settings: LoopSettings {
                choice,
                quic_timeout: Duration::from_secs(5),
                connect_timeout: Duration::from_secs(10),
                idle_timeout: Duration::from_secs(30),
                reprobe_first: Duration::from_secs(5),
                reprobe_max: Duration::from_secs(300),
                resolve_interval: Duration::from_secs(30),
            },
            held: held.clone(),
            metrics: metrics.clone(),
            stop: stop_rx,
            lost,
        };
        let task = tokio::spawn(async move {
            // Keep the loss channel open for the loop's lifetime.
            let _lost_rx = _lost_rx;
            replica.run().await
        });
        Running {
            fake,
            metrics,
            held,
            stop,
            task,
        }
    }

    async fn run_for(secs: u64) {
        tokio::time::sleep(Duration::from_secs(secs)).await;
    }

    fn total_fallbacks(m: &AgentMetrics) -> u64 {
        [
            FallbackReason::QuicTimeout,
            FallbackReason::QuicUnreachable,
            FallbackReason::QuicIdleAfterConnect,
        ]
        .into_iter()
        .map(|r| m.fallbacks(r))
        .sum()
    }

    #[tokio::test(start_paused = true)]
    async fn quic_timeout_falls_back_to_h2() {
        let fake = Fake::new(|t, _| match t {
            Transport::Quic => Answer::Hang,
            Transport::H2 => Answer::Register(None),
        });
        let r = start(TransportChoice::Auto, fake);
        run_for(4).await;
        assert!(r.held().is_empty(), "QUIC gets {}s", 5);
        run_for(2).await;
        assert_eq!(r.held(), [Transport::H2]);
        assert_eq!(r.metrics.fallbacks(FallbackReason::QuicTimeout), 1);
        let fake = r.stop().await;
        assert_eq!(fake.served(), [Transport::H2]);
        assert!(fake.events().contains(&Event::Drained(Transport::H2)));
    }

    #[tokio::test(start_paused = true)]
    async fn a_refusal_never_falls_back() {
        for kind in [FailureKind::Refused, FailureKind::Tls, FailureKind::Local] {
            let fake = Fake::new(move |t, _| match t {
                Transport::Quic => Answer::Fail(kind),
                Transport::H2 => Answer::Register(None),
            });
            let r = start(TransportChoice::Auto, fake);
            run_for(120).await;
            assert_eq!(total_fallbacks(&r.metrics), 0, "{kind:?}");
            assert!(r.held().is_empty(), "{kind:?}");
            let fake = r.stop().await;
            assert_eq!(fake.attempts(Transport::H2), 0, "{kind:?}");
            assert!(fake.attempts(Transport::Quic) >= 3, "retried with backoff");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn both_failing_stays_on_quic() {
        let fake = Fake::new(|t, _| match t {
            Transport::Quic => Answer::Hang,
            Transport::H2 => Answer::Fail(FailureKind::Unreachable),
        });
        let r = start(TransportChoice::Auto, fake);
        run_for(120).await;
        assert_eq!(total_fallbacks(&r.metrics), 0);
        let fake = r.stop().await;
        // Every attempt starts with QUIC, then tries HTTP/2 once.
        let attempts: Vec<Transport> = fake
            .events()
            .iter()
            .filter_map(|e| match e {
                Event::Attempt(t, _) => Some(*t),
                _ => None,
            })
            .collect();
        assert!(attempts.len() >= 6, "{attempts:?}");
        for pair in attempts.chunks(2) {
            assert_eq!(pair[0], Transport::Quic, "{attempts:?}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn idle_death_right_after_connect_falls_back_once() {
        let fake = Fake::new(|t, _| match t {
            Transport::Quic => {
                Answer::Register(Some((Duration::from_secs(30), LostReason::IdleTimeout)))
            }
            Transport::H2 => Answer::Register(None),
        });
        let r = start(TransportChoice::Auto, fake);
        run_for(33).await;
        // Within the first re-probe wait: still on HTTP/2.
        assert_eq!(r.held(), [Transport::H2]);
        assert_eq!(r.metrics.fallbacks(FallbackReason::QuicIdleAfterConnect), 1);
        assert_eq!(total_fallbacks(&r.metrics), 1);
        let fake = r.stop().await;
        assert_eq!(fake.served()[..2], [Transport::Quic, Transport::H2]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_successful_reprobe_upgrades_and_the_h2_connection_drains() {
        // UDP is blocked for the first 20 s.
        let fake = Fake::new(|t, now| match t {
            Transport::Quic if now < Duration::from_secs(20) => Answer::Hang,
            Transport::Quic => Answer::Register(None),
            Transport::H2 => Answer::Register(None),
        });
        let r = start(TransportChoice::Auto, fake);
        run_for(10).await;
        assert_eq!(r.held(), [Transport::H2]);
        // Re-probes every 5-10 s, then 10-20 s...: back within a minute.
        run_for(60).await;
        assert_eq!(r.held(), [Transport::Quic]);
        assert_eq!(r.metrics.reprobes(ReprobeResult::QuicBack), 1);
        assert!(r.metrics.reprobes(ReprobeResult::Failed) >= 1);
        let events = r.fake.events();
        // The HTTP/2 connection was drained (its streams finished), not dropped.
        assert!(
            events.contains(&Event::Drained(Transport::H2)),
            "{events:?}"
        );
        assert!(!events.contains(&Event::Lost(Transport::H2)), "{events:?}");
        // The QUIC connection that took over announced the handover.
        assert!(
            events.contains(&Event::Attempt(Transport::Quic, true)),
            "{events:?}"
        );
        assert_eq!(r.metrics.fallbacks(FallbackReason::QuicTimeout), 1);
        let fake = r.stop().await;
        assert_eq!(fake.served(), [Transport::H2, Transport::Quic]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_server_restart_keeps_auto_on_quic() {
        // Registered until the server shuts down at 10 s; down (no UDP
        // answer, TCP refused) until 25 s; then up again.
        let fake = Fake::new(|t, now| {
            let down = now >= Duration::from_secs(10) && now < Duration::from_secs(25);
            match t {
                _ if now < Duration::from_secs(10) => Answer::Register(Some((
                    Duration::from_secs(10) - now,
                    LostReason::ClosedByServer {
                        code: close::SERVER_SHUTDOWN,
                        reason: "server shutting down".into(),
                    },
                ))),
                Transport::Quic if down => Answer::DownUntil(Duration::from_secs(25)),
                Transport::H2 if down => Answer::Fail(FailureKind::Unreachable),
                _ => Answer::Register(None),
            }
        });
        let r = start(TransportChoice::Auto, fake);
        run_for(90).await;
        assert_eq!(r.held(), [Transport::Quic]);
        assert_eq!(total_fallbacks(&r.metrics), 0);
        let fake = r.stop().await;
        assert_eq!(fake.served(), [Transport::Quic, Transport::Quic]);
    }

    #[tokio::test(start_paused = true)]
    async fn replaced_by_another_agent_waits_before_trying_again() {
        let fake = Fake::new(|_, _| {
            Answer::Register(Some((
                Duration::from_secs(1),
                LostReason::GoAway(proto::GoAway {
                    code: close::REPLACED,
                    reason: "replaced".into(),
                }),
            )))
        });
        let r = start(TransportChoice::Quic, fake);
        run_for(20).await;
        assert_eq!(r.fake.attempts(Transport::Quic), 1, "no fight within 30 s");
        run_for(20).await;
        assert_eq!(r.fake.attempts(Transport::Quic), 2);
        r.stop().await;
    }
}
