//! Prometheus metrics of the server (text format on `/metrics`).

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::handshake::{FailureLabel, LimitedLabel, ListenerLabel};

type Label = [(&'static str, &'static str); 1];
type NodeLabel = [(&'static str, String); 1];

/// Every metric the server exports.
pub struct Metrics {
    registry: Registry,
    pub agents_connected: Gauge,
    pub streams_active: Gauge,
    /// The receive budget: its limit, the windows drawn from it, each
    /// connection's share, what is lent to stalled streams, and lending
    /// refused by reason (all set at scrape time).
    pub receive_budget: Gauge,
    pub receive_windows: Gauge,
    pub receive_window_share: Gauge,
    pub stall_credit: Gauge,
    pub stall_credit_refusals: Family<Label, Counter>,
    /// The relay buffer budget (set at scrape time).
    pub relay_buffers: daemon::metrics::RelayBufferMetrics,
    /// The admin listener's connections.
    pub admin: daemon::admin::AdminMetrics,
    /// Tunneled connections open per node, and the per-node limit (set at
    /// scrape time).
    pub node_streams: Family<NodeLabel, Gauge>,
    pub node_stream_limit: Gauge,
    /// Client connections refused by --max-streams-per-client.
    pub client_stream_limit_hits: Counter,
    /// Tunneled connections reset by --relay-idle-timeout.
    pub relay_idle_resets: Counter,
    /// CONNECT tunnels reset because the credential that opened them was
    /// revoked.
    pub revoked_tunnel_resets: Counter,
    /// CONNECT requests authorized, by credential and token name.
    pub connect_authorized: Family<[(&'static str, String); 2], Counter>,
    /// CONNECT requests refused for want of credentials, by reason.
    pub connect_auth_failures: Family<Label, Counter>,
    /// Direct dials (`--direct-cidr`), by result.
    pub direct_dials: Family<Label, Counter>,
    /// Token file reloads, by result (ok, error).
    pub token_file_reloads: Family<Label, Counter>,
    /// Enrollments with a bootstrap token, by result (issued, or why not).
    pub enrollments: Family<Label, Counter>,
    /// Certificate renewals, by result (issued, or why not).
    pub renewals: Family<Label, Counter>,
    /// Reloads of the certificate directory and deny-list, by result.
    pub certificate_reloads: Family<Label, Counter>,
    /// Agent connections closed because their certificate was revoked
    /// (deny-list) or expired while connected, by reason.
    pub agents_disconnected: Family<Label, Counter>,
    /// Clients with a connection open now (set at scrape time).
    pub clients: Gauge,
    /// Tokio tasks alive in the process's runtime (set at scrape time).
    pub tasks: Gauge,
    /// The replica count `Welcome` tells agents (set at scrape time).
    pub replicas_expected: Gauge,
    /// When this server's certificate expires (Unix seconds).
    pub certificate_expiry: Gauge,
    /// The soonest expiry among the connected agents' certificates (set
    /// at scrape time; 0 with no agent).
    pub agent_certificate_expiry_min: Gauge,
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
    /// The same, sooner, because no stall credit was left for them.
    pub stalled_streams_shed: Counter,
    /// Agent handshakes in flight, by listener (set at scrape time).
    pub handshakes_in_flight: Family<ListenerLabel, Gauge>,
    /// Handshakes that ran into a limit, by listener, limit and action.
    pub handshakes_limited: Family<LimitedLabel, Counter>,
    /// Handshakes that did not finish, by listener and reason.
    pub handshake_failures: Family<FailureLabel, Counter>,
    /// Agent misbehaviour the server noticed, by kind.
    pub agent_protocol_errors: Family<Label, Counter>,
    /// Connections and requests on `--feed-listen`, by result.
    pub feed_requests: Family<Label, Counter>,
    /// The DNAT helper's (`--dnat`).
    pub dnat: crate::dnat::metrics::DnatMetrics,
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
        let receive_budget = Gauge::default();
        let receive_windows = Gauge::default();
        let receive_window_share = Gauge::default();
        let stall_credit_refusals = Family::<Label, Counter>::default();
        let node_streams = Family::<NodeLabel, Gauge>::default();
        let node_stream_limit = Gauge::default();
        let relay_idle_resets = Counter::default();
        let revoked_tunnel_resets = Counter::default();
        let client_stream_limit_hits = Counter::default();
        registry.register(
            "client_stream_limit_hits",
            "Client connections refused at once because their client had --max-streams-per-client open",
            client_stream_limit_hits.clone(),
        );
        let clients = Gauge::default();
        let connect_authorized = Family::<[(&'static str, String); 2], Counter>::default();
        let connect_auth_failures = Family::<Label, Counter>::default();
        let token_file_reloads = Family::<Label, Counter>::default();
        let enrollments = Family::<Label, Counter>::default();
        let renewals = Family::<Label, Counter>::default();
        let certificate_reloads = Family::<Label, Counter>::default();
        let agents_disconnected = Family::<Label, Counter>::default();
        registry.register(
            "enrollments",
            "Agent enrollments with a bootstrap token, by result (issued, or the refusal)",
            enrollments.clone(),
        );
        registry.register(
            "renewals",
            "Agent certificate renewals, by result (issued, or the refusal)",
            renewals.clone(),
        );
        registry.register(
            "certificate_reloads",
            "Reloads of the server certificate, key, CA bundle and deny-list after they changed on disk, by result (ok, error: the old ones stay)",
            certificate_reloads.clone(),
        );
        registry.register(
            "agents_disconnected",
            "Agent connections closed because the certificate was revoked (deny-list) or expired while connected, by reason",
            agents_disconnected.clone(),
        );
        let direct_dials = Family::<Label, Counter>::default();
        registry.register(
            "direct_dials",
            "Connections the server dialed itself because no agent serves the target and it is in --direct-cidr, by result (ok, no_agent: outside the ranges, direct_failed, direct_timeout)",
            direct_dials.clone(),
        );
        registry.register(
            "connect_authorized",
            "CONNECT requests authorized, by credential (token, unix, none) and token name",
            connect_authorized.clone(),
        );
        registry.register(
            "connect_auth_failures",
            "CONNECT requests answered 407, by reason (missing, invalid)",
            connect_auth_failures.clone(),
        );
        registry.register(
            "token_file_reloads",
            "Reloads of --connect-token-file, by result (ok; error: the old tokens stay)",
            token_file_reloads.clone(),
        );
        let relay_buffers = daemon::metrics::RelayBufferMetrics::default();
        relay_buffers.register(&mut registry);
        let admin = daemon::admin::AdminMetrics::default();
        admin.register(&mut registry);
        registry.register(
            "receive_budget_bytes",
            "Most receive window all agent connections together may advertise (--receive-budget)",
            receive_budget.clone(),
        );
        registry.register(
            "receive_windows_bytes",
            "Receive windows advertised to agents now, lent credit included",
            receive_windows.clone(),
        );
        registry.register(
            "receive_window_share_bytes",
            "Base receive window of each agent connection now (shrinks as agents connect and credit is lent)",
            receive_window_share.clone(),
        );
        registry.register(
            "stall_credit_refusals",
            "Stalled streams lent no credit, by the limit reached: process (three quarters of \
             the budget), connection (a quarter), client (--stall-credit-per-client)",
            stall_credit_refusals.clone(),
        );
        registry.register(
            "node_streams",
            "Tunneled connections open to a node through this server now",
            node_streams.clone(),
        );
        registry.register(
            "node_stream_limit",
            "Most tunneled connections open to one node (--max-streams-per-node)",
            node_stream_limit.clone(),
        );
        registry.register(
            "relay_idle_resets",
            "Tunneled connections reset because nothing moved for --relay-idle-timeout",
            relay_idle_resets.clone(),
        );
        registry.register(
            "revoked_tunnel_resets",
            "CONNECT tunnels reset because the certificate or token that opened them was revoked",
            revoked_tunnel_resets.clone(),
        );
        registry.register(
            "clients",
            "Client addresses (IPv4, IPv6 /64) with a tunneled connection open now",
            clients.clone(),
        );
        let tasks = Gauge::default();
        let replicas_expected = Gauge::default();
        let certificate_expiry = Gauge::default();
        let agent_certificate_expiry_min = Gauge::default();
        registry.register(
            "certificate_expiry_timestamp_seconds",
            "When this server's certificate (--cert-dir tls.crt) expires, in Unix seconds",
            certificate_expiry.clone(),
        );
        registry.register(
            "agent_certificate_expiry_min_timestamp_seconds",
            "The soonest expiry among the connected agents' certificates, in Unix seconds (0: no agent)",
            agent_certificate_expiry_min.clone(),
        );
        registry.register(
            "replicas_expected",
            "How many server replicas agents are told exist (--server-count, --peers-dns; 0 unknown)",
            replicas_expected.clone(),
        );
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
        let stalled_streams_shed = Counter::default();
        registry.register(
            "stalled_streams_shed",
            "Tunneled connections reset after --stall-shed-timeout because their client stopped \
             reading and no stall credit was left for them",
            stalled_streams_shed.clone(),
        );
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
        let feed_requests = Family::<Label, Counter>::default();
        registry.register(
            "feed_requests",
            "Connections and requests on the agent feed (--feed-listen), by result: ok, \
             forbidden (a certificate that is not the DNAT helper's), not_found, bad_request, \
             tls_failed (handshake failed or timed out), limited (--feed-max-connections)",
            feed_requests.clone(),
        );
        let dnat = crate::dnat::metrics::DnatMetrics::default();
        dnat.register(&mut registry);
        Metrics {
            registry,
            feed_requests,
            dnat,
            agents_connected,
            streams_active,
            stall_credit,
            receive_budget,
            receive_windows,
            receive_window_share,
            stall_credit_refusals,
            relay_buffers,
            admin,
            node_streams,
            node_stream_limit,
            relay_idle_resets,
            revoked_tunnel_resets,
            client_stream_limit_hits,
            connect_authorized,
            connect_auth_failures,
            token_file_reloads,
            enrollments,
            renewals,
            certificate_reloads,
            agents_disconnected,
            direct_dials,
            clients,
            tasks,
            replicas_expected,
            certificate_expiry,
            agent_certificate_expiry_min,
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
            stalled_streams_shed,
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

    pub fn feed_request(&self, result: &'static str) {
        self.feed_requests
            .get_or_create(&[("result", result)])
            .inc();
    }

    pub fn refused(&self, reason: &'static str) {
        self.registration_refusals
            .get_or_create(&[("reason", reason)])
            .inc();
    }

    pub fn connect_authorized(&self, credential: &'static str, name: &str) {
        self.connect_authorized
            .get_or_create(&[
                ("credential", credential.to_owned()),
                ("name", name.to_owned()),
            ])
            .inc();
    }

    pub fn connect_auth_failed(&self, reason: &'static str) {
        self.connect_auth_failures
            .get_or_create(&[("reason", reason)])
            .inc();
    }

    pub fn dial_failed(&self, reason: &'static str) {
        self.dial_failures
            .get_or_create(&[("reason", reason)])
            .inc();
    }

    /// Brings the receive-budget gauges and refusal counts up to date.
    pub fn export_receive_budget(&self, budget: &transport::window::ReceiveBudget) {
        let stats = budget.stats();
        let g = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
        self.receive_budget.set(g(stats.limits.total));
        self.receive_windows.set(g(stats.windows));
        self.receive_window_share.set(g(stats.share));
        self.stall_credit.set(g(stats.lent));
        for reason in transport::window::Refusal::ALL {
            let counter = self
                .stall_credit_refusals
                .get_or_create(&[("reason", reason.label())]);
            counter
                .inner()
                .store(budget.refused(reason), std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// Sets the per-node stream gauges from the registered agents (nodes
    /// that left are dropped).
    pub fn export_node_streams(
        &self,
        agents: &[std::sync::Arc<crate::registry::AgentHandle>],
        limit: usize,
    ) {
        self.node_streams.clear();
        for agent in agents {
            let open = agent
                .streams_active
                .load(std::sync::atomic::Ordering::Relaxed);
            self.node_streams
                .get_or_create(&[("node", agent.node.clone())])
                .set(open);
        }
        self.node_stream_limit
            .set(i64::try_from(limit).unwrap_or(i64::MAX));
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }
}
