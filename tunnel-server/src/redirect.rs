//! The redirector (`tunnel-server dnat --redirect-listen --connect-url`):
//! on a cloud node that runs no server, iptables DNAT sends connections
//! for edge addresses to a local listener; the redirector reads the
//! original destination (SO_ORIGINAL_DST) and forwards the connection
//! through a server's CONNECT ingress, over mutually authenticated TLS
//! (the DNAT helper's certificate; the server's `--connect-tls-listen`
//! accepts it). Edges never need to reach this node, and any replica
//! behind the CONNECT address serves any node.
//!
//! Optimistic open, as the server's own transparent ingress does: the
//! `CONNECT` head and the client's first bytes (a TLS ClientHello) leave
//! together; the answer's head is read in front of the target's bytes. A
//! refusal (anything but 200), a failed upstream or a timeout resets the
//! client, which is what a refused connection looks like.
//!
//! Bounded: at most `max_connections` at once (more wait in the backlog),
//! the upstream dial (TCP, TLS, answer head) within `dial_timeout`, the
//! answer head at most [`MAX_HEAD`] bytes; both sockets of a session carry
//! TCP keep-alive and a user timeout ([`crate::ingress::CLIENT_IDLE_DEAD`]),
//! so a peer that vanished without a reset ends the session.

use std::net::SocketAddr;
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsConnector;

/// Longest answer head accepted from the CONNECT ingress.
pub const MAX_HEAD: usize = 8 * 1024;

/// Relay buffer per direction.
const BUFFER: usize = 16 * 1024;

/// Where and how the redirector forwards.
#[derive(Clone)]
pub struct Upstream {
    /// `host:port` of the CONNECT ingress (what is dialed).
    pub authority: String,
    /// The name its certificate must carry.
    pub server_name: ServerName<'static>,
    pub tls: TlsConnector,
    pub dial_timeout: Duration,
}

/// The redirector's metrics.
#[derive(Clone, Default)]
pub struct RedirectMetrics {
    /// Connections redirected, by result.
    pub connections: Family<[(&'static str, &'static str); 1], Counter>,
    /// Redirected connections open now.
    pub active: Gauge,
    /// Times every slot was taken and the listener stopped accepting.
    pub waits: Counter,
}

impl RedirectMetrics {
    pub fn register(&self, registry: &mut prometheus_client::registry::Registry) {
        registry.register(
            "redirected_connections",
            "Connections the redirector forwarded through the CONNECT ingress, by result (ok; \
             reset: a side failed while relaying, passed on as a reset; client_limit: reset \
             at once, the client had --max-connections-per-client open; not_redirected, \
             no_original_destination; connect_failed, tls_failed, timeout, bad_answer; \
             refused_4xx/5xx: the ingress's status class)",
            self.connections.clone(),
        );
        registry.register(
            "redirected_connections_active",
            "Redirected connections open now",
            self.active.clone(),
        );
        registry.register(
            "redirect_connection_waits",
            "Times the redirector had --max-client-connections open and stopped accepting \
             (new connections waited in the listen backlog)",
            self.waits.clone(),
        );
    }

    fn count(&self, result: &'static str) {
        self.connections.get_or_create(&[("result", result)]).inc();
    }
}

/// How many redirected connections the redirector serves.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// At once (`--max-client-connections`); more wait in the backlog.
    pub connections: usize,
    /// Per client (an address, an IPv6 /64; `--max-connections-per-client`);
    /// more are reset at once.
    pub per_client: usize,
}

/// Serves the redirect listener until the task is dropped.
pub async fn serve(
    listener: TcpListener,
    upstream: Upstream,
    limits: Limits,
    metrics: RedirectMetrics,
) {
    crate::ingress::watch_clients(&listener);
    let local = listener.local_addr().ok();
    let slots = transport::net::ConnectionSlots::new(limits.connections);
    let per_client = transport::net::PerSource::new(limits.per_client);
    loop {
        let permit = slots
            .acquire(|| {
                let waits = metrics.waits.inc() + 1;
                slots.warn_full(waits, "redirect", "--max-client-connections");
            })
            .await;
        let (tcp, peer) = transport::net::accept_with(&listener, "redirect", |_| {}).await;
        let Some(claim) = per_client.claim(peer.ip()) else {
            let refused = metrics
                .connections
                .get_or_create(&[("result", "client_limit")]);
            if (refused.inc() + 1).is_power_of_two() {
                tracing::warn!(client = %peer.ip(), limit = per_client.limit(), "redirected connection reset: the client has --max-connections-per-client open");
            }
            reset(&tcp);
            continue;
        };
        let (upstream, metrics) = (upstream.clone(), metrics.clone());
        tokio::spawn(async move {
            let _permit = (permit, claim);
            metrics.active.inc();
            let result = handle(tcp, peer, local, &upstream).await;
            metrics.active.dec();
            metrics.count(result);
        });
    }
}

