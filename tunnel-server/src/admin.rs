//! Admin endpoints: `/healthz`, `/readyz`, `/metrics`, `/v1/agents`.

use std::convert::Infallible;
use std::sync::atomic::Ordering;
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
use serde::Serialize;
use tokio::net::TcpListener;

use crate::Shared;

pub async fn serve(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let (tcp, _) = match listener.accept().await {
            Ok(v) => v,
            Err(e) => {
                tracing::warn!("admin accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| handle(req, shared.clone()));
            let _ = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(TokioIo::new(tcp), service)
                .await;
        });
    }
}

/// One entry of `/v1/agents`.
#[derive(Serialize)]
pub struct AgentInfo {
    pub node: String,
    pub addresses: Vec<String>,
    /// RFC 3339.
    pub connected_since: String,
    pub remote_address: String,
    pub transport: &'static str,
    pub streams_active: i64,
    /// QUIC's RTT estimate; null over HTTP/2.
    pub rtt_ms: Option<f64>,
    pub draining: bool,
}

fn respond(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    resp
}

fn agents_json(shared: &Shared) -> String {
    let agents: Vec<AgentInfo> = shared
        .registry
        .snapshot()
        .iter()
        .map(|a| AgentInfo {
            node: a.node.clone(),
            addresses: a.addresses.iter().map(ToString::to_string).collect(),
            connected_since: time::OffsetDateTime::from(a.connected_since)
                .format(&time::format_description::well_known::Rfc3339)
                .unwrap_or_default(),
            remote_address: a.link.remote_address().to_string(),
            transport: a.link.transport(),
            streams_active: a.streams_active.load(Ordering::Relaxed),
            rtt_ms: a.link.rtt().map(|r| r.as_secs_f64() * 1000.0),
            draining: a.is_draining(),
        })
        .collect();
    serde_json::to_string_pretty(&agents).expect("agent info serializes")
}

async fn handle(
    req: Request<Incoming>,
    shared: Arc<Shared>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    const TEXT: &str = "text/plain; charset=utf-8";
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return Ok(respond(
            StatusCode::METHOD_NOT_ALLOWED,
            TEXT,
            "GET only\n".into(),
        ));
    }
    Ok(match req.uri().path() {
        "/healthz" => respond(StatusCode::OK, TEXT, "ok\n".into()),
        "/readyz" => {
            if shared.ready.load(Ordering::SeqCst) {
                respond(StatusCode::OK, TEXT, "ready\n".into())
            } else {
                respond(StatusCode::SERVICE_UNAVAILABLE, TEXT, "not ready\n".into())
            }
        }
        "/metrics" => respond(
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            shared.metrics.render(),
        ),
        "/v1/agents" => respond(StatusCode::OK, "application/json", agents_json(&shared)),
        _ => respond(StatusCode::NOT_FOUND, TEXT, "not found\n".into()),
    })
}
