//! The QUIC listener agents dial: handshake, identity, registration.
//!
//! The certificate is the identity. After the mutual-TLS handshake the
//! agent opens its control stream and sends `Hello`; the server checks the
//! node name against the certificate's CN and every claimed address against
//! its IP SANs, answers `Welcome` or `Refuse`, and registers the agent.
//! The control stream then stays open: `Drain` takes the agent out of
//! routing, and the end of the stream or of the connection deregisters it.

use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use certs::Identity;
use proto::codes::close;
use proto::{Hello, Message, Refusal, RefuseCode, Welcome};
use rustls::pki_types::CertificateDer;
use tokio::io::AsyncWriteExt;
use tracing::Instrument;
use transport::net::canonical_ip;
use transport::{read_message, TunnelStream};

use crate::admission::{Admission, Permit};
use crate::handshake::HandshakeFailure;
use crate::link::AgentLink;
use crate::registry::AgentHandle;
use crate::Shared;

/// Accepts agent connections until the endpoint closes.
///
/// Every connection attempt passes the QUIC [`HandshakeGate`] first:
/// admitted, it is handshaken in a task of its own; over the Retry
/// threshold (or its source's share) without a proven address, it gets a
/// Retry; over the cap, or over its source's share with a proven address,
/// it is ignored. Ignored rather than refused: a refusal costs deriving
/// the Initial keys and sending a packet for every Initial of the flood
/// (quinn ignores at its own `max_incoming` for the same reason), while
/// a real agent simply retransmits its Initial and gets in when a slot
/// frees, and its `auto` transport choice still sees "no answer" rather
/// than a refusal it would not fall back from.
///
/// [`HandshakeGate`]: crate::handshake::HandshakeGate
pub async fn serve(endpoint: quinn::Endpoint, shared: Arc<Shared>) {
    while let Some(incoming) = endpoint.accept().await {
        let remote = incoming.remote_address();
        let validated = incoming.remote_address_validated();
        let permit = match shared
            .quic_handshakes
            .admit(&shared.metrics, remote, validated)
        {
            Admission::Admit(permit) => permit,
            Admission::Retry(_) => {
                // Only unvalidated sources get here, and they may always
                // be retried; should quinn disagree, drop the attempt.
                if let Err(e) = incoming.retry() {
                    e.into_incoming().ignore();
                }
                continue;
            }
            Admission::Shed(_) => {
                incoming.ignore();
                continue;
            }
        };
        let shared = shared.clone();
        let span = tracing::info_span!("agent", %remote, node = tracing::field::Empty);
        tokio::spawn(
            async move {
                match handle(incoming, permit, shared).await {
                    // Counted and logged (at a bounded rate) by the gate.
                    Ok(()) | Err(AgentError::Handshake(_)) => {}
                    Err(e) => tracing::warn!("agent connection ended: {e}"),
                }
            }
            .instrument(span),
        );
    }
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum AgentError {
    #[error(transparent)]
    Handshake(#[from] HandshakeFailure),
    #[error("registration refused ({}): {}", .0.code.label(), .0.reason)]
    Refused(Refusal),
    #[error("no control stream: {0}")]
    Control(String),
}

async fn handle(
    incoming: quinn::Incoming,
    permit: Permit,
    shared: Arc<Shared>,
) -> Result<(), AgentError> {
    let gate = &shared.quic_handshakes;
    // The handshake may fail before it starts (quinn could not accept the
    // attempt); that is a failed handshake like any other.
    let connecting = incoming.accept();
    let conn = gate
        .run(&shared.metrics, permit, async move { connecting?.await })
        .await?;
    let certs = conn
        .peer_identity()
        .and_then(|any| any.downcast::<Vec<CertificateDer<'static>>>().ok())
        .map(|b| *b)
        .unwrap_or_default();
    let link = AgentLink::Quic(conn.clone());
    let control = async {
        conn.accept_bi()
            .await
            .map(|(send, recv)| {
                transport::mark_control(&send);
                TunnelStream::new(transport::QuicSend::new(send), recv)
            })
            .map_err(|e| e.to_string())
    };
    serve_agent(shared, &certs, link, control, None).await
}

/// Everything after the transport's handshake, the same for QUIC and
/// HTTP/2: identity from `certs`, `Hello` on the `control` stream, checks,
/// `Welcome` or `Refuse`, registration, and watching the control stream
/// until the connection ends.
pub(crate) async fn serve_agent(
    shared: Arc<Shared>,
    certs: &[CertificateDer<'static>],
    link: AgentLink,
    control: impl std::future::Future<Output = Result<TunnelStream, String>>,
    unauthenticated: Option<crate::enroll::Unauthenticated>,
) -> Result<(), AgentError> {
    let timeout = shared.config.register_timeout;
    let metrics = &shared.metrics;
    // With enrollment on, a peer may come without a certificate: then it
    // may only enroll.
    let identity = if certs.is_empty() && shared.enroller.is_some() {
        None
    } else {
        match peer_identity(certs) {
            Ok(id) => Some(id),
            Err(reason) => {
                metrics.refused(RefuseCode::BadCertificate.label());
                link.close(close::REFUSED, &reason);
                return Err(AgentError::Refused(Refusal {
                    code: RefuseCode::BadCertificate,
                    reason,
                }));
            }
        }
    };
    if let Some(identity) = &identity {
        tracing::Span::current().record("node", identity.common_name.as_str());
        if let Some(reason) = shared.live_tls.as_ref().and_then(|t| t.denies(identity)) {
            metrics.refused("revoked");
            let reason = format!("certificate revoked: {reason}");
            link.close(close::REVOKED, &reason);
            return Err(AgentError::Refused(Refusal {
                code: RefuseCode::BadCertificate,
                reason,
            }));
        }
    }

    // A peer without a certificate counts against the enrollment caps
    // while it is connected, and has less time to speak.
    let (_unauthenticated, timeout) = match (&identity, &shared.enroller, unauthenticated) {
        (None, Some(_), Some(permit)) => (
            Some(permit),
            timeout.min(crate::enroll::Enroller::ENROLL_TIMEOUT),
        ),
        (None, Some(enroller), None) => {
            match enroller.admit_unauthenticated(&shared, link.remote_address()) {
                Ok(permit) => (
                    Some(permit),
                    timeout.min(crate::enroll::Enroller::ENROLL_TIMEOUT),
                ),
                Err(reason) => {
                    link.close(close::REFUSED, &reason);
                    return Err(AgentError::Refused(Refusal {
                        code: RefuseCode::EnrollmentRefused,
                        reason,
                    }));
                }
            }
        }
        _ => (None, timeout),
    };
    let first = async {
        let mut stream = control.await?;
        let mut buf = Vec::new();
        let first = match read_message(&mut stream.recv, &mut buf)
            .await
            .map_err(|e| e.to_string())?
        {
            m @ (Message::Hello(_) | Message::Enroll(_) | Message::Renew(_)) => m,
            other => return Err(format!("expected Hello, got {}", other.kind())),
        };
        Ok((stream, first))
    };
    let (mut stream, first) = match Box::pin(tokio::time::timeout(timeout, first)).await {
        Ok(Ok(v)) => v,
        Ok(Err(e)) => {
            metrics.refused("bad_hello");
            link.close(close::PROTOCOL, &e);
            return Err(AgentError::Control(e));
        }
        Err(_) => {
            metrics.refused("register_timeout");
            link.close(close::PROTOCOL, "no Hello in time");
            return Err(AgentError::Control(format!("no Hello within {timeout:?}")));
        }
    };
    let (identity, hello) = match (identity, first) {
        (Some(identity), Message::Hello(hello)) => (identity, hello),
        (None, Message::Enroll(request)) => {
            let issued = Box::pin(crate::enroll::Enroller::enroll(
                shared.clone(),
                request,
                link.remote_address(),
            ))
            .await;
            return answer_issue(&mut stream, &link, metrics, issued).await;
        }
        (Some(identity), Message::Renew(request)) => {
            let issued = match &shared.enroller {
                Some(enroller) => enroller.renew(&shared, &identity, certs, &request),
                None => Err(Refusal {
                    code: RefuseCode::EnrollmentRefused,
                    reason: "this server does not renew certificates (no --enroll-ca-dir)".into(),
                }),
            };
            return answer_issue(&mut stream, &link, metrics, issued).await;
        }
        (None, other) => {
            let refusal = Refusal {
                code: RefuseCode::BadCertificate,
                reason: format!(
                    "no client certificate: a {} needs one (a node without one may only enroll, \
                     with --bootstrap-token)",
                    other.kind()
                ),
            };
            return Err(refuse(&mut stream, &link, metrics, refusal).await);
        }
        (Some(_), other) => {
            let refusal = Refusal {
                code: RefuseCode::EnrollmentRefused,
                reason: format!(
                    "a {} comes from a node without a certificate; this one has one (renew instead)",
                    other.kind()
                ),
            };
            return Err(refuse(&mut stream, &link, metrics, refusal).await);
        }
    };

    if *shared.draining.borrow() {
        let refusal = Refusal {
            code: RefuseCode::ServerDraining,
            reason: format!(
                "server {} is shutting down; connect to another replica",
                shared.config.server_id
            ),
        };
        return Err(refuse(&mut stream, &link, metrics, refusal).await);
    }
    // The same agent process has a live connection here already: this one
    // is a second dial (a load balancer sent it here, or two of its dials
    // met). Refused, so the live one is not replaced.
    let current = shared.registry.registered(&identity.common_name);
    let live = current
        .as_ref()
        .filter(|agent| !agent.is_draining())
        .map(|agent| agent.instance);
    if let Some(successor) = current.as_ref().filter(|c| is_superseded(&hello, c)) {
        let refusal = Refusal {
            code: RefuseCode::Superseded,
            reason: format!(
                "a newer agent process on this node (connected {} s ago) took it over from \
                 this one, which is on its way out (a rolling update)",
                successor
                    .connected_since
                    .elapsed()
                    .map_or(0, |d| d.as_secs())
            ),
        };
        return Err(refuse(&mut stream, &link, metrics, refusal).await);
    }
    let supersedes = current
        .as_ref()
        .filter(|c| succeeds(&hello, c))
        .map_or(0, |c| c.instance);
    // Not kept: this task lives as long as the connection, and the old
    // connection's state must go when it ends.
    drop(current);
    if is_duplicate(&hello, &shared.config.server_id, live) {
        let refusal = Refusal {
            code: RefuseCode::AlreadyConnected,
            reason: format!(
                "this agent holds a live connection to server {} already",
                shared.config.server_id
            ),
        };
        return Err(refuse(&mut stream, &link, metrics, refusal).await);
    }
    let own = crate::addresses::own_addresses();
    let allowed = |a: IpAddr| shared.config.addresses.check(a, &own);
    // Registered before `Welcome` is written, so that the address check
    // and the registration are one step; undone if `Welcome` cannot go.
    let registered = check_hello(&hello, &identity, allowed).and_then(|addresses| {
        let agent = Arc::new(AgentHandle {
            id: shared.next_id(),
            node: identity.common_name.clone(),
            addresses,
            connected_since: SystemTime::now(),
            link: link.clone(),
            window: match &link {
                AgentLink::Quic(conn) => transport::window::ReceiveWindow::quic(
                    conn,
                    &shared.config.quic,
                    &shared.receive_budget,
                ),
                AgentLink::H2(h) => h.window.clone(),
            },
            streams_active: AtomicI64::new(0),
            draining: AtomicBool::new(false),
            kick: tokio::sync::Notify::new(),
            instance: hello.instance,
            // Set before it is registered: from then on the old process
            // is refused.
            supersedes: AtomicU64::new(supersedes),
            predecessor: std::sync::Mutex::default(),
            not_after: identity.not_after,
            serial: identity.serial.clone(),
            lineage: identity.lineage.clone(),
        });
        match shared.registry.register(agent.clone()) {
            Ok(old) => Ok((agent, old)),
            Err(conflict) => {
                tracing::warn!(
                    address = %conflict.address,
                    holder = %conflict.holder,
                    "registration refused: another node's live agent serves this address"
                );
                Err(Refusal {
                    code: RefuseCode::AddressInUse,
                    reason: conflict.to_string(),
                })
            }
        }
    });
    let (agent, old) = match registered {
        Ok(v) => v,
        Err(refusal) => return Err(refuse(&mut stream, &link, metrics, refusal).await),
    };

    // Subscribed before `Welcome` reads the count: a change after it is
    // not missed.
    let mut replicas = shared.replicas_expected.subscribe();
    let tells_replicas = hello.version_minor >= 5;
    let welcome = Message::Welcome(Welcome {
        version_major: proto::VERSION_MAJOR,
        version_minor: proto::VERSION_MINOR,
        server_id: shared.config.server_id.clone(),
        replicas: *replicas.borrow_and_update(),
    });
    if let Err(e) = write_control(&mut stream, &welcome).await {
        // Undone: the connection it replaced (if any) serves the node
        // again, rather than a node left without one until its agent
        // dials once more.
        match old.filter(|o| !o.is_draining() && o.link.is_open()) {
            Some(old) => shared.registry.deregister_to(&agent, old),
            None => (shared.registry.deregister(&agent), false),
        };
        link.close(close::CONTROL_CLOSED, &e);
        return Err(AgentError::Control(e));
    }

    if let Some(old) = old {
        if same_process(&hello, &old) {
            // This process's earlier connection: a successor's new one
            // still keeps its predecessor out, and may hand the node back.
            agent
                .supersedes
                .store(old.supersedes.load(Ordering::Relaxed), Ordering::Relaxed);
            *lock(&agent.predecessor) = lock(&old.predecessor).take();
        }
        let replace = replacement(&hello, &old);
        if replace == Replace::Handover {
            tracing::info!(
                old_transport = old.link.transport(),
                new_transport = link.transport(),
                "agent moved to a new connection; the old one finishes its streams"
            );
            old.draining.store(true, Ordering::Relaxed);
            tokio::spawn(watch_handed_over(old, shared.clone(), Idle::Close));
        } else if replace == Replace::Succeed {
            tracing::info!(
                old_remote = %old.link.remote_address(),
                old_streams = old.streams_active.load(Ordering::Relaxed),
                "a newer agent process on this node took over; the old one finishes its streams"
            );
            agent.supersedes.store(old.instance, Ordering::Relaxed);
            // Not closed when idle, and not marked draining: its agent,
            // told nothing (it may be of a release that would not
            // understand), stays connected until its pod is deleted and
            // drains then, and should this connection end first (the new
            // agent crashed, or was rolled back), it serves the node again.
            // One predecessor is kept per node, no more: one `old` kept
            // itself (a second succession before the first process left,
            // or a compromised agent succeeding itself again and again to
            // pile up connections and their windows) is closed now.
            let older = lock(&old.predecessor).take().and_then(|w| w.upgrade());
            if let Some(older) = older {
                tracing::info!(
                    older_remote = %older.link.remote_address(),
                    "a second successor took over; closing the connection of the process before"
                );
                older
                    .link
                    .close(close::REPLACED, "a newer agent process took the node over");
            }
            *lock(&agent.predecessor) = Some(Arc::downgrade(&old));
            tokio::spawn(watch_handed_over(old, shared.clone(), Idle::KeepOpen));
        } else {
            tracing::info!(old_remote = %old.link.remote_address(), "replacing the previous connection of this node");
            // Its task tells the old agent why, then closes. A predecessor
            // it kept goes too: nothing would hand the node back to it,
            // and nothing else would close it.
            if let Some(older) = lock(&old.predecessor).take().and_then(|w| w.upgrade()) {
                older
                    .link
                    .close(close::REPLACED, "a newer agent process took the node over");
            }
            old.kick.notify_one();
        }
    }
    shared
        .metrics
        .registrations
        .get_or_create(&[("transport", link.transport())])
        .inc();
    shared
        .metrics
        .agents_connected
        .set(shared.registry.len() as i64);
    tracing::info!(addresses = ?agent.addresses, transport = link.transport(), "agent registered");

    // Watch the control stream until it ends or the connection dies.
    // After `Welcome` the agent sends `Drain` once; a repeated `Drain` is
    // harmless and ignored (debug log, counted), anything else is a
    // protocol error that ends the connection (one warning per connection).
    let watch = async {
        let mut buf = Vec::new();
        let mut drained = false;
        loop {
            match read_message(&mut stream.recv, &mut buf).await {
                Ok(Message::Drain) if drained => {
                    tracing::debug!("repeated Drain ignored");
                    metrics.agent_protocol_error("repeated_drain");
                }
                Ok(Message::Drain) => {
                    drained = true;
                    tracing::info!("agent is draining; no new streams are routed to it");
                    agent.draining.store(true, Ordering::Relaxed);
                }
                Ok(other) => {
                    tracing::warn!("unexpected {} on the control stream", other.kind());
                    metrics.agent_protocol_error("unexpected_control_message");
                    link.close(close::PROTOCOL, "unexpected control message");
                    break;
                }
                Err(e) => {
                    tracing::debug!("control stream ended: {e}");
                    link.close(close::CONTROL_CLOSED, "control stream closed");
                    break;
                }
            }
        }
    };
    let mut watch = Box::pin(watch);
    let mut draining = shared.draining.subscribe();
    let mut told = false;
    // A `Drain` that could not be written whole (1 s) may have left part
    // of a frame: nothing more is written to the stream then.
    let mut garbled = false;
    loop {
        tokio::select! {
        _ = &mut watch => break,
        reason = link.closed() => {
            tracing::info!("agent connection closed: {reason}");
            break;
        }
        // This server is shutting down: say so once (an older agent
        // ignores it); its streams keep flowing until the server closes.
        _ = async { drop(draining.wait_for(|d| *d).await) }, if !told => {
            told = true;
            let written = Box::pin(tokio::time::timeout(
                Duration::from_secs(1),
                transport::write_message(&mut stream.send, &Message::Drain),
            ))
            .await;
            garbled = !matches!(written, Ok(Ok(())));
        }
        // The replica count changed: say so (an agent older than minor 5
        // would take the unknown message for a broken stream). A write
        // that cannot finish may have left part of a frame, which would
        // garble the control stream, and the agent would keep a wrong
        // count: the connection is closed instead, and the agent learns the
        // count from `Welcome` when it registers again.
        Ok(()) = replicas.changed(), if tells_replicas && !garbled => {
            let count = *replicas.borrow_and_update();
            let told = Box::pin(tokio::time::timeout(
                REPLICAS_WRITE_TIMEOUT,
                transport::write_message(&mut stream.send, &Message::Replicas(count)),
            ))
            .await;
            if !matches!(told, Ok(Ok(()))) {
                tracing::warn!(replicas = count, "the agent's control stream did not take the replica count within {REPLICAS_WRITE_TIMEOUT:?}; closing the connection");
                link.close(close::CONTROL_CLOSED, "the control stream is blocked");
                break;
            }
        }
        _ = agent.kick.notified() => {
            let goaway = Message::GoAway(proto::GoAway {
                code: close::REPLACED,
                reason: "replaced by a newer connection of the same node".into(),
            });
            let _ = Box::pin(tokio::time::timeout(Duration::from_secs(1), transport::write_message(&mut stream.send, &goaway))).await;
            let _ = Box::pin(tokio::time::timeout(Duration::from_secs(1), link.closed())).await;
            link.close(close::REPLACED, "replaced by a newer connection of the same node");
            break;
        }
        }
    }
    // A predecessor still connected and not draining takes the node back.
    let back = lock(&agent.predecessor)
        .take()
        .and_then(|p| p.upgrade())
        .filter(|p| !p.is_draining() && p.link.is_open());
    let (deregistered, back_in) = match &back {
        Some(back) => shared.registry.deregister_to(&agent, back.clone()),
        None => (shared.registry.deregister(&agent), false),
    };
    if let Some(back) = back.filter(|_| !back_in) {
        // Another connection serves the node now (or holds its
        // addresses): the one kept for a hand-back is closed rather than
        // left open, unrouted, holding its window.
        back.link.close(
            close::REPLACED,
            "a newer connection of this node took it over",
        );
    }
    if back_in {
        tracing::info!(
            "this connection ended first: the agent process it took the node over from is \
             still connected and serves the node again"
        );
    }
    if deregistered {
        shared
            .metrics
            .agents_connected
            .set(shared.registry.len() as i64);
        tracing::info!("agent deregistered");
    }
    Ok(())
}

/// Whether a `Hello` is a second connection the agent did not mean to
/// make here: the node's connection here is live (`live`: its agent's
/// instance) and from the same agent process, the agent asks for no
/// handover here (a transport switch or a renewed certificate replaces its
/// own connection on purpose), and it does not say it lost its connection
/// to this server (then the live one is stale: a path cut the server has
/// not noticed). A connection from another process (a restarted agent)
/// still replaces the old one.
///
/// With `HANDOVER`, `previous` names the server the agent moves away from
/// (empty from agents before 2026-12-07): a handover meant for another
/// replica that a load balancer sent here is a duplicate too, or it would
/// drain the connection another of the agent's slots holds here.
fn is_duplicate(hello: &Hello, server_id: &str, live: Option<u64>) -> bool {
    let handover = hello.capabilities & proto::capability::HANDOVER != 0;
    let handover_here = handover && (hello.previous.is_empty() || hello.previous == server_id);
    live.is_some_and(|instance| {
        hello.instance != 0
            && instance == hello.instance
            && !handover_here
            && hello.previous != server_id
    })
}

/// Whether a `Hello` comes from the successor of `old`'s agent process: a
/// newer process on the same node that started while the old one still
/// ran (`SUCCESSOR`: it found the instance lock held; a rolling update with
/// surge). The old connection then finishes its streams, as on a handover,
/// instead of being closed at once.
fn succeeds(hello: &Hello, old: &AgentHandle) -> bool {
    hello.capabilities & proto::capability::SUCCESSOR != 0
        && hello.instance != 0
        && old.instance != 0
        && hello.instance != old.instance
}

/// What a registration does to the node's connection it replaces.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Replace {
    /// The same process moved (`HANDOVER`): the old one finishes its
    /// streams and is closed when idle.
    Handover,
    /// Its successor took over ([`succeeds`]): the old one stays open,
    /// unrouted, for its streams and to take the node back.
    Succeed,
    /// Anything else (a restart after a crash): `GoAway`, then closed.
    Kick,
}

fn replacement(hello: &Hello, old: &AgentHandle) -> Replace {
    let other_process = hello.instance != 0 && old.instance != 0 && hello.instance != old.instance;
    if hello.capabilities & proto::capability::HANDOVER != 0 && !other_process {
        Replace::Handover
    } else if succeeds(hello, old) {
        Replace::Succeed
    } else {
        Replace::Kick
    }
}

/// Whether `old` is an earlier connection of the process saying `hello`
/// (an unknown old instance counts as the same).
fn same_process(hello: &Hello, old: &AgentHandle) -> bool {
    hello.instance != 0 && (old.instance == 0 || old.instance == hello.instance)
}

/// Whether a `Hello` comes from the process `current` took the node over
/// from: refused while `current` is registered, so the old process, which
/// is on its way out, cannot take the node back.
fn is_superseded(hello: &Hello, current: &AgentHandle) -> bool {
    hello.instance != 0 && hello.instance == current.supersedes.load(Ordering::Relaxed)
}

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A slot written in one statement: a panic cannot leave it half-done.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A rare path's future, boxed so that it does not size the task every
/// connected agent keeps.
type Rare<'a, T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + 'a>>;

/// Refuses a registration: counts it, writes the `Refuse` (the agent
/// closes on reading it), waits for that (bounded), then closes.
fn refuse<'a>(
    stream: &'a mut transport::TunnelStream,
    link: &'a AgentLink,
    metrics: &'a crate::metrics::Metrics,
    refusal: Refusal,
) -> Rare<'a, AgentError> {
    Box::pin(async move {
        metrics.refused(refusal.code.label());
        if write_control(stream, &Message::Refuse(refusal.clone()))
            .await
            .is_ok()
        {
            // Let the refusal reach the agent before the connection goes.
            let _ = tokio::time::timeout(Duration::from_secs(2), link.closed()).await;
        }
        link.close(close::REFUSED, &refusal.reason);
        AgentError::Refused(refusal)
    })
}

/// Answers an `Enroll` or `Renew`: `Issued` (then waits, bounded, for the
/// agent to close) or the refusal.
fn answer_issue<'a>(
    stream: &'a mut transport::TunnelStream,
    link: &'a AgentLink,
    metrics: &'a crate::metrics::Metrics,
    issued: Result<proto::Issued, Refusal>,
) -> Rare<'a, Result<(), AgentError>> {
    Box::pin(async move {
        match issued {
            Ok(issued) => {
                let sent = write_control(stream, &Message::Issued(issued)).await;
                if sent.is_ok() {
                    let _ = tokio::time::timeout(Duration::from_secs(2), link.closed()).await;
                }
                link.close(close::ENROLLED, "certificate issued");
                sent.map_err(AgentError::Control)
            }
            Err(refusal) => Err(refuse(stream, link, metrics, refusal).await),
        }
    })
}

