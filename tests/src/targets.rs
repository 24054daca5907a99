//! Fake edge targets: what a kubelet or exporter looks like from the tunnel.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

async fn listen() -> (TcpListener, SocketAddr) {
    let l = transport::net::bind_tcp("127.0.0.1:0".parse().unwrap()).unwrap();
    let a = l.local_addr().unwrap();
    (l, a)
}

/// Echoes every byte; on EOF it half-closes back (so FIN travels both ways).
pub async fn echo_server() -> SocketAddr {
    echo_server_on("127.0.0.1:0".parse().unwrap()).await
}

/// [`echo_server`] on a given address.
pub async fn echo_server_on(addr: SocketAddr) -> SocketAddr {
    let l = transport::net::bind_tcp(addr).unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = l.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = tcp.split();
                let mut buf = vec![0u8; 64 * 1024];
                loop {
                    match r.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            if w.write_all(&buf[..n]).await.is_err() {
                                return;
                            }
                        }
                    }
                }
                let _ = w.shutdown().await;
            });
        }
    });
    addr
}

/// Reads to EOF, then answers `sha256:<hex> bytes:<n>` of what it read and
/// closes: proves a client's half-close reaches it and that the client
/// still gets the answer after shutting its own write side.
pub async fn digest_after_eof_server() -> SocketAddr {
    let (l, addr) = listen().await;
    serve_digest_after_eof(l);
    addr
}

/// [`digest_after_eof_server`] on `addr`.
pub async fn digest_after_eof_server_on(addr: SocketAddr) -> SocketAddr {
    let l = transport::net::bind_tcp(addr).unwrap();
    let addr = l.local_addr().unwrap();
    serve_digest_after_eof(l);
    addr
}

fn serve_digest_after_eof(l: tokio::net::TcpListener) {
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut hasher = Sha256::new();
                let mut buf = vec![0u8; 64 * 1024];
                let mut total = 0usize;
                loop {
                    match tcp.read(&mut buf).await {
                        Ok(0) => break,
                        Ok(n) => {
                            hasher.update(&buf[..n]);
                            total += n;
                        }
                        Err(_) => return,
                    }
                }
                let reply = format!("sha256:{} bytes:{total}", hex(&hasher.finalize()));
                let _ = tcp.write_all(reply.as_bytes()).await;
                let _ = tcp.shutdown().await;
            });
        }
    });
}

/// Writes an endless pattern until the client goes away.
pub async fn firehose_server() -> SocketAddr {
    let (l, addr) = listen().await;
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = l.accept().await {
            tokio::spawn(async move {
                let block = pattern(64 * 1024, 7);
                while tcp.write_all(&block).await.is_ok() {}
            });
        }
    });
    addr
}

/// Answers every HTTP request with `200` and a body without end (close-
/// delimited): a large response a forwarding proxy's client may not read.
pub async fn http_firehose_server() -> SocketAddr {
    let (l, addr) = listen().await;
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = l.accept().await {
            tokio::spawn(async move {
                // The request head (bounded), then the answer.
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") && head.len() < 16 * 1024 {
                    match tcp.read(&mut byte).await {
                        Ok(1) => head.push(byte[0]),
                        _ => return,
                    }
                }
                if tcp
                    .write_all(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n")
                    .await
                    .is_err()
                {
                    return;
                }
                let block = pattern(64 * 1024, 7);
                while tcp.write_all(&block).await.is_ok() {}
            });
        }
    });
    addr
}

/// Accepts and immediately resets every connection (SO_LINGER 0).
pub async fn reset_server() -> SocketAddr {
    let (l, addr) = listen().await;
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = l.accept().await {
            // Wait for the first byte so the reset happens mid-connection.
            let mut b = [0u8; 1];
            let _ = tcp.read(&mut b).await;
            let _ = socket2::SockRef::from(&tcp).set_linger(Some(Duration::ZERO));
            drop(tcp);
        }
    });
    addr
}

/// Counts connections that ended in a reset as seen by the target.
pub async fn reset_observer() -> (SocketAddr, tokio::sync::mpsc::Receiver<std::io::ErrorKind>) {
    let (l, addr) = listen().await;
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = l.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                let kind = loop {
                    match tcp.read(&mut buf).await {
                        Ok(0) => break std::io::ErrorKind::UnexpectedEof,
                        Ok(_) => {}
                        Err(e) => break e.kind(),
                    }
                };
                let _ = tx.send(kind).await;
            });
        }
    });
    (addr, rx)
}

/// A kubelet-like HTTPS server with its own CA. Paths:
/// - `/healthz`: `ok`
/// - `/logs`: a line every 100 ms for 3 s, like `kubectl logs -f`
/// - `/exec`: a WebSocket echo session, like `kubectl exec`
pub struct KubeletLike {
    pub addr: SocketAddr,
    /// The CA that signed its certificate (clients trust only this).
    pub roots: rustls::RootCertStore,
}

pub async fn kubelet_like(ip: std::net::IpAddr) -> KubeletLike {
    let ca = certs::issue::Ca::generate("kubelet CA", 1).unwrap();
    let leaf = ca
        .issue_server("kubelet", &["localhost".into()], &[ip], 1)
        .unwrap();
    let name = std::path::Path::new("kubelet-like");
    let chain = certs::files::parse_certs(leaf.cert.as_bytes(), name).unwrap();
    let key = certs::files::parse_key(leaf.key.as_bytes(), name).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    for c in certs::files::parse_certs(ca.pem().cert.as_bytes(), name).unwrap() {
        roots.add(c).unwrap();
    }
    let l = transport::net::bind_tcp(SocketAddr::new(ip, 0)).unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(serve_kubelet_like(l, chain, key));
    KubeletLike { addr, roots }
}

