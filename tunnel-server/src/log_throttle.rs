//! One warning per interval for events an attacker can repeat at will.
//!
//! A handshake flood must not become a log flood (60,000 WARN lines in
//! ten seconds was finding 1 of issue 13): the first event of an interval
//! is logged at WARN with the number held back since the last one, the
//! rest at DEBUG. Metrics count every event.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Lets one event per `interval` through. No clock of its own: callers
/// pass the time, so tests need no sleeps.
#[derive(Debug)]
pub struct LogThrottle {
    interval: Duration,
    state: Mutex<Option<Window>>,
}

#[derive(Debug)]
struct Window {
    started: Instant,
    held_back: u64,
}

impl LogThrottle {
    /// WARN lines are at most one per this interval.
    pub const INTERVAL: Duration = Duration::from_secs(10);

    pub fn new(interval: Duration) -> Self {
        LogThrottle {
            interval,
            state: Mutex::new(None),
        }
    }

    /// `Some(n)`: log this event as a warning and say that `n` others were
    /// held back (logged at debug) since the previous warning. `None`: log
    /// it at debug.
    pub fn admit(&self, now: Instant) -> Option<u64> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        match &mut *state {
            Some(w) if now.saturating_duration_since(w.started) < self.interval => {
                w.held_back += 1;
                None
            }
            slot => {
                let held_back = slot.as_ref().map_or(0, |w| w.held_back);
                *slot = Some(Window {
                    started: now,
                    held_back: 0,
                });
                Some(held_back)
            }
        }
    }
}

impl Default for LogThrottle {
    fn default() -> Self {
        Self::new(Self::INTERVAL)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_warning_per_interval_with_the_count_held_back() {
        let t = LogThrottle::new(Duration::from_secs(10));
        let t0 = Instant::now();
        assert_eq!(t.admit(t0), Some(0));
        for i in 1..=500 {
            assert_eq!(t.admit(t0 + Duration::from_millis(i)), None);
        }
        assert_eq!(t.admit(t0 + Duration::from_secs(10)), Some(500));
        assert_eq!(t.admit(t0 + Duration::from_secs(11)), None);
        // A quiet spell: the next event warns at once.
        assert_eq!(t.admit(t0 + Duration::from_secs(60)), Some(1));
    }
}
