//! QUIC endpoints shared by server and agent.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{Endpoint, EndpointConfig, IdleTimeout, TokioRuntime, TransportConfig, VarInt};

use crate::stream::StreamOrder;

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
    /// for ~80 Mbit/s at 50 ms RTT on one stream, and an eighth of the
    /// connection window: it takes 8 stalled readers to use up the credit
    /// new streams need for their `Dial` before the stall credit
    /// (`crate::window`) widens the connection's window for each.
    pub stream_window: u32,
    /// Per-connection receive window across all streams: the worst-case
    /// buffered memory per agent connection. Default 4 MiB (~670 Mbit/s
    /// at 50 ms RTT across all streams): 8 MiB held the agent's peak in
    /// the 1,000-connection echo at 52-57 MiB, 4 MiB at 45-47 MiB, with
    /// the same echo time (`benches/RESULTS.md`). What a busy connection
    /// holds received is this window plus the credit lent to stalled
    /// streams; quinn's GRO batches sharing one buffer add little to it
    /// (one buffer per datagram, measured, lowered no peak:
    /// `benches/RESULTS.md`).
    pub connection_window: u32,
    /// Data written but not yet acknowledged, across all streams of one
    /// connection: the worst-case send-buffer memory per connection.
    /// Default 4 MiB (~670 Mbit/s at 50 ms RTT).
    pub send_window: u32,
    /// Packets the peer may receive before it must acknowledge (QUIC's
    /// ACK-frequency extension asks for it). Default 4: a tunneled
    /// connection's request/response and FINs take a few packets each
    /// way, and at QUIC's own 2 every second one drew an ACK-only packet
    /// the next data packet could have carried: 15% more new connections
    /// per second at concurrency 1 (benches/RESULTS.md, twelfth slice).
    /// Above the congestion controller's minimum window it stalls the
    /// sender, so what an end asks for is capped at that window (BBR's is
    /// 4); see [`Self::ack_every`].
    pub ack_every: u32,
    /// Streams the server may have open to one agent at once. Default 8192.
    /// The agent grants [`FIRST_STREAM_LIMIT`] at first and raises the
    /// grant toward this as streams fill it ([`StreamLimit`]): quinn keeps
    /// state for every stream it grants, ~110 bytes each before any opens.
    pub max_streams: u32,
    /// UDP socket send/receive buffer: kernel memory per endpoint.
    /// Default 4 MiB, so bursts of GSO batches are not dropped at the
    /// socket (measured against the kernel default in `benches/RESULTS.md`).
    pub udp_buffer: usize,
    /// Connection attempts (first Initials) quinn holds on a server
    /// endpoint before the accept loop has decided on them; past it quinn
    /// drops new Initials unanswered. Default 1024 (quinn's is 65,536);
    /// the server sets it to its handshake cap. The accept loop decides
    /// at once, so this fills only when that loop is starved.
    pub max_incoming: usize,
    /// Bytes quinn buffers for one undecided connection attempt beyond its
    /// first packet (more Initials of a large ClientHello, 0-RTT). Default
    /// 64 KiB (quinn's is 10 MiB); agents send no 0-RTT.
    pub incoming_buffer: u64,
    /// The same, all undecided attempts together. Default 16 MiB (quinn's
    /// is 100 MiB).
    pub incoming_buffer_total: u64,
    /// The congestion controller of data this end sends. Default BBR:
    /// next to a bulk download at 50 Mbit/s and 1% loss it kept a 64-byte
    /// ping-pong at ~0.2 ms p50 where CUBIC, filling the bottleneck
    /// queue, made it ~9 ms; clean-path bulk and latency were the same
    /// (`benches/RESULTS.md`).
    pub congestion: Congestion,
    /// How a connection orders its streams' queued data: the relays of
    /// this end set their streams' priorities by it
    /// ([`crate::RelayLimits::order`]). Default least-served (see
    /// [`StreamOrder`]).
    pub stream_order: StreamOrder,
}

