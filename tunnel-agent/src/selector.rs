//! Which transport the next connection attempt uses: QUIC, or HTTP/2 over
//! TLS where UDP does not get through.
//!
//! A pure state machine fed typed events (no I/O, no clocks, no error
//! text), so every rule has a unit test:
//! - a refusal, a TLS failure or a local problem never causes a fallback:
//!   HTTP/2 would meet the same answer;
//! - fall back only when QUIC got no answer *and* HTTP/2 then registers
//!   *and* QUIC, tried again at once beside the HTTP/2 connection, still
//!   gets no answer: a server that came back during the QUIC attempt (a
//!   rolling update) answers the second try, and the agent moves to QUIC
//!   without counting a fallback;
//! - when both fail, the next attempt starts with QUIC again;
//! - a QUIC connection that dies of idle timeout soon after registering
//!   (UDP filtered after the handshake) makes the next attempt start with
//!   HTTP/2;
//! - once on HTTP/2, QUIC is re-probed soon (seconds), then less often,
//!   up to the configured interval. A QUIC connection won back by a
//!   re-probe is on probation until it outlives the idle window: if it
//!   dies of idle timeout before, the re-probe counts as failed and the
//!   waits keep growing (no flapping every few seconds).

use std::fmt;
use std::time::Duration;

use prometheus_client::encoding::{EncodeLabelValue, LabelValueEncoder};

use crate::config::TransportChoice;

/// A transport one connection uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Transport {
    Quic,
    H2,
}

impl Transport {
    /// Stable lower-case name, for metrics and the admin API.
    pub fn label(self) -> &'static str {
        match self {
            Transport::Quic => "quic",
            Transport::H2 => "h2",
        }
    }
}

impl fmt::Display for Transport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Transport::Quic => "QUIC",
            Transport::H2 => "HTTP/2",
        })
    }
}

impl EncodeLabelValue for Transport {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), fmt::Error> {
        fmt::Write::write_str(encoder, self.label())
    }
}

/// What a failed connection attempt met; decides whether another
/// transport could do better.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailureKind {
    /// No answer within the bound (packets dropped somewhere).
    Timeout,
    /// The network said nobody is there (unreachable, TCP refused).
    Unreachable,
    /// The server answered and refused, closed, or reset the connection.
    Refused,
    /// One side rejected the other's certificate.
    Tls,
    /// The peer broke the protocol.
    Protocol,
    /// A problem on this node (certificates, sockets).
    Local,
}

impl FailureKind {
    /// Whether the failure says the transport did not get through, as
    /// opposed to an answer the other transport would get too.
    fn no_answer(self) -> bool {
        matches!(self, FailureKind::Timeout | FailureKind::Unreachable)
    }
}

/// Why the agent moved from QUIC to HTTP/2 (a metric label).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FallbackReason {
    /// The QUIC handshake got no answer within `--quic-timeout`.
    QuicTimeout,
    /// The network reported QUIC's destination unreachable.
    QuicUnreachable,
    /// QUIC registered, then died of idle timeout soon after.
    QuicIdleAfterConnect,
}

impl FallbackReason {
    pub fn label(self) -> &'static str {
        match self {
            FallbackReason::QuicTimeout => "quic_timeout",
            FallbackReason::QuicUnreachable => "quic_unreachable",
            FallbackReason::QuicIdleAfterConnect => "quic_idle_after_connect",
        }
    }
}

impl EncodeLabelValue for FallbackReason {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), fmt::Error> {
        fmt::Write::write_str(encoder, self.label())
    }
}

/// Chooses the transport of each connection attempt.
#[derive(Clone, Debug)]
pub struct TransportSelector {
    choice: TransportChoice,
    /// The transport that last registered (sticky).
    current: Transport,
    /// Start the next attempt with HTTP/2, for this reason.
    h2_first: Option<FallbackReason>,
    /// Transports tried in the attempt under way.
    tried: Vec<Transport>,
    /// Why this attempt is trying HTTP/2 after QUIC, if it is.
    reason: Option<FallbackReason>,
    /// A QUIC connection that dies of idle timeout within this long after
    /// registering counts as "UDP filtered after the handshake".
    idle_window: Duration,
    reprobe_first: Duration,
    reprobe_max: Duration,
    reprobe_next: Duration,
    /// QUIC came back through a re-probe and has not yet outlived the
    /// idle window.
    probation: bool,
    /// On HTTP/2 because QUIC got no answer, for this reason, until an
    /// immediate second QUIC try confirms it.
    unconfirmed: Option<FallbackReason>,
}

