//! Benchmark runner: every workload through the tunnel and over a direct
//! routed TCP path, interleaved in the same run, on the network-namespace
//! topology of the end-to-end tests (cloud / router / edge). The tunnel
//! runs as the real release binaries; the direct path is the same edge
//! servers on other ports that the router lets through.
//!
//! ```text
//! cargo run --release -p benches -- [--quick] [--json PATH] [--results PATH]
//! ```
//!
//! Needs root (network namespaces) and `cargo build --release --bins`.

mod fleet_run;
mod forwarder;
mod load;

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use e2e::netns::{self, bin, Proc, Topology, CLOUD_IP, EDGE_IP};
use e2e::Pki;
use load::Ports;
use serde::Serialize;

const TUNNEL: Ports = Ports::from(7000);
const DIRECT: Ports = Ports::from(7100);
/// The reference path: two plain TCP forwarders, entered in `cloud` at
/// these ports, hopping through `FLOOR_HOP` in `edge` to the direct ports.
const FLOOR: Ports = Ports::from(7200);
const FLOOR_HOP: Ports = Ports::from(7300);
const ADMIN: &str = "127.0.0.1:9091";

#[derive(Clone, Copy)]
struct Plan {
    bulk_secs: f64,
    ping_pongs: usize,
    conns: usize,
    fanout_conns: usize,
    hol_secs: f64,
    hol_pings: usize,
    fleet_agents: usize,
    fleet_idle_secs: u64,
}

const FULL: Plan = Plan {
    bulk_secs: 10.0,
    ping_pongs: 20_000,
    conns: 2_000,
    fanout_conns: 1_000,
    hol_secs: 20.0,
    hol_pings: 1_000,
    fleet_agents: 10_000,
    fleet_idle_secs: 30,
};
const QUICK: Plan = Plan {
    bulk_secs: 2.0,
    ping_pongs: 2_000,
    conns: 256,
    fanout_conns: 200,
    hol_secs: 6.0,
    hol_pings: 200,
    fleet_agents: 500,
    fleet_idle_secs: 5,
};

/// One row of the results table.
#[derive(Serialize, Clone)]
struct Row {
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
}

#[derive(Serialize)]
struct Report {
    date: String,
    machine: String,
    command: String,
    quick: bool,
    /// Workloads run (`--only`); all when empty.
    only: Vec<String>,
    /// Share of CPU time the hypervisor stole from this VM during the run
    /// (`/proc/stat`): high values mean a noisy neighbour, not our code.
    steal_share: f64,
    /// Context switches per ping-pong round trip of server, agent, cloud
    /// forwarder, edge forwarder (each path did the same number).
    switches_per_round_trip: Option<[f64; 4]>,
    rows: Vec<Row>,
    memory: Memory,
    transports: Vec<TransportRow>,
    fleet: Option<fleet_run::FleetReport>,
}

/// Workload groups `--only` can select.
const WORKLOADS: [&str; 6] = [
    "bulk",
    "ping-pong",
    "conn-rate",
    "echo",
    "transports",
    "fleet",
];

/// CPU time (ticks) stolen by the hypervisor and in total, from `/proc/stat`.
fn steal_ticks() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let fields: Vec<u64> = stat
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .filter_map(|f| f.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal; guest time is
    // already counted in user and nice.
    let total = fields.iter().take(8).sum();
    (fields.get(7).copied().unwrap_or(0), total)
}

/// One transport in the QUIC vs HTTP/2 comparison.
#[derive(Serialize)]
struct TransportRow {
    transport: String,
    bulk_mbit: f64,
    ping_p50_us: f64,
    ping_p99_us: f64,
    conns_per_s: f64,
    /// Ping-pong next to a bulk transfer, 1% loss, 50 Mbit/s.
    hol_ping_p50_us: f64,
    hol_ping_p99_us: f64,
}

#[derive(Serialize, Default)]
struct Memory {
    agent_idle_rss_kib: u64,
    agent_peak_hwm_kib: u64,
    server_idle_rss_kib: u64,
    server_peak_hwm_kib: u64,
}

pub(crate) fn proc_status(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix(field))
                .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

