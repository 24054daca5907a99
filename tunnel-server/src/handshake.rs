//! The unauthenticated part of an agent connection: from a peer's first
//! packet to a finished mutual-TLS handshake, on either listener.
//!
//! Until the handshake finishes the peer is nobody, so everything it can
//! make the server hold is bounded here ([`HandshakeGate`]): how many
//! handshakes are in flight, how many from one source, how long one may
//! take. Every limit hit and every failure is counted
//! (`edge_tunnel_handshakes_limited_total`,
//! `edge_tunnel_handshake_failures_total`), and logged at WARN at most once
//! per [`LogThrottle::INTERVAL`] with the count held back.

use std::future::IntoFuture;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};

use crate::admission::{Admission, HandshakeAdmission, HandshakeLimits, Limit};
use crate::log_throttle::LogThrottle;
use crate::metrics::Metrics;

/// The listener a handshake arrived on.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Listener {
    Quic,
    /// TLS over TCP, for HTTP/2.
    H2,
}

impl EncodeLabelValue for Listener {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        let label = match self {
            Listener::Quic => "quic",
            Listener::H2 => "h2",
        };
        std::fmt::Write::write_str(encoder, label)
    }
}

/// What happened to a handshake that ran into a limit.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Action {
    /// QUIC Retry sent: the source must prove its address.
    Retry,
    /// QUIC Initial dropped without an answer.
    Ignore,
    /// TCP connection closed before TLS.
    Close,
    /// Admitted at the cap: the oldest handshake of the source holding
    /// the most was dropped for it.
    Evict,
}

impl EncodeLabelValue for Action {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        let label = match self {
            Action::Retry => "retry",
            Action::Ignore => "ignore",
            Action::Close => "close",
            Action::Evict => "evict",
        };
        std::fmt::Write::write_str(encoder, label)
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ListenerLabel {
    pub transport: Listener,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LimitedLabel {
    pub transport: Listener,
    pub limit: Limit,
    pub action: Action,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FailureLabel {
    pub transport: Listener,
    pub reason: FailureReason,
}

/// Why a handshake did not finish, as counted.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum FailureReason {
    /// Not finished within the handshake timeout (or QUIC's idle timeout).
    Timeout,
    /// TLS refused it: no or a bad client certificate, no common ALPN or
    /// cipher suite, a malformed ClientHello.
    Tls,
    /// The peer closed or reset the connection first.
    PeerClosed,
    /// A QUIC protocol violation other than TLS, or an unsupported version.
    Protocol,
    /// A socket error, or the endpoint closing.
    Io,
    /// Dropped at the handshake cap for a source holding fewer.
    Evicted,
}

impl FailureReason {
    pub fn label(self) -> &'static str {
        match self {
            FailureReason::Timeout => "timeout",
            FailureReason::Tls => "tls",
            FailureReason::PeerClosed => "peer_closed",
            FailureReason::Protocol => "protocol",
            FailureReason::Io => "io",
            FailureReason::Evicted => "evicted",
        }
    }
}

impl EncodeLabelValue for FailureReason {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        std::fmt::Write::write_str(encoder, self.label())
    }
}

/// A handshake that did not finish.
#[derive(Debug, thiserror::Error)]
#[error("handshake failed ({}): {detail}", .reason.label())]
pub struct HandshakeFailure {
    pub reason: FailureReason,
    pub detail: String,
}

impl HandshakeFailure {
    fn timeout(after: Duration) -> Self {
        HandshakeFailure {
            reason: FailureReason::Timeout,
            detail: format!("not finished within {after:?}"),
        }
    }

    fn evicted() -> Self {
        HandshakeFailure {
            reason: FailureReason::Evicted,
            detail: "dropped at the handshake cap: its source held the most handshakes \
                     in flight, and a source holding fewer took its slot"
                .to_owned(),
        }
    }
}

impl From<quinn::ConnectionError> for HandshakeFailure {
    fn from(e: quinn::ConnectionError) -> Self {
        use quinn::ConnectionError as E;
        let is_crypto = |code: quinn::TransportErrorCode| (0x100..0x200).contains(&u64::from(code));
        let reason = match &e {
            E::TimedOut => FailureReason::Timeout,
            E::TransportError(t) if is_crypto(t.code) => FailureReason::Tls,
            E::ConnectionClosed(c) if is_crypto(c.error_code) => FailureReason::Tls,
            E::TransportError(_) | E::VersionMismatch => FailureReason::Protocol,
            E::ConnectionClosed(_) | E::ApplicationClosed(_) | E::Reset => {
                FailureReason::PeerClosed
            }
            E::LocallyClosed | E::CidsExhausted => FailureReason::Io,
        };
        HandshakeFailure {
            reason,
            detail: e.to_string(),
        }
    }
}

