//! What a run produces: the rows and the rest of the [`Report`], its
//! Markdown rendering, and the files it is written to.

use std::time::Duration;

use anyhow::Result;
use serde::Serialize;

use crate::attacks::AttackRow;
use crate::cli::{Cli, Workload};
use crate::fleet_run::FleetReport;
use crate::proc_stats::proc_status;
use crate::soak::SoakReport;
use crate::socket_mem;
use crate::testbed::Testbed;

/// Label of the rows measured through the reference forwarders.
pub const REFERENCE: &str = "two plain TCP forwarders (reference, no tunnel)";

/// One row of the results table.
#[derive(Serialize, Clone)]
pub struct Row {
    workload: String,
    unit: String,
    direct: f64,
    tunnel: f64,
    /// tunnel ÷ direct
    ratio: f64,
    target: String,
    met: Option<bool>,
    /// CPU seconds of server and agent during the tunnel run.
    server_cpu_s: f64,
    agent_cpu_s: f64,
    /// On a peer's row: edge-tunnel's value of the same measurement in
    /// this run (the row's `tunnel` column holds the peer's).
    #[serde(skip_serializing_if = "Option::is_none")]
    edge_tunnel: Option<f64>,
}

/// A peer's row (see [`crate::peers`]): `peer` measured where the tunnel
/// measured `tunnel`, against the same `direct`.
pub fn peer_row(
    workload: &str,
    unit: &str,
    direct: f64,
    peer: f64,
    tunnel: f64,
    cpu: (f64, f64),
) -> Row {
    Row {
        edge_tunnel: Some(tunnel),
        ..row(workload, unit, direct, peer, "—", None, cpu)
    }
}

/// A row: `direct` and `tunnel` in `unit`, whether `target` was met
/// (`check`; `None` for rows without a target), and the CPU seconds of
/// the two processes on the measured path.
pub fn row(
    workload: &str,
    unit: &str,
    direct: f64,
    tunnel: f64,
    target: &str,
    check: Option<bool>,
    cpu: (f64, f64),
) -> Row {
    Row {
        workload: workload.into(),
        unit: unit.into(),
        direct,
        tunnel,
        ratio: if direct > 0.0 { tunnel / direct } else { 0.0 },
        target: target.into(),
        met: check,
        server_cpu_s: cpu.0,
        agent_cpu_s: cpu.1,
        edge_tunnel: None,
    }
}

/// Bytes per second in Mbit/s.
pub fn mbit(bytes_per_sec: f64) -> f64 {
    bytes_per_sec * 8.0 / 1e6
}

/// A duration in µs.
pub fn us(x: Duration) -> f64 {
    x.as_secs_f64() * 1e6
}

/// One transport in the QUIC vs HTTP/2 comparison.
#[derive(Serialize)]
pub struct TransportRow {
    pub transport: String,
    pub bulk_mbit: f64,
    pub ping_p50_us: f64,
    pub ping_p99_us: f64,
    pub conns_per_s: f64,
    /// Ping-pong next to a bulk transfer, 1% loss, 50 Mbit/s.
    pub hol_ping_p50_us: f64,
    pub hol_ping_p99_us: f64,
}

#[derive(Serialize, Default)]
pub struct Memory {
    agent_idle_rss_kib: u64,
    agent_peak_hwm_kib: u64,
    server_idle_rss_kib: u64,
    server_peak_hwm_kib: u64,
    /// The most kernel socket memory each held at once ([`socket_mem`];
    /// `None`: not measured on this host).
    ///
    /// [`socket_mem`]: crate::socket_mem
    agent_peak_socket_kib: Option<u64>,
    server_peak_socket_kib: Option<u64>,
    /// The same for each peer's cloud and edge process.
    peers: Vec<PeerMemory>,
}

#[derive(Serialize)]
struct PeerMemory {
    name: String,
    cloud_idle_rss_kib: u64,
    cloud_peak_hwm_kib: u64,
    cloud_peak_socket_kib: Option<u64>,
    edge_idle_rss_kib: u64,
    edge_peak_hwm_kib: u64,
    edge_peak_socket_kib: Option<u64>,
}