/// How long a last message to an agent's control stream (`Welcome`,
/// `Refuse`, `Issued`: at most a few KiB, sent at the highest priority)
/// and its end may take: only a peer that grants no flow-control credit
/// takes longer, and it must not hold its task, its enrollment slot or its
/// registration for good.
const CONTROL_WRITE_TIMEOUT: Duration = Duration::from_secs(5);

/// Writes `message` to the control stream and finishes it, within
/// [`CONTROL_WRITE_TIMEOUT`].
async fn write_control(
    stream: &mut transport::TunnelStream,
    message: &Message,
) -> Result<(), String> {
    let write = async {
        transport::write_message(&mut stream.send, message)
            .await
            .map_err(|e| e.to_string())?;
        if !matches!(message, Message::Welcome(_)) {
            stream.send.shutdown().await.map_err(|e| e.to_string())?;
        }
        Ok::<_, String>(())
    };
    match tokio::time::timeout(CONTROL_WRITE_TIMEOUT, write).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(format!("writing {}: {e}", message.kind())),
        Err(_) => Err(format!(
            "the agent took no {} within {CONTROL_WRITE_TIMEOUT:?} (no flow-control credit)",
            message.kind()
        )),
    }
}

/// What to do with a handed-over connection once its streams are done.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Idle {
    /// Close it: the agent itself moved to its new connection.
    Close,
    /// Leave it to its agent, which a successor process replaced and
    /// which drains when its own pod goes.
    KeepOpen,
}