/// A QUIC congestion controller (quinn's).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Congestion {
    /// Loss-based (RFC 9438): fills the bottleneck queue until a loss.
    Cubic,
    /// Model-based (BBR v1, quinn's): paces to the measured bandwidth and
    /// keeps the queue short, so an interactive stream next to a bulk one
    /// waits less; random loss does not halve its rate.
    #[default]
    Bbr,
    /// Loss-based, the RFC 9002 reference.
    NewReno,
}

impl Congestion {
    /// The fewest packets the controller lets this end have in flight,
    /// however little it has measured: quinn's minimum congestion window
    /// (BBR four packets, CUBIC and NewReno two, as in RFC 9002).
    pub fn min_window_packets(self) -> u32 {
        match self {
            Congestion::Bbr => 4,
            Congestion::Cubic | Congestion::NewReno => 2,
        }
    }
}

impl std::str::FromStr for Congestion {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "cubic" => Ok(Congestion::Cubic),
            "bbr" => Ok(Congestion::Bbr),
            "new-reno" | "newreno" => Ok(Congestion::NewReno),
            other => Err(format!(
                "{other:?} is not a congestion controller: cubic, bbr or new-reno"
            )),
        }
    }
}

impl Default for QuicSettings {
    fn default() -> Self {
        QuicSettings {
            keepalive: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(30),
            stream_window: 512 * 1024,
            connection_window: 4 * 1024 * 1024,
            send_window: 4 * 1024 * 1024,
            ack_every: 4,
            max_streams: 8192,
            udp_buffer: 4 * 1024 * 1024,
            max_incoming: 1024,
            incoming_buffer: 64 * 1024,
            incoming_buffer_total: 16 * 1024 * 1024,
            congestion: Congestion::default(),
            stream_order: StreamOrder::default(),
        }
    }
}

/// The concurrent streams an agent grants its server on a new connection.
/// quinn allocates the state of every stream it grants when it grants it
/// (two hash-map entries each): granting 8,192 at once held 0.9 MiB per
/// connection before a single stream opened, an eighth of an idle agent.
pub const FIRST_STREAM_LIMIT: u32 = 256;

/// The stream limit an agent grants one connection: [`FIRST_STREAM_LIMIT`],
/// raised fourfold whenever half of it is open, up to `max_streams`. It
/// is never lowered (quinn keeps what it has allocated), so a connection
/// that once had a burst keeps the room for the next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamLimit {
    granted: u32,
    max: u32,
}

impl StreamLimit {
    pub fn new(max: u32) -> Self {
        StreamLimit {
            granted: max.min(FIRST_STREAM_LIMIT),
            max,
        }
    }

    /// What is granted now.
    pub fn granted(&self) -> u32 {
        self.granted
    }

    /// With `open` streams open: the new grant, if it should grow. Raised
    /// at half, the server learns of the new limit (one MAX_STREAMS frame)
    /// while it still has the other half to open.
    pub fn grow(&mut self, open: usize) -> Option<u32> {
        let half = usize::try_from(self.granted / 2).unwrap_or(usize::MAX);
        if self.granted >= self.max || open < half.max(1) {
            return None;
        }
        self.granted = self.granted.saturating_mul(4).min(self.max);
        Some(self.granted)
    }
}

/// Why QUIC settings cannot work.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QuicSettingsError {
    #[error("the keep-alive interval must be above zero")]
    ZeroKeepalive,
    #[error(
        "the idle timeout ({}) must be longer than the keep-alive interval ({}), \
         or an idle connection dies between two keep-alives",
        humantime::format_duration(*.idle),
        humantime::format_duration(*.keepalive)
    )]
    IdleNotAboveKeepalive { keepalive: Duration, idle: Duration },
    #[error("the idle timeout {0:?} is longer than QUIC can express")]
    IdleTooLong(Duration),
    #[error(
        "the stream window ({stream} bytes) is larger than the connection window \
         ({connection} bytes): one stalled stream could hold all of its connection's credit"
    )]
    StreamWindowAboveConnection { stream: u32, connection: u32 },
}

