//! A small admin HTTP server (GET only) both binaries use for `/healthz`,
//! `/readyz`, `/metrics` and their JSON views. Bounded: 10 s to send the
//! request head, one request at a time per connection.

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

pub async fn serve(listener: TcpListener, routes: Arc<dyn AdminRoutes>) {
    loop {
        let (tcp, _) = transport::net::accept(&listener, "admin").await;
        let routes = routes.clone();
        tokio::spawn(async move {
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
