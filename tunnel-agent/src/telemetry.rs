//! The agent's admin endpoint: `/healthz`, `/readyz` (ready once at least
//! one replica is held; it says how many of how many the servers said
//! exist), `/metrics`, and `/v1/replicas`.

use std::sync::Arc;

use daemon::admin::{AdminRoutes, Reply, JSON, OPENMETRICS, TEXT};
use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use serde::Serialize;

use crate::replicas::HeldReplicas;
use crate::selector::{FallbackReason, Transport};
use transport::window::ReceiveBudget;

type Label = [(&'static str, &'static str); 1];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TransportLabel {
    transport: Transport,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FallbackLabel {
    reason: FallbackReason,
}

/// How a QUIC re-probe went.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum ReprobeResult {
    /// QUIC registered; the agent moved over.
    QuicBack,
    Failed,
}

impl EncodeLabelValue for ReprobeResult {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        let label = match self {
            ReprobeResult::QuicBack => "quic_back",
            ReprobeResult::Failed => "failed",
        };
        std::fmt::Write::write_str(encoder, label)
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReprobeLabel {
    result: ReprobeResult,
}

/// Every metric the agent exports.
pub struct AgentMetrics {
    registry: Registry,
    /// Replica connections held now, by transport (set at scrape time).
    replicas: Family<TransportLabel, Gauge>,
    /// Falls back from QUIC to HTTP/2, by reason.
    fallbacks: Family<FallbackLabel, Counter>,
    /// QUIC re-probes while on HTTP/2, by result.
    reprobes: Family<ReprobeLabel, Counter>,
    /// Dials answered, by result (ok, not_allowed, refused, ...).
    pub dials: Family<Label, Counter>,
    /// How the answers held for the target's first bytes went out.
    pub held_results: Family<Label, Counter>,
    pub streams_active: Gauge,
    /// Receive window lent to stalled streams, the windows advertised,
    /// and lending refused by reason (set at scrape time).
    stall_credit: Gauge,
    receive_windows: Gauge,
    stall_credit_refusals: Family<Label, Counter>,
    /// The relay buffer budget (set at scrape time).
    relay_buffers: daemon::metrics::RelayBufferMetrics,
    /// The admin listener's connections.
    pub admin: daemon::admin::AdminMetrics,
    /// Tokio tasks alive in the process's runtime (set at scrape time).
    tasks: Gauge,
    /// How many replicas the servers say exist (set at scrape time).
    replicas_expected: Gauge,
    /// When the certificate last loaded expires (Unix seconds).
    certificate_expiry: Gauge,
    /// The expiry a warning was last logged for (one per certificate).
    warned_expiry: std::sync::atomic::AtomicI64,
}

impl Default for AgentMetrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("edge_tunnel_agent");
        let m = AgentMetrics {
            registry: Registry::default(),
            replicas: Family::default(),
            fallbacks: Family::default(),
            reprobes: Family::default(),
            dials: Family::default(),
            held_results: Family::default(),
            streams_active: Gauge::default(),
            stall_credit: Gauge::default(),
            receive_windows: Gauge::default(),
            stall_credit_refusals: Family::default(),
            relay_buffers: Default::default(),
            admin: daemon::admin::AdminMetrics::default(),
            tasks: Gauge::default(),
            replicas_expected: Gauge::default(),
            certificate_expiry: Gauge::default(),
            warned_expiry: std::sync::atomic::AtomicI64::new(0),
        };
        registry.register(
            "certificate_expiry_timestamp_seconds",
            "When this node's certificate (--cert-dir tls.crt, as last loaded) expires, in Unix seconds",
            m.certificate_expiry.clone(),
        );
        registry.register(
            "replicas_expected",
            "Server replicas the servers say exist (0: they do not say); fewer connected means \
             some replica cannot reach this node",
            m.replicas_expected.clone(),
        );
        registry.register(
            "receive_windows_bytes",
            "Receive windows advertised to the server replicas now, lent credit included \
             (at most --receive-budget)",
            m.receive_windows.clone(),
        );
        m.relay_buffers.register(&mut registry);
        m.admin.register(&mut registry);
        registry.register(
            "stall_credit_refusals",
            "Stalled streams lent no credit, by the limit reached (process, connection)",
            m.stall_credit_refusals.clone(),
        );
        registry.register(
            "replicas_connected",
            "Server replicas this agent holds a registered connection to, by transport",
            m.replicas.clone(),
        );
        registry.register(
            "transport_fallbacks",
            "Falls back from QUIC to HTTP/2, by reason",
            m.fallbacks.clone(),
        );
        registry.register(
            "quic_reprobes",
            "QUIC re-probes while on HTTP/2, by result",
            m.reprobes.clone(),
        );
        registry.register(
            "dials",
            "Dial requests answered, by result",
            m.dials.clone(),
        );
        registry.register(
            "dial_results_held",
            "Answers to transparent dials held for the target's first bytes (--dial-result-hold), \
             by how they went out: with_data (in one packet with them), alone (the hold ran out), \
             before_eof (the target closed without a byte); counted when the connection ends",
            m.held_results.clone(),
        );
        registry.register(
            "streams_active",
            "Tunneled connections open now",
            m.streams_active.clone(),
        );
        registry.register(
            "stall_credit_bytes",
            "Receive window lent to streams whose target stopped reading",
            m.stall_credit.clone(),
        );
        registry.register(
            "tasks",
            "Tokio tasks alive in the process's runtime (one or a few per connection and stream)",
            m.tasks.clone(),
        );
        AgentMetrics { registry, ..m }
    }
}

