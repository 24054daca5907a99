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

/// Serves `routes` on `listener`, at most `max_connections` connections
/// at once.
pub async fn serve(
    listener: TcpListener,
    routes: Arc<dyn AdminRoutes>,
    max_connections: u16,
    metrics: AdminMetrics,
) {
    let slots = transport::net::ConnectionSlots::new(usize::from(max_connections));
    metrics
        .limit
        .set(i64::try_from(slots.limit()).unwrap_or(i64::MAX));
    loop {
        let slot = slots
            .acquire(|| {
                // Probes and scrapes wait too: worth a warning (1st, 2nd,
                // 4th... wait).
                let waits = metrics.waits.inc() + 1;
                slots.warn_full(waits, "admin", "--admin-max-connections");
            })
            .await;
        let (tcp, _) = transport::net::accept(&listener, "admin").await;
        let routes = routes.clone();
        let open = Open::new(&metrics.open);
        tokio::spawn(async move {
            let _held = (slot, open);
            let service = service_fn(move |req| handle(req, routes.clone()));
            let _ = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(TokioIo::new(tcp), service)
                .await;
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
}
