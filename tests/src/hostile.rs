//! A compromised agent on the HTTP/2 transport: a valid agent certificate,
//! but an HTTP/2 server written by hand to hurt the cloud side (the HTTP/2
//! client). Used by the `hostile_agent` tests and the benchmark runner's
//! attacks: [`Hostile`] speaks raw frames; [`push_promise_flood`] and
//! [`header_bomb`] are the two attacks of issue #13 finding 3.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt, WriteHalf};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio_rustls::client::TlsStream;

use crate::Pki;

// HTTP/2 frame types and flags (RFC 9113).
pub const DATA: u8 = 0x0;
pub const HEADERS: u8 = 0x1;
pub const SETTINGS: u8 = 0x4;
pub const PUSH_PROMISE: u8 = 0x5;
pub const PING: u8 = 0x6;
pub const CONTINUATION: u8 = 0x9;
pub const ACK: u8 = 0x1;
pub const END_HEADERS: u8 = 0x4;

pub fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut f = Vec::with_capacity(9 + payload.len());
    f.extend_from_slice(&len.to_be_bytes()[1..]);
    f.push(kind);
    f.push(flags);
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// An HPACK integer with an `n`-bit prefix whose high bits are `first`.
pub fn hpack_int(first: u8, n: u32, mut v: usize, out: &mut Vec<u8>) {
    let max = (1usize << n) - 1;
    if v < max {
        out.push(first | v as u8);
        return;
    }
    out.push(first | max as u8);
    v -= max;
    while v >= 128 {
        out.push((v % 128) as u8 | 0x80);
        v /= 128;
    }
    out.push(v as u8);
}

/// A literal header field without indexing, with a new name.
pub fn hpack_literal(name: &[u8], value: &[u8], out: &mut Vec<u8>) {
    out.push(0x00);
    hpack_int(0, 7, name.len(), out);
    out.extend_from_slice(name);
    hpack_int(0, 7, value.len(), out);
    out.extend_from_slice(value);
}

/// `:status 200` (HPACK static table entry 8).
pub const STATUS_200: u8 = 0x88;

/// The hostile agent's HTTP/2 connection, after the server opened
/// `/control` (stream 1).
pub struct Hostile {
    write: WriteHalf<TlsStream<TcpStream>>,
    /// (the server closed the connection, PING acknowledgements seen)
    seen: watch::Receiver<(bool, u64)>,
}

impl Hostile {
    /// Dials the server's HTTP/2 listener with `node`'s certificate and
    /// takes the server's `/control` request.
    pub async fn dial(
        pki: &Pki,
        node: &str,
        server: SocketAddr,
        server_name: &str,
    ) -> std::io::Result<Hostile> {
        let dir = certs::CertDir::load(&pki.agent_dir(node)).map_err(std::io::Error::other)?;
        let tls = certs::tls::client_config(&dir, proto::ALPN_H2).map_err(std::io::Error::other)?;
        let connector = tokio_rustls::TlsConnector::from(Arc::new(tls));
        let tcp = TcpStream::connect(server).await?;
        let name = rustls::pki_types::ServerName::try_from(server_name.to_owned())
            .map_err(std::io::Error::other)?;
        let tls = connector.connect(name, tcp).await?;
        let (mut read, mut write) = tokio::io::split(tls);
        let mut preface = [0u8; 24];
        read.read_exact(&mut preface).await?;
        if &preface != b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" {
            return Err(std::io::Error::other("not an HTTP/2 client preface"));
        }
        write.write_all(&frame(SETTINGS, 0, 0, &[])).await?;
        // Settle SETTINGS, wait for the server's `/control` request.
        loop {
            let (kind, flags, stream, _) = read_frame(&mut read).await?;
            if kind == SETTINGS && flags & ACK == 0 {
                write.write_all(&frame(SETTINGS, ACK, 0, &[])).await?;
            }
            if kind == HEADERS && stream == 1 {
                break;
            }
        }
        let (tx, seen) = watch::channel((false, 0));
        tokio::spawn(async move {
            // Read (and drop) everything the server sends until it closes.
            while let Ok((kind, flags, _, _)) = read_frame(&mut read).await {
                if kind == PING && flags & ACK != 0 {
                    tx.send_modify(|s| s.1 += 1);
                }
            }
            tx.send_modify(|s| s.0 = true);
        });
        Ok(Hostile { write, seen })
    }

    pub async fn send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.write.write_all(bytes).await?;
        self.write.flush().await
    }

    /// Answers `/control` with 200 and sends a well-formed `Hello`.
    pub async fn register(&mut self, node: &str) -> std::io::Result<()> {
        self.send(&frame(HEADERS, END_HEADERS, 1, &[STATUS_200]))
            .await?;
        self.send_control(&[hello(node)]).await
    }

    /// Control messages on the `/control` response body.
    pub async fn send_control(&mut self, messages: &[proto::Message]) -> std::io::Result<()> {
        let mut body = Vec::new();
        for m in messages {
            proto::encode(m, &mut body).unwrap();
        }
        for chunk in body.chunks(16 * 1024) {
            self.send(&frame(DATA, 0, 1, chunk)).await?;
        }
        Ok(())
    }

    /// Waits until the server either acknowledged a PING sent now (so it
    /// has read everything before it) or closed the connection. Returns
    /// whether it closed.
    pub async fn settle(&mut self) -> bool {
        let before = self.seen.borrow().1;
        let _ = self.send(&frame(PING, 0, 0, &[7; 8])).await;
        let mut seen = self.seen.clone();
        let state = tokio::time::timeout(
            Duration::from_secs(60),
            seen.wait_for(|(closed, acks)| *closed || *acks > before),
        )
        .await
        .expect("the server neither answered a PING nor closed")
        .map(|s| *s)
        .unwrap_or((true, 0));
        state.0
    }

    pub async fn wait_closed(&self) {
        let mut seen = self.seen.clone();
        tokio::time::timeout(Duration::from_secs(30), seen.wait_for(|s| s.0))
            .await
            .expect("the server closes the connection")
            .ok();
    }
}