/// One redirected connection; returns its result label.
async fn handle(
    tcp: TcpStream,
    peer: SocketAddr,
    local: Option<SocketAddr>,
    upstream: &Upstream,
) -> &'static str {
    let found = tcp
        .local_addr()
        .and_then(|here| Ok((here, transport::net::original_dst(&tcp, here)?)));
    let (here, original) = match found {
        Ok(found) => found,
        Err(e) => {
            tracing::info!(%peer, "no original destination (not a DNAT-redirected connection?): {e}");
            reset(&tcp);
            return "no_original_destination";
        }
    };
    if Some(original) == local || here == original {
        tracing::info!(%peer, "connection was not redirected by DNAT; refusing");
        reset(&tcp);
        return "not_redirected";
    }
    let dial = async {
        let up = TcpStream::connect(upstream.authority.as_str())
            .await
            .map_err(|e| ("connect_failed", e.to_string()))?;
        let _ = up.set_nodelay(true);
        // As every client socket: a server replica whose host died or was
        // cut off sends no reset, and an idle relayed session (a quiet
        // `logs -f`) would wait on it for ever, holding its client slot.
        crate::ingress::watch_client(&up);
        let tls = upstream
            .tls
            .connect(upstream.server_name.clone(), up)
            .await
            .map_err(|e| ("tls_failed", e.to_string()))?;
        Ok::<_, (&'static str, String)>(tls)
    };
    let mut tls = match tokio::time::timeout(upstream.dial_timeout, dial).await {
        Ok(Ok(tls)) => tls,
        Ok(Err((label, e))) => {
            tracing::warn!(%peer, target = %original, upstream = %upstream.authority, "cannot reach the CONNECT ingress: {e}");
            reset(&tcp);
            return label;
        }
        Err(_) => {
            tracing::warn!(%peer, target = %original, upstream = %upstream.authority, "the CONNECT ingress did not answer within {:?}", upstream.dial_timeout);
            reset(&tcp);
            return "timeout";
        }
    };
    let head = format!("CONNECT {original} HTTP/1.1\r\nHost: {original}\r\n\r\n");
    if tls.write_all(head.as_bytes()).await.is_err() {
        reset(&tcp);
        return "connect_failed";
    }
    relay(tcp, tls, original, upstream.dial_timeout).await
}

/// Relays both ways; the answer head is read (within `head_timeout`) and
/// checked in front of the target's bytes while the client's bytes flow
/// already. A refusal or a broken answer resets the client.
async fn relay<U>(
    mut client: TcpStream,
    upstream: U,
    target: SocketAddr,
    head_timeout: Duration,
) -> &'static str
where
    U: AsyncRead + AsyncWrite + Unpin,
{
    let result = {
        let (mut up_r, mut up_w) = tokio::io::split(upstream);
        let (mut cl_r, mut cl_w) = client.split();
        // A side that fails (a reset, a broken TLS session) is passed on
        // as a reset, never as an end: a FIN would make a cut-off
        // answer look whole.
        let to_upstream = async {
            let mut reader = tokio::io::BufReader::with_capacity(BUFFER, &mut cl_r);
            if tokio::io::copy_buf(&mut reader, &mut up_w).await.is_err() {
                return Err("reset");
            }
            let _ = up_w.shutdown().await;
            Ok(())
        };
        let from_upstream = async {
            let mut head = Vec::with_capacity(256);
            let rest =
                match tokio::time::timeout(head_timeout, read_head(&mut up_r, &mut head)).await {
                    Ok(Ok(rest)) => rest,
                    Ok(Err(label)) => return Err(label),
                    Err(_) => return Err("timeout"),
                };
            match status(&head) {
                Some(200) => {}
                Some(code) => {
                    let line = String::from_utf8_lossy(&head);
                    let body = String::from_utf8_lossy(&rest);
                    tracing::info!(
                        %target,
                        "the CONNECT ingress refused: {} {}",
                        line.lines().next().unwrap_or(""),
                        body.trim()
                    );
                    return Err(if code >= 500 {
                        "refused_5xx"
                    } else {
                        "refused_4xx"
                    });
                }
                None => return Err("bad_answer"),
            }
            // From here on the relay runs: a side that breaks ends it.
            if cl_w.write_all(&rest).await.is_err() {
                return Err("reset");
            }
            let mut reader = tokio::io::BufReader::with_capacity(BUFFER, &mut up_r);
            if tokio::io::copy_buf(&mut reader, &mut cl_w).await.is_err() {
                return Err("reset");
            }
            let _ = cl_w.shutdown().await;
            Ok(())
        };
        tokio::pin!(to_upstream, from_upstream);
        let mut up_done = false;
        loop {
            tokio::select! {
                r = &mut from_upstream => {
                    if r.is_ok() && !up_done {
                        // The target is done; the client may still send.
                        break to_upstream.await;
                    }
                    break r;
                }
                r = &mut to_upstream, if !up_done => {
                    up_done = true;
                    if r.is_err() {
                        break r;
                    }
                }
            }
        }
    };
    match result {
        Ok(()) => "ok",
        Err(label) => {
            reset(&client);
            label
        }
    }
}

