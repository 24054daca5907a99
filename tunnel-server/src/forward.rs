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

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::header::{HeaderMap, HeaderName, HeaderValue, CONNECTION, HOST};
use hyper::{Request, Response, StatusCode, Uri};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use transport::TunnelStream;

use crate::dial::{self, DialMode, Target};
use crate::direct::Upstream;
use crate::Shared;

/// The body of every answer of the CONNECT ingress.
pub type Body = BoxBody<Bytes, hyper::Error>;

/// How long the target may take to answer with its response head.
pub const RESPONSE_HEAD_TIMEOUT: Duration = Duration::from_secs(60);

/// A tunneled stream as one duplex byte stream, for hyper's client.
struct TunnelIo(TunnelStream);

impl AsyncRead for TunnelIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0.recv).poll_read(cx, buf)
    }
}

impl AsyncWrite for TunnelIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0.send).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0.send).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0.send).poll_shutdown(cx)
    }
}

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
/// target), hop-by-hop fields removed.
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
    Request::from_parts(parts, body)
}

/// An HTTP/1.1 client connection over `io`; `keep` (a node's stream
/// slot) lives until the connection ends, i.e. until `sender` and the
/// response body are dropped.
async fn handshake<IO, K>(
    io: IO,
    keep: K,
) -> Result<hyper::client::conn::http1::SendRequest<Incoming>, hyper::Error>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    K: Send + 'static,
{
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io)).await?;
    tokio::spawn(async move {
        let _keep = keep;
        if let Err(e) = conn.await {
            tracing::debug!("forwarded HTTP connection: {e}");
        }
    });
    Ok(sender)
}

/// Forwards one absolute-form request to `target` and streams back the
/// answer.
pub async fn forward(
    req: Request<Incoming>,
    target: Target,
    shared: &Arc<Shared>,
) -> Response<Body> {
    let upstream = match crate::direct::dial(shared, &target, DialMode::AwaitResult).await {
        Ok(u) => u,
        Err(e) => {
            tracing::info!(%target, "forward request refused: {e}");
            return crate::connect::boxed(crate::connect::dial_refusal(&e));
        }
    };
    let metrics = &shared.metrics;
    let (ingress, handshake) = match upstream {
        Upstream::Tunnel(dial::Dialed { stream, slot, .. }) => {
            // The stream's node slot lives as long as the connection.
            ("forward", handshake(TunnelIo(stream), slot).await)
        }
        Upstream::Direct { stream, .. } => ("forward_direct", handshake(stream, ()).await),
    };
    metrics.streams.get_or_create(&[("ingress", ingress)]).inc();
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