/// Context switches (voluntary and not) of all threads of `pid` so far:
/// each voluntary one is a sleep, and so a wake-up to come.
fn context_switches(pid: u32) -> u64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    tasks
        .flatten()
        .map(|t| {
            let status = std::fs::read_to_string(t.path().join("status")).unwrap_or_default();
            status
                .lines()
                .filter_map(|l| {
                    l.strip_prefix("voluntary_ctxt_switches:")
                        .or_else(|| l.strip_prefix("nonvoluntary_ctxt_switches:"))
                })
                .filter_map(|v| v.trim().parse::<u64>().ok())
                .sum::<u64>()
        })
        .sum()
}

/// `f`'s result and the CPU seconds each of `pids` used while it ran.
fn cpu_during<T, const N: usize>(pids: [u32; N], f: impl FnOnce() -> T) -> (T, [f64; N]) {
    let before = pids.map(cpu_seconds);
    let r = f();
    let mut used = pids.map(cpu_seconds);
    for (u, b) in used.iter_mut().zip(before) {
        *u -= b;
    }
    (r, used)
}

/// utime + stime in seconds.
pub(crate) fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which is in parentheses).
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11).and_then(|u| u.parse::<f64>().ok()).unwrap_or(0.0)
        + f.get(12).and_then(|s| s.parse::<f64>().ok()).unwrap_or(0.0);
    ticks / 100.0
}

struct Bench {
    topo: Topology,
    server: Proc,
    agent: Proc,
    /// The reference forwarders in `cloud` and in `edge`.
    floor: (Proc, Proc),
    _edge_servers: netns::NsTask,
    _pki: Pki,
}

/// `--runtime` and `--worker-threads` for `who` ("SERVER" or "AGENT") from
/// `BENCH_{who}_RUNTIME` and `BENCH_{who}_WORKERS`; unset: the defaults.
fn runtime_args(who: &str) -> Vec<String> {
    let mut args = Vec::new();
    if let Ok(shape) = std::env::var(format!("BENCH_{who}_RUNTIME")) {
        args.extend(["--runtime".to_owned(), shape]);
    }
    if let Ok(n) = std::env::var(format!("BENCH_{who}_WORKERS")) {
        args.extend(["--worker-threads".to_owned(), n]);
    }
    args
}

fn spawn_agent(topo: &Topology, pki: &Pki, transport: &str) -> Result<Proc> {
    let runtime = runtime_args("AGENT");
    let mut args: Vec<&str> = runtime.iter().map(String::as_str).collect();
    args.extend_from_slice(&["--transport", transport]);
    Ok(topo.edge.spawn(
        bin("tunnel-agent").to_str().context("path")?,
        &[
            "--server",
            &format!("{CLOUD_IP}:8443"),
            "--cert-dir",
            pki.agent_dir("edge-1").to_str().context("path")?,
            "--node-name",
            "edge-1",
            "--allow",
            &format!(
                "{EDGE_IP}:{},{},{}",
                TUNNEL.echo, TUNNEL.sink, TUNNEL.source
            ),
        ]
        .into_iter()
        .chain(args)
        .collect::<Vec<_>>(),
        &topo.dir.join(format!("agent-{transport}.log")),
    ))
}

/// Label of the rows measured through the reference forwarders.
const REFERENCE: &str = "two plain TCP forwarders (reference, no tunnel)";

/// Where a client in `cloud` enters the reference forwarders.
fn floor_addr(port: u16) -> SocketAddr {
    SocketAddr::new(CLOUD_IP.parse().expect("CLOUD_IP"), port)
}

/// `LISTEN=TARGET` pairs for one forwarder process.
fn forward_pairs(from_ip: &str, from: Ports, to_ip: &str, to: Ports) -> String {
    [
        (from.echo, to.echo),
        (from.sink, to.sink),
        (from.source, to.source),
    ]
    .iter()
    .map(|(f, t)| format!("{from_ip}:{f}={to_ip}:{t}"))
    .collect::<Vec<_>>()
    .join(",")
}

/// Starts the two reference forwarders: `cloud` → `edge` → direct ports.
fn spawn_floor(topo: &Topology) -> Result<(Proc, Proc)> {
    let me = std::env::current_exe()?;
    let me = me.to_str().context("path")?;
    let edge = topo.edge.spawn(
        me,
        &[
            "--forward",
            &forward_pairs(EDGE_IP, FLOOR_HOP, EDGE_IP, DIRECT),
        ],
        &topo.dir.join("forwarder-edge.log"),
    );
    let cloud = topo.cloud.spawn(
        me,
        &[
            "--forward",
            &forward_pairs(CLOUD_IP, FLOOR, EDGE_IP, FLOOR_HOP),
        ],
        &topo.dir.join("forwarder-cloud.log"),
    );
    Ok((cloud, edge))
}