impl AgentMetrics {
    /// Records the certificate just loaded: its expiry, and a warning
    /// (once per certificate) when that is near.
    pub fn certificate_loaded(&self, identity: &certs::Identity) {
        self.certificate_expiry.set(identity.not_after);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
        let warned = self
            .warned_expiry
            .swap(identity.not_after, std::sync::atomic::Ordering::Relaxed);
        if identity.expiry_near(now) && warned != identity.not_after {
            tracing::warn!(
                days_left = identity.remaining(now) / 86_400,
                "this node's certificate expires soon: renew it (the agent reads --cert-dir at every connection)"
            );
        }
    }

    pub fn count(family: &Family<Label, Counter>, key: &'static str, value: &'static str) {
        family.get_or_create(&[(key, value)]).inc();
    }

    /// Counts a move from QUIC to HTTP/2.
    pub fn fallback(&self, reason: FallbackReason) {
        self.fallbacks
            .get_or_create(&FallbackLabel { reason })
            .inc();
    }

    /// How many fallbacks were counted for `reason`.
    pub fn fallbacks(&self, reason: FallbackReason) -> u64 {
        self.fallbacks
            .get_or_create(&FallbackLabel { reason })
            .get()
    }

    /// Counts a QUIC re-probe.
    pub fn reprobe(&self, result: ReprobeResult) {
        self.reprobes.get_or_create(&ReprobeLabel { result }).inc();
    }

    /// How many re-probes ended with `result`.
    pub fn reprobes(&self, result: ReprobeResult) -> u64 {
        self.reprobes.get_or_create(&ReprobeLabel { result }).get()
    }

    fn render(
        &self,
        held: &HeldReplicas,
        budget: &ReceiveBudget,
        relay_buffers: &transport::BufferBudget,
    ) -> String {
        self.relay_buffers.export(relay_buffers);
        let stats = budget.stats();
        let g = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
        self.stall_credit.set(g(stats.lent));
        self.receive_windows.set(g(stats.windows));
        for reason in transport::window::Refusal::ALL {
            self.stall_credit_refusals
                .get_or_create(&[("reason", reason.label())])
                .inner()
                .store(budget.refused(reason), std::sync::atomic::Ordering::Relaxed);
        }
        self.tasks.set(daemon::admin::live_tasks());
        self.replicas_expected.set(i64::from(held.expected()));
        for transport in [Transport::Quic, Transport::H2] {
            let n = i64::try_from(held.count(transport)).unwrap_or(i64::MAX);
            self.replicas
                .get_or_create(&TransportLabel { transport })
                .set(n);
        }
        let mut out = String::new();
        encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }
}

#[derive(Serialize)]
struct ReplicaInfo {
    address: String,
    slot: u16,
    server_id: String,
    transport: &'static str,
    /// How many replicas this server says exist (0: it does not say).
    replicas: u16,
}

/// Routes of the agent's admin server.
pub struct AgentAdmin {
    pub metrics: Arc<AgentMetrics>,
    pub held: HeldReplicas,
    pub receive_budget: Arc<ReceiveBudget>,
    pub relay_buffers: Arc<transport::BufferBudget>,
    pub open_streams: Arc<crate::dial::OpenStreams>,
}

impl AdminRoutes for AgentAdmin {
    fn get(&self, path: &str) -> Reply {
        match path {
            "/healthz" => Reply::new(200, TEXT, "ok\n"),
            "/readyz" => {
                let n = self.held.len();
                let of = match self.held.expected() {
                    0 => String::new(),
                    e => format!(" of {e}"),
                };
                if n > 0 {
                    Reply::new(200, TEXT, format!("ready: {n}{of} replica(s) held\n"))
                } else {
                    Reply::new(503, TEXT, "not ready: no server replica registered\n")
                }
            }
            "/metrics" => Reply::new(
                200,
                OPENMETRICS,
                self.metrics
                    .render(&self.held, &self.receive_budget, &self.relay_buffers),
            ),
            "/v1/replicas" => {
                let list: Vec<ReplicaInfo> = self
                    .held
                    .list()
                    .into_iter()
                    .map(|r| ReplicaInfo {
                        address: r.addr.to_string(),
                        slot: r.slot,
                        server_id: r.server_id,
                        transport: r.transport.label(),
                        replicas: r.expected,
                    })
                    .collect();
                Reply::new(
                    200,
                    JSON,
                    serde_json::to_string_pretty(&list).expect("serializes"),
                )
            }
            "/v1/streams" => Reply::new(
                200,
                JSON,
                serde_json::to_string_pretty(&self.open_streams.page()).expect("serializes"),
            ),
            _ => Reply::not_found(),
        }
    }
}