pub async fn read_frame<R: AsyncRead + Unpin>(
    r: &mut R,
) -> std::io::Result<(u8, u8, u32, Vec<u8>)> {
    let mut head = [0u8; 9];
    r.read_exact(&mut head).await?;
    let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
    let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
    let mut payload = vec![0u8; len];
    r.read_exact(&mut payload).await?;
    Ok((head[3], head[4], stream, payload))
}

pub fn hello(node: &str) -> proto::Message {
    proto::Message::Hello(proto::Hello {
        version_major: proto::VERSION_MAJOR,
        version_minor: proto::VERSION_MINOR,
        node: node.into(),
        addresses: vec![],
        capabilities: 0,
        instance: 0,
        previous: String::new(),
    })
}

/// Sends up to `bytes` of PUSH_PROMISE frames on the control stream (h2
/// with push on kept every promised request: ~280 MiB for 4 MB). Returns
/// what was sent before the server closed the connection.
pub async fn push_promise_flood(evil: &mut Hostile, bytes: usize) -> usize {
    let mut block = vec![0x82, 0x87, 0x84]; // GET, https, /
    block.push(0x01); // :authority, literal without indexing
    hpack_int(0, 7, 1, &mut block);
    block.push(b'x');
    let mut batch = Vec::new();
    let mut promised: u32 = 2;
    let mut sent = 0usize;
    while sent < bytes {
        batch.clear();
        for _ in 0..4096 {
            let mut payload = promised.to_be_bytes().to_vec();
            payload.extend_from_slice(&block);
            batch.extend_from_slice(&frame(PUSH_PROMISE, END_HEADERS, 1, &payload));
            promised += 2;
        }
        if evil.send(&batch).await.is_err() {
            break;
        }
        sent += batch.len();
    }
    sent
}

/// Answers `/control` with a header block of `size` bytes (one header),
/// in HEADERS and CONTINUATION frames of 16 KiB (the default frame size
/// every peer accepts), then a `Hello` for `node`.
pub async fn header_bomb(evil: &mut Hostile, size: usize, node: &str) {
    let mut block = vec![STATUS_200];
    hpack_literal(b"x-bomb", &vec![b'a'; size], &mut block);
    let mut chunks = block.chunks(16 * 1024).peekable();
    let mut first = true;
    while let Some(chunk) = chunks.next() {
        let kind = if first { HEADERS } else { CONTINUATION };
        let flags = if chunks.peek().is_none() {
            END_HEADERS
        } else {
            0
        };
        first = false;
        if evil.send(&frame(kind, flags, 1, chunk)).await.is_err() {
            break;
        }
    }
    let _ = evil.send_control(&[hello(node)]).await;
}
