//! QUIC endpoints shared by server and agent.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{Endpoint, EndpointConfig, IdleTimeout, TokioRuntime, TransportConfig, VarInt};

/// Transport settings. Defaults are chosen for a WAN link to the edge and
/// for thousands of streams per agent; see each field for its cost.
#[derive(Clone, Debug)]
pub struct QuicSettings {
    /// Keep-alive PING interval; keeps NAT bindings open. Default 10 s.
    pub keepalive: Duration,
    /// Connection is dead after this long without any packet. Default 30 s.
    pub idle_timeout: Duration,
    /// Per-stream receive window: the most one stalled reader can hold
    /// buffered (memory per stream, worst case). Default 512 KiB, enough
    /// for ~80 Mbit/s at 50 ms RTT on one stream, and a sixteenth of the
    /// connection window: it takes 16 stalled readers to use up the credit
    /// new streams need for their `Dial`.
    pub stream_window: u32,
    /// Per-connection receive window across all streams: the worst-case
    /// buffered memory per agent connection. Default 8 MiB (~1.3 Gbit/s
    /// at 50 ms RTT across all streams), so a few stalled readers cannot
    /// stall the other streams. Received packets arrive in GRO batches
    /// whose buffers stay allocated until every stream with data in them
    /// has read it, so with many streams the memory this pins is a few
    /// times the window: at 16 MiB the agent peaked at 72-113 MiB in the
    /// 1,000-connection benchmark, at 8 MiB at 47-60 MiB.
    pub connection_window: u32,
    /// Data written but not yet acknowledged, across all streams of one
    /// connection: the worst-case send-buffer memory per connection.
    /// Default 8 MiB (~1.3 Gbit/s at 50 ms RTT).
    pub send_window: u32,
    /// Packets the peer may receive before it must acknowledge (QUIC ACK
    /// frequency extension; both ends here support it). Default 10, one
    /// GSO batch: far fewer ACK packets to send and process in bulk.
    pub ack_every: u32,
    /// Streams the server may have open to one agent at once. Default 8192.
    pub max_streams: u32,
    /// Connection-level receive credit this process may lend, across all
    /// its connections, to streams whose TCP reader has stopped reading
    /// (see [`StallCredit`]). Default 64 MiB: 128 stalled streams at the
    /// default stream window. This much more memory can be held by stalled
    /// streams, process-wide, on top of the connection windows.
    pub stall_budget: u64,
    /// UDP socket send/receive buffer. Default 4 MiB (+15% bulk throughput
    /// over the kernel default in our measurements).
    pub udp_buffer: usize,
}

impl Default for QuicSettings {
    fn default() -> Self {
        QuicSettings {
            keepalive: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(30),
            stream_window: 512 * 1024,
            connection_window: 8 * 1024 * 1024,
            send_window: 8 * 1024 * 1024,
            ack_every: 10,
            max_streams: 8192,
            stall_budget: 64 * 1024 * 1024,
            udp_buffer: 4 * 1024 * 1024,
        }
    }
}

/// Why an endpoint could not be created.
#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    #[error("TLS configuration is not usable for QUIC: {0}")]
    Tls(String),
    #[error("idle timeout {0:?} is out of range")]
    IdleTimeout(Duration),
    #[error("cannot bind UDP {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

impl QuicSettings {
    /// `accepts_streams`: whether this end accepts the per-connection
    /// streams (the agent) or only the one control stream (the server).
    fn transport(&self, accepts_streams: bool) -> Result<TransportConfig, EndpointError> {
        let mut t = TransportConfig::default();
        let idle = IdleTimeout::try_from(self.idle_timeout)
            .map_err(|_| EndpointError::IdleTimeout(self.idle_timeout))?;
        t.max_idle_timeout(Some(idle));
        t.keep_alive_interval(Some(self.keepalive));
        t.stream_receive_window(VarInt::from_u32(self.stream_window));
        t.receive_window(VarInt::from_u32(self.connection_window));
        t.send_window(u64::from(self.send_window));
        if self.ack_every > 1 {
            let mut ack = quinn::AckFrequencyConfig::default();
            ack.ack_eliciting_threshold(VarInt::from_u32(self.ack_every - 1));
            t.ack_frequency_config(Some(ack));
        }
        let bidi = if accepts_streams { self.max_streams } else { 1 };
        t.max_concurrent_bidi_streams(VarInt::from_u32(bidi));
        t.max_concurrent_uni_streams(VarInt::from_u32(0));
        Ok(t)
    }