/// How long a `Replicas` message may take to be written to an agent's
/// control stream (a few bytes, sent at the highest priority: only a
/// connection out of flow-control credit for seconds takes longer).
const REPLICAS_WRITE_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a handed-over connection stays open at least, idle or not.
const HANDOVER_IDLE_GRACE: Duration = Duration::from_secs(1);

/// Watches a handed-over connection: a transport switch or a renewed
/// certificate moved the agent to a new connection, or a successor process
/// took the node over, and long streams (`kubectl exec`, `logs -f`) finish
/// on the old one. With [`Idle::Close`] it is closed once its last stream
/// is done. No longer in the registry, it is checked here for what the
/// reload tick checks there: an expired or revoked certificate closes it.
async fn watch_handed_over(old: Arc<AgentHandle>, shared: Arc<Shared>, idle: Idle) {
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    let since = tokio::time::Instant::now();
    let mut checked = since;
    let closed = old.link.closed();
    tokio::pin!(closed);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = &mut closed => return,
        }
        // Not at once: the agent reads the new connection's `Welcome`
        // first (one that read this close first took it for a replacement
        // and waited 30 s, before 2026-12-07).
        if idle == Idle::Close
            && since.elapsed() >= HANDOVER_IDLE_GRACE
            && old.streams_active.load(Ordering::Relaxed) <= 0
        {
            old.link
                .close(close::REPLACED, "the agent moved to a new connection");
            return;
        }
        if checked.elapsed() < shared.config.reload_interval {
            continue;
        }
        checked = tokio::time::Instant::now();
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        let invalid = shared
            .live_tls
            .as_ref()
            .and_then(|t| crate::live_tls::invalid_now(t, &old, now));
        if let Some(why) = invalid {
            crate::live_tls::close_agent(&shared, &old, why);
            return;
        }
    }
}