impl Memory {
    /// Server and agent RSS before any workload.
    pub fn idle(bed: &Testbed) -> Memory {
        Memory {
            agent_idle_rss_kib: proc_status(bed.agent.pid(), "VmRSS:"),
            server_idle_rss_kib: proc_status(bed.server.pid(), "VmRSS:"),
            peers: bed
                .peers
                .iter()
                .map(|p| {
                    let [c, e] = p.pids();
                    PeerMemory {
                        name: p.name.to_owned(),
                        cloud_idle_rss_kib: proc_status(c, "VmRSS:"),
                        cloud_peak_hwm_kib: 0,
                        cloud_peak_socket_kib: None,
                        edge_idle_rss_kib: proc_status(e, "VmRSS:"),
                        edge_peak_hwm_kib: 0,
                        edge_peak_socket_kib: None,
                    }
                })
                .collect(),
            ..Memory::default()
        }
    }

    /// Adds the peak memory so far of every tunnel process: RSS (VmHWM)
    /// and kernel socket memory.
    pub fn record_peak(&mut self, bed: &Testbed) {
        let (agent, server) = (bed.agent.pid(), bed.server.pid());
        self.agent_peak_hwm_kib = proc_status(agent, "VmHWM:");
        self.server_peak_hwm_kib = proc_status(server, "VmHWM:");
        self.agent_peak_socket_kib = socket_mem::peak_kib(agent);
        self.server_peak_socket_kib = socket_mem::peak_kib(server);
        for (peer, m) in bed.peers.iter().zip(self.peers.iter_mut()) {
            let [c, e] = peer.pids();
            m.cloud_peak_hwm_kib = proc_status(c, "VmHWM:");
            m.edge_peak_hwm_kib = proc_status(e, "VmHWM:");
            m.cloud_peak_socket_kib = socket_mem::peak_kib(c);
            m.edge_peak_socket_kib = socket_mem::peak_kib(e);
        }
    }
}

#[derive(Serialize)]
pub struct Report {
    date: String,
    machine: String,
    command: String,
    quick: bool,
    /// Workloads run (`--only`); all when empty.
    only: Vec<Workload>,
    /// Share of CPU time the hypervisor stole from this VM during the run
    /// (`/proc/stat`): high values mean a noisy neighbour, not our code.
    steal_share: f64,
    /// Context switches per ping-pong round trip of server, agent, cloud
    /// forwarder, edge forwarder (each path did the same number).
    switches_per_round_trip: Option<[f64; 4]>,
    rows: Vec<Row>,
    memory: Memory,
    transports: Vec<TransportRow>,
    fleet: Option<FleetReport>,
    pub soak: Option<SoakReport>,
    pub attacks: Vec<AttackRow>,
    /// Tunneled connections left open after a workload.
    pub leftovers: Vec<crate::testbed::Leftover>,
}

impl Report {
    /// The report of `cli`'s run, dated now.
    pub fn new(
        cli: &Cli,
        steal_share: f64,
        switches_per_round_trip: Option<[f64; 4]>,
        rows: Vec<Row>,
        memory: Memory,
        transports: Vec<TransportRow>,
        fleet: Option<FleetReport>,
    ) -> Report {
        let machine = format!(
            "{} cores, Linux {}",
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(0),
            std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .unwrap_or_default()
                .trim()
        );
        let date = time::OffsetDateTime::now_utc()
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default();
        Report {
            date,
            machine,
            command: cli.command(),
            quick: cli.quick,
            only: cli.only.clone(),
            steal_share,
            switches_per_round_trip,
            rows,
            memory,
            transports,
            fleet,
            soak: None,
            attacks: Vec::new(),
            leftovers: Vec::new(),
        }
    }

    /// Prints the table, writes the raw results to `json_path` and, if
    /// given, the table to `results_path`.
    pub fn write(&self, json_path: &str, results_path: Option<&str>) -> Result<()> {
        let table = render(self);
        println!("{table}");
        std::fs::write(json_path, serde_json::to_string_pretty(self)?)?;
        eprintln!("raw results: {json_path}");
        if let Some(path) = results_path {
            std::fs::write(path, table)?;
            eprintln!("table: {path}");
        }
        Ok(())
    }
}

/// The Markdown table: tunnel vs direct rows, QUIC vs HTTP/2, memory,
/// fleet, soak, attacks.
pub fn render(r: &Report) -> String {
    let mut out = render_benchmarks(r);
    out.push_str(&render_leftovers(&r.leftovers));
    if let Some(soak) = &r.soak {
        out.push_str(&crate::soak::render(soak));
    }
    if !r.attacks.is_empty() {
        out.push_str(&crate::attacks::render(&r.attacks));
    }
    out
}

