//! A small admin HTTP server (GET only) both binaries use for `/healthz`,
//! `/readyz`, `/metrics` and their JSON views. Bounded: 10 s to send the
//! request head (and to start the next one on a kept-alive connection),
//! one request at a time per connection, and `--admin-max-connections`
//! connections at once: past it the listener stops accepting and new
//! connections wait in the kernel's backlog, so a client opening
//! connections without end cannot take the descriptors kept in reserve
//! for agents.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

pub const TEXT: &str = "text/plain; charset=utf-8";
pub const JSON: &str = "application/json";
pub const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// An answer to a GET.
pub struct Reply {
    pub status: u16,
    pub content_type: &'static str,
    pub body: String,
}

impl Reply {
    pub fn new(status: u16, content_type: &'static str, body: impl Into<String>) -> Reply {
        Reply {
            status,
            content_type,
            body: body.into(),
        }
    }

    pub fn not_found() -> Reply {
        Reply::new(404, TEXT, "not found\n")
    }
}

/// Tokio tasks alive now in the runtime the caller runs on (the
/// `*_tasks` gauges): a task leak shows as a count that does not come
/// back after the load that raised it. 0 outside a runtime.
pub fn live_tasks() -> i64 {
    tokio::runtime::Handle::try_current()
        .map(|h| i64::try_from(h.metrics().num_alive_tasks()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// What an admin server answers, by path.
pub trait AdminRoutes: Send + Sync + 'static {
    fn get(&self, path: &str) -> Reply;
}

/// The default of `--admin-max-connections`: a scraper, a probe and an
/// operator's curl need a handful.
pub const DEFAULT_MAX_CONNECTIONS: u16 = 64;

/// The admin listener's connection metrics (`admin_connections`,
/// `admin_connections_limit`, `admin_connection_waits`), registered by
/// each binary in its own registry.
#[derive(Clone, Debug, Default)]
pub struct AdminMetrics {
    open: Gauge,
    limit: Gauge,
    waits: Counter,
    source_limit_hits: Counter,
}

impl AdminMetrics {
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "admin_connections",
            "Connections to the admin listener open now",
            self.open.clone(),
        );
        registry.register(
            "admin_connections_limit",
            "Most connections the admin listener serves at once (--admin-max-connections)",
            self.limit.clone(),
        );
        registry.register(
            "admin_source_limit_hits",
            "Connections to the admin listener closed at once: their source (an address, an \
             IPv6 /64) had an eighth of --admin-max-connections open",
            self.source_limit_hits.clone(),
        );
        registry.register(
            "admin_connection_waits",
            "Times the admin listener stopped accepting at --admin-max-connections \
             (new connections waited in the listen backlog)",
            self.waits.clone(),
        );
    }
}

/// One connection counted in `admin_connections` while it lives (a
/// route that panics still gives it back).
struct Open(Gauge);

