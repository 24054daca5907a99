//! Admin endpoints: `/healthz`, `/readyz`, `/metrics`, `/v1/agents`,
//! `/v1/connections`. The admin port has no authentication: `/v1/agents`
//! there leaves out where the edge sites connect from (the mTLS feed has
//! it).

use std::sync::atomic::Ordering;
use std::sync::Arc;

use daemon::admin::{AdminRoutes, Reply, JSON, OPENMETRICS, TEXT};
use serde::Serialize;
use tokio::net::TcpListener;

use crate::Shared;

pub async fn serve(listener: TcpListener, shared: Arc<Shared>) {
    let limit = shared.config.admin_max_connections;
    let metrics = shared.metrics.admin.clone();
    daemon::admin::serve(listener, Arc::new(ServerAdmin(shared)), limit, metrics).await
}

struct ServerAdmin(Arc<Shared>);

impl AdminRoutes for ServerAdmin {
    fn get(&self, path: &str) -> Reply {
        let shared = &self.0;
        match path {
            "/healthz" => Reply::new(200, TEXT, "ok\n"),
            "/readyz" if shared.ready.load(Ordering::SeqCst) => Reply::new(200, TEXT, "ready\n"),
            "/readyz" => Reply::new(503, TEXT, "not ready\n"),
            "/metrics" => Reply::new(200, OPENMETRICS, shared.render_metrics()),
            "/v1/agents" => Reply::new(200, JSON, agents_json(shared, Listing::Redacted)),
            "/v1/connections" => Reply::new(200, JSON, connections_json(shared)),
            _ => Reply::not_found(),
        }
    }
}

/// One entry of `/v1/agents`.
#[derive(Serialize)]
pub struct AgentInfo {
    pub node: String,
    pub addresses: Vec<String>,
    /// RFC 3339.
    pub connected_since: String,
    /// The edge site's public address (its NAT's): only on the
    /// authenticated feed; `null` on the admin port, which has no
    /// authentication.
    pub remote_address: Option<String>,
    pub transport: &'static str,
    pub streams_active: i64,
    /// QUIC's RTT estimate; null over HTTP/2.
    pub rtt_ms: Option<f64>,
    /// QUIC's sending side towards the agent; null over HTTP/2.
    pub quic_path: Option<QuicPath>,
    pub draining: bool,
    /// When the agent's certificate expires (RFC 3339).
    pub not_after: String,
    /// The certificate's serial and lineage (its enrollment, the same
    /// through renewals; null if it was issued without one): what a
    /// deny-list line names (`serial=`, `lineage=`).
    pub serial: String,
    pub lineage: Option<String>,
}

/// The server's sending side of one agent's QUIC connection. A window of
/// a few packets without losses while data waits is a sender held at its
/// floor (benches/RESULTS.md); losses and congestion events say the path
/// itself is short of capacity.
#[derive(Serialize)]
pub struct QuicPath {
    pub congestion_window_bytes: u64,
    pub sent_packets: u64,
    pub lost_packets: u64,
    pub congestion_events: u64,
}

impl From<quinn::PathStats> for QuicPath {
    fn from(p: quinn::PathStats) -> Self {
        QuicPath {
            congestion_window_bytes: p.cwnd,
            sent_packets: p.sent_packets,
            lost_packets: p.lost_packets,
            congestion_events: p.congestion_events,
        }
    }
}

/// How much of the agent listing a reader may see.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Listing {
    /// Everything (the mTLS feed).
    Full,
    /// Without the edge sites' public addresses (the admin port).
    Redacted,
}

/// The `/v1/agents` listing (also what `--feed-listen` serves, in full).
pub(crate) fn agents_json(shared: &Shared, listing: Listing) -> String {
    let agents: Vec<AgentInfo> = shared
        .registry
        .snapshot()
        .iter()
        .map(|a| {
            // One look at the connection's statistics for both fields.
            let path = a.link.path();
            AgentInfo {
                node: a.node.clone(),
                addresses: a.addresses.iter().map(ToString::to_string).collect(),
                connected_since: time::OffsetDateTime::from(a.connected_since)
                    .format(&time::format_description::well_known::Rfc3339)
                    .unwrap_or_default(),
                remote_address: (listing == Listing::Full)
                    .then(|| a.link.remote_address().to_string()),
                transport: a.link.transport(),
                streams_active: a.streams_active.load(Ordering::Relaxed),
                rtt_ms: path.as_ref().map(|p| p.rtt.as_secs_f64() * 1000.0),
                quic_path: path.map(QuicPath::from),
                draining: a.is_draining(),
                not_after: time::OffsetDateTime::from_unix_timestamp(a.not_after)
                    .ok()
                    .and_then(|t| {
                        t.format(&time::format_description::well_known::Rfc3339)
                            .ok()
                    })
                    .unwrap_or_default(),
                serial: a.serial.clone(),
                lineage: a.lineage.clone(),
            }
        })
        .collect();
    serde_json::to_string_pretty(&agents).expect("agent info serializes")
}

/// Tunneled connections `/v1/connections` lists one by one, oldest first;
/// it counts them all.
pub const CONNECTIONS_LISTED: usize = 1_000;

/// The `/v1/connections` page: how many tunneled connections are being
/// relayed and the oldest of them.
#[derive(Serialize)]
struct Connections {
    open: usize,
    oldest: Vec<crate::ingress::RelayInfo>,
}

fn connections_json(shared: &Shared) -> String {
    let open = crate::ingress::open_relays_oldest_first(shared);
    let page = Connections {
        open: open.len(),
        oldest: open
            .iter()
            .take(CONNECTIONS_LISTED)
            .map(|t| t.info())
            .collect(),
    };
    serde_json::to_string_pretty(&page).expect("connection info serializes")
}