impl TransportSelector {
    /// `idle_timeout`: the QUIC idle timeout. Re-probes start at
    /// `reprobe_first` and double up to `reprobe_max`.
    pub fn new(
        choice: TransportChoice,
        idle_timeout: Duration,
        reprobe_first: Duration,
        reprobe_max: Duration,
    ) -> Self {
        let reprobe_first = reprobe_first.min(reprobe_max);
        TransportSelector {
            choice,
            current: match choice {
                TransportChoice::H2 => Transport::H2,
                TransportChoice::Auto | TransportChoice::Quic => Transport::Quic,
            },
            h2_first: None,
            tried: Vec::with_capacity(2),
            reason: None,
            idle_window: idle_timeout * 2,
            reprobe_first,
            reprobe_max,
            reprobe_next: reprobe_first,
            probation: false,
            unconfirmed: None,
        }
    }

    /// The transport that last registered.
    pub fn current(&self) -> Transport {
        self.current
    }

    /// Starts an attempt; returns the transport to try first.
    pub fn begin(&mut self) -> Transport {
        self.tried.clear();
        self.reason = None;
        let first = match self.h2_first.take() {
            Some(reason) if self.choice == TransportChoice::Auto => {
                self.reason = Some(reason);
                Transport::H2
            }
            _ => self.current,
        };
        self.tried.push(first);
        first
    }

    /// `transport` failed with `kind`: the transport to try next in this
    /// attempt, if any.
    pub fn failed(&mut self, transport: Transport, kind: FailureKind) -> Option<Transport> {
        if self.choice != TransportChoice::Auto || !kind.no_answer() {
            return None;
        }
        let other = match transport {
            Transport::Quic => Transport::H2,
            Transport::H2 => Transport::Quic,
        };
        if self.tried.contains(&other) {
            // Neither got through: the network, or the server, is down.
            // Start with QUIC next time.
            self.current = Transport::Quic;
            self.reason = None;
            return None;
        }
        if transport == Transport::Quic && self.current == Transport::Quic {
            self.reason = Some(match kind {
                FailureKind::Timeout => FallbackReason::QuicTimeout,
                _ => FallbackReason::QuicUnreachable,
            });
        }
        self.tried.push(other);
        Some(other)
    }

    /// `transport` registered. Returns the fallback to count, if this
    /// registration moved the agent from QUIC to HTTP/2 for certain. A
    /// move after QUIC got no answer is counted only once a second QUIC
    /// try, at once, fails too ([`TransportSelector::reprobe_failed`]).
    pub fn connected(&mut self, transport: Transport) -> Option<FallbackReason> {
        let fell_back = match transport {
            Transport::H2 if self.choice == TransportChoice::Auto => self.reason.take(),
            _ => None,
        };
        self.unconfirmed = None;
        if let Some(reason @ (FallbackReason::QuicTimeout | FallbackReason::QuicUnreachable)) =
            fell_back
        {
            self.unconfirmed = Some(reason);
            self.probation = false;
            self.reprobe_next = self.reprobe_first;
            self.current = transport;
            return None;
        }
        if fell_back.is_some() && self.probation {
            // The QUIC connection a re-probe won back did not last.
            self.probation = false;
            self.reprobe_failed();
        } else if fell_back.is_some() || transport != self.current {
            self.reprobe_next = self.reprobe_first;
        }
        self.current = transport;
        fell_back
    }

    /// A registered connection on `transport` ended after `lived`. Returns
    /// the reason when the next attempt should start with HTTP/2.
    pub fn lost(
        &mut self,
        transport: Transport,
        lived: Duration,
        idle_timeout: bool,
    ) -> Option<FallbackReason> {
        if self.choice == TransportChoice::Auto
            && transport == Transport::Quic
            && idle_timeout
            && lived < self.idle_window
        {
            self.h2_first = Some(FallbackReason::QuicIdleAfterConnect);
            return self.h2_first;
        }
        if lived >= self.idle_window {
            self.probation = false;
        }
        None
    }