fn render_benchmarks(r: &Report) -> String {
    let mut out = String::new();
    out.push_str(&format!(
        "Date: {}  \nMachine: {}  \nCommand: `{}`{}  \nCPU time stolen by the hypervisor during the run: {:.1}%\n\n",
        r.date,
        r.machine,
        r.command,
        if r.quick {
            " (quick mode: shorter runs, fewer connections)"
        } else {
            ""
        },
        r.steal_share * 100.0
    ));
    if r.rows.is_empty() && r.transports.is_empty() && r.fleet.is_none() {
        // Only the soak or the attacks ran: no benchmark table.
        return out;
    }
    out.push_str("| workload | unit | direct | tunnel | tunnel ÷ direct | target | met | server CPU s | agent CPU s |\n");
    out.push_str("|---|---|---:|---:|---:|---|---|---:|---:|\n");
    for row in &r.rows {
        out.push_str(&format!(
            "| {} | {} | {:.1} | {:.1} | {:.2}× | {} | {} | {:.2} | {:.2} |\n",
            row.workload,
            row.unit,
            row.direct,
            row.tunnel,
            row.ratio,
            row.target,
            match row.met {
                Some(true) => "yes",
                Some(false) => "**no**",
                None => "—",
            },
            row.server_cpu_s,
            row.agent_cpu_s
        ));
    }
    if r.rows.iter().any(|row| row.workload.contains(REFERENCE)) {
        out.push_str(&format!(
            "\nRows marked \"{REFERENCE}\" are the floor for any tunnel made of two relaying processes: \
             the same one-worker tokio runtime copying TCP to TCP in `cloud` and in `edge`, without \
             QUIC, TLS or multiplexing. Their CPU columns are the cloud and the edge forwarder.\n"
        ));
    }
    let peer_rows: Vec<&Row> = r
        .rows
        .iter()
        .filter(|row| row.edge_tunnel.is_some())
        .collect();
    if !peer_rows.is_empty() {
        out.push_str(
            "\n### edge-tunnel against the peers, same run\n\n\
             | workload | unit | peer | edge-tunnel | edge-tunnel ÷ peer | peer ÷ direct |\n\
             |---|---|---:|---:|---:|---:|\n",
        );
        for row in peer_rows {
            let tunnel = row.edge_tunnel.unwrap_or_default();
            out.push_str(&format!(
                "| {} | {} | {:.1} | {:.1} | {:.2}× | {:.2}× |\n",
                row.workload,
                row.unit,
                row.tunnel,
                tunnel,
                if row.tunnel > 0.0 {
                    tunnel / row.tunnel
                } else {
                    0.0
                },
                row.ratio,
            ));
        }
        out.push_str(
            "\nFor throughput and connection rates above 1.00× is better for edge-tunnel; for \
             latencies and times below 1.00× is.\n",
        );
    }
    if let Some([s, a, fc, fe]) = r.switches_per_round_trip {
        out.push_str(&format!(
            "\nContext switches per 64 B ping-pong round trip: server {s:.2}, agent {a:.2}; \
             forwarders {fc:.2} (cloud), {fe:.2} (edge).\n"
        ));
    }
    if let [quic, h2] = &r.transports[..] {
        out.push_str(&format!(
            "\n### QUIC and HTTP/2 side by side\n\n| workload | QUIC | HTTP/2 | QUIC ÷ HTTP/2 |\n|---|---:|---:|---:|\n\
             | bulk 1 stream, download (Mbit/s) | {:.0} | {:.0} | {:.2}× |\n\
             | 64 B ping-pong p50 (µs) | {:.0} | {:.0} | {:.2}× |\n\
             | 64 B ping-pong p99 (µs) | {:.0} | {:.0} | {:.2}× |\n\
             | new conn + req/resp, c=1 (conn/s) | {:.0} | {:.0} | {:.2}× |\n\
             | head-of-line: ping-pong p50 next to a bulk download, 1% loss, 50 Mbit/s (µs) | {:.0} | {:.0} | {:.2}× |\n\
             | head-of-line: ping-pong p99, same (µs); target QUIC ≤ 0.5× HTTP/2 | {:.0} | {:.0} | {:.2}× ({}) |\n",
            quic.bulk_mbit, h2.bulk_mbit, quic.bulk_mbit / h2.bulk_mbit,
            quic.ping_p50_us, h2.ping_p50_us, quic.ping_p50_us / h2.ping_p50_us,
            quic.ping_p99_us, h2.ping_p99_us, quic.ping_p99_us / h2.ping_p99_us,
            quic.conns_per_s, h2.conns_per_s, quic.conns_per_s / h2.conns_per_s,
            quic.hol_ping_p50_us, h2.hol_ping_p50_us, quic.hol_ping_p50_us / h2.hol_ping_p50_us,
            quic.hol_ping_p99_us, h2.hol_ping_p99_us, quic.hol_ping_p99_us / h2.hol_ping_p99_us,
            yes(quic.hol_ping_p99_us <= 0.5 * h2.hol_ping_p99_us),
        ));
    }
    let m = &r.memory;
    out.push_str(&format!(
        "\n| memory | KiB | target |\n|---|---:|---|\n\
         | agent idle RSS | {} | ≤ 8192 ({}) |\n| agent peak (VmHWM) after all workloads | {} | ≤ 49152 ({}) |\n\
         | server idle RSS | {} | ≤ 16384 ({}) |\n| server peak (VmHWM) | {} | — |\n",
        m.agent_idle_rss_kib,
        yes(m.agent_idle_rss_kib <= 8192),
        m.agent_peak_hwm_kib,
        // #18: an agent's peaks at most 48 MiB (the first runner's was 64).
        yes(m.agent_peak_hwm_kib <= 49152),
        m.server_idle_rss_kib,
        yes(m.server_idle_rss_kib <= 16384),
        m.server_peak_hwm_kib
    ));
    for p in &m.peers {
        out.push_str(&format!(
            "| {}: cloud idle / peak, edge idle / peak | {} / {}, {} / {} | — |\n",
            p.name,
            p.cloud_idle_rss_kib,
            p.cloud_peak_hwm_kib,
            p.edge_idle_rss_kib,
            p.edge_peak_hwm_kib
        ));
    }
    out.push_str(&socket_table(m));
    let Some(f) = &r.fleet else {
        return out;
    };
    out.push_str(&format!(
        "\n### Fleet: {} simulated agents (distinct certificates, one `edge-fleet` process) on one server\n\n\
         | measure | value | target |\n|---|---:|---|\n\
         | registered (generator / server gauge), failures, agents tried again | {} / {}, {}, {} | all ({}) |\n\
         | time to register all | {:.1} s | ≤ 60 s ({}) |\n\
         | server RSS before / with the fleet / peak | {} / {} / {} KiB | ≤ 500 MiB ({}) |\n\
         | server CPU while the fleet idles (keep-alives), {:.0} s window | {:.1}% of one core | ≤ 10% ({}) |\n",
        f.agents,
        f.registered,
        f.server_agents_connected,
        f.failed,
        f.retried,
        yes(f.registered == f.agents && f.server_agents_connected == f.agents as u64),
        f.register_secs,
        yes(f.register_secs <= 60.0),
        f.server_idle_rss_before_kib,
        f.server_rss_kib,
        f.server_hwm_kib,
        yes(f.server_hwm_kib <= 500 * 1024),
        f.idle_window_secs,
        f.server_idle_cpu_share * 100.0,
        yes(f.server_idle_cpu_share <= 0.10),
    ));
    if let Some(e) = &f.first_error {
        out.push_str(&format!("\nFirst fleet registration error: `{e}`\n"));
    }
    if let Some(e) = &f.first_retried_error {
        out.push_str(&format!(
            "\nFirst failed attempt of an agent tried again: `{e}`\n"
        ));
    }
    out
}