impl QuicSettings {
    /// Checks what the endpoints would otherwise reject at run time or
    /// get wrong silently: a keep-alive that is zero or not shorter than
    /// the idle timeout (the connection would time out while idle). Both
    /// binaries call this when they build their configuration.
    pub fn validate(&self) -> Result<(), QuicSettingsError> {
        if self.keepalive.is_zero() {
            return Err(QuicSettingsError::ZeroKeepalive);
        }
        if self.idle_timeout <= self.keepalive {
            return Err(QuicSettingsError::IdleNotAboveKeepalive {
                keepalive: self.keepalive,
                idle: self.idle_timeout,
            });
        }
        IdleTimeout::try_from(self.idle_timeout)
            .map_err(|_| QuicSettingsError::IdleTooLong(self.idle_timeout))?;
        if self.stream_window > self.connection_window {
            return Err(QuicSettingsError::StreamWindowAboveConnection {
                stream: self.stream_window,
                connection: self.connection_window,
            });
        }
        Ok(())
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
    /// The ACK frequency this end asks of its peer: an ACK every this many
    /// packets it sends. Never more than its controller's minimum window:
    /// a sender held at that window, asking for fewer ACKs than it can
    /// have in flight, gets one ACK per `max_ack_delay` (25 ms) instead of
    /// one per round trip, and BBR, whose rate estimate comes from those
    /// ACKs, keeps the window there. Asking for an ACK every 10 packets
    /// (the default until 2026-12-05), a server whose estimate came from
    /// small exchanges moved 6 packets per 25 ms for 10-20 s, and a burst
    /// of 1,000 new connections saw up to 97% of its dials time out
    /// (benches/RESULTS.md).
    pub fn ack_every(&self) -> u32 {
        // Two, QUIC's default, is the least an end can ask for.
        self.ack_every
            .clamp(2, self.congestion.min_window_packets())
    }

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
        let ack_every = self.ack_every();
        if ack_every > 2 {
            // The peer acknowledges once more than the threshold arrived;
            // QUIC's default (every second packet) needs no request.
            let mut ack = quinn::AckFrequencyConfig::default();
            ack.ack_eliciting_threshold(VarInt::from_u32(ack_every - 1));
            t.ack_frequency_config(Some(ack));
        }
        match self.congestion {
            Congestion::Cubic => {}
            Congestion::Bbr => {
                t.congestion_controller_factory(Arc::new(quinn::congestion::BbrConfig::default()));
            }
            Congestion::NewReno => {
                t.congestion_controller_factory(Arc::new(
                    quinn::congestion::NewRenoConfig::default(),
                ));
            }
        }
        let bidi = if accepts_streams {
            StreamLimit::new(self.max_streams).granted()
        } else {
            1
        };
        t.max_concurrent_bidi_streams(VarInt::from_u32(bidi));
        t.max_concurrent_uni_streams(VarInt::from_u32(0));
        Ok(t)
    }

    /// The server endpoint that agents dial.
    ///
    /// `reset_secret` (the server's private key) seeds the stateless-reset
    /// key and the connection-id key (separate HKDF subkeys,
    /// `EndpointKeys`), so a server that crashed and restarted with the
    /// same certificate can tell agents at once that their old connection
    /// is gone (a valid stateless reset) instead of leaving them to wait
    /// out the idle timeout.
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
        // quinn never sends a Retry on its own: the server's accept loop
        // decides per connection attempt (`Incoming::retry`) once many
        // handshakes are in flight. These bound what quinn holds before
        // that decision.
        config.max_incoming(self.max_incoming);
        config.incoming_buffer_size(self.incoming_buffer);
        config.incoming_buffer_size_total(self.incoming_buffer_total);
        let socket = crate::net::bind_udp(addr, self.udp_buffer)
            .map_err(|source| EndpointError::Bind { addr, source })?;
        let keys = EndpointKeys::derive(reset_secret);
        let reset_key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &keys.reset);
        let mut endpoint_config = EndpointConfig::new(Arc::new(reset_key));
        // quinn drops (without a reset) packets whose connection id was not
        // made by this generator's key: keep that key stable as well.
        let cid_key = keys.cid;
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

