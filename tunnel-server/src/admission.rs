//! Which agent handshakes may start: a cap on handshakes in flight, a
//! threshold above which unvalidated sources must prove their address
//! first (QUIC Retry), and a limit per source. No I/O, no clock.
//!
//! A handshake is in flight from the moment it is admitted until its
//! [`Permit`] is dropped (the handshake finished, failed or timed out).
//! Until then it costs the server its TLS and connection state (~35 KiB
//! for QUIC), and a peer without a certificate can hold it for the whole
//! handshake timeout, so the number in flight is what bounds the memory an
//! unauthenticated flood can take.
//!
//! The per-source table holds only sources with a handshake in flight, so
//! it never has more entries than the cap: it cannot become the memory
//! sink itself. Sources are IPv4 addresses and IPv6 /64 prefixes (one
//! host usually owns a whole /64).
//!
//! At the cap, the slots are shared out fairly: a source that has proven
//! its address and holds at least two handshakes fewer than the source
//! holding the most takes that source's oldest slot (the [`Permit`] there
//! learns it was evicted, and its handshake is dropped). Without it, an
//! attacker that answers Retries from `max_in_flight / per_source`
//! addresses (16 by default) kept every new agent out for as long as it
//! flooded; now it must hold the cap from as many addresses as there are
//! slots.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::oneshot;

use prometheus_client::encoding::{EncodeLabelValue, LabelValueEncoder};

/// Handshake limits of one listener.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HandshakeLimits {
    /// Handshakes in flight at most; more are shed. Default 1024: about
    /// 35 MiB of QUIC handshake state (plus a few seconds of closing state
    /// for those that timed out).
    pub max_in_flight: usize,
    /// From this many in flight on, a QUIC source that has not proven its
    /// address gets a Retry (one round trip more, no state kept) instead
    /// of a handshake. Default 256. 0: always Retry. Peers that cannot
    /// receive at their source address (spoofed floods, or tools that
    /// never answer) then hold no more than this many slots.
    pub retry_above: usize,
    /// Handshakes in flight from one source (IPv4 address, IPv6 /64).
    /// Default 64, so a fleet behind one NAT address can still reconnect
    /// all at once after a restart, 64 at a time.
    pub per_source: usize,
}

impl Default for HandshakeLimits {
    fn default() -> Self {
        HandshakeLimits {
            max_in_flight: 1024,
            retry_above: 256,
            per_source: 64,
        }
    }
}

/// Why handshake limits cannot work.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HandshakeLimitsError {
    #[error("the handshake cap must be above zero, or no agent can ever connect")]
    ZeroCap,
    #[error("the per-source handshake limit must be above zero, or no agent can ever connect")]
    ZeroPerSource,
    #[error(
        "the Retry threshold ({retry_above}) must not exceed the handshake cap ({max}): \
         above the cap handshakes are shed, so a higher threshold never applies"
    )]
    RetryAboveCap { retry_above: usize, max: usize },
    #[error(
        "the per-source handshake limit ({per_source}) must not exceed the handshake cap ({max})"
    )]
    PerSourceAboveCap { per_source: usize, max: usize },
}

impl HandshakeLimits {
    pub fn validate(&self) -> Result<(), HandshakeLimitsError> {
        if self.max_in_flight == 0 {
            return Err(HandshakeLimitsError::ZeroCap);
        }
        if self.per_source == 0 {
            return Err(HandshakeLimitsError::ZeroPerSource);
        }
        if self.retry_above > self.max_in_flight {
            return Err(HandshakeLimitsError::RetryAboveCap {
                retry_above: self.retry_above,
                max: self.max_in_flight,
            });
        }
        if self.per_source > self.max_in_flight {
            return Err(HandshakeLimitsError::PerSourceAboveCap {
                per_source: self.per_source,
                max: self.max_in_flight,
            });
        }
        Ok(())
    }
}

/// The limit a handshake ran into.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Limit {
    /// `retry_above` handshakes in flight: prove your address first.
    RetryThreshold,
    /// `max_in_flight` handshakes in flight.
    MaxInFlight,
    /// `per_source` handshakes in flight from this source.
    PerSource,
}

impl Limit {
    pub fn label(self) -> &'static str {
        match self {
            Limit::RetryThreshold => "retry_threshold",
            Limit::MaxInFlight => "max_in_flight",
            Limit::PerSource => "per_source",
        }
    }
}