impl From<std::io::Error> for HandshakeFailure {
    /// A TLS-over-TCP accept error (tokio-rustls reports TLS errors as
    /// `InvalidData`).
    fn from(e: std::io::Error) -> Self {
        use std::io::ErrorKind as K;
        let reason = match e.kind() {
            K::InvalidData => FailureReason::Tls,
            K::UnexpectedEof | K::ConnectionReset | K::ConnectionAborted | K::BrokenPipe => {
                FailureReason::PeerClosed
            }
            K::TimedOut => FailureReason::Timeout,
            _ => FailureReason::Io,
        };
        HandshakeFailure {
            reason,
            detail: e.to_string(),
        }
    }
}

/// The limits of one listener's handshakes, and their accounting.
#[derive(Debug)]
pub struct HandshakeGate {
    listener: Listener,
    admission: Arc<HandshakeAdmission>,
    timeout: Duration,
    limit_log: LogThrottle,
    failure_log: LogThrottle,
}

impl HandshakeGate {
    pub fn new(listener: Listener, limits: HandshakeLimits, timeout: Duration) -> Self {
        HandshakeGate {
            listener,
            admission: HandshakeAdmission::new(limits),
            timeout,
            limit_log: LogThrottle::default(),
            failure_log: LogThrottle::default(),
        }
    }

    pub fn admission(&self) -> &HandshakeAdmission {
        &self.admission
    }

    /// Decides on a handshake from `remote` and counts a limit hit. The
    /// caller carries the decision out (QUIC: accept, retry or ignore the
    /// `Incoming`; TCP: start TLS or close). An admission at the cap that
    /// evicted another source's handshake is counted as `evict`.
    pub fn admit(&self, metrics: &Metrics, remote: SocketAddr, validated: bool) -> Admission {
        let admission = self.admission.admit(remote.ip(), validated);
        let mut evicted_from = None;
        let (limit, action) = match &admission {
            Admission::Admit(permit) => match permit.displaced() {
                None => return admission,
                Some(source) => {
                    evicted_from = Some(source);
                    (Limit::MaxInFlight, Action::Evict)
                }
            },
            Admission::Retry(limit) => (*limit, Action::Retry),
            Admission::Shed(limit) => (
                *limit,
                match self.listener {
                    Listener::Quic => Action::Ignore,
                    Listener::H2 => Action::Close,
                },
            ),
        };
        metrics
            .handshakes_limited
            .get_or_create(&LimitedLabel {
                transport: self.listener,
                limit,
                action,
            })
            .inc();
        match self.limit_log.admit(Instant::now()) {
            Some(held_back) => tracing::warn!(
                transport = ?self.listener,
                %remote,
                limit = limit.label(),
                ?action,
                ?evicted_from,
                in_flight = self.admission.in_flight(),
                held_back,
                "agent handshake limit reached (one warning per {:?}; \
                 edge_tunnel_handshakes_limited_total counts them all)",
                LogThrottle::INTERVAL
            ),
            None => {
                tracing::debug!(%remote, limit = limit.label(), ?action, ?evicted_from, "agent handshake limited")
            }
        }
        admission
    }

    /// Runs an admitted handshake under the handshake timeout, until it
    /// finishes or its slot is taken (see [`HandshakeAdmission::admit`]);
    /// counts and logs its failure. The permit is released when this
    /// returns; the handshake, dropped unfinished, closes.
    pub async fn run<T, E>(
        &self,
        metrics: &Metrics,
        mut permit: crate::admission::Permit,
        handshake: impl IntoFuture<Output = Result<T, E>>,
    ) -> Result<T, HandshakeFailure>
    where
        E: Into<HandshakeFailure>,
    {
        let bounded = tokio::time::timeout(self.timeout, handshake.into_future());
        let result = tokio::select! {
            // A handshake finished in the same instant keeps its result.
            biased;
            done = bounded => match done {
                Ok(Ok(v)) => return Ok(v),
                Ok(Err(e)) => e.into(),
                Err(_) => HandshakeFailure::timeout(self.timeout),
            },
            () = permit.evicted() => HandshakeFailure::evicted(),
        };
        self.failed(metrics, &result);
        Err(result)
    }

    fn failed(&self, metrics: &Metrics, failure: &HandshakeFailure) {
        metrics
            .handshake_failures
            .get_or_create(&FailureLabel {
                transport: self.listener,
                reason: failure.reason,
            })
            .inc();
        match self.failure_log.admit(Instant::now()) {
            Some(held_back) => tracing::warn!(
                held_back,
                "agent {failure} (one warning per {:?}; \
                 edge_tunnel_handshake_failures_total counts them all)",
                LogThrottle::INTERVAL
            ),
            None => tracing::debug!("agent {failure}"),
        }
    }

