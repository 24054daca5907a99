//! Attack generators for the agent listeners' handshake limits, and the
//! process memory figures the tests bound.
//!
//! [`QuicFlood`] sends QUIC v1 Initials (a real ClientHello with ALPN
//! `edge-tunnel/1` and no client certificate, made by `quinn-proto` as a
//! client) from many fake connections and never finishes one: it keeps no
//! state per connection, reads nothing (a spoofer), or answers only the
//! server's Retry (an attacker that receives at its address) and then
//! goes quiet. [`TlsFlood`] holds TCP connections to the TLS listener
//! that send nothing or half a ClientHello, and reconnects when the
//! server closes them. Both send from several loopback source addresses
//! (127.0.0.2, ...) so the per-source limits see several sources; the
//! legitimate agent in the tests dials from 127.0.0.1.

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use quinn_proto::{ConnectionHandle, DatagramEvent, EndpointEvent};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::task::JoinSet;

/// Loopback source addresses 127.0.0.`first` .. 127.0.0.`first + n - 1`.
pub fn loopback_sources(first: u8, n: u8) -> Vec<IpAddr> {
    (first..first + n)
        .map(|i| IpAddr::from([127, 0, 0, i]))
        .collect()
}

/// What a flood did.
#[derive(Debug, Default)]
pub struct FloodCounters {
    /// QUIC: Initials of new connections; TLS: TCP connections made.
    pub attempts: AtomicU64,
    /// QUIC: Retries answered (with `answer_retry`).
    pub retries_answered: AtomicU64,
    /// TLS: connections the server closed.
    pub closed_by_server: AtomicU64,
}

/// A running flood; [`Flood::stop`] ends it.
pub struct Flood {
    stop: Arc<AtomicBool>,
    tasks: JoinSet<()>,
    pub counters: Arc<FloodCounters>,
}

impl Flood {
    pub fn attempts(&self) -> u64 {
        self.counters.attempts.load(Ordering::Relaxed)
    }

    pub async fn stop(mut self) -> Arc<FloodCounters> {
        self.stop.store(true, Ordering::Relaxed);
        // TLS slots may sit in a read the server never ends.
        tokio::time::sleep(Duration::from_millis(50)).await;
        self.tasks.abort_all();
        while self.tasks.join_next().await.is_some() {}
        self.counters
    }
}

/// QUIC connection attempts that never complete.
#[derive(Clone, Debug)]
pub struct QuicFlood {
    pub target: SocketAddr,
    pub sources: Vec<IpAddr>,
    /// New connection attempts per second, all sources together.
    pub rate: u32,
    /// Answer the server's Retry once (and nothing else), so the attempt
    /// comes back with a proven address and takes a handshake slot.
    pub answer_retry: bool,
}

impl QuicFlood {
    pub fn start(&self) -> Flood {
        let stop = Arc::new(AtomicBool::new(false));
        let counters = Arc::new(FloodCounters::default());
        let mut tasks = JoinSet::new();
        let per_source = (self.rate / self.sources.len() as u32).max(1);
        for &source in &self.sources {
            tasks.spawn(quic_source(
                source,
                self.target,
                per_source,
                self.answer_retry,
                stop.clone(),
                counters.clone(),
            ));
        }
        Flood {
            stop,
            tasks,
            counters,
        }
    }
}

/// A client TLS configuration with ALPN `edge-tunnel/1` and no client
/// certificate; it never gets to verify the server.
fn attacker_tls() -> quinn_proto::ClientConfig {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("TLS 1.3")
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    tls.alpn_protocols = vec![proto::ALPN.to_vec()];
    let crypto = quinn_proto::crypto::rustls::QuicClientConfig::try_from(Arc::new(tls))
        .expect("QUIC-capable TLS config");
    quinn_proto::ClientConfig::new(Arc::new(crypto))
}

/// Lets the client endpoint drop what it knows of an attempt.
fn forget(endpoint: &mut quinn_proto::Endpoint, ch: ConnectionHandle) {
    endpoint.handle_event(ch, EndpointEvent::drained());
}

/// A long-header QUIC v1 Retry packet.
fn is_retry(datagram: &[u8]) -> bool {
    datagram.len() > 5
        && datagram[0] & 0xc0 == 0xc0
        && (datagram[0] >> 4) & 0x03 == 0x03
        && datagram[1..5] == [0, 0, 0, 1]
}