impl EncodeLabelValue for Limit {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        std::fmt::Write::write_str(encoder, self.label())
    }
}

/// What to do with a handshake that wants to start.
#[must_use]
#[derive(Debug)]
pub enum Admission {
    /// Start it; it is in flight while the permit lives.
    Admit(Permit),
    /// Ask the source to prove its address (QUIC Retry): it has not, and
    /// it ran into `Limit`. Nothing is kept.
    Retry(Limit),
    /// Do not start it.
    Shed(Limit),
}

/// Handshakes in flight on one listener, against its [`HandshakeLimits`].
#[derive(Debug)]
pub struct HandshakeAdmission {
    limits: HandshakeLimits,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    in_flight: usize,
    peak: usize,
    next_id: u64,
    /// Sources with at least one handshake in flight, never more entries
    /// than `in_flight`; each source's handshakes oldest first.
    by_source: HashMap<IpAddr, VecDeque<Held>>,
    /// `sources_with[n]`: how many sources have `n` handshakes in flight
    /// (`n` ≤ `per_source`), so the fullest source is found without a walk
    /// of the table.
    sources_with: Vec<usize>,
}

/// One handshake in flight, as the table holds it.
#[derive(Debug)]
struct Held {
    id: u64,
    /// Told when the slot is taken from it.
    evict: oneshot::Sender<()>,
}

impl State {
    fn count(&self, key: &IpAddr) -> usize {
        self.by_source.get(key).map_or(0, VecDeque::len)
    }

    /// Moves `key` from `from` handshakes to `to` in `sources_with`.
    fn recount(&mut self, from: usize, to: usize) {
        if from > 0 {
            self.sources_with[from] -= 1;
        }
        if to > 0 {
            self.sources_with[to] += 1;
        }
    }

    fn hold(&mut self, key: IpAddr, evict: oneshot::Sender<()>) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        let held = self.by_source.entry(key).or_default();
        held.push_back(Held { id, evict });
        let n = held.len();
        self.recount(n - 1, n);
        self.in_flight += 1;
        self.peak = self.peak.max(self.in_flight);
        id
    }

    /// Takes handshake `id` of `key` out of the table; `None` if it is no
    /// longer there (evicted).
    fn take(&mut self, key: &IpAddr, id: Option<u64>) -> Option<Held> {
        let held = self.by_source.get_mut(key)?;
        let at = match id {
            Some(id) => held.iter().position(|h| h.id == id)?,
            None => 0,
        };
        let taken = held.remove(at)?;
        let n = held.len();
        if n == 0 {
            self.by_source.remove(key);
        }
        self.recount(n + 1, n);
        self.in_flight -= 1;
        Some(taken)
    }

    /// The most handshakes any source holds (0: none in flight).
    fn most(&self) -> usize {
        (1..self.sources_with.len())
            .rev()
            .find(|&n| self.sources_with[n] > 0)
            .unwrap_or(0)
    }

    /// Whether a source holding `than` may take the oldest slot of the
    /// fullest source: it holds at least two more, so the shares even out
    /// and never swing back. From the counts alone, no walk of the table.
    fn may_take(&self, than: usize) -> bool {
        self.most() >= than + 2
    }

    /// A source holding the most handshakes (a walk of the table, taken
    /// only when a slot is taken).
    fn fullest(&self) -> Option<IpAddr> {
        let most = self.most();
        self.by_source
            .iter()
            .find(|(_, held)| held.len() == most)
            .map(|(key, _)| *key)
    }
}

impl HandshakeAdmission {
    pub fn new(limits: HandshakeLimits) -> Arc<Self> {
        let state = State {
            sources_with: vec![0; limits.per_source + 1],
            ..State::default()
        };
        Arc::new(HandshakeAdmission {
            limits,
            state: Mutex::new(state),
        })
    }

    pub fn limits(&self) -> &HandshakeLimits {
        &self.limits
    }

