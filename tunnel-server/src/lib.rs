//! tunnel-server: the cloud side of edge-tunnel.
//!
//! Layout:
//! - [`agents`]: the QUIC listener; handshake, identity check against the
//!   certificate, registration on the control stream, drain and cleanup.
//! - [`handshake`]: the unauthenticated part, on both listeners: the
//!   limits on handshakes in flight ([`admission`], no I/O), the handshake
//!   timeout, failures counted and logged at a bounded rate
//!   ([`log_throttle`]).
//! - [`agents_h2`]: the HTTP/2-over-TLS listener (TCP, same port) for
//!   agents whose network blocks UDP; shares everything after the
//!   handshake with [`agents`].
//! - [`registry`]: node → agent, address → node ([`registry::AgentRegistry`]).
//! - [`link`]: one agent connection whatever its transport
//!   ([`link::AgentLink`]); opens streams on it.
//! - [`dial`]: routing (target → agent and address, no I/O) and the one
//!   dial procedure, under one deadline, for both ingresses.
//! - [`connect`]: the HTTP CONNECT ingress (apiserver egress selector,
//!   Prometheus `proxy_url`, `curl -x`).
//! - [`transparent`]: the ingress for DNAT-redirected connections.
//! - [`ingress`]: what both ingresses share after the dial: relay, count.
//! - [`admin`]: `/healthz`, `/readyz`, `/metrics`, `/v1/agents`.
//! - [`feed`]: `/v1/agents` over mutually authenticated TLS, for the
//!   standalone DNAT helper (`--feed-listen`).
//! - [`enroll`]: enrollment with bootstrap tokens and renewal (CSR in,
//!   signed certificate out).
//! - [`live_tls`]: the certificate, key, CA bundle, deny-list and CRL every
//!   listener uses, reloaded while the server runs; revoked and expired
//!   agents closed.
//! - [`metrics`]: the Prometheus metrics.
//! - [`dnat`]: the iptables DNAT helper that sends apiserver → kubelet
//!   traffic into the transparent ingress.
//!
//! [`Server::bind`] binds every listener (so tests can use port 0 and read
//! the bound addresses back), [`Server::run`] serves until a shutdown
//! future completes.
#![forbid(unsafe_code)]

pub mod addresses;
pub mod admin;
pub mod admission;
pub mod agents;
pub mod agents_h2;
pub mod config;
pub mod connect;
pub mod dial;
pub mod direct;
pub mod dnat;
pub mod enroll;
pub mod feed;
pub mod forward;
pub mod handshake;
pub mod ingress;
pub mod link;
pub mod live_tls;
pub mod log_throttle;
pub mod metrics;
pub mod peers;
pub mod proxy_auth;
pub mod redirect;
pub mod registry;
pub mod slots;
pub mod tokens;
pub mod transparent;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;

pub use config::{ConfigError, ServerConfig, ServerSettings};
use metrics::Metrics;
use registry::AgentRegistry;

/// State shared by every listener.
pub struct Shared {
    pub config: ServerConfig,
    pub registry: AgentRegistry,
    pub metrics: Metrics,
    pub ready: AtomicBool,
    /// Every agent connection's receive window is drawn from this, and
    /// what stalled streams are lent (`--receive-budget`).
    pub receive_budget: Arc<transport::window::ReceiveBudget>,
    /// What the relay buffers of all streams may grow into.
    pub relay_buffers: transport::BufferBudget,
    /// Who may use the CONNECT ingress.
    pub proxy_auth: proxy_auth::ProxyAuth,
    /// Client connection slots (CONNECT and transparent together).
    pub client_slots: slots::ClientSlots,
    /// True once shutdown began (`--drain-grace`): agents are told, new
    /// registrations refused.
    pub draining: tokio::sync::watch::Sender<bool>,
    /// How many replicas exist, as `Welcome` tells agents
    /// (`--server-count`, or `--peers-dns` while it resolves); a change is
    /// sent to every connected agent that understands `Replicas`.
    pub replicas_expected: tokio::sync::watch::Sender<u16>,
    /// Unauthenticated QUIC handshakes: in flight, limits, failures.
    pub quic_handshakes: handshake::HandshakeGate,
    /// Unauthenticated TLS-over-TCP handshakes of the HTTP/2 listener.
    pub h2_handshakes: handshake::HandshakeGate,
    /// The live certificate, CA bundle and deny-list (set by
    /// [`Server::bind`]).
    pub live_tls: Option<Arc<live_tls::LiveTls>>,
    /// Enrollment and renewal (`--enroll-ca-dir`), set by [`Server::bind`].
    pub enroller: Option<enroll::Enroller>,
    /// The tunneled connections being relayed, by stream id, for the drain
    /// log and `/v1/connections`.
    pub open_relays: dashmap::DashMap<u64, Arc<ingress::RelayTrace>>,
    /// Bumped whenever the credentials in force change (the deny-list,
    /// the CRL, `ca.crt` or the token file reloaded): every CONNECT tunnel
    /// then checks that what admitted it still would.
    pub credentials: tokio::sync::watch::Sender<u64>,
    next_id: AtomicU64,
}