fn peer_identity(certs: &[CertificateDer<'static>]) -> Result<Identity, String> {
    let leaf = certs
        .first()
        .ok_or_else(|| "the agent presented an empty certificate chain".to_owned())?;
    let identity = Identity::from_der(leaf).map_err(|e| format!("agent certificate: {e}"))?;
    // The verifier accepts a certificate without the extension (any
    // purpose); an agent's must say it is for TLS clients, so a server
    // certificate (or one a third-party issuer made with default usages)
    // never registers as a node.
    if !identity.is_client_certificate() {
        return Err(format!(
            "agent certificate {:?} is not for TLS clients (its extended key usage lacks \
             clientAuth): issue it with `tunnel-certs agent` or usages [client auth]",
            identity.common_name
        ));
    }
    Ok(identity)
}

/// Checks a Hello against the certificate and returns the addresses to
/// register: those claimed, or every certificate address if none were.
fn check_hello(
    hello: &Hello,
    identity: &Identity,
    allowed: impl Fn(IpAddr) -> Result<(), crate::addresses::Forbidden>,
) -> Result<Vec<IpAddr>, Refusal> {
    if hello.version_major != proto::VERSION_MAJOR {
        return Err(Refusal {
            code: RefuseCode::UnsupportedVersion,
            reason: format!(
                "protocol version {}.{} is not supported; this server speaks {}.x",
                hello.version_major,
                hello.version_minor,
                proto::VERSION_MAJOR
            ),
        });
    }
    // A certificate whose CN is no node name (the DNAT helper's client
    // certificate, `edge-tunnel:dnat-helper`) is not an agent's.
    if let Err(e) = certs::identity::validate_node_name(&identity.common_name) {
        return Err(Refusal {
            code: RefuseCode::BadCertificate,
            reason: format!("this certificate is not an agent's: its common name {e}"),
        });
    }
    if hello.node != identity.common_name {
        return Err(Refusal {
            code: RefuseCode::NodeMismatch,
            reason: format!(
                "node name {:?} does not match the certificate's common name {:?}",
                hello.node, identity.common_name
            ),
        });
    }
    // Certificate addresses are canonical (IPv4, not IPv4-mapped); an
    // agent that spells one mapped means the same address.
    let claimed: Vec<IpAddr> = hello.addresses.iter().map(|a| canonical_ip(*a)).collect();
    if let Some(bad) = claimed.iter().find(|a| !identity.addresses.contains(a)) {
        return Err(Refusal {
            code: RefuseCode::AddressNotInCertificate,
            reason: format!(
                "address {bad} is not among the certificate's IP SANs {:?}",
                identity.addresses
            ),
        });
    }
    let addresses = if claimed.is_empty() {
        identity.addresses.clone()
    } else {
        let mut unique = Vec::with_capacity(claimed.len());
        for a in claimed {
            if !unique.contains(&a) {
                unique.push(a);
            }
        }
        unique
    };
    for &a in &addresses {
        if let Err(why) = allowed(a) {
            return Err(Refusal {
                code: RefuseCode::AddressNotAllowed,
                reason: format!("address {a} is {why}: this server never routes it to an edge"),
            });
        }
    }
    Ok(addresses)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check_hello_any(hello: &Hello, identity: &Identity) -> Result<Vec<IpAddr>, Refusal> {
        check_hello(hello, identity, |_| Ok(()))
    }

    #[test]
    fn a_certificate_not_for_clients_is_no_agent() {
        let ca = certs::issue::Ca::generate("test CA", 1).unwrap();
        let der = |pem: certs::issue::Pem| {
            certs::files::parse_certs(pem.cert.as_bytes(), std::path::Path::new("test")).unwrap()
        };
        let server = der(ca
            .issue_server("edge-1", &[], &["198.18.1.2".parse().unwrap()], 1)
            .unwrap());
        let e = peer_identity(&server).unwrap_err();
        assert!(e.contains("clientAuth"), "{e}");
        let agent = der(ca
            .issue_agent("edge-1", &["198.18.1.2".parse().unwrap()], 1)
            .unwrap());
        assert_eq!(peer_identity(&agent).unwrap().common_name, "edge-1");
    }

    #[test]
    fn forbidden_addresses_are_refused() {
        let identity = Identity {
            addresses: vec!["127.0.0.1".parse().unwrap()],
            ..identity()
        };
        let policy = crate::addresses::AddressPolicy::default();
        let none = std::collections::BTreeSet::new();
        let r =
            check_hello(&hello("edge-1", &[]), &identity, |a| policy.check(a, &none)).unwrap_err();
        assert_eq!(r.code, RefuseCode::AddressNotAllowed);
        assert!(
            r.reason.contains("127.0.0.1 is a loopback address"),
            "{}",
            r.reason
        );
    }

    fn identity() -> Identity {
        Identity {
            common_name: "edge-1".into(),
            addresses: vec!["198.18.1.2".parse().unwrap()],
            not_before: 0,
            not_after: 86_400,
            usage: Some(certs::identity::KeyUsage {
                client_auth: true,
                server_auth: false,
            }),
            serial: "01".into(),
            lineage: None,
        }
    }

    #[tokio::test]
    async fn a_successor_takes_over_and_its_predecessor_cannot_come_back() {
        let agent = |id: u64, instance: u64| async move {
            let mut a = crate::registry::testing::handle(id, "edge-1", &["198.18.1.2"]).await;
            Arc::get_mut(&mut a).unwrap().instance = instance;
            a
        };
        let old = agent(1, 7).await;
        let mut h = hello("edge-1", &["198.18.1.2"]);
        h.instance = 9;
        assert!(!succeeds(&h, &old), "a restarted process replaces");
        h.capabilities = proto::capability::SUCCESSOR;
        assert!(
            succeeds(&h, &old),
            "a process started while the old one ran"
        );
        h.instance = 7;
        assert!(!succeeds(&h, &old), "the same process is no successor");
        h.instance = 0;
        assert!(!succeeds(&h, &old), "an unknown process is no successor");

        // What each replaces the old connection with.
        h.instance = 9;
        h.capabilities = 0;
        assert_eq!(replacement(&h, &old), Replace::Kick, "a restart");
        h.capabilities = proto::capability::HANDOVER;
        assert_eq!(
            replacement(&h, &old),
            Replace::Kick,
            "another process's handover does not drain this one"
        );
        h.capabilities |= proto::capability::SUCCESSOR;
        assert_eq!(replacement(&h, &old), Replace::Succeed);
        assert!(!same_process(&h, &old));
        h.instance = 7;
        assert_eq!(replacement(&h, &old), Replace::Handover, "its own move");
        assert!(same_process(&h, &old), "carries its predecessor over");
        h.capabilities = 0;
        assert_eq!(replacement(&h, &old), Replace::Kick, "its own reconnect");
        assert!(same_process(&h, &old));
        h.instance = 0;
        assert!(
            !same_process(&h, &old),
            "an unknown process carries nothing"
        );

        let new = agent(2, 9).await;
        let mut back = hello("edge-1", &["198.18.1.2"]);
        back.instance = 7;
        assert!(!is_superseded(&back, &new), "it took over from nobody");
        new.supersedes.store(7, Ordering::Relaxed);
        assert!(is_superseded(&back, &new), "the old process is refused");
        back.capabilities = proto::capability::HANDOVER | proto::capability::SUCCESSOR;
        assert!(is_superseded(&back, &new), "whatever it asks for");
        back.instance = 8;
        assert!(!is_superseded(&back, &new), "a third process is not");
        back.instance = 0;
        new.supersedes.store(0, Ordering::Relaxed);
        assert!(!is_superseded(&back, &new), "unknown never matches none");
    }

    #[test]
    fn a_second_connection_of_the_same_process_is_a_duplicate() {
        let mut h = hello("edge-1", &["198.18.1.2"]);
        h.instance = 7;
        assert!(is_duplicate(&h, "r1", Some(7)));
        assert!(!is_duplicate(&h, "r1", None), "nothing live here");
        assert!(
            !is_duplicate(&h, "r1", Some(8)),
            "a restarted agent takes over"
        );
        h.previous = "r1".into();
        assert!(
            !is_duplicate(&h, "r1", Some(7)),
            "its old connection is stale"
        );
        h.previous = "r2".into();
        assert!(is_duplicate(&h, "r1", Some(7)), "it lost another replica");
        h.capabilities = proto::capability::HANDOVER;
        h.previous = "r1".into();
        assert!(!is_duplicate(&h, "r1", Some(7)), "a transport switch here");
        h.previous = String::new();
        assert!(
            !is_duplicate(&h, "r1", Some(7)),
            "a switch from an agent that does not name the server"
        );
        h.previous = "r2".into();
        assert!(
            is_duplicate(&h, "r1", Some(7)),
            "a switch meant for r2 that a balancer sent here"
        );
        assert!(!is_duplicate(&h, "r1", None), "nothing live here to drain");
        h.capabilities = 0;
        h.instance = 0;
        assert!(!is_duplicate(&h, "r1", Some(0)), "an older agent");
    }

    fn hello(node: &str, addrs: &[&str]) -> Hello {
        Hello {
            version_major: proto::VERSION_MAJOR,
            version_minor: 0,
            node: node.into(),
            addresses: addrs.iter().map(|a| a.parse().unwrap()).collect(),
            capabilities: 0,
            instance: 0,
            previous: String::new(),
        }
    }

    #[test]
    fn accepts_matching_identity() {
        assert_eq!(
            check_hello_any(&hello("edge-1", &[]), &identity()).unwrap(),
            identity().addresses
        );
        assert!(check_hello_any(&hello("edge-1", &["198.18.1.2"]), &identity()).is_ok());
    }

    #[test]
    fn the_dnat_helper_certificate_is_no_agent() {
        let helper = Identity {
            common_name: certs::identity::DNAT_HELPER_CN.into(),
            addresses: vec![],
            ..identity()
        };
        let r = check_hello_any(&hello(certs::identity::DNAT_HELPER_CN, &[]), &helper).unwrap_err();
        assert_eq!(r.code, RefuseCode::BadCertificate);
        assert!(r.reason.contains("not an agent's"), "{}", r.reason);
    }

    #[test]
    fn ipv4_mapped_claims_register_as_ipv4() {
        let addrs = check_hello_any(
            &hello("edge-1", &["::ffff:198.18.1.2", "198.18.1.2"]),
            &identity(),
        )
        .unwrap();
        assert_eq!(addrs, identity().addresses);
    }

    #[test]
    fn refuses_what_the_certificate_does_not_carry() {
        let r = check_hello_any(&hello("edge-2", &[]), &identity()).unwrap_err();
        assert_eq!(r.code, RefuseCode::NodeMismatch);
        let r = check_hello_any(&hello("edge-1", &["10.0.0.1"]), &identity()).unwrap_err();
        assert_eq!(r.code, RefuseCode::AddressNotInCertificate);
        assert!(r.reason.contains("10.0.0.1"));
        let mut h = hello("edge-1", &[]);
        h.version_major = 9;
        assert_eq!(
            check_hello_any(&h, &identity()).unwrap_err().code,
            RefuseCode::UnsupportedVersion
        );
    }
}
