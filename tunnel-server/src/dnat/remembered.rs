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

/// Addresses by when a read of the feed last had them.
#[derive(Debug)]
pub struct Remembered {
    keep: Duration,
    last_seen: HashMap<IpAddr, Instant>,
}

impl Remembered {
    /// `keep`: how long an address missing from every read stays
    /// (`Duration::ZERO`: the last read alone decides).
    pub fn new(keep: Duration) -> Self {
        Remembered {
            keep,
            last_seen: HashMap::new(),
        }
    }

    /// Takes a read made at `now`; returns the addresses to redirect
    /// (sorted), and how many of them the read did not have.
    pub fn merge(&mut self, read: &[IpAddr], now: Instant) -> (Vec<IpAddr>, usize) {
        for a in read {
            self.last_seen.insert(*a, now);
        }
        let keep = self.keep;
        self.last_seen
            .retain(|_, seen| now.saturating_duration_since(*seen) < keep || *seen == now);
        let mut addresses: Vec<IpAddr> = self.last_seen.keys().copied().collect();
        addresses.sort_unstable();
        let missing = self.last_seen.values().filter(|seen| **seen != now).count();
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
    /// address for `keep`, then lets it go; one that has it again renews it.
    #[test]
    fn a_partial_read_keeps_the_others_for_a_while() {
        let keep = Duration::from_secs(120);
        let mut r = Remembered::new(keep);
        let t0 = Instant::now();
        let both = ips(&["198.18.1.2", "198.18.1.3"]);
        assert_eq!(r.merge(&both, t0), (both.clone(), 0));
        // A fresh replica knows only .2.
        let only = ips(&["198.18.1.2"]);
        assert_eq!(
            r.merge(&only, t0 + Duration::from_secs(5)),
            (both.clone(), 1)
        );
        assert_eq!(
            r.merge(&only, t0 + Duration::from_secs(119)),
            (both.clone(), 1)
        );
        // Back on a replica that has both: renewed.
        let t1 = t0 + Duration::from_secs(125);
        assert_eq!(r.merge(&both, t1), (both.clone(), 0));
        // Gone from every read for `keep`: dropped.
        assert_eq!(
            r.merge(&only, t1 + Duration::from_secs(60)),
            (both.clone(), 1)
        );
        assert_eq!(r.merge(&only, t1 + keep), (only.clone(), 0));
        assert_eq!(r.merge(&[], t1 + keep + keep), (vec![], 0));
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
