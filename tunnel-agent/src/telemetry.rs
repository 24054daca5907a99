//! The agent's admin endpoint: `/healthz`, `/readyz` (ready once at least
//! one replica is held), `/metrics`, and `/v1/replicas`.

use std::sync::Arc;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use serde::Serialize;
use transport::admin::{AdminRoutes, Reply, JSON, OPENMETRICS, TEXT};

use crate::session::Held;
use transport::stall::StallBudget;

type Label = [(&'static str, &'static str); 1];

/// Every metric the agent exports.
pub struct AgentMetrics {
    registry: Registry,
    /// Replica connections held now, by transport (set at scrape time).
    replicas: Family<Label, Gauge>,
    /// Falls back from QUIC to HTTP/2, by reason.
    pub fallbacks: Family<Label, Counter>,
    /// QUIC re-probes while on HTTP/2, by result.
    pub reprobes: Family<Label, Counter>,
    /// Dials answered, by result (ok, not_allowed, refused, ...).
    pub dials: Family<Label, Counter>,
    pub streams_active: Gauge,
    /// Receive window lent to stalled streams (set at scrape time).
    stall_credit: Gauge,
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
            streams_active: Gauge::default(),
            stall_credit: Gauge::default(),
        };
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
            "streams_active",
            "Tunneled connections open now",
            m.streams_active.clone(),
        );
        registry.register(
            "stall_credit_bytes",
            "Receive window lent to streams whose target stopped reading",
            m.stall_credit.clone(),
        );
        AgentMetrics { registry, ..m }
    }
}

impl AgentMetrics {
    pub fn count(family: &Family<Label, Counter>, key: &'static str, value: &'static str) {
        family.get_or_create(&[(key, value)]).inc();
    }

    fn render(&self, held: &Held, stall_budget: &StallBudget) -> String {
        self.stall_credit
            .set(i64::try_from(stall_budget.lent()).unwrap_or(i64::MAX));
        let (mut quic, mut h2) = (0, 0);
        if let Ok(map) = held.lock() {
            for (_, transport) in map.values() {
                if *transport == "h2" {
                    h2 += 1
                } else {
                    quic += 1
                }
            }
        }
        self.replicas
            .get_or_create(&[("transport", "quic")])
            .set(quic);
        self.replicas.get_or_create(&[("transport", "h2")]).set(h2);
        let mut out = String::new();
        encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }
}

#[derive(Serialize)]
struct ReplicaInfo {
    address: String,
    server_id: String,
    transport: &'static str,
}

/// Routes of the agent's admin server.
pub struct AgentAdmin {
    pub metrics: Arc<AgentMetrics>,
    pub held: Held,
    pub stall_budget: Arc<StallBudget>,
}

impl AdminRoutes for AgentAdmin {
    fn get(&self, path: &str) -> Reply {
        match path {
            "/healthz" => Reply::new(200, TEXT, "ok\n"),
            "/readyz" => {
                let n = self.held.lock().map(|m| m.len()).unwrap_or(0);
                if n > 0 {
                    Reply::new(200, TEXT, format!("ready: {n} replica(s)\n"))
                } else {
                    Reply::new(503, TEXT, "not ready: no server replica registered\n")
                }
            }
            "/metrics" => Reply::new(
                200,
                OPENMETRICS,
                self.metrics.render(&self.held, &self.stall_budget),
            ),
            "/v1/replicas" => {
                let mut list: Vec<ReplicaInfo> = self
                    .held
                    .lock()
                    .map(|m| {
                        m.iter()
                            .map(|(addr, (id, transport))| ReplicaInfo {
                                address: addr.to_string(),
                                server_id: id.clone(),
                                transport,
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                list.sort_by(|a, b| a.server_id.cmp(&b.server_id));
                Reply::new(
                    200,
                    JSON,
                    serde_json::to_string_pretty(&list).expect("serializes"),
                )
            }
            _ => Reply::not_found(),
        }
    }
}
