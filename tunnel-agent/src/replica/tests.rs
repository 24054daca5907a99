//! The reconnect loop's policy against a fake connector, on a paused clock.

use std::sync::Mutex;

use proto::codes::close;

use super::*;
use crate::error::LostReason;
use crate::selector::{FailureKind, FallbackReason};
use tokio::sync::watch;

/// What the fake server does with one connection attempt.
#[derive(Clone, Debug)]
enum Answer {
    /// Never answers (packets dropped).
    Hang,
    /// No answer until this long after the start, then registers (a
    /// QUIC handshake retransmits until the server is back).
    DownUntil(Duration),
    Fail(FailureKind),
    /// The server answers and refuses the registration with this code.
    Refuse(proto::RefuseCode),
    /// Registers; the connection is lost `after` this long with
    /// `reason`, or serves until drained when `None`.
    Register(Option<(Duration, LostReason)>),
    /// Registers; the server says it is draining after the first
    /// duration and closes the connection after the second.
    RegisterServerDrains(Duration, Duration),
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
    /// When the server says it is draining.
    server_drains: Option<Duration>,
    events: Arc<Mutex<Vec<Event>>>,
}

impl Connector for Fake {
    type Link = FakeLink;

    fn connect(
        &self,
        transport: Transport,
        handover: bool,
        _previous: String,
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
                        server_drains: None,
                        events: this.events.clone(),
                    })
                }
                Answer::Fail(kind) => Err(ConnectError::new(transport, addr, kind, "fake")),
                Answer::Refuse(code) => {
                    let mut e = ConnectError::new(transport, addr, FailureKind::Refused, "fake");
                    e.refusal = Some(code);
                    Err(e)
                }
                Answer::Register(ends) => Ok(FakeLink {
                    transport,
                    ends,
                    server_drains: None,
                    events: this.events.clone(),
                }),
                Answer::RegisterServerDrains(says, closes) => Ok(FakeLink {
                    transport,
                    ends: Some((
                        closes,
                        LostReason::ClosedByServer {
                            code: close::SERVER_SHUTDOWN,
                            reason: "server shutting down".into(),
                        },
                    )),
                    server_drains: Some(says),
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

    async fn serve(
        self,
        mut drain: watch::Receiver<bool>,
        server_draining: oneshot::Sender<()>,
        _replicas: watch::Sender<u16>,
    ) -> SessionEnd {
        let t = self.transport;
        self.events.lock().unwrap().push(Event::Served(t));
        if let Some(after) = self.server_drains {
            tokio::spawn(async move {
                tokio::time::sleep(after).await;
                let _ = server_draining.send(());
            });
        }
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
    start_with(choice, fake, watch::channel(0).1)
}

/// [`start`] with the renewal ticks of `renewed`.
fn start_with(choice: TransportChoice, fake: Fake, renewed: watch::Receiver<u64>) -> Running {
    let (stop, stop_rx) = watch::channel(false);
    let (lost, _lost_rx) = mpsc::channel(64);
    let metrics = Arc::new(AgentMetrics::default());
    let held = HeldReplicas::default();
    let replica = ReplicaLoop {
        connector: fake.clone(),
        addr: SocketAddr::from(([127, 0, 0, 1], 1)),
        slot: 0,
        settings: LoopSettings {
            choice,
            quic_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(30),
            reprobe_first: Duration::from_secs(5),
            reprobe_max: Duration::from_secs(300),
            resolve_interval: Duration::from_secs(30),
            renewed,
        },
        held: held.clone(),
        metrics: metrics.clone(),
        stop: stop_rx,
        changed: lost,
        lost_to: Default::default(),
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
    // Serving over HTTP/2 while QUIC is tried a second time, at once.
    assert_eq!(r.held(), [Transport::H2]);
    assert_eq!(r.metrics.fallbacks(FallbackReason::QuicTimeout), 0);
    assert_eq!(r.fake.attempts(Transport::Quic), 2);
    run_for(5).await;
    assert_eq!(r.metrics.fallbacks(FallbackReason::QuicTimeout), 1);
    assert_eq!(r.metrics.reprobes(ReprobeResult::Failed), 1);
    let fake = r.stop().await;
    assert_eq!(fake.served(), [Transport::H2]);
    assert!(fake.events().contains(&Event::Drained(Transport::H2)));
}

/// The race of every rolling update: the server comes back while a QUIC
/// attempt is waiting for an answer to an Initial sent while it was down.
/// HTTP/2 registers; the second QUIC try at once gets through, and the
/// agent moves over without counting a fallback.
#[tokio::test(start_paused = true)]
async fn a_server_back_during_the_quic_attempt_is_no_fallback() {
    let fake = Fake::new(|t, now| match t {
        Transport::Quic if now < Duration::from_secs(1) => Answer::Hang,
        _ => Answer::Register(None),
    });
    let r = start(TransportChoice::Auto, fake);
    run_for(10).await;
    assert_eq!(r.held(), [Transport::Quic]);
    assert_eq!(total_fallbacks(&r.metrics), 0);
    let fake = r.stop().await;
    let mut served = fake.served();
    served.sort_by_key(|t| t.label());
    assert_eq!(served, [Transport::H2, Transport::Quic]);
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
    // QUIC dies at 30 s; HTTP/2 registers within the first backoff (≤ 1 s);
    // the first re-probe waits at least 2.5 s (5 s with jitter): at 32 s
    // the agent is on HTTP/2.
    run_for(32).await;
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

/// A server shutting down says so: its connection finishes in the
/// background (until the server closes it) while the loop holds another
/// replica at once; stopping the agent drains both.
#[tokio::test(start_paused = true)]
async fn a_draining_server_is_replaced_while_its_streams_finish() {
    let fake = Fake::new(|_, now| {
        if now < Duration::from_secs(1) {
            Answer::RegisterServerDrains(Duration::from_secs(2), Duration::from_secs(20))
        } else {
            Answer::Register(None)
        }
    });
    let r = start(TransportChoice::Quic, fake);
    run_for(1).await;
    assert_eq!(r.held(), [Transport::Quic]);
    run_for(2).await;
    // The second connection is held; the first still serves.
    assert_eq!(r.fake.attempts(Transport::Quic), 2);
    assert_eq!(r.held(), [Transport::Quic]);
    assert!(!r.fake.events().contains(&Event::Lost(Transport::Quic)));
    // The server closes the first when its streams are done.
    run_for(20).await;
    assert!(r.fake.events().contains(&Event::Lost(Transport::Quic)));
    assert_eq!(
        r.fake.attempts(Transport::Quic),
        2,
        "no reconnect for the retired one"
    );
    let fake = r.stop().await;
    assert!(fake.events().contains(&Event::Drained(Transport::Quic)));
}

fn replaced() -> LostReason {
    LostReason::ClosedByServer {
        code: close::REPLACED,
        reason: "the agent moved to a new connection".into(),
    }
}

/// The server closes an idle connection the moment the move to a renewed
/// certificate registers, and that close can be read before the new
/// connection's `Welcome`: the move still stands, with no 30 s wait.
#[tokio::test(start_paused = true)]
async fn a_renewal_move_whose_old_connection_closes_first_still_moves() {
    let fake = Fake::new(|_, now| {
        if now < Duration::from_secs(1) {
            // Closed (REPLACED) at 10.000 s, by the server, for the move.
            Answer::Register(Some((Duration::from_secs(10), replaced())))
        } else {
            // The move's Welcome is read at 10.001 s.
            Answer::DownUntil(Duration::from_millis(10_001))
        }
    });
    let (renew, renewed) = watch::channel(0u64);
    let r = start_with(TransportChoice::Quic, fake, renewed);
    tokio::time::sleep(Duration::from_millis(9_900)).await;
    renew.send_modify(|g| *g += 1);
    run_for(20).await;
    assert_eq!(
        r.fake.served(),
        [Transport::Quic, Transport::Quic],
        "{:?}",
        r.fake.events()
    );
    assert_eq!(r.fake.attempts(Transport::Quic), 2, "{:?}", r.fake.events());
    assert_eq!(r.held(), [Transport::Quic]);
    r.stop().await;
}

/// A move to a renewed certificate that fails is tried again (after about
/// a minute, then less often), not left until the old certificate
/// expires.
#[tokio::test(start_paused = true)]
async fn a_failed_renewal_move_is_tried_again() {
    let fake = Fake::new(|_, now| {
        if now < Duration::from_secs(1) {
            Answer::Register(None)
        } else if now < Duration::from_secs(10) {
            Answer::Fail(FailureKind::Timeout)
        } else {
            Answer::Register(None)
        }
    });
    let (renew, renewed) = watch::channel(0u64);
    let r = start_with(TransportChoice::Quic, fake, renewed);
    run_for(5).await;
    renew.send_modify(|g| *g += 1);
    run_for(1).await;
    let moves = |f: &Fake| {
        f.events()
            .iter()
            .filter(|e| matches!(e, Event::Attempt(_, true)))
            .count()
    };
    assert_eq!(moves(&r.fake), 1);
    assert_eq!(r.fake.served(), [Transport::Quic]);
    // Tried again 30-60 s later, and that one registers.
    run_for(70).await;
    assert_eq!(moves(&r.fake), 2, "{:?}", r.fake.events());
    assert_eq!(
        r.fake.served(),
        [Transport::Quic, Transport::Quic],
        "{:?}",
        r.fake.events()
    );
    r.stop().await;
}

/// A QUIC re-probe that a load balancer sent to a replica another slot
/// holds is refused there (`AlreadyConnected`): QUIC got through, so it is
/// no fallback and no failed re-probe; the next one comes soon.
#[tokio::test(start_paused = true)]
async fn a_reprobe_refused_as_a_duplicate_is_no_sign_quic_is_blocked() {
    let fake = Fake::new(|t, now| match t {
        Transport::Quic if now < Duration::from_secs(5) => Answer::Hang,
        Transport::Quic if now < Duration::from_secs(20) => {
            Answer::Refuse(proto::RefuseCode::AlreadyConnected)
        }
        Transport::Quic => Answer::Register(None),
        Transport::H2 => Answer::Register(None),
    });
    let r = start(TransportChoice::Auto, fake);
    run_for(10).await;
    assert_eq!(r.held(), [Transport::H2]);
    run_for(60).await;
    assert_eq!(r.held(), [Transport::Quic], "{:?}", r.fake.events());
    assert_eq!(r.metrics.reprobes(ReprobeResult::Failed), 0);
    assert_eq!(total_fallbacks(&r.metrics), 0, "{:?}", r.fake.events());
    r.stop().await;
}