    /// Decides on a handshake from `source`; `validated`: the source has
    /// proven it receives at its address (a QUIC Retry token, or a TCP
    /// handshake).
    ///
    /// At the cap: a source at least two handshakes short of the fullest
    /// source takes that source's oldest slot if it has proven its
    /// address, and gets a Retry to prove it if not; any other is shed (a
    /// Retry would only bring it back to a full house). Over the
    /// per-source limit, or over the Retry threshold: an unvalidated
    /// source gets a Retry, so a spoofer cannot use up the share of the
    /// address it forges; a validated one over its source's limit is shed.
    pub fn admit(self: &Arc<Self>, source: IpAddr, validated: bool) -> Admission {
        let key = source_key(source);
        let mut state = self.lock();
        let from_source = state.count(&key);
        let over_source = from_source >= self.limits.per_source;
        let mut displaced = None;
        if state.in_flight >= self.limits.max_in_flight {
            if over_source || !state.may_take(from_source) {
                return Admission::Shed(Limit::MaxInFlight);
            }
            if !validated {
                return Admission::Retry(Limit::MaxInFlight);
            }
            let Some((victim, oldest)) = state
                .fullest()
                .and_then(|victim| Some((victim, state.take(&victim, None)?)))
            else {
                return Admission::Shed(Limit::MaxInFlight);
            };
            // Its handshake may have just ended; then nobody listens.
            let _ = oldest.evict.send(());
            displaced = Some(victim);
        }
        if !validated {
            if over_source {
                return Admission::Retry(Limit::PerSource);
            }
            if state.in_flight >= self.limits.retry_above {
                return Admission::Retry(Limit::RetryThreshold);
            }
        }
        if over_source {
            return Admission::Shed(Limit::PerSource);
        }
        let (evict, evicted) = oneshot::channel();
        let id = state.hold(key, evict);
        Admission::Admit(Permit {
            admission: self.clone(),
            source: key,
            id,
            evicted,
            displaced,
        })
    }

    /// Handshakes in flight now.
    pub fn in_flight(&self) -> usize {
        self.lock().in_flight
    }

    /// The most handshakes ever in flight at once.
    pub fn peak(&self) -> usize {
        self.lock().peak
    }

    /// Sources with a handshake in flight now (entries of the table).
    pub fn sources(&self) -> usize {
        self.lock().by_source.len()
    }

