//! A compromised agent on the HTTP/2 transport: a valid agent certificate,
//! but an HTTP/2 server written by hand to hurt the cloud side (the
//! HTTP/2 client). Each test registers a legitimate agent next to it and
//! checks, while or after the attack, that the server's memory stayed
//! bounded (VmRSS of this process, which runs the server), that
//! `/healthz` answers and that the legitimate agent still serves a
//! request.
//!
//! The tests of this file run one at a time ([`SERIAL`]): they measure the
//! memory of the whole process.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use e2e::targets;
use e2e::{connect_via, eventually, http_get, init_logging, Pki, TestAgent, TestServer};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt, WriteHalf};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio_rustls::client::TlsStream;

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const LEGIT: &str = "edge-1";
const HOSTILE: &str = "edge-evil";

/// What a generous bound on the server's growth under an attack is: the
/// attacks below added 280 MiB to 850 MiB before the limits.
const RSS_BOUND_KIB: u64 = 64 * 1024;

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// VmRSS of this process, in KiB.
fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/self/status")
}

// HTTP/2 frame types and flags (RFC 9113).
const DATA: u8 = 0x0;
const HEADERS: u8 = 0x1;
const SETTINGS: u8 = 0x4;
const PUSH_PROMISE: u8 = 0x5;
const PING: u8 = 0x6;
const CONTINUATION: u8 = 0x9;
const ACK: u8 = 0x1;
const END_HEADERS: u8 = 0x4;

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
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
fn hpack_int(first: u8, n: u32, mut v: usize, out: &mut Vec<u8>) {
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
fn hpack_literal(name: &[u8], value: &[u8], out: &mut Vec<u8>) {
    out.push(0x00);
    hpack_int(0, 7, name.len(), out);
    out.extend_from_slice(name);
    hpack_int(0, 7, value.len(), out);
    out.extend_from_slice(value);
}

/// `:status 200` (HPACK static table entry 8).
const STATUS_200: u8 = 0x88;

/// The hostile agent's HTTP/2 connection, after the server opened
/// `/control` (stream 1).
struct Hostile {
    write: WriteHalf<TlsStream<TcpStream>>,
    /// (the server closed the connection, PING acknowledgements seen)
    seen: watch::Receiver<(bool, u64)>,
}

impl Hostile {
    /// Dials the server's HTTP/2 listener with `node`'s certificate and
    /// takes the server's `/control` request.
    async fn dial(pki: &Pki, node: &str, server: SocketAddr) -> Hostile {
        let dir = certs::CertDir::load(&pki.agent_dir(node)).unwrap();
        let tls = certs::tls::client_config(&dir, proto::ALPN_H2).unwrap();
        let connector = tokio_rustls::TlsConnector::from(Arc::new(tls));
        let tcp = TcpStream::connect(server).await.unwrap();
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        let tls = connector.connect(name, tcp).await.unwrap();
        let (mut read, mut write) = tokio::io::split(tls);
        let mut preface = [0u8; 24];
        read.read_exact(&mut preface).await.unwrap();
        assert_eq!(&preface, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n");
        write.write_all(&frame(SETTINGS, 0, 0, &[])).await.unwrap();
        // Settle SETTINGS, wait for the server's `/control` request.
        loop {
            let (kind, flags, stream, _) = read_frame(&mut read).await.unwrap();
            if kind == SETTINGS && flags & ACK == 0 {
                write
                    .write_all(&frame(SETTINGS, ACK, 0, &[]))
                    .await
                    .unwrap();
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
        Hostile { write, seen }
    }

    async fn send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.write.write_all(bytes).await?;
        self.write.flush().await
    }

    /// Answers `/control` with 200 and sends a well-formed `Hello`.
    async fn register(&mut self, node: &str) {
        self.send(&frame(HEADERS, END_HEADERS, 1, &[STATUS_200]))
            .await
            .unwrap();
        self.send_control(&[hello(node)]).await.unwrap();
    }

    /// Control messages on the `/control` response body.
    async fn send_control(&mut self, messages: &[proto::Message]) -> std::io::Result<()> {
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
    async fn settle(&mut self) -> bool {
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

    async fn wait_closed(&self) {
        let mut seen = self.seen.clone();
        tokio::time::timeout(Duration::from_secs(30), seen.wait_for(|s| s.0))
            .await
            .expect("the server closes the connection")
            .ok();
    }
}

async fn read_frame<R: AsyncRead + Unpin>(r: &mut R) -> std::io::Result<(u8, u8, u32, Vec<u8>)> {
    let mut head = [0u8; 9];
    r.read_exact(&mut head).await?;
    let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
    let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
    let mut payload = vec![0u8; len];
    r.read_exact(&mut payload).await?;
    Ok((head[3], head[4], stream, payload))
}

fn hello(node: &str) -> proto::Message {
    proto::Message::Hello(proto::Hello {
        version_major: proto::VERSION_MAJOR,
        version_minor: proto::VERSION_MINOR,
        node: node.into(),
        addresses: vec![],
        capabilities: 0,
    })
}

/// A server, a legitimate agent (HTTP/2 too) and an echo target it may
/// reach.
struct Scene {
    pki: Pki,
    server: TestServer,
    agent: TestAgent,
    echo: SocketAddr,
}

async fn scene() -> Scene {
    init_logging();
    let echo = targets::echo_server().await;
    let pki = Pki::new();
    pki.issue_agent(LEGIT, &[ip("127.0.0.1")]);
    pki.issue_agent(HOSTILE, &[ip("127.0.0.2")]);
    let server = TestServer::start(&pki).await;
    let mut config = TestAgent::config(
        &pki,
        LEGIT,
        server.addrs.quic,
        &[format!("127.0.0.1:{}", echo.port())],
    );
    config.transport = tunnel_agent::config::TransportChoice::H2;
    let agent = TestAgent::start(config);
    server.wait_for_agent(LEGIT, Duration::from_secs(10)).await;
    Scene {
        pki,
        server,
        agent,
        echo,
    }
}

impl Scene {
    fn h2(&self) -> SocketAddr {
        self.server.addrs.h2.expect("HTTP/2 listener")
    }

    /// `/healthz` answers and the legitimate agent relays a round trip.
    async fn still_serves(&self) {
        let admin = self.server.addrs.admin.unwrap();
        assert_eq!(http_get(admin, "/healthz").await.0, 200);
        let mut tcp = connect_via(self.server.connect_addr(), &self.echo.to_string())
            .await
            .expect("CONNECT through the legitimate agent");
        tcp.write_all(b"still here").await.unwrap();
        let mut buf = [0u8; 10];
        tcp.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"still here");
    }

    fn hostile_registered(&self) -> bool {
        !matches!(
            self.server.shared.registry.by_node(HOSTILE),
            tunnel_server::registry::Route::NoAgent
        )
    }
}

fn assert_rss_bounded(before: u64, what: &str) {
    let after = rss_kib();
    let grew = after.saturating_sub(before);
    println!("{what}: VmRSS {before} KiB -> {after} KiB (+{grew} KiB)");
    assert!(
        grew < RSS_BOUND_KIB,
        "{what}: the server grew by {grew} KiB (bound {RSS_BOUND_KIB} KiB)"
    );
}

/// 4 MB of PUSH_PROMISE frames on the control stream. h2 with push on
/// keeps every promised request until someone takes it (nobody does):
/// this added ~280 MiB. With push off the first one ends the connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_promise_flood() {
    let _serial = SERIAL.lock().await;
    let s = scene().await;
    let mut evil = Hostile::dial(&s.pki, HOSTILE, s.h2()).await;
    evil.register(HOSTILE).await;
    s.server
        .wait_for_agent(HOSTILE, Duration::from_secs(10))
        .await;
    let before = rss_kib();

    let mut block = vec![0x82, 0x87, 0x84]; // GET, https, /
    block.push(0x01); // :authority, literal without indexing
    hpack_int(0, 7, 1, &mut block);
    block.push(b'x');
    let mut batch = Vec::new();
    let mut promised: u32 = 2;
    let mut sent = 0usize;
    'flood: while sent < 4_000_000 {
        batch.clear();
        for _ in 0..4096 {
            let mut payload = promised.to_be_bytes().to_vec();
            payload.extend_from_slice(&block);
            batch.extend_from_slice(&frame(PUSH_PROMISE, END_HEADERS, 1, &payload));
            promised += 2;
        }
        if evil.send(&batch).await.is_err() {
            break 'flood;
        }
        sent += batch.len();
    }
    let closed = evil.settle().await;
    assert_rss_bounded(before, "push-promise flood");
    assert!(closed, "a push promise ends the connection");
    assert!(
        s.server
            .metric("edge_tunnel_agent_protocol_errors_total{kind=\"h2_protocol\"}")
            .await
            >= 1.0
    );
    eventually("the hostile agent is gone", Duration::from_secs(10), || {
        let gone = !s.hostile_registered();
        async move { gone }
    })
    .await;
    s.still_serves().await;
    s.agent.stop().await;
}

/// A `/control` response whose header block is 4 MiB (h2 accepted up to
/// 16 MiB per header list): refused, the connection ends, and the agent
/// is never registered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn huge_header_block() {
    let _serial = SERIAL.lock().await;
    let s = scene().await;
    let before = rss_kib();
    let mut evil = Hostile::dial(&s.pki, HOSTILE, s.h2()).await;
    let mut block = vec![STATUS_200];
    hpack_literal(b"x-bomb", &vec![b'a'; 4 << 20], &mut block);
    // HEADERS then CONTINUATION frames of 16 KiB (the default frame size
    // every peer accepts).
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
    let _ = evil.send_control(&[hello(HOSTILE)]).await;
    evil.wait_closed().await;
    assert!(
        !s.hostile_registered(),
        "registered despite the header bomb"
    );
    assert_rss_bounded(before, "header bomb");
    s.still_serves().await;
    s.agent.stop().await;
}

/// Ten thousand `Drain` frames, then a second `Hello`: the repeats are
/// ignored quietly (counted, no log line each), the `Hello` is a protocol
/// error that ends the connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_control_frames() {
    let _serial = SERIAL.lock().await;
    let s = scene().await;
    let mut evil = Hostile::dial(&s.pki, HOSTILE, s.h2()).await;
    evil.register(HOSTILE).await;
    s.server
        .wait_for_agent(HOSTILE, Duration::from_secs(10))
        .await;
    let before = rss_kib();
    let drains = vec![proto::Message::Drain; 10_000];
    evil.send_control(&drains).await.unwrap();
    let repeated = "edge_tunnel_agent_protocol_errors_total{kind=\"repeated_drain\"}";
    eventually("every repeat counted", Duration::from_secs(30), || {
        let server = &s.server;
        async move { server.metric(repeated).await >= 9_999.0 }
    })
    .await;
    assert_eq!(s.server.metric(repeated).await, 9_999.0);
    assert!(matches!(
        s.server.shared.registry.by_node(HOSTILE),
        tunnel_server::registry::Route::Draining(_)
    ));
    assert!(
        !evil.settle().await,
        "Drain repeats do not end the connection"
    );
    evil.send_control(&[hello(HOSTILE)]).await.unwrap();
    evil.wait_closed().await;
    assert_eq!(
        s.server
            .metric("edge_tunnel_agent_protocol_errors_total{kind=\"unexpected_control_message\"}")
            .await,
        1.0
    );
    assert_rss_bounded(before, "control-frame flood");
    s.still_serves().await;
    s.agent.stop().await;
}
