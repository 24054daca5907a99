//! Prometheus metrics of the server (text format on `/metrics`).

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::handshake::{FailureLabel, LimitedLabel, ListenerLabel};

type Label = [(&'static str, &'static str); 1];

/// Every metric the server exports.
pub struct Metrics {
    registry: Registry,
    pub agents_connected: Gauge,
    pub streams_active: Gauge,
    /// Receive window lent to stalled streams (set at scrape time).
    pub stall_credit: Gauge,
    /// Tokio tasks alive in the process's runtime (set at scrape time).
    pub tasks: Gauge,
    pub streams: Family<Label, Counter>,
    pub bytes: Family<Label, Counter>,
    pub dial_duration: Histogram,
    pub dial_failures: Family<Label, Counter>,
    pub registration_refusals: Family<Label, Counter>,
    pub registrations: Family<Label, Counter>,
    /// Client connections (CONNECT and transparent) open now, and the cap
    /// (both set at scrape time).
    pub client_connections: Gauge,
    pub client_connection_limit: Gauge,
    /// Accepts that waited because every client slot was taken.
    pub client_limit_hits: Counter,
    /// Failed accepts, by listener (EMFILE and the like).
    pub accept_errors: Family<Label, Counter>,
    /// Tunneled connections reset because the client stopped reading.
    pub client_stall_resets: Counter,
    /// Agent handshakes in flight, by listener (set at scrape time).
    pub handshakes_in_flight: Family<ListenerLabel, Gauge>,
    /// Handshakes that ran into a limit, by listener, limit and action.
    pub handshakes_limited: Family<LimitedLabel, Counter>,
    /// Handshakes that did not finish, by listener and reason.
    pub handshake_failures: Family<FailureLabel, Counter>,
    /// Agent misbehaviour the server noticed, by kind.
    pub agent_protocol_errors: Family<Label, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("edge_tunnel");
        let agents_connected = Gauge::default();
        let streams_active = Gauge::default();
        let stall_credit = Gauge::default();
        let tasks = Gauge::default();
        let streams = Family::<Label, Counter>::default();
        let bytes = Family::<Label, Counter>::default();
        // 0.5 ms .. ~16 s: a dial is one tunnel round trip plus a local connect.
        let dial_duration = Histogram::new(
            prometheus_client::metrics::histogram::exponential_buckets(0.0005, 2.0, 16),
        );
        let dial_failures = Family::<Label, Counter>::default();
        let registration_refusals = Family::<Label, Counter>::default();
        let registrations = Family::<Label, Counter>::default();
        let client_connections = Gauge::default();
        let client_connection_limit = Gauge::default();
        let client_limit_hits = Counter::default();
        let accept_errors = Family::<Label, Counter>::default();
        let client_stall_resets = Counter::default();
        registry.register(
            "client_stall_resets",
            "Tunneled connections reset because the client read nothing for --client-stall-timeout",
            client_stall_resets.clone(),
        );
        registry.register(
            "client_connections",
            "Client connections (CONNECT and transparent ingress) open now",
            client_connections.clone(),
        );
        registry.register(
            "client_connection_limit",
            "Most client connections open at once (--max-client-connections)",
            client_connection_limit.clone(),
        );
        registry.register(
            "client_connection_limit_hits",
            "Client connections that waited in the listen backlog because every slot was taken",
            client_limit_hits.clone(),
        );
        registry.register(
            "accept_errors",
            "Failed accepts, by listener (for example out of file descriptors)",
            accept_errors.clone(),
        );
        let handshakes_in_flight = Family::<ListenerLabel, Gauge>::default();
        let handshakes_limited = Family::<LimitedLabel, Counter>::default();
        let handshake_failures = Family::<FailureLabel, Counter>::default();
        let agent_protocol_errors = Family::<Label, Counter>::default();
        registry.register(
            "agents_connected",
            "Agents with a live, registered connection",
            agents_connected.clone(),
        );
        registry.register(
            "streams_active",
            "Tunneled connections open now",
            streams_active.clone(),
        );
        registry.register(
            "stall_credit_bytes",
            "Receive window lent to streams whose client stopped reading",
            stall_credit.clone(),
        );
        registry.register(
            "tasks",
            "Tokio tasks alive in the process's runtime (one or a few per connection and stream)",
            tasks.clone(),
        );
        registry.register(
            "streams",
            "Tunneled connections accepted, by ingress",
            streams.clone(),
        );
        registry.register(
            "relayed_bytes",
            "Bytes relayed, by direction (to_agent, from_agent)",
            bytes.clone(),
        );
        registry.register(
            "dial_duration_seconds",
            "Time from opening a stream to the agent's dial result",
            dial_duration.clone(),
        );
        registry.register(
            "dial_failures",
            "Tunneled connections that could not be established, by reason",
            dial_failures.clone(),
        );
        registry.register(
            "registration_refusals",
            "Agent connections refused, by reason",
            registration_refusals.clone(),
        );
        registry.register(
            "registrations",
            "Agent registrations accepted, by transport (quic, h2)",
            registrations.clone(),
        );
        registry.register(
            "handshakes_in_flight",
            "Agent handshakes (before the client certificate is verified) in flight, by transport",
            handshakes_in_flight.clone(),
        );
        registry.register(
            "handshakes_limited",
            "Agent handshakes that ran into a limit (retry_threshold, max_in_flight, per_source), \
             by transport and action (retry, ignore, close)",
            handshakes_limited.clone(),
        );
        registry.register(
            "handshake_failures",
            "Agent handshakes that did not finish, by transport and reason",
            handshake_failures.clone(),
        );
        registry.register(
            "agent_protocol_errors",
            "Protocol violations by registered agents, by kind: repeated_drain (ignored), \
             unexpected_control_message (connection closed), h2_protocol (the HTTP/2 client \
             closed the connection: a push promise, an oversized header list, a frame flood)",
            agent_protocol_errors.clone(),
        );
        Metrics {
            registry,
            agents_connected,
            streams_active,
            stall_credit,
            tasks,
            streams,
            bytes,
            dial_duration,
            dial_failures,
            registration_refusals,
            registrations,
            client_connections,
            client_connection_limit,
            client_limit_hits,
            accept_errors,
            client_stall_resets,
            handshakes_in_flight,
            handshakes_limited,
            handshake_failures,
            agent_protocol_errors,
        }
    }

    pub fn accept_failed(&self, listener: &'static str) {
        self.accept_errors
            .get_or_create(&[("listener", listener)])
            .inc();
    }

    pub fn agent_protocol_error(&self, kind: &'static str) {
        self.agent_protocol_errors
            .get_or_create(&[("kind", kind)])
            .inc();
    }

    pub fn refused(&self, reason: &'static str) {
        self.registration_refusals
            .get_or_create(&[("reason", reason)])
            .inc();
    }

    pub fn dial_failed(&self, reason: &'static str) {
        self.dial_failures
            .get_or_create(&[("reason", reason)])
            .inc();
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }
}