async fn quic_source(
    source: IpAddr,
    target: SocketAddr,
    rate: u32,
    answer_retry: bool,
    stop: Arc<AtomicBool>,
    counters: Arc<FloodCounters>,
) {
    let socket = tokio::net::UdpSocket::bind((source, 0))
        .await
        .expect("bind a flood source");
    let config = attacker_tls();
    let mut endpoint = quinn_proto::Endpoint::new(
        Arc::new(quinn_proto::EndpointConfig::default()),
        None,
        false,
        None,
    );
    // Attempts waiting for their Retry (bounded: the oldest are given up).
    let mut waiting: HashMap<ConnectionHandle, quinn_proto::Connection> = HashMap::new();
    let mut order: VecDeque<ConnectionHandle> = VecDeque::new();
    let tick = Duration::from_millis(10);
    let per_tick = (rate / 100).max(1);
    let mut ticker = tokio::time::interval(tick);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut buf = Vec::with_capacity(1500);
    let mut rx = vec![0u8; 65_536];
    while !stop.load(Ordering::Relaxed) {
        ticker.tick().await;
        for _ in 0..per_tick {
            let now = Instant::now();
            let (ch, mut conn) =
                match endpoint.connect(now, config.clone(), target, "tunnel-server") {
                    Ok(v) => v,
                    Err(e) => panic!("flood connect: {e}"),
                };
            buf.clear();
            if let Some(t) = conn.poll_transmit(now, 1, &mut buf) {
                let _ = socket.send_to(&buf[..t.size], target).await;
                counters.attempts.fetch_add(1, Ordering::Relaxed);
            }
            if answer_retry {
                waiting.insert(ch, conn);
                order.push_back(ch);
                while order.len() > 1024 {
                    let old = order.pop_front().expect("not empty");
                    if waiting.remove(&old).is_some() {
                        forget(&mut endpoint, old);
                    }
                }
            } else {
                drop(conn);
                forget(&mut endpoint, ch);
            }
        }
        // Whatever came back: a Retry is answered (once), the rest dropped.
        while let Ok((n, from)) = socket.try_recv_from(&mut rx) {
            if !answer_retry || !is_retry(&rx[..n]) {
                continue;
            }
            let now = Instant::now();
            buf.clear();
            let event = endpoint.handle(now, from, None, None, BytesMut::from(&rx[..n]), &mut buf);
            let Some(DatagramEvent::ConnectionEvent(ch, event)) = event else {
                continue;
            };
            let Some(mut conn) = waiting.remove(&ch) else {
                continue;
            };
            conn.handle_event(event);
            buf.clear();
            if let Some(t) = conn.poll_transmit(now, 1, &mut buf) {
                let _ = socket.send_to(&buf[..t.size], target).await;
                counters.retries_answered.fetch_add(1, Ordering::Relaxed);
            }
            // From here on the server holds a handshake this side has
            // forgotten.
            drop(conn);
            forget(&mut endpoint, ch);
        }
    }
}

/// TCP connections to a TLS listener that never finish a handshake.
#[derive(Clone, Debug)]
pub struct TlsFlood {
    pub target: SocketAddr,
    pub sources: Vec<IpAddr>,
    /// Connections each source keeps open (reconnecting when closed).
    pub per_source: usize,
}

impl TlsFlood {
    pub fn start(&self) -> Flood {
        let stop = Arc::new(AtomicBool::new(false));
        let counters = Arc::new(FloodCounters::default());
        let mut tasks = JoinSet::new();
        for &source in &self.sources {
            for slot in 0..self.per_source {
                tasks.spawn(tls_slot(
                    source,
                    self.target,
                    slot % 2 == 1,
                    stop.clone(),
                    counters.clone(),
                ));
            }
        }
        Flood {
            stop,
            tasks,
            counters,
        }
    }
}

/// The first bytes of a TLS record that announces a 512-byte ClientHello.
const PARTIAL_CLIENT_HELLO: [u8; 9] = [0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc];

async fn tls_slot(
    source: IpAddr,
    target: SocketAddr,
    partial_hello: bool,
    stop: Arc<AtomicBool>,
    counters: Arc<FloodCounters>,
) {
    let mut byte = [0u8; 1];
    while !stop.load(Ordering::Relaxed) {
        let socket = tokio::net::TcpSocket::new_v4().expect("TCP socket");
        socket
            .bind(SocketAddr::new(source, 0))
            .expect("bind a flood source");
        let Ok(mut tcp) = socket.connect(target).await else {
            tokio::time::sleep(Duration::from_millis(5)).await;
            continue;
        };
        counters.attempts.fetch_add(1, Ordering::Relaxed);
        if partial_hello {
            let _ = tcp.write_all(&PARTIAL_CLIENT_HELLO).await;
        }
        // Wait for the server to give up on us.
        let _ = tcp.read(&mut byte).await;
        counters.closed_by_server.fetch_add(1, Ordering::Relaxed);
        // Without a pause a closed slot would reconnect in a busy loop.
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// A `kB` field of `/proc/self/status` (`"VmRSS:"`, `"VmHWM:"`), in KiB.
pub fn proc_status_kib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix(field))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

/// Resets this process's peak RSS (VmHWM) to its current RSS, so a later
/// VmHWM is the peak of what happened in between (Linux 4.0+).
pub fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}