/// Reads the answer head into `head` (at most [`MAX_HEAD`] bytes); returns
/// what was read beyond it.
async fn read_head<R: AsyncRead + Unpin>(
    r: &mut R,
    head: &mut Vec<u8>,
) -> Result<Vec<u8>, &'static str> {
    let mut buf = [0u8; 1024];
    loop {
        if let Some(end) = find_end(head) {
            return Ok(head.split_off(end));
        }
        if head.len() > MAX_HEAD {
            return Err("bad_answer");
        }
        match r.read(&mut buf).await {
            Ok(0) | Err(_) => return Err("connect_failed"),
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
}

fn find_end(head: &[u8]) -> Option<usize> {
    head.windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|i| i + 4)
}

/// The status code of an HTTP/1.x answer head.
fn status(head: &[u8]) -> Option<u16> {
    let line = head.split(|b| *b == b'\n').next()?;
    let mut parts = line.split(|b| *b == b' ');
    let version = parts.next()?;
    if !version.starts_with(b"HTTP/1.") {
        return None;
    }
    std::str::from_utf8(parts.next()?).ok()?.parse().ok()
}

/// Closes with an RST, as a refused connection would look.
fn reset(tcp: &TcpStream) {
    let _ = socket2::SockRef::from(tcp).set_linger(Some(Duration::ZERO));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answer_heads() {
        assert_eq!(status(b"HTTP/1.1 200 OK\r\n\r\n"), Some(200));
        assert_eq!(status(b"HTTP/1.1 503 Service Unavailable\r\n"), Some(503));
        assert_eq!(status(b"SSH-2.0-x\r\n"), None);
        assert_eq!(status(b"HTTP/1.1 abc\r\n"), None);
        assert_eq!(find_end(b"HTTP/1.1 200 OK\r\n\r\nhello"), Some(19));
        assert_eq!(find_end(b"HTTP/1.1 200 OK\r\n"), None);
    }

    /// An upstream that resets after part of an answer: the client sees
    /// the reset, not a FIN that would make the part look whole, and the
    /// connection is counted as reset.
    #[tokio::test]
    async fn an_upstream_reset_reaches_the_client_as_a_reset() {
        use tokio::io::AsyncReadExt;
        async fn pair() -> (TcpStream, TcpStream) {
            let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let dial = TcpStream::connect(l.local_addr().unwrap());
            let (a, b) = tokio::join!(dial, l.accept());
            (a.unwrap(), b.unwrap().0)
        }
        let (mut client, relayed) = pair().await;
        let (upstream, mut ingress) = pair().await;
        let target: SocketAddr = "198.18.1.2:10255".parse().unwrap();
        let relay = tokio::spawn(relay(relayed, upstream, target, Duration::from_secs(10)));
        ingress
            .write_all(b"HTTP/1.1 200 OK\r\n\r\npart of an answer")
            .await
            .unwrap();
        let mut part = [0u8; 17];
        client.read_exact(&mut part).await.unwrap();
        assert_eq!(&part, b"part of an answer");
        reset(&ingress);
        drop(ingress);
        let mut rest = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(10), client.read_to_end(&mut rest))
            .await
            .expect("the relay ends");
        assert_eq!(
            read.map_err(|e| e.kind()),
            Err(std::io::ErrorKind::ConnectionReset)
        );
        assert_eq!(relay.await.unwrap(), "reset");
    }

    #[tokio::test]
    async fn the_head_is_bounded_and_what_follows_is_kept() {
        let mut ok: &[u8] = b"HTTP/1.1 200 OK\r\n\r\nfirst bytes";
        let mut head = Vec::new();
        let rest = read_head(&mut ok, &mut head).await.unwrap();
        assert_eq!(rest, b"first bytes");
        assert_eq!(head, b"HTTP/1.1 200 OK\r\n\r\n");
        let endless = vec![b'x'; MAX_HEAD * 2];
        let mut head = Vec::new();
        assert_eq!(
            read_head(&mut endless.as_slice(), &mut head).await,
            Err("bad_answer")
        );
        let mut cut: &[u8] = b"HTTP/1.1 200";
        assert_eq!(
            read_head(&mut cut, &mut Vec::new()).await,
            Err("connect_failed")
        );
    }
}
