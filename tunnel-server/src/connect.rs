//! HTTP CONNECT ingress: `CONNECT host:port` where host is a node address
//! or a node name. The answer comes after the agent's dial result, so a
//! client learns at once why it cannot get through:
//!
//! | status | when |
//! |---|---|
//! | 200 | the agent connected to the target; bytes flow |
//! | 400 | not a CONNECT `host:port` request |
//! | 403 | the agent refused: the target is not on its allow-list |
//! | 405 | any method but CONNECT |
//! | 407 | `--connect-token-file` is given and the request carries no valid `Proxy-Authorization` |
//! | 429 | the client has `--max-streams-per-client` connections open (the connection then closes) |
//! | 502 | the agent could not connect (refused, unreachable), no stream could be opened to it, or it broke the protocol |
//! | 503 | no live agent serves the node, it is draining, or its connection was lost during the dial |
//! | 504 | the agent's connect timed out, or the agent did not answer within the dial timeout plus 2 s |

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use proto::DialCode;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};

use crate::dial::{self, DialError, DialMode, Target};
use crate::direct::Upstream;
use crate::forward::Body;
use crate::ingress;
use crate::proxy_auth::{CertIdentity, ConnectTls};
use crate::Shared;
use http_body_util::BodyExt;

/// How long a client may take to send its request head.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// Who a client connection is, before any of its requests.
#[derive(Clone, Debug)]
pub enum Peer {
    /// A TCP client (or a TLS one without a certificate): its requests
    /// need a token when `--connect-token-file` is given (and may go
    /// without only on an open listener).
    Tcp(SocketAddr),
    /// A TLS client that presented a certificate chaining to
    /// `--connect-client-ca`.
    Certified {
        addr: SocketAddr,
        identity: CertIdentity,
    },
    /// A client of the Unix socket: the socket's permissions admitted it.
    Unix { uid: Option<u32> },
}

impl Peer {
    /// The client's address, where it has one (the unit of the
    /// per-client limits).
    fn addr(&self) -> Option<SocketAddr> {
        match self {
            Peer::Tcp(addr) | Peer::Certified { addr, .. } => Some(*addr),
            Peer::Unix { .. } => None,
        }
    }
}

/// Serves CONNECT on a TCP listener; with `tls` (`--connect-tls-listen`)
/// every connection is a TLS session first, and nothing is served to one
/// whose handshake fails.
pub async fn serve(listener: TcpListener, tls: Option<ConnectTls>, shared: Arc<Shared>) {
    crate::ingress::watch_clients(&listener);
    loop {
        let slot = shared.client_slots.acquire(&shared.metrics).await;
        let (tcp, peer) = transport::net::accept_with(&listener, "CONNECT", |_| {
            shared.metrics.accept_failed("connect")
        })
        .await;
        // A client over its limit is told so (429) on this connection,
        // which then closes; it holds no tunnel meanwhile.
        let claim = shared.client_slots.claim(peer.ip(), "connect");
        let busy = claim.as_ref().err().copied();
        if let Some(busy) = &busy {
            crate::ingress::client_busy(&shared, busy, "connect");
        }
        // The client's slot and claim live as long as this connection:
        // through its requests here, and through the relay a CONNECT
        // upgrades it into (which outlives the HTTP connection task).
        let held: Held = Arc::new((slot, claim));
        match &tls {
            None => {
                tokio::spawn(serve_client(
                    tcp,
                    Peer::Tcp(peer),
                    held,
                    busy,
                    shared.clone(),
                ));
            }
            Some(tls) => {
                tokio::spawn(serve_tls_client(
                    tcp,
                    peer,
                    tls.clone(),
                    held,
                    busy,
                    shared.clone(),
                ));
            }
        }
    }
}