impl Bench {
    fn start() -> Result<Bench> {
        if !netns::available() {
            bail!("the benchmark needs root and iproute2/iptables/curl (network namespaces)");
        }
        let topo = Topology::new();
        netns::allow_direct(&topo, &format!("{}:{}", DIRECT.echo, DIRECT.source));
        netns::allow_direct(&topo, &format!("{}:{}", FLOOR_HOP.echo, FLOOR_HOP.source));
        let pki = Pki::with_server_ips(&[CLOUD_IP.parse()?]);
        let edge_ip: IpAddr = EDGE_IP.parse()?;
        pki.issue_agent("edge-1", &[edge_ip]);
        let edge_servers = topo.edge.spawn_task(move || {
            pin_thread(EDGE_CPU);
            async move {
                load::serve(edge_ip, TUNNEL).await;
                load::serve(edge_ip, DIRECT).await;
            }
        });
        let server_runtime = runtime_args("SERVER");
        let server = topo.cloud.spawn(
            bin("tunnel-server").to_str().context("path")?,
            &[
                "--listen",
                &format!("{CLOUD_IP}:8443"),
                "--cert-dir",
                pki.server_dir().to_str().context("path")?,
                "--transparent-listen",
                &format!("{CLOUD_IP}:8081"),
                "--admin-listen",
                ADMIN,
                "--dnat",
                "--dnat-ports",
                &format!("{},{},{}", TUNNEL.echo, TUNNEL.sink, TUNNEL.source),
            ]
            .into_iter()
            .chain(server_runtime.iter().map(String::as_str))
            .collect::<Vec<_>>(),
            &topo.dir.join("server.log"),
        );
        let agent = spawn_agent(&topo, &pki, "quic")?;
        let floor = spawn_floor(&topo)?;
        let bench = Bench {
            topo,
            server,
            agent,
            floor,
            _edge_servers: edge_servers,
            _pki: pki,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let rules = String::from_utf8_lossy(
                &bench.topo.cloud.sh(&["iptables-save", "-t", "nat"]).stdout,
            )
            .into_owned();
            if rules.contains(&format!("-d {EDGE_IP}/32")) {
                break;
            }
            if Instant::now() > deadline {
                bail!(
                    "agent did not register\nserver: {}\nagent: {}",
                    bench.server.log_text(),
                    bench.agent.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(bench)
    }

    /// Replaces the agent with one on `transport` and waits until the server
    /// routes through it.
    fn restart_agent(&mut self, transport: &str) -> Result<()> {
        self.agent.terminate();
        self.agent = spawn_agent(&self.topo, &self._pki, transport)?;
        let deadline = Instant::now() + Duration::from_secs(30);
        let want = format!("\"transport\": \"{transport}\"");
        loop {
            let (_, agents) = self.in_cloud(|| e2e::http_get(ADMIN.parse().unwrap(), "/v1/agents"));
            if agents.contains(&want) && agents.contains("\"draining\": false") {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "agent on {transport} did not register: {}",
                    self.agent.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::new(EDGE_IP.parse().unwrap(), port)
    }

    /// Runs `f` against the direct path, then the tunnel; returns both and
    /// the CPU the tunnel processes used during the tunnel run.
    fn pair<T: Send>(&self, f: impl Fn(Ports) -> T + Sync) -> (T, T, f64, f64) {
        let direct = f(DIRECT);
        let (tunnel, [s, a]) = cpu_during([self.server.pid(), self.agent.pid()], || f(TUNNEL));
        (direct, tunnel, s, a)
    }

    /// Runs `f` against the reference forwarders; returns the result and
    /// the CPU the cloud and edge forwarder used.
    fn floor<T>(&self, f: impl Fn(Ports) -> T) -> (T, f64, f64) {
        let (r, [c, e]) = cpu_during([self.floor.0.pid(), self.floor.1.pid()], || f(FLOOR));
        (r, c, e)
    }

    fn in_cloud<F, Fut, T>(&self, f: F) -> T
    where
        F: FnOnce() -> Fut + Send,
        Fut: std::future::Future<Output = T>,
        T: Send,
    {
        self.topo.cloud.block_on(|| {
            pin_thread(CLIENT_CPU);
            f()
        })
    }
}

/// The load generator's client and the edge servers each run on one
/// thread, pinned to different CPUs: client and target are different hosts
/// in reality, so a round trip between them never gets the shortcut of a
/// same-CPU wake-up, on the direct path or through the tunnel. (Unpinned,
/// the direct ping-pong flips between ~15 µs and ~120 µs with the
/// scheduler's placement.) The tunnel's processes are not pinned.
const CLIENT_CPU: usize = 0;
const EDGE_CPU: usize = 1;

fn pin_thread(cpu: usize) {
    if std::thread::available_parallelism().map_or(1, |n| n.get()) <= cpu {
        return;
    }
    let mut set = nix::sched::CpuSet::new();
    if set.set(cpu).is_ok() {
        let _ = nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set);
    }
}

fn row(
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
    }
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("--forward") {
        let pairs = args
            .get(2)
            .context("--forward LISTEN=TARGET[,LISTEN=TARGET...]")?;
        return forwarder::run(pairs);
    }
    let quick = args.iter().any(|a| a == "--quick");
    let flag = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let json_path = flag("--json").unwrap_or_else(|| "target/bench-results.json".into());
    let results_path = flag("--results");
    let mut plan = if quick { QUICK } else { FULL };
    let count = |name: &str, max: usize| -> Result<Option<usize>> {
        flag(name)
            .map(|n| {
                n.parse()
                    .ok()
                    .filter(|v| (1..=max).contains(v))
                    .with_context(|| format!("{name} {n:?} is not within 1..={max}"))
            })
            .transpose()
    };
    if let Some(n) = count("--fanout-conns", 10_000)? {
        plan.fanout_conns = n;
    }
    if let Some(n) = count("--fleet-agents", 100_000)? {
        plan.fleet_agents = n;
    }
    let only: Vec<String> = match flag("--only") {
        Some(list) => list.split(',').map(|w| w.trim().to_owned()).collect(),
        None => Vec::new(),
    };
    if let Some(bad) = only.iter().find(|w| !WORKLOADS.contains(&w.as_str())) {
        bail!(
            "--only: unknown workload {bad:?}; known: {}",
            WORKLOADS.join(",")
        );
    }
    let runs = |w: &str| only.is_empty() || only.iter().any(|o| o == w);
    let steal_before = steal_ticks();
    let bench = Bench::start()?;
    std::thread::sleep(Duration::from_secs(1));
    let mut memory = Memory {
        agent_idle_rss_kib: proc_status(bench.agent.pid(), "VmRSS:"),
        server_idle_rss_kib: proc_status(bench.server.pid(), "VmRSS:"),
        ..Memory::default()
    };
    let mut rows = Vec::new();
    let mut switches_per_round_trip = None;
    let mbit = |bps: f64| bps * 8.0 / 1e6;
    let us = |x: Duration| x.as_secs_f64() * 1e6;

    for (upload, label) in [
        (true, "bulk 1 stream, upload (cloud→edge)"),
        (false, "bulk 1 stream, download (edge→cloud)"),
    ]
    .into_iter()
    .filter(|_| runs("bulk"))
    {
        let (d, t, sc, ac) = bench.pair(|p| {
            let port = if upload { p.sink } else { p.source };
            bench.in_cloud(|| load::bulk(Bench::addr(port), upload, 1, plan.bulk_secs))
        });
        rows.push(row(
            label,
            "Mbit/s",
            mbit(d),
            mbit(t),
            "≥ 0.40×",
            Some(t / d >= 0.40),
            (sc, ac),
        ));
        if !upload {
            let (f, cc, ec) = bench.floor(|p| {
                bench.in_cloud(|| load::bulk(floor_addr(p.source), false, 1, plan.bulk_secs))
            });
            rows.push(row(
                &format!("{label}: {REFERENCE}"),
                "Mbit/s",
                mbit(d),
                mbit(f),
                "—",
                None,
                (cc, ec),
            ));
        }
    }
    if runs("bulk") {
        let (d, t, sc, ac) = bench.pair(|p| {
            bench.in_cloud(|| load::bulk(Bench::addr(p.source), false, 8, plan.bulk_secs))
        });
        rows.push(row(
            "bulk 8 streams, download",
            "Mbit/s",
            mbit(d),
            mbit(t),
            "≥ 0.40×",
            Some(t / d >= 0.40),
            (sc, ac),
        ));
    }
    if runs("ping-pong") {
        // Interleaved in blocks rather than one path after the other: this
        // workload is dominated by wake-up latency, which drifts on a VM.
        let pids = [
            bench.server.pid(),
            bench.agent.pid(),
            bench.floor.0.pid(),
            bench.floor.1.pid(),
        ];
        let switches_before = pids.map(context_switches);
        let addrs = [
            Bench::addr(DIRECT.echo),
            Bench::addr(TUNNEL.echo),
            floor_addr(FLOOR.echo),
        ];
        let (mut times, [sc, ac, fc, ec]) = cpu_during(pids, || {
            bench.in_cloud(|| load::ping_pong_interleaved(&addrs, plan.ping_pongs, 500))
        });
        let (mut f, mut t, mut d) = (
            times.pop().unwrap_or_default(),
            times.pop().unwrap_or_default(),
            times.pop().unwrap_or_default(),
        );
        let mut per_round_trip = [0.0; 4];
        for ((per, pid), before) in per_round_trip.iter_mut().zip(pids).zip(switches_before) {
            // Threads that exited took their counts along: never below 0.
            *per = context_switches(pid).saturating_sub(before) as f64 / plan.ping_pongs as f64;
        }
        switches_per_round_trip = Some(per_round_trip);
        f.sort();
        d.sort();
        t.sort();
        for (name, q) in [("p50", 0.5), ("p99", 0.99)] {
            let (dv, tv) = (us(load::percentile(&d, q)), us(load::percentile(&t, q)));
            rows.push(row(
                &format!("64 B ping-pong {name}"),
                "µs",
                dv,
                tv,
                "≤ 1.5×",
                Some(tv / dv <= 1.5),
                (sc, ac),
            ));
        }
        for (name, q) in [("p50", 0.5), ("p99", 0.99)] {
            let (dv, fv) = (us(load::percentile(&d, q)), us(load::percentile(&f, q)));
            rows.push(row(
                &format!("64 B ping-pong {name}: {REFERENCE}"),
                "µs",
                dv,
                fv,
                "—",
                None,
                (fc, ec),
            ));
        }
    }
    if runs("conn-rate") {
        for c in [1usize, 64] {
            let (d, t, sc, ac) = bench
                .pair(|p| bench.in_cloud(|| load::conn_rate(Bench::addr(p.echo), plan.conns, c)));
            let ok = t.0 / d.0 >= 0.40 && t.1 == 0;
            rows.push(row(
                &format!("new conn + 64 B req/resp, c={c} (failures {}/{})", d.1, t.1),
                "conn/s",
                d.0,
                t.0,
                "≥ 0.40×",
                Some(ok),
                (sc, ac),
            ));
            let (f, fc, ec) = bench
                .floor(|p| bench.in_cloud(|| load::conn_rate(floor_addr(p.echo), plan.conns, c)));
            rows.push(row(
                &format!(
                    "new conn + 64 B req/resp, c={c}: {REFERENCE} (failures {})",
                    f.1
                ),
                "conn/s",
                d.0,
                f.0,
                "—",
                None,
                (fc, ec),
            ));
        }
    }
    if runs("echo") {
        let (d, t, sc, ac) = bench.pair(|p| {
            bench.in_cloud(|| load::fanout(Bench::addr(p.echo), plan.fanout_conns, 256 * 1024))
        });
        let ok = t.0 / d.0 <= 2.0 && t.1 == 0;
        rows.push(row(
            &format!(
                "{} concurrent × 256 KiB echo (failures {}/{})",
                plan.fanout_conns, d.1, t.1
            ),
            "s",
            d.0,
            t.0,
            "≤ 2.0×",
            Some(ok),
            (sc, ac),
        ));
    }
    memory.agent_peak_hwm_kib = proc_status(bench.agent.pid(), "VmHWM:");
    memory.server_peak_hwm_kib = proc_status(bench.server.pid(), "VmHWM:");

    // QUIC and HTTP/2 side by side, then the head-of-line case: a 64-byte
    // ping-pong next to a bulk download through the same agent, with 1%
    // loss and a 50 Mbit/s cap at the router.
    let mut transports = Vec::new();
    let mut bench = bench;
    for transport in ["quic", "h2"].into_iter().filter(|_| runs("transports")) {
        bench.restart_agent(transport)?;
        let bulk =
            bench.in_cloud(|| load::bulk(Bench::addr(TUNNEL.source), false, 1, plan.bulk_secs));
        let mut pp = bench.in_cloud(|| load::ping_pong(Bench::addr(TUNNEL.echo), plan.ping_pongs));
        pp.sort();
        let (rate, _) = bench.in_cloud(|| load::conn_rate(Bench::addr(TUNNEL.echo), plan.conns, 1));
        bench.topo.shape(Some((50, 0.01)));
        let hol = bench.in_cloud(|| async {
            let bulk = load::bulk(Bench::addr(TUNNEL.source), false, 1, plan.hol_secs);
            let pings = async {
                // Let the bulk transfer fill the link first.
                tokio::time::sleep(Duration::from_millis(500)).await;
                load::ping_pong(Bench::addr(TUNNEL.echo), plan.hol_pings).await
            };
            let (_, mut pings) = tokio::join!(bulk, pings);
            pings.sort();
            pings
        });
        bench.topo.shape(None);
        transports.push(TransportRow {
            transport: transport.into(),
            bulk_mbit: mbit(bulk),
            ping_p50_us: us(load::percentile(&pp, 0.5)),
            ping_p99_us: us(load::percentile(&pp, 0.99)),
            conns_per_s: rate,
            hol_ping_p50_us: us(load::percentile(&hol, 0.5)),
            hol_ping_p99_us: us(load::percentile(&hol, 0.99)),
        });
    }

    let fleet = if runs("fleet") {
        Some(fleet_run::run(
            &bench.topo,
            &bench._pki,
            plan.fleet_agents,
            Duration::from_secs(plan.fleet_idle_secs),
        )?)
    } else {
        None
    };
    let steal_after = steal_ticks();
    let steal_share =
        (steal_after.0 - steal_before.0) as f64 / (steal_after.1 - steal_before.1).max(1) as f64;

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
    let mut command =
        "cargo build --release --bins && cargo run --release -p benches --".to_owned();
    if quick {
        command.push_str(" --quick");
    }
    if !only.is_empty() {
        command.push_str(&format!(" --only {}", only.join(",")));
    }
    let report = Report {
        date,
        machine,
        command,
        quick,
        only,
        steal_share,
        switches_per_round_trip,
        rows,
        memory,
        transports,
        fleet,
    };
    let table = render(&report);
    println!("{table}");
    std::fs::write(&json_path, serde_json::to_string_pretty(&report)?)?;
    eprintln!("raw results: {json_path}");
    if let Some(path) = results_path {
        std::fs::write(&path, table)?;
        eprintln!("table: {path}");
    }
    Ok(())
}

fn render(r: &Report) -> String {
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
         | agent idle RSS | {} | ≤ 8192 ({}) |\n| agent peak (VmHWM) after all workloads | {} | ≤ 65536 ({}) |\n\
         | server idle RSS | {} | ≤ 16384 ({}) |\n| server peak (VmHWM) | {} | — |\n",
        m.agent_idle_rss_kib,
        yes(m.agent_idle_rss_kib <= 8192),
        m.agent_peak_hwm_kib,
        yes(m.agent_peak_hwm_kib <= 65536),
        m.server_idle_rss_kib,
        yes(m.server_idle_rss_kib <= 16384),
        m.server_peak_hwm_kib
    ));
    let Some(f) = &r.fleet else {
        return out;
    };
    out.push_str(&format!(
        "\n### Fleet: {} simulated agents (distinct certificates, one `edge-fleet` process) on one server\n\n\
         | measure | value | target |\n|---|---:|---|\n\
         | registered (generator / server gauge), failures | {} / {}, {} | all ({}) |\n\
         | time to register all | {:.1} s | ≤ 60 s ({}) |\n\
         | server RSS before / with the fleet / peak | {} / {} / {} KiB | ≤ 500 MiB ({}) |\n\
         | server CPU while the fleet idles (keep-alives), {:.0} s window | {:.1}% of one core | ≤ 10% ({}) |\n",
        f.agents,
        f.registered,
        f.server_agents_connected,
        f.failed,
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
    out
}

fn yes(b: bool) -> &'static str {
    if b {
        "met"
    } else {
        "**not met**"
    }
}