    fn release(&self, key: IpAddr, id: u64) {
        // Not there if it was evicted: its slot was handed on then.
        let _ = self.lock().take(&key, Some(id));
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // The state is a few counters updated together; a panic elsewhere
        // cannot leave them half-written.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// One admitted handshake; dropping it ends it.
#[derive(Debug)]
pub struct Permit {
    admission: Arc<HandshakeAdmission>,
    source: IpAddr,
    id: u64,
    evicted: oneshot::Receiver<()>,
    displaced: Option<IpAddr>,
}

impl Permit {
    /// Completes when the slot was given to a source with fewer
    /// handshakes in flight; the handshake must then be dropped. Its slot
    /// is no longer counted from that moment.
    pub async fn evicted(&mut self) {
        if (&mut self.evicted).await.is_err() {
            // The table drops the sender only when it takes the entry out
            // on this permit's own release, which cannot run before this.
            std::future::pending::<()>().await;
        }
    }

    /// The source (IPv4 address, IPv6 /64) whose oldest handshake this
    /// one took the slot of, if it did.
    pub fn displaced(&self) -> Option<IpAddr> {
        self.displaced
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.admission.release(self.source, self.id);
    }
}

/// The unit a per-source limit counts: an IPv4 address (IPv4-mapped IPv6
/// included), or an IPv6 /64; the same unit the per-client limits count.
fn source_key(ip: IpAddr) -> IpAddr {
    transport::window::client_key(ip)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn limits(max: usize, retry_above: usize, per_source: usize) -> Arc<HandshakeAdmission> {
        let limits = HandshakeLimits {
            max_in_flight: max,
            retry_above,
            per_source,
        };
        limits.validate().unwrap();
        HandshakeAdmission::new(limits)
    }

    fn admitted(a: Admission) -> Permit {
        match a {
            Admission::Admit(p) => p,
            other => panic!("expected a permit, got {other:?}"),
        }
    }

    #[test]
    fn below_the_threshold_everyone_is_admitted() {
        let a = limits(8, 4, 4);
        let p1 = admitted(a.admit(ip("192.0.2.1"), false));
        let _p2 = admitted(a.admit(ip("192.0.2.2"), true));
        assert_eq!((a.in_flight(), a.sources()), (2, 2));
        drop(p1);
        assert_eq!((a.in_flight(), a.sources()), (1, 1));
    }

    #[test]
    fn over_the_threshold_unvalidated_sources_get_a_retry_and_take_no_slot() {
        let a = limits(8, 2, 8);
        let _held: Vec<_> = (0..2)
            .map(|i| admitted(a.admit(ip(&format!("192.0.2.{i}")), false)))
            .collect();
        for i in 0..1000 {
            let src = ip(&format!("198.51.100.{}", i % 250));
            assert!(matches!(
                a.admit(src, false),
                Admission::Retry(Limit::RetryThreshold)
            ));
        }
        assert_eq!(a.in_flight(), 2);
        // Having answered the Retry, a source is admitted up to the cap.
        let _more: Vec<_> = (0..6)
            .map(|i| admitted(a.admit(ip(&format!("203.0.113.{i}")), true)))
            .collect();
        assert_eq!(a.in_flight(), 8);
        assert_eq!(a.peak(), 8);
    }

    #[test]
    fn at_the_cap_with_even_shares_everything_is_shed_validated_or_not() {
        let a = limits(3, 3, 3);
        let held: Vec<_> = (0..3)
            .map(|i| admitted(a.admit(ip(&format!("192.0.2.{i}")), false)))
            .collect();
        assert!(matches!(
            a.admit(ip("192.0.2.9"), false),
            Admission::Shed(Limit::MaxInFlight)
        ));
        assert!(matches!(
            a.admit(ip("192.0.2.9"), true),
            Admission::Shed(Limit::MaxInFlight)
        ));
        drop(held);
        assert_eq!((a.in_flight(), a.sources()), (0, 0));
        let _p = admitted(a.admit(ip("192.0.2.9"), true));
        assert_eq!(a.peak(), 3);
    }

    impl Permit {
        fn was_evicted(&mut self) -> bool {
            self.evicted.try_recv().is_ok()
        }
    }

    #[test]
    fn at_the_cap_a_source_with_fewer_takes_the_oldest_slot_of_the_fullest() {
        let a = limits(4, 4, 4);
        let mut from_a: Vec<_> = (0..3)
            .map(|_| admitted(a.admit(ip("192.0.2.1"), true)))
            .collect();
        let mut from_b = admitted(a.admit(ip("192.0.2.2"), true));
        assert_eq!(a.in_flight(), 4);
        // Not proven yet: prove it (a Retry), then take a slot.
        assert!(matches!(
            a.admit(ip("192.0.2.3"), false),
            Admission::Retry(Limit::MaxInFlight)
        ));
        let c = admitted(a.admit(ip("192.0.2.3"), true));
        assert_eq!(c.displaced(), Some(ip("192.0.2.1")));
        let evicted: Vec<_> = from_a.iter_mut().map(Permit::was_evicted).collect();
        assert_eq!(evicted, [true, false, false], "the oldest goes");
        assert!(!from_b.was_evicted());
        assert_eq!((a.in_flight(), a.sources()), (4, 3));
        // The evicted handshake ends later; its slot is not freed twice.
        drop(from_a.remove(0));
        assert_eq!(a.in_flight(), 4);
        // 192.0.2.1 still holds two: one more source evens it out...
        let d = admitted(a.admit(ip("192.0.2.4"), true));
        assert_eq!(d.displaced(), Some(ip("192.0.2.1")));
        assert!(from_a[0].was_evicted());
        // ...and then everyone holds one: nothing to take.
        assert!(matches!(
            a.admit(ip("192.0.2.5"), true),
            Admission::Shed(Limit::MaxInFlight)
        ));
        assert!(matches!(
            a.admit(ip("192.0.2.5"), false),
            Admission::Shed(Limit::MaxInFlight)
        ));
        drop((from_a, from_b, c, d));
        assert_eq!((a.in_flight(), a.sources()), (0, 0));
    }

    #[test]
    fn at_the_cap_shares_even_out_and_never_swing_back() {
        // Sixteen flooding sources fill the cap; a seventeenth, and each
        // flooder again, find no source two handshakes fuller than they.
        let a = limits(64, 0, 4);
        let flooder = |i: usize| ip(&format!("198.18.0.{}", 10 + i));
        let mut held: Vec<_> = (0..64)
            .map(|i| admitted(a.admit(flooder(i % 16), true)))
            .collect();
        for i in 0..16 {
            assert!(matches!(
                a.admit(flooder(i), true),
                Admission::Shed(Limit::MaxInFlight)
            ));
        }
        // An agent from its own address gets in at once...
        let agent = admitted(a.admit(ip("198.18.1.2"), true));
        assert!(agent.displaced().is_some());
        // ...and the flooder it took from cannot take it back: it holds
        // three now, the others four, the agent one.
        let victim = agent.displaced().unwrap();
        assert!(matches!(
            a.admit(victim, true),
            Admission::Shed(Limit::MaxInFlight)
        ));
        // A flooder over its own share is shed, even at the cap.
        let other = flooder(usize::from(victim == flooder(0)));
        assert!(matches!(
            a.admit(other, true),
            Admission::Shed(Limit::MaxInFlight)
        ));
        assert_eq!(
            held.iter_mut()
                .map(Permit::was_evicted)
                .filter(|&e| e)
                .count(),
            1
        );
        assert_eq!(a.in_flight(), 64);
    }

    #[test]
    fn one_source_gets_its_share_and_no_more() {
        let a = limits(100, 100, 2);
        let _held: Vec<_> = (0..2)
            .map(|_| admitted(a.admit(ip("192.0.2.1"), true)))
            .collect();
        // Unvalidated: maybe a spoofer forging this address; a Retry lets
        // the real owner through and costs nothing to keep.
        assert!(matches!(
            a.admit(ip("192.0.2.1"), false),
            Admission::Retry(Limit::PerSource)
        ));
        assert!(matches!(
            a.admit(ip("192.0.2.1"), true),
            Admission::Shed(Limit::PerSource)
        ));
        // Other sources are not affected.
        let _other = admitted(a.admit(ip("192.0.2.2"), false));
        assert_eq!(a.in_flight(), 3);
    }

    #[test]
    fn an_ipv6_64_is_one_source_and_mapped_ipv4_is_ipv4() {
        let a = limits(100, 100, 1);
        let _p = admitted(a.admit(ip("2001:db8:1:2::1"), true));
        assert!(matches!(
            a.admit(ip("2001:db8:1:2:ffff::9"), true),
            Admission::Shed(Limit::PerSource)
        ));
        let _q = admitted(a.admit(ip("2001:db8:1:3::1"), true));
        let _r = admitted(a.admit(ip("192.0.2.7"), true));
        assert!(matches!(
            a.admit(ip("::ffff:192.0.2.7"), true),
            Admission::Shed(Limit::PerSource)
        ));
    }

    #[test]
    fn the_source_table_never_outgrows_the_cap() {
        let a = limits(16, 16, 1);
        let mut held = Vec::new();
        for i in 0..10_000u32 {
            let src = IpAddr::V4(std::net::Ipv4Addr::from(0x0a00_0000u32 + i));
            if let Admission::Admit(p) = a.admit(src, true) {
                held.push(p);
            }
            // Handshakes end now and then; their sources leave the table.
            if i % 7 == 0 {
                held.pop();
            }
            assert!(a.sources() <= 16);
        }
        drop(held);
        assert_eq!((a.in_flight(), a.sources()), (0, 0));
    }

    #[test]
    fn retry_above_zero_means_always_retry_unvalidated() {
        let a = limits(4, 0, 4);
        assert!(matches!(
            a.admit(ip("192.0.2.1"), false),
            Admission::Retry(Limit::RetryThreshold)
        ));
        let _p = admitted(a.admit(ip("192.0.2.1"), true));
    }

    #[test]
    fn limits_that_cannot_work_are_refused() {
        let ok = HandshakeLimits::default();
        ok.validate().unwrap();
        let bad = |f: fn(&mut HandshakeLimits)| {
            let mut l = ok.clone();
            f(&mut l);
            l.validate().unwrap_err()
        };
        assert_eq!(bad(|l| l.max_in_flight = 0), HandshakeLimitsError::ZeroCap);
        assert_eq!(
            bad(|l| l.per_source = 0),
            HandshakeLimitsError::ZeroPerSource
        );
        assert!(matches!(
            bad(|l| l.retry_above = 2000),
            HandshakeLimitsError::RetryAboveCap { .. }
        ));
        assert!(matches!(
            bad(|l| l.per_source = 2000),
            HandshakeLimitsError::PerSourceAboveCap { .. }
        ));
    }
}