/// The TLS handshake of one client (bounded by `--handshake-timeout`),
/// then its requests.
async fn serve_tls_client(
    tcp: TcpStream,
    addr: SocketAddr,
    tls: ConnectTls,
    held: Held,
    busy: Option<crate::slots::ClientBusy>,
    shared: Arc<Shared>,
) {
    let timeout = shared.config.handshake_timeout;
    let stream = match tokio::time::timeout(timeout, tls.acceptor.accept(tcp)).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(e)) => {
            shared.metrics.connect_auth_failed("tls_handshake");
            tracing::debug!(client = %addr, "CONNECT TLS handshake failed: {e}");
            return;
        }
        Err(_) => {
            shared.metrics.connect_auth_failed("tls_handshake");
            tracing::debug!(client = %addr, ?timeout, "CONNECT TLS handshake timed out");
            return;
        }
    };
    let peer = match tls.identify(stream.get_ref().1) {
        Some(identity) => Peer::Certified { addr, identity },
        None => Peer::Tcp(addr),
    };
    serve_client(stream, peer, held, busy, shared).await;
}

/// Serves CONNECT on a Unix socket (`--connect-uds`): its file mode and
/// group decide who may connect. Its clients share the client slots, and
/// count as one client for nothing else (they have no address).
pub async fn serve_unix(listener: tokio::net::UnixListener, shared: Arc<Shared>) {
    loop {
        let slot = shared.client_slots.acquire(&shared.metrics).await;
        let (stream, _) = transport::net::accept_backoff(
            "CONNECT (Unix socket)",
            |_| shared.metrics.accept_failed("connect_uds"),
            || listener.accept(),
        )
        .await;
        let uid = stream.peer_cred().ok().map(|cred| cred.uid());
        let held: Held = Arc::new(slot);
        tokio::spawn(serve_client(
            stream,
            Peer::Unix { uid },
            held,
            None,
            shared.clone(),
        ));
    }
}

/// One client connection: HTTP/1.1 requests until one is upgraded into a
/// relay or the client leaves.
async fn serve_client<I>(
    io: I,
    peer: Peer,
    held: Held,
    busy: Option<crate::slots::ClientBusy>,
    shared: Arc<Shared>,
) where
    I: transport::ClientSocket + tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + 'static,
{
    let service = service_fn({
        let peer = peer.clone();
        move |req| {
            let shared = shared.clone();
            let held = held.clone();
            let peer = peer.clone();
            async move {
                match busy {
                    Some(busy) => Ok(boxed(too_many(&busy))),
                    None => handle::<I>(req, peer, shared, held).await,
                }
            }
        }
    });
    let conn = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .serve_connection(TokioIo::new(io), service)
        .with_upgrades();
    if let Err(e) = conn.await {
        tracing::debug!(?peer, "CONNECT client connection: {e}");
    }
}

pub(crate) fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body + "\n")));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

/// The answer to every request of a client over `--max-streams-per-client`.
fn too_many(busy: &crate::slots::ClientBusy) -> Response<Full<Bytes>> {
    let mut resp = text(StatusCode::TOO_MANY_REQUESTS, busy.to_string());
    resp.headers_mut().insert(
        hyper::header::CONNECTION,
        hyper::header::HeaderValue::from_static("close"),
    );
    resp
}

/// Parses the authority of a CONNECT request into a target.
pub fn parse_target(authority: &str) -> Result<Target, String> {
    let (host, port) = authority
        .rsplit_once(':')
        .ok_or_else(|| format!("CONNECT target {authority:?} has no port"))?;
    let port: u16 = port
        .parse()
        .map_err(|_| format!("CONNECT target {authority:?} has an invalid port"))?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Ok(Target::Address(SocketAddr::new(ip, port)));
    }
    certs::identity::validate_node_name(host)
        .map_err(|_| format!("CONNECT host {host:?} is neither an IP address nor a node name"))?;
    Ok(Target::Node {
        name: host.to_owned(),
        port,
    })
}