impl Open {
    fn new(open: &Gauge) -> Open {
        open.inc();
        Open(open.clone())
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// How long one admin connection is served, whatever it does: a client
/// that pipelines requests and never reads the answers would otherwise
/// hold its slot for good (hyper's only timer is the request head's).
/// Scrapers that keep connections alive open a new one.
pub const CONNECTION_DEADLINE: Duration = Duration::from_secs(30);

/// The most connections one source may hold: an eighth of the listener's,
/// at least 2, so that one client (a pod on a node whose host-network
/// admin port it can reach) cannot take every slot the kubelet's probes
/// need.
pub fn per_source_limit(max_connections: u16) -> usize {
    (usize::from(max_connections) / 8).max(2)
}

/// Serves `routes` on `listener`, at most `max_connections` connections
/// at once, [`per_source_limit`] of them per source, each for at most
/// [`CONNECTION_DEADLINE`].
pub async fn serve(
    listener: TcpListener,
    routes: Arc<dyn AdminRoutes>,
    max_connections: u16,
    metrics: AdminMetrics,
) {
    let slots = transport::net::ConnectionSlots::new(usize::from(max_connections));
    let per_source = transport::net::PerSource::new(per_source_limit(max_connections));
    metrics
        .limit
        .set(i64::try_from(slots.limit()).unwrap_or(i64::MAX));
    // Copied to every accepted socket: a client that vanished is noticed.
    transport::net::set_liveness(&listener, Duration::from_secs(15), Duration::from_secs(60));
    loop {
        let slot = slots
            .acquire(|| {
                // Probes and scrapes wait too: worth a warning (1st, 2nd,
                // 4th... wait).
                let waits = metrics.waits.inc() + 1;
                slots.warn_full(waits, "admin", "--admin-max-connections");
            })
            .await;
        let (tcp, peer) = transport::net::accept(&listener, "admin").await;
        let Some(claim) = per_source.claim(peer.ip()) else {
            let hits = metrics.source_limit_hits.inc() + 1;
            if hits.is_power_of_two() {
                tracing::warn!(client = %peer.ip(), limit = per_source.limit(), hits, "admin connection closed: its source holds its share of --admin-max-connections");
            }
            let _ = socket2::SockRef::from(&tcp).set_linger(Some(Duration::ZERO));
            continue;
        };
        let routes = routes.clone();
        let open = Open::new(&metrics.open);
        tokio::spawn(async move {
            let _held = (slot, open, claim);
            let service = service_fn(move |req| handle(req, routes.clone()));
            let served = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(TokioIo::new(tcp), service);
            let _ = tokio::time::timeout(CONNECTION_DEADLINE, served).await;
        });
    }
}

async fn handle(
    req: Request<Incoming>,
    routes: Arc<dyn AdminRoutes>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let reply = if req.method() != Method::GET && req.method() != Method::HEAD {
        Reply::new(405, TEXT, "GET only\n")
    } else {
        routes.get(req.uri().path())
    };
    let mut resp = Response::new(Full::new(Bytes::from(reply.body)));
    *resp.status_mut() =
        StatusCode::from_u16(reply.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(reply.content_type));
    Ok(resp)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    struct Ok200;

    impl AdminRoutes for Ok200 {
        fn get(&self, _: &str) -> Reply {
            Reply::new(200, TEXT, "ok\n")
        }
    }

    /// Polls `done` every 10 ms for up to 10 s (a guard against a hang,
    /// not a timing assertion).
    async fn eventually(what: &str, done: impl Fn() -> bool) {
        for _ in 0..1_000 {
            if done() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("not within 10 s: {what}");
    }

    #[tokio::test]
    async fn past_its_limit_the_admin_listener_stops_accepting_until_a_connection_ends() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let metrics = AdminMetrics::default();
        tokio::spawn(serve(listener, Arc::new(Ok200), 2, metrics.clone()));

        // Two idle connections take both slots.
        let first = TcpStream::connect(addr).await.unwrap();
        let _second = TcpStream::connect(addr).await.unwrap();
        eventually("two connections open", || metrics.open.get() == 2).await;
        assert_eq!(metrics.limit.get(), 2);

        // A third is accepted by the kernel and waits, unserved.
        let mut third = TcpStream::connect(addr).await.unwrap();
        third
            .write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            .await
            .unwrap();
        eventually("the listener waited", || metrics.waits.get() == 1).await;
        assert_eq!(metrics.open.get(), 2);

        // One idle connection goes: the third is served.
        drop(first);
        let mut answer = String::new();
        tokio::time::timeout(Duration::from_secs(10), third.read_to_string(&mut answer))
            .await
            .expect("answered once a slot was free")
            .unwrap();
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(answer.ends_with("ok\n"), "{answer}");
    }

    /// One source holds at most its share: past it a connection is closed
    /// at once, and other sources (the kubelet's probes) are still served.
    #[tokio::test]
    async fn one_source_cannot_take_every_slot() {
        let listener = TcpListener::bind("0.0.0.0:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let metrics = AdminMetrics::default();
        // 16 slots, 2 per source.
        tokio::spawn(serve(listener, Arc::new(Ok200), 16, metrics.clone()));
        let from = |ip: &str| {
            let socket = tokio::net::TcpSocket::new_v4().unwrap();
            socket.bind(format!("{ip}:0").parse().unwrap()).unwrap();
            socket.connect(format!("127.0.0.1:{port}").parse().unwrap())
        };
        let _a = from("127.0.0.1").await.unwrap();
        let _b = from("127.0.0.1").await.unwrap();
        eventually("two connections open", || metrics.open.get() == 2).await;
        let mut third = from("127.0.0.1").await.unwrap();
        let mut got = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(10), third.read_to_end(&mut got))
            .await
            .expect("closed at once");
        assert!(read.is_err() || got.is_empty(), "{got:?}");
        assert_eq!(metrics.source_limit_hits.get(), 1);
        // Another source is served.
        let mut probe = from("127.0.0.2").await.unwrap();
        probe
            .write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut answer = String::new();
        tokio::time::timeout(Duration::from_secs(10), probe.read_to_string(&mut answer))
            .await
            .expect("answered")
            .unwrap();
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert_eq!(per_source_limit(64), 8);
        assert_eq!(per_source_limit(4), 2);
    }
}
