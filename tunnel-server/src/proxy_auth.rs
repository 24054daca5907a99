//! Who may use the CONNECT ingress: every request is authorized before it
//! is routed, so an unauthenticated client learns nothing (not even which
//! nodes exist).
//!
//! - A Unix-socket client (`--connect-uds`) was admitted by the socket's
//!   permissions.
//! - A TCP client needs a token (`Proxy-Authorization`, see
//!   [`crate::tokens`]) when `--connect-token-file` is given; a missing or
//!   wrong one gets `407` with `Proxy-Authenticate: Basic`, so curl and Go
//!   clients retry with their credentials.
//! - Without a token file a TCP listener is open: the configuration allows
//!   that only on loopback or with `--connect-allow-unauthenticated`.

use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{HeaderMap, HeaderValue, PROXY_AUTHENTICATE, PROXY_AUTHORIZATION};
use hyper::{Response, StatusCode};

use crate::connect::Peer;
use crate::tokens::TokenFile;
use crate::Shared;

/// The realm named in `Proxy-Authenticate`.
pub const REALM: &str = "edge-tunnel";

/// How the CONNECT ingress authorizes requests.
#[derive(Debug, Default)]
pub struct ProxyAuth {
    /// `--connect-token-file`, when given.
    pub tokens: Option<Arc<TokenFile>>,
}

/// Authorizes one request; the `Err` is the answer to send instead.
pub fn authorize(
    shared: &Shared,
    peer: Peer,
    headers: &HeaderMap,
) -> Result<(), Box<Response<Full<Bytes>>>> {
    let metrics = &shared.metrics;
    let tokens = match (peer, &shared.proxy_auth.tokens) {
        (Peer::Unix, _) => {
            metrics.connect_authorized("unix", "");
            return Ok(());
        }
        (Peer::Tcp(_), None) => {
            metrics.connect_authorized("none", "");
            return Ok(());
        }
        (Peer::Tcp(_), Some(tokens)) => tokens.tokens(),
    };
    let presented = headers.get(PROXY_AUTHORIZATION).map(|v| v.to_str());
    let refusal = match presented {
        None => "missing",
        Some(Err(_)) => "invalid",
        Some(Ok(value)) => match tokens.check(value) {
            Some(name) => {
                metrics.connect_authorized("token", name);
                return Ok(());
            }
            None => "invalid",
        },
    };
    metrics.connect_auth_failed(refusal);
    if let Peer::Tcp(addr) = peer {
        tracing::debug!(client = %addr, reason = refusal, "CONNECT request without valid proxy credentials");
    }
    Err(Box::new(proxy_auth_required(refusal)))
}

fn proxy_auth_required(reason: &str) -> Response<Full<Bytes>> {
    let body = match reason {
        "missing" => "proxy credentials required: send Proxy-Authorization (Basic name:token, or Bearer token)\n",
        _ => "proxy credentials not accepted\n",
    };
    let mut resp = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *resp.status_mut() = StatusCode::PROXY_AUTHENTICATION_REQUIRED;
    let headers = resp.headers_mut();
    headers.insert(
        PROXY_AUTHENTICATE,
        HeaderValue::from_static("Basic realm=\"edge-tunnel\""),
    );
    headers.insert(
        hyper::header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}