fn status_for(e: &DialError) -> StatusCode {
    match e {
        DialError::NoAgent(_)
        | DialError::Draining(_)
        | DialError::NodeBusy { .. }
        | DialError::ConnectionLost { .. } => StatusCode::SERVICE_UNAVAILABLE,
        DialError::Refused {
            code: DialCode::NotAllowed,
            ..
        } => StatusCode::FORBIDDEN,
        DialError::Refused {
            code: DialCode::Draining,
            ..
        } => StatusCode::SERVICE_UNAVAILABLE,
        DialError::Refused {
            code: DialCode::Timeout,
            ..
        }
        | DialError::Timeout { .. }
        | DialError::DirectTimeout { .. } => StatusCode::GATEWAY_TIMEOUT,
        _ => StatusCode::BAD_GATEWAY,
    }
}

/// What a CONNECT client is told about a failed dial. The agent's own
/// words are passed on except for an allow-list refusal: agents before
/// this version put their whole allow-list in it, and which other ports
/// a node opens is not the client's business (the log has it all).
fn client_body(e: &DialError) -> String {
    match e {
        DialError::Refused {
            node,
            target,
            code: DialCode::NotAllowed,
            ..
        } => format!("{target} is not on the allow-list of node {node}"),
        _ => e.to_string(),
    }
}

/// Where a request goes, and how.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route {
    pub target: Target,
    /// A tunnel (CONNECT), or one plain-HTTP request forwarded
    /// ([`crate::forward`]).
    pub forward: bool,
}

/// What the ingress makes of a request head before it dials: the route,
/// or the answer to send at once (405 for an origin-form request or any
/// other method but CONNECT, 400 for a missing or bad `host:port` or an
/// absolute-form `https://` request). No I/O, so `fuzz/` drives it with
/// the heads hyper parses from hostile bytes.
pub fn route<B>(req: &Request<B>) -> Result<Route, Box<Response<Full<Bytes>>>> {
    let uri = req.uri();
    if req.method() == Method::CONNECT {
        return match uri.authority().map(|a| parse_target(a.as_str())) {
            Some(Ok(target)) => Ok(Route {
                target,
                forward: false,
            }),
            Some(Err(msg)) => Err(Box::new(text(StatusCode::BAD_REQUEST, msg))),
            None => Err(Box::new(text(
                StatusCode::BAD_REQUEST,
                "CONNECT needs host:port".into(),
            ))),
        };
    }
    match (uri.scheme_str(), uri.authority()) {
        (Some("http"), Some(authority)) => {
            let port = authority.port_u16().unwrap_or(80);
            let host = authority.host();
            let spelled = if host.contains(':') && !host.starts_with('[') {
                format!("[{host}]:{port}")
            } else {
                format!("{host}:{port}")
            };
            match parse_target(&spelled) {
                Ok(target) => Ok(Route {
                    target,
                    forward: true,
                }),
                Err(msg) => Err(Box::new(text(StatusCode::BAD_REQUEST, msg))),
            }
        }
        (Some(_), Some(_)) => Err(Box::new(text(
            StatusCode::BAD_REQUEST,
            format!("only http:// requests are forwarded; use CONNECT for {uri}"),
        ))),
        _ => {
            let mut resp = text(
                StatusCode::METHOD_NOT_ALLOWED,
                "this is a proxy: use CONNECT host:port, or an absolute-form http:// request"
                    .into(),
            );
            resp.headers_mut().insert(
                hyper::header::ALLOW,
                hyper::header::HeaderValue::from_static("CONNECT"),
            );
            Err(Box::new(resp))
        }
    }
}

/// The answer to a failed dial.
pub(crate) fn dial_refusal(e: &DialError) -> Response<Full<Bytes>> {
    text(status_for(e), client_body(e))
}

/// A fixed answer as the body type every answer of the ingress has.
pub(crate) fn boxed(resp: Response<Full<Bytes>>) -> Response<Body> {
    resp.map(|b| b.map_err(|never| match never {}).boxed())
}