/// Serves the kubelet-like HTTPS endpoints on `l` with the given certificate.
pub async fn serve_kubelet_like(
    l: TcpListener,
    chain: Vec<rustls::pki_types::CertificateDer<'static>>,
    key: rustls::pki_types::PrivateKeyDer<'static>,
) {
    let config = rustls::ServerConfig::builder_with_provider(certs::tls::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .expect("usable certificate and key");
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    while let Ok((tcp, _)) = l.accept().await {
        let acceptor = acceptor.clone();
        tokio::spawn(async move {
            if let Ok(tls) = acceptor.accept(tcp).await {
                serve_https(tls).await;
            }
        });
    }
}

async fn serve_https<S: AsyncRead + AsyncWrite + Unpin>(mut tls: S) {
    // Peek the request line without consuming the WebSocket handshake.
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") && head.len() < 8192 {
        if tls.read(&mut byte).await.unwrap_or(0) == 0 {
            return;
        }
        head.push(byte[0]);
    }
    let text = String::from_utf8_lossy(&head).into_owned();
    let path = text.split(' ').nth(1).unwrap_or("/").to_owned();
    match path.as_str() {
        "/logs" => {
            let _ = tls
                .write_all(
                    b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nConnection: close\r\n\r\n",
                )
                .await;
            let _ = tls.flush().await;
            for i in 0..30 {
                if tls
                    .write_all(format!("log line {i}\n").as_bytes())
                    .await
                    .is_err()
                {
                    return;
                }
                let _ = tls.flush().await;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            let _ = tls.shutdown().await;
        }
        "/metrics" => {
            let body = "# TYPE kubelet_like_up gauge\nkubelet_like_up 1\n";
            let _ = tls
                .write_all(
                    format!(
                        "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    )
                    .as_bytes(),
                )
                .await;
            let _ = tls.shutdown().await;
        }
        "/exec" => {
            // Replay the consumed head in front of the stream for tungstenite.
            let stream = Prefixed {
                prefix: head,
                pos: 0,
                inner: tls,
            };
            let Ok(mut ws) = tokio_tungstenite::accept_async(stream).await else {
                return;
            };
            while let Some(Ok(msg)) = ws.next().await {
                if msg.is_close() {
                    break;
                }
                if (msg.is_text() || msg.is_binary()) && ws.send(msg).await.is_err() {
                    break;
                }
            }
        }
        "/echo" => {
            // The request body (Content-Length, at most 256 MiB) back as
            // the response body: bytes through the tunnel both ways.
            const MAX: usize = 256 << 20;
            let len = text
                .lines()
                .find_map(|l| {
                    let (name, value) = l.split_once(':')?;
                    name.eq_ignore_ascii_case("content-length")
                        .then(|| value.trim().parse::<usize>().ok())?
                })
                .unwrap_or(0);
            if len > MAX {
                let _ = tls
                    .write_all(b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                    .await;
                return;
            }
            let mut body = vec![0u8; len];
            if tls.read_exact(&mut body).await.is_err() {
                return;
            }
            let head = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: {len}\r\nConnection: close\r\n\r\n"
            );
            if tls.write_all(head.as_bytes()).await.is_ok() && tls.write_all(&body).await.is_ok() {
                let _ = tls.shutdown().await;
            }
        }
        _ => {
            let body = "ok from kubelet-like\n";
            let _ = tls
                .write_all(
                    format!(
                        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    )
                    .as_bytes(),
                )
                .await;
            let _ = tls.shutdown().await;
        }
    }
}

/// A stream that first yields `prefix`.
struct Prefixed<S> {
    prefix: Vec<u8>,
    pos: usize,
    inner: S,
}

impl<S: AsyncRead + Unpin> AsyncRead for Prefixed<S> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        if self.pos < self.prefix.len() {
            let n = (self.prefix.len() - self.pos).min(buf.remaining());
            let start = self.pos;
            buf.put_slice(&self.prefix[start..start + n]);
            self.pos += n;
            return std::task::Poll::Ready(Ok(()));
        }
        std::pin::Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Prefixed<S> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// A TLS client that trusts only `roots` and checks the name `ip`.
pub async fn tls_connect(
    tcp: TcpStream,
    roots: &rustls::RootCertStore,
    ip: std::net::IpAddr,
) -> tokio_rustls::client::TlsStream<TcpStream> {
    let config = rustls::ClientConfig::builder_with_provider(certs::tls::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots.clone())
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    connector
        .connect(rustls::pki_types::ServerName::IpAddress(ip.into()), tcp)
        .await
        .expect("TLS handshake with the target through the tunnel")
}

/// Writes `total` bytes and reads back the echo concurrently; returns the
/// digests of what was sent and what came back.
pub async fn echo_digest(
    mut tcp: tokio::net::TcpStream,
    total: usize,
    seed: u64,
) -> (String, String) {
    let block = pattern(256 * 1024, seed);
    let (mut r, mut w) = tcp.split();
    let write = async {
        let mut hasher = Sha256::new();
        let mut left = total;
        while left > 0 {
            let n = left.min(block.len());
            w.write_all(&block[..n]).await.unwrap();
            hasher.update(&block[..n]);
            left -= n;
        }
        w.shutdown().await.unwrap();
        hex(&hasher.finalize())
    };
    let read = async {
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 256 * 1024];
        let mut got = 0;
        loop {
            let n = r.read(&mut buf).await.unwrap();
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            got += n;
        }
        assert_eq!(got, total);
        hex(&hasher.finalize())
    };
    tokio::join!(write, read)
}

/// Deterministic pseudo-random bytes.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut rng = fastrand_like(seed);
    (0..len).map(|_| rng()).collect()
}

fn fastrand_like(mut state: u64) -> impl FnMut() -> u8 {
    move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state >> 24) as u8
    }
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