/// Peak RSS and peak kernel socket memory side by side, for every tunnel,
/// and their sum: roughly what the process's memory cgroup would have
/// peaked at on cgroup v2 (the two peaks need not coincide; RSS counts the
/// binary's file pages, which the cgroup may not, and leaves out slab,
/// which it counts).
fn socket_table(m: &Memory) -> String {
    let (Some(server), Some(agent)) = (m.server_peak_socket_kib, m.agent_peak_socket_kib) else {
        return "\nKernel socket memory: not measured (no cgroup v1 memory controller with \
                socket accounting on this host, or the processes could not be moved into \
                their cgroups).\n"
            .to_owned();
    };
    let row = |who: &str, rss: u64, sock: Option<u64>| match sock {
        Some(sock) => format!("| {who} | {rss} | {sock} | {} |\n", rss + sock),
        None => format!("| {who} | {rss} | not measured | — |\n"),
    };
    let mut out =
        "\n| peak memory, KiB | RSS (VmHWM) | kernel socket memory | sum |\n|---|---:|---:|---:|\n"
            .to_owned();
    out.push_str(&row(
        "edge-tunnel server (cloud)",
        m.server_peak_hwm_kib,
        Some(server),
    ));
    out.push_str(&row(
        "edge-tunnel agent (edge)",
        m.agent_peak_hwm_kib,
        Some(agent),
    ));
    for p in &m.peers {
        out.push_str(&row(
            &format!("{} (cloud)", p.name),
            p.cloud_peak_hwm_kib,
            p.cloud_peak_socket_kib,
        ));
        out.push_str(&row(
            &format!("{} (edge)", p.name),
            p.edge_peak_hwm_kib,
            p.edge_peak_socket_kib,
        ));
    }
    out
}