impl Shared {
    /// Fresh state for a server with `config`.
    pub fn new(config: ServerConfig) -> Self {
        let gate = |listener| {
            handshake::HandshakeGate::new(
                listener,
                config.handshake_limits.clone(),
                config.handshake_timeout,
            )
        };
        Shared {
            quic_handshakes: gate(handshake::Listener::Quic),
            h2_handshakes: gate(handshake::Listener::H2),
            registry: AgentRegistry::default(),
            metrics: Metrics::new(),
            ready: AtomicBool::new(false),
            receive_budget: transport::window::ReceiveBudget::new(config.receive_budget),
            replicas_expected: tokio::sync::watch::Sender::new(config.server_count),
            draining: tokio::sync::watch::Sender::new(false),
            proxy_auth: proxy_auth::ProxyAuth::default(),
            relay_buffers: transport::BufferBudget::new(config.relay_buffer_budget),
            client_slots: slots::ClientSlots::new(
                config.max_client_connections,
                config.max_streams_per_client,
            ),
            config,
            live_tls: None,
            enroller: None,
            open_relays: dashmap::DashMap::new(),
            credentials: tokio::sync::watch::Sender::new(0),
            next_id: AtomicU64::new(1),
        }
    }

    /// The live TLS material of a bound server.
    pub fn tls(&self) -> &live_tls::LiveTls {
        self.live_tls
            .as_deref()
            .expect("a bound server has its TLS material")
    }

    /// Tells the open CONNECT tunnels that the credentials changed.
    pub fn credentials_changed(&self) {
        self.credentials.send_modify(|generation| *generation += 1);
    }

    pub fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// The `/metrics` page, with the scrape-time gauges brought up to date.
    pub fn render_metrics(&self) -> String {
        self.metrics.tasks.set(daemon::admin::live_tasks());
        self.metrics
            .replicas_expected
            .set(i64::from(*self.replicas_expected.borrow()));
        let soonest = self.registry.snapshot().iter().map(|a| a.not_after).min();
        self.metrics
            .agent_certificate_expiry_min
            .set(soonest.unwrap_or(0));
        let gauge = |n: usize| i64::try_from(n).unwrap_or(i64::MAX);
        // Also set where agents come and go, outside the registry's lock:
        // two such sets can land in the wrong order; a scrape corrects it.
        self.metrics
            .agents_connected
            .set(gauge(self.registry.len()));
        self.metrics.export_receive_budget(&self.receive_budget);
        self.metrics.relay_buffers.export(&self.relay_buffers);
        self.metrics
            .export_node_streams(&self.registry.snapshot(), self.config.max_streams_per_node);
        let slots = &self.client_slots;
        self.metrics.client_connections.set(gauge(slots.in_use()));
        self.metrics.clients.set(gauge(slots.clients()));
        self.metrics
            .client_connection_limit
            .set(gauge(slots.limit()));
        self.quic_handshakes.export(&self.metrics);
        self.h2_handshakes.export(&self.metrics);
        self.metrics.render()
    }
}

