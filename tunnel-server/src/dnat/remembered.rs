//! What the standalone helper redirects: the addresses of its last read of
//! the agent feed, and those it read before that are missing now but for
//! less than `--keep-missing`.
//!
//! The helper reads the feed through a load-balanced Service: one
//! replica's agents at a time. A replica that has just started (a rolling
//! update, a restart) knows few agents until they find it, 10-40 s later,
//! and a read that lands there must not take the other nodes' rules away:
//! their new connections would go to the edge address itself and hang,
//! and the rule's removal flushes their conntrack entries, which cuts
//! their open `exec` and `logs -f` sessions. A rule kept a while for a
//! node that is really gone costs little: its connections reach the
//! tunnel, which answers at once that no agent serves it.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

/// Addresses, and since when reads of the feed have lacked them.
#[derive(Debug)]
pub struct Remembered {
    keep: Duration,
    /// `None`: the last read had it; `Some(t)`: every read since `t` (the
    /// first without it) lacked it. Counted from a read, not from the
    /// last one that had it: after an outage of the feed (every replica
    /// down) the first read, from a replica that has just started, must
    /// not drop every other node at once.
    missing_since: HashMap<IpAddr, Option<Instant>>,
}

impl Remembered {
    /// `keep`: how long an address missing from every read stays
    /// (`Duration::ZERO`: the last read alone decides).
    pub fn new(keep: Duration) -> Self {
        Remembered {
            keep,
            missing_since: HashMap::new(),
        }
    }

    /// Takes a read made at `now`; returns the addresses to redirect
    /// (sorted), and how many of them the read did not have.
    pub fn merge(&mut self, read: &[IpAddr], now: Instant) -> (Vec<IpAddr>, usize) {
        for since in self.missing_since.values_mut() {
            since.get_or_insert(now);
        }
        for a in read {
            self.missing_since.insert(*a, None);
        }
        let keep = self.keep;
        self.missing_since.retain(|_, since| {
            since.is_none_or(|t| !keep.is_zero() && now.saturating_duration_since(t) < keep)
        });
        let mut addresses: Vec<IpAddr> = self.missing_since.keys().copied().collect();
        addresses.sort_unstable();
        let missing = self.missing_since.values().filter(|s| s.is_some()).count();
        (addresses, missing)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ips(list: &[&str]) -> Vec<IpAddr> {
        list.iter().map(|s| s.parse().unwrap()).collect()
    }

    /// A read from a replica that knows only one node keeps the other's
    /// address for `keep` from that read, then lets it go; one that has
    /// it again renews it.
    #[test]
    fn a_partial_read_keeps_the_others_for_a_while() {
        let keep = Duration::from_secs(120);
        let mut r = Remembered::new(keep);
        let t0 = Instant::now();
        let both = ips(&["198.18.1.2", "198.18.1.3"]);
        assert_eq!(r.merge(&both, t0), (both.clone(), 0));
        // A fresh replica knows only .2.
        let only = ips(&["198.18.1.2"]);
        let t1 = t0 + Duration::from_secs(5);
        assert_eq!(r.merge(&only, t1), (both.clone(), 1));
        assert_eq!(
            r.merge(&only, t1 + Duration::from_secs(119)),
            (both.clone(), 1)
        );
        // Back on a replica that has both: renewed.
        let t2 = t1 + Duration::from_secs(125);
        assert_eq!(r.merge(&both, t2), (both.clone(), 0));
        // Gone from every read for `keep`: dropped.
        let t3 = t2 + Duration::from_secs(10);
        assert_eq!(r.merge(&only, t3), (both.clone(), 1));
        assert_eq!(r.merge(&only, t3 + keep), (only.clone(), 0));
        assert_eq!(r.merge(&[], t3 + keep + keep), (only.clone(), 1));
    }

    /// No read for longer than `keep` (every replica down), then a read
    /// from a replica that has just started: the others stay for `keep`
    /// from that read.
    #[test]
    fn an_outage_of_the_feed_does_not_age_the_addresses() {
        let keep = Duration::from_secs(120);
        let mut r = Remembered::new(keep);
        let t0 = Instant::now();
        let both = ips(&["198.18.1.2", "198.18.1.3"]);
        r.merge(&both, t0);
        let after = t0 + Duration::from_secs(600);
        let only = ips(&["198.18.1.2"]);
        assert_eq!(r.merge(&only, after), (both.clone(), 1));
        assert_eq!(r.merge(&only, after + keep), (only, 0));
    }

    #[test]
    fn without_keep_the_last_read_decides() {
        let mut r = Remembered::new(Duration::ZERO);
        let t0 = Instant::now();
        r.merge(&ips(&["198.18.1.2", "198.18.1.3"]), t0);
        let only = ips(&["198.18.1.3"]);
        assert_eq!(r.merge(&only, t0 + Duration::from_millis(1)), (only, 0));
    }
}
