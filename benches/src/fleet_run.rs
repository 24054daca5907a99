//! The fleet workload: a fresh server, `edge-fleet` registering many
//! agents to it from the edge namespace (through the NAT), then the
//! server's memory and its CPU while the fleet only sends keep-alives.

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use e2e::netns::{bin, CLOUD_IP};
use serde::Serialize;

use crate::cli::Plan;
use crate::proc_stats::{cpu_seconds, proc_status};
use crate::testbed::Testbed;

const LISTEN_PORT: u16 = 8444;
const ADMIN: &str = "127.0.0.1:9092";

#[derive(Serialize, Clone, Debug)]
pub struct FleetReport {
    pub agents: usize,
    /// Agents the generator saw registered (Welcome received).
    pub registered: usize,
    pub failed: usize,
    /// Agents that needed more than one attempt (registered or not).
    pub retried: usize,
    /// `edge_tunnel_agents_connected` on the server once all had registered.
    pub server_agents_connected: u64,
    pub register_secs: f64,
    pub server_idle_rss_before_kib: u64,
    pub server_rss_kib: u64,
    pub server_hwm_kib: u64,
    /// Server CPU over the idle window, as a share of one core.
    pub server_idle_cpu_share: f64,
    pub idle_window_secs: f64,
    pub first_error: Option<String>,
    /// Why the first agent that was tried again failed its first attempt.
    pub first_retried_error: Option<String>,
}

#[derive(serde::Deserialize)]
struct GeneratorReport {
    registered: usize,
    failed: usize,
    retried: usize,
    register_secs: f64,
    first_error: Option<String>,
    first_retried_error: Option<String>,
}

async fn try_get(path: &str) -> Option<String> {
    let addr = ADMIN.parse().ok()?;
    tokio::net::TcpStream::connect(addr).await.ok()?;
    Some(e2e::http_get(addr, path).await.1)
}

fn gauge(metrics: &str, name: &str) -> Option<u64> {
    metrics.lines().find_map(|l| {
        l.strip_prefix(name)
            .and_then(|v| v.trim().parse::<f64>().ok())
            .map(|v| v as u64)
    })
}

pub fn run(bed: &Testbed, plan: &Plan) -> Result<FleetReport> {
    let (topo, pki) = (&bed.topo, &bed.pki);
    let (agents, idle) = (plan.fleet_agents, Duration::from_secs(plan.fleet_idle_secs));
    let ca_dir = topo.dir.join("fleet-ca");
    std::fs::create_dir_all(&ca_dir)?;
    let ca = pki.ca.pem();
    std::fs::write(ca_dir.join("ca.crt"), &ca.cert)?;
    std::fs::write(ca_dir.join("ca.key"), &ca.key)?;

    let mut server = topo.cloud.spawn(
        bin("tunnel-server").to_str().context("path")?,
        &[
            "--listen",
            &format!("{CLOUD_IP}:{LISTEN_PORT}"),
            "--cert-dir",
            pki.server_dir().to_str().context("path")?,
            "--admin-listen",
            ADMIN,
            "--server-id",
            "fleet",
        ],
        &topo.dir.join("fleet-server.log"),
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while topo.cloud.block_on(|| try_get("/healthz")).is_none() {
        if Instant::now() > deadline {
            bail!("fleet server did not start: {}", server.log_text());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_millis(500));
    let rss_before = proc_status(server.pid(), "VmRSS:");

    let mut fleet = topo.edge.spawn(
        bin("edge-fleet").to_str().context("path")?,
        &[
            "--server",
            &format!("{CLOUD_IP}:{LISTEN_PORT}"),
            "--server-name",
            CLOUD_IP,
            "--ca-dir",
            ca_dir.to_str().context("path")?,
            "--agents",
            &agents.to_string(),
        ],
        &topo.dir.join("fleet.log"),
    );
    // Issuing the certificates comes first and is not timed; registration
    // itself gives up after 60 s per agent.
    let deadline = Instant::now() + Duration::from_secs(600);
    let generated: GeneratorReport = loop {
        let log = fleet.log_text();
        if let Some(json) = log.lines().find_map(|l| l.strip_prefix("FLEET ")) {
            break serde_json::from_str(json).context("edge-fleet report")?;
        }
        if !fleet.is_running() || Instant::now() > deadline {
            bail!("edge-fleet did not report: {log}");
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    // Let the server finish its side of the last registrations.
    std::thread::sleep(Duration::from_secs(2));
    let metrics = topo
        .cloud
        .block_on(|| try_get("/metrics"))
        .unwrap_or_default();
    let connected = gauge(&metrics, "edge_tunnel_agents_connected").unwrap_or(0);

    // Idle: the fleet only sends keep-alives (every 10 s per agent).
    let pid = server.pid();
    let cpu0 = cpu_seconds(pid);
    let t0 = Instant::now();
    std::thread::sleep(idle);
    let cpu = cpu_seconds(pid) - cpu0;
    let window = t0.elapsed().as_secs_f64();
    let report = FleetReport {
        agents,
        registered: generated.registered,
        failed: generated.failed,
        retried: generated.retried,
        server_agents_connected: connected,
        register_secs: generated.register_secs,
        server_idle_rss_before_kib: rss_before,
        server_rss_kib: proc_status(pid, "VmRSS:"),
        server_hwm_kib: proc_status(pid, "VmHWM:"),
        server_idle_cpu_share: cpu / window,
        idle_window_secs: window,
        first_error: generated.first_error,
        first_retried_error: generated.first_retried_error,
    };
    fleet.terminate();
    server.terminate();
    Ok(report)
}