/// The drain before shutdown (`--drain-grace`): readiness already fails;
/// agents are told and new registrations refused; listeners keep serving
/// (clients still routed here while the endpoint change propagates get
/// through) until no tunneled connection is open or the grace is over.
async fn drain(shared: &Shared) {
    let grace = shared.config.drain_grace;
    if grace.is_zero() {
        return;
    }
    shared.draining.send_replace(true);
    let deadline = tokio::time::Instant::now() + grace;
    let active = || shared.metrics.streams_active.get();
    tracing::info!(
        active = active(),
        ?grace,
        "draining: agents told; waiting for open tunneled connections to finish"
    );
    report_open_relays(shared, "waiting for it to end");
    while active() > 0 {
        if tokio::time::Instant::now() >= deadline {
            tracing::warn!(
                active = active(),
                "drain grace over; closing the remaining tunneled connections"
            );
            report_open_relays(shared, "closed: the grace period is over");
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tracing::info!("drained: no tunneled connection open");
}

/// Tunneled connections named one by one in a drain log; the rest are
/// counted.
const REPORTED: usize = 16;

/// Logs the open tunneled connections, oldest first: client, target,
/// node, ingress, age and which directions are still open, so that a
/// drain that waits says on what.
fn report_open_relays(shared: &Shared, what: &str) {
    let open = ingress::open_relays_oldest_first(shared);
    for t in open.iter().take(REPORTED) {
        tracing::info!(open_for = ?t.age(), state = %t.state(), "open tunneled connection: {what}");
    }
    if open.len() > REPORTED {
        tracing::info!(
            more = open.len() - REPORTED,
            "more open tunneled connections"
        );
    }
}

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    Certs(#[from] certs::CertError),
    #[error(transparent)]
    Tls(#[from] certs::tls::TlsConfigError),
    #[error(transparent)]
    Tokens(#[from] tokens::TokenFileError),
    #[error(transparent)]
    LiveTls(#[from] live_tls::LoadError),
    #[error(transparent)]
    Enroll(#[from] enroll::EnrollSetupError),
    #[error("--connect-client-ca {path}: {problem}")]
    ConnectClientCa {
        path: std::path::PathBuf,
        problem: String,
    },
    #[error("cannot serve CONNECT on the Unix socket {path}: {problem}")]
    Uds {
        path: std::path::PathBuf,
        problem: String,
    },
    #[error(transparent)]
    Endpoint(#[from] transport::quic::EndpointError),
    #[error("cannot bind the {what} listener on {addr}: {source}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// A server with every listener bound.
pub struct Server {
    shared: Arc<Shared>,
    endpoint: quinn::Endpoint,
    h2: Option<(TcpListener, tokio_rustls::TlsAcceptor)>,
    connect: Option<TcpListener>,
    connect_tls: Option<(TcpListener, proxy_auth::ConnectTls)>,
    /// The Unix socket's listener, and the inode it was bound as (removed
    /// at shutdown only if a successor has not replaced it since).
    connect_uds: Option<(tokio::net::UnixListener, u64)>,
    transparent: Option<TcpListener>,
    admin: Option<TcpListener>,
    feed: Option<(TcpListener, tokio_rustls::TlsAcceptor)>,
    dnat: Option<dnat::reconciler::Dnat>,
}

/// Addresses the listeners are bound to.
#[derive(Clone, Copy, Debug)]
pub struct BoundAddrs {
    pub quic: SocketAddr,
    pub h2: Option<SocketAddr>,
    pub connect: Option<SocketAddr>,
    pub connect_tls: Option<SocketAddr>,
    pub transparent: Option<SocketAddr>,
    pub admin: Option<SocketAddr>,
    pub feed: Option<SocketAddr>,
}

/// Binds the CONNECT Unix socket at `path`: a socket left by an earlier
/// run is removed (anything else there is an error, never deleted), and
/// the new one gets `mode` and, when given, group `gid`.
fn bind_uds(
    path: &std::path::Path,
    mode: u32,
    gid: Option<u32>,
) -> Result<tokio::net::UnixListener, ServerError> {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    let fail = |problem: String| ServerError::Uds {
        path: path.to_owned(),
        problem,
    };
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            std::fs::remove_file(path)
                .map_err(|e| fail(format!("cannot remove the old socket: {e}")))?;
        }
        Ok(_) => return Err(fail("something that is not a socket is in the way".into())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(fail(e.to_string())),
    }
    let listener = tokio::net::UnixListener::bind(path).map_err(|e| fail(e.to_string()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(|e| fail(format!("cannot set mode {mode:o}: {e}")))?;
    if let Some(gid) = gid {
        std::os::unix::fs::chown(path, None, Some(gid))
            .map_err(|e| fail(format!("cannot give it to group {gid}: {e}")))?;
    }
    Ok(listener)
}

fn bind_tcp(
    what: &'static str,
    addr: Option<SocketAddr>,
) -> Result<Option<TcpListener>, ServerError> {
    addr.map(|addr| {
        transport::net::bind_tcp(addr).map_err(|source| ServerError::Bind { what, addr, source })
    })
    .transpose()
}

impl Server {
    /// Loads certificates and binds every configured listener.
    pub fn bind(config: ServerConfig) -> Result<Server, ServerError> {
        let dir = certs::CertDir::load(&config.cert_dir)?;
        let enroller = match (&config.enroll_ca_dir, &config.enroll_tokens_file) {
            (Some(ca), Some(tokens)) => Some(enroll::Enroller::load(
                ca,
                tokens,
                config.enroll_state_file.as_deref(),
                config.enroll_validity,
            )?),
            _ => None,
        };
        let live = live_tls::LiveTls::load(
            &config.cert_dir,
            config.deny_list.as_deref(),
            config.crl.as_deref(),
            enroller.is_some(),
        )?;
        let tls = live.server_config(proto::ALPN, live.enrollment);
        // quinn holds no more undecided connection attempts than may be
        // in flight.
        let quic = transport::quic::QuicSettings {
            max_incoming: config.handshake_limits.max_in_flight,
            ..config.quic.clone()
        };
        let endpoint = quic.server_endpoint(config.listen, tls, dir.key.secret_der())?;
        let h2 = if config.h2 {
            let addr = config
                .h2_listen
                .unwrap_or(endpoint.local_addr().map_err(|source| ServerError::Bind {
                    what: "QUIC",
                    addr: config.listen,
                    source,
                })?);
            let listener = bind_tcp("HTTP/2 (agents)", Some(addr))?.expect("address given");
            let tls = live.server_config(proto::ALPN_H2, live.enrollment);
            Some((listener, tokio_rustls::TlsAcceptor::from(Arc::new(tls))))
        } else {
            None
        };
        let connect = bind_tcp("CONNECT", config.connect_listen)?;
        let connect_tls = match bind_tcp("CONNECT (TLS)", config.connect_tls_listen)? {
            Some(listener) => {
                let ca = config
                    .connect_client_ca
                    .as_deref()
                    .expect("checked with the configuration");
                let tls = proxy_auth::ConnectTls::new(
                    &dir,
                    live.resolver(),
                    ca,
                    config.connect_token_file.is_some(),
                )?;
                Some((listener, tls))
            }
            None => None,
        };
        let connect_uds = config
            .connect_uds
            .as_deref()
            .map(|path| {
                let listener = bind_uds(path, config.connect_uds_mode, config.connect_uds_group)?;
                let ino = std::os::unix::fs::MetadataExt::ino(
                    &std::fs::symlink_metadata(path).map_err(|e| ServerError::Uds {
                        path: path.to_owned(),
                        problem: e.to_string(),
                    })?,
                );
                Ok::<_, ServerError>((listener, ino))
            })
            .transpose()?;
        let tokens = config
            .connect_token_file
            .as_deref()
            .map(tokens::TokenFile::open)
            .transpose()?;
        let transparent = bind_tcp("transparent", config.transparent_listen)?;
        let admin = bind_tcp("admin", config.admin_listen)?;
        let feed = match bind_tcp("feed", config.feed_listen)? {
            Some(listener) => {
                let tls = live.server_config(feed::ALPN, false);
                Some((listener, tokio_rustls::TlsAcceptor::from(Arc::new(tls))))
            }
            None => None,
        };
        let mut shared = Shared::new(config);
        shared.proxy_auth.tokens = tokens;
        shared.live_tls = Some(live);
        shared.enroller = enroller;
        // The server's own certificate: when it expires, and a warning
        // when that is near (a restart loads a renewed one).
        if let Ok(own) = certs::Identity::from_der(dir.leaf()) {
            shared.metrics.certificate_expiry.set(own.not_after);
            let now = time::OffsetDateTime::now_utc().unix_timestamp();
            if own.expiry_near(now) {
                tracing::warn!(
                    days_left = own.remaining(now) / 86_400,
                    "the server certificate expires soon: renew it (tunnel-certs server, or cert-manager) and restart"
                );
            }
        }
        let shared = Arc::new(shared);
        Ok(Server {
            shared,
            endpoint,
            h2,
            connect,
            connect_tls,
            connect_uds,
            transparent,
            admin,
            feed,
            dnat: None,
        })
    }

    /// Runs the DNAT helper with this server: rules follow the registry and
    /// are removed when the server stops.
    pub fn with_dnat(mut self, dnat: dnat::reconciler::Dnat) -> Self {
        self.dnat = Some(dnat);
        self
    }

    pub fn local_addrs(&self) -> BoundAddrs {
        let addr = |l: &Option<TcpListener>| l.as_ref().and_then(|l| l.local_addr().ok());
        BoundAddrs {
            quic: self
                .endpoint
                .local_addr()
                .expect("bound endpoint has an address"),
            h2: self.h2.as_ref().and_then(|(l, _)| l.local_addr().ok()),
            connect: addr(&self.connect),
            connect_tls: self
                .connect_tls
                .as_ref()
                .and_then(|(l, _)| l.local_addr().ok()),
            transparent: addr(&self.transparent),
            admin: addr(&self.admin),
            feed: self.feed.as_ref().and_then(|(l, _)| l.local_addr().ok()),
        }
    }

    pub fn shared(&self) -> Arc<Shared> {
        self.shared.clone()
    }

    /// Serves until `shutdown` completes, then closes every agent connection
    /// (their streams are reset) and returns.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        let shared = self.shared;
        let mut tasks = tokio::task::JoinSet::new();
        tasks.spawn(agents::serve(self.endpoint.clone(), shared.clone()));
        if let Some((listener, acceptor)) = self.h2 {
            tasks.spawn(agents_h2::serve(listener, acceptor, shared.clone()));
        }
        let uds_ino = self.connect_uds.as_ref().map(|(_, ino)| *ino);
        if let Some((l, _)) = self.connect_uds {
            tasks.spawn(connect::serve_unix(l, shared.clone()));
        }
        if let Some(tokens) = shared.proxy_auth.tokens.clone() {
            let counted = shared.clone();
            tasks.spawn(tokens.watch(move |result| {
                counted
                    .metrics
                    .token_file_reloads
                    .get_or_create(&[("result", result)])
                    .inc();
                if result == "ok" {
                    counted.credentials_changed();
                }
            }));
        }
        if let Some(live) = shared.live_tls.clone() {
            tasks.spawn(live_tls::watch(
                live,
                shared.clone(),
                shared.config.reload_interval,
            ));
        }
        if let Some(name) = shared.config.peers_dns.clone() {
            tasks.spawn(peers::follow(name, shared.clone()));
        }
        if let Some(l) = self.connect {
            tasks.spawn(connect::serve(l, None, shared.clone()));
        }
        if let Some((l, tls)) = self.connect_tls {
            tasks.spawn(connect::serve(l, Some(tls), shared.clone()));
        }
        if let Some(l) = self.transparent {
            tasks.spawn(transparent::serve(l, shared.clone()));
        }
        if let Some(l) = self.admin {
            tasks.spawn(admin::serve(l, shared.clone()));
        }
        if let Some((listener, acceptor)) = self.feed {
            tasks.spawn(feed::serve(listener, acceptor, shared.clone()));
        }
        let (dnat_stop, dnat_task) = match self.dnat {
            Some(dnat) => {
                let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
                let registry = shared.clone();
                let task = tokio::spawn(dnat::reconciler::run(
                    dnat,
                    Some(shared.registry.subscribe()),
                    move || {
                        let addrs = registry.registry.addresses();
                        async move { Ok(addrs) }
                    },
                    async {
                        let _ = stopped.await;
                    },
                ));
                (Some(stop), Some(task))
            }
            None => (None, None),
        };
        shared.ready.store(true, Ordering::SeqCst);
        tracing::info!(server_id = %shared.config.server_id, "tunnel-server ready");
        shutdown.await;
        shared.ready.store(false, Ordering::SeqCst);
        drain(&shared).await;
        tracing::info!("shutting down: closing agent connections");
        tasks.abort_all();
        // Wait until the aborted listener tasks are gone: they hold sockets
        // (and an endpoint handle that keeps the UDP socket open).
        while tasks.join_next().await.is_some() {}
        // The Unix socket goes with its listener, so a client sees "no such
        // file" rather than a refused connection on a stale path; not if a
        // successor (a rolling update) has bound the path since.
        if let (Some(path), Some(ino)) = (&shared.config.connect_uds, uds_ino) {
            if std::fs::symlink_metadata(path)
                .is_ok_and(|m| std::os::unix::fs::MetadataExt::ino(&m) == ino)
            {
                let _ = std::fs::remove_file(path);
            }
        }
        for agent in shared.registry.snapshot() {
            agent
                .link
                .close(proto::codes::close::SERVER_SHUTDOWN, "server shutting down");
            // An old agent process a successor took over from, still open.
            let predecessor = agent
                .predecessor
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .take()
                .and_then(|p| p.upgrade());
            if let Some(old) = predecessor {
                old.link
                    .close(proto::codes::close::SERVER_SHUTDOWN, "server shutting down");
            }
        }
        self.endpoint.close(
            quinn::VarInt::from_u32(proto::codes::close::SERVER_SHUTDOWN),
            b"server shutting down",
        );
        if let (Some(stop), Some(task)) = (dnat_stop, dnat_task) {
            let _ = stop.send(());
            if tokio::time::timeout(Duration::from_secs(30), task)
                .await
                .is_err()
            {
                tracing::error!(
                    "removing the DNAT rules timed out; run `tunnel-server dnat --cleanup`"
                );
            }
        }
        // Give the CONNECTION_CLOSE frames a moment to leave.
        let _ = tokio::time::timeout(Duration::from_secs(2), self.endpoint.wait_idle()).await;
    }
}