/// What a client connection holds while it lives (its slot, its claim).
type Held = Arc<dyn std::any::Any + Send + Sync>;

async fn handle<I>(
    mut req: Request<Incoming>,
    peer: Peer,
    shared: Arc<Shared>,
    held: Held,
) -> Result<Response<Body>, Infallible>
where
    I: transport::ClientSocket + tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + 'static,
{
    // Authorized before it is routed: no credential, no answer about nodes.
    let credential = match crate::proxy_auth::authorize(&shared, &peer, req.headers()) {
        Ok(credential) => credential,
        Err(refused) => return Ok(boxed(*refused)),
    };
    let target = match route(&req) {
        Ok(Route {
            target,
            forward: false,
        }) => target,
        Ok(Route {
            target,
            forward: true,
        }) => {
            let client = peer.addr().map(|a| a.ip());
            return Ok(crate::forward::forward(req, target, &shared, client, credential).await);
        }
        Err(resp) => return Ok(boxed(*resp)),
    };
    let dialed = match crate::direct::dial(&shared, &target, DialMode::AwaitResult).await {
        Ok(Upstream::Tunnel(d)) => d,
        Ok(Upstream::Direct { stream, target }) => {
            let on_upgrade = hyper::upgrade::on(&mut req);
            tracing::debug!(%target, "CONNECT dialed directly");
            tokio::spawn(async move {
                let _held = held;
                let Ok(upgraded) = on_upgrade.await else {
                    return;
                };
                let Ok(parts) = upgraded.downcast::<TokioIo<I>>() else {
                    tracing::warn!("CONNECT upgrade failed: unexpected upgraded I/O type");
                    return;
                };
                let client = parts.io.into_inner();
                let early = &parts.read_buf;
                crate::direct::relay(&shared, client, stream, early, credential).await;
            });
            return Ok(boxed(Response::new(Full::new(Bytes::new()))));
        }
        Err(e) => {
            tracing::info!(%target, "CONNECT refused: {e}");
            return Ok(boxed(dial_refusal(&e)));
        }
    };
    let on_upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        let _held = held;
        let stream_fail = |d: dial::Dialed, why: String| {
            tracing::warn!("CONNECT upgrade failed: {why}");
            let mut s = d.stream;
            transport::TunnelSend::reset(&mut s.send, proto::codes::stream::CANCELLED);
        };
        let upgraded = match on_upgrade.await {
            Ok(u) => u,
            Err(e) => return stream_fail(dialed, e.to_string()),
        };
        // Take the socket back from hyper so the relay can half-close and
        // reset it like any other TCP connection.
        let parts = match upgraded.downcast::<TokioIo<I>>() {
            Ok(p) => p,
            Err(_) => return stream_fail(dialed, "unexpected upgraded I/O type".into()),
        };
        let mut dialed = dialed;
        if !parts.read_buf.is_empty() {
            // Bytes the client sent right behind its request head.
            if let Err(e) = dialed.stream.send.write_all(&parts.read_buf).await {
                return stream_fail(dialed, e.to_string());
            }
        }
        let client = peer.addr().map(|a| a.ip());
        let io = parts.io.into_inner();
        ingress::relay(shared, dialed, io, client, "connect", credential).await;
    });
    Ok(boxed(Response::new(Full::new(Bytes::new()))))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_follow_the_table() {
        let target: SocketAddr = "198.18.0.5:10250".parse().unwrap();
        let refused = |code| DialError::Refused {
            node: "edge-1".into(),
            target,
            code,
            message: String::new(),
        };
        let cases = [
            (DialError::NoAgent("x".into()), 503),
            (DialError::Draining("edge-1".into()), 503),
            (refused(DialCode::Draining), 503),
            (refused(DialCode::NotAllowed), 403),
            (refused(DialCode::Refused), 502),
            (refused(DialCode::Unreachable), 502),
            (refused(DialCode::Timeout), 504),
            (
                DialError::Timeout {
                    node: "edge-1".into(),
                    target,
                    after: Duration::from_secs(12),
                },
                504,
            ),
            (
                DialError::Direct {
                    target,
                    source: std::io::ErrorKind::ConnectionRefused.into(),
                },
                502,
            ),
            (
                DialError::DirectTimeout {
                    target: "webhook.default.svc:443".into(),
                    after: Duration::from_secs(10),
                },
                504,
            ),
            (
                DialError::Protocol {
                    node: "edge-1".into(),
                    target,
                    reason: "garbage".into(),
                },
                502,
            ),
            (
                DialError::ConnectionLost {
                    node: "edge-1".into(),
                    target,
                    reason: "connection lost".into(),
                },
                503,
            ),
        ];
        for (e, status) in cases {
            assert_eq!(status_for(&e).as_u16(), status, "{e}");
        }
    }

    #[test]
    fn allow_lists_stay_out_of_client_bodies() {
        let target: SocketAddr = "198.18.0.5:22".parse().unwrap();
        let e = DialError::Refused {
            node: "edge-1".into(),
            target,
            code: DialCode::NotAllowed,
            message: "198.18.0.5:22 is not on the allow-list (127.0.0.1:10250,9100)".into(),
        };
        let body = client_body(&e);
        assert_eq!(
            body,
            "198.18.0.5:22 is not on the allow-list of node edge-1"
        );
        let e = DialError::Refused {
            node: "edge-1".into(),
            target,
            code: DialCode::Refused,
            message: "198.18.0.5:22 refused the connection".into(),
        };
        assert!(client_body(&e).ends_with("198.18.0.5:22 refused the connection"));
    }

    #[test]
    fn routes() {
        let req = |method: Method, uri: &str| {
            Request::builder().method(method).uri(uri).body(()).unwrap()
        };
        let node = |port| Target::Node {
            name: "edge-1".into(),
            port,
        };
        assert_eq!(
            route(&req(Method::CONNECT, "edge-1:9100")).unwrap(),
            Route {
                target: node(9100),
                forward: false
            }
        );
        // Absolute form: forwarded, port 80 by default.
        assert_eq!(
            route(&req(Method::GET, "http://edge-1:9100/metrics")).unwrap(),
            Route {
                target: node(9100),
                forward: true
            }
        );
        assert_eq!(
            route(&req(Method::GET, "http://edge-1/")).unwrap().target,
            node(80)
        );
        assert_eq!(
            route(&req(Method::GET, "http://[fd00::5]:9100/"))
                .unwrap()
                .target,
            Target::Address("[fd00::5]:9100".parse().unwrap())
        );
        let resp = route(&req(Method::GET, "https://edge-1:10250/")).unwrap_err();
        assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
        // Origin form: not a proxy request.
        let resp = route(&req(Method::GET, "/metrics")).unwrap_err();
        assert_eq!(resp.status(), StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(resp.headers()[hyper::header::ALLOW], "CONNECT");
        let resp = route(&req(Method::CONNECT, "/")).unwrap_err();
        assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
        let resp = route(&req(Method::CONNECT, "edge-1:http")).unwrap_err();
        assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    }

    #[test]
    fn targets() {
        assert_eq!(
            parse_target("198.18.0.5:10250").unwrap(),
            Target::Address("198.18.0.5:10250".parse().unwrap())
        );
        assert_eq!(
            parse_target("[fd00::5]:10250").unwrap(),
            Target::Address("[fd00::5]:10250".parse().unwrap())
        );
        assert_eq!(
            parse_target("edge-1:9100").unwrap(),
            Target::Node {
                name: "edge-1".into(),
                port: 9100
            }
        );
        assert!(parse_target("edge-1").unwrap_err().contains("no port"));
        assert!(parse_target("edge-1:http")
            .unwrap_err()
            .contains("invalid port"));
        assert!(parse_target("Bad_Name:1").unwrap_err().contains("neither"));
    }
}
