//! Plain-HTTP forward proxying on the CONNECT ingress: what Go's HTTP
//! client (Prometheus with `proxy_url`) sends for an `http://` target is
//! not a CONNECT but the request itself in absolute form, `GET
//! http://edge-1:9100/metrics HTTP/1.1`. The target is routed like a
//! CONNECT's (a node name or address), dialed through the agent, and the
//! request goes on in origin form (`GET /metrics`) over that stream; the
//! response streams back. Per RFC 9110 (7.6) the hop-by-hop fields are
//! not forwarded (`Connection` and the fields it names, `Keep-Alive`,
//! `Proxy-Connection`, `TE`, `Transfer-Encoding`, `Upgrade`, and our own
//! `Proxy-Authorization`), and `Via` is added; nothing else is rewritten.
//! Each request takes its own tunnel (the client's connection to the
//! ingress stays open between requests); an `https://` target is a
//! CONNECT's business.
//!
//! hyper's client speaks over one end of an in-process pipe, and the other
//! end is relayed over the tunneled stream by [`crate::ingress::relay`],
//! as a CONNECT tunnel is: a client that stops reading a forwarded
//! response (which stops hyper reading the pipe) is lent stall credit and
//! then reset after `--client-stall-timeout`, instead of pinning its
//! agent connection's window, and the stream is listed, counted and
//! idle-timed like any other.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::header::{HeaderMap, HeaderName, HeaderValue, CONNECTION, HOST};
use hyper::{Request, Response, StatusCode, Uri};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};

use crate::dial::{DialMode, Target};
use crate::direct::Upstream;
use crate::Shared;

/// The body of every answer of the CONNECT ingress.
pub type Body = BoxBody<Bytes, hyper::Error>;

/// How long the target may take to answer with its response head.
pub const RESPONSE_HEAD_TIMEOUT: Duration = Duration::from_secs(60);

/// What the pipe between hyper's client and the relay holds at most: a
/// response the client does not read stops there, and the relay's stall
/// handling takes it from there.
const PIPE: usize = 64 * 1024;

/// The hop-by-hop fields of `headers` (RFC 9110 7.6.1): the fixed ones
/// and those `Connection` names.
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in [
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authorization",
        "proxy-authenticate",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    ] {
        headers.remove(name);
    }
    headers.append("via", HeaderValue::from_static("1.1 edge-tunnel"));
}

/// The request to send on: origin form, `Host` kept (or set from the
/// target), hop-by-hop fields removed, `Connection: close`.
fn origin_form(req: Request<Incoming>) -> Request<Incoming> {
    let (mut parts, body) = req.into_parts();
    if !parts.headers.contains_key(HOST) {
        if let Some(host) = parts
            .uri
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
        {
            parts.headers.insert(HOST, host);
        }
    }
    let path = parts
        .uri
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_owned();
    parts.uri = Uri::try_from(path).unwrap_or_else(|_| Uri::from_static("/"));
    strip_hop_by_hop(&mut parts.headers);
    // One tunnel per request: the target closes after its answer, which
    // ends the relayed stream (it would otherwise wait for the target's
    // keep-alive timeout, holding the node's stream slot).
    parts
        .headers
        .insert(CONNECTION, HeaderValue::from_static("close"));
    Request::from_parts(parts, body)
}

/// An HTTP/1.1 client connection over `io`, driven until the request's
/// sender and the response body are dropped.
async fn handshake<IO>(
    io: IO,
    revocation: Option<crate::proxy_auth::Revocation>,
) -> Result<hyper::client::conn::http1::SendRequest<Incoming>, hyper::Error>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io)).await?;
    tokio::spawn(async move {
        tokio::select! {
            r = conn => if let Err(e) = r {
                tracing::debug!("forwarded HTTP connection: {e}");
            },
            // The connection goes, and the answer's body with it.
            () = crate::proxy_auth::revoked(revocation.as_ref()) => {
                let why = revocation.as_ref().map_or("revoked", |r| r.reason());
                tracing::warn!("{why}; the forwarded request was cut off");
            }
        }
    });
    Ok(sender)
}

/// Forwards one absolute-form request to `target` and streams back the
/// answer; `client`: the requesting client's address (the unit of the
/// per-client stall credit).
pub async fn forward(
    req: Request<Incoming>,
    target: Target,
    shared: &Arc<Shared>,
    client: Option<IpAddr>,
    credential: crate::proxy_auth::Credential,
) -> Response<Body> {
    let upstream = match crate::direct::dial(shared, &target, DialMode::AwaitResult).await {
        Ok(u) => u,
        Err(e) => {
            tracing::info!(%target, "forward request refused: {e}");
            return crate::connect::boxed(crate::connect::dial_refusal(&e));
        }
    };
    let handshake = match upstream {
        Upstream::Tunnel(dialed) => {
            // The relay holds the stream and its node slot, and counts it.
            let (ours, theirs) = transport::relay::pipe(PIPE);
            tokio::spawn(crate::ingress::relay(
                shared.clone(),
                dialed,
                theirs,
                client,
                "forward",
                credential,
            ));
            handshake(ours, None).await
        }
        Upstream::Direct { stream, .. } => {
            shared
                .metrics
                .streams
                .get_or_create(&[("ingress", "forward_direct")])
                .inc();
            // The tunnel's relay stops a revoked request itself; a direct
            // one is stopped here.
            handshake(stream, credential.watch(shared)).await
        }
    };
    let mut sender = match handshake {
        Ok(sender) => sender,
        Err(e) => {
            return crate::connect::boxed(crate::connect::text(
                StatusCode::BAD_GATEWAY,
                format!("cannot speak HTTP to {target}: {e}"),
            ))
        }
    };
    match tokio::time::timeout(RESPONSE_HEAD_TIMEOUT, sender.send_request(origin_form(req))).await {
        Ok(Ok(resp)) => {
            let (mut parts, body) = resp.into_parts();
            strip_hop_by_hop(&mut parts.headers);
            Response::from_parts(parts, body.boxed())
        }
        Ok(Err(e)) => crate::connect::boxed(crate::connect::text(
            StatusCode::BAD_GATEWAY,
            format!("{target} did not answer the request: {e}"),
        )),
        Err(_) => crate::connect::boxed(crate::connect::text(
            StatusCode::GATEWAY_TIMEOUT,
            format!("{target} sent no response head within {RESPONSE_HEAD_TIMEOUT:?}"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_fields_go_and_via_comes() {
        let mut h = HeaderMap::new();
        h.insert(
            "connection",
            HeaderValue::from_static("keep-alive, x-secret"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("proxy-authorization", HeaderValue::from_static("Basic x"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("accept", HeaderValue::from_static("text/plain"));
        strip_hop_by_hop(&mut h);
        let names: Vec<_> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, ["accept", "via"]);
        assert_eq!(h["via"], "1.1 edge-tunnel");
    }
}