    /// While on HTTP/2 in `auto`: how long until QUIC is tried again.
    pub fn reprobe_in(&self) -> Option<Duration> {
        if self.choice != TransportChoice::Auto || self.current != Transport::H2 {
            return None;
        }
        Some(match self.unconfirmed {
            Some(_) => Duration::ZERO,
            None => self.reprobe_next,
        })
    }

    /// A re-probe failed: wait longer for the next one. Returns the
    /// fallback to count when this was the second try that confirms it.
    pub fn reprobe_failed(&mut self) -> Option<FallbackReason> {
        if let Some(reason) = self.unconfirmed.take() {
            return Some(reason);
        }
        self.reprobe_next = (self.reprobe_next * 2).min(self.reprobe_max);
        None
    }

    /// A re-probe registered over QUIC: serve it. The re-probe schedule
    /// starts over only once QUIC has outlived the idle window.
    pub fn upgraded(&mut self) {
        self.current = Transport::Quic;
        // A second try that got through: the server was restarting, not
        // UDP blocked.
        self.probation = self.unconfirmed.take().is_none();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use FailureKind::*;
    use Transport::*;

    fn auto() -> TransportSelector {
        TransportSelector::new(
            TransportChoice::Auto,
            Duration::from_secs(30),
            Duration::from_secs(5),
            Duration::from_secs(300),
        )
    }

    /// QUIC gets no answer (`kind`), HTTP/2 registers, and the second QUIC
    /// try beside it fails too: the fallback is counted then.
    fn fall_back(s: &mut TransportSelector, kind: FailureKind) -> Option<FallbackReason> {
        assert_eq!(s.begin(), Quic);
        assert_eq!(s.failed(Quic, kind), Some(H2));
        assert_eq!(s.connected(H2), None, "not counted before the second try");
        assert_eq!(s.reprobe_in(), Some(Duration::ZERO), "second try at once");
        s.reprobe_failed()
    }

    #[test]
    fn timeout_then_h2_registers_is_a_fallback() {
        let mut s = auto();
        assert_eq!(
            fall_back(&mut s, Timeout),
            Some(FallbackReason::QuicTimeout)
        );
        assert_eq!(s.current(), H2);
        assert_eq!(s.reprobe_in(), Some(Duration::from_secs(5)));
        // Sticky: the next attempt starts on HTTP/2, and counts nothing.
        assert_eq!(s.begin(), H2);
        assert_eq!(s.connected(H2), None);
    }

    #[test]
    fn unreachable_quic_is_a_fallback_with_its_own_reason() {
        let mut s = auto();
        assert_eq!(
            fall_back(&mut s, Unreachable),
            Some(FallbackReason::QuicUnreachable)
        );
    }

    #[test]
    fn a_server_back_during_the_quic_attempt_is_no_fallback() {
        let mut s = auto();
        s.begin();
        s.failed(Quic, Timeout);
        assert_eq!(s.connected(H2), None);
        // The second QUIC try, at once, registers: the agent moves over.
        assert_eq!(s.reprobe_in(), Some(Duration::ZERO));
        s.upgraded();
        assert_eq!(s.current(), Quic);
        assert_eq!(s.begin(), Quic);
        // Not on probation: an idle death later is judged on its own.
        assert_eq!(s.lost(Quic, Duration::from_secs(3600), true), None);
    }

    #[test]
    fn answers_never_cause_a_fallback() {
        for kind in [Refused, Tls, Protocol, Local] {
            let mut s = auto();
            assert_eq!(s.begin(), Quic);
            assert_eq!(s.failed(Quic, kind), None, "{kind:?}");
            assert_eq!(s.begin(), Quic, "{kind:?}");
        }
    }

    #[test]
    fn both_failing_keeps_quic_first() {
        let mut s = auto();
        s.begin();
        assert_eq!(s.failed(Quic, Timeout), Some(H2));
        assert_eq!(s.failed(H2, Unreachable), None);
        assert_eq!(s.current(), Quic);
        assert_eq!(s.begin(), Quic);
        // A registration after that is on QUIC, and no fallback.
        assert_eq!(s.connected(Quic), None);
    }

    #[test]
    fn h2_refused_after_quic_timeout_is_no_fallback() {
        let mut s = auto();
        s.begin();
        s.failed(Quic, Timeout);
        assert_eq!(s.failed(H2, Refused), None);
        assert_eq!(s.begin(), Quic);
    }

    #[test]
    fn on_h2_an_unreachable_server_is_tried_over_quic_too() {
        let mut s = auto();
        s.begin();
        s.failed(Quic, Timeout);
        s.connected(H2);
        assert_eq!(s.begin(), H2);
        assert_eq!(s.failed(H2, Timeout), Some(Quic));
        assert_eq!(s.connected(Quic), None);
        assert_eq!(s.current(), Quic);
    }

    #[test]
    fn idle_death_soon_after_connect_starts_the_next_attempt_on_h2() {
        let mut s = auto();
        s.begin();
        s.connected(Quic);
        assert_eq!(
            s.lost(Quic, Duration::from_secs(40), true),
            Some(FallbackReason::QuicIdleAfterConnect)
        );
        assert_eq!(s.begin(), H2);
        assert_eq!(s.connected(H2), Some(FallbackReason::QuicIdleAfterConnect));
    }

    #[test]
    fn idle_death_after_a_long_life_or_other_losses_change_nothing() {
        let mut s = auto();
        s.begin();
        s.connected(Quic);
        assert_eq!(s.lost(Quic, Duration::from_secs(3600), true), None);
        assert_eq!(s.lost(Quic, Duration::from_secs(1), false), None);
        assert_eq!(s.begin(), Quic);
    }

    #[test]
    fn idle_fallback_that_fails_returns_to_quic() {
        let mut s = auto();
        s.begin();
        s.connected(Quic);
        s.lost(Quic, Duration::from_secs(1), true);
        assert_eq!(s.begin(), H2);
        assert_eq!(s.failed(H2, Timeout), Some(Quic));
        assert_eq!(s.connected(Quic), None);
        assert_eq!(s.begin(), Quic);
    }

    #[test]
    fn reprobes_start_soon_and_grow_to_the_interval() {
        let mut s = auto();
        assert_eq!(s.reprobe_in(), None, "no re-probe while on QUIC");
        fall_back(&mut s, Timeout);
        let mut waits = Vec::new();
        for _ in 0..8 {
            waits.push(s.reprobe_in().unwrap().as_secs());
            s.reprobe_failed();
        }
        assert_eq!(waits, [5, 10, 20, 40, 80, 160, 300, 300]);
        s.upgraded();
        assert_eq!(s.current(), Quic);
        assert_eq!(s.reprobe_in(), None);
        // Once QUIC outlived the idle window, a later fallback starts the
        // schedule over.
        s.lost(Quic, Duration::from_secs(3600), false);
        fall_back(&mut s, Timeout);
        assert_eq!(s.reprobe_in(), Some(Duration::from_secs(5)));
    }

    #[test]
    fn quic_won_back_that_dies_at_once_does_not_flap() {
        let mut s = auto();
        fall_back(&mut s, Timeout);
        let mut waits = Vec::new();
        // UDP is filtered after the handshake: every re-probe registers,
        // and every QUIC connection it wins back dies of idle timeout.
        for _ in 0..7 {
            waits.push(s.reprobe_in().unwrap().as_secs());
            s.upgraded();
            s.lost(Quic, Duration::from_secs(31), true);
            assert_eq!(s.begin(), H2);
            assert_eq!(s.connected(H2), Some(FallbackReason::QuicIdleAfterConnect));
        }
        assert_eq!(waits, [5, 10, 20, 40, 80, 160, 300]);
    }

    #[test]
    fn fixed_transports_never_switch() {
        for (choice, t) in [(TransportChoice::Quic, Quic), (TransportChoice::H2, H2)] {
            let mut s = TransportSelector::new(
                choice,
                Duration::from_secs(30),
                Duration::from_secs(5),
                Duration::from_secs(300),
            );
            assert_eq!(s.begin(), t);
            assert_eq!(s.failed(t, Timeout), None);
            assert_eq!(s.lost(t, Duration::from_secs(1), true), None);
            assert_eq!(s.begin(), t);
            assert_eq!(s.connected(t), None);
            assert_eq!(s.reprobe_in(), None);
        }
    }
}