    /// Brings the in-flight gauge up to date (at scrape time).
    pub fn export(&self, metrics: &Metrics) {
        let n = i64::try_from(self.admission.in_flight()).unwrap_or(i64::MAX);
        metrics
            .handshakes_in_flight
            .get_or_create(&ListenerLabel {
                transport: self.listener,
            })
            .set(n);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gate(limits: HandshakeLimits) -> HandshakeGate {
        HandshakeGate::new(Listener::Quic, limits, Duration::from_secs(5))
    }

    fn remote(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn a_handshake_that_never_finishes_times_out_and_frees_its_slot() {
        let metrics = Metrics::new();
        let g = gate(HandshakeLimits::default());
        let Admission::Admit(permit) = g.admit(&metrics, remote("192.0.2.1:4000"), true) else {
            panic!("admitted");
        };
        assert_eq!(g.admission().in_flight(), 1);
        let never = std::future::pending::<Result<(), std::io::Error>>();
        let e = g.run(&metrics, permit, never).await.unwrap_err();
        assert_eq!(e.reason, FailureReason::Timeout);
        assert_eq!(g.admission().in_flight(), 0);
        g.export(&metrics);
        let text = metrics.render();
        assert!(
            text.contains(
                "edge_tunnel_handshake_failures_total{transport=\"quic\",reason=\"timeout\"} 1"
            ),
            "{text}"
        );
        assert!(text.contains("edge_tunnel_handshakes_in_flight{transport=\"quic\"} 0"));
    }

    #[tokio::test(start_paused = true)]
    async fn an_evicted_handshake_is_dropped_and_counted() {
        let metrics = Arc::new(Metrics::new());
        let g = Arc::new(gate(HandshakeLimits {
            max_in_flight: 2,
            retry_above: 2,
            per_source: 2,
        }));
        let mut running = Vec::new();
        for _ in 0..2 {
            let Admission::Admit(permit) = g.admit(&metrics, remote("192.0.2.1:4000"), true) else {
                panic!("admitted");
            };
            let (g, metrics) = (g.clone(), metrics.clone());
            running.push(tokio::spawn(async move {
                let never = std::future::pending::<Result<(), std::io::Error>>();
                g.run(&metrics, permit, never).await
            }));
        }
        tokio::task::yield_now().await;
        let Admission::Admit(_newcomer) = g.admit(&metrics, remote("192.0.2.2:4000"), true) else {
            panic!("admitted at the cap, in place of 192.0.2.1's oldest");
        };
        // The oldest ends at once, well before its timeout.
        let first = running.remove(0).await.unwrap().unwrap_err();
        assert_eq!(first.reason, FailureReason::Evicted);
        assert!(!running[0].is_finished());
        assert_eq!(g.admission().in_flight(), 2);
        let text = metrics.render();
        for series in [
            "edge_tunnel_handshakes_limited_total{transport=\"quic\",limit=\"max_in_flight\",action=\"evict\"} 1",
            "edge_tunnel_handshake_failures_total{transport=\"quic\",reason=\"evicted\"} 1",
        ] {
            assert!(text.contains(series), "{series} in {text}");
        }
    }

    #[test]
    fn limits_hit_are_counted_by_limit_and_action() {
        let metrics = Metrics::new();
        let g = gate(HandshakeLimits {
            max_in_flight: 2,
            retry_above: 1,
            per_source: 2,
        });
        let _p = g.admit(&metrics, remote("192.0.2.1:1"), false);
        assert!(matches!(
            g.admit(&metrics, remote("192.0.2.2:1"), false),
            Admission::Retry(Limit::RetryThreshold)
        ));
        let _q = g.admit(&metrics, remote("192.0.2.2:1"), true);
        assert!(matches!(
            g.admit(&metrics, remote("192.0.2.3:1"), true),
            Admission::Shed(Limit::MaxInFlight)
        ));
        let text = metrics.render();
        for series in [
            "edge_tunnel_handshakes_limited_total{transport=\"quic\",limit=\"retry_threshold\",action=\"retry\"} 1",
            "edge_tunnel_handshakes_limited_total{transport=\"quic\",limit=\"max_in_flight\",action=\"ignore\"} 1",
        ] {
            assert!(text.contains(series), "{series} in {text}");
        }
    }

    #[test]
    fn failures_are_classified() {
        let tls = std::io::Error::new(std::io::ErrorKind::InvalidData, "peer sent no certificates");
        assert_eq!(HandshakeFailure::from(tls).reason, FailureReason::Tls);
        let eof = std::io::Error::from(std::io::ErrorKind::UnexpectedEof);
        assert_eq!(
            HandshakeFailure::from(eof).reason,
            FailureReason::PeerClosed
        );
        // The agent refused the server's certificate (alert 42).
        let q = quinn::ConnectionError::ConnectionClosed(quinn::ConnectionClose {
            error_code: quinn::TransportErrorCode::crypto(42),
            frame_type: None,
            reason: bytes::Bytes::from_static(b"bad certificate"),
        });
        assert_eq!(HandshakeFailure::from(q).reason, FailureReason::Tls);
        assert_eq!(
            HandshakeFailure::from(quinn::ConnectionError::Reset).reason,
            FailureReason::PeerClosed
        );
        assert_eq!(
            HandshakeFailure::from(quinn::ConnectionError::TimedOut).reason,
            FailureReason::Timeout
        );
    }
}