    /// The server endpoint that agents dial.
    ///
    /// `reset_secret` (the server's private key) seeds the stateless-reset
    /// key, so a server that crashed and restarted with the same
    /// certificate can tell agents at once that their old connection is
    /// gone (a valid stateless reset) instead of leaving them to wait out
    /// the idle timeout.
    pub fn server_endpoint(
        &self,
        addr: SocketAddr,
        tls: rustls::ServerConfig,
        reset_secret: &[u8],
    ) -> Result<Endpoint, EndpointError> {
        let crypto = QuicServerConfig::try_from(Arc::new(tls))
            .map_err(|e| EndpointError::Tls(e.to_string()))?;
        let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
        config.transport_config(Arc::new(self.transport(false)?));
        // The agent's address is proven by the handshake itself; skip the
        // extra Retry round trip unless under attack (quinn's default).
        let socket = crate::net::bind_udp(addr, self.udp_buffer)
            .map_err(|source| EndpointError::Bind { addr, source })?;
        let mut seed = ring::digest::Context::new(&ring::digest::SHA256);
        seed.update(b"edge-tunnel stateless reset key v1");
        seed.update(reset_secret);
        let seed = seed.finish();
        let reset_key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, seed.as_ref());
        let mut endpoint_config = EndpointConfig::new(Arc::new(reset_key));
        // quinn drops (without a reset) packets whose connection id was not
        // made by this generator's key: keep that key stable as well.
        let cid_key =
            u64::from_le_bytes(seed.as_ref()[..8].try_into().expect("SHA-256 is 32 bytes"));
        endpoint_config.cid_generator(move || {
            Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid_key))
        });
        Endpoint::new(
            endpoint_config,
            Some(config),
            socket,
            Arc::new(TokioRuntime),
        )
        .map_err(|source| EndpointError::Bind { addr, source })
    }

    /// A client endpoint for an agent, bound to `bind` (port 0: ephemeral).
    /// Connections pass their own [`Self::client_config`], so certificates
    /// can be reloaded for every connect.
    pub fn client_endpoint(&self, bind: SocketAddr) -> Result<Endpoint, EndpointError> {
        let socket = crate::net::bind_udp(bind, self.udp_buffer)
            .map_err(|source| EndpointError::Bind { addr: bind, source })?;
        Endpoint::new(
            EndpointConfig::default(),
            None,
            socket,
            Arc::new(TokioRuntime),
        )
        .map_err(|source| EndpointError::Bind { addr: bind, source })
    }

    /// QUIC client configuration for an agent connection.
    pub fn client_config(
        &self,
        tls: rustls::ClientConfig,
    ) -> Result<quinn::ClientConfig, EndpointError> {
        let crypto = QuicClientConfig::try_from(Arc::new(tls))
            .map_err(|e| EndpointError::Tls(e.to_string()))?;
        let mut config = quinn::ClientConfig::new(Arc::new(crypto));
        config.transport_config(Arc::new(self.transport(true)?));
        Ok(config)
    }
}

/// Connection receive credit lent to stalled streams, process-wide.
static STALL_LENT: AtomicU64 = AtomicU64::new(0);

/// Bytes of connection receive window currently lent to stalled streams by
/// this process.
pub fn stall_credit_lent() -> u64 {
    STALL_LENT.load(Ordering::Relaxed)
}

/// Keeps stalled streams from starving the rest of their connection.
///
/// QUIC flow control has two levels: each stream may have `stream_window`
/// bytes unread, and all streams of a connection together
/// `connection_window`. Data a stream's reader has not taken still counts
/// against the connection, so a few streams whose TCP client stopped
/// reading (a `kubectl logs` to a stuck terminal) would use up the
/// connection's credit and stall every other stream, new ones included:
/// head-of-line blocking by flow control, with 16 such streams at the
/// defaults.
///
/// The relay reports a stream as stalled when its TCP write has been
/// blocked for [`crate::relay::STALL_AFTER`]; this widens the connection's
/// receive window by one stream window for as long as it stays stalled
/// (that is the most it can hold), so the others keep the whole base
/// window. What all connections of the process may borrow is capped by
/// [`QuicSettings::stall_budget`]; past it, stalled streams share the base
/// window as before.
#[derive(Clone)]
pub struct StallCredit(Arc<StallInner>);

struct StallInner {
    conn: quinn::Connection,
    base: u64,
    per_stream: u64,
    budget: u64,
    /// Streams of this connection holding lent credit.
    stalled: Mutex<u64>,
}

impl StallCredit {
    pub fn new(conn: &quinn::Connection, settings: &QuicSettings) -> Self {
        StallCredit(Arc::new(StallInner {
            conn: conn.clone(),
            base: u64::from(settings.connection_window),
            per_stream: u64::from(settings.stream_window),
            budget: settings.stall_budget,
            stalled: Mutex::new(0),
        }))
    }

    /// A stream stopped taking data: lend it credit until the guard drops.
    pub fn stall(&self) -> StallGuard {
        let inner = &self.0;
        let lent = STALL_LENT.fetch_add(inner.per_stream, Ordering::Relaxed);
        if lent + inner.per_stream > inner.budget {
            STALL_LENT.fetch_sub(inner.per_stream, Ordering::Relaxed);
            tracing::debug!(
                budget = inner.budget,
                "stall budget spent; the stream shares the connection window"
            );
            return StallGuard(None);
        }
        self.adjust(1);
        StallGuard(Some(self.clone()))
    }

    /// Connection streams currently holding lent credit.
    pub fn stalled_streams(&self) -> u64 {
        *self.0.stalled.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn adjust(&self, delta: i64) {
        let inner = &self.0;
        // Under the lock, so concurrent stalls and resumes set the window
        // in the order they counted.
        let mut stalled = inner.stalled.lock().unwrap_or_else(|e| e.into_inner());
        *stalled = stalled.saturating_add_signed(delta);
        let window = inner.base + *stalled * inner.per_stream;
        inner
            .conn
            .set_receive_window(VarInt::from_u64(window).unwrap_or(VarInt::MAX));
    }
}

/// Held while a stream is stalled; gives the credit back when dropped.
pub struct StallGuard(Option<StallCredit>);

impl Drop for StallGuard {
    fn drop(&mut self) {
        if let Some(credit) = self.0.take() {
            credit.adjust(-1);
            STALL_LENT.fetch_sub(credit.0.per_stream, Ordering::Relaxed);
        }
    }
}