fn yes(b: bool) -> &'static str {
    if b {
        "met"
    } else {
        "**not met**"
    }
}

/// What the tunnel left open after its workloads: a section only when it
/// left something.
fn render_leftovers(leftovers: &[crate::testbed::Leftover]) -> String {
    let mut out = String::new();
    if leftovers.is_empty() {
        return out;
    }
    out.push_str(
        "\n### Tunneled connections left open\n\n\
         Still counted open 10 s after the workload's clients were done (a relay ends \
         within 5 s of both FINs). Either side's bug, it is a leak, and it holds a drain.\n",
    );
    let count = |n: Option<u64>| n.map_or("no answer".to_owned(), |n| n.to_string());
    for l in leftovers {
        out.push_str(&format!(
            "\n{}: server {}, agent {}; TCP sockets then:\n\n```\n{}```\n",
            l.after,
            count(l.server),
            count(l.agent),
            l.sockets
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn memory(server: Option<u64>, agent: Option<u64>, peer: Option<u64>) -> Memory {
        Memory {
            agent_idle_rss_kib: 7_000,
            agent_peak_hwm_kib: 29_000,
            server_idle_rss_kib: 8_000,
            server_peak_hwm_kib: 33_000,
            agent_peak_socket_kib: agent,
            server_peak_socket_kib: server,
            peers: vec![PeerMemory {
                name: "rathole".into(),
                cloud_idle_rss_kib: 12_000,
                cloud_peak_hwm_kib: 13_000,
                cloud_peak_socket_kib: peer,
                edge_idle_rss_kib: 12_000,
                edge_peak_hwm_kib: 30_000,
                edge_peak_socket_kib: Some(29_000),
            }],
        }
    }

    #[test]
    fn the_socket_table_sums_what_was_measured_and_says_what_was_not() {
        let t = socket_table(&memory(Some(100_000), Some(27_000), None));
        assert!(
            t.contains("| edge-tunnel server (cloud) | 33000 | 100000 | 133000 |"),
            "{t}"
        );
        assert!(
            t.contains("| edge-tunnel agent (edge) | 29000 | 27000 | 56000 |"),
            "{t}"
        );
        // A peer process that could not be moved in reads as such.
        assert!(
            t.contains("| rathole (cloud) | 13000 | not measured | — |"),
            "{t}"
        );
        assert!(
            t.contains("| rathole (edge) | 30000 | 29000 | 59000 |"),
            "{t}"
        );
    }

    #[test]
    fn without_our_own_measurements_the_table_is_not_drawn() {
        for m in [
            memory(None, Some(1), Some(1)),
            memory(Some(1), None, Some(1)),
        ] {
            let t = socket_table(&m);
            assert!(t.contains("Kernel socket memory: not measured"), "{t}");
            assert!(!t.contains('|'), "{t}");
        }
    }

    #[test]
    fn leftovers_get_a_section_only_when_there_are_some() {
        assert_eq!(render_leftovers(&[]), "");
        let out = render_leftovers(&[crate::testbed::Leftover {
            after: "after the echo".into(),
            server: Some(0),
            agent: Some(1),
            sockets: "edge:\nESTAB 0 0 198.18.1.2:7000 198.18.1.2:40000\n".into(),
        }]);
        assert!(out.contains("### Tunneled connections left open"), "{out}");
        assert!(out.contains("after the echo: server 0, agent 1;"), "{out}");
        assert!(out.contains("ESTAB 0 0 198.18.1.2:7000"), "{out}");
    }
}
