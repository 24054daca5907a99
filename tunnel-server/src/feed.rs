//! The agent feed for the standalone DNAT helper (`--feed-listen`): the
//! `/v1/agents` listing over TLS 1.3, served only to a client certificate
//! that chains to the tunnel CA (`ca.crt` of `--cert-dir`) and names the
//! DNAT helper (CN [`certs::identity::DNAT_HELPER_CN`], issued by
//! `tunnel-certs dnat-helper`). Every address in it becomes a DNAT rule on
//! the helper's host, so neither end trusts the other unauthenticated:
//! the helper pins the CA the server certificate must chain to, and agent
//! certificates (which chain to the same CA) get 403.
//!
//! Bounded like the agent listeners: at most `--feed-max-connections`
//! connections at once (more are closed at once), `--handshake-timeout`
//! for the TLS handshake, 10 s for the request head, one request per
//! connection.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;

use crate::log_throttle::LogThrottle;
use crate::Shared;

/// ALPN of the feed: plain HTTP/1.1, so `curl --cert` can read it too.
pub const ALPN: &[u8] = b"http/1.1";

/// How long a connected client may take to send its request head.
const REQUEST_HEAD_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a feed connection was turned away, or what it got.
fn label(status: StatusCode) -> &'static str {
    match status {
        StatusCode::OK => "ok",
        StatusCode::FORBIDDEN => "forbidden",
        StatusCode::NOT_FOUND => "not_found",
        _ => "bad_request",
    }
}

/// Serves the feed on `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, acceptor: TlsAcceptor, shared: Arc<Shared>) {
    let slots = Arc::new(Semaphore::new(shared.config.feed_max_connections));
    // Before TLS: anyone may connect, and one source must not take every
    // slot from the helpers.
    let per_source = transport::net::PerSource::new(shared.config.feed_max_connections_per_source);
    let throttle = Arc::new(LogThrottle::default());
    loop {
        let (tcp, peer) = transport::net::accept_with(&listener, "feed", |_| {
            shared.metrics.accept_failed("feed")
        })
        .await;
        let Some(claim) = per_source.claim(peer.ip()) else {
            shared.metrics.feed_request("source_limited");
            if let Some(held_back) = throttle.admit(Instant::now()) {
                tracing::warn!(%peer, held_back, "feed connection closed: its source has --feed-max-connections-per-source open");
            }
            continue;
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            shared.metrics.feed_request("limited");
            if let Some(held_back) = throttle.admit(Instant::now()) {
                tracing::warn!(%peer, held_back, "feed connection closed: --feed-max-connections reached");
            }
            continue;
        };
        let (acceptor, shared, throttle) = (acceptor.clone(), shared.clone(), throttle.clone());
        tokio::spawn(async move {
            let _permit = (permit, claim);
            connection(tcp, peer, acceptor, shared, throttle).await;
        });
    }
}

async fn connection(
    tcp: TcpStream,
    peer: SocketAddr,
    acceptor: TlsAcceptor,
    shared: Arc<Shared>,
    throttle: Arc<LogThrottle>,
) {
    let warn = |msg: String| match throttle.admit(Instant::now()) {
        Some(held_back) => tracing::warn!(%peer, held_back, "{msg}"),
        None => tracing::debug!(%peer, "{msg}"),
    };
    let tls =
        match tokio::time::timeout(shared.config.handshake_timeout, acceptor.accept(tcp)).await {
            Ok(Ok(tls)) => tls,
            Ok(Err(e)) => {
                shared.metrics.feed_request("tls_failed");
                warn(format!("feed: TLS handshake failed: {e}"));
                return;
            }
            Err(_) => {
                shared.metrics.feed_request("tls_failed");
                warn("feed: TLS handshake timed out".to_owned());
                return;
            }
        };
    // The verifier already required a certificate chaining to ca.crt (and
    // checked the CRL); the deny-list is checked here, as on CONNECT.
    let identity = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|chain| chain.first())
        .and_then(|leaf| certs::Identity::from_der(leaf).ok());
    let denied = identity.as_ref().and_then(|id| {
        let tls = shared.live_tls.as_ref()?;
        tls.denies_node(&id.common_name, &id.serial, id.lineage.as_deref())
    });
    let common_name = identity.map(|id| id.common_name);
    let refusal = match (common_name.as_deref(), denied) {
        (_, Some(why)) => {
            let msg = format!("the certificate is revoked: {why}\n");
            warn(format!("feed: refused: {}", msg.trim_end()));
            Some(msg)
        }
        (Some(certs::identity::DNAT_HELPER_CN), None) => None,
        (other, None) => {
            let msg = format!(
                "the agent feed is served only to the DNAT helper's certificate (CN {}); \
                 this one has CN {:?}: issue one with `tunnel-certs dnat-helper`\n",
                certs::identity::DNAT_HELPER_CN,
                other.unwrap_or("(none)")
            );
            warn(format!("feed: refused: {}", msg.trim_end()));
            Some(msg)
        }
    };
    let service = service_fn(move |req: Request<hyper::body::Incoming>| {
        let (status, content_type, body) = if let Some(msg) = &refusal {
            (StatusCode::FORBIDDEN, daemon::admin::TEXT, msg.clone())
        } else if req.method() != Method::GET && req.method() != Method::HEAD {
            (
                StatusCode::METHOD_NOT_ALLOWED,
                daemon::admin::TEXT,
                "GET only\n".to_owned(),
            )
        } else if req.uri().path() == "/v1/agents" {
            (
                StatusCode::OK,
                daemon::admin::JSON,
                crate::admin::agents_json(&shared, crate::admin::Listing::Full),
            )
        } else {
            (
                StatusCode::NOT_FOUND,
                daemon::admin::TEXT,
                "not found: the feed serves /v1/agents\n".to_owned(),
            )
        };
        shared.metrics.feed_request(label(status));
        let mut resp = Response::new(Full::new(Bytes::from(body)));
        *resp.status_mut() = status;
        resp.headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
        async move { Ok::<_, Infallible>(resp) }
    });
    let _ = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(REQUEST_HEAD_TIMEOUT)
        .keep_alive(false)
        .serve_connection(TokioIo::new(tls), service)
        .await;
}