/// The server endpoint's stable keys, derived from its private key with
/// HKDF-SHA256 under one label each, so that neither key says anything
/// about the other (the connection-id key's hash is visible to anyone who
/// sees connection ids; it must not be the first bytes of the reset key).
struct EndpointKeys {
    /// HMAC key that makes stateless-reset tokens.
    reset: [u8; 32],
    /// Key of the connection-id generator.
    cid: u64,
}

impl EndpointKeys {
    const SALT: &'static [u8] = b"edge-tunnel endpoint keys v2";
    const RESET_LABEL: &'static [u8] = b"stateless reset";
    const CID_LABEL: &'static [u8] = b"connection id";

    fn derive(secret: &[u8]) -> Self {
        struct Len(usize);
        impl ring::hkdf::KeyType for Len {
            fn len(&self) -> usize {
                self.0
            }
        }
        let prk = ring::hkdf::Salt::new(ring::hkdf::HKDF_SHA256, Self::SALT).extract(secret);
        let expand = |label: &[u8], out: &mut [u8]| {
            let info = [label];
            prk.expand(&info, Len(out.len()))
                .and_then(|okm| okm.fill(out))
                .expect("32 bytes or less is within HKDF-SHA256's output limit");
        };
        let mut reset = [0u8; 32];
        expand(Self::RESET_LABEL, &mut reset);
        let mut cid = [0u8; 8];
        expand(Self::CID_LABEL, &mut cid);
        EndpointKeys {
            reset,
            cid: u64::from_le_bytes(cid),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_keys_are_stable_and_independent() {
        let a = EndpointKeys::derive(b"server private key");
        let again = EndpointKeys::derive(b"server private key");
        // Stable across restarts with the same key...
        assert_eq!((a.reset, a.cid), (again.reset, again.cid));
        // ...different for another key...
        let b = EndpointKeys::derive(b"another private key");
        assert_ne!(a.reset, b.reset);
        assert_ne!(a.cid, b.cid);
        // ...and the connection-id key is no slice of the reset key.
        for window in a.reset.windows(8) {
            assert_ne!(u64::from_le_bytes(window.try_into().unwrap()), a.cid);
        }
    }

    #[test]
    fn the_stream_grant_starts_small_and_grows_fourfold_at_half_to_the_maximum() {
        let mut limit = StreamLimit::new(8192);
        assert_eq!(limit.granted(), FIRST_STREAM_LIMIT);
        assert_eq!(limit.grow(0), None);
        assert_eq!(limit.grow(127), None, "under half of 256");
        assert_eq!(limit.grow(128), Some(1024));
        assert_eq!(limit.grow(128), None, "granted, no shrinking");
        assert_eq!(limit.grow(511), None);
        assert_eq!(limit.grow(512), Some(4096));
        assert_eq!(limit.grow(2048), Some(8192), "capped at the maximum");
        assert_eq!(limit.grow(8192), None);
        assert_eq!(limit.granted(), 8192);
        // A maximum below the first grant (few descriptors) is granted at once.
        let mut small = StreamLimit::new(100);
        assert_eq!(small.granted(), 100);
        assert_eq!(small.grow(100), None);
        // A grant of one grows at its first open stream, not at "half" (0).
        let mut tiny = StreamLimit { granted: 1, max: 3 };
        assert_eq!(tiny.grow(0), None);
        assert_eq!(tiny.grow(1), Some(3));
    }

    #[test]
    fn a_stream_window_above_the_connection_window_is_refused() {
        let mut settings = QuicSettings {
            stream_window: 4 << 20,
            connection_window: 2 << 20,
            ..QuicSettings::default()
        };
        let e = settings.validate().unwrap_err();
        assert_eq!(
            e,
            QuicSettingsError::StreamWindowAboveConnection {
                stream: 4 << 20,
                connection: 2 << 20
            }
        );
        assert!(e.to_string().contains("stream window"), "{e}");
        settings.connection_window = 4 << 20;
        assert_eq!(settings.validate(), Ok(()));
    }

    #[test]
    fn an_agent_endpoint_grants_the_first_limit_and_a_server_one_stream() {
        let settings = QuicSettings::default();
        let agent = format!("{:?}", settings.transport(true).unwrap());
        let server = format!("{:?}", settings.transport(false).unwrap());
        assert!(
            agent.contains("max_concurrent_bidi_streams: 256"),
            "{agent}"
        );
        assert!(
            server.contains("max_concurrent_bidi_streams: 1,"),
            "{server}"
        );
    }

    #[test]
    fn stream_orders_parse_and_name_the_choices() {
        assert_eq!(
            QuicSettings::default().stream_order,
            StreamOrder::LeastServed
        );
        assert_eq!("round-robin".parse(), Ok(StreamOrder::RoundRobin));
        assert_eq!("least-served".parse(), Ok(StreamOrder::LeastServed));
        let e = "fair".parse::<StreamOrder>().unwrap_err();
        assert!(e.contains("least-served or round-robin"), "{e}");
    }

    /// The smallest window, in packets, quinn's controller falls to.
    fn floor_packets(congestion: Congestion) -> u64 {
        use quinn::congestion::{BbrConfig, ControllerFactory, CubicConfig, NewRenoConfig};
        const MTU: u16 = 1452;
        let now = std::time::Instant::now();
        let window = match congestion {
            // BBR raises a window below its floor to the floor whenever it
            // sets one (here: learning the path MTU); start it at one byte.
            Congestion::Bbr => {
                let mut config = BbrConfig::default();
                config.initial_window(1);
                let mut c = Arc::new(config).build(now, MTU);
                c.on_mtu_update(MTU);
                c.window()
            }
            // The loss-based ones fall to theirs on persistent congestion.
            Congestion::Cubic | Congestion::NewReno => {
                let mut c = match congestion {
                    Congestion::Cubic => Arc::new(CubicConfig::default()).build(now, MTU),
                    _ => Arc::new(NewRenoConfig::default()).build(now, MTU),
                };
                // A loss of a packet sent after the controller started.
                let later = now + Duration::from_millis(1);
                c.on_congestion_event(later, later, true, 1 << 20);
                c.window()
            }
        };
        window / u64::from(MTU)
    }

    #[test]
    fn every_end_is_acknowledged_within_its_smallest_window() {
        for congestion in [Congestion::Bbr, Congestion::Cubic, Congestion::NewReno] {
            let floor = floor_packets(congestion);
            assert_eq!(
                floor,
                u64::from(congestion.min_window_packets()),
                "{congestion:?}: quinn's floor moved"
            );
            for ack_every in [0, 1, 2, 4, 10, 64] {
                let s = QuicSettings {
                    congestion,
                    ack_every,
                    ..QuicSettings::default()
                };
                assert!(
                    (2..=floor).contains(&u64::from(s.ack_every())),
                    "{congestion:?} ack_every {ack_every}: asks for {}",
                    s.ack_every()
                );
            }
        }
        // The default asks for an ACK every fourth packet, BBR's floor.
        assert_eq!(QuicSettings::default().ack_every(), 4);
        assert_eq!(
            QuicSettings {
                congestion: Congestion::Cubic,
                ..QuicSettings::default()
            }
            .ack_every(),
            2
        );
    }

    #[test]
    fn defaults_are_valid() {
        QuicSettings::default().validate().unwrap();
    }

    #[test]
    fn idle_timeout_must_exceed_the_keepalive() {
        let mut s = QuicSettings {
            keepalive: Duration::from_secs(30),
            ..QuicSettings::default()
        };
        let e = s.validate().unwrap_err();
        assert_eq!(
            e.to_string(),
            "the idle timeout (30s) must be longer than the keep-alive interval (30s), \
             or an idle connection dies between two keep-alives"
        );
        s.idle_timeout = Duration::from_secs(31);
        s.validate().unwrap();
        s.keepalive = Duration::ZERO;
        assert_eq!(s.validate(), Err(QuicSettingsError::ZeroKeepalive));
    }
}
