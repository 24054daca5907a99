//! The DNAT helper's metrics. The server with `--dnat` registers them with
//! its own (`/metrics` on `--admin-listen`); the standalone helper serves
//! them on its own `--admin-listen`.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

type Label = [(&'static str, &'static str); 1];

/// Counters of the DNAT helper. Clones count into the same series.
#[derive(Clone, Debug, Default)]
pub struct DnatMetrics {
    /// Rule syncs, by result: `changed`, `unchanged`, `failed`.
    pub syncs: Family<Label, Counter>,
    /// conntrack flushes, by result: `deleted` (entries were deleted),
    /// `none` (nothing matched), `failed`, `unavailable` (no `conntrack`).
    pub conntrack_flushes: Family<Label, Counter>,
    /// conntrack entries deleted by those flushes.
    pub conntrack_entries_deleted: Counter,
    /// Reads of the standalone helper's feed, by result: `ok` or why not
    /// (`server_certificate`, `client_rejected`, `forbidden`, `timeout`...).
    pub feed_reads: Family<Label, Counter>,
    /// Addresses still redirected though the last read of the feed did
    /// not have them (`--keep-missing`).
    pub kept_missing: Gauge,
    /// Whether the last rule sync succeeded (readiness).
    pub in_sync: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl DnatMetrics {
    /// Whether the rules were synced and the last sync succeeded.
    pub fn is_in_sync(&self) -> bool {
        self.in_sync.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Registers every series with `registry` (prefix included there).
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "dnat_syncs",
            "DNAT rule syncs, by result (changed, unchanged, failed)",
            self.syncs.clone(),
        );
        registry.register(
            "dnat_conntrack_flushes",
            "conntrack flushes for destinations whose redirect changed or went away, by result \
             (deleted, none, failed, unavailable: no conntrack tool)",
            self.conntrack_flushes.clone(),
        );
        registry.register(
            "dnat_conntrack_entries_deleted",
            "conntrack entries those flushes deleted",
            self.conntrack_entries_deleted.clone(),
        );
        registry.register(
            "dnat_feed_reads",
            "Reads of the agent feed by the standalone DNAT helper, by result (ok, or the reason \
             it failed: connect, server_certificate, client_rejected, forbidden, status, \
             too_large, timeout, json, http)",
            self.feed_reads.clone(),
        );
        registry.register(
            "dnat_addresses_kept_missing",
            "Addresses the standalone DNAT helper still redirects though its last read of the \
             feed did not have them (a replica that has just started; kept for --keep-missing)",
            self.kept_missing.clone(),
        );
    }

    pub fn sync(&self, result: &'static str) {
        self.in_sync
            .store(result != "failed", std::sync::atomic::Ordering::Relaxed);
        self.syncs.get_or_create(&[("result", result)]).inc();
    }

    pub fn conntrack_flush(&self, result: &'static str) {
        self.conntrack_flushes
            .get_or_create(&[("result", result)])
            .inc();
    }

    pub fn feed_read(&self, result: &'static str) {
        self.feed_reads.get_or_create(&[("result", result)]).inc();
    }
}
