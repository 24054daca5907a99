//! Metrics the server and the agent export the same way.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use transport::BufferBudget;

/// The relay buffer budget (`--relay-buffer-budget`): its limit, what the
/// relays hold of it, and the doublings it refused (set at scrape time).
#[derive(Default)]
pub struct RelayBufferMetrics {
    budget: Gauge,
    grown: Gauge,
    refused: Counter,
}

impl RelayBufferMetrics {
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "relay_buffer_budget_bytes",
            "Most all relay buffers together may grow beyond their first 4 KiB per direction \
             (--relay-buffer-budget)",
            self.budget.clone(),
        );
        registry.register(
            "relay_buffer_grown_bytes",
            "Relay buffer memory held beyond the first 4 KiB per direction now",
            self.grown.clone(),
        );
        registry.register(
            "relay_buffer_growth_refused",
            "Relay buffer doublings refused because --relay-buffer-budget was spent \
             (the connection relays on with smaller reads; a refused buffer asks again \
             after 64 full reads)",
            self.refused.clone(),
        );
    }

    /// Brings the values up to date.
    pub fn export(&self, budget: &BufferBudget) {
        let g = |n: usize| i64::try_from(n).unwrap_or(i64::MAX);
        self.budget.set(g(budget.limit()));
        self.grown.set(g(budget.grown()));
        self.refused
            .inner()
            .store(budget.refused(), std::sync::atomic::Ordering::Relaxed);
    }
}
