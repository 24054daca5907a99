//! Reconnect backoff: exponential with full jitter.
//!
//! The n-th consecutive failure waits a random time in `[0, min(cap,
//! base * 2^n)]`, so a fleet of agents that lost the same server does not
//! return in lock step. A connection that stayed healthy for `reset_after`
//! resets the sequence.

use std::time::Duration;

#[derive(Clone, Debug)]
pub struct Backoff {
    base: Duration,
    cap: Duration,
    reset_after: Duration,
    failures: u32,
    rng: fastrand::Rng,
}

impl Backoff {
    /// Defaults: base 1 s, cap 30 s, reset after a healthy minute.
    pub fn new() -> Self {
        Self::with(
            Duration::from_secs(1),
            Duration::from_secs(30),
            Duration::from_secs(60),
        )
    }

    pub fn with(base: Duration, cap: Duration, reset_after: Duration) -> Self {
        Backoff {
            base,
            cap,
            reset_after,
            failures: 0,
            rng: fastrand::Rng::new(),
        }
    }

    /// A deterministic generator, for tests.
    pub fn seeded(mut self, seed: u64) -> Self {
        self.rng = fastrand::Rng::with_seed(seed);
        self
    }

    /// The ceiling of the next wait (before jitter).
    pub fn ceiling(&self) -> Duration {
        let factor = 1u32.checked_shl(self.failures.min(16)).unwrap_or(u32::MAX);
        self.base.saturating_mul(factor).min(self.cap)
    }

    /// Records a failure and returns how long to wait before the next try.
    pub fn next_delay(&mut self) -> Duration {
        let ceiling = self.ceiling();
        self.failures = self.failures.saturating_add(1);
        let nanos = ceiling.as_nanos().min(u64::MAX as u128) as u64;
        Duration::from_nanos(self.rng.u64(0..=nanos))
    }

    /// Called when a connection ends after having been up for `healthy`.
    pub fn connection_ended(&mut self, healthy: Duration) {
        if healthy >= self.reset_after {
            self.failures = 0;
        }
    }

    pub fn failures(&self) -> u32 {
        self.failures
    }
}

impl Default for Backoff {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_to_the_cap_with_jitter_below_the_ceiling() {
        let mut b = Backoff::new().seeded(7);
        let mut ceilings = Vec::new();
        for _ in 0..10 {
            let ceiling = b.ceiling();
            let d = b.next_delay();
            assert!(d <= ceiling, "{d:?} > {ceiling:?}");
            ceilings.push(ceiling.as_secs());
        }
        assert_eq!(ceilings, [1, 2, 4, 8, 16, 30, 30, 30, 30, 30]);
    }

    #[test]
    fn first_wait_is_at_most_one_second() {
        for seed in 0..100 {
            assert!(Backoff::new().seeded(seed).next_delay() <= Duration::from_secs(1));
        }
    }

    #[test]
    fn jitter_spreads_waits() {
        let mut b = Backoff::new().seeded(1);
        for _ in 0..6 {
            b.next_delay();
        }
        let waits: std::collections::HashSet<_> = (0..20)
            .map(|_| b.clone().seeded(fastrand::u64(..)).next_delay())
            .collect();
        assert!(waits.len() > 10);
    }

    #[test]
    fn resets_only_after_a_healthy_minute() {
        let mut b = Backoff::new().seeded(3);
        for _ in 0..5 {
            b.next_delay();
        }
        b.connection_ended(Duration::from_secs(59));
        assert_eq!(b.failures(), 5);
        b.connection_ended(Duration::from_secs(60));
        assert_eq!(b.failures(), 0);
        assert_eq!(b.ceiling(), Duration::from_secs(1));
    }

    #[test]
    fn many_failures_do_not_overflow() {
        let mut b = Backoff::new().seeded(9);
        for _ in 0..10_000 {
            assert!(b.next_delay() <= Duration::from_secs(30));
        }
    }
}
